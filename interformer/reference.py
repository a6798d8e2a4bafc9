"""Eager PyTorch references of every fused op: one function per op.

These functions are the eager path of the modules, the reference the fused kernels are tested
against, and the baseline the benchmarks time. Each fused kernel in ``interformer.kernels.<file>``
exposes a function of the same name and signature.

They compute in the dtype of their inputs (so that an eager run in fp16/bf16 gives the
low-precision error bound of DESIGN §5) and treat ``lengths`` as "the number of valid leading rows"
of the tensor they are given: rows at positions ``>= lengths[b]`` are padding.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "row_mask",
    "gated_lce",
    "pffn_mlp",
    "pffn_linear",
    "cross_net",
    "low_rank_cross_net",
    "dot_interaction",
    "feed_forward",
    "rotary",
    "attention",
    "pooled_attention",
    "add_layer_norm",
    "grouped_embedding",
]


def row_mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean ``[B, length]``: True where position < lengths[b]."""
    return torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]


# ----------------------------------------------------------------------------- gated LCE
def gated_lce(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
) -> torch.Tensor:
    """Self-gating linear compressed embedding.

    ``Y[b, m, :] = sum_n weight[n, m] * x[b, n, :] + bias[m]``; ``out = Y * sigmoid(Y @ gate_weight^T + gate_bias)``.

    x ``[B, n_in, d]``, weight ``[n_in, n_out]``, bias ``[n_out]``, gate_weight ``[d, d]``
    (``nn.Linear`` layout), gate_bias ``[d]`` -> ``[B, n_out, d]``.
    """
    return _gated_lce_with(x, weight, bias, lambda y: F.linear(y, gate_weight, gate_bias))


def _gated_lce_with(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gate) -> torch.Tensor:
    """:func:`gated_lce` with the gate a function of ``Y`` (``GatedLCE`` passes its ``gate`` module
    when calling it differs from reading its weights: a hook, pruning, another class)."""
    y = torch.einsum("bnd,nm->bmd", x, weight) + bias[None, :, None]
    return y * torch.sigmoid(gate(y))


