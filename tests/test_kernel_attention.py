"""Fused rotary attention (``interformer.kernels.attention``) against the eager reference and float64.

Every case compares the output and the gradients of q, k and v with (a) the eager reference
``interformer.reference.attention`` run in the same dtype and (b) a float64 evaluation of the same
formulas (``attention64`` below): fp32 within ``FP32_TOL`` of both, fp16/bf16 by the DESIGN §5 rule
(kernel error vs float64 <= 2x the eager low-precision error). The cases cover L = 1, 5, 54, 100,
129, 300; head dims 16, 32, 64, 128 (plus the padded odd sizes 5 and 6); shared (PMA) and per-sample
queries; causal on/off; rotary on q and k, on k only, off; mask_queries on/off; lengths with 0 and
the full length; the non-contiguous ``qkv(s).view(B, L, 3, H, dh).unbind(2)`` views the module
makes, transposed layouts, k and v given as one tensor (PMA's folded call: the kernels write its
gradient dk + dv themselves), and stride-0 upstream gradients (``out.sum()``). Both kernel paths of the
backward are reached (single query block: Lq <= 128; general dq + dk/dv kernels, and in fp32 the
delta kernel: Lq > 128), and the
forward's 16/64/128-row query blocks. The eager entry (plain autograd.Function, generic and packed, and
the no-grad launcher) must match the custom ops bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from interformer import reference as R
from interformer.layers import PoolingMultiHeadAttention, RotaryMultiHeadAttention
from poison import NO_POISON
from utils import DEVICE, FP32_TOL, KERNEL_DTYPES, aot_build_sm90, assert_lowp, assert_rel, random_lengths, rel_err

pytest.importorskip("triton")  # (a machine without Triton skips the file)
from interformer.kernels import attention as A  # noqa: E402  (an import error fails, not skips)
BASE = 10000.0


def attention64(q, k, v, lengths, causal=False, rope_base=None, rope_q=True, mask_queries=True, sm_scale=None):
    """The reference's math evaluated entirely in float64.

    Kept apart from ``reference.attention`` so that the float64 check does not rest on the code it
    checks (the reference once filled masked scores with a finite minimum, which made its softmax
    behave otherwise at the extremes). This copy takes the rotary from the reference, which builds
    its angle table in float64 for float64 inputs, and does everything else in float64 too.
    """
    q, k, v = q.double(), k.double(), v.double()
    B, Lk, H, dh = k.shape
    Lq = q.shape[1]
    scale = 1.0 / math.sqrt(dh) if sm_scale is None else sm_scale
    if rope_base is not None:
        k = R.rotary(k, rope_base)
        if rope_q:
            q = R.rotary(q, rope_base)
    s = torch.einsum("bqhd,bkhd->bhqk", q.expand(B, -1, -1, -1), k) * scale
    vis = R.row_mask(lengths, Lk)[:, None, None, :]
    if causal:
        vis = vis & (torch.arange(Lk, device=k.device)[None, :] <= torch.arange(Lq, device=k.device)[:, None])
    s = s.masked_fill(~vis, -1e300)
    keep = vis.any(-1, keepdim=True)
    if mask_queries:
        keep = keep & R.row_mask(lengths, Lq)[:, None, :, None]
    p = torch.softmax(s, -1) * keep
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


@dataclass(frozen=True)
class Case:
    id: str
    B: int
    shared: bool  # q [1, Lq, H, dh] broadcast over the batch (PMA)
    Lq: int
    Lk: int
    H: int
    dh: int
    causal: bool
    rope: Optional[str]  # "qk", "k" (rope_q=False) or None
    mask_q: bool
    # "qkv" (module views, row stride 3*H*dh), "transposed" ([B, H, L, dh].transpose(1, 2)), "contiguous",
    # "kv" (k and v one tensor)
    layout: str
    grad: str = "random"  # "random" upstream gradient, or "sum" (stride-0 expanded ones)
    sm_scale: Optional[float] = None


CASES = [
    Case("L1", 3, False, 1, 1, 2, 16, False, "qk", True, "qkv"),
    Case("L5-causal-ropek", 3, False, 5, 5, 2, 32, True, "k", False, "qkv", grad="sum"),
    Case("L54-taobao", 3, False, 54, 54, 2, 16, False, "qk", True, "qkv"),
    Case("L100-amazon", 3, False, 100, 100, 2, 16, False, "qk", True, "qkv"),
    Case("L129-general-dh64", 3, False, 129, 129, 2, 64, False, "qk", True, "qkv"),
    Case("L129-causal-norope", 3, False, 129, 129, 2, 16, True, None, False, "transposed", sm_scale=0.3),
    Case("L300-causal-block128", 2, False, 300, 300, 1, 16, True, "qk", True, "qkv"),
    Case("pma-54", 3, True, 2, 54, 2, 16, False, None, False, "contiguous"),
    Case("pma-129-dh32", 3, True, 2, 129, 2, 32, False, None, False, "transposed", grad="sum"),
    Case("cross-7x54-dh128", 3, False, 7, 54, 2, 128, False, "qk", True, "transposed"),
    Case("shared-54x5-causal", 3, True, 54, 5, 2, 32, True, "qk", True, "contiguous"),
    Case("shared-129x54-general-ropek", 3, True, 129, 54, 2, 16, False, "k", True, "contiguous"),
    Case("dh6-padded-rope-causal", 3, False, 13, 13, 2, 6, True, "qk", True, "qkv"),
    Case("dh5-padded-pma", 3, True, 3, 13, 2, 5, False, None, False, "contiguous"),
    Case("B1-L54", 1, False, 54, 54, 2, 16, False, "qk", True, "qkv"),  # B = 1 (DESIGN §5)
    Case("B1-pma-54", 1, True, 2, 54, 2, 32, False, None, False, "contiguous"),
    Case("pma-folded-kv-54-dh64", 3, True, 8, 54, 1, 64, False, None, False, "kv"),
    Case("kv-13-causal-ropek", 3, False, 13, 13, 2, 32, True, "k", False, "kv", grad="sum"),
    Case("kv-129-general-rope", 2, False, 129, 129, 2, 16, False, "qk", True, "kv"),
    # k and v one tensor, unrotated (one load for both), past one key block: the delta pass of the
    # general backward (dq kernel, or fp32's delta kernel) and of the folded PMA's shared queries
    Case("kv-130-general-norope", 2, False, 130, 130, 1, 16, False, None, False, "kv"),
    Case("pma-folded-kv-140-dh64", 2, True, 8, 140, 1, 64, False, None, False, "kv"),
    # a negative scale: the kernels take the maximum of the negated raw scores (NEG)
    Case("L13-negative-scale", 2, False, 13, 13, 2, 16, False, "k", True, "contiguous", sm_scale=-0.5),
    Case("L129-general-causal-negative-scale", 2, False, 129, 129, 1, 16, True, "qk", True, "qkv", sm_scale=-0.2),
]


def make_leaves(case: Case, gen: torch.Generator):
    """Float64 master copies of the leaves of ``case`` and a function building (q, k, v) from leaves."""
    B, H, dh = case.B, case.H, case.dh
    Bq = 1 if case.shared else B

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if case.layout == "qkv":
        assert case.Lq == case.Lk and not case.shared
        leaves = [rnd(B, case.Lq, 3, H, dh)]
        return leaves, lambda ls: ls[0].unbind(2)
    if case.layout == "transposed":
        leaves = [rnd(Bq, H, case.Lq, dh), rnd(B, H, case.Lk, dh), rnd(B, H, case.Lk, dh)]
        return leaves, lambda ls: tuple(t.transpose(1, 2) for t in ls)
    if case.layout == "kv":
        return [rnd(Bq, case.Lq, H, dh), rnd(B, case.Lk, H, dh)], lambda ls: (ls[0], ls[1], ls[1])
    leaves = [rnd(Bq, case.Lq, H, dh), rnd(B, case.Lk, H, dh), rnd(B, case.Lk, H, dh)]
    return leaves, lambda ls: tuple(ls)


def run(fn, case: Case, masters, build, lengths, grad, dtype):
    leaves = [m.to(DEVICE, dtype).requires_grad_() for m in masters]
    q, k, v = build(leaves)
    out = fn(q, k, v, lengths, causal=case.causal, rope_base=None if case.rope is None else BASE,
             rope_q=case.rope == "qk", mask_queries=case.mask_q, sm_scale=case.sm_scale)
    if case.grad == "sum":
        out.sum().backward()  # the gradient reaching the op is a stride-0 expand
    else:
        out.backward(grad.to(dtype))
    return out.detach(), [leaf.grad for leaf in leaves]


def split_grads(case, grads):
    """(dq, dk, dv) from the leaves' gradients (with k and v one tensor, its gradient dk + dv twice)."""
    if case.layout == "qkv":
        return grads[0].unbind(2)
    if case.layout == "kv":
        return grads[0], grads[1], grads[1]
    if case.layout == "transposed":
        return tuple(g.transpose(1, 2) for g in grads)
    return tuple(grads)


