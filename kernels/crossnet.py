"""DCNv2 cross layers, full rank and low rank: fused Triton forward and backward.

Public functions (same names and signatures as :mod:`interformer.reference`)::

    cross_net(x0, kernels, biases)                        # x_{i+1} = x0 * (W_i x_i + b_i) + x_i
    low_rank_cross_net(x0, w_kernels, v_kernels, biases)  # x_{i+1} = x0 * (U_i (V_i x_i) + b_i) + x_i

x0 ``[B, D]``; torchrec layouts: ``kernels[i]`` (W) ``[D, D]`` (the layer computes ``x_i @ W^T``),
``w_kernels[i]`` (U) ``[D, r]``, ``v_kernels[i]`` (V) ``[r, D]``, ``biases[i]`` ``[D, 1]`` or ``[D]``
(torchrec's ``CrossNet`` holds ``[D, 1]``, its current ``LowRankCrossNet`` ``[D]``; each gradient comes
back in its bias's shape). Output: a new contiguous ``[B, D]`` tensor in eager's dtype (x0's outside
autocast; "Dtypes and precision"). Any number of layers ``L >= 1`` (``L = 0`` returns x0, as the
reference does).

How the per-layer parameter lists reach the kernels
---------------------------------------------------
The kernels take the L parameter tensors of a list as one Triton *tuple* argument and unroll the
layer loops at compile time (``tl.static_range``; one compiled variant per L). Nothing is stacked:
no ``torch.stack`` copies (each would be one more launch plus a copy of every parameter per step),
and the parameters are read where they are. Gradients come back as one stacked ``[L, ...]`` tensor
per parameter kind, written directly by the kernels (or by cuBLAS for the full-rank ``dW``), and
are handed to autograd as ``unbind(0)`` views: no copy either.

Low rank (``low_rank_cross_net``) -- memory-bound, row-block kernels
--------------------------------------------------------------------
Per row: ``p_i = x_i V_i^T`` (``[r]``), ``y_i = p_i U_i^T + b_i``, ``x_{i+1} = x0 * y_i + x_i``. At the
DESIGN shapes (r = 32) the FLOPs are negligible, so the op is about moving ``[B, D]`` tensors.

*Forward* (``_lr_fwd_kernel``): ONE launch for all layers. One program owns ``BLOCK_B = 16`` rows
(the ``tl.dot`` minimum) and makes ``L + 1`` passes over D in chunks of ``BLOCK_D`` columns. Pass k
recomputes ``x_k`` on the chunk from the x0 chunk by the recurrence, using the rows' ``p_0 .. p_{k-1}``
(``[BLOCK_B, r]`` fp32, kept by the program in a small ``P [L, B, r]`` fp32 buffer), and accumulates
``p_k = x_k V_k^T``; the last pass writes the output. So x_i never goes to memory, in any precision:
between layers it lives in fp32 registers (eager rounds it to the input dtype every layer), and x0
is read ``L + 1`` times, the later passes from L2 (a program's rows are re-read right away).
``P`` (``L * B * r * 4`` bytes, 0.5 MB at taobao) is the only thing saved for backward besides the
inputs; a ``tl.debug_barrier`` after each ``p_k`` store makes it visible to the program's other warps.

*Backward*: ``dy_i = g_{i+1} * x0``, ``dp_i = dy_i U_i``, ``g_i = g_{i+1} + dp_i V_i`` (``g_L`` = the
upstream gradient), ``dx0 = g_0 + sum_i g_{i+1} * y_i``, ``dU_i = dy_i^T p_i``, ``dV_i = dp_i^T x_i``,
``db_i = sum_b dy_i``. Three launches, nothing of size ``[B, D]`` stored except dx0:

* ``_lr_bwd_rows_kernel`` (one program per 16 rows, like the forward): L passes over D compute
  ``dp_{L-1} .. dp_0`` (each pass rebuilds ``g_{i+1}`` on the chunk from the upstream gradient and
  the ``dp`` s already found, kept in a ``dP [L, B, r]`` fp32 buffer), then one more pass writes
  ``dx0`` (``y_i`` rebuilt from ``P``).
* ``_lr_bwd_weights_kernel`` (grid ``(cdiv(D, BLOCK_DW), SPLIT)``): a program owns a column chunk
  and a range of rows and, per layer, loops over its rows rebuilding ``x_i``, ``g_{i+1}`` and ``dy_i``
  on the tile (from x0, the upstream gradient, P and dP), accumulating ``dU_i``, ``dV_i``, ``db_i``
  for its columns in fp32 registers. This is the split-K of the weight-gradient GEMMs over the
  batch without ever materialising ``dy_i`` or ``x_i``: the alternative (write ``dY, X [L, B, D]``,
  then ``torch.mm``) would move ``4 L B D`` more elements. ``SPLIT`` row ranges (about 128 programs in
  all, capped so that the fp32 partials are no bigger than x0) write partial sums to an fp32
  ``[SPLIT, L*(2*D*r + D)]`` buffer, and
* :func:`._common.sum_partials` reduces them over SPLIT and writes the three stacked gradients in the
  parameters' dtype (one launch for all). With ``SPLIT == 1`` (e.g. D = 9216 at ``long``) the weight
  kernel writes the gradients directly and this launch is skipped. No atomics: deterministic.

``LOW_RANK_BACKWARD = "phases"`` (not the default; kept for measurement) replaces the rows kernel
by launches with more programs. The rows kernel runs ``cdiv(B, 16)`` programs (128 at taobao, one
per SM, 4 of an SM's 64 warps) that each make L + 1 dependent passes over D; on an H200 it took 84 us
of a taobao step's low-rank backward against 51 us for the weight kernel. Instead:

* ``_lr_bwd_phase_kernel``, one launch per layer from the top, grid ``(cdiv(B, 16), S)``: the
  program of a row block and column range s adds ``dy_i U_i`` over its ``CHUNKS`` column tiles
  into a partial ``DPP[i, s]`` (fp32 ``[L, S, B, r]``); ``S`` is the smallest split that gives about
  4 programs per SM (5 at taobao on an H100: 640 programs). It rebuilds ``g_{i+1}`` on its tiles
  from the upstream gradient, ``dp_{i+1}`` (summed from its S partials, s = 0 .. S-1 in order; the
  ``s = 0`` programs also store it, final, in ``dP``) and the ``dp_j`` above that (read from ``dP``).
* ``_lr_bwd_dx0_kernel``, grid ``(cdiv(B, 16), cdiv(D, BLOCK_D))``, one tile per program: ``dx0``
  as in the rows kernel's last pass, ``dp_0`` summed from its partials (the column-tile-0 programs
  store it in ``dP``).

The weight kernel follows, with its batch split aimed at about 4 programs per SM as well instead
of 128 programs in all, and its fp32 partials allowed up to twice x0's bytes (x0 counted in the
compute dtype) instead of once (at the model's taobao call on an H100, 16-row tiles: SPLIT 15, 420
programs of 144 rows, 14 MB of partials, against SPLIT 5, 140 programs of 416 rows; with the
32-row tiles of the bf16 x0 the model passed before 2026-11-29, SPLIT 13 of 160 rows against 5 of
416, and 51 us on the H200 with the latter). ``L + 1`` launches where the rows kernel
is one (more host time per call) and ``L * S * B * r`` more fp32 partials (2.6 MB at taobao); the
same sums in a fixed order (deterministic). Tiles, stages and warps are the rows kernel's plan, each loop's
loads a subset of its loops' (so its shared-memory estimate bounds them; the sm_90 builds are
checked against it). Built with Triton 3.6 for sm_90 at taobao: 44-72 registers for the phase
kernel, 96 for the dx0 kernel, no spills. Timed in the third H200 lease at taobao (graphed,
forward+backward): 0.1364 ms against the rows kernel's 0.1359, no gain.

Recomputing ``x_i`` / ``g_{i+1}`` on a chunk costs ``O(L)`` small ``[16, r] x [r, chunk]`` dots per
chunk and pass (``O(L^2)`` in all), which is free next to the memory traffic for the L <= 4 of DCN
practice.

Block sizes and shared memory (``_lr_plan``, fixed by shape, no autotune): ``BLOCK_B = 16``,
``BLOCK_R = max(16, next_pow2(r))``, 4 warps (the forward and rows kernels: ``LOW_RANK_ROW_WARPS``,
a setting kept for measuring 8); the column tile and ``num_stages`` are the first that
fit an H100's 227 KiB (232448 bytes) of shared memory per program by an upper estimate
(``_lr_smem``), trying 3 stages (Triton's default; the forward and rows kernels up to
``LOW_RANK_MAX_STAGES``, another setting kept for measurement), then fewer down to 1, each from the widest tile down to
16 columns: at most ``min(32 w, 2048 w // BLOCK_R)`` columns at ``w`` warps (``min(128, 8192 //
BLOCK_R)`` at the default 4) for the forward and rows kernels, ``32``
(then 16) rows x ``min(64, 4096 // BLOCK_R)`` columns for the weight kernel (16 rows only, when it
reads fp32 x0 / gradient tiles for 16-bit dots: the 32-row tile spilled there). The estimate is the
largest over a kernel's loops of ``num_stages`` copies of every tile the loop loads (stored dtype:
x0 / gradient ``[16, BLOCK_D]``, U / V ``[BLOCK_D, BLOCK_R]``, fp32 P / dP rows ``[16, BLOCK_R]``,
the loop-invariant ones included), at least two copies of the weight kernel's loop-invariant fp32
U / V tiles (``tf32x3`` stages hi and lo halves), and a staging copy of each dot operand computed in
registers. Every pass of a row kernel holds one tile per layer (the recurrences), so the bytes grow
as ``L * BLOCK_D * BLOCK_R``: at r = 200 (BLOCK_R = 256), L = 3, fp32 the old fixed 32-column,
3-stage forward asked 296960 bytes (over the H100's limit); the plan takes 16 columns and 2 stages
(estimate 199040, compiled 117888). At the benchmark shapes (r = 32, L = 2, bf16) the plan is the
old fixed one (128 / 128 columns, 32 x 64 weight tiles, 3 stages; compiled 46 / 84 / 43 KB). The
estimate is 1.4x to 6x the ``metadata.shared`` of ahead-of-time sm_90 builds with Triton 3.9
(tests/test_kernel_crossnet.py builds the planned kernels and checks both bounds; it passes with
Triton 3.6 on an H100 too, as do the D = 312, r = 200, L = 3 launches in all three dtypes). The
budget is the H100's on every device (the H200 has the same; an A100's 163 KiB would need a smaller
one). Ranks with ``BLOCK_R > 512`` (r > 512: use full rank), shapes with no fitting tile (large
ranks with many layers; fp32: r > 256 with L >= 2, r > 128 with L >= 4, r > 64 with L >= 8; 16-bit:
r > 256 with L >= 3, r > 128 with L >= 5) and empty batches go to the eager reference.

Costs and limits: every 16-row program streams all of U and V (``L * 2 * D * r`` elements, 0.46 MB
at taobao in bf16) through L2 once or twice per pass; that L2 traffic (about 10x the HBM traffic of
x0 at BLOCK_B = 16) is the price of keeping x_i on chip with enough programs to fill the GPU. The
row-block kernels have ``cdiv(B, 16)`` programs: 128 at taobao/amazon (B = 2048), only 32 at
``long`` (B = 512), where the forward and the rows kernel cannot use the whole GPU. A split over D
needs a cross-program reduction of ``p`` per layer: a grid-wide sync (which would deadlock the
interpreter, where programs run one after another) or one launch per layer. The backward has the
latter as ``LOW_RANK_BACKWARD = "phases"`` (above). The forward keeps its one launch by default
(DESIGN §4 asks for one); ``LOW_RANK_FORWARD = "phases"`` (not the default, kept for measurement:
benchmark provider ``fused-fphases``) is the same split for it:

* ``_lr_fwd_phase_kernel``, one launch per layer from the bottom, grid ``(cdiv(B, 16), S)`` with the
  backward's ``S`` and ``CHUNKS`` (:func:`_lr_phase_split`): the program of a row block and column
  range s rebuilds ``x_i`` on its tiles from x0 and ``p_0 .. p_{i-1}`` (``p_{i-1}`` summed from its S
  partials in a fixed order, and stored, final, in ``P`` by the ``s = 0`` programs) and adds
  ``x_i V_i^T`` over its tiles into ``PP[i, s]`` (fp32 ``[L, S, B, r]``);
* ``_lr_fwd_out_kernel``, grid ``(cdiv(B, 16), cdiv(D, BLOCK_D))``, one tile per program: ``x_L``,
  with ``p_{L-1}`` summed from its partials (the column-tile-0 programs store it in ``P``).

x_i still never goes to memory. ``P`` is the one-launch forward's up to fp32 rounding (the sums
split over column ranges), so either backward takes it. Tiles and stages are the one-launch
forward's. Built with Triton 3.6 for sm_90 at the model's taobao call of the time (x0 cast to bf16,
fp32 parameters; x0 is read as fp32 since 2026-11-29):
the phase kernels take 56 and 128 registers and 40 and 77 KB of shared memory (5 and 2 programs per
SM; 640 programs), the output kernel 114 registers (4 per SM; 1792 programs), where the one-launch
kernel takes 168 registers and runs 128 programs, one per SM. Not timed yet: the H200 profile of a
taobao training step (80ba0f2) gave the one-launch forward 49 us, where moving its bytes takes
about 3 us.
At the DESIGN shapes every kernel compiles for sm_90 without register spills with Triton 3.6, the
GPU machines' version (ahead-of-time builds for ``GPUTarget("cuda", 90, 32)``:
``profiling/sm90_audit.py``); Triton 3.9 spills in the weight kernel at taobao (255 registers, 21
spill stores).

Full rank (``cross_net``) -- GEMM-bound
---------------------------------------
Each layer is a ``[B, D] x [D, D]`` GEMM (13 GFLOP at taobao) plus element-wise work: ``y_i = x_i W_i^T +
b_i``, ``x_{i+1} = x0 * y_i + x_i``. Layer i+1 needs all of ``x_i``'s columns for every output tile,
so layers chain through memory unless one program owns whole rows.

*Narrow layers (D <= BLOCK_N = 128)*: one column tile covers D, each program owns its rows, and ONE
launch of ``_fr_fwd_kernel`` (a tiled Triton GEMM, grouped ordering, the element-wise work in its
epilogue) runs all layers, ``tl.debug_barrier`` between them.

*Wide layers (D > 128, every DESIGN shape)*, the setting ``FULL_RANK_GEMM``:

* ``"cublas"`` (default): per layer, cuBLAS computes ``lin_i = x_i W_i^T`` (``torch.mm`` into
  ``ys[i]``) and ``_fr_residual_kernel`` writes ``x_{i+1} = x0 * (lin_i + b_i) + x_i``, the bias
  added in fp32 as eager adds it to its GEMM's rounded output (until 2026-11-29 the bias was the
  ``torch.addmm``'s addend, rounded to the GEMM's dtype under autocast). Decision: measured
  on an H200 (bf16, taobao, 2 layers of ``2048 x 1792 x 1792``) the Triton GEMM of the other setting
  ran the forward in 0.172 ms against eager's 0.084 (cuBLAS plus three element-wise kernels per
  layer): a Triton GEMM at half of cuBLAS costs more than the element-wise passes that fusing saves.
  The issue allows cuBLAS where a fused GEMM does not win; the element-wise chains stay in Triton.
* ``"triton"``: ``_fr_fwd_kernel`` once per layer (a program that looped over the layers would own
  whole rows: ``B / BLOCK_M`` = 16-32 programs for a compute-bound GEMM; a grid-wide barrier would
  deadlock the interpreter). Kept for measurement on other GPUs and shapes.

Both write ``x_i`` (i = 1 .. L-1) and ``lin_i`` and save them for backward (``xs [L-1, B, D]``, ``ys
[L, B, D]``, both in the compute dtype, the GEMMs' operand dtype: ``x_i`` is the next GEMM's operand
anyway, eager saves the same rounded copy for its ``dW``, and ``lin_i`` -- ``y_i = lin_i + b_i`` is
needed by ``dx0`` -- could only be recomputed by another GEMM; the bias is added again where ``y_i`` is
read). When the output is wider than the compute dtype (fp32 under autocast with fp32 x0 or
parameters) the running ``x_i`` is also kept in the output's dtype, as eager keeps it, for the
residual of the next layer: in ``out`` itself, updated in place tile by tile. Since both settings
save the same tensors, the backward follows the setting at its own call, whatever the forward used.

*Backward* (``g_L`` = the upstream gradient): ``dy_i = g_{i+1} * x0``, ``db_i = sum_b dy_i``,
``dW_i = dy_i^T x_i``, ``g_i = g_{i+1} + dy_i W_i``, ``dx0 = g_0 + sum_i g_{i+1} * y_i``.

* ``"cublas"``, per layer from the top: ``_fr_bwd_eltwise_kernel`` writes ``dy_i``, its per-row-tile
  column sums (for ``db``) and the running sum ``s = sum_{j >= i} g_{j+1} * y_j`` (fp32); cuBLAS then
  computes ``dW_i`` (``torch.mm``) and ``g_i`` with the residual as the GEMM's addend
  (``torch.addmm(g_{i+1}, dy_i, W_i)``). At the last layer the kernel writes ``C = g_1 + s`` instead,
  and ``torch.addmm(C, dy_0, W_0)`` is dx0. ``3 L + 1`` launches. When the upstream gradient is wider
  than the GEMMs' dtype (an fp32 output under autocast), ``g`` is carried in its dtype, as eager
  carries it: ``torch.mm`` gives ``dy_i W_i`` in the GEMMs' dtype, the next layer's element-wise
  kernel adds it to ``g_{i+1}`` (and writes ``g_i`` back, in place), and ``torch.add(C, dy_0 W_0)`` is
  dx0: ``3 L + 2`` launches, plus, as on every path with parameters (or x0) in another dtype than
  the GEMMs', the casts of the parameters (and of x0, for ``dW_0``) and the roundings of the ``dW``
  into the parameters' dtype.
* ``"triton"`` (and every narrow D), one launch of ``_fr_bwd_kernel`` per layer: the GEMM
  ``dy_i @ W_i`` with ``g_i = g_{i+1} + acc`` in its epilogue, which also writes the next layer's
  ``dy_{i-1} = g_i * x0``, its per-tile column sums and the running ``s`` (carried as ``g_1 + s`` into
  the last layer, whose epilogue writes ``dx0 = g_0 + s``). The top layer's ``A`` operand
  ``dy_{L-1} = g_L * x0`` is formed while loading (its programs with ``pid_n == 0`` also store it, for
  ``dW``). ``dW_i`` on cuBLAS (a ``[D, B] x [B, D]`` GEMM with nothing to fuse). The carried ``g`` has
  the upstream gradient's dtype (fp32 under autocast), the GEMM operand ``dy`` the compute dtype.

Either way ``db`` partial sums are reduced by :func:`._common.sum_partials`. The cuBLAS GEMMs run in the
compute dtype (parameters of another dtype, under autocast, are cast to it first, as eager's
autocast does), outside autocast, with fp32 accumulation; fp32 GEMMs follow
``torch.backends.cuda.matmul.allow_tf32`` as eager's do (off by default: full fp32).

Block sizes of the Triton GEMMs: ``BLOCK_M = min(128, next_pow2(B))``, ``BLOCK_N = min(128, next_pow2(D))``, ``BLOCK_K =
min(64, next_pow2(D))`` (32 for fp32, and for 16-bit dots that load fp32 x0 or parameters under
autocast: their shared memory is sized by the loads), all at least 16, ``GROUP_M = 8``, 8 warps for
128 x 128 tiles (4 otherwise), 3 stages (4 for 16-bit); checked by sm_90 builds in the tests. The
element-wise kernels: 8 x 128 (forward) and 32 x 128 (backward) tiles per program, 4 warps.

Dtypes and precision
--------------------
fp32, fp16, bf16. Parameters must have x0's dtype, except under ``torch.autocast`` on x0's device
type, where the dots' operands are rounded to the autocast dtype (the *compute dtype*, as eager's
GEMMs round theirs) and x0 and the parameters may keep dtypes of their own (the parameters all
one): the kernels read every tensor as it is, cast dot operands to the compute dtype in registers
and do the element-wise work in fp32, and return each gradient in its tensor's dtype. So, as in
eager, only the GEMMs run in the autocast dtype: x0 enters ``x0 * (lin + b)`` unrounded, the bias is
added in fp32, and the running ``x_i`` and the carried gradient stay fp32 when the output is.
(Until 2026-11-29 x0 was cast to the autocast dtype first, which put the bias gradients at the
autocast dtype's rounding, 4.8e-4 against eager's 5.5e-8 at fp16, out of DESIGN §5's 2x; a fused
model, whose cross nets take an fp32 x0 under autocast, read and wrote that cast copy.) The
custom ops take the compute dtype as an argument (``compute_dtype``, None for x0's), saved for
their backward. The output has eager's dtype, ``promote_types`` of x0's, the compute dtype and the
bias's (fp32 under autocast with fp32 x0 or parameters). fp32 accumulation everywhere. fp32 dots
use ``input_precision="tf32x3"`` on GPU (three tf32 passes, about fp32 accuracy); under
``TRITON_INTERPRET=1`` dots are exact fp32. x0 and the upstream gradient are made contiguous (a
copy only when they are not).

``torch.library``: ``interformer::low_rank_cross_net_fwd`` -> ``(out, P)``,
``interformer::low_rank_cross_net_bwd`` -> ``(dx0, dU [L,D,r], dV [L,r,D], db [L,D])``,
``interformer::cross_net_fwd`` -> ``(out, xs, ys)``, ``interformer::cross_net_bwd`` ->
``(dx0, dW [L,D,D], db [L,D])``; parameter lists are ``Tensor[]``, the last argument of each the
``ScalarType?`` compute dtype. All are ``custom_op`` s with fake
implementations; each forward's autograd formula calls its backward op, so
``torch.compile(fullgraph=True)`` traces forward and backward. Under ``torch.fx.symbolic_trace`` the
public functions record a call of themselves as a node (``_dispatch.fx_call``), which runs them,
checks included, when the traced module runs.
Outside tracing they call the same launchers through a plain ``autograd.Function``
(``_LowRankCrossNet``, ``_CrossNet``: the parameter lists passed flat, ``x0, L, *params``, as
autograd tracks positional tensors only; the backward formula is the custom op's, with the
launcher in place of the backward op), or the forward launcher alone when no input needs a
gradient: no custom-op dispatch overhead (see :mod:`interformer.kernels._dispatch`); results are
bitwise those of the custom ops.
"""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import (KERNEL_DTYPES, cdiv, describe_shape, dot_precision, int_setting, next_pow2, on_input_device,
                      persistent_programs, promote_dtypes, sum_partials, tl_dtype)
