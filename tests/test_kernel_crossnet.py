"""Fused DCNv2 cross layers (``interformer.kernels.crossnet``) against the eager reference and float64.

Every case compares the output and the gradients of x0 and of every kernel / W / V / bias with
(a) ``interformer.reference.{cross_net, low_rank_cross_net}`` run in the same dtype and (b) the same
reference run on float64 copies: fp32 within ``FP32_TOL`` of both, fp16 (bf16 on GPU) by the DESIGN §5
rule (kernel error vs float64 <= 2x the eager low-precision error).

Cases: D = 40 and 312 (= 24 * 13, a multiple of no block size), rank 1, 8, 32 and ranks above D/2
(24 of 40, 200 of 312), 1 to 4 layers, B = 1, 3, 5, 70 and 130. Kernel paths reached: low rank with
the weight-gradient kernel writing directly (SPLIT = 1) and through fp32 partials (SPLIT = 2, B = 70);
full rank with all layers in one launch (D <= 128), and for D = 312 both ways of running wider layers
(``FULL_RANK_GEMM``: cuBLAS GEMMs with Triton element-wise kernels, the default, and the Triton GEMM
kernels, one launch per layer with several column tiles), two row tiles (B = 130), every backward
carry variant (L = 1 .. 4), and a forward taken one way with its backward the other. Also: non-contiguous
x0 and stride-0 upstream gradients, torch.autocast with fp32 parameters, the modules with
``backend="triton"`` vs ``"eager"``, a torchrec ``state_dict`` round trip, a golden 2 x 3 example,
``torch.fx.symbolic_trace``, ``torch.library.opcheck``, ``torch.compile``, and input errors. The
eager entry (plain autograd.Function over the launchers, or the forward launcher alone without grad)
must match the custom ops bit for bit. The planned low-rank tiles must fit an H100's shared memory
(by the estimate, and by ahead-of-time sm_90 builds).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from interformer import reference as R
from interformer.layers import CrossNet, LowRankCrossNet
from poison import NO_POISON
from utils import DEVICE, FP32_TOL, HAS_CUDA, KERNEL_DTYPES, aot_build_sm90, assert_lowp, assert_rel

pytest.importorskip("triton")  # (a machine without Triton skips the file)
from interformer.kernels import crossnet as C  # noqa: E402  (an import error fails, not skips)


# ----------------------------------------------------------------------------- inputs
def _lr_inputs(B, D, r, L, dtype, device=DEVICE):
    """Random x0 and parameters of moderate scale (the output stays O(1) over 4 layers)."""
    x0 = torch.randn(B, D, device=device)
    ws = [torch.randn(D, r, device=device) * (0.5 / math.sqrt(r)) for _ in range(L)]
    vs = [torch.randn(r, D, device=device) / math.sqrt(D) for _ in range(L)]
    bs = [torch.randn(D, device=device) * 0.1 for _ in range(L)]  # LowRankCrossNet's (torchrec's) [D]
    return [t.to(dtype) for t in (x0, *ws, *vs, *bs)]


def _fr_inputs(B, D, L, dtype, device=DEVICE):
    x0 = torch.randn(B, D, device=device)
    ws = [torch.randn(D, D, device=device) * (0.5 / math.sqrt(D)) for _ in range(L)]
    bs = [torch.randn(D, 1, device=device) * 0.1 for _ in range(L)]
    return [t.to(dtype) for t in (x0, *ws, *bs)]


def _split(flat, L, kinds):
    x0, rest = flat[0], flat[1:]
    return (x0, *[rest[k * L:(k + 1) * L] for k in range(kinds)])


def _run(fn, flat, L, kinds, grad_out=None):
    """Output and gradients of every tensor in ``flat`` (leaves made here)."""
    leaves = [t.detach().clone().requires_grad_() for t in flat]
    out = fn(*_split(leaves, L, kinds))
    g = torch.randn_like(out) if grad_out is None else grad_out.to(out.dtype)
    grads = torch.autograd.grad(out, leaves, g)
    return out.detach(), [x.detach() for x in grads], g


def _names(L, kinds):
    per = {2: ["kernels", "biases"], 3: ["w_kernels", "v_kernels", "biases"]}[kinds]
    return ["x0"] + [f"{n}[{i}]" for n in per for i in range(L)]


def _check(kernel_fn, ref_fn, flat, L, kinds, dtype):
    out, grads, g = _run(kernel_fn, flat, L, kinds)
    ref_out, ref_grads, _ = _run(ref_fn, flat, L, kinds, grad_out=g)
    out64, grads64, _ = _run(ref_fn, [t.double() for t in flat], L, kinds, grad_out=g.double())
    names = ["out"] + [f"d{n}" for n in _names(L, kinds)]
    for name, k, e, r64 in zip(names, [out, *grads], [ref_out, *ref_grads], [out64, *grads64]):
        assert k.dtype == e.dtype, f"{name}: dtype {k.dtype} != {e.dtype}"
        if dtype == torch.float32:
            assert_rel(k, e, FP32_TOL, name + " vs eager")
            assert_rel(k, r64, FP32_TOL, name + " vs float64")
        else:
            assert_lowp(k, e, r64, name)


# ----------------------------------------------------------------------------- against the references
LR_CASES = [  # B, D, r, L
    (3, 40, 1, 1),      # rank 1, one layer
    (1, 40, 24, 4),     # B = 1, rank > D/2, four layers
    (3, 312, 32, 2),    # the model's rank, D a multiple of no block size, D in chunks
    (5, 312, 200, 3),   # rank > D/2 at D = 312 (BLOCK_R = 256)
    (70, 40, 8, 2),     # the weight-gradient kernel splits the batch in 2 (fp32 partials + reduction)
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("B,D,r,L", LR_CASES)
def test_low_rank_cross_net(B, D, r, L, dtype):
    flat = _lr_inputs(B, D, r, L, dtype)
    _check(C.low_rank_cross_net, R.low_rank_cross_net, flat, L, 3, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("B,D,r,L", [(3, 312, 32, 2), (5, 312, 200, 3)])
def test_low_rank_cross_net_with_eight_row_warps(B, D, r, L, dtype, monkeypatch):
    """``LOW_RANK_ROW_WARPS = 8`` (kept for measurement): its plan takes column tiles up to 256 where
    they fit (the forward at r = 32 in 16-bit: 256 columns, so D = 312 is one full and one partial
    tile), and the op still meets the reference in every output and gradient."""
    monkeypatch.setattr(C, "LOW_RANK_ROW_WARPS", 8)
    plan = C._lr_plan_for(torch.empty(1, D, dtype=dtype), [torch.empty(D, r, dtype=dtype)],
                           [torch.empty(D, dtype=dtype)], L, dtype)
    if r == 32 and dtype != torch.float32:
        assert plan.fwd[0] == 256, plan
    assert plan.fwd[0] <= 256 and plan.rows[0] <= 256
    flat = _lr_inputs(B, D, r, L, dtype)
    _check(C.low_rank_cross_net, R.low_rank_cross_net, flat, L, 3, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_low_rank_cross_net_with_deeper_pipelines(dtype, monkeypatch):
    """``LOW_RANK_MAX_STAGES`` (kept for measurement): the forward and backward rows kernels' plans
    take up to that many stages where shared memory allows (5 at taobao's shape in bf16, the
    weight kernel's plan unchanged), the launches ask for them, the op still meets the reference,
    and values outside [1, 8] are refused by name."""
    from interformer.kernel_audit import record_launches

    B, D, r, L = 3, 312, 32, 2
    model = dict(dot_dtype=torch.bfloat16)  # taobao's model call: fp32 x0 and parameters, bf16 autocast
    base = C._lr_plan(1792, 32, 2, torch.float32, torch.float32, **model)
    deep = C._lr_plan(1792, 32, 2, torch.float32, torch.float32, row_stages=5, **model)
    assert (base.fwd[1], base.rows[1], deep.fwd[1], deep.rows[1]) == (3, 3, 5, 5) and deep.weights == base.weights
    monkeypatch.setattr(C, "LOW_RANK_MAX_STAGES", 5)
    plan = C._lr_plan_for(torch.empty(1, D, dtype=dtype), [torch.empty(D, r, dtype=dtype)],
                           [torch.empty(D, dtype=dtype)], L, dtype)
    flat = _lr_inputs(B, D, r, L, dtype)
    _check(C.low_rank_cross_net, R.low_rank_cross_net, flat, L, 3, dtype)
    with record_launches() as cases:
        _run(C.low_rank_cross_net, [t.detach().clone().requires_grad_() for t in flat], L, 3)
    rows_kernels = ("_lr_fwd_kernel", "_lr_bwd_rows_kernel")
    stages = {c["kernel"]: c.get("num_stages") for c in cases if c["kernel"] in rows_kernels}
    assert stages == {"_lr_fwd_kernel": plan.fwd[1], "_lr_bwd_rows_kernel": plan.rows[1]}, stages
    for bad in (0, 9, 2.0, True):
        monkeypatch.setattr(C, "LOW_RANK_MAX_STAGES", bad)
        with pytest.raises(ValueError, match="LOW_RANK_MAX_STAGES must be"):
            C.low_rank_cross_net(*_split(flat, L, 3))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("B,D,r,L", LR_CASES + [(33, 312, 8, 3)])
def test_low_rank_cross_net_phased_backward(B, D, r, L, dtype, monkeypatch):
    """``LOW_RANK_BACKWARD = "phases"`` (kept for measurement): the same outputs and gradients as the
    references in every case above, and in (33, 312, 8, 3): three row blocks, D in three column tiles."""
    monkeypatch.setattr(C, "LOW_RANK_BACKWARD", "phases")
    flat = _lr_inputs(B, D, r, L, dtype)
    _check(C.low_rank_cross_net, R.low_rank_cross_net, flat, L, 3, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("B,D,r,L", LR_CASES + [(33, 312, 8, 3)])
def test_low_rank_cross_net_phased_forward(B, D, r, L, dtype, monkeypatch):
    """``LOW_RANK_FORWARD = "phases"`` (kept for measurement): the same outputs and gradients as the
    references in every case, the default backward taking the ``P`` the phased forward saved; and
    that ``P`` is the one-launch forward's (the same sums, split over column ranges: fp32 rounding
    apart)."""
    flat = _lr_inputs(B, D, r, L, dtype)
    x0, ws, vs, bs = _split(flat, L, 3)
    _, p_rows = C._lr_fwd_impl(x0, ws, vs, bs)
    monkeypatch.setattr(C, "LOW_RANK_FORWARD", "phases")
    out, p = C._lr_fwd_impl(x0, ws, vs, bs)
    assert out.shape == (B, D) and p.shape == (L, B, r)
    assert_rel(p, p_rows, FP32_TOL, "P, phased forward vs one launch")
    _check(C.low_rank_cross_net, R.low_rank_cross_net, flat, L, 3, dtype)


def test_low_rank_phased_forward_and_backward_together(monkeypatch):
    """Both settings at once (three row blocks, D in three column tiles, split in two under the
    interpreter): every output and gradient still meets the references."""
    monkeypatch.setattr(C, "LOW_RANK_FORWARD", "phases")
    monkeypatch.setattr(C, "LOW_RANK_BACKWARD", "phases")
    for dtype in (torch.float32, torch.float16):
        _check(C.low_rank_cross_net, R.low_rank_cross_net, _lr_inputs(33, 312, 8, 3, dtype), 3, 3, dtype)


def test_low_rank_phase_split_covers_every_column_tile(monkeypatch):
    """``_lr_phase_split``: S ranges of CHUNKS tiles cover every tile, none of them empty, with at
    least half of the ``persistent_programs`` aimed at where there are tiles enough; and the phased
    cases above really split D under the interpreter (S = 2 at D = 312, and at D = 40 with r = 24)."""
    cpu = torch.device("cpu")
    for programs in (2, 528):
        monkeypatch.setattr(C, "persistent_programs", lambda device, n=programs: n)
        for row_blocks in (1, 2, 3, 128, 1000):
            for tiles in (1, 2, 3, 7, 14, 28):
                split, chunks = C._lr_phase_split(row_blocks, tiles, cpu)
                assert 1 <= split <= tiles and split * chunks >= tiles and (split - 1) * chunks < tiles
                assert row_blocks * split >= min(programs, row_blocks * tiles) // 2
    monkeypatch.undo()
    for B, D, r, L in [(3, 312, 32, 2), (5, 312, 200, 3), (1, 40, 24, 4)]:
        bd = C._lr_plan(D, r, L, torch.float32, torch.float32).rows[0]
        assert C._lr_phase_split(C.cdiv(B, C._LR_BLOCK_B), C.cdiv(D, bd), cpu)[0] == 2


def test_low_rank_phased_backward_splits_the_weight_kernel_wider(monkeypatch):
    """In "phases" mode the weight kernel aims at ``persistent_programs`` (4 per SM) with partials
    up to twice x0's bytes (x0 counted in the compute dtype): at taobao (fp32 x0 and parameters,
    bf16 autocast, an H100's 132 SMs; 16-row tiles) SPLIT 15 of 144 rows where the default takes 5
    of 416; under the interpreter the (70, 40, 8, 2) case of the phased test takes 3 splits where
    the default takes 2 (the cap, not the target, is what moves)."""
    bbw, bdw, _ = C._lr_plan(1792, 32, 2, torch.float32, torch.float32, dot_dtype=torch.bfloat16).weights
    assert (bbw, bdw) == (16, 64)
    assert C._lr_split(2048, 1792, 32, 2, bbw, bdw, 2) == (5, 416)
    split, rows = C._lr_split(2048, 1792, 32, 2, bbw, bdw, 2, target=4 * 132, cap=2)
    assert (split, rows) == (15, 144)
    assert split * 2 * (2 * 1792 * 32 + 1792) * 4 <= 2 * 2048 * 1792 * 2
    bbw, bdw, _ = C._lr_plan(40, 8, 2, torch.float32, torch.float32).weights
    assert C._lr_split(70, 40, 8, 2, bbw, bdw, 4)[0] == 2
    assert C._lr_split(70, 40, 8, 2, bbw, bdw, 4, target=max(C._TARGET_PROGRAMS, 2), cap=2)[0] == 3
    splits = []
    real = C._lr_split
    monkeypatch.setattr(C, "_lr_split", lambda *a, **k: splits.append(real(*a, **k)) or splits[-1])
    for mode in ("rows", "phases"):
        monkeypatch.setattr(C, "LOW_RANK_BACKWARD", mode)
        _run(C.low_rank_cross_net, _lr_inputs(70, 40, 8, 2, torch.float32), 2, 3)
    assert [s[0] for s in splits] == [2, 3]


@pytest.mark.parametrize("setting", ["LOW_RANK_BACKWARD", "LOW_RANK_FORWARD"])
def test_low_rank_direction_settings_are_checked(monkeypatch, setting):
    flat = _lr_inputs(3, 40, 4, 2, torch.float32)
    monkeypatch.setattr(C, setting, "columns")
    with pytest.raises(ValueError, match=f"{setting} must be"):
        _run(C.low_rank_cross_net, flat, 2, 3)


def test_low_rank_row_warps_may_change_between_forward_and_backward(monkeypatch):
    """The forward saves ``P [L, B, r]`` whatever its tiles, so a backward run with the other
    ``LOW_RANK_ROW_WARPS`` (and other column tiles) still gives the reference gradients; any value
    but 4 or 8 is refused by name."""
    B, D, r, L = 3, 312, 32, 2  # fp16: the forward's tile is 256 columns at 8 warps, 128 at 4
    flat = _lr_inputs(B, D, r, L, torch.float16)
    g = torch.randn(B, D, device=DEVICE, dtype=torch.float16)
    _, ref_grads, _ = _run(R.low_rank_cross_net, [t.double() for t in flat], L, 3, grad_out=g.double())
    _, eager_grads, _ = _run(R.low_rank_cross_net, flat, L, 3, grad_out=g)
    for fwd, bwd in ((8, 4), (4, 8)):
        leaves = [t.detach().clone().requires_grad_() for t in flat]
        monkeypatch.setattr(C, "LOW_RANK_ROW_WARPS", fwd)
        out = C.low_rank_cross_net(*_split(leaves, L, 3))
        monkeypatch.setattr(C, "LOW_RANK_ROW_WARPS", bwd)
        out.backward(g)
        for name, leaf, eager, ref in zip(_names(L, 3), leaves, eager_grads, ref_grads):
            assert_lowp(leaf.grad, eager, ref, f"{name}, forward {fwd} warps, backward {bwd}")
    monkeypatch.setattr(C, "LOW_RANK_ROW_WARPS", 6)
    with pytest.raises(ValueError, match="LOW_RANK_ROW_WARPS must be 4 or 8"):
        C.low_rank_cross_net(*_split(flat, L, 3))


@pytest.mark.parametrize("B,D", [(0, 24), (4, 0)])
def test_empty_inputs_forward_and_backward(B, D):
    """An empty batch or zero features: both ranks give the reference's (empty) output and gradients
    (low rank with D = 0 divided by zero in the backward's split plan)."""
    x0 = torch.randn(B, D, device=DEVICE)
    low = [[torch.randn(D, 3, device=DEVICE)], [torch.randn(3, D, device=DEVICE)], [torch.randn(D, device=DEVICE)]]
    full = [[torch.randn(D, D, device=DEVICE)], [torch.randn(D, device=DEVICE)]]
    for fn, ref, params in ((C.low_rank_cross_net, R.low_rank_cross_net, low), (C.cross_net, R.cross_net, full)):
        grads = []
        for f in (fn, ref):
            leaves = [x0.clone().requires_grad_()] + [[t.clone().requires_grad_() for t in ts] for ts in params]
            out = f(leaves[0], *leaves[1:])
            out.sum().backward()
            grads.append([out.detach(), leaves[0].grad] + [t.grad for ts in leaves[1:] for t in ts])
        for k, e in zip(*grads):
            assert k.shape == e.shape
            torch.testing.assert_close(k, e, rtol=FP32_TOL, atol=FP32_TOL)


def test_low_rank_split_path_is_exercised():
    """The (70, 40, 8, 2) case above really goes through the split weight-gradient path."""
    bbw, bdw, _ = C._lr_plan(40, 8, 2, torch.float32, torch.float32).weights
    split, _ = C._lr_split(70, 40, 8, 2, bbw, bdw, 4)
    assert split == 2


# ----------------------------------------------------------------------------- shared memory of the low-rank tiles
# An H100 (sm_90) gives one program at most 232448 bytes of shared memory; a launch asking more fails
# with OutOfResources (it did at D = 312, r = 200, L = 3 before the tiles were planned by estimate).
H100_SMEM = 232448
# the benchmark's D = (n + 8) * 64 for n = 20 and 4, and (64 + 8) * 128; r = 32, 2 layers
BENCH_SHAPES = [((20 + 8) * 64, 32, 2), ((4 + 8) * 64, 32, 2), ((64 + 8) * 128, 32, 2)]
SMEM_GRID = [(D, r, L) for D in (40, 312, 768, 1792, 9216) for r in (1, 8, 24, 32, 64, 100, 128, 200, 256, 400, 512)
             for L in (1, 2, 3, 4, 6)]
# (x0 / gradient tiles, parameters, dots; None: the tiles'): one dtype throughout, or bf16 autocast with
# fp32 parameters, whose output (and so gradient) is fp32 whatever x0's dtype (the model's call: fp32 x0)
_DT_CASES = [(torch.float32, torch.float32, None), (torch.float16, torch.float16, None),
             (torch.bfloat16, torch.bfloat16, None), (torch.float32, torch.float32, torch.bfloat16)]


def _plan_estimates(D, r, L, xdt, pdt, row_warps=4, dot=None):
    plan = C._lr_plan(D, r, L, xdt, pdt, row_warps=row_warps, dot_dtype=dot)
    if plan is None:
        return None, {}
    sizes = (xdt.itemsize, pdt.itemsize, (dot or xdt).itemsize)
    est = {
        "fwd": C._lr_smem("fwd", L, C._LR_BLOCK_B, plan.fwd[0], plan.block_r, plan.fwd[1], *sizes),
        "rows": C._lr_smem("rows", L, C._LR_BLOCK_B, plan.rows[0], plan.block_r, plan.rows[1], *sizes),
        "weights": C._lr_smem("weights", L, *plan.weights[:2], plan.block_r, plan.weights[2], *sizes),
    }
    return plan, est


@pytest.mark.parametrize("xdt,pdt,dot", _DT_CASES, ids=lambda t: str(t).replace("torch.", ""))
def test_low_rank_plans_fit_h100_shared_memory(xdt, pdt, dot):
    """Every plan the kernels run with stays within an H100's shared memory by the estimate, for a
    grid of D, r (up to 512) and L; the failing case and the benchmark shapes get kernels (no eager
    fallback); every rank <= 512 gets kernels at L = 1; a shape with no plan is one with a large
    rank and many layers."""
    for D, r, L in SMEM_GRID + BENCH_SHAPES + [(312, 200, 3)]:
        plan, est = _plan_estimates(D, r, L, xdt, pdt, dot=dot)
        if plan is None:
            assert r > 64 and L > 1, (D, r, L)
            continue
        for kind, bytes_ in est.items():
            assert bytes_ <= H100_SMEM, f"D={D} r={r} L={L} {kind}: estimate {bytes_} > {H100_SMEM} ({plan})"
        assert all(b >= 16 for b in (plan.fwd[0], plan.rows[0], *plan.weights[:2]))
    for D, r, L in BENCH_SHAPES + [(312, 200, 3)] + [(D, r, 1) for D, r, _ in SMEM_GRID]:
        assert C._lr_plan(D, r, L, xdt, pdt, dot_dtype=dot) is not None, (D, r, L)
    # the benchmark tiles are the ones measured before the plans existed: 3 stages, full-width tiles
    if xdt == pdt != torch.float32:
        for D, r, L in BENCH_SHAPES:
            assert C._lr_plan(D, r, L, xdt, pdt) == C._LRPlan(32, (128, 3), (128, 3), (32, 64, 3))


def test_low_rank_estimate_counts_stages_layers_and_tiles():
    """The estimate grows with every quantity it is made of, and matches a hand count at the
    failing shape: fp32, r = 200 (BLOCK_R = 256), L = 3, forward with 32-column tiles and 3 stages
    (the configuration that asked for 296960 bytes on an H100): its last pass loads x0 [16, 32],
    U_0..2 [32, 256], b_0..2 [32] per step and holds P_0..2 [16, 256] (fp32)."""
    per_step = 16 * 32 * 4 + 3 * (32 * 256 * 4 + 32 * 4)
    invariant = 3 * 16 * 256 * 4
    assert C._lr_smem("fwd", 3, 16, 32, 256, 3, 4, 4) == 3 * per_step + 3 * invariant
    assert C._lr_smem("fwd", 3, 16, 32, 256, 3, 4, 4) > 296960  # an upper estimate of the compiled value
    for kind in ("fwd", "rows", "weights"):
        base = C._lr_smem(kind, 2, 16, 32, 64, 2, 2, 2)
        assert C._lr_smem(kind, 3, 16, 32, 64, 2, 2, 2) > base
        assert C._lr_smem(kind, 2, 16, 64, 64, 2, 2, 2) > base
        assert C._lr_smem(kind, 2, 16, 32, 128, 2, 2, 2) > base
        assert C._lr_smem(kind, 2, 16, 32, 64, 3, 2, 2) > base
        assert C._lr_smem(kind, 2, 16, 32, 64, 2, 4, 4) > base
    with pytest.raises(ValueError):
        C._lr_smem("other", 1, 16, 16, 16, 1, 4, 4)


def test_low_rank_without_a_plan_falls_back_to_eager():
    """r = 512 with 4 fp32 layers has no tile that fits: the public function runs the reference
    (same values, same autograd) instead of a launch that would fail on the GPU."""
    assert C._lr_plan(40, 512, 4, torch.float32, torch.float32) is None
    flat = _lr_inputs(2, 40, 512, 4, torch.float32)
    out, grads, g = _run(C.low_rank_cross_net, flat, 4, 3)
    e_out, e_grads, _ = _run(R.low_rank_cross_net, flat, 4, 3, grad_out=g)
    for k, e in zip([out, *grads], [e_out, *e_grads]):
        assert torch.equal(k, e)
    x0, ws, vs, bs = _split(flat, 4, 3)
    with pytest.raises(ValueError, match="no kernel configuration"):
        torch.ops.interformer.low_rank_cross_net_fwd(x0, list(ws), list(vs), list(bs), None)


def _aot_cases(B, D, r, L, xdt, pdt, row_warps=4, dot=None):
    plan, est = _plan_estimates(D, r, L, xdt, pdt, row_warps, dot)
    x, p, f = (str(t).replace("torch.", "") for t in (xdt, pdt, torch.float32))
    params = dict(Us=[p] * L, Vs=[p] * L, Bs=[p] * L)
    dot = dot or xdt
    common = dict(NUM_LAYERS=L, BLOCK_R=plan.block_r, PREC=C.dot_precision(dot), DT={"tl_dtype": C.tl_dtype(dot).name})
    mod = "interformer.kernels.crossnet"
    return [
        dict(module=mod, kernel="_lr_fwd_kernel", kind="fwd", shape=[D, r, L, x, p], est=est["fwd"],
             num_stages=plan.fwd[1], args=dict(OUT=x, P=f, X0=x, **params, B=B, D=D, R=r),
             consts=dict(common, BLOCK_B=C._LR_BLOCK_B, BLOCK_D=plan.fwd[0])),
        dict(module=mod, kernel="_lr_bwd_rows_kernel", kind="rows", shape=[D, r, L, x, p], est=est["rows"],
             num_stages=plan.rows[1], args=dict(DX0=x, DP=f, G=x, X0=x, P=f, **params, B=B, D=D, R=r),
             consts=dict(common, BLOCK_B=C._LR_BLOCK_B, BLOCK_D=plan.rows[0])),
        # LOW_RANK_BACKWARD = "phases": the rows kernel's tiles, and each loop a subset of its loads
        dict(module=mod, kernel="_lr_bwd_phase_kernel", kind="rows", shape=[D, r, L, x, p, "phase 0"],
             est=est["rows"], num_stages=plan.rows[1],
             args=dict(DPP=f, DP=f, G=x, X0=x, Us=[p] * L, Vs=[p] * L, B=B, D=D, R=r, S=4, CHUNKS=2),
             consts=dict(common, LAYER=0, BLOCK_B=C._LR_BLOCK_B, BLOCK_D=plan.rows[0])),
        dict(module=mod, kernel="_lr_bwd_dx0_kernel", kind="rows", shape=[D, r, L, x, p, "dx0"], est=est["rows"],
             num_stages=plan.rows[1], args=dict(DX0=x, DP=f, DPP=f, G=x, P=f, **params, B=B, D=D, R=r, S=4),
             consts=dict(common, BLOCK_B=C._LR_BLOCK_B, BLOCK_D=plan.rows[0])),
        # LOW_RANK_FORWARD = "phases": the forward's tiles; the phase kernel's loop loads what pass
        # LAYER of the forward loads, the output kernel (no loop) what its last pass loads
        dict(module=mod, kernel="_lr_fwd_phase_kernel", kind="fwd", shape=[D, r, L, x, p, f"phase {L - 1}"],
             est=est["fwd"], num_stages=plan.fwd[1],
             args=dict(PP=f, P=f, X0=x, **params, B=B, D=D, R=r, S=4, CHUNKS=2),
             consts=dict(common, LAYER=L - 1, BLOCK_B=C._LR_BLOCK_B, BLOCK_D=plan.fwd[0])),
        dict(module=mod, kernel="_lr_fwd_out_kernel", kind="fwd", shape=[D, r, L, x, p, "out"], est=est["fwd"],
             num_stages=plan.fwd[1], args=dict(OUT=x, P=f, PP=f, X0=x, Us=[p] * L, Bs=[p] * L, B=B, D=D, R=r, S=4),
             consts=dict(common, BLOCK_B=C._LR_BLOCK_B, BLOCK_D=plan.fwd[0])),
        dict(module=mod, kernel="_lr_bwd_weights_kernel", kind="weights", shape=[D, r, L, x, p],
             est=est["weights"], num_stages=plan.weights[2],
             args=dict(DU=p, DV=p, DB=p, PART=f, G=x, X0=x, P=f, DP=f, **params, B=B, D=D, R=r,
                       ROWS_PER_SPLIT=64, TOTAL=L * (2 * D * r + D)),
             consts=dict(common, DIRECT=False, BLOCK_B=plan.weights[0], BLOCK_D=plan.weights[1])),
    ]


def test_low_rank_plans_compile_within_h100_shared_memory():
    """Ahead-of-time builds for sm_90 (no GPU needed: Triton's CUDA backend compiles on any host) of
    the three low-rank kernels with their planned tiles: the shared memory the compiled kernel asks
    for (``metadata.shared``, what the launch checks against 232448) is within the H100 limit and
    within the estimate, at the shape that failed (D = 312, r = 200, L = 3; fp32, fp16, bf16) and at
    the benchmark shapes, and in the model's case (fp32 x0 and parameters, bf16 dots under autocast)
    at both."""
    import os

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        make_backend(GPUTarget("cuda", 90, 32))
    except Exception as e:  # noqa: BLE001 -- a Triton build without the CUDA backend
        pytest.skip(f"no Triton CUDA backend to compile for sm_90: {e}")
    shapes = [(5, 312, 200, 3, dt, dt) for dt in (torch.float32, torch.float16, torch.bfloat16)]
    shapes += [(2048, D, r, L, torch.bfloat16, torch.bfloat16) for D, r, L in BENCH_SHAPES[::2]]
    shapes += [(2048, BENCH_SHAPES[0][0], 32, 2, torch.float32, torch.float32)]
    model = [(5, 312, 200, 3), (2048, *BENCH_SHAPES[0])]
    cases = [c for s in shapes for c in _aot_cases(*s)]
    cases += [dict(c, shape=c["shape"] + ["bf16 dots"])
              for s in model for c in _aot_cases(*s, torch.float32, torch.float32, dot=torch.bfloat16)]
    # LOW_RANK_ROW_WARPS = 8 at the taobao benchmark shape: 8-warp builds of its (wider) tiles
    wide = _aot_cases(2048, *BENCH_SHAPES[0], torch.bfloat16, torch.bfloat16, row_warps=8)
    cases += [dict(c, num_warps=8, shape=c["shape"] + ["8 warps"]) for c in wide if c["kind"] != "weights"]
    results = aot_build_sm90(cases, workers=max(1, min(8, os.cpu_count() or 1)))
    assert len(results) == len(cases)
    for r in results:
        what = f"{r['kind']} D, r, L, x, params = {r['shape']}: compiled {r['shared']} B, estimate {r['est']} B"
        assert r["shared"] <= H100_SMEM, what
        assert r["shared"] <= r["est"], what


FR_CASES = [  # B, D, L
    (3, 40, 1),     # one layer: the backward's top and last layer in one launch
    (1, 40, 4),     # all four layers in one forward launch (D <= BLOCK_N); L = 4 backward carries
    (3, 312, 1),    # wide layer, L = 1: the top layer is the last (cuBLAS dx0 from C = g + g * y)
    (3, 312, 2),    # wide layers: three column tiles, K loop with a tail
    (5, 312, 3),    # L = 3: the running-sum carry between the top and next-to-last layers
    (2, 200, 4),    # L = 4: ping-pong buffers of the carries reused
    (70, 200, 2),   # wide layers over three row tiles: db partial sums of the element-wise backward
    (130, 40, 2),   # two row tiles: db partial sums over row tiles
]


@pytest.fixture(params=["cublas", "triton"])
def full_rank_gemm(request, monkeypatch):
    """Both ways of running full-rank layers wider than one column tile (``FULL_RANK_GEMM``)."""
    monkeypatch.setattr(C, "FULL_RANK_GEMM", request.param)
    return request.param


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("B,D,L", FR_CASES)
def test_cross_net(B, D, L, dtype, full_rank_gemm):
    if B == 130 and dtype != torch.float32:
        pytest.skip("the row-tile case is a layout check; fp32 covers it")
    if D <= 128 and full_rank_gemm != "cublas":
        pytest.skip("D <= 128 runs the one-launch Triton path whatever FULL_RANK_GEMM says")
    if (B, D, L) == (2, 200, 4) and dtype != torch.float32 and full_rank_gemm == "triton":
        pytest.skip("the Triton GEMM's L = 4 carries are covered at D = 40; fp32 covers this layout")
    flat = _fr_inputs(B, D, L, dtype)
    _check(C.cross_net, R.cross_net, flat, L, 2, dtype)


def test_cross_net_paths_share_saved_tensors(monkeypatch):
    """A forward taken one way and its backward the other give the reference gradients: both ways
    save the same ``xs``/``ys``, so a change of ``FULL_RANK_GEMM`` between them is harmless."""
    B, D, L = 3, 312, 3
    flat = _fr_inputs(B, D, L, torch.float32)
    g = torch.randn(B, D, device=DEVICE)
    _, ref_grads, _ = _run(R.cross_net, flat, L, 2, grad_out=g)
    for fwd, bwd in (("triton", "cublas"), ("cublas", "triton")):
        leaves = [t.detach().clone().requires_grad_() for t in flat]
        monkeypatch.setattr(C, "FULL_RANK_GEMM", fwd)
        out = C.cross_net(*_split(leaves, L, 2))
        monkeypatch.setattr(C, "FULL_RANK_GEMM", bwd)
        grads = torch.autograd.grad(out, leaves, g)
        for name, k, e in zip(_names(L, 2), grads, ref_grads):
            assert_rel(k, e, FP32_TOL, f"{name} ({fwd} forward, {bwd} backward)")


def test_cross_net_rejects_unknown_gemm_setting(monkeypatch):
    monkeypatch.setattr(C, "FULL_RANK_GEMM", "cutlass")
    x0, ws, bs = _split(_fr_inputs(3, 312, 1, torch.float32), 1, 2)
    with pytest.raises(ValueError, match="FULL_RANK_GEMM"):
        C.cross_net(x0, ws, bs)


@pytest.mark.parametrize("rank", [None, 16])
def test_noncontiguous_x0_and_stride0_grad(rank):
    """x0 as a transposed view, upstream gradient a stride-0 expand (``out.sum()``)."""
    B, D, L = 3, 40, 2
    flat = _fr_inputs(B, D, L, torch.float32) if rank is None else _lr_inputs(B, D, rank, L, torch.float32)
    kinds = 2 if rank is None else 3
    fused, ref = (C.cross_net, R.cross_net) if rank is None else (C.low_rank_cross_net, R.low_rank_cross_net)
    results = []
    for fn in (fused, ref):
        leaves = [t.detach().clone().requires_grad_() for t in flat[1:]]
        x0 = flat[0].t().contiguous().t().requires_grad_()  # same values, strides (1, B)
        assert not x0.is_contiguous()
        out = fn(*_split([x0, *leaves], L, kinds))
        out.sum().backward()
        results.append([out.detach(), x0.grad, *[t.grad for t in leaves]])
    for name, k, e in zip(["out"] + _names(L, kinds), *results):
        assert_rel(k, e, FP32_TOL, name)


# rank (None: full), D, FULL_RANK_GEMM: the one-launch Triton path, the cuBLAS one and the per-layer Triton one
AUTOCAST_PATHS = [(8, 40, "cublas"), (None, 40, "cublas"), (None, 312, "cublas"), (None, 312, "triton")]


@pytest.mark.parametrize("p_dtype", [torch.float32, torch.float16], ids=["fp32-params", "16-bit-params"])
@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("rank,D,gemm", AUTOCAST_PATHS, ids=["low-rank", "full-one-launch", "full-cublas", "full-triton"])
def test_autocast_meets_the_design_rule_per_parameter(rank, D, gemm, L, p_dtype, monkeypatch):
    """The model's call: under autocast (fp16 on the CPU, bf16 on a GPU), an fp32 x0 and an fp32
    upstream gradient; the output and every gradient, each parameter on its own, within DESIGN §5's
    2x of eager's autocast error against float64, for fp32 parameters and for parameters in the
    autocast dtype, on every kernel path, over three seeds. Eager keeps the element-wise part in
    fp32. Until 2026-11-29 the kernels rounded x0 (and the full rank its running ``x_i`` and carried
    gradient) to the autocast dtype, and 11 of these 16 cases failed on the CPU: with fp32
    parameters a bias gradient at 3000x to 5500x eager's error, with 16-bit ones the output, dx0 or
    a lower layer's bias gradient at 2.0x to 2.4x."""
    monkeypatch.setattr(C, "FULL_RANK_GEMM", gemm)
    lowp = torch.bfloat16 if HAS_CUDA else torch.float16
    kinds = 2 if rank is None else 3
    fused, ref = (C.cross_net, R.cross_net) if rank is None else (C.low_rank_cross_net, R.low_rank_cross_net)
    B = 5
    for seed in range(3):
        torch.manual_seed(seed)
        flat = _fr_inputs(B, D, L, torch.float32) if rank is None else _lr_inputs(B, D, rank, L, torch.float32)
        flat = flat[:1] + [t.to(lowp if p_dtype != torch.float32 else p_dtype) for t in flat[1:]]
        g = torch.randn(B, D, device=DEVICE)
        with torch.autocast(DEVICE.type, dtype=lowp):
            out, grads, _ = _run(fused, flat, L, kinds, grad_out=g)
            e_out, e_grads, _ = _run(ref, flat, L, kinds, grad_out=g)
        out64, grads64, _ = _run(ref, [t.double() for t in flat], L, kinds, grad_out=g.double())
        for name, k, e, r64 in zip(["out"] + _names(L, kinds), [out, *grads], [e_out, *e_grads], [out64, *grads64]):
            assert k.dtype == e.dtype, f"{name}: dtype {k.dtype}, eager's {e.dtype}"
            assert_lowp(k, e, r64, f"seed {seed} {name}")


@pytest.mark.skipif(HAS_CUDA, reason="CPU autocast check (fp16; the interpreter has no bf16)")
@pytest.mark.parametrize("rank,D", [(None, 40), (None, 312), (8, 40)])
@pytest.mark.parametrize("x_dtype,p_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32),
                                             (torch.float16, torch.float16)], ids=["fp32-x0", "fp16-x0", "all-fp16"])
