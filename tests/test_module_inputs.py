"""Bad inputs to the fused-capable modules fail alike on both backends.

The fused ops check their inputs; the eager reference is PyTorch code that broadcasts. So a
``[B, 1, d]`` input to a ``GatedLCE`` of three tokens, lengths of shape ``[1]`` or ``[B, 1]``, float
lengths or a residual of another shape used to run on the eager path without a word (a wrong result,
or a wrongly shaped one) where the fused path raised. Each module now checks the ranks, sizes and
kinds of its inputs before its op (``layers._expect``), so that both backends raise the same
``ValueError``, naming the module and the argument (an audit of 2026-11-28 listed the cases); and,
outside autocast, an input of another dtype than the parameters (``layers._expect_dtype``; eager
raised PyTorch's RuntimeError there until 2026-11-29).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from interformer.layers import (CrossNet, DotInteraction, FeedForward, GatedLCE, LowRankCrossNet, PersonalizedFFN,
                                PoolingMultiHeadAttention, ResidualLayerNorm, RotaryMultiHeadAttention)
from interformer.tokenizers import DenseTokenizer, SequenceMaskNet, SparseTokenizer
from utils import DEVICE

B, L = 3, 5
F, I = dict(device=DEVICE), dict(device=DEVICE, dtype=torch.int64)


def _randn(*shape):
    return torch.randn(*shape, **F)


def _lengths(*shape, dtype=torch.int64):
    return torch.ones(*shape, device=DEVICE).to(dtype)


# (module factory, inputs, argument the error names)
CASES = {
    "gated_lce-one-token-for-three": (lambda b: GatedLCE(3, 2, 4, backend=b), lambda: (_randn(B, 1, 4),), "x"),
    "gated_lce-wrong-d": (lambda b: GatedLCE(3, 2, 4, backend=b), lambda: (_randn(B, 3, 5),), "x"),
    "gated_lce-integer-x": (lambda b: GatedLCE(3, 2, 4, backend=b), lambda: (torch.ones(B, 3, 4, **I),), "x"),
    "pffn-float-lengths": (lambda b: PersonalizedFFN(4, 2, hidden=8, backend=b),
                           lambda: (_randn(B, L, 4), _randn(B, 2, 4), torch.tensor([2.5, 2.0, 0.0], **F)), "lengths"),
    "pffn-bool-lengths": (lambda b: PersonalizedFFN(4, 2, mode="linear", backend=b),
                          lambda: (_randn(B, L, 4), _randn(B, 2, 4), _lengths(B, dtype=torch.bool)), "lengths"),
    "pffn-lengths-of-one": (lambda b: PersonalizedFFN(4, 2, hidden=8, backend=b),
                            lambda: (_randn(B, L, 4), _randn(B, 2, 4), _lengths(1)), "lengths"),
    "pffn-lengths-column": (lambda b: PersonalizedFFN(4, 2, hidden=8, backend=b),
                            lambda: (_randn(B, L, 4), _randn(B, 2, 4), _lengths(B, 1)), "lengths"),
    "pffn-x_sum-of-another-batch": (lambda b: PersonalizedFFN(4, 2, mode="linear", backend=b),
                                    lambda: (_randn(B, L, 4), _randn(1, 2, 4), _lengths(B)), "x_sum"),
    "cross_net-wrong-width": (lambda b: CrossNet(6, 2, backend=b), lambda: (_randn(B, 5),), "x0"),
    "cross_net-one-sample-as-1d": (lambda b: CrossNet(6, 2, backend=b), lambda: (_randn(6),), "x0"),
    "low_rank-3d": (lambda b: LowRankCrossNet(6, 2, 2, backend=b), lambda: (_randn(1, B, 6),), "x0"),
    "dot-wrong-d": (lambda b: DotInteraction(3, 4, backend=b), lambda: (_randn(B, 3, 5),), "z"),
    "dot-wrong-token-count": (lambda b: DotInteraction(3, 4, backend=b), lambda: (_randn(B, 2, 4),), "z"),
    "rotary-2d-s": (lambda b: RotaryMultiHeadAttention(8, 2, backend=b), lambda: (_randn(L, 8), _lengths(B)), "s"),
    "rotary-lengths-of-one": (lambda b: RotaryMultiHeadAttention(8, 2, backend=b),
                              lambda: (_randn(B, L, 8), _lengths(1)), "valid_lengths"),
    "rotary-float-lengths": (lambda b: RotaryMultiHeadAttention(8, 2, backend=b),
                             lambda: (_randn(B, L, 8), _lengths(B, dtype=torch.float32)), "valid_lengths"),
    "pma-lengths-column": (lambda b: PoolingMultiHeadAttention(2, 8, 2, backend=b),
                           lambda: (_randn(B, L, 8), _lengths(B, 1)), "lengths"),
    "pma-wrong-d": (lambda b: PoolingMultiHeadAttention(2, 8, 2, backend=b), lambda: (_randn(B, L, 4), _lengths(B)), "s"),
    "layernorm-residual-of-one-row": (lambda b: ResidualLayerNorm(4, backend=b), lambda: (_randn(B, L, 4), _randn(4)),
                                      "residual"),
    "layernorm-residual-of-one-sample": (lambda b: ResidualLayerNorm(4, backend=b),
                                         lambda: (_randn(B, L, 4), _randn(1, L, 4)), "residual"),
    "layernorm-wrong-width": (lambda b: ResidualLayerNorm(4, backend=b), lambda: (_randn(B, L, 5),), "x"),
    "layernorm-integer-x": (lambda b: ResidualLayerNorm(4, backend=b), lambda: (torch.ones(B, 4, **I),), "x"),
    "feed_forward-wrong-width": (lambda b: FeedForward(4, 8, 4, backend=b), lambda: (_randn(B, L, 5),), "x"),
    "feed_forward-scalar": (lambda b: FeedForward(4, 8, 4, backend=b), lambda: (_randn(()),), "x"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_the_same_error_on_both_backends(case):
    make, inputs, arg = CASES[case]
    messages = []
    for backend in ("eager", "triton"):
        torch.manual_seed(0)
        module = make(backend).to(DEVICE)
        with pytest.raises(ValueError, match=rf"^{type(module).__name__}: {arg} must be ") as info:
            module(*inputs())
        messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_good_inputs_of_every_kind_still_run_alike():
    """What the checks let through: int32 lengths, non-contiguous inputs, a batch of 0, the same
    results on both backends (so the checks refuse only what they name)."""
    torch.manual_seed(0)
    s = _randn(B, L + 2, 4)[:, 1:L + 1]          # a strided view
    x_sum = _randn(B, 4, 2).transpose(1, 2)        # [B, 2, 4], non-contiguous
    lengths = torch.tensor([5, 0, 2], device=DEVICE, dtype=torch.int32)
    eager = PersonalizedFFN(4, 2, hidden=8, backend="eager").to(DEVICE)
    fused = PersonalizedFFN(4, 2, hidden=8, backend="triton").to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    torch.testing.assert_close(fused(s, x_sum, lengths), eager(s, x_sum, lengths), rtol=1e-5, atol=1e-5)
    for backend in ("eager", "triton"):
        lce = GatedLCE(3, 2, 4, backend=backend).to(DEVICE)
        assert lce(_randn(0, 3, 4)).shape == (0, 2, 4)
        norm = ResidualLayerNorm(4, backend=backend).to(DEVICE)
        assert norm(_randn(B, L, 4), _randn(B, L, 4)).shape == (B, L, 4)
        assert norm(_randn(4)).shape == (4,)  # any leading dimensions, none included, as nn.LayerNorm
        ffn = FeedForward(4, 8, 3, backend=backend).to(DEVICE)
        assert ffn(_randn(2, B, L, 4)).shape == (2, B, L, 3) and ffn(_randn(4)).shape == (3,)


@pytest.mark.parametrize("make", [
    lambda b: PersonalizedFFN(4, 2, hidden=8, backend=b), lambda b: RotaryMultiHeadAttention(4, 2, backend=b),
    lambda b: PoolingMultiHeadAttention(2, 4, 2, backend=b)], ids=["pffn", "rotary", "pma"])
def test_lengths_out_of_range_read_as_clamped_alike_on_both_backends(make):
    """What the README says the modules leave to the op: a length past the sequence counts as all of
    it and a negative one as none, on both paths (the model's validate_batch refuses both)."""
    s, x_sum = _randn(B, L, 4), _randn(B, 2, 4)
    outs = []
    for backend in ("eager", "triton"):
        torch.manual_seed(0)
        module = make(backend).to(DEVICE)
        extra = (x_sum,) if isinstance(module, PersonalizedFFN) else ()
        wild = module(s, *extra, torch.tensor([L + 2, -1, 3], **I))
        torch.testing.assert_close(wild, module(s, *extra, torch.tensor([L, 0, 3], **I)), rtol=0, atol=0)
        outs.append(wild)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,message", [
    (lambda: RotaryMultiHeadAttention(8, 0), "num_heads must be an int >= 1"),
    (lambda: RotaryMultiHeadAttention(8, -2), "num_heads must be an int >= 1"),
    (lambda: RotaryMultiHeadAttention(8, 2, rope_base=0.0), "rope_base must be finite and >= 1"),
    (lambda: RotaryMultiHeadAttention(8, 2, rope_base=float("nan")), "rope_base must be finite and >= 1"),
    (lambda: PoolingMultiHeadAttention(2, 8, 0), "num_heads must be an int >= 1"),
    (lambda: PoolingMultiHeadAttention(-1, 8, 2), "num_queries must be an int >= 0"),
    (lambda: PersonalizedFFN(4, 2, eps=-1.0), "eps must be finite"),
    (lambda: PersonalizedFFN(0, 2), "d_model must be an int >= 1"),
    (lambda: PersonalizedFFN(4, 2, hidden=2.5), "hidden must be an int >= 1"),
    (lambda: DotInteraction(3, 0), "d_model must be an int >= 1"),
    (lambda: DotInteraction(True, 4), "num_tokens must be an int >= 1"),
], ids=["rotary-0-heads", "rotary-negative-heads", "rotary-base-0", "rotary-base-nan", "pma-0-heads",
        "pma-negative-queries", "pffn-negative-eps", "pffn-0-wide", "pffn-fractional-hidden", "dot-0-wide",
        "dot-bool-tokens"])