from ._dispatch import (_functorch_wrapped, autocast_dtype, fx_call, lean_function, needed as _needed,
                        needs_grad, reference_only, tracing)

__all__ = ["cross_net", "low_rank_cross_net"]

_DTYPES = KERNEL_DTYPES
MAX_BLOCK_R = 512
#: Shared memory one program may use: the opt-in limit per block of an H100 (sm_90, 227 KiB).
SMEM_LIMIT = 232448
# Low-rank weight-gradient kernel: aim for about this many programs (columns x row splits).
_TARGET_PROGRAMS = 128
#: Warps of the low-rank forward and backward rows kernels; their column tiles are capped at 32
#: columns per warp (128 at 4 warps). 4 is the default; 8 (tiles up to 256 columns) is kept for
#: measurement: at B / 16 programs these kernels hold 4 of an SM's 64 warps at the DESIGN shapes
#: (profiling/sm90-audit-triton3.6.md), and each program runs its D loop once per layer. At the
#: taobao benchmark shape (bf16) the 8-warp builds (Triton 3.6, sm_90) take 256 columns, 244
#: registers and 153 KB in the forward, 128 columns, 186 registers and 148 KB in the rows kernel,
#: no spills: 8 resident warps per SM. Timed in the second H200 lease at taobao (benchmark provider
#: ``fused-8warps``, graphed): 0.1360 ms against 0.1426 for 4 warps in the same run, about 5% faster
#: (bench/results/nvidia-h200-2026-11-27b-ops.jsonl); another run of the default took 0.1397.
LOW_RANK_ROW_WARPS = 4
#: Most software-pipeline stages of the low-rank forward and backward rows kernels (their D loops;
#: the planner takes the most that fit shared memory, see :func:`_lr_pick`): 3, Triton's default.
#: Larger values are kept for measurement (benchmark provider ``fused-deep``: 5). Why: at taobao each
#: of these kernels runs 128 programs of 4 warps, about one an SM, and each D-loop iteration loads an
#: x0 tile from HBM and U / V / bias tiles from L2 with nothing else in flight on the SM; more stages
#: keep more of those loads in flight. Not timed yet.
LOW_RANK_MAX_STAGES = 3
#: How the low-rank backward finds ``dp_i`` and ``dx0`` (module docstring): ``"rows"`` (the default,
#: measured: one program per 16 rows makes L + 1 passes over D) or ``"phases"`` (one launch per
#: layer over row blocks x column ranges, with column-split partial sums, then one launch over
#: every tile for dx0: ``L + 1`` launches instead of one, and ``cdiv(B, 16) x S`` programs instead
#: of ``cdiv(B, 16)``; the weight kernel then splits the batch wider). Timed in the third H200
#: lease (provider ``fused-phases``): no faster at taobao (0.1364 against 0.1359 ms graphed).
LOW_RANK_BACKWARD = "rows"
#: How the low-rank forward runs (module docstring): ``"rows"`` (the default, DESIGN §4's one launch:
#: one program per 16 rows makes L + 1 passes over D) or ``"phases"`` (one launch per layer over row
#: blocks x column ranges with column-split partial sums of ``p_i``, then one launch over every tile
#: for the output: ``L + 1`` launches, ``cdiv(B, 16) x S`` programs). Not timed yet (benchmark
#: provider ``fused-fphases``).
LOW_RANK_FORWARD = "rows"


