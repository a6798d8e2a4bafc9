"""Non-finite values (inf, -inf, NaN) through the fused ops, against the eager reference.

Why: ``torch.amp.GradScaler`` skips an optimiser step only when some gradient is non-finite. A
kernel that turns an inf or a NaN into a finite number (a masked select after a product, a
``row_sum > 0`` test that is False for NaN, a zero written for a row whose true gradient is NaN)
makes training take a step where eager would have skipped it; a kernel that makes a NaN where eager
is finite (``0 * inf`` from padding or from another sample of a block) does the opposite, or wipes
out predictions of samples that had nothing wrong with them.

The rule checked, per op, with one element of an input, a parameter or the upstream gradient set
to inf, -inf or NaN at a valid position: every element of the valid output and of the gradients
that is non-finite in the reference is non-finite in the fused result, and every element the
reference leaves finite stays finite (the same non-finite pattern). Regions where the reference's
NaN is an artefact of its formulation rather than the math are left out and pinned separately:
padded rows (the contract makes them exact zeros: a non-finite padded input or padded upstream
gradient never reaches anything on the fused path, where the reference's ``out * mask`` gives
``inf * 0``), and fp16 intermediates the reference rounds and the kernels keep in fp32 (the fused
result is finite there, and right). Known differences that are not checked (none of them changes
whether some gradient is non-finite, which is what GradScaler looks at): the gated LCE's backward
spreads a non-finite value of one sample to the dx of the other samples of its block; the fused
PMA gives ``k_bias`` an exact zero gradient (softmax ignores the shift it adds) and ``v_bias`` its
closed-form gradient, where the reference's are NaN whenever the probabilities are; with an inf in
PFFN's LayerNorm bias, its weight gradients are NaN where the reference's are inf, when a backward
row block reaches past the last row (there ``h`` is the bias and the upstream gradient zero: a
review's find, 2026-11-29).

Tiny shapes, float32 and float16 (the interpreter has no bfloat16); each test takes a few seconds
under ``TRITON_INTERPRET=1``. Fresh allocations are poisoned with NaN (tests/poison.py), so an
output the kernels forget to write shows up here as a non-finite value.
"""

from __future__ import annotations

import math

import pytest
import torch

from interformer import reference as R
from poison import PoisonedAllocations
from utils import DEVICE, FP32_TOL, assert_lowp, assert_rel

pytest.importorskip("triton")  # (a machine without Triton skips the file)
from interformer.kernels import attention as A  # noqa: E402  (an import error fails, not skips)
from interformer.kernels import gated_lce as G  # noqa: E402
from interformer.kernels import pffn as P  # noqa: E402
from interformer.kernels import layernorm as LN  # noqa: E402
from interformer.kernels import crossnet as C  # noqa: E402
from interformer.kernels import dot_interaction as D  # noqa: E402
from interformer.kernels import feed_forward as FF  # noqa: E402

