"""Residual add + LayerNorm over the last dimension: fused Triton forward and backward.

Public function (same name and signature as :func:`interformer.reference.add_layer_norm`)::

    add_layer_norm(x, residual, weight, bias, eps)   # LN(x + residual), residual may be None

Why this op exists: the model's three LayerNorms per block (``Z <- LN(Z + mix)``, ``X <- LN(X +
FFN)``, the attention pre-norm ``LN(S_mid)``) normalise rows of only ``d = 64`` features, of which
there are ``B * tokens`` (57k to 110k at taobao). PyTorch's LayerNorm backward reduces the weight and
bias gradients with one thread block per feature column, so at d = 64 only 64 blocks share the
whole reduction: an H200 profile of the fused training step put ``NativeLayerNormBackward0`` at
174 us per call (1.6 ms per step, 12% of the step's kernel time) against a memory floor of about
20 us. Here the reduction is split over row tiles, and the residual add rides along for free.

Forward (``_ln_fwd_kernel``)
----------------------------
One program per ``BLOCK_M`` rows (the whole row, ``BLOCK_N = next_pow2(N)`` columns, in registers):
``h = x + residual`` in fp32, ``mean``, ``rstd = 1 / sqrt(var + eps)`` (biased variance, as
``F.layer_norm``), ``y = (h - mean) * rstd * weight + bias``. Writes y and, when a backward will
follow (``STATS``; an inference call allocates none), the per-row ``mean`` and ``rstd`` (fp32 ``[M]``,
saved for backward). Contiguous inputs are read in place with row stride N. ``h`` is not stored:
the backward re-reads x and the residual and re-adds them (one extra read instead of a write plus a
read).

The mean takes one correction step, ``mean += sum(h - mean) / N``: a row whose values are all equal
then has its exact value as mean and normalises to exactly ``bias``, as eager's does. With ``sum(h)
/ N`` alone the mean of such a row was usually one rounding off, which ``rstd = 1 / sqrt(eps)`` made
a 0.15 relative error at N = 13, v = 1898.3 (a fuzzing helper's case). This holds with a GPU's
approximate fp32 division too: the correction's rounding, about 2**-22 of the first mean's error of
a few units in the last place, is far below half a unit of the mean (reasoned, not measured on a
GPU). It costs a second row reduction in registers, no memory traffic.

Backward (``_ln_bwd_kernel``)
-----------------------------
With ``xhat = (h - mean) * rstd`` and ``g = weight * dy``:
``dh = rstd * (g - mean_N(g) - xhat * mean_N(g * xhat))`` per row, the same gradient for x and the
residual; ``dweight = sum_rows dy * xhat``, ``dbias = sum_rows dy``. ``G`` persistent programs (4 x
the SM count on a GPU, 2 under the interpreter so that tests run the loop) walk the row tiles
``pid, pid + G, ...``, write dh, and keep their dweight/dbias partial sums in fp32 registers; they
store them once to an fp32 ``[G, 2N]`` buffer that ``sum_partials`` (shared by every kernel file)
reduces in a fixed order into the parameters' gradients. No atomics: deterministic.

Block sizes (fixed by N, no autotune): ``BLOCK_N = max(16, next_pow2(N))``, ``BLOCK_M = max(1,
min(64, 4096 // BLOCK_N))`` rows, 4 warps (8 from 8192-element tiles). Rows wider than 16384 features
(not this package's use) and rows of no features go to the eager reference, its output in the
dtype below.

Dtypes: x, residual, weight and bias may each be fp32, fp16 or bf16; the kernels read every tensor
in its own dtype and compute in fp32. The output dtype is that of ``x + residual`` (type promotion),
or fp32 under ``torch.autocast`` on x's device type. On CUDA that is what the reference gives
(CUDA autocast runs ``layer_norm`` in fp32). CPU autocast leaves ``layer_norm`` in its input's
dtype, so there an fp16/bf16 ``x + residual`` gives eager a low-precision output and this op an
fp32 one of at least the same accuracy; CPU runs of the kernels are the interpreter's tests, and
one rule for every device keeps them testing the GPU's. Gradients come back in each input's dtype. Inputs of any layout are
viewed as ``[M, N]`` rows (a copy only when the last dimension is not contiguous or the rows cannot
be viewed with one stride).

``torch.library``: ``interformer::add_layer_norm_fwd`` -> ``(y, mean, rstd)`` and
``interformer::add_layer_norm_bwd`` -> ``(dh, dweight, dbias)``, ``custom_op`` s with fake
implementations; the forward's autograd formula calls the backward op, so
``torch.compile(fullgraph=True)`` traces both. Outside tracing :func:`add_layer_norm` calls the same
launchers through a plain ``autograd.Function`` (or the forward launcher alone when nothing needs a
gradient), as the other fused ops do (see :mod:`interformer.kernels._dispatch`).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (KERNEL_DTYPES, affine_params, cdiv, describe_shape, layer_norm_params, next_pow2,
                      on_input_device, persistent_programs, promote_dtypes, sum_partials)
from ._dispatch import (autocast_dtype, fx_call, inline_when_compiled, launch, lean_function, needed as _needed,
                        needs_grad, reference_only, savable, tracing, unused_arg)

__all__ = ["add_layer_norm"]

_DTYPES = KERNEL_DTYPES
MAX_N = 16384


@triton.jit
def _ln_fwd_kernel(
    Y, MEAN, RSTD,
    X, R, W, Bias,
    M, N, eps, sxm, srm, sym,
    HAS_R: tl.constexpr, STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    eps = tl.cast(eps, tl.float32)  # fp64 from Inductor: _dispatch.py, "Float arguments"
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    m = row_ok[:, None] & col_ok[None, :]
    h = tl.load(X + rows[:, None] * sxm + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_R:
        h += tl.load(R + rows[:, None] * srm + cols[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(h, axis=1) / N
    mean += tl.sum(tl.where(m, h - mean[:, None], 0.0), axis=1) / N  # one correction step (docstring)
    diff = tl.where(m, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / N + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = diff * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows[:, None] * sym + cols[None, :], y.to(Y.dtype.element_ty), mask=m)
    if STATS:  # for the backward; an inference call allocates and writes none
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _ln_bwd_kernel(
    DH, PART,
    DY, X, R, W, MEAN, RSTD,
    M, N, sdym, sxm, srm, sdhm,
    HAS_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_w = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), G):
        rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64 for the offsets below
        row_ok = rows < M
        m = row_ok[:, None] & col_ok[None, :]
        h = tl.load(X + rows[:, None] * sxm + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_R:
            h += tl.load(R + rows[:, None] * srm + cols[None, :], mask=m, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(m, (h - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + rows[:, None] * sdym + cols[None, :], mask=m, other=0.0).to(tl.float32)
        g = dy * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        dh = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DH + rows[:, None] * sdhm + cols[None, :], dh.to(DH.dtype.element_ty), mask=m)
        acc_w += tl.sum(dy * xhat, axis=0)
        acc_b += tl.sum(dy, axis=0)
    tl.store(PART + pid * 2 * N + cols, acc_w, mask=col_ok)
    tl.store(PART + pid * 2 * N + N + cols, acc_b, mask=col_ok)


# ============================================================================ launchers
@functools.lru_cache(maxsize=None)
def _config(N: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps)."""
    bn = max(16, next_pow2(N))
    bm = max(1, min(64, 4096 // bn))
    return bm, bn, 8 if bm * bn >= 8192 else 4


def _rows(t: torch.Tensor, N: int) -> Tuple[torch.Tensor, int]:
    """``(t', row stride)``: ``t`` read as ``[M, N]`` rows with a unit column stride. A contiguous
    tensor is taken as it is (row stride N, no view op: each op is host time in a launch-bound step);
    otherwise a ``[M, N]`` view when possible, else a copy."""
    if t.is_contiguous():
        return t, N
    t2 = t.reshape(-1, N)
    if t2.stride(1) != 1 and t2.shape[0] != 0:
        t2 = t2.contiguous()
    return t2, t2.stride(0)


@on_input_device
def _fwd_impl(x, residual, weight, bias, eps, out_dtype, stats=True):
    """``(y, mean, rstd)``, y shaped like x; with ``stats=False`` (no backward will follow) the
    kernel stores no statistics and mean and rstd are None."""
    N = x.shape[-1]
    weight, bias = weight.contiguous(), bias.contiguous()  # the kernels read them as unit-stride rows
    x2, sx = _rows(x, N)
    r2, sr = _rows(residual, N) if residual is not None else (x2, 0)
    M = x.numel() // N if N else 0
    dev = x.device
    y = torch.empty(x.shape, device=dev, dtype=out_dtype)
    mean = rstd = None
    if stats:
        mean = torch.empty((M,), device=dev, dtype=torch.float32)
        rstd = torch.empty((M,), device=dev, dtype=torch.float32)
    if M > 0:
        bm, bn, warps = _config(N)
        launch(_ln_fwd_kernel)[(cdiv(M, bm),)](
            y, mean if stats else unused_arg(y), rstd if stats else unused_arg(y), x2, r2, weight, bias,
            M, N, float(eps), sx, sr, N,
            HAS_R=residual is not None, STATS=stats, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
        )
    return y, mean, rstd


def _grad_dtype(x, residual):
    return x.dtype if residual is None else promote_dtypes(x.dtype, residual.dtype)


@on_input_device
def _bwd_impl(grad_out, x, residual, weight, mean, rstd, bias_dtype, params: bool = True):
    """(dh, dweight, dbias); dh is the gradient of ``x + residual`` in their promoted dtype, dweight
    and dbias in the weight's and the bias's dtype (each rounded once from its fp32 sum). With
    ``params=False`` (neither needs a gradient: the eager path's frozen LayerNorm) both are None and
    their partial sums are not reduced."""
    N = x.shape[-1]
    weight = weight.contiguous()
    dy, sdy = _rows(grad_out, N)
    x2, sx = _rows(x, N)
    r2, sr = _rows(residual, N) if residual is not None else (x2, 0)
    M = x.numel() // N if N else 0
    dev = x.device
    dh = torch.empty(x.shape, device=dev, dtype=_grad_dtype(x, residual))
    dw = torch.empty((N,), device=dev, dtype=weight.dtype) if params else None
    db = torch.empty((N,), device=dev, dtype=bias_dtype) if params else None
    if M == 0:
        if params:
            dw.zero_()
            db.zero_()
        return dh, dw, db
    bm, bn, warps = _config(N)
    G = min(cdiv(M, bm), persistent_programs(dev))
    part = torch.empty((G, 2 * N), device=dev, dtype=torch.float32)
    launch(_ln_bwd_kernel)[(G,)](
        dh, part, dy, x2, r2, weight, mean, rstd,
        M, N, sdy, sx, sr, N,
        HAS_R=residual is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
    )
    if params:
        sum_partials(part, [dw, db])
    return dh, dw, db


# ============================================================================ torch.library
@torch.library.custom_op("interformer::add_layer_norm_fwd", mutates_args=())
def add_layer_norm_fwd(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor, eps: float,
    out_dtype: Optional[torch.dtype],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: ``(y, mean [M], rstd [M])`` with ``M`` rows of ``N = x.shape[-1]``; y in ``out_dtype``
    (None: the promoted dtype of x and residual)."""
    return _fwd_impl(x, residual, weight, bias, eps, out_dtype or _grad_dtype(x, residual))


@add_layer_norm_fwd.register_fake
def _fwd_fake(x, residual, weight, bias, eps, out_dtype):
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stats = x.new_empty((M,), dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype or _grad_dtype(x, residual)), stats, stats.new_empty((M,))


@torch.library.custom_op("interformer::add_layer_norm_bwd", mutates_args=())
def add_layer_norm_bwd(
    grad_out: torch.Tensor, x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, bias_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dh, dweight, dbias)``; dh (the gradient of ``x + residual``) in their promoted dtype."""
    return _bwd_impl(grad_out, x, residual, weight, mean, rstd, bias_dtype)


@add_layer_norm_bwd.register_fake
def _bwd_fake(grad_out, x, residual, weight, mean, rstd, bias_dtype):
    return (x.new_empty(x.shape, dtype=_grad_dtype(x, residual)), weight.new_empty(weight.shape),
            weight.new_empty(weight.shape, dtype=bias_dtype))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, out_dtype = inputs
    _, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None)
    ctx.bias_dtype = bias.dtype
    ctx.save_for_backward(x, residual, weight, mean, rstd)


def _grads(ctx, grad_out, bwd):
    """``(dx, dresidual, dweight, dbias)`` from ``bwd`` (the backward op when traced, the launcher
    in eager); dh goes to both addends, cast to each one's dtype."""
    x, residual, weight, mean, rstd = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None
    dh, dw, db = bwd(grad_out, x, residual, weight, mean, rstd, ctx.bias_dtype)
    x_dt, r_dt = ctx.dtypes
    dx = dh if dh.dtype == x_dt else dh.to(x_dt)
    dr = None
    if ctx.has_residual:
        dr = dh if dh.dtype == r_dt else dh.to(r_dt)
    return dx, dr, dw, db


def _backward(ctx, grad_out, grad_mean, grad_rstd):
    dx, dr, dw, db = _grads(ctx, grad_out, torch.ops.interformer.add_layer_norm_bwd)
    return dx, dr, dw, db, None, None


add_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _lean_forward(ctx, x, residual, weight, bias, eps, out_dtype):
    output = _fwd_impl(x, residual, weight, bias, eps, out_dtype)
    _setup_context(ctx, (x, residual, weight, bias, eps, out_dtype), output)
    ctx.mark_non_differentiable(output[1], output[2])
    return output


def _lean_backward(ctx, grad_out, grad_mean, grad_rstd):
    need = ctx.needs_input_grad
    dx, dr, dw, db = _grads(ctx, grad_out, functools.partial(_bwd_impl, params=need[2] or need[3]))
    return (*_needed((dx, dr, dw, db), need[:4]), None, None)


_AddLayerNorm = lean_function("_AddLayerNorm", _lean_forward, _lean_backward, _backward)
inline_when_compiled(add_layer_norm_fwd, add_layer_norm_bwd)


# ============================================================================ public function
def add_layer_norm(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """Fused ``LayerNorm(x + residual)`` over the last dimension (``residual=None``: ``LayerNorm(x)``);
    same contract as :func:`interformer.reference.add_layer_norm` (see the module docstring).

    x ``[..., N]``; residual of x's shape or None; weight and bias ``[N]``, or None for weight 1 and
    bias 0 (as ``F.layer_norm`` takes them: an ``nn.LayerNorm`` built with ``elementwise_affine=False``
    or ``bias=False`` has them None; the kernels then read fp32 ones and zeros).
    """
    if isinstance(x, torch.fx.Proxy):  # torch.fx.symbolic_trace: record this call (_dispatch.fx_call)
        return fx_call(add_layer_norm, x, residual, weight, bias, eps)
    op = "add_layer_norm"
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{op}: x must be a tensor [..., N], got {describe_shape(x)}")
    N = x.shape[-1]
    if residual is not None and (not isinstance(residual, torch.Tensor) or residual.shape != x.shape):
        raise ValueError(f"{op}: residual {describe_shape(residual)} must have x's shape {describe_shape(x)} (or be None)")
    weight, bias = affine_params(x, weight, bias)
    for name, p in (("weight", weight), ("bias", bias)):
        if not isinstance(p, torch.Tensor) or p.shape != (N,):
            raise ValueError(f"{op}: {name} {describe_shape(p)} must be [N={N}]")
    tensors = [x, weight, bias] + ([residual] if residual is not None else [])
    for t in tensors:
        if t.dtype not in _DTYPES:
            raise ValueError(f"{op}: tensors must be one of {_DTYPES}, got {t.dtype}")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if autocast_dtype(x.device.type) is not None:
        out_dtype = torch.float32  # CUDA autocast runs layer_norm in fp32 (the module docstring: CPU)
    else:
        out_dtype = _grad_dtype(x, residual)
    # not this package's sizes, or a torch.func transform, ONNX export (_dispatch.reference_only): the eager
    # reference, same math and autograd
    if N == 0 or N > MAX_N or reference_only(x):
        from interformer import reference

        h_dtype = x.dtype if residual is None else promote_dtypes(x.dtype, residual.dtype)
        # in the kernels' dtype: under CPU autocast the reference's is x's, the kernels' fp32 (.to: no-op else)
        return reference.add_layer_norm(x, residual, *layer_norm_params(h_dtype, weight, bias), eps).to(out_dtype)
    if tracing(tensors):
        return torch.ops.interformer.add_layer_norm_fwd(x, residual, weight, bias, float(eps), out_dtype)[0]
    if needs_grad(tensors):
        if residual is not None:  # eager saves only x + residual, a tensor of its own (_dispatch.savable)
            x, residual = savable(x), savable(residual)
        return _AddLayerNorm.apply(x, residual, weight, bias, float(eps), out_dtype)[0]
    return _fwd_impl(x, residual, weight, bias, eps, out_dtype, stats=False)[0]
