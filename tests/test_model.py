"""Whole-model properties of the eager InterFormerCTR.

* Padding invariance: the ids stored at padded positions of ``seq``, and padding the batch to a
  longer T (same events, more padding), change neither the logits nor any parameter gradient.
* Rows with an empty history (length 0) and a full one (length T) give finite logits and gradients.
* Every parameter receives a non-zero gradient (the last block and the final Cross Arch included),
  for the default structure at tiny sizes and for each structural option.
* The sequence is actually read: changing a valid event changes the logit of that row only.
* The model wires its arches as DESIGN §3 "Model" says (float64, composed from its parts), and
  ``InterFormerConfig()`` holds DESIGN §3's defaults.
"""

from __future__ import annotations

import pytest
import torch

from interformer import InterFormerConfig, InterFormerCTR
from utils import perturb_constant_parameters

TINY = dict(d_model=16, num_heads=2, num_layers=2, n_dense=3, sparse_vocab_sizes=(13, 7, 5), seq_vocab_sizes=(11, 6),
            max_seq_len=6, pffn_hidden=16, head=(16,), dcn_rank=4, backend="eager")
# float64: padding must change nothing beyond round-off; float32: differently shaped reductions
# (a longer T) may round differently, so a loose but still meaningful bound.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def tiny_config(**kw):
    return InterFormerConfig(**{**TINY, **kw})