def test_constructors_refuse_sizes_and_settings_that_would_fail_later(make, message):
    """Sizes and settings InterFormerConfig refuses are refused by the modules built on their own too:
    they used to fail later (a ZeroDivisionError, an error inside torch.empty) or build a module that
    returned NaN, differently on the two backends (a rotary base of 0, a negative LayerNorm eps)."""
    with pytest.raises(ValueError, match=message):
        make()


def test_constructors_take_numpy_integers():
    np = pytest.importorskip("numpy")
    assert DotInteraction(np.int64(3), np.int32(4)).num_pairs == 3
    assert RotaryMultiHeadAttention(8, np.int64(2)).head_dim == 4


def test_the_checks_add_nothing_to_an_fx_graph():
    """torch.fx.symbolic_trace passes the checks (Proxies have no sizes) without recording a ``shape``
    read for them: the traced PFFN holds the call of its fused function and nothing else of the checks."""
    module = PersonalizedFFN(8, 2, hidden=8, backend="triton")  # the eager reference reads shapes itself
    graph = torch.fx.symbolic_trace(module).graph
    reads = [n for n in graph.nodes if n.target is getattr or n.target in ("size", "dim")]
    assert not reads, graph


@pytest.mark.parametrize("make,inputs,arg", [
    (lambda: SparseTokenizer([5, 7], 4), lambda: (torch.ones(B, 3, **I),), "sparse"),
    (lambda: SparseTokenizer([5, 7], 4), lambda: (torch.ones(B, 2, **F),), "sparse"),
    (lambda: SequenceMaskNet([5, 7], 4), lambda: (torch.ones(B, 3, L, **I), _lengths(B)), "seq"),
    (lambda: SequenceMaskNet([5, 7], 4), lambda: (torch.ones(B, 2, L, **I), _lengths(B + 1)), "lengths"),
    (lambda: SequenceMaskNet([5, 7], 4), lambda: (torch.ones(B, 2, L, **I), _lengths(B, dtype=torch.float32)),
     "lengths"),
    (lambda: DenseTokenizer(3, 4), lambda: (_randn(3),), "dense"),
    (lambda: DenseTokenizer(3, 4, "per_field"), lambda: (_randn(B, 2),), "dense"),
], ids=["sparse-fields", "sparse-float-ids", "seq-channels", "seq-lengths-batch", "seq-float-lengths",
        "dense-1d", "dense-fields"])