def test_autocast_output_and_gradients_have_eagers_dtypes(rank, D, x_dtype, p_dtype):
    """Under fp16 autocast, whatever the mix of x0's and the parameters' dtypes, the output and every
    gradient have the dtype eager's autocast gives them (fp32 x0 with fp16 parameters: fp32, as
    eager's element-wise ``x0 * (...)`` promotes, and the kernels write it so), on the
    Triton path (D = 40) and the cuBLAS one (D = 312), and the values stay near eager's."""
    B, L = 3, 2
    kinds = 2 if rank is None else 3
    flat = _fr_inputs(B, D, L, p_dtype) if rank is None else _lr_inputs(B, D, rank, L, p_dtype)
    flat[0] = flat[0].to(x_dtype)
    fused, ref = (C.cross_net, R.cross_net) if rank is None else (C.low_rank_cross_net, R.low_rank_cross_net)
    g = torch.randn(B, D)
    with torch.autocast("cpu", dtype=torch.float16):
        out, grads, _ = _run(fused, flat, L, kinds, grad_out=g)
        e_out, e_grads, _ = _run(ref, flat, L, kinds, grad_out=g)
    for name, k, e in zip(["out"] + _names(L, kinds), [out, *grads], [e_out, *e_grads]):
        assert k.dtype == e.dtype, f"{name}: {k.dtype}, eager's {e.dtype}"
        assert_rel(k, e, 2e-2, name)  # fp16 GEMM operands on both paths, rounded in other places


