"""Every eager module against an independent float64 evaluation of its DESIGN §3 formula.

The formulas below are written from DESIGN §3 alone, with explicit loops and einsums over the
module's own parameters: they never call ``interformer.reference`` or a module's helpers. Each test
runs the module (``.double()``, ``backend="eager"``) and the formula on the same float64 inputs,
pulls a random upstream gradient through both, and compares the output and the gradient of every
floating input and every parameter by ``rel_err <= 1e-10``. Sizes are odd (d = 24, 40; T = 1, 7;
B = 1, 3), lengths include 0 and T, and some inputs are non-contiguous views.

The second half runs ``torch.autograd.gradcheck`` on the small modules, parameters included.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Sequence

import pytest
import torch
from torch.func import functional_call

from interformer import (
    CrossArch,
    CrossNet,
    DenseTokenizer,
    DotInteraction,
    FeedForward,
    GatedLCE,
    InteractionArch,
    InterFormerConfig,
    LowRankCrossNet,
    PersonalizedFFN,
    PoolingMultiHeadAttention,
    RotaryMultiHeadAttention,
    SequenceArch,
    SequenceMaskNet,
    recent_tokens,
)
from utils import first_mismatch, perturb_constant_parameters, rel_err

F64 = torch.float64
TOL = 1e-10
EPS = 1e-5


# ============================================================================ float64 formulas
# Written from DESIGN §3 only. ``P`` maps the module's parameter names to float64 leaves.


def lin(x, w, b=None):
    """``nn.Linear`` semantics: ``y = x W^T + b``."""
    y = torch.einsum("...i,oi->...o", x, w)
    return y if b is None else y + b


def sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def silu(x):
    return x * sigmoid(x)


def layer_norm(x, w, b, eps=EPS):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def valid_rows(lengths, L):
    """``[B, L, 1]`` float64: 1 where position < lengths[b], built by a loop."""
    m = torch.zeros(len(lengths), L, 1, dtype=F64)
    for b, n in enumerate(lengths.tolist()):
        m[b, :n] = 1.0
    return m


def softmax(x):
    e = torch.exp(x - x.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def gated_lce_f(P, x, pre=""):
    """``Y[b,m,:] = sum_n W[n,m] X[b,n,:] + c[m]``, ``out = Y * sigmoid(Linear_d(Y))``."""
    W, c = P[pre + "weight"], P[pre + "bias"]
    n_in, n_out = W.shape
    Y = torch.stack([sum(W[n, m] * x[:, n, :] for n in range(n_in)) + c[m] for m in range(n_out)], dim=1)
    return Y * sigmoid(lin(Y, P[pre + "gate.weight"], P[pre + "gate.bias"]))


def pffn_f(P, s, x_sum, lengths, mode, pre="", eps=EPS):
    """``S + LN(S) @ W_b`` with W_b from the hypernetwork (mlp) or ``X_sum_b^T A`` (linear); padded rows 0."""
    B, L, d = s.shape
    if mode == "mlp":
        h = silu(lin(x_sum.reshape(B, -1), P[pre + "hyper.0.weight"], P[pre + "hyper.0.bias"]))
        Wb = lin(h, P[pre + "hyper.2.weight"], P[pre + "hyper.2.bias"]).reshape(B, d, d) / math.sqrt(d)
    else:
        Wb = torch.einsum("bni,nj->bij", x_sum, P[pre + "A"])  # X_sum_b^T [d, n] @ A [n, d]
    hn = layer_norm(s, P[pre + "norm.weight"], P[pre + "norm.bias"], eps)
    out = s + torch.einsum("bli,bij->blj", hn, Wb)
    return out * valid_rows(lengths, L)


def cross_f(P, x0, num_layers, pre=""):
    """Full-rank DCNv2: ``x_{i+1} = x0 * (W_i x_i + b_i) + x_i``; torchrec names ``kernels``/``bias``."""
    x = x0
    for i in range(num_layers):
        x = x0 * (torch.einsum("ij,bj->bi", P[f"{pre}kernels.{i}"], x) + P[f"{pre}bias.{i}"][:, 0]) + x
    return x


def low_rank_cross_f(P, x0, num_layers, pre=""):
    """Low-rank DCNv2: ``W_i = U_i V_i`` (``W_kernels`` = U [D, r], ``V_kernels`` = V [r, D], ``bias`` [D])."""
    x = x0
    for i in range(num_layers):
        U, V, b = P[f"{pre}W_kernels.{i}"], P[f"{pre}V_kernels.{i}"], P[f"{pre}bias.{i}"]
        assert b.shape == x0.shape[1:], b.shape  # torchrec's current layout
        x = x0 * (torch.einsum("ir,rj,bj->bi", U, V, x) + b) + x
    return x


def dot_f(P, z, pre=""):
    """Strict upper triangle of ``Z Z^T`` (pairs i < j, row-major) -> Linear -> ``[B, N, d]``."""
    B, N, d = z.shape
    pairs = [(i, j) for i in range(N) for j in range(i + 1, N)]
    if pairs:
        p = torch.stack([(z[:, i, :] * z[:, j, :]).sum(-1) for i, j in pairs], dim=1)
    else:
        p = z.new_zeros(B, 0)
    return lin(p, P[pre + "proj.weight"], P[pre + "proj.bias"]).reshape(B, N, d)


def feed_forward_f(P, x, pre=""):
    """``Linear(d_in, hidden) -> SiLU [-> Dropout] -> Linear(hidden, d_out)`` with the dropout off:
    ``silu(x W1^T + b1) W2^T + b2``, ``silu(h) = h sigmoid(h)``; children 0 and 2 (3 after a dropout)."""
    last = pre + ("3." if pre + "3.weight" in P else "2.")
    h = lin(x, P[pre + "0.weight"], P[pre + "0.bias"])
    return lin(h * sigmoid(h), P[last + "weight"], P[last + "bias"])


def rope_f(x, base):
    """Rotate-half rotary of ``x [L, dh]`` at positions 0..L-1, angles in float64."""
    L, dh = x.shape
    half = dh // 2
    pos = torch.arange(L, dtype=F64)[:, None]
    i = torch.arange(half, dtype=F64)[None, :]
    theta = pos * base ** (-2.0 * i / dh)
    c, s = torch.cos(theta), torch.sin(theta)
    x1, x2 = x[:, :half], x[:, half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def rotary_mha_f(P, s, vlen, H, base=10000.0, pre="", causal=False):
    """Self-attention over the first vlen[b] rows with rotary q/k; padded query rows output 0;
    ``causal``: query i sees keys 0..i only."""
    B, L, d = s.shape
    dh = d // H
    qkv = lin(s, P[pre + "qkv.weight"], P[pre + "qkv.bias"])
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    rows = []
    for b in range(B):
        n = int(vlen[b])
        heads = []
        for h in range(H):
            sl = slice(h * dh, (h + 1) * dh)
            qh, kh, vh = rope_f(q[b, :, sl], base), rope_f(k[b, :, sl], base), v[b, :, sl]
            o = torch.zeros(L, dh, dtype=F64)
            if n > 0:
                scores = torch.einsum("id,jd->ij", qh[:n], kh[:n]) / math.sqrt(dh)
                if causal:
                    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
                p = softmax(scores)
                o = torch.cat([torch.einsum("ij,jd->id", p, vh[:n]), torch.zeros(L - n, dh, dtype=F64)])
            heads.append(o)
        y = lin(torch.cat(heads, dim=-1), P[pre + "out_proj.weight"], P[pre + "out_proj.bias"])
        rows.append(torch.cat([y[:n], torch.zeros(L - n, d, dtype=F64)]))
    return torch.stack(rows)


def pma_f(P, s, lengths, H, pre=""):
    """Learned queries (no projection) attend over the valid rows; K/V/O projections; empty row -> 0."""
    B, L, d = s.shape
    dh = d // H
    query = P[pre + "query"]
    nq = query.shape[0]
    rows = []
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            rows.append(torch.zeros(nq, d, dtype=F64))
            continue
        k = lin(s[b, :n], P[pre + "k_proj.weight"], P[pre + "k_proj.bias"])
        v = lin(s[b, :n], P[pre + "v_proj.weight"], P[pre + "v_proj.bias"])
        heads = []
        for h in range(H):
            sl = slice(h * dh, (h + 1) * dh)
            p = softmax(torch.einsum("qd,jd->qj", query[:, sl], k[:, sl]) / math.sqrt(dh))
            heads.append(torch.einsum("qj,jd->qd", p, v[:, sl]))
        rows.append(lin(torch.cat(heads, dim=-1), P[pre + "o_proj.weight"], P[pre + "o_proj.bias"]))
    return torch.stack(rows)


def recent_f(body, lengths, R):
    """Slot i holds body[b, len - R + i] (oldest first); slots before position 0 are zero."""
    B, T, d = body.shape
    rows = []
    for b in range(B):
        n = int(lengths[b])
        slots = [body[b, n - R + i] if n - R + i >= 0 else torch.zeros(d, dtype=F64) for i in range(R)]
        rows.append(torch.stack(slots))
    return torch.stack(rows)


def masknet_f(P, seq, lengths, pre=""):
    """``S = Linear(kd->d)(Z * MLP_mask(Z))``, Z the concatenated channel embeddings; padded rows 0."""
    k, T = seq.shape[1], seq.shape[2]
    # id 0 is padding (padding_idx=0): a zero vector that receives no gradient
    z = torch.cat([P[f"{pre}tables.{c}.weight"][seq[:, c]] * (seq[:, c] != 0)[..., None] for c in range(k)], dim=-1)
    m = lin(silu(lin(z, P[pre + "mask_mlp.0.weight"], P[pre + "mask_mlp.0.bias"])),
            P[pre + "mask_mlp.2.weight"], P[pre + "mask_mlp.2.bias"])
    return lin(z * m, P[pre + "proj.weight"], P[pre + "proj.bias"]) * valid_rows(lengths, T)


def dense_f(P, dense, mode):
    if mode == "single":
        return lin(dense, P["linear.weight"], P["linear.bias"])[:, None, :]
    n = dense.shape[1]
    return torch.stack([dense[:, j, None] * P["weight"][j] + P["bias"][j] for j in range(n)], dim=1)


def sequence_arch_f(P, s, x_sum, vlen, c: InterFormerConfig):
    s_mid = pffn_f(P, s, x_sum, vlen, c.pffn_mode, pre="pffn.", eps=c.ln_eps)
    a = rotary_mha_f(P, layer_norm(s_mid, P["attn_norm.weight"], P["attn_norm.bias"], c.ln_eps), vlen,
                     c.num_heads, c.rope_base, pre="attn.")
    return s_mid + a


def interaction_arch_f(P, x, s_sum, c: InterFormerConfig):
    n = x.shape[1]
    z = torch.cat([x, s_sum], dim=1)
    for l in range(c.dhen_layers):
        pre = f"layers.{l}."
        outs = []
        if c.backbone in ("dhen", "dot"):
            outs.append(dot_f(P, z, pre + "dot."))
        if c.backbone in ("dhen", "dcn"):
            flat = z.reshape(z.shape[0], -1)
            f = cross_f if c.dcn_rank is None else low_rank_cross_f
            outs.append(f(P, flat, c.dcn_layers, pre + "dcn.").reshape(z.shape))
        mixed = lin(torch.cat(outs, dim=-1), P[pre + "mix.weight"], P[pre + "mix.bias"])
        z = layer_norm(z + mixed, P[pre + "norm.weight"], P[pre + "norm.bias"], c.ln_eps)
    ffn = lin(silu(lin(z[:, :n], P["ffn.0.weight"], P["ffn.0.bias"])), P["ffn.3.weight"], P["ffn.3.bias"])
    return layer_norm(x + ffn, P["norm.weight"], P["norm.bias"], c.ln_eps)


def cross_arch_f(P, x, s, lengths, c: InterFormerConfig):
    x_sum = gated_lce_f(P, x, "nonseq.")
    body = s[:, c.n_cls :]
    parts = [s[:, : c.n_cls]]
    if c.n_pma:
        parts.append(pma_f(P, body, lengths, c.num_heads, "pma."))
    if c.n_recent:
        parts.append(recent_f(body, lengths, c.n_recent))
    return x_sum, gated_lce_f(P, torch.cat(parts, dim=1), "seq.")


# ============================================================================ comparison harness


def _close(out, ref, name):
    out, ref = out.detach(), ref.detach()
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    bad = (~torch.isfinite(out)).nonzero().tolist()
    assert not bad, f"{name}: non-finite values in the module's result at {bad[:5]}"
    if ref.norm() < 1e-8:  # an analytically zero reference (e.g. a softmax-invariant bias): absolute check
        err = float((out - ref).norm())
        assert err <= 1e-12, f"{name}: |out - ref| = {err:.3e} with |ref| ~ 0"
        return
    err = rel_err(out, ref)
    assert err <= TOL, f"{name}: relative error {err:.3e} > {TOL:.0e}; largest differences at {first_mismatch(out, ref)}"


def check_against_formula(
    module: torch.nn.Module | None,
    inputs: Sequence[torch.Tensor],
    run: Callable,
    formula: Callable,
    make_view: Callable = lambda *a: a,
) -> None:
    """Compare ``run(module, *views)`` with ``formula(P, *views)``: outputs, input and parameter grads.

    ``inputs`` are the leaves (float ones get gradients); ``make_view`` maps them to what is passed
    (e.g. a transposed, non-contiguous view of a leaf).
    """
    def leaves():
        return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]

    named = dict(module.named_parameters()) if module is not None else {}
    for p in named.values():
        p.grad = None
    x_mod = leaves()
    out_mod = run(module, *make_view(*x_mod))
    out_mod = out_mod if isinstance(out_mod, tuple) else (out_mod,)
    ups = [torch.randn_like(o) for o in out_mod]
    sum((o * g).sum() for o, g in zip(out_mod, ups)).backward()

    P: Dict[str, torch.Tensor] = {n: p.detach().clone().requires_grad_(True) for n, p in named.items()}
    x_ref = leaves()
    out_ref = formula(P, *make_view(*x_ref))
    out_ref = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    sum((o * g).sum() for o, g in zip(out_ref, ups)).backward()

    for i, (o, r) in enumerate(zip(out_mod, out_ref)):
        _close(o, r, f"output {i}")
    for i, (a, r) in enumerate(zip(x_mod, x_ref)):
        if a.is_floating_point():
            ga = a.grad if a.grad is not None else torch.zeros_like(a)
            gr = r.grad if r.grad is not None else torch.zeros_like(r)
            _close(ga, gr, f"grad of input {i}")
    for n, p in named.items():
        ga = p.grad if p.grad is not None else torch.zeros_like(p)
        gr = P[n].grad if P[n].grad is not None else torch.zeros_like(p)
        _close(ga, gr, f"grad of parameter {n}")


def randn(*shape):
    return torch.randn(*shape, dtype=F64)


# ============================================================================ per-module tests


@pytest.mark.parametrize("B,n_in,n_out,d", [(1, 1, 3, 24), (3, 7, 4, 40)])
def test_gated_lce(B, n_in, n_out, d):
    m = GatedLCE(n_in, n_out, d, backend="eager").double()
    x = randn(B, d, n_in)  # passed transposed: non-contiguous [B, n_in, d]
    check_against_formula(m, [x], lambda m, x: m(x), lambda P, x: gated_lce_f(P, x),
                          make_view=lambda x: (x.transpose(1, 2),))


@pytest.mark.parametrize("mode", ["mlp", "linear"])
@pytest.mark.parametrize("B,L,d,n_sum,lengths", [(1, 1, 24, 1, [1]), (3, 7, 40, 3, [7, 0, 4]), (1, 7, 24, 2, [0])])
def test_pffn(mode, B, L, d, n_sum, lengths):
    m = PersonalizedFFN(d, n_sum, mode=mode, hidden=9, backend="eager").double()
    with torch.no_grad():  # LN affine away from its (1, 0) init so that its gradients matter
        m.norm.weight.normal_(1.0, 0.3)
        m.norm.bias.normal_(0.0, 0.3)
    s = randn(B, L, d)  # padded rows hold non-zero values: the module must zero them
    x_sum = randn(n_sum, B, d)
    lens = torch.tensor(lengths)
    check_against_formula(
        m, [s, x_sum, lens],
        lambda m, s, xs, ln: m(s, xs, ln),
        lambda P, s, xs, ln: pffn_f(P, s, xs, ln, mode),
        make_view=lambda s, xs, ln: (s, xs.transpose(0, 1), ln),
    )


@pytest.mark.parametrize("B,D,layers", [(1, 24, 1), (3, 40, 3)])
def test_cross_net(B, D, layers):
    m = CrossNet(D, layers, backend="eager").double()
    with torch.no_grad():
        for b in m.bias:
            b.normal_()
    check_against_formula(m, [randn(B, D)], lambda m, x: m(x), lambda P, x: cross_f(P, x, layers))


@pytest.mark.parametrize("B,D,layers,rank", [(1, 24, 1, 1), (3, 40, 3, 7)])
def test_low_rank_cross_net(B, D, layers, rank):
    m = LowRankCrossNet(D, layers, rank, backend="eager").double()
    with torch.no_grad():
        for b in m.bias:
            b.normal_()
    x = randn(D, B)  # non-contiguous [B, D]
    check_against_formula(m, [x], lambda m, x: m(x), lambda P, x: low_rank_cross_f(P, x, layers),
                          make_view=lambda x: (x.t(),))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # N = 1: no pair, Linear(0, N*d)
@pytest.mark.parametrize("B,N,d", [(1, 1, 24), (3, 7, 40), (3, 2, 24)])
def test_dot_interaction(B, N, d):
    m = DotInteraction(N, d, backend="eager").double()
    check_against_formula(m, [randn(B, N, d)], lambda m, z: m(z), lambda P, z: dot_f(P, z))


@pytest.mark.parametrize(
    "lead,d_in,hidden,d_out,dropout",
    [((), 24, 9, 24, None), ((3,), 24, 40, 24, None), ((3, 7), 40, 9, 24, 0.0), ((1, 3, 7), 24, 96, 40, None)],
)
def test_feed_forward(lead, d_in, hidden, d_out, dropout):
    # dropout=0.0: the Interaction Arch's layout (the second Linear is child 3), nothing dropped
    m = FeedForward(d_in, hidden, d_out, dropout=dropout, backend="eager").double()
    x = randn(*lead, 2 * d_in)  # every other column: a non-contiguous [..., d_in]
    check_against_formula(m, [x], lambda m, x: m(x), lambda P, x: feed_forward_f(P, x),
                          make_view=lambda x: (x[..., ::2],))


@pytest.mark.parametrize(
    "B,L,d,H,lengths",
    [(1, 1, 24, 2, [1]), (3, 7, 24, 3, [7, 0, 3]), (3, 7, 40, 4, [2, 7, 1]), (1, 7, 40, 2, [0])],
)
def test_rotary_attention(B, L, d, H, lengths):
    m = RotaryMultiHeadAttention(d, H, backend="eager").double()
    s = randn(B, d, L)  # non-contiguous [B, L, d]; padded rows non-zero
    check_against_formula(
        m, [s, torch.tensor(lengths)],
        lambda m, s, ln: m(s, ln),
        lambda P, s, ln: rotary_mha_f(P, s, ln, H),
        make_view=lambda s, ln: (s.transpose(1, 2), ln),
    )


def test_rotary_attention_positions_long_sequence():
    """L = 50 (DESIGN's odd T list): large angles, where a low-precision angle table shows."""
    m = RotaryMultiHeadAttention(24, 2, backend="eager").double()
    check_against_formula(m, [randn(2, 50, 24), torch.tensor([50, 31])],
                          lambda m, s, ln: m(s, ln), lambda P, s, ln: rotary_mha_f(P, s, ln, 2))


@pytest.mark.parametrize(
    "B,L,d,H,nq,lengths",
    [(1, 1, 24, 2, 1, [1]), (3, 7, 24, 3, 2, [7, 0, 4]), (3, 7, 40, 4, 3, [1, 5, 7])],
)
def test_pma(B, L, d, H, nq, lengths):
    m = PoolingMultiHeadAttention(nq, d, H, backend="eager").double()
    s = randn(L, B, d)  # non-contiguous [B, L, d]
    check_against_formula(
        m, [s, torch.tensor(lengths)],
        lambda m, s, ln: m(s, ln),
        lambda P, s, ln: pma_f(P, s, ln, H),
        make_view=lambda s, ln: (s.transpose(0, 1), ln),
    )


def test_pma_empty_row_is_exactly_zero():
    m = PoolingMultiHeadAttention(2, 24, 3, backend="eager").double()
    s = randn(3, 7, 24).requires_grad_()
    out = m(s, torch.tensor([4, 0, 7]))
    assert torch.equal(out[1], torch.zeros_like(out[1])), "a length-0 row must give exact zeros"
    out.sum().backward()
    assert torch.isfinite(s.grad).all() and torch.equal(s.grad[1], torch.zeros_like(s.grad[1]))


@pytest.mark.parametrize("B,T,d,R,lengths", [(1, 1, 24, 2, [1]), (3, 7, 40, 3, [7, 0, 2]), (3, 7, 24, 1, [1, 7, 0])])
def test_recent_tokens(B, T, d, R, lengths):
    body = randn(B, T, d)
    check_against_formula(None, [body, torch.tensor(lengths)],
                          lambda _, x, ln: recent_tokens(x, ln, R), lambda P, x, ln: recent_f(x, ln, R))


def test_recent_tokens_order_by_hand():
    """Oldest first, zero slots before position 0, read off positions directly."""
    body = torch.arange(1, 6, dtype=F64).view(1, 5, 1).repeat(3, 1, 1)  # row value = position + 1
    out = recent_tokens(body, torch.tensor([5, 1, 0]), 3)[..., 0]
    assert out.tolist() == [[3.0, 4.0, 5.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize("B,T,d,vocabs,lengths", [(1, 1, 24, (5,), [1]), (3, 7, 24, (11, 6), [7, 0, 3]), (3, 7, 40, (9, 4, 3), [2, 5, 0])])
def test_sequence_masknet(B, T, d, vocabs, lengths):
    m = SequenceMaskNet(vocabs, d).double()
    # ids everywhere, padded positions included: the padded rows must still come out zero
    seq = torch.stack([torch.randint(0, v, (B, T)) for v in vocabs], dim=1)
    check_against_formula(m, [seq, torch.tensor(lengths)], lambda m, q, ln: m(q, ln),
                          lambda P, q, ln: masknet_f(P, q, ln))


@pytest.mark.parametrize("mode", ["single", "per_field"])
@pytest.mark.parametrize("B,n_dense,d", [(1, 1, 24), (3, 5, 40)])
def test_dense_tokenizer(mode, B, n_dense, d):
    m = DenseTokenizer(n_dense, d, mode).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    check_against_formula(m, [randn(n_dense, B)], lambda m, x: m(x), lambda P, x: dense_f(P, x, mode),
                          make_view=lambda x: (x.t(),))


def test_dense_tokenizer_no_fields():
    assert DenseTokenizer(0, 24)(torch.zeros(3, 0)).shape == (3, 0, 24)


# ============================================================================ whole arches


def arch_config(**kw):
    base = dict(d_model=24, num_heads=3, n_dense=2, sparse_vocab_sizes=(5, 7), seq_vocab_sizes=(9, 4),
                max_seq_len=7, n_sum=3, n_pma=2, n_recent=2, n_ssum=4, dcn_rank=5, pffn_hidden=11,
                head=(8,), backend="eager")
    base.update(kw)
    return InterFormerConfig(**base)


@pytest.mark.parametrize("pffn_mode", ["mlp", "linear"])
@pytest.mark.parametrize("d,H,lengths,ln_eps", [(24, 3, [7, 0, 4], 1e-5), (40, 4, [1, 7, 0], 1e-5),
                                                (24, 3, [7, 0, 4], 0.05)])
def test_sequence_arch(pffn_mode, d, H, lengths, ln_eps):
    """(``ln_eps = 0.05``: every LayerNorm must take the config's eps; at the default 1e-5 one that
    kept nn.LayerNorm's own default passed, the two being equal.)"""
    c = arch_config(d_model=d, num_heads=H, pffn_mode=pffn_mode, ln_eps=ln_eps)
    m = SequenceArch(c).double()
    assert perturb_constant_parameters(m)  # LayerNorms 1/0, zero cross biases: they would hide a term
    B, T = len(lengths), c.max_seq_len
    L = c.n_cls + T
    vlen = torch.tensor(lengths) + c.n_cls
    s = randn(B, L, d) * valid_rows(vlen, L)  # padded rows zero, as the model keeps them
    check_against_formula(m, [s, randn(B, c.n_sum, d), vlen], lambda m, s, xs, v: m(s, xs, v),
                          lambda P, s, xs, v: sequence_arch_f(P, s, xs, v, c))


@pytest.mark.parametrize("backbone,dcn_rank,dhen_layers,ln_eps", [("dhen", 5, 2, 1e-5), ("dhen", None, 1, 1e-5),
                                                                  ("dot", 5, 1, 1e-5), ("dcn", 3, 1, 1e-5),
                                                                  ("dhen", 5, 2, 0.05)])
def test_interaction_arch(backbone, dcn_rank, dhen_layers, ln_eps):
    """(``ln_eps = 0.05``: as in :func:`test_sequence_arch`.)"""
    c = arch_config(backbone=backbone, dcn_rank=dcn_rank, dhen_layers=dhen_layers, ln_eps=ln_eps)
    m = InteractionArch(c).double()
    assert perturb_constant_parameters(m)  # LayerNorms 1/0, zero cross biases: they would hide a term
    B = 3
    x = randn(B, c.n_tokens, c.d_model)
    s_sum = randn(B, c.d_model, c.n_ssum)  # non-contiguous
    check_against_formula(m, [x, s_sum], lambda m, x, ss: m(x, ss), lambda P, x, ss: interaction_arch_f(P, x, ss, c),
                          make_view=lambda x, ss: (x, ss.transpose(1, 2)))


@pytest.mark.parametrize("n_pma,n_recent,lengths", [(2, 2, [7, 0, 1]), (0, 3, [2, 7, 0]), (3, 0, [5, 1, 7])])
def test_cross_arch(n_pma, n_recent, lengths):
    c = arch_config(n_pma=n_pma, n_recent=n_recent)
    m = CrossArch(c).double()
    B, T = len(lengths), c.max_seq_len
    ln = torch.tensor(lengths)
    s = randn(B, c.n_cls + T, c.d_model) * valid_rows(ln + c.n_cls, c.n_cls + T)
    check_against_formula(m, [randn(B, c.n_tokens, c.d_model), s, ln], lambda m, x, s, l: m(x, s, l),
                          lambda P, x, s, l: cross_arch_f(P, x, s, l, c))


# ============================================================================ gradcheck


def gradcheck_module(module, inputs, call):
    """gradcheck over the module's parameters and the floating inputs, in float64."""
    module = module.double()
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in module.named_parameters()]
    k = len(params)

    def fn(*args):
        return call(lambda *a: functional_call(module, dict(zip(names, args[:k])), a), *args[k:])

    args = tuple(params) + tuple(t.detach().clone().requires_grad_() for t in inputs)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_gated_lce():
    gradcheck_module(GatedLCE(3, 2, 4, backend="eager"), [randn(2, 3, 4)], lambda f, x: f(x))


@pytest.mark.parametrize("mode", ["mlp", "linear"])
def test_gradcheck_pffn(mode):
    m = PersonalizedFFN(4, 2, mode=mode, hidden=5, backend="eager")
    lens = torch.tensor([3, 1])
    gradcheck_module(m, [randn(2, 3, 4), randn(2, 2, 4)], lambda f, s, xs: f(s, xs, lens))


def test_gradcheck_feed_forward():
    gradcheck_module(FeedForward(4, 5, 3, backend="eager"), [randn(2, 3, 4)], lambda f, x: f(x))


def test_gradcheck_low_rank_cross_net():
    m = LowRankCrossNet(6, 2, 2, backend="eager")
    with torch.no_grad():
        for b in m.bias:
            b.normal_()
    gradcheck_module(m, [randn(2, 6)], lambda f, x: f(x))


def test_gradcheck_rotary_attention_with_padding():
    lens = torch.tensor([5, 2, 0])
    gradcheck_module(RotaryMultiHeadAttention(8, 2, backend="eager"), [randn(3, 5, 8)], lambda f, s: f(s, lens))


def test_gradcheck_pma_with_padding():
    lens = torch.tensor([4, 1, 0])
    gradcheck_module(PoolingMultiHeadAttention(2, 8, 2, backend="eager"), [randn(3, 4, 8)], lambda f, s: f(s, lens))


@pytest.mark.parametrize("mode", ["mlp", "linear"])
def test_pffn_personal_weight_is_designs_w_b(mode):
    """``PersonalizedFFN.personal_weight`` (the materialised ``W_b`` of DESIGN §3, public, and not on
    the eager forward path in linear mode) against the formula: mlp ``reshape(hyper(flatten X_sum_b)) / sqrt(d)``,
    linear ``X_sum_b^T A``; and the module's forward is ``S + LN(S) @ W_b`` with that very ``W_b``."""
    B, L, d, n_sum = 3, 7, 24, 3
    m = PersonalizedFFN(d, n_sum, mode=mode, hidden=9, backend="eager").double()
    with torch.no_grad():
        m.norm.weight.normal_(1.0, 0.3)
        m.norm.bias.normal_(0.0, 0.3)
    P = dict(m.named_parameters())
    x_sum = randn(B, n_sum, d)
    if mode == "mlp":
        h = silu(lin(x_sum.reshape(B, -1), P["hyper.0.weight"], P["hyper.0.bias"]))
        want = lin(h, P["hyper.2.weight"], P["hyper.2.bias"]).reshape(B, d, d) / math.sqrt(d)
    else:  # W_b[i, j] = sum_n X_sum[b, n, i] A[n, j], by an explicit loop
        want = torch.stack([sum(torch.outer(x_sum[b, n], P["A"][n]) for n in range(n_sum)) for b in range(B)])
    got = m.personal_weight(x_sum)
    assert got.shape == (B, d, d)
    assert rel_err(got, want) <= TOL, rel_err(got, want)
    s, lens = randn(B, L, d), torch.tensor([7, 0, 3])
    hn = layer_norm(s, P["norm.weight"], P["norm.bias"])
    ref = (s + torch.einsum("bli,bij->blj", hn, want)) * valid_rows(lens, L)
    assert rel_err(m(s, x_sum, lens), ref) <= TOL


# ---- Kills M07 (rotary angle table shifted by a constant position). Through the model's
# ---- attention a common shift of q and k cancels (RoPE is relative), and the kernels share
# ---- reference.rotary_table, so only a direct float64 check of the positions sees it.


@pytest.mark.parametrize("L,dh", [(1, 8), (7, 6), (50, 16)])
def test_rotary_positions_start_at_zero(L, dh):
    """DESIGN §3: rotary at positions ``0 .. L-1`` (CLS tokens take ``0 .. n_cls-1``): row 0 is left
    unrotated and row p turns pair ``(i, i + dh/2)`` by ``p * base^(-2i/dh)``; ``rope_q=False``
    (rotary on the keys alone, where a constant shift would not cancel) matches the formula too."""
    from interformer import reference as R

    B, H, base = 2, 3, 10000.0
    x = randn(B, L, H, dh)
    got = R.rotary(x, base)
    want = torch.stack([torch.stack([rope_f(x[b, :, h], base) for h in range(H)], dim=1) for b in range(B)])
    assert torch.equal(got[:, 0], x[:, 0]), "position 0 must be the identity"
    assert rel_err(got, want) <= TOL
    q, k, v = randn(1, 2, H, dh), randn(B, L, H, dh), randn(B, L, H, dh)
    lens = torch.tensor([L, max(L - 3, 1)])
    out = R.attention(q, k, v, lens, rope_base=base, rope_q=False, mask_queries=False)
    for b in range(B):
        n = int(lens[b])
        for h in range(H):
            p = softmax(q[0, :, h] @ rope_f(k[b, :n, h], base).T / math.sqrt(dh))
            assert rel_err(out[b, :, h], p @ v[b, :n, h]) <= TOL


# ---- The reference functions no eager module calls, and precision and settings no float64 formula
# ---- above could see (a mutation test of the eager code, 2026-11-29: each test below fails on the
# ---- mutant its docstring names).


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_rotary_angles_are_float64_up_to_rounding(dtype):
    """DESIGN §3's rotary at ``long``'s T = 1000: the rotary of an fp16/bf16 input is the float64
    rotary of that same input up to rounding (measured 0.7 unit roundoffs). Angles
    ``p * base^(-2i/dh)`` formed in the input's dtype were off by up to half a radian near p = 1000
    (42 and 86 unit roundoffs); the fused kernels read the same table, so no fused-against-eager
    test could see it, and DESIGN §5's 2x-eager rule would have loosened with it."""
    from interformer import reference as R

    L, H, dh, base = 1000, 3, 16, 10000.0
    x = randn(2, L, H, dh).to(dtype)
    want = torch.stack([torch.stack([rope_f(x[b, :, h].double(), base) for h in range(H)], dim=1) for b in range(2)])
    got = R.rotary(x, base)
    u = torch.finfo(dtype).eps / 2
    assert got.dtype == dtype and rel_err(got, want) <= 2 * u, rel_err(got, want) / u


def test_loss_is_the_mean_binary_cross_entropy_with_logits():
    """``InterFormerCTR.loss``: the mean (not the sum) of BCE with logits, an fp32 scalar."""
    from interformer import InterFormerCTR

    logits = torch.tensor([2.5, -1.0, 0.0, 7.0, -3.25], dtype=F64)
    label = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], dtype=F64)
    p = sigmoid(logits)
    want = -(label * torch.log(p) + (1 - label) * torch.log(1 - p)).mean()
    got = InterFormerCTR.loss(logits, label)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert abs(float(got) - float(want)) <= 1e-6 * float(want), (float(got), float(want))


