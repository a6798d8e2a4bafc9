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

Forward (``_glce_fwd_kernel``): one launch, one program per block of ``BS`` samples
---------------------------------------------------------------------------------------
* The program loads its samples' tokens as one register tile ``x [BS, NIP, DP]`` (``NIP`` = n_in and
  ``DP`` = d padded to powers of two >= 16, padded entries masked to 0; x is read through its three
  strides, so transposed or sliced views need no copy).
* Compression on tensor cores as a batched (3-D) ``tl.dot``: ``Y = W^T x`` with ``W^T`` broadcast to
  ``[BS, NOP, NIP]``. ``tl.dot`` needs every dimension >= 16, so ``n_out`` (4 or 8 in InterFormer) is
  padded to ``NOP = 16`` rows: the padded rows are zero (masked weight and bias) and are never stored.
  The MMA work is wasted on them, which costs nothing here: the kernel is memory-bound.
* ``Y`` (fp32) is viewed as ``[BS*NOP, DP]`` rows and the gate is one 2-D ``tl.dot`` with the
  ``[d, d]`` gate weight (loaded once per program, L2-resident across programs); the sigmoid (fp32)
  and the multiply run in registers and only ``out`` is stored.
* Block sizes (``_config``, fixed by the shape, no autotune): ``BS = clamp(8192 // (NIP * DP), 1, 8)``
  samples per program in the forward (taobao nonseq n_in = 20, d = 64 -> 4 samples, 64 gate rows; the
  seq summary n_in = 8 -> 8 samples, 128 gate rows; long n_in = 64, d = 128 -> 1 sample), half that in
  the backward (more live tiles); 4 warps, 8 when a ``[BS*NOP, DP]`` tile exceeds 4096 elements.

Backward (``_glce_bwd_kernel`` + ``_sum_partials_kernel``): two launches
------------------------------------------------------------------------
With ``s = sigmoid(Z)``: ``dZ = dO * Y * s * (1 - s)``, ``dY = dO * s + dZ @ gate_weight``,
``dgate_weight = dZ^T Y``, ``dgate_bias = sum dZ``, ``dx[b] = W dY[b]``, ``dW = sum_b x[b] dY[b]^T``,
``dbias = sum dY``. ``Y``, ``Z`` and ``s`` are recomputed from x (nothing but the inputs is saved for
backward). The kernel is persistent: ``G`` programs (``G`` = number of SMs on a GPU, 2 under the
interpreter so the loop is exercised; never more than the number of sample blocks) loop over sample
blocks ``pid, pid + G, ...``; per block it recomputes Y, Z, loads dO, writes dx, and accumulates the
cross-sample weight gradients (``dgate_weight [d, d]``, ``dgate_bias``, ``dW``, ``dbias``) in fp32
registers. Each program writes its partial sums once to an fp32 ``[G, d*d + d + n_in*n_out + n_out]``
buffer, and ``_sum_partials_kernel`` reduces it over ``G`` and writes the four gradients in their
parameters' dtypes (one launch for all four). This is the split-K of the ``[d, B*n_out] x [B*n_out, d]``
weight-gradient GEMM: at the DESIGN shapes it moves ``2*G*d*d*4`` bytes (about 4 MB at G = 132,
d = 64), less than cuBLAS would (it would need dZ and Y materialised, ``2*B*n_out*d`` elements
written and read back) and without atomics, so results are deterministic for a given device.
Nothing goes to cuBLAS. The upstream gradient is read through its strides (a stride-0 expand after
``out.sum()`` is fine).

Dtypes and precision
--------------------
x may be fp32, fp16 or bf16; the output and dx are in x's dtype. The four parameters must have x's
dtype, except under ``torch.autocast`` on x's device type where x is first cast to the autocast
dtype (as eager's einsum/linear would) and the parameters may stay fp32: the kernels read them in
their own dtype, cast them to the compute dtype in registers, and return their gradients in their
own dtype (no cast kernels, no ``ToCopyBackward``). Under autocast the output is in the autocast
dtype (eager's type promotion returns fp32 there). Accumulation is fp32; Y and the gate stay fp32 in
registers (eager rounds them to the low dtype), and operands are cast to the compute dtype just
before each ``tl.dot``. fp32 inputs use ``tl.dot(input_precision="tf32x3")`` on a GPU (about fp32
accuracy on tensor cores); under ``TRITON_INTERPRET=1`` dots are exact fp32.

Limits: d <= 128 and n_in <= 256 (the register tiles above); larger sizes, and inputs with no
elements, go to the eager reference (same math, same autograd).

``torch.library``: ``interformer::gated_lce_fwd`` and ``interformer::gated_lce_bwd`` are
``custom_op`` s with fake implementations; the forward's autograd formula calls the backward op, so
``torch.compile(fullgraph=True)`` traces both. The op boundary is opaque to Inductor.
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch
import triton
import triton.language as tl

__all__ = ["gated_lce"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_D = 128
MAX_N_IN = 256


# ============================================================================ kernels
@triton.jit
def _glce_load_params(W, BIAS, GW, GB, N_IN, N_OUT, D, swn, swm, sgo, sgi,
                      NIP: tl.constexpr, NOP: tl.constexpr, DP: tl.constexpr, CDT: tl.constexpr):
    """W^T ``[NOP, NIP]`` and W ``[NIP, NOP]`` (compute dtype), bias ``[NOP]`` (fp32),
    gate weight ``gw[k, j]`` ``[DP, DP]`` (compute dtype), gate bias ``[DP]`` (fp32); padding zero."""
    n = tl.arange(0, NIP)
    m = tl.arange(0, NOP)
    k = tl.arange(0, DP)
    n_ok = n < N_IN
    m_ok = m < N_OUT
    k_ok = k < D
    wt = tl.load(W + m[:, None] * swm + n[None, :] * swn, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(CDT)
    w = tl.load(W + n[:, None] * swn + m[None, :] * swm, mask=n_ok[:, None] & m_ok[None, :], other=0.0).to(CDT)
    bias = tl.load(BIAS + m, mask=m_ok, other=0.0).to(tl.float32)
    gw = tl.load(GW + k[:, None] * sgo + k[None, :] * sgi, mask=k_ok[:, None] & k_ok[None, :], other=0.0).to(CDT)
    gb = tl.load(GB + k, mask=k_ok, other=0.0).to(tl.float32)
    return wt, w, bias, gw, gb


@triton.jit
def _glce_recompute(X, b0, B, N_IN, D, sxb, sxn, sxd, wt, bias, gw, gb,
                    BS: tl.constexpr, NIP: tl.constexpr, NOP: tl.constexpr, DP: tl.constexpr,
                    PREC: tl.constexpr):
    """x tile ``[BS, NIP, DP]`` of samples ``b0 ..``, then Y and Z as ``[BS*NOP, DP]`` fp32."""
    bs = tl.arange(0, BS)
    n = tl.arange(0, NIP)
    j = tl.arange(0, DP)
    b_ok = (b0 + bs) < B
    xm = b_ok[:, None, None] & (n < N_IN)[None, :, None] & (j < D)[None, None, :]
    x = tl.load(X + (b0 + bs)[:, None, None] * sxb + n[None, :, None] * sxn + j[None, None, :] * sxd,
                mask=xm, other=0.0)
    y = tl.dot(tl.broadcast_to(wt[None, :, :], (BS, NOP, NIP)), x, input_precision=PREC)
    y = y + bias[None, :, None]
    y = tl.reshape(y, (BS * NOP, DP))
    z = tl.dot(y.to(x.dtype), tl.trans(gw), input_precision=PREC) + gb[None, :]
    return x, y, z


@triton.jit
def _glce_fwd_kernel(
    OUT,
    X, W, BIAS, GW, GB,
    B, N_IN, N_OUT, D,
    sxb, sxn, sxd, swn, swm, sgo, sgi, sob, som, sod,
    BS: tl.constexpr, NIP: tl.constexpr, NOP: tl.constexpr, DP: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b0 = pid * BS
    CDT: tl.constexpr = X.dtype.element_ty
    wt, w, bias, gw, gb = _glce_load_params(W, BIAS, GW, GB, N_IN, N_OUT, D, swn, swm, sgo, sgi, NIP, NOP, DP, CDT)
    x, y, z = _glce_recompute(X, b0, B, N_IN, D, sxb, sxn, sxd, wt, bias, gw, gb, BS, NIP, NOP, DP, PREC)
    out = y * tl.sigmoid(z)
    r = tl.arange(0, BS * NOP)
    rb = b0 + r // NOP
    rm = r % NOP
    j = tl.arange(0, DP)
    om = ((rb < B) & (rm < N_OUT))[:, None] & (j < D)[None, :]
    tl.store(OUT + rb[:, None] * sob + rm[:, None] * som + j[None, :] * sod, out.to(OUT.dtype.element_ty), mask=om)


@triton.jit
def _glce_bwd_kernel(
    DX, PART,
    DO, X, W, BIAS, GW, GB,
    B, N_IN, N_OUT, D, n_blocks,
    sdxb, sdxn, sdxd, sdob, sdom, sdod,
    sxb, sxn, sxd, swn, swm, sgo, sgi, spg,
    BS: tl.constexpr, NIP: tl.constexpr, NOP: tl.constexpr, DP: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    G = tl.num_programs(0)
    CDT: tl.constexpr = X.dtype.element_ty
    wt, w, bias, gw, gb = _glce_load_params(W, BIAS, GW, GB, N_IN, N_OUT, D, swn, swm, sgo, sgi, NIP, NOP, DP, CDT)
    r = tl.arange(0, BS * NOP)
    n = tl.arange(0, NIP)
    m = tl.arange(0, NOP)
    j = tl.arange(0, DP)
    bs = tl.arange(0, BS)
    j_ok = j < D

    acc_gw = tl.zeros([DP, DP], tl.float32)   # dgate_weight[k, j]
    acc_gb = tl.zeros([DP], tl.float32)
    acc_w = tl.zeros([NIP, NOP], tl.float32)  # dW[n, m]
    acc_b = tl.zeros([NOP], tl.float32)
    for blk in range(pid, n_blocks, G):
        b0 = blk * BS
        x, y, z = _glce_recompute(X, b0, B, N_IN, D, sxb, sxn, sxd, wt, bias, gw, gb, BS, NIP, NOP, DP, PREC)
        rb = b0 + r // NOP
        rm = r % NOP
        row_ok = (rb < B) & (rm < N_OUT)
        do = tl.load(DO + rb[:, None] * sdob + rm[:, None] * sdom + j[None, :] * sdod,
                     mask=row_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)
        s = tl.sigmoid(z)
        dz = do * y * s * (1.0 - s)
        dz_c = dz.to(CDT)
        dy = do * s + tl.dot(dz_c, gw, input_precision=PREC)
        acc_gw += tl.dot(tl.trans(dz_c), y.to(CDT), input_precision=PREC)
        acc_gb += tl.sum(dz, 0)
        dy3 = tl.reshape(dy, (BS, NOP, DP))
        acc_b += tl.sum(tl.sum(dy3, 2), 0)
        dy3_c = dy3.to(CDT)
        dx = tl.dot(tl.broadcast_to(w[None, :, :], (BS, NIP, NOP)), dy3_c, input_precision=PREC)
        dwb = tl.dot(x, tl.permute(dy3_c, (0, 2, 1)), input_precision=PREC)
        acc_w += tl.sum(dwb, 0)
        xm = ((b0 + bs) < B)[:, None, None] & (n < N_IN)[None, :, None] & j_ok[None, None, :]
        tl.store(DX + (b0 + bs)[:, None, None] * sdxb + n[None, :, None] * sdxn + j[None, None, :] * sdxd,
                 dx.to(DX.dtype.element_ty), mask=xm)

    # partial sums of this program: [dgate_weight (d*d) | dgate_bias (d) | dW (n_in*n_out) | dbias (n_out)]
    base = PART + pid * spg
    tl.store(base + j[:, None] * D + j[None, :], acc_gw, mask=j_ok[:, None] & j_ok[None, :])
    base += D * D
    tl.store(base + j, acc_gb, mask=j_ok)
    base += D
    tl.store(base + n[:, None] * N_OUT + m[None, :], acc_w, mask=(n < N_IN)[:, None] & (m < N_OUT)[None, :])
    base += N_IN * N_OUT
    tl.store(base + m, acc_b, mask=m < N_OUT)


@triton.jit
def _sum_partials_kernel(
    OUT0, OUT1, OUT2, OUT3,
    PART,
    G, P, e1, e2, e3, spg,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``sum_g PART[g, c]`` for columns ``c`` of a ``[G, P]`` fp32 buffer, written to four outputs:
    columns ``[0, e1)`` to OUT0, ``[e1, e2)`` to OUT1, ``[e2, e3)`` to OUT2, ``[e3, P)`` to OUT3
    (each cast to its output's dtype; an empty segment writes nothing). Fixed summation order."""
    pid = tl.program_id(0).to(tl.int64)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < P
    acc = tl.zeros([BLOCK_C], tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        v = tl.load(PART + g[:, None] * spg + c[None, :], mask=(g < G)[:, None] & c_ok[None, :], other=0.0)
        acc += tl.sum(v, 0)
    s0 = c < e1
    s1 = (c >= e1) & (c < e2)
    s2 = (c >= e2) & (c < e3)
    s3 = (c >= e3) & c_ok
    tl.store(OUT0 + tl.where(s0, c, 0), acc.to(OUT0.dtype.element_ty), mask=s0)
    tl.store(OUT1 + tl.where(s1, c - e1, 0), acc.to(OUT1.dtype.element_ty), mask=s1)
    tl.store(OUT2 + tl.where(s2, c - e2, 0), acc.to(OUT2.dtype.element_ty), mask=s2)
    tl.store(OUT3 + tl.where(s3, c - e3, 0), acc.to(OUT3.dtype.element_ty), mask=s3)


def sum_partials(part: torch.Tensor, outs) -> None:
    """Reduce an fp32 ``[G, P]`` partial-sum buffer over G into up to four contiguous outputs whose
    sizes add up to P (one launch). Shared with :mod:`interformer.kernels.pffn`."""
    outs = list(outs)
    sizes = [o.numel() for o in outs]
    assert 1 <= len(outs) <= 4 and sum(sizes) == part.shape[1]
    while len(outs) < 4:
        outs.append(outs[0])
        sizes.append(0)
    G, P = part.shape
    e1 = sizes[0]
    e2 = e1 + sizes[1]
    e3 = e2 + sizes[2]
    if P == 0:
        return
    BLOCK_C = 128
    _sum_partials_kernel[(triton.cdiv(P, BLOCK_C),)](
        outs[0], outs[1], outs[2], outs[3], part, G, P, e1, e2, e3, part.stride(0),
        BLOCK_G=16, BLOCK_C=BLOCK_C,
    )


# ============================================================================ launchers
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots as 3-pass tf32 on GPU (about fp32 accuracy); ignored for fp16/bf16."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _config(n_in: int, n_out: int, d: int, backward: bool) -> Tuple[int, int, int, int, int]:
    """(BS, NIP, NOP, DP, num_warps); see the module docstring."""
    nip, nop, dp = max(16, _next_pow2(n_in)), max(16, _next_pow2(n_out)), max(16, _next_pow2(d))
    bs = max(1, min(8, 8192 // (nip * dp)))
    if backward:
        bs = max(1, bs // 2)
    bs = 1 << (bs.bit_length() - 1)  # power of two
    warps = 8 if bs * nop * dp > 4096 or (backward and dp >= 128) else 4
    return bs, nip, nop, dp, warps


@functools.lru_cache(maxsize=None)
def _max_programs(device: torch.device) -> int:
    """Persistent-grid size of the backward: the SM count on a GPU, 2 under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _gated_lce_fwd_impl(x, weight, bias, gate_weight, gate_bias):
    B, n_in, d = x.shape
    n_out = weight.shape[1]
    out = torch.empty((B, n_out, d), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    bs, nip, nop, dp, warps = _config(n_in, n_out, d, False)
    _glce_fwd_kernel[(triton.cdiv(B, bs),)](
        out, x, weight, bias, gate_weight, gate_bias,
        B, n_in, n_out, d,
        *x.stride(), *weight.stride(), *gate_weight.stride(), *out.stride(),
        BS=bs, NIP=nip, NOP=nop, DP=dp, PREC=_precision(x.dtype), num_warps=warps,
    )
    return out


def _gated_lce_bwd_impl(grad_out, x, weight, bias, gate_weight, gate_bias):
    B, n_in, d = x.shape
    n_out = weight.shape[1]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    grads = [torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (gate_weight, gate_bias, weight, bias)]
    bs, nip, nop, dp, warps = _config(n_in, n_out, d, True)
    n_blocks = triton.cdiv(B, bs)
    if n_blocks == 0:
        for g in grads:
            g.zero_()
        return (dx, grads[2], grads[3], grads[0], grads[1])
    G = min(n_blocks, _max_programs(x.device))
    P = d * d + d + n_in * n_out + n_out
    part = torch.empty((G, P), device=x.device, dtype=torch.float32)
    _glce_bwd_kernel[(G,)](
        dx, part, grad_out, x, weight, bias, gate_weight, gate_bias,
        B, n_in, n_out, d, n_blocks,
        *dx.stride(), *grad_out.stride(),
        *x.stride(), *weight.stride(), *gate_weight.stride(), part.stride(0),
        BS=bs, NIP=nip, NOP=nop, DP=dp, PREC=_precision(x.dtype), num_warps=warps,
    )
    sum_partials(part, grads)
    dgw, dgb, dw, db = grads
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
    """Forward: ``[B, n_out, d]`` in x's dtype."""
    return _gated_lce_fwd_impl(x, weight, bias, gate_weight, gate_bias)


@gated_lce_fwd.register_fake
def _gated_lce_fwd_fake(x, weight, bias, gate_weight, gate_bias):
    return x.new_empty((x.shape[0], weight.shape[1], x.shape[2]))


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


def _backward(ctx, grad_out):
    if grad_out is None:
        return None, None, None, None, None
    return torch.ops.interformer.gated_lce_bwd(grad_out, *ctx.saved_tensors)


gated_lce_fwd.register_autograd(_backward, setup_context=_setup_context)


# ============================================================================ public function
def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check(x, weight, bias, gate_weight, gate_bias) -> None:
    named = (("x", x, 3), ("weight", weight, 2), ("bias", bias, 1), ("gate_weight", gate_weight, 2),
             ("gate_bias", gate_bias, 1))
    for name, t, rank in named:
        if not isinstance(t, torch.Tensor) or t.dim() != rank:
            raise ValueError(f"gated_lce: {name} must be a {rank}-D tensor, got {_shape(t)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"gated_lce: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    B, n_in, d = x.shape
    if weight.shape[0] != n_in:
        raise ValueError(f"gated_lce: weight {_shape(weight)} must be [n_in={n_in}, n_out] for x {_shape(x)}")
    n_out = weight.shape[1]
    if bias.shape != (n_out,):
        raise ValueError(f"gated_lce: bias {_shape(bias)} must be [n_out={n_out}]")
    if gate_weight.shape != (d, d):
        raise ValueError(f"gated_lce: gate_weight {_shape(gate_weight)} must be [d={d}, d={d}]")
    if gate_bias.shape != (d,):
        raise ValueError(f"gated_lce: gate_bias {_shape(gate_bias)} must be [d={d}]")
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
    _check(x, weight, bias, gate_weight, gate_bias)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        x = x.to(torch.get_autocast_dtype(dev))
    else:
        dtypes = {t.dtype for t in (x, weight, bias, gate_weight, gate_bias)}
        if len(dtypes) != 1:
            raise ValueError(
                "gated_lce: x, weight, bias, gate_weight and gate_bias must share one dtype outside autocast, got "
                f"{x.dtype}, {weight.dtype}, {bias.dtype}, {gate_weight.dtype}, {gate_bias.dtype}"
            )
    B, n_in, d = x.shape
    if d > MAX_D or n_in > MAX_N_IN or x.numel() == 0 or weight.shape[1] == 0:
        from interformer import reference

        with torch.autocast(dev, enabled=False):
            return reference.gated_lce(x, *(t.to(x.dtype) for t in (weight, bias, gate_weight, gate_bias)))
    return torch.ops.interformer.gated_lce_fwd(x, weight, bias, gate_weight, gate_bias)