def test_a_perturbed_reference_is_caught():
    """The fp32 comparison is sharp: a relative change of one kernel ten times the tolerance fails it."""
    flat = _lr_inputs(3, 40, 8, 2, torch.float32)
    x0, ws, vs, bs = _split(flat, 2, 3)
    out = C.low_rank_cross_net(x0, ws, vs, bs)
    assert_rel(out, R.low_rank_cross_net(x0, ws, vs, bs), FP32_TOL)
    # scaled with the tolerance (1e-5 under the interpreter, 1e-3 on GPU where fp32 dots are tf32x3),
    # so the test means the same on both: a fixed 1e-4 would pass unnoticed within the GPU tolerance
    bad = [vs[0] * (1 + 10 * FP32_TOL), vs[1]]
    with pytest.raises(AssertionError):
        assert_rel(out, R.low_rank_cross_net(x0, ws, bad, bs), FP32_TOL)


# ----------------------------------------------------------------------------- modules
def _randomize(module: nn.Module) -> nn.Module:
    """Xavier init leaves the biases at zero: give every parameter random values."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "bias" in name else 1.0 / math.sqrt(p.shape[-1])))
    return module


@pytest.mark.parametrize("make", [lambda b: CrossNet(40, 3, backend=b), lambda b: LowRankCrossNet(312, 2, 16, backend=b)],
                         ids=["CrossNet", "LowRankCrossNet"])
def test_module_triton_vs_eager(make):
    eager = _randomize(make("eager")).to(DEVICE)
    fused = make("triton").to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(5, eager.in_features, device=DEVICE)
    outs, grads = [], []
    for m in (fused, eager):
        xi = x.clone().requires_grad_()
        out = m(xi)
        out.backward(torch.ones_like(out) * 0.5 + torch.arange(out.shape[1], device=DEVICE) / out.shape[1])
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    assert_rel(outs[0], outs[1], FP32_TOL, "out")
    names = ["x"] + [n for n, _ in eager.named_parameters()]
    for name, k, e in zip(names, grads[0], grads[1]):
        assert k.shape == e.shape
        assert_rel(k, e, FP32_TOL, f"grad {name}")


# torchrec (not installed) -- minimal stand-ins for the public module logic of torchrec.modules.crossnet:
# parameters kept as [D, D] / [D, r] / [r, D] matrices; CrossNet with [D, 1] biases and the input as a
# column per sample ([B, D, 1]); LowRankCrossNet in its current form ([D] biases, rows through
# F.linear) and in its earlier one (as CrossNet: [D, 1] biases, columns).
class _TorchrecCrossNet(nn.Module):
    def __init__(self, in_features: int, num_layers: int) -> None:
        super().__init__()
        self._num_layers = num_layers
        self.kernels = nn.ParameterList(
            nn.Parameter(nn.init.xavier_normal_(torch.empty(in_features, in_features))) for _ in range(num_layers))
        self.bias = nn.ParameterList(nn.Parameter(nn.init.zeros_(torch.empty(in_features, 1))) for _ in range(num_layers))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x_0 = input.unsqueeze(2)
        x_l = x_0
        for layer in range(self._num_layers):
            x_l = x_0 * (torch.matmul(self.kernels[layer], x_l) + self.bias[layer]) + x_l
        return torch.squeeze(x_l, dim=2)


class _TorchrecLowRankCrossNet(nn.Module):
    def __init__(self, in_features: int, num_layers: int, low_rank: int = 1, earlier: bool = False) -> None:
        super().__init__()
        self._num_layers, self._earlier = num_layers, earlier
        self.W_kernels = nn.ParameterList(
            nn.Parameter(nn.init.xavier_normal_(torch.empty(in_features, low_rank))) for _ in range(num_layers))
        self.V_kernels = nn.ParameterList(
            nn.Parameter(nn.init.xavier_normal_(torch.empty(low_rank, in_features))) for _ in range(num_layers))
        shape = (in_features, 1) if earlier else (in_features,)
        self.bias = nn.ParameterList(nn.Parameter(nn.init.zeros_(torch.empty(shape))) for _ in range(num_layers))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self._earlier:  # columns, as _TorchrecCrossNet
            x_0 = input.unsqueeze(2)
            x_l = x_0
            for layer in range(self._num_layers):
                xl_w = torch.matmul(self.W_kernels[layer], torch.matmul(self.V_kernels[layer], x_l))
                x_l = x_0 * (xl_w + self.bias[layer]) + x_l
            return torch.squeeze(x_l, dim=2)
        x_l = input
        for layer in range(self._num_layers):
            xl_w = F.linear(F.linear(x_l, self.V_kernels[layer]), self.W_kernels[layer])
            x_l = input * (xl_w + self.bias[layer]) + x_l
        return x_l


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("low_rank,earlier", [(None, False), (6, False), (6, True)],
                         ids=["full", "low-rank", "low-rank-earlier-torchrec"])
def test_torchrec_state_dict_round_trip(low_rank, earlier, backend):
    """A torchrec module's ``state_dict`` loads (strict) and gives its outputs; ours loads back into
    torchrec's current modules as it is, and into the earlier ``LowRankCrossNet`` (``[D, 1]``
    biases) with its biases viewed in that shape."""
    D, L = 40, 2
    if low_rank is None:
        theirs, ours = _TorchrecCrossNet(D, L), CrossNet(D, L, backend=backend)
    else:
        theirs = _TorchrecLowRankCrossNet(D, L, low_rank, earlier)
        ours = LowRankCrossNet(D, L, low_rank, backend=backend)
    _randomize(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    back = ours.state_dict()
    if earlier:  # its [D, 1] biases: ours are [D]
        back = {k: v.view_as(theirs.state_dict()[k]) for k, v in back.items()}
    theirs.load_state_dict(back, strict=True)  # and back (a shape mismatch raises)
    x = torch.randn(3, D)
    expected = theirs(x)
    assert_rel(ours.to(DEVICE)(x.to(DEVICE)), expected, FP32_TOL)


def test_golden_2x3():
    """Computed by hand. x0 rows (1, 2, 3) and (0.5, -1, 2).

    Full rank, W0 = [[1,0,0],[0,2,0],[1,1,1]], b0 = (0.1, 0.2, 0.3); W1 = I, b1 = 0:
      x1 = x0 * (W0 x0 + b0) + x0 = (2.1, 10.4, 21.9), (0.8, 0.8, 5.6); x2 = x0 * x1 + x1 = x1 * (x0 + 1).
    Low rank, U = (1, 0, 2)^T, V = (1, 1, 0), b = (0, 0, 1):
      row 1: V x0 = 3, U*3 + b = (3, 0, 7), x1 = (4, 2, 24); row 2: V x0 = -0.5, (-0.5, 0, 0), x1 = (0.25, -1, 2).
    """
    x0 = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], device=DEVICE)
    full = CrossNet(3, 2, backend="triton").to(DEVICE)
    low = LowRankCrossNet(3, 1, 1, backend="triton").to(DEVICE)
    with torch.no_grad():
        full.kernels[0].copy_(torch.tensor([[1.0, 0, 0], [0, 2, 0], [1, 1, 1]]))
        full.bias[0].copy_(torch.tensor([[0.1], [0.2], [0.3]]))
        full.kernels[1].copy_(torch.eye(3))
        full.bias[1].zero_()
        low.W_kernels[0].copy_(torch.tensor([[1.0], [0.0], [2.0]]))
        low.V_kernels[0].copy_(torch.tensor([[1.0, 1.0, 0.0]]))
        low.bias[0].copy_(torch.tensor([0.0, 0.0, 1.0]))
    expected_full = torch.tensor([[4.2, 31.2, 87.6], [1.2, 0.0, 16.8]], device=DEVICE)
    expected_low = torch.tensor([[4.0, 2.0, 24.0], [0.25, -1.0, 2.0]], device=DEVICE)
    torch.testing.assert_close(full(x0), expected_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low(x0), expected_low, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(R.cross_net(x0, list(full.kernels), list(full.bias)), expected_full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("make", [lambda b: CrossNet(40, 2, backend=b), lambda b: LowRankCrossNet(40, 2, 8, backend=b)],
                         ids=["CrossNet", "LowRankCrossNet"])
def test_fx_symbolic_trace(make, backend):
    module = _randomize(make(backend)).to(DEVICE)
    gm = torch.fx.symbolic_trace(module)
    assert isinstance(gm, torch.fx.GraphModule)
    if backend == "triton" or DEVICE.type == "cuda":  # a call of the fused function (kernels._dispatch.fx_call)
        assert {C.cross_net, C.low_rank_cross_net} & {n.target for n in gm.graph.nodes}, gm.code
    x = torch.randn(3, 40, device=DEVICE)
    assert_rel(gm(x), module(x), FP32_TOL)


# ----------------------------------------------------------------------------- torch.library
# compute_dtype None (x0's) and fp16 with fp32 x0 and parameters (autocast's call, fp32 output)
OP_DTS = pytest.mark.parametrize("dt", [None, torch.float16], ids=["x0-dtype", "fp16-dots"])


@OP_DTS
def test_opcheck_low_rank(dt):
    x0, *params = _lr_inputs(3, 40, 8, 2, torch.float32)
    ws, vs, bs = params[:2], params[2:4], params[4:]
    args = (x0.requires_grad_(), [w.requires_grad_() for w in ws], [v.requires_grad_() for v in vs],
            [b.requires_grad_() for b in bs], dt)
    torch.library.opcheck(torch.ops.interformer.low_rank_cross_net_fwd.default, args)
    _, p = torch.ops.interformer.low_rank_cross_net_fwd(*args)
    bwd_args = (torch.randn(3, 40, device=DEVICE), x0.detach(), [w.detach() for w in ws], [v.detach() for v in vs],
                [b.detach() for b in bs], p.detach(), dt)
    torch.library.opcheck(torch.ops.interformer.low_rank_cross_net_bwd.default, bwd_args)


@pytest.mark.parametrize("mode", ["rows", "phases"])
@pytest.mark.parametrize("B,D", [(0, 40), (3, 0)], ids=["empty-batch", "no-features"])
def test_opcheck_low_rank_empty(B, D, mode, monkeypatch):
    """The low-rank ops on an empty batch or zero features: opcheck passes, the output is empty and
    the weight gradients zero. Reachable by a direct op call only (:func:`C.low_rank_cross_net`
    takes the reference there); until this test the backward's split plans (and the phased
    forward's) divided by zero."""
    monkeypatch.setattr(C, "LOW_RANK_FORWARD", mode)
    monkeypatch.setattr(C, "LOW_RANK_BACKWARD", mode)
    x0, *params = _lr_inputs(B, D, 8, 2, torch.float32)
    ws, vs, bs = params[:2], params[2:4], params[4:]
    args = (x0.requires_grad_(), [w.requires_grad_() for w in ws], [v.requires_grad_() for v in vs],
            [b.requires_grad_() for b in bs], None)
    torch.library.opcheck(torch.ops.interformer.low_rank_cross_net_fwd.default, args)
    out, p = torch.ops.interformer.low_rank_cross_net_fwd(*args)
    assert out.shape == (B, D) and not p.any()
    bwd_args = (torch.randn(B, D, device=DEVICE), x0.detach(), [w.detach() for w in ws], [v.detach() for v in vs],
                [b.detach() for b in bs], p.detach(), None)
    torch.library.opcheck(torch.ops.interformer.low_rank_cross_net_bwd.default, bwd_args)
    dx0, *dparams = torch.ops.interformer.low_rank_cross_net_bwd(*bwd_args)
    assert dx0.shape == (B, D) and [tuple(t.shape) for t in dparams] == [(2, D, 8), (2, 8, D), (2, D)]
    assert not any(t.any() for t in dparams)


