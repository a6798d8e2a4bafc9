"""Flash-style rotary attention with padding from lengths: Triton forward and backward.

One kernel family serves both attention faces of InterFormer (DESIGN §3/§4):

* the Sequence Arch's self-attention (``RotaryMultiHeadAttention``): per-sample q, k, v, rotary on
  q and k, key padding and query padding from ``valid_lengths``;
* the Cross Arch's PMA pooling (``PoolingMultiHeadAttention``): learned queries shared over the
  batch (``q.shape[0] == 1``) over the valid body tokens, no rotary, no query masking. The module
  folds its key and value projections into the call (its docstring): ``num_queries * num_heads``
  queries of width ``d_model`` in ONE head, the sequence itself as both k and v, so K and V are
  never computed.

Public functions (same names and signatures as in :mod:`interformer.reference`)::

    attention(q, k, v, lengths, causal=False, rope_base=None, rope_q=True, mask_queries=True, sm_scale=None)
    pooled_attention(s, lengths, query, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias, num_heads)

``pooled_attention`` is the whole PMA op (``PoolingMultiHeadAttention``) with the key and value
projections folded into the queries and one output matrix, around one ``attention`` launch
(its docstring, and the module's for the algebra). The fold itself is one more launch
(``_pma_fold_kernel``, one program per head, over the parameters only), and so are its gradients
(``_pma_fold_bwd_kernel``).

Layout and contract
-------------------
* q ``[Bq, Lq, H, dh]`` with ``Bq`` in ``{B, 1}``; k, v ``[B, Lk, H, dh]``; fp32, fp16 or bf16 (all
  three the same dtype). ``dh`` in ``{16, 32, 64, 128}`` is the fast path (no padded columns); any
  other ``dh <= 128`` (even with rotary; e.g. 6 or 10 for DESIGN's odd d_model 24 and 40) runs in a
  register tile padded to the next power of two >= 16 with masked columns. With rotary, the two
  halves of a padded head are placed at the starts of the two halves of the tile, so the rotate-half
  partner of every register column is the column DHP/2 away, as in the unpadded case. Heads wider
  than 128 go to the eager reference (same math and autograd), as the other ops' large shapes do.
* Every tensor is read through its four strides, so the non-contiguous views
  ``qkv(s).view(B, L, 3, H, dh).unbind(2)`` (row stride ``3*H*dh``) are read in place: no transpose,
  no ``.contiguous()``. A shared query (``Bq == 1``) is read with batch stride 0. The output is a new
  contiguous ``[B, Lq, H, dh]`` tensor in the input dtype.
* Packed q, k, v: :func:`attention_packed` takes one contiguous ``[B, L, 3, H, dh]`` tensor (what
  ``RotaryMultiHeadAttention``'s projection gives, viewed) and, when it requires grad, calls the packed
  op ``interformer::attention_qkv_fwd``: same kernels, but the backward writes dq, dk, dv straight into
  one contiguous gradient of that tensor, so autograd's ``UnbindBackward`` never has to
  ``torch.stack`` three separate gradients (one read and one write of ``3 B L d`` elements saved).
  Under ``torch.compile`` the generic op is traced instead. (Until 2026-11-27 :func:`attention`
  recognised such slices by their views and took the packed op itself, which sent the gradient to
  the packed tensor past the caller's q, k, v: ``autograd.grad`` with respect to q failed, and
  hooks on q never fired.)
* ``lengths [B]`` (any integer dtype) is clamped to ``[0, Lk]`` for keys and ``[0, Lq]`` for query
  rows. Key ``j`` is visible to query ``i`` when ``j < lengths[b]`` (and ``j <= i`` if ``causal``).
  With ``mask_queries``, rows ``i >= lengths[b]`` output exact zeros and pass zero gradient. A row
  with no visible key outputs 0 and passes zero gradient, never NaN (``lengths[b] == 0``).
* Rotary (rotate-half, pair ``(i, i + dh/2)`` rotated by ``pos * base^(-2i/dh)``) is applied inside
  the kernels to every q/k tile right after it is loaded: ``x_rot = x * cos + x_swapped * sin_signed``,
  where ``x_swapped`` is a second (cache-hitting) load of the same rows with the two halves of the
  head dim exchanged. The angles come from a small fp32 table ``[2, max(Lq, Lk), dh/2]`` (cos, sin)
  built with exactly the reference's formula: cached per (device, dh, base) in eager mode (one
  table, grown when a longer sequence comes; see ``_rope_table``),
  built by ops recorded in the graph under torch.compile (the custom ops' ``rope_table`` argument), so
  compiled code, CUDA-graph pools included, never holds a cached tensor. The
  kernels never evaluate sin/cos (fp32 sin/cos of angles up to ~1000 rad would cost more ALU than the
  whole softmax at dh = 16). Backward applies the inverse rotation (the same with sin negated) to the
  dq/dk accumulators in registers (a half swap through ``reshape/permute/split/join``).

Forward (``_attn_fwd_kernel``)
------------------------------
One program per (b, h, query block of ``BLOCK_M`` rows); 1-D grid ordered query block fastest, then
head, then batch, so programs that share k/v rows (same b) run next to each other and hit L2.
Online softmax in the log2 domain (``exp2``) with fp32 statistics and fp32 accumulator; scores are
never stored. The key loop stops at ``min(lengths[b], Lk)`` (and at the diagonal when causal), and a
query block whose rows are all masked (``start >= lengths[b]`` with ``mask_queries``) skips the loop
and only writes its zeros: at the benchmark shapes lengths are uniform in ``[0, T]``, so about half of
all blocks are padding and never read. The key loop is split in two: blocks that are fully visible
run without any masking arithmetic, only the last partial block (and the causal diagonal) is masked.
Stores ``O`` and the softmax statistics ``stats [B, H, 2, Lq]`` (fp32; below). Non-finite values
propagate as in the reference: a NaN or an inf in the scores of a live row makes its output NaN,
and a live row whose visible scores are all ``-inf`` is 0/0 = NaN; only masked rows and rows
without a visible key (length 0) are zeros. (The row test was once ``exp-sum > 0``, which is False
for NaN, and turned such rows into zeros: tests/test_nonfinite.py.)

Softmax statistics. The running maximum is taken over the raw scores ``S = Q K^T`` (negated when
the scale is negative), and the scale is applied to differences: ``P = exp2((S - m) * |scale| *
log2e)``. Per row the forward stores ``m`` and ``log2`` of the exp-sum (``stats[b, h, 0]`` and
``[1]``; a row that outputs 0 stores 0 and +inf), and the backward recomputes ``P = exp2((S - m) *
|scale| * log2e - log2(l))``. So the backward's ``S - m`` is the forward's, exactly: the same raw
scores (the same ``tl.dot``) minus the same stored maximum, with no product before the subtraction
that a compiler could fuse into it. The usual single log-sum-exp (``m * scale + log(l)``, scores
scaled before the subtraction) breaks at large scores: ``exp2`` of a rounding error of ``|score| *
2**-24`` (a log-sum-exp kept in natural log and turned back to log2 is one rounding off in about
one row in seven; Triton fuses multiplies and adds by default, and a backward's ``S * scale -
lse`` made one multiply-add subtracts from an unrounded product), and past ``2**24`` the
log-sum-exp cannot hold ``log2(l)`` at all (two tied keys get p = 1 each). On the H200 (c77021c)
dv was inf at scores of 1e34. tests/test_nonfinite.py checks scores from 1e4 to 1e34 with a tie. (The dk/dv kernel of the
general backward forms ``K Q^T``: that its scores are bitwise the transpose of ``Q K^T`` is the
tensor cores', not a promise; the single-query-block backward forms ``Q K^T`` as the forward does.
"The same ``tl.dot``" is the same source, not a promise of the same bits in tiles of other widths:
on a GPU each score is summed over the head dimension in the order of the dot instruction Triton
picks for the tile, which the forward's and the backward's kernels may pick differently (not
checked); under the interpreter numpy's matmul may sum in another order for another tile shape, and
there the fp32 backward's scores do differ from the forward's in their last bits, which a very
peaked softmax makes visible in the gradients: an attention fuzzing helper saw dq at 4-10x eager's
error, where eager also missed 1e-5.)

Block sizes (fixed by the shape and dtype, no autotune, so backward never depends on a hidden
choice; ``_fwd_config``)::

    Lq <= 64 : BLOCK_M = next_pow2(Lq) (min 16; PMA's 2 queries pad to 16 rows with masks)
    Lq <= 256: BLOCK_M = 64                     (amazon L = 104: two query blocks)
    else     : BLOCK_M = 128, 8 warps           (long L = 1004; 64 for fp32 128-wide heads)
    BLOCK_N  = next_pow2(Lk) capped at 64 (128 when BLOCK_M <= 32: PMA streams keys in wide blocks),
               capped at 32 for 128-wide heads and for fp32 heads >= 64 (tf32x3 doubles operands)

At the DESIGN shapes in bf16 (taobao/amazon dh 16, long dh 32, PMA) every kernel compiles for sm_90
without register spills (checked with an ahead-of-time ``triton.compile`` for ``GPUTarget("cuda", 90,
32)``); 128-wide heads and fp32 at dh >= 64 spill a few dozen bytes.

Backward
--------
``P`` recomputed from q, k and the statistics (above); ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P *
(dP - delta)`` with ``delta = rowsum(P * dP)``, ``dQ = scale * dS K_rot``, ``dK = scale * dS^T Q_rot``,
then dq/dk are rotated back. ``delta`` equals ``rowsum(dO * O)``, which flash attention reads from
the stored output so as not to need every key block before the first ``dS``. This package forms
``rowsum(P * dP)`` from the recomputed P and dP instead, as the reference's softmax backward does.
Reason: ``dP - delta`` of a near one-hot softmax is a small difference of two numbers of order one,
and with delta from O it carried the difference between the forward's P (its running maximum,
the fp16 rounding of its P tile, O's own rounding) and the backward's: fp16 dq was off by 0.76
(relative) where eager's was 1.8e-2 (two keys, scores of standard deviation 36; from P and dP,
8.8e-3), and fp32 dq by 3.0e-3 where eager's was 2.4e-4 (past one key block; from P and dP the
same 2.4e-4: a review's measurement, interpreter). Where (the launcher's ``DELTA`` constexpr,
:func:`_delta_form`):

* every key in one block (``Lk <= BLOCK_N``: in 16-bit at most 64 keys, 128 for PMA's few queries;
  in fp32 32 or 16; taobao): from that block's P and dP, divided by its ``rowsum(P)`` as below, in
  the gradient loop's one pass (O is not read; fp32 with 64 < Lq <= 128 over 16 keys had dq 4-10x
  eager's error without the division, the forward's 64-row tiles against the backward's 128);
* past one block (amazon's 104 keys, long, PMA at long), and in the general backward however few the
  keys: a pass of its own over the key blocks before the gradient loop (``_delta_pass``: the loop's
  loads and its ``Q K^T`` and ``dO V^T`` dots, so that the loop's ``dP - delta`` is a difference of
  consistent fp32 values, and the sum divided by the recomputed ``rowsum(P)``, which a few ulps of
  score difference between forward and backward move off 1; the dk/dv kernel's transposed ``dP``
  agrees with them to fp32 rounding), in the single-query-block kernel, or in the general path's dq
  kernel, which stores it for the dk/dv kernel launched after it (in fp32 a kernel of its own,
  ``_attn_bwd_delta_kernel``, forms it before both: the fp32 dq kernel with the pass built to 32
  registers and a 7.9 KB stack at 128-wide heads, the delta kernel to 154, 248 and 255 registers at
  32-, 64- and 128-wide heads, the last with a 904-byte stack where the dq kernel without the pass
  has 1,208; sm_90, Triton 3.6). Cost: two more dots per key block (the gradient loop has five in
  the single-query-block kernel; the general path seven per tile pair, split over its two kernels)
  and the k/v tiles loaded twice (from L2 but for the first pass), O not read. sm_90 builds (Triton
  3.6, ``profiling/sm90-audit-triton3.6.md``): amazon's self-attention backward 157 -> 171 registers
  (one 8-warp program per SM either way), long's dq kernel 160 -> 151 (3 per SM either way; the
  preprocess launch gone), PMA at long 84 either way. Not timed on a GPU yet: ``BACKWARD_DELTA =
  "output"`` keeps the stored-output form for that (benchmark providers ``fused-delta-output``,
  self-attention and PMA); the near one-hot case over 66 and 130 keys gives its 0.76 error again
  (tests/test_kernel_attention.py).

Pivoted dS in fp32 (``_pivot_pass``; constexpr branches on q's dtype, so fp16/bf16 build to the
same machine code as before: the SASS fingerprints of the 16 fp16/bf16 backward specialisations at
the test and DESIGN head widths agree before and after, sm_90, Triton 3.9). Even from P and dP,
``dP - delta`` carries the rounding of delta, an ulp of dP's size, and in a row whose softmax is
near one-hot that is large against the true ``dS`` of its most probable key (of the size of the
other keys' P): under the interpreter fp32 dq was at eager's error (2.4e-4, eager rounds the same
way), on the H200 at 4x it (1.17e-3 over two keys, past DESIGN's 1e-3), where ``ex2.approx`` and
the log2 leave ``rowsum(P)`` off 1 and ``div.full.f32`` (Triton's fp32 ``/``) rounds the division
by it (``profiling/near_one_hot_emulation.py`` replays the kernel with that arithmetic: 1.1e-3).
So fp32 keeps delta as ``c + t``: ``c`` is dP at the row's most probable key, ``t = rowsum(P *
(dP - c)) / rowsum(P)`` (small where the softmax is peaked), and ``dS = P * ((dP - c) - t)``:
``dP - c`` is 0 at that key, exactly where the loop's dP there is bitwise the pass's (the same
dots in the single-query-block kernel; in the general backward the dk/dv kernel's transposed dot
may differ by an ulp on a GPU, which would leave that ulp in its dk); dq 4.2e-6 and dk 4.6e-6 there
under the interpreter, 1.6e-6 in the emulation. The pass moves ``c`` when a later key block holds a
more probable key (``t += (c_old - c_new) * rowsum(P so far)``). The general backward stores ``c``
where the 16-bit paths store delta and ``t`` in a second half of the buffer (``_pivot_half``, which
takes B * H from the grid: the delta, dq and dk/dv grids must stay ``B * H * blocks``); with
``BACKWARD_DELTA = "output"`` ``c`` is ``rowsum(dO * O)`` and ``t`` is 0 (the same dS as before).
Cost: a row maximum and a masked one per key block (the fp32 builds at the test shapes: registers
within 4 of before, the 64 x 32 fused kernel's spill stores 8 -> 6; at 128-wide heads more spills:
the fused kernel's stores 87 -> 100, the delta kernel's 1702 -> 1810, Triton 3.9).

Two structures, chosen by the shape:

* **single query block** (``Lq <= 128``: taobao, amazon, PMA; in fp32 only while ``next_pow2(Lq) *
  DHP <= 4096``, the shared memory an H100 has for it) -- ``_attn_bwd_fused_kernel``: ONE launch,
  one program per (b, h). It loads q, dO and the statistics of the whole sequence once (O too, and
  delta from it, with ``BACKWARD_DELTA = "output"`` past one key block), loops over the valid key
  blocks computing and storing dk, dv of each block (complete, as every query is in the program)
  while dq accumulates in registers; key blocks past the length get their zeros stored without any
  compute. Every tensor is read once and written once (the delta pass aside). sm_90 builds at
  taobao (bf16, ``profiling/sm90_audit.py``), delta in the loop against the O-based delta: PMA 96
  registers against 98 (5 programs per SM against 4) with Triton 3.6 and 3.9, self-attention 155
  against 151 (3.6) and 157 against 150 (3.9), 3 per SM either way; no spills (with the division by
  ``rowsum(P)``, Triton 3.6: PMA 96, self-attention 149). (A first version
  chose the delta form at run time and built to 202 registers with Triton 3.9 in a review: 2
  programs per SM.)
* **general** (``Lq > 128``: long, and the wider fp32 shapes) -- the flash-attention-2 split:
  ``_attn_bwd_dq_kernel`` (one program per query block, loop over valid key blocks; for fp16/bf16 it
  forms delta first, above), then ``_attn_bwd_dkdv_kernel`` (one program per key block, loop over
  query blocks from the diagonal when causal, up to the query limit); in fp32
  ``_attn_bwd_delta_kernel`` forms delta before them, and with ``BACKWARD_DELTA = "output"``
  ``_attn_bwd_preprocess_kernel`` does, from O. Fully padded key/query blocks skip their loops and
  only store zeros. No atomics, so results are deterministic. 64 x 64 tiles
  (``_general_bwd_config``: 32-wide for 128-wide heads, 32-row query steps in dk/dv for fp32).

k and v as one tensor (PMA's folded call, ``attention(q, s, s, ...)``), the ``SAME_KV`` variants:
when the eager entry is given the same tensor object as k and v, its backward kernels store that
tensor's whole gradient, dk + dv, in one output (no separate dv, and no add of the two by autograd,
which would read both and write a third ``B x L x d`` tensor), and every kernel of the call reads
a key tile once for both where k is not rotated. The forward alone also takes the one-load
variant for two tensors with the same data pointer, dtype and strides (their gradients stay
separate). Traced calls keep the custom op's (dq, dk, dv).
The launchers also take k and v in a dtype other than q's (``pooled_attention`` passes the
sequence in fp32 under a 16-bit autocast): each k/v tile is rounded to q's dtype as it is loaded
(without rotary exactly what a cast before the call would do; with it, the fp32 tile is rotated
before its one rounding), without the cast's copy; the output has q's dtype, dk and dv k's. The
public :func:`attention` keeps one dtype for all three (the reference's contract).

Shared queries (``Bq == 1 < B``): the kernels write each sample's dq into an fp32 ``[B, Lq, H, dh]``
buffer and ``torch.sum`` reduces it over B (a tiny reduction: Lq = 2 rows per sample for PMA); this is
the only part of the op that is not a Triton kernel. Nothing goes to cuBLAS.

On GPU, fp32 inputs use ``tl.dot(input_precision="tf32x3")`` (three tf32 tensor-core passes, about
fp32 accuracy: plain tf32 would sit right at DESIGN §5's 1e-3 GPU tolerance after the softmax's
amplification); fp16/bf16 inputs feed the tensor cores directly with fp32 accumulation; P and dS
are rounded to the input dtype before their matmuls (as in flash-attention). Under
``TRITON_INTERPRET=1`` everything is exact fp32.

``torch.library``: ``interformer::attention_fwd`` (``float? rope_base``, ``float? sm_scale``, a last
``Tensor? rope_table`` that traced calls fill, None meaning the cached table; returns ``(out, stats)``) and ``interformer::attention_bwd`` (returns ``(dq, dk, dv)``), plus the packed pair
``interformer::attention_qkv_fwd`` / ``interformer::attention_qkv_bwd``, are ``custom_op`` s with fake
implementations; each forward has a registered autograd formula that calls its backward op, so
``torch.compile(fullgraph=True)`` traces forward and backward. Scalars reach the kernels as Python
floats (fp32 kernel arguments); the op boundary is opaque to Inductor. Outside tracing,
:func:`attention` calls the same launchers (generic or packed) through a plain ``autograd.Function``
with the same saved tensors and the same differentiable ``(out, stats)`` outputs, or calls the forward
launcher alone when no input needs a gradient; this skips the custom op's dispatch overhead (see
:mod:`interformer.kernels._dispatch`).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from interformer import reference

from ._common import KERNEL_DTYPES, cdiv, describe_shape, dot_precision, int32_block, next_pow2, on_input_device
from ._dispatch import (autocast_dtype, inline_when_compiled, launch, lean_function, needed as _needed, needs_grad,
                        reference_only, savable, saving_forward, tracing)

__all__ = ["attention", "attention_packed", "pooled_attention"]

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
_DTYPES = KERNEL_DTYPES
# Largest query length handled by the single-program-per-(b, h) backward.
_FUSED_BWD_MAX_LQ = 128

#: The single-query-block backward's ``(BLOCK_N, num_warps)`` in place of :func:`_fused_bwd_config`'s
#: where not None, BLOCK_N capped at the default's (a wider key tile than the default's caps for the
#: dtype and head width can exceed shared memory): a setting kept for measurement (benchmark provider
#: ``fused-narrow``: ``(16, 4)``). A key tile narrower than the keys also moves delta from the one
#: block's loop to a pass of its own (:func:`_delta_form`).
#: Why: at amazon (bf16, dh 16, 104 queries over 8192 (b, h)) the default 128 x 64 tile at 8 warps
#: builds to 174 registers, one program an SM (62 waves of 8 warps); 128 x 16 at 4 warps to 134,
#: three an SM (21 waves, 12 warps resident); 128 x 32 at 4 warps to 236, two (sm_90, Triton 3.9,
#: ``interformer.kernel_audit``). In the compiled amazon training step of the second H200 lease of
#: 2026-11-28 that kernel took 430 us a launch. Not timed yet.
FUSED_BWD_TILE = None

#: How the backward forms ``delta = rowsum(P * dP)`` where the keys span more than one block, and in
#: the general backward (module docstring, "Backward"): ``"probs"`` (the default) sums ``P * dP`` in a
#: first pass over the key blocks, as the reference's softmax backward does; ``"output"`` reads
#: ``rowsum(dO * O)`` from the stored output (flash attention's form: no pass, but off where the
#: softmax is near one-hot), kept so that a GPU run can time the pass against it (benchmark
#: providers ``fused-delta-output``).
BACKWARD_DELTA = "probs"

# the kernels' DELTA constexpr: where delta comes from (chosen by _delta_form)
_DELTA_IN_LOOP = 0  # every key in one block: rowsum(P * dP) / rowsum(P) of that block, in the loop's one pass
_DELTA_FROM_O = 1  # rowsum(dO * O) from the stored output
_DELTA_PASS = 2  # rowsum(P * dP) / rowsum(P) summed in a first pass over the key blocks


# ============================================================================ Triton helpers
@triton.jit
def _colmap(c, DH: tl.constexpr, DHP: tl.constexpr, SPLIT: tl.constexpr):
    """Memory column of register columns ``c`` of a ``DHP``-wide tile holding a ``DH``-wide head,
    and whether that column exists. With SPLIT (rotary), each half of the head sits at the start of
    one half of the tile, so the rotate-half partner of register column c is always c +- DHP/2."""
    if SPLIT:
        col = tl.where(c < DHP // 2, c, DH // 2 + c - DHP // 2)
        ok = (c % (DHP // 2)) < DH // 2
    else:
        col = c
        ok = c < DH
    return col, ok


@triton.jit
def _mask2(row_ok, col_ok, DH: tl.constexpr, DHP: tl.constexpr):
    if DH == DHP:
        m = row_ok[:, None]
    else:
        m = row_ok[:, None] & col_ok[None, :]
    return m


@triton.jit
def _rope_cos_sin(TAB, offs_l, row_ok, tab_len, DH: tl.constexpr, DHP: tl.constexpr):
    """cos and signed sin ``[rows, DHP]`` for positions ``offs_l`` (0 where ``row_ok`` is False).

    The table is fp32 ``[2, tab_len, DH/2]``. Register column c uses frequency ``c % (DHP/2)``; the sin
    is negated on the first half, so that ``rot(x) = x * cos + swap_halves(x) * sin_signed``.
    """
    c = tl.arange(0, DHP)
    fi = c % (DHP // 2)
    m = _mask2(row_ok, fi < DH // 2, DH, DHP)
    ptr = TAB + offs_l[:, None] * (DH // 2) + fi[None, :]
    cs = tl.load(ptr, mask=m, other=0.0)
    sn = tl.load(ptr + tab_len * (DH // 2), mask=m, other=0.0)
    sn = tl.where((c < DHP // 2)[None, :], -sn, sn)
    return cs, sn


@triton.jit
def _load_rows(base, offs_l, lim, stride_l, stride_d, TAB, tab_len,
               ROPE: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, SPLIT: tl.constexpr):
    """Rows ``offs_l`` (< ``lim``; zero elsewhere and in padded columns) of a ``[L, DH]`` slice as a
    ``[rows, DHP]`` tile, rotary applied if ROPE. The rotated tile is computed in fp32 from a second
    load of the same rows with the halves exchanged, and returned in the input dtype (for ``tl.dot``)."""
    c = tl.arange(0, DHP)
    col, col_ok = _colmap(c, DH, DHP, SPLIT)
    ok = offs_l < lim
    row_ptr = base + offs_l[:, None] * stride_l
    x = tl.load(row_ptr + col[None, :] * stride_d, mask=_mask2(ok, col_ok, DH, DHP), other=0.0)
    if ROPE:
        col_sw, col_sw_ok = _colmap((c + DHP // 2) % DHP, DH, DHP, SPLIT)
        xs = tl.load(row_ptr + col_sw[None, :] * stride_d, mask=_mask2(ok, col_sw_ok, DH, DHP), other=0.0)
        cs, sn = _rope_cos_sin(TAB, offs_l, ok, tab_len, DH, DHP)
        x = (x.to(tl.float32) * cs + xs.to(tl.float32) * sn).to(x.dtype)
    return x


@triton.jit
def _load_v(k, v_base, offs_l, lim, stride_l, stride_d, TAB, tab_len, ROPE_K: tl.constexpr, SAME_KV: tl.constexpr,
            DH: tl.constexpr, DHP: tl.constexpr, SPLIT: tl.constexpr):
    """The v tile of rows ``offs_l`` in the dtype of the k tile (q's): the k tile itself when k and v
    are one tensor (SAME_KV) and k is not rotated, else a load of its own."""
    if SAME_KV and not ROPE_K:
        v = k
    else:
        v = _load_rows(v_base, offs_l, lim, stride_l, stride_d, TAB, tab_len, False, DH, DHP, SPLIT).to(k.dtype)
    return v


@triton.jit
def _store_rows(base, x, offs_l, lim, stride_l, stride_d,
                DH: tl.constexpr, DHP: tl.constexpr, SPLIT: tl.constexpr):
    col, col_ok = _colmap(tl.arange(0, DHP), DH, DHP, SPLIT)
    tl.store(base + offs_l[:, None] * stride_l + col[None, :] * stride_d,
             x.to(base.dtype.element_ty), mask=_mask2(offs_l < lim, col_ok, DH, DHP))


@triton.jit
def _store_dkdv(dk_base, dv_base, dk, dv, offs_l, lim, sdkl, sdkd, sdvl, sdvd, SAME_KV: tl.constexpr,
                DH: tl.constexpr, DHP: tl.constexpr, SPLIT: tl.constexpr):
    """Store a key block's gradients: dk and dv, or with SAME_KV their sum into dk alone."""
    if SAME_KV:
        _store_rows(dk_base, dk + dv, offs_l, lim, sdkl, sdkd, DH, DHP, SPLIT)
    else:
        _store_rows(dk_base, dk, offs_l, lim, sdkl, sdkd, DH, DHP, SPLIT)
        _store_rows(dv_base, dv, offs_l, lim, sdvl, sdvd, DH, DHP, SPLIT)


@triton.jit
def _swap_halves(x, ROWS: tl.constexpr, DHP: tl.constexpr):
    """``[x[:, DHP/2:], x[:, :DHP/2]]`` of a register tile ``[ROWS, DHP]``."""
    x3 = tl.permute(tl.reshape(x, (ROWS, 2, DHP // 2)), (0, 2, 1))
    lo, hi = tl.split(x3)
    y = tl.permute(tl.join(hi, lo), (0, 2, 1))
    return tl.reshape(y, (ROWS, DHP))


@triton.jit
def _unrotate(g, TAB, offs_l, lim, tab_len, ROWS: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr):
    """Inverse rotary of a gradient tile (rows >= ``lim`` become 0): ``g * cos - swap(g) * sin_signed``."""
    cs, sn = _rope_cos_sin(TAB, offs_l, offs_l < lim, tab_len, DH, DHP)
    return g * cs - _swap_halves(g, ROWS, DHP) * sn


@triton.jit
def _limits(LENS, b, Lq, Lk, MASK_Q: tl.constexpr):
    """(k_lim, q_lim): visible keys are ``j < k_lim``, live query rows ``i < q_lim``."""
    seq_len = tl.maximum(tl.load(LENS + b), 0)  # clamped in the lengths' own int type, then narrowed
    k_lim = tl.minimum(seq_len, Lk).to(tl.int32)
    if MASK_Q:
        q_lim = tl.minimum(seq_len, Lq).to(tl.int32)
    else:
        q_lim = (Lq + 0 * seq_len).to(tl.int32)
    return k_lim, q_lim


@triton.jit
def _program_block(n_blocks, H):
    """``(block, bh, b, h)`` of this program, where the grid enumerates ``(b, h, block)`` and
    ``block`` indexes the ``n_blocks`` row blocks of one head's sequence."""
    pid = tl.program_id(0).to(tl.int64)
    blk = (pid % n_blocks).to(tl.int32)
    bh = pid // n_blocks
    return blk, bh, bh // H, bh % H


@triton.jit
def _load_kv(k_base, v_base, offs_n, k_lim, skl, skd, svl, svd, TAB, tab_len, CDT: tl.constexpr,
             ROPE_K: tl.constexpr, SAME_KV: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, SPLIT: tl.constexpr):
    """The k and v tiles of key rows ``offs_n`` in the compute dtype CDT (q's), k rotated if ROPE_K."""
    k = _load_rows(k_base, offs_n, k_lim, skl, skd, TAB, tab_len, ROPE_K, DH, DHP, SPLIT).to(CDT)
    v = _load_v(k, v_base, offs_n, k_lim, svl, svd, TAB, tab_len, ROPE_K, SAME_KV, DH, DHP, SPLIT)
    return k, v


# ============================================================================ forward
@triton.jit
def _raw_scores(a, b, PREC: tl.constexpr, NEG: tl.constexpr):
    """``a @ b^T``, negated when the scale is negative (NEG): the scores in the raw domain, before
    the scale (see "Softmax statistics" in the module docstring)."""
    s = tl.dot(a, tl.trans(b), input_precision=PREC)
    if NEG:
        s = -s
    return s


@triton.jit
def _load_stats(STATS, bh, Lq, offs_m, row_ok):
    """A query block's softmax statistics: the raw-domain row maximum and log2 of the exp-sum."""
    st = STATS + bh * 2 * Lq + offs_m
    return tl.load(st, mask=row_ok, other=0.0), tl.load(st + Lq, mask=row_ok, other=0.0)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, offs_m, lo, hi, k_lim, qk_scale,
               skl, skd, svl, svd, TAB, tab_len,
               CAUSAL: tl.constexpr, ROPE_K: tl.constexpr, MASKED: tl.constexpr, SAME_KV: tl.constexpr,
               BLOCK_N: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, SPLIT: tl.constexpr,
               PREC: tl.constexpr, NEG: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_kv(k_base, v_base, offs_n, k_lim, skl, skd, svl, svd, TAB, tab_len, q.dtype, ROPE_K, SAME_KV,
                        DH, DHP, SPLIT)
        s = _raw_scores(q, k, PREC, NEG)
        if MASKED:
            vis = (offs_n < k_lim)[None, :]
            if CAUSAL:
                vis = vis & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(vis, s, float("-inf"))
        # (``s + 0.0``, the same maximum: reducing the dot's result itself took 47 more registers per
        # thread at long's 128 x 64 tiles in an sm_90 build, Triton 3.6: 1 program per SM, not 2)
        m_new = tl.maximum(m_i, tl.max(s + 0.0, 1))
        # a row whose scores are all -inf so far subtracts 0, not -inf: exp2(-inf - 0) = 0, where
        # exp2(-inf - -inf) would be NaN (see _attn_fwd_kernel's m_i)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_sub) * qk_scale)
        p = tl.exp2((s - m_sub[:, None]) * qk_scale)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    O, STATS,
    Q, K, V, LENS, TAB,
    qk_scale, Lq, Lk, H, tab_len, n_m_blocks,
    sqb, sql, sqh, sqd,
    skb, skl, skh, skd,
    svb, svl, svh, svd,
    sob, sol, soh, sod,
    CAUSAL: tl.constexpr, ROPE_Q: tl.constexpr, ROPE_K: tl.constexpr, MASK_Q: tl.constexpr, SAME_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, SPLIT: tl.constexpr,
    PREC: tl.constexpr, NEG: tl.constexpr,
):
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 from Inductor: _dispatch.py, "Float arguments"
    pid_m, bh, b, h = _program_block(n_m_blocks, H)
    k_lim, q_lim = _limits(LENS, b, Lq, Lk, MASK_Q)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, q_lim, sql, sqd, TAB, tab_len, ROPE_Q, DH, DHP, SPLIT)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    # the running maximum starts at -inf, not at a finite floor: with a floor of -1e30, a row whose
    # scores are all below it (fp32 |q . k| past 1e30) had exp2(s - floor) = 0 everywhere, a zero
    # sum and no output. A row with no visible key never enters the loop (and is zeroed below).
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DHP], tl.float32)

    hi = k_lim
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M)
    hi = tl.where(start_m < q_lim, hi, 0)  # a block of masked query rows reads nothing
    hi_full = (hi // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi_full = tl.minimum(hi_full, ((start_m + 1) // BLOCK_N) * BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, offs_m, 0, hi_full, k_lim, qk_scale,
                               skl, skd, svl, svd, TAB, tab_len, CAUSAL, ROPE_K, False, SAME_KV, BLOCK_N, DH, DHP,
                               SPLIT, PREC, NEG)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, offs_m, hi_full, hi, k_lim, qk_scale,
                               skl, skd, svl, svd, TAB, tab_len, CAUSAL, ROPE_K, True, SAME_KV, BLOCK_N, DH, DHP,
                               SPLIT, PREC, NEG)

    # A row outputs 0 only when it is masked or has no visible key (k_lim == 0; with a key, key 0 is
    # visible to every row, causal included). Testing ``l_i > 0`` instead would also zero a row whose
    # scores hold a NaN or an inf (l_i is NaN then, and NaN > 0 is False): the NaN the reference gives
    # would become a finite 0, which a GradScaler cannot see. A row whose visible
    # scores are all -inf has l_i = 0 and gives 0 / 0 = NaN, as the reference's softmax does.
    keep = (offs_m < q_lim) & (k_lim > 0)
    l_safe = tl.where(keep, l_i, 1.0)
    out = tl.where(keep[:, None], acc / l_safe[:, None], 0.0)
    _store_rows(O + b * sob + h * soh, out, offs_m, Lq, sol, sod, DH, DHP, SPLIT)
    # the softmax statistics (module docstring): a row that outputs 0 stores (0, +inf), so that
    # exp2(x - inf) = 0 for any key it would be recomputed against
    st = STATS + bh * 2 * Lq + offs_m
    tl.store(st, tl.where(keep, m_i, 0.0), mask=offs_m < Lq)
    tl.store(st + Lq, tl.where(keep, tl.log2(l_safe), float("inf")), mask=offs_m < Lq)


