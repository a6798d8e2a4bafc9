"""The fused modules under the autograd usage patterns of a demanding user, against the eager modules.

Every fused-capable module (``backend="triton"``, the interpreter on CPU) is run next to an eager copy
with the same weights, at tiny sizes, and must behave as the eager one does:

* batched upstream gradients: ``torch.autograd.grad(..., is_grads_batched=True)`` (and so
  ``torch.autograd.functional.jacobian(..., vectorize=True)``) gives eager's gradients. The
  launchers cannot read the legacy vmap's batched tensors; the fused backward used to fail on them
  ("Cannot access storage of BatchedTensorImpl") while eager's worked. With ``create_graph=True`` as
  well the fused path raises an error naming the op;
* ``backward(retain_graph=True)`` twice adds exactly the same gradients again, and
  ``autograd.grad`` twice returns the same ones (no saved tensor or buffer is used as scratch);
* a frozen parameter (each in turn) gets no gradient and leaves every other gradient bitwise as
  it was; inputs that need no gradient change nothing either;
* an upstream gradient that is expanded (stride 0), permuted, sliced or float64 gives bitwise the
  gradients of the same values passed contiguous in the output's dtype (fp32 and fp16);
* full backward hooks and pre-hooks see eager's shapes and values, and their replacements of
  grad_output / grad_input take effect; tensor hooks on the inputs and outputs fire and
  ``retain_grad`` works;
* ``torch.utils.checkpoint`` (reentrant and not) gives the plain values and gradients bitwise, and the
  backward reads nothing but what the saved-tensor hooks packed (the user's inputs and parameters
  overwritten after the forward change nothing);
* gradients accumulate over micro-batches, and ``zero_grad(set_to_none=False)`` restarts them;
* an input or parameter modified in place between forward and backward either raises autograd's
  version-counter error or leaves the gradients of the forward that ran: never a silent mix;
* lengths (or a LayerNorm's input beside its residual) made under ``torch.inference_mode`` train as
  on eager, which never saves them;
* under autocast the outputs and gradients have eager's dtypes.

Each pinned behaviour was checked to fail against a deliberately broken fused op (a backward that
scribbles on a saved tensor, returns gradients shifted past a frozen input, reads the upstream
gradient as contiguous, cuts its input out of the graph, stashes a tensor on ``ctx``, writes
``param.grad`` itself, or saves its inputs through ``.data``, out of reach of their version counter).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

from interformer import FusedModule, layers as Ly
from interformer.tokenizers import SparseTokenizer
from utils import DEVICE, FP32_TOL, CountOps, rel_err

pytest.importorskip("triton")
from interformer.kernels import crossnet as KC  # noqa: E402  (an import error fails, not skips)

B, L, D = 3, 5, 8
LENGTHS = [L, 0, 3]

# name -> (module factory(backend), input shapes: float shapes need a gradient; "lengths" / "ids" do not)
MODULES = {
    "gated_lce": (lambda be: Ly.GatedLCE(5, 3, D, backend=be), [(B, 5, D)]),
    "pffn_mlp": (lambda be: Ly.PersonalizedFFN(D, 2, "mlp", 8, backend=be), [(B, L, D), (B, 2, D), "lengths"]),
    "pffn_linear": (lambda be: Ly.PersonalizedFFN(D, 2, "linear", backend=be), [(B, L, D), (B, 2, D), "lengths"]),
    "cross_net": (lambda be: Ly.CrossNet(12, 3, backend=be), [(B, 12)]),
    "low_rank_cross_net": (lambda be: Ly.LowRankCrossNet(12, 2, 3, backend=be), [(B, 12)]),
    "low_rank_cross_net_phases": (lambda be: Ly.LowRankCrossNet(12, 2, 3, backend=be), [(B, 12)]),
    "dot_interaction": (lambda be: Ly.DotInteraction(4, D, backend=be), [(B, 4, D)]),
    "rotary_attention": (lambda be: Ly.RotaryMultiHeadAttention(D, 2, backend=be), [(B, L, D), "lengths"]),
    "pooled_attention": (lambda be: Ly.PoolingMultiHeadAttention(2, D, 2, backend=be), [(B, L, D), "lengths"]),
    "add_layer_norm": (lambda be: Ly.ResidualLayerNorm(D, backend=be), [(B, 4, D), (B, 4, D)]),
    "feed_forward": (lambda be: Ly.FeedForward(D, 12, D, backend=be), [(B, L, D)]),
    "grouped_embedding": (lambda be: SparseTokenizer((7, 5, 6), D, backend=be), ["ids"]),
}
NAMES = list(MODULES)


class _DotOp(FusedModule):
    """The DOT op alone (the module projects its output, so its upstream gradient is always a fresh
    contiguous one): a user's upstream gradient reaches the op's backward as it is."""

    kernel_ops = (("dot_interaction", "dot_interaction"),)

    def forward(self, z):
        return self._op("dot_interaction", "dot_interaction")(z)


class _AttentionOp(FusedModule):
    """The attention op alone, generic (q, k, v) or packed (as ``RotaryMultiHeadAttention`` calls it)."""

    kernel_ops = (("attention", "attention"),)

    def __init__(self, packed=False, backend=None):
        super().__init__(backend)
        self.packed = packed

    def forward(self, *args):
        fn = self._op("attention", "attention")
        if self.packed and hasattr(fn, "packed"):
            return fn.packed(*args, rope_base=10000.0)
        qkv = args[0].unbind(2) if self.packed else args[:3]
        return fn(*qkv, args[-1], rope_base=10000.0)


#: the ops whose module hides the user's upstream gradient from them
OPS = {
    "dot_op": (lambda be: _DotOp(be), [(B, 4, D)]),
    "attention_op": (lambda be: _AttentionOp(False, be), [(B, L, 2, 4)] * 3 + ["lengths"]),
    "attention_packed_op": (lambda be: _AttentionOp(True, be), [(B, L, 3, 2, 4), "lengths"]),
}
#: its gradient is exactly zero on the fused path (folded PMA) and rounding noise on the eager one
ZERO_ON_FUSED = "k_proj.bias"


@pytest.fixture
def case(request, monkeypatch):
    """(eager module, fused copy, inputs(dtype) -> fresh argument tuple)."""
    name = request.param
    if name.endswith("_phases"):
        monkeypatch.setattr(KC, "LOW_RANK_BACKWARD", "phases")
    factory, shapes = {**MODULES, **OPS}[name]
    torch.manual_seed(0)
    eager = factory("eager").to(DEVICE)
    with torch.no_grad():  # LayerNorm weights of 1 and biases of 0 would hide mistakes
        for n, p in eager.named_parameters():
            if "norm" in n or isinstance(eager, Ly.ResidualLayerNorm):
                p.add_(torch.randn_like(p) * 0.5)
    fused = copy.deepcopy(eager)
    for m in fused.modules():
        if isinstance(m, FusedModule):
            m.backend = "triton"

    def inputs(dtype=torch.float32):
        g = torch.Generator().manual_seed(1)
        out = []
        for s in shapes:
            if s == "lengths":
                out.append(torch.tensor(LENGTHS, device=DEVICE))
            elif s == "ids":
                out.append(torch.randint(0, 5, (B, 3), generator=g).to(DEVICE))
            else:
                out.append(torch.randn(s, generator=g).to(DEVICE, dtype).requires_grad_())
        return tuple(out)

    return eager, fused, inputs


def by_name(names):
    return pytest.mark.parametrize("case", names, indirect=True)


def _floats(args):
    return [a for a in args if a.is_floating_point()]


def _grads(m, args, grad=None, **backward_kw):
    """(output, {param name: grad}, [grad of each float input]) after one backward from zeroed grads."""
    m.zero_grad(set_to_none=True)
    out = m(*args)
    out.backward(_upstream(out) if grad is None else grad, **backward_kw)
    return out.detach(), {n: p.grad for n, p in m.named_parameters()}, [a.grad for a in _floats(args)]


def _upstream(out, seed=2):
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)


def _close(fused, eager, what):
    """Gradients of fused vs eager within the fp32 tolerance, relative to each one's norm with a floor
    of 1e-3 of the largest (a gradient that is zero at init compares absolutely)."""
    scale = max([float(e.norm()) for e in eager.values() if e is not None and e.is_floating_point()] + [1e-30])
    for n in eager:
        f, e = fused[n], eager[n]
        assert (f is None) == (e is None), f"{what}: {n} has a gradient on one path only"
        if e is None or str(n).endswith(ZERO_ON_FUSED):
            continue
        assert f.dtype == e.dtype and f.shape == e.shape, f"{what}: {n} is {f.dtype} {f.shape}, eager's {e.dtype} {e.shape}"
        if not e.is_floating_point():  # a full backward hook's grad_input entry for the lengths
            assert torch.equal(f, e), f"{what}: {n} differs"
            continue
        diff = float((f.double() - e.double()).norm())
        assert diff <= FP32_TOL * max(float(e.norm()), 1e-3 * scale), f"{what}: {n} differs by {diff:.3e}"


# ---------------------------------------------------------------- batched upstream gradients (a fix)
@by_name(NAMES)
def test_batched_upstream_gradients_give_eager_gradients(case):
    """``autograd.grad(out, [inputs, params], gs, is_grads_batched=True)``: eager's per-row gradients,
    and the fused path's own unbatched backward row by row (within rounding: the batched backward
    runs the registered ops once per row, the cross nets their reference)."""
    eager, fused, inputs = case
    results = []
    for m in (eager, fused):
        args = inputs()
        out = m(*args)
        wrt = _floats(args) + list(m.parameters())
        gs = torch.randn(3, *out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        batched = torch.autograd.grad(out, wrt, gs, is_grads_batched=True, retain_graph=True)
        rows = [torch.autograd.grad(out, wrt, g, retain_graph=True) for g in gs]
        results.append((batched, rows))
    names = [f"input {i}" for i in range(len(_floats(inputs())))] + [n for n, _ in eager.named_parameters()]
    (be, _), (bf, rows_f) = results
    _close(dict(zip(names, bf)), dict(zip(names, be)), "batched fused vs batched eager")
    _close(dict(zip(names, bf)), dict(zip(names, (torch.stack(r) for r in zip(*rows_f)))), "batched vs row by row")


@by_name(["gated_lce", "low_rank_cross_net", "pooled_attention"])
def test_batched_upstream_gradients_with_create_graph_raise_naming_the_op(case):
    """A batched backward that must also build a graph (a vectorised Hessian) cannot mark the fused
    gradients as first-order only; it raises naming the op instead of failing inside a launcher."""
    _, fused, inputs = case
    args = inputs()
    out = fused(*args)
    gs = torch.randn(2, *out.shape, device=DEVICE)
    message = r"interformer: the fused op _\w+ cannot run a batched backward \(is_grads_batched=True, or a torch.func"
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(out, _floats(args), gs, is_grads_batched=True, create_graph=True)


def test_vectorized_jacobian_of_a_fused_module_matches_eager():
    """``torch.autograd.functional.jacobian(vectorize=True)``, which batches the upstream gradients."""
    torch.manual_seed(0)
    eager = Ly.GatedLCE(3, 2, 4, backend="eager").to(DEVICE)
    fused = copy.deepcopy(eager)
    fused.backend = "triton"
    x = torch.randn(2, 3, 4, device=DEVICE)
    je = torch.autograd.functional.jacobian(eager, x, vectorize=True)
    jf = torch.autograd.functional.jacobian(fused, x, vectorize=True)
    assert rel_err(jf, je) <= FP32_TOL


# ---------------------------------------------------------------- pinned behaviours
@by_name(NAMES)
def test_backward_twice_on_a_retained_graph_adds_the_same_gradients(case):
    eager, fused, inputs = case
    args = inputs()
    out, first, first_in = _grads(fused, args, retain_graph=True)
    _close(first, _grads(eager, inputs())[1], "fused vs eager")
    first = {n: g.clone() for n, g in first.items()}
    first_in = [g.clone() for g in first_in]
    out = fused(*args)  # a new graph: twice over it, .grad accumulating
    fused.zero_grad(set_to_none=True)
    for a in _floats(args):
        a.grad = None
    out.backward(_upstream(out), retain_graph=True)
    out.backward(_upstream(out), retain_graph=True)
    for n, p in fused.named_parameters():
        assert torch.equal(p.grad, 2 * first[n]), f"second backward changed the gradient of {n}"
    for a, g in zip(_floats(args), first_in):
        assert torch.equal(a.grad, 2 * g), "second backward changed an input gradient"
    wrt = _floats(args) + list(fused.parameters())
    once = torch.autograd.grad(out, wrt, _upstream(out), retain_graph=True)
    again = torch.autograd.grad(out, wrt, _upstream(out))
    assert all(torch.equal(a, b) for a, b in zip(once, again)), "autograd.grad twice differs"


@by_name(NAMES)
def test_frozen_parameters_leave_every_other_gradient_bitwise_unchanged(case):
    eager, fused, inputs = case
    _, ref, ref_in = _grads(fused, inputs())
    for name, p in fused.named_parameters():
        pe = dict(eager.named_parameters())[name]
        p.requires_grad_(False), pe.requires_grad_(False)
        try:
            _, got, got_in = _grads(fused, inputs())
            _close(got, _grads(eager, inputs())[1], f"{name} frozen: fused vs eager")
        finally:
            p.requires_grad_(True), pe.requires_grad_(True)
        assert got[name] is None, f"frozen {name} got a gradient"
        for n in got:  # the fused ops compute the same sums whatever is frozen; the tokenizer takes
            # its per-table lookups when its tables are partly frozen (sums over the same ids, maybe reordered)
            same = torch.equal if not isinstance(fused, SparseTokenizer) else functools.partial(torch.allclose, rtol=1e-6)
            assert n == name or same(got[n], ref[n]), f"{name} frozen: gradient of {n} changed"
        assert all(torch.equal(a, b) for a, b in zip(got_in, ref_in)), f"{name} frozen: an input gradient changed"
    detached = tuple(a.detach() for a in inputs())
    _, got, _ = _grads(fused, detached)
    assert all(torch.equal(got[n], ref[n]) for n in ref), "inputs without gradient changed a parameter gradient"


#: what the fused backward leaves out when every parameter of the module is frozen: Triton launches
#: (the parameters' partial-sum reductions, the low-rank weight-gradient kernel) and aten matrix
#: products (the full-rank weight GEMMs, the folded PMA's fold gradients); each module counts only
#: what its fused op skips, not what its own nn.Linear layers skip on either path
FROZEN_SKIPS = {
    "gated_lce": ("launches",), "pffn_mlp": ("launches",), "pffn_linear": ("launches",),
    "cross_net": ("launches", "matmuls"), "low_rank_cross_net": ("launches",),
    "low_rank_cross_net_phases": ("launches",), "add_layer_norm": ("launches",), "pooled_attention": ("matmuls",),
    "feed_forward": ("launches",),
}
_MATMULS = {getattr(torch.ops.aten, n) for n in ("mm", "bmm", "addmm", "addbmm", "baddbmm", "mv", "addmv", "addr", "addr_")}


def _backward_work(module, args):
    """``({"launches": n, "matmuls": n}, [input gradients])`` of one backward of ``module`` (the
    CPU runs it on this thread, where the dispatch mode sees its ops). Matrix products, not all aten
    ops: every trainable parameter adds ops of its own (``AccumulateGrad``'s), skipped work or not."""
    from interformer.profiling import triton_launches

    module.zero_grad(set_to_none=True)
    out = module(*args)
    with triton_launches() as launches, CountOps() as counted:
        out.backward(_upstream(out))
    matmuls = sum(n for op, n in counted.ops.items() if op.overloadpacket in _MATMULS)
    return {"launches": sum(launches.values()), "matmuls": matmuls}, [a.grad for a in _floats(args)]


@by_name(list(FROZEN_SKIPS))
def test_a_frozen_module_skips_its_parameter_gradients_and_keeps_the_input_gradients(case, request):
    """Every parameter frozen (fine-tuning around a module, or gradients for the inputs alone): the
    fused backward computes no parameter gradient (fewer launches or matrix products than with the
    parameters trainable, as aten's own backward formulas skip what no input needs), and the input
    gradients are bitwise those of the trainable module (the same kernels compute them) and match eager's."""
    eager, fused, inputs = case
    name = request.node.callspec.params["case"]
    trainable, ref_in = _backward_work(fused, inputs())
    for m in (fused, eager):
        m.requires_grad_(False)
    frozen, got_in = _backward_work(fused, inputs())
    assert all(p.grad is None for p in fused.parameters())
    assert all(torch.equal(a, b) for a, b in zip(got_in, ref_in)), "an input gradient changed"
    if got_in:
        _, _, eager_in = _grads(eager, inputs())
        _close(dict(enumerate(got_in)), dict(enumerate(eager_in)), "frozen: fused vs eager input gradients")
    for kind in ("launches", "matmuls"):
        assert frozen[kind] <= trainable[kind], f"frozen: more {kind} ({frozen[kind]} > {trainable[kind]})"
    skipped = FROZEN_SKIPS[name]
    assert all(frozen[k] < trainable[k] for k in skipped), \
        f"{name} frozen: nothing skipped (frozen {frozen}, trainable {trainable}; expected fewer {skipped})"


def test_a_frozen_cross_layer_skips_its_weight_gemm_alone():
    """A full-rank cross net with one layer's kernel frozen runs one weight GEMM less; the other
    layers' gradients are bitwise unchanged (the rest is pinned by the per-parameter test above)."""
    torch.manual_seed(0)
    net = Ly.CrossNet(12, 3, backend="triton").to(DEVICE)
    x = torch.randn(B, 12, device=DEVICE)

    def mms():
        net.zero_grad(set_to_none=True)
        out = net(x.clone().requires_grad_())
        with CountOps() as counted:
            out.backward(_upstream(out))
        mm = sum(n for op, n in counted.ops.items() if op.overloadpacket is torch.ops.aten.mm)
        return mm, {n: p.grad for n, p in net.named_parameters()}

    n_all, ref = mms()
    net.kernels[1].requires_grad_(False)
    n_one, got = mms()
    assert (n_all, n_one) == (3, 2)
    assert got["kernels.1"] is None
    assert all(torch.equal(got[n], ref[n]) for n in got if n != "kernels.1")


def _upstream_variants(out):
    g = _upstream(out)
    nd = out.dim()
    yield "expanded", torch.randn(1, generator=torch.Generator().manual_seed(4)).to(out.device, out.dtype).expand(out.shape)
    yield "expanded rows", g[(0,) * (nd - 1)].expand(out.shape)
    yield "permuted and sliced", torch.cat([g, g], -1)[..., ::2].permute(*reversed(range(nd))).contiguous() \
        .permute(*reversed(range(nd)))
    yield "float64", g.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@by_name(NAMES + list(OPS))
def test_strided_and_other_dtype_upstream_gradients_equal_the_contiguous_ones(case, dtype):
    _, fused, inputs = case
    fused.to(dtype)
    args = inputs(dtype)
    out = fused(*args)
    wrt = _floats(args) + list(fused.parameters())
    for what, g in _upstream_variants(out):
        got = torch.autograd.grad(out, wrt, g, retain_graph=True)
        ref = torch.autograd.grad(out, wrt, g.to(dtype).contiguous(), retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), f"{what} upstream gradient: gradients differ"


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the tokenizer's ids need no gradient
@by_name(NAMES)
def test_module_and_tensor_hooks_see_what_they_see_on_eager(case):
    eager, fused, inputs = case
    records = []
    for m in (eager, fused):
        rec = {"fired": []}

        def pre(mod, grad_output, rec=rec):
            rec["grad_output"] = [g.clone() for g in grad_output]
            return tuple(2 * g for g in grad_output)

        def post(mod, grad_input, grad_output, rec=rec):
            rec["grad_input"] = [None if g is None else g.clone() for g in grad_input]
            return tuple(None if g is None else 3 * g for g in grad_input)

        handles = [m.register_full_backward_pre_hook(pre), m.register_full_backward_hook(post)]
        args = inputs()
        for i, a in enumerate(_floats(args)):
            a.register_hook(lambda g, i=i, rec=rec: rec["fired"].append((i, g.clone())))
        m.zero_grad(set_to_none=True)
        out = m(*args)
        out.retain_grad()
        out.register_hook(lambda g, rec=rec: rec["fired"].append(("out", g.clone())))
        out.backward(_upstream(out))
        for h in handles:
            h.remove()
        rec["retained"] = out.grad
        rec["params"] = {n: p.grad for n, p in m.named_parameters()}
        rec["inputs"] = [a.grad for a in _floats(args)]
        records.append(rec)
    e, f = records
    assert [g.shape for g in f["grad_output"]] == [g.shape for g in e["grad_output"]]
    assert all(torch.equal(a, b) for a, b in zip(f["grad_output"], e["grad_output"]))
    assert [None if g is None else (g.shape, g.dtype) for g in f["grad_input"]] == \
        [None if g is None else (g.shape, g.dtype) for g in e["grad_input"]]
    # every tensor hook fired once, with eager's gradient (the order of the inputs' hooks is the engine's)
    fired_f, fired_e = ({str(k): g for k, g in r["fired"]} for r in (f, e))
    assert len(fired_f) == len(f["fired"]) and sorted(fired_f) == sorted(fired_e) == \
        sorted(["out", *map(str, range(len(e["inputs"])))])
    _close(fired_f, fired_e, "tensor hooks")
    assert torch.equal(f["retained"], e["retained"])
    _close(dict(enumerate(f["grad_input"])), dict(enumerate(e["grad_input"])), "grad_input")
    _close(dict(enumerate(f["inputs"])), dict(enumerate(e["inputs"])), "input gradients")
    _close(f["params"], e["params"], "parameter gradients (grad_output doubled by the pre-hook)")
    if f["inputs"]:  # the post-hook's replacement (3x) reached the inputs
        _, _, plain = _grads(fused, inputs(), 2 * _upstream(fused(*inputs())))
        assert all(torch.allclose(a, 3 * b, rtol=1e-6, atol=1e-6) for a, b in zip(f["inputs"], plain))


@by_name(NAMES)
def test_checkpoint_and_saved_tensor_hooks_give_the_plain_gradients(case):
    _, fused, inputs = case
    out, ref, ref_in = _grads(fused, inputs())
    for reentrant in (False, True):
        if reentrant and not _floats(inputs()):
            continue  # reentrant checkpointing needs an input that requires grad (PyTorch's rule)
        ck = lambda *a: checkpoint(fused, *a, use_reentrant=reentrant)  # noqa: E731
        fused.zero_grad(set_to_none=True)
        args = inputs()
        got_out = ck(*args)
        got_out.backward(_upstream(got_out))
        assert torch.equal(got_out, out), f"checkpoint(reentrant={reentrant}) output"
        for n, p in fused.named_parameters():
            assert torch.equal(p.grad, ref[n]), f"checkpoint(reentrant={reentrant}): gradient of {n}"
        assert all(torch.equal(a.grad, g) for a, g in zip(_floats(args), ref_in))
    # the backward reads only what went through pack: everything the forward read is overwritten
    # (through .data, which no version counter sees) before the backward
    packed = []
    fused.zero_grad(set_to_none=True)
    args = inputs()
    with saved_tensors_hooks(lambda t: packed.append(1) or t.clone(), lambda t: t):
        got_out = fused(*args)
    assert packed, "no saved tensor went through the hooks"
    with torch.no_grad():
        for t in (*args, *fused.parameters()):
            t.data.copy_(torch.full_like(t, float("nan")) if t.is_floating_point() else torch.full_like(t, 2))
    got_out.backward(_upstream(got_out))
    for n, p in fused.named_parameters():
        assert torch.equal(p.grad, ref[n]), f"the backward read {n}, or something made from it, past the hooks"
    assert all(torch.equal(a.grad, g) for a, g in zip(_floats(args), ref_in)), "an input was read past the hooks"


@by_name(NAMES)
def test_gradients_accumulate_over_micro_batches(case):
    _, fused, inputs = case

    def second():
        return tuple(a.detach().mul(0.5).add(0.1).requires_grad_() if a.is_floating_point() else a.flip(0)
                     for a in inputs())

    _, g1, _ = _grads(fused, inputs())
    g1 = {n: g.clone() for n, g in g1.items()}
    _, g2, _ = _grads(fused, second())
    g2 = {n: g.clone() for n, g in g2.items()}
    fused.zero_grad(set_to_none=True)
    for args in (inputs(), second()):
        out = fused(*args)
        out.backward(_upstream(out))
    for n, p in fused.named_parameters():
        assert torch.allclose(p.grad, g1[n] + g2[n], rtol=1e-6, atol=1e-7), f"{n} did not accumulate"
    fused.zero_grad(set_to_none=False)
    out = fused(*second())
    out.backward(_upstream(out))
    for n, p in fused.named_parameters():
        assert torch.equal(p.grad, g2[n]), f"{n} after zero_grad(set_to_none=False)"


def _targets(module, args):
    """Every input and the first two parameters (the parameters all reach the ops the same way)."""
    names = [n for n, _ in module.named_parameters()]
    return [("input", i) for i, a in enumerate(args)] + [("param", n) for n in names[:2]]


@by_name(NAMES)
def test_inplace_change_after_forward_raises_or_keeps_the_gradients_of_the_forward(case):
    """Eager raises for what its ops saved; the fused ops save other things (a tensor derived from
    the ids, the lengths themselves), so they may raise where eager does not, or give the
    gradients of the forward that ran where eager raises: both are fine, a silent mix is not."""
    _, fused, inputs = case
    _, ref, ref_in = _grads(fused, inputs())
    state = copy.deepcopy(fused.state_dict())
    for kind, key in _targets(fused, inputs()):
        fused.load_state_dict(state)
        fused.zero_grad(set_to_none=True)
        args = inputs()
        out = fused(*args)
        with torch.no_grad():
            t = args[key] if kind == "input" else dict(fused.named_parameters())[key]
            t.mul_(1.5).add_(0.25) if t.is_floating_point() else t.fill_(1)
        try:
            out.backward(_upstream(out))
        except RuntimeError as exc:
            assert "modified by an inplace operation" in str(exc) or "view" in str(exc), exc
            continue
        for n, p in fused.named_parameters():
            assert torch.allclose(p.grad, ref[n], rtol=1e-6, atol=1e-7), f"{kind} {key} changed: silently wrong {n}"
        for a, g in zip(_floats(args), ref_in):
            assert torch.allclose(a.grad, g, rtol=1e-6, atol=1e-7), f"{kind} {key} changed: silently wrong input grad"
    fused.load_state_dict(state)


# ---------------------------------------------------------------- the whole model
def test_fused_model_with_frozen_parameters_and_reentrant_checkpointing_matches_eager():
    """Frozen parameters of several kinds (a LayerNorm weight, a gate, a cross layer's kernel, an
    embedding table, the PMA query) and every block under reentrant checkpointing: the fused model's
    gradients are eager's, the frozen ones None; and its logits' Jacobian rows
    (``is_grads_batched``) are eager's."""
    from interformer import InterFormerCTR, optimize
    from test_model import random_batch, tiny_config

    cfg = tiny_config()
    torch.manual_seed(0)
    eager = InterFormerCTR(cfg).to(DEVICE)
    fused = optimize(copy.deepcopy(eager), "triton")
    frozen = ["backbone.blocks.0.interaction.norm.weight", "backbone.blocks.0.cross.nonseq.gate.weight",
              "backbone.blocks.1.interaction.layers.0.dcn.W_kernels.0", "backbone.sparse_tokenizer.tables.1.weight",
              "backbone.final_cross.pma.query"]
    dense, sparse, seq, lengths, label = [t.to(DEVICE) for t in random_batch(cfg, [0, 6, 3, 1, 6, 2], 6, seed=0)]
    grads, jacobians = [], []
    for m in (eager, fused):
        params = dict(m.named_parameters())
        for n in frozen:
            params[n].requires_grad_(False)
        if m is fused:  # eager runs plain: the reference
            for block in m.backbone.blocks:
                block.forward = functools.partial(lambda *a, _f, **k: checkpoint(_f, *a, use_reentrant=True, **k),
                                                  _f=block.forward)
        d = dense.clone().requires_grad_()
        logits = m(d, sparse, seq, lengths)
        m.loss(logits, label).backward(retain_graph=True)
        grads.append({n: p.grad for n, p in m.named_parameters()})
        if m is fused:  # reentrant checkpointing takes no autograd.grad: the Jacobian from a plain forward
            for block in m.backbone.blocks:
                del block.forward
            logits = m(d, sparse, seq, lengths)
        trainable = [p for p in m.parameters() if p.requires_grad]
        rows = torch.eye(len(label), device=DEVICE)[:2]  # the Jacobian of two logits
        jacobians.append(torch.autograd.grad(logits, [d, *trainable], rows, is_grads_batched=True))
    assert all(grads[1][n] is None for n in frozen)
    _close(grads[1], grads[0], "fused vs eager")
    names = ["dense"] + [n for n, p in eager.named_parameters() if p.requires_grad]
    _close(dict(zip(names, jacobians[1])), dict(zip(names, jacobians[0])), "Jacobian rows")


# ---------------------------------------------------------------- lengths made under inference_mode
@by_name(["pffn_mlp", "pffn_linear", "rotary_attention", "pooled_attention", "attention_op", "attention_packed_op"])
def test_lengths_made_under_inference_mode_train_as_on_eager(case):
    """``lengths`` made under ``torch.inference_mode`` (a data loader's collate, say) and a training
    forward: eager saves only the masks it builds from them, and trains; the fused ops save
    ``lengths`` itself for their backward, which autograd refuses for an inference tensor
    ("Inference tensors cannot be saved for backward", a review's find). They save a copy of such
    lengths (``_dispatch.savable``), and give eager's gradients."""
    eager, fused, inputs = case
    grads = []
    for m in (eager, fused):
        args = inputs()
        with torch.inference_mode():
            lengths = torch.tensor(LENGTHS, device=DEVICE)
        assert lengths.is_inference()
        args = tuple(lengths if isinstance(a, torch.Tensor) and not a.is_floating_point() else a for a in args)
        grads.append(_grads(m, args))
    (_, pe, ie), (_, pf, if_) = grads
    _close(pf, pe, "parameters")
    _close(dict(enumerate(if_)), dict(enumerate(ie)), "inputs")


@by_name(["add_layer_norm"])
def test_an_input_made_under_inference_mode_with_a_residual_trains_as_on_eager(case):
    """``ResidualLayerNorm(x, residual)`` with x made under ``torch.inference_mode`` (frozen features,
    say) and a residual that needs a gradient: eager saves only ``x + residual``, its own tensor,
    and trains; the fused op saves x and the residual, and saves a copy of an inference tensor (a
    review's find: it raised)."""
    eager, fused, inputs = case
    grads = []
    for m in (eager, fused):
        _, residual = inputs()
        with torch.inference_mode():
            x = torch.randn(B, 4, D, generator=torch.Generator().manual_seed(5)).to(DEVICE)
        grads.append(_grads(m, (x, residual)))
    (_, pe, ie), (_, pf, if_) = grads
    _close(pf, pe, "parameters")
    _close(dict(enumerate(if_)), dict(enumerate(ie)), "inputs")


# ---------------------------------------------------------------- dtypes under autocast
@by_name(NAMES)
def test_under_autocast_outputs_and_gradients_have_eagers_dtypes(case):
    """Under fp16 autocast (fp32 parameters and inputs) every fused module returns the dtype eager's
    autocast gives, and every parameter and input gradient eager's dtype: a drop-in is one in
    dtypes too. The gated LCE and the cross nets returned fp16 where eager returns fp32 (their fp32
    biases promote) until 2026-11-29, which in the model turned the sequence stream fp16 on the
    fused path alone (reviews' finds). Values within fp16's rounding of eager's."""
    eager, fused, inputs = case
    got = []
    for m in (eager, fused):
        args = inputs()
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            out = m(*args)
        leaves = [p for p in m.parameters() if p.requires_grad] + _floats(args)
        grads = torch.autograd.grad(out, leaves, _upstream(out), allow_unused=True)
        got.append((out, grads))
    (e_out, e_grads), (f_out, f_grads) = got
    assert f_out.dtype == e_out.dtype, (f_out.dtype, e_out.dtype)
    assert rel_err(f_out, e_out) <= 2e-2
    for i, (f, e) in enumerate(zip(f_grads, e_grads)):
        assert (f is None) == (e is None), i
        if e is not None:
            assert f.dtype == e.dtype, (i, f.dtype, e.dtype)
