"""Fused feed-forward block (``interformer.kernels.feed_forward``) against the eager reference and float64.

Every case compares the output and the gradients of x, w1, b1, w2 and b2 with (a)
:func:`interformer.reference.feed_forward` run in the same dtype and (b) the same reference run in
float64 on the very inputs the kernel saw (the fp16 roundings of the masters for fp16): fp32 within
``FP32_TOL`` of both, fp16 (bf16 on a GPU) by the DESIGN §5 rule (kernel error vs float64 <= 2x the
eager low-precision error). Sizes: K in {24, 40}, H in {33, 40, 72} (not multiples of the hidden
chunk of 32), N in {24, 40}, and K or N of 72-160 (padded to 128 and 256: the other tile tiers of
``_TIERS``, with more than one row block at 128); x 1-D, 2-D
(B = 1, 3), 3-D (T = 1, 7) and 4-D. Layouts: contiguous, a slice of the token dimension (the
Interaction Arch's ``z[:, :n]``), a slice of the feature dimension (stride 2 along K), the last two
dimensions transposed, the leading dimensions transposed (a 4-D x the launcher has to copy); the
padding around a slice is NaN, so a read outside the view shows. Upstream gradients: random,
``out.sum()`` and an explicit ``expand`` (stride 0).

Also: non-contiguous parameters (transposed, sliced, stride-0 biases); no rows, zero-sized K, H
or N; K or N past ``MAX_FEATURES`` (lowered by monkeypatch) running the reference with no launch,
and past ``FUSED_MAX_FEATURES`` as shipped (64; every other test raises it to ``MAX_FEATURES``);
autocast with fp32 x and parameters (accuracy, dtypes, no cast copies, and bitwise the same as on
pre-rounded inputs);
input validation; frozen and partially frozen parameters (which kernels run); several row blocks
per program of the weight kernel (the persistent grid, also at 3 programs and at an H100's grid);
``torch.library.opcheck``; the custom op vs the lean eager path, bit for bit; ``torch.func.grad``,
batched and double backward; ``torch.compile`` (aot_eager); the ``FeedForward`` module against the
``nn.Sequential`` it replaces, with and without dropout; ``torch.fx.symbolic_trace``; and that the
comparison fails for deliberately wrong variants.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import interformer
from interformer import reference as R
from interformer.layers import FeedForward
from interformer.profiling import replaced_triton_run, triton_launches
from poison import NO_POISON
from utils import (DEVICE, FP32_TOL, HAS_CUDA, KERNEL_DTYPES, CountOps, assert_compiled_grads_match, assert_lowp,
                   assert_rel, rel_err)

pytest.importorskip("triton")  # (a machine without Triton skips the file)
from interformer.kernels import feed_forward as K  # noqa: E402  (an import error fails, not skips)
#: FUSED_MAX_FEATURES as the package ships it (the fixture below raises it for every other test)
SHIPPED_FUSED_MAX = K.FUSED_MAX_FEATURES


@pytest.fixture(autouse=True)
def _every_tier_fused(monkeypatch):
    """The kernels at every width they hold: by default :func:`feed_forward` sends K or N past 64
    to the reference (``FUSED_MAX_FEATURES``, a GPU's timing), and the wider tiers are what many of
    these tests check. The tests of that default set it back."""
    monkeypatch.setattr(K, "FUSED_MAX_FEATURES", K.MAX_FEATURES)

NAMES = ["out", "dx", "dw1", "db1", "dw2", "db2"]
PARAMS = ["w1", "b1", "w2", "b2"]
DTYPE_IDS = lambda d: str(d).replace("torch.", "")  # noqa: E731
F64 = torch.float64
ALL_KERNELS = {"_ffn_fwd_kernel": 1, "_ffn_bwd_dx_kernel": 1, "_ffn_bwd_w_kernel": 1, "_sum_partials_kernel": 1}


# ----------------------------------------------------------------------------- helpers
def make_masters(lead, k, h, n, gen):
    """float64 masters x [*lead, k], w1 [h, k], b1 [h], w2 [n, h], b2 [n] (nn.Linear-like scales,
    biases large enough that silu is not near its linear part)."""
    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=F64) * scale

    return [rnd(*lead, k), rnd(h, k, scale=max(k, 1) ** -0.5), rnd(h, scale=0.5),
            rnd(n, h, scale=max(h, 1) ** -0.5), rnd(n, scale=0.5)]


def gen_for(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def layout_x(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A view with x's values in the requested memory layout; what lies around a slice is NaN."""
    nan = float("nan")
    if layout == "contiguous":
        return x
    if layout == "token_slice":  # z[:, :n] of a token tensor with 3 more tokens
        wide = torch.full((*x.shape[:-2], x.shape[-2] + 3, x.shape[-1]), nan, dtype=x.dtype, device=x.device)
        wide[..., : x.shape[-2], :] = x
        return wide[..., : x.shape[-2], :]
    if layout == "feature_slice":  # every other column of a wider row: stride 2 along K
        wide = torch.full((*x.shape[:-1], 2 * x.shape[-1] + 1), nan, dtype=x.dtype, device=x.device)
        wide[..., 1::2] = x
        return wide[..., 1::2]
    if layout == "transposed":  # the last two dimensions stored the other way round
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "lead_transposed":  # the first two dimensions swapped in memory
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    raise AssertionError(layout)


def run(fn, masters, dtype, layout="contiguous", grad="random", compute=None):
    """``[out, dx, dw1, db1, dw2, db2]`` of ``fn`` on the masters rounded to ``dtype`` and computed in
    ``compute`` (default ``dtype``; float64 gives the reference of the very inputs the kernel saw).
    grad: a float64 tensor (rounded the same way), "sum" (``out.sum()``: a stride-0 gradient) or
    "expand" (a random [N] row expanded over the rows: stride 0 in every leading dimension)."""
    compute = compute or dtype
    leaves = [m.to(DEVICE, dtype).to(compute).clone().requires_grad_() for m in masters]
    x = layout_x(leaves[0].detach(), layout).requires_grad_()
    assert layout == "contiguous" or not x.is_contiguous(), layout
    out = fn(x, *leaves[1:])
    if isinstance(grad, str) and grad == "sum":
        out.sum().backward()
    elif isinstance(grad, str) and grad == "expand":
        g = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(9), dtype=F64)
        out.backward(g.to(DEVICE, dtype).to(out.dtype).expand(out.shape))
    else:
        out.backward(grad.to(DEVICE, dtype).to(out.dtype))
    return [out.detach(), x.grad] + [t.grad for t in leaves[1:]]