# ============================================================================ low rank: Triton
@triton.jit
def _lr_y(P, U, Bias, j, rows, row_ok, cols, col_ok, rk, r_ok, B, R,
          DT: tl.constexpr, PREC: tl.constexpr):
    """``y_j = p_j U_j^T + b_j`` on a ``[BLOCK_B, BLOCK_D]`` tile, fp32."""
    p = tl.load(P + (j * B + rows[:, None]) * R + rk[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    u = tl.load(U + cols[:, None] * R + rk[None, :], mask=col_ok[:, None] & r_ok[None, :], other=0.0)
    b = tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)
    return tl.dot(p.to(DT), tl.trans(u.to(DT)), input_precision=PREC) + b[None, :]


@triton.jit
def _lr_x(x0, P, Us, Bs, rows, row_ok, cols, col_ok, rk, r_ok, B, R,
          K: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """``x_K`` on the tile (fp32) by the recurrence ``x_{j+1} = x0 * y_j + x_j`` from the x0 tile."""
    x = x0
    for j in tl.static_range(K):
        y = _lr_y(P, Us[j], Bs[j], j, rows, row_ok, cols, col_ok, rk, r_ok, B, R, DT, PREC)
        x = x0 * y + x
    return x


@triton.jit
def _lr_g(g, DP, Vs, rows, row_ok, cols, col_ok, rk, r_ok, B, D, R,
          FROM: tl.constexpr, NUM_LAYERS: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """``g_FROM = g_L + sum_{j >= FROM} dp_j V_j`` on the tile (fp32), from the upstream-gradient tile."""
    for j in tl.static_range(FROM, NUM_LAYERS):
        dp = tl.load(DP + (j * B + rows[:, None]) * R + rk[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        v = tl.load(Vs[j] + rk[:, None] * D + cols[None, :], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        g = tl.dot(dp.to(DT), v.to(DT), g, input_precision=PREC)
    return g


@triton.jit
def _lr_dx0(DX0, G, dp0, DP, P, Us, Vs, Bs, rows, row_ok, cols, col_ok, rk, r_ok, B, D, R,
            NUM_LAYERS: tl.constexpr, DP0_GIVEN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
            DT: tl.constexpr, PREC: tl.constexpr):
    """Store ``dx0 = g_0 + sum_i g_{i+1} * y_i`` on a tile, from ``g = g_L`` read there from ``G``:
    ``y_i`` rebuilt from ``P``, ``g_i`` from the ``dp_i`` in ``DP``, except ``dp_0`` when
    ``DP0_GIVEN`` (then the ``[BLOCK_B, BLOCK_R]`` registers ``dp0``; else ``dp0`` is not read)."""
    m = row_ok[:, None] & col_ok[None, :]
    off = rows[:, None] * D + cols[None, :]
    g = tl.load(G + off, mask=m, other=0.0).to(tl.float32)
    s = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for i in tl.static_range(NUM_LAYERS - 1, -1, -1):
        y = _lr_y(P, Us[i], Bs[i], i, rows, row_ok, cols, col_ok, rk, r_ok, B, R, DT, PREC)
        s += g * y
        if i == 0 and DP0_GIVEN:
            v = tl.load(Vs[0] + rk[:, None] * D + cols[None, :], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            g = tl.dot(dp0.to(DT), v.to(DT), g, input_precision=PREC)
        else:
            g = _lr_g(g, DP, Vs, rows, row_ok, cols, col_ok, rk, r_ok, B, D, R, i, i + 1, DT, PREC)
    tl.store(DX0 + off, (s + g).to(DX0.dtype.element_ty), mask=m)


@triton.jit
def _lr_fwd_kernel(
    OUT, P,
    X0, Us, Vs, Bs,
    B, D, R,
    NUM_LAYERS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    PREC: tl.constexpr, DT: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rk = tl.arange(0, BLOCK_R)
    r_ok = rk < R
    for k in tl.static_range(NUM_LAYERS + 1):
        acc = tl.zeros([BLOCK_B, BLOCK_R], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            m = row_ok[:, None] & col_ok[None, :]
            x0 = tl.load(X0 + rows[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
            x = _lr_x(x0, P, Us, Bs, rows, row_ok, cols, col_ok, rk, r_ok, B, R, k, DT, PREC)
            if k < NUM_LAYERS:
                v = tl.load(Vs[k] + rk[:, None] * D + cols[None, :], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
                acc = tl.dot(x.to(DT), tl.trans(v.to(DT)), acc, input_precision=PREC)
            else:
                tl.store(OUT + rows[:, None] * D + cols[None, :], x.to(OUT.dtype.element_ty), mask=m)
        if k < NUM_LAYERS:
            tl.store(P + (k * B + rows[:, None]) * R + rk[None, :], acc, mask=row_ok[:, None] & r_ok[None, :])
            tl.debug_barrier()


@triton.jit
def _lr_bwd_rows_kernel(
    DX0, DP,
    G, X0, P, Us, Vs, Bs,
    B, D, R,
    NUM_LAYERS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    PREC: tl.constexpr, DT: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rk = tl.arange(0, BLOCK_R)
    r_ok = rk < R
    # dp_i = sum over D of (g_{i+1} * x0) U_i, from the top layer down
    for i in tl.static_range(NUM_LAYERS - 1, -1, -1):
        acc = tl.zeros([BLOCK_B, BLOCK_R], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            m = row_ok[:, None] & col_ok[None, :]
            off = rows[:, None] * D + cols[None, :]
            g = tl.load(G + off, mask=m, other=0.0).to(tl.float32)
            g = _lr_g(g, DP, Vs, rows, row_ok, cols, col_ok, rk, r_ok, B, D, R, i + 1, NUM_LAYERS, DT, PREC)
            dy = g * tl.load(X0 + off, mask=m, other=0.0).to(tl.float32)
            u = tl.load(Us[i] + cols[:, None] * R + rk[None, :], mask=col_ok[:, None] & r_ok[None, :], other=0.0)
            acc = tl.dot(dy.to(DT), u.to(DT), acc, input_precision=PREC)
        tl.store(DP + (i * B + rows[:, None]) * R + rk[None, :], acc, mask=row_ok[:, None] & r_ok[None, :])
        tl.debug_barrier()
    # dx0 = g_0 + sum_i g_{i+1} * y_i
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        _lr_dx0(DX0, G, None, DP, P, Us, Vs, Bs, rows, row_ok, cols, col_ok, rk, r_ok, B, D, R,
                NUM_LAYERS, False, BLOCK_B, BLOCK_D, DT, PREC)


@triton.jit
def _lr_bwd_weights_kernel(
    DU, DV, DB, PART,
    G, X0, P, DP, Us, Vs, Bs,
    B, D, R, ROWS_PER_SPLIT, TOTAL,
    NUM_LAYERS: tl.constexpr, DIRECT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    rk = tl.arange(0, BLOCK_R)
    r_ok = rk < R
    r_begin = pid_s * ROWS_PER_SPLIT
    r_end = tl.minimum(B, r_begin + ROWS_PER_SPLIT)
    if DIRECT:
        du_base = DU
        dv_base = DV
        db_base = DB
    else:
        du_base = PART + pid_s.to(tl.int64) * TOTAL
        dv_base = du_base + NUM_LAYERS * D * R
        db_base = dv_base + NUM_LAYERS * D * R
    for i in tl.static_range(NUM_LAYERS):
        acc_u = tl.zeros([BLOCK_D, BLOCK_R], dtype=tl.float32)
        acc_v = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r0 in range(r_begin, r_end, BLOCK_B):
            rows = (r0 + tl.arange(0, BLOCK_B)).to(tl.int64)
            row_ok = rows < r_end
            m = row_ok[:, None] & col_ok[None, :]
            off = rows[:, None] * D + cols[None, :]
            x0 = tl.load(X0 + off, mask=m, other=0.0).to(tl.float32)
            x = _lr_x(x0, P, Us, Bs, rows, row_ok, cols, col_ok, rk, r_ok, B, R, i, DT, PREC)
            g = tl.load(G + off, mask=m, other=0.0).to(tl.float32)
            g = _lr_g(g, DP, Vs, rows, row_ok, cols, col_ok, rk, r_ok, B, D, R, i + 1, NUM_LAYERS, DT, PREC)
            dy = g * x0
            pr_mask = row_ok[:, None] & r_ok[None, :]
            p = tl.load(P + (i * B + rows[:, None]) * R + rk[None, :], mask=pr_mask, other=0.0)
            dp = tl.load(DP + (i * B + rows[:, None]) * R + rk[None, :], mask=pr_mask, other=0.0)
            acc_u = tl.dot(tl.trans(dy.to(DT)), p.to(DT), acc_u, input_precision=PREC)
            acc_v = tl.dot(tl.trans(dp.to(DT)), x.to(DT), acc_v, input_precision=PREC)
            acc_b += tl.sum(dy, axis=0)
        wmask_u = col_ok[:, None] & r_ok[None, :]
        wmask_v = r_ok[:, None] & col_ok[None, :]
        tl.store(du_base + i * D * R + cols[:, None] * R + rk[None, :],
                 acc_u.to(du_base.dtype.element_ty), mask=wmask_u)
        tl.store(dv_base + i * D * R + rk[:, None] * D + cols[None, :],
                 acc_v.to(dv_base.dtype.element_ty), mask=wmask_v)
        tl.store(db_base + i * D + cols, acc_b.to(db_base.dtype.element_ty), mask=col_ok)


@triton.jit
def _lr_dp_rows(DPP, j, S, rows, row_ok, rk, r_ok, B, R, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr):
    """``dp_j`` (or, from the forward's partials, ``p_j``) on a row block (``[BLOCK_B, BLOCK_R]`` fp32):
    the ``S`` column-split partials of layer j (``DPP [L, S, B, R]``) added in the order s = 0 .. S-1,
    the same in every kernel that reads them."""
    m = row_ok[:, None] & r_ok[None, :]
    acc = tl.zeros([BLOCK_B, BLOCK_R], dtype=tl.float32)
    for s in range(S):
        acc += tl.load(DPP + ((j * S + s) * B + rows[:, None]) * R + rk[None, :], mask=m, other=0.0)
    return acc


@triton.jit
def _lr_row_block(B, R, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr):
    """``(rows, row_ok, rk, r_ok)`` of a phased launch's row block (axis 0 of its grid) and rank columns."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    rk = tl.arange(0, BLOCK_R)
    return rows, rows < B, rk, rk < R


@triton.jit
def _lr_store_partial(PART, acc, j, S, s, rows, row_ok, rk, r_ok, B, R):
    """Store a phase program's column-range partial of layer j's ``p`` (or ``dp``) as ``PART[j, s]``
    (``[L, S, B, R]`` fp32), which :func:`_lr_dp_rows` sums in a fixed order."""
    tl.store(PART + ((j * S + s) * B + rows[:, None]) * R + rk[None, :], acc, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _lr_settled(PART, FINAL, j, S, first, rows, row_ok, rk, r_ok, B, R, BLOCK_B: tl.constexpr,
                BLOCK_R: tl.constexpr):
    """Layer j's ``p`` (or ``dp``) on a row block, summed from its S column-split partials in ``PART``
    (:func:`_lr_dp_rows`); the programs with ``first`` set also store it, final, in ``FINAL [L, B,
    R]`` for the launches that follow (and the backward)."""
    acc = _lr_dp_rows(PART, j, S, rows, row_ok, rk, r_ok, B, R, BLOCK_B, BLOCK_R)
    if first:
        tl.store(FINAL + (j * B + rows[:, None]) * R + rk[None, :], acc, mask=row_ok[:, None] & r_ok[None, :])
    return acc


@triton.jit
def _lr_bwd_phase_kernel(
    DPP, DP,
    G, X0, Us, Vs,
    B, D, R, S, CHUNKS,
    LAYER: tl.constexpr, NUM_LAYERS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr,
):
    """``LOW_RANK_BACKWARD = "phases"``, one launch per layer from the top: program ``(row block,
    s)`` adds up ``(g_{LAYER+1} * x0) U_LAYER`` over its ``CHUNKS`` column tiles into the partial
    ``DPP[LAYER, s]``. ``g_{LAYER+1}`` is rebuilt on each tile from the upstream gradient and the
    layers above: ``dp_{LAYER+1}`` summed here from its partials (the ``s = 0`` programs also store
    it, final, in ``DP``), the ones above that read from ``DP``."""
    rows, row_ok, rk, r_ok = _lr_row_block(B, R, BLOCK_B, BLOCK_R)
    s = tl.program_id(1)
    if LAYER + 1 < NUM_LAYERS:
        dp_up = _lr_settled(DPP, DP, LAYER + 1, S, s == 0, rows, row_ok, rk, r_ok, B, R, BLOCK_B, BLOCK_R)
    acc = tl.zeros([BLOCK_B, BLOCK_R], dtype=tl.float32)
    for c in range(0, CHUNKS):
        cols = (s * CHUNKS + c) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        m = row_ok[:, None] & col_ok[None, :]
        off = rows[:, None] * D + cols[None, :]
        g = tl.load(G + off, mask=m, other=0.0).to(tl.float32)
        if LAYER + 1 < NUM_LAYERS:
            v = tl.load(Vs[LAYER + 1] + rk[:, None] * D + cols[None, :], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            g = tl.dot(dp_up.to(DT), v.to(DT), g, input_precision=PREC)
            g = _lr_g(g, DP, Vs, rows, row_ok, cols, col_ok, rk, r_ok, B, D, R, LAYER + 2, NUM_LAYERS, DT, PREC)
        dy = g * tl.load(X0 + off, mask=m, other=0.0).to(tl.float32)
        u = tl.load(Us[LAYER] + cols[:, None] * R + rk[None, :], mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(dy.to(DT), u.to(DT), acc, input_precision=PREC)
    _lr_store_partial(DPP, acc, LAYER, S, s, rows, row_ok, rk, r_ok, B, R)


@triton.jit
def _lr_bwd_dx0_kernel(
    DX0, DP,
    DPP, G, P, Us, Vs, Bs,
    B, D, R, S,
    NUM_LAYERS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    PREC: tl.constexpr, DT: tl.constexpr,
):
    """``LOW_RANK_BACKWARD = "phases"``, after the phase launches: ``dx0 = g_0 + sum_i g_{i+1} * y_i``
    on one ``[BLOCK_B, BLOCK_D]`` tile per program (the grid covers every tile: no loop over D), with
    ``dp_0`` summed from its partials (the column-tile-0 programs store it, final, in ``DP`` for the
    weight kernel) and the other ``dp_i`` read from ``DP``."""
    rows, row_ok, rk, r_ok = _lr_row_block(B, R, BLOCK_B, BLOCK_R)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    dp0 = _lr_settled(DPP, DP, 0, S, pid_d == 0, rows, row_ok, rk, r_ok, B, R, BLOCK_B, BLOCK_R)
    _lr_dx0(DX0, G, dp0, DP, P, Us, Vs, Bs, rows, row_ok, cols, col_ok, rk, r_ok, B, D, R,
            NUM_LAYERS, True, BLOCK_B, BLOCK_D, DT, PREC)


@triton.jit
def _lr_x_after(x0, p_last, P, Us, Bs, rows, row_ok, cols, col_ok, rk, r_ok, B, R,
                K: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """``x_K`` (K >= 1) on the tile, fp32, as :func:`_lr_x` builds it, but with ``p_{K-1}`` given in
    registers (``p_last``, ``[BLOCK_B, BLOCK_R]`` fp32) and only the earlier ``p_j`` read from ``P``."""
    x = _lr_x(x0, P, Us, Bs, rows, row_ok, cols, col_ok, rk, r_ok, B, R, K - 1, DT, PREC)
    u = tl.load(Us[K - 1] + cols[:, None] * R + rk[None, :], mask=col_ok[:, None] & r_ok[None, :], other=0.0)
    b = tl.load(Bs[K - 1] + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = tl.dot(p_last.to(DT), tl.trans(u.to(DT)), input_precision=PREC) + b[None, :]
    return x0 * y + x


@triton.jit
def _lr_fwd_phase_kernel(
    PP, P,
    X0, Us, Vs, Bs,
    B, D, R, S, CHUNKS,
    LAYER: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    PREC: tl.constexpr, DT: tl.constexpr,
):
    """``LOW_RANK_FORWARD = "phases"``, one launch per layer from the bottom: program ``(row block,
    s)`` adds up ``x_LAYER V_LAYER^T`` over its ``CHUNKS`` column tiles into the partial ``PP[LAYER,
    s]``. ``x_LAYER`` is rebuilt on each tile from x0 and the layers below: ``p_{LAYER-1}`` summed
    here from its partials (the ``s = 0`` programs also store it, final, in ``P``), the ones below
    that read from ``P``."""
    rows, row_ok, rk, r_ok = _lr_row_block(B, R, BLOCK_B, BLOCK_R)
    s = tl.program_id(1)
    if LAYER > 0:
        p_last = _lr_settled(PP, P, LAYER - 1, S, s == 0, rows, row_ok, rk, r_ok, B, R, BLOCK_B, BLOCK_R)
    acc = tl.zeros([BLOCK_B, BLOCK_R], dtype=tl.float32)
    for c in range(0, CHUNKS):
        cols = (s * CHUNKS + c) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        m = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X0 + rows[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if LAYER > 0:
            x = _lr_x_after(x, p_last, P, Us, Bs, rows, row_ok, cols, col_ok, rk, r_ok, B, R, LAYER, DT, PREC)
        v = tl.load(Vs[LAYER] + rk[:, None] * D + cols[None, :], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x.to(DT), tl.trans(v.to(DT)), acc, input_precision=PREC)
    _lr_store_partial(PP, acc, LAYER, S, s, rows, row_ok, rk, r_ok, B, R)


@triton.jit
def _lr_fwd_out_kernel(
    OUT, P,
    PP, X0, Us, Bs,
    B, D, R, S,
    NUM_LAYERS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    PREC: tl.constexpr, DT: tl.constexpr,
):
    """``LOW_RANK_FORWARD = "phases"``, after the phase launches: the output ``x_L`` on one ``[BLOCK_B,
    BLOCK_D]`` tile per program (the grid covers every tile: no loop over D), with ``p_{L-1}`` summed
    from its partials (the column-tile-0 programs store it, final, in ``P`` for the backward) and
    the other ``p_j`` read from ``P``."""
    rows, row_ok, rk, r_ok = _lr_row_block(B, R, BLOCK_B, BLOCK_R)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    p_last = _lr_settled(PP, P, NUM_LAYERS - 1, S, pid_d == 0, rows, row_ok, rk, r_ok, B, R, BLOCK_B, BLOCK_R)
    m = row_ok[:, None] & col_ok[None, :]
    x0 = tl.load(X0 + rows[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
    x = _lr_x_after(x0, p_last, P, Us, Bs, rows, row_ok, cols, col_ok, rk, r_ok, B, R, NUM_LAYERS, DT, PREC)
    tl.store(OUT + rows[:, None] * D + cols[None, :], x.to(OUT.dtype.element_ty), mask=m)


# ============================================================================ low rank: launchers
class _LRPlan(NamedTuple):
    """Tiles of the low-rank kernels for one (D, r, L, dtypes). ``fwd`` and ``rows``: ``(BLOCK_D,
    num_stages)`` of the forward and of the backward rows kernel (``BLOCK_B = 16``); ``weights``:
    ``(BLOCK_B, BLOCK_D, num_stages)`` of the weight-gradient kernel."""
    block_r: int
    fwd: Tuple[int, int]
    rows: Tuple[int, int]
    weights: Tuple[int, int, int]


_LR_BLOCK_B = 16


def _lr_smem(kind: str, L: int, bb: int, bd: int, br: int, stages: int, x_bytes: int, p_bytes: int,
             dot_bytes: Optional[int] = None) -> int:
    """Upper estimate (bytes) of the shared memory of one program of a low-rank kernel (``kind`` =
    ``"fwd"``, ``"rows"`` or ``"weights"``): the largest over the kernel's D / row loops of

    * ``num_stages`` copies of every tile the loop loads, in its stored dtype (x0 / gradient
      ``[bb, bd]`` at ``x_bytes``, the wider of the two; U, V ``[bd, br]`` and biases in the
      parameters' dtype; P, dP ``[bb, br]`` fp32), loop-invariant ones (P / dP rows, hoisted out of
      the D loop) included: the software pipeline keeps ``num_stages - 1`` buffers per load, plus
      one for the operand's staging;
    * at least two copies of the loop-invariant fp32 weight tiles of the weight kernel when the dots
      are fp32 (``tf32x3`` stages their hi and lo halves), and
    * a staging copy of each dot operand computed in registers, in the dots' dtype (``dot_bytes``,
      default ``x_bytes``; two, hi and lo, for fp32).

    Checked against the ``metadata.shared`` of ahead-of-time sm_90 builds over a grid of tiles,
    stages, ranks and layers: the estimate was 1.1x to 8x the compiled value (the planned kernels are
    built and checked by tests/test_kernel_crossnet.py)."""
    dot_bytes = x_bytes if dot_bytes is None else dot_bytes
    fp32 = dot_bytes == 4
    x = bb * bd * x_bytes
    w = bd * br * p_bytes
    b = bd * p_bytes
    pt = bb * br * 4
    stage = bb * bd * (8 if fp32 else dot_bytes)
    loops = []  # (bytes loaded per iteration, loop-invariant bytes, invariant copies, staged bytes)
    if kind == "fwd":  # pass k: x0, U_j and b_j (j < k), V_k (k < L); P_j rows invariant
        for k in range(L + 1):
            loops.append((x + k * (w + b) + (w if k < L else 0), k * pt, stages, stage if k < L else 0))
    elif kind == "rows":  # dp pass i: g, x0, V_j (j > i), U_i; dP_j rows invariant. dx0 pass: g, U, V, b
        for i in range(L):
            loops.append((2 * x + (L - i) * w, (L - 1 - i) * pt, stages, stage))
        loops.append((x + L * (2 * w + b), 2 * L * pt, stages, 0))
    elif kind == "weights":  # layer i: x0, g, L + 1 P / dP row tiles; U_j / V_j (j != i) invariant
        for i in range(L):
            loops.append((2 * x + (L + 1) * pt, (L - 1) * w + i * b, max(stages, 2 if fp32 else 1), 2 * stage))
    else:
        raise ValueError(kind)
    return max(stages * per_iter + copies * inv + staged for per_iter, inv, copies, staged in loops)


def _lr_pick(kind: str, L: int, br: int, cap: int, bbs: Sequence[int], x_bytes: int, p_bytes: int, dot_bytes: int,
             budget: int, max_stages: int = 3):
    """The first ``(BLOCK_B, BLOCK_D, num_stages)`` whose :func:`_lr_smem` is within ``budget``:
    ``max_stages`` stages (3, Triton's default, unless :data:`LOW_RANK_MAX_STAGES` says otherwise)
    before fewer, down to 1, then the widest tile; None if even 16 columns and one stage do not fit."""
    for stages in range(max_stages, 0, -1):
        for bb in bbs:
            bd = cap
            while bd >= 16:
                if _lr_smem(kind, L, bb, bd, br, stages, x_bytes, p_bytes, dot_bytes) <= budget:
                    return bb, bd, stages
                bd //= 2
    return None


@functools.lru_cache(maxsize=4096)
def _lr_plan(D: int, R: int, L: int, x_dtype: torch.dtype, p_dtype: torch.dtype,
             budget: int = SMEM_LIMIT, row_warps: int = 4, row_stages: int = 3,
             dot_dtype: Optional[torch.dtype] = None) -> Optional[_LRPlan]:
    """Block sizes and stages of the three low-rank kernels, or None when they cannot run (``BLOCK_R >
    512``, or no tile of 16 columns fits ``budget`` bytes of shared memory: large ranks with many
    layers; the public function then uses the eager reference). ``x_dtype``: the wider of x0's and
    the upstream gradient's (the output's) dtypes; ``dot_dtype``: the dots' operand dtype (default
    ``x_dtype``; the autocast dtype under autocast). ``row_warps`` and ``row_stages``: see
    :data:`LOW_RANK_ROW_WARPS` and :data:`LOW_RANK_MAX_STAGES`."""
    br = max(16, next_pow2(R))
    if br > MAX_BLOCK_R:
        return None
    xb, pb = x_dtype.itemsize, p_dtype.itemsize
    db = xb if dot_dtype is None else dot_dtype.itemsize
    dp2 = max(16, next_pow2(D))
    row_cap = max(16, min(32 * row_warps, 2048 * row_warps // br, dp2))
    w_cap = max(16, min(64, 4096 // br, dp2))
    fwd = _lr_pick("fwd", L, br, row_cap, (_LR_BLOCK_B,), xb, pb, db, budget, row_stages)
    rows = _lr_pick("rows", L, br, row_cap, (_LR_BLOCK_B,), xb, pb, db, budget, row_stages)
    # fp32 x0 / gradient tiles with 16-bit dots (autocast, the model's call): 16 rows, as 32 spill
    # (Triton 3.6, sm_90, taobao: 255 registers and 19 spill stores in the row loop; 16 rows: 234, none)
    weights = _lr_pick("weights", L, br, w_cap, (16,) if xb == 4 and db == 2 else (32, 16), xb, pb, db, budget)
    if fwd is None or rows is None or weights is None:
        return None
    return _LRPlan(br, fwd[1:], rows[1:], weights)


def _lr_plan_for(x0: torch.Tensor, ws: Sequence[torch.Tensor], bs: Sequence[torch.Tensor], L: int,
                 dt: torch.dtype) -> Optional[_LRPlan]:
    """The plan for these inputs with compute dtype ``dt``: the [B, D] tiles at the output's (the
    upstream gradient's) dtype, which is at least as wide as x0's."""
    if LOW_RANK_ROW_WARPS not in (4, 8):  # the tile caps (32 columns a warp) must stay powers of two
        raise ValueError(f"LOW_RANK_ROW_WARPS must be 4 or 8, got {LOW_RANK_ROW_WARPS!r}")
    stages = int_setting("LOW_RANK_MAX_STAGES", LOW_RANK_MAX_STAGES, 1, 8, optional=False)
    plan = _lr_plan.__wrapped__ if torch.compiler.is_compiling() else _lr_plan  # dynamo: no cache wrapper
    return plan(x0.shape[1], ws[0].shape[1], L, _out_dtype(x0, bs, dt), ws[0].dtype, row_warps=LOW_RANK_ROW_WARPS,
                row_stages=stages, dot_dtype=dt)


def _lr_plan_or_raise(x0, ws, bs, L, dt) -> _LRPlan:
    plan = _lr_plan_for(x0, ws, bs, L, dt)
    if plan is None:
        raise ValueError(f"low_rank_cross_net: no kernel configuration for D={x0.shape[1]}, r={ws[0].shape[1]}, "
                         f"L={L} (rank above {MAX_BLOCK_R}, or too large for shared memory): use the public "
                         f"function, which falls back to the eager reference")
    return plan


def _flat_bias(bs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    return tuple(b.reshape(-1).contiguous() for b in bs)


def _out_dtype(x0: torch.Tensor, bs: Sequence[torch.Tensor], dt: torch.dtype) -> torch.dtype:
    """The output's dtype for compute dtype ``dt``: eager's ``x0 * (linear + b) + x`` promotes
    x0's dtype, the linear's (``dt``) and the bias's (module docstring, "Dtypes and precision")."""
    return promote_dtypes(x0.dtype, dt, bs[0].dtype)


def _dot_dtype(x0: torch.Tensor, dt: Optional[torch.dtype]) -> torch.dtype:
    """The ops' ``compute_dtype``: the dots' operand dtype, x0's when not given."""
    if dt is None:
        return x0.dtype
    if dt not in _DTYPES:
        raise ValueError(f"compute_dtype must be one of {_DTYPES}, got {dt}")
    return dt


@on_input_device
def _lr_fwd_impl(x0, ws, vs, bs, dt=None):
    x0 = x0.contiguous()
    ws = tuple(w.contiguous() for w in ws)
    vs = tuple(v.contiguous() for v in vs)
    bs = _flat_bias(bs)
    B, D = x0.shape
    L, R = len(ws), ws[0].shape[1]
    dt = _dot_dtype(x0, dt)
    out = torch.empty((B, D), device=x0.device, dtype=_out_dtype(x0, bs, dt))
    p = torch.empty((L, B, R), device=x0.device, dtype=torch.float32)
    if B == 0 or D == 0:  # a direct op call (low_rank_cross_net takes the reference): the splits divide by zero
        return out, p.zero_()
    plan = _lr_plan_or_raise(x0, ws, bs, L, dt)
    bd, stages = plan.fwd
    row_blocks = cdiv(B, _LR_BLOCK_B)
    kw = dict(BLOCK_B=_LR_BLOCK_B, BLOCK_D=bd, BLOCK_R=plan.block_r, PREC=dot_precision(dt), DT=tl_dtype(dt),
              num_warps=LOW_RANK_ROW_WARPS, num_stages=stages)
    if _low_rank_forward() == "rows":
        _lr_fwd_kernel[(row_blocks,)](out, p, x0, ws, vs, bs, B, D, R, NUM_LAYERS=L, **kw)
        return out, p
    # "phases": p_0 .. p_{L-1} by column-split partials, one launch per layer, then the output tiles
    tiles = cdiv(D, bd)
    split, chunks = _lr_phase_split(row_blocks, tiles, x0.device)
    pp = torch.empty((L, split, B, R), device=x0.device, dtype=torch.float32)
    for k in range(L):
        _lr_fwd_phase_kernel[(row_blocks, split)](pp, p, x0, ws, vs, bs, B, D, R, split, chunks, LAYER=k, **kw)
    _lr_fwd_out_kernel[(row_blocks, tiles)](out, p, pp, x0, ws, bs, B, D, R, split, NUM_LAYERS=L, **kw)
    return out, p


def _lr_split(B: int, D: int, R: int, L: int, block_bw: int, block_dw: int, elem: int,
              target: int = _TARGET_PROGRAMS, cap: int = 1) -> Tuple[int, int]:
    """(SPLIT, rows per split) of the low-rank weight-gradient kernel: about ``target`` programs,
    with the fp32 partials at most ``cap`` times the bytes of x0."""
    n_col = cdiv(D, block_dw)
    split = max(1, cdiv(target, n_col))
    part_bytes = L * (2 * D * R + D) * 4
    split = min(split, max(1, (cap * B * D * elem) // part_bytes), cdiv(B, block_bw))
    rows = cdiv(cdiv(B, split), block_bw) * block_bw
    return cdiv(B, rows), rows


def _low_rank_forward() -> str:
    if LOW_RANK_FORWARD not in ("rows", "phases"):
        raise ValueError(f'LOW_RANK_FORWARD must be "rows" or "phases", got {LOW_RANK_FORWARD!r}')
    return LOW_RANK_FORWARD


def _low_rank_backward() -> str:
    if LOW_RANK_BACKWARD not in ("rows", "phases"):
        raise ValueError(f'LOW_RANK_BACKWARD must be "rows" or "phases", got {LOW_RANK_BACKWARD!r}')
    return LOW_RANK_BACKWARD


def _lr_phase_split(row_blocks: int, col_tiles: int, device: torch.device) -> Tuple[int, int]:
    """``(S, CHUNKS)`` of the phase kernels: the column tiles split into S ranges of CHUNKS tiles
    (the last may be shorter), S as small as gives about :func:`persistent_programs` programs with
    the row blocks (4 per SM on a GPU; 2 under the interpreter, so tests split D too)."""
    split = max(1, min(col_tiles, cdiv(persistent_programs(device), row_blocks)))
    chunks = cdiv(col_tiles, split)
    return cdiv(col_tiles, chunks), chunks


@on_input_device
def _lr_bwd_impl(g, x0, ws, vs, bs, p, dt=None, weights: bool = True):
    """``(dx0, dU, dV, db)``; with ``weights=False`` (no parameter needs a gradient: the eager
    path's frozen cross nets) only dx0, the rest None, and the weight-gradient kernel is not run."""
    g = g.contiguous()
    x0 = x0.contiguous()
    ws = tuple(w.contiguous() for w in ws)
    vs = tuple(v.contiguous() for v in vs)
    bs = _flat_bias(bs)
    B, D = x0.shape
    L, R = len(ws), ws[0].shape[1]
    pdt = ws[0].dtype
    dev = x0.device
    dt = _dot_dtype(x0, dt)
    prec = dot_precision(dt)
    plan = _lr_plan_or_raise(x0, ws, bs, L, dt)
    BR = plan.block_r
    bd, stages = plan.rows
    BBW, BDW, w_stages = plan.weights
    dx0 = torch.empty((B, D), device=dev, dtype=x0.dtype)
    if B == 0 or D == 0:  # a direct op call (low_rank_cross_net takes the reference): the splits divide by zero
        return dx0, *((None,) * 3 if not weights else
                      (torch.zeros(s, device=dev, dtype=pdt) for s in ((L, D, R), (L, R, D), (L, D))))
    dp = torch.empty((L, B, R), device=dev, dtype=torch.float32)
    row_blocks = cdiv(B, _LR_BLOCK_B)
    rows_kw = dict(NUM_LAYERS=L, BLOCK_B=_LR_BLOCK_B, BLOCK_D=bd, BLOCK_R=BR, PREC=prec, DT=tl_dtype(dt),
                   num_warps=LOW_RANK_ROW_WARPS, num_stages=stages)
    mode = _low_rank_backward()
    if mode == "rows":
        _lr_bwd_rows_kernel[(row_blocks,)](dx0, dp, g, x0, p, ws, vs, bs, B, D, R, **rows_kw)
    else:  # "phases"
        split, chunks = _lr_phase_split(row_blocks, cdiv(D, bd), dev)
        dpp = torch.empty((L, split, B, R), device=dev, dtype=torch.float32)
        for i in range(L - 1, -1, -1):
            _lr_bwd_phase_kernel[(row_blocks, split)](dpp, dp, g, x0, ws, vs, B, D, R, split, chunks, LAYER=i,
                                                      **rows_kw)
        _lr_bwd_dx0_kernel[(row_blocks, cdiv(D, bd))](dx0, dp, dpp, g, p, ws, vs, bs, B, D, R, split, **rows_kw)
    if not weights:
        return dx0, None, None, None
    du = torch.empty((L, D, R), device=dev, dtype=pdt)
    dv = torch.empty((L, R, D), device=dev, dtype=pdt)
    db = torch.empty((L, D), device=dev, dtype=pdt)
    # "phases" fills the GPU here too: about 4 programs per SM, partials up to twice x0's bytes
    wide = {} if mode == "rows" else dict(target=max(_TARGET_PROGRAMS, persistent_programs(dev)), cap=2)
    split, rows = _lr_split(B, D, R, L, BBW, BDW, dt.itemsize, **wide)  # partials: bytes of x0 in dt
    total = L * (2 * D * R + D)
    part = du if split == 1 else torch.empty((split, total), device=dev, dtype=torch.float32)
    _lr_bwd_weights_kernel[(cdiv(D, BDW), split)](
        du, dv, db, part, g, x0, p, dp, ws, vs, bs, B, D, R, rows, total,
        NUM_LAYERS=L, DIRECT=split == 1, BLOCK_B=BBW, BLOCK_D=BDW, BLOCK_R=BR, PREC=prec, DT=tl_dtype(dt),
        num_warps=4, num_stages=w_stages,
    )
    if split > 1:
        sum_partials(part, (du, dv, db))
    return dx0, du, dv, db


# ============================================================================ full rank: Triton
@triton.jit
def _grouped_tile(pid, B, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    num_m = tl.cdiv(B, BLOCK_M)
    num_n = tl.cdiv(D, BLOCK_N)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _fr_fwd_kernel(
    OUT, XS, YS,
    X0, Ws, Bs,
    B, D,
    FIRST: tl.constexpr, NUM_LAYERS: tl.constexpr, TOTAL: tl.constexpr, RUNNING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, DT: tl.constexpr,
):
    """Layers ``FIRST .. FIRST+NUM_LAYERS-1`` of ``TOTAL`` (:func:`_fr_fwd_layer`). More than one
    layer per launch only when one column tile covers D (each program owns its rows)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), B, D, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    for j in tl.static_range(NUM_LAYERS):
        _fr_fwd_layer(OUT, XS, YS, X0, Ws[FIRST + j], Bs[FIRST + j], B, D, rows, cols, FIRST + j, TOTAL, RUNNING,
                      BLOCK_M, BLOCK_N, BLOCK_K, PREC, DT)


@triton.jit
def _fr_fwd_layer(OUT, XS, YS, X0, W, Bias, B, D, rows, cols, LAYER: tl.constexpr, TOTAL: tl.constexpr,
                  RUNNING: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  PREC: tl.constexpr, DT: tl.constexpr):
    """Layer ``l = LAYER`` on a program's tile: multiplies ``x_l`` (X0 for l = 0, else ``XS[l-1]``) by
    ``W_l^T``, writes ``lin_l`` (DT, no bias) to ``YS[l]``, then ``x_{l+1} = x0 * (lin_l + b_l) +
    x_l``: to OUT at the last layer, else to ``XS[l]`` (DT, the next GEMM's operand) and, when
    RUNNING (the output wider than DT: an fp32 running ``x``, as eager's), to OUT in its dtype too,
    where the next layer reads its residual ``x_l`` (the same program reads and writes a tile)."""
    row_ok = rows < B
    col_ok = cols < D
    m = row_ok[:, None] & col_ok[None, :]
    off = rows[:, None] * D + cols[None, :]
    if LAYER == 0:
        src = X0 + rows[:, None] * D
    else:
        src = XS + ((LAYER - 1) * B + rows[:, None]) * D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(src + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + cols[None, :] * D + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a.to(DT), w.to(DT), acc, input_precision=PREC)
    lin = acc.to(DT)
    tl.store(YS + (LAYER * B + rows[:, None]) * D + cols[None, :], lin, mask=m)  # int64 (rows is): L B D > 2^31
    y = lin.to(tl.float32) + tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    x0 = tl.load(X0 + off, mask=m, other=0.0).to(tl.float32)
    if LAYER == 0:
        xi = x0
    elif RUNNING:
        xi = tl.load(OUT + off, mask=m, other=0.0).to(tl.float32)
    else:
        xi = tl.load(src + cols[None, :], mask=m, other=0.0).to(tl.float32)
    xn = x0 * y + xi
    if LAYER == TOTAL - 1:
        tl.store(OUT + off, xn.to(OUT.dtype.element_ty), mask=m)
    else:
        tl.store(XS + (LAYER * B + rows[:, None]) * D + cols[None, :], xn.to(DT), mask=m)
        if RUNNING:
            tl.store(OUT + off, xn.to(OUT.dtype.element_ty), mask=m)
        tl.debug_barrier()


@triton.jit
def _fr_bwd_kernel(
    DY_OUT, G_OUT, S_OUT, DX0, DBP, DY_TOP,
    DY_IN, G_IN, S_IN, X0, W, Y_CUR, Y_PREV, B_CUR, B_PREV,
    B, D, DB_ROW, DB_ROW_TOP, DB_STRIDE,
    TOP: tl.constexpr, LAST: tl.constexpr, NEXT_LAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, DT: tl.constexpr,
):
    """Layer i of the backward: ``g_i = g_{i+1} + dy_i W_i`` plus the element-wise epilogue (see the
    module docstring). TOP: i = L-1 (A operand ``g_L * x0`` formed on load, stored by pid_n == 0);
    LAST: i = 0 (writes dx0); NEXT_LAST: i = 1 (carries ``g_1 + s`` in G_OUT). ``y_i = lin_i + b_i``
    from the saved ``lin`` (Y_CUR, Y_PREV) and the biases (B_CUR, B_PREV), in fp32."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), B, D, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < B
    col_ok = cols < D
    m = row_ok[:, None] & col_ok[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        am = row_ok[:, None] & k_ok[None, :]
        a_off = rows[:, None] * D + ks[None, :]
        if TOP:
            af = tl.load(G_IN + a_off, mask=am, other=0.0).to(tl.float32) * \
                tl.load(X0 + a_off, mask=am, other=0.0).to(tl.float32)
            a = af.to(DT)
            if pid_n == 0:
                tl.store(DY_TOP + a_off, a, mask=am)
                tl.store(DBP + pid_m * DB_STRIDE + DB_ROW_TOP + ks, tl.sum(af, axis=0), mask=k_ok)
        else:
            a = tl.load(DY_IN + a_off, mask=am, other=0.0)
        w = tl.load(W + ks[:, None] * D + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w.to(DT), acc, input_precision=PREC)
    off = rows[:, None] * D + cols[None, :]
    g_next = tl.load(G_IN + off, mask=m, other=0.0).to(tl.float32)
    g = g_next + acc
    if LAST:
        if TOP:
            g += g_next * _fr_y(Y_CUR, B_CUR, off, cols, m, col_ok)
        tl.store(DX0 + off, g.to(DX0.dtype.element_ty), mask=m)
    else:
        if TOP:
            s = g_next * _fr_y(Y_CUR, B_CUR, off, cols, m, col_ok)
        else:
            s = tl.load(S_IN + off, mask=m, other=0.0).to(tl.float32)
        dy = g * tl.load(X0 + off, mask=m, other=0.0).to(tl.float32)
        tl.store(DY_OUT + off, dy.to(DY_OUT.dtype.element_ty), mask=m)
        tl.store(DBP + pid_m * DB_STRIDE + DB_ROW + cols, tl.sum(dy, axis=0), mask=col_ok)
        s += g * _fr_y(Y_PREV, B_PREV, off, cols, m, col_ok)
        if NEXT_LAST:
            tl.store(G_OUT + off, (g + s).to(G_OUT.dtype.element_ty), mask=m)
        else:
            tl.store(G_OUT + off, g.to(G_OUT.dtype.element_ty), mask=m)
            tl.store(S_OUT + off, s.to(S_OUT.dtype.element_ty), mask=m)


@triton.jit
def _fr_y(LIN, BIAS, off, cols, m, col_ok):
    """``y = lin + b`` on a tile, fp32, from a layer's saved ``lin = x W^T`` and its bias."""
    b = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    return tl.load(LIN + off, mask=m, other=0.0).to(tl.float32) + b[None, :]


@triton.jit
def _fr_residual_kernel(DST, COPY, X0, LIN, BIAS, XI, B, D, HAS_COPY: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """``DST = X0 * (LIN + BIAS) + XI`` (fp32 math) on a ``[BLOCK_M, BLOCK_N]`` tile: a cross layer's
    epilogue after a cuBLAS ``LIN = x_i W^T``; with HAS_COPY the result also to COPY (in its dtype:
    the next GEMM's operand, when DST keeps the wider running ``x``)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    m = (rows < B)[:, None] & col_ok[None, :]
    off = rows[:, None] * D + cols[None, :]
    x0 = tl.load(X0 + off, mask=m, other=0.0).to(tl.float32)
    xi = tl.load(XI + off, mask=m, other=0.0).to(tl.float32)
    xn = x0 * _fr_y(LIN, BIAS, off, cols, m, col_ok) + xi
    tl.store(DST + off, xn.to(DST.dtype.element_ty), mask=m)
    if HAS_COPY:
        tl.store(COPY + off, xn.to(COPY.dtype.element_ty), mask=m)


@triton.jit
def _fr_bwd_eltwise_kernel(
    DY, S_OUT, C_OUT, G_OUT, DBP,
    G, M, X0, LIN, BIAS, S_IN,
    B, D, DB_ROW, DB_STRIDE,
    HAS_S: tl.constexpr, HAS_M: tl.constexpr, LAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Layer i's element-wise backward around the cuBLAS GEMMs, from ``g = g_{i+1}``: G, plus M with
    HAS_M (``M = dy_{i+1} W_{i+1}`` from cuBLAS, when the gradient is carried wider than the GEMMs'
    dtype: ``g`` then goes back to G_OUT, unless LAST). ``dy_i = g * x0`` (to DY, and its column sums
    over this row tile to DBP, for ``db_i``) and the dx0 running sum ``s = S_IN + g * y_i`` (to S_OUT in
    fp32); at the last layer (i = 0) instead ``C = g + s`` (to C_OUT), so that ``dx0 = C + dy_0 W_0``."""
    pid_m = tl.program_id(0)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    m = (rows < B)[:, None] & col_ok[None, :]
    off = rows[:, None] * D + cols[None, :]
    g = tl.load(G + off, mask=m, other=0.0).to(tl.float32)
    if HAS_M:
        g += tl.load(M + off, mask=m, other=0.0).to(tl.float32)
        if not LAST:
            tl.store(G_OUT + off, g.to(G_OUT.dtype.element_ty), mask=m)
    dy = g * tl.load(X0 + off, mask=m, other=0.0).to(tl.float32)
    tl.store(DY + off, dy.to(DY.dtype.element_ty), mask=m)
    tl.store(DBP + pid_m * DB_STRIDE + DB_ROW + cols, tl.sum(dy, axis=0), mask=col_ok)
    s = g * _fr_y(LIN, BIAS, off, cols, m, col_ok)
    if HAS_S:
        s += tl.load(S_IN + off, mask=m, other=0.0)
    if LAST:
        tl.store(C_OUT + off, (g + s).to(C_OUT.dtype.element_ty), mask=m)
    else:
        tl.store(S_OUT + off, s, mask=m)


# ============================================================================ full rank: launchers
def _fr_config(B: int, D: int, dtype: torch.dtype, wide: bool = False) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the full-rank GEMM kernels for dots in
    ``dtype``; ``wide``: an operand is loaded as fp32 (x0 or the parameters, under autocast), which
    takes fp32's K tile and stages (their shared memory is sized by the loads, not the dots)."""
    fp32 = dtype == torch.float32 or wide
    bm = max(16, min(128, next_pow2(B)))
    bn = max(16, min(128, next_pow2(D)))
    bk = max(16, min(32 if fp32 else 64, next_pow2(D)))
    warps = 8 if bm * bn >= 128 * 128 else 4
    stages = 3 if fp32 else 4
    return bm, bn, bk, warps, stages


_GROUP_M = 8


#: How the full-rank layers run when D is wider than one column tile (``D > BLOCK_N``, every DESIGN
#: shape): ``"cublas"`` -- the three GEMMs of a layer on cuBLAS (``torch.addmm`` / ``torch.mm``) and
#: its element-wise chains in the Triton kernels around them; ``"triton"`` -- the Triton GEMM kernels
#: with the element-wise work in their epilogues. Read at each call; both save the same ``xs``/``ys``,
#: so a backward never depends on which one its forward took. See the module docstring.
FULL_RANK_GEMM = "cublas"
_BWD_TILE = (32, 128)  # rows x columns of a program of _fr_bwd_eltwise_kernel
# ... and of _fr_residual_kernel: 1024 elements a program, as the 1-D kernel measured before the
# bias moved into it (sm_90, Triton 3.6: 30 registers in bf16, 37-44 with fp32 x0; 32 x 128 took 56 / 128)
_RES_TILE = (8, 128)


def _use_cublas(D: int, dtype: torch.dtype) -> bool:
    if FULL_RANK_GEMM not in ("cublas", "triton"):
        raise ValueError(f"FULL_RANK_GEMM must be 'cublas' or 'triton', got {FULL_RANK_GEMM!r}")
    return FULL_RANK_GEMM == "cublas" and D > _fr_config(1, D, dtype)[1]


def _in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _weight_grad(dw_i: torch.Tensor, dy: torch.Tensor, x_i: torch.Tensor) -> None:
    """``dw_i = dy^T x_i`` on cuBLAS (fp32 accumulation), written straight into ``dw_i`` when it has
    the operands' dtype, else rounded once into it. Call outside autocast."""
    if dw_i.dtype == dy.dtype:
        torch.mm(dy.t(), x_i, out=dw_i)
    else:
        dw_i.copy_(torch.mm(dy.t(), x_i))


def _fr_wide(x0: torch.Tensor, ws: Sequence[torch.Tensor], dt: torch.dtype) -> bool:
    """Whether the Triton GEMMs load an operand wider than their dots (fp32 x0 or parameters with
    16-bit dots): :func:`_fr_config`'s ``wide``."""
    return dt != torch.float32 and torch.float32 in (x0.dtype, ws[0].dtype)


@on_input_device
def _fr_fwd_impl(x0, ws, bs, dt=None):
    x0 = x0.contiguous()
    ws = tuple(w.contiguous() for w in ws)
    bs = _flat_bias(bs)
    B, D = x0.shape
    L = len(ws)
    dev = x0.device
    dt = _dot_dtype(x0, dt)
    out = torch.empty((B, D), device=dev, dtype=_out_dtype(x0, bs, dt))
    running = out.dtype != dt  # x_i kept in the output's wider dtype between layers, as eager keeps it
    xs = torch.empty((L - 1, B, D), device=dev, dtype=dt)
    ys = torch.empty((L, B, D), device=dev, dtype=dt)
    if _use_cublas(D, dt):
        bm, bn = _RES_TILE
        grid = (cdiv(B, bm), cdiv(D, bn))
        with torch.autocast(dev.type, enabled=False):
            for i in range(L):
                last = i == L - 1
                torch.mm(_in_dtype(x0, dt) if i == 0 else xs[i - 1], _in_dtype(ws[i], dt).t(), out=ys[i])
                dst = out if last or running else xs[i]
                xi = x0 if i == 0 else (out if running else xs[i - 1])
                copy = xs[i] if running and not last else dst
                _fr_residual_kernel[grid](dst, copy, x0, ys[i], bs[i], xi, B, D, HAS_COPY=copy is not dst,
                                          BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
        return out, xs, ys
    bm, bn, bk, warps, stages = _fr_config(B, D, dt, _fr_wide(x0, ws, dt))
    grid = (cdiv(B, bm) * cdiv(D, bn),)
    meta = dict(TOTAL=L, RUNNING=running, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=_GROUP_M,
                PREC=dot_precision(dt), DT=tl_dtype(dt), num_warps=warps, num_stages=stages)
    xs_arg = xs if L > 1 else ys  # never hand Triton an empty tensor (unused at L = 1)
    if D <= bn:  # one column tile: every program owns its rows, all layers in one launch
        _fr_fwd_kernel[grid](out, xs_arg, ys, x0, ws, bs, B, D, FIRST=0, NUM_LAYERS=L, **meta)
    else:
        for i in range(L):
            _fr_fwd_kernel[grid](out, xs_arg, ys, x0, ws, bs, B, D, FIRST=i, NUM_LAYERS=1, **meta)
    return out, xs, ys


def _fr_bwd_cublas(g, x0, ws, bs, xs, ys, dt, weights, biases):
    """Backward with cuBLAS GEMMs, from the top layer down: ``_fr_bwd_eltwise_kernel`` forms
    ``dy_i`` (and ``db_i`` partials, and the dx0 running sum), then ``dW_i = dy_i^T x_i`` and
    ``dy_i W_i``. With the gradient in the GEMMs' dtype, ``g_i = g_{i+1} + dy_i W_i`` is one
    ``addmm`` (at i = 0 it yields dx0 directly); with a wider gradient (an fp32 output under
    autocast) ``g`` is carried in fp32, as eager carries it: ``torch.mm`` gives ``dy_i W_i`` in the
    GEMMs' dtype and the next element-wise kernel adds it (at i = 0, ``torch.add`` gives dx0)."""
    B, D = x0.shape
    L = len(ws)
    dev, pdt = x0.device, ws[0].dtype
    ct = promote_dtypes(g.dtype, dt)  # the carried gradient's dtype
    fused = ct == dt
    bm, bn = _BWD_TILE
    n_m = cdiv(B, bm)
    grid = (n_m, cdiv(D, bn))
    dx0 = torch.empty((B, D), device=dev, dtype=x0.dtype)
    dw, db = _fr_grad_buffers(L, D, dev, pdt, weights, biases)
    dbp = torch.empty((n_m, L, D), device=dev, dtype=torch.float32)
    dy = torch.empty((B, D), device=dev, dtype=dt)
    s_buf = [torch.empty((B, D), device=dev, dtype=torch.float32) for _ in range(min(L - 1, 2))]
    c = torch.empty((B, D), device=dev, dtype=ct)
    if fused:
        g_buf = [torch.empty((B, D), device=dev, dtype=dt) for _ in range(min(L - 1, 2))]
    else:
        mm = torch.empty((B, D), device=dev, dtype=dt)
        g_carry = torch.empty((B, D), device=dev, dtype=ct) if L > 2 else c
    g_in, s_in, has_m = g, None, False
    with torch.autocast(dev.type, enabled=False):
        for i in reversed(range(L)):
            last = i == 0
            s_out = s_buf[i % len(s_buf)] if not last else c  # unused at the last layer (LAST stores C)
            g_out = g_carry if has_m and not last else c  # written only with HAS_M and not LAST
            _fr_bwd_eltwise_kernel[grid](
                dy, s_out, c, g_out, dbp, g_in, mm if has_m else g_in, x0, ys[i], bs[i],
                s_in if s_in is not None else g_in, B, D, i * D, L * D,
                HAS_S=s_in is not None, HAS_M=has_m, LAST=last, BLOCK_M=bm, BLOCK_N=bn, num_warps=4,
            )
            if weights[i]:
                _weight_grad(dw[i], dy, _in_dtype(x0, dt) if last else xs[i - 1])
            w = _in_dtype(ws[i], dt)
            if fused:
                if last:
                    torch.addmm(c, dy, w, out=dx0)
                else:
                    g_out = g_buf[i % len(g_buf)]
                    torch.addmm(g_in, dy, w, out=g_out)
                    g_in, s_in = g_out, s_out
            else:
                torch.mm(dy, w, out=mm)
                if last:
                    torch.add(c, mm, out=dx0)
                else:
                    g_in, s_in, has_m = (g_out if has_m else g_in), s_out, True
    if db is not None:
        sum_partials(dbp.view(n_m, L * D), (db,))
    return dx0, dw, db


def _fr_grad_buffers(L, D, dev, pdt, weights, biases):
    """``(dW [L, D, D], db [L, D])`` to fill, each None where no layer needs it."""
    dw = torch.empty((L, D, D), device=dev, dtype=pdt) if any(weights) else None
    db = torch.empty((L, D), device=dev, dtype=pdt) if biases else None
    return dw, db


@on_input_device
def _fr_bwd_impl(g, x0, ws, bs, xs, ys, dt=None, weights: Optional[Sequence[bool]] = None, biases: bool = True):
    """``(dx0, dW, db)``. ``weights`` (one flag per layer; None: all) and ``biases`` say which
    parameter gradients to compute (the eager path's frozen layers): a layer without its flag skips
    its ``dW_i`` GEMM (its slice of dW is left unwritten), and dW or db is None when none is needed."""
    g = g.contiguous()
    x0 = x0.contiguous()
    ws = tuple(w.contiguous() for w in ws)
    bs = _flat_bias(bs)
    B, D = x0.shape
    L = len(ws)
    weights = (True,) * L if weights is None else tuple(weights)
    dev, pdt = x0.device, ws[0].dtype
    dt = _dot_dtype(x0, dt)
    if _use_cublas(D, dt):
        return _fr_bwd_cublas(g, x0, ws, bs, xs, ys, dt, weights, biases)
    bm, bn, bk, warps, stages = _fr_config(B, D, dt, _fr_wide(x0, ws, dt))
    n_m = cdiv(B, bm)
    grid = (n_m * cdiv(D, bn),)
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=_GROUP_M, PREC=dot_precision(dt), DT=tl_dtype(dt),
                num_warps=warps, num_stages=stages)
    ct = promote_dtypes(g.dtype, dt)  # the carried gradient's dtype (fp32 for an fp32 output)
    dx0 = torch.empty((B, D), device=dev, dtype=x0.dtype)
    dw, db = _fr_grad_buffers(L, D, dev, pdt, weights, biases)
    dbp = torch.empty((n_m, L, D), device=dev, dtype=torch.float32)
    dy = [torch.empty((B, D), device=dev, dtype=dt) for _ in range(min(L, 2))]
    carry_g = [torch.empty((B, D), device=dev, dtype=ct) for _ in range(min(L - 1, 2))]
    # the running dx0 sum stays fp32 between layers (as the cuBLAS path's s_buf does)
    carry_s = [torch.empty((B, D), device=dev, dtype=torch.float32) for _ in range(min(L - 2, 2))] if L >= 3 else []
    g_in, s_in = g, x0  # s_in unused at the top layer
    for i in reversed(range(L)):
        top, last, next_last = i == L - 1, i == 0, i == 1
        dy_i = dy[i % 2]
        dy_out = dy[(i - 1) % 2] if not last else dy_i
        g_out = carry_g[i % len(carry_g)] if not last else g
        s_out = carry_s[i % len(carry_s)] if (not last and not next_last) else g
        prev = i - 1 if not last else i
        _fr_bwd_kernel[grid](
            dy_out, g_out, s_out, dx0, dbp, dy_i,
            dy_i, g_in, s_in, x0, ws[i], ys[i], ys[prev], bs[i], bs[prev],
            B, D, max(i - 1, 0) * D, (L - 1) * D, L * D,
            TOP=top, LAST=last, NEXT_LAST=next_last, **meta,
        )
        if weights[i]:
            with torch.autocast(dev.type, enabled=False):
                _weight_grad(dw[i], dy_i, _in_dtype(x0, dt) if i == 0 else xs[i - 1])
        g_in, s_in = g_out, s_out
    if db is not None:
        sum_partials(dbp.view(n_m, L * D), (db,))
    return dx0, dw, db


# ============================================================================ torch.library
@torch.library.custom_op("interformer::low_rank_cross_net_fwd", mutates_args=())
def low_rank_cross_net_fwd(
    x0: torch.Tensor, w_kernels: List[torch.Tensor], v_kernels: List[torch.Tensor], biases: List[torch.Tensor],
    compute_dtype: Optional[torch.dtype],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(out [B, D], P [L, B, r] fp32)``; P (``p_i = x_i V_i^T``) is saved for backward.
    ``compute_dtype``: the dots' operand dtype (None: x0's; the autocast dtype under autocast)."""
    return _lr_fwd_impl(x0, w_kernels, v_kernels, biases, compute_dtype)


@low_rank_cross_net_fwd.register_fake
def _lr_fwd_fake(x0, w_kernels, v_kernels, biases, compute_dtype):
    B, D = x0.shape
    return (x0.new_empty((B, D), dtype=_out_dtype(x0, biases, _dot_dtype(x0, compute_dtype))),
            x0.new_empty((len(w_kernels), B, w_kernels[0].shape[1]), dtype=torch.float32))


@torch.library.custom_op("interformer::low_rank_cross_net_bwd", mutates_args=())
def low_rank_cross_net_bwd(
    grad_out: torch.Tensor, x0: torch.Tensor, w_kernels: List[torch.Tensor], v_kernels: List[torch.Tensor],
    biases: List[torch.Tensor], p: torch.Tensor, compute_dtype: Optional[torch.dtype],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dx0 [B, D], dU [L, D, r], dV [L, r, D], db [L, D])``, dx0 in x0's dtype, weights
    in their dtype; ``compute_dtype`` the forward's."""
    return _lr_bwd_impl(grad_out, x0, w_kernels, v_kernels, biases, p, compute_dtype)


@low_rank_cross_net_bwd.register_fake
def _lr_bwd_fake(grad_out, x0, w_kernels, v_kernels, biases, p, compute_dtype):
    B, D = x0.shape
    L, R = len(w_kernels), w_kernels[0].shape[1]
    pdt = w_kernels[0].dtype
    return (x0.new_empty((B, D)), x0.new_empty((L, D, R), dtype=pdt), x0.new_empty((L, R, D), dtype=pdt),
            x0.new_empty((L, D), dtype=pdt))


def _lr_setup_context(ctx, inputs, output):
    x0, ws, vs, bs, dt = inputs
    _, p = output
    ctx.num_layers = len(ws)
    ctx.compute_dtype = dt
    ctx.bias_shapes = [b.shape for b in bs]
    ctx.save_for_backward(x0, p, *ws, *vs, *bs)


def _lr_grads(ctx, grad_out, bwd):
    """``(dx0, [dU_i], [dV_i], [db_i])`` from ``bwd`` (the backward op when traced, the launcher in
    eager); the per-layer gradients are views of the stacked ones, db in the biases' shapes (all
    None where ``bwd`` computed no parameter gradient)."""
    x0, p, *params = ctx.saved_tensors
    L = ctx.num_layers
    if grad_out is None:
        return None, [None] * L, [None] * L, [None] * L
    ws, vs, bs = params[:L], params[L:2 * L], params[2 * L:]
    dx0, du, dv, db = bwd(grad_out, x0, ws, vs, bs, p, ctx.compute_dtype)
    if du is None:
        return dx0, [None] * L, [None] * L, [None] * L
    return (dx0, list(du.unbind(0)), list(dv.unbind(0)),
            [d.view(s) for d, s in zip(db.unbind(0), ctx.bias_shapes)])


def _lr_backward(ctx, grad_out, grad_p):
    return (*_lr_grads(ctx, grad_out, torch.ops.interformer.low_rank_cross_net_bwd), None)  # compute_dtype: None


low_rank_cross_net_fwd.register_autograd(_lr_backward, setup_context=_lr_setup_context)


def _lr_lean_forward(ctx, x0, num_layers, compute_dtype, *params):
    """``(out, P)`` of the launcher; the parameters come flat (``*U, *V, *b``) so that autograd tracks them."""
    L = num_layers
    ws, vs, bs = params[:L], params[L:2 * L], params[2 * L:]
    output = _lr_fwd_impl(x0, ws, vs, bs, compute_dtype)
    _lr_setup_context(ctx, (x0, ws, vs, bs, compute_dtype), output)
    return output


def _lr_lean_backward(ctx, grad_out, grad_p):
    need = ctx.needs_input_grad[3:]
    dx0, du, dv, db = _lr_grads(ctx, grad_out, functools.partial(_lr_bwd_impl, weights=any(need)))
    return (dx0, None, None, *_needed((*du, *dv, *db), need))


def _reference_grads(op_name: str, grad_out: torch.Tensor, x0: torch.Tensor, params: Sequence[torch.Tensor],
                     num_layers: int, dt: Optional[torch.dtype]):
    """The gradients of ``x0`` and the flat parameters from the eager reference run again on the
    saved inputs (under the forward's autocast, dtype ``dt``, when ``dt`` differs from an input's
    dtype: eager's roundings, not x0 or the biases cast) and differentiated with ``grad_out``.

    For a batched ``grad_out`` (``torch.autograd.grad(..., is_grads_batched=True)``, see
    ``lean_function``): the launchers cannot read it, and the dispatcher's batching fallback takes
    no op with tensor-list arguments such as the backward ops here, while the reference's aten ops
    all have batching rules. Same math; not bitwise the kernels' (a vectorised Jacobian only). Under
    ``torch.func.vmap`` over the backward (``grad_out`` a functorch wrapper), where
    ``requires_grad_`` is refused, the same through ``torch.func.vjp``."""
    from interformer import reference

    L = num_layers

    dt = _dot_dtype(x0, dt)

    # the forward's autocast again (dt differs from x0's or the parameters' dtype only under autocast):
    # eager rounds the GEMM operands only, x0, the biases, the running x and the carried gradient stay
    def ref(x, *flat):
        return getattr(reference, op_name)(x, *(flat[i * L:(i + 1) * L] for i in range(len(flat) // L)))

    under = dt != x0.dtype or any(t.dtype != dt for t in params)
    with torch.autocast(x0.device.type, dtype=dt, enabled=under):
        if _functorch_wrapped(grad_out):
            return torch.func.vjp(ref, x0.detach(), *(t.detach() for t in params))[1](grad_out)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (x0, *params)]
            return torch.autograd.grad(ref(*leaves), leaves, grad_out)


def _batched_backward(op_name: str, n_activations: int):
    """The lean Function's backward for batched gradients (``lean_function``) of ``op_name``, whose
    ``ctx.saved_tensors`` are x0, ``n_activations`` saved activations, then the flat parameters:
    :func:`_reference_grads`, in the forward's argument order (x0, the layer count's and the compute
    dtype's None, the parameters)."""

    def backward(ctx, grad_out, *unused_grads):
        x0, *rest = ctx.saved_tensors
        params = rest[n_activations:]
        if grad_out is None:
            return (None, None, None, *[None] * len(params))
        dx0, *dparams = _reference_grads(op_name, grad_out, x0, params, ctx.num_layers, ctx.compute_dtype)
        return (dx0, None, None, *dparams)

    return backward


# eager entry point (see interformer.kernels._dispatch): same launchers, no custom-op dispatch
_LowRankCrossNet = lean_function("_LowRankCrossNet", _lr_lean_forward, _lr_lean_backward,
                                 _batched_backward("low_rank_cross_net", 1))


@torch.library.custom_op("interformer::cross_net_fwd", mutates_args=())
def cross_net_fwd(
    x0: torch.Tensor, kernels: List[torch.Tensor], biases: List[torch.Tensor],
    compute_dtype: Optional[torch.dtype],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: ``(out [B, D], xs [L-1, B, D], ys [L, B, D])``; ``xs`` (x_1 .. x_{L-1}) and ``ys``
    (``lin_i = x_i W_i^T``, without the bias), both in ``compute_dtype`` (the GEMMs' operand dtype;
    None: x0's), are saved for backward."""
    return _fr_fwd_impl(x0, kernels, biases, compute_dtype)


@cross_net_fwd.register_fake
def _fr_fwd_fake(x0, kernels, biases, compute_dtype):
    B, D = x0.shape
    L = len(kernels)
    dt = _dot_dtype(x0, compute_dtype)
    return (x0.new_empty((B, D), dtype=_out_dtype(x0, biases, dt)), x0.new_empty((L - 1, B, D), dtype=dt),
            x0.new_empty((L, B, D), dtype=dt))


@torch.library.custom_op("interformer::cross_net_bwd", mutates_args=())
def cross_net_bwd(
    grad_out: torch.Tensor, x0: torch.Tensor, kernels: List[torch.Tensor], biases: List[torch.Tensor],
    xs: torch.Tensor, ys: torch.Tensor, compute_dtype: Optional[torch.dtype],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dx0 [B, D], dW [L, D, D], db [L, D])``, dx0 in x0's dtype, weights in their
    dtype; ``compute_dtype`` the forward's."""
    return _fr_bwd_impl(grad_out, x0, kernels, biases, xs, ys, compute_dtype)


@cross_net_bwd.register_fake
def _fr_bwd_fake(grad_out, x0, kernels, biases, xs, ys, compute_dtype):
    B, D = x0.shape
    L = len(kernels)
    pdt = kernels[0].dtype
    return x0.new_empty((B, D)), x0.new_empty((L, D, D), dtype=pdt), x0.new_empty((L, D), dtype=pdt)


def _fr_setup_context(ctx, inputs, output):
    x0, ws, bs, dt = inputs
    _, xs, ys = output
    ctx.num_layers = len(ws)
    ctx.compute_dtype = dt
    ctx.bias_shapes = [b.shape for b in bs]
    ctx.save_for_backward(x0, xs, ys, *ws, *bs)


def _fr_grads(ctx, grad_out, bwd):
    """``(dx0, [dW_i], [db_i])`` from ``bwd`` (the backward op when traced, the launcher in eager;
    None for a stacked gradient it did not compute)."""
    x0, xs, ys, *params = ctx.saved_tensors
    L = ctx.num_layers
    if grad_out is None:
        return None, [None] * L, [None] * L
    ws, bs = params[:L], params[L:]
    dx0, dw, db = bwd(grad_out, x0, ws, bs, xs, ys, ctx.compute_dtype)
    return (dx0, [None] * L if dw is None else list(dw.unbind(0)),
            [None] * L if db is None else [d.view(s) for d, s in zip(db.unbind(0), ctx.bias_shapes)])


def _fr_backward(ctx, grad_out, grad_xs, grad_ys):
    return (*_fr_grads(ctx, grad_out, torch.ops.interformer.cross_net_bwd), None)  # compute_dtype: None


cross_net_fwd.register_autograd(_fr_backward, setup_context=_fr_setup_context)


def _fr_lean_forward(ctx, x0, num_layers, compute_dtype, *params):
    """``(out, xs, ys)`` of the launcher; the parameters come flat (``*W, *b``)."""
    ws, bs = params[:num_layers], params[num_layers:]
    output = _fr_fwd_impl(x0, ws, bs, compute_dtype)
    _fr_setup_context(ctx, (x0, ws, bs, compute_dtype), output)
    return output


def _fr_lean_backward(ctx, grad_out, grad_xs, grad_ys):
    L = ctx.num_layers
    need = ctx.needs_input_grad[3:]
    bwd = functools.partial(_fr_bwd_impl, weights=need[:L], biases=any(need[L:]))
    dx0, dw, db = _fr_grads(ctx, grad_out, bwd)
    return (dx0, None, None, *_needed((*dw, *db), need))


_CrossNet = lean_function("_CrossNet", _fr_lean_forward, _fr_lean_backward, _batched_backward("cross_net", 2))


# ============================================================================ public functions
def _check_common(op: str, x0, named_lists) -> Tuple[int, int]:
    if not isinstance(x0, torch.Tensor) or x0.dim() != 2:
        raise ValueError(f"{op}: x0 must be a 2-D tensor [B, D], got {describe_shape(x0)}")
    if x0.dtype not in _DTYPES:
        raise ValueError(f"{op}: x0 must be one of {_DTYPES}, got {x0.dtype}")
    lens = {name: len(lst) for name, lst in named_lists}
    if len(set(lens.values())) != 1:
        raise ValueError(f"{op}: parameter lists must have one length (one entry per layer), got {lens}")
    B, D = x0.shape
    params = [t for _, lst in named_lists for t in lst]
    for name, lst in named_lists:
        for i, t in enumerate(lst):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{op}: {name}[{i}] must be a tensor, got {type(t).__name__}")
            if t.dtype not in _DTYPES:
                raise ValueError(f"{op}: {name}[{i}] must be one of {_DTYPES}, got {t.dtype}")
    for i, b in enumerate(dict(named_lists)["biases"]):
        if b.shape not in ((D, 1), (D,)):
            raise ValueError(f"{op}: biases[{i}] {describe_shape(b)} must be [D={D}, 1] (or [D])")
    devices = {t.device for t in [x0, *params]}
    if len(devices) != 1:
        raise ValueError(f"{op}: x0 and all parameters must be on one device, got {sorted(map(str, devices))}")
    return B, D


def _compute_dtype(op: str, x0: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.dtype:
    """The dots' operand dtype: the autocast dtype under autocast (x0 and the parameters may then
    keep dtypes of their own, the parameters all one), else x0's, which every tensor must share."""
    pdts = {t.dtype for t in params}
    cast = autocast_dtype(x0.device.type)
    if cast is not None:
        if len(pdts) > 1:
            raise ValueError(f"{op}: all parameters must share one dtype, got {sorted(map(str, pdts))}")
        return cast
    if pdts - {x0.dtype}:
        raise ValueError(f"{op}: x0 ({x0.dtype}) and all parameters must share one dtype outside autocast, "
                         f"got parameters in {sorted(map(str, pdts))}")
    return x0.dtype


def _eager(op_name: str, x0: torch.Tensor, *lists):
    """The eager reference on the caller's x0 and parameters, autocast as it is: eager's math and
    dtypes (the fallback for shapes the kernels do not take)."""
    from interformer import reference

    return getattr(reference, op_name)(x0, *lists)


def low_rank_cross_net(
    x0: torch.Tensor,
    w_kernels: Sequence[torch.Tensor],
    v_kernels: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Fused low-rank cross layers ``x_{i+1} = x0 * (U_i (V_i x_i) + b_i) + x_i``; same contract as
    :func:`interformer.reference.low_rank_cross_net` (see the module docstring for the design).

    x0 ``[B, D]``; w_kernels (U) ``[D, r]`` each, v_kernels (V) ``[r, D]`` each, biases ``[D]`` (or ``[D, 1]``) each.
    """
    ws, vs, bs = list(w_kernels), list(v_kernels), list(biases)
    if isinstance(x0, torch.fx.Proxy):  # torch.fx.symbolic_trace: record this call (_dispatch.fx_call)
        return fx_call(low_rank_cross_net, x0, ws, vs, bs)
    op = "low_rank_cross_net"
    B, D = _check_common(op, x0, (("w_kernels", ws), ("v_kernels", vs), ("biases", bs)))
    if not ws:
        return x0
    R = ws[0].shape[-1] if ws[0].dim() == 2 else -1
    for i, (w, v) in enumerate(zip(ws, vs)):
        if w.shape != (D, R) or R < 1:
            raise ValueError(f"{op}: w_kernels[{i}] {describe_shape(w)} must be [D={D}, r] with one r >= 1 for all layers")
        if v.shape != (R, D):
            raise ValueError(f"{op}: v_kernels[{i}] {describe_shape(v)} must be [r={R}, D={D}]")
    dt = _compute_dtype(op, x0, ws + vs + bs)
    # shapes the kernels do not take, or a torch.func transform, ONNX export (_dispatch.reference_only): the reference
    if B == 0 or D == 0 or _lr_plan_for(x0, ws, bs, len(ws), dt) is None or reference_only(x0):
        return _eager(op, x0, ws, vs, bs)
    tensors = [x0, *ws, *vs, *bs]
    if tracing(tensors):
        return torch.ops.interformer.low_rank_cross_net_fwd(x0, ws, vs, bs, dt)[0]
    if needs_grad(tensors):
        return _LowRankCrossNet.apply(x0, len(ws), dt, *ws, *vs, *bs)[0]
    return _lr_fwd_impl(x0, ws, vs, bs, dt)[0]


def cross_net(x0: torch.Tensor, kernels: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Fused full-rank cross layers ``x_{i+1} = x0 * (W_i x_i + b_i) + x_i``; same contract as
    :func:`interformer.reference.cross_net` (see the module docstring for the design).

    x0 ``[B, D]``; kernels ``[D, D]`` each (``x_i @ W^T``); biases ``[D, 1]`` (or ``[D]``) each.
    """
    ws, bs = list(kernels), list(biases)
    if isinstance(x0, torch.fx.Proxy):  # torch.fx.symbolic_trace: record this call (_dispatch.fx_call)
        return fx_call(cross_net, x0, ws, bs)
    op = "cross_net"
    B, D = _check_common(op, x0, (("kernels", ws), ("biases", bs)))
    if not ws:
        return x0
    for i, w in enumerate(ws):
        if w.shape != (D, D):
            raise ValueError(f"{op}: kernels[{i}] {describe_shape(w)} must be [D={D}, D={D}]")
    dt = _compute_dtype(op, x0, ws + bs)
    if B == 0 or reference_only(x0):  # as in low_rank_cross_net
        return _eager(op, x0, ws, bs)
    tensors = [x0, *ws, *bs]
    if tracing(tensors):
        return torch.ops.interformer.cross_net_fwd(x0, ws, bs, dt)[0]
    if needs_grad(tensors):
        return _CrossNet.apply(x0, len(ws), dt, *ws, *bs)[0]
    return _fr_fwd_impl(x0, ws, bs, dt)[0]