# the interpreter computes with numpy, which warns on every inf - inf and 0 * inf these tests make
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DTYPES = [torch.float32, torch.float16]
DT_IDS = ["float32", "float16"]
#: the gated LCE's tests run bf16 too, on a GPU: its forward's check of a bf16 x tile is a bf16
#: multiply-add (``gated_lce._any_nonfinite``), an instruction the fp16 and fp32 runs do not reach
GLCE_DTYPES = DTYPES + [pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
GLCE_DT_IDS = DT_IDS + ["bfloat16"]
VALUES = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


@pytest.fixture(autouse=True)
def _poisoned():
    with PoisonedAllocations():
        yield


# ============================================================================ helpers
def _run(fn, args: dict, diff, grad):
    """``fn(**args)`` with fresh leaves for the names in ``diff`` (a list value: one leaf per
    element, named ``name[i]``); backward with ``grad``. Returns (output, {name: gradient})."""
    leaves, call = {}, dict(args)
    for name in diff:
        v = args[name]
        if isinstance(v, list):
            call[name] = [t.detach().clone().requires_grad_() for t in v]
            leaves.update({f"{name}[{i}]": t for i, t in enumerate(call[name])})
        else:
            call[name] = leaves[name] = v.detach().clone().requires_grad_()
    out = fn(**call)
    out.backward(grad.to(out.dtype))
    return out.detach(), {k: (t.grad if t.grad is not None else torch.zeros_like(t)) for k, t in leaves.items()}


def _poke(args: dict, name: str, idx, value) -> dict:
    """A copy of ``args`` with ``args[name][idx] = value`` (``name[i]`` for a list element)."""
    out = dict(args)
    if name.endswith("]"):
        base, i = name[:-1].split("[")
        lst = list(out[base])
        t = lst[int(i)].clone()
        t[idx] = value
        lst[int(i)] = t
        out[base] = lst
    else:
        t = out[name].clone()
        t[idx] = value
        out[name] = t
    return out


def _poked(args: dict, grad: torch.Tensor, target: str, idx, value):
    """``(args, grad)`` with element ``idx`` of ``target`` set to ``value``: ``target`` names an
    argument (:func:`_poke`) or is ``"grad"``, the upstream gradient (copies; the inputs untouched)."""
    if target != "grad":
        return _poke(args, target, idx, value), grad
    g = grad.clone()
    g[idx] = value
    return args, g


def assert_same_nonfinite(fused: torch.Tensor, ref: torch.Tensor, name: str, valid=None) -> None:
    """The same elements non-finite in ``fused`` and ``ref`` (within ``valid``, a bool mask)."""
    nf_f, nf_r = ~torch.isfinite(fused), ~torch.isfinite(ref)
    if valid is not None:
        nf_f, nf_r = nf_f & valid, nf_r & valid
    swallowed = nf_r & ~nf_f
    made = nf_f & ~nf_r
    assert not swallowed.any(), (f"{name}: {int(swallowed.sum())} elements non-finite in the reference are finite "
                                 f"in the fused result, e.g. at {swallowed.nonzero()[0].tolist()}")
    assert not made.any(), (f"{name}: {int(made.sum())} elements finite in the reference are non-finite in the "
                            f"fused result, e.g. at {made.nonzero()[0].tolist()}")


def check_like_reference(ref_fn, fused_fn, args, diff, grad, out_valid=None, grad_valid=None):
    """Output and every gradient of ``diff``: the same non-finite elements (within the valid
    masks). Returns (fused output, fused gradients)."""
    grad_valid = grad_valid or {}
    ro, rg = _run(ref_fn, args, diff, grad)
    fo, fg = _run(fused_fn, args, diff, grad)
    assert_same_nonfinite(fo, ro, "output", out_valid)
    for k in rg:
        assert_same_nonfinite(fg[k], rg[k], "d" + k, grad_valid.get(k))
    return fo, fg


def _rnd(gen, dtype, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


# ============================================================================ attention
_AB, _AL, _AH, _ADH = 3, 5, 2, 8
_ALENS = [5, 0, 3]


def _attention_args(dtype, rope=10000.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (_AB, _AL, _AH, _ADH)
    return dict(q=_rnd(g, dtype, *shape), k=_rnd(g, dtype, *shape), v=_rnd(g, dtype, *shape),
                lengths=torch.tensor(_ALENS, device=DEVICE), rope_base=rope)


def _query_rows():
    return R.row_mask(torch.tensor(_ALENS, device=DEVICE), _AL)[:, :, None, None].expand(_AB, _AL, _AH, _ADH)


@pytest.fixture(params=["one-block", "delta-pass", "general"])
def backward_path(request, monkeypatch):
    """The attention backward the test's few keys take (delta in the loop of the single-query-block
    kernel), that kernel with its delta pass forced (``DELTA=2``), or the general backward forced
    (the dq kernel's pass in fp16, the delta kernel in fp32): where the delta of non-finite scores
    is formed must not change what reaches the gradients."""
    if request.param == "delta-pass":
        monkeypatch.setattr(A, "_delta_form", lambda Lk, block_n: A._DELTA_PASS)
    elif request.param == "general":
        monkeypatch.setattr(A, "_use_fused_bwd", lambda Lq, dhp, dtype: False)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("target,idx", [("q", (2, 1, 0, 3)), ("q", (0, 0, 1, 6)), ("k", (2, 1, 0, 3)),
                                        ("k", (0, 4, 1, 2)), ("v", (0, 2, 1, 5))],
                         ids=["q-short-row", "q-full-row", "k-short-row", "k-full-row", "v"])
def test_attention_nonfinite_scores_reach_the_output(target, idx, dtype, backward_path):
    """An inf or a NaN in a valid q row or k row makes scores non-finite: the reference's softmax
    gives NaN rows, and so must the fused op. It gave exact zeros (and lse -inf), finite values a
    GradScaler never sees, because the forward zeroed every row whose exp-sum was not ``> 0`` -- a
    test that is False for NaN. The gradients (dq, dk, dv over the valid rows) have the reference's
    non-finite pattern; masked query rows and the empty sample stay exact zeros."""
    args = _attention_args(dtype)
    rows = _query_rows()
    grad = _rnd(torch.Generator().manual_seed(1), dtype, _AB, _AL, _AH, _ADH)
    for name, value in VALUES.items():
        poked = _poke(args, target, idx, value)
        out, _ = check_like_reference(R.attention, A.attention, poked, ["q", "k", "v"], grad, out_valid=rows,
                                      grad_valid={"q": rows, "k": rows, "v": rows})
        assert torch.equal(out[~rows], torch.zeros_like(out[~rows])), f"{name}: padded query rows are not exact zeros"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("masked", ["none", "padding", "causal"])
def test_attention_row_of_minus_inf_scores_is_nan(dtype, masked):
    """Every visible score of a row -inf (a -inf in q against keys of one sign): softmax is 0/0,
    NaN in the reference and in the fused op, not the zeros of a row with no visible key (which
    both still give for a row of length 0); also when the row has masked keys (padding past the
    length, or later keys under ``causal``), which take no weight. The reference once filled masked
    scores with fp32's finite minimum, above -inf, so there the masked keys took the row's weight and
    it returned their values' mean (an op fuzzing helper's find)."""
    g = torch.Generator().manual_seed(3)
    B, L, H, dh = 2, 5, 1, 16
    q, k, v = (_rnd(g, dtype, B, L, H, dh) for _ in range(3))
    k[..., 0] = k[..., 0].abs() + 0.5
    q[0, 2, 0, 0] = -math.inf
    lengths = torch.tensor([3 if masked == "padding" else L, 0], device=DEVICE)
    causal = masked == "causal"
    ref = R.attention(q, k, v, lengths, causal=causal)
    out = A.attention(q, k, v, lengths, causal=causal)
    assert torch.isnan(ref[0, 2]).all(), "the reference gave a row of -inf scores finite values"
    assert torch.isnan(out[0, 2]).all(), "a row of -inf scores gave finite values"
    live = [0, 1] if masked == "padding" else [0, 1, 3, 4]
    assert torch.isfinite(out[0, live]).all() and torch.isfinite(ref[0, live]).all()
    if masked == "padding":  # query rows past the length: exact zeros on both paths
        for t in (out, ref):
            assert torch.equal(t[0, 3:], torch.zeros_like(t[0, 3:]))
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(ref[1], torch.zeros_like(ref[1]))


def _fused_and_float64_attention(q, k, v, lengths, grad):
    """(output, gradients) of the fused attention on fp32 q, k, v, then of the reference in float64."""
    args = dict(q=q, k=k, v=v, lengths=lengths)
    out, grads = _run(A.attention, args, ["q", "k", "v"], grad)
    ref, ref_grads = _run(R.attention, {**args, "q": q.double(), "k": k.double(), "v": v.double()}, ["q", "k", "v"],
                          grad.double())
    return out, grads, ref, ref_grads


def test_attention_scores_far_below_zero_are_finite():
    """fp32 scores below -1e30 (|q . k| that large needs entries near 1e17): the reference's softmax
    is finite, and so is the fused op's. The online softmax started its running maximum at the
    finite floor -1e30, so such a row had exp2(s + 1e30) = 0 for every key and an output of zeros.
    Output and gradients within FP32_TOL of float64."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (_rnd(g, torch.float32, 1, 3, 1, 16) for _ in range(3))
    q[0, 1, 0, 0] = -1e17
    k[0, :, 0, 0] = torch.tensor([1e17, 2e17, 3e17])
    lengths = torch.tensor([3], device=DEVICE)
    grad = _rnd(g, torch.float32, 1, 3, 1, 16)
    out, grads, ref, ref_grads = _fused_and_float64_attention(q, k, v, lengths, grad)
    assert torch.isfinite(out).all()
    assert_rel(out, ref, FP32_TOL, "out")
    assert_rel(grads["v"], ref_grads["v"], FP32_TOL, "dv")
    for name in ("q", "k"):  # exactly 0 here, and fp32 rounding times the 1e17 entries is not: finite only
        assert torch.isfinite(grads[name]).all(), "d" + name


@pytest.mark.parametrize("general", [False, True], ids=["one query block", "general backward"])
def test_attention_backward_recomputes_the_forwards_probabilities_at_any_score_magnitude(general, monkeypatch):
    """fp32 scores from -1e4 to -1e34, two keys tied for each row's maximum and the others far
    below it: the probabilities are exactly [0, 0, 1/2, 1/2, 0, 0] at every magnitude, and the
    backward, which recomputes them from q, k and the forward's softmax statistics, must find
    those. A stored log-sum-exp cannot: at |score| past 2**24 the tie's log 2 is lost in it (p = 1
    for both keys), and below that a log-sum-exp stored in natural log and turned back to log2 is
    one rounding off in about one row in seven (exp2 of an error of |score| * 2**-24); and a
    score the backward multiplies by the scale and subtracts in one fused multiply-add (a GPU)
    differs from the forward's rounded one by as much, which at 1e34 made dv inf on the H200.
    Output, dv and dk within FP32_TOL of float64; dq is 0 in exact arithmetic (the tied keys'
    terms cancel) and fp32 rounding times the large q entries is not: finite only. Both backward
    structures (the general one forced: its dk/dv kernel forms the scores as K Q^T)."""
    if general:
        monkeypatch.setattr(A, "_use_fused_bwd", lambda *shape: False)
    g = torch.Generator().manual_seed(9)
    q, k, v = (_rnd(g, torch.float32, 1, 6, 2, 16) for _ in range(3))
    k[0, 3] = k[0, 2]  # the tie, in both heads
    sign = torch.tensor([-1.0, 1.0], device=DEVICE)  # the scores are negative in both heads
    q[0, :, :, 0] = sign * torch.tensor([10.0 ** (2 + 6 * i) for i in range(6)], device=DEVICE)[:, None]
    k[0, :, :, 0] = -sign * torch.tensor([1e3, 3e3, 1e2, 1e2, 1e4, 2e3], device=DEVICE)[:, None]
    lengths = torch.tensor([6], device=DEVICE)
    grad = _rnd(g, torch.float32, 1, 6, 2, 16)
    out, grads, ref, ref_grads = _fused_and_float64_attention(q, k, v, lengths, grad)
    assert_rel(out, ref, FP32_TOL, "out")
    assert_rel(grads["v"], ref_grads["v"], FP32_TOL, "dv")
    assert_rel(grads["k"], ref_grads["k"], FP32_TOL, "dk")
    assert torch.isfinite(grads["q"]).all(), "dq"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_attention_nonfinite_upstream_gradient_at_a_valid_row(dtype, backward_path):
    """An inf or a NaN in the upstream gradient of a valid query row reaches dq, dk, dv where the
    reference's does."""
    args = _attention_args(dtype, seed=4)
    rows = _query_rows()
    grad = _rnd(torch.Generator().manual_seed(5), dtype, _AB, _AL, _AH, _ADH)
    for value in VALUES.values():
        g = grad.clone()
        g[2, 1, 0, 3] = value
        check_like_reference(R.attention, A.attention, args, ["q", "k", "v"], g, out_valid=rows,
                             grad_valid={"q": rows, "k": rows, "v": rows})


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_attention_padding_never_reaches_anything(dtype, backward_path):
    """Pinned, where the fused op is right and the reference is not: an inf or a NaN in a padded
    key / value / query row or in the upstream gradient of a padded query row reaches nothing (the
    reference multiplies masked probabilities, 0, by it: NaN in every valid output or in dk, dv of
    the whole sample). Output: padded rows exact zeros, valid rows the clean run's values; every
    gradient finite."""
    args = _attention_args(dtype, seed=6)
    grad = _rnd(torch.Generator().manual_seed(7), dtype, _AB, _AL, _AH, _ADH)
    clean_out, clean_grads = _run(A.attention, args, ["q", "k", "v"], grad)
    for value in VALUES.values():
        for target in ("q", "k", "v", "grad"):
            poked, g = _poked(args, grad, target, (2, 4, 0, 3), value)  # row 4 of a length-3 sample
            out, grads = _run(A.attention, poked, ["q", "k", "v"], g)
            assert torch.equal(out, clean_out), f"{target}={value}: the output changed"
            for name, t in grads.items():
                assert torch.isfinite(t).all(), f"{target}={value}: d{name} is not finite"


# ============================================================================ PMA pooling
_PB, _PL, _PD, _PNQ, _PH = 3, 6, 16, 2, 2
_PLENS = [6, 0, 3]
_PMA_GRADS = ["s", "query", "k_weight", "k_bias", "v_weight", "v_bias", "o_weight", "o_bias"]


def _pma_args(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = lambda: _rnd(g, dtype, _PD, _PD, scale=_PD ** -0.5)  # noqa: E731
    return dict(s=_rnd(g, dtype, _PB, _PL, _PD), lengths=torch.tensor(_PLENS, device=DEVICE),
                query=_rnd(g, dtype, _PNQ, _PD), k_weight=w(), k_bias=_rnd(g, dtype, _PD, scale=0.1), v_weight=w(),
                v_bias=_rnd(g, dtype, _PD, scale=0.1), o_weight=w(), o_bias=_rnd(g, dtype, _PD, scale=0.1),
                num_heads=_PH)


def _traced_pma(num_heads, **kwargs):
    """The folded PMA as torch.compile traces it (``_pooled_traced``), with pooled_attention's names."""
    return A._pooled_traced(**kwargs, H=num_heads)


def _pma_checked(fused_grads, ref_grads, names):
    for k in names:
        assert_same_nonfinite(fused_grads[k], ref_grads[k], "d" + k)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("path", ["eager-entry", "traced"])
def test_pooled_attention_nan_in_the_sequence_reaches_the_output(path, dtype, monkeypatch):
    """A NaN in a valid row of the sequence: the reference's pooled output of that sample is NaN
    (its scores are). The fused PMA (one attention launch with mask_queries off) gave that sample
    the output bias instead, finite, through the same ``l > 0`` test as the attention forward.
    Output and the gradients of s, the query and the k, v, o weights and o_bias: the reference's
    non-finite pattern (k_bias and v_bias: see the module docstring); the empty sample stays an
    exact zero."""
    fn = A.pooled_attention
    if path == "traced":
        monkeypatch.setattr(A, "tracing", lambda tensors: True)  # attention() takes its custom op
        fn = _traced_pma
    args = _poke(_pma_args(dtype), "s", (2, 1, 3), math.nan)
    grad = _rnd(torch.Generator().manual_seed(1), dtype, _PB, _PNQ, _PD)
    ro, rg = _run(R.pooled_attention, args, _PMA_GRADS, grad)
    fo, fg = _run(fn, args, _PMA_GRADS, grad)
    valid = torch.tensor(_PLENS, device=DEVICE)[:, None, None].expand(_PB, _PNQ, _PD) > 0
    assert torch.isnan(ro[2]).all()
    assert_same_nonfinite(fo, ro, "output", valid)
    assert torch.equal(fo[1], torch.zeros_like(fo[1]))
    _pma_checked(fg, rg, ["s", "query", "k_weight", "v_weight", "o_weight", "o_bias"])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("path", ["eager-entry", "traced"])
def test_pooled_attention_nonfinite_key_bias(path, dtype, monkeypatch):
    """k_bias with an inf or a NaN: the reference's scores ``q . (W_k s + b_k)`` are non-finite, so
    is every output of a sample with keys. The fused PMA folds the key projection into the queries
    and drops b_k (softmax ignores the finite shift ``q . b_k``), so its output stayed finite: an
    inf parameter silently ignored. Now the folded key weight carries the NaN (``_key_weight``).
    Output: non-finite for every sample with keys, exact zeros for the empty one; gradients of s,
    the query and the weights non-finite where the reference's are."""
    fn = A.pooled_attention
    if path == "traced":
        monkeypatch.setattr(A, "tracing", lambda tensors: True)
        fn = _traced_pma
    grad = _rnd(torch.Generator().manual_seed(2), dtype, _PB, _PNQ, _PD)
    for name, value in VALUES.items():
        args = _poke(_pma_args(dtype, seed=3), "k_bias", 3, value)
        ro, rg = _run(R.pooled_attention, args, _PMA_GRADS, grad)
        fo, fg = _run(fn, args, _PMA_GRADS, grad)
        assert not torch.isfinite(fo[0]).any() and not torch.isfinite(fo[2]).any(), f"{name}: finite output"
        assert torch.equal(fo[1], torch.zeros_like(fo[1])), name
        _pma_checked(fg, rg, ["s", "query", "k_weight", "v_weight", "o_weight"])


# ============================================================================ gated LCE
def _glce_samples_per_block(n_in: int, n_out: int, d: int, check_x: bool) -> int:
    """The forward's samples per block at these sizes, after asserting that its plan checks the
    tile ``check_x`` says (``gated_lce._check_x``: the x tile, or Y): the tests run both checks."""
    n_per, kx, ro, *_ = G._config(n_in, n_out, d, False)
    assert G._check_x(kx, ro) == check_x, (n_in, n_out, d)
    return n_per


#: a case of each of the forward's checks for the parameter tests (d = 24)
GLCE_PARAM_CASES = pytest.mark.parametrize("B, n_in, n_out, check_x", [(5, 3, 2, False), (40, 2, 4, True)],
                                           ids=["checks-Y", "checks-x"])


@pytest.mark.parametrize("n_in, n_out, B, check_x", [(3, 2, 72, False), (2, 4, 40, True)], ids=["checks-Y", "checks-x"])
@pytest.mark.parametrize("dtype", GLCE_DTYPES, ids=GLCE_DT_IDS)
def test_gated_lce_nonfinite_input_stays_in_its_sample(dtype, n_in, n_out, B, check_x):
    """An inf or a NaN in one sample's x: the reference's output is non-finite in that sample only
    (for an inf, in only the elements it reaches). The forward kernel computes a block of samples
    with one block-diagonal dot, where the other samples' zero weights times inf gave NaN: every
    sample of the block (here three blocks, the last one partial, the inf or NaN in the first or the
    last; the interpreter's two programs take blocks 0 and 2, and 1: a program runs a slow-path
    block before or after a dot-path one) lost its output. Now such a block takes a per-sample slow
    path: the output has exactly the reference's non-finite elements, and its finite elements match
    the reference (fp32 within FP32_TOL of float64, fp16 by the DESIGN §5 rule). Both of the
    forward's checks, of the x tile and of Y (``gated_lce._check_x``), are run; the slow path's
    block is stored once (conftest's access check fails a second store with no barrier between).
    Backward: every gradient the reference makes non-finite is non-finite (dx of the block's other
    samples may be NaN too: see the module docstring)."""
    d = 24
    n_per = _glce_samples_per_block(n_in, n_out, d, check_x)
    assert 2 * n_per < B < 3 * n_per  # three forward blocks, the last partial
    g = torch.Generator().manual_seed(0)
    masters = dict(x=torch.randn(B, n_in, d, generator=g, dtype=torch.float64),
                   weight=torch.randn(n_in, n_out, generator=g, dtype=torch.float64) * n_in ** -0.5,
                   bias=torch.randn(n_out, generator=g, dtype=torch.float64) * 0.5,
                   gate_weight=torch.randn(d, d, generator=g, dtype=torch.float64) * d ** -0.5,
                   gate_bias=torch.randn(d, generator=g, dtype=torch.float64) * 0.5)
    grad = torch.randn(B, n_out, d, generator=g, dtype=torch.float64)
    diff = list(masters)
    for sample in (B - 2, 2):
        for name, value in VALUES.items():
            m = _poke(masters, "x", (sample, 1, 3), value)
            args = {k: v.to(DEVICE, dtype) for k, v in m.items()}
            fo, fg = _run(G.gated_lce, args, diff, grad.to(DEVICE))
            eo, eg = _run(R.gated_lce, args, diff, grad.to(DEVICE))
            ro, _ = _run(R.gated_lce, {k: v.to(DEVICE) for k, v in m.items()}, diff, grad.to(DEVICE))
            assert_same_nonfinite(fo, eo, f"x[{sample}]={name}: output")
            others = torch.ones(B, dtype=torch.bool, device=DEVICE)
            others[sample] = False
            assert torch.isfinite(fo[others]).all()
            fin = torch.isfinite(eo)
            if dtype == torch.float32:
                assert_rel(fo[fin], ro[fin], FP32_TOL, f"x[{sample}]={name}: finite outputs")
            else:
                assert_lowp(fo[fin], eo[fin], ro[fin], f"x[{sample}]={name}: finite outputs")
            for k in eg:
                swallowed = ~torch.isfinite(eg[k]) & torch.isfinite(fg[k])
                assert not swallowed.any(), f"x[{sample}]={name}: d{k} finite where the reference's is not"


@GLCE_PARAM_CASES
@pytest.mark.parametrize("dtype", GLCE_DTYPES, ids=GLCE_DT_IDS)
def test_gated_lce_nonfinite_parameters_and_gradient(dtype, B, n_in, n_out, check_x):
    """inf / NaN in a parameter or in the upstream gradient: the output is the reference's at every
    non-finite element (NaN where it is NaN, the same infinity where it is infinite), and every
    gradient element the reference makes non-finite is non-finite (the dW fold of the backward may
    add NaN to other entries of the same gradients). x is positive and the gate weight too, so that
    an inf weight or bias makes a row of Y and of Z +inf and the output +inf, not NaN: at d = 24
    (padded to 32 columns) the dot's padding columns of Y times the gate weight's zero padding once
    made the whole row of Z NaN there. Both of the forward's checks (``gated_lce._check_x``) are
    run: the x check alone does not see a non-finite parameter."""
    d = 24
    _glce_samples_per_block(n_in, n_out, d, check_x)
    assert d < 32
    g = torch.Generator().manual_seed(1)
    args = dict(x=_rnd(g, dtype, B, n_in, d).abs(), weight=_rnd(g, dtype, n_in, n_out, scale=n_in ** -0.5),
                bias=_rnd(g, dtype, n_out, scale=0.5), gate_weight=_rnd(g, dtype, d, d, scale=d ** -0.5).abs(),
                gate_bias=_rnd(g, dtype, d, scale=0.5))
    grad = _rnd(g, dtype, B, n_out, d)
    diff = list(args)
    cases = [("weight", (1, 0)), ("bias", (1,)), ("gate_weight", (3, 4)), ("gate_bias", (5,)), ("grad", (2, 1, 3))]
    infinite_outputs = 0
    for target, idx in cases:
        for name, value in VALUES.items():
            a, gr = _poked(args, grad, target, idx, value)
            fo, fg = _run(G.gated_lce, a, diff, gr)
            eo, eg = _run(R.gated_lce, a, diff, gr)
            assert_same_nonfinite(fo, eo, f"{target}={name}: output")
            inf = torch.isinf(eo)
            assert torch.equal(torch.isnan(fo), torch.isnan(eo)), f"{target}={name}: NaN elsewhere than the reference's"
            assert torch.equal(fo[inf], eo[inf]), f"{target}={name}: infinities of other signs than the reference's"
            infinite_outputs += int(inf.sum())
            for k in eg:
                swallowed = ~torch.isfinite(eg[k]) & torch.isfinite(fg[k])
                assert not swallowed.any(), f"{target}={name}: d{k} finite where the reference's is not"
    assert infinite_outputs >= 2 * B * d  # the +inf weight's and bias's rows (what the test is about)


@GLCE_PARAM_CASES
def test_gated_lce_fp32_bias_past_fp16s_range_under_autocast(B, n_in, n_out, check_x):
    """fp16 autocast with fp32 parameters and a bias of 1e5, finite in fp32 but past fp16's 65504:
    the reference's Y row is 1e5 (fp32), its gate pre-activation inf (the linear casts Y to fp16),
    so its output row is 1e5 (fp32: eager's output dtype, the kernel's since 2026-11-29; inf when
    that was fp16). The kernel's fp32 ``Y`` is finite, so the
    ``Y`` check passed it, but the dot's ``Y`` holds the bias in its padding columns too (d = 24 of
    32), and rounded to fp16 for the gate dot those were inf: times the gate weight's zero padding,
    a NaN row. Each program now checks its bias in the compute dtype: the output is the reference's,
    NaN nowhere, no infinities, close."""
    d = 24
    _glce_samples_per_block(n_in, n_out, d, check_x)
    g = torch.Generator().manual_seed(2)
    args = dict(x=_rnd(g, torch.float32, B, n_in, d).abs(), weight=_rnd(g, torch.float32, n_in, n_out, scale=0.5),
                bias=torch.zeros(n_out, device=DEVICE), gate_weight=_rnd(g, torch.float32, d, d, scale=0.1).abs() + 0.01,
                gate_bias=torch.zeros(d, device=DEVICE))
    args["bias"][1] = 1e5
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.float16):
        fo = G.gated_lce(**args)
        eo = R.gated_lce(**args)
    # eager's dtype, fp32: the row of about 1e5 stays finite, its gate saturated (sigmoid(inf) = 1)
    assert fo.dtype == eo.dtype == torch.float32 and torch.isfinite(eo).all() and (eo[:, 1] > 65504).all()
    assert not torch.isnan(fo).any(), f"{int(torch.isnan(fo).sum())} NaN elements"
    assert torch.equal(torch.isinf(fo), torch.isinf(eo))
    assert_rel(fo, eo, 2e-3, "outputs")


@GLCE_PARAM_CASES
def test_gated_lce_slow_path_rounds_the_parameters_as_the_dot_path_does(B, n_in, n_out, check_x):
    """fp16 autocast with fp32 parameters and an inf in sample 0: its block takes the per-sample slow
    path, whose other samples must come out as the dot path gives them (the same call with sample
    0 finite): weights, bias and gate rounded to fp16 alike. The outputs (fp32, eager's dtype) differ
    only by the two paths' fp32 sums of other orders. A mutation test (2026-11-29) left the slow
    path's weight unrounded, 4.5e-4 off, and the suite passed it."""
    d = 24
    per_block = _glce_samples_per_block(n_in, n_out, d, check_x)
    assert per_block >= 2  # sample 0's block holds others
    g = torch.Generator().manual_seed(3)
    args = dict(x=_rnd(g, torch.float32, B, n_in, d), weight=_rnd(g, torch.float32, n_in, n_out, scale=0.5),
                bias=_rnd(g, torch.float32, n_out), gate_weight=_rnd(g, torch.float32, d, d, scale=0.3),
                gate_bias=_rnd(g, torch.float32, d))
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.float16):
        dot_path = G.gated_lce(**args)
        args["x"] = args["x"].clone()
        args["x"][0, 0, 0] = float("inf")
        slow = G.gated_lce(**args)
    same_block = slice(1, min(B, per_block))
    assert torch.isfinite(slow[same_block]).all()
    assert_rel(slow[same_block], dot_path[same_block], 1e-6, "the block's other samples")


# ============================================================================ PFFN
_FB, _FL, _FD, _FNS = 3, 5, 16, 2
_FLENS = [5, 0, 3]


def _pffn_args(dtype, linear, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = dict(s=_rnd(g, dtype, _FB, _FL, _FD), lengths=torch.tensor(_FLENS, device=DEVICE),
             ln_weight=(1 + 0.1 * torch.randn(_FD, generator=g)).to(DEVICE, dtype),
             ln_bias=_rnd(g, dtype, _FD, scale=0.1), eps=1e-5)
    if linear:
        a.update(x_sum=_rnd(g, dtype, _FB, _FNS, _FD, scale=0.5), a=_rnd(g, dtype, _FNS, _FD, scale=0.5))
    else:
        a.update(w_b=_rnd(g, dtype, _FB, _FD, _FD, scale=_FD ** -0.5))
    return a


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("mode", ["mlp", "linear"])
def test_pffn_nonfinite_at_valid_positions(mode, dtype):
    """PFFN (LayerNorm prologue, per-sample matmul, masked epilogue in one kernel): an inf or a NaN
    in a valid row of s, in a per-sample weight, in a LayerNorm parameter or in the upstream
    gradient of a valid row gives the reference's non-finite pattern in the valid output rows, ds
    of valid rows, the per-sample weight gradients of non-empty samples and the LayerNorm
    gradients."""
    linear = mode == "linear"
    ref, fused = (R.pffn_linear, P.pffn_linear) if linear else (R.pffn_mlp, P.pffn_mlp)
    wname = "x_sum" if linear else "w_b"
    diff = ["s", "ln_weight", "ln_bias", wname] + (["a"] if linear else [])
    args = _pffn_args(dtype, linear)
    lens = torch.tensor(_FLENS, device=DEVICE)
    rows = R.row_mask(lens, _FL)[:, :, None].expand(_FB, _FL, _FD)
    live = (lens > 0)[:, None, None].expand_as(args[wname])
    gv = {"s": rows, wname: live}
    grad = _rnd(torch.Generator().manual_seed(1), dtype, _FB, _FL, _FD)
    cases = [("s", (2, 1, 3)), (wname, (2, 1, 4)), ("ln_weight", (3,)), ("ln_bias", (5,)), ("grad", (2, 2, 7))]
    for target, idx in cases:
        for value in VALUES.values():
            a, g = _poked(args, grad, target, idx, value)
            check_like_reference(ref, fused, a, diff, g, out_valid=rows, grad_valid=gv)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("mode", ["mlp", "linear"])
def test_pffn_padding_never_reaches_anything(mode, dtype):
    """Pinned, where the fused op is right and the reference is not: an inf or a NaN in a padded
    row of s, in the weight of an empty sample or in the upstream gradient of a padded row changes
    nothing (the reference's ``out * mask`` and its backward give ``inf * 0``: NaN in the padded
    output rows and in the weight and LayerNorm gradients)."""
    linear = mode == "linear"
    fused = P.pffn_linear if linear else P.pffn_mlp
    wname = "x_sum" if linear else "w_b"
    diff = ["s", "ln_weight", "ln_bias", wname] + (["a"] if linear else [])
    args = _pffn_args(dtype, linear, seed=2)
    grad = _rnd(torch.Generator().manual_seed(3), dtype, _FB, _FL, _FD)
    clean_out, clean_grads = _run(fused, args, diff, grad)
    for value in VALUES.values():
        for target, idx in (("s", (2, 4, 3)), ("s", (1, 0, 3)), (wname, (1, 1, 2)), ("grad", (2, 3, 5))):
            a, g = _poked(args, grad, target, idx, value)
            out, grads = _run(fused, a, diff, g)
            assert torch.equal(out, clean_out), f"{target}{idx}={value}: the output changed"
            for k, t in grads.items():
                assert torch.isfinite(t).all(), f"{target}{idx}={value}: d{k} is not finite"


# ============================================================================ LayerNorm, DOT, DCN, FFN
def _sweep(ref, fused, args, diff, grad, targets, grad_idx):
    for value in VALUES.values():
        for target, idx in targets:
            check_like_reference(ref, fused, _poke(args, target, idx, value), diff, grad)
        g = grad.clone()
        g[grad_idx] = value
        check_like_reference(ref, fused, args, diff, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_add_layer_norm_nonfinite(dtype):
    g = torch.Generator().manual_seed(0)
    N = 20
    args = dict(x=_rnd(g, dtype, 4, 3, N), residual=_rnd(g, dtype, 4, 3, N),
                weight=(1 + 0.1 * torch.randn(N, generator=g)).to(DEVICE, dtype), bias=_rnd(g, dtype, N, scale=0.1),
                eps=1e-5)
    _sweep(R.add_layer_norm, LN.add_layer_norm, args, ["x", "residual", "weight", "bias"], _rnd(g, dtype, 4, 3, N),
           [("x", (1, 2, 3)), ("residual", (3, 0, 19)), ("weight", (3,)), ("bias", (7,))], (2, 1, 4))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_dot_interaction_nonfinite(dtype):
    g = torch.Generator().manual_seed(0)
    _sweep(R.dot_interaction, D.dot_interaction, dict(z=_rnd(g, dtype, 3, 5, 8)), ["z"], _rnd(g, dtype, 3, 10),
           [("z", (1, 2, 3)), ("z", (2, 0, 7))], (1, 4))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_feed_forward_nonfinite(dtype):
    # H = 40: two hidden chunks, the second partial; 15 rows in one 64-row block, so the padded rows
    # (x = 0, dy = 0) meet every non-finite parameter in the backward kernels
    g = torch.Generator().manual_seed(0)
    K, H, N = 24, 40, 12
    args = dict(x=_rnd(g, dtype, 3, 5, K), w1=_rnd(g, dtype, H, K, scale=K ** -0.5), b1=_rnd(g, dtype, H, scale=0.5),
                w2=_rnd(g, dtype, N, H, scale=H ** -0.5), b2=_rnd(g, dtype, N, scale=0.5))
    _sweep(R.feed_forward, FF.feed_forward, args, ["x", "w1", "b1", "w2", "b2"], _rnd(g, dtype, 3, 5, N),
           [("x", (1, 2, 3)), ("w1", (35, 4)), ("b1", (5,)), ("w2", (7, 33)), ("b2", (11,))], (2, 4, 9))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_cross_net_nonfinite(dtype):
    g = torch.Generator().manual_seed(0)
    Dm = 24
    args = dict(x0=_rnd(g, dtype, 4, Dm), kernels=[_rnd(g, dtype, Dm, Dm, scale=Dm ** -0.5) for _ in range(2)],
                biases=[_rnd(g, dtype, Dm, 1, scale=0.1) for _ in range(2)])
    _sweep(R.cross_net, C.cross_net, args, ["x0", "kernels", "biases"], _rnd(g, dtype, 4, Dm),
           [("x0", (1, 3)), ("kernels[1]", (3, 4)), ("biases[0]", (5, 0))], (2, 7))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_low_rank_cross_net_nonfinite(dtype):
    g = torch.Generator().manual_seed(0)
    Dm, r = 24, 4
    args = dict(x0=_rnd(g, dtype, 5, Dm), w_kernels=[_rnd(g, dtype, Dm, r, scale=0.5) for _ in range(2)],
                v_kernels=[_rnd(g, dtype, r, Dm, scale=Dm ** -0.5) for _ in range(2)],
                biases=[_rnd(g, dtype, Dm, 1, scale=0.1) for _ in range(2)])
    _sweep(R.low_rank_cross_net, C.low_rank_cross_net, args, ["x0", "w_kernels", "v_kernels", "biases"],
           _rnd(g, dtype, 5, Dm), [("x0", (1, 3)), ("w_kernels[0]", (3, 1)), ("v_kernels[1]", (1, 4))], (4, 7))


# ============================================================================ fp16 magnitudes
def test_fp16_intermediates_do_not_overflow_where_the_result_fits():
    """Pinned: finite fp16 inputs whose intermediates pass the fp16 maximum in the reference (it
    rounds them) while the kernels keep them in fp32. The fused results are finite and right (the
    reference's are NaN): attention scores ``q . k`` past 65504, LayerNorm of ``x + residual``
    past 65504, PFFN's backward with an upstream gradient near 6e4. "Right": within 1e-2 of float64
    on the rounded inputs, about 20 half-ulps of fp16. DESIGN's rule (2x eager's error) has no
    eager error to scale here, eager's result being NaN; until 2026-11-29 PFFN's gradients were
    checked for being finite only (an audit halved them and the test passed)."""
    g = torch.Generator().manual_seed(0)
    # attention: |q . k| up to ~1e5 (scaled by 1/sqrt(dh) only after the product in the reference)
    q = (torch.randn(1, 4, 1, 16, generator=g).clamp(-2, 2) * 300).to(DEVICE)
    k = (torch.randn(1, 4, 1, 16, generator=g).clamp(-2, 2) * 300).to(DEVICE)
    v = torch.randn(1, 4, 1, 16, generator=g).to(DEVICE)
    lengths = torch.tensor([4], device=DEVICE)
    eager16 = R.attention(q.half(), k.half(), v.half(), lengths)
    assert not torch.isfinite(eager16).all()  # the premise: the reference overflows
    out = A.attention(q.half(), k.half(), v.half(), lengths)
    ref = R.attention(q.half().double(), k.half().double(), v.half().double(), lengths)
    assert torch.isfinite(out).all()
    assert_rel(out, ref, 1e-2, "attention")
    # LayerNorm of x + residual, each 4e4: the fp16 sum overflows, its fp32 sum does not
    x = (torch.rand(3, 24, generator=g) * 1e4 + 3e4).to(DEVICE)
    res = (torch.rand(3, 24, generator=g) * 1e4 + 3e4).to(DEVICE)
    w = (1 + 0.1 * torch.randn(24, generator=g)).to(DEVICE)  # (not 1 and 0: a dropped one shows)
    b = (0.1 * torch.randn(24, generator=g)).to(DEVICE)
    assert not torch.isfinite(R.add_layer_norm(x.half(), res.half(), w.half(), b.half(), 1e-5)).all()
    y = LN.add_layer_norm(x.half(), res.half(), w.half(), b.half(), 1e-5)
    assert torch.isfinite(y).all()
    ref = R.add_layer_norm(x.half().double(), res.half().double(), w.half().double(), b.half().double(), 1e-5)
    assert_rel(y, ref, 1e-2, "LN")
    # PFFN backward, upstream gradient ~6e4
    args = _pffn_args(torch.float16, False, seed=4)
    grad = (torch.randn(_FB, _FL, _FD, generator=g).clamp(-1, 1) * 6e4).to(DEVICE, torch.float16)
    diff = ["s", "ln_weight", "ln_bias", "w_b"]
    _, fg = _run(P.pffn_mlp, args, diff, grad)
    a64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in args.items()}
    _, tg = _run(R.pffn_mlp, a64, diff, grad.double())
    for k in diff:
        fits = tg[k].abs() < 6e4
        assert torch.isfinite(fg[k][fits]).all(), f"d{k}: non-finite where the float64 gradient fits fp16"
        assert_rel(fg[k][fits], tg[k][fits], 1e-2, f"d{k} where the float64 gradient fits fp16")


# ============================================================================ the checks can fail
def test_the_checks_catch_a_swallowed_or_a_made_nan(monkeypatch):
    """The comparison is not vacuous: a LayerNorm whose backward launcher turns non-finite values
    into finite ones fails it, and so does one whose forward adds a NaN to a finite output."""
    g = torch.Generator().manual_seed(0)
    args = dict(x=_rnd(g, torch.float32, 4, 8), residual=None, weight=torch.ones(8, device=DEVICE),
                bias=torch.zeros(8, device=DEVICE), eps=1e-5)
    grad = _rnd(g, torch.float32, 4, 8)
    real_bwd, real_fwd = LN._bwd_impl, LN._fwd_impl

    def swallowing(*a, **k):
        return tuple(torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in real_bwd(*a, **k))

    with monkeypatch.context() as m:
        m.setattr(LN, "_bwd_impl", swallowing)
        with pytest.raises(AssertionError, match="finite in the fused result"):
            check_like_reference(R.add_layer_norm, LN.add_layer_norm, _poke(args, "x", (1, 2), math.nan),
                                 ["x", "weight", "bias"], grad)

    def making(*a, **k):
        y, mean, rstd = real_fwd(*a, **k)
        y = y.clone()
        y[0, 0] = math.nan
        return y, mean, rstd

    with monkeypatch.context() as m:
        m.setattr(LN, "_fwd_impl", making)
        with pytest.raises(AssertionError, match="non-finite in the fused result"):
            check_like_reference(R.add_layer_norm, LN.add_layer_norm, args, ["x", "weight", "bias"], grad)