def test_every_layernorm_takes_the_configs_ln_eps():
    """Every LayerNorm of the model is built at ``config.ln_eps``: per block the DHEN layers', the
    Interaction Arch's, the PFFN's and the attention's pre-norm."""
    from interformer import InterFormerCTR

    c = arch_config(dhen_layers=2, num_layers=2, ln_eps=0.05)
    norms = {n: m.eps for n, m in InterFormerCTR(c).named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert len(norms) == c.num_layers * (c.dhen_layers + 3), sorted(norms)
    assert all(e == c.ln_eps for e in norms.values()), norms


def test_reference_feed_forward_is_designs_ffn():
    """``reference.feed_forward`` (the fused FFN's reference; the eager ``FeedForward`` calls its own
    layers instead) is DESIGN §3's ``Linear -> SiLU -> Linear``."""
    from interformer import reference as R

    x, w1, b1, w2, b2 = randn(3, 5, 24), randn(96, 24), randn(96), randn(24, 96), randn(24)
    assert rel_err(R.feed_forward(x, w1, b1, w2, b2), lin(silu(lin(x, w1, b1)), w2, b2)) <= TOL


@pytest.mark.parametrize("causal", [False, True])
def test_reference_attention_outputs_zero_at_padded_queries(causal):
    """``reference.attention`` with ``mask_queries=True`` (the fused attention's reference; the
    eager module zeroes padded rows again after its output projection): DESIGN §3's padded query
    rows output 0, the valid rows attend over the valid keys (``causal``: up to the query)."""
    from interformer import reference as R

    B, L, H, dh, base = 3, 7, 2, 8, 10000.0
    q, k, v = randn(B, L, H, dh), randn(B, L, H, dh), randn(B, L, H, dh)
    lens = torch.tensor([7, 0, 3])
    got = R.attention(q, k, v, lens, causal=causal, rope_base=base, mask_queries=True)
    want = torch.zeros(B, L, H, dh, dtype=F64)
    for b in range(B):
        n = int(lens[b])
        for h in range(H):
            if n:
                sc = rope_f(q[b, :n, h], base) @ rope_f(k[b, :n, h], base).T / math.sqrt(dh)
                if causal:
                    sc = sc.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
                want[b, :n, h] = softmax(sc) @ v[b, :n, h]
    assert torch.equal(got[1], torch.zeros_like(got[1])) and torch.equal(got[2, 3:], torch.zeros_like(got[2, 3:]))
    assert rel_err(got, want) <= TOL
