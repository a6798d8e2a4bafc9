"""Fused residual + LayerNorm (``interformer.kernels.layernorm``) against the eager reference and float64.

Every case compares the output and the gradients of x, the residual, weight and bias with (a)
``interformer.reference.add_layer_norm`` run in the same dtypes and (b) the same reference on float64
copies: fp32 within ``FP32_TOL`` of both, fp16 (bf16 on GPU) by the DESIGN §5 rule. Cases: N = 1,
24, 40, 64 and 200 (no power of two among most), row counts that are not a multiple of the row tile,
2-D to 4-D inputs, with and without a residual, enough rows for the backward's persistent programs
to loop (two programs under the interpreter), a residual of another dtype than x, non-contiguous
inputs and a stride-0 upstream gradient, torch.autocast, zero rows, the eager fallback for very
wide rows; the module (a drop-in ``nn.LayerNorm``) and its ``state_dict``; opcheck,
``torch.compile(fullgraph=True)``, ``torch.fx.symbolic_trace``; input errors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from interformer import reference as R
from interformer.layers import ResidualLayerNorm
from poison import NO_POISON
from utils import DEVICE, FP32_TOL, HAS_CUDA, KERNEL_DTYPES, aot_build_sm90, assert_lowp, assert_rel

pytest.importorskip("triton")  # (a machine without Triton skips the file)
from interformer.kernels import layernorm as K  # noqa: E402  (an import error fails, not skips)


def _inputs(shape, dtype, residual=True, r_dtype=None):
    N = shape[-1]
    x = torch.randn(*shape, device=DEVICE) * 2 + 0.5  # a non-zero mean per row
    r = torch.randn(*shape, device=DEVICE) if residual else None
    w = 1 + 0.3 * torch.randn(N, device=DEVICE)
    b = 0.2 * torch.randn(N, device=DEVICE)
    return [x.to(dtype), None if r is None else r.to(r_dtype or dtype), w.to(dtype), b.to(dtype)]


def _run(fn, ins, grad=None, eps=1e-5):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in ins]
    out = fn(*leaves, eps)
    g = torch.randn_like(out) if grad is None else grad.to(out.dtype)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, present, g)
    return out.detach(), list(grads), g


def _check(ins, dtype):
    out, grads, g = _run(K.add_layer_norm, ins)
    e_out, e_grads, _ = _run(R.add_layer_norm, ins, grad=g)
    r_out, r_grads, _ = _run(R.add_layer_norm, [None if t is None else t.double() for t in ins], grad=g.double())
    names = ["out", "dx"] + (["dresidual"] if ins[1] is not None else []) + ["dweight", "dbias"]
    for name, k, e, r64 in zip(names, [out, *grads], [e_out, *e_grads], [r_out, *r_grads]):
        assert k.dtype == e.dtype, f"{name}: dtype {k.dtype} != eager {e.dtype}"
        if float(r64.abs().max()) <= 1e-9:  # a zero truth (dx at N = 1): relative errors are all noise
            assert float(k.abs().max()) <= FP32_TOL, f"{name}: {float(k.abs().max()):.3e} where 0 is exact"
        elif k.dtype == torch.float32:
            assert_rel(k, r64, FP32_TOL, name + " vs float64")
            assert_rel(k, e, FP32_TOL, name + " vs eager")
        else:
            assert_lowp(k, e, r64, name)


CASES = [  # shape, residual
    ((3, 5, 24), True),      # 15 rows, one row tile
    ((300, 40), True),       # 5 row tiles of 64: the two backward programs loop
    ((2, 3, 7, 64), False),  # 4-D, no residual, N a power of two
    ((70, 200), True),       # BLOCK_N = 256 with masked columns, 16-row tiles
    ((4, 1), True),          # N = 1: the output is the bias, dx is zero
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,residual", CASES)
def test_add_layer_norm(shape, residual, dtype):
    _check(_inputs(shape, dtype, residual), dtype)


def test_residual_of_another_dtype():
    """x fp32 + residual fp16 (the model's fp32 stream plus a low-precision branch): computed as
    the promoted sum, out in fp32, each gradient in its input's dtype."""
    ins = _inputs((33, 40), torch.float32, r_dtype=torch.float16)
    out, grads, _ = _run(K.add_layer_norm, ins)
    assert out.dtype == torch.float32
    assert [t.dtype for t in grads] == [torch.float32, torch.float16, torch.float32, torch.float32]
    _check(ins, torch.float32)


def test_noncontiguous_inputs_and_stride0_grad():
    """x a transposed view (rows not contiguous), the residual a column-strided slice, and the
    upstream gradient a stride-0 expand (``out.sum()``)."""
    x_base, r_base = torch.randn(40, 9, device=DEVICE), torch.randn(9, 80, device=DEVICE)
    w, b = torch.randn(40, device=DEVICE), torch.randn(40, device=DEVICE)
    results = []
    for fn in (K.add_layer_norm, R.add_layer_norm):
        leaves = [t.clone().requires_grad_() for t in (x_base, r_base, w, b)]
        x, r = leaves[0].t(), leaves[1][:, ::2]
        assert not x.is_contiguous() and not r.is_contiguous()
        out = fn(x, r, leaves[2], leaves[3], 1e-5)
        out.sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    for name, k, e in zip(["out", "dx", "dresidual", "dweight", "dbias"], *results):
        assert_rel(k, e, FP32_TOL, name)


def test_strided_and_expanded_weight_and_bias():
    """weight and bias as stride-2 views of wider buffers, then as stride-0 expands of one value,
    forward and backward (gradients reach the buffers through the views): the kernels once read
    them as ``ptr + column`` (0.42 relative error at stride 2, reads past the storage at stride 0)."""
    x, r = torch.randn(33, 24, device=DEVICE), torch.randn(33, 24, device=DEVICE)
    g = torch.randn(33, 24, device=DEVICE)
    views = {"stride 2": (lambda: torch.randn(48, device=DEVICE), lambda t: t[::2]),
             "stride 0": (lambda: torch.randn(1, device=DEVICE), lambda t: t.expand(24))}
    for name, (make_base, view) in views.items():
        bases = [1 + 0.3 * make_base(), 0.2 * make_base()]
        results = []
        for fn in (K.add_layer_norm, R.add_layer_norm):
            leaves = [t.clone().requires_grad_() for t in bases]
            w, b = (view(t) for t in leaves)
            assert w.stride(0) != 1
            out = fn(x, r, w, b, 1e-5)
            out.backward(g)
            results.append([out.detach()] + [t.grad for t in leaves])
        for what, k, e in zip(["out", "dweight", "dbias"], *results):
            assert_rel(k, e, FP32_TOL, f"{what} ({name})")


def test_bias_gradient_keeps_the_bias_dtype():
    """An fp16 weight with an fp32 bias: dbias is rounded once, to fp32, from its fp32 sum (it was
    rounded to the weight's fp16 first: 6.6e-3 relative error instead of ~1e-6)."""
    x, r, w, b = _inputs((300, 40), torch.float32)
    ins = [x, r, w.half(), b]
    out, grads, g = _run(K.add_layer_norm, ins)
    r_out, r_grads, _ = _run(R.add_layer_norm, [t.double() for t in ins], grad=g.double())
    assert grads[3].dtype == torch.float32
    assert_rel(grads[3], r_grads[3], FP32_TOL, "dbias")


@pytest.mark.skipif(HAS_CUDA, reason="CPU autocast check; the GPU model tests run autocast on CUDA")
def test_autocast_runs_in_fp32():
    """Under autocast layer_norm runs in fp32 (autocast's policy); so does the fused op, whatever the
    input dtypes, and its gradients come back in each input's dtype."""
    ins = _inputs((20, 24), torch.float32, r_dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.float16):
        out, grads, g = _run(K.add_layer_norm, ins)
        e_out, e_grads, _ = _run(R.add_layer_norm, ins, grad=g)
    assert out.dtype == e_out.dtype == torch.float32
    for name, k, e in zip(["out", "dx", "dresidual", "dweight", "dbias"], [out, *grads], [e_out, *e_grads]):
        assert k.dtype == e.dtype, name
        # fp16 dresidual: each path rounds its fp32 gradient to fp16 once (half an ulp, 4.9e-4, each)
        assert_rel(k, e, 1e-3 if e.dtype == torch.float16 else FP32_TOL, name)


def test_zero_rows_and_wide_rows():
    out, grads, _ = _run(K.add_layer_norm, _inputs((0, 5, 24), torch.float32))
    assert out.shape == (0, 5, 24)
    assert all(float(gr.abs().sum()) == 0 for gr in grads[2:])  # weight and bias get zero gradients
    wide = _inputs((2, K.MAX_N + 1), torch.float32)  # the eager fallback: same math, same autograd
    _check(wide, torch.float32)


@pytest.mark.parametrize("x_dt, r_dt, p_dt, autocast", [
    (torch.float32, torch.float32, torch.float16, False),   # F.layer_norm alone refuses these parameters
    (torch.float16, torch.float32, torch.float32, False),   # x + residual is fp32: the parameters stay fp32
    (torch.float16, None, torch.float32, False),            # fp32 parameters with a 16-bit input: as they are
    (torch.float16, None, torch.float32, True),             # under autocast too (not rounded to fp16)
])
def test_wide_rows_take_parameters_in_any_float_dtype(x_dt, r_dt, p_dt, autocast):
    """The kernels read weight and bias in any float dtype; so does the eager fallback for rows wider
    than MAX_N, which gives exactly what ``F.layer_norm`` gives with the parameters in the dtype of
    ``x + residual`` (parameters it takes as they are, fp32 with a 16-bit input, stay as they are),
    in the kernels' output dtype (under autocast fp32, which CPU autocast's ``layer_norm`` is not)."""
    from interformer import reference

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, K.MAX_N + 1, generator=g).to(DEVICE, x_dt)
    r = None if r_dt is None else torch.randn(2, K.MAX_N + 1, generator=g).to(DEVICE, r_dt)
    w, b = (torch.randn(K.MAX_N + 1, generator=g).to(DEVICE, p_dt) for _ in range(2))
    h_dt = x_dt if r_dt is None else torch.promote_types(x_dt, r_dt)
    want_p = (w, b) if p_dt == h_dt or p_dt == torch.float32 else (w.to(h_dt), b.to(h_dt))
    with torch.autocast(DEVICE.type, dtype=torch.float16, enabled=autocast):
        out = K.add_layer_norm(x, r, w, b, 1e-5)
        want = reference.add_layer_norm(x, r, *want_p, 1e-5)
    if autocast:
        want = want.float()
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_fallbacks_give_the_kernels_dtype_under_autocast():
    """Rows of no features and rows wider than MAX_N take the eager reference; under autocast their
    output has the kernels' dtype, fp32, whatever the device's autocast does with ``layer_norm`` (a
    review found CPU autocast's fp16 there, beside the kernels' fp32)."""
    x = torch.randn(2, K.MAX_N + 1).to(DEVICE, torch.float16)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        kern = K.add_layer_norm(x[:, :8].contiguous(), None, None, None, 1e-5)
        wide = K.add_layer_norm(x, None, None, None, 1e-5)
        empty = K.add_layer_norm(x[:, :0], None, None, None, 1e-5)
    assert (kern.dtype, wide.dtype, empty.dtype) == (torch.float32,) * 3
    assert empty.shape == (2, 0)