@OP_DTS
@pytest.mark.parametrize("D", [40, 312], ids=["one-launch", "wide"])
def test_opcheck_full_rank(D, dt):
    x0, *params = _fr_inputs(3, D, 2, torch.float32)
    ws, bs = params[:2], params[2:]
    args = (x0.requires_grad_(), [w.requires_grad_() for w in ws], [b.requires_grad_() for b in bs], dt)
    torch.library.opcheck(torch.ops.interformer.cross_net_fwd.default, args)
    _, xs, ys = torch.ops.interformer.cross_net_fwd(*args)
    assert xs.dtype == ys.dtype == (dt or x0.dtype)  # the GEMM operands, saved in the compute dtype
    bwd_args = (torch.randn(3, D, device=DEVICE), x0.detach(), [w.detach() for w in ws], [b.detach() for b in bs],
                xs.detach(), ys.detach(), dt)
    torch.library.opcheck(torch.ops.interformer.cross_net_bwd.default, bwd_args)


@NO_POISON
def test_compile_fullgraph_through_the_ops():
    """``torch.compile(fullgraph=True)`` traces both public functions (forward and backward ops)."""
    torch._dynamo.reset()
    backend = "inductor" if HAS_CUDA else "aot_eager"
    for fused, ref, flat, kinds in (
        (C.low_rank_cross_net, R.low_rank_cross_net, _lr_inputs(3, 40, 8, 2, torch.float32), 3),
        (C.cross_net, R.cross_net, _fr_inputs(3, 40, 2, torch.float32), 2),
    ):
        compiled = torch.compile(fused, fullgraph=True, backend=backend)
        out, grads, g = _run(compiled, flat, 2, kinds)
        e_out, e_grads, _ = _run(ref, flat, 2, kinds, grad_out=g)
        for k, e in zip([out, *grads], [e_out, *e_grads]):
            assert_rel(k, e, FP32_TOL)