def test_the_tokenizers_name_a_bad_input(make, inputs, arg):
    """Used on their own the tokenizers name the bad argument (they raised aten's errors, or
    broadcast float or wrongly sized lengths); inside the model validate_batch checks first."""
    module = make().to(DEVICE)
    with pytest.raises(ValueError, match=rf"^{type(module).__name__}: {arg} must be "):
        module(*inputs())


# ----------------------------------------------------------------------------- torch.fx traces
FX_CASES = {
    "gated_lce": (lambda: GatedLCE(3, 2, 16, backend="triton"), lambda: (_randn(B, 3, 16),)),
    "gated_lce-past-the-kernel-limit": (lambda: GatedLCE(3, 2, 160, backend="triton"), lambda: (_randn(B, 3, 160),)),
    "pffn-mlp": (lambda: PersonalizedFFN(16, 2, hidden=8, backend="triton"),
                 lambda: (_randn(B, L, 16), _randn(B, 2, 16), torch.tensor([L, 0, 3], **I))),
    "pffn-linear": (lambda: PersonalizedFFN(16, 2, mode="linear", backend="triton"),
                    lambda: (_randn(B, L, 16), _randn(B, 2, 16), torch.tensor([L, 0, 3], **I))),
    "feed_forward": (lambda: FeedForward(16, 24, 16, backend="triton"), lambda: (_randn(B, L, 16),)),
    "cross_net": (lambda: CrossNet(16, 2, backend="triton"), lambda: (_randn(B, 16),)),
    "low_rank_cross_net": (lambda: LowRankCrossNet(16, 2, 4, backend="triton"), lambda: (_randn(B, 16),)),
    "layer_norm": (lambda: ResidualLayerNorm(16, backend="triton"), lambda: (_randn(B, 16), _randn(B, 16))),
    "dot_interaction": (lambda: DotInteraction(3, 16, backend="triton"), lambda: (_randn(B, 3, 16),)),
}