def test_a_broken_kernel_is_caught(monkeypatch):
    """The comparison is sharp: a backward that forgets the ``mean(g * xhat)`` term fails it."""
    ins = _inputs((30, 40), torch.float32)
    real = K._bwd_impl

    def broken(grad_out, x, residual, weight, mean, rstd, bias_dtype, **kw):
        dh, dw, db = real(grad_out, x, residual, weight, mean, rstd, bias_dtype, **kw)
        h = x if residual is None else x + residual
        xhat = (h - mean.view(*h.shape[:-1], 1)) * rstd.view(*h.shape[:-1], 1)
        c1 = (grad_out * weight * xhat).mean(-1, keepdim=True)
        return dh + xhat * c1 * rstd.view(*h.shape[:-1], 1), dw, db

    monkeypatch.setattr(K, "_bwd_impl", broken)
    with pytest.raises(AssertionError, match="dx"):
        _check(ins, torch.float32)


# ----------------------------------------------------------------------------- module
def test_module_is_a_drop_in_layernorm():
    ln = nn.LayerNorm(40, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    fused = ResidualLayerNorm(40, eps=1e-6, backend="triton").to(DEVICE)
    assert isinstance(fused, nn.LayerNorm)
    assert fused.load_state_dict(ln.state_dict()) is not None
    assert set(fused.state_dict()) == {"weight", "bias"}
    x, r = torch.randn(6, 7, 40, device=DEVICE), torch.randn(6, 7, 40, device=DEVICE)
    assert_rel(fused(x, r), ln(x + r), FP32_TOL, "with residual")
    assert_rel(fused(x), ln(x), FP32_TOL, "without residual")
    eager = ResidualLayerNorm(40, eps=1e-6, backend="eager").to(DEVICE)
    eager.load_state_dict(ln.state_dict())
    torch.testing.assert_close(eager(x, r), ln(x + r), rtol=0, atol=0)  # eager is exactly nn.LayerNorm
    assert "backend='triton'" in repr(fused) and "(40,)" in repr(fused)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_module_takes_the_parameter_dtypes_nn_layernorm_takes(backend):
    """Outside autocast the module takes what ``nn.LayerNorm`` takes -- parameters all of the input's
    dtype (``x + residual``'s), or all fp32 with a 16-bit input -- and refuses the rest with one
    ValueError on both backends: fp16 parameters for an fp32 input ran on the fused path and raised
    PyTorch's "mixed dtype" on the eager one (a review's find, 2026-11-29), and so did an fp32 weight
    with an fp16 bias, or the reverse, for an fp16 input (another review's)."""
    m = ResidualLayerNorm(24, backend=backend).to(DEVICE)
    x16, x32 = torch.randn(5, 24, device=DEVICE, dtype=torch.float16), torch.randn(5, 24, device=DEVICE)
    assert m(x16).dtype == torch.float16 and m(x32).dtype == torch.float32  # fp32 parameters
    m.half()
    assert m(x16).dtype == torch.float16
    for x, r, name in ((x32, None, "x"), (x16, x32, r"x \+ residual"), (x32, x16, r"x \+ residual")):
        with pytest.raises(ValueError, match=rf"^ResidualLayerNorm: {name} is torch.float32 but the norm's parameters "
                                             r"are torch.float16 \(weight\) and torch.float16 \(bias\): outside autocast"):
            m(x, r)
    for name in ("weight", "bias"):  # one of the two fp32, the other fp16, for an fp16 input
        mixed = ResidualLayerNorm(24, backend=backend).to(DEVICE).half()
        getattr(mixed, name).data = getattr(mixed, name).data.float()
        with pytest.raises(ValueError, match=r"^ResidualLayerNorm: x is torch.float16 but the norm's parameters are "):
            mixed(x16)


def test_module_symbolic_trace():
    m = ResidualLayerNorm(24, backend="triton").to(DEVICE)
    gm = torch.fx.symbolic_trace(m)
    assert K.add_layer_norm in [n.target for n in gm.graph.nodes], gm.code
    x, r = torch.randn(5, 24, device=DEVICE), torch.randn(5, 24, device=DEVICE)
    assert_rel(gm(x, r), m(x, r), FP32_TOL)


# ----------------------------------------------------------------------------- torch.library
def test_opcheck():
    x, r, w, b = _inputs((33, 24), torch.float32)
    args = (x.requires_grad_(), r.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 1e-5, None)
    torch.library.opcheck(torch.ops.interformer.add_layer_norm_fwd.default, args)
    torch.library.opcheck(torch.ops.interformer.add_layer_norm_fwd.default, (x, None, w, b, 1e-5, torch.float32))
    _, mean, rstd = torch.ops.interformer.add_layer_norm_fwd(*args)
    bwd_args = (torch.randn(33, 24, device=DEVICE), x.detach(), r.detach(), w.detach(), mean.detach(), rstd.detach(),
                torch.float32)
    torch.library.opcheck(torch.ops.interformer.add_layer_norm_bwd.default, bwd_args)


@NO_POISON
def test_compile_fullgraph():
    torch._dynamo.reset()
    compiled = torch.compile(K.add_layer_norm, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    ins = _inputs((3, 5, 24), torch.float32)
    out, grads, g = _run(compiled, ins)
    e_out, e_grads, _ = _run(R.add_layer_norm, ins, grad=g)
    for k, e in zip([out, *grads], [e_out, *e_grads]):
        assert_rel(k, e, FP32_TOL)


def test_lean_path_matches_the_custom_op_bitwise():
    ins = _inputs((50, 40), torch.float32)
    out, grads, g = _run(K.add_layer_norm, ins)

    def via_op(x, r, w, b, eps):
        return torch.ops.interformer.add_layer_norm_fwd(x, r, w, b, eps, None)[0]

    o_out, o_grads, _ = _run(via_op, ins, grad=g)
    for k, e in zip([out, *grads], [o_out, *o_grads]):
        torch.testing.assert_close(k, e, rtol=0, atol=0)


def test_input_errors():
    x, r, w, b = _inputs((4, 24), torch.float32)
    with pytest.raises(ValueError, match="residual"):
        K.add_layer_norm(x, r[:, :12], w, b, 1e-5)
    with pytest.raises(ValueError, match="weight"):
        K.add_layer_norm(x, r, w[:12], b, 1e-5)
    with pytest.raises(ValueError, match="bias"):
        K.add_layer_norm(x, r, w, b[None], 1e-5)
    with pytest.raises(ValueError, match="one of"):
        K.add_layer_norm(x.double(), None, w, b, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,N", [(2048 * 54, 64), (2048 * 28, 64), (512 * 1004, 128)],
                         ids=["taobao-seq", "taobao-z", "long-seq"])
def test_design_shapes_bf16(rows, N):
    """The model's LayerNorms at the DESIGN shapes: an fp32 stream plus a bf16 branch, under autocast."""
    x = torch.randn(rows, N, device=DEVICE)
    r = torch.randn(rows, N, device=DEVICE).bfloat16()
    w, b = 1 + 0.3 * torch.randn(N, device=DEVICE), 0.2 * torch.randn(N, device=DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, grads, g = _run(K.add_layer_norm, [x, r, w, b])
        e_out, e_grads, _ = _run(R.add_layer_norm, [x, r, w, b], grad=g)
    for name, k, e in zip(["out", "dx", "dresidual", "dweight", "dbias"], [out, *grads], [e_out, *e_grads]):
        assert k.dtype == e.dtype, name
        assert_rel(k, e, 1e-2 if e.dtype == torch.bfloat16 else FP32_TOL, name)


def test_inference_call_writes_no_statistics_and_takes_tensors_as_they_are(monkeypatch):
    """Without autograd the forward allocates no mean/rstd (the kernel's STATS=False) and gives the
    reference's output; contiguous inputs reach the kernel without a reshape (each op is host time
    in a launch-bound step), a column-strided residual is still read right."""
    x = torch.randn(3, 5, 24, device=DEVICE)
    r = torch.randn(3, 5, 48, device=DEVICE)[..., ::2]
    w, b = torch.randn(24, device=DEVICE), torch.randn(24, device=DEVICE)
    y, mean, rstd = K._fwd_impl(x, r, w, b, 1e-5, torch.float32, stats=False)
    assert mean is None and rstd is None and y.shape == x.shape
    assert_rel(y, R.add_layer_norm(x.double(), r.double(), w.double(), b.double(), 1e-5), FP32_TOL, "out")
    seen = []
    real = K._rows
    monkeypatch.setattr(K, "_rows", lambda t, N: seen.append(t.is_contiguous()) or real(t, N))
    with torch.no_grad():
        assert_rel(K.add_layer_norm(x, r, w, b, 1e-5), y, 0.0, "no-grad entry")
    assert seen == [True, False]
    assert K._rows(x, 24)[0] is x and K._rows(x, 24)[1] == 24


def test_kernels_build_for_sm90():
    """Both kernels compile ahead of time for an H100 (sm_90) at the model's row widths, an fp32
    stream plus a bf16 residual, and fit its shared memory."""
    cases = []
    for N in (64, 128):
        bm, bn, warps = K._config(N)
        for has_r in (True, False):
            consts = dict(HAS_R=has_r, BLOCK_M=bm, BLOCK_N=bn)
            cases.append(dict(module="interformer.kernels.layernorm", kernel="_ln_fwd_kernel", consts=dict(consts, STATS=True),
                              args=dict(Y="fp32", MEAN="fp32", RSTD="fp32", X="fp32", R="bf16", W="fp32", Bias="fp32",
                                        eps=1e-5), num_warps=warps))
            cases.append(dict(module="interformer.kernels.layernorm", kernel="_ln_bwd_kernel", consts=consts,
                              args=dict(DH="fp32", PART="fp32", DY="fp32", X="fp32", R="bf16", W="fp32",
                                        MEAN="fp32", RSTD="fp32"), num_warps=warps))
    builds = aot_build_sm90(cases)
    assert len(builds) == len(cases)
    for b in builds:
        assert b["shared"] <= 232448, b


@NO_POISON
def test_module_leaves_layernorm_to_the_compiler():
    """Under torch.compile the module traces the reference ops (Inductor fuses add + LayerNorm
    itself, with the residual's producer); the custom op stays out of the graph, and the result
    is the fused module's."""
    torch._dynamo.reset()
    seen = []

    def record(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    m = ResidualLayerNorm(24, backend="triton").to(DEVICE)
    x, r = torch.randn(5, 24, device=DEVICE), torch.randn(5, 24, device=DEVICE)
    out = torch.compile(m, backend=record, fullgraph=True)(x, r)
    assert seen and not any("add_layer_norm" in t for t in seen), seen
    assert_rel(out, m(x, r), FP32_TOL)


def test_explicit_backend_ignores_the_environment(monkeypatch):
    """Like every fused module, an explicit backend does not consult $INTERFORMER_BACKEND."""
    monkeypatch.setenv("INTERFORMER_BACKEND", "bogus")
    assert ResidualLayerNorm(8, backend="eager").backend == "eager"
    with pytest.raises(ValueError, match="INTERFORMER_BACKEND"):
        ResidualLayerNorm(8)


def test_rows_with_different_row_strides():
    """x, the residual and the upstream gradient as row slices of buffers of three different widths
    (unit column stride, so ``_rows`` passes them as views, no copy): each kernel must read each
    tensor with its own row stride. Elsewhere every tensor reaching the kernels has row stride N
    (contiguous, or copied by ``_rows``) or all share one (the int64 test's FAR), so a kernel reading
    the residual or dY with x's row stride passed every test."""
    M, N = 20, 24
    xs = torch.randn(M, N + 3, device=DEVICE) * 2 + 0.5
    rs = torch.randn(M, N + 9, device=DEVICE)
    gs = torch.randn(M, N + 5, device=DEVICE)
    w, b = 1 + 0.3 * torch.randn(N, device=DEVICE), 0.2 * torch.randn(N, device=DEVICE)
    results = []
    for fn, dt in ((K.add_layer_norm, torch.float32), (R.add_layer_norm, torch.float64)):
        x, r = xs.to(dt)[:, :N], rs.to(dt)[:, 2:N + 2]
        g = gs.to(dt)[:, 1:N + 1]
        leaves = [t.detach().requires_grad_() for t in (x, r, w.to(dt), b.to(dt))]
        assert len({leaves[0].stride(0), leaves[1].stride(0), g.stride(0)}) == 3
        out = fn(*leaves, 1e-5)
        results.append([out.detach()] + list(torch.autograd.grad(out, leaves, g)))
    for name, k, r64 in zip(["out", "dx", "dresidual", "dweight", "dbias"], *results):
        assert_rel(k, r64, FP32_TOL, name)


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_eps_matters_for_rows_of_small_variance(eps):
    """Rows whose variance is about eps (x = 0.5 + 3e-3 * noise): ``rstd = 1 / sqrt(var + eps)`` then
    depends on eps at the 10-100% level, so an eps dropped, squared or replaced by the default is
    seen. (At the other tests' variance of ~5, eps moves the result by ~1e-6, under FP32_TOL.)"""
    gen = torch.Generator().manual_seed(7)
    M, N = 30, 40
    x = (0.5 + 3e-3 * torch.randn(M, N, generator=gen, dtype=torch.float64)).to(DEVICE)
    r = (1e-3 * torch.randn(M, N, generator=gen, dtype=torch.float64)).to(DEVICE)
    w = (1 + 0.3 * torch.randn(N, generator=gen, dtype=torch.float64)).to(DEVICE)
    b = (0.2 * torch.randn(N, generator=gen, dtype=torch.float64)).to(DEVICE)
    ins = [t.float() for t in (x, r, w, b)]
    out, grads, g = _run(K.add_layer_norm, ins, eps=eps)
    r_out, r_grads, _ = _run(R.add_layer_norm, [t.double() for t in ins], grad=g.double(), eps=eps)
    for name, k, r64 in zip(["out", "dx", "dresidual", "dweight", "dbias"], [out, *grads], [r_out, *r_grads]):
        assert_rel(k, r64, 10 * FP32_TOL, f"{name} (eps={eps})")  # var ~ eps: fp32 cancellation in h - mean


def test_low_precision_x_with_fp32_residual():
    """x fp16 plus an fp32 residual (the other way round from ``test_residual_of_another_dtype``):
    the sum, the output and the residual's gradient are fp32 (type promotion), x's gradient fp16.
    With x the fp32 operand, promotion returns x's dtype anyway, so a kernel that took x's dtype
    for the output or for dh passed every other test; here that loses the fp32 residual gradient's
    accuracy (fp16 rounding, ~3e-4)."""
    x, r, w, b = _inputs((33, 40), torch.float32)
    ins = [x.half(), r, w, b]
    out, grads, _ = _run(K.add_layer_norm, ins)
    assert out.dtype == torch.float32
    assert [t.dtype for t in grads] == [torch.float16, torch.float32, torch.float32, torch.float32]
    _check(ins, torch.float32)  # fp32 results vs float64 within FP32_TOL, dx by the low-precision rule


def test_autocast_output_is_fp32_for_low_precision_inputs():
    """Under autocast the output is fp32 whatever the inputs' dtypes (the module docstring): with
    fp16 x and residual (promoted dtype fp16) the fused op still returns fp32, accurate to fp32
    against float64 of the same fp16 values; gradients in each input's dtype.
    (``test_autocast_runs_in_fp32`` uses an fp32 x, whose promoted dtype is fp32 anyway.)
    On a CPU, eager ``F.layer_norm`` under fp16 autocast returns fp16 (CPU autocast leaves it out
    of its fp32 list; the kernel module's docstring says why the fused op keeps one rule), so this
    compares with float64 rather than with eager."""
    x, r, w, b = _inputs((20, 24), torch.float16)
    ins = [x, r, w.float(), b.float()]
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        out, grads, g = _run(K.add_layer_norm, ins)
    assert out.dtype == torch.float32
    assert [t.dtype for t in grads] == [torch.float16, torch.float16, torch.float32, torch.float32]
    r_out, r_grads, _ = _run(R.add_layer_norm, [t.double() for t in ins], grad=g.double())
    assert_rel(out, r_out, FP32_TOL, "out")
    for name, k, r64 in zip(["dweight", "dbias"], grads[2:], r_grads[2:]):
        assert_rel(k, r64, FP32_TOL, name)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("N", [13, 24])
def test_constant_rows_normalise_to_the_bias(N, residual):
    """A row whose values are all equal has LayerNorm ``bias`` exactly (``x - mean = 0``), as eager
    ``F.layer_norm`` gives it. The kernel's ``sum / N`` of such a row is usually one rounding off v,
    and ``rstd = 1 / sqrt(eps)`` (316 at 1e-5) made that a visible error: 0.15 relative at N = 13,
    v = 1898.3 (fp32; found by a fuzzing helper, 2026-11-28). The mean now takes one correction step,
    ``mean += sum(h - mean) / N``, exact for such rows. Rows of several constants; with a residual,
    ``x + residual`` is the constant row (x = 1000, residual = 0.1)."""
    values = torch.tensor([3.3, 1000.1, 1898.3076171875, -77.7, 0.1])
    x = values[:, None].expand(5, N).contiguous()
    r = None
    if residual:
        x, r = torch.full((5, N), 1000.0), torch.full((5, N), 0.1)
    gen = torch.Generator().manual_seed(5)
    w, b = 1 + 0.3 * torch.randn(N, generator=gen), 0.3 * torch.randn(N, generator=gen)
    ins = [t if t is None else t.to(DEVICE) for t in (x, r, w, b)]
    out, grads, g = _run(K.add_layer_norm, ins)
    assert torch.equal(out, R.add_layer_norm(*ins, 1e-5)), "not the eager result"
    assert torch.equal(out, b.to(DEVICE).expand_as(out)), "a constant row's LayerNorm is not the bias"
    # the gradients against float64 only: eager's are off by up to 7e-5 here (its variance of such
    # a row is not exactly 0, which moves rstd = 1 / sqrt(var + eps) at eps = 1e-5)
    _, r_grads, _ = _run(R.add_layer_norm, [t if t is None else t.double() for t in ins], grad=g.double())
    names = ["dx"] + (["dresidual"] if residual else []) + ["dweight", "dbias"]
    for name, k, r64 in zip(names, grads, r_grads):
        if name == "dweight":  # sum of dy * xhat with xhat = 0: a zero truth
            assert float(k.abs().max()) <= 1e-6, f"{name}: {float(k.abs().max()):.3e} where 0 is exact"
        else:
            assert_rel(k, r64, FP32_TOL, name)


@pytest.mark.parametrize("missing", ["weight", "bias", "both"])
def test_missing_affine_parameters_mean_weight_one_and_bias_zero(missing):
    """``weight`` and/or ``bias`` None, as ``F.layer_norm`` takes them (an ``nn.LayerNorm`` with
    ``elementwise_affine=False`` or ``bias=False`` has them None): the op and the module on the fused
    path give what eager gives, output and gradients, against float64. Before, the fused op refused
    them ('bias NoneType must be [N=8]') where the eager module ran (a fuzzing helper's case)."""
    ins = _inputs((3, 5, 24), torch.float32)
    if missing in ("weight", "both"):
        ins[2] = None
    if missing in ("bias", "both"):
        ins[3] = None
    out, grads, g = _run(K.add_layer_norm, ins)
    r_out, r_grads, _ = _run(R.add_layer_norm, [None if t is None else t.double() for t in ins], grad=g.double())
    for name, k, r64 in zip(["out", *("d" + n for n, t in zip(("x", "residual", "weight", "bias"), ins)
                                      if t is not None)], [out, *grads], [r_out, *r_grads]):
        assert_rel(k, r64, FP32_TOL, name)
    module = ResidualLayerNorm(24, backend="triton").to(DEVICE)
    for name, value in (("weight", ins[2]), ("bias", ins[3])):
        if value is None:
            module.register_parameter(name, None)
        else:
            with torch.no_grad():
                getattr(module, name).copy_(value)
    x, r = (t.detach().clone().requires_grad_() for t in ins[:2])
    fused = module(x, r)
    module.backend = "eager"
    assert_rel(fused, module(x, r), FP32_TOL, "module: fused vs eager")
    assert_rel(fused, r_out, FP32_TOL, "module vs float64")