# ----------------------------------------------------------------------------- eager entry vs custom op
LEAN_CASES = [  # (id, rank or None, B, D, L, requires_grad of x0 / of the parameters, biases in the
    # other layout than the module's: [D, 1] for the low rank, [D] for the full rank)
    ("low-rank", 8, 3, 40, 2, True, True, False),
    ("low-rank-frozen-params-column-bias", 24, 2, 40, 3, True, False, True),
    ("full-rank-one-launch", None, 3, 40, 3, True, True, False),
    ("full-rank-per-layer-frozen-x0-1d-bias", None, 2, 160, 2, False, True, True),
]


def _lean_masters(rank, B, D, L, other_bias):
    flat = _fr_inputs(B, D, L, torch.float32) if rank is None else _lr_inputs(B, D, rank, L, torch.float32)
    if not other_bias:
        return flat
    return flat[:-L] + [b.reshape((-1,) if rank is None else (-1, 1)) for b in flat[-L:]]


def _lean_leaves(masters, req_x0, req_p):
    return [t.detach().clone().requires_grad_(req_x0 if i == 0 else req_p) for i, t in enumerate(masters)]


@pytest.mark.parametrize("case", LEAN_CASES, ids=lambda c: c[0])
def test_eager_entry_matches_custom_op_bitwise(case, monkeypatch):
    """Outside tracing the public functions run the launchers through a plain autograd.Function (the
    parameter lists passed flat); the custom op called directly (what torch.compile records) gives
    the very same outputs (out and the saved P, or xs and ys) and gradients, bit for bit, with the
    same dtypes, shapes and differentiable outputs; the public function with the custom-op route
    forced gives the same too; under no_grad, or with no input requiring grad, the forward launcher
    alone gives the same output."""
    cid, rank, B, D, L, req_x0, req_p, other_bias = case
    kinds = 2 if rank is None else 3
    lean_fn, op, public = ((C._CrossNet, torch.ops.interformer.cross_net_fwd, C.cross_net) if rank is None else
                           (C._LowRankCrossNet, torch.ops.interformer.low_rank_cross_net_fwd, C.low_rank_cross_net))
    grad = torch.randn(B, D, device=DEVICE)
    masters = _lean_masters(rank, B, D, L, other_bias)

    def go(path):
        leaves = _lean_leaves(masters, req_x0, req_p)
        x0, *lists = _split(leaves, L, kinds)
        if path == "lean":
            outs = lean_fn.apply(x0, L, None, *leaves[1:])
        else:
            outs = op(x0, *[list(t) for t in lists], None)
        meta = (type(outs[0].grad_fn).__name__, [(o.dtype, o.shape, o.requires_grad) for o in outs])
        outs[0].backward(grad)
        return [o.detach() for o in outs], meta, [t.grad for t in leaves]

    lean, ref = go("lean"), go("op")
    assert lean[1][0] == lean_fn.__name__ + "Backward" and ref[1][0].startswith("GeneratedBackwardFor_interformer")
    assert lean[1][1] == ref[1][1]
    for a, b in zip(lean[0], ref[0]):
        assert torch.equal(a, b)
    names = _names(L, kinds)
    for name, a, b, leaf in zip(names, lean[2], ref[2], _lean_leaves(masters, req_x0, req_p)):
        if not leaf.requires_grad:
            assert a is None and b is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape == leaf.shape, name
        assert torch.equal(a, b), f"d{name}: eager entry and custom op differ"
        assert bool(a.abs().sum() > 0), name

    def public_run():
        leaves = _lean_leaves(masters, req_x0, req_p)
        out = public(*_split(leaves, L, kinds))
        fn_name = type(out.grad_fn).__name__
        out.backward(grad)
        return out.detach(), fn_name, [t.grad for t in leaves]

    out, fn_name, grads = public_run()
    assert fn_name == lean_fn.__name__ + "Backward" and torch.equal(out, ref[0][0])
    with monkeypatch.context() as m:  # the public function down the custom-op route
        m.setattr(C, "tracing", lambda tensors: True)
        op_out, op_fn_name, op_grads = public_run()
    assert op_fn_name.startswith("GeneratedBackwardFor_interformer") and torch.equal(op_out, out)
    for name, a, b in zip(names, grads, op_grads):
        assert (a is None and b is None) or (a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)), name
    leaves = _lean_leaves(masters, req_x0, req_p)
    with torch.no_grad():
        out_ng = public(*_split(leaves, L, kinds))
    assert out_ng.grad_fn is None and torch.equal(out_ng, out)
    out_plain = public(*_split([t.detach() for t in leaves], L, kinds))
    assert out_plain.grad_fn is None and not out_plain.requires_grad and torch.equal(out_plain, out)