@pytest.mark.parametrize("name", list(FX_CASES))
def test_a_traced_fused_module_calls_its_op_as_the_module_does(name):
    """``torch.fx.symbolic_trace`` of a fused module records a call of the public fused function
    (``kernels._dispatch.fx_call``), not its custom op, so the traced module runs what the module
    runs: the same output, bit for bit, plainly and under autocast (the op recorded before ran in
    fp32 there, and past the kernels' limits it launched a kernel where the module runs the
    reference: the ``past-the-kernel-limit`` case launches none), with the same gradients."""
    from interformer.profiling import triton_launches

    make, inputs = FX_CASES[name]
    module = make().to(DEVICE)
    gm = torch.fx.symbolic_trace(module)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert any(getattr(t, "__module__", "").startswith("interformer.kernels.") for t in calls), gm.code
    assert not any(isinstance(t, torch._ops.OpOverloadPacket) or "interformer::" in str(t) for t in calls), gm.code
    args = [a.requires_grad_() if a.is_floating_point() else a for a in inputs()]
    low = torch.float16 if DEVICE.type == "cpu" else torch.bfloat16  # (the interpreter has no bfloat16)
    for autocast in (False, True):
        results = []
        for m in (module, gm):
            with torch.autocast(DEVICE.type, dtype=low, enabled=autocast), triton_launches() as launches:
                out = m(*args)
            grads = torch.autograd.grad(out.float().square().sum(), [a for a in args if a.requires_grad])
            results.append((out, grads, sum(launches.values())))
        (out_m, g_m, n_m), (out_gm, g_gm, n_gm) = results
        assert out_gm.dtype == out_m.dtype and torch.equal(out_gm, out_m), (autocast, out_gm.dtype, out_m.dtype)
        assert all(torch.equal(a, b) for a, b in zip(g_gm, g_m)), autocast
        assert n_gm == n_m and (n_m == 0) == name.endswith("past-the-kernel-limit"), (n_gm, n_m)


