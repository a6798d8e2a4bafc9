"""The whole model on its fused path (Triton; the interpreter on CPU).

* ``InterFormerCTR`` with every fused-capable module on ``backend="triton"`` gives the logits, the
  loss and every parameter gradient of the eager model, with variable lengths including 0 and T,
  for the default structure and for the other structural options (full-rank DCN, linear PFFN,
  the DOT backbone with causal attention).
* The same holds when every fresh allocation is filled with NaN and the grids are sized as on an
  H100 (:mod:`poison`): no kernel reads memory it did not write, or leaves part of an output unset.
* ``torch.compile(fullgraph=True)`` traces the fused model (custom ops, no graph break) and the
  compiled model agrees with the eager one, forward and backward.
* On a GPU, a whole fused training step captures in a CUDA graph (no host syncs) and replays
  correctly on new data, and ``torch.compile(mode="reduce-overhead")`` runs it in CUDA graphs
  without Inductor skipping any.
* Every ``interformer::`` operator registered by ``interformer.kernels`` is covered by an
  ``opcheck`` in the kernel tests.
"""

from __future__ import annotations

import copy
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from interformer import FusedModule, InterFormerCTR, optimize
from interformer import reference as R
from test_model import random_batch, tiny_config
from poison import PoisonedAllocations, gpu_sized_grids
from utils import DEVICE, HAS_CUDA, perturb_constant_parameters, rel_err

# DESIGN §5, fp32: the fused path against the eager path, 1e-5 under the interpreter (measured over
# this file's comparisons: at most 2.2e-6 for a gradient, 1e-7 for the logits) and 1e-3 on a GPU,
# where tile dots run as tf32x3 and sums are reordered over whole tiles.
TOL = 1e-3 if HAS_CUDA else 1e-5
LENGTHS = [0, 6, 3, 1, 6, 2]

VARIANTS = {
    "default": {},
    "dcn-full-rank-linear-pffn": dict(backbone="dcn", dcn_rank=None, pffn_mode="linear"),
    "dot-causal": dict(backbone="dot", causal=True),
}


def _variant(name):
    kw = VARIANTS[name]
    try:
        return tiny_config(**kw)
    except TypeError as exc:  # a config field renamed: fail loudly rather than skip
        raise AssertionError(f"variant {name}: {exc}") from exc


def _compare(model_e, model_f, batch, tol, what):
    """Logits, loss and every parameter gradient of two models with the same weights."""
    dense, sparse, seq, lengths, label = batch
    outs = []
    for m in (model_e, model_f):
        m.zero_grad(set_to_none=True)
        logits = m(dense, sparse, seq, lengths)
        loss = m.loss(logits, label)
        loss.backward()
        # a compiled module names its parameters "_orig_mod.<name>"
        grads = {n.removeprefix("_orig_mod."): p.grad.detach().clone()
                 for n, p in m.named_parameters() if p.grad is not None}
        outs.append((logits.detach(), loss.detach(), grads))
    (le, ls_e, ge), (lf, ls_f, gf) = outs
    assert torch.isfinite(lf).all(), f"{what}: non-finite fused logits {lf}"
    err = float((lf - le).norm() / le.norm())
    assert err <= tol, f"{what}: logits differ by {err:.3e}"
    assert abs(float(ls_f - ls_e)) <= tol * abs(float(ls_e)), f"{what}: loss {float(ls_f)} vs {float(ls_e)}"
    assert ge.keys() == gf.keys(), f"{what}: parameters with gradients differ: {ge.keys() ^ gf.keys()}"
    names = [n for n, _ in model_e.named_parameters()]
    assert set(names) == set(ge), f"{what}: parameters without gradient: {set(names) - set(ge)}"
    total = float(torch.sqrt(sum(g.double().norm() ** 2 for g in ge.values())))
    for n in ge:
        ref = float(ge[n].norm())
        diff = float((gf[n] - ge[n]).norm())
        # relative to the parameter's own gradient, floored at 1e-3 of the whole gradient (a few
        # gradients are near zero at init, e.g. PMA's shared query under a near-uniform softmax)
        assert diff <= tol * max(ref, 1e-3 * total), f"{what}: grad of {n} differs ({diff:.3e} vs |g|={ref:.3e})"