def random_batch(c: InterFormerConfig, lengths, T, dtype=torch.float32, seed=0):
    """A DESIGN §2 batch: events at 0..len-1 with ids >= 1, padding ids 0 after them."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    dense = torch.randn(B, c.n_dense, generator=g, dtype=dtype)
    sparse = torch.stack([torch.randint(0, v, (B,), generator=g) for v in c.sparse_vocab_sizes], 1) \
        if c.sparse_vocab_sizes else torch.zeros(B, 0, dtype=torch.int64)
    seq = torch.stack([torch.randint(1, v, (B, T), generator=g) for v in c.seq_vocab_sizes], 1)
    seq = seq * (torch.arange(T)[None, None, :] < lengths[:, None, None])
    label = torch.randint(0, 2, (B,), generator=g).to(dtype)
    return dense, sparse, seq, lengths, label


def run(model, dense, sparse, seq, lengths, label):
    model.zero_grad(set_to_none=True)
    logits = model(dense, sparse, seq, lengths)
    model.loss(logits, label).backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, tol, what):
    logits_a, grads_a = a
    logits_b, grads_b = b
    err = float((logits_a - logits_b).norm() / logits_b.norm())
    assert err <= tol, f"{what}: logits differ by {err:.3e}"
    assert grads_a.keys() == grads_b.keys(), f"{what}: different parameters got gradients"
    # per parameter, relative to its own gradient, floored at 1e-3 of the whole gradient's norm
    # (some gradients are tiny at init, e.g. PMA's query, whose softmax is near uniform)
    total = float(torch.sqrt(sum(g.double().norm() ** 2 for g in grads_b.values())))
    for n in grads_b:
        ref = float(grads_b[n].norm())
        diff = float((grads_a[n] - grads_b[n]).norm())
        assert diff <= tol * max(ref, 1e-3 * total), f"{what}: gradient of {n} differs ({diff:.3e} vs |g|={ref:.3e})"


def _all_finite(out):
    logits, grads = out
    assert torch.isfinite(logits).all(), f"non-finite logits: {logits}"
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, f"non-finite gradients in {bad}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padded_ids_do_not_matter(dtype):
    c = tiny_config()
    torch.manual_seed(1)
    model = InterFormerCTR(c).to(dtype)
    T = 6
    dense, sparse, seq, lengths, label = random_batch(c, [0, 6, 2, 5, 1], T, dtype)
    ref = run(model, dense, sparse, seq, lengths, label)
    _all_finite(ref)
    junk = torch.stack([torch.randint(1, v, seq[:, 0].shape) for v in c.seq_vocab_sizes], 1)
    padded = torch.arange(T)[None, None, :] >= lengths[:, None, None]
    seq2 = torch.where(padded, junk, seq)
    assert not torch.equal(seq2, seq)
    assert_same(run(model, dense, sparse, seq2, lengths, label), ref, TOL[dtype], "junk ids at padded positions")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_longer_padding_changes_nothing(dtype):
    c = tiny_config()
    torch.manual_seed(2)
    model = InterFormerCTR(c).to(dtype)
    dense, sparse, seq, lengths, label = random_batch(c, [5, 0, 3, 5, 1], 5, dtype, seed=3)
    ref = run(model, dense, sparse, seq, lengths, label)
    _all_finite(ref)
    for extra in (1, 7):
        longer = torch.cat([seq, torch.zeros(*seq.shape[:2], extra, dtype=seq.dtype)], dim=2)
        assert_same(run(model, dense, sparse, longer, lengths, label), ref, TOL[dtype], f"T + {extra}")
    # non-zero ids in the extra padding too
    junk = torch.stack([torch.randint(1, v, (len(lengths), 4)) for v in c.seq_vocab_sizes], 1)
    assert_same(run(model, dense, sparse, torch.cat([seq, junk], 2), lengths, label), ref, TOL[dtype], "T + 4 junk")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_and_full_histories_are_finite(dtype):
    c = tiny_config()
    torch.manual_seed(3)
    model = InterFormerCTR(c).to(dtype)
    T = 6
    for lengths in ([0, 0, 0], [T, T, T], [0, T, 3]):
        out = run(model, *random_batch(c, lengths, T, dtype, seed=4))
        _all_finite(out)


@pytest.mark.parametrize("pffn_mode", ["mlp", "linear"])
def test_padded_rows_are_exactly_zero_after_every_step(pffn_mode):
    """DESIGN §3: padded positions of every sequence tensor are exactly zero after every step,
    even when the padded positions hold junk ids (forward hooks on each sequence-producing module)."""
    from interformer import PersonalizedFFN, RotaryMultiHeadAttention, SequenceArch, SequenceMaskNet

    c = tiny_config(pffn_mode=pffn_mode)
    torch.manual_seed(6)
    model = InterFormerCTR(c)
    T = 6
    dense, sparse, seq, lengths, label = random_batch(c, [0, 6, 2, 4], T, seed=7)
    junk = torch.stack([torch.randint(1, v, seq[:, 0].shape) for v in c.seq_vocab_sizes], 1)
    seq = torch.where(seq == 0, junk, seq)  # every id non-zero, padding included
    seen = []

    def hook(module, args, out):
        n_valid = args[-1]  # the lengths argument of each hooked forward
        pad = torch.arange(out.shape[1])[None, :] >= n_valid[:, None]
        seen.append(type(module).__name__)
        assert pad.any(), "test batch has no padding"
        assert torch.equal(out[pad], torch.zeros_like(out[pad])), f"{type(module).__name__}: non-zero padded rows"

    kinds = (SequenceMaskNet, PersonalizedFFN, RotaryMultiHeadAttention, SequenceArch)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        model.loss(model(dense, sparse, seq, lengths), label).backward()
    finally:
        for h in handles:
            h.remove()
    assert seen.count("SequenceArch") == c.num_layers and seen.count("SequenceMaskNet") == 1


def test_row_independence_and_sequence_is_read():
    """Changing one valid event of row 1 changes row 1's logit and no other row's."""
    c = tiny_config()
    torch.manual_seed(4)
    model = InterFormerCTR(c).double()
    dense, sparse, seq, lengths, _ = random_batch(c, [4, 6, 2], 6, torch.float64, seed=5)
    ref = model(dense, sparse, seq, lengths).detach()
    seq2 = seq.clone()
    seq2[1, 0, 3] = 1 + seq[1, 0, 3] % (c.seq_vocab_sizes[0] - 1)
    out = model(dense, sparse, seq2, lengths).detach()
    assert abs(float(out[1] - ref[1])) > 1e-6
    assert torch.equal(out[[0, 2]], ref[[0, 2]])


VARIANTS = [
    {},
    {"backbone": "dot"},
    {"backbone": "dcn"},
    {"pffn_mode": "linear"},
    {"dense_tokens": "per_field"},
    {"n_dense": 0},
    {"dcn_rank": None},
    {"num_layers": 1, "dhen_layers": 2},
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_every_parameter_gets_a_gradient(overrides):
    """Default structure (layers, n_sum, n_pma, n_recent, n_ssum, head depth) at tiny sizes, float64.

    Rows with length 0 are left to the finiteness tests above; here every row has events so that
    the check is about gradient flow alone.
    """
    base = dict(d_model=16, num_heads=2, sparse_vocab_sizes=(13, 7, 5), seq_vocab_sizes=(11, 6), max_seq_len=6,
                pffn_hidden=16, head=(16, 8), dcn_rank=4, backend="eager")
    c = InterFormerConfig(**{**base, **overrides})
    assert c.num_layers == overrides.get("num_layers", 3)
    torch.manual_seed(5)
    model = InterFormerCTR(c).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "dcn.bias" in n:  # torchrec-style zero init; make the biases' own effect visible
                p.normal_(0, 0.1)
            if "tables" in n:  # unit-scale embeddings: events differ enough for attention gradients
                p[1:].normal_()  # to stand far above round-off (at init they are ~1e-9)
    _, grads = run(model, *random_batch(c, [1, 6, 3, 1, 5, 2], 6, torch.float64, seed=6))
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, f"non-finite gradients: {bad}"
    # PMA's key bias adds q.b_k to every score of a query, which the softmax cancels: its gradient is
    # zero in exact arithmetic (as in nn.MultiheadAttention), so it is not expected to learn.
    exempt = {n for n, _ in model.named_parameters() if n.endswith("pma.k_proj.bias")}
    # round-off on an analytically zero gradient is < 1e-15 here; real ones are > 1e-10
    missing = [n for n, p in model.named_parameters()
               if n not in exempt and (n not in grads or float(grads[n].abs().max()) <= 1e-12)]
    assert not missing, f"parameters without a gradient: {missing}"
    last = f"backbone.blocks.{c.num_layers - 1}."
    assert any(n.startswith(last) for n in grads) and any(n.startswith("backbone.final_cross.") for n in grads)


def test_tokenizers_without_fields_give_empty_tokens_of_width_d():
    """Both tokenizers with no fields return [B, 0, d] (the sparse one returned [B, 0, 0]), so their
    outputs concatenate along the token axis whatever the mix of fields."""
    from interformer import DenseTokenizer, SparseTokenizer

    dense = DenseTokenizer(0, 8)(torch.zeros(3, 0))
    sparse = SparseTokenizer((), 8)(torch.zeros(3, 0, dtype=torch.int64))
    assert dense.shape == sparse.shape == (3, 0, 8)
    assert torch.cat([dense, sparse, SparseTokenizer((5,), 8)(torch.ones(3, 1, dtype=torch.int64))], 1).shape == (3, 1, 8)


@pytest.mark.parametrize("backend", ["eager", pytest.param("triton", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="quantized layers run on the CPU, where the fused kernels need Triton's "
    "interpreter, off in a GPU machine's test run"))])
def test_a_dynamically_quantized_model_runs_near_the_float_one(backend):
    """``torch.ao.quantization.quantize_dynamic`` (int8 weights for every ``nn.Linear``, CPU
    inference) gives a model that runs, on both backends, near the float model: the dense tokenizer
    read its layer's ``weight.dtype`` to cast the batch, and a quantized layer's ``weight`` is a
    method (AttributeError on both paths until 2026-11-29; a review's find). The modules that read a
    linear layer's parameters call the quantized layer instead (``layers._read_as_called``)."""
    import warnings

    torch.manual_seed(0)
    model = InterFormerCTR(tiny_config(backend=backend)).eval()
    dense, sparse, seq, lengths, _ = random_batch(model.config, [6, 0, 3, 1, 5, 2, 6, 4] * 2, 6)
    with torch.no_grad():
        ref = model(dense, sparse, seq, lengths)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (torch.ao.quantization's deprecation notice)
            quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        assert type(quantized.backbone.dense_tokenizer.linear) is not torch.nn.Linear
        out = quantized(dense, sparse, seq, lengths)
    # int8 weights and activations: 9% of the logits' spread off at most here, where zeroing the dense
    # tokenizer's weight (a broken model) moves them by 177% of it
    assert out.shape == ref.shape and float((out - ref).abs().max()) <= 0.25 * float(ref.std())


@pytest.mark.parametrize("mode", ["single", "per_field"])
def test_dense_tokenizer_traced_by_fx_casts_the_batch_as_the_module(mode):
    """``torch.fx.symbolic_trace`` of a DenseTokenizer of another dtype than the float32 batch (a
    ``.half()`` model) records the cast to the parameters' dtype: the traced module gives the
    module's output. The quantize_dynamic guard (cast only where the layer's weight is a tensor)
    took the weight's Proxy for a quantized layer's method, and the traced module failed with
    PyTorch's 'mat1 and mat2 must have the same dtype'."""
    from interformer.tokenizers import DenseTokenizer

    torch.manual_seed(0)
    tok = DenseTokenizer(3, 8, mode).half()
    dense = torch.randn(2, 3)
    gm = torch.fx.symbolic_trace(tok)
    out = gm(dense)
    assert out.dtype == torch.float16 and torch.equal(out, tok(dense))


def test_sparse_tokenizer_is_one_lookup_per_field_and_traces():
    """Field j's ids go through table j (the columns are taken with one ``unbind``), and
    ``torch.fx.symbolic_trace`` still records the module (a Proxy cannot be unbound)."""
    from interformer import SparseTokenizer

    tok = SparseTokenizer((10, 12, 7), 8)
    ids = torch.tensor([[1, 2, 3], [4, 0, 6]])
    want = torch.stack([tok.tables[j](ids[:, j]) for j in range(3)], dim=1)
    assert torch.equal(tok(ids), want)
    gm = torch.fx.symbolic_trace(tok)
    assert torch.equal(gm(ids), want)
    for bad in (ids[:, :2], torch.cat([ids, ids[:, :1]], 1), ids[0]):  # a field short, one extra, 1-D
        with pytest.raises(ValueError, match=r"sparse must be an integer tensor \[\*, 3\]"):
            tok(bad)


def _design_logits(m: InterFormerCTR, dense, sparse, seq, lengths) -> torch.Tensor:
    """DESIGN §3 "Model", composed here from the model's own parts (each part's math is checked
    against its formula in ``test_reference_math``): tokenize; ``X_sum¹`` of the first block's Cross
    Arch is prepended as the ``n_cls`` CLS tokens; each block computes both summaries from its
    input and then runs the Interaction and Sequence Arches on that input; a final Cross Arch
    re-summarises; ``logit = MLP([flatten X_sum || flatten S_sum])``."""
    bb, c = m.backbone, m.config
    x = torch.cat([bb.dense_tokenizer(dense), bb.sparse_tokenizer(sparse)], dim=1)
    body = bb.seq_tokenizer(seq, lengths)
    s = torch.cat([bb.blocks[0].cross.summarize_nonseq(x), body], dim=1)
    for block in bb.blocks:
        x_sum = block.cross.summarize_nonseq(x)
        s_sum = block.cross.summarize_seq(s, lengths)
        x, s = block.interaction(x, s_sum), block.sequence(s, x_sum, lengths + c.n_cls)
    x_sum, s_sum = bb.final_cross.summarize_nonseq(x), bb.final_cross.summarize_seq(s, lengths)
    assert s.shape[1] == c.n_cls + seq.shape[-1] and x_sum.shape[1] == c.n_sum and s_sum.shape[1] == c.n_ssum
    return m.head(torch.cat([x_sum.flatten(1), s_sum.flatten(1)], dim=1)).squeeze(-1)


@pytest.mark.parametrize("overrides", [{}, dict(num_layers=3, n_recent=3), dict(backbone="dot", causal=True)],
                         ids=["default", "three blocks", "dot backbone"])
def test_the_model_wires_its_arches_as_design_says(overrides):
    """The whole model against DESIGN §3's wiring, in float64 (the arch tests alone would not see,
    e.g., zeros as CLS tokens, summaries taken from a block's output, or the head's halves swapped)."""
    c = tiny_config(**overrides)
    torch.manual_seed(0)
    m = InterFormerCTR(c).double().eval()
    dense, sparse, seq, lengths, _ = random_batch(c, [0, 3, 6, 1], 6, dtype=torch.float64)
    got = m(dense, sparse, seq, lengths)
    want = _design_logits(m, dense, sparse, seq, lengths)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), (got, want)
    # and the composition is sensitive to the wiring it checks: CLS tokens of zeros give other logits
    bb = m.backbone
    x = torch.cat([bb.dense_tokenizer(dense), bb.sparse_tokenizer(sparse)], dim=1)
    assert bb.blocks[0].cross.summarize_nonseq(x).abs().amax() > 1e-3


def test_a_config_of_another_type_is_named():
    """A dict of config fields (or anything but an InterFormerConfig) is a TypeError naming the
    model class, where it failed with an AttributeError on the first field read."""
    from interformer import InterFormer

    for cls in (InterFormerCTR, InterFormer):
        with pytest.raises(TypeError, match=rf"^{cls.__name__}: config must be an InterFormerConfig .*got dict$"):
            cls(dict(TINY))


def test_defaults_are_designs():
    """DESIGN §3 "Defaults" (and §3's fixed choices: rotary base 10000, DHEN, the mlp PFFN, SiLU)."""
    c = InterFormerConfig()
    got = {k: getattr(c, k) for k in ("d_model", "num_heads", "num_layers", "n_sum", "n_cls", "n_pma", "n_recent",
                                       "n_ssum", "dhen_layers", "dcn_layers", "dcn_rank", "pffn_mode", "pffn_hidden",
                                       "head", "dropout", "rope_base", "backbone", "causal")}
    assert got == dict(d_model=64, num_heads=4, num_layers=3, n_sum=4, n_cls=4, n_pma=2, n_recent=2, n_ssum=8,
                       dhen_layers=1, dcn_layers=2, dcn_rank=32, pffn_mode="mlp", pffn_hidden=256, head=(256, 128),
                       dropout=0.0, rope_base=10000.0, backbone="dhen", causal=False)
    head = InterFormerCTR(tiny_config(head=(16, 8))).head
    assert [type(l).__name__ for l in head if not isinstance(l, torch.nn.Dropout)] == \
        ["Linear", "SiLU", "Linear", "SiLU", "Linear"]


class _FakeStream:
    """Stand-in for torch.cuda.Stream on CPU: the two-stream path's arithmetic is the point here,
    not the overlap."""

    def __init__(self, device=None):
        self.device = device

    def wait_stream(self, other):
        pass


def test_two_stream_block_path_computes_designs_arches(monkeypatch):
    """``InterFormerBlock._arches_on_two_streams`` (``use_streams``, CUDA only) must compute exactly
    DESIGN §3's Interaction Arch on ``(X, S_sum)`` and Sequence Arch on ``(S, X_sum)`` with valid length
    ``n_cls + len``. Run on CPU in float64 with the CUDA stream API stubbed out and compared with the
    float64 formulas of ``test_reference_math``."""
    import contextlib

    from interformer import InterFormerBlock
    from test_reference_math import arch_config, cross_arch_f, interaction_arch_f, sequence_arch_f, valid_rows

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream(device))
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: None)

    c = arch_config()
    torch.manual_seed(8)
    block = InterFormerBlock(c).double()
    assert perturb_constant_parameters(block)
    B, T = 3, c.max_seq_len
    lengths = torch.tensor([7, 0, 3])
    L = c.n_cls + T
    x = torch.randn(B, c.n_tokens, c.d_model, dtype=torch.float64)
    s = torch.randn(B, L, c.d_model, dtype=torch.float64) * valid_rows(lengths + c.n_cls, L)
    x_sum, s_sum = block.cross(x, s, lengths)
    with torch.no_grad():
        x_next, s_next = block._arches_on_two_streams(x, s, lengths, x_sum, s_sum)

        def P(pre):
            return {n[len(pre):]: p for n, p in block.named_parameters() if n.startswith(pre)}

        xs_ref, ss_ref = cross_arch_f(P("cross."), x, s, lengths, c)
        assert torch.allclose(x_sum, xs_ref, rtol=1e-10, atol=1e-12) and torch.allclose(s_sum, ss_ref, rtol=1e-10, atol=1e-12)
        x_ref = interaction_arch_f(P("interaction."), x, ss_ref, c)
        s_ref = sequence_arch_f(P("sequence."), s, xs_ref, lengths + c.n_cls, c)
    assert float((x_next - x_ref).norm() / x_ref.norm()) <= 1e-10
    assert float((s_next - s_ref).norm() / s_ref.norm()) <= 1e-10
    # and the public switch routes through that path only on CUDA tensors: on CPU the result is the same
    block.use_streams = True
    with torch.no_grad():
        x2, s2 = block(x, s, lengths)
    assert torch.allclose(x2, x_next, rtol=1e-12, atol=1e-14) and torch.allclose(s2, s_next, rtol=1e-12, atol=1e-14)