@pytest.mark.skipif(HAS_CUDA, reason="CPU autocast check")
@pytest.mark.parametrize("rank", [None, 8])
def test_eager_entry_matches_custom_op_under_autocast(rank, monkeypatch):
    """Under autocast (fp32 x0 and parameters read as they are, fp16 dots) both routes of the public
    function give the same output (fp32, eager's dtype) and the same gradients (fp32 for the
    parameters)."""
    B, D, L = 3, 40, 2
    kinds = 2 if rank is None else 3
    public = C.cross_net if rank is None else C.low_rank_cross_net
    flat = _fr_inputs(B, D, L, torch.float32) if rank is None else _lr_inputs(B, D, rank, L, torch.float32)
    g = torch.randn(B, D)
    results = []
    for route in ("lean", "op"):
        with monkeypatch.context() as m:
            if route == "op":
                m.setattr(C, "tracing", lambda tensors: True)
            with torch.autocast("cpu", dtype=torch.float16):
                out, grads, _ = _run(public, flat, L, kinds, grad_out=g)
        results.append((out, grads))
    (out, grads), (op_out, op_grads) = results
    assert out.dtype == op_out.dtype == torch.float32 and torch.equal(out, op_out)
    for a, b in zip(grads, op_grads):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


# ----------------------------------------------------------------------------- input errors
def test_input_errors():
    x0, *params = _lr_inputs(3, 40, 8, 1, torch.float32)
    w, v, b = params
    with pytest.raises(ValueError, match="x0"):
        C.low_rank_cross_net(x0[0], [w], [v], [b])
    with pytest.raises(ValueError, match="v_kernels"):
        C.low_rank_cross_net(x0, [w], [v.t()], [b])
    with pytest.raises(ValueError, match="one length"):
        C.low_rank_cross_net(x0, [w, w], [v], [b])
    with pytest.raises(ValueError, match="biases"):
        C.low_rank_cross_net(x0, [w], [v], [b[:-1]])
    with pytest.raises(ValueError, match="share one dtype"):
        C.low_rank_cross_net(x0.half(), [w], [v], [b])
    with pytest.raises(ValueError, match="kernels"):
        C.cross_net(x0, [w], [b])
    with pytest.raises(ValueError, match="share one dtype"):
        C.cross_net(x0, [torch.randn(40, 40, device=DEVICE).half()], [b])
    assert C.cross_net(x0, [], []) is x0  # no layer: the input, as the reference returns


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("rank", [None, 32])
@pytest.mark.parametrize("B,n_tokens,d", [(2048, 28, 64), (2048, 12, 64), (512, 72, 128)],
                         ids=["taobao", "amazon", "long"])