def _fused_pair(cfg, seed=0):
    """The eager model and a fused copy with the same weights. The parameters built constant
    (LayerNorm weights and biases, the cross nets' zero biases) are perturbed first: at their
    built values a fused op that left one out would give eager's numbers exactly."""
    torch.manual_seed(seed)
    eager = InterFormerCTR(cfg).to(DEVICE)
    assert perturb_constant_parameters(eager, seed=seed)
    fused = optimize(copy.deepcopy(eager), "triton")
    assert all(m.backend == "triton" for m in fused.modules() if isinstance(m, FusedModule))
    return eager, fused


def _batch(cfg, T=6, seed=0):
    return [t.to(DEVICE) for t in random_batch(cfg, LENGTHS, T, seed=seed)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_model_matches_eager(variant):
    cfg = _variant(variant)
    eager, fused = _fused_pair(cfg)
    _compare(eager, fused, _batch(cfg), TOL, variant)


#: the model's corners (config overrides, lengths, T), as the eager model is checked against DESIGN's
#: formulas in them (tests/test_model.py): a summary wider than a row's history or than T, no PMA or
#: recent tokens, per-field dense tokens, several DHEN layers, no head layer with T below
#: max_seq_len, one sample, T = 1, every row empty, an odd width
CORNERS = {
    "recent wider than T": (dict(n_recent=7), [0, 1, 3, 6], 6),
    "no pma, no recent": (dict(n_pma=0, n_recent=0), [0, 3, 6], 6),
    "per-field dense, 2 dhen layers": (dict(dense_tokens="per_field", dhen_layers=2), [0, 3, 6], 6),
    "no head layer, T < max": (dict(head=()), [0, 2, 3], 3),
    "one sample": (dict(), [2], 6),
    "T = 1": (dict(sparse_vocab_sizes=(7,)), [1, 0], 1),
    "every row empty": (dict(n_dense=0), [0, 0, 0], 4),
    "d = 24": (dict(d_model=24, num_heads=2), [0, 5, 6], 6),
}


@pytest.mark.parametrize("corner", list(CORNERS))
def test_fused_model_matches_eager_in_corners(corner):
    kw, lengths, T = CORNERS[corner]
    cfg = tiny_config(**kw)
    eager, fused = _fused_pair(cfg)
    batch = [t.to(DEVICE) for t in random_batch(cfg, lengths, T, seed=1)]
    _compare(eager, fused, batch, TOL, corner)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_model_writes_everything_it_reads(variant, monkeypatch):
    """The same comparison with every fresh allocation filled with NaN and the grids sized for an
    H100: an output element, padded row or partial-sum row that a kernel leaves unwritten (which
    the interpreter's zeroed CPU memory would hide) turns the logits or a gradient into NaN."""
    cfg = _variant(variant)
    eager, fused = _fused_pair(cfg)
    batch = _batch(cfg)
    gpu_sized_grids(monkeypatch)
    with PoisonedAllocations() as poisoned:
        _compare(eager, fused, batch, TOL, f"{variant}, poisoned")
    assert poisoned.count > 50, f"only {poisoned.count} allocations poisoned: the launchers' buffers were not seen"


def test_fused_inference_under_inference_mode():
    """Serving code runs under ``torch.inference_mode()``: the fused model gives there the logits it
    gives under ``no_grad`` (bitwise: the same forward launchers, no statistics kept for a
    backward) and the eager model's within tolerance, with lengths including 0."""
    cfg = _variant("default")
    eager, fused = _fused_pair(cfg)
    eager.eval(), fused.eval()
    batch = _batch(cfg)
    with torch.no_grad():
        ref = fused(*batch[:4])
    with torch.inference_mode():
        out, out_e = fused(*batch[:4]), eager(*batch[:4])
    assert out.is_inference() and torch.equal(out, ref)
    assert float((out - out_e).norm() / out_e.norm()) <= TOL


def test_fused_model_under_activation_checkpointing(monkeypatch):
    """Each block under ``torch.utils.checkpoint`` (non-reentrant: its forward, fused ops included,
    runs again in the backward from the saved inputs) gives the loss and every parameter gradient
    of the plain fused model, bitwise: the fused ops save and recompute nothing that depends on
    running once."""
    from torch.utils.checkpoint import checkpoint

    from interformer.profiling import triton_launches

    cfg = _variant("default")
    _, fused = _fused_pair(cfg)
    checkpointed = copy.deepcopy(fused)
    for block in checkpointed.backbone.blocks:
        monkeypatch.setattr(block, "forward",
                            lambda *a, _f=block.forward, **k: checkpoint(_f, *a, use_reentrant=False, **k))
    batch = _batch(cfg)
    results = []
    for m in (fused, checkpointed):
        loss = m.loss(m(*batch[:4]), batch[4])
        with triton_launches() as launched:
            loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}, launched))
    (l1, g1, plain), (l2, g2, recomputed) = results
    fwd = lambda launched: sum(n for k, n in launched.items() if "_fwd_" in k)  # noqa: E731
    assert fwd(plain) == 0 and fwd(recomputed) > 0  # the checkpointed blocks really ran again
    # and under create_graph=True (a gradient penalty's first pass): each saved tensor is unpacked
    # once, as non-reentrant checkpointing requires
    grads = []
    for m in (fused, checkpointed):
        m.zero_grad(set_to_none=True)
        params = [p for _, p in m.named_parameters()]
        grads.append(torch.autograd.grad(m.loss(m(*batch[:4]), batch[4]), params, create_graph=True))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert torch.equal(l1, l2)
    assert all(g1[n] is not None and torch.equal(g1[n], g2[n]) for n in g1), \
        [n for n in g1 if g1[n] is None or not torch.equal(g1[n], g2[n])]