# ----------------------------------------------------------------------------- dtypes outside autocast
HALF, DOUBLE = torch.float16, torch.float64

# (module factory, parameters' dtype, inputs (given the dtype of the odd one out), argument named, its dtype)
DTYPE_CASES = {
    "gated_lce": (lambda b: GatedLCE(3, 2, 4, backend=b), torch.float32, lambda t: (_randn(B, 3, 4).to(t),), "x", HALF),
    "pffn-mlp-x_sum": (lambda b: PersonalizedFFN(4, 2, hidden=8, backend=b), torch.float32,
                       lambda t: (_randn(B, L, 4), _randn(B, 2, 4).to(t), _lengths(B)), "x_sum", HALF),
    "pffn-mlp-s": (lambda b: PersonalizedFFN(4, 2, hidden=8, backend=b), torch.float32,
                   lambda t: (_randn(B, L, 4).to(t), _randn(B, 2, 4), _lengths(B)), "s", HALF),
    "pffn-linear-s": (lambda b: PersonalizedFFN(4, 2, mode="linear", backend=b), HALF,
                      lambda t: (_randn(B, L, 4).to(t), _randn(B, 2, 4).half(), _lengths(B)), "s", torch.float32),
    "pffn-linear-x_sum": (lambda b: PersonalizedFFN(4, 2, mode="linear", backend=b), torch.float32,
                          lambda t: (_randn(B, L, 4), _randn(B, 2, 4).to(t), _lengths(B)), "x_sum", HALF),
    "cross_net": (lambda b: CrossNet(6, 2, backend=b), torch.float32, lambda t: (_randn(B, 6).to(t),), "x0", DOUBLE),
    "low_rank_cross_net": (lambda b: LowRankCrossNet(6, 2, 2, backend=b), HALF, lambda t: (_randn(B, 6).to(t),), "x0",
                           torch.float32),
    "dot": (lambda b: DotInteraction(3, 4, backend=b), torch.float32, lambda t: (_randn(B, 3, 4).to(t),), "z", DOUBLE),
    "rotary": (lambda b: RotaryMultiHeadAttention(8, 2, backend=b), torch.float32,
               lambda t: (_randn(B, L, 8).to(t), _lengths(B)), "s", HALF),
    "pma": (lambda b: PoolingMultiHeadAttention(2, 8, 2, backend=b), torch.float32,
            lambda t: (_randn(B, L, 8).to(t), _lengths(B)), "s", HALF),
    "feed_forward": (lambda b: FeedForward(4, 8, 4, backend=b), torch.float32, lambda t: (_randn(B, L, 4).to(t),),
                     "x", HALF),
}


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("case", list(DTYPE_CASES))
def test_an_input_of_another_dtype_than_the_parameters_raises_one_value_error(case, backend):
    """Outside autocast an input whose dtype is not the parameters' fails on the eager path (its
    first GEMM), and the fused path must fail alike. It used to be PyTorch's RuntimeError there
    ("mat1 and mat2 must have the same dtype", ...) and the fused op's ValueError ("... must share
    one dtype", "x0 must be one of ...") or the same RuntimeError, by module; now each module
    raises one ValueError on both backends, naming itself, the argument and both dtypes
    (``layers._expect_dtype``), as ResidualLayerNorm did (tests/test_kernel_layernorm.py)."""
    make, param_dtype, inputs, arg, dtype = DTYPE_CASES[case]
    module = make(backend).to(DEVICE, param_dtype)
    with pytest.raises(ValueError, match=rf"^{type(module).__name__}: {arg} is {dtype} but the parameters are "
                                         rf"{param_dtype}: outside autocast "):
        module(*inputs(dtype))