def compare(kern, eager, ref64, dtype):
    """fp32: within FP32_TOL of float64 and of eager; lower precision: the DESIGN §5 rule. Messages
    start with the quantity's name (``test_comparison_catches_wrong_variants`` relies on it)."""
    for name, k, e, r in zip(NAMES, kern, eager, ref64):
        assert k is not None and torch.isfinite(k).all(), f"{name}: missing or non-finite"
        if dtype == torch.float32:
            assert_rel(k, r, FP32_TOL, f"{name} vs float64")
            assert_rel(k, e, FP32_TOL, f"{name} vs eager fp32")
        else:
            assert_lowp(k, e, r, name)


def check_all(masters, dtype, layout="contiguous", grad="random"):
    """Kernel vs eager in ``dtype`` and vs float64; returns the kernel's results."""
    kern = run(K.feed_forward, masters, dtype, layout, grad)
    eager = run(R.feed_forward, masters, dtype, layout, grad)
    ref64 = run(R.feed_forward, masters, dtype, layout, grad, compute=F64)
    compare(kern, eager, ref64, dtype)
    return kern


@pytest.fixture
def grids():
    """Records ``(kernel name, grid)`` of every Triton launch (the kernels still run)."""
    seen = []

    def make(original):
        def spy(self, *args, grid=None, **kwargs):
            name = getattr(self, "__name__", None) or self.fn.__name__
            seen.append((name, tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)))
            return original(self, *args, grid=grid, **kwargs)
        return spy

    with replaced_triton_run(make):
        yield seen