@pytest.mark.parametrize("how", ["half", "autocast"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_model_in_float16_meets_the_low_precision_rule(variant, how):
    """The whole model in float16 (``model.half()``, fp16 parameters and dense input; bf16 where
    the hardware has it is the same code), or in fp32 under fp16 autocast, against the same
    weights in float64, by DESIGN §5's rule: the fused path's error at most twice the eager path's
    in the same precision, for the logits, the loss and the gradients. Gradients are compared as one
    vector in which every parameter's gradient is scaled by its float64 norm (floored at 1e-3 of
    the whole gradient), so that each parameter counts, not only the largest. Under autocast the
    logits have eager's dtype on both paths."""
    low = torch.float16
    cfg = _variant(variant)
    eager, fused = _fused_pair(cfg)
    batch = _batch(cfg)
    dtypes = []

    def run(model, dtype):
        lowp = dtype == low and how == "autocast"
        model = copy.deepcopy(model).to(torch.float32 if lowp else dtype)
        dense = batch[0].to(torch.float32 if lowp else dtype)
        with torch.autocast(DEVICE.type, dtype=low, enabled=lowp):
            logits = model(dense, *batch[1:4])
        dtypes.append(logits.dtype)
        loss = model.loss(logits, batch[4].to(torch.float32 if lowp else dtype))
        loss.backward()
        return logits.detach().double(), loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()}

    (l64, s64, g64), (le, se, ge), (lf, sf, gf) = run(eager, torch.float64), run(eager, low), run(fused, low)
    assert dtypes[1] == dtypes[2], dtypes  # eager's logits and the fused ones
    total = float(torch.sqrt(sum(g.norm() ** 2 for g in g64.values())))
    scale = {n: 1.0 / max(float(g.norm()), 1e-3 * total) for n, g in g64.items()}

    def flat(grads):
        return torch.cat([(grads[n] * scale[n]).flatten() for n in g64])

    assert set(gf) == set(g64) and all(torch.isfinite(g).all() for g in gf.values())
    # the loss is one number whose error sits far below fp16's unit roundoff (2^-11), where the
    # ratio of two errors is noise: floored there; logits and gradients by the rule as written
    for name, f, e, r, floor in (("logits", lf, le, l64, 1e-6), ("loss", sf, se, s64, 2.0**-11),
                                 ("gradients", flat(gf), flat(ge), flat(g64), 1e-6)):
        f_err, e_err = rel_err(f, r), rel_err(e, r)
        assert f_err <= 2 * max(e_err, floor), f"{variant} ({how}), {name}: fused fp16 error {f_err:.2e} > 2 x eager's {e_err:.2e}"


def test_a_half_fused_model_with_the_smallest_ln_eps_has_finite_gradients():
    """``model.half()`` with ``ln_eps`` below fp16's range of ``1/sigma`` (1e-12, and the smallest
    accepted, 2**-126) and padded rows: the fused LayerNorms keep their statistics in fp32, so every
    gradient is finite (the eager path on a CPU is not: config.py's ``ln_eps`` note)."""
    for eps in (1e-12, 2.0 ** -126):
        cfg = tiny_config(ln_eps=eps, num_layers=1)
        torch.manual_seed(0)
        fused = optimize(InterFormerCTR(cfg).to(DEVICE), "triton").half()
        perturb_constant_parameters(fused)
        dense, sparse, seq, lengths, label = [t.to(DEVICE) for t in random_batch(cfg, [0, 3, 6], 6)]
        logits = fused(dense.half(), sparse, seq, lengths)
        fused.loss(logits, label).backward()
        assert torch.isfinite(logits).all(), eps
        bad = [n for n, p in fused.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not bad, (eps, bad)


def _value_only(real, wrong):
    """``real`` with the forward value of ``wrong`` (same arguments) and ``real``'s gradients: a
    bug the comparison must see in the values, since no gradient goes missing."""
    def broken(*args):
        out = real(*args)
        return out + (wrong(*args) - out).detach()
    return broken


def _drop_pffn_residual(real):
    return _value_only(real, lambda s, *args: real(s, *args) - s)


def _drop_layer_norm_bias(real):
    return _value_only(real, lambda x, residual, weight, bias, eps: real(x, residual, weight, torch.zeros_like(bias), eps))


def _drop_cross_biases(real):
    return _value_only(real, lambda x0, ws, vs, biases: real(x0, ws, vs, [torch.zeros_like(b) for b in biases]))


@pytest.mark.parametrize("file,op,breaks", [
    ("pffn", "pffn_mlp", _drop_pffn_residual),
    ("layernorm", "add_layer_norm", _drop_layer_norm_bias),
    ("crossnet", "low_rank_cross_net", _drop_cross_biases),
], ids=["pffn-residual", "layernorm-bias", "cross-net-biases"])
def test_fused_model_is_sensitive_to_a_broken_kernel(monkeypatch, file, op, breaks):
    """The comparison above can fail: a fused op that drops its residual, or leaves out a
    parameter that the model builds constant (a LayerNorm bias of 0, a cross net's zero biases),
    is caught (the latter only because :func:`_fused_pair` perturbs those parameters)."""
    import importlib

    from interformer import backend

    cfg = _variant("default")
    eager, fused = _fused_pair(cfg)
    mod = importlib.import_module(f"interformer.kernels.{file}")
    broken = breaks(getattr(mod, op))
    monkeypatch.setattr(mod, op, broken)
    monkeypatch.setitem(backend._KERNELS, (file, op), broken)
    with pytest.raises(AssertionError, match="differ"):
        _compare(eager, fused, _batch(cfg), TOL, "broken")


def _module_level_tensors():
    """Names of tensors held in module-level containers of the kernel modules (caches)."""
    import sys

    found = []
    for name, mod in list(sys.modules.items()):
        if not name.startswith("interformer.kernels"):
            continue
        for attr, value in vars(mod).items():
            items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
            if any(isinstance(v, torch.Tensor) for v in items):
                found.append(f"{name}.{attr}")
    return found


def _set_inline(request, inlined) -> None:
    """``set_compile_inline(inlined)`` (True, False or None: the default) for one test, restored
    after it (with the compile caches' key tag, so that a graph compiled under one setting is never
    handed back under the other)."""
    import interformer

    before = interformer.set_compile_inline(inlined)
    request.addfinalizer(lambda: interformer.set_compile_inline(before))


@pytest.mark.parametrize("setting", ["default", "none, opaque", "none, inlined"])
def test_fused_model_compiles_fullgraph(request, monkeypatch, setting):
    """No graph break through any fused op: the custom ops' fake implementations trace, their
    autograd formulas give the backward graph. aot_eager on CPU (no C++ toolchain needed);
    the GPU run uses Inductor. The compiled step leaves no tensor in a module-level cache: one
    first filled inside ``reduce-overhead``'s warm-up would sit in the CUDA-graph pool, which
    Inductor refuses (the rotary table did, on an H100). Under the default compile-reference set
    and under ``"none"``, where every fused op (the cross nets and LayerNorm too) stays a custom op
    and the tokenizers' grouped Function is traced: ``"default"`` under the default inline setting
    (the kept ops traced into their kernels on a GPU, where Inductor launches them itself; opaque on
    the CPU), ``"none, opaque"`` with every kept op a custom op and ``"none, inlined"`` with every
    one traced into its kernels (``set_compile_inline``)."""
    from interformer import backend
    from interformer.kernels import attention

    # what set_compile_reference_ops / set_compile_inline set, restored at teardown
    reference, _, inlined = setting.partition(", ")
    monkeypatch.setattr(backend, "_COMPILE_REFERENCE", backend._compile_reference_set(reference, "test"))
    _set_inline(request, {"": None, "opaque": False, "inlined": True}[inlined])
    torch._dynamo.reset()
    monkeypatch.setattr(attention, "_ROPE_TABLES", {})
    monkeypatch.setattr(attention, "_ROPE_RETIRED", [])  # tables earlier tests outgrew
    assert _module_level_tensors() == []
    cfg = _variant("default")
    eager, fused = _fused_pair(cfg, seed=1)
    compiled = torch.compile(fused, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    compiled.loss = fused.loss
    if HAS_CUDA:  # inlined (the default on a GPU), Inductor's forward code launches the kernels itself
        import warnings

        from torch._inductor import config as inductor_config
        from torch._inductor.utils import run_and_get_code

        # caches off: code compiled by an earlier run on this machine would come back unprinted
        with inductor_config.patch(force_disable_caches=True), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "dynamo_pgo force disabled", UserWarning)
            _, code = run_and_get_code(compiled, *_batch(cfg, seed=1)[:4])
        code = "".join(code)
        if inlined == "opaque":
            assert "interformer.attention_fwd" in code and "_attn_fwd_kernel" not in code
        else:
            assert "_attn_fwd_kernel" in code and "interformer.attention_fwd" not in code
    _compare(eager, compiled, _batch(cfg, seed=1), TOL, "compiled")
    assert _module_level_tensors() == [], "a compiled step filled a module-level tensor cache"
    fused(*_batch(cfg, seed=2)[:4])  # the eager entry points do cache: the scan sees it
    assert "interformer.kernels.attention._ROPE_TABLES" in _module_level_tensors()


def test_compiled_model_serves_new_batch_sizes_without_recompiling():
    """Serving under ``torch.compile``: after the one recompile that makes the batch size and the
    sequence length dynamic, further batches of other sizes reuse the graph (eager and fused
    alike), and the fused logits stay those of the eager model; a fused training step likewise,
    with eager's gradients. Formatting a symbolic size into a
    validation message once specialised every graph to its batch size: a recompile per size, and
    eager fallback after ``torch._dynamo.config.recompile_limit`` of them."""
    from torch._dynamo.utils import counters

    cfg = _variant("default")
    eager, fused = _fused_pair(cfg, seed=3)
    eager.eval(), fused.eval()
    for model in (eager, fused):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="aot_eager")  # guards are dynamo's: any backend shows them
        for lengths, T in (([0, 6, 3, 1, 6, 2], 6), ([1, 2, 3, 4, 5, 6, 7, 0, 2], 7), ([3, 3, 1], 5), ([5] * 12, 5)):
            batch = [t.to(DEVICE) for t in random_batch(cfg, lengths, T)]
            with torch.no_grad():
                out, ref = compiled(*batch[:4]), eager(*batch[:4])
            assert float((out - ref).norm() / ref.norm()) <= TOL, (len(lengths), T)
        assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    # training too: the dynamic graph's backward through the fused ops gives eager's gradients
    eager.train(), fused.train()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fused, backend="aot_eager")
    compiled.loss = fused.loss
    for lengths, T in (([0, 6, 3, 1, 6, 2], 6), ([1, 2, 3, 4, 5, 6, 7, 0, 2], 7), ([3, 3, 1], 5)):
        _compare(eager, compiled, [t.to(DEVICE) for t in random_batch(cfg, lengths, T)], TOL, f"B={len(lengths)}")
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    torch._dynamo.reset()