# ============================================================================ backward
@triton.jit
def _bwd_query_block(Q, DO, STATS, b, h, bh, offs_m, q_lim, k_lim, Lq, sqb, sql, sqh, sqd, sdob, sdol, sdoh, sdod,
                     TAB, tab_len, ROPE_Q: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, SPLIT: tl.constexpr):
    """What a backward program needs of its query rows ``offs_m``: the q tile (rotated if ROPE_Q), the
    dO tile, which rows take part (live rows of a sequence with a visible key) and their softmax
    statistics."""
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, q_lim, sql, sqd, TAB, tab_len, ROPE_Q, DH, DHP, SPLIT)
    do = _load_rows(DO + b * sdob + h * sdoh, offs_m, q_lim, sdol, sdod, TAB, tab_len, False, DH, DHP, SPLIT)
    row_ok = offs_m < tl.where(k_lim > 0, q_lim, 0)
    m_row, lg_row = _load_stats(STATS, bh, Lq, offs_m, row_ok)
    return q, do, row_ok, m_row, lg_row


@triton.jit
def _bwd_probs(q, k, offs_m, offs_n, row_ok, k_lim, m_row, lg_row, qk_scale,
               CAUSAL: tl.constexpr, PREC: tl.constexpr, NEG: tl.constexpr):
    """P of a ``[query rows, key rows]`` tile, recomputed from the forward's statistics (the module
    docstring's "Softmax statistics"): 0 where a key is not visible or the row takes no part.
    (``_attn_bwd_dkdv_kernel`` forms its transpose inline.)"""
    s = _raw_scores(q, k, PREC, NEG)
    vis = row_ok[:, None] & (offs_n < k_lim)[None, :]
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= offs_m[:, None])
    return tl.where(vis, tl.exp2((s - m_row[:, None]) * qk_scale - lg_row[:, None]), 0.0)


