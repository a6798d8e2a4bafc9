"""Feed-forward block ``Linear -> SiLU -> Linear``: fused Triton forward and backward.

Public function (same name and signature as :func:`interformer.reference.feed_forward`)::

    feed_forward(x, w1, b1, w2, b2)   # silu(x @ w1^T + b1) @ w2^T + b2

x ``[..., K]`` (any number of leading dimensions, any strides), w1 ``[H, K]``, b1 ``[H]``, w2
``[N, H]``, b2 ``[N]`` (``nn.Linear``'s layout) -> a new contiguous ``[..., N]``. In the model: the
Interaction Arch's FFN (``d -> 4d -> d`` over the ``n`` non-sequence tokens, its dropout off;
``interformer.layers.FeedForward``). The sequence tokenizer's mask MLP has the same form but stays
eager (DESIGN §3 keeps the tokenizers eager).

Why fuse it: eagerly the block is two GEMMs and an activation, and the ``[rows, H]`` hidden
activation goes to memory three times forward (the first GEMM writes it, SiLU reads it and writes
its output, the second GEMM reads that) and is kept, twice, for the backward. At ``taobao`` the
Interaction Arch's hidden is ``2048 x 20 x 256`` (21 MB in bf16) per block. Under autocast each
GEMM also casts its weight and bias, so a block costs about 13 aten ops forward and 20 backward on
the host, where a plain step spends its time at the DESIGN §6 shapes. Here the hidden activation
never leaves the chip and is recomputed in the backward (cheap: ``rows x H x K`` multiply-adds,
against the two GEMMs the backward does anyway); the block is one launch forward and three
backward, and the parameters are read as they are stored (no cast ops).

Forward (``_ffn_fwd_kernel``)
-----------------------------
One program per block of ``BM`` rows: x's rows ``[BM, KP]`` stay in registers; for each chunk of
``BH`` hidden units ``h = x w1[c]^T + b1[c]`` (fp32 accumulation), ``a = silu(h)`` in fp32, rounded
once to the compute dtype, and ``acc += a w2[:, c]^T``. Then ``out = acc + b2``, cast on store.

The sigmoid, forward and backward, is :func:`._common.sigmoid`: for a 16-bit compute dtype one
approximate exponential and one approximate reciprocal square root (some ulp of fp32, far below the
rounding of the 16-bit activation it feeds), ``tl.sigmoid`` for fp32. Built for sm_90 (Triton 3.6,
bf16, taobao's 64-wide tier) that cut the hidden-chunk loop from 398 to 285 instructions a warp in
the forward, 456 to 346 in the dx kernel and 1087 to 975 in the weight kernel (806 with its db2
summed on the tensor cores, ``_ffn_bwd_w_kernel``): ``tl.sigmoid``'s exponential and division, with
their fix-ups for denormal and huge values, had taken half the forward's. The programs an SM stay
as they were (registers 124 -> 121, 128 -> 103, 188 -> 219).

Backward: ``_ffn_bwd_dx_kernel``, ``_ffn_bwd_w_kernel``, :func:`~interformer.kernels._common.sum_partials`
-------------------------------------------------------------------------------------------------------
With ``dy`` the output gradient: ``da = dy w2``, ``dh = da * silu'(h)`` where
``silu'(h) = s (1 + h (1 - s))``, ``s = sigmoid(h)``;
``dx = dh w1``, ``dw1 = dh^T x``, ``db1 = sum dh``, ``dw2 = dy^T a``, ``db2 = sum dy``.

* ``_ffn_bwd_dx_kernel``: one program per row block, looping over the hidden chunks (h recomputed,
  ``dx`` accumulated in fp32 registers, stored once in x's dtype).
* ``_ffn_bwd_w_kernel``: a grid of ``G`` row groups x hidden chunks. Program ``(g, c)`` holds
  ``w2[:, c]`` in registers (``w1[c]`` and ``b1[c]`` are read again per row block, from cache),
  loops over the row blocks ``g, g + G, ...``,
  recomputes ``h``, ``a`` and ``dh`` for its chunk, and accumulates ``dw1[c]``, ``db1[c]``,
  ``dw2[:, c]`` (and, in chunk 0, ``db2``) in fp32 registers; each is stored once into row g of an
  fp32 ``[G, H K + H + N H + N]`` buffer, which ``sum_partials`` reduces over G in a fixed order
  (deterministic, no atomics) into the four parameter gradients, each in its parameter's dtype.
  ``G = min(row blocks, 4 x SMs / chunks)``: about four programs per SM in all.

The weight kernel recomputes ``h`` once more than a kernel that did both would; a single kernel
would need either all of ``dw1`` and ``dw2`` in one program's registers or ``dx`` summed across
hidden chunks (a ``[chunks, rows, K]`` fp32 buffer). With frozen parameters (none needs a
gradient) the weight kernel and the reduction are skipped; when x needs no gradient, the dx kernel.

Sizes: ``K`` and ``N`` up to :data:`MAX_FEATURES` (256; padded to ``KP``/``NP``, the next power of
two >= 16, held whole in registers), any ``H`` (looped). A larger ``K`` or ``N`` goes to the eager
reference (the model's FFN is ``d`` wide: 64 or 128 at the DESIGN shapes), and so, by default,
does one wider than :data:`FUSED_MAX_FEATURES` (64): at ``long``'s 128 the kernels were 4.1x slower
than cuBLAS on an H200, so the model's FFN is fused at ``taobao`` and ``amazon`` only. Tiles are fixed by the
shape (no autotune; ``_TIERS``), by the wider of ``KP`` and ``NP``, as rows x hidden units of the
forward, the dx and the weight kernel and the warps of all three: up to 64, 64 x 32 each, 4 warps;
128, 64 x 32, 32 x 32 and 32 x 16, 8 warps; 256, 32 x 16 each, 8 warps. Built ahead of time for
sm_90 with Triton 3.6 (bf16 autocast, x in fp32 as in the model;
``profiling/sm90-audit-triton3.6.md``) none spills at the model's widths (64, 128) or at 100, 192
and 256 features (64-row tiles in the dx and weight kernels at 128 spilled at 100 features and
took 247-255 registers at 128). Widths that are not a power of two cost mask registers: at 40
features the weight kernel spills 26 stores (32 x 16 tiles would not, but re-read x and dy for
twice as many hidden chunks). The weight kernel's programs of one row group read the same x and dy
tiles, one per hidden chunk, at about the same time, so most of those reads should hit L2 (not
measured).
Row offsets are int64 (``rows x K`` may pass 2**31), column offsets too where a view's columns lie
2**31 elements apart (``COL64``; int32 otherwise); x and dy are read through their strides as
``[R1, R2, F]`` (the Interaction Arch's input is a slice of the token tensor: no copy).

Dtypes: fp32, fp16, bf16. Under ``torch.autocast`` on x's device type the compute dtype is the
autocast dtype and x and the parameters may keep their own float dtypes: the kernels round each
tile to the compute dtype in registers as they load it, as eager's casts would (in the model x is
the fp32 token stream, so this also saves the copy eager's cast makes, and its backward), and
return every gradient in its input's own dtype; the output is in the compute dtype. Outside autocast all five tensors share one dtype. Dots take the
compute dtype with fp32 accumulation (``tf32x3`` for fp32 on a GPU). Where rounding differs from
eager's: in the forward, eager rounds ``h`` to the compute dtype before SiLU and SiLU's output
again, where here ``h`` and ``silu(h)`` stay fp32 and ``a`` is rounded once, for the second dot; in
the backward, eager rounds ``da`` and ``dh`` to the compute dtype, where here they stay fp32 until
they meet a dot (``dh`` is rounded as a dot operand, and ``db1`` sums it unrounded). So with 16-bit
inputs dx, dw1 and db1 differ from eager's even where ``h`` is exact, and err less (a review's fp16
case: db1 2.1e-4 off float64, eager's 3.6e-4).

``torch.library``: ``interformer::feed_forward_fwd`` / ``interformer::feed_forward_bwd`` are
``custom_op`` s with fake implementations; outside tracing :func:`feed_forward` calls the launchers
through a plain ``autograd.Function`` (``_FeedForward``), as every op here does
(:mod:`interformer.kernels._dispatch`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (KERNEL_DTYPES, cdiv, describe_shape, dot_precision, int_setting, next_pow2,
                      on_input_device, persistent_programs, sigmoid, sum_partials)
from ._dispatch import (autocast_dtype, fx_call, inline_when_compiled, launch, lean_function, needed, needs_grad,
                        reference_only, saving_forward, tracing)

__all__ = ["feed_forward"]

_DTYPES = KERNEL_DTYPES
#: widest input (K) and output (N) the kernels hold in registers; wider blocks take the reference
MAX_FEATURES = 256
#: widest K or N that :func:`feed_forward` sends to the kernels (at most :data:`MAX_FEATURES`); a
#: wider block runs the eager reference (two cuBLAS GEMMs and SiLU). 64, from the first GPU timing
#: of the kernels (an H200, torch 2.11, Triton 3.6, bf16 autocast, CUDA-graphed forward+backward,
#: commit 7bea4b3, 2026-11-28): at ``long``'s FFN (32,768 rows, 128 -> 512 -> 128, the 128 tier)
#: they took 1.199 ms (p20-p80 1.197-1.201) against eager's 0.2915 (0.2899-0.2929), 4.1x slower,
#: about 3% of the bf16 peak (sm_90 builds: 64- and 32-row tiles over 16- and 32-wide hidden
#: chunks, one 8-warp program an SM); at ``taobao``'s (64 wide) 0.1515 ms against Inductor's 0.1366
#: (eager's row was not reached), close enough that the one launch's saving in a plain step keeps
#: them. The tests of the wider tiers, and the benchmark's ``fused-wide`` provider (what a change
#: to those tiers must beat eager with), set it to MAX_FEATURES.
FUSED_MAX_FEATURES = 64


@triton.jit
def _row_offsets(r, R2, stride1, stride2):
    """Element offsets of rows ``r`` (int64) of a tensor viewed as ``[R1, R2, F]``."""
    return (r // R2) * stride1 + (r % R2) * stride2


@triton.jit
def _load_rows(T, r, r_ok, R2, stride1, stride2, stride_f, cols, F, COL64: tl.constexpr):
    """The ``[rows, cols]`` tile of T (rows past R and columns past F read as zero). ``COL64``: the
    column offsets in int64 as well, for a view whose columns lie 2**31 elements apart or more (a
    feature-major one: ``stride_f`` = the row count); int32 otherwise (fewer registers)."""
    if COL64:
        cols_off = cols.to(tl.int64)[None, :] * stride_f
    else:
        cols_off = cols[None, :] * stride_f
    return tl.load(T + _row_offsets(r, R2, stride1, stride2)[:, None] + cols_off,
                   mask=r_ok[:, None] & (cols < F)[None, :], other=0.0)


@triton.jit
def _hidden_chunk(x, W1, B1, hh, kk, H, K, stride_w1h, stride_w1k, stride_b1, DT: tl.constexpr, PREC: tl.constexpr):
    """``(w1[c] in DT, h = x w1[c]^T + b1[c] in fp32)`` for the hidden units ``hh`` (units past H give
    h = 0 and a zero weight row)."""
    h_ok = hh < H
    w1 = tl.load(W1 + hh[:, None] * stride_w1h + kk[None, :] * stride_w1k,
                 mask=h_ok[:, None] & (kk < K)[None, :], other=0.0).to(DT)
    b1 = tl.load(B1 + hh * stride_b1, mask=h_ok, other=0.0).to(DT).to(tl.float32)
    return w1, tl.dot(x, tl.trans(w1), input_precision=PREC) + b1[None, :]


@triton.jit
def _out_weight_chunk(W2, nn, hh, N, H, stride_w2n, stride_w2h, DT: tl.constexpr):
    """``w2[:, c]`` ``[NP, BH]`` in DT (rows past N and units past H read as zero)."""
    return tl.load(W2 + nn[:, None] * stride_w2n + hh[None, :] * stride_w2h,
                   mask=(nn < N)[:, None] & (hh < H)[None, :], other=0.0).to(DT)


@triton.jit
def _dsilu(h, da, FAST: tl.constexpr):
    """``da * silu'(h)``, fp32 (``FAST``: :func:`._common.sigmoid`'s)."""
    s = sigmoid(h, FAST)
    return da * s * (1.0 + h * (1.0 - s))


@triton.jit
def _ffn_fwd_kernel(
    OUT, X, W1, B1, W2, B2,
    R, R2, K, H, N,
    stride_x1, stride_x2, stride_xk,
    stride_w1h, stride_w1k, stride_b1, stride_w2n, stride_w2h, stride_b2,
    BM: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
    COL64: tl.constexpr,
):
    DT: tl.constexpr = OUT.dtype.element_ty  # the compute dtype (autocast's, or x's)
    FAST: tl.constexpr = DT != tl.float32  # the approximate sigmoid for 16-bit (._common.sigmoid)
    r = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    r_ok = r < R
    kk = tl.arange(0, KP)
    nn = tl.arange(0, NP)
    x = _load_rows(X, r, r_ok, R2, stride_x1, stride_x2, stride_xk, kk, K, COL64).to(DT)
    acc = tl.zeros([BM, NP], dtype=tl.float32)
    for h0 in range(0, H, BH):
        hh = h0 + tl.arange(0, BH)
        _, h = _hidden_chunk(x, W1, B1, hh, kk, H, K, stride_w1h, stride_w1k, stride_b1, DT, PREC)
        a = h * sigmoid(h, FAST)
        w2 = _out_weight_chunk(W2, nn, hh, N, H, stride_w2n, stride_w2h, DT)
        acc = tl.dot(a.to(DT), tl.trans(w2), acc, input_precision=PREC)
    n_ok = nn < N
    acc += tl.load(B2 + nn * stride_b2, mask=n_ok, other=0.0).to(DT).to(tl.float32)[None, :]
    tl.store(OUT + r[:, None] * N + nn[None, :], acc.to(OUT.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])


@triton.jit
def _ffn_bwd_dx_kernel(
    DX, DY, X, W1, B1, W2,
    R, R2, K, H, N,
    stride_x1, stride_x2, stride_xk, stride_dy1, stride_dy2, stride_dyn,
    stride_w1h, stride_w1k, stride_b1, stride_w2n, stride_w2h,
    BM: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
    COL64: tl.constexpr,
):
    DT: tl.constexpr = DY.dtype.element_ty  # the compute dtype: the forward's output dtype
    FAST: tl.constexpr = DT != tl.float32  # the approximate sigmoid for 16-bit (._common.sigmoid)
    r = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    r_ok = r < R
    kk = tl.arange(0, KP)
    nn = tl.arange(0, NP)
    x = _load_rows(X, r, r_ok, R2, stride_x1, stride_x2, stride_xk, kk, K, COL64).to(DT)
    dy = _load_rows(DY, r, r_ok, R2, stride_dy1, stride_dy2, stride_dyn, nn, N, COL64)
    dx = tl.zeros([BM, KP], dtype=tl.float32)
    for h0 in range(0, H, BH):
        hh = h0 + tl.arange(0, BH)
        w1, h = _hidden_chunk(x, W1, B1, hh, kk, H, K, stride_w1h, stride_w1k, stride_b1, DT, PREC)
        da = tl.dot(dy, _out_weight_chunk(W2, nn, hh, N, H, stride_w2n, stride_w2h, DT), input_precision=PREC)
        dx = tl.dot(_dsilu(h, da, FAST).to(DT), w1, dx, input_precision=PREC)
    tl.store(DX + r[:, None] * K + kk[None, :], dx.to(DX.dtype.element_ty), mask=r_ok[:, None] & (kk < K)[None, :])


@triton.jit
def _ffn_bwd_w_kernel(
    PART, DY, X, W1, B1, W2,
    R, R2, K, H, N, ROW_BLOCKS,
    stride_x1, stride_x2, stride_xk, stride_dy1, stride_dy2, stride_dyn,
    stride_w1h, stride_w1k, stride_b1, stride_w2n, stride_w2h, stride_part,
    BM: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
    COL64: tl.constexpr,
):
    DT: tl.constexpr = DY.dtype.element_ty  # the compute dtype: the forward's output dtype
    FAST: tl.constexpr = DT != tl.float32  # the approximate sigmoid for 16-bit (._common.sigmoid)
    g = tl.program_id(0)
    c = tl.program_id(1)
    kk = tl.arange(0, KP)
    nn = tl.arange(0, NP)
    hh = c * BH + tl.arange(0, BH)
    h_ok = hh < H
    k_ok = kk < K
    n_ok = nn < N
    dw1 = tl.zeros([BH, KP], dtype=tl.float32)
    dw2 = tl.zeros([NP, BH], dtype=tl.float32)
    db1 = tl.zeros([BH], dtype=tl.float32)
    # db2 as ones @ dy, 16 equal rows (a dot's least), on the tensor cores: summed across the warps
    # every row block it took 180 of the loop's 975 instructions a warp and 3 of its 10 barriers
    # (sm_90, Triton 3.6, bf16, taobao's tier), in every program though only chunk 0 stores it. The
    # products are exact, the sums fp32 ("ieee" for fp32 dy, where tf32x3 would round dy).
    db2 = tl.zeros([16, NP], dtype=tl.float32)
    ones = tl.full([16, BM], 1.0, DT)
    w2 = _out_weight_chunk(W2, nn, hh, N, H, stride_w2n, stride_w2h, DT)
    for blk in range(g, ROW_BLOCKS, tl.num_programs(0)):
        r = tl.cast(blk, tl.int64) * BM + tl.arange(0, BM)  # (under the interpreter blk is a Python int)
        r_ok = r < R
        x = _load_rows(X, r, r_ok, R2, stride_x1, stride_x2, stride_xk, kk, K, COL64).to(DT)
        dy = _load_rows(DY, r, r_ok, R2, stride_dy1, stride_dy2, stride_dyn, nn, N, COL64)
        _, h = _hidden_chunk(x, W1, B1, hh, kk, H, K, stride_w1h, stride_w1k, stride_b1, DT, PREC)
        dh = _dsilu(h, tl.dot(dy, w2, input_precision=PREC), FAST)  # rows past R: dy = 0, so dh = 0
        a = h * sigmoid(h, FAST)  # rows past R: silu(b1) != 0, but their dy rows are 0
        dw1 = tl.dot(tl.trans(dh.to(DT)), x, dw1, input_precision=PREC)
        dw2 = tl.dot(tl.trans(dy), a.to(DT), dw2, input_precision=PREC)
        db1 += tl.sum(dh, 0)
        db2 = tl.dot(ones, dy, db2, input_precision="ieee")
    # row g of the partial sums: [dw1 (H K) | db1 (H) | dw2 (N H) | db2 (N)], this chunk's columns
    row = PART + g.to(tl.int64) * stride_part
    tl.store(row + hh[:, None] * K + kk[None, :], dw1, mask=h_ok[:, None] & k_ok[None, :])
    tl.store(row + H * K + hh, db1, mask=h_ok)
    tl.store(row + H * K + H + nn[:, None] * H + hh[None, :], dw2, mask=n_ok[:, None] & h_ok[None, :])
    db2 = tl.sum(tl.where(tl.arange(0, 16)[:, None] == 0, db2, 0.0), 0)  # its first row, exactly
    tl.store(row + H * K + H + N * H + nn, db2, mask=nn < tl.where(c == 0, N, 0))  # chunk 0 only


# ============================================================================ launchers
#: tiles by the wider of KP and NP (the tiers of the module docstring): ``(BM, BH)`` of the forward,
#: the dx and the weight kernel, and the warps of all three
_TIERS = {64: ((64, 32), (64, 32), (64, 32), 4),
          128: ((64, 32), (32, 32), (32, 16), 8),
          256: ((32, 16), (32, 16), (32, 16), 8)}


def _config(K: int, N: int) -> Tuple[int, int, Tuple[int, int], Tuple[int, int], Tuple[int, int], int]:
    """``(KP, NP, forward tile, dx tile, weight tile, num_warps)`` for K inputs and N outputs, each
    tile ``(BM, BH)``."""
    kp, np_ = max(16, next_pow2(K)), max(16, next_pow2(N))
    fwd, dx, w, warps = _TIERS[max(64, kp, np_)]
    return kp, np_, fwd, dx, w, warps


def _rows(t: torch.Tensor) -> Tuple[torch.Tensor, int, int, int, int, int]:
    """``(t, R, R2, stride1, stride2, stride_f)``: t's rows (every index but the last) read as
    ``[R1, R2, F]`` through its strides, so that a 1-, 2- or 3-D view needs no copy; a tensor of more
    dimensions is reshaped to 3-D first (a copy only when its leading dimensions cannot be merged)."""
    if t.dim() > 3:
        t = t.flatten(0, -3)  # (not reshape(-1, ...): a 0 in the sizes would make -1 ambiguous)
    if t.dim() == 3:
        return (t, t.shape[0] * t.shape[1], t.shape[1], *t.stride())
    if t.dim() == 2:
        return (t, t.shape[0], 1, t.stride(0), 0, t.stride(1))
    return (t, 1, 1, 0, 0, t.stride(0))


def _col64(F: int, stride_f: int) -> bool:
    """Whether a row's column offsets (up to ``(F - 1) * stride_f``) can reach 2**31."""
    return (F - 1) * abs(stride_f) >= 2**31