# ----------------------------------------------------------------------------- accuracy
CASES = [
    # (id, leading shape of x, K, H, N, layout of x, upstream gradient)
    ("1d-K24-H40-N24", (), 24, 40, 24, "contiguous", "random"),
    ("1d-K40-H33-N40-featslice", (), 40, 33, 40, "feature_slice", "sum"),
    ("2d-B1-K40-H72-N40", (1,), 40, 72, 40, "contiguous", "random"),
    ("2d-B3-K24-H33-N40-transposed", (3,), 24, 33, 40, "transposed", "random"),
    ("3d-B1-T1-K40-H40-N24-expand", (1, 1), 40, 40, 24, "contiguous", "expand"),
    ("3d-B3-T1-K24-H40-N24-tokslice", (3, 1), 24, 40, 24, "token_slice", "random"),
    ("3d-B3-T7-K24-H72-N24-tokslice", (3, 7), 24, 72, 24, "token_slice", "random"),
    ("3d-B3-T7-K40-H33-N40-featslice", (3, 7), 40, 33, 40, "feature_slice", "sum"),
    ("3d-B3-T7-K24-H33-N40-leadT", (3, 7), 24, 33, 40, "lead_transposed", "expand"),
    ("4d-K24-H33-N40-transposed", (2, 3, 5), 24, 33, 40, "transposed", "random"),
    ("4d-K40-H72-N24-leadT-copy", (2, 3, 5), 40, 72, 24, "lead_transposed", "expand"),
    ("3d-K72-H40-N24-tokslice", (3, 7), 72, 40, 24, "token_slice", "random"),  # KP or NP 128: second tier
    ("2d-K40-H33-N100-transposed", (3 * 64 + 5,), 40, 33, 100, "transposed", "expand"),
    ("3d-wideK130-H40-N24-tokslice", (2, 5), 130, 40, 24, "token_slice", "random"),  # 256: third tier
    ("2d-K24-H24-wideN160", (5,), 24, 24, 160, "contiguous", "sum"),
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_feed_forward_matches_reference(case, dtype):
    """Output and all five gradients, shapes, dtypes and contiguity of what the kernel returns."""
    cid, lead, k, h, n, layout, grad_kind = case
    gen = gen_for(cid)
    masters = make_masters(lead, k, h, n, gen)
    grad = torch.randn(*lead, n, generator=gen, dtype=F64) if grad_kind == "random" else grad_kind
    kern = check_all(masters, dtype, layout, grad)
    out = kern[0]
    assert out.shape == (*lead, n) and out.dtype == dtype and out.is_contiguous()
    for g, m in zip(kern[1:], masters):
        assert g.shape == m.shape and g.dtype == dtype


def _strided_param(t: torch.Tensor, how: str):
    """A leaf holding t's values and the non-contiguous view of it the op receives: "transposed"
    (column-major storage), "sliced" (every other element along the last dimension of a NaN-padded
    buffer) or "expanded" (a 1-D t of equal values as a stride-0 view of one element)."""
    if how == "transposed":
        base = t.detach().transpose(-1, -2).contiguous().requires_grad_()
        return base, base.transpose(-1, -2)
    if how == "sliced":
        base = torch.full((*t.shape[:-1], 2 * t.shape[-1] + 1), float("nan"), dtype=t.dtype, device=t.device)
        base[..., 1::2] = t
        base.requires_grad_()
        return base, base[..., 1::2]
    base = t.detach()[:1].clone().requires_grad_()
    return base, base.expand(t.shape)


@pytest.mark.parametrize("w_how, b_how", [("transposed", "sliced"), ("sliced", "expanded")])
def test_strided_parameters(w_how, b_how):
    """w1, w2, b1 and b2 as non-contiguous views (the kernels take their strides: stride_w1h/w1k,
    w2n/w2h, b1, b2, in the forward and in both backward kernels' recompute); every other test passes
    contiguous parameters. Output and gradients (reduced by autograd onto the underlying leaves) vs
    float64, fp32."""
    gen = gen_for(f"strided-params-{w_how}-{b_how}")
    masters = make_masters((3, 66), 24, 33, 40, gen)  # several row blocks, a partial hidden chunk
    if b_how == "expanded":
        masters[2], masters[4] = masters[2][:1].expand(33), masters[4][:1].expand(40)
    grad = torch.randn(3, 66, 40, generator=gen, dtype=F64)
    results = []
    for fn, dtype in ((K.feed_forward, torch.float32), (R.feed_forward, F64)):
        x = masters[0].to(DEVICE, dtype).requires_grad_()
        pairs = [_strided_param(m.to(DEVICE, dtype), how) for m, how in zip(masters[1:], (w_how, b_how, w_how, b_how))]
        views = [v for _, v in pairs]
        assert not any(v.is_contiguous() for v in views)
        out = fn(x, *views)
        out.backward(grad.to(DEVICE, dtype))
        results.append([out.detach(), x.grad] + [b.grad for b, _ in pairs])
    for name, k, r in zip(NAMES, *results):  # (a sliced leaf's padding gets a zero gradient)
        assert k is not None and torch.isfinite(k).all(), name
        assert_rel(k, r, FP32_TOL, f"{name} ({w_how}, {b_how})")


def test_stride0_upstream_gradient_reaches_the_launcher(monkeypatch):
    """The expanded gradients of the cases above do reach the backward launcher with stride 0 (autograd
    does not make them contiguous on the way), so the kernels' dy strides are exercised."""
    seen = []
    real = K._bwd_impl

    def spy(grad, *args, **kwargs):
        seen.append(grad.stride())
        return real(grad, *args, **kwargs)

    monkeypatch.setattr(K, "_bwd_impl", spy)
    masters = make_masters((3, 7), 24, 33, 24, gen_for("stride0"))
    run(K.feed_forward, masters, torch.float32, "token_slice", "expand")
    run(K.feed_forward, masters, torch.float32, "contiguous", "sum")
    assert seen == [(0, 0, 1), (0, 0, 0)], seen


# ----------------------------------------------------------------------------- grid and row blocks
@pytest.mark.parametrize("programs", [None, 3, "h100"], ids=["interpreter-2", "3-programs", "h100-grid"])
@pytest.mark.parametrize("lead, h, layout", [((3 * 64 + 5,), 24, "contiguous"),
                                             ((3, 66), 33, "token_slice"),
                                             ((3 * 64 + 5,), 72, "feature_slice")],
                         ids=["R197-H24", "R198-H33", "R197-H72"])
def test_weight_kernel_loops_over_row_blocks(lead, h, layout, programs, grids, monkeypatch):
    """R = 197 or 198 rows (4 row blocks of 64, the last partial) with K = N = 24; H = 24 (one hidden
    chunk, smaller than the chunk of 32), 33 (a second chunk of one unit) and 72 (three chunks, the
    last partial). On the interpreter's 2 persistent programs the weight kernel's grid is (2, 1) for
    H = 24 (each program takes two row blocks) and (1, chunks) otherwise (one program per chunk takes
    all four); at 3 programs H = 24 gets an uneven share (blocks 0 and 3, 1, 2); on an H100's grid
    each program has one row block.
    Every gradient against eager and float64 (fp32)."""
    if programs == "h100":
        from poison import gpu_sized_grids

        gpu_sized_grids(monkeypatch)
    elif programs is not None:
        monkeypatch.setattr(K, "persistent_programs", lambda device: programs)
    gen = gen_for(f"rows-{lead}-{h}")
    masters = make_masters(lead, 24, h, 24, gen)
    grad = torch.randn(*lead, 24, generator=gen, dtype=F64)
    grids.clear()
    kern = run(K.feed_forward, masters, torch.float32, layout, grad)
    _, _, _, _, (bm, bhw), _ = K._config(24, 24)  # the weight kernel's tile
    rows, chunks = math.prod(lead), -(-h // bhw)
    row_blocks = -(-rows // bm)
    G = max(1, min(row_blocks, K.persistent_programs(torch.device(DEVICE)) // chunks))
    assert ("_ffn_bwd_w_kernel", (G, chunks)) in grids, grids
    if (bm, bhw) == (64, 32):  # the tiles the docstring describes
        assert row_blocks == 4 and rows % bm != 0 and chunks == {24: 1, 33: 2, 72: 3}[h]
        if programs is None and not HAS_CUDA:
            assert G == (2 if h == 24 else 1)  # several row blocks per program
        elif programs == "h100":
            assert G == 4
    compare(kern, run(R.feed_forward, masters, torch.float32, layout, grad),
            run(R.feed_forward, masters, torch.float32, layout, grad, compute=F64), torch.float32)


def test_fp16_many_rows():
    """fp16 with several row blocks per program and a partial hidden chunk (DESIGN §5 rule)."""
    gen = gen_for("fp16-rows")
    masters = make_masters((3 * 64 + 5,), 40, 33, 24, gen)
    check_all(masters, torch.float16, "contiguous", torch.randn(3 * 64 + 5, 24, generator=gen, dtype=F64))


# ----------------------------------------------------------------------------- empty and degenerate
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS)
@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=["0xK", "3x0xK"])
def test_zero_rows(lead, dtype):
    """No row: the output has shape [..., N], every gradient is exactly zero (the parameters'
    buffers are freshly allocated, hence NaN under poisoning, unless zeroed), nothing is launched."""
    x, w1, b1, w2, b2 = [m.to(DEVICE, dtype).requires_grad_() for m in make_masters(lead, 24, 40, 24, gen_for("zero"))]
    with triton_launches() as launched:
        out = K.feed_forward(x, w1, b1, w2, b2)
        assert out.shape == (*lead, 24) and out.dtype == dtype
        out.sum().backward()
    assert not launched, dict(launched)
    assert x.grad.shape == x.shape
    for name, t in zip(PARAMS, (w1, b1, w2, b2)):
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == dtype, name
        assert torch.equal(t.grad, torch.zeros_like(t)), f"{name}: {t.grad}"


@pytest.mark.parametrize("k, h, n", [(24, 0, 24), (0, 8, 24), (24, 8, 0)], ids=["H0", "K0", "N0"])
def test_zero_sized_features(k, h, n):
    """A zero-sized K, H or N: the same results as the reference (H = 0: out = b2; K = 0: the
    hidden is b1; N = 0: an empty output and zero gradients)."""
    masters = make_masters((3,), k, h, n, gen_for(f"zs-{k}-{h}-{n}"))
    grad = torch.randn(3, n, generator=gen_for("g"), dtype=F64)
    kern = run(K.feed_forward, masters, torch.float32, "contiguous", grad)
    ref64 = run(R.feed_forward, masters, torch.float32, "contiguous", grad, compute=F64)
    for name, a, r in zip(NAMES, kern, ref64):
        assert a is not None and a.shape == r.shape and torch.isfinite(a).all(), name
        assert_rel(a, r, FP32_TOL, name)


# ----------------------------------------------------------------------------- past the limits
@pytest.mark.parametrize("k, n, fused", [(24, 16, False), (16, 24, False), (16, 16, True)],
                         ids=["K-past", "N-past", "at-the-limit"])
def test_sizes_past_max_features_use_the_reference(k, n, fused, monkeypatch):
    """MAX_FEATURES lowered to 16: K or N above it runs the eager reference (bitwise the same output
    and gradients, no Triton launch); K = N = 16 is still fused."""
    monkeypatch.setattr(K, "MAX_FEATURES", 16)
    _check_fused_or_reference((3, 5), k, 33, n, fused, f"limit-{k}-{n}")


def _check_fused_or_reference(lead, k, h, n, fused, tag):
    """feed_forward on an fp32 block ``[*lead, k] -> h -> n``: with ``fused``, every kernel once and
    the accuracy rule; without, no launch and bitwise the reference's output and gradients."""
    masters = make_masters(lead, k, h, n, gen_for(tag))
    grad = torch.randn(*lead, n, generator=gen_for(tag + "-g"), dtype=F64)
    with triton_launches() as launched:
        got = run(K.feed_forward, masters, torch.float32, "token_slice", grad)
    ref = run(R.feed_forward, masters, torch.float32, "token_slice", grad)
    if fused:
        assert dict(launched) == ALL_KERNELS
        compare(got, ref, run(R.feed_forward, masters, torch.float32, "token_slice", grad, compute=F64), torch.float32)
    else:
        assert not launched, dict(launched)
        for name, a, b in zip(NAMES, got, ref):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("k, n, fused", [(65, 24, False), (24, 72, False), (128, 128, False), (64, 64, True)],
                         ids=["K-65", "N-72", "long-128", "at-64"])
def test_blocks_wider_than_64_run_the_reference_by_default(k, n, fused, monkeypatch):
    """As shipped (``FUSED_MAX_FEATURES`` = 64), K or N past 64 runs the eager reference: no launch,
    bitwise its output and gradients (the kernels' 128 tier was 4.1x slower than cuBLAS at
    ``long``'s FFN on an H200); 64 wide is fused. The module, as the model builds it, too."""
    monkeypatch.setattr(K, "FUSED_MAX_FEATURES", SHIPPED_FUSED_MAX)
    assert SHIPPED_FUSED_MAX == 64
    _check_fused_or_reference((2, 5), k, 40, n, fused, f"shipped-{k}-{n}")
    module = FeedForward(k, 40, n, backend="triton").to(DEVICE)
    with triton_launches() as launched:
        module(torch.randn(2, 5, k, device=DEVICE)).sum().backward()
    assert bool(launched) == fused, dict(launched)


@pytest.mark.parametrize("bad", [-1, 1.5, True, None, "64"])
def test_fused_max_features_is_checked(bad, monkeypatch):
    monkeypatch.setattr(K, "FUSED_MAX_FEATURES", bad)
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="FUSED_MAX_FEATURES"):
        K.feed_forward(x, torch.randn(8, 8, device=DEVICE), torch.randn(8, device=DEVICE),
                       torch.randn(8, 8, device=DEVICE), torch.randn(8, device=DEVICE))


# ----------------------------------------------------------------------------- autocast
def _cpu_fp16_autocast_or_skip():
    if HAS_CUDA:
        return torch.bfloat16
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            pass
    except Exception as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"CPU autocast with float16 unavailable: {exc}")
    return torch.float16


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16], ids=DTYPE_IDS)
def test_autocast_fp32_parameters(x_dtype):
    """Under autocast (fp16 on the CPU, bf16 on a GPU) with fp32 parameters: the fused kernels run
    (no fallback), the output is in the autocast dtype, x's gradient in x's dtype and the parameters'
    in fp32; every result obeys the low-precision rule against eager under the same autocast (both
    vs float64 of the autocast-rounded inputs)."""
    ac = _cpu_fp16_autocast_or_skip()
    gen = gen_for(f"autocast-{x_dtype}")
    masters = make_masters((3, 7), 40, 72, 24, gen)
    grad = torch.randn(3, 7, 24, generator=gen, dtype=F64)
    results = []
    for fn in (K.feed_forward, R.feed_forward):
        x = masters[0].to(DEVICE, x_dtype).requires_grad_()
        params = [m.to(DEVICE, torch.float32).requires_grad_() for m in masters[1:]]
        with triton_launches() as launched, torch.autocast(DEVICE.type, dtype=ac):
            out = fn(x, *params)
        if fn is K.feed_forward:
            assert launched["_ffn_fwd_kernel"] == 1, dict(launched)
        assert out.dtype == ac
        out.backward(grad.to(DEVICE, ac))
        assert x.grad.dtype == x_dtype and all(p.grad.dtype == torch.float32 for p in params)
        results.append([out.detach(), x.grad] + [p.grad for p in params])
    leaves = [m.to(x_dtype).to(ac).double().requires_grad_() for m in masters[:1]]
    leaves += [m.float().to(ac).double().requires_grad_() for m in masters[1:]]
    out = R.feed_forward(*leaves)
    out.backward(grad.to(ac).double())
    ref64 = [out.detach()] + [t.grad for t in leaves]
    for name, k, e, r in zip(NAMES, *results, ref64):
        assert_lowp(k, e, r, name)


