"""Self-gating linear compressed embedding (gated LCE): fused Triton forward and backward.

Public function (same name and signature as :func:`interformer.reference.gated_lce`)::

    gated_lce(x, weight, bias, gate_weight, gate_bias)

    Y[b, m, :] = sum_n weight[n, m] * x[b, n, :] + bias[m]          (token-axis compression)
    out        = Y * sigmoid(Y @ gate_weight^T + gate_bias)           (self-gating)

x ``[B, n_in, d]``, weight ``[n_in, n_out]``, bias ``[n_out]``, gate_weight ``[d, d]`` (``nn.Linear``
layout), gate_bias ``[d]`` -> contiguous ``[B, n_out, d]`` in x's dtype.

Why a fused kernel
------------------
The per-sample matrices are tiny (taobao: B = 2048 samples of 20 x 64 tokens compressed to 4 x 64)
so the op is purely memory-bound: the floor is "read x once, write out once". Eager runs an einsum,
a bias add, a linear, a sigmoid and a multiply (and their backwards), each a full HBM round trip of
``Y`` or the gate. Here ``Y`` and the gate never leave registers, forward and backward.

Row layout: samples flattened into token rows
---------------------------------------------
A program handles a block of ``n_per`` consecutive samples. Their ``n_per * n_in`` input tokens are
one register tile ``x [KX, DP]`` (row ``k`` = sample ``k // n_in``, token ``k % n_in``; ``KX``, ``DP``
= powers of two >= 16; padding masked to 0; x read through its three strides, so transposed or
sliced views need no copy), and their ``n_per * n_out`` output tokens are the rows of ``[RO, DP]``
tiles. The compression is then ONE 2-D ``tl.dot`` with a block-diagonal matrix ``Wbd [RO, KX]``
(``Wbd[r, k] = weight[k % n_in, r % n_out]`` when r and k belong to the same sample, else 0), built
once per program by a masked gather from the (L1-resident) weight. Its zeros waste tensor-core work,
which is free here, while no register is spent on padding n_out up to the 16 rows ``tl.dot`` needs
(a per-sample 3-D dot would pad 4 output tokens to 16 and quadruple every ``[rows, d]`` tile).

Block sizes (``_config``, fixed by the shape, no autotune): forward ``n_per = min(8192/DP // n_in,
64 // n_out)`` (taobao nonseq n_in = 20, d = 64: 6 samples, 120 token rows in a 128-row tile, 24
output rows in 32; seq summary 8 -> 8: 8 samples, 64/64 rows; long nonseq n_in = 64, d = 128: one
sample), backward ``min(4096/DP // n_in, 32 // n_out)`` (more live tiles); 4 warps, 8 when a tile
reaches 8192 elements or in the backward at d >= 64. Checked by compiling for sm_90 ahead of time
with Triton 3.6, the GPU machines' version (``profiling/sm90_audit.py``; bf16 at the DESIGN shapes,
2026-11-28): the forward takes 80-192 registers, no spills; the backward 138-255, one 8-warp
program per SM, 7 spill stores (a 24-byte stack) at long's 8 -> 8 summary (d = 128); fp32 spills
more (correct, not tuned). The "acc" backward of taobao's d = 64 plans runs two programs an SM
under a 128-register cap (:func:`_acc_plan`, timed on an H200). Larger blocks, one forward program
per block and deeper pipelines were timed there too and lost (see :func:`_config`).

Forward (``_glce_fwd_kernel``): one launch, programs looping over sample blocks
-------------------------------------------------------------------------------
``Y = Wbd @ x + bias`` (fp32 accumulator), ``Z = Y @ gate_weight^T + gate_bias`` (one ``tl.dot``
with the ``[d, d]`` gate weight, L2-resident across programs), ``out = Y * sigmoid(Z)`` in fp32
registers; only ``out`` is stored. A program takes the blocks ``pid, pid + G, ...``: it builds
``Wbd`` and loads the gate weight and both biases once, and Triton pipelines the block loop (the
next x tile is fetched while the current one is computed). G is one program per block until a
launch has shown how many programs of that build an SM holds, then one wave of them
(:func:`_fwd_programs`): the same output for any G, since each block is computed alone.

Non-finite inputs: in ``Wbd @ x`` the zeros between samples multiply every token of the block, so
one inf or NaN in x made the whole block's output NaN (``0 * inf``), where the reference's output
is non-finite in that sample only. The forward checks each block (one reduction of its x tile
or of ``Y``, whichever is smaller: :func:`_check_x`, :func:`_any_nonfinite`) and, when it holds an
inf or a NaN, stores nothing from the dot and computes ``Y`` sample by sample
(``_glce_compress_per_sample``: n_in broadcast multiply-adds of gathered rows, ``Y``'s padding
columns set to zero): the output then has exactly the reference's non-finite elements, NaN where
it has NaN and the same infinity where it has one (tests/test_nonfinite.py; for finite inputs the
fp32 ``Y`` can stay finite where eager's 16-bit one overflows: see "Dtypes and precision"). A
non-finite ``weight`` or ``bias`` takes the slow path too: the ``Y`` check sees it, and each
program checks its bias, rounded to the compute dtype, and where x is checked its ``Wbd``, once.
(The dot's padding columns of ``Y``, ``bias`` or ``inf * 0``, times the gate weight's zero padding
made a whole row of ``Z`` NaN where the reference's could be finite or infinite: until 2026-11-29
an inf bias with a one-signed gate weight row, or under fp16 autocast an fp32 bias past 65504, gave
NaN there.) On the finite path the check costs one reduction of the smaller tile. With this form
(``Y`` checked there, and no ``Y`` merged across the branch: :func:`_glce_fwd_kernel`) a block of
taobao's 20 -> 4 summary costs a warp 345 instructions, against 566 when the x tile was checked
before the dot (sm_90, Triton 3.6, with ``tl.sigmoid``; 288 with the fast sigmoid,
:func:`._common.sigmoid`; 270 with the check a sum, :func:`_any_nonfinite`; :func:`_check_x` has
the other shapes). The backward keeps the dot: with a non-finite x or upstream gradient some of the reference's parameter gradients are
non-finite too (so a GradScaler skips the step either way). On top of the reference's, the dot
spreads NaN to the tile's other rows: the block's other samples (their dx), and, through the Y, Z
and dZ of those samples and of the tile's padding rows (zero weights times the inf), more entries
of every parameter gradient. A fuzzing helper's case (2026-11-28): one inf in x of a one-sample
block (n_in 48, n_out 5 padded to 16 rows, d 100) made all of dgate_bias NaN, and in the "acc" mode
all of dgate_weight ("store" stores dZ and Y of valid rows only), where the reference's are
non-finite in one entry, and in one row and one column; dW and dbias are non-finite in both. Every
gradient entry the reference makes non-finite is non-finite here too (tests/test_nonfinite.py).

Backward (``_glce_bwd_kernel`` + one reduction): ``Y``, ``Z`` recomputed, nothing else saved
-----------------------------------------------------------------------------------------
With ``s = sigmoid(Z)``: ``dZ = dO * Y * s * (1 - s)`` (the slope formed without cancellation,
:func:`_sigmoid_and_slope`), ``dY = dO * s + dZ @ gate_weight``,
``dx = Wbd^T @ dY`` (stored per block), ``dgate_bias = sum dZ``, ``dbias = sum dY``,
``dW[n, m] = sum x[b, n] . dY[b, m]`` (per program: ``x @ dY^T`` accumulated as ``[KX, RO]`` fp32,
its same-sample entries folded into ``[n_in, n_out]`` once at the end by two exact one-hot matmuls),
and ``dgate_weight = dZ^T Y`` -- a ``[d, B*n_out] x [B*n_out, d]`` reduction over all samples, done
one of two ways (``_gw_mode``, chosen from the bytes each moves):

* ``"store"``: up to 4 programs per SM, so about one sample block per program; dZ and Y are
  written once in the compute dtype (``2 * B * n_out * d`` elements) and ``torch.mm(dZ^T, Y)``
  (cuBLAS, fp32 accumulation) forms dgate_weight -- the one place this op uses cuBLAS: a fused split-K would need either atomics or
  per-program ``[d, d]`` fp32 partials, which cost more bytes than dZ and Y when few samples share a
  program (e.g. ``long``: d = 128, B = 512);
* ``"acc"``: ``G`` = one or two persistent programs an SM (:func:`_acc_plan`; under the
  interpreter 2 or 4, so tests run the loop) loop over sample blocks ``pid, pid + G, ...`` and
  accumulate dgate_weight in fp32 registers; chosen when the ``[G, d, d]`` fp32 partials move fewer
  than half the bytes of dZ and Y (large batches with many output tokens per sample; at the DESIGN
  shapes on an H100, 132 SMs, "store" wins everywhere: the seq summary at B = 2048 by 8.4 MB of dZ
  and Y against 8.7 MB of partials with one program an SM, 17.3 MB with the two of taobao's plans).

Each program writes its cross-sample partial sums (dgate_bias, dW, dbias, and in "acc" mode
dgate_weight) once to an fp32 ``[programs, P]`` buffer, which :func:`._common.sum_partials` reduces in a
fixed order (deterministic, no atomics) straight into the parameters' gradients, in their dtypes
(one launch for all of them). The upstream gradient is read through its strides (a stride-0 expand
after ``out.sum()`` is fine). ``GW_MODE`` forces a mode (tests run both).

Dtypes and precision
--------------------
x may be fp32, fp16 or bf16; dx is in x's dtype. The four parameters must have x's dtype, except
under ``torch.autocast`` on x's device type where x is first cast to the autocast dtype (as eager's
einsum/linear would) and the parameters may stay fp32: the kernels read them in their own dtype,
cast them to the compute dtype in registers, and return their gradients in their own dtype (no cast
kernels, no ``ToCopyBackward``). The output's dtype is eager's, ``promote_types(x, bias)`` of the
cast x: x's outside autocast, fp32 under autocast with an fp32 bias (``Y = x W + bias`` promotes,
and ``Y * sigmoid(...)`` keeps it). Decision (2026-11-29): until then the output was in the autocast
dtype, which saved half its bytes but made the fused module no drop-in (another dtype out) and
rounded the upstream gradient to 16 bits before the bias gradient summed it: in a model whose
summary tokens feed LayerNorms (input gradients of zero mean, so that sum nearly cancels) the bias
gradient's error reached 4-5x eager's under fp16 autocast, against DESIGN §5's 2x (a review's and
a fuzzing helper's finds). The backward reads the upstream gradient in whatever dtype it comes
(fp32 here) and forms dY, dZ and the sums from it in fp32. Accumulation is fp32; Y and the gate
stay fp32 in registers (eager's Y is fp32 with an fp32 bias, in the low dtype otherwise, and its
gate in the low dtype), and operands are cast to the compute dtype just before each ``tl.dot``.
fp32 inputs take exact fp32 FMA dots (``input_precision="ieee"``, not
the tensor cores) in both kernels, for the reasons :func:`_bwd_launch_options` and
:func:`_fwd_launch_options` give: fp32 is a correctness mode here, not a performance target.
fp16/bf16 inputs form the gate's sigmoid (and the backward its slope) with
``tl.exp2`` and ``tl.math.rsqrt``, which build to one approximate instruction each (``FAST``:
:func:`._common.sigmoid`, :func:`_sigmoid_and_slope`, :func:`_fast_math`): some ulp of fp32
(denormal results flushed to zero), far below the rounding of the gate's 16-bit pre-activation
(the dot's operands), in fewer instructions.

Limits: d <= 128, n_in <= 128 and n_out <= 64; larger sizes, and inputs with no elements, go to
the eager reference (same math, same autograd). The bound is the backward's shared memory: its
``dW`` fold multiplies fp32 one-hot selection tiles ``[NIP, KX]`` and ``[RO, NOP]``, and sm_90
builds at the corner (n_in 128, n_out 64, d 128) take 229,376 bytes in fp32 against an H100's
232,448; n_in 129..256 took 279,552 and n_out 128 at n_in 128 took 262,144 (too much to launch).
At the DESIGN shapes the model's gated LCEs take at most 64 tokens in (``long``'s n) and give at
most 8 out (n_ssum).

``torch.library``: ``interformer::gated_lce_fwd`` and ``interformer::gated_lce_bwd`` are
``custom_op`` s with fake implementations; the forward's autograd formula calls the backward op, so
``torch.compile(fullgraph=True)`` traces both. The op boundary is opaque to Inductor. Outside
tracing, :func:`gated_lce` calls the same launchers through a plain ``autograd.Function`` (or none
when no input needs a gradient), which skips the custom op's dispatch overhead (see
:mod:`interformer.kernels._dispatch`).
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (KERNEL_DTYPES, LOG2E, cdiv, describe_shape, dot_precision, int32_block, int_setting, next_pow2,
                      num_sms, on_input_device, promote_dtypes, resident_programs, sigmoid, sum_partials)
from ._dispatch import (_decomposing, autocast_dtype, fx_call, inline_when_compiled, launch,
                        lean_function, needed as _needed, needs_grad, reference_only, saving_forward, tracing,
                        unused_arg)

__all__ = ["gated_lce"]

_DTYPES = KERNEL_DTYPES
MAX_D = 128
MAX_N_IN = 128
MAX_N_OUT = 64
_MAX_N_OUT = tl.constexpr(MAX_N_OUT)


# ============================================================================ kernels
@triton.jit
def _glce_tile_index(N_IN, N_OUT, n_per, KX: tl.constexpr, RO: tl.constexpr):
    """Flattened row indices of a block of ``n_per`` samples: token rows ``k`` (sample ``k // n_in``,
    token ``k % n_in``) and output rows ``r`` (sample ``r // n_out``, output token ``r % n_out``)."""
    k = tl.arange(0, KX)
    r = tl.arange(0, RO)
    ks = k // N_IN
    rs = r // N_OUT
    return k, ks, k - ks * N_IN, r, rs, r - rs * N_OUT, k < n_per * N_IN, r < n_per * N_OUT


@triton.jit
def _glce_block_diag(W, N_IN, N_OUT, n_per, swn, swm, CDT: tl.constexpr, KX: tl.constexpr, RO: tl.constexpr):
    """Compression matrix of a block, ``[RO, KX]``: ``W[k % n_in, r % n_out]`` where output row r and
    token row k belong to the same sample, 0 elsewhere (so ``Y = Wbd @ x`` is one 2-D ``tl.dot``)."""
    k, ks, kn, r, rs, rm, k_ok, r_ok = _glce_tile_index(N_IN, N_OUT, n_per, KX, RO)
    same = (rs[:, None] == ks[None, :]) & r_ok[:, None] & k_ok[None, :]
    return tl.load(W + kn[None, :] * swn + rm[:, None] * swm, mask=same, other=0.0).to(CDT)


@triton.jit
def _glce_compress_per_sample(Xb, W, nb, N_IN, N_OUT, D, sxb, sxn, sxd, swn, swm,
                              CDT: tl.constexpr, RO: tl.constexpr, DP: tl.constexpr):
    """``sum_n weight[n, m] x[b, n, :]`` for the output rows of a block (``[RO, DP]`` fp32) sample by
    sample: n_in broadcast multiply-adds of gathered token rows (operands rounded to the compute
    dtype, as the dot's are; fp32 sums) instead of the block-diagonal ``tl.dot``, in which the zero
    weights between samples times an inf or a NaN of one sample put NaN into every other sample of
    the block. The forward's slow path (:func:`_glce_fwd_kernel`), for a block whose x tile or ``Y`` is
    not finite."""
    r = tl.arange(0, RO)
    rs = r // N_OUT
    rm = r - rs * N_OUT
    r_live = r < nb * N_OUT
    j = tl.arange(0, DP)
    m = r_live[:, None] & (j < D)[None, :]
    acc = tl.zeros([RO, DP], tl.float32)
    for n in range(0, N_IN):
        w = tl.load(W + n * swn + rm * swm, mask=r_live, other=0.0).to(CDT).to(tl.float32)
        xv = tl.load(Xb + (rs * sxb + n * sxn)[:, None] + j[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
        acc += w[:, None] * xv
    return acc


@triton.jit
def _glce_params(BIAS, GW, GB, N_IN, N_OUT, D, n_per, sgo, sgi, CDT: tl.constexpr, KX: tl.constexpr,
                 RO: tl.constexpr, DP: tl.constexpr):
    """What every block of a program shares, loaded once before its block loop: the bias of each
    output row (fp32 ``[RO]``), the gate weight ``gw[k_out, j_in]`` (``[DP, DP]`` in the compute
    dtype) and the gate bias (fp32 ``[DP]``)."""
    k, ks, kn, r, rs, rm, k_ok, r_ok = _glce_tile_index(N_IN, N_OUT, n_per, KX, RO)
    j = tl.arange(0, DP)
    j_ok = j < D
    bias = tl.load(BIAS + rm, mask=r_ok, other=0.0).to(tl.float32)
    gw = tl.load(GW + j[:, None] * sgo + j[None, :] * sgi, mask=j_ok[:, None] & j_ok[None, :], other=0.0).to(CDT)
    gb = tl.load(GB + j, mask=j_ok, other=0.0).to(tl.float32)
    return bias, gw, gb


@triton.jit
def _sigmoid_and_slope(z, FAST: tl.constexpr):
    """``(sigmoid(z), sigmoid'(z))`` in fp32, the slope without cancellation: ``s * (1 - s)`` loses
    ``1 - s`` to rounding once ``s`` is within a few ulps of 1 (fp32: z past about 8; past about 17,
    ``s`` is 1 and the slope 0 where it is ``e**-z``), and eager's sigmoid backward forms it that way.
    Here ``t = exp(-|z|)`` (in ``[0, 1]``: it never overflows, and past ``|z|`` of about 104 it
    underflows to 0, as fp32's slope does) gives ``sigmoid(|z|) = 1 / (1 + t)``, ``sigmoid(-|z|) =
    t / (1 + t)`` and the slope ``t / (1 + t)**2``, exact to rounding at any finite z (NaN and
    infinite z give what ``s * (1 - s)`` gave). Measured under the interpreter in fp32, gates about
    16 (``test_saturated_gates_keep_their_slope``): dgate_weight 0.7% off float64 with
    ``s * (1 - s)`` (eager's: 0.7%), 2e-7 with this. In fp16 and under autocast Z itself comes from
    a rounded Y, and the slope's form matters far less (closing note of the twenty-seventh session).

    With ``FAST`` (16-bit inputs: :func:`_fast_math`) ``t = 2**(-|z| log2 e)`` and ``r = rsqrt((1 +
    t)**2)``, one approximate instruction each (see :func:`._common.sigmoid`); ``t`` is then 0 past
    ``|z|`` of about 87 instead of a denormal, and the slope 0 there, as eager's ``s * (1 - s)``
    gives it already past 17. On sm_90 (Triton 3.6, bf16, taobao-b64k) that cut a backward block from 325 to
    296 instructions a warp (20 -> 4 summary) and from 457 to 402 (8 -> 8, one more spill load and
    store a block under its 128-register cap)."""
    if FAST:
        t = tl.exp2(tl.abs(z) * -LOG2E)
        r = tl.math.rsqrt((1.0 + t) * (1.0 + t))
    else:
        t = tl.exp(-tl.abs(z))
        r = 1.0 / (1.0 + t)
    return tl.where(z >= 0, r, t * r), t * r * r


@triton.jit
def _glce_compress(Xb, bias, wbd, nb, N_IN, N_OUT, D, n_per, sxb, sxn, sxd,
                   KX: tl.constexpr, RO: tl.constexpr, DP: tl.constexpr, PREC: tl.constexpr):
    """Token tile x ``[KX, DP]`` of the ``nb`` samples of a block (``Xb`` points at its first sample;
    offsets inside the block are int32, see :func:`._common.int32_block`; padding zero), ``Y = Wbd @
    x + bias`` as ``[RO, DP]`` fp32 (``bias``: :func:`_glce_params`), and the output-row validity."""
    k, ks, kn, r, rs, rm, k_ok, r_ok = _glce_tile_index(N_IN, N_OUT, n_per, KX, RO)
    j = tl.arange(0, DP)
    xm = (k < nb * N_IN)[:, None] & (j < D)[None, :]
    x = tl.load(Xb + (ks * sxb + kn * sxn)[:, None] + j[None, :] * sxd, mask=xm, other=0.0)
    y = tl.dot(wbd, x, input_precision=PREC) + bias[:, None]
    return x, y, r < nb * N_OUT


@triton.jit
def _glce_gate_pre(y, gw, gb, CDT: tl.constexpr, PREC: tl.constexpr):
    """The gate's pre-activation ``Z = Y @ gate_weight^T + gate_bias`` (``[RO, DP]`` fp32; Y rounded
    to the compute dtype ``CDT`` for the dot)."""
    return tl.dot(y.to(CDT), tl.trans(gw), input_precision=PREC) + gb[None, :]


@triton.jit
def _glce_gated(y, gw, gb, CDT: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr):
    """A block's output before its cast, ``Y * sigmoid(Z)`` (``[RO, DP]`` fp32)."""
    return y * sigmoid(_glce_gate_pre(y, gw, gb, CDT, PREC), FAST)


@triton.jit
def _glce_store_out(OUTb, out, row_ok, N_OUT, D, sob, som, sod, RO: tl.constexpr, DP: tl.constexpr):
    """Store a block's output rows (``out`` ``[RO, DP]``; ``OUTb`` points at its first sample's output,
    ``row_ok`` masks the rows)."""
    r = tl.arange(0, RO)
    rs = r // N_OUT
    j = tl.arange(0, DP)
    tl.store(OUTb + (rs * sob + (r - rs * N_OUT) * som)[:, None] + j[None, :] * sod,
             out.to(OUTb.dtype.element_ty), mask=row_ok[:, None] & (j < D)[None, :])


@triton.jit
def _any_nonfinite(t):
    """Whether the tile ``t`` holds an inf or a NaN (a scalar; one reduction over the program): the
    sum of ``t * 0`` is a zero for a finite tile and NaN for one with an inf (``inf * 0``) or a NaN.
    That is one multiply-add an element in ``t``'s own dtype (a 16-bit x tile needs no conversion),
    where testing each element (``t != t | abs(t) == inf``, then a max) took about five. sm_90,
    Triton 3.6, bf16, instructions a warp issues per sample block of the forward (with
    :func:`_params_nonfinite`'s flag in both forms): 643 -> 523 at taobao's and amazon's 8 -> 8
    summary (of which the check of the x tile had been 171), 288 -> 270 at taobao's 20 -> 4 one,
    758 -> 639 and 293 -> 269 at long's 8 -> 8 and 64 -> 4; the model's builds keep their registers
    (profiling/sm90-audit-triton3.6.md). The product must not be folded to zero: LLVM and ptxas keep
    ``x * 0.0`` (no fast-math flags; the SASS has the multiplies, fused into FMAs), and
    tests/test_nonfinite.py fails a check that never fires."""
    return _nonfinite_sum(t) != 0.0


@triton.jit
def _nonfinite_sum(t):
    """``sum(t * 0)``: a zero when the tile is finite, NaN when it holds an inf or a NaN (the
    reduction :func:`_any_nonfinite` compares with zero)."""
    return tl.sum(t * 0.0)


@triton.jit
def _params_nonfinite(BIAS, N_OUT, wbd, CHECK_W: tl.constexpr, CDT: tl.constexpr):
    """Whether the bias, rounded to the compute dtype, or with ``CHECK_W`` the block-diagonal weight
    ``wbd`` holds an inf or a NaN (:func:`_any_nonfinite`'s sum, one for both). The bias is loaded
    again for this, as a ``[MAX_N_OUT]`` vector: checking the ``[RO]`` row-bias tile of
    :func:`_glce_params`, or the two checks apart, cost registers (sm_90, Triton 3.6, bf16: 104 ->
    126 at taobao's 20 -> 4 summary and 80 -> 102 at long's 64 -> 4, 3 -> 2 programs an SM there;
    168 -> 170 at the 8 -> 8 one in the model's build, fp32 parameters under autocast, 3 -> 2
    programs an SM); this form takes 106, 80 and 168."""
    i = tl.arange(0, _MAX_N_OUT)
    s = _nonfinite_sum(tl.load(BIAS + i, mask=i < N_OUT, other=0.0).to(CDT))
    if CHECK_W:
        s += _nonfinite_sum(wbd)
    return s != 0.0


@triton.jit
def _glce_fwd_kernel(
    OUT,
    X, W, BIAS, GW, GB,
    B, N_IN, N_OUT, D, n_per, n_blocks,
    sxb, sxn, sxd, swn, swm, sgo, sgi, sob, som, sod,
    KX: tl.constexpr, RO: tl.constexpr, DP: tl.constexpr, PREC: tl.constexpr, CHECK_X: tl.constexpr,
    FAST: tl.constexpr,
):
    """One wave of programs, each over the sample blocks ``pid, pid + G, ...`` (module docstring).

    Non-finite inputs: each block is checked for an inf or a NaN, in its x tile (``CHECK_X``) or in
    ``Y`` (``[RO, DP]`` fp32, still in the dot's registers), whichever is smaller (:func:`_check_x`).
    Either finds a non-finite x: in its column, the dot's zeros between samples times it give NaN,
    and its own sample's weights inf or NaN, so every row of ``Y`` is non-finite there. A finite
    block stores its output; one that is not stores nothing in the dot's pass (its store is masked
    off by the program-wide flag) and then recomputes ``Y`` sample by sample
    (:func:`_glce_compress_per_sample`), so that each value stays in its own sample's output, as in
    the reference, and stores that. Where ``Y`` is checked, a finite x whose ``Y`` overflows takes
    the slow path too (the same sums, in another order); where x is, it stays on the dot's path
    (its zeros times finite values add nothing to the other samples). Either check is or-ed with a
    flag each program sets once, before its loop, from its parameters (:func:`_params_nonfinite`).
    Two things about this form are deliberate (sm_90 builds, Triton 3.6): no ``Y`` is merged across
    the branch (the merge made the compiler move the dot's ``Y`` into a layout both branches share,
    through shared memory, every block), and nothing is stored twice (overwriting the dot's output
    after a barrier took the block loop's software pipelining away; without the barrier two threads
    could write an element in either order, which tests/memcheck.py fails)."""
    pid = tl.program_id(0).to(tl.int64)
    G = tl.num_programs(0)
    CDT: tl.constexpr = X.dtype.element_ty
    wbd = _glce_block_diag(W, N_IN, N_OUT, n_per, swn, swm, CDT, KX, RO)
    bias, gw, gb = _glce_params(BIAS, GW, GB, N_IN, N_OUT, D, n_per, sgo, sgi, CDT, KX, RO, DP)
    # The parameters, once a program: a bias that is not finite in the compute dtype (an fp32 bias
    # past fp16's range under autocast, which the fp32 Y check does not see) and, where x is checked,
    # a non-finite weight (the Y check sees that one) send every block down the slow path, whose Y
    # has zero padding columns: in the dot's Y they hold the bias, which rounded to inf for the gate
    # dot and, times the gate weight's zero padding, would make the row of Z NaN.
    params_nonfinite = _params_nonfinite(BIAS, N_OUT, wbd, CHECK_X, CDT)
    for blk in range(pid, n_blocks, G):
        b0 = tl.cast(blk, tl.int64) * n_per  # (under the interpreter the loop variable is a Python int)
        nb = tl.minimum(B - b0, n_per).to(tl.int32)  # samples in this block
        x, y, row_ok = _glce_compress(X + b0 * sxb, bias, wbd, nb, N_IN, N_OUT, D, n_per, sxb, sxn, sxd,
                                      KX, RO, DP, PREC)
        nonfinite = _any_nonfinite(x if CHECK_X else y) | params_nonfinite
        # (``tl.where``: the interpreter refuses a mask made with ``&`` from a program-wide scalar)
        _glce_store_out(OUT + b0 * sob, _glce_gated(y, gw, gb, CDT, PREC, FAST), tl.where(nonfinite, False, row_ok),
                        N_OUT, D, sob, som, sod, RO, DP)
        if nonfinite:  # (its own name: nothing of the slow path is merged with the dot's Y)
            y_ps = _glce_compress_per_sample(X + b0 * sxb, W, nb, N_IN, N_OUT, D, sxb, sxn, sxd, swn, swm, CDT,
                                             RO, DP)
            # padding columns zero: an inf weight times the zero padding of x is NaN there, an inf bias
            # inf, and either times the gate weight's zero padding would make the whole row of Z NaN
            y_ps = tl.where((tl.arange(0, DP) < D)[None, :], y_ps + bias[:, None], 0.0)
            _glce_store_out(OUT + b0 * sob, _glce_gated(y_ps, gw, gb, CDT, PREC, FAST), row_ok, N_OUT, D, sob, som,
                            sod, RO, DP)


@triton.jit
def _glce_bwd_kernel(
    DX, PART, DZ, YS,
    DO, X, W, BIAS, GW, GB,
    B, N_IN, N_OUT, D, n_per, n_blocks,
    sdxb, sdxn, sdxd, sdob, sdom, sdod,
    sxb, sxn, sxd, swn, swm, sgo, sgi, spg,
    STORE_DZY: tl.constexpr, KX: tl.constexpr, RO: tl.constexpr, DP: tl.constexpr,
    NIP: tl.constexpr, NOP: tl.constexpr, PREC: tl.constexpr, PARAMS_ONCE: tl.constexpr, FAST: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    G = tl.num_programs(0)
    CDT: tl.constexpr = X.dtype.element_ty
    wbd = _glce_block_diag(W, N_IN, N_OUT, n_per, swn, swm, CDT, KX, RO)
    k, ks, kn, r, rs, rm, k_ok, r_ok = _glce_tile_index(N_IN, N_OUT, n_per, KX, RO)
    j = tl.arange(0, DP)
    j_ok = j < D

    acc_p = tl.zeros([KX, RO], tl.float32)    # x @ dY^T; its same-sample entries sum to dW
    # dY summed over the blocks as a tile, reduced over its columns once at the end: a row of dY spans
    # the warps, so a per-block row sum crossed them through shared memory (sm_90, Triton 3.6: 355 -> 325
    # instructions a warp per block of the 20 -> 4 summary, 11 -> 9 barriers; 523 -> 457 and 11 -> 10
    # for the 8 -> 8 one, at 8 more registers a thread under the same cap: 3 more spill loads and 2
    # spill stores a block; long's 8 -> 8 one, at d = 128 and 255 registers already, 1 -> 7 spill
    # stores and 1 -> 6 loads a program)
    acc_db = tl.zeros([RO, DP], tl.float32)
    acc_gb = tl.zeros([DP], tl.float32)
    if PARAMS_ONCE:  # (see _bwd_launch_options)
        bias, gw, gb = _glce_params(BIAS, GW, GB, N_IN, N_OUT, D, n_per, sgo, sgi, CDT, KX, RO, DP)
    if not STORE_DZY:
        acc_gw = tl.zeros([DP, DP], tl.float32)  # dgate_weight[k_out, j_in]
    for blk in range(pid, n_blocks, G):
        b0 = tl.cast(blk, tl.int64) * n_per  # (under the interpreter the loop variable is a Python int)
        nb = tl.minimum(B - b0, n_per).to(tl.int32)
        if not PARAMS_ONCE:
            bias, gw, gb = _glce_params(BIAS, GW, GB, N_IN, N_OUT, D, n_per, sgo, sgi, CDT, KX, RO, DP)
        x, y, row_ok = _glce_compress(X + b0 * sxb, bias, wbd, nb, N_IN, N_OUT, D, n_per, sxb, sxn, sxd,
                                      KX, RO, DP, PREC)
        z = _glce_gate_pre(y, gw, gb, CDT, PREC)
        om = row_ok[:, None] & j_ok[None, :]
        do = tl.load(DO + b0 * sdob + (rs * sdob + rm * sdom)[:, None] + j[None, :] * sdod, mask=om,
                     other=0.0).to(tl.float32)
        s, slope = _sigmoid_and_slope(z, FAST)
        dz = do * y * slope
        dz_c = dz.to(CDT)
        dy = do * s + tl.dot(dz_c, gw, input_precision=PREC)
        dy_c = dy.to(CDT)
        acc_gb += tl.sum(dz, 0)
        acc_db += dy
        acc_p += tl.dot(x, tl.trans(dy_c), input_precision=PREC)
        if STORE_DZY:
            zy_off = b0 * N_OUT * D
            tl.store(DZ + zy_off + (r * D)[:, None] + j[None, :], dz_c, mask=om)
            tl.store(YS + zy_off + (r * D)[:, None] + j[None, :], y.to(CDT), mask=om)
        else:
            acc_gw += tl.dot(tl.trans(dz_c), y.to(CDT), input_precision=PREC)
        dx = tl.dot(tl.trans(wbd), dy_c, input_precision=PREC)
        tl.store(DX + b0 * sdxb + (ks * sdxb + kn * sdxn)[:, None] + j[None, :] * sdxd, dx.to(DX.dtype.element_ty),
                 mask=(k < nb * N_IN)[:, None] & j_ok[None, :])

    # dW[n, m] = sum over same-sample entries (k, r) with k % n_in == n, r % n_out == m of acc_p:
    # two exact one-hot matmuls (fp32, "ieee"), once per program.
    same = (ks[:, None] == rs[None, :]) & k_ok[:, None] & r_ok[None, :]
    acc_p = tl.where(same, acc_p, 0.0)
    n_i = tl.arange(0, NIP)
    m_i = tl.arange(0, NOP)
    sel_n = ((kn[None, :] == n_i[:, None]) & k_ok[None, :]).to(tl.float32)       # [NIP, KX]
    sel_m = ((rm[:, None] == m_i[None, :]) & r_ok[:, None]).to(tl.float32)       # [RO, NOP]
    dw = tl.dot(tl.dot(sel_n, acc_p, input_precision="ieee"), sel_m, input_precision="ieee")  # [NIP, NOP]
    db = tl.sum(tl.sum(acc_db, 1)[:, None] * sel_m, 0)                            # [NOP]

    # partial sums of this program: [dgate_bias (d) | dW (n_in*n_out) | dbias (n_out) | dgate_weight (d*d)]
    base = PART + pid * spg
    tl.store(base + j, acc_gb, mask=j_ok)
    base += D
    tl.store(base + n_i[:, None] * N_OUT + m_i[None, :], dw, mask=(n_i < N_IN)[:, None] & (m_i < N_OUT)[None, :])
    base += N_IN * N_OUT
    tl.store(base + m_i, db, mask=m_i < N_OUT)
    if not STORE_DZY:
        base += N_OUT
        tl.store(base + j[:, None] * D + j[None, :], acc_gw, mask=j_ok[:, None] & j_ok[None, :])


# ============================================================================ launchers
# Settings, module attributes read at every launch (tests and the bandwidth benchmark's providers set
# them; each is described where it is defined): GW_MODE (the backward's dgate_weight strategy),
# ACC_PROGRAMS_PER_SM and ACC_MAXNREG (overrides of the "acc" backward's grid and register cap, whose
# rule is :func:`_acc_plan`) and FWD_PROGRAMS_PER_SM (the forward's grid). Their defaults are the
# plans in use. The launch plans kept beside them for measurement were timed on an H200 (torch 2.11,
# Triton 3.6, bf16, CUDA-graphed forward+backward at taobao-b64k, commit 7bea4b3) and decided by the
# team's pre-registered rule: a variant faster than the default by more than the rows' p20-p80
# spread in both uses becomes the default, the others go. Two capped "acc" programs an SM won
# (:func:`_acc_plan`); larger backward blocks and deeper pipelines (:func:`_config`) and one forward
# program per block (:func:`_fwd_programs`) lost, and were deleted with their settings.
def _bwd_launch_options(dtype: torch.dtype) -> dict:
    """Dot precision, pipelining and parameter loads of the backward kernel.

    fp32 inputs take exact fp32 FMA dots ("ieee") and no software pipelining of the sample-block
    loop. Reason: on an H100 with Triton 3.6 (2026-11-23), compute-sanitizer reported an invalid
    shared-memory read at the ``tl.trans(wbd)`` dot of this kernel for fp32 inputs with tf32x3 dots
    (n_in=20, n_out=4, d=64, both dgate_weight modes), which then poisoned the CUDA context; bf16
    runs were clean. This setting keeps fp32 off the tensor-core and multi-buffered paths where that
    read came from. It is a mitigation not yet re-run on a GPU (no device was lent since), and fp32
    is a correctness mode here, not a performance target. fp16/bf16 keep the tuned defaults
    (Triton's 3 stages; see :func:`_config` for deeper ones).

    ``PARAMS_ONCE``: the gate weight and both biases are loaded once per program, before the block
    loop (fp16/bf16; sm_90 builds with Triton 3.6 at taobao: 160 -> 140 registers for the 20 -> 4
    summary, 227 -> 211 for the 8 -> 8 one, 255 -> 168 at long's 64 -> 4, and 40 -> 6 spill stores
    at long's 8 -> 8), or again for every block (fp32: held across the loop, the fp32 gate
    weight and its operand copies took 263,168 bytes of shared memory at the limit corner, n_in 128,
    n_out 64, d 128, in the "acc" mode, more than an H100 has; reloaded, 212,992).
    """
    if dtype == torch.float32:
        return {"PREC": "ieee", "num_stages": 1, "PARAMS_ONCE": False}
    return {"PREC": dot_precision(dtype), "PARAMS_ONCE": True}


def _fwd_launch_options(dtype: torch.dtype) -> dict:
    """Dot precision and pipelining of the forward kernel. fp32 inputs, as in the backward
    (:func:`_bwd_launch_options`, where the H100 sanitizer report came from a pipelined tf32x3 fp32
    build): exact fp32 dots ("ieee") and no software pipelining of the block loop. Also shared
    memory: at the limit corner (n_in 128, n_out 64, d 128) the looping fp32 forward built to
    425,984 bytes with three stages and tf32x3 dots, 294,912 with one stage (Triton 3.9), against an
    H100's 232,448; "ieee" and one stage, 196,608 (3.6) and 98,304 (3.9). fp16/bf16 keep Triton's
    defaults (3 stages; deeper ones were slower on an H200, see :func:`_config`)."""
    if dtype == torch.float32:
        return {"PREC": "ieee", "num_stages": 1}
    return {"PREC": dot_precision(dtype)}


@functools.lru_cache(maxsize=None)
def _config(n_in: int, n_out: int, d: int, backward: bool) -> Tuple[int, int, int, int, int]:
    """(samples per block, KX, RO, DP, num_warps); see the module docstring.

    Timed on an H200 against this plan and deleted (torch 2.11, Triton 3.6, bf16, CUDA-graphed
    forward+backward at taobao-b64k, commit 7bea4b3; median ms, this plan 0.4418 in the
    non-sequence use and 0.2932 in the sequence one), so not to be re-added without a new reason:

    * larger backward blocks, 128 token rows and 64 output rows (6 samples a block instead of 3 in
      the non-sequence use, 8 instead of 4 in the sequence one; 206 and 255 registers, one program
      an SM as here): 0.4113 and 0.3363 ms, 7% faster in one use and 15% slower in the other. Over
      a grid of plans (sm_90 builds, 2026-11-27: 16 to 128 token rows, 16 to 64 output rows, 2, 4
      and 8 warps) none held more than 8 warps an SM without spilling: the five dots' operand
      layouts, not the tile, set the registers;
    * deeper software pipelines of the fp16/bf16 block loops, 5 tiles fetched ahead in the forward
      and 6 in the backward instead of Triton's 3 (more shared memory, the same programs an SM):
      0.4474 and 0.3047 ms, 1-4% slower in both uses.
    """
    dp = max(16, next_pow2(d))
    rows_x = max(16, (4096 if backward else 8192) // dp)   # target token rows per block
    rows_o = 32 if backward else 64                          # cap on output rows per block
    n_per = max(1, min(rows_x // n_in, rows_o // n_out))
    kx = max(16, next_pow2(n_per * n_in))
    ro = max(16, next_pow2(n_per * n_out))
    warps = 8 if max(kx, ro) * dp >= 8192 or (backward and dp >= 64) else 4
    return n_per, kx, ro, dp, warps


#: Overrides of :func:`_acc_plan`'s rule for the backward's "acc" mode: persistent programs per SM
#: (an int >= 1) and the register cap, Triton's ``maxnreg`` (an int in [24, 255]); None, the
#: default, leaves each to the rule. ACC_PROGRAMS_PER_SM replaces the rule's pair (its cap is then
#: ACC_MAXNREG's, None: no cap): ``1`` is the plan before the rule. Tests and measurements set them.
#: The rule (two programs an SM capped at 128 registers for 16-bit inputs at d = 64 or 48, else one
#: uncapped) was the default's challenger ``fused-acc2`` until an H200 timed it 12.5% and 6.6%
#: faster at taobao-b64k (commit 7bea4b3; the numbers are in :func:`_acc_plan`).
ACC_PROGRAMS_PER_SM: Optional[int] = None
ACC_MAXNREG: Optional[int] = None
_ACC_CAPPED = (2, 128)  # the rule's programs per SM and maxnreg where it caps


def _acc_plan(dtype: torch.dtype, d: int, dp: int, warps: int, traced: bool = False) -> Tuple[int, Optional[int]]:
    """``(programs per SM, maxnreg or None)`` of the backward's "acc" mode for inputs of ``dtype``
    and a backward plan of ``dp`` columns and ``warps`` warps at ``d``: two programs an SM under a
    128-register cap for fp16/bf16 with the plan at 8 warps and DP = 64 and d a multiple of 16
    (d = 48 or 64: one build, as Triton specialises d on its divisibility by 16), one program an
    SM and no cap otherwise; :data:`ACC_PROGRAMS_PER_SM` and :data:`ACC_MAXNREG` override it
    (ValueError naming a bad one). The launcher passes the cap in the "acc" mode only, and its
    ``_gw_mode`` weighs this many programs' partials.

    Why: at 32x taobao's batch the "acc" backward builds (sm_90, Triton 3.6, bf16) to 137 registers
    at the 20 -> 4 summary and 215 at the 8 -> 8 one, so one 8-warp program an SM; capped at 128
    they build to two an SM, the 20 -> 4 one without a spill, the 8 -> 8 one with 17 spill stores
    (all before the block loop) and three 4-byte stack loads a block. An H200 (torch 2.11, Triton
    3.6, bf16, CUDA-graphed forward+backward at taobao-b64k, where ``_gw_mode`` picks "acc" either
    way; commit 7bea4b3) timed the two capped programs an SM against one uncapped: median 0.3866 ms
    (p20-p80 0.3859-0.3874) against 0.4418 (0.4415-0.4424) in the non-sequence use, -12.5%, and
    0.2739 (0.2727-0.2751) against 0.2932 (0.2926-0.2937) in the sequence one, -6.6%: far past
    the spreads in both, so by the pre-registered rule the default, where those builds hold. Not
    elsewhere: at d = 128 a program's shared memory already keeps it alone on its SM, and 4-warp
    plans (d 24) and padded d (d 40) spill heavily under the cap (Triton 3.6: 166-318 spill
    stores). Capped builds with Triton 3.9 (2026-11-28; the 8 -> 8 plan there 38 spill stores) show
    the padded d, not the 64 x 32 blocks an older note blamed, as the cause: 123 spill stores at d
    40 and 56 with taobao's 20 -> 4 plan (none at d 48 and 64), 196 at d 40 with 64 x 32 blocks (6
    at d 64). fp32 (the correctness mode: "ieee" dots, one stage, the parameters reloaded a block)
    is never capped unless ACC_MAXNREG says so. Timed at d = 64 only (taobao's two plans); d = 48
    gets the same builds.

    ``traced``: a launch traced into a compiled graph (``interformer.set_compile_inline``) takes
    one program an SM, uncapped. Inductor's launch of a traced kernel keeps ``num_warps`` and
    ``num_stages`` but drops ``maxnreg`` (torch 2.11 to 2.13), so the two programs an SM, a grid
    fixed when the graph is traced, would build uncapped, fit one an SM and run in two waves with
    twice the partials to reduce."""
    int_setting("ACC_MAXNREG", ACC_MAXNREG, 24, 255)
    per_sm = int_setting("ACC_PROGRAMS_PER_SM", ACC_PROGRAMS_PER_SM, 1)
    if per_sm is not None:
        return per_sm, ACC_MAXNREG
    rule = _ACC_CAPPED if (dtype in (torch.float16, torch.bfloat16) and warps == 8 and dp == 64
                           and d % 16 == 0 and not traced) else (1, None)
    return rule[0], rule[1] if ACC_MAXNREG is None else ACC_MAXNREG


#: Forward grid: None (the default) runs one program per sample block the first time a kernel
#: specialisation is launched on a GPU, then ``min(blocks, R * SMs)`` programs, R the programs an SM
#: holds at once by that compiled kernel's registers, shared memory and warps
#: (:func:`._common.resident_programs`): one wave, each program looping over the blocks ``pid, pid
#: + G, ...``. A positive int sets R instead (tests, measurements). See :func:`_fwd_programs`.
FWD_PROGRAMS_PER_SM: Optional[int] = None
#: R found per forward specialisation and device (filled by :func:`_gated_lce_fwd_impl`)
_FWD_RESIDENT: Dict[tuple, int] = {}


def _fwd_programs(n_blocks: int, key: tuple, device: torch.device) -> int:
    """Grid of the forward kernel for ``n_blocks`` sample blocks (see :data:`FWD_PROGRAMS_PER_SM`).

    Why persistent: a program used to take one block (one x tile in flight, then its dots, then its
    store), so at 32x taobao's batch an SM held two tiles in flight and reached about a third of the
    copy bandwidth with the backward (issue 3). Looping, a program loads the block-diagonal
    compression, the gate weight and the biases once, and Triton's pipeliner fetches the next x
    tile while the current one is computed (sm_90 builds, Triton 3.6: three async copies, 117 -> 97
    registers at taobao's 20 -> 4 tokens). One wave, not more programs: a program's work is fixed
    by its share of the blocks, so a second, partial wave would add a whole program's time. Before
    the first launch R is not known; one program per block is then the safe grid (the hardware
    balances it). Timed against one program per block on an H200 (torch 2.11, Triton 3.6, bf16,
    CUDA-graphed forward+backward at taobao-b64k, commit 7bea4b3), the one looping wave made the
    step 16-18% faster: median 0.4418 against 0.5247 ms in the non-sequence use, 0.2932 against
    0.3579 in the sequence one (that variant, a provider of the bandwidth benchmark, was then
    deleted; ``FWD_PROGRAMS_PER_SM`` of a batch's block count or more still gives it). Under the
    interpreter: ``num_sms`` = 2 programs, so tests run the loop. Under ``torch.compile`` with
    ``set_compile_inline`` the grid is fixed when the graph is traced: one program per block if no
    plain forward of that specialisation ran before.
    """
    per_sm = int_setting("FWD_PROGRAMS_PER_SM", FWD_PROGRAMS_PER_SM, 1)
    if per_sm is None:
        per_sm = _FWD_RESIDENT.get(key, 0) if device.type == "cuda" else 1
    return min(n_blocks, per_sm * num_sms(device)) if per_sm else n_blocks


def _note_resident(key: tuple, compiled, device: torch.device) -> None:
    """After a forward launch: R of the kernel it ran (:func:`._common.resident_programs`) for the
    next launch of ``key``, from every launch, not the first alone. ``key`` names the dtypes and
    sizes, not all of what Triton specialises on (alignment, an argument equal to 1, ...); another
    build under the same key then sets R for the launches after it. Nothing for a launch that
    returned no compiled GPU kernel (the interpreter, a recorded or traced launch)."""
    if device.type == "cuda":
        resident = resident_programs(compiled, device)
        if resident:
            _FWD_RESIDENT[key] = resident


#: Force the backward's dgate_weight strategy ("store" or "acc"); None picks by bytes moved.
GW_MODE = None


def _gw_mode(B: int, n_out: int, d: int, elt: int, G: int) -> str:
    """"store": write dZ and Y once (``4 * B * n_out * d * elt`` bytes with the GEMM's read-back) and
    let cuBLAS form ``dZ^T Y``; "acc": accumulate it in registers of ``G`` persistent programs and
    reduce ``[G, d, d]`` fp32 partials (``2 * G * d * d * 4`` bytes; G: :func:`_acc_plan`'s programs
    per SM times the SMs, so its two-program plans need twice the batch). "acc" must win by 2x: its
    persistent programs hide less memory latency than one program per block."""
    if GW_MODE not in (None, "acc", "store"):  # any other value ran as "acc", under its own label
        raise ValueError(f'GW_MODE must be None, "acc" or "store", got {GW_MODE!r}')
    if GW_MODE is not None:
        return GW_MODE
    return "acc" if 2 * (2 * G * d * d * 4) < 4 * B * n_out * d * elt else "store"


def _check_x(kx: int, ro: int) -> bool:
    """Which tile the forward checks for an inf or a NaN (:func:`_glce_fwd_kernel`): the x tile
    (``[KX, DP]``, True) or ``Y`` (``[RO, DP]`` fp32, False), whichever has fewer rows; x on a tie.
    Either finds a non-finite x, so this is a choice of cost alone. It was made from sm_90 builds
    with Triton 3.6 (bf16, 2026-11-28, with ``tl.sigmoid``: before ``FAST``), counting in the SASS
    the instructions a warp issues per sample block on the loop's finite path, before this form (the
    x tile checked, then the branch), checking x, checking Y:

    * taobao's 20 -> 4 summary (KX 128, RO 32, d 64, 8 warps): 566, 485, 345;
    * long's 64 -> 4 (64, 16, d 128, 8 warps): 628, 477, 350;
    * the 8 -> 8 summaries (64, 64) at d 64 (4 warps): 933, 866, 832; at d 128 (8 warps): 1016, 981,
      1176. At d 128, checking Y took 230 registers against 192 for x, and its two dots got
      different warp layouts, so ``Y`` moved between them through shared memory every block.

    With the rule, the registers (before -> after, bf16 inputs and parameters, as the bandwidth
    benchmark builds them) are 103 -> 104, 128 -> 80, 166 -> 168 and 206 -> 192 (the training step's,
    with fp32 parameters under autocast: 97 -> 104, 128 -> 80, 168 -> 168, 206 -> 192): the same
    programs an SM everywhere but long's 64 -> 4, which gains one (2 -> 3). The tie
    takes x at d 64 too, where Y would save 4% more: one rule for both 8 -> 8 builds. Not timed on a
    GPU yet. Since 2026-11-29 either check is one multiply-add an element (:func:`_any_nonfinite`),
    the x tile's in its 16-bit dtype and ``Y``'s in fp32, so the rule still takes the smaller tile."""
    return ro >= kx


def _fast_math(dtype: torch.dtype) -> bool:
    """The kernels' ``FAST`` (:func:`._common.sigmoid`, :func:`_sigmoid_and_slope`): the approximate
    exponential and reciprocal square root for fp16/bf16 inputs, whose outputs round far more than
    those instructions err; fp32, the correctness mode, keeps the exact formulas. On sm_90 (Triton
    3.6, bf16) it cut the forward's block of taobao's 8 -> 8 summary, 32 sigmoids a thread, from 866
    to 641 instructions a warp and the 20 -> 4 one's from 345 to 288, and the backward's from 457 to
    402 and 325 to 296 (taobao-b64k), and at long's 8 -> 8 summary (d = 128, 255 registers, 7 spill
    stores either way) from 820 to 706, at the same registers and programs an SM."""
    return dtype in (torch.float16, torch.bfloat16)


def _out_dtype(x: torch.Tensor, bias: torch.Tensor) -> torch.dtype:
    """The output's dtype, eager's: ``promote_types(x, bias)`` (module docstring, "Dtypes")."""
    return promote_dtypes(x.dtype, bias.dtype)


@on_input_device
def _gated_lce_fwd_impl(x, weight, bias, gate_weight, gate_bias):
    B, n_in, d = x.shape
    bias, gate_bias = bias.contiguous(), gate_bias.contiguous()  # read as unit-stride rows
    n_out = weight.shape[1]
    out = torch.empty((B, n_out, d), device=x.device, dtype=_out_dtype(x, bias))
    if out.numel() == 0:
        return out
    if n_in == 0:  # a direct op call (gated_lce takes the reference): Y = bias, as from one zero token of zero weight
        x, weight, n_in = x.new_zeros((B, 1, d)), weight.new_zeros((1, n_out)), 1  # (_config divides by n_in)
    n_per, kx, ro, dp, warps = _config(n_in, n_out, d, False)
    x = int32_block(x, n_per)
    n_blocks = cdiv(B, n_per)
    key = (x.device, x.dtype, weight.dtype, gate_weight.dtype, n_in, n_out, d)
    compiled = launch(_glce_fwd_kernel)[(_fwd_programs(n_blocks, key, x.device),)](
        out, x, weight, bias, gate_weight, gate_bias,
        B, n_in, n_out, d, n_per, n_blocks,
        *x.stride(), *weight.stride(), *gate_weight.stride(), *out.stride(),
        KX=kx, RO=ro, DP=dp, CHECK_X=_check_x(kx, ro), FAST=_fast_math(x.dtype), num_warps=warps,
        **_fwd_launch_options(x.dtype),
    )
    _note_resident(key, compiled, x.device)
    return out


@on_input_device
def _gated_lce_bwd_impl(grad_out, x, weight, bias, gate_weight, gate_bias, params: bool = True):
    """``(dx, dweight, dbias, dgate_weight, dgate_bias)``; with ``params=False`` (no parameter needs
    a gradient: the eager path's frozen module) only dx, the rest None: the kernel still forms its
    partial sums (and in "store" mode dZ and Y), but they are neither reduced nor multiplied."""
    B, n_in, d = x.shape
    bias, gate_bias = bias.contiguous(), gate_bias.contiguous()  # read as unit-stride rows
    n_out = weight.shape[1]
    dx = torch.empty((B, n_in, d), device=x.device, dtype=x.dtype)
    dgb, dw, db = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (gate_bias, weight, bias))
    if B == 0 or n_out == 0:  # an empty output (n_out = 0: a direct op call): zero gradients
        if not params:
            return dx.zero_(), None, None, None, None
        return dx.zero_(), dw.zero_(), db.zero_(), gate_weight.new_zeros(gate_weight.shape), dgb.zero_()  # contiguous, as the fake
    if n_in == 0:  # a direct op call: the forward's zero token of zero weight (_gated_lce_fwd_impl), its gradients dropped
        grads = _gated_lce_bwd_impl(grad_out, x.new_zeros((B, 1, d)), weight.new_zeros((1, n_out)), bias, gate_weight,
                                    gate_bias, params)
        return (dx, dw if params else None, *grads[2:])
    n_per, kx, ro, dp, warps = _config(n_in, n_out, d, True)
    acc_per_sm, acc_cap = _acc_plan(x.dtype, d, dp, warps, traced=_decomposing())
    x, grad_out = int32_block(x, n_per), int32_block(grad_out, n_per)
    n_blocks = cdiv(B, n_per)
    acc_programs = acc_per_sm * num_sms(x.device)
    mode = _gw_mode(B, n_out, d, x.element_size(), acc_programs)
    store = mode == "store"
    # "store": about one block per program (4 per SM; fewer partial rows to reduce than one program
    # per block); "acc": _acc_plan's persistent programs per SM (one or two), under its register cap
    G = min(n_blocks, 4 * num_sms(x.device) if store else acc_programs)
    P = d + n_in * n_out + n_out + (0 if store else d * d)
    part = torch.empty((G, P), device=x.device, dtype=torch.float32)
    if store:
        dz = torch.empty((B * n_out, d), device=x.device, dtype=x.dtype)
        ys = torch.empty((B * n_out, d), device=x.device, dtype=x.dtype)
    else:
        dz, ys = unused_arg(part), unused_arg(part)  # not written (STORE_DZY off)
    launch(_glce_bwd_kernel)[(G,)](
        dx, part, dz, ys, grad_out, x, weight, bias, gate_weight, gate_bias,
        B, n_in, n_out, d, n_per, n_blocks,
        *dx.stride(), *grad_out.stride(),
        *x.stride(), *weight.stride(), *gate_weight.stride(), part.stride(0),
        STORE_DZY=store, KX=kx, RO=ro, DP=dp, NIP=max(16, next_pow2(n_in)), NOP=max(16, next_pow2(n_out)),
        FAST=_fast_math(x.dtype), **_bwd_launch_options(x.dtype), num_warps=warps,
        **({"maxnreg": acc_cap} if acc_cap is not None and not store else {}),
    )
    if not params:
        return dx, None, None, None, None
    if store:
        sum_partials(part, [dgb, dw, db])
        dgw = torch.mm(dz.t(), ys)  # cuBLAS: [d, B*n_out] x [B*n_out, d], fp32 accumulation
        if dgw.dtype != gate_weight.dtype:
            dgw = dgw.to(gate_weight.dtype)
    else:
        dgw = torch.empty(gate_weight.shape, device=x.device, dtype=gate_weight.dtype)
        sum_partials(part, [dgb, dw, db, dgw])
    return dx, dw, db, dgw, dgb


# ============================================================================ torch.library
@torch.library.custom_op("interformer::gated_lce_fwd", mutates_args=())
def gated_lce_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
) -> torch.Tensor:
    """Forward: ``[B, n_out, d]`` in ``promote_types(x, bias)`` (x's, unless under autocast)."""
    return _gated_lce_fwd_impl(x, weight, bias, gate_weight, gate_bias)


@gated_lce_fwd.register_fake
def _gated_lce_fwd_fake(x, weight, bias, gate_weight, gate_bias):
    return x.new_empty((x.shape[0], weight.shape[1], x.shape[2]), dtype=_out_dtype(x, bias))


@torch.library.custom_op("interformer::gated_lce_bwd", mutates_args=())
def gated_lce_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dx, dweight, dbias, dgate_weight, dgate_bias)``, each shaped and typed like its input."""
    return _gated_lce_bwd_impl(grad_out, x, weight, bias, gate_weight, gate_bias)


@gated_lce_bwd.register_fake
def _gated_lce_bwd_fake(grad_out, x, weight, bias, gate_weight, gate_bias):
    return tuple(t.new_empty(t.shape) for t in (x, weight, bias, gate_weight, gate_bias))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_with(bwd):
    """The autograd formula, calling ``bwd`` (the custom op when traced, the launcher in eager)."""
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None, None, None
        return tuple(bwd(grad_out, *ctx.saved_tensors))
    return backward


def _lean_backward(ctx, grad_out):
    """The eager path's formula: as :func:`_backward_with`'s, without the parameters' reductions
    when none of them needs a gradient (frozen), and with None for every gradient not needed."""
    if grad_out is None:
        return None, None, None, None, None
    need = ctx.needs_input_grad
    return _needed(_gated_lce_bwd_impl(grad_out, *ctx.saved_tensors, params=any(need[1:])), need)


gated_lce_fwd.register_autograd(_backward_with(torch.ops.interformer.gated_lce_bwd), setup_context=_setup_context)


# eager entry point (see interformer.kernels._dispatch): same launchers, no custom-op dispatch
_GatedLCE = lean_function("_GatedLCE", saving_forward(_gated_lce_fwd_impl, _setup_context), _lean_backward,
                          _backward_with(torch.ops.interformer.gated_lce_bwd))
inline_when_compiled(gated_lce_fwd, gated_lce_bwd)


# ============================================================================ public function
def _check(x, weight, bias, gate_weight, gate_bias) -> None:
    named = (("x", x, 3), ("weight", weight, 2), ("bias", bias, 1), ("gate_weight", gate_weight, 2),
             ("gate_bias", gate_bias, 1))
    for name, t, rank in named:
        if not isinstance(t, torch.Tensor) or t.dim() != rank:
            raise ValueError(f"gated_lce: {name} must be a {rank}-D tensor, got {describe_shape(t)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"gated_lce: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    B, n_in, d = x.shape
    if weight.shape[0] != n_in:
        raise ValueError(f"gated_lce: weight {describe_shape(weight)} must be [n_in={n_in}, n_out] for x {describe_shape(x)}")
    n_out = weight.shape[1]
    if bias.shape != (n_out,):
        raise ValueError(f"gated_lce: bias {describe_shape(bias)} must be [n_out={n_out}]")
    if gate_weight.shape != (d, d):
        raise ValueError(f"gated_lce: gate_weight {describe_shape(gate_weight)} must be [d={d}, d={d}]")
    if gate_bias.shape != (d,):
        raise ValueError(f"gated_lce: gate_bias {describe_shape(gate_bias)} must be [d={d}]")
    devices = {t.device for _, t, _ in named}
    if len(devices) != 1:
        raise ValueError(f"gated_lce: all inputs must be on one device, got {sorted(map(str, devices))}")


def gated_lce(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
) -> torch.Tensor:
    """Fused self-gating LCE; same contract as :func:`interformer.reference.gated_lce` (see the
    module docstring for the kernel design).

    x ``[B, n_in, d]`` (any strides), weight ``[n_in, n_out]``, bias ``[n_out]``, gate_weight
    ``[d, d]``, gate_bias ``[d]`` -> contiguous ``[B, n_out, d]``.
    """
    if isinstance(x, torch.fx.Proxy):  # torch.fx.symbolic_trace: record this call (_dispatch.fx_call)
        return fx_call(gated_lce, x, weight, bias, gate_weight, gate_bias)
    _check(x, weight, bias, gate_weight, gate_bias)
    dev = x.device.type
    cast = autocast_dtype(dev)
    if cast is not None:
        x = x.to(cast)
    else:
        dtypes = {t.dtype for t in (x, weight, bias, gate_weight, gate_bias)}
        if len(dtypes) != 1:
            raise ValueError(
                "gated_lce: x, weight, bias, gate_weight and gate_bias must share one dtype outside autocast, got "
                f"{x.dtype}, {weight.dtype}, {bias.dtype}, {gate_weight.dtype}, {gate_bias.dtype}"
            )
    B, n_in, d = x.shape
    # past the kernels' limits, or under a torch.func transform, ONNX export (_dispatch.reference_only): the reference
    if (d > MAX_D or n_in > MAX_N_IN or weight.shape[1] > MAX_N_OUT or x.numel() == 0 or weight.shape[1] == 0
            or reference_only(x)):
        from interformer import reference

        # eager's own math and dtypes, autocast included (x's cast is the one eager's einsum makes); contiguous, as
        # stated (the einsum's [B, n_out, d] is a permuted view)
        return reference.gated_lce(x, weight, bias, gate_weight, gate_bias).contiguous()
    args = (x, weight, bias, gate_weight, gate_bias)
    if tracing(args):
        return torch.ops.interformer.gated_lce_fwd(*args)
    if needs_grad(args):
        return _GatedLCE.apply(*args)
    return _gated_lce_fwd_impl(*args)