def _check_width(K: int, N: int) -> None:
    """The kernels hold a row's K inputs and N outputs whole (:func:`feed_forward` sends wider
    blocks to the reference; a caller of the ops themselves, e.g. an fx graph, gets this error)."""
    if K > MAX_FEATURES or N > MAX_FEATURES:
        raise ValueError(f"feed_forward kernels: K={K} and N={N} must be at most MAX_FEATURES={MAX_FEATURES} "
                         "(interformer.kernels.feed_forward.feed_forward runs the reference for wider blocks)")


@on_input_device
def _fwd_impl(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
              dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The output ``[..., N]`` in ``dtype`` (the compute dtype; None: x's)."""
    K, H, N = x.shape[-1], w1.shape[0], w2.shape[0]
    _check_width(K, N)
    out = torch.empty((*x.shape[:-1], N), device=x.device, dtype=x.dtype if dtype is None else dtype)
    x, R, R2, s1, s2, sk = _rows(x)
    if R == 0 or N == 0:
        return out
    kp, np_, (bm, bh), _, _, warps = _config(K, N)
    launch(_ffn_fwd_kernel)[(cdiv(R, bm),)](
        out, x, w1, b1, w2, b2, R, R2, K, H, N, s1, s2, sk,
        *w1.stride(), b1.stride(0), *w2.stride(), b2.stride(0),
        BM=bm, KP=kp, NP=np_, BH=bh, PREC=dot_precision(out.dtype), COL64=_col64(K, sk), num_warps=warps,
    )
    return out


@on_input_device
def _bwd_impl(grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
              b2: torch.Tensor, params: bool = True, inputs: bool = True):
    """``(dx, dw1, db1, dw2, db2)``, each in its input's dtype; the dots run in ``grad``'s dtype (the
    forward's compute dtype). With ``params=False`` (no parameter needs a gradient: frozen) the four
    parameter gradients are None and neither the weight kernel nor the reduction runs; with
    ``inputs=False`` (x needs none) dx is None and the dx kernel does not run."""
    K, H, N = x.shape[-1], w1.shape[0], w2.shape[0]
    _check_width(K, N)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype) if inputs else None
    x, R, R2, s1, s2, sk = _rows(x)
    grad, _, _, g1, g2, gn = _rows(grad)
    grads = [torch.empty(p.shape, device=p.device, dtype=p.dtype) for p in (w1, b1, w2, b2)] if params else None
    if R == 0 or N == 0:  # no row, or no output: every gradient is zero
        dx = None if dx is None else dx.zero_()
        return (dx, *(g.zero_() for g in grads)) if params else (dx, None, None, None, None)
    kp, np_, _, (bm, bh), (bmw, bhw), warps = _config(K, N)
    prec = dot_precision(grad.dtype)
    col64 = _col64(K, sk) or _col64(N, gn)
    if inputs:
        launch(_ffn_bwd_dx_kernel)[(cdiv(R, bm),)](
            dx, grad, x, w1, b1, w2, R, R2, K, H, N, s1, s2, sk, g1, g2, gn,
            *w1.stride(), b1.stride(0), *w2.stride(),
            BM=bm, KP=kp, NP=np_, BH=bh, PREC=prec, COL64=col64, num_warps=warps,
        )
    if not params:
        return dx, None, None, None, None
    chunks = max(1, cdiv(H, bhw))  # one chunk even when H = 0: chunk 0 writes db2
    row_blocks = cdiv(R, bmw)
    G = max(1, min(row_blocks, persistent_programs(x.device) // chunks))
    part = torch.empty((G, H * K + H + N * H + N), device=x.device, dtype=torch.float32)
    launch(_ffn_bwd_w_kernel)[(G, chunks)](
        part, grad, x, w1, b1, w2, R, R2, K, H, N, row_blocks, s1, s2, sk, g1, g2, gn,
        *w1.stride(), b1.stride(0), *w2.stride(), part.stride(0),
        BM=bmw, KP=kp, NP=np_, BH=bhw, PREC=prec, COL64=col64, num_warps=warps,
    )
    sum_partials(part, grads)
    return (dx, *grads)


# ============================================================================ torch.library
@torch.library.custom_op("interformer::feed_forward_fwd", mutates_args=())
def feed_forward_fwd(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                     b2: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Forward: ``[..., N]`` in ``dtype``, the compute dtype (None: x's)."""
    return _fwd_impl(x, w1, b1, w2, b2, dtype)


@feed_forward_fwd.register_fake
def _feed_forward_fwd_fake(x, w1, b1, w2, b2, dtype=None):
    return x.new_empty((*x.shape[:-1], w2.shape[0]), dtype=x.dtype if dtype is None else dtype)


@torch.library.custom_op("interformer::feed_forward_bwd", mutates_args=())
def feed_forward_bwd(grad_out: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                     w2: torch.Tensor, b2: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dx, dw1, db1, dw2, db2)``, each shaped and typed like its input."""
    return _bwd_impl(grad_out, x, w1, b1, w2, b2)


@feed_forward_bwd.register_fake
def _feed_forward_bwd_fake(grad_out, x, w1, b1, w2, b2):
    return tuple(t.new_empty(t.shape) for t in (x, w1, b1, w2, b2))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])  # x, w1, b1, w2, b2 (not the dtype)


def _backward_with(bwd):
    """The autograd formula, calling ``bwd`` (the custom op when traced, the launcher in eager)."""
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None, None, None, None
        return (*bwd(grad_out, *ctx.saved_tensors), None)
    return backward


def _lean_backward(ctx, grad_out):
    """The eager path's formula: without the weight kernel when no parameter needs a gradient
    (frozen), without the dx kernel when x needs none, and with None for every gradient not needed."""
    if grad_out is None:
        return None, None, None, None, None, None
    need = ctx.needs_input_grad
    grads = _bwd_impl(grad_out, *ctx.saved_tensors, params=any(need[1:5]), inputs=need[0])
    return (*needed(grads, need), None)


feed_forward_fwd.register_autograd(_backward_with(torch.ops.interformer.feed_forward_bwd),
                                   setup_context=_setup_context)


# eager entry point (see interformer.kernels._dispatch): same launchers, no custom-op dispatch
_FeedForward = lean_function("_FeedForward", saving_forward(_fwd_impl, _setup_context), _lean_backward,
                             _backward_with(torch.ops.interformer.feed_forward_bwd))
inline_when_compiled(feed_forward_fwd, feed_forward_bwd)


# ============================================================================ public function
def _check(x, w1, b1, w2, b2) -> None:
    op = "feed_forward"
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{op}: x must be a tensor [..., K], got {describe_shape(x)}")
    K = x.shape[-1]
    if not isinstance(w1, torch.Tensor) or w1.dim() != 2 or w1.shape[1] != K:
        raise ValueError(f"{op}: w1 must be a tensor [H, K={K}], got {describe_shape(w1)}")
    H = w1.shape[0]
    if not isinstance(w2, torch.Tensor) or w2.dim() != 2 or w2.shape[1] != H:
        raise ValueError(f"{op}: w2 must be a tensor [N, H={H}], got {describe_shape(w2)}")
    N = w2.shape[0]
    for name, t, n in (("b1", b1, H), ("b2", b2, N)):
        if not isinstance(t, torch.Tensor) or t.shape != (n,):
            raise ValueError(f"{op}: {name} must be a tensor [{n}], got {describe_shape(t)}")
    tensors = {"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2}
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise ValueError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got "
                         + ", ".join(f"{name} on {t.device}" for name, t in tensors.items()))


def feed_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Fused ``silu(x @ w1^T + b1) @ w2^T + b2``; same contract as
    :func:`interformer.reference.feed_forward` (see the module docstring for the kernel design).

    x ``[..., K]`` (any strides), w1 ``[H, K]``, b1 ``[H]``, w2 ``[N, H]``, b2 ``[N]`` -> contiguous
    ``[..., N]``. K or N above :data:`FUSED_MAX_FEATURES` (64) runs the eager reference: wider,
    cuBLAS was faster on a GPU (see there).
    """
    if isinstance(x, torch.fx.Proxy):  # torch.fx.symbolic_trace: record this call (_dispatch.fx_call)
        return fx_call(feed_forward, x, w1, b1, w2, b2)
    _check(x, w1, b1, w2, b2)
    dev = x.device.type
    dtype = x.dtype
    cast = autocast_dtype(dev)
    if cast is not None:
        # x is read as it is (an fp32 token stream under bf16 autocast, say): the kernels round each
        # tile to the compute dtype as they load it, which is what eager's cast of x does, without
        # the cast's copy and its backward's (dx comes back in x's dtype from the kernel)
        dtype = cast
    elif any(t.dtype != x.dtype for t in (w1, b1, w2, b2)):
        raise ValueError(f"feed_forward: x, w1, b1, w2 and b2 must share one dtype outside autocast, got "
                         f"{x.dtype}, {w1.dtype}, {b1.dtype}, {w2.dtype}, {b2.dtype}")
    # wider than the kernels win at (or than they hold), or under a torch.func transform, ONNX export
    # (_dispatch.reference_only): the reference
    widest = min(int_setting("FUSED_MAX_FEATURES", FUSED_MAX_FEATURES, 0, optional=False), MAX_FEATURES)
    if x.shape[-1] > widest or w2.shape[0] > widest or reference_only(x):
        from interformer import reference

        return reference.feed_forward(x, w1, b1, w2, b2)
    tensors = (x, w1, b1, w2, b2)
    if tracing(tensors):
        return torch.ops.interformer.feed_forward_fwd(*tensors, dtype)
    if needs_grad(tensors):
        return _FeedForward.apply(*tensors, dtype)
    return _fwd_impl(*tensors, dtype)