def test_fused_model_exports_with_a_dynamic_batch_and_length(tmp_path):
    """``torch.export`` (the route to AOTInductor serving) of the fused inference model with the
    batch size and the sequence length dynamic: the graph keeps the fused ops as ``interformer::``
    custom ops, survives ``torch.export.save``/``load``, and the loaded program gives the eager
    model's logits on a batch of another size and length -- also in a fresh process that only
    called ``interformer.kernels.register_ops()``."""
    from torch.export import Dim

    cfg = _variant("default")
    eager, fused = _fused_pair(cfg, seed=4)
    eager.eval(), fused.eval()
    B, T = Dim("B", min=2, max=4096), Dim("T", min=2, max=1024)
    program = torch.export.export(fused, tuple(_batch(cfg)[:4]),
                                  dynamic_shapes=({0: B}, {0: B}, {0: B, 2: T}, {0: B}))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(op.startswith("interformer.") for op in ops), sorted(ops)
    torch.export.save(program, tmp_path / "fused.pt2")
    loaded = torch.export.load(tmp_path / "fused.pt2").module()
    batch = [t.to(DEVICE) for t in random_batch(cfg, [1, 2, 3, 4, 5, 0, 7, 7, 2], 7, seed=5)]
    with torch.no_grad():
        out, ref = loaded(*batch[:4]), eager(*batch[:4])
    assert float((out - ref).norm() / ref.norm()) <= TOL
    # a serving process that has never built the model: register_ops() is all it needs
    torch.save([t.cpu() for t in batch[:4]], tmp_path / "batch.pt")
    script = (
        "import os, sys, torch\n"
        "import interformer.kernels as K\n"
        "K.register_ops()\n"
        "m = torch.export.load(sys.argv[1]).module()\n"
        "dev = 'cuda' if torch.cuda.is_available() else 'cpu'\n"
        "batch = [t.to(dev) for t in torch.load(sys.argv[2])]\n"
        "with torch.no_grad():\n"
        "    torch.save(m(*batch).cpu(), sys.argv[3])\n"
    )
    env = dict(os.environ, **({} if HAS_CUDA else {"TRITON_INTERPRET": "1"}))
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "fused.pt2"), str(tmp_path / "batch.pt"),
                          str(tmp_path / "out.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    fresh = torch.load(tmp_path / "out.pt")  # same kernels; a tolerance, not bits, across processes
    assert float((fresh - out.cpu()).norm() / out.norm()) <= TOL


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_fused_model_traces_with_torch_jit_trace(tmp_path):
    """``torch.jit.trace`` (TorchScript serving) of the fused inference model records the fused ops
    as ``interformer::`` custom ops, so the traced module launches the kernels at every call and
    takes a batch of another size and length; it survives ``torch.jit.save``/``load``. Before, the
    launchers ran under the tracer: the trace failed inside a kernel, and had it not, would have held
    none of the kernels' work."""
    cfg = _variant("default")
    eager, fused = _fused_pair(cfg, seed=4)
    eager.eval(), fused.eval()
    with torch.no_grad():
        traced = torch.jit.trace(fused, tuple(_batch(cfg)[:4]), check_trace=False)
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert {"interformer::gated_lce_fwd", "interformer::attention_fwd"} <= kinds, sorted(kinds)
    torch.jit.save(traced, str(tmp_path / "fused.pt"))
    loaded = torch.jit.load(str(tmp_path / "fused.pt"))
    batch = [t.to(DEVICE) for t in random_batch(cfg, [1, 2, 3, 4, 5, 0, 7, 7, 2], 7, seed=5)]
    with torch.no_grad():
        ref = eager(*batch[:4])
        for module in (traced, loaded):
            assert float((module(*batch[:4]) - ref).norm() / ref.norm()) <= TOL


def test_every_registered_op_has_an_opcheck():
    from interformer.kernels import OP_MODULES, register_ops

    register_ops()

    root = pathlib.Path(__file__).resolve().parents[1]
    source = "\n".join(p.read_text() for p in (root / "kernels").glob("*.py"))
    registered = set(re.findall(r'custom_op\(\s*"interformer::(\w+)"', source))
    registered |= set(re.findall(r'triton_op\(\s*"interformer::(\w+)"', source))
    assert registered, "no interformer:: ops found in kernels/"
    # a test file that calls opcheck and names the op (some tests pick fwd/bwd ops by mode)
    files = [p.read_text() for p in (root / "tests").glob("test_kernel_*.py")]
    unchecked = {n for n in registered
                 if not any("opcheck(" in f and f"torch.ops.interformer.{n}" in f for f in files)}
    assert not unchecked, f"ops without an opcheck test: {sorted(unchecked)}"
    for name in registered:
        assert hasattr(torch.ops.interformer, name), f"interformer::{name} is not registered"
    # register_ops(), what a process loading an exported fused model calls, imports every file
    # that registers ops (checked from the source: in this process they may already be imported)
    registering = {p.stem for p in (root / "kernels").glob("*.py") if 'custom_op("interformer::' in p.read_text()
                   or 'triton_op("interformer::' in p.read_text()}
    assert set(OP_MODULES) == registering
    assert set(register_ops()) == registered


class _HostReads(TorchDispatchMode):
    """Records what needs a tensor's values on the host: ``.item()``/``bool()`` (ops tagged
    ``data_dependent_output``, ``is_nonzero``), ops whose output shape depends on the data
    (``dynamic_output_shape``: ``nonzero``, boolean indexing, ``unique``; integer indexing carries
    the tag too but reads nothing), copies from a device to the CPU, and ``tolist``/``numpy`` (which
    on a CPU tensor dispatch nothing). On a GPU each of them is a device-to-host sync, which
    CUDA-graph capture refuses."""

    TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
    INDEX = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default)

    def __init__(self):
        super().__init__()
        self.ops = []
        self._patch = pytest.MonkeyPatch()

    def __enter__(self):
        for name in ("tolist", "numpy", "__array__"):
            original = getattr(torch.Tensor, name)
            self._patch.setattr(torch.Tensor, name, self._recording(name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        self._patch.undo()
        return super().__exit__(*exc)

    def _recording(self, name, original):
        def method(tensor, *args, **kwargs):
            self.ops.append(f"Tensor.{name}")
            return original(tensor, *args, **kwargs)
        return method

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.INDEX:
            indices = args[1] if len(args) > 1 else ()
            if any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices):
                self.ops.append(str(func))
        elif func is torch.ops.aten.is_nonzero.default or any(t in func.tags for t in self.TAGS):
            self.ops.append(str(func))
        elif func is torch.ops.aten._to_copy.default and args[0].device.type != "cpu" \
                and str(kwargs.get("device", args[0].device)) == "cpu":
            self.ops.append(str(func))
        elif func is torch.ops.aten.copy_.default and args[0].device.type == "cpu" and args[1].device.type != "cpu":
            self.ops.append(str(func))
        return func(*args, **kwargs)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_step_reads_nothing_back_to_the_host(variant):
    """The CPU stand-in for the CUDA-graph capture test below (which needs a GPU): a fused training
    step (forward, loss, backward) and an inference forward, input validation off (the model skips
    it under capture), dispatch no op that needs device values on the host. Launches are skipped
    (:func:`interformer.profiling.triton_launches`): only the Python and aten ops around them matter
    here. The check can fail: a boolean mask, a ``tolist`` and an ``.item()`` are seen, an integer
    gather is not."""
    from interformer.profiling import triton_launches

    cfg = tiny_config(**VARIANTS[variant], validate_inputs=False)
    _, fused = _fused_pair(cfg)
    batch = _batch(cfg)
    with triton_launches(run=False), _HostReads() as reads:
        fused.loss(fused(*batch[:4]), batch[4]).backward()
        with torch.no_grad():
            fused(*batch[:4])
    assert reads.ops == [], f"{variant}: host reads {reads.ops}"
    x = torch.randn(2, 3, 4, device=DEVICE)
    with _HostReads() as reads:
        R.dot_interaction(x)  # an integer gather: no read
        x[x > 0].sum().item()
        batch[3].tolist()
    # on a GPU ``tolist`` also dispatches its device-to-host copy, which the recorder must see too
    copy = ["aten._to_copy.default"] if DEVICE.type != "cpu" else []
    assert reads.ops == ["aten.index.Tensor", "aten._local_scalar_dense.default", "Tensor.tolist"] + copy, reads.ops


@pytest.mark.gpu
def test_fused_training_step_captures_in_a_cuda_graph():
    """Forward and backward of the fused model have no host synchronisation: the whole step is
    captured in one CUDA graph (a sync would fail the capture), and a replay on new data gives the
    loss and gradients of the eager model on that data. Input validation is skipped while a stream
    is capturing (``interformer.validation``), so the default config is captured as is."""
    cfg = _variant("default")
    eager, fused = _fused_pair(cfg, seed=2)
    static = [t.clone() for t in _batch(cfg, seed=2)]

    def step():
        logits = fused(*static[:4])
        loss = fused.loss(logits, static[4])
        loss.backward()
        return logits, loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compilation, allocator) outside the capture
        for _ in range(2):
            fused.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    fused.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits, static_loss = step()

    fresh = _batch(cfg, seed=3)
    for s, f in zip(static, fresh):
        s.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    eager.zero_grad(set_to_none=True)
    ref_logits = eager(*fresh[:4])
    ref_loss = eager.loss(ref_logits, fresh[4])
    ref_loss.backward()
    assert float((static_logits - ref_logits).norm() / ref_logits.norm()) <= TOL
    assert abs(float(static_loss - ref_loss)) <= TOL * abs(float(ref_loss))
    total = float(torch.sqrt(sum(p.grad.double().norm() ** 2 for p in eager.parameters())))
    for (n, pe), pf in zip(eager.named_parameters(), fused.parameters()):
        diff = float((pf.grad - pe.grad).norm())
        assert diff <= TOL * max(float(pe.grad.norm()), 1e-3 * total), f"grad of {n} after replay ({diff:.3e})"