@triton.jit
def _pass_block(q, do, k_base, v_base, start_n, offs_m, row_ok, k_lim, m_row, lg_row, qk_scale, skl, skd, svl, svd,
                TAB, tab_len, CAUSAL: tl.constexpr, ROPE_K: tl.constexpr, SAME_KV: tl.constexpr,
                BLOCK_N: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
                NEG: tl.constexpr):
    """``(P, dP)`` of the key block at ``start_n`` for query rows ``offs_m``: the loads and dots of the
    gradient loops, shared by the delta passes (:func:`_delta_pass`, :func:`_pivot_pass`) so that
    their values are the loops' own."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k, v = _load_kv(k_base, v_base, offs_n, k_lim, skl, skd, svl, svd, TAB, tab_len, q.dtype, ROPE_K, SAME_KV,
                    DH, DHP, SPLIT)
    p = _bwd_probs(q, k, offs_m, offs_n, row_ok, k_lim, m_row, lg_row, qk_scale, CAUSAL, PREC, NEG)
    return p, tl.dot(do, tl.trans(v), input_precision=PREC)


@triton.jit
def _delta_pass(q, do, k_base, v_base, offs_m, row_ok, hi, k_lim, m_row, lg_row, qk_scale, skl, skd, svl, svd,
                TAB, tab_len, CAUSAL: tl.constexpr, ROPE_K: tl.constexpr, SAME_KV: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr,
                SPLIT: tl.constexpr, PREC: tl.constexpr, NEG: tl.constexpr):
    """``delta = rowsum(P * dP) / rowsum(P)`` of query rows ``offs_m`` over the key blocks below
    ``hi``, from the same loads and the same dots as the gradient loop that follows, so that its
    ``dP - delta`` is a difference of consistent fp32 values (``_DELTA_PASS``; module docstring,
    "Backward"). The division: where the recomputed scores are a few ulps off the forward's (the
    interpreter sums another tile shape's dots in another order), ``rowsum(P)`` is off 1 by more than
    rounding, and ``dP - rowsum(P * dP)`` carried that times ``dP``: fp32 dq 7.3x eager's error over
    40 keys in two blocks, 1.0x with it. The loop is not software-pipelined (``num_stages=1``):
    pipelined, long's dq kernel built to 177 registers (2 programs per SM, from 3), unpipelined to
    151 (sm_90, Triton 3.6)."""
    delta = tl.zeros([BLOCK_M], tl.float32)
    p_sum = tl.zeros([BLOCK_M], tl.float32)
    for start_n in tl.range(0, hi, BLOCK_N, num_stages=1):
        p, dp = _pass_block(q, do, k_base, v_base, start_n, offs_m, row_ok, k_lim, m_row, lg_row, qk_scale, skl, skd,
                            svl, svd, TAB, tab_len, CAUSAL, ROPE_K, SAME_KV, BLOCK_N, DH, DHP, SPLIT, PREC, NEG)
        delta += tl.sum(p * dp, 1)
        p_sum += tl.sum(p, 1)
    return delta / tl.where(p_sum > 0, p_sum, 1.0)


@triton.jit
def _pivot(p, p_top, dp):
    """fp32 dS's pivot ``c`` of each row of a ``[query rows, key rows]`` tile (:func:`_pivot_pass`):
    ``dP`` at the row's most probable key (the largest of them at a tie), 0 in a row with no weight."""
    c = tl.max(tl.where(p == p_top[:, None], dp, float("-inf")), 1)
    return tl.where(p_top > 0, c, 0.0)


@triton.jit
def _pivot_pass(q, do, k_base, v_base, offs_m, row_ok, hi, k_lim, m_row, lg_row, qk_scale, skl, skd, svl, svd,
                TAB, tab_len, CAUSAL: tl.constexpr, ROPE_K: tl.constexpr, SAME_KV: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr,
                SPLIT: tl.constexpr, PREC: tl.constexpr, NEG: tl.constexpr):
    """fp32's :func:`_delta_pass`: ``(c, t)`` with ``delta = c + t``, where ``c`` is ``dP`` at the
    row's most probable key and ``t = rowsum(P * (dP - c)) / rowsum(P)``, so that the gradient loop
    forms ``dP - delta`` as ``(dP - c) - t`` (module docstring, "Backward": the pivoted dS). ``c``
    changes when a later key block holds a more probable key; the sum so far is moved to the new
    pivot by ``(c_old - c_new) * rowsum(P so far)``, which is small where the softmax is near
    one-hot (the earlier blocks' weight is). Same loads, dots and loop as :func:`_delta_pass`."""
    c = tl.zeros([BLOCK_M], tl.float32)
    t = tl.zeros([BLOCK_M], tl.float32)
    p_top = tl.zeros([BLOCK_M], tl.float32)
    p_sum = tl.zeros([BLOCK_M], tl.float32)
    for start_n in tl.range(0, hi, BLOCK_N, num_stages=1):
        p, dp = _pass_block(q, do, k_base, v_base, start_n, offs_m, row_ok, k_lim, m_row, lg_row, qk_scale, skl, skd,
                            svl, svd, TAB, tab_len, CAUSAL, ROPE_K, SAME_KV, BLOCK_N, DH, DHP, SPLIT, PREC, NEG)
        p_blk = tl.max(p, 1)
        new = p_blk > p_top
        c_new = tl.where(new, _pivot(p, p_blk, dp), c)
        t = tl.where(new, t + (c - c_new) * p_sum, t) + tl.sum(p * (dp - c_new[:, None]), 1)
        p_sum += tl.sum(p, 1)
        p_top = tl.maximum(p_top, p_blk)
        c = c_new
    return c, t / tl.where(p_sum > 0, p_sum, 1.0)