@pytest.mark.parametrize("x_in", ["float32", "autocast-dtype"])
def test_autocast_rounds_the_inputs_as_autocast_would(x_in):
    """Under autocast the kernels read x and the fp32 parameters as they are and round each tile to
    the compute dtype in registers, "as eager's casts would": they therefore give bit for bit what
    they give, outside autocast, on the same inputs cast beforehand as autocast casts them (the
    output; every gradient, returned in its input's dtype, rounded to the compute dtype equals that
    run's, both being one rounding of the same fp32 sums). Reading an input unrounded (more
    accurate, hence invisible to the accuracy rule) fails here. x is fp32 or already in the compute
    dtype: an fp16 x under bf16 autocast (a GPU) would have its gradient rounded twice, to fp16 by
    the kernel and to bf16 here, which need not equal one rounding."""
    ac = _cpu_fp16_autocast_or_skip()
    x_dtype = torch.float32 if x_in == "float32" else ac
    gen = gen_for("autocast-rounding")
    masters = make_masters((3, 66), 40, 33, 24, gen)  # several row blocks, a partial hidden chunk
    grad = torch.randn(3, 66, 24, generator=gen, dtype=F64).to(DEVICE, ac)
    results = []
    for autocast in (True, False):
        # the inputs as autocast receives them; the reference run gets them cast to ac from there
        x, *params = [m.to(DEVICE, dt) for m, dt in zip(masters, [x_dtype] + [torch.float32] * 4)]
        if not autocast:
            x, params = x.to(ac), [p.to(ac) for p in params]
        xa = layout_x(x, "token_slice").requires_grad_()
        params = [p.requires_grad_() for p in params]
        with torch.autocast(DEVICE.type, dtype=ac, enabled=autocast):
            out = K.feed_forward(xa, *params)
        out.backward(grad)
        assert xa.grad.dtype == xa.dtype and all(p.grad.dtype == p.dtype for p in params)
        results.append([out.detach(), xa.grad.to(ac)] + [p.grad.to(ac) for p in params])
    for name, a, b in zip(NAMES, *results):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name}: {rel_err(a, b):.3e}"