# ============================================================================ whole model vs DESIGN §3 formulas


def _model_f(P, c: InterFormerConfig, dense, sparse, seq, lengths):
    """DESIGN §3 "Model" in float64 from test_reference_math's per-arch formulas (written from DESIGN
    alone), with the model's parameters ``P`` by name: nothing of the model's own forward is used."""
    from test_reference_math import (cross_arch_f, dense_f, gated_lce_f, interaction_arch_f, layer_norm, lin,
                                     masknet_f, pffn_f, rotary_mha_f, silu)

    def sub(pre):
        return {n[len(pre):]: p for n, p in P.items() if n.startswith(pre)}

    parts = [dense_f(sub("backbone.dense_tokenizer."), dense, c.dense_tokens)] if c.n_dense else []
    if c.sparse_vocab_sizes:  # padding_idx 0: a missing id is a zero token
        parts.append(torch.stack([P[f"backbone.sparse_tokenizer.tables.{j}.weight"][sparse[:, j]]
                                  * (sparse[:, j] != 0)[:, None] for j in range(sparse.shape[1])], 1))
    x = torch.cat(parts, 1)
    s = torch.cat([gated_lce_f(sub("backbone.blocks.0.cross."), x, "nonseq."),
                   masknet_f(sub("backbone.seq_tokenizer."), seq, lengths)], 1)
    vlen = lengths + c.n_cls
    for i in range(c.num_layers):
        pb = f"backbone.blocks.{i}."
        x_sum, s_sum = cross_arch_f(sub(pb + "cross."), x, s, lengths, c)
        ps = sub(pb + "sequence.")
        s_mid = pffn_f(ps, s, x_sum, vlen, c.pffn_mode, pre="pffn.")
        h = layer_norm(s_mid, ps["attn_norm.weight"], ps["attn_norm.bias"], c.ln_eps)
        attn = rotary_mha_f(ps, h, vlen, c.num_heads, c.rope_base, pre="attn.", causal=c.causal)
        x, s = interaction_arch_f(sub(pb + "interaction."), x, s_sum, c), s_mid + attn
    x_sum, s_sum = cross_arch_f(sub("backbone.final_cross."), x, s, lengths, c)
    h = torch.cat([x_sum.flatten(1), s_sum.flatten(1)], 1)
    for j in range(len(c.head)):
        h = silu(lin(h, P[f"head.{3 * j}.weight"], P[f"head.{3 * j}.bias"]))
    k = 3 * len(c.head)
    return lin(h, P[f"head.{k}.weight"], P[f"head.{k}.bias"]).squeeze(-1)