@triton.jit
def _pivot_half(n_blocks, Lq):
    """Where fp32's stored delta (:func:`_pivot_pass`'s ``(c, t)``) keeps ``t``, in elements past
    ``c``: ``c`` is where the other dtypes keep delta (``DELTA [B, H, Lq]``), ``t`` in a second
    ``[B, H, Lq]`` half after it. ``B * H`` is the grid's size over ``n_blocks``, the row or column
    blocks of one (b, h). Pointer-free, so that the kernels form their addresses from DELTA
    themselves (what the interpreter's write analysis, ``written_params``, follows)."""
    return (tl.num_programs(0) // n_blocks).to(tl.int64) * Lq


@triton.jit
def _bwd_store_dq(DQ, dq, sm_scale, b, h, offs_m, q_lim, Lq, sdqb, sdql, sdqh, sdqd, TAB, tab_len,
                  ROPE_Q: tl.constexpr, BLOCK_M: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr,
                  SPLIT: tl.constexpr):
    """Scale the accumulated ``dS @ K``, undo q's rotation and store dq's rows."""
    dq = dq * sm_scale
    if ROPE_Q:
        dq = _unrotate(dq, TAB, offs_m, q_lim, tab_len, BLOCK_M, DH, DHP)
    _store_rows(DQ + b * sdqb + h * sdqh, dq, offs_m, Lq, sdql, sdqd, DH, DHP, SPLIT)


@triton.jit
def _attn_bwd_fused_kernel(
    DQ, DK, DV,
    DO, Q, K, V, O, STATS, LENS, TAB,
    sm_scale, qk_scale, Lq, Lk, H, tab_len,
    sdqb, sdql, sdqh, sdqd,
    sdkb, sdkl, sdkh, sdkd,
    sdvb, sdvl, sdvh, sdvd,
    sdob, sdol, sdoh, sdod,
    sqb, sql, sqh, sqd,
    skb, skl, skh, skd,
    svb, svl, svh, svd,
    sob, sol, soh, sod,
    CAUSAL: tl.constexpr, ROPE_Q: tl.constexpr, ROPE_K: tl.constexpr, MASK_Q: tl.constexpr, SAME_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, SPLIT: tl.constexpr,
    PREC: tl.constexpr, NEG: tl.constexpr, DELTA: tl.constexpr,
):
    """Whole backward of one (b, h) whose queries fit one block (``Lq <= BLOCK_M``). With SAME_KV (k
    and v one tensor) DK receives dk + dv and DV is never touched. DELTA: where delta comes from
    (``_DELTA_IN_LOOP``, every key in one block: the key loop runs at most once; ``_DELTA_FROM_O``;
    ``_DELTA_PASS``); O is read only with ``_DELTA_FROM_O``."""
    sm_scale = tl.cast(sm_scale, tl.float32)  # fp64 from Inductor: _dispatch.py, "Float arguments"
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 from Inductor: _dispatch.py, "Float arguments"
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    k_lim, q_lim = _limits(LENS, b, Lq, Lk, MASK_Q)

    offs_m = tl.arange(0, BLOCK_M)
    q, do, row_ok, m_row, lg_row = _bwd_query_block(Q, DO, STATS, b, h, bh, offs_m, q_lim, k_lim, Lq,
                                                    sqb, sql, sqh, sqd, sdob, sdol, sdoh, sdod, TAB, tab_len,
                                                    ROPE_Q, DH, DHP, SPLIT)

    dk_base = DK + b * sdkb + h * sdkh
    dv_base = DV + b * sdvb + h * sdvh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, DHP], tl.float32)
    hi = k_lim
    if CAUSAL:
        hi = tl.minimum(hi, q_lim)
    hi = tl.where(q_lim > 0, hi, 0)
    # delta (module docstring, "Backward"): rowsum(P * dP) in the loop's single pass (_DELTA_IN_LOOP)
    # or in a pass of its own (_DELTA_PASS), or rowsum(dO * O) from the stored output
    # fp32 forms dP - delta as (dP - c) - t (_pivot_pass; module docstring, "Backward"), the other
    # dtypes (and fp32 with delta from O) as it is
    PIVOT: tl.constexpr = Q.dtype.element_ty == tl.float32 and DELTA != 1
    if DELTA == 1:  # _DELTA_FROM_O
        o = _load_rows(O + b * sob + h * soh, offs_m, q_lim, sol, sod, TAB, tab_len, False, DH, DHP, SPLIT)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    elif DELTA == 2:  # _DELTA_PASS
        if PIVOT:
            piv, t = _pivot_pass(q, do, k_base, v_base, offs_m, row_ok, hi, k_lim, m_row, lg_row, qk_scale, skl,
                                 skd, svl, svd, TAB, tab_len, CAUSAL, ROPE_K, SAME_KV, BLOCK_M, BLOCK_N, DH, DHP,
                                 SPLIT, PREC, NEG)
        else:
            delta = _delta_pass(q, do, k_base, v_base, offs_m, row_ok, hi, k_lim, m_row, lg_row, qk_scale, skl,
                                skd, svl, svd, TAB, tab_len, CAUSAL, ROPE_K, SAME_KV, BLOCK_M, BLOCK_N, DH, DHP,
                                SPLIT, PREC, NEG)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_kv(k_base, v_base, offs_n, k_lim, skl, skd, svl, svd, TAB, tab_len, q.dtype, ROPE_K, SAME_KV,
                        DH, DHP, SPLIT)
        p = _bwd_probs(q, k, offs_m, offs_n, row_ok, k_lim, m_row, lg_row, qk_scale, CAUSAL, PREC, NEG)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if PIVOT:
            if DELTA == 0:  # _DELTA_IN_LOOP: _pivot_pass's (c, t) of the one block
                p_sum = tl.sum(p, 1)
                piv = _pivot(p, tl.max(p, 1), dp)
                t = tl.sum(p * (dp - piv[:, None]), 1) / tl.where(p_sum > 0, p_sum, 1.0)
            ds = p * ((dp - piv[:, None]) - t[:, None])
        else:
            if DELTA == 0:  # _DELTA_IN_LOOP, divided by rowsum(P) as in _delta_pass
                p_sum = tl.sum(p, 1)
                delta = tl.sum(p * dp, 1) / tl.where(p_sum > 0, p_sum, 1.0)
            ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC) * sm_scale
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        if ROPE_K:
            dk = _unrotate(dk, TAB, offs_n, k_lim, tab_len, BLOCK_N, DH, DHP)
        _store_dkdv(dk_base, dv_base, dk, dv, offs_n, Lk, sdkl, sdkd, sdvl, sdvd, SAME_KV, DH, DHP, SPLIT)
    # keys past the valid length (or past the last query when causal): zero gradient, no compute
    zero = tl.zeros([BLOCK_N, DHP], tl.float32)
    for start_n in range(tl.cdiv(hi, BLOCK_N) * BLOCK_N, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        _store_dkdv(dk_base, dv_base, zero, zero, offs_n, Lk, sdkl, sdkd, sdvl, sdvd, SAME_KV, DH, DHP, SPLIT)
    _bwd_store_dq(DQ, dq, sm_scale, b, h, offs_m, q_lim, Lq, sdqb, sdql, sdqh, sdqd, TAB, tab_len, ROPE_Q, BLOCK_M,
                  DH, DHP, SPLIT)


@triton.jit
def _query_rows(n_m_blocks, H, BLOCK_M: tl.constexpr):
    """``(bh, b, h, start_m, offs_m)``: this program's (b, h) and its block of query rows, in the
    general backward's dq and delta kernels. It takes no pointer, so that an address built from
    its results is not traced back to one by Inductor's write analysis (see
    :func:`_general_query_block`)."""
    pid_m, bh, b, h = _program_block(n_m_blocks, H)
    start_m = pid_m * BLOCK_M
    return bh, b, h, start_m, start_m + tl.arange(0, BLOCK_M)


@triton.jit
def _general_query_block(Q, DO, STATS, LENS, TAB, b, h, bh, start_m, offs_m, Lq, Lk, tab_len,
                         sqb, sql, sqh, sqd, sdob, sdol, sdoh, sdod,
                         CAUSAL: tl.constexpr, ROPE_Q: tl.constexpr, MASK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                         DH: tl.constexpr, DHP: tl.constexpr, SPLIT: tl.constexpr):
    """What the general backward's dq and delta kernels need of their query block ``offs_m``
    (from ``start_m``) of ``(b, h)``: ``(k_lim, q_lim, hi)`` and :func:`_bwd_query_block`'s tiles,
    where ``hi`` ends the keys its rows see (0 for a block of masked rows).

    The program's indices are arguments (:func:`_query_rows`), not results: Inductor's analysis of
    what a kernel writes (torch's ``triton_kernel_wrap``, on the TTIR before inlining) follows a
    stored address back through every argument of the call that made any part of it, so an address
    built from this call's results would count Q, DO, STATS, LENS and TAB as written, and a compiled
    graph would copy them before each launch (seen on the H200 at 7bea4b3;
    ``tests/test_compile_inline.py`` runs that analysis on every inlined kernel)."""
    k_lim, q_lim = _limits(LENS, b, Lq, Lk, MASK_Q)
    q, do, row_ok, m_row, lg_row = _bwd_query_block(Q, DO, STATS, b, h, bh, offs_m, q_lim, k_lim, Lq,
                                                    sqb, sql, sqh, sqd, sdob, sdol, sdoh, sdod, TAB, tab_len,
                                                    ROPE_Q, DH, DHP, SPLIT)
    hi = k_lim
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M)
    hi = tl.where(start_m < q_lim, hi, 0)
    return k_lim, q_lim, hi, q, do, row_ok, m_row, lg_row


@triton.jit
def _store_delta_pass(DELTA, bh, Lq, q, do, k_base, v_base, offs_m, row_ok, hi, k_lim, m_row, lg_row, qk_scale,
                      skl, skd, svl, svd, TAB, tab_len, CAUSAL: tl.constexpr, ROPE_K: tl.constexpr,
                      SAME_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DH: tl.constexpr,
                      DHP: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, NEG: tl.constexpr):
    """:func:`_delta_pass` of a general-backward query block, stored for the kernels that read it
    (rows that take no part: 0), and returned."""
    delta = _delta_pass(q, do, k_base, v_base, offs_m, row_ok, hi, k_lim, m_row, lg_row, qk_scale, skl, skd,
                        svl, svd, TAB, tab_len, CAUSAL, ROPE_K, SAME_KV, BLOCK_M, BLOCK_N, DH, DHP, SPLIT, PREC,
                        NEG)
    tl.store(DELTA + bh * Lq + offs_m, delta, mask=offs_m < Lq)
    return delta


@triton.jit
def _attn_bwd_delta_kernel(
    DELTA, DO, Q, K, V, STATS, LENS, TAB,
    qk_scale, Lq, Lk, H, tab_len, n_m_blocks,
    sdob, sdol, sdoh, sdod,
    sqb, sql, sqh, sqd,
    skb, skl, skh, skd,
    svb, svl, svh, svd,
    CAUSAL: tl.constexpr, ROPE_Q: tl.constexpr, ROPE_K: tl.constexpr, MASK_Q: tl.constexpr, SAME_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, SPLIT: tl.constexpr,
    PREC: tl.constexpr, NEG: tl.constexpr,
):
    """delta of one query block of one (b, h) by :func:`_delta_pass`, over the keys the dq kernel's
    loop visits, stored for the dq and dk/dv kernels: the fp32 general backward's form (in fp32 the
    pass inside the dq kernel, tf32x3 dots beside its accumulator, built to 32 registers and a 7.9 KB
    stack at 128-wide heads, sm_90, Triton 3.6)."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 from Inductor: _dispatch.py, "Float arguments"
    bh, b, h, start_m, offs_m = _query_rows(n_m_blocks, H, BLOCK_M)
    k_lim, q_lim, hi, q, do, row_ok, m_row, lg_row = _general_query_block(
        Q, DO, STATS, LENS, TAB, b, h, bh, start_m, offs_m, Lq, Lk, tab_len, sqb, sql, sqh, sqd, sdob, sdol, sdoh,
        sdod, CAUSAL, ROPE_Q, MASK_Q, BLOCK_M, DH, DHP, SPLIT)
    if Q.dtype.element_ty == tl.float32:  # (c, t) of the pivoted dS (_pivot_pass, _pivot_half)
        piv, t = _pivot_pass(q, do, K + b * skb + h * skh, V + b * svb + h * svh, offs_m, row_ok, hi, k_lim, m_row,
                             lg_row, qk_scale, skl, skd, svl, svd, TAB, tab_len, CAUSAL, ROPE_K, SAME_KV, BLOCK_M,
                             BLOCK_N, DH, DHP, SPLIT, PREC, NEG)
        c_ptr = DELTA + bh * Lq + offs_m
        tl.store(c_ptr, piv, mask=offs_m < Lq)
        tl.store(c_ptr + _pivot_half(n_m_blocks, Lq), t, mask=offs_m < Lq)
    else:
        _store_delta_pass(DELTA, bh, Lq, q, do, K + b * skb + h * skh, V + b * svb + h * svh, offs_m, row_ok, hi,
                          k_lim, m_row, lg_row, qk_scale, skl, skd, svl, svd, TAB, tab_len, CAUSAL, ROPE_K, SAME_KV,
                          BLOCK_M, BLOCK_N, DH, DHP, SPLIT, PREC, NEG)


@triton.jit
def _attn_bwd_preprocess_kernel(
    DELTA, DO, O, Lq, H, n_m_blocks,
    sdob, sdol, sdoh, sdod,
    sob, sol, soh, sod,
    BLOCK_M: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr,
):
    """``delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d]`` in fp32."""
    pid_m, bh, b, h = _program_block(n_m_blocks, H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    do = _load_rows(DO + b * sdob + h * sdoh, offs_m, Lq, sdol, sdod, DO, 1, False, DH, DHP, False)
    o = _load_rows(O + b * sob + h * soh, offs_m, Lq, sol, sod, O, 1, False, DH, DHP, False)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + bh * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _attn_bwd_dkdv_kernel(
    DK, DV,
    DO, Q, K, V, STATS, DELTA, LENS, TAB,
    sm_scale, qk_scale, Lq, Lk, H, tab_len, n_n_blocks,
    sdkb, sdkl, sdkh, sdkd,
    sdvb, sdvl, sdvh, sdvd,
    sdob, sdol, sdoh, sdod,
    sqb, sql, sqh, sqd,
    skb, skl, skh, skd,
    svb, svl, svh, svd,
    CAUSAL: tl.constexpr, ROPE_Q: tl.constexpr, ROPE_K: tl.constexpr, MASK_Q: tl.constexpr, SAME_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, SPLIT: tl.constexpr,
    PREC: tl.constexpr, NEG: tl.constexpr,
):
    """dk, dv of one key block of one (b, h): loop over the query blocks that can see it (with
    SAME_KV, dk + dv into DK)."""
    sm_scale = tl.cast(sm_scale, tl.float32)  # fp64 from Inductor: _dispatch.py, "Float arguments"
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 from Inductor: _dispatch.py, "Float arguments"
    pid_n, bh, b, h = _program_block(n_n_blocks, H)
    k_lim, q_lim = _limits(LENS, b, Lq, Lk, MASK_Q)

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k, v = _load_kv(K + b * skb + h * skh, V + b * svb + h * svh, offs_n, k_lim, skl, skd, svl, svd, TAB, tab_len,
                    Q.dtype.element_ty, ROPE_K, SAME_KV, DH, DHP, SPLIT)
    kv_ok = (offs_n < k_lim)[:, None]
    PIVOT: tl.constexpr = Q.dtype.element_ty == tl.float32  # DELTA holds (c, t) (_pivot_half)

    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    dk = tl.zeros([BLOCK_N, DHP], tl.float32)
    dv = tl.zeros([BLOCK_N, DHP], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
    hi = tl.where(start_n < k_lim, q_lim, 0)  # a padded key block skips the loop: zero gradient
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < q_lim
        q = _load_rows(q_base, offs_m, q_lim, sql, sqd, TAB, tab_len, ROPE_Q, DH, DHP, SPLIT)
        do = _load_rows(do_base, offs_m, q_lim, sdol, sdod, TAB, tab_len, False, DH, DHP, SPLIT)
        m_row, lg_row = _load_stats(STATS, bh, Lq, offs_m, row_ok)
        if PIVOT:
            c_ptr = DELTA + bh * Lq + offs_m
            piv = tl.load(c_ptr, mask=row_ok, other=0.0)
            t = tl.load(c_ptr + _pivot_half(n_n_blocks, Lq), mask=row_ok, other=0.0)
        else:
            delta = tl.load(DELTA + bh * Lq + offs_m, mask=row_ok, other=0.0)
        s_t = _raw_scores(k, q, PREC, NEG)  # [BLOCK_N, BLOCK_M]
        vis = kv_ok & row_ok[None, :]
        if CAUSAL:
            vis = vis & (offs_n[:, None] <= offs_m[None, :])
        p_t = tl.where(vis, tl.exp2((s_t - m_row[None, :]) * qk_scale - lg_row[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        if PIVOT:
            ds_t = p_t * ((dp_t - piv[None, :]) - t[None, :])
        else:
            ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    dk = dk * sm_scale
    if ROPE_K:
        dk = _unrotate(dk, TAB, offs_n, k_lim, tab_len, BLOCK_N, DH, DHP)
    _store_dkdv(DK + b * sdkb + h * sdkh, DV + b * sdvb + h * sdvh, dk, dv, offs_n, Lk, sdkl, sdkd, sdvl, sdvd,
                SAME_KV, DH, DHP, SPLIT)


@triton.jit
def _attn_bwd_dq_kernel(
    DQ,
    DO, Q, K, V, STATS, DELTA, LENS, TAB,
    sm_scale, qk_scale, Lq, Lk, H, tab_len, n_m_blocks,
    sdqb, sdql, sdqh, sdqd,
    sdob, sdol, sdoh, sdod,
    sqb, sql, sqh, sqd,
    skb, skl, skh, skd,
    svb, svl, svh, svd,
    CAUSAL: tl.constexpr, ROPE_Q: tl.constexpr, ROPE_K: tl.constexpr, MASK_Q: tl.constexpr, SAME_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, SPLIT: tl.constexpr,
    PREC: tl.constexpr, NEG: tl.constexpr, DELTA_PASS: tl.constexpr,
):
    """dq of one query block of one (b, h): loop over the visible key blocks. With DELTA_PASS it
    first forms its rows' delta in a pass of its own (``_DELTA_PASS``) and stores it for the dk/dv
    kernel, which runs after it; otherwise it reads the delta kernel's or the preprocess kernel's."""
    sm_scale = tl.cast(sm_scale, tl.float32)  # fp64 from Inductor: _dispatch.py, "Float arguments"
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 from Inductor: _dispatch.py, "Float arguments"
    bh, b, h, start_m, offs_m = _query_rows(n_m_blocks, H, BLOCK_M)
    k_lim, q_lim, hi, q, do, row_ok, m_row, lg_row = _general_query_block(
        Q, DO, STATS, LENS, TAB, b, h, bh, start_m, offs_m, Lq, Lk, tab_len, sqb, sql, sqh, sqd, sdob, sdol, sdoh,
        sdod, CAUSAL, ROPE_Q, MASK_Q, BLOCK_M, DH, DHP, SPLIT)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, DHP], tl.float32)
    PIVOT: tl.constexpr = Q.dtype.element_ty == tl.float32  # DELTA holds (c, t) (_pivot_half)
    tl.static_assert(not (PIVOT and DELTA_PASS), "fp32 forms its delta in _attn_bwd_delta_kernel")
    if DELTA_PASS:
        delta = _store_delta_pass(DELTA, bh, Lq, q, do, k_base, v_base, offs_m, row_ok, hi, k_lim, m_row, lg_row,
                                  qk_scale, skl, skd, svl, svd, TAB, tab_len, CAUSAL, ROPE_K, SAME_KV, BLOCK_M,
                                  BLOCK_N, DH, DHP, SPLIT, PREC, NEG)
    elif PIVOT:
        c_ptr = DELTA + bh * Lq + offs_m
        piv = tl.load(c_ptr, mask=row_ok, other=0.0)
        t = tl.load(c_ptr + _pivot_half(n_m_blocks, Lq), mask=row_ok, other=0.0)
    else:
        delta = tl.load(DELTA + bh * Lq + offs_m, mask=row_ok, other=0.0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_kv(k_base, v_base, offs_n, k_lim, skl, skd, svl, svd, TAB, tab_len, q.dtype, ROPE_K, SAME_KV,
                        DH, DHP, SPLIT)
        p = _bwd_probs(q, k, offs_m, offs_n, row_ok, k_lim, m_row, lg_row, qk_scale, CAUSAL, PREC, NEG)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if PIVOT:
            ds = p * ((dp - piv[:, None]) - t[:, None])
        else:
            ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    _bwd_store_dq(DQ, dq, sm_scale, b, h, offs_m, q_lim, Lq, sdqb, sdql, sdqh, sdqd, TAB, tab_len, ROPE_Q, BLOCK_M,
                  DH, DHP, SPLIT)


# ============================================================================ launchers
def _padded_dh(dh: int) -> int:
    """Register width of a head: next power of two, at least 16 (``tl.dot`` needs K >= 16)."""
    return max(16, next_pow2(dh))


def _fwd_config(Lq: int, Lk: int, dhp: int, dtype: torch.dtype) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward; see the module docstring.

    Wide heads (128) and fp32 (tf32x3 splits every operand in two) narrow the key block so the
    tiles stay in registers (checked by compiling for sm_90: no spills at the DESIGN shapes)."""
    if Lq <= 64:
        block_m = max(16, next_pow2(Lq))
    elif Lq <= 256 or (dtype == torch.float32 and dhp >= 128):  # fp32 128 x 128 tiles: 320 KB of shared memory
        block_m = 64
    else:
        block_m = 128
    block_n = min(max(16, next_pow2(Lk)), 128 if block_m <= 32 else 64)
    if dhp >= 128 or (dtype == torch.float32 and dhp >= 64):
        block_n = min(block_n, 32)
    num_warps = 8 if block_m * block_n >= 128 * 64 or block_m * dhp >= 64 * 64 else 4
    return block_m, block_n, num_warps, 3 if block_m >= 128 else 2