def test_under_autocast_an_input_of_another_dtype_still_runs_alike():
    """What the check leaves alone: under autocast for the input's device a mismatch is legal (the
    GEMMs cast), and both backends run it, to the same results, as before; so does a mismatch a
    forward pre-hook casts away on the child layer the input meets first (eager runs it, so the
    module lets it through); outside autocast, the same call raises the module's ValueError."""
    low = torch.float16 if DEVICE.type == "cpu" else torch.bfloat16  # (the interpreter has no bfloat16)
    cast = lambda layer, args: (args[0].to(layer.weight.dtype),)  # noqa: E731
    for case in ("gated_lce", "pffn-mlp-s", "pffn-linear-x_sum", "cross_net", "dot", "rotary", "pma",
                 "feed_forward"):
        make, _, inputs, arg, _ = DTYPE_CASES[case]
        outs = []
        for backend in ("eager", "triton"):
            torch.manual_seed(0)
            module = make(backend).to(DEVICE, torch.float32)
            torch.manual_seed(1)
            args = inputs(low)
            with torch.autocast(DEVICE.type, dtype=low):
                outs.append(module(*args))
            with pytest.raises(ValueError, match=rf"^{type(module).__name__}: {arg} is {low} but the parameters"):
                module(*args)
        tol = 2e-2 if low == torch.float16 else 8e-2  # (a few of the low dtype's rounding steps)
        torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol, msg=case)
    for backend in ("eager", "triton"):
        module = RotaryMultiHeadAttention(8, 2, backend=backend).to(DEVICE)
        module.qkv.register_forward_pre_hook(cast)
        assert module(_randn(B, L, 8).half(), _lengths(B)).dtype == torch.float32


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("mode", ["mlp", "linear"])
def test_pffn_refuses_norm_parameters_layer_norm_refuses_for_s(mode, backend):
    """s meets the norm first: an fp32 s with fp16 norm parameters (all else fp32) fails on the eager
    path (``F.layer_norm``'s RuntimeError) and ran on the fused one, whose kernels take any mix (a
    review's find, 2026-11-29); both now raise one ValueError. The mixes ``nn.LayerNorm`` takes still
    run: a 16-bit s with fp32 norm parameters (the rest of s's dtype), and any mix under CUDA's autocast.
    (Under CPU autocast, which does not cast layer_norm's operands, the mix is left to the op, as
    ``ResidualLayerNorm`` leaves it.)"""
    def make(norm_dtype, rest_dtype):
        torch.manual_seed(0)
        m = PersonalizedFFN(4, 2, mode=mode, hidden=8, backend=backend).to(DEVICE, rest_dtype)
        m.norm.to(norm_dtype)
        return m

    torch.manual_seed(1)
    s, x_sum, lengths = _randn(B, L, 4), _randn(B, 2, 4), torch.tensor([L, 2, 0], device=DEVICE)
    with pytest.raises(ValueError, match=r"^PersonalizedFFN: s is torch.float32 but the norm's parameters are "
                                         r"torch.float16 \(weight\) and torch.float16 \(bias\): outside autocast"):
        make(torch.float16, torch.float32)(s, x_sum, lengths)
    half = make(torch.float32, torch.float16)
    assert half(s.half(), x_sum.half(), lengths).dtype == torch.float16
    if DEVICE.type == "cuda":  # (CPU autocast leaves layer_norm's dtypes alone: eager fails there, as above)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            make(torch.float16, torch.float32)(s, x_sum, lengths)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_both_norms_follow_layer_norms_rule_in_its_corners(backend):
    """ResidualLayerNorm and the PFFN's norm check their parameters by one helper
    (``layers._expect_norm_dtypes``), which closed two corners where they differed (2026-11-29):
    under autocast, float64 norm parameters with an fp32 input fail in eager's ``layer_norm``
    (autocast never casts float64), and the PFFN let them through, to run on the fused path; on the
    meta device ``nn.LayerNorm`` takes any mix, and ResidualLayerNorm refused it."""
    low = torch.float16 if DEVICE.type == "cpu" else torch.bfloat16
    ln = nn.LayerNorm(4).to(DEVICE, torch.float64)
    with torch.autocast(DEVICE.type, dtype=low), pytest.raises(RuntimeError):
        ln(_randn(B, L, 4))  # the fact the check stands for
    for mode in ("mlp", "linear"):
        torch.manual_seed(0)
        m = PersonalizedFFN(4, 2, mode=mode, hidden=8, backend=backend).to(DEVICE)
        m.norm.double()
        s, x_sum, lengths = _randn(B, L, 4), _randn(B, 2, 4), torch.tensor([L, 2, 0], device=DEVICE)
        with torch.autocast(DEVICE.type, dtype=low), pytest.raises(
                ValueError, match=r"^PersonalizedFFN: s is torch.float32 but the norm's parameters are torch.float64 "
                                  r"\(weight\) and torch.float64 \(bias\): under autocast"):
            m(s, x_sum, lengths)
    norm = ResidualLayerNorm(4, backend=backend).to(DEVICE, torch.float64)
    with torch.autocast(DEVICE.type, dtype=low), pytest.raises(ValueError, match=r"^ResidualLayerNorm: x is "
                                                                             r"torch.float32 but .* under autocast"):
        norm(_randn(B, 4))
    x = torch.empty(B, 4, device="meta")
    for norm in (ResidualLayerNorm(4, backend=backend).to("meta", torch.float16), nn.LayerNorm(4).to("meta").half()):
        y = norm(x)
        assert y.is_meta and y.shape == x.shape and y.dtype == nn.LayerNorm(4).to("meta").half()(x).dtype


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("case", list(DTYPE_CASES))
def test_under_autocast_a_float64_input_raises_one_value_error(case, backend):
    """Autocast casts fp32 operands to its dtype and leaves float64 ones alone, so under it a float64
    input with fp32 parameters still fails on the eager path (PyTorch's RuntimeError, "expected
    scalar type Double but found Half") and the fused ops refused float64 with their own ValueError
    ("x must be float32, float16 or bfloat16"); both backends now raise the module's ValueError (a
    review's find, 2026-11-29). ResidualLayerNorm alike (its own message)."""
    make, _, inputs, arg, _ = DTYPE_CASES[case]
    module = make(backend).to(DEVICE, torch.float32)
    norm = ResidualLayerNorm(4, backend=backend).to(DEVICE)
    low = torch.float16 if DEVICE.type == "cpu" else torch.bfloat16
    with torch.autocast(DEVICE.type, dtype=low):
        with pytest.raises(ValueError, match=rf"^{type(module).__name__}: {arg} is torch.float64 but the parameters "
                                             rf"are torch\.\w+: autocast does not cast float64"):
            module(*inputs(torch.float64))
        with pytest.raises(ValueError, match=r"^ResidualLayerNorm: x is torch.float64 but the norm's parameters are "
                                             r"torch.float32 \(weight\) and torch.float32 \(bias\): under autocast"):
            norm(_randn(B, 4).double())