def test_autocast_makes_no_cast_copies():
    """Under autocast with an fp32 x and fp32 parameters the fused op, forward and backward, runs
    no aten cast (``_to_copy``): x is read as it comes (no copy of the token stream, none of its
    gradient), while eager's F.linear casts x and each parameter."""
    ac = _cpu_fp16_autocast_or_skip()
    masters = make_masters((3, 7), 24, 33, 24, gen_for("no-casts"))
    counts = []
    for fn in (K.feed_forward, R.feed_forward):
        leaves = [m.to(DEVICE, torch.float32).requires_grad_() for m in masters]
        with CountOps() as ops:
            with torch.autocast(DEVICE.type, dtype=ac):
                out = fn(*leaves)
            out.backward(torch.ones_like(out))
        counts.append(ops.ops[torch.ops.aten._to_copy.default])
    assert counts[0] == 0 and counts[1] > 0, counts


def test_backward_op_returns_each_gradient_in_its_inputs_dtype():
    """The autocast case at the op level: fp16 x and upstream gradient, fp32 parameters, then fp32 x
    with an fp16 compute dtype (the ``dtype`` argument) and fp16 gradient. The op promises each
    gradient "shaped and typed like its input" (its fake says so); through autograd the engine would
    silently cast a wrong dtype back. Values vs float64 of the same (rounded) inputs."""
    gen = gen_for("bwd-dtypes")
    x, w1, b1, w2, b2 = make_masters((3, 7), 40, 33, 24, gen)
    g = torch.randn(3, 7, 24, generator=gen, dtype=F64)
    xh, gh, params = x.half().to(DEVICE), g.half().to(DEVICE), [t.float().to(DEVICE) for t in (w1, b1, w2, b2)]
    out = torch.ops.interformer.feed_forward_fwd(xh, *params)
    assert out.dtype == torch.float16
    got = torch.ops.interformer.feed_forward_bwd(gh, xh, *params)
    for name, k, t in zip(NAMES[1:], got, (xh, *params)):
        assert k.dtype == t.dtype and k.shape == t.shape, f"{name}: {k.dtype} {tuple(k.shape)}"
    leaves = [t.double().requires_grad_() for t in (xh, *params)]
    ref_out = R.feed_forward(*leaves)
    ref = torch.autograd.grad(ref_out, leaves, gh.double())
    assert_rel(out, ref_out, 5e-3, "out")
    for name, k, r in zip(NAMES[1:], got, ref):
        assert_rel(k, r, 5e-3, name)  # fp16 operands of the dots (x, dy, a, dh rounded)

    xf = x.float().to(DEVICE)
    out = torch.ops.interformer.feed_forward_fwd(xf, *params, torch.float16)
    assert out.dtype == torch.float16
    got = torch.ops.interformer.feed_forward_bwd(gh, xf, *params)
    for name, k, t in zip(NAMES[1:], got, (xf, *params)):
        assert k.dtype == t.dtype and k.shape == t.shape, f"{name}: {k.dtype} {tuple(k.shape)}"
    leaves = [t.half().double().requires_grad_() for t in (xf, *params)]
    ref_out = R.feed_forward(*leaves)
    ref = torch.autograd.grad(ref_out, leaves, gh.double())
    assert_rel(out, ref_out, 5e-3, "out (compute dtype fp16)")
    for name, k, r in zip(NAMES[1:], got, ref):
        assert_rel(k, r, 5e-3, name + " (compute dtype fp16)")


# ----------------------------------------------------------------------------- validation
def test_invalid_inputs_raise_value_error():
    x = torch.randn(3, 5, 24)
    w1, b1, w2, b2 = torch.randn(40, 24), torch.randn(40), torch.randn(16, 40), torch.randn(16)
    bad = [
        ("x must be", (torch.tensor(1.0), w1, b1, w2, b2)),  # 0-d x
        ("w1 must be", (x, torch.randn(40, 23), b1, w2, b2)),  # wrong K
        ("w1 must be", (x, torch.randn(40 * 24), b1, w2, b2)),  # 1-D
        ("b1 must be", (x, w1, torch.randn(41), w2, b2)),
        ("b1 must be", (x, w1, torch.randn(1, 40), w2, b2)),
        ("w2 must be", (x, w1, b1, torch.randn(16, 39), b2)),  # wrong H
        ("b2 must be", (x, w1, b1, w2, torch.randn(17))),
        ("share one dtype", (x.half(), w1, b1, w2, b2)),
        ("share one dtype", (x, w1, b1, w2, b2.half())),
        ("float32, float16 or bfloat16", (x.double(), w1.double(), b1.double(), w2.double(), b2.double())),
    ]
    for message, args in bad:
        with pytest.raises(ValueError, match=message):
            K.feed_forward(*args)
    with pytest.raises(ValueError, match="w1 must be"):
        K.feed_forward(x, None, b1, w2, b2)


# ----------------------------------------------------------------------------- frozen parameters
def test_frozen_parameters_skip_the_weight_kernels():
    """No parameter needs a gradient: the backward launches the dx kernel only (no weight kernel, no
    reduction), dx is right and no parameter gets a gradient."""
    masters = make_masters((3, 7), 24, 33, 40, gen_for("frozen"))
    grad = torch.randn(3, 7, 40, generator=gen_for("frozen-g"), dtype=F64)
    x = layout_x(masters[0].float().to(DEVICE), "token_slice").requires_grad_()
    params = [m.float().to(DEVICE) for m in masters[1:]]
    with triton_launches() as launched:
        out = K.feed_forward(x, *params)
        out.backward(grad.float().to(DEVICE))
    assert dict(launched) == {"_ffn_fwd_kernel": 1, "_ffn_bwd_dx_kernel": 1}, dict(launched)
    assert all(p.grad is None for p in params)
    ref = run(R.feed_forward, masters, torch.float32, "token_slice", grad, compute=F64)
    assert_rel(out, ref[0], FP32_TOL, "out")
    assert_rel(x.grad, ref[1], FP32_TOL, "dx")


@pytest.mark.parametrize("frozen", [("w1",), ("b1", "b2"), ("w2", "b2"), ("w1", "b1", "w2"), ("x",)],
                         ids=lambda f: "-".join(f))
def test_partially_frozen(frozen):
    """Some inputs need no gradient: they get none (None), the rest are right (fp32, vs float64)."""
    masters = make_masters((3, 7), 40, 40, 24, gen_for("partial-" + "-".join(frozen)))
    grad = torch.randn(3, 7, 24, generator=gen_for("partial-g"), dtype=F64)
    ref = run(R.feed_forward, masters, torch.float32, "contiguous", grad, compute=F64)
    names = ["x"] + PARAMS
    leaves = [m.float().to(DEVICE).requires_grad_(name not in frozen) for name, m in zip(names, masters)]
    with triton_launches() as launched:
        out = K.feed_forward(*leaves)
        out.backward(grad.float().to(DEVICE))
    expected = dict(ALL_KERNELS)
    if "x" in frozen:  # dx is not needed: its kernel does not run
        del expected["_ffn_bwd_dx_kernel"]
    assert dict(launched) == expected, dict(launched)
    assert_rel(out, ref[0], FP32_TOL, "out")
    for name, t, r in zip(names, leaves, ref[1:]):
        if name in frozen:
            assert t.grad is None, name
        else:
            assert t.grad is not None, name
            assert_rel(t.grad, r, FP32_TOL, "d" + name)


