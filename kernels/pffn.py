"""Personalized FFN (PFFN) of the Sequence Arch: fused Triton forward and backward.

Public functions (same names and signatures as in :mod:`interformer.reference`)::

    pffn_mlp(s, lengths, w_b, ln_weight, ln_bias, eps)              # s + LN(s) @ w_b[b]
    pffn_linear(s, lengths, x_sum, a, ln_weight, ln_bias, eps)      # s + (LN(s) @ x_sum[b]^T) @ a

s ``[B, L, d]`` (any strides), lengths ``[B]`` (integer; the number of valid leading rows of s,
clamped to ``[0, L]``), w_b ``[B, d, d]`` (the per-sample weight, already scaled), x_sum
``[B, n_sum, d]``, a ``[n_sum, d]``, ln_weight/ln_bias ``[d]`` -> contiguous ``[B, L, d]`` in s's
dtype. Rows ``>= lengths[b]`` of the output are exact zeros; those rows of s are never read and the
incoming gradient at those rows is never read either (it cannot leak into any gradient).

Forward (``_pffn_fwd_kernel``): ONE launch for both modes
---------------------------------------------------------
One program per (sample b, chunk of up to ``CHUNK = 256`` rows); the grid is ``B * cdiv(L, CHUNK)``,
so at the DESIGN shapes (L = 54, 104) a program owns a whole sample and loads its weight once, and
at ``long`` (L = 1004) four programs share a sample. Per block of ``BLOCK_L`` rows:

* prologue: LayerNorm of the rows in fp32 (mean with one correction step as in
  :mod:`interformer.kernels.layernorm`, so that a constant row normalises to ``ln_bias``: exactly
  under the interpreter, and on a GPU up to its approximate fp32 division (see the kernel);
  biased variance, ``rsqrt``), masked to the valid rows and the d real columns (d is padded to
  ``DP`` = next power of two >= 16 in registers);
* mlp: ``acc = tl.dot(LN(s), w_b[b])`` with ``w_b[b]`` ``[DP, DP]`` held in registers for the whole
  chunk; linear: ``t = tl.dot(LN(s), x_sum[b]^T)`` ``[BLOCK_L, NP]`` then ``acc = tl.dot(t, a)`` with
  ``NP = max(16, next_pow2(n_sum))`` (padded rows of x_sum and a are zero) -- the ``d x d`` matrix
  ``W_b = x_sum[b]^T a`` is never formed, in registers or in memory, forward or backward;
* epilogue: ``out = s + acc`` (fp32), rows past the length set to 0, cast on store.

A block entirely past ``lengths[b]`` skips all of that and stores zeros (at the benchmark shapes
about half of all rows are padding), and a chunk with no valid row does not even load the weight.

Backward (``_pffn_bwd_kernel`` + the shared partial-sum reduction): two launches
-----------------------------------------------------------------------------
Persistent grid of ``G`` programs (``4 x`` the SM count on a GPU, 2 under the interpreter; at most
B), each looping over samples ``pid, pid + G, ...``; per sample it loads the weight (w_b[b], or
x_sum[b] and a) once and loops over the VALID row blocks only, recomputing the LayerNorm from s
(mean and rstd are not stored: s has to be read anyway, and recomputing saves a ``[B, L]`` write and
read). With ``g = dout`` masked to the valid rows:

* mlp: ``dh = g @ w_b[b]^T``; ``dw_b[b] = LN(s)^T @ g`` accumulated in fp32 registers over the
  sample's valid rows and stored once (zeros for an empty sample);
* linear: ``t = LN(s) @ x_sum[b]^T`` (recomputed), ``dt = g @ a^T``, ``dh = dt @ x_sum[b]``,
  ``dx_sum[b] = dt^T @ LN(s)`` (per sample, stored once) and ``da += t^T @ g`` (per program);
* LayerNorm backward in fp32: ``dgamma += sum(dh * xhat)``, ``dbeta += sum(dh)`` (per program), and
  ``ds = rstd * (dh*gamma - mean(dh*gamma) - xhat * mean(dh*gamma*xhat)) + g``;
* row blocks past the length only store zeros into ds.

The cross-sample parameter gradients (dgamma, dbeta and, in linear mode, da) are written by each
program once into an fp32 ``[G, 2d (+ n_sum*d)]`` buffer and reduced over G in one launch by
:func:`interformer.kernels._common.sum_partials` (fixed order: deterministic on a given device; no
atomics), which writes each gradient in its parameter's dtype. The per-sample gradients (dw_b,
dx_sum) need no reduction. Nothing goes to cuBLAS.

Block sizes (fixed by the shape, no autotune; ``_config``): forward ``BLOCK_L = 64`` rows (less for
short sequences, at least 16 for ``tl.dot``), backward ``BLOCK_L = 32`` (it keeps the weight, the
fp32 ``[DP, DP]`` weight-gradient accumulator and about six ``[BLOCK_L, DP]`` fp32 tiles live), 16
when s is fp32 (the model's sequence stream under autocast, or an fp32 model), whose row tiles then
come in fp32 (beside their 16-bit dot copies under autocast): Triton 3.6's sm_90 builds of the model's autocast case
spilled at 32 rows (3/2 spill instructions at d = 64, 43/42 at d = 128 in mlp mode, 31/25 in linear
mode) and at 16 take 246 registers and none, 3/2 and none, with two programs an SM at d = 64
either way (untimed: :data:`FP32_BACKWARD_ROWS` keeps 32 as a setting for a GPU to time;
``test_backward_of_fp32_rows_takes_the_row_block_that_spills_less``);
4 warps, 8 when ``DP = 128``. d <= 128 (``MAX_D``); larger d goes to the eager reference, and so
do linear-mode shapes whose backward tiles would not fit the shared memory (``_linear_fits``).
Checked by compiling for sm_90 ahead of time (16-byte aligned contiguous inputs), bf16 at the DESIGN
shapes: forward 113-165 registers, backward 181-255 with at most 32 bytes spilled (d = 128, mlp);
shared memory <= 53 KB. fp32 spills a few hundred bytes and needs up to 208 KB of shared memory at
d = 128 (within the H100's 227 KB; correct, not tuned).

Dtypes and precision
--------------------
s may be fp32, fp16 or bf16; out and ds are in s's dtype. w_b (x_sum, a) must have s's dtype,
except under ``torch.autocast`` on s's device type, where w_b and x_sum are cast to the autocast
dtype (as eager's bmm casts its operands) and the products run in it, while an fp32 s stays fp32:
the kernels read it in fp32, add the residual in fp32 and give out and ds in fp32, as eager's
``s + bmm(...)`` does; a 16-bit s of the other 16-bit dtype (bf16 under fp16 autocast, say) is
converted to fp32 first, since eager's sum promotes the two 16-bit dtypes to fp32, so out is fp32
there too and ds comes back in s's dtype through the conversion; ``a`` may stay fp32: it is
read in its own dtype and cast in registers, and its gradient comes back in its own dtype.
ln_weight/ln_bias may be any float dtype (read as fp32; eager's autocast runs LayerNorm in fp32
too); their gradients come back in their dtype. ``None`` means weight 1 / bias 0. The normalised rows are rounded to the compute dtype only as
``tl.dot`` operands (like eager's LayerNorm output), the residual add is fp32. fp32 inputs use
``tl.dot(input_precision="tf32x3")`` on a GPU (about fp32 accuracy); under ``TRITON_INTERPRET=1``
dots are exact fp32.

``torch.library``: ``interformer::pffn_mlp_fwd`` / ``interformer::pffn_mlp_bwd`` and
``interformer::pffn_linear_fwd`` / ``interformer::pffn_linear_bwd`` are ``custom_op`` s with fake
implementations; each forward's autograd formula calls its backward op, so
``torch.compile(fullgraph=True)`` traces forward and backward. Outside tracing, :func:`pffn_mlp` and
:func:`pffn_linear` call the same launchers through a plain ``autograd.Function`` (or none when no
input needs a gradient), which skips the custom op's dispatch overhead (see
:mod:`interformer.kernels._dispatch`).
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch
import triton
import triton.language as tl

from ._common import (KERNEL_DTYPES, affine_params, cdiv, describe_shape, dot_precision, int32_block,
                      layer_norm_params, next_pow2, on_input_device, persistent_programs, sum_partials)
from ._dispatch import (autocast_dtype, fx_call, inline_when_compiled, launch, lean_function, needed as _needed,
                        needs_grad, reference_only, savable, saving_forward, tracing)

__all__ = ["pffn_mlp", "pffn_linear"]

_DTYPES = KERNEL_DTYPES
MAX_D = 128
_FWD_CHUNK_ROWS = 256
_BWD_ROWS = 32  # the backward's row block for a 16-bit s (module docstring, "Block sizes")

#: The backward's row block for an fp32 s (the model's sequence stream under autocast, an fp32
#: model): 16, the default since 2026-11-29 (at 32 the sm_90 builds spilled: ``_config``), or 32,
#: the plan before, which a 16-bit s keeps. A setting so that a GPU can time the two
#: (``bench/test_bench_pffn_autocast.py``'s ``fused-rows32`` provider) before the choice counts as
#: measured; ValueError at the backward's launch for any other value, whatever s's dtype. Read at
#: every eager (or opaque compiled) launch; a compiled graph that inlines the op (``torch.compile``
#: on a GPU, by default: ``interformer.backend``) reads it once, when traced, and keeps that plan.
FP32_BACKWARD_ROWS = 16


# ============================================================================ kernels
@triton.jit
def _layer_norm_rows(S, b, offs, n, D, eps, ssb, ssl, ssd, gamma, beta, DP: tl.constexpr):
    """Rows ``offs`` (< n, zero elsewhere) of sample b: (x fp32, xhat, rstd, h = xhat*gamma + beta)."""
    c = tl.arange(0, DP)
    c_ok = c < D
    valid = offs < n
    x = tl.load(S + b * ssb + offs[:, None] * ssl + c[None, :] * ssd,
                mask=valid[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    xc = tl.where(c_ok[None, :], x - (tl.sum(x, 1) / D)[:, None], 0.0)
    # the mean's correction step. A constant row's xc is then 0 under the interpreter; on a GPU fp32
    # "/" is approximate (div.full.f32, up to 2 ulp), which leaves it about 2**-22 of the first mean's
    # error (estimated, not measured: about 1e-8 in xhat at v = 1898). A correctly rounded
    # division (tl.math.div_rn) would make it 0 there too, for 113 -> 133 registers at taobao and
    # one program an SM instead of two at long (sm_90 builds, Triton 3.6): not taken.
    xc = tl.where(c_ok[None, :], xc - (tl.sum(xc, 1) / D)[:, None], 0.0)
    var = tl.sum(xc * xc, 1) / D
    rstd = tl.rsqrt(var + eps)
    xhat = xc * rstd[:, None]
    h = xhat * gamma[None, :] + beta[None, :]
    return x, xhat, rstd, h


@triton.jit
def _pffn_fwd_kernel(
    OUT,
    S, LENS, WX, A, LNW, LNB,
    eps, L, D, NS, n_chunks,
    ssb, ssl, ssd, slen,
    swb, swk, swn,  # mlp: w_b[b, k, n]; linear: x_sum[b, i, k] as (b, i, k)
    san, sad,
    sob, sol, sod,
    LINEAR: tl.constexpr, BLOCK_L: tl.constexpr, CHUNK: tl.constexpr, DP: tl.constexpr, NP: tl.constexpr,
    PREC: tl.constexpr,
):
    eps = tl.cast(eps, tl.float32)  # fp64 from Inductor: _dispatch.py, "Float arguments"
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_chunks
    row0 = ((pid % n_chunks) * CHUNK).to(tl.int32)  # int32 offsets inside a sample
    n = tl.minimum(tl.maximum(tl.load(LENS + b * slen), 0), L).to(tl.int32)  # clamp before narrowing
    d_live = tl.where(row0 < n, D, 0)  # a chunk without valid rows loads no weight
    CDT: tl.constexpr = WX.dtype.element_ty  # the products' dtype (s may be wider under autocast)

    c = tl.arange(0, DP)
    c_ok = c < D
    gamma = tl.load(LNW + c, mask=c_ok, other=0.0).to(tl.float32)
    beta = tl.load(LNB + c, mask=c_ok, other=0.0).to(tl.float32)
    if LINEAR:
        i = tl.arange(0, NP)
        im = (i < NS)[:, None] & (c < d_live)[None, :]
        xs = tl.load(WX + b * swb + i[:, None] * swk + c[None, :] * swn, mask=im, other=0.0)      # [NP, DP]
        a = tl.load(A + i[:, None] * san + c[None, :] * sad, mask=im, other=0.0).to(CDT)          # [NP, DP]
    else:
        wm = c_ok[:, None] & (c < d_live)[None, :]
        w = tl.load(WX + b * swb + c[:, None] * swk + c[None, :] * swn, mask=wm, other=0.0)       # [DP, DP]

    o_base = OUT + b * sob
    hi = tl.minimum(row0 + CHUNK, L)
    for r0 in range(row0, hi, BLOCK_L):
        offs = r0 + tl.arange(0, BLOCK_L)
        st_mask = (offs < L)[:, None] & c_ok[None, :]
        o_ptr = o_base + offs[:, None] * sol + c[None, :] * sod
        if r0 < n:
            x, xhat, rstd, h = _layer_norm_rows(S, b, offs, n, D, eps, ssb, ssl, ssd, gamma, beta, DP)
            if LINEAR:
                t = tl.dot(h.to(CDT), tl.trans(xs), input_precision=PREC)
                acc = tl.dot(t.to(CDT), a, input_precision=PREC)
            else:
                acc = tl.dot(h.to(CDT), w, input_precision=PREC)
            out = tl.where((offs < n)[:, None], x + acc, 0.0)
            tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=st_mask)
        else:
            tl.store(o_ptr, tl.zeros([BLOCK_L, DP], OUT.dtype.element_ty), mask=st_mask)


@triton.jit
def _pffn_bwd_kernel(
    DS, DWX, PART,
    DO, S, LENS, WX, A, LNW, LNB,
    eps, B, L, D, NS,
    sdsb, sdsl, sdsd,
    sdwb, sdwk, sdwn,
    sdob, sdol, sdod,
    ssb, ssl, ssd, slen,
    swb, swk, swn,
    san, sad, spg,
    LINEAR: tl.constexpr, BLOCK_L: tl.constexpr, DP: tl.constexpr, NP: tl.constexpr, PREC: tl.constexpr,
):
    eps = tl.cast(eps, tl.float32)  # fp64 from Inductor: _dispatch.py, "Float arguments"
    pid = tl.program_id(0).to(tl.int64)
    G = tl.num_programs(0)
    CDT: tl.constexpr = WX.dtype.element_ty  # the products' dtype (s may be wider under autocast)
    c = tl.arange(0, DP)
    c_ok = c < D
    i = tl.arange(0, NP)
    gamma = tl.load(LNW + c, mask=c_ok, other=0.0).to(tl.float32)
    beta = tl.load(LNB + c, mask=c_ok, other=0.0).to(tl.float32)
    acc_g = tl.zeros([DP], tl.float32)
    acc_b = tl.zeros([DP], tl.float32)
    if LINEAR:
        a = tl.load(A + i[:, None] * san + c[None, :] * sad, mask=(i < NS)[:, None] & c_ok[None, :],
                    other=0.0).to(CDT)
        acc_a = tl.zeros([NP, DP], tl.float32)

    for bi in range(pid, B, G):
        b = tl.cast(bi, tl.int64)  # int64 offsets b * stride (the interpreter's loop variable is a Python int)
        n = tl.minimum(tl.maximum(tl.load(LENS + b * slen), 0), L).to(tl.int32)  # clamp before narrowing
        d_live = tl.where(n > 0, D, 0)  # an empty sample loads no weight
        if LINEAR:
            im = (i < NS)[:, None] & (c < d_live)[None, :]
            xs = tl.load(WX + b * swb + i[:, None] * swk + c[None, :] * swn, mask=im, other=0.0)
            acc_w = tl.zeros([NP, DP], tl.float32)   # dx_sum[b]
        else:
            w = tl.load(WX + b * swb + c[:, None] * swk + c[None, :] * swn,
                        mask=c_ok[:, None] & (c < d_live)[None, :], other=0.0)
            acc_w = tl.zeros([DP, DP], tl.float32)   # dw_b[b]
        for r0 in range(0, n, BLOCK_L):
            offs = r0 + tl.arange(0, BLOCK_L)
            valid = offs < n
            x, xhat, rstd, h = _layer_norm_rows(S, b, offs, n, D, eps, ssb, ssl, ssd, gamma, beta, DP)
            g = tl.load(DO + b * sdob + offs[:, None] * sdol + c[None, :] * sdod,
                        mask=valid[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            g_c = g.to(CDT)
            h_c = h.to(CDT)
            if LINEAR:
                t_c = tl.dot(h_c, tl.trans(xs), input_precision=PREC).to(CDT)        # [BL, NP]
                dt_c = tl.dot(g_c, tl.trans(a), input_precision=PREC).to(CDT)       # [BL, NP]
                dh = tl.dot(dt_c, xs, input_precision=PREC)                          # [BL, DP]
                acc_w += tl.dot(tl.trans(dt_c), h_c, input_precision=PREC)
                acc_a += tl.dot(tl.trans(t_c), g_c, input_precision=PREC)
            else:
                dh = tl.dot(g_c, tl.trans(w), input_precision=PREC)
                acc_w += tl.dot(tl.trans(h_c), g_c, input_precision=PREC)
            acc_g += tl.sum(dh * xhat, 0)
            acc_b += tl.sum(dh, 0)
            dxh = dh * gamma[None, :]
            c1 = tl.sum(dxh * xhat, 1) / D
            c2 = tl.sum(dxh, 1) / D
            ds = rstd[:, None] * (dxh - xhat * c1[:, None] - c2[:, None]) + g
            ds = tl.where(valid[:, None], ds, 0.0)
            tl.store(DS + b * sdsb + offs[:, None] * sdsl + c[None, :] * sdsd, ds.to(DS.dtype.element_ty),
                     mask=(offs < L)[:, None] & c_ok[None, :])
        zero = tl.zeros([BLOCK_L, DP], DS.dtype.element_ty)
        for r0 in range(tl.cdiv(n, BLOCK_L) * BLOCK_L, L, BLOCK_L):
            offs = r0 + tl.arange(0, BLOCK_L)
            tl.store(DS + b * sdsb + offs[:, None] * sdsl + c[None, :] * sdsd, zero,
                     mask=(offs < L)[:, None] & c_ok[None, :])
        if LINEAR:
            tl.store(DWX + b * sdwb + i[:, None] * sdwk + c[None, :] * sdwn, acc_w.to(DWX.dtype.element_ty),
                     mask=(i < NS)[:, None] & c_ok[None, :])
        else:
            tl.store(DWX + b * sdwb + c[:, None] * sdwk + c[None, :] * sdwn, acc_w.to(DWX.dtype.element_ty),
                     mask=c_ok[:, None] & c_ok[None, :])

    # partial sums of this program: [dgamma (d) | dbeta (d) | da (n_sum * d), linear only]
    base = PART + pid * spg
    tl.store(base + c, acc_g, mask=c_ok)
    tl.store(base + D + c, acc_b, mask=c_ok)
    if LINEAR:
        tl.store(base + 2 * D + i[:, None] * D + c[None, :], acc_a, mask=(i < NS)[:, None] & c_ok[None, :])


# ============================================================================ launchers


@functools.lru_cache(maxsize=None)
def _config(L: int, d: int, n_sum: int, backward: bool, bwd_rows: int = _BWD_ROWS) -> Tuple[int, int, int, int]:
    """(BLOCK_L, DP, NP, num_warps); see the module docstring. ``bwd_rows``: the backward's row
    block before it is fitted to L (:func:`_bwd_rows`: 32, or :data:`FP32_BACKWARD_ROWS` for an
    fp32 s, whose fp32 row tiles, beside their 16-bit dot copies under autocast, spilled at 32 rows;
    the module docstring has the sm_90 builds)."""
    dp = max(16, next_pow2(d))
    np_ = max(16, next_pow2(n_sum))
    block_l = min(bwd_rows if backward else 64, max(16, next_pow2(L)))
    warps = 8 if dp >= 128 else 4
    return block_l, dp, np_, warps


def _bwd_rows(dtype: torch.dtype) -> int:
    """The backward's row block for an s of ``dtype``: :data:`FP32_BACKWARD_ROWS` for fp32, 32
    otherwise; the setting is checked whatever the dtype (as attention's BACKWARD_DELTA is at every
    backward launch), so that a bad value fails a 16-bit run too instead of going unnoticed."""
    rows = FP32_BACKWARD_ROWS
    if type(rows) is not int or rows not in (16, 32):
        raise ValueError(f"pffn: FP32_BACKWARD_ROWS must be 16 or 32, got {rows!r}")
    return rows if dtype == torch.float32 else _BWD_ROWS


def _int32_views(s, wx, a):
    """The kernels take a sample's offset in int64 and the offsets inside it in int32: a view whose
    offsets inside one sample could reach 2**31 (huge row strides) is copied (``int32_block``)."""
    return int32_block(s, 1), int32_block(wx, 1), (None if a is None else int32_block(a, a.shape[0]))


@on_input_device
def _fwd_impl(s, lengths, wx, a, ln_weight, ln_bias, eps, linear):
    B, L, d = s.shape
    s, wx, a = _int32_views(s, wx, a)
    ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()  # read as unit-stride rows
    out = torch.empty((B, L, d), device=s.device, dtype=s.dtype)
    if out.numel() == 0:
        return out
    n_sum = wx.shape[1] if linear else 1
    block_l, dp, np_, warps = _config(L, d, n_sum, False)
    chunk = max(block_l, _FWD_CHUNK_ROWS)
    n_chunks = cdiv(L, chunk)
    a_ = a if linear else wx
    launch(_pffn_fwd_kernel)[(B * n_chunks,)](
        out, s, lengths, wx, a_, ln_weight, ln_bias,
        float(eps), L, d, n_sum, n_chunks,
        *s.stride(), lengths.stride(0), *wx.stride(), a_.stride(0), a_.stride(1), *out.stride(),
        LINEAR=linear, BLOCK_L=block_l, CHUNK=chunk, DP=dp, NP=np_, PREC=dot_precision(wx.dtype), num_warps=warps,
    )
    return out


@on_input_device
def _bwd_impl(grad_out, s, lengths, wx, a, ln_weight, ln_bias, eps, linear, params: bool = True):
    """(ds, dwx, da or None, dln_weight, dln_bias). With ``params=False`` (neither the LayerNorm's
    parameters nor ``a`` need a gradient: the eager path's frozen module) those three are None and
    the kernel's partial sums of them are not reduced."""
    B, L, d = s.shape
    s, wx, a = _int32_views(s, wx, a)
    grad_out = int32_block(grad_out, 1)
    ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()  # read as unit-stride rows
    n_sum = wx.shape[1] if linear else 1
    ds = torch.empty((B, L, d), device=s.device, dtype=s.dtype)
    dwx = torch.empty(wx.shape, device=wx.device, dtype=wx.dtype)
    dgamma = torch.empty(ln_weight.shape, device=s.device, dtype=ln_weight.dtype) if params else None
    dbeta = torch.empty(ln_bias.shape, device=s.device, dtype=ln_bias.dtype) if params else None
    da = torch.empty(a.shape, device=a.device, dtype=a.dtype) if linear and params else None
    if B == 0 or d == 0 or L == 0:
        for t in (ds, dwx, dgamma, dbeta, da):
            if t is not None:
                t.zero_()
        return ds, dwx, da, dgamma, dbeta
    block_l, dp, np_, warps = _config(L, d, n_sum, True, _bwd_rows(s.dtype))
    G = min(B, persistent_programs(s.device))
    P = 2 * d + (n_sum * d if linear else 0)
    part = torch.empty((G, P), device=s.device, dtype=torch.float32)
    a_ = a if linear else wx
    launch(_pffn_bwd_kernel)[(G,)](
        ds, dwx, part, grad_out, s, lengths, wx, a_, ln_weight, ln_bias,
        float(eps), B, L, d, n_sum,
        *ds.stride(), *dwx.stride(), *grad_out.stride(), *s.stride(), lengths.stride(0), *wx.stride(),
        a_.stride(0), a_.stride(1), part.stride(0),
        LINEAR=linear, BLOCK_L=block_l, DP=dp, NP=np_, PREC=dot_precision(wx.dtype), num_warps=warps,
    )
    if params:
        sum_partials(part, [dgamma, dbeta, da] if linear else [dgamma, dbeta])
    return ds, dwx, da, dgamma, dbeta


def _mlp_fwd_impl(s, lengths, w_b, ln_weight, ln_bias, eps):
    return _fwd_impl(s, lengths, w_b, None, ln_weight, ln_bias, eps, False)


def _mlp_bwd_impl(grad_out, s, lengths, w_b, ln_weight, ln_bias, eps, params: bool = True):
    """(ds, dw_b, dln_weight, dln_bias) (the last two None with ``params=False``)."""
    ds, dw, _, dg, db = _bwd_impl(grad_out, s, lengths, w_b, None, ln_weight, ln_bias, eps, False, params)
    return ds, dw, dg, db


def _linear_fwd_impl(s, lengths, x_sum, a, ln_weight, ln_bias, eps):
    return _fwd_impl(s, lengths, x_sum, a, ln_weight, ln_bias, eps, True)


def _linear_bwd_impl(grad_out, s, lengths, x_sum, a, ln_weight, ln_bias, eps, params: bool = True):
    """(ds, dx_sum, da, dln_weight, dln_bias) (the last three None with ``params=False``)."""
    return _bwd_impl(grad_out, s, lengths, x_sum, a, ln_weight, ln_bias, eps, True, params)


# ============================================================================ torch.library
@torch.library.custom_op("interformer::pffn_mlp_fwd", mutates_args=())
def pffn_mlp_fwd(
    s: torch.Tensor, lengths: torch.Tensor, w_b: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Forward of mlp-mode PFFN: ``[B, L, d]`` in s's dtype."""
    return _mlp_fwd_impl(s, lengths, w_b, ln_weight, ln_bias, eps)


@pffn_mlp_fwd.register_fake
def _pffn_mlp_fwd_fake(s, lengths, w_b, ln_weight, ln_bias, eps):
    return s.new_empty(s.shape)


@torch.library.custom_op("interformer::pffn_mlp_bwd", mutates_args=())
def pffn_mlp_bwd(
    grad_out: torch.Tensor, s: torch.Tensor, lengths: torch.Tensor, w_b: torch.Tensor, ln_weight: torch.Tensor,
    ln_bias: torch.Tensor, eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of mlp-mode PFFN: ``(ds, dw_b, dln_weight, dln_bias)``."""
    return _mlp_bwd_impl(grad_out, s, lengths, w_b, ln_weight, ln_bias, eps)


@pffn_mlp_bwd.register_fake
def _pffn_mlp_bwd_fake(grad_out, s, lengths, w_b, ln_weight, ln_bias, eps):
    return s.new_empty(s.shape), w_b.new_empty(w_b.shape), ln_weight.new_empty(ln_weight.shape), \
        ln_bias.new_empty(ln_bias.shape)


def _mlp_setup_context(ctx, inputs, output):
    s, lengths, w_b, ln_weight, ln_bias, eps = inputs
    ctx.save_for_backward(s, lengths, w_b, ln_weight, ln_bias)
    ctx.eps = eps


def _mlp_backward_with(bwd, lean=False):
    """The mlp autograd formula, calling ``bwd`` (the custom op when traced, the launcher in eager;
    ``lean``: the launcher, told whether the LayerNorm's parameters need gradients, and None
    returned for every gradient not needed)."""
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None, None, None, None
        s, lengths, w_b, ln_weight, ln_bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        extra = (any(need[3:5]),) if lean else ()
        ds, dw, dg, db = bwd(grad_out, s, lengths, w_b, ln_weight, ln_bias, ctx.eps, *extra)
        grads = ds, None, dw, dg, db, None
        return _needed(grads, need) if lean else grads
    return backward


pffn_mlp_fwd.register_autograd(_mlp_backward_with(torch.ops.interformer.pffn_mlp_bwd),
                               setup_context=_mlp_setup_context)


# eager entry point (see interformer.kernels._dispatch): same launchers, no custom-op dispatch
_PFFNMLP = lean_function("_PFFNMLP", saving_forward(_mlp_fwd_impl, _mlp_setup_context),
                         _mlp_backward_with(_mlp_bwd_impl, lean=True),
                         _mlp_backward_with(torch.ops.interformer.pffn_mlp_bwd))
inline_when_compiled(pffn_mlp_fwd, pffn_mlp_bwd)


@torch.library.custom_op("interformer::pffn_linear_fwd", mutates_args=())
def pffn_linear_fwd(
    s: torch.Tensor, lengths: torch.Tensor, x_sum: torch.Tensor, a: torch.Tensor, ln_weight: torch.Tensor,
    ln_bias: torch.Tensor, eps: float,
) -> torch.Tensor:
    """Forward of linear-mode PFFN: ``[B, L, d]`` in s's dtype (``W_b`` never formed)."""
    return _linear_fwd_impl(s, lengths, x_sum, a, ln_weight, ln_bias, eps)


@pffn_linear_fwd.register_fake
def _pffn_linear_fwd_fake(s, lengths, x_sum, a, ln_weight, ln_bias, eps):
    return s.new_empty(s.shape)


@torch.library.custom_op("interformer::pffn_linear_bwd", mutates_args=())
def pffn_linear_bwd(
    grad_out: torch.Tensor, s: torch.Tensor, lengths: torch.Tensor, x_sum: torch.Tensor, a: torch.Tensor,
    ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of linear-mode PFFN: ``(ds, dx_sum, da, dln_weight, dln_bias)``."""
    return _linear_bwd_impl(grad_out, s, lengths, x_sum, a, ln_weight, ln_bias, eps)


@pffn_linear_bwd.register_fake
def _pffn_linear_bwd_fake(grad_out, s, lengths, x_sum, a, ln_weight, ln_bias, eps):
    return tuple(t.new_empty(t.shape) for t in (s, x_sum, a, ln_weight, ln_bias))


def _linear_setup_context(ctx, inputs, output):
    s, lengths, x_sum, a, ln_weight, ln_bias, eps = inputs
    ctx.save_for_backward(s, lengths, x_sum, a, ln_weight, ln_bias)
    ctx.eps = eps


def _linear_backward_with(bwd, lean=False):
    """The linear autograd formula, calling ``bwd`` (as :func:`_mlp_backward_with`; here ``lean``
    asks whether ``a`` or the LayerNorm's parameters need gradients)."""
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None, None, None, None, None
        s, lengths, x_sum, a, ln_weight, ln_bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        extra = (any(need[3:6]),) if lean else ()
        ds, dx, da, dg, db = bwd(grad_out, s, lengths, x_sum, a, ln_weight, ln_bias, ctx.eps, *extra)
        grads = ds, None, dx, da, dg, db, None
        return _needed(grads, need) if lean else grads
    return backward


pffn_linear_fwd.register_autograd(_linear_backward_with(torch.ops.interformer.pffn_linear_bwd),
                                  setup_context=_linear_setup_context)


# eager entry point (see interformer.kernels._dispatch): same launchers, no custom-op dispatch
_PFFNLinear = lean_function("_PFFNLinear", saving_forward(_linear_fwd_impl, _linear_setup_context),
                            _linear_backward_with(_linear_bwd_impl, lean=True),
                            _linear_backward_with(torch.ops.interformer.pffn_linear_bwd))
inline_when_compiled(pffn_linear_fwd, pffn_linear_bwd)


# ============================================================================ public functions
def _check_common(op, s, lengths, ln_weight, ln_bias):
    if not isinstance(s, torch.Tensor) or s.dim() != 3:
        raise ValueError(f"{op}: s must be a 3-D tensor [B, L, d], got {describe_shape(s)}")
    if s.dtype not in _DTYPES:
        raise ValueError(f"{op}: s must be float32, float16 or bfloat16, got {s.dtype}")
    B, L, d = s.shape
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(f"{op}: lengths must be a 1-D tensor [B={B}], got {describe_shape(lengths)}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"{op}: lengths must be an integer tensor, got {lengths.dtype}")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (d,):
            raise ValueError(f"{op}: {name} must be a tensor [d={d}], got {describe_shape(t)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_devices(op, tensors):
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted(map(str, devices))}")


def _linear_fits(n_sum: int, d: int, dtype: torch.dtype) -> bool:
    """Whether the linear-mode backward's ``[NP, DP]`` tiles (x_sum[b], a, and the fp32 dx_sum and da
    accumulators) fit an H100's shared memory: ``NP * DP <= 4096`` in fp32, 16384 in fp16/bf16.
    sm_90 builds at those limits took 147,456-196,608 (fp32) and 122,880-135,168 bytes (16-bit); fp32
    at NP 64 x DP 128 took 294,912, over the 232,448 there are. Wider shapes use the reference."""
    _, dp, np_, _ = _config.__wrapped__(1, d, n_sum, True)  # uncached: dynamo warns on tracing lru_cache
    return np_ * dp <= (4096 if dtype == torch.float32 else 16384)


def _autocast_s(s: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """s under autocast: as it is when it is fp32 or already ``cdt`` (eager rounds only the bmm's
    operands and adds the residual to s as it is, so an fp32 s gives an fp32 result), else (the
    other 16-bit dtype) converted to fp32, exactly: eager's ``s + bmm(...)`` promotes bf16 and fp16
    to fp32, and so the output is fp32 there too (until 2026-11-29 s was cast to ``cdt``, which
    rounded it and gave a ``cdt`` output)."""
    return s if s.dtype in (torch.float32, cdt) else s.float()


def _fallback(fn_name, s, *args):
    """The eager reference, for shapes the kernels do not take; the LayerNorm parameters (the two
    arguments before eps) as ``F.layer_norm`` takes them for s (:func:`._common.layer_norm_params`;
    the kernels take any float dtype)."""
    from interformer import reference

    *rest, ln_weight, ln_bias, eps = args
    return getattr(reference, fn_name)(s, *rest, *layer_norm_params(s.dtype, ln_weight, ln_bias), eps)


def pffn_mlp(
    s: torch.Tensor,
    lengths: torch.Tensor,
    w_b: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Fused ``s + LN(s) @ w_b[b]`` with padded rows zero; same contract as
    :func:`interformer.reference.pffn_mlp` (see the module docstring for the kernel design).

    s ``[B, L, d]`` (any strides), lengths ``[B]``, w_b ``[B, d, d]``, ln_weight/ln_bias ``[d]``
    -> contiguous ``[B, L, d]``.
    """
    if isinstance(s, torch.fx.Proxy):  # torch.fx.symbolic_trace: record this call (_dispatch.fx_call)
        return fx_call(pffn_mlp, s, lengths, w_b, ln_weight, ln_bias, eps)
    op = "pffn_mlp"
    _check_common(op, s, lengths, ln_weight, ln_bias)
    B, L, d = s.shape
    if not isinstance(w_b, torch.Tensor) or w_b.shape != (B, d, d):
        raise ValueError(f"{op}: w_b must be a tensor [B={B}, d={d}, d={d}], got {describe_shape(w_b)}")
    if w_b.dtype not in _DTYPES:
        raise ValueError(f"{op}: w_b must be float32, float16 or bfloat16, got {w_b.dtype}")
    _check_devices(op, (s, lengths, w_b, ln_weight, ln_bias))
    dev = s.device.type
    cast = autocast_dtype(dev)
    if cast is not None:
        w_b = w_b.to(cast)  # s stays as it is: _autocast_s
        s = _autocast_s(s, w_b.dtype)
    elif w_b.dtype != s.dtype:
        raise ValueError(f"{op}: s and w_b must share one dtype outside autocast, got {s.dtype} and {w_b.dtype}")
    if d > MAX_D or reference_only(s):  # as in pffn_linear
        return _fallback(op, s, lengths, w_b, ln_weight, ln_bias, eps)
    ln_weight, ln_bias = affine_params(s, ln_weight, ln_bias)
    tensors = (s, lengths, w_b, ln_weight, ln_bias)
    if tracing(tensors):
        return torch.ops.interformer.pffn_mlp_fwd(*tensors, float(eps))
    if needs_grad(tensors):
        return _PFFNMLP.apply(s, savable(lengths), *tensors[2:], float(eps))
    return _mlp_fwd_impl(*tensors, float(eps))


def pffn_linear(
    s: torch.Tensor,
    lengths: torch.Tensor,
    x_sum: torch.Tensor,
    a: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Fused linear-mode PFFN ``s + (LN(s) @ x_sum[b]^T) @ a`` with padded rows zero, the ``d x d``
    weight never formed; same contract as :func:`interformer.reference.pffn_linear`.

    s ``[B, L, d]`` (any strides), lengths ``[B]``, x_sum ``[B, n_sum, d]``, a ``[n_sum, d]``,
    ln_weight/ln_bias ``[d]`` -> contiguous ``[B, L, d]``.
    """
    if isinstance(s, torch.fx.Proxy):  # torch.fx.symbolic_trace: record this call (_dispatch.fx_call)
        return fx_call(pffn_linear, s, lengths, x_sum, a, ln_weight, ln_bias, eps)
    op = "pffn_linear"
    _check_common(op, s, lengths, ln_weight, ln_bias)
    B, L, d = s.shape
    if not isinstance(x_sum, torch.Tensor) or x_sum.dim() != 3 or x_sum.shape[0] != B or x_sum.shape[2] != d:
        raise ValueError(f"{op}: x_sum must be a tensor [B={B}, n_sum, d={d}], got {describe_shape(x_sum)}")
    n_sum = x_sum.shape[1]
    if not isinstance(a, torch.Tensor) or a.shape != (n_sum, d):
        raise ValueError(f"{op}: a must be a tensor [n_sum={n_sum}, d={d}], got {describe_shape(a)}")
    for name, t in (("x_sum", x_sum), ("a", a)):
        if t.dtype not in _DTYPES:
            raise ValueError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    _check_devices(op, (s, lengths, x_sum, a, ln_weight, ln_bias))
    dev = s.device.type
    cast = autocast_dtype(dev)
    if cast is not None:
        x_sum = x_sum.to(cast)
        s = _autocast_s(s, x_sum.dtype)
    elif x_sum.dtype != s.dtype or a.dtype != s.dtype:
        raise ValueError(
            f"{op}: s, x_sum and a must share one dtype outside autocast, got {s.dtype}, {x_sum.dtype}, {a.dtype}"
        )
    # past the kernels' limits, or under a torch.func transform, ONNX export (_dispatch.reference_only): the reference
    if d > MAX_D or n_sum == 0 or not _linear_fits(n_sum, d, s.dtype) or reference_only(s):
        return _fallback(op, s, lengths, x_sum, a.to(s.dtype), ln_weight, ln_bias, eps)
    ln_weight, ln_bias = affine_params(s, ln_weight, ln_bias)
    tensors = (s, lengths, x_sum, a, ln_weight, ln_bias)
    if tracing(tensors):
        return torch.ops.interformer.pffn_linear_fwd(*tensors, float(eps))
    if needs_grad(tensors):
        return _PFFNLinear.apply(s, savable(lengths), *tensors[2:], float(eps))
    return _linear_fwd_impl(*tensors, float(eps))