def _to_dtype(module, path, dtype):
    """Convert the parameter (or child layer) at ``path`` of ``module`` alone to ``dtype``."""
    *parents, last = path.split(".")
    owner = module
    for name in parents:
        owner = getattr(owner, name)
    child = getattr(owner, last)
    if isinstance(child, nn.Module):
        child.to(dtype)
    else:
        setattr(owner, last, nn.Parameter(child.detach().to(dtype)))


MIXED = {  # module factory, inputs, the parameter or child converted, its dtype
    "gated_lce-fp16-bias": (lambda b: GatedLCE(3, 2, 4, backend=b), lambda: (_randn(B, 3, 4),), "bias", torch.float16),
    "gated_lce-fp64-gate-bias": (lambda b: GatedLCE(3, 2, 4, backend=b), lambda: (_randn(B, 3, 4),), "gate.bias",
                                 torch.float64),
    "gated_lce-fp16-gate": (lambda b: GatedLCE(3, 2, 4, backend=b), lambda: (_randn(B, 3, 4),), "gate", torch.float16),
    "cross_net-fp16-bias": (lambda b: CrossNet(6, 2, backend=b), lambda: (_randn(B, 6),), "bias.0", torch.float16),
    "low_rank-fp64-bias": (lambda b: LowRankCrossNet(6, 2, 2, backend=b), lambda: (_randn(B, 6),), "bias.1",
                           torch.float64),
    "low_rank-fp16-u": (lambda b: LowRankCrossNet(6, 2, 2, backend=b), lambda: (_randn(B, 6),), "W_kernels.1",
                        torch.float16),
    "pma-fp64-query": (lambda b: PoolingMultiHeadAttention(2, 8, 2, backend=b),
                       lambda: (_randn(B, L, 8), torch.tensor([5, 0, 2], **I)), "query", torch.float64),
    "pma-fp16-v": (lambda b: PoolingMultiHeadAttention(2, 8, 2, backend=b),
                   lambda: (_randn(B, L, 8), torch.tensor([5, 0, 2], **I)), "v_proj", torch.float16),
    "feed_forward-fp16-bias": (lambda b: FeedForward(4, 8, 4, backend=b), lambda: (_randn(B, 4),), "2.bias",
                               torch.float16),
}