def test_no_grad_runs_the_forward_kernel_alone():
    masters = make_masters((3, 7), 24, 33, 24, gen_for("nograd"))
    leaves = [m.float().to(DEVICE).requires_grad_() for m in masters]
    with_grad = K.feed_forward(*leaves)
    with triton_launches() as launched, torch.no_grad():
        out = K.feed_forward(*leaves)
    assert dict(launched) == {"_ffn_fwd_kernel": 1}
    assert out.grad_fn is None and not out.requires_grad and torch.equal(out, with_grad.detach())


# ----------------------------------------------------------------------------- torch.library
def test_opcheck():
    gen = gen_for("opcheck")
    x, w1, b1, w2, b2 = (m.float().to(DEVICE) for m in make_masters((3, 7), 24, 33, 40, gen))
    args = [t.requires_grad_() for t in (x, w1, b1, w2, b2)]
    torch.library.opcheck(torch.ops.interformer.feed_forward_fwd.default, tuple(args))
    g = torch.randn(3, 7, 40, device=DEVICE)
    torch.library.opcheck(torch.ops.interformer.feed_forward_bwd.default, (g, *(t.detach() for t in args)))
    # a non-contiguous x and stride-0 gradient, no rows, and mixed dtypes (the autocast case)
    xs = layout_x(x.detach(), "token_slice")
    torch.library.opcheck(torch.ops.interformer.feed_forward_fwd.default, (xs, *args[1:]))
    torch.library.opcheck(torch.ops.interformer.feed_forward_bwd.default,
                          (g[0, 0].expand(3, 7, 40), xs, *(t.detach() for t in args[1:])))
    torch.library.opcheck(torch.ops.interformer.feed_forward_fwd.default, (x.detach()[:, :0], *args[1:]))
    params = [t.detach() for t in args[1:]]
    torch.library.opcheck(torch.ops.interformer.feed_forward_bwd.default, (g.half(), x.detach().half(), *params))
    # the compute dtype argument (autocast: fp32 x and parameters, an fp16 output; its backward)
    torch.library.opcheck(torch.ops.interformer.feed_forward_fwd.default, (*args, torch.float16))
    torch.library.opcheck(torch.ops.interformer.feed_forward_bwd.default, (g.half(), x.detach(), *params))


def test_eager_entry_matches_custom_op_bitwise(monkeypatch):
    """Outside tracing :func:`feed_forward` runs the launchers through a plain autograd.Function; the
    custom op called directly (what torch.compile records) gives the very same output and gradients,
    bit for bit (token-sliced x, stride-0 upstream gradient, several row blocks and a partial hidden
    chunk); the public function forced down the custom-op route too."""
    masters = make_masters((3, 40), 24, 33, 40, gen_for("bitwise"))

    def go(fn):
        leaves = [m.float().to(DEVICE).requires_grad_() for m in masters]
        x = layout_x(leaves[0].detach(), "token_slice").requires_grad_()
        out = fn(x, *leaves[1:])
        meta = (type(out.grad_fn).__name__, out.dtype, out.shape, out.requires_grad)
        out.sum().backward()
        return out.detach(), meta, [x.grad] + [t.grad for t in leaves[1:]]

    lean, op, public = go(K._FeedForward.apply), go(torch.ops.interformer.feed_forward_fwd), go(K.feed_forward)
    assert lean[1][0] == public[1][0] == "_FeedForwardBackward"
    assert op[1][0].startswith("GeneratedBackwardFor_interformer_feed_forward"), op[1][0]
    assert lean[1][1:] == op[1][1:] == public[1][1:]
    with monkeypatch.context() as m:
        m.setattr(K, "tracing", lambda tensors: True)
        forced = go(K.feed_forward)
    assert forced[1][0].startswith("GeneratedBackwardFor_interformer")
    for other in (lean, public, forced):
        assert torch.equal(other[0], op[0])
        for name, a, b in zip(NAMES[1:], other[2], op[2]):
            assert a.dtype == b.dtype and torch.equal(a, b), name
    assert all(bool(g.abs().sum() > 0) for g in op[2])


def test_autograd_corners():
    """``torch.func.grad`` runs the reference (no launch) with the same gradients; a batched backward
    (``is_grads_batched=True``) goes through the registered backward op once per gradient and matches
    the reference's; ``create_graph=True`` gives first-order gradients whose second derivative raises,
    naming the op, instead of silently leaving it out."""
    masters = make_masters((3, 7), 24, 33, 24, gen_for("corners"))
    leaves = [m.float().to(DEVICE).requires_grad_() for m in masters]
    g = torch.randn(3, 7, 24, device=DEVICE)

    def loss(fn):
        return lambda *t: (fn(*t) * g).sum()

    with triton_launches() as launched:
        got = torch.func.grad(loss(K.feed_forward), argnums=(0, 1, 2, 3, 4))(*leaves)
    assert not launched, dict(launched)
    ref = torch.func.grad(loss(R.feed_forward), argnums=(0, 1, 2, 3, 4))(*leaves)
    for name, a, b in zip(NAMES[1:], got, ref):
        assert torch.equal(a, b), name

    G = torch.randn(2, 3, 7, 24, device=DEVICE)
    with triton_launches() as launched:
        got = torch.autograd.grad(K.feed_forward(*leaves), leaves, G, is_grads_batched=True)
    assert launched["_ffn_bwd_w_kernel"] == 2, dict(launched)
    ref = torch.autograd.grad(R.feed_forward(*leaves), leaves, G, is_grads_batched=True)
    for name, a, b in zip(NAMES[1:], got, ref):
        assert_rel(a, b, FP32_TOL, "batched " + name)

    (dx,) = torch.autograd.grad(K.feed_forward(*leaves), leaves[:1], g, create_graph=True)
    (dx_ref,) = torch.autograd.grad(R.feed_forward(*leaves), leaves[:1], g)
    assert_rel(dx, dx_ref, FP32_TOL, "dx (create_graph)")
    with pytest.raises(RuntimeError, match="_FeedForward has no second-order gradient"):
        dx.sum().backward()