def _use_fused_bwd(Lq: int, dhp: int, dtype: torch.dtype) -> bool:
    """Whether the single-query-block backward takes this shape: Lq <= 128, and in fp32 (tf32x3
    splits every operand in two) only up to 4096 query-block elements (``next_pow2(Lq) * DHP``):
    sm_90 builds of the fp32 kernel at 64 x 128 and 128 x 64 took 319,488 and 299,008 bytes of shared
    memory, over an H100's 232,448; at 4096 elements 157,696-192,512. The rest takes the general
    backward (separate dk/dv and dq kernels)."""
    if Lq > _FUSED_BWD_MAX_LQ:
        return False
    return dtype != torch.float32 or max(16, next_pow2(Lq)) * dhp <= 4096


def _fused_bwd_config(Lq: int, Lk: int, dhp: int, dtype: torch.dtype) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the single-query-block backward (``_use_fused_bwd``);
    :data:`FUSED_BWD_TILE` overrides the last two."""
    block_m = max(16, next_pow2(Lq))
    block_n = min(max(16, next_pow2(Lk)), 128 if block_m <= 32 else 64)
    if dhp >= 128:
        block_n = 16
    elif dtype == torch.float32:
        block_n = min(block_n, 16 if block_m >= 128 or dhp >= 64 else 32)
    num_warps = 8 if block_m * block_n >= 128 * 64 or block_m >= 128 or block_m * dhp >= 64 * 64 else 4
    if FUSED_BWD_TILE is not None:
        tile = FUSED_BWD_TILE
        if not (isinstance(tile, tuple) and len(tile) == 2 and all(type(t) is int for t in tile)
                and tile[0] in (16, 32, 64, 128) and tile[1] in (2, 4, 8)):
            raise ValueError("attention: FUSED_BWD_TILE must be None or (BLOCK_N, num_warps) with BLOCK_N in "
                             f"16, 32, 64, 128 and num_warps in 2, 4, 8; got {tile!r}")
        block_n, num_warps = min(tile[0], block_n), tile[1]
    return block_m, block_n, num_warps


def _general_bwd_config(dhp: int, dtype: torch.dtype) -> Tuple[Tuple[int, int], Tuple[int, int], int]:
    """((dkdv BLOCK_M, BLOCK_N), (dq BLOCK_M, BLOCK_N), num_warps) of the long-sequence backward."""
    if dhp >= 128:
        return (32, 32), (32, 32), 4
    if dtype == torch.float32:
        return (32, 64), (64, 64), 4
    return (64, 64), (64, 64), 8 if dhp >= 64 else 4


def _backward_delta() -> str:
    """:data:`BACKWARD_DELTA`, checked (at every backward launch, whatever the shape)."""
    if BACKWARD_DELTA not in ("probs", "output"):
        raise ValueError(f'attention: BACKWARD_DELTA must be "probs" or "output", got {BACKWARD_DELTA!r}')
    return BACKWARD_DELTA


def _delta_form(Lk: int, block_n: int) -> int:
    """The single-query-block backward's DELTA constexpr (module docstring, "Backward"): every key
    in one block, from that block's P and dP; past it, a pass of its own (``BACKWARD_DELTA =
    "probs"``) or the stored output (``"output"``). The general backward takes the pass (in its dq
    kernel for fp16/bf16, in a delta kernel for fp32) or the preprocess kernel by the setting."""
    by_pass = _backward_delta() == "probs"
    if Lk <= block_n:
        return _DELTA_IN_LOOP
    return _DELTA_PASS if by_pass else _DELTA_FROM_O


_ROPE_TABLES: dict = {}
#: tables replaced by longer ones, kept alive: a captured CUDA graph holds only their addresses
#: (sizes double, so all of them together are smaller than the current table)
_ROPE_RETIRED: list = []


def rope_table(length: int, dh: int, base: float, device: torch.device) -> torch.Tensor:
    """fp32 ``[2, length, dh/2]``: cos and sin of ``pos * base^(-2i/dh)``, from the reference's own
    :func:`interformer.reference.rotary_table` (built anew on every call: what a traced graph
    records, see :func:`attention`)."""
    cos, sin = reference.rotary_table(length, dh, base, torch.float32, device)
    return torch.stack([cos.view(length, dh // 2), sin.view(length, dh // 2)])


def _rope_table(length: int, dh: int, base: float, device: torch.device) -> torch.Tensor:
    """A :func:`rope_table` of at least ``length`` positions, cached per (device, dh, base) for the
    eager entry points.

    One table per key, grown to the next power of two (at least 64 positions) when a longer
    sequence comes: the kernels read rows ``0 .. L-1`` of any table at least that long, and a row
    does not depend on the table's length (``pos * base^(-2i/dh)`` element-wise), so results are
    bitwise those of an exact-length table. Serving batches of many lengths then costs a handful of
    builds (about ten small kernels each) and under twice one table's memory per key, instead of
    one table per length. A replaced table is kept (``_ROPE_RETIRED``), never freed: a CUDA graph
    captured while it was current reads it by address.

    Compiled code never reaches this cache (the traced call passes its own table): a table first
    built inside ``torch.compile(mode="reduce-overhead")``'s warm-up would sit in the CUDA-graph
    pool, which refuses memory that outlives its graphs ("tensor(s) in the cudagraph pool not
    tracked as outputs", seen on an H100). During CUDA-graph capture a table long enough is taken
    from the cache, else a fresh one is built and recorded in the graph rather than cached from
    the graph's pool. Outside capture a new CUDA table is cached only once the stream that built
    it has finished it (one host sync per build, a handful per process): the cache is shared by
    every stream.
    """
    key = (device.type, device.index, dh, float(base))
    table = _ROPE_TABLES.get(key)
    if table is not None and table.shape[1] >= length:
        return table
    grown = rope_table(max(64, next_pow2(length)), dh, base, device)
    if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        if device.type == "cuda":
            # the cached table serves every stream: wait, once per build, for the kernels that wrote it
            # on this one, so that a caller on another stream (threads serving with a stream each) never
            # reads it half-written (a review of the GPU-only paths found the race)
            torch.cuda.current_stream(device).synchronize()
        if table is not None:  # a CUDA graph captured earlier may still read it: never free it
            _ROPE_RETIRED.append(table)
        _ROPE_TABLES[key] = grown
    return grown


_FP32 = torch.finfo(torch.float32)


def _resolve_scale(sm_scale: Optional[float], dh: int) -> float:
    """The softmax scale: ``1 / sqrt(dh)`` by default. A given one must be finite and nonzero: the
    kernels scale differences of raw scores (module docstring), and a zero scale would turn the
    masked keys' ``-inf - m`` into ``0 * inf`` = NaN (a zero-scale softmax is a plain average). So
    must the fp32 ``|sm_scale| * log2(e)`` the kernels take (:func:`_scale_args`): a scale below
    about 8e-39 passed the check and rounded to zero there, or to a denormal a GPU flushes, and gave
    NaN (a review's find, 2026-11-29); one above about 2.4e38 rounds to inf."""
    if sm_scale is None:
        return 1.0 / math.sqrt(dh)
    scale = float(sm_scale)
    if not math.isfinite(scale) or scale == 0:
        raise ValueError(f"attention: sm_scale must be a finite nonzero number, got {sm_scale!r}")
    if not _FP32.tiny <= abs(scale) * LOG2E <= _FP32.max:
        raise ValueError(f"attention: |sm_scale| * log2(e) must be a normal fp32 number (|sm_scale| from about "
                         f"{_FP32.tiny / LOG2E:.1e} to {_FP32.max / LOG2E:.1e}), got {sm_scale!r}")
    return scale


def _scale_args(scale: float) -> tuple:
    """``(qk_scale, NEG)`` for the kernels: ``|scale| * log2(e)``, and whether the scores are negated
    before it (a negative scale; the raw-domain maximum is then the scaled scores' maximum)."""
    return abs(scale) * LOG2E, scale < 0


def _empty_stats(B: int, H: int, Lq: int, device) -> torch.Tensor:
    """The statistics of rows that output 0: maximum 0, log2 of the exp-sum +inf."""
    stats = torch.zeros((B, H, 2, Lq), device=device, dtype=torch.float32)
    stats[:, :, 1] = float("inf")
    return stats


def _tab(q, k, rope_base, Lq, Lk, dh, table=None):
    """The rotary table the kernels read and its length: ``table`` when given (checked), else the
    cached one."""
    if rope_base is None:
        return q, 1  # never read: ROPE_Q = ROPE_K = False
    if table is None:  # a traced call (an op inlined by torch.compile) must not fill the cache with traced tensors
        table = (rope_table if tracing((k,)) else _rope_table)(max(Lq, Lk), dh, rope_base, k.device)
    elif (table.dtype != torch.float32 or table.dim() != 3 or table.shape[0] != 2 or table.shape[2] != dh // 2
          or table.shape[1] < max(Lq, Lk) or not table.is_contiguous() or table.device != k.device):
        raise ValueError(f"attention: rope_table must be a contiguous fp32 [2, >= {max(Lq, Lk)}, {dh // 2}] tensor "
                         f"on {k.device}, got {table.dtype} {tuple(table.shape)} on {table.device}")
    return table, table.shape[1]


def _int32_rows(q, k, v):
    """q, k and v, each as it is or, where one sample's rows could lie 2**31 elements apart (a
    time-major buffer seen batch-major: row stride B H dh), a contiguous copy: the kernels form the
    offsets inside one (sample, head) slice, row index times row stride, in int32
    (:func:`._common.int32_block`). k and v one tensor stay one."""
    same = k is v
    q, k = int32_block(q, 1), int32_block(k, 1)
    return q, k, k if same else int32_block(v, 1)


@on_input_device
def _attention_fwd_impl(q, k, v, lengths, causal, rope_base, rope_q, mask_queries, sm_scale, rope_table=None):
    lengths = lengths.contiguous()  # read as lengths[b] with stride 1
    q, k, v = _int32_rows(q, k, v)
    B, Lk, H, dh = k.shape
    Lq = q.shape[1]
    out = torch.empty((B, Lq, H, dh), device=k.device, dtype=q.dtype)
    if out.numel() == 0:
        return out, _empty_stats(B, H, Lq, k.device)
    if Lk == 0:
        return out.zero_(), _empty_stats(B, H, Lq, k.device)
    stats = torch.empty((B, H, 2, Lq), device=k.device, dtype=torch.float32)
    qk_scale, neg = _scale_args(_resolve_scale(sm_scale, dh))
    tab, tab_len = _tab(q, k, rope_base, Lq, Lk, dh, rope_table)
    dhp = _padded_dh(dh)
    block_m, block_n, warps, stages = _fwd_config(Lq, Lk, dhp, q.dtype)
    n_m = cdiv(Lq, block_m)
    sqb = 0 if q.shape[0] == 1 else q.stride(0)
    launch(_attn_fwd_kernel)[(B * H * n_m,)](
        out, stats, q, k, v, lengths, tab,
        qk_scale, Lq, Lk, H, tab_len, n_m,
        sqb, q.stride(1), q.stride(2), q.stride(3),
        *k.stride(), *v.stride(), *out.stride(),
        CAUSAL=bool(causal), ROPE_Q=rope_base is not None and bool(rope_q), ROPE_K=rope_base is not None,
        MASK_Q=bool(mask_queries), SAME_KV=_one_tensor(k, v), BLOCK_M=block_m, BLOCK_N=block_n, DH=dh, DHP=dhp,
        SPLIT=rope_base is not None, PREC=dot_precision(q.dtype), NEG=neg,
        num_warps=warps, num_stages=stages,
    )
    return out, stats


def _one_tensor(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether k and v are the same elements (same data pointer, strides and dtype; shapes are
    checked equal): the forward kernel then reads each key tile once for both. A traced tensor has no
    data pointer; there only ``k is v`` counts (False is always correct, one more load per tile)."""
    if k is v:
        return True
    return not tracing((k, v)) and k.data_ptr() == v.data_ptr() and k.stride() == v.stride() and k.dtype == v.dtype


@on_input_device
def _attention_bwd_impl(do, q, k, v, out, stats, lengths, causal, rope_base, rope_q, mask_queries, sm_scale,
                        rope_table=None, grads=None, same_kv=False):
    """(dq, dk, dv); ``grads`` optionally gives the three output tensors (any strides, e.g. the
    views of one packed ``[B, L, 3, H, dh]`` buffer), used for per-sample queries only.

    ``same_kv`` (k and v one tensor, the caller's promise): the kernels write the gradient of that
    tensor, dk + dv, into dk, and dv comes back None; autograd would otherwise add the two."""
    lengths = lengths.contiguous()
    q, k, v = _int32_rows(q, k, v)
    if do is not None:
        do = int32_block(do, 1)
    B, Lk, H, dh = k.shape
    Bq, Lq = q.shape[0], q.shape[1]
    shared = Bq == 1 and B != 1  # (B = 0 too: dq is then [1, ...] zeros, as the fake says)
    if grads is not None:
        assert not shared and not same_kv
        dq_buf, dk, dv = grads
    else:
        # per-sample dq for shared queries goes to an fp32 buffer reduced over B below
        dq_buf = torch.empty((B, Lq, H, dh), device=q.device, dtype=torch.float32 if shared else q.dtype)
        dk = torch.empty((B, Lk, H, dh), device=k.device, dtype=k.dtype)
        dv = dk if same_kv else torch.empty((B, Lk, H, dh), device=v.device, dtype=v.dtype)
    if dq_buf.numel() == 0 or Lk == 0 or do is None:
        dq_buf.zero_(), dk.zero_(), dv.zero_()
    else:
        scale = _resolve_scale(sm_scale, dh)
        qk_scale, neg = _scale_args(scale)
        tab, tab_len = _tab(q, k, rope_base, Lq, Lk, dh, rope_table)
        dhp = _padded_dh(dh)
        sqb = 0 if Bq == 1 else q.stride(0)
        flags = dict(
            CAUSAL=bool(causal), ROPE_Q=rope_base is not None and bool(rope_q), ROPE_K=rope_base is not None,
            MASK_Q=bool(mask_queries), SAME_KV=bool(same_kv), DH=dh, DHP=dhp, SPLIT=rope_base is not None,
            PREC=dot_precision(q.dtype), NEG=neg,
        )
        q_strides = (sqb, q.stride(1), q.stride(2), q.stride(3))
        if _use_fused_bwd(Lq, dhp, q.dtype):
            block_m, block_n, warps = _fused_bwd_config(Lq, Lk, dhp, q.dtype)
            launch(_attn_bwd_fused_kernel)[(B * H,)](
                dq_buf, dk, dv, do, q, k, v, out, stats, lengths, tab,
                scale, qk_scale, Lq, Lk, H, tab_len,
                *dq_buf.stride(), *dk.stride(), *dv.stride(), *do.stride(),
                *q_strides, *k.stride(), *v.stride(), *out.stride(),
                BLOCK_M=block_m, BLOCK_N=block_n, DELTA=_delta_form(Lk, block_n), num_warps=warps,
                num_stages=2, **flags,
            )
        else:
            (kv_bm, kv_bn), (q_bm, q_bn), warps = _general_bwd_config(dhp, q.dtype)
            # fp32: (c, t) of the pivoted dS, two [B, H, Lq] halves (_pivot_half)
            fp32 = q.dtype == torch.float32
            delta = torch.empty((2, B, H, Lq) if fp32 else (B, H, Lq), device=q.device, dtype=torch.float32)
            n_m = cdiv(Lq, q_bm)
            # delta (module docstring, "Backward"): a pass over the keys, in the dq kernel (fp16/bf16)
            # or in a kernel of its own (fp32), even over one key block; or from O
            by_pass = _backward_delta() == "probs"
            delta_pass = by_pass and not fp32
            if not by_pass:
                if fp32:  # c = rowsum(dO * O), t = 0
                    delta[1].zero_()
                n_pre = cdiv(Lq, 64)
                launch(_attn_bwd_preprocess_kernel)[(B * H * n_pre,)](
                    delta, do, out, Lq, H, n_pre, *do.stride(), *out.stride(), BLOCK_M=64, DH=dh, DHP=dhp,
                )
            elif not delta_pass:
                launch(_attn_bwd_delta_kernel)[(B * H * n_m,)](
                    delta, do, q, k, v, stats, lengths, tab,
                    qk_scale, Lq, Lk, H, tab_len, n_m,
                    *do.stride(), *q_strides, *k.stride(), *v.stride(),
                    BLOCK_M=q_bm, BLOCK_N=q_bn, num_warps=warps, num_stages=2, **flags,
                )
            # (the delta, dq and dk/dv grids stay B * H * blocks: fp32's _pivot_half takes B * H from them)
            launch(_attn_bwd_dq_kernel)[(B * H * n_m,)](
                dq_buf, do, q, k, v, stats, delta, lengths, tab,
                scale, qk_scale, Lq, Lk, H, tab_len, n_m,
                *dq_buf.stride(), *do.stride(), *q_strides, *k.stride(), *v.stride(),
                BLOCK_M=q_bm, BLOCK_N=q_bn, DELTA_PASS=delta_pass, num_warps=warps, num_stages=2, **flags,
            )
            n_n = cdiv(Lk, kv_bn)
            launch(_attn_bwd_dkdv_kernel)[(B * H * n_n,)](
                dk, dv, do, q, k, v, stats, delta, lengths, tab,
                scale, qk_scale, Lq, Lk, H, tab_len, n_n,
                *dk.stride(), *dv.stride(), *do.stride(), *q_strides, *k.stride(), *v.stride(),
                BLOCK_M=kv_bm, BLOCK_N=kv_bn, num_warps=warps, num_stages=2, **flags,
            )
    dq = dq_buf.sum(0, keepdim=True).to(q.dtype) if shared else dq_buf
    return dq, dk, None if same_kv else dv


# ============================================================================ torch.library
@torch.library.custom_op("interformer::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    causal: bool,
    rope_base: Optional[float],
    rope_q: bool,
    mask_queries: bool,
    sm_scale: Optional[float],
    rope_table: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(out [B, Lq, H, dh], stats [B, H, 2, Lq] fp32)``; ``rope_table`` (None: the cached one)
    is :func:`rope_table`'s ``[2, >= max(Lq, Lk), dh/2]``."""
    return _attention_fwd_impl(q, k, v, lengths, causal, rope_base, rope_q, mask_queries, sm_scale, rope_table)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, lengths, causal, rope_base, rope_q, mask_queries, sm_scale, rope_table=None):
    B, Lk, H, dh = k.shape
    Lq = q.shape[1]
    return k.new_empty((B, Lq, H, dh), dtype=q.dtype), k.new_empty((B, H, 2, Lq), dtype=torch.float32)


@torch.library.custom_op("interformer::attention_bwd", mutates_args=())
def attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor,
    lengths: torch.Tensor,
    causal: bool,
    rope_base: Optional[float],
    rope_q: bool,
    mask_queries: bool,
    sm_scale: Optional[float],
    rope_table: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dq, dk, dv)`` shaped like q, k, v (contiguous)."""
    return _attention_bwd_impl(grad_out, q, k, v, out, stats, lengths, causal, rope_base, rope_q, mask_queries, sm_scale,
                               rope_table)


@attention_bwd.register_fake
def _attention_bwd_fake(grad_out, q, k, v, out, stats, lengths, causal, rope_base, rope_q, mask_queries, sm_scale,
                        rope_table=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, lengths, causal, rope_base, rope_q, mask_queries, sm_scale, *table = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats, lengths, table[0] if table else None)
    ctx.args = (causal, rope_base, rope_q, mask_queries, sm_scale)


def _backward_with(bwd, lean=False):
    """The autograd formula, calling ``bwd`` (the custom op when traced, the launcher in eager).

    ``lean`` (the eager entry): k and v given as one tensor (PMA's folded call) have the kernels
    write that tensor's whole gradient, dk + dv, and v's slot gets None, where autograd would
    otherwise add the two (one more kernel, two more ``B x L x d`` tensors). Traced calls keep
    the op's (dq, dk, dv) schema."""
    def backward(ctx, grad_out, grad_stats):
        # the statistics are an internal output: their gradient (if any) is ignored.
        q, k, v, out, stats, lengths, table = ctx.saved_tensors
        if grad_out is None:
            return (None,) * 10
        extra = {"same_kv": ctx.same_kv} if lean else {}
        dq, dk, dv = bwd(grad_out, q, k, v, out, stats, lengths, *ctx.args, table, **extra)
        return (dq, dk, dv) + (None,) * 7
    return backward


attention_fwd.register_autograd(_backward_with(torch.ops.interformer.attention_bwd), setup_context=_setup_context)


def _lean_forward(ctx, *inputs):
    output = _attention_fwd_impl(*inputs)
    _setup_context(ctx, inputs, output)
    ctx.same_kv = inputs[1] is inputs[2]
    return output


# eager entry point (see interformer.kernels._dispatch): same launchers, no custom-op dispatch; like the
# custom op's autograd wrapper, both outputs are differentiable and the statistics' gradient is ignored
_Attention = lean_function("_Attention", _lean_forward, _backward_with(_attention_bwd_impl, lean=True),
                           _backward_with(torch.ops.interformer.attention_bwd))
inline_when_compiled(attention_fwd, attention_bwd)


def _attention_qkv_fwd_impl(qkv, lengths, causal, rope_base, rope_q, mask_queries, sm_scale, rope_table=None):
    q, k, v = qkv.unbind(2)
    return _attention_fwd_impl(q, k, v, lengths, causal, rope_base, rope_q, mask_queries, sm_scale, rope_table)


def _attention_qkv_bwd_impl(grad_out, qkv, out, stats, lengths, causal, rope_base, rope_q, mask_queries, sm_scale,
                            rope_table=None):
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    q, k, v = qkv.unbind(2)
    _attention_bwd_impl(grad_out, q, k, v, out, stats, lengths, causal, rope_base, rope_q, mask_queries, sm_scale,
                        rope_table, grads=dqkv.unbind(2))
    return dqkv


# Packed self-attention: q, k, v are the three slices of one [B, L, 3, H, dh] tensor (the module's
# ``qkv(s).view(B, L, 3, H, dh).unbind(2)``). Same kernels; the backward writes dq, dk, dv straight
# into one contiguous [B, L, 3, H, dh] gradient, which saves autograd's ``torch.stack`` of the three
# gradients in UnbindBackward (a full extra read and write of 3 x B x L x d elements).
@torch.library.custom_op("interformer::attention_qkv_fwd", mutates_args=())
def attention_qkv_fwd(
    qkv: torch.Tensor,
    lengths: torch.Tensor,
    causal: bool,
    rope_base: Optional[float],
    rope_q: bool,
    mask_queries: bool,
    sm_scale: Optional[float],
    rope_table: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward of packed ``qkv [B, L, 3, H, dh]``: ``(out [B, L, H, dh], stats [B, H, 2, L] fp32)``."""
    return _attention_qkv_fwd_impl(qkv, lengths, causal, rope_base, rope_q, mask_queries, sm_scale, rope_table)


@attention_qkv_fwd.register_fake
def _attention_qkv_fwd_fake(qkv, lengths, causal, rope_base, rope_q, mask_queries, sm_scale, rope_table=None):
    B, L, _, H, dh = qkv.shape
    return qkv.new_empty((B, L, H, dh)), qkv.new_empty((B, H, 2, L), dtype=torch.float32)


@torch.library.custom_op("interformer::attention_qkv_bwd", mutates_args=())
def attention_qkv_bwd(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor,
    lengths: torch.Tensor,
    causal: bool,
    rope_base: Optional[float],
    rope_q: bool,
    mask_queries: bool,
    sm_scale: Optional[float],
    rope_table: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Backward of packed ``qkv``: the contiguous ``[B, L, 3, H, dh]`` gradient."""
    return _attention_qkv_bwd_impl(grad_out, qkv, out, stats, lengths, causal, rope_base, rope_q, mask_queries,
                                   sm_scale, rope_table)


@attention_qkv_bwd.register_fake
def _attention_qkv_bwd_fake(grad_out, qkv, out, stats, lengths, causal, rope_base, rope_q, mask_queries, sm_scale,
                            rope_table=None):
    return qkv.new_empty(qkv.shape)


def _setup_context_qkv(ctx, inputs, output):
    qkv, lengths, causal, rope_base, rope_q, mask_queries, sm_scale, *table = inputs
    out, stats = output
    ctx.save_for_backward(qkv, out, stats, lengths, table[0] if table else None)
    ctx.args = (causal, rope_base, rope_q, mask_queries, sm_scale)


def _backward_qkv_with(bwd):
    """The packed autograd formula, calling ``bwd`` (the custom op when traced, the launcher in eager)."""
    def backward(ctx, grad_out, grad_stats):
        qkv, out, stats, lengths, table = ctx.saved_tensors
        if grad_out is None:
            return (None,) * 8
        dqkv = bwd(grad_out, qkv, out, stats, lengths, *ctx.args, table)
        return (dqkv,) + (None,) * 7
    return backward


attention_qkv_fwd.register_autograd(_backward_qkv_with(torch.ops.interformer.attention_qkv_bwd),
                                    setup_context=_setup_context_qkv)


_AttentionQKV = lean_function("_AttentionQKV", saving_forward(_attention_qkv_fwd_impl, _setup_context_qkv),
                              _backward_qkv_with(_attention_qkv_bwd_impl),
                              _backward_qkv_with(torch.ops.interformer.attention_qkv_bwd))
inline_when_compiled(attention_qkv_fwd, attention_qkv_bwd)

#: Take the packed op in :func:`attention_packed` (tests switch it off to run the generic op on the
#: same slices).
PACK_QKV = True


# ============================================================================ public function
def _check(q, k, v, lengths, rope_base, sm_scale=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention: {name} must be a 4-D tensor [B, L, H, dh], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    B, Lk, H, dh = k.shape
    if q.shape[0] not in (1, B) or q.shape[2] != H or q.shape[3] != dh:
        raise ValueError(f"attention: q {tuple(q.shape)} must be [B or 1, Lq, H={H}, dh={dh}] to match k {tuple(k.shape)}")
    if dh < 1:
        raise ValueError(f"attention: head dim must be >= 1, got {dh}")
    if rope_base is not None and dh % 2:
        raise ValueError(f"attention: rotary needs an even head dim, got {dh}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention: q, k, v must share one dtype among {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check_lengths_and_device("attention", "q, k, v and lengths", lengths, B, (q, k, v))
    if sm_scale is not None and not torch.compiler.is_compiling():  # traced: PMA's 1/sqrt(dh) may be symbolic
        _resolve_scale(sm_scale, dh)


def _check_lengths_and_device(op: str, names: str, lengths, B: int, tensors) -> None:
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(f"{op}: lengths must be a 1-D tensor [B={B}], got "
                         f"{tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"{op}: lengths must be an integer tensor, got {lengths.dtype}")
    devices = {t.device for t in (*tensors, lengths)}
    if len(devices) != 1:
        raise ValueError(f"{op}: {names} must be on one device, got {sorted(map(str, devices))}")


def _traced_table(q, k, rope_base) -> Optional[torch.Tensor]:
    """The rotary table a traced call passes to the custom op: built by ops recorded in the graph, so
    compiled code owns it like any other intermediate and never fills the module-level cache."""
    if rope_base is None:
        return None
    return rope_table(max(q.shape[1], k.shape[1]), k.shape[3], float(rope_base), k.device)


def _flags(causal, rope_base, rope_q, mask_queries, sm_scale) -> tuple:
    """The options as the custom ops and launchers take them (plain bools and floats, None kept)."""
    return (bool(causal), None if rope_base is None else float(rope_base), bool(rope_q), bool(mask_queries),
            None if sm_scale is None else float(sm_scale))


def _autocast_qkv(*ts: torch.Tensor) -> tuple:
    """The tensors in the autocast dtype where autocast is on for their device and they are in
    another, as are the operands of the reference's einsums (whose output is then in that dtype);
    else as they are. (Until 2026-11-29 the kernels ran fp32 inputs in fp32 under a 16-bit
    autocast and returned fp32 where the reference, and this function's own wide-head fallback,
    returned the autocast dtype: a review's find.) One tensor given twice (k and v the same object,
    PMA's folded call ``attention(q, s, s, ...)``) is cast once and stays one object, so the
    ``SAME_KV`` kernels still take it (cast one by one it became two copies, read and differentiated
    apart, with autograd adding their gradients)."""
    cast = autocast_dtype(ts[0].device.type)
    if cast is None or all(t.dtype == cast for t in ts):
        return ts
    out = []
    for i, t in enumerate(ts):
        same = [out[j] for j in range(i) if ts[j] is t]
        out.append(same[0] if same else t.to(cast))
    return tuple(out)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    causal: bool = False,
    rope_base: Optional[float] = None,
    rope_q: bool = True,
    mask_queries: bool = True,
    sm_scale: Optional[float] = None,
) -> torch.Tensor:
    """Fused rotary attention with padding from lengths; same contract as
    :func:`interformer.reference.attention` (see the module docstring for the kernel design).

    q ``[Bq, Lq, H, dh]`` (Bq = B or 1), k, v ``[B, Lk, H, dh]`` (any strides), lengths ``[B]``
    -> contiguous ``[B, Lq, H, dh]`` in their dtype, or under ``torch.autocast`` on their device in
    the autocast dtype, as the reference's einsums give (q, k and v are cast to it first:
    :func:`_autocast_qkv`). ``sm_scale`` (default ``1/sqrt(dh)``) must be finite and
    nonzero, with ``|sm_scale| * log2(e)`` a normal fp32 number (``ValueError``; the reference takes
    any float). The output is saved for the backward, as SDPA's is (the :data:`BACKWARD_DELTA`
    setting ``"output"`` reads delta from it past one key block; the default forms delta from the
    probabilities and does not read it, but the setting is read when the backward runs): modified
    in place before the backward, autograd refuses the backward with its version-counter error,
    where the reference's einsum output can be (the modules apply their output projection to it
    first, which saves the same tensor, so saving it costs them no memory).
    """
    _check(q, k, v, lengths, rope_base, sm_scale)
    # wider heads than the register tiles hold, or a torch.func transform, ONNX export (_dispatch.reference_only):
    # the reference, same math
    if k.shape[3] > MAX_HEAD_DIM or reference_only(k):  # contiguous, as stated (the einsum's output is not)
        return reference.attention(q, k, v, lengths, causal, rope_base, rope_q, mask_queries, sm_scale).contiguous()
    q, k, v = _autocast_qkv(q, k, v)
    flags = _flags(causal, rope_base, rope_q, mask_queries, sm_scale)
    tensors = (q, k, v, lengths)
    if tracing(tensors):
        out, _ = torch.ops.interformer.attention_fwd(*tensors, *flags, _traced_table(q, k, rope_base))
    elif needs_grad(tensors):
        out, _ = _Attention.apply(q, k, v, savable(lengths), *flags)
    else:
        out, _ = _attention_fwd_impl(*tensors, *flags)
    return out



def attention_packed(
    qkv: torch.Tensor,
    lengths: torch.Tensor,
    causal: bool = False,
    rope_base: Optional[float] = None,
    rope_q: bool = True,
    mask_queries: bool = True,
    sm_scale: Optional[float] = None,
) -> torch.Tensor:
    """:func:`attention` of ``q, k, v = qkv.unbind(2)``, for one packed ``qkv [B, L, 3, H, dh]`` (what
    ``RotaryMultiHeadAttention``'s projection gives, viewed). When ``qkv`` is contiguous and needs a
    gradient (outside torch.compile), the packed op: the same kernels, but the backward writes dq, dk,
    dv straight into ``qkv``'s gradient, so autograd never stacks three separate gradients. The
    gradient goes to ``qkv`` itself, so a caller that wants gradients of its own q, k, v (hooks,
    ``autograd.grad`` with respect to them) calls :func:`attention` with them instead. Otherwise
    (no gradient, a strided ``qkv``, compiling, wide heads) :func:`attention` on the three slices.
    """
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"attention_packed: qkv must be [B, L, 3, H, dh], got "
                         f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    q, k, v = qkv.unbind(2)
    if not (PACK_QKV and qkv.requires_grad and torch.is_grad_enabled() and qkv.is_contiguous() and qkv.numel()
            and not torch.compiler.is_compiling() and qkv.shape[4] <= MAX_HEAD_DIM and not reference_only(qkv)):
        return attention(q, k, v, lengths, causal, rope_base, rope_q, mask_queries, sm_scale)
    _check(q, k, v, lengths, rope_base, sm_scale)
    (qkv,) = _autocast_qkv(qkv)  # a contiguous result that needs a gradient, as qkv
    flags = _flags(causal, rope_base, rope_q, mask_queries, sm_scale)
    if tracing((qkv, lengths)):  # a tensor subclass
        out, _ = torch.ops.interformer.attention_qkv_fwd(qkv, lengths, *flags, _traced_table(q, k, rope_base))
    else:
        out, _ = _AttentionQKV.apply(qkv, savable(lengths), *flags)
    return out


#: what a module holding one packed projection calls when it resolved the fused :func:`attention`
#: (the reference has no such attribute: the module then unbinds q, k, v itself)
attention.packed = attention_packed


# ============================================================================ PMA pooling, folded
class _ZeroGradient(torch.autograd.Function):
    """``x`` unchanged; each of ``params`` gets an exact zero gradient (a parameter whose true
    gradient is zero stays in the graph, so optimisers and weight decay see it as they would on
    the eager path, where the same gradient is rounding noise)."""

    @staticmethod
    def forward(ctx, x, *params):
        ctx.save_for_backward(*params)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros_like(p) for p in ctx.saved_tensors))


def _compute_dtype(s: torch.Tensor, k_weight: torch.Tensor) -> torch.dtype:
    """The dtype the folded products run in: autocast's where it is on (as for the GEMMs of the
    eager path's projections), else the projections' (the eager path casts the query to its keys'
    dtype; a query of another dtype used to set the dtype of every product here)."""
    cast = autocast_dtype(s.device.type)
    return cast if cast is not None and k_weight.dtype in _DTYPES else k_weight.dtype


def _key_weight(k_weight, k_bias):
    """``k_weight`` with its rows where ``k_bias`` is not finite made NaN (``k_weight + 0 * k_bias``,
    exactly ``k_weight`` otherwise). The folded op drops the key bias (softmax is invariant to the
    per-query shift ``q . b_k`` it adds) -- true only for a finite bias: with an inf or a NaN the
    reference's scores, and so its output, are NaN. Folding this weight instead carries that NaN
    into the folded queries of the head (all of its queries), as the reference has it, at the cost
    of one ``[d, d]`` element-wise op."""
    return torch.add(k_weight, k_bias[:, None], alpha=0.0)


def _fold_queries(query, k_weight, H):
    """The folded queries W_k,h^T q_h ([H, nq, dh] x [H, dh, d]), ordered (query, head) for the
    kernel, so that its output [B, nq * H, 1, d] is the [B * nq, H * d] operand of the output GEMM
    as is: ``(qh [H, nq, dh], wkh [H, dh, d], q_in [1, nq * H, 1, d])``."""
    nq, d = query.shape
    qh = query.view(nq, H, d // H).transpose(0, 1)
    wkh = k_weight.view(H, d // H, d)
    return qh, wkh, torch.bmm(qh, wkh).transpose(0, 1).reshape(1, nq * H, 1, d)


def _fold_values(v_weight, o_weight, H):
    """W_ov [H * d, d], per head W_v,h^T [d, dh] x W_o,h^T [dh, d]: ``(wvh [H, dh, d], woh [H, dh, d], w_ov)``."""
    d = v_weight.shape[0]
    wvh = v_weight.view(H, d // H, d)
    woh = o_weight.view(d, H, d // H).permute(1, 2, 0)
    return wvh, woh, torch.bmm(wvh.transpose(1, 2), woh).view(H * d, d)


@triton.jit
def _fold_head(D, DH, DP: tl.constexpr, DHP: tl.constexpr):
    """Indices of the head a fold program owns (program h): model columns ``i`` (``[DP]``), the
    head's rows ``hr = h * DH + e`` of W_k and W_v (columns of W_o; ``e`` in ``[DHP]``), their
    validity and the ``[DHP, DP]`` mask of a head's rows."""
    h = tl.program_id(0)
    i = tl.arange(0, DP)
    e = tl.arange(0, DHP)
    i_ok = i < D
    e_ok = e < DH
    return h, i, i_ok, h * DH + e, e_ok, e_ok[:, None] & i_ok[None, :]


@triton.jit
def _fold_key_rows(KW, KB, hr, i, e_ok, he, D, CDT: tl.constexpr):
    """The head's rows of W_k ``[DHP, DP]`` in ``CDT``, NaN where b_k is not finite (:func:`_key_weight`)."""
    kb = tl.load(KB + hr, mask=e_ok, other=0.0).to(tl.float32)
    kw = tl.load(KW + hr[:, None] * D + i[None, :], mask=he, other=0.0).to(tl.float32)
    return tl.where((tl.abs(kb) < float("inf"))[:, None], kw, float("nan")).to(CDT)


@triton.jit
def _fold_value_rows(VW, OW, hr, i, he, D, CDT: tl.constexpr):
    """The head's rows of W_v and its columns of W_o, transposed: two ``[DHP, DP]`` tiles in ``CDT``."""
    vh = tl.load(VW + hr[:, None] * D + i[None, :], mask=he, other=0.0).to(CDT)
    oh = tl.load(OW + i[None, :] * D + hr[:, None], mask=he, other=0.0).to(CDT)
    return vh, oh


@triton.jit
def _pma_fold_kernel(
    QIN, WOV, BIAS,
    QUERY, KW, KB, VW, VB, OW, OB,
    NQ, D, DH,
    H: tl.constexpr, HAS_KEYS: tl.constexpr, QB: tl.constexpr, DP: tl.constexpr, DHP: tl.constexpr,
    PREC: tl.constexpr,
):
    """The folded PMA operands of head ``h`` (program h), from the projections as they are stored
    (any float dtype, rounded to the compute dtype of ``QIN`` as they load, as the casts of the
    aten fold did): the folded queries ``q_in[q * H + h] = query_h[q] W_k,h`` (``W_k``'s rows NaN
    where ``b_k`` is not finite, :func:`_key_weight`), the output matrix's block ``W_ov[h] =
    W_v,h^T W_o,h^T`` and, in program 0, the output bias ``b_o + W_o b_v`` (``b_o`` alone without
    keys). fp32 accumulation, one rounding to the compute dtype at the store."""
    CDT: tl.constexpr = QIN.dtype.element_ty
    h, i, i_ok, hr, e_ok, he = _fold_head(D, DH, DP, DHP)
    vh, oh = _fold_value_rows(VW, OW, hr, i, he, D, CDT)  # W_v[hr, :], W_o[:, hr]^T
    wov = tl.dot(tl.trans(vh), oh, input_precision=PREC)
    tl.store(WOV + (h * D + i[:, None]) * D + i[None, :], wov.to(CDT), mask=i_ok[:, None] & i_ok[None, :])
    kw = _fold_key_rows(KW, KB, hr, i, e_ok, he, D, CDT)
    for q0 in range(0, NQ, QB):  # the queries in blocks of QB rows
        q = q0 + tl.arange(0, QB)
        q_ok = q < NQ
        qh = tl.load(QUERY + q[:, None] * D + hr[None, :], mask=q_ok[:, None] & e_ok[None, :], other=0.0).to(CDT)
        qin = tl.dot(qh, kw, input_precision=PREC)  # [QB, DP]
        tl.store(QIN + (q[:, None] * H + h) * D + i[None, :], qin.to(CDT), mask=q_ok[:, None] & i_ok[None, :])
    if h == 0:
        bias = tl.load(OB + i, mask=i_ok, other=0.0).to(CDT).to(tl.float32)
        if HAS_KEYS:
            ow = tl.load(OW + i[:, None] * D + i[None, :], mask=i_ok[:, None] & i_ok[None, :], other=0.0)
            vb = tl.load(VB + i, mask=i_ok, other=0.0).to(CDT).to(tl.float32)
            bias += tl.sum(ow.to(CDT).to(tl.float32) * vb[None, :], 1)
        tl.store(BIAS + i, bias.to(CDT), mask=i_ok)


@triton.jit
def _pma_fold_bwd_kernel(
    DQUERY, DKW, DKB, DVW, DVB, DOW,
    DQIN, DWOV, DBIAS,
    QUERY, KW, KB, VW, VB, OW,
    NQ, D, DH,
    H: tl.constexpr, HAS_KEYS: tl.constexpr, QB: tl.constexpr, DP: tl.constexpr, DHP: tl.constexpr,
    PREC: tl.constexpr,
):
    """The gradients of :func:`_pma_fold_kernel`'s products for head ``h`` (program h), from those of
    the folded queries (``DQIN [nq * H, d]``, summed over the batch), of ``W_ov`` (``DWOV [H * d,
    d]``) and of the output bias (``DBIAS [d]``), all in the compute dtype: the head's columns of
    dquery and dW_o and rows of dW_k, dW_v, db_v, and zeros for db_k (softmax ignores a per-query
    shift). Each stored once in its parameter's dtype from fp32 sums of compute-dtype products."""
    CDT: tl.constexpr = DQIN.dtype.element_ty
    h, i, i_ok, hr, e_ok, he = _fold_head(D, DH, DP, DHP)
    # the folded queries' part: dquery_h = dq_h W_k,h^T, dW_k,h = query_h^T dq_h (summed over the
    # query blocks)
    kw = _fold_key_rows(KW, KB, hr, i, e_ok, he, D, CDT)
    dkw = tl.zeros([DHP, DP], tl.float32)
    for q0 in range(0, NQ, QB):
        q = q0 + tl.arange(0, QB)
        q_ok = q < NQ
        qe = q_ok[:, None] & e_ok[None, :]
        dq = tl.load(DQIN + (q[:, None] * H + h) * D + i[None, :], mask=q_ok[:, None] & i_ok[None, :], other=0.0)
        qh = tl.load(QUERY + q[:, None] * D + hr[None, :], mask=qe, other=0.0).to(CDT)
        dquery = tl.dot(dq, tl.trans(kw), input_precision=PREC)  # [QB, DHP]
        tl.store(DQUERY + q[:, None] * D + hr[None, :], dquery.to(DQUERY.dtype.element_ty), mask=qe)
        dkw = tl.dot(tl.trans(qh), dq, dkw, input_precision=PREC)  # [DHP, DP]
    tl.store(DKW + hr[:, None] * D + i[None, :], dkw.to(DKW.dtype.element_ty), mask=he)
    tl.store(DKB + hr, tl.zeros([DHP], tl.float32).to(DKB.dtype.element_ty), mask=e_ok)
    # W_ov's part: dW_v,h = W_o,h^T dW_ov[h]^T, dW_o[:, hr] = (W_v,h dW_ov[h])^T (+ db_o b_v,h^T)
    dwov = tl.load(DWOV + (h * D + i[:, None]) * D + i[None, :], mask=i_ok[:, None] & i_ok[None, :], other=0.0)
    vh, oh = _fold_value_rows(VW, OW, hr, i, he, D, CDT)
    dvw = tl.dot(oh, tl.trans(dwov), input_precision=PREC)  # [DHP, DP]
    tl.store(DVW + hr[:, None] * D + i[None, :], dvw.to(DVW.dtype.element_ty), mask=he)
    dow = tl.dot(vh, dwov, input_precision=PREC)  # [DHP, DP], indexed [e, j]
    dbias = tl.load(DBIAS + i, mask=i_ok, other=0.0).to(tl.float32)
    if HAS_KEYS:
        vb = tl.load(VB + hr, mask=e_ok, other=0.0).to(CDT).to(tl.float32)
        dow += vb[:, None] * dbias[None, :]
        dvb = tl.sum(oh.to(tl.float32) * dbias[None, :], 1)  # [DHP]
    else:  # no keys: b_v never reached the output
        dvb = tl.zeros([DHP], tl.float32)
    tl.store(DOW + i[None, :] * D + hr[:, None], dow.to(DOW.dtype.element_ty), mask=he)
    tl.store(DVB + hr, dvb.to(DVB.dtype.element_ty), mask=e_ok)


def _fold_plan(d: int, H: int) -> dict:
    """Tiles of the fold kernels: queries in blocks of 16 rows (the ``tl.dot`` minimum; the model's
    few PMA queries are one block, and any number works), ``d`` and the head width padded to powers
    of two (at least 16)."""
    return dict(H=H, QB=16, DP=max(16, next_pow2(d)), DHP=max(16, next_pow2(d // H)), num_warps=8 if d > 64 else 4)


@on_input_device
def _fold_params(query, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias, H: int, c: torch.dtype, has_keys: bool):
    """``(q_in [1, nq * H, 1, d], w_ov [H * d, d], bias [d])`` in ``c``: :func:`_pma_fold_kernel`, one
    launch (H programs) where the aten fold took about twenty ops."""
    nq, d = query.shape
    dev = query.device
    q_in = torch.empty((1, nq * H, 1, d), device=dev, dtype=c)
    w_ov = torch.empty((H * d, d), device=dev, dtype=c)
    bias = torch.empty((d,), device=dev, dtype=c)
    params = [t.contiguous() for t in (query, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias)]
    launch(_pma_fold_kernel)[(H,)](q_in, w_ov, bias, *params, nq, d, d // H, HAS_KEYS=has_keys,
                                   PREC=dot_precision(c), **_fold_plan(d, H))
    return q_in, w_ov, bias


@on_input_device
def _fold_params_bwd(dq_in, d_wov, d_bias, query, k_weight, k_bias, v_weight, v_bias, o_weight, H: int,
                     has_keys: bool):
    """``(d_query, d_wk, d_kb, d_wv, d_bv, d_wo)``, each in its parameter's dtype, from the
    gradients of the folded products (:func:`_pma_fold_bwd_kernel`, one launch)."""
    nq, d = query.shape
    params = [t.contiguous() for t in (query, k_weight, k_bias, v_weight, v_bias, o_weight)]
    grads = [torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in params]
    launch(_pma_fold_bwd_kernel)[(H,)](*grads, dq_in.contiguous(), d_wov.contiguous(), d_bias.contiguous(), *params,
                                       nq, d, d // H, HAS_KEYS=has_keys, PREC=dot_precision(dq_in.dtype),
                                       **_fold_plan(d, H))
    return tuple(grads)


def _fold_params_bwd_aten(dq_in, d_wov, d_bias, query, k_weight, k_bias, v_weight, v_bias, o_weight, H: int,
                          has_keys: bool):
    """:func:`_fold_params_bwd` in aten ops (small batched GEMMs in the compute dtype of ``dq_in``),
    for the batched backward, whose gradients a launcher cannot read (``is_grads_batched``, vmap
    over a backward). It reuses the traced path's fold helpers, whose folded products it drops."""
    c = dq_in.dtype
    nq, d = query.shape
    qh, wkh, _ = _fold_queries(query.to(c), _key_weight(k_weight, k_bias).to(c), H)
    o_w, v_b = o_weight.to(c), v_bias.to(c)
    wvh, woh, _ = _fold_values(v_weight.to(c), o_w, H)
    dqf = dq_in.view(nq, H, d).transpose(0, 1)  # [H, nq, d]
    d_wov = d_wov.view(H, d, d)
    d_query = torch.bmm(dqf, wkh.transpose(1, 2)).transpose(0, 1).reshape(nq, d)
    d_wk = torch.bmm(qh.transpose(1, 2), dqf).view(d, d)
    d_wv = torch.bmm(woh, d_wov.transpose(1, 2)).view(d, d)
    d_wo = torch.bmm(wvh, d_wov).permute(2, 0, 1).reshape(d, d)
    if has_keys:
        d_wo = d_wo.addr_(d_bias, v_b)
        d_bv = torch.mv(o_w.t(), d_bias)
    else:  # no keys: b_v never reached the output
        d_bv = torch.zeros_like(v_b)
    return (d_query.to(query.dtype), d_wk.to(k_weight.dtype), torch.zeros(d, dtype=k_bias.dtype, device=k_bias.device),
            d_wv.to(v_weight.dtype), d_bv.to(v_bias.dtype), d_wo.to(o_weight.dtype))


def _pooled_forward(s, lengths, query, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias, H):
    """The folded PMA forward (:func:`pooled_attention`), no autograd: ``(out, saved)`` with
    ``saved`` what the backward needs."""
    B, L, d = s.shape
    nq, dh = query.shape[0], d // H
    c = _compute_dtype(s, k_weight)
    # the folded operands in one launch; with no key at all (L = 0) the probabilities sum to 0, not
    # 1, and b_v never reaches the output
    q_in, w_ov, bias = _fold_params(query, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias, H, c, L > 0)
    # s as it comes (it may be fp32 under a 16-bit autocast): the kernels round its tiles to the
    # folded queries' dtype as they load them, which is what a cast before the call would do,
    # without the cast's copy (and its backward's: ds comes back in s's dtype)
    kv = s.unsqueeze(2)
    a, stats = _attention_fwd_impl(q_in, kv, kv, lengths, False, None, False, False, 1.0 / math.sqrt(dh))
    mask = (lengths > 0).to(c)[:, None, None]
    # the output GEMM writes into the [B, nq, d] tensor it returns: a view of the GEMM's result,
    # returned from the autograd.Function, could not be modified in place (autograd refuses it for
    # a custom Function's view outputs), where the eager module's output can
    out = torch.empty((B, nq, d), device=s.device, dtype=w_ov.dtype)
    torch.addmm(bias, a.view(B * nq, H * d), w_ov, out=out.view(B * nq, d))
    out.mul_(mask)
    return out, (q_in, kv, a, stats, lengths, w_ov, mask, query, k_weight, k_bias, v_weight, v_bias, o_weight)


def _pooled_lean_forward(ctx, s, lengths, query, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias, H):
    out, saved = _pooled_forward(s, lengths, query, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias, H)
    ctx.save_for_backward(*saved)
    ctx.heads, ctx.empty = H, s.shape[1] == 0
    ctx.dtypes = s.dtype, o_bias.dtype  # ds and d_bias; the fold's gradients take their parameters' own
    return out


def _pooled_attention_bwd_lean(d_a, q_in, kv, a, stats, lengths, scale):
    """``(dq_in, ds)`` of the folded call: the launcher writes ``ds = dk + dv`` itself (``SAME_KV``)."""
    dq_in, ds, _ = _attention_bwd_impl(d_a, q_in, kv, kv, a, stats, lengths, False, None, False, False, scale,
                                       same_kv=True)
    return dq_in, ds


def _pooled_attention_bwd_op(d_a, q_in, kv, a, stats, lengths, scale):
    """``(dq_in, ds)`` through the registered backward op (batched gradients, see ``lean_function``)."""
    dq_in, dk, dv = torch.ops.interformer.attention_bwd(d_a, q_in, kv, kv, a, stats, lengths, False, None, False, False,
                                                        scale)
    return dq_in, dk + dv


def _pooled_lean_backward(ctx, grad, attention_bwd=_pooled_attention_bwd_lean, fold_bwd=_fold_params_bwd):
    """Gradients of :func:`_pooled_forward` in closed form: the output GEMM's (two GEMMs and a
    column sum), the attention kernels' backward (dq of the folded queries and ds = dk + dv in one
    tensor, ``SAME_KV``), and the fold's (one launch of :func:`_pma_fold_bwd_kernel`); each
    gradient is returned in its input's dtype. k_bias gets an exact zero (softmax ignores a per-row
    shift). With every parameter frozen (``requires_grad=False``) only ds is computed; with some frozen, the others'
    gradients are computed as usual and the frozen ones' are dropped."""
    if grad is None:
        return (None,) * 10
    q_in, kv, a, stats, lengths, w_ov, mask, *params = ctx.saved_tensors
    H = ctx.heads
    B, L, _, d = kv.shape
    nq, dh = params[0].shape[0], d // H
    g = (grad.to(mask.dtype) * mask).reshape(B * nq, d)  # the upstream gradient may be any view
    d_a = torch.mm(g, w_ov.t()).view(B, nq * H, 1, d)
    dq_in, ds = attention_bwd(d_a, q_in, kv, a, stats, lengths, 1.0 / math.sqrt(dh))
    ds = ds.view(B, L, d).to(ctx.dtypes[0])
    need = ctx.needs_input_grad
    if not any(need[2:9]):  # frozen parameters: the fold's gradients are skipped
        return (ds, *(None,) * 9)
    d_wov = torch.mm(a.view(B * nq, H * d).t(), g)
    d_bias = g.sum(0)
    d_query, d_wk, d_kb, d_wv, d_bv, d_wo = fold_bwd(dq_in, d_wov, d_bias, *params, H, not ctx.empty)
    return (ds, None, *_needed((d_query, d_wk, d_kb, d_wv, d_bv, d_wo, d_bias.to(ctx.dtypes[1])), need[2:9]), None)


def _pooled_batched_backward(ctx, grad):
    return _pooled_lean_backward(ctx, grad, _pooled_attention_bwd_op, _fold_params_bwd_aten)


_PooledAttention = lean_function("_PooledAttention", _pooled_lean_forward, _pooled_lean_backward,
                                 _pooled_batched_backward)


def _pooled_traced(s, lengths, query, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias, H):
    """The folded PMA built from the attention custom op and aten ops, for tracers (torch.compile,
    export), which differentiate it themselves: same products as :func:`_pooled_forward`."""
    B, L, d = s.shape
    nq, dh = query.shape[0], d // H
    q = _fold_queries(query.to(k_weight.dtype), _key_weight(k_weight, k_bias), H)[2]  # as eager casts it
    if torch.is_grad_enabled() and k_bias.requires_grad:
        q = _ZeroGradient.apply(q, k_bias)
    kv = s.to(q.dtype).unsqueeze(2)
    a = attention(q, kv, kv, lengths, causal=False, rope_base=None, rope_q=False, mask_queries=False,
                  sm_scale=1.0 / math.sqrt(dh))
    w_ov = _fold_values(v_weight, o_weight, H)[2]
    bias = torch.addmv(o_bias, o_weight, v_bias, alpha=1.0 if L else 0.0)
    out = torch.addmm(bias, a.view(B * nq, H * d), w_ov).view(B, nq, d)
    return out * (lengths > 0).to(out.dtype)[:, None, None]


def pooled_attention(
    s: torch.Tensor,
    lengths: torch.Tensor,
    query: torch.Tensor,
    k_weight: torch.Tensor,
    k_bias: torch.Tensor,
    v_weight: torch.Tensor,
    v_bias: torch.Tensor,
    o_weight: torch.Tensor,
    o_bias: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """PMA pooling on the fused kernel; same contract as :func:`interformer.reference.pooled_attention`.

    The key and value projections are folded into the queries and one output matrix
    (``PoolingMultiHeadAttention``'s docstring gives the algebra): one attention launch with
    ``nq * num_heads`` shared queries over ``s`` itself as keys and values, so K and V never exist.
    Outside tracing the whole op is one ``autograd.Function`` (:func:`_pooled_lean_backward` gives
    every gradient in closed form: one autograd node where the same ops recorded one by one made
    26, counted on the CPU under fp16 autocast), and the fold and its gradients are one Triton launch each
    (:func:`_pma_fold_kernel`, :func:`_pma_fold_bwd_kernel`, where the aten fold and its gradients
    took about 40 ops per call: host time at the model's sizes); traced calls build it from the
    attention custom op and aten ops. Models wider
    than the kernel's widest head (``d > 128``) project K and V and run the kernel over
    ``d / num_heads``-wide heads. The folding drops the key bias (a per-query shift of the scores),
    except that an inf or a NaN in it still makes the output NaN, as in the reference
    (:func:`_key_weight`).
    """
    if not isinstance(s, torch.Tensor) or s.dim() != 3 or query.dim() != 2 or s.shape[2] != query.shape[1]:
        raise ValueError(f"pooled_attention: s must be [B, L, d] and query [nq, d], got "
                         f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__} and {tuple(query.shape)}")
    d = s.shape[2]
    if num_heads < 1 or d % num_heads:
        raise ValueError(f"pooled_attention: d={d} is not divisible by num_heads={num_heads}")
    # the projections: the fold kernel reads [d, d] and [d] from each (a smaller one would be read
    # past its end), so their shapes are checked on every path
    for name, t, shape in (("k_weight", k_weight, (d, d)), ("k_bias", k_bias, (d,)), ("v_weight", v_weight, (d, d)),
                           ("v_bias", v_bias, (d,)), ("o_weight", o_weight, (d, d)), ("o_bias", o_bias, (d,))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not t.is_floating_point():
            raise ValueError(f"pooled_attention: {name} must be a floating-point tensor {list(shape)} for d={d}, got "
                             f"{describe_shape(t)}{'' if not isinstance(t, torch.Tensor) else ' ' + str(t.dtype)}")
    tensors = (s, lengths, query, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias)
    # outside autocast the eager path's projections need s's dtype in their weights and biases (it
    # casts the query to the keys' dtype itself): refused alike
    if len({t.dtype for t in (s,) + tensors[3:]}) > 1 and autocast_dtype(s.device.type) is None:
        raise ValueError(f"pooled_attention: s and the projections must share one dtype outside autocast, got s "
                         f"{s.dtype}, projections {[str(t.dtype) for t in tensors[3:]]}")
    if reference_only(s):  # a torch.func transform, ONNX export (_dispatch.reference_only): the reference
        return reference.pooled_attention(*tensors, num_heads)
    if d > MAX_HEAD_DIM:
        return reference.projected_pma(attention, s, lengths, query, k_weight, k_bias, v_weight, v_bias, o_weight,
                                       o_bias, num_heads)
    if tracing(tensors):
        return _pooled_traced(*tensors, num_heads)
    c = _compute_dtype(s, k_weight)
    if c not in _DTYPES or s.dtype not in _DTYPES:
        raise ValueError(f"pooled_attention: the sequence ({s.dtype}) and the products ({c}) must be among {_DTYPES}")
    if any(t.dtype not in _DTYPES for t in tensors[3:]):
        raise ValueError(f"pooled_attention: the projections' weights and biases must be among {_DTYPES}, got "
                         f"{[str(t.dtype) for t in tensors[3:]]}")
    _check_lengths_and_device("pooled_attention", "s, lengths and the parameters", lengths, s.shape[0], tensors[2:] + (s,))
    if needs_grad(tensors):
        return _PooledAttention.apply(tensors[0], savable(lengths), *tensors[2:], num_heads)
    return _pooled_forward(s, lengths, query, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias, num_heads)[0]