@pytest.mark.parametrize("case", list(MIXED))
def test_parameters_of_mixed_dtypes_run_or_fail_as_on_eager(case):
    """A module whose op parameters are of more than one dtype (a bias left in another dtype than
    its weight) runs its eager reference on the fused backend (``layers._one_dtype``): the same
    output and gradients where eager's type promotion runs it, the same exception where eager
    fails. The fused ops refused every such mix with their own ValueError, and the PMA's triton
    backend refused a float64 query as a float64 module."""
    make, inputs, path, dtype = MIXED[case]
    outcomes = []
    for backend in ("eager", "triton"):
        torch.manual_seed(0)
        module = make(backend).to(DEVICE)
        _to_dtype(module, path, dtype)
        torch.manual_seed(1)
        args = tuple(a.requires_grad_() if a.is_floating_point() else a for a in inputs())
        try:
            out = module(*args)
            out.float().square().sum().backward()
        except (RuntimeError, ValueError) as exc:
            outcomes.append((type(exc), str(exc)))
            continue
        outcomes.append((out.detach(), [a.grad for a in args if a.is_floating_point()],
                         {n: p.grad for n, p in module.named_parameters()}))
    eager, fused = outcomes
    if isinstance(eager[0], type) or isinstance(fused[0], type):
        assert eager == fused
        return
    assert fused[0].dtype == eager[0].dtype
    torch.testing.assert_close(fused[0], eager[0], rtol=1e-5, atol=1e-6)
    for f, e in zip(fused[1], eager[1]):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-6)
    assert fused[2].keys() == eager[2].keys()
    for name in eager[2]:
        torch.testing.assert_close(fused[2][name], eager[2][name], rtol=1e-5, atol=1e-6, msg=name)