@NO_POISON
def test_compile_fullgraph_traces_forward_and_backward():
    """torch.compile(fullgraph=True) records the custom op (not the reference) and runs its backward
    (aot_eager: Inductor is a GPU test); gradients as in eager."""
    torch._dynamo.reset()
    masters = make_masters((3, 7), 24, 33, 24, gen_for("compile"))
    leaves = [m.float().to(DEVICE).requires_grad_() for m in masters]

    def f(x, *p):
        return K.feed_forward(x[:, :5], *p).square().sum()

    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor" if HAS_CUDA else "aot_eager")
    assert_compiled_grads_match(torch.compile(f, fullgraph=True, backend=counter), f, leaves, NAMES[1:], FP32_TOL)
    assert counter.frame_count == 1
    assert "torch.ops.interformer.feed_forward_fwd" in counter.graphs[0].code  # the op, not the reference


# ----------------------------------------------------------------------------- the module
def _sequential(d_in, hidden, d_out, dropout=None):
    layers = [nn.Linear(d_in, hidden), nn.SiLU()]
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(hidden, d_out))


@pytest.mark.parametrize("dropout", [None, 0.1], ids=["no-dropout", "dropout"])
def test_module_has_the_sequentials_layout_and_init(dropout):
    """Same children, parameter names and shapes, state_dict keys and (same seed) initial values as
    the plain nn.Sequential it replaces; exported as ``interformer.FeedForward``."""
    assert interformer.FeedForward is FeedForward
    torch.manual_seed(3)
    mod = FeedForward(24, 40, 16, dropout=dropout, backend="triton")
    torch.manual_seed(3)
    seq = _sequential(24, 40, 16, dropout)
    assert isinstance(mod, nn.Sequential)
    assert [type(c) for c in mod.children()] == [type(c) for c in seq.children()]
    expected = ["0.weight", "0.bias", "3.weight", "3.bias"] if dropout else ["0.weight", "0.bias", "2.weight", "2.bias"]
    sd, ref = mod.state_dict(), seq.state_dict()
    assert list(sd) == list(ref) == expected
    for key in expected:
        assert sd[key].shape == ref[key].shape and torch.equal(sd[key], ref[key]), key


@pytest.mark.parametrize("dropout", [None, 0.0], ids=["no-dropout", "p0"])
def test_module_loads_a_sequential_state_dict(dropout):
    """A plain nn.Sequential's state_dict loads into FeedForward; the eager backend then gives the
    Sequential's output and gradients bit for bit, the triton backend (one fused forward and its
    backward kernels, also in training mode with p = 0) within FP32_TOL."""
    seq = _sequential(24, 72, 40, dropout).to(DEVICE).train()
    x0 = torch.randn(3, 7, 24, device=DEVICE)
    g = torch.randn(3, 7, 40, device=DEVICE)
    results = {}
    for backend in ("seq", "eager", "triton"):
        mod = seq
        if backend != "seq":
            mod = FeedForward(24, 72, 40, dropout=dropout, backend=backend).to(DEVICE).train()
            mod.load_state_dict(seq.state_dict())
            mod.zero_grad(set_to_none=True)
        else:
            seq.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        with triton_launches() as launched:
            out = mod(x)
            out.backward(g)
        if backend == "triton":
            assert dict(launched) == ALL_KERNELS, dict(launched)
        else:
            assert not launched
        results[backend] = [out.detach(), x.grad] + [p.grad.clone() for p in mod.parameters()]
    for name, s, e, t in zip(NAMES, results["seq"], results["eager"], results["triton"]):
        assert torch.equal(e, s), f"{name}: eager backend vs nn.Sequential"
        assert_rel(t, s, FP32_TOL, f"{name}: triton backend vs nn.Sequential")


def test_module_with_dropout_runs_layer_by_layer_while_training():
    """Dropout p > 0 in training: both backends run the layers one by one (no fused launch) and equal
    nn.Sequential bit for bit under the same seed; in eval mode the triton backend launches the fused
    kernel and matches nn.Sequential's eval output."""
    seq = _sequential(24, 40, 24, 0.3).to(DEVICE)
    x = torch.randn(3, 7, 24, device=DEVICE)
    for backend in ("triton", "eager"):
        mod = FeedForward(24, 40, 24, dropout=0.3, backend=backend).to(DEVICE)
        mod.load_state_dict(seq.state_dict())
        mod.train()
        seq.train()
        torch.manual_seed(11)
        with triton_launches() as launched:
            out = mod(x)
        torch.manual_seed(11)
        assert not launched and torch.equal(out, seq(x)), backend
        mod.eval()
        seq.eval()
        with triton_launches() as launched:
            out_eval = mod(x)
        assert dict(launched) == ({"_ffn_fwd_kernel": 1} if backend == "triton" else {}), dict(launched)
        assert_rel(out_eval, seq(x), FP32_TOL, f"eval ({backend})")
        assert rel_err(out, out_eval) > 1e-2  # the training forward did drop units


def test_module_fx_symbolic_trace():
    module = FeedForward(24, 40, 24, backend="triton").to(DEVICE)
    gm = torch.fx.symbolic_trace(module)
    assert K.feed_forward in [n.target for n in gm.graph.nodes], gm.code
    x = torch.randn(3, 7, 24, device=DEVICE)
    assert_rel(gm(x), module(x), FP32_TOL)


def _prune(m):
    from torch.nn.utils import prune

    prune.l1_unstructured(m[0], "weight", amount=0.5)  # a forward pre-hook


def _hook(m):
    m[0].register_forward_hook(lambda mod, args, out: out * 2.0)


def _gelu(m):
    m[1] = nn.GELU()


def _subclass(m):
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    extra = MyLinear(m[0].in_features, m[0].out_features).to(m[0].weight.device)
    extra.load_state_dict(m[0].state_dict())
    m[0] = extra


def _object_forward(m):
    m[2].forward = lambda x: F.linear(x, m[2].weight, m[2].bias) - 1.0


def _no_bias(m):
    torch.manual_seed(7)
    m[2] = nn.Linear(m[2].in_features, m[2].out_features, bias=False).to(m[2].weight.device)


def _borrowed_forward(m):
    """The forward of another Linear of the same class (so the class's function, bound elsewhere);
    bound to a Linear the block does not own (a list attribute: not registered as a child)."""
    torch.manual_seed(8)
    m._kept = [nn.Linear(m[0].in_features, m[0].out_features).to(m[0].weight.device)]
    m[0].forward = m._kept[0].forward