@pytest.mark.gpu
@pytest.mark.parametrize("inlined", [False, True], ids=["custom ops", "inlined"])
def test_fused_model_under_compile_reduce_overhead(request, inlined):
    """``torch.compile(mode="reduce-overhead")`` (what ``python -m interformer train --compile
    --compile-mode reduce-overhead`` runs) puts the fused model's training step in CUDA graphs:
    Inductor does not skip cudagraphs because of any fused op (no CPU tensor, no sync), and after
    the warm-up and recording steps a replayed step gives the eager model's logits, loss and
    gradients on new data. With the kept ops as custom ops and inlined (``set_compile_inline``)."""
    from torch._dynamo.utils import counters

    _set_inline(request, inlined)
    torch._dynamo.reset()
    counters.clear()
    cfg = _variant("default")
    eager, fused = _fused_pair(cfg, seed=4)
    compiled = torch.compile(fused, mode="reduce-overhead")
    compiled.loss = fused.loss
    for seed in (4, 5, 6):  # warm-up, record, then replays
        torch.compiler.cudagraph_mark_step_begin()
        compiled.zero_grad(set_to_none=True)
        batch = _batch(cfg, seed=seed)
        compiled.loss(compiled(*batch[:4]), batch[4]).backward()
    skips = dict(counters["inductor"])
    assert skips.get("cudagraph_skips", 0) == 0, f"Inductor skipped CUDA graphs: {skips}"
    torch.compiler.cudagraph_mark_step_begin()
    _compare(eager, compiled, _batch(cfg, seed=7), TOL, "reduce-overhead")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_backward_runs_twice_on_a_retained_graph(variant):
    """``loss.backward(retain_graph=True)`` then ``loss.backward()`` (what a user with two losses
    over one forward, or several backward passes over one graph, does): the second backward through the same fused
    nodes gives the first's gradients again, so every parameter's accumulated gradient is exactly
    twice the first. A backward that used a saved buffer as scratch (the low-rank cross net's
    ``P``, attention's softmax statistics, a partial-sum buffer kept on ``ctx``) would change the second."""
    cfg = _variant(variant)
    _, fused = _fused_pair(cfg)
    dense, sparse, seq, lengths, label = _batch(cfg)
    loss = fused.loss(fused(dense, sparse, seq, lengths), label)
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in fused.named_parameters()}
    loss.backward()
    for n, p in fused.named_parameters():
        assert torch.equal(p.grad, 2 * first[n]), (
            f"{variant}: second backward gave a different gradient for {n} "
            f"(max |diff| {float((p.grad - 2 * first[n]).abs().max()):.3e})")


def test_a_model_on_the_meta_device_runs_as_eager_does():
    """A model built on the meta device (no data: run to infer shapes, or to count FLOPs before
    allocating) runs forward and backward on meta inputs with the fused backend as with eager: the
    fused modules take the reference there (nothing for a launcher to read), and the batch's value
    checks, which read the data back, are skipped. Before, the first fused op failed (autocast
    has no meta device) and, on either backend, the value checks ("Cannot copy out of meta tensor")."""
    results = {}
    for backend in ("eager", "triton"):
        with torch.device("meta"):
            model = InterFormerCTR(tiny_config(backend=backend))
        *inputs, label = [t.to("meta") for t in random_batch(model.config, [0, 3, 6], 6)]
        logits = model(*inputs)
        model.loss(logits, label).backward()
        assert logits.is_meta and all(p.grad is not None and p.grad.is_meta for p in model.parameters())
        results[backend] = (logits.shape, logits.dtype, [(n, p.grad.shape) for n, p in model.named_parameters()])
    assert results["triton"] == results["eager"]