_SMALL = dict(d_model=8, num_heads=2, num_layers=2, n_dense=3, sparse_vocab_sizes=(13, 7), seq_vocab_sizes=(11, 6),
              max_seq_len=6, pffn_hidden=8, head=(8,), dcn_rank=3, n_sum=2, n_ssum=3, backend="eager")
_CORNERS = [  # (overrides, lengths, T)
    ({"n_recent": 4}, [0, 1, 3, 6], 6),  # lengths 0 and < n_recent
    ({"n_recent": 7}, [0, 1, 3, 6], 6),  # n_recent > T
    ({"n_pma": 0, "n_recent": 0}, [0, 3, 6], 6),
    ({"dense_tokens": "per_field", "pffn_mode": "linear"}, [0, 3, 6], 6),
    ({"backbone": "dot", "dhen_layers": 3}, [0, 3, 6], 6),
    ({"backbone": "dcn", "dhen_layers": 2, "dcn_rank": None}, [0, 3, 6], 6),
    ({"dhen_layers": 2, "causal": True}, [0, 3, 6, 1], 6),
    ({"head": ()}, [0, 2, 3], 3),  # T < max_seq_len
    ({"head": (5, 4), "dropout": 0.3}, [2], 6),  # B = 1, eval
    ({"sparse_vocab_sizes": ()}, [1], 1),  # T = 1
    ({"n_dense": 0, "rope_base": 3.0}, [0, 0, 0], 4),  # every row empty
]