def check_padding_exact(case: Case, out, dq, dk, dv, lengths):
    """Masked rows are exact zeros: outputs and q-gradients of padded query rows (mask_queries),
    rows of empty samples, and k/v gradients of padded keys."""
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(dk[b, n:] == 0) and torch.all(dv[b, n:] == 0), f"sample {b}: padded keys got a gradient"
        if case.mask_q:
            assert torch.all(out[b, n:] == 0), f"sample {b}: padded query rows are not zero"
            if not case.shared:
                assert torch.all(dq[b, n:] == 0), f"sample {b}: padded query rows got a gradient"
        if n == 0:
            assert torch.all(out[b] == 0), f"sample {b} (length 0) is not zero"


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_attention_matches_reference(case, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    lengths = random_lengths(case.B, max(case.Lq, case.Lk), generator=gen).to(DEVICE)
    check_case(case, lengths, gen, dtype)


def check_case(case: Case, lengths, gen, dtype):
    """The kernel's output and (dq, dk, dv) for ``case`` at ``lengths`` against eager in ``dtype`` and
    float64 (DESIGN §5), and the exact zeros of masked rows; inputs drawn from ``gen``."""
    masters, build = make_leaves(case, gen)
    grad = torch.randn(case.B, case.Lq, case.H, case.dh, generator=gen, dtype=torch.float64).to(DEVICE)

    out, g_k = run(A.attention, case, masters, build, lengths, grad, dtype)
    out_e, g_e = run(R.attention, case, masters, build, lengths, grad, dtype)
    # float64 on the inputs the kernel saw (rounded to dtype; see test_kernel_pffn)
    out_64, g_64 = run(attention64, case, [m.to(dtype).double() for m in masters], build, lengths,
                       grad.to(dtype).double(), torch.float64)

    assert out.shape == (case.B, case.Lq, case.H, case.dh) and out.dtype == dtype and out.is_contiguous()
    names = ["out", "dq", "dk", "dv"]
    kern = [out, *split_grads(case, g_k)]
    eager = [out_e, *split_grads(case, g_e)]
    ref64 = [out_64, *split_grads(case, g_64)]
    for name, a, e, r in zip(names, kern, eager, ref64):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        if dtype == torch.float32:
            assert_rel(a, r, FP32_TOL, name + " vs float64")
            assert_rel(a, e, FP32_TOL, name + " vs eager fp32")
        else:
            assert_lowp(a, e, r, name)
    check_padding_exact(case, *kern, lengths.cpu())


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shared,causal,rope", [(False, False, True), (False, True, True), (True, False, False)])
def test_all_padding_rows_are_zero_never_nan(shared, causal, rope, dtype):
    """Every row empty (lengths 0) with large inputs: exact zeros forward and backward, no NaN."""
    B, L, H, dh = 2, 20, 2, 32
    q = (100 * torch.randn(1 if shared else B, 2 if shared else L, H, dh, device=DEVICE)).to(dtype).requires_grad_()
    k = (100 * torch.randn(B, L, H, dh, device=DEVICE)).to(dtype).requires_grad_()
    v = torch.randn(B, L, H, dh, device=DEVICE).to(dtype).requires_grad_()
    lengths = torch.zeros(B, dtype=torch.long, device=DEVICE)
    for mask_q in (True, False):
        for t in (q, k, v):
            t.grad = None
        out = A.attention(q, k, v, lengths, causal=causal, rope_base=BASE if rope else None, mask_queries=mask_q)
        out.backward(torch.randn_like(out))
        for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            assert not torch.isnan(t).any(), f"{name} has NaN"
            assert torch.all(t == 0), f"{name} is not exactly zero"


def test_strided_int32_lengths():
    """lengths may be int32 and non-contiguous (a column of a bigger tensor)."""
    B, L, H, dh = 3, 10, 2, 16
    q, k, v = (torch.randn(B, L, H, dh, device=DEVICE) for _ in range(3))
    table = torch.tensor([[10, 99], [0, 99], [6, 99]], dtype=torch.int32, device=DEVICE)
    lengths = table[:, 0]
    assert not lengths.is_contiguous()
    ref = attention64(q, k, v, lengths.long(), rope_base=BASE)
    assert_rel(A.attention(q, k, v, lengths, rope_base=BASE), ref, FP32_TOL, "out")


def test_lengths_past_int32_and_negative_are_clamped():
    """int64 lengths beyond int32 mean "all of L" and negative ones "none" (they are clamped in
    int64 before the kernel narrows them; 2**32 + 2 once wrapped to 2)."""
    B, L, H, dh = 3, 10, 2, 16
    q, k, v = (torch.randn(B, L, H, dh, device=DEVICE) for _ in range(3))
    lengths = torch.tensor([2 ** 32 + 2, -5, 2 ** 31], device=DEVICE)
    ref = attention64(q, k, v, lengths.clamp(0, L), rope_base=BASE)
    assert_rel(A.attention(q, k, v, lengths, rope_base=BASE), ref, FP32_TOL, "out")


def test_heads_wider_than_128_use_the_reference(monkeypatch):
    """dh = 256 runs the reference (no kernel launch), forward and backward, like the other ops' large shapes."""
    def no_launch(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched for dh > 128")
    monkeypatch.setattr(A, "_attention_fwd_impl", no_launch)
    monkeypatch.setattr(A, "_attention_qkv_fwd_impl", no_launch)
    q, k, v = (torch.randn(2, 5, 1, 256, device=DEVICE, requires_grad=True) for _ in range(3))
    lengths = torch.tensor([5, 2], device=DEVICE)
    out = A.attention(q, k, v, lengths, rope_base=BASE)
    assert_rel(out, attention64(q, k, v, lengths, rope_base=BASE), FP32_TOL, "out")
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


def test_wide_head_reference_output_is_contiguous():
    """Past the kernels' head width (and under a torch.func transform) :func:`A.attention` returns
    the reference's result, made contiguous as its docstring states: the reference's einsum gives a
    permuted view at H > 1 (strides (780, 130, 390, 1) for [2, 3, 2, 130]; a review's find)."""
    q, k, v = (torch.randn(2, 3, 2, 130, device=DEVICE) for _ in range(3))
    lengths = torch.tensor([3, 1], device=DEVICE)
    out = A.attention(q, k, v, lengths)
    assert out.is_contiguous(), out.stride()
    assert_rel(out, attention64(q, k, v, lengths), FP32_TOL, "out")


def test_length_zero_row_amid_full_rows_large_scores():
    """A zero-length row next to rows whose scores are huge (fp16 overflow territory for naive code)."""
    B, L, H, dh = 3, 33, 2, 16
    q = (30 * torch.randn(B, L, H, dh, device=DEVICE)).half().requires_grad_()
    k = (30 * torch.randn(B, L, H, dh, device=DEVICE)).half().requires_grad_()
    v = torch.randn(B, L, H, dh, device=DEVICE).half().requires_grad_()
    lengths = torch.tensor([L, 0, 7], device=DEVICE)
    out = A.attention(q, k, v, lengths, rope_base=BASE)
    out.backward(torch.randn_like(out))
    ref = attention64(q.detach(), k.detach(), v.detach(), lengths, rope_base=BASE)
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    assert torch.all(out[1] == 0) and torch.all(q.grad[1] == 0) and torch.all(k.grad[1] == 0)
    assert rel_err(out, ref) < 2e-2


def _near_one_hot_case(L, lengths, shared_grad, keys):
    """fp16 scores of standard deviation about 36 over L keys (float64 q, k, v, upstream gradient,
    lengths and scale); ``keys``: keys appended up to that count that no query weighs (scores about
    -200, through one more head dimension), every row then valid, and as many query rows (zeros but
    for that dimension: they weigh the L first keys alike, and their upstream gradient is zero)."""
    g = torch.Generator().manual_seed(2)
    B, H, dh = len(lengths), 2, 8
    q, k = (6 * torch.randn(B, L, H, dh, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, L, H, dh, generator=g, dtype=torch.float64)
    go = torch.randn(1 if shared_grad else B, L, H, dh, generator=g, dtype=torch.float64).expand(B, L, H, dh)
    sm_scale = dh ** -0.5
    if keys is not None:  # one more head dim: 10 in every query, -60 in the appended keys (and in the keys
        extra = keys - L  # past a row's length, which every row then sees), 0 in the others
        q = torch.cat([torch.cat([q, torch.zeros(B, extra, H, dh, dtype=torch.float64)], 1),
                       torch.full((B, keys, H, 1), 10.0, dtype=torch.float64)], 3)
        k_extra = torch.zeros(B, keys, H, 1, dtype=torch.float64)
        k_extra[:, L:] = -60.0
        for b, n in enumerate(lengths):
            k_extra[b, n:] = -60.0
        k = torch.cat([torch.cat([k, torch.zeros(B, extra, H, dh, dtype=torch.float64)], 1), k_extra], 3)
        k[:, :, :, :dh] *= (k_extra == 0)
        v = torch.cat([torch.cat([v, torch.randn(B, extra, H, dh, generator=g, dtype=torch.float64)], 1),
                       torch.zeros(B, keys, H, 1, dtype=torch.float64)], 3)
        go = torch.cat([torch.cat([go, torch.zeros(B, extra, H, dh, dtype=torch.float64)], 1),
                        torch.zeros(B, keys, H, 1, dtype=torch.float64)], 3)
        lengths = [keys] * B
    return q, k, v, go, torch.tensor(lengths, device=DEVICE), sm_scale


def _run_near_one_hot(case, fn, dtype):
    """[out, dq, dk, dv] of ``fn`` on a :func:`_near_one_hot_case` (or a case of its form) in ``dtype``."""
    q, k, v, go, lengths, sm_scale = case
    leaves = [t.to(DEVICE, dtype, copy=True).requires_grad_() for t in (q, k, v)]  # (a copy: never the case's own)
    out = fn(*leaves, lengths, mask_queries=False, sm_scale=sm_scale)
    out.backward(go.to(DEVICE, dtype))
    return [out] + [t.grad for t in leaves]


def _backward_kernels(monkeypatch, fn):
    """``fn()``'s result and the names of the attention kernels it launched."""
    names, real = [], A.launch

    def spy(kernel):
        names.append(getattr(kernel, "__name__", None) or kernel.fn.__name__)
        return real(kernel)

    monkeypatch.setattr(A, "launch", spy)
    try:
        return fn(), names
    finally:
        monkeypatch.setattr(A, "launch", real)


def _near_one_hot_backward(keys, dtype):
    """The kernels a near one-hot case's backward launches: the single-query-block one, or the
    general dq (with its delta pass in fp16) and dk/dv, and in fp32 a delta kernel of its own."""
    if keys != 130:
        return {"_attn_bwd_fused_kernel"}
    general = {"_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"}
    return general | {"_attn_bwd_delta_kernel"} if dtype == torch.float32 else general


_NEAR_ONE_HOT = [(2, [2, 1, 2], True, None), (2, [2, 1, 2], True, 64), (2, [2, 1, 2], True, 66),
                 (2, [2, 1, 2], True, 130), (5, [5, 3, 1], False, None), (40, [40, 9, 1], False, None)]
_NEAR_ONE_HOT_IDS = ["2-keys", "2-of-64-keys", "2-of-66-keys", "2-of-130-keys", "5-keys", "40-keys"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("L,lengths,shared_grad,keys", _NEAR_ONE_HOT, ids=_NEAR_ONE_HOT_IDS)
def test_a_near_one_hot_softmax_meets_the_low_precision_rule(monkeypatch, L, lengths, shared_grad, keys, dtype):
    """Scores of standard deviation about 36 over a few keys, where the softmax is close to one-hot:
    out, dq, dk and dv stay within twice eager's error in the same dtype (DESIGN §5's fp16 rule; in
    fp32 within 1e-5 or, where eager itself misses that (dq 2.4e-4 off float64 over two keys), twice
    eager's error). There ``dS = P * (dP - delta)`` is a small difference of two numbers of order
    one; with ``delta = rowsum(dO * O)`` from the stored output that difference carried the
    forward's P and O roundings, and dq was off by 0.76 (relative) against eager's 1.8e-2 in fp16 (2
    keys, a fuzzing helper, 2026-11-28), 3.0e-3 against 2.4e-4 in fp32 past one key block (a
    review). The backward forms ``delta = rowsum(P * dP)`` from the recomputed P, as the reference's
    softmax backward does: in its one pass where every key fits one block (up to 64; 32 or 16 in fp32), in
    a pass of its own past that (66 keys: the single-query-block kernel; 130 keys and as many
    queries: the general dq kernel, which stores it for the dk/dv kernel, or in fp32 a delta kernel
    of its own; the kernels launched are checked), divided there by the recomputed row sum of P (fp32 over 40 keys, two 32-key blocks:
    dq 7.3x eager's error without the division, the interpreter's recomputed scores a few ulps off
    the forward's). :func:`test_the_output_delta_fails_a_near_one_hot_softmax` shows the 66- and
    130-key cases fail without the pass."""
    case = _near_one_hot_case(L, lengths, shared_grad, keys)
    fused, launched = _backward_kernels(monkeypatch, lambda: _run_near_one_hot(case, A.attention, dtype))
    assert {n for n in launched if "_bwd_" in n} == _near_one_hot_backward(keys, dtype), launched
    eager, exact = (_run_near_one_hot(case, R.attention, t) for t in (dtype, torch.float64))
    # every tensor's errors in the message (a GPU run may be the only one that shows them)
    errors = {name: (rel_err(f, x), rel_err(e, x)) for name, f, e, x in zip(("out", "dq", "dk", "dv"), fused, eager,
                                                                             exact)}
    report = ", ".join(f"{n} fused {f:.2e} eager {e:.2e}" for n, (f, e) in errors.items())
    for name, f, e, x in zip(("out", "dq", "dk", "dv"), fused, eager, exact):
        try:
            if dtype == torch.float32:
                assert_rel(f, x, max(FP32_TOL, 2 * rel_err(e, x)), name)
            else:
                assert_lowp(f, e, x, name)
        except AssertionError as failure:
            raise AssertionError(f"{failure} (all, against float64: {report})") from None


@pytest.mark.parametrize("keys", [None, 64, 66, 130], ids=["2-keys", "2-of-64-keys", "2-of-66-keys", "2-of-130-keys"])
def test_fp32_near_one_hot_gradients_are_free_of_delta_rounding(monkeypatch, keys):
    """fp32 forms ``dP - delta`` as ``(dP - c) - t`` (module docstring, "Backward": ``c`` is dP at
    the row's most probable key, ``t = rowsum(P * (dP - c)) / rowsum(P)``), so that near one-hot rows
    do not carry an ulp of ``delta`` (about dP's size) into ``dS`` of the most probable key, whose true
    value is of the size of the other keys' P: dq and dk within a tenth of eager's error (which has
    that rounding: 2.4e-4 here under the interpreter, 3.0e-4 on the H200). ``dS = P * (dP - delta)``
    was at eager's error under the interpreter (2.4e-4) and 4x it on the H200 (dq 1.17e-3, past
    DESIGN's 1e-3: ``ex2.approx`` and ``lg2`` leave ``rowsum(P)`` off 1 and ``div.full.f32`` rounds the
    division; ``profiling/near_one_hot_emulation.py`` replays it); pivoted, 4.2e-6 (interpreter)
    and 1.6e-6 (that emulation). Every path: one key block, the pass (64 and 66 keys, its pivot moved
    past the first block in the 40-key case above), the general backward (130)."""
    case = _near_one_hot_case(2, [2, 1, 2], True, keys)
    fused, launched = _backward_kernels(monkeypatch, lambda: _run_near_one_hot(case, A.attention, torch.float32))
    assert {n for n in launched if "_bwd_" in n} == _near_one_hot_backward(keys, torch.float32), launched
    eager, exact = (_run_near_one_hot(case, R.attention, t) for t in (torch.float32, torch.float64))
    for name, f, e, x in zip(("dq", "dk"), fused[1:3], eager[1:3], exact[1:3]):
        assert rel_err(f, x) < 0.1 * rel_err(e, x), (name, rel_err(f, x), rel_err(e, x))


@pytest.mark.parametrize("Lq,Lk", [(80, 16), (100, 12)])
def test_a_near_one_hot_softmax_over_one_key_block_divides_by_the_recomputed_row_sum(monkeypatch, Lq, Lk):
    """fp32 queries past one query block over keys that fit one (64 < Lq <= 128, Lk <= 16: the
    forward's 64-row query tiles, the backward's one 128-row tile): the backward's recomputed scores
    are a few ulps off the forward's, ``rowsum(P)`` drifts off 1, and the in-loop
    ``delta = rowsum(P * dP)`` carried it: dq 4-10x eager's error (a review, 2026-11-28). Divided by
    the recomputed ``rowsum(P)``, as the pass does, dq and dk stay within 1e-5 or twice eager."""
    g = torch.Generator().manual_seed(Lq)
    B, H, dh = 3, 2, 8
    q = 6 * torch.randn(B, Lq, H, dh, generator=g, dtype=torch.float64)
    k = 6 * torch.randn(B, Lk, H, dh, generator=g, dtype=torch.float64)
    v = torch.randn(B, Lk, H, dh, generator=g, dtype=torch.float64)
    go = torch.randn(B, Lq, H, dh, generator=g, dtype=torch.float64)
    lengths = torch.tensor([Lk, Lk // 2, 1], device=DEVICE)

    def run(fn, dtype):
        leaves = [t.to(DEVICE, dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, lengths, mask_queries=False, sm_scale=dh ** -0.5)
        out.backward(go.to(DEVICE, dtype))
        return [out] + [t.grad for t in leaves]

    fused, launched = _backward_kernels(monkeypatch, lambda: run(A.attention, torch.float32))
    assert {n for n in launched if "_bwd_" in n} == {"_attn_bwd_fused_kernel"}, launched
    eager, exact = run(R.attention, torch.float32), run(R.attention, torch.float64)
    for name, f, e, x in zip(("out", "dq", "dk", "dv"), fused, eager, exact):
        assert_rel(f, x, max(FP32_TOL, 2 * rel_err(e, x)), name)


def _cancelling_scores_case(Lq, Lk, seed):
    """A :func:`_near_one_hot_case`-shaped fp16 case (q, k, v, upstream gradient, lengths, scale;
    float64 values the fp16 kernel sees exactly) whose scores are small sums of large cancelling
    terms: q and k, standard normal over a head of 16, hold ``X = 128`` in their first dimension and
    ``X`` (queries) or ``-X`` (keys) in their last, so every score is ``X^2 - X^2 + (the rest)``:
    fp32 sums the rest at the ulps of ``X^2`` (about 2e-3), in an order that depends on the tile
    shape. The values are ``16 + 0.25 * N(0, 1)``: a common offset, so that every key's ``dP = dO .
    v`` carries ``16 * sum(dO)``, which ``dP - delta`` cancels only where delta is a weighted mean of
    dP. Two samples, the second a third of the keys long; one head."""
    g = torch.Generator().manual_seed(seed)
    B, H, dh, X = 2, 1, 16, 128.0
    q = torch.randn(B, Lq, H, dh, generator=g, dtype=torch.float64)
    k = torch.randn(B, Lk, H, dh, generator=g, dtype=torch.float64)
    q[..., 0] = q[..., -1] = X
    k[..., 0], k[..., -1] = X, -X
    v = 16.0 + 0.25 * torch.randn(B, Lk, H, dh, generator=g, dtype=torch.float64)
    go = torch.randn(B, Lq, H, dh, generator=g, dtype=torch.float64)
    q, k, v, go = (t.half().double() for t in (q, k, v, go))
    return q, k, v, go, torch.tensor([Lk, Lk // 3], device=DEVICE), dh ** -0.5


@pytest.mark.parametrize("Lk,form", [(40, A._DELTA_IN_LOOP), (100, A._DELTA_PASS)], ids=["in-loop", "pass"])
def test_fp16_delta_divides_by_the_recomputed_row_sum(monkeypatch, Lk, form):
    """fp16 queries past one forward query block (64 < Lq <= 128: the forward's 64-row tiles, the
    backward's one 128-row tile) on scores summed from large cancelling terms
    (:func:`_cancelling_scores_case`): the backward's recomputed scores differ from the forward's by
    ulps of the terms (a numpy replay of the two tilings: about 6% of the scores, by up to 7e-3),
    and ``rowsum(P)`` of the recomputed P is off 1 by up to about 2e-4. ``delta = rowsum(P * dP)``
    must be divided by it, in the loop's one pass (every key in one block) and in the pass of its
    own (past one block, ``_delta_pass``): without the division, ``dS = P * (dP - delta)``
    sums over the keys to ``(1 - rowsum(P)) * rowsum(P * dP)`` instead of 0, dP holding the values'
    common offset (16 times dO's sum), and dq's two large dimensions (``X * sum(dS)``, 0 in exact
    arithmetic) take it: dq 20-53x eager's error (3.3e-1 to 8.9e-1 against float64, eager 1.5-2.0e-2,
    where its fp16 scores and P weigh; seven seeds of each form, 2026-11-29), and neither the
    near one-hot cases nor the reference cases see it (in fp16 the drift of ``rowsum(P)`` is
    otherwise far below eager's rounding). With it, out, dq, dk and dv meet DESIGN §5's rule with
    margin: at most 1.2x eager's error in those seeds (dv, whose recomputed P carries the row sum's
    drift itself; dq 0.5-0.7x). The fp32 paths' divisions: the tests above."""
    Lq, dtype = 100, torch.float16
    dhp = A._padded_dh(16)
    block_m, block_n, _ = A._fused_bwd_config(Lq, Lk, dhp, dtype)
    assert A._fwd_config(Lq, Lk, dhp, dtype)[0] < block_m
    assert A._delta_form(Lk, block_n) == form
    case = _cancelling_scores_case(Lq, Lk, seed=Lk)
    fused, launched = _backward_kernels(monkeypatch, lambda: _run_near_one_hot(case, A.attention, dtype))
    assert {n for n in launched if "_bwd_" in n} == {"_attn_bwd_fused_kernel"}, launched
    eager, exact = _run_near_one_hot(case, R.attention, dtype), _run_near_one_hot(case, attention64, torch.float64)
    for name, f, e, x in zip(("out", "dq", "dk", "dv"), fused, eager, exact):
        assert_lowp(f, e, x, name)


def _paired_query_blocks_case(seed, dtype=torch.float16):
    """A :func:`_near_one_hot_case`-shaped case (float64 values exact in ``dtype``) for the general
    backward's dk/dv kernel, whose programs loop over query blocks of ``blk`` rows
    (``_general_bwd_config``): two pairs of blocks, each pair the same ``blk`` queries twice with
    upstream gradients ``16 g`` and ``-16 g``, then 44 rows of standard normal queries and
    gradients, over 64 standard normal keys and values (one sample, two heads of 16, no masking).
    The two blocks of a pair give every key's dk (and dv) the same partial sum with opposite signs
    (bitwise where equal rows get equal arithmetic: under the interpreter the kernel's errors are
    the same with the pairs' gradients not scaled by 16), so dk is the last 44 rows' alone, while the
    partial sum after the first block of a pair is about 20 times as large (gradients 16 times as
    large, over 64 rows)."""
    dh = 16
    (blk, _), _, _ = A._general_bwd_config(A._padded_dh(dh), dtype)
    g = torch.Generator().manual_seed(seed)
    B, H, Lk, rest = 1, 2, 64, 44
    qs, gs = [], []
    for _ in range(2):
        qb = torch.randn(B, blk, H, dh, generator=g, dtype=torch.float64)
        gb = 16 * torch.randn(B, blk, H, dh, generator=g, dtype=torch.float64)
        qs += [qb, qb]
        gs += [gb, -gb]
    q = torch.cat(qs + [torch.randn(B, rest, H, dh, generator=g, dtype=torch.float64)], 1)
    go = torch.cat(gs + [torch.randn(B, rest, H, dh, generator=g, dtype=torch.float64)], 1)
    k, v = (torch.randn(B, Lk, H, dh, generator=g, dtype=torch.float64) for _ in range(2))
    q, k, v, go = (t.to(dtype).double() for t in (q, k, v, go))
    return q, k, v, go, torch.tensor([Lk] * B, device=DEVICE), dh ** -0.5


def test_fp16_dk_accumulates_over_the_query_blocks_in_fp32(monkeypatch):
    """The general backward's dk/dv kernel sums a key block's dk (and dv) over the query blocks in
    an fp32 accumulator and rounds it to fp16 once, at the store. Rounded after each query block
    instead, dk would carry the rounding of every partial sum, which matters where the partial sums
    are far larger than the total: :func:`_paired_query_blocks_case`, whose pairs of query blocks
    cancel exactly and leave the last 44 rows' dk. Rounded per block (a mutation, 2026-11-29): dk
    10-14x eager's error (5.1-6.4e-3 against float64, eager 4.7-5.7e-4; six seeds), dv likewise
    10-12x when dv's accumulator is rounded; as the kernel is, 0.5-0.7x eager for every output (the
    cancelling pairs cost neither eager nor the fp32 sum anything); this file's other fp16 cases
    pass with either mutation. DESIGN §5's rule on out, dq, dk and dv."""
    dtype = torch.float16
    case = _paired_query_blocks_case(seed=0, dtype=dtype)
    assert not A._use_fused_bwd(case[0].shape[1], A._padded_dh(16), dtype)
    fused, launched = _backward_kernels(monkeypatch, lambda: _run_near_one_hot(case, A.attention, dtype))
    assert {n for n in launched if "_bwd_" in n} == {"_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"}, launched
    eager, exact = _run_near_one_hot(case, R.attention, dtype), _run_near_one_hot(case, attention64, torch.float64)
    for name, f, e, x in zip(("out", "dq", "dk", "dv"), fused, eager, exact):
        assert_lowp(f, e, x, name)


@pytest.mark.parametrize("dtype,factor", [(torch.float16, 10), (torch.float32, 5)], ids=["fp16", "fp32"])
@pytest.mark.parametrize("keys", [66, 130], ids=["single-query-block", "general"])
def test_the_output_delta_fails_a_near_one_hot_softmax(monkeypatch, keys, dtype, factor):
    """``BACKWARD_DELTA = "output"`` (flash attention's ``delta = rowsum(dO * O)``, kept for timing)
    breaks the rule on the near one-hot cases past one key block, by far (fp16 0.76 against eager's
    1.8e-2, fp32 3.0e-3 against 2.4e-4): what the default pass fixes, on both backward paths (the
    kernels launched are checked: the preprocess kernel forms delta from O in the general one)."""
    case = _near_one_hot_case(2, [2, 1, 2], True, keys)
    eager, exact = (_run_near_one_hot(case, R.attention, t) for t in (dtype, torch.float64))
    monkeypatch.setattr(A, "BACKWARD_DELTA", "output")
    fused, launched = _backward_kernels(monkeypatch, lambda: _run_near_one_hot(case, A.attention, dtype))
    want = {"_attn_bwd_fused_kernel"} if keys == 66 else {"_attn_bwd_preprocess_kernel", "_attn_bwd_dq_kernel",
                                                          "_attn_bwd_dkdv_kernel"}
    assert {n for n in launched if "_bwd_" in n} == want, launched
    assert rel_err(fused[1], exact[1]) > factor * rel_err(eager[1], exact[1])


@pytest.mark.parametrize("L", [5, 70], ids=["one-key-block", "two-key-blocks"])
def test_backward_delta_setting_is_checked(monkeypatch, L):
    """A misspelt ``BACKWARD_DELTA`` is refused at the backward's launch, naming the setting, also
    where every key fits one block and the setting would change nothing."""
    monkeypatch.setattr(A, "BACKWARD_DELTA", "prob")
    q, k, v = (torch.randn(1, L, 1, 16, device=DEVICE, dtype=torch.float16, requires_grad=True) for _ in range(3))
    out = A.attention(q, k, v, torch.tensor([L], device=DEVICE))
    with pytest.raises(ValueError, match="BACKWARD_DELTA must be"):
        out.sum().backward()


@pytest.mark.parametrize("tile,want", [((16, 4), (16, 4)), ((128, 2), (32, 2))],
                         ids=["16-keys-4-warps", "128-keys-2-warps"])
def test_fused_bwd_tile_setting_changes_the_tiles_alone(monkeypatch, tile, want):
    """``FUSED_BWD_TILE`` (kept for measurement: benchmark provider ``fused-narrow``) gives the
    single-query-block backward its key tile, capped at the default's (32 keys here: fp32), and its
    warps, and the gradients stay the default's within rounding (fp32; 54 queries and keys: two key
    blocks at 32, four at 16, with the delta pass; an empty row and a partial one); a malformed
    value is refused naming the setting."""
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(3, 54, 2, 16, generator=g) for _ in range(4)]
    lengths = torch.tensor([54, 0, 31], device=DEVICE)

    def run():
        q, k, v = (t.to(DEVICE).requires_grad_() for t in base[:3])
        A.attention(q, k, v, lengths, rope_base=BASE).backward(base[3].to(DEVICE))
        return [t.grad for t in (q, k, v)]

    default = run()
    configs, real = [], A._fused_bwd_config
    monkeypatch.setattr(A, "_fused_bwd_config", lambda *a: configs.append(real(*a)) or configs[-1])
    monkeypatch.setattr(A, "FUSED_BWD_TILE", tile)
    for name, got, ref in zip(("dq", "dk", "dv"), run(), default):
        assert_rel(got, ref, FP32_TOL, name)
    assert configs and {c[1:] for c in configs} == {want}, configs
    for bad in [(24, 4), (16, 3), [16, 4], 16, (16, 4, 2), (16.0, 4)]:
        monkeypatch.setattr(A, "FUSED_BWD_TILE", bad)
        with pytest.raises(ValueError, match="FUSED_BWD_TILE must be"):
            run()


@pytest.mark.parametrize("name,shape", [("k_weight", (8, 4)), ("v_weight", (4, 8)), ("o_weight", (8, 7)),
                                        ("k_bias", (1,)), ("v_bias", (1,)), ("o_bias", (3,))])
def test_pooled_attention_checks_its_projections(name, shape):
    """A projection of another shape is refused, naming it. Before, the fold kernel read [d, d] or
    [d] from the smaller tensor, past its end: values like 1e20 or NaN, different in every process
    (an error-handling audit, 2026-11-28); the module got there through a swapped-in projection."""
    d, H = 8, 2
    s, lengths, query = torch.randn(3, 5, d, device=DEVICE), torch.tensor([5, 2, 0], device=DEVICE), torch.randn(2, d, device=DEVICE)
    params = dict(k_weight=torch.randn(d, d), k_bias=torch.randn(d), v_weight=torch.randn(d, d), v_bias=torch.randn(d),
                  o_weight=torch.randn(d, d), o_bias=torch.randn(d))
    params[name] = torch.randn(*shape)
    params = {k: v.to(DEVICE) for k, v in params.items()}
    with pytest.raises(ValueError, match=rf"pooled_attention: {name} must be a floating-point tensor"):
        A.pooled_attention(s, lengths, query, *params.values(), H)
    if name.startswith("v_weight"):
        module = PoolingMultiHeadAttention(2, d, H, backend="triton").to(DEVICE)
        module.v_proj = torch.nn.Linear(d, 4).to(DEVICE)
        with pytest.raises(ValueError, match="v_weight must be"):
            module(s, lengths)


def test_k_and_v_are_one_tensor_only_when_they_are_the_same_object():
    """The backward writes dk + dv as one gradient only for the same tensor object given as k and
    v: two autograd inputs over the same data (``x`` and ``x.detach()``) keep their own gradients
    (x gets dk alone). The forward's one-load check (``_one_tensor``) also refuses views of the same
    data pointer with other strides or another dtype, and such a view gives the reference's output."""
    gen = torch.Generator().manual_seed(3)
    B, L, H, dh = 2, 9, 16, 16  # H == dh: a transposed view has k's shape and data pointer
    q64, x64 = torch.randn(B, L, H, dh, generator=gen), torch.randn(B, L, H, dh, generator=gen)
    lengths = torch.tensor([L, 4], device=DEVICE)
    grads = []
    for fn in (A.attention, R.attention):
        q, x = (t.to(DEVICE).detach().requires_grad_() for t in (q64, x64))  # fresh leaves each time
        fn(q, x, x.detach(), lengths, rope_base=None).sum().backward()
        grads.append(x.grad)
    assert_rel(grads[0], grads[1], FP32_TOL, "dk with v = k.detach()")

    x = x64.to(DEVICE)
    assert A._one_tensor(x, x) and A._one_tensor(x, x.view(x.shape))
    assert not A._one_tensor(x, x.transpose(2, 3))
    assert not A._one_tensor(x, torch.as_strided(x.view(torch.float16), x.shape, x.stride()))
    q = q64.to(DEVICE)
    assert_rel(A.attention(q, x, x.transpose(2, 3), lengths), R.attention(q, x, x.transpose(2, 3), lengths),
               FP32_TOL, "v a transposed view of k")


def _packed_nodes(out):
    """The names of the autograd nodes ``out`` reaches."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(n for n, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


def test_attention_packed_takes_the_packed_op_only_where_it_may():
    """``attention_packed`` (what the module calls with its projection) takes the packed op for a
    contiguous qkv that needs a gradient; without a gradient, or for a strided qkv, the generic op
    on its slices (same results)."""
    B, L, H, dh = 2, 5, 2, 16
    lin = torch.nn.Linear(8, 3 * H * dh).to(DEVICE)
    lengths = torch.tensor([5, 2], device=DEVICE)
    qkv = lin(torch.randn(B, L, 8, device=DEVICE)).view(B, L, 3, H, dh)
    out = A.attention_packed(qkv, lengths, rope_base=BASE)
    assert "_AttentionQKVBackward" in _packed_nodes(out)
    want = R.attention(*qkv.unbind(2), lengths, rope_base=BASE)
    assert_rel(out, want, FP32_TOL, "packed")
    strided = torch.randn(B, 3, L, H, dh, device=DEVICE, requires_grad=True).transpose(1, 2)
    out = A.attention_packed(strided, lengths, rope_base=BASE)
    assert "_AttentionQKVBackward" not in _packed_nodes(out) and "_AttentionBackward" in _packed_nodes(out)
    with torch.no_grad():
        assert_rel(A.attention_packed(qkv, lengths, rope_base=BASE), want, FP32_TOL, "no grad")
    with pytest.raises(ValueError, match="qkv must be"):
        A.attention_packed(qkv[:, :, :2], lengths)


def test_slices_of_a_packed_tensor_keep_their_own_gradients():
    """:func:`attention` on the three slices of one packed tensor differentiates through the slices:
    ``autograd.grad`` with respect to q works, hooks on q and ``retain_grad`` on k see their
    gradients, and slices made leaves get theirs, as with the reference. (It once recognised such
    slices and sent the gradient to the packed tensor past them.)"""
    B, L, H, dh = 2, 5, 2, 16
    lengths = torch.tensor([5, 3], device=DEVICE)
    grads = {}
    for name, fn in (("reference", R.attention), ("fused", A.attention)):
        x = torch.randn(B, L, 3 * H * dh, device=DEVICE, generator=None).requires_grad_() if name == "reference" \
            else grads["x"].detach().clone().requires_grad_()
        grads.setdefault("x", x.detach())
        q, k, v = (x * 1).view(B, L, 3, H, dh).unbind(2)
        fired = []
        q.register_hook(lambda g: fired.append(g))
        k.retain_grad()
        out = fn(q, k, v, lengths, rope_base=BASE)
        (dq,) = torch.autograd.grad(out.sum(), [q], retain_graph=True)
        out.sum().backward()
        assert fired and k.grad is not None, name
        leaf = x.detach().view(B, L, 3, H, dh)
        lq, lk, lv = (t.detach().requires_grad_() for t in leaf.unbind(2))
        fn(lq, lk, lv, lengths, rope_base=BASE).sum().backward()
        grads[name] = (dq, k.grad, lq.grad, lk.grad, lv.grad)
    for name, a, b in zip(["dq", "k.grad", "leaf q", "leaf k", "leaf v"], grads["fused"], grads["reference"]):
        assert a is not None, name
        assert_rel(a, b, FP32_TOL, name)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_packed_and_generic_ops_agree_bitwise(dtype, monkeypatch):
    """One packed tensor through the packed op and through the generic op on its slices gives
    identical results."""
    B, L, H, dh = 3, 21, 2, 32
    base = torch.randn(B, L, 3 * H * dh, device=DEVICE, dtype=dtype)
    lengths = torch.tensor([21, 0, 9], device=DEVICE)
    grad = torch.randn(B, L, H, dh, device=DEVICE, dtype=dtype)
    results = []
    for pack in (True, False):
        monkeypatch.setattr(A, "PACK_QKV", pack)
        leaf = base.clone().requires_grad_()
        x = leaf * 1  # a non-leaf, as a Linear output is
        out = A.attention_packed(x.view(B, L, 3, H, dh), lengths, causal=True, rope_base=BASE)
        assert ("_AttentionQKVBackward" in _packed_nodes(out)) == pack
        out.backward(grad)
        results.append((out.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# ----------------------------------------------------------------------------- modules
def _module_pair(cls, args, dtype, backend_kw=None):
    torch.manual_seed(0)
    eager = cls(*args, backend="eager", **(backend_kw or {})).to(DEVICE, dtype)
    fused = cls(*args, backend="triton", **(backend_kw or {})).to(DEVICE, dtype)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def _module_run(module, s, lengths, grad):
    s = s.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = module(s, lengths)
    out.backward(grad.to(out.dtype))
    return out.detach(), s.grad, {n: p.grad for n, p in module.named_parameters()}


def _compare_modules(cls, args, kw, B, L, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    d = args[-2] if cls is RotaryMultiHeadAttention else args[1]
    s = torch.randn(B, L, d, generator=gen, dtype=torch.float64).to(DEVICE)
    lengths = random_lengths(B, L, generator=gen).to(DEVICE)
    eager, fused = _module_pair(cls, args, dtype, kw)
    ref = cls(*args, backend="eager", **(kw or {})).to(DEVICE, torch.float64)
    ref.load_state_dict(eager.state_dict())
    n_out = args[0] if cls is PoolingMultiHeadAttention else L
    grad = torch.randn(B, n_out, d, generator=gen, dtype=torch.float64).to(DEVICE)
    o_f, ds_f, g_f = _module_run(fused, s.to(dtype), lengths, grad)
    o_e, ds_e, g_e = _module_run(eager, s.to(dtype), lengths, grad)
    with monkeypatch.context() as mp:
        # the float64 module evaluation goes through attention64 (see its docstring for why)
        mp.setattr(R, "attention", attention64)
        o_r, ds_r, g_r = _module_run(ref, s, lengths, grad)
    pairs = [("out", o_f, o_e, o_r), ("d_input", ds_f, ds_e, ds_r)]
    pairs += [(f"grad {n}", g_f[n], g_e[n], g_r[n]) for n in g_e]
    assert set(g_f) == set(g_e)
    scale = float(ds_r.norm())
    for name, f, e, r in pairs:
        if float(r.norm()) <= 1e-9 * scale:
            # zero in exact arithmetic (the key bias: softmax is shift-invariant), so only rounding noise
            # is left and a relative error means nothing: bound the absolute error by the input grad's scale
            f_err, e_err = float((f.double() - r).norm()), float((e.double() - r).norm())
            bound = FP32_TOL * scale if dtype == torch.float32 else max(2 * e_err, 1e-3 * scale)
            assert f_err <= bound, f"{name}: absolute error {f_err:.3e} > {bound:.3e} on a gradient that is exactly 0"
        elif dtype == torch.float32:
            assert_rel(f, e, FP32_TOL, name + " (triton vs eager)")
        else:
            assert_lowp(f, e, r, name)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("d_model,heads,causal", [(64, 4, False), (24, 2, True)])
def test_rotary_module_triton_matches_eager(d_model, heads, causal, dtype, monkeypatch):
    _compare_modules(RotaryMultiHeadAttention, (d_model, heads), {"causal": causal}, B=3, L=13, dtype=dtype,
                     monkeypatch=monkeypatch)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("num_queries,d_model,heads", [(2, 64, 4), (3, 40, 2), (19, 24, 3)])
def test_pma_module_triton_matches_eager(num_queries, d_model, heads, dtype, monkeypatch):
    _compare_modules(PoolingMultiHeadAttention, (num_queries, d_model, heads), None, B=3, L=11, dtype=dtype,
                     monkeypatch=monkeypatch)


@pytest.mark.parametrize("d_model,heads,L,lengths", [(16, 2, 0, [3, 0]), (16, 2, 5, [9, 0, 5]), (144, 4, 6, [6, 2])],
                         ids=["no-keys-at-all", "lengths-past-L", "wider-than-the-kernel"])
def test_pma_module_edges_match_eager(d_model, heads, L, lengths):
    """The folded fused PMA where its algebra has edges: an empty sequence with lengths > 0 (the
    probabilities sum to 0, so b_v must not reach the output), lengths beyond L (clamped), and
    ``d_model > 128`` (the unfolded path, so that the kernel, whose heads stop at 128, still runs
    it rather than its eager fallback). fp32, against eager."""
    from interformer.profiling import triton_launches

    eager, fused = _module_pair(PoolingMultiHeadAttention, (2, d_model, heads), torch.float32, None)
    s = torch.randn(len(lengths), L, d_model, device=DEVICE, dtype=torch.float64)
    lengths = torch.tensor(lengths, device=DEVICE)
    grad = torch.randn(len(lengths), 2, d_model, device=DEVICE, dtype=torch.float64)
    with triton_launches() as launches:
        o_f, ds_f, g_f = _module_run(fused, s.float(), lengths, grad)
    if L:  # (with no key at all the kernel has nothing to do)
        assert launches["_attn_fwd_kernel"] == 1, dict(launches)
    o_e, ds_e, g_e = _module_run(eager, s.float(), lengths, grad)
    assert_rel(o_f, o_e, FP32_TOL, "out")
    if L:
        assert_rel(ds_f, ds_e, FP32_TOL, "d_input")
    scale = max(float(g.norm()) for g in g_e.values())
    for name in g_e:
        torch.testing.assert_close(g_f[name], g_e[name], rtol=FP32_TOL, atol=FP32_TOL * scale, msg=name)


class ResultSizes(TorchDispatchMode):
    """``(op, dtype)`` of every non-view aten result whose element count ``keep`` accepts."""

    def __init__(self, keep):
        super().__init__()
        self.keep, self.made = keep, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and isinstance(out, torch.Tensor) and self.keep(out.numel()):
            self.made.append((str(func), out.dtype))
        return out


def _pooled_masters(gen, B, L, d, nq):
    """Float64 masters of a pooled_attention call: s ``[B, L, d]`` and the parameters in signature
    order (query, then weight and bias of the k, v and o projections)."""
    s64 = torch.randn(B, L, d, generator=gen, dtype=torch.float64)
    params64 = [torch.randn(nq, d, generator=gen, dtype=torch.float64) / 5]
    for _ in range(3):
        params64 += [torch.randn(d, d, generator=gen, dtype=torch.float64) / 5, torch.randn(d, generator=gen, dtype=torch.float64)]
    return s64, params64


POOLED_NAMES = ["out", "ds", "query", "k_weight", "k_bias", "v_weight", "v_bias", "o_weight", "o_bias"]


def _pooled_run(fn, s64, lengths, params64, heads, dtype, grad):
    """Output and the gradients of s and every parameter of ``fn`` (a pooled_attention) on copies
    of the float64 masters in ``dtype``; ``grad`` None means ``out.sum()`` (a stride-0 gradient)."""
    s = s64.to(DEVICE, dtype).detach().requires_grad_()  # a leaf of its own, also in float64
    params = [p.to(DEVICE, dtype).detach().requires_grad_() for p in params64]
    out = fn(s, lengths, *params, heads)
    (out.sum() if grad is None else (out * grad.to(DEVICE, dtype)).sum()).backward()
    return [out.detach(), s.grad, *(p.grad for p in params)]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("L,lengths,grad,H", [(11, [11, 0, 4], "random", 2), (11, [5, 20, 1], "sum", 2),
                                              (0, [2, 0, 1], "random", 2), (9, [4], "random", 1)],
                         ids=["lengths-0-and-full", "past-L-stride0-grad", "no-keys", "B1-one-head"])
def test_pooled_attention_paths_agree(L, lengths, grad, H, dtype, monkeypatch):
    """The fused PMA op (``kernels.attention.pooled_attention``, folded projections): its eager
    entry, one autograd node whose backward is written out by hand, and the same op built from the
    attention custom op (its registered autograd formula) and aten ops, as torch.compile traces it
    (``_pooled_traced``, run here with the custom op forced), both against the reference (the
    unfolded projections): output, ds and every parameter's gradient. 3 queries, d = 24 in 2 heads
    of 12 or one of 24 (a padded kernel head of 32). fp32 within FP32_TOL of float64, fp16 by the
    DESIGN §5 rule. k_bias: exact zeros on both fused paths (the reference's is rounding noise
    around its true value, 0). Also: the no-grad call returns the eager entry's output bitwise, and
    a second-order gradient raises."""
    gen = torch.Generator().manual_seed(1000 + L + len(grad) + H)
    B, d, nq = len(lengths), 24, 3
    s64, params64 = _pooled_masters(gen, B, L, d, nq)
    lengths = torch.tensor(lengths, device=DEVICE)
    g = None if grad == "sum" else torch.randn(B, nq, d, generator=gen, dtype=torch.float64)

    lean = _pooled_run(A.pooled_attention, s64, lengths, params64, H, dtype, g)
    with monkeypatch.context() as m:
        m.setattr(A, "tracing", lambda tensors: True)  # attention() takes its custom op
        traced = _pooled_run(A._pooled_traced, s64, lengths, params64, H, dtype, g)
    eager = _pooled_run(R.pooled_attention, s64, lengths, params64, H, dtype, g)
    ref64 = _pooled_run(R.pooled_attention, s64, lengths, params64, H, torch.float64, g)
    for name, a, t, e, r in zip(POOLED_NAMES, lean, traced, eager, ref64):
        if name == "k_bias":
            assert torch.equal(a, torch.zeros_like(a)) and torch.equal(t, torch.zeros_like(t)), name
            continue
        if L == 0 and name == "ds":
            continue  # [B, 0, d]
        for path, x in (("eager entry", a), ("traced", t)):
            assert x.dtype == dtype and torch.isfinite(x).all(), f"{name} ({path})"
            if dtype == torch.float32:
                assert_rel(x, r, FP32_TOL, f"{name} ({path}) vs float64")
            else:
                assert_lowp(x, e, r, f"{name} ({path})")
    for b, n in enumerate(lengths.tolist()):
        if n == 0:
            assert torch.equal(lean[0][b], torch.zeros_like(lean[0][b])), "a row without keys is not exactly zero"

    with torch.no_grad():
        params = [p.to(DEVICE, dtype) for p in params64]
        assert torch.equal(A.pooled_attention(s64.to(DEVICE, dtype), lengths, *params, H), lean[0])
    s = s64.to(DEVICE, dtype).requires_grad_()
    (gs,) = torch.autograd.grad(A.pooled_attention(s, lengths, *params, H).sum(), s, create_graph=True)
    torch.testing.assert_close(gs, _pooled_run(A.pooled_attention, s64, lengths, params64, H, dtype, None)[1])
    if L:
        with pytest.raises(RuntimeError, match="no second-order gradient"):
            gs.sum().backward()


def test_pooled_attention_on_an_empty_batch():
    """B = 0: an empty output, and zero gradients for every parameter (the kernels have no sample
    to reduce the shared queries' gradient over)."""
    d, H, nq = 16, 2, 2
    s = torch.randn(0, 5, d, device=DEVICE, requires_grad=True)
    params = [torch.randn(nq, d, device=DEVICE)] + [torch.randn(*shape, device=DEVICE) for _ in range(3)
                                                     for shape in ((d, d), (d,))]
    params = [p.requires_grad_() for p in params]
    out = A.pooled_attention(s, torch.zeros(0, dtype=torch.long, device=DEVICE), *params, H)
    assert out.shape == (0, nq, d)
    out.sum().backward()
    assert s.grad.shape == s.shape
    for p in params:
        assert torch.equal(p.grad, torch.zeros_like(p)), p.shape


@pytest.mark.parametrize("packed", [False, True], ids=["generic", "packed"])
@pytest.mark.parametrize("rope", [None, 10000.0], ids=["plain", "rotary"])
def test_attention_under_autocast_gives_the_autocast_dtype(rope, packed):
    """fp32 q, k, v under a 16-bit autocast (fp16 here, bf16 on a GPU): the output is in the
    autocast dtype, as the reference's einsums give it (and as this function's own wide-head
    fallback did), within DESIGN §5's low-precision rule against float64; the gradients come back
    in fp32. Until this test the kernels ran such inputs in fp32 and returned fp32 (a review's find)."""
    low = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
    gen = torch.Generator().manual_seed(17)
    B, L, H, dh = 3, 9, 2, 16
    qkv64 = torch.randn(B, L, 3, H, dh, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([L, 0, 5], device=DEVICE)
    g = torch.randn(B, L, H, dh, generator=gen, dtype=torch.float64)

    def run(fn):
        qkv = qkv64.to(DEVICE, torch.float32).requires_grad_()
        with torch.autocast(DEVICE.type, dtype=low):
            out = fn(qkv)
        (out.float() * g.to(DEVICE, torch.float32)).sum().backward()
        return out.detach(), qkv.grad

    fused = A.attention_packed if packed else (lambda qkv, *a, **k: A.attention(*qkv.unbind(2), *a, **k))
    out, dqkv = run(lambda qkv: fused(qkv, lengths, rope_base=rope))
    eager_out, eager_dqkv = run(lambda qkv: R.attention(*qkv.unbind(2), lengths, rope_base=rope))
    q64 = qkv64.to(DEVICE).requires_grad_()
    ref = attention64(*q64.unbind(2), lengths, rope_base=rope)
    (ref * g.to(DEVICE)).sum().backward()
    assert out.dtype == eager_out.dtype == low and dqkv.dtype == torch.float32
    assert_lowp(out, eager_out, ref.detach(), "out")
    assert_lowp(dqkv, eager_dqkv, q64.grad, "dqkv")


def test_one_fp32_tensor_as_k_and_v_under_autocast_stays_one():
    """fp32 q and one fp32 tensor s given as both k and v (``attention(q, s, s, ...)``, the folded
    PMA's call) under a 16-bit autocast: the cast to the autocast dtype (``_autocast_qkv``) makes one
    copy of s, not two, so the forward and backward kernels still take k and v as one tensor
    (``SAME_KV``: one load a key tile, dk + dv stored as one gradient); cast one by one they lost it.
    Output and s's gradient within DESIGN §5's low-precision rule against float64."""
    from interformer.kernel_audit import record_launches

    low = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
    gen = torch.Generator().manual_seed(19)
    B, L, H, dh = 3, 9, 2, 16
    q64, s64 = torch.randn(1, 2, H, dh, generator=gen, dtype=torch.float64), torch.randn(B, L, H, dh, generator=gen,
                                                                                           dtype=torch.float64)
    g = torch.randn(B, 2, H, dh, generator=gen, dtype=torch.float64).to(DEVICE)
    lengths = torch.tensor([L, 0, 5], device=DEVICE)

    def run(fn):
        q, s = (t.to(DEVICE, torch.float32).requires_grad_() for t in (q64, s64))
        with torch.autocast(DEVICE.type, dtype=low):
            out = fn(q, s, s, lengths, mask_queries=False)
        (out.float() * g.float()).sum().backward()
        return out.detach(), s.grad

    with record_launches() as cases:  # (the launches skipped: their constants recorded)
        run(A.attention)
    kernels = [(c["kernel"], c["consts"].get("SAME_KV")) for c in cases if c["module"] == A.__name__]
    assert kernels and all(same for _, same in kernels), kernels
    out, ds = run(A.attention)
    eager_out, eager_ds = run(R.attention)
    q, s = (t.to(DEVICE).requires_grad_() for t in (q64, s64))
    ref = attention64(q, s, s, lengths, mask_queries=False)
    (ref * g).sum().backward()
    assert out.dtype == eager_out.dtype == low and ds.dtype == torch.float32
    assert_lowp(out, eager_out, ref.detach(), "out")
    assert_lowp(ds, eager_ds, s.grad, "ds")


@pytest.mark.parametrize("nq,H", [(2, 2), (33, 4)], ids=["fused-backward", "general-backward"])
def test_pooled_attention_under_autocast_reads_the_sequence_as_it_is(nq, H):
    """Under autocast (fp16 here, bf16 on a GPU) with an fp32 sequence (a standalone module's input;
    in the model the sequence arrives in the autocast dtype): the fused PMA hands s to the kernels
    uncast (they round each tile to the folded queries' dtype as they load it), so no 16-bit copy of
    s is made and ds comes back in fp32 from the kernel, with no cast after it. Output and every
    gradient against the eager op under the same autocast and float64 (DESIGN §5 low-precision
    rule), for the eager entry and the traced build; with ``nq * H`` = 4 folded queries (the
    single-query-block backward) and 132 (the general dk/dv and dq kernels)."""
    low = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
    gen = torch.Generator().manual_seed(7)
    B, L, d = 3, 13, 32
    s64, params64 = _pooled_masters(gen, B, L, d, nq)
    lengths = torch.tensor([L, 0, 6], device=DEVICE)
    g = torch.randn(B, nq, d, generator=gen, dtype=torch.float64)

    def run(fn, record=False):
        s = s64.to(DEVICE, torch.float32).requires_grad_()
        params = [p.to(DEVICE, torch.float32).requires_grad_() for p in params64]
        rec_f, rec_b = (ResultSizes(lambda n: n == B * L * d) for _ in range(2))  # as large as s
        with torch.autocast(DEVICE.type, dtype=low), (rec_f if record else contextlib.nullcontext()):
            out = fn(s, lengths, *params, H)
        with rec_b if record else contextlib.nullcontext():
            (out.float() * g.to(DEVICE, torch.float32)).sum().backward()
        return [out.detach(), s.grad, *(p.grad for p in params)], rec_f.made, rec_b.made

    from interformer.profiling import triton_launches

    with triton_launches(run=False):  # what the aten ops make (the interpreter's own copies left out)
        _, fwd_made, bwd_made = run(A.pooled_attention, record=True)
    assert fwd_made == [], f"the forward made sequence-sized tensors (a cast copy of s?): {fwd_made}"
    assert [dt for _, dt in bwd_made] == [torch.float32], f"the backward made {bwd_made}: want ds alone, in fp32"
    lean, _, _ = run(A.pooled_attention)
    traced, _, _ = run(A._pooled_traced)
    eager, _, _ = run(R.pooled_attention)
    ref64 = _pooled_run(R.pooled_attention, s64, lengths, params64, H, torch.float64, g)
    assert lean[0].dtype == low and lean[1].dtype == torch.float32
    for name, a, t, e, r in zip(POOLED_NAMES, lean, traced, eager, ref64):
        if name == "k_bias":
            assert torch.equal(a, torch.zeros_like(a)), name
            continue
        assert_lowp(a, e, r, f"{name} (eager entry)")
        assert_lowp(t, e, r, f"{name} (traced)")


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_fused_pma_reads_the_sequence_once(backend):
    """DESIGN §4, PMA "reads the sequence once": on the fused path the key and value projections
    are folded into the queries and the output matrix (``PoolingMultiHeadAttention`` docstring),
    so the forward is one attention launch over ``s`` itself (and one launch that folds the
    parameters) and makes no tensor as large as the sequence (K and V never exist), and the backward
    is the attention backward and the fold's. The eager path, which does project K and V, is the
    check that the recorder sees them."""
    from interformer.profiling import triton_launches

    B, L, d, H, nq = 3, 33, 32, 2, 2  # the folded weight [H*d, d] is smaller than s, as at DESIGN's shapes

    torch.manual_seed(0)
    module = PoolingMultiHeadAttention(nq, d, H, backend=backend).to(DEVICE)
    s = torch.randn(B, L, d, device=DEVICE, requires_grad=True)
    lengths = torch.tensor([0, L, 7], device=DEVICE)
    with triton_launches(run=False) as launches:
        with ResultSizes(lambda n: n >= B * L * d) as fwd:
            out = module(s, lengths)
        forward_launches = dict(launches)
        launches.clear()
        out.sum().backward()
    if backend == "eager":
        assert len(fwd.made) >= 2, fwd.made  # K and V
        return
    assert fwd.made == [], f"the fused forward made sequence-sized tensors: {fwd.made}"
    assert forward_launches == {"_attn_fwd_kernel": 1, "_pma_fold_kernel": 1}
    assert dict(launches) == {"_attn_bwd_fused_kernel": 1, "_pma_fold_bwd_kernel": 1}
    assert s.grad is not None and all(p.grad is not None for p in module.parameters())


def test_attention_modules_inside_the_model_match_eager(monkeypatch):
    """InterFormerCTR with only its attention modules (Sequence Arch MHA, Cross Arch PMA) on Triton,
    against a float64 evaluation of the same model, a zero-length row included: the loss within
    FP32_TOL; every parameter gradient within FP32_TOL relative, or within 2x the eager fp32 model's
    error, or -- for gradients made tiny by cancellation (the PMA query and key projection at
    near-uniform attention, ~1e-4 of their module's other gradients) -- within FP32_TOL * 1e-2 of the
    largest gradient of the same attention module."""
    import copy

    from interformer import InterFormerConfig, InterFormerCTR
    from interformer.data import make_synthetic

    cfg = InterFormerConfig(backend="eager", d_model=32, num_heads=2, num_layers=2, max_seq_len=9, pffn_hidden=16,
                            head=(16,), dcn_rank=4)
    torch.manual_seed(0)
    eager = InterFormerCTR(cfg).to(DEVICE)
    fused = copy.deepcopy(eager)
    ref = copy.deepcopy(eager).double()
    switched = 0
    for mod in fused.modules():
        if isinstance(mod, (RotaryMultiHeadAttention, PoolingMultiHeadAttention)):
            mod.backend = "triton"
            switched += 1
    assert switched == 2 * cfg.num_layers + 1  # MHA + PMA per block, PMA of the final Cross Arch
    batch = make_synthetic(5, cfg, seed=3)
    batch.lengths[1] = 0
    batch.seq[1] = 0
    batch = batch.to(DEVICE)
    results = []
    for model in (eager, fused, ref):
        inputs = list(batch.inputs())
        if model is ref:
            inputs[0] = inputs[0].double()
        with monkeypatch.context() as mp:
            if model is ref:
                mp.setattr(R, "attention", attention64)
            loss = InterFormerCTR.loss(model(*inputs), batch.label.to(inputs[0].dtype))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_e, g_e), (loss_f, g_f), (loss_r, g_r) = results
    assert_rel(loss_f, loss_r, FP32_TOL, "loss")
    assert g_e.keys() == g_f.keys() == g_r.keys()
    attn_names = [n for n, m in fused.named_modules()
                  if isinstance(m, (RotaryMultiHeadAttention, PoolingMultiHeadAttention))]

    def group(param_name):  # the attention module owning the parameter, or the parameter's own module
        return next((n for n in attn_names if param_name.startswith(n + ".")), param_name.rsplit(".", 1)[0])

    module_scale = {}  # largest gradient norm within each group
    for name, g in g_r.items():
        module_scale[group(name)] = max(module_scale.get(group(name), 0.0), float(g.norm()))
    for name in g_r:
        r = g_r[name]
        f_err, e_err = float((g_f[name].double() - r).norm()), float((g_e[name].double() - r).norm())
        # relative to the gradient itself (FP32_TOL, or 2x the eager fp32 error), or, for gradients that are
        # tiny by cancellation (PMA query / key projection at near-uniform attention), to the largest gradient
        # of the same attention module
        bound = max(FP32_TOL * float(r.norm()), 2 * e_err, FP32_TOL * 1e-2 * module_scale[group(name)])
        assert f_err <= bound, f"grad {name}: error {f_err:.3e} > {bound:.3e} (eager fp32 error {e_err:.3e})"


# ----------------------------------------------------------------------------- torch.library
@pytest.mark.parametrize("shared,rope,causal", [(False, True, False), (True, False, True)])
def test_opcheck(shared, rope, causal):
    B, L, H, dh = 2, 5, 2, 16
    q = torch.randn(1 if shared else B, 3 if shared else L, H, dh, device=DEVICE, requires_grad=True)
    k = torch.randn(B, L, H, dh, device=DEVICE, requires_grad=True)
    v = torch.randn(B, L, H, dh, device=DEVICE, requires_grad=True)
    lengths = torch.tensor([L, 2], device=DEVICE)
    base = BASE if rope else None
    torch.library.opcheck(torch.ops.interformer.attention_fwd.default,
                          (q, k, v, lengths, causal, base, True, not shared, None))
    out, lse = torch.ops.interformer.attention_fwd(q.detach(), k.detach(), v.detach(), lengths, causal, base, True,
                                                   not shared, 0.5)
    torch.library.opcheck(torch.ops.interformer.attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, lengths,
                           causal, base, True, not shared, 0.5))
    if rope:  # the table a traced call passes (see test_compiled_calls_build_their_own_rotary_table)
        table = A.rope_table(L, dh, BASE, k.device)
        torch.library.opcheck(torch.ops.interformer.attention_fwd.default,
                              (q, k, v, lengths, causal, base, True, not shared, None, table))
        torch.library.opcheck(torch.ops.interformer.attention_bwd.default,
                              (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, lengths,
                               causal, base, True, not shared, 0.5, table))


@NO_POISON
def test_shared_queries_over_an_empty_batch_opcheck_and_compile():
    """Shared queries (q ``[1, ...]``, PMA's folded ones) over an empty batch: the backward's dq has
    q's shape, as its fake says. It was ``[0, ...]`` (the shared-query reduction was skipped at B = 0),
    which opcheck's fake-tensor test caught, and a compiled ``pooled_attention`` failed its backward
    on an empty batch ("shape '[2, 2, 8]' is invalid for input of size 0"; an opcheck fuzzing helper's
    case)."""
    q = torch.randn(1, 3, 2, 4, device=DEVICE)
    k, v = torch.randn(0, 5, 2, 4, device=DEVICE), torch.randn(0, 5, 2, 4, device=DEVICE)
    lengths = torch.zeros(0, dtype=torch.long, device=DEVICE)
    flags = (False, None, True, True, None)
    out, stats = torch.ops.interformer.attention_fwd(q, k, v, lengths, *flags)
    torch.library.opcheck(torch.ops.interformer.attention_bwd.default,
                          (torch.randn_like(out), q, k, v, out, stats, lengths, *flags))
    d, H = 8, 2
    leaves = [torch.randn(*shape, device=DEVICE).requires_grad_()
              for shape in ((0, 5, d), (2, d), (d, d), (d,), (d, d), (d,), (d, d), (d,))]

    def f(s, *params):
        return A.pooled_attention(s, lengths, *params, H).sum()

    torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves).backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in leaves)


def test_opcheck_packed():
    B, L, H, dh = 2, 5, 2, 16
    qkv = torch.randn(B, L, 3, H, dh, device=DEVICE, requires_grad=True)
    lengths = torch.tensor([L, 2], device=DEVICE)
    torch.library.opcheck(torch.ops.interformer.attention_qkv_fwd.default, (qkv, lengths, False, BASE, True, True, None))
    out, lse = torch.ops.interformer.attention_qkv_fwd(qkv.detach(), lengths, True, BASE, True, True, None)
    torch.library.opcheck(torch.ops.interformer.attention_qkv_bwd.default,
                          (torch.randn_like(out), qkv.detach(), out, lse, lengths, True, BASE, True, True, None))


@NO_POISON
def test_compile_fullgraph_traces_forward_and_backward():
    """torch.compile(fullgraph=True) through the custom ops (eager backend: Inductor is a GPU test)."""
    B, L, H, dh = 2, 6, 2, 16
    qkv = torch.randn(B, L, 3, H, dh, device=DEVICE, requires_grad=True)
    lengths = torch.tensor([6, 3], device=DEVICE)

    def f(x):
        q, k, v = x.unbind(2)
        return A.attention(q, k, v, lengths, rope_base=BASE).square().sum()

    torch.compile(f, fullgraph=True, backend="aot_eager")(qkv).backward()
    g_c = qkv.grad.clone()
    qkv.grad = None
    f(qkv).backward()
    assert_rel(g_c, qkv.grad, FP32_TOL, "compiled grad")


@NO_POISON
def test_compiled_calls_build_their_own_rotary_table(monkeypatch):
    """A traced call passes a rotary table built in the graph, so compiled code never fills the
    module-level cache: a table cached during ``torch.compile(mode="reduce-overhead")``'s warm-up
    would live in the CUDA-graph pool, which Inductor refuses ("tensor(s) in the cudagraph pool not
    tracked as outputs"; the H100 run of test_fused_model_under_compile_reduce_overhead). The eager
    entry does fill it (so this test can fail), and both give the same gradients."""
    monkeypatch.setattr(A, "_ROPE_TABLES", {})
    B, L, H, dh = 2, 6, 2, 16
    lengths = torch.tensor([6, 3], device=DEVICE)
    x = torch.randn(B, L, 3, H, dh, device=DEVICE)

    def f(t, packed):
        q, k, v = t.unbind(2) if packed else (u.contiguous() for u in t.unbind(2))
        return A.attention(q, k, v, lengths, rope_base=BASE).square().sum()

    for packed in (True, False):
        grads = []
        for fn in (torch.compile(f, fullgraph=True, backend="aot_eager"), f):
            t = x.clone().requires_grad_()
            fn(t, packed).backward()
            grads.append(t.grad)
            if fn is not f:
                assert A._ROPE_TABLES == {}, "compiled code filled the rotary-table cache"
        assert len(A._ROPE_TABLES) == 1  # the eager call
        assert_rel(grads[0], grads[1], FP32_TOL, f"compiled vs eager grad (packed={packed})")
        A._ROPE_TABLES.clear()


def test_custom_op_checks_a_given_rotary_table():
    B, L, H, dh = 2, 5, 2, 16
    q, k, v = (torch.randn(B, L, H, dh, device=DEVICE) for _ in range(3))
    lengths = torch.tensor([5, 2], device=DEVICE)
    good = A.rope_table(L, dh, BASE, q.device)
    out, _ = torch.ops.interformer.attention_fwd(q, k, v, lengths, False, BASE, True, True, None, good)
    ref, _ = torch.ops.interformer.attention_fwd(q, k, v, lengths, False, BASE, True, True, None)
    assert torch.equal(out, ref)  # the same formula as the cached table
    for bad in (good[:, : L - 1], good.double(), good[:, :, :-1], good.transpose(1, 2).contiguous()):
        with pytest.raises(ValueError, match="rope_table"):
            torch.ops.interformer.attention_fwd(q, k, v, lengths, False, BASE, True, True, None, bad)


# ----------------------------------------------------------------------------- eager entry vs custom op
LEAN_CASES = [
    # (id, shared, Lq, Lk, causal, rope_base, rope_q, mask_queries, sm_scale, requires_grad of q, k, v)
    ("self-rope-causal", False, 9, 9, True, BASE, True, True, None, (True, True, True)),
    ("pma-shared", True, 2, 11, False, None, True, False, None, (True, True, True)),
    ("cross-ropek-scale-k-only", False, 5, 11, False, BASE, False, True, 0.3, (False, True, False)),
    ("general-bwd-L129", False, 129, 129, False, BASE, True, True, None, (True, True, True)),
]


@pytest.mark.parametrize("case", LEAN_CASES, ids=lambda c: c[0])
def test_eager_entry_matches_custom_op_bitwise(case):
    """Outside tracing :func:`attention` runs the launchers through a plain autograd.Function (no
    custom-op dispatch); ``interformer::attention_fwd`` called directly (what torch.compile records)
    must give the very same output, softmax statistics and gradients, bit for bit, with the same dtypes and the same
    differentiable outputs; under no_grad the forward launcher alone gives the same output."""
    cid, shared, Lq, Lk, causal, rope_base, rope_q, mask_q, sm_scale, req = case
    B, H, dh = 3, 2, 16
    gen = torch.Generator().manual_seed(zlib.crc32(cid.encode()))
    masters = [torch.randn(1 if shared else B, Lq, H, dh, generator=gen), torch.randn(B, Lk, H, dh, generator=gen),
               torch.randn(B, Lk, H, dh, generator=gen)]
    lengths = torch.tensor([Lk, 0, max(Lk // 2, 1)], device=DEVICE)
    flags = (causal, rope_base, rope_q, mask_q, sm_scale)
    grad = torch.randn(B, Lq, H, dh, generator=gen).to(DEVICE)

    def go(fn):
        leaves = [m.to(DEVICE).clone().requires_grad_(r) for m, r in zip(masters, req)]
        out, lse = fn(*leaves, lengths, *flags)
        meta = (type(out.grad_fn).__name__, out.requires_grad, lse.requires_grad, lse.dtype)
        out.backward(grad)
        return out.detach(), lse.detach(), meta, [t.grad for t in leaves]

    lean = go(A._Attention.apply)
    op = go(torch.ops.interformer.attention_fwd)
    assert lean[2][0] == "_AttentionBackward" and op[2][0].startswith("GeneratedBackwardFor_interformer_attention")
    assert lean[2][1:] == op[2][1:] == (True, True, torch.float32)
    assert torch.equal(lean[0], op[0]) and torch.equal(lean[1], op[1])
    for name, a, b, r in zip(("dq", "dk", "dv"), lean[3], op[3], req):
        if not r:
            assert a is None and b is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{name}: eager entry and custom op differ"
        assert bool(a.abs().sum() > 0), name
    # the public function: autograd.Function with grad, the launcher alone without
    q, k, v = (m.to(DEVICE).clone().requires_grad_(r) for m, r in zip(masters, req))
    out = A.attention(q, k, v, lengths, *flags)
    assert type(out.grad_fn).__name__ == "_AttentionBackward" and torch.equal(out, op[0])
    with torch.no_grad():
        out_ng = A.attention(q, k, v, lengths, *flags)
    assert out_ng.grad_fn is None and not out_ng.requires_grad and torch.equal(out_ng, op[0])
    out_plain = A.attention(q.detach(), k.detach(), v.detach(), lengths, *flags)
    assert out_plain.grad_fn is None and torch.equal(out_plain, op[0])


@pytest.mark.parametrize("L", [13, 130])
def test_eager_entry_packed_matches_custom_op_bitwise(L):
    """The packed path: :func:`attention_packed` on the module's packed projection runs the packed
    launchers through a plain autograd.Function; ``interformer::attention_qkv_fwd`` called directly
    on the packed tensor gives the very same output, statistics and gradient (contiguous [B, L, 3, H, dh])."""
    B, H, dh = 3, 2, 16
    gen = torch.Generator().manual_seed(L)
    base = torch.randn(B, L, 3 * H * dh, generator=gen).to(DEVICE)
    lengths = torch.tensor([L, 0, L // 2], device=DEVICE)
    grad = torch.randn(B, L, H, dh, generator=gen).to(DEVICE)
    flags = (True, BASE, True, True, None)
    results = []
    for path in ("public", "lean", "op"):
        leaf = base.clone().requires_grad_()
        qkv = (leaf * 1).view(B, L, 3, H, dh)  # a non-leaf, as a Linear output is
        if path == "public":
            out = A.attention_packed(qkv, lengths, *flags)
            lse = None
        else:
            out, lse = (A._AttentionQKV.apply if path == "lean" else torch.ops.interformer.attention_qkv_fwd)(
                qkv, lengths, *flags)
            assert lse.requires_grad and lse.dtype == torch.float32
        grad_fn = type(out.grad_fn).__name__
        out.backward(grad)
        results.append((grad_fn, out.detach(), None if lse is None else lse.detach(), leaf.grad))
    (pub_fn, pub_out, _, pub_g), (lean_fn, lean_out, lean_lse, lean_g), (op_fn, op_out, op_lse, op_g) = results
    assert pub_fn == lean_fn == "_AttentionQKVBackward" and op_fn.startswith("GeneratedBackwardFor_interformer")
    assert torch.equal(pub_out, op_out) and torch.equal(lean_out, op_out) and torch.equal(lean_lse, op_lse)
    assert pub_g.dtype == op_g.dtype and torch.equal(pub_g, op_g) and torch.equal(lean_g, op_g)
    assert bool(op_g.abs().sum() > 0)
    with torch.no_grad():
        out_ng = A.attention_packed(base.view(B, L, 3, H, dh), lengths, *flags)
    assert out_ng.grad_fn is None and torch.equal(out_ng, op_out)


# ----------------------------------------------------------------------------- validation, harness
def test_invalid_inputs_raise_value_error():
    q = torch.randn(2, 5, 2, 16)
    lengths = torch.tensor([5, 3])
    with pytest.raises(ValueError, match="4-D"):
        A.attention(q[0], q, q, lengths)
    with pytest.raises(ValueError, match="same shape"):
        A.attention(q, q, q[:, :4], lengths)
    with pytest.raises(ValueError, match=r"\[B or 1"):
        A.attention(torch.randn(3, 5, 2, 16), q, q, lengths)
    with pytest.raises(ValueError, match="dtype"):
        A.attention(q.half(), q, q, lengths)
    with pytest.raises(ValueError, match="head dim"):
        x = torch.randn(2, 5, 1, 0)
        A.attention(x, x, x, lengths)
    with pytest.raises(ValueError, match="even head dim"):
        x = torch.randn(2, 5, 2, 5)
        A.attention(x, x, x, lengths, rope_base=BASE)
    with pytest.raises(ValueError, match="lengths"):
        A.attention(q, q, q, torch.tensor([5]))
    with pytest.raises(ValueError, match="integer"):
        A.attention(q, q, q, lengths.float())
    for bad in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sm_scale must be a finite nonzero"):
            A.attention(q, q, q, lengths, sm_scale=bad)
        with pytest.raises(ValueError, match="sm_scale must be a finite nonzero"):
            A.attention_packed(torch.stack([q, q, q], 2), lengths, sm_scale=bad)
    # scales whose fp32 |scale| * log2(e) is not a normal number (it rounded to zero in the kernels
    # and gave NaN: a review's find); the ends of the range still run
    for bad in (1e-46, -1e-40, 1e39):
        with pytest.raises(ValueError, match="must be a normal fp32 number"):
            A.attention(q, q, q, lengths, sm_scale=bad)
    for fine in (1e-37, -1e38):
        assert torch.isfinite(A.attention(q, q, q, lengths, sm_scale=fine)).all()


def test_harness_catches_a_wrong_kernel():
    """The comparisons are sharp enough to see a plausible bug: the same kernel with rotary on k only,
    or with lengths off by one, is far outside the fp32 tolerance of the correct reference."""
    B, L, H, dh = 3, 9, 2, 16
    q, k, v = torch.randn(3, B, L, H, dh, device=DEVICE).unbind(0)
    lengths = torch.tensor([9, 4, 1], device=DEVICE)
    ref = attention64(q, k, v, lengths, rope_base=BASE)
    assert rel_err(A.attention(q, k, v, lengths, rope_base=BASE), ref) <= FP32_TOL
    assert rel_err(A.attention(q, k, v, lengths, rope_base=BASE, rope_q=False), ref) > 100 * FP32_TOL
    assert rel_err(A.attention(q, k, v, (lengths - 1).clamp(min=0), rope_base=BASE), ref) > 100 * FP32_TOL
    assert rel_err(A.attention(q, k, v, lengths, rope_base=BASE, causal=True), ref) > 100 * FP32_TOL


# ----------------------------------------------------------------------------- shared memory
def _fp32_case(Lq, dh, causal=False):
    """fp32 q, k, v [2, Lq, 1, dh] with one full and one partial row, forward and backward against float64."""
    gen = torch.Generator().manual_seed(Lq * 1000 + dh)
    q, k, v = (torch.randn(2, Lq, 1, dh, generator=gen, dtype=torch.float64) for _ in range(3))
    lengths = torch.tensor([Lq, Lq // 3], device=DEVICE)
    g = torch.randn(2, Lq, 1, dh, generator=gen, dtype=torch.float64).to(DEVICE)
    results = []
    for fn, dtype in ((A.attention, torch.float32), (attention64, torch.float64)):
        ts = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*ts, lengths, causal=causal, rope_base=BASE)
        out.backward(g.to(dtype))
        results.append([out.detach()] + [t.grad for t in ts])
    for name, a, r in zip(["out", "dq", "dk", "dv"], *results):
        assert_rel(a, r, FP32_TOL, name)


@pytest.mark.parametrize("Lq,dh", [(100, 64), (40, 128)])
def test_fp32_shapes_past_the_fused_backward_take_the_general_one(Lq, dh):
    """fp32 shapes whose single-query-block backward would not fit an H100's shared memory go to the
    general backward (``_use_fused_bwd``), which gives the same gradients."""
    assert Lq <= 128 and not A._use_fused_bwd(Lq, A._padded_dh(dh), torch.float32)
    assert A._use_fused_bwd(Lq, A._padded_dh(dh), torch.bfloat16)
    _fp32_case(Lq, dh)


def test_kernel_configs_fit_h100_shared_memory():
    """sm_90 builds, with the launcher's own block sizes, of the shapes at the edges of each choice:
    fp32 single-block backward at its 4096-element limit (128 x 32, 64 x 64, 32 x 128) and just past
    it (general backward), fp32 128-wide heads over long sequences (forward BLOCK_M 64), and bf16 at
    128-wide heads. Every kernel needs at most an H100's 232,448 bytes of shared memory (the fp32
    forward at 128 x 32 x 128 took 327,680 and the fused backward at 128 x 64 took 299,008)."""
    cases = []
    shapes = [(torch.float32, 128, 32), (torch.float32, 64, 64), (torch.float32, 32, 128), (torch.float32, 128, 64),
              (torch.float32, 300, 128), (torch.bfloat16, 128, 128), (torch.bfloat16, 1004, 128)]
    for dtype, L, dh in shapes:
        name = str(dtype).replace("torch.", "")
        dhp = A._padded_dh(dh)
        flags = dict(CAUSAL=False, ROPE_Q=True, ROPE_K=True, MASK_Q=True, DH=dh, DHP=dhp, SPLIT=True,
                     PREC=A.dot_precision(dtype), NEG=False)
        args = {n: name for n in ("O", "Q", "K", "V", "DQ", "DK", "DV", "DO")}
        args.update(STATS="fp32", DELTA="fp32", TAB="fp32", LENS="i64", qk_scale=0.1, sm_scale=0.1)
        bm, bn, warps, stages = A._fwd_config(L, L, dhp, dtype)
        kernels = [("_attn_fwd_kernel", bm, bn, warps, stages, {})]
        if A._use_fused_bwd(L, dhp, dtype):
            fbm, fbn, fwarps = A._fused_bwd_config(L, L, dhp, dtype)
            kernels.append(("_attn_bwd_fused_kernel", fbm, fbn, fwarps, 2, dict(DELTA=A._delta_form(L, fbn))))
        else:
            (kbm, kbn), (qbm, qbn), warps = A._general_bwd_config(dhp, dtype)
            in_dq = dtype != torch.float32  # fp32: delta by a kernel of its own
            kernels += [("_attn_bwd_dkdv_kernel", kbm, kbn, warps, 2, {}),
                        ("_attn_bwd_dq_kernel", qbm, qbn, warps, 2, dict(DELTA_PASS=in_dq))]
            if not in_dq:
                kernels.append(("_attn_bwd_delta_kernel", qbm, qbn, warps, 2, {}))
        for kernel, bm, bn, warps, stages, extra in kernels:
            cases.append(dict(module="interformer.kernels.attention", kernel=kernel, args=args, num_warps=warps,
                              num_stages=stages, consts=dict(flags, BLOCK_M=bm, BLOCK_N=bn, **extra),
                              shape=[name, L, dh]))
    for b in aot_build_sm90(cases, workers=2):
        assert b["shared"] <= 232448, (b["kernel"], b["shape"], b["shared"])


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("B,Bq,Lq,Lk,H,dh,mask_q,rope", [
    (256, 256, 54, 54, 4, 16, True, True),     # taobao self-attention
    (256, 256, 104, 104, 4, 16, True, True),   # amazon
    (16, 16, 1004, 1004, 4, 32, True, True),   # long
    (256, 1, 2, 100, 4, 16, False, False),     # PMA
])
def test_gpu_bf16_benchmark_shapes(B, Bq, Lq, Lk, H, dh, mask_q, rope):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, Lk + 1, (B,), generator=gen)
    lengths[0], lengths[1] = Lk, 0
    lengths = lengths.cuda()
    masters = [torch.randn(Bq, Lq, H, dh, generator=gen, dtype=torch.float64),
               torch.randn(B, Lk, H, dh, generator=gen, dtype=torch.float64),
               torch.randn(B, Lk, H, dh, generator=gen, dtype=torch.float64)]
    grad = torch.randn(B, Lq, H, dh, generator=gen, dtype=torch.float64).cuda()
    kw = dict(rope_base=BASE if rope else None, mask_queries=mask_q)
    results = []
    for fn, dtype in ((A.attention, torch.bfloat16), (R.attention, torch.bfloat16), (attention64, torch.float64)):
        ts = [m.cuda().to(dtype).requires_grad_() for m in masters]
        out = fn(*ts, lengths, **kw)
        out.backward(grad.to(dtype))
        results.append([out.detach()] + [t.grad for t in ts])
    for name, a, e, r in zip(["out", "dq", "dk", "dv"], *results):
        assert_lowp(a, e, r, name)


@NO_POISON
@pytest.mark.gpu
def test_gpu_inductor_compile(inline_setting):
    """Inductor compiles the op (forward and backward; inlined into its kernels or opaque custom ops,
    ``inline_setting``) around the projections of the module.
    (The op is called directly: compiling the nn.Module itself goes through interformer.backend's
    importlib-based kernel lookup, which dynamo refuses to trace.)"""
    lin = torch.nn.Linear(64, 192).cuda()
    s = torch.randn(8, 54, 64, device="cuda", requires_grad=True)
    lengths = torch.randint(0, 55, (8,), device="cuda")

    def f(x):
        q, k, v = lin(x).view(8, 54, 3, 4, 16).unbind(2)
        return A.attention(q, k, v, lengths, rope_base=BASE)

    out_c = torch.compile(f, fullgraph=True)(s)
    out_c.sum().backward()
    g_c = s.grad.clone()
    s.grad = None
    out = f(s)
    out.sum().backward()
    assert_rel(out_c, out, FP32_TOL, "compiled out")
    assert_rel(g_c, s.grad, FP32_TOL, "compiled grad")


@pytest.mark.gpu
@pytest.mark.parametrize("Lq,dh", [(128, 64), (128, 128), (64, 128), (300, 128)])
def test_gpu_fp32_wide_heads(Lq, dh):
    """fp32 at the shapes whose first block sizes needed more shared memory than an H100 has
    (they raised OutOfResources at launch): they run, and match float64."""
    _fp32_case(Lq, dh)
    _fp32_case(Lq, dh, causal=True)


def test_rotary_cache_keeps_one_growing_table_per_head_dim(monkeypatch):
    """Serving sequences of many lengths: the eager entry points build a rotary table only when a
    longer one is needed (powers of two, at least 64 positions) and keep one per (device, dh,
    base), never freeing a replaced one; results are bitwise those of an exact-length table (what
    a traced call passes)."""
    monkeypatch.setattr(A, "_ROPE_TABLES", {})
    monkeypatch.setattr(A, "_ROPE_RETIRED", [])
    builds, exact = [], A.rope_table
    monkeypatch.setattr(A, "rope_table", lambda length, *a: builds.append(length) or exact(length, *a))
    dh = 16
    for L in (5, 54, 7, 129, 33):
        q, k, v = (torch.randn(2, L, 1, dh, device=DEVICE) for _ in range(3))
        lengths = torch.tensor([L, L // 2], device=DEVICE)
        out = A.attention(q, k, v, lengths, rope_base=BASE)
        own = A._attention_fwd_impl(q, k, v, lengths, False, BASE, True, True, None, exact(L, dh, BASE, q.device))[0]
        assert torch.equal(out, own), L
    assert builds == [64, 256]
    assert len(A._ROPE_TABLES) == 1
    # the replaced 64-row table is kept alive: a CUDA graph captured while it was current reads it
    assert [t.shape[1] for t in A._ROPE_RETIRED] == [64]


def test_a_cuda_rotary_table_is_cached_once_its_stream_has_written_it(monkeypatch):
    """The table cache serves every stream, so a CUDA table is cached only after the stream that
    built it has finished it (one sync per build; a caller on another stream, e.g. serving threads
    with a stream each, read a half-written table before: a review of the GPU-only paths). Checked
    with CUDA mocked: a sync per build, none on a cache hit, none during capture (not cached)."""
    monkeypatch.setattr(A, "_ROPE_TABLES", {})
    monkeypatch.setattr(A, "_ROPE_RETIRED", [])
    events, capturing = [], [False]

    class _Stream:
        def synchronize(self):
            events.append(("sync", len(A._ROPE_TABLES)))

    monkeypatch.setattr(A, "rope_table", lambda length, dh, base, device: events.append(("build", length)) or
                        torch.zeros(2, length, dh // 2))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    cuda = torch.device("cuda", 0)
    A._rope_table(10, 16, BASE, cuda)
    A._rope_table(50, 16, BASE, cuda)  # a hit: no build, no sync
    capturing[0] = True
    A._rope_table(100, 16, BASE, cuda)  # built inside a capture: not cached, no sync
    capturing[0] = False
    A._rope_table(100, 16, BASE, cuda)
    # the sync comes before the table enters the cache (the cache's size when it ran)
    assert events == [("build", 64), ("sync", 0), ("build", 128), ("build", 128), ("sync", 1)]
    assert A._ROPE_TABLES[("cuda", 0, 16, float(BASE))].shape[1] == 128


@pytest.mark.parametrize("L", [13, 130], ids=["fused-backward", "general-backward"])
def test_rotary_queries_without_query_masking(L):
    """rope on q and k with ``mask_queries=False`` and lengths < L: query rows past a sample's length
    still attend to its valid keys, so their dq is non-zero and must be un-rotated like any other
    row (the backward must not cut dq's inverse rotation at the key limit)."""
    case = Case(f"ropeq-unmasked-{L}", 3, False, L, L, 2, 16, False, "qk", False, "contiguous")
    check_case(case, torch.tensor([L, L // 2, 3], device=DEVICE), torch.Generator().manual_seed(L), torch.float32)


@pytest.mark.parametrize("L,lengths", [(20, [20, 1, 17, 0]), (100, [100, 65, 17, 33])],
                         ids=["one-key-block", "lengths-one-past-a-key-block"])
def test_causal_fused_backward_covers_the_last_query_rows_key_block(L, lengths):
    """Causal single-query-block backward with query masking: the key loop stops at the last live
    query row (keys past it are invisible), and must still include the key block that starts exactly
    at that row -- lengths 1 (key 0, seen by row 0 alone) and 17, 33, 65 (one past a 16-, 32- or
    64-key block boundary)."""
    assert A._use_fused_bwd(L, 16, torch.float32)
    case = Case(f"causal-fused-{L}", len(lengths), False, L, L, 1, 16, True, "qk", True, "contiguous")
    check_case(case, torch.tensor(lengths, device=DEVICE), torch.Generator().manual_seed(L + 1), torch.float32)


def test_padded_rotary_head_in_the_general_backward():
    """A head width that is not a power of two (dh = 6, a 16-wide register tile whose two halves each
    start a tile half) with rotary, over Lq > 128 (the dq kernel with its delta pass, and dk/dv):
    every kernel must read and write the split layout, not only the forward and the single-block
    backward."""
    L, dh = 130, 6
    assert not A._use_fused_bwd(L, A._padded_dh(dh), torch.float32)
    case = Case("dh6-general-rope-causal", 2, False, L, L, 1, dh, True, "qk", True, "contiguous")
    check_case(case, torch.tensor([L, 77], device=DEVICE), torch.Generator().manual_seed(6), torch.float32)


@pytest.mark.parametrize("L,same_kv", [(13, False), (13, True), (130, False), (130, True)])
def test_mixed_dtype_launchers_round_kv_tiles_to_the_query_dtype(L, same_kv):
    """The launchers take k and v in another dtype than q (pooled_attention's fp32 sequence under a
    16-bit autocast): each k/v tile is rounded to q's dtype as it is loaded, which is exactly what a
    cast before the call does. So the forward (output and statistics) equals, bit for bit, the call on
    fp16 copies, and so do dq and (rounded to fp16) dk, dv; for k and v one tensor and two, over the
    single-block and the general backward."""
    gen = torch.Generator().manual_seed(L + same_kv)
    B, H, dh = 3, 1, 16
    q = torch.randn(1, 2 if L == 13 else L, H, dh, generator=gen).to(DEVICE, torch.float16)
    k32 = torch.randn(B, L, H, dh, generator=gen).to(DEVICE)
    v32 = k32 if same_kv else torch.randn(B, L, H, dh, generator=gen).to(DEVICE)
    k16 = k32.half()
    v16 = k16 if same_kv else v32.half()  # k and v one tensor: the same object, as pooled_attention passes
    lengths = torch.tensor([L, 0, 5], device=DEVICE)
    flags = (False, None, False, False, 0.25)
    out32, lse32 = A._attention_fwd_impl(q, k32, v32, lengths, *flags)
    out16, lse16 = A._attention_fwd_impl(q, k16, v16, lengths, *flags)
    assert out32.dtype == torch.float16 and torch.equal(out32, out16) and torch.equal(lse32, lse16)
    do = torch.randn(out16.shape, generator=gen).to(DEVICE, torch.float16)
    g32 = A._attention_bwd_impl(do, q, k32, v32, out16, lse16, lengths, *flags, same_kv=same_kv)
    g16 = A._attention_bwd_impl(do, q, k16, v16, out16, lse16, lengths, *flags, same_kv=same_kv)
    assert torch.equal(g32[0], g16[0]), "dq"
    for name, a, b in zip(("dk", "dv"), g32[1:], g16[1:]):
        if same_kv and name == "dv":
            assert a is None and b is None
            continue
        assert a.dtype == torch.float32 and torch.equal(a.half(), b), name


def test_vmap_takes_the_reference():
    """A ``torch.func`` transform's wrapper is of type Tensor but has no storage: under a transform the
    op runs the reference (``_dispatch.transformed``), with the reference's results; the launchers
    never see the wrapper (they failed reading its data pointer)."""
    from torch.func import vmap

    B, L, H, dh = 3, 4, 1, 8
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, L, H, dh, generator=g).to(DEVICE) for _ in range(3))
    lengths = torch.tensor([3], device=DEVICE)

    def per_sample(fn):
        return vmap(lambda a, b, c: fn(a[None], b[None], c[None], lengths, rope_base=BASE)[0])(q, k, v)

    assert_rel(per_sample(A.attention), per_sample(R.attention), FP32_TOL, "vmap")


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_pma_output_can_be_modified_in_place(frozen):
    """``p = pma(s, lengths); p += 1`` while gradients flow, as on the eager module: the fused op's
    output was a view made inside its autograd.Function, which autograd refuses to modify in place
    ('Output 0 of _PooledAttention is a view and is being modified inplace'), also with every
    parameter frozen (an API audit helper's case). Gradients against eager after the in-place ops."""
    eager, fused = _module_pair(PoolingMultiHeadAttention, (2, 16, 2), torch.float32)
    s = torch.randn(3, 5, 16, device=DEVICE)
    lengths = torch.tensor([5, 0, 3], device=DEVICE)
    grads = []
    for module in (eager, fused):
        module.requires_grad_(not frozen)
        x = s.clone().requires_grad_()
        p = module(x, lengths)
        p += 1.0
        p.mul_(2.0)
        p.sum().backward()
        grads.append([x.grad] + [t.grad for t in module.parameters()])
    for e, f in zip(*grads):
        assert (e is None) == (f is None)
        if e is not None and float(e.abs().max()) > 1e-6:
            assert_rel(f, e, FP32_TOL, "gradient")
        elif e is not None:  # the key bias: 0 exactly on the fused path, rounding noise on eager
            assert float(f.abs().max()) <= 1e-6


def test_pma_refuses_mixed_dtypes_outside_autocast():
    """s in another dtype than the parameters: the eager module fails (its projections' GEMMs), so
    the fused op refuses it too (it ran, rounding s to the parameters' dtype: an API audit
    helper's case); the module refuses it first, with one ValueError on both backends
    (``layers._expect_dtype``; eager's was PyTorch's RuntimeError until 2026-11-29); under
    autocast both run."""
    eager, fused = _module_pair(PoolingMultiHeadAttention, (2, 16, 2), torch.float32)
    s = torch.randn(3, 5, 16, device=DEVICE, dtype=torch.float16)
    lengths = torch.tensor([5, 0, 3], device=DEVICE)
    for module in (eager, fused):
        with pytest.raises(ValueError, match="^PoolingMultiHeadAttention: s is torch.float16 but the parameters "
                                             "are torch.float32"):
            module(s, lengths)
    params = [fused.query, fused.k_proj.weight, fused.k_proj.bias, fused.v_proj.weight, fused.v_proj.bias,
              fused.o_proj.weight, fused.o_proj.bias]
    with pytest.raises(ValueError, match="must share one dtype outside autocast"):
        A.pooled_attention(s, lengths, *params, 2)
    with pytest.raises(ValueError, match="must share one dtype outside autocast"):
        A.pooled_attention(s.float(), lengths, *[p.half() for p in params], 2)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16 if DEVICE.type == "cuda" else torch.float16):
        assert fused.float()(s, lengths).shape == (3, 2, 16)
    # a query of another dtype: eager casts it to the keys' dtype, and so does the fused path (it
    # used to run every product in the query's dtype), plainly and traced
    eager, fused = _module_pair(PoolingMultiHeadAttention, (2, 16, 2), torch.float32)
    for m in (eager, fused):
        m.query.data = m.query.data.half()
    want = eager(s.float(), lengths)
    assert_rel(fused(s.float(), lengths), want, FP32_TOL, "fp16 query")
    traced = A._pooled_traced(s.float(), lengths, fused.query, fused.k_proj.weight, fused.k_proj.bias,
                              fused.v_proj.weight, fused.v_proj.bias, fused.o_proj.weight, fused.o_proj.bias, 2)
    assert_rel(traced, want, FP32_TOL, "fp16 query, traced build")
