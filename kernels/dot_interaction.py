"""DOT interaction (pairwise inner products of the tokens): fused Triton forward and backward.

Public function (same name and signature as :func:`interformer.reference.dot_interaction`)::

    dot_interaction(z)   # z [B, N, d] -> [B, N(N-1)/2], strict upper triangle of Z Z^T

The output is ordered as ``torch.triu_indices(N, N, 1)`` (row-major, i < j): pair ``(i, j)`` sits at
``i (N - 1) - i (i - 1) / 2 + (j - i - 1)``. A new contiguous tensor in z's dtype. ``N = 1`` (no pair)
returns ``[B, 0]`` and a zero gradient; ``d = 0`` gives zeros through the eager reference.

Forward (``_dot_fwd_kernel``)
-----------------------------
The tokens are split in blocks of ``BLOCK_N`` rows; one program per (sample, block pair ``bi <= bj``)
computes ``Z[bi] Z[bj]^T`` (``tl.dot`` over d in chunks of ``BLOCK_D``, fp32 accumulation) and stores
only the entries with ``i < j`` straight to their packed positions. The ``N x N`` matrix is never
written to memory; z is read once (per block pair) and the output written once. At the DESIGN
shapes N = 12, 28 fit one block (one program per sample, the tile is used for both operands: a
single load); N = 72 takes blocks of 64 (3 block pairs per sample).

Backward (``_dot_bwd_kernel``)
------------------------------
``dz = (G + G^T) z`` with ``G`` the upper-triangular scatter of the output gradient. One program per
(sample, row block bi) gathers the symmetric block ``(G + G^T)[bi, bj]`` directly from the packed
gradient (entry ``(i, j)``, ``i != j``, reads pair ``(min, max)``; the diagonal is zero; the two
triangles never overlap, so the sum is exact in any dtype), multiplies it with ``z[bj]`` in
registers and accumulates over ``bj``. Neither G nor ``G + G^T`` is ever written to memory; the
packed gradient is read once per row block, z once per row block, dz written once.

Block sizes (fixed by the shape, no autotune): ``BLOCK_N = min(MAX_BLOCK_N = 64, max(16,
next_pow2(N)))``, ``BLOCK_D = min(128, max(16, next_pow2(d)))``, 4 warps (8 for 64 x 128 tiles). Each
program handles ``clamp(B // 512, 1, 8)`` samples in a loop (4 at B = 2048), so the per-sample tiles
(3.5 KB at taobao) do not each pay a program's start-up; when one block and one d chunk cover a
sample, that loop is the innermost one and Triton's pipeliner prefetches the next sample's tile.
z and the gradient are read through their strides (non-contiguous views and stride-0 expanded
gradients need no copy). At the DESIGN shapes every kernel compiles for sm_90 without spills
(checked with an ahead-of-time ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``).

Dtypes: fp32, fp16, bf16; under ``torch.autocast`` on z's device type z is cast to the autocast
dtype first (as eager's ``bmm`` would). Dots take the input dtype with fp32 accumulation
(``tf32x3`` for fp32 on GPU; exact under ``TRITON_INTERPRET=1``). Nothing goes to cuBLAS.

``torch.library``: ``interformer::dot_interaction_fwd`` and ``interformer::dot_interaction_bwd`` are
``custom_op`` s with fake implementations; the forward's autograd formula calls the backward op, so
``torch.compile(fullgraph=True)`` traces both. Outside tracing, :func:`dot_interaction` calls the same
launchers through a plain ``autograd.Function`` (``_DotInteraction``, the same backward formula with
the launcher in place of the backward op), or the forward launcher alone when z needs no gradient:
no custom-op dispatch overhead (see :mod:`interformer.kernels._dispatch`), bitwise the same results.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._common import KERNEL_DTYPES, cdiv, dot_precision, int32_block, next_pow2, on_input_device
from ._dispatch import (autocast_dtype, fx_call, inline_when_compiled, launch, lean_function, needs_grad,
                        reference_only, saving_forward, tracing)

__all__ = ["dot_interaction"]

_DTYPES = KERNEL_DTYPES
#: Largest token block of one program (tests lower it to exercise the multi-block path).
MAX_BLOCK_N = 64
#: Samples per program = clamp(B // TARGET_PROGRAMS, 1, 8): a few samples per program at large B
#: so tiny per-sample tiles do not each pay a program's start-up (tests lower it).
TARGET_PROGRAMS = 512


def _wide_pairs(N: int) -> bool:
    """Whether :func:`_pair_index` needs int64 at N tokens: its products ``i (N - 1)`` and ``i (i -
    1)`` stay below N**2, which passes int32's 2**31 from N = 46341 on, while the index itself
    (below N (N - 1) / 2) would still fit up to N = 65536 (a review found the wrap at N = 46344:
    pair offsets 2**31 too small, out of bounds on a GPU). The kernels take token indices in int32
    below that, where the DESIGN shapes (N <= 72) are."""
    return N * N >= 2**31


@triton.jit
def _pair_index(i, j, N, WIDE: tl.constexpr):
    """Packed position of pair ``(i, j)``, ``i < j``, in ``triu_indices(N, N, 1)`` order; in int64 when
    ``WIDE`` (:func:`_wide_pairs`)."""
    if WIDE:
        i = i.to(tl.int64)
        j = j.to(tl.int64)
    return i * (N - 1) - (i * (i - 1)) // 2 + (j - i - 1)


@triton.jit
def _gram_chunk(acc, zb, ri, rj, n_b, dd, DM, stride_zn, stride_zd, SINGLE: tl.constexpr, PREC: tl.constexpr):
    """``acc += Z[ri, dd] Z[rj, dd]^T`` for one sample (rows past ``n_b`` read as zero)."""
    d_ok = dd < DM
    zi = tl.load(zb + ri[:, None] * stride_zn + dd[None, :] * stride_zd,
                 mask=(ri < n_b)[:, None] & d_ok[None, :], other=0.0)
    if SINGLE:
        zj = zi
    else:
        zj = tl.load(zb + rj[:, None] * stride_zn + dd[None, :] * stride_zd,
                     mask=(rj < n_b)[:, None] & d_ok[None, :], other=0.0)
    return tl.dot(zi, tl.trans(zj), acc, input_precision=PREC)


@triton.jit
def _dot_fwd_kernel(
    OUT, Z,
    B, N, DM, M,
    stride_zb, stride_zn, stride_zd,
    SAMPLES: tl.constexpr, SINGLE: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr,
):
    bi = tl.program_id(1)
    bj = tl.program_id(2)
    if bi <= bj:
        ri = bi * BLOCK_N + tl.arange(0, BLOCK_N)
        rj = bj * BLOCK_N + tl.arange(0, BLOCK_N)
        i = ri[:, None]
        j = rj[None, :]
        keep = i < j
        idx = tl.where(keep & (j < N), _pair_index(i, j, N, WIDE), 0)
        for s in range(0, SAMPLES):
            b = tl.program_id(0).to(tl.int64) * SAMPLES + s
            n_b = tl.where(b < B, N, 0)  # rows of this sample (none past the batch)
            zb = Z + b * stride_zb
            acc = tl.zeros([BLOCK_N, BLOCK_N], dtype=tl.float32)
            if ONE_CHUNK:  # no inner loop, so the sample loop is the one that gets pipelined
                acc = _gram_chunk(acc, zb, ri, rj, n_b, tl.arange(0, BLOCK_D), DM, stride_zn, stride_zd,
                                  SINGLE, PREC)
            else:
                for d0 in range(0, DM, BLOCK_D):
                    acc = _gram_chunk(acc, zb, ri, rj, n_b, d0 + tl.arange(0, BLOCK_D), DM, stride_zn, stride_zd,
                                      SINGLE, PREC)
            tl.store(OUT + b * M + idx, acc.to(OUT.dtype.element_ty), mask=keep & (j < n_b))


@triton.jit
def _sym_grad_times_z(acc, gb, zb, ri, bj, n_b, N, dd, DM, stride_gm, stride_zn, stride_zd,
                      BLOCK_N: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr):
    """``acc += (G + G^T)[ri, rj] Z[rj, dd]`` for token block bj, G gathered from the packed gradient."""
    rj = bj * BLOCK_N + tl.arange(0, BLOCK_N)
    i = ri[:, None]
    j = rj[None, :]
    keep = (i != j) & (i < n_b) & (j < n_b)
    idx = tl.where(keep, _pair_index(tl.minimum(i, j), tl.maximum(i, j), N, WIDE), 0)
    gs = tl.load(gb + idx * stride_gm, mask=keep, other=0.0)
    zj = tl.load(zb + rj[:, None] * stride_zn + dd[None, :] * stride_zd,
                 mask=(rj < n_b)[:, None] & (dd < DM)[None, :], other=0.0)
    return tl.dot(gs.to(DT), zj, acc, input_precision=PREC)


@triton.jit
def _dot_bwd_kernel(
    DZ, G, Z,
    B, N, DM, M,
    stride_gb, stride_gm,
    stride_zb, stride_zn, stride_zd,
    NUM_BLOCKS, SAMPLES: tl.constexpr, ONE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr,
):
    DT: tl.constexpr = Z.dtype.element_ty
    bi = tl.program_id(1)
    ri = bi * BLOCK_N + tl.arange(0, BLOCK_N)
    for s in range(0, SAMPLES):
        b = tl.program_id(0).to(tl.int64) * SAMPLES + s
        n_b = tl.where(b < B, N, 0)  # rows of this sample (none past the batch)
        zb = Z + b * stride_zb
        gb = G + b * stride_gb
        if ONE_TILE:  # one token block, one d chunk: no inner loop, the sample loop gets pipelined
            dd = tl.arange(0, BLOCK_D)
            acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            acc = _sym_grad_times_z(acc, gb, zb, ri, 0, n_b, N, dd, DM, stride_gm, stride_zn, stride_zd,
                                    BLOCK_N, DT, PREC, WIDE)
            tl.store(DZ + (b * N + ri[:, None]) * DM + dd[None, :], acc.to(DZ.dtype.element_ty),
                     mask=(ri < n_b)[:, None] & (dd < DM)[None, :])
        else:
            for d0 in range(0, DM, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
                for bj in range(0, NUM_BLOCKS):
                    acc = _sym_grad_times_z(acc, gb, zb, ri, bj, n_b, N, dd, DM, stride_gm, stride_zn, stride_zd,
                                            BLOCK_N, DT, PREC, WIDE)
                tl.store(DZ + (b * N + ri[:, None]) * DM + dd[None, :], acc.to(DZ.dtype.element_ty),
                         mask=(ri < n_b)[:, None] & (dd < DM)[None, :])


# ============================================================================ launchers
def _config(B: int, N: int, d: int) -> Tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_D, number of token blocks, samples per program, num_warps)."""
    bn = min(MAX_BLOCK_N, max(16, next_pow2(N)))
    bd = min(128, max(16, next_pow2(d)))
    samples = max(1, min(8, B // TARGET_PROGRAMS))
    warps = 8 if bn * bd >= 64 * 128 else 4
    return bn, bd, cdiv(N, bn), samples, warps


@on_input_device
def _fwd_impl(z: torch.Tensor) -> torch.Tensor:
    B, N, d = z.shape
    z = int32_block(z, 1)  # a sample's offset is int64, the offsets inside it int32
    M = N * (N - 1) // 2
    out = torch.empty((B, M), device=z.device, dtype=z.dtype)
    if B == 0 or M == 0:
        return out
    bn, bd, nb, spp, warps = _config(B, N, d)
    launch(_dot_fwd_kernel)[(cdiv(B, spp), nb, nb)](
        out, z, B, N, d, M, *z.stride(),
        SAMPLES=spp, SINGLE=nb == 1, ONE_CHUNK=d <= bd, BLOCK_N=bn, BLOCK_D=bd, PREC=dot_precision(z.dtype),
        WIDE=_wide_pairs(N), num_warps=warps,
    )
    return out


@on_input_device
def _bwd_impl(grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    B, N, d = z.shape
    M = N * (N - 1) // 2
    if B == 0 or M == 0:
        return torch.zeros((B, N, d), device=z.device, dtype=z.dtype)
    dz = torch.empty((B, N, d), device=z.device, dtype=z.dtype)
    grad, z = int32_block(grad, 1), int32_block(z, 1)  # a sample's offset is int64, the offsets inside it int32
    bn, bd, nb, spp, warps = _config(B, N, d)
    launch(_dot_bwd_kernel)[(cdiv(B, spp), nb)](
        dz, grad, z, B, N, d, M, *grad.stride(), *z.stride(), nb,
        SAMPLES=spp, ONE_TILE=nb == 1 and d <= bd, BLOCK_N=bn, BLOCK_D=bd, PREC=dot_precision(z.dtype),
        WIDE=_wide_pairs(N), num_warps=warps,
    )
    return dz


@torch.library.custom_op("interformer::dot_interaction_fwd", mutates_args=())
def dot_interaction_fwd(z: torch.Tensor) -> torch.Tensor:
    """Forward: ``[B, N(N-1)/2]`` in z's dtype."""
    return _fwd_impl(z)


@dot_interaction_fwd.register_fake
def _dot_fwd_fake(z):
    B, N, _ = z.shape
    return z.new_empty((B, N * (N - 1) // 2))


@torch.library.custom_op("interformer::dot_interaction_bwd", mutates_args=())
def dot_interaction_bwd(grad_out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Backward: ``dz [B, N, d]`` (contiguous)."""
    return _bwd_impl(grad_out, z)


@dot_interaction_bwd.register_fake
def _dot_bwd_fake(grad_out, z):
    return z.new_empty(z.shape)


def _setup_context(ctx, inputs, output):
    (z,) = inputs
    ctx.save_for_backward(z)


def _backward_with(bwd):
    """The autograd formula, calling ``bwd`` (the custom op when traced, the launcher in eager)."""
    def backward(ctx, grad_out):
        if grad_out is None:
            return None
        (z,) = ctx.saved_tensors
        return bwd(grad_out, z)
    return backward


dot_interaction_fwd.register_autograd(_backward_with(torch.ops.interformer.dot_interaction_bwd),
                                      setup_context=_setup_context)


# eager entry point (see interformer.kernels._dispatch): same launchers, no custom-op dispatch
_DotInteraction = lean_function("_DotInteraction", saving_forward(_fwd_impl, _setup_context), _backward_with(_bwd_impl),
                                _backward_with(torch.ops.interformer.dot_interaction_bwd))
inline_when_compiled(dot_interaction_fwd, dot_interaction_bwd)


def dot_interaction(z: torch.Tensor) -> torch.Tensor:
    """Fused pairwise inner products; same contract as :func:`interformer.reference.dot_interaction`
    (see the module docstring for the kernel design).

    z ``[B, N, d]`` (any strides) -> contiguous ``[B, N(N-1)/2]`` in ``triu_indices(N, N, 1)`` order.
    """
    if isinstance(z, torch.fx.Proxy):  # torch.fx.symbolic_trace: record this call (_dispatch.fx_call)
        return fx_call(dot_interaction, z)
    if not isinstance(z, torch.Tensor) or z.dim() != 3:
        raise ValueError(f"dot_interaction: z must be a 3-D tensor [B, N, d], got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    if z.dtype not in _DTYPES:
        raise ValueError(f"dot_interaction: z must be one of {_DTYPES}, got {z.dtype}")
    dev = z.device.type
    cast = autocast_dtype(dev)
    if cast is not None:
        z = z.to(cast)
    # a torch.func transform, ONNX export (_dispatch.reference_only), or d = 0 (every product an empty
    # sum: zeros, and a zero gradient): the reference
    if reference_only(z) or z.shape[2] == 0:
        from interformer import reference

        return reference.dot_interaction(z)
    if tracing((z,)):
        return torch.ops.interformer.dot_interaction_fwd(z)
    if needs_grad((z,)):
        return _DotInteraction.apply(z)
    return _fwd_impl(z)