def test_design_shapes_bf16(B, n_tokens, d, rank):
    D, L = n_tokens * d, 2
    if rank is None and D > 2000:
        B = 128  # the long full-rank layer is 85M parameters: keep the float64 reference small
    if rank is None:
        flat = _fr_inputs(B, D, L, torch.bfloat16)
        _check(C.cross_net, R.cross_net, flat, L, 2, torch.bfloat16)
    else:
        flat = _lr_inputs(B, D, rank, L, torch.bfloat16)
        _check(C.low_rank_cross_net, R.low_rank_cross_net, flat, L, 3, torch.bfloat16)


@NO_POISON
@pytest.mark.gpu
@pytest.mark.parametrize("rank", [None, 32])
@pytest.mark.parametrize("setting", ["default", "none"])
def test_module_compiled_with_inductor(rank, setting):
    """Compiled with Inductor, under the default compile-reference set (the cross nets are in it:
    Inductor compiles the reference) and with ``"none"`` (the custom ops in Inductor's graph)."""
    import interformer

    torch._dynamo.reset()
    before = interformer.set_compile_reference_ops(setting)
    try:
        D = 28 * 64
        m = (CrossNet(D, 2, backend="triton") if rank is None else LowRankCrossNet(D, 2, rank, backend="triton"))
        m = _randomize(m).to(DEVICE)
        x = torch.randn(256, D, device=DEVICE)
        assert_rel(torch.compile(m)(x), m(x), FP32_TOL)
    finally:
        interformer.set_compile_reference_ops(before)
        torch._dynamo.reset()


def test_cublas_path_kernels_build_for_sm90():
    """The element-wise kernels of the cuBLAS full-rank path compile ahead of time for an H100, in
    one dtype (bf16) and in the model's autocast case (fp32 x0, output and carried gradient; bf16
    GEMM operands)."""
    bm, bn = C._BWD_TILE
    mod, cases = "interformer.kernels.crossnet", []
    for x, dt in (("bf16", "bf16"), ("fp32", "bf16")):
        for has_copy in (False, True):
            cases.append(dict(module=mod, kernel="_fr_residual_kernel",
                              consts=dict(HAS_COPY=has_copy, BLOCK_M=C._RES_TILE[0], BLOCK_N=C._RES_TILE[1]),
                              args=dict(DST=x, COPY=dt, X0=x, LIN=dt, BIAS=x, XI=x, B=2048, D=1792)))
        for has_s, has_m, last in ((False, False, False), (True, x != dt, False), (True, x != dt, True),
                                   (False, x != dt, True)):
            cases.append(dict(module=mod, kernel="_fr_bwd_eltwise_kernel",
                              consts=dict(HAS_S=has_s, HAS_M=has_m, LAST=last, BLOCK_M=bm, BLOCK_N=bn),
                              args=dict(DY=dt, S_OUT="fp32", C_OUT=x, G_OUT=x, DBP="fp32", G=x, M=dt, X0=x,
                                        LIN=dt, BIAS=x, S_IN="fp32", B=2048, D=1792)))
    builds = aot_build_sm90(cases)
    assert len(builds) == len(cases)
    assert all(b["shared"] <= H100_SMEM for b in builds), builds