@pytest.mark.parametrize("change", [_prune, _hook, _gelu, _subclass, _object_forward, _no_bias, _borrowed_forward],
                         ids=["prune", "hook", "gelu", "subclass", "object-forward", "no-bias", "borrowed-forward"])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_module_runs_its_layers_when_they_are_not_the_plain_ones(change, backend):
    """A layer the fused op does not stand for (pruned, hooked, replaced, subclassed, given its own
    forward): the block calls its layers, as nn.Sequential does, on either backend (no fused launch),
    and gives the Sequential's result bit for bit. Unchanged, the triton backend launches the op."""
    torch.manual_seed(5)
    seq = _sequential(24, 40, 24).to(DEVICE)
    mod = FeedForward(24, 40, 24, backend=backend).to(DEVICE)
    mod.load_state_dict(seq.state_dict())
    x = torch.randn(3, 7, 24, device=DEVICE)
    with triton_launches() as launched:
        mod(x)
    assert dict(launched) == ({"_ffn_fwd_kernel": 1} if backend == "triton" else {})
    change(seq)
    change(mod)
    with triton_launches() as launched:
        out = mod(x)
    assert not launched, dict(launched)
    assert torch.equal(out, nn.Sequential.forward(seq, x))
    b2 = seq[-1].bias if seq[-1].bias is not None else torch.zeros(seq[-1].out_features, device=DEVICE)
    assert rel_err(out, R.feed_forward(x, seq[0].weight_orig if hasattr(seq[0], "weight_orig") else seq[0].weight,
                                       seq[0].bias, seq[-1].weight, b2)) > 1e-3 or change is _no_bias  # it shows


def test_module_slices_are_plain_sequentials():
    mod = FeedForward(24, 40, 16, dropout=0.0, backend="triton")
    head = mod[:2]
    assert type(head) is nn.Sequential and list(head) == [mod[0], mod[1]]
    assert isinstance(mod[-1], nn.Linear) and mod[-1] is mod[3]


def test_empty_inputs_of_any_rank():
    """x with a zero-sized dimension anywhere, of up to five dimensions: the output's shape, zero
    parameter gradients, no launch (``[2, 3, 0, 8]`` once failed in the launcher's reshape)."""
    w = [torch.randn(40, 8, requires_grad=True), torch.randn(40, requires_grad=True),
         torch.randn(6, 40, requires_grad=True), torch.randn(6, requires_grad=True)]
    for shape in [(2, 3, 0, 8), (0, 3, 4, 8), (2, 0, 3, 8), (1, 2, 3, 0, 8)]:
        x = torch.randn(*shape, device=DEVICE, requires_grad=True)
        with triton_launches() as launched:
            out = K.feed_forward(x, *(t.to(DEVICE) for t in w))
            grads = torch.autograd.grad(out, [x, *w], torch.ones_like(out))
        assert out.shape == (*shape[:-1], 6) and not launched, (shape, dict(launched))
        assert all(g is not None and not g.any() for g in grads), shape


def test_the_ops_refuse_blocks_wider_than_the_kernels():
    """The registered ops (what an fx graph or a direct call runs) refuse K or N past MAX_FEATURES
    with an error naming the limit; feed_forward() itself sends such blocks to the reference."""
    wide = K.MAX_FEATURES + 1
    x = torch.randn(2, wide, device=DEVICE)
    w1, b1 = torch.randn(8, wide, device=DEVICE), torch.randn(8, device=DEVICE)
    w2, b2 = torch.randn(4, 8, device=DEVICE), torch.randn(4, device=DEVICE)
    with pytest.raises(ValueError, match="MAX_FEATURES"):
        torch.ops.interformer.feed_forward_fwd(x, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="MAX_FEATURES"):
        torch.ops.interformer.feed_forward_bwd(torch.randn(2, 4, device=DEVICE), x, w1, b1, w2, b2)
    assert_rel(K.feed_forward(x, w1, b1, w2, b2), R.feed_forward(x, w1, b1, w2, b2), FP32_TOL)


# ----------------------------------------------------------------------------- the comparison can fail
class _SigmoidAsDSilu(torch.autograd.Function):
    """silu forward with a plausible wrong derivative, ``sigmoid(h)`` instead of ``s (1 + h (1 - s))``."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return F.silu(h)

    @staticmethod
    def backward(ctx, g):
        (h,) = ctx.saved_tensors
        return g * torch.sigmoid(h)


def _first_row_block_only(x, w1, b1, w2, b2):
    """Right output and dx, but the parameter gradients of the first 64 rows only (what a weight
    kernel whose loop stopped after one row block would give)."""
    rows = x.reshape(-1, x.shape[-1])
    head = R.feed_forward(rows[:64], w1, b1, w2, b2)
    tail = R.feed_forward(rows[64:], *(t.detach() for t in (w1, b1, w2, b2)))
    return torch.cat([head, tail]).reshape(*x.shape[:-1], -1)


WRONG = {
    "b2 dropped": ("out", lambda x, w1, b1, w2, b2: F.linear(F.silu(F.linear(x, w1, b1)), w2) + 0 * b2),
    "relu for silu": ("out", lambda x, w1, b1, w2, b2: F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)),
    "sigmoid for silu'": ("dx", lambda x, w1, b1, w2, b2: F.linear(_SigmoidAsDSilu.apply(F.linear(x, w1, b1)), w2, b2)),
    "first row block only": ("dw1", _first_row_block_only),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS)
def test_comparison_catches_wrong_variants(dtype):
    """The checks above are sharp enough to see plausible bugs: the kernel passes ``compare`` while a
    dropped output bias, ReLU in place of SiLU, sigmoid as SiLU's derivative, or weight gradients
    summed over one row block fail it, at the first quantity they get wrong."""
    gen = gen_for("wrong")
    masters = make_masters((3 * 64 + 5,), 24, 33, 24, gen)
    grad = torch.randn(3 * 64 + 5, 24, generator=gen, dtype=F64)
    eager = run(R.feed_forward, masters, dtype, "contiguous", grad)
    ref64 = run(R.feed_forward, masters, dtype, "contiguous", grad, compute=F64)
    compare(run(K.feed_forward, masters, dtype, "contiguous", grad), eager, ref64, dtype)
    for label, (first_wrong, fn) in WRONG.items():
        wrong = run(fn, masters, dtype, "contiguous", grad)
        with pytest.raises(AssertionError, match=f"^{first_wrong}"):
            compare(wrong, eager, ref64, dtype)
        assert rel_err(wrong[NAMES.index(first_wrong)], ref64[NAMES.index(first_wrong)]) > 1e-2, label


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("lead, k, h, n", [((2048, 20), 64, 256, 64), ((2048, 50), 192, 192, 192),
                                           ((512, 64), 128, 512, 128)], ids=["taobao-ffn", "taobao-mask", "long-ffn"])
def test_gpu_bf16_design_shapes(lead, k, h, n):
    gen = gen_for(f"gpu-{lead}")
    masters = make_masters(lead, k, h, n, gen)
    check_all(masters, torch.bfloat16, "token_slice", torch.randn(*lead, n, generator=gen, dtype=F64))