@pytest.mark.parametrize("overrides,lengths,T", _CORNERS, ids=[
    ",".join(f"{k}={v}" for k, v in o.items()) + f",len={l},T={t}" for o, l, t in _CORNERS])
def test_whole_model_matches_designs_formulas_in_corners(overrides, lengths, T):
    """The eager model's logits and every gradient (parameters and ``dense``) against DESIGN §3 composed
    from the float64 formulas of test_reference_math, in the corners: S_recent wider than a row's
    history (and than T), empty rows (PMA zeros), per-field dense tokens, each backbone with several
    DHEN layers, causal attention, no head hidden layer, T below max_seq_len, B = 1, T = 1."""
    import math

    c = InterFormerConfig(**{**_SMALL, **overrides})
    torch.manual_seed(0)
    m = InterFormerCTR(c).double().eval()
    assert perturb_constant_parameters(m)  # move every parameter off its special init so each term shows
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "tables" in n:
                p[1:].normal_()
    dense, sparse, seq, lengths_t, _ = random_batch(c, lengths, T, torch.float64, seed=1)
    up = torch.randn(len(lengths), dtype=torch.float64)
    d_mod = dense.clone().requires_grad_()
    got = m(d_mod, sparse, seq, lengths_t)
    (got * up).sum().backward()
    P = {n: p.detach().clone().requires_grad_() for n, p in m.named_parameters()}
    d_ref = dense.clone().requires_grad_()
    want = _model_f(P, c, d_ref, sparse, seq, lengths_t)
    (want * up).sum().backward()
    assert float((got - want).detach().norm() / want.detach().norm()) <= 1e-10, (got, want)
    if c.n_dense:
        assert float((d_mod.grad - d_ref.grad).norm() / d_ref.grad.norm()) <= 1e-10
    total = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in P.values() if p.grad is not None))
    for n, p in m.named_parameters():
        ga = p.grad if p.grad is not None else torch.zeros_like(p)
        gr = P[n].grad if P[n].grad is not None else torch.zeros_like(p)
        assert float((ga - gr).norm()) <= 1e-10 * max(float(gr.norm()), 1e-3 * total), f"gradient of {n}"


def test_ctr_model_switches_streams_like_its_backbone():
    """``InterFormerCTR.use_streams`` sets every block's flag (as ``InterFormer.use_streams``) and
    returns the model; on CPU tensors the flag changes nothing."""
    c = tiny_config()
    torch.manual_seed(0)
    m = InterFormerCTR(c).double().eval()
    dense, sparse, seq, lengths, _ = random_batch(c, [0, 3, 6], 6, torch.float64)
    ref = m(dense, sparse, seq, lengths)
    assert m.use_streams(True) is m and all(b.use_streams for b in m.backbone.blocks)
    assert torch.equal(m(dense, sparse, seq, lengths), ref)
    m.use_streams(False)
    assert not any(b.use_streams for b in m.backbone.blocks)