# ----------------------------------------------------------------------------- PFFN
def pffn_mlp(
    s: torch.Tensor,
    lengths: torch.Tensor,
    w_b: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """``s + LN(s) @ w_b[b]`` per sample, padded rows zero.

    s ``[B, L, d]``, lengths ``[B]`` (valid rows of s), w_b ``[B, d, d]`` (already scaled).
    """
    return _pffn_mlp_with(s, lengths, w_b, lambda t: F.layer_norm(t, (t.shape[-1],), ln_weight, ln_bias, eps))


def _pffn_mlp_with(s: torch.Tensor, lengths: torch.Tensor, w_b: torch.Tensor, norm) -> torch.Tensor:
    """:func:`pffn_mlp` with the LayerNorm a function (``PersonalizedFFN`` passes its ``norm``
    module when calling it differs from reading its parameters)."""
    out = s + torch.bmm(norm(s), w_b)
    return out * row_mask(lengths, s.shape[1]).unsqueeze(-1).to(out.dtype)


def pffn_linear(
    s: torch.Tensor,
    lengths: torch.Tensor,
    x_sum: torch.Tensor,
    a: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Linear-mode PFFN, ``W_b = x_sum[b]^T a``: ``s + (LN(s) @ x_sum[b]^T) @ a``, padded rows zero.

    s ``[B, L, d]``, x_sum ``[B, n_sum, d]``, a ``[n_sum, d]``. The ``d x d`` matrix is never formed.
    """
    return _pffn_linear_with(s, lengths, x_sum, a,
                             lambda t: F.layer_norm(t, (t.shape[-1],), ln_weight, ln_bias, eps))


def _pffn_linear_with(s: torch.Tensor, lengths: torch.Tensor, x_sum: torch.Tensor, a: torch.Tensor,
                      norm) -> torch.Tensor:
    """:func:`pffn_linear` with the LayerNorm a function (as :func:`_pffn_mlp_with`)."""
    out = s + torch.matmul(torch.bmm(norm(s), x_sum.transpose(1, 2)), a)
    return out * row_mask(lengths, s.shape[1]).unsqueeze(-1).to(out.dtype)


# ----------------------------------------------------------------------------- DCN
def cross_net(
    x0: torch.Tensor, kernels: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Full-rank DCNv2 cross layers, ``x_{i+1} = x0 * (W_i x_i + b_i) + x_i``.

    x0 ``[B, D]``; kernels ``[D, D]`` each; biases ``[D, 1]`` (torchrec's layout) or ``[D]`` each.
    """
    x = x0
    for w, b in zip(kernels, biases):
        x = x0 * (F.linear(x, w) + b.reshape(-1)) + x
    return x


def low_rank_cross_net(
    x0: torch.Tensor,
    w_kernels: Sequence[torch.Tensor],
    v_kernels: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Low-rank cross layers, ``x_{i+1} = x0 * (U_i (V_i x_i) + b_i) + x_i``.

    w_kernels (U) ``[D, r]`` each, v_kernels (V) ``[r, D]`` each, biases ``[D]`` (torchrec's current layout) or
    ``[D, 1]`` each.
    """
    x = x0
    for w, v, b in zip(w_kernels, v_kernels, biases):
        x = x0 * (F.linear(F.linear(x, v), w) + b.reshape(-1)) + x
    return x


# ----------------------------------------------------------------------------- DOT
def dot_interaction(z: torch.Tensor) -> torch.Tensor:
    """Pairwise inner products of the tokens, strict upper triangle.

    z ``[B, N, d]`` -> ``[B, N(N-1)/2]`` ordered as ``torch.triu_indices(N, N, 1)`` (row-major, i < j).
    """
    n = z.shape[1]
    p = torch.bmm(z, z.transpose(1, 2))
    iu = torch.triu_indices(n, n, 1, device=z.device)
    return p[:, iu[0], iu[1]]


# ----------------------------------------------------------------------------- feed-forward block
def feed_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """``silu(x @ w1^T + b1) @ w2^T + b2``: ``nn.Linear -> SiLU -> nn.Linear`` (the Interaction Arch's
    FFN with its dropout off; the sequence tokenizer's mask MLP).

    x ``[..., K]``, w1 ``[H, K]``, b1 ``[H]``, w2 ``[N, H]``, b2 ``[N]`` -> ``[..., N]``.
    """
    return F.linear(F.silu(F.linear(x, w1, b1)), w2, b2)


# ----------------------------------------------------------------------------- attention
def rotary(x: torch.Tensor, base: float, sign: float = 1.0) -> torch.Tensor:
    """Rotary embedding, rotate-half convention, at positions ``0 .. L-1``.

    x ``[B, L, H, dh]`` (dh even). Pair ``(i, i + dh/2)`` rotates by angle ``pos * base^(-2i/dh)``.
    ``sign=-1`` applies the inverse rotation.
    """
    cos, sin = rotary_table(x.shape[1], x.shape[-1], base, x.dtype, x.device, sign)
    return apply_rotary(x, cos, sin)


def rotary_table(L: int, dh: int, base: float, dtype: torch.dtype, device: torch.device, sign: float = 1.0):
    """``(cos, sin)``, each ``[1, L, 1, dh/2]`` in ``dtype``: the angles of :func:`rotary` (computed
    in fp32, or fp64 for fp64), for callers that build the table once and reuse it."""
    half = dh // 2
    ct = torch.promote_types(dtype, torch.float32)  # float64 stays float64 (the reference checks)
    inv_freq = base ** (-torch.arange(half, device=device, dtype=ct) * 2.0 / dh)
    angle = torch.arange(L, device=device, dtype=ct)[:, None] * inv_freq[None, :]
    return angle.cos().to(dtype)[None, :, None, :], (sign * angle.sin()).to(dtype)[None, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary of x ``[B, L, H, dh]`` with a :func:`rotary_table`."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


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
    """Multi-head attention with key padding from ``lengths`` and optional in-place rotary.

    q ``[Bq, Lq, H, dh]`` with ``Bq`` equal to B or 1 (queries shared over the batch, e.g. PMA's
    learned queries); k, v ``[B, Lk, H, dh]``; lengths ``[B]``: keys at positions ``>= lengths[b]``
    are masked. Returns ``[B, Lq, H, dh]``.

    * ``rope_base``: None = no rotary; otherwise rotary (rotate-half) on k at positions
      ``0 .. Lk-1`` and, when ``rope_q``, on q at positions ``0 .. Lq-1``.
    * ``mask_queries``: query rows at positions ``>= lengths[b]`` output exactly 0 (self-attention).
    * ``causal``: key j is visible to query i only when ``j <= i``.
    * A query with no visible key outputs 0, never NaN, and passes no gradient.
    * ``sm_scale`` defaults to ``1/sqrt(dh)``.
    """
    B, Lk, H, dh = k.shape
    Lq = q.shape[1]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(dh)
    if rope_base is not None:
        k = rotary(k, rope_base)
        if rope_q:
            q = rotary(q, rope_base)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.expand(B, -1, -1, -1), k) * sm_scale
    visible = row_mask(lengths, Lk)[:, None, None, :]  # [B,1,1,Lk]
    if causal:
        tri = torch.arange(Lk, device=k.device)[None, :] <= torch.arange(Lq, device=k.device)[:, None]
        visible = visible & tri[None, None]
    # Softmax in at least fp32. A masked key's score is -inf, so it takes no weight whatever the
    # visible scores are (with a finite fill, finfo.min, a row whose visible scores were all -inf
    # gave its weight to the masked keys instead of 0/0 = NaN); a row with no visible key is all
    # zeros instead, free of NaN (its softmax is uniform and is zeroed below).
    acc = torch.promote_types(scores.dtype, torch.float32)
    keep = visible.any(dim=-1, keepdim=True)  # [B,1,Lq or 1,1]
    scores = scores.to(acc).masked_fill(~visible, -math.inf).masked_fill(~keep, 0.0)
    p = torch.softmax(scores, dim=-1).to(q.dtype)
    if mask_queries:
        keep = keep & row_mask(lengths, Lq)[:, None, :, None]
    p = p * keep.to(p.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


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
    """PMA pooling (``PoolingMultiHeadAttention``): the learned ``query [nq, d]`` (no projection)
    attends over the valid rows of ``s [B, L, d]`` through the key and value projections, then the
    output projection; a row with ``lengths[b] == 0`` returns exact zeros. Weights and biases are
    ``nn.Linear``'s (``[d, d]``, ``[d]``). Returns ``[B, nq, d]``."""
    return projected_pma(attention, s, lengths, query, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias, num_heads)


def projected_pma(attn, s, lengths, query, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias, num_heads):
    """:func:`pooled_attention` with K and V projected and ``attn`` (an attention function with
    :func:`attention`'s signature) over ``d / num_heads``-wide heads; the fused op uses it, with its
    kernel, for models too wide to fold."""
    return _pma_with(attn, s, lengths, query, lambda t: F.linear(t, k_weight, k_bias),
                     lambda t: F.linear(t, v_weight, v_bias), lambda t: F.linear(t, o_weight, o_bias), num_heads)


def _pma_with(attn, s, lengths, query, k_proj, v_proj, o_proj, num_heads):
    """:func:`projected_pma` with the three projections functions (``PoolingMultiHeadAttention``
    passes its modules when calling one differs from reading its weights: a hook, pruning, ...)."""
    B, L, d = s.shape
    nq, H = query.shape[0], num_heads
    k = k_proj(s).view(B, L, H, d // H)
    v = v_proj(s).view(B, L, H, d // H)
    q = query.to(k.dtype).view(1, nq, H, d // H)  # autocast leaves raw parameters in fp32
    o = attn(q, k, v, lengths, causal=False, rope_base=None, rope_q=False, mask_queries=False)
    out = o_proj(o.reshape(B, nq, d))
    return out * (lengths > 0).to(out.dtype)[:, None, None]


# ----------------------------------------------------------------------------- residual + LayerNorm
def add_layer_norm(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``LayerNorm(x + residual)`` over the last dimension (``residual=None``: ``LayerNorm(x)``),
    exactly ``nn.LayerNorm(N, eps)(x + residual)`` with ``weight``/``bias`` ``[N]`` (None: weight 1 / bias
    0, as ``F.layer_norm`` takes them)."""
    h = x if residual is None else x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)


# ----------------------------------------------------------------------------- embedding lookups
def grouped_embedding(ids: torch.Tensor, tables: Sequence[torch.nn.Module]) -> torch.Tensor:
    """One lookup per field, stacked: ``out[b, ..., j, :] = tables[j](ids[b, j, ...])``.

    ids ``[B, F, *rest]`` (integer, field axis 1), ``tables`` F ``nn.Embedding`` of one width d ->
    ``[B, *rest, F, d]``. Each table MODULE is called, so its own options (``padding_idx``,
    ``max_norm``, ``sparse``, ``scale_grad_by_freq``) hold: one autograd node per table.
    """
    if isinstance(ids, torch.fx.Proxy):  # torch.fx.symbolic_trace: a Proxy cannot be unbound
        cols = [ids[:, j] for j in range(len(tables))]
    else:
        if ids.dim() < 2 or ids.shape[1] != len(tables):
            raise ValueError(f"grouped_embedding: ids must be [B, {len(tables)}, ...] (one field per table), "
                             f"got {tuple(ids.shape)}")
        cols = ids.unbind(1)  # the F fields as views in one op
    return torch.stack([t(col) for t, col in zip(tables, cols)], dim=-2)
