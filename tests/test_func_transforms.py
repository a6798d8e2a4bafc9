"""``torch.func`` transforms over the fused modules and the fused model, against the eager ones.

Under a transform (``grad``, ``vmap``, ``jvp``, and so ``jacrev``, ``jacfwd``, ``hessian``) the fused
ops run their eager reference (``interformer.kernels._dispatch.transformed`` gives the reasons:
the kernels have no batching or forward-mode rule, and PyTorch cannot use a custom op's autograd
formula under ``torch.func``). Before that, ``torch.func.grad`` of every fused module with
parameters failed ("it must override the setup_context staticmethod"), and ``vmap`` over a cross
net had no batching rule. Pinned here, for each fused-capable module and for the whole model:

* ``torch.func.grad`` (parameters and inputs), per-sample gradients ``vmap(grad(...))``, ``jvp``
  and ``hessian`` (``jacfwd`` over ``jacrev``) give eager's results;
* no Triton kernel is launched under a transform, and the same calls outside one launch them;
* ``vmap`` over ``torch.autograd.grad`` of a fused output computed outside the transform (the
  backward gets batched gradients: it runs the registered backward ops, as for
  ``is_grads_batched=True``) gives eager's rows.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, grad, jvp, vmap

from interformer import FusedModule, layers as Ly
from test_autograd_usage import LENGTHS, B, D, L, MODULES as _AUTOGRAD_MODULES
from utils import DEVICE, FP32_TOL, rel_err

pytest.importorskip("triton")

# the fused-capable modules of the autograd-usage tests (name -> (factory(backend), input shapes:
# float shapes are differentiated, "lengths" is not)), but the tokenizer (its input is ids, and the
# grouped lookups' transforms are tests/test_embedding.py's) and the phased cross-net setting
MODULES = {n: v for n, v in _AUTOGRAD_MODULES.items() if n not in ("grouped_embedding", "low_rank_cross_net_phases")}


@pytest.fixture(params=list(MODULES))
def case(request):
    """(eager module, fused copy, inputs tuple, upstream weights of the output)."""
    factory, shapes = MODULES[request.param]
    torch.manual_seed(0)
    eager = factory("eager").to(DEVICE)
    with torch.no_grad():  # LayerNorm weights of 1 and biases of 0 would hide mistakes
        for p in eager.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = copy.deepcopy(eager)
    for m in fused.modules():
        if isinstance(m, FusedModule):
            m.backend = "triton"
    g = torch.Generator().manual_seed(1)
    inputs = tuple(torch.tensor(LENGTHS, device=DEVICE) if s == "lengths" else torch.randn(s, generator=g).to(DEVICE)
                   for s in shapes)
    weights = torch.randn(eager(*inputs).shape, generator=g).to(DEVICE)
    return eager, fused, inputs, weights


def _float_positions(inputs):
    return [i for i, t in enumerate(inputs) if t.is_floating_point()]


def _with_floats(inputs, pos, floats) -> tuple:
    """``inputs`` with the float ones (at ``pos``) replaced by ``floats``, the others kept."""
    args = list(inputs)
    for i, t in zip(pos, floats):
        args[i] = t
    return tuple(args)


def _loss_fn(module, inputs, weights):
    """``(f, positions)``: ``f(params, *floats) -> (output * weights).sum()``, the float inputs
    (at ``positions``) replaced by ``floats`` and the others held fixed."""
    pos = _float_positions(inputs)

    def f(params, *floats):
        return (functional_call(module, params, _with_floats(inputs, pos, floats)) * weights).sum()

    return f, pos


def _params(m):
    return {n: p.detach() for n, p in m.named_parameters()}


def _close(got, want, what):
    for n in want:
        err = rel_err(got[n], want[n])
        assert err <= FP32_TOL, f"{what}: {n} differs from eager's (relative error {err:.3e})"


def _launches_of(fn):
    from interformer.profiling import triton_launches

    with triton_launches() as launches:
        out = fn()
    return out, sum(launches.values())


def test_grad_of_a_fused_module_is_eager_and_launches_no_kernel(case):
    eager, fused, inputs, weights = case
    results = {}
    for name, m in (("eager", eager), ("fused", fused)):
        f, pos = _loss_fn(m, inputs, weights)
        argnums = tuple(range(1 + len(pos)))
        (grads, launches) = _launches_of(lambda: grad(f, argnums=argnums)(_params(m), *(inputs[i] for i in pos)))
        flat = {**grads[0], **{f"input {i}": g for i, g in zip(pos, grads[1:])}}
        results[name] = (flat, launches)
    _close(results["fused"][0], results["eager"][0], "torch.func.grad")
    assert results["fused"][1] == 0, "a Triton kernel was launched under torch.func.grad"
    # outside a transform the fused module still runs its kernels
    _, launches = _launches_of(lambda: fused(*inputs))
    assert launches > 0


def test_per_sample_gradients_of_a_fused_module_are_eager(case):
    """``vmap(grad(...))`` over the samples (each as a batch of one): the per-sample parameter
    gradients of DP-SGD and influence functions."""
    eager, fused, inputs, weights = case
    results = {}
    for name, m in (("eager", eager), ("fused", fused)):
        def one(params, sample, w, m=m):  # every input of one sample, as a batch of one
            return grad(lambda p: (functional_call(m, p, tuple(t[None] for t in sample)) * w[None]).sum())(params)

        results[name] = vmap(one, in_dims=(None, 0, 0))(_params(m), inputs, weights)
    _close(results["fused"], results["eager"], "vmap(grad)")


def test_jvp_of_a_fused_module_is_eager(case):
    """Forward mode (``jvp``, and so ``jacfwd``) through the parameters and the float inputs."""
    eager, fused, inputs, weights = case
    g = torch.Generator().manual_seed(5)
    pos = _float_positions(inputs)
    tangents = ({n: torch.randn(p.shape, generator=g).to(DEVICE) for n, p in _params(eager).items()},
                *(torch.randn(inputs[i].shape, generator=g).to(DEVICE) for i in pos))
    results = {}
    for name, m in (("eager", eager), ("fused", fused)):
        params = _params(m)

        def f(p, *floats, m=m):
            return functional_call(m, p, _with_floats(inputs, pos, floats))

        out, tangent = jvp(f, (params, *(inputs[i] for i in pos)), tangents)
        results[name] = {"output": out, "tangent": tangent}
    _close(results["fused"], results["eager"], "jvp")


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_forward_ad_of_a_fused_module_is_eager_and_launches_no_kernel(case, frozen):
    """``torch.autograd.forward_ad`` (dual tensors, no ``torch.func``): output and tangent as eager's,
    with the parameters frozen or trainable, and no Triton launch inside the dual level. Before
    (found by an attention fuzzing helper), a frozen fused module launched its kernels and returned
    no tangent at all, silently, and a trainable one raised "jvp is not implemented"."""
    import torch.autograd.forward_ad as fwad

    eager, fused, inputs, weights = case
    g = torch.Generator().manual_seed(6)
    pos = _float_positions(inputs)
    tangents = [torch.randn(inputs[i].shape, generator=g).to(DEVICE) for i in pos]
    results, launches = {}, {}
    for name, m in (("eager", eager), ("fused", fused)):
        m.requires_grad_(not frozen)

        def run(m=m):
            with fwad.dual_level():
                out = m(*_with_floats(inputs, pos, [fwad.make_dual(inputs[i], t) for i, t in zip(pos, tangents)]))
                primal, tangent = fwad.unpack_dual(out)
                assert tangent is not None, f"{name}: the output has no tangent"
                return {"output": primal.detach().clone(), "tangent": tangent.detach().clone()}

        results[name], launches[name] = _launches_of(run)
    _close(results["fused"], results["eager"], "forward_ad")
    assert launches["fused"] == 0, "a Triton kernel was launched inside a forward-AD level"


def test_hessian_of_a_fused_module_is_eager(case):
    """``torch.func.hessian`` (forward over reverse mode) of the weighted output sum with respect to
    the first float input."""
    eager, fused, inputs, weights = case
    i = _float_positions(inputs)[0]
    results = {}
    for name, m in (("eager", eager), ("fused", fused)):
        f, pos = _loss_fn(m, inputs, weights)
        params, rest = _params(m), [inputs[j] for j in pos[1:]]
        results[name] = {"hessian": torch.func.hessian(lambda x, f=f, p=params, r=rest: f(p, x, *r))(inputs[i])}
    _close(results["fused"], results["eager"], "hessian")


def test_vmap_over_the_backward_of_a_fused_module_is_eager(case):
    """``vmap`` over ``torch.autograd.grad`` of an output the fused module computed outside the
    transform (its backward gets functorch's batched gradients, which a launcher cannot read: it
    failed with "Cannot access storage of BatchedTensorImpl"): the rows are eager's."""
    eager, fused, inputs, weights = case
    ups = torch.randn(3, *weights.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    results = {}
    for name, m in (("eager", eager), ("fused", fused)):
        args = tuple(t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs)
        named = {f"input {i}": a for i, a in enumerate(args) if a.requires_grad} | dict(m.named_parameters())
        out = m(*args)
        rows = vmap(lambda g, out=out: torch.autograd.grad(out, list(named.values()), g, retain_graph=True))(ups)
        results[name] = dict(zip(named, rows))
    # the folded PMA's key-bias gradient is exactly zero (softmax ignores a per-query shift), eager's
    # is rounding noise
    zero = results["fused"].pop("k_proj.bias", None)
    assert zero is None or not zero.any()
    results["eager"].pop("k_proj.bias", None)
    _close(results["fused"], results["eager"], "vmap over autograd.grad")


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_a_fused_op_of_closed_over_tensors_inside_a_transform_is_eager(case, frozen):
    """Inside ``grad`` with respect to something downstream (a head's weights), the module's own
    arguments are plain tensors the function closes over and its parameters real ones: the op
    still runs inside the transform (its outputs would be the transform's wrappers), so it must take
    the reference too. It failed both ways: trainable ("must override the setup_context
    staticmethod") and frozen ("Cannot access storage of TensorWrapper")."""
    eager, fused, inputs, weights = case
    results = {}
    for name, m in (("eager", eager), ("fused", fused)):
        m.requires_grad_(not frozen)
        g, launches = _launches_of(lambda m=m: grad(lambda w: (m(*inputs) * w).sum())(weights))
        assert name == "eager" or launches == 0
        results[name] = {"grad": g}
    _close(results["fused"], results["eager"], "closed over, inside grad")


def test_vmap_over_the_lengths_alone_launches_no_kernel():
    """``vmap`` over ``lengths`` only (the sequence and every parameter plain): the packed attention
    took its custom op there, which the batching fallback ran kernel by kernel."""
    factory, _ = MODULES["rotary_attention"]
    torch.manual_seed(0)
    eager = factory("eager").to(DEVICE)
    fused = copy.deepcopy(eager)
    fused.backend = "triton"
    s = torch.randn(1, L, D, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    many = torch.tensor([[L], [0], [2]], device=DEVICE)
    results = {}
    for name, m in (("eager", eager), ("fused", fused)):
        out, launches = _launches_of(lambda m=m: vmap(lambda n: m(s, n))(many))
        assert name == "eager" or launches == 0
        results[name] = {"output": out}
    _close(results["fused"], results["eager"], "vmap over lengths")


def test_functionalize_keeps_the_custom_ops():
    """``torch.func.functionalize`` is a functorch transform but a tracing aid: a graph made under it
    (``make_fx``) records the fused op as its ``interformer::`` custom op, as before, not the
    reference's aten ops."""
    from torch.fx.experimental.proxy_tensor import make_fx

    m = Ly.GatedLCE(5, 3, D, backend="triton").to(DEVICE)
    x = torch.randn(B, 5, D, device=DEVICE)
    gm = make_fx(torch.func.functionalize(lambda x: m(x)))(x)
    assert any("interformer.gated_lce_fwd" in str(n.target) for n in gm.graph.nodes), gm.graph


def test_torch_func_grad_of_the_fused_model_is_eager():
    """The whole fused model (tiny config, variable lengths including 0) under ``torch.func.grad``:
    the loss's gradients with respect to every parameter are eager's, and no kernel is launched."""
    from interformer import InterFormerCTR, optimize
    from test_model import random_batch, tiny_config

    cfg = tiny_config()
    torch.manual_seed(0)
    eager = InterFormerCTR(cfg).to(DEVICE)
    fused = optimize(copy.deepcopy(eager), "triton")
    batch = [t.to(DEVICE) for t in random_batch(cfg, [0, 6, 3, 1], 6, seed=0)]
    *inputs, label = batch
    grads = {}
    for name, m in (("eager", eager), ("fused", fused)):
        def loss(params):
            return m.loss(functional_call(m, params, tuple(inputs)), label)

        grads[name], launches = _launches_of(lambda: grad(loss)(_params(m)))
        if m is fused:
            assert launches == 0
    _close(grads["fused"], grads["eager"], "model torch.func.grad")