@pytest.mark.parametrize("B,D", [(2048, 96), (2048, 1792)], ids=["one-launch", "per-layer"])
def test_triton_gemm_kernels_build_for_sm90(B, D):
    """The full-rank Triton GEMM kernels (narrow layers, and wide ones with ``FULL_RANK_GEMM =
    "triton"``) compile for an H100 within its shared memory with the tiles their launchers pick, in
    bf16 and in the autocast case that loads fp32 x0 and parameters for bf16 dots (which takes
    fp32's K tile and stages: 16-bit ones would need 256 KB for 128 x 64 fp32 tiles in 4 stages)."""
    L, mod, cases = 2, "interformer.kernels.crossnet", []
    for x, dt in (("bf16", "bf16"), ("fp32", "bf16")):
        tdt = getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dt])
        bm, bn, bk, warps, stages = C._fr_config(B, D, tdt, wide=x != dt)
        meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=C._GROUP_M, PREC=C.dot_precision(tdt),
                    DT={"tl_dtype": C.tl_dtype(tdt).name})
        one = D <= bn
        for first in ((0,) if one else range(L)):
            cases.append(dict(module=mod, kernel="_fr_fwd_kernel", num_warps=warps, num_stages=stages,
                              consts=dict(meta, FIRST=first, NUM_LAYERS=L if one else 1, TOTAL=L, RUNNING=x != dt),
                              args=dict(OUT=x, XS=dt, YS=dt, X0=x, Ws=[x] * L, Bs=[x] * L, B=B, D=D)))
        for top, last in ((True, False), (False, True), (True, True)):
            cases.append(dict(module=mod, kernel="_fr_bwd_kernel", num_warps=warps, num_stages=stages,
                              consts=dict(meta, TOP=top, LAST=last, NEXT_LAST=not top and last),
                              args=dict(DY_OUT=dt, G_OUT=x, S_OUT="fp32", DX0=x, DBP="fp32", DY_TOP=dt, DY_IN=dt,
                                        G_IN=x, S_IN="fp32", X0=x, W=x, Y_CUR=dt, Y_PREV=dt, B_CUR=x, B_PREV=x,
                                        B=B, D=D, DB_ROW=0, DB_ROW_TOP=0, DB_STRIDE=2 * D)))
    builds = aot_build_sm90(cases, workers=2)
    assert len(builds) == len(cases)
    for b in builds:
        assert b["shared"] <= H100_SMEM, (b["kernel"], b["consts"], b["shared"])


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_low_rank_split_path_with_three_layers(dtype):
    """The weight-gradient kernel's fp32 partials with L = 3 (the split case above has L = 2, where a
    partial buffer laid out for two layers is indistinguishable): per split, the ``dU`` block of all
    layers, then ``dV``, then ``db``, each ``L`` layers long, as ``sum_partials`` reads them. Also rank 1
    with more than one layer, and B a multiple of neither row block (16, 32)."""
    B, D, r, L = 40, 40, 1, 3
    bbw, bdw, _ = C._lr_plan(D, r, L, dtype, dtype).weights
    split, _ = C._lr_split(B, D, r, L, bbw, bdw, dtype.itemsize)
    assert split == 2
    flat = _lr_inputs(B, D, r, L, dtype)
    _check(C.low_rank_cross_net, R.low_rank_cross_net, flat, L, 3, dtype)


@pytest.mark.parametrize("rank", [None, 8])
def test_noncontiguous_parameters(rank):
    """Parameters handed over as strided views (transposed kernels, biases sliced out of one
    ``[D, L]`` tensor, so that ``reshape(-1)`` is a stride-L view): the launchers must read them as
    the views they are (a kernel indexes its operands as contiguous rows). D = 40: the full-rank
    one-launch Triton GEMM, which reads W in the kernel."""
    B, D, L = 3, 40, 2
    kinds = 2 if rank is None else 3
    flat = _fr_inputs(B, D, L, torch.float32) if rank is None else _lr_inputs(B, D, rank, L, torch.float32)
    fused, ref = (C.cross_net, R.cross_net) if rank is None else (C.low_rank_cross_net, R.low_rank_cross_net)
    x0, *lists = _split(flat, L, kinds)
    # leaves: transposed copies of every matrix, and one [D, L] tensor holding all biases
    mats = [m.t().contiguous().requires_grad_() for lst in lists[:-1] for m in lst]
    bcat = torch.stack([b.reshape(-1) for b in lists[-1]], dim=1).contiguous().requires_grad_()

    def bias_views(t):  # in the module's layout: [D, 1] full rank, [D] low rank (each a stride-L view)
        return [t[:, i:i + 1] if rank is None else t[:, i] for i in range(L)]
    x0 = x0.clone().requires_grad_()
    g = torch.randn(B, D, device=DEVICE)

    def params():
        views = [m.t() for m in mats]
        biases = bias_views(bcat)
        assert not any(v.is_contiguous() for v in views) and not biases[0].reshape(-1).is_contiguous()
        return [views[k * L:(k + 1) * L] for k in range(kinds - 1)] + [biases]

    out = fused(x0, *params())
    grads = torch.autograd.grad(out, [x0, *mats, bcat], g)
    leaves64 = [t.detach().double().requires_grad_() for t in (x0, *mats, bcat)]
    x64, *mats64, b64 = leaves64
    views64 = [m.t() for m in mats64]
    lists64 = [views64[k * L:(k + 1) * L] for k in range(kinds - 1)] + [bias_views(b64)]
    out64 = ref(x64, *lists64)
    grads64 = torch.autograd.grad(out64, leaves64, g.double())
    assert_rel(out, out64, FP32_TOL, "out")
    for name, k, e in zip(["dx0"] + [f"dparam{i}" for i in range(len(mats))] + ["dbiases"], grads, grads64):
        assert_rel(k, e, FP32_TOL, name)


@pytest.mark.parametrize("B,D,gemm", [(1100, 16, "cublas"), (1030, 136, "triton")],
                         ids=["one-launch", "wide-triton"])
def test_cross_net_more_than_eight_row_tiles(B, D, gemm, monkeypatch):
    """More than GROUP_M = 8 row tiles of 128 (B > 1024): the grouped tile order of the Triton GEMMs
    (``_grouped_tile``) starts a second group, whose programs must cover the remaining row tiles --
    the one-launch path (D <= 128, one column tile) and the wide Triton path (two column tiles). The
    other cases have at most two row tiles, all in the first group."""
    monkeypatch.setattr(C, "FULL_RANK_GEMM", gemm)
    L = 1 if gemm == "triton" else 2
    assert C.cdiv(B, C._fr_config(B, D, torch.float32)[0]) > C._GROUP_M
    flat = _fr_inputs(B, D, L, torch.float32)
    _check(C.cross_net, R.cross_net, flat, L, 2, torch.float32)


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.float32], ids=["fp16-x0", "fp32-x0"])
@pytest.mark.parametrize("rank", [None, 8])
def test_backward_ops_return_parameter_gradients_in_parameter_dtype(rank, x_dtype):
    """The backward ops under autocast's dtypes (fp16 dots, fp32 parameters, an fp16 or fp32 x0, the
    output and so the upstream gradient fp32) return dx0 in x0's dtype and the parameter gradients
    in the parameters' dtype, as their fake implementations say: autograd would silently cast a
    gradient to its leaf's dtype (and autocast's loose fp16 tolerance hides the rounding), so the
    op's own outputs are checked here, by dtype and by ``opcheck`` (real vs fake)."""
    B, D, L = 3, 40, 2
    x0 = torch.randn(B, D, device=DEVICE).to(x_dtype)
    g = torch.randn(B, D, device=DEVICE)
    dt = torch.float16
    if rank is None:
        _, *params = _fr_inputs(B, D, L, torch.float32)
        ws, bs = params[:L], params[L:]
        out, xs, ys = torch.ops.interformer.cross_net_fwd(x0, ws, bs, dt)
        op, args = torch.ops.interformer.cross_net_bwd, (g, x0, ws, bs, xs, ys, dt)
    else:
        _, *params = _lr_inputs(B, D, rank, L, torch.float32)
        ws, vs, bs = params[:L], params[L:2 * L], params[2 * L:]
        out, p = torch.ops.interformer.low_rank_cross_net_fwd(x0, ws, vs, bs, dt)
        op, args = torch.ops.interformer.low_rank_cross_net_bwd, (g, x0, ws, vs, bs, p, dt)
    assert out.dtype == torch.float32
    dx0, *param_grads = op(*args)
    assert dx0.dtype == x_dtype
    assert [t.dtype for t in param_grads] == [torch.float32] * len(param_grads)
    torch.library.opcheck(op.default, args)


# ----------------------------------------------------------------------------- batched gradients
@pytest.mark.skipif(HAS_CUDA, reason="CPU autocast check (fp16; the interpreter has no bf16)")
@pytest.mark.parametrize("rank,D", [(None, 40), (None, 200), (8, 40)], ids=["full-one-launch", "full-cublas", "low-rank"])
def test_batched_grads_under_autocast_meet_the_design_rule(rank, D):
    """``is_grads_batched=True`` under fp16 autocast (fp32 x0, parameters, upstream gradients) goes
    through ``_reference_grads``: each row of its gradients must meet DESIGN §5's 2x-eager rule, as
    the kernels' own backward does. Until a review of 5c41efb it cast x0 and the biases to the
    compute dtype and ran with autocast off, so the running x and the carried gradient were fp16
    too: bias gradients at fp16's rounding (about 4e-4, 400x eager's 5e-8), dx0 at 2.1x (3 of 3
    cases failed)."""
    L, B, N = 2, 5, 3
    kinds = 2 if rank is None else 3
    torch.manual_seed(0)
    flat = _fr_inputs(B, D, L, torch.float32) if rank is None else _lr_inputs(B, D, rank, L, torch.float32)
    fused, ref = (C.cross_net, R.cross_net) if rank is None else (C.low_rank_cross_net, R.low_rank_cross_net)
    G = torch.randn(N, B, D)
    res = []
    for fn, ac, dt in ((fused, True, torch.float32), (ref, True, torch.float32), (ref, False, torch.float64)):
        leaves = [t.to(dt).detach().clone().requires_grad_() for t in flat]
        with torch.autocast("cpu", dtype=torch.float16, enabled=ac):
            out = fn(*_split(leaves, L, kinds))
        res.append(torch.autograd.grad(out, leaves, G.to(out.dtype), is_grads_batched=True))
    for name, k, e, r64 in zip(_names(L, kinds), *res):
        assert k.dtype == e.dtype, name
        assert_lowp(k, e, r64, f"d{name} (batched)")
