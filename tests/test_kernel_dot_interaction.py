"""Fused DOT interaction (``interformer.kernels.dot_interaction``) against the eager reference and float64.

Each case compares the output (the strict upper triangle of ``Z Z^T`` in ``triu_indices`` order) and
the gradient of z with (a) ``interformer.reference.dot_interaction`` in the same dtype and (b) the
reference on float64 copies: fp32 within ``FP32_TOL`` of both, fp16 (bf16 on GPU) by the DESIGN §5 rule.
Cases: N in {1 (no pair: ``[B, 0]`` and a zero gradient), 2, 5, 13}, d in {24, 40}, B in {1, 3};
several token blocks per sample (block size lowered to 16, N = 40), several samples per program
(B = 5 with a partial last group), d over two chunks (d = 130); non-contiguous z and a stride-0
upstream gradient; the module with ``backend="triton"`` vs ``"eager"``; ``torch.fx.symbolic_trace``;
``torch.library.opcheck``; ``torch.compile``; input errors; the eager entry (plain autograd.Function,
or the forward launcher alone without grad) against the custom ops, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from interformer import reference as R
from interformer.layers import DotInteraction
from poison import NO_POISON
from utils import DEVICE, FP32_TOL, HAS_CUDA, KERNEL_DTYPES, assert_lowp, assert_rel

pytest.importorskip("triton")  # (a machine without Triton skips the file)
from interformer.kernels import dot_interaction as K  # noqa: E402  (an import error fails, not skips)


def _grad_and_out(fn, z, g):
    z = z.detach().clone().requires_grad_()
    out = fn(z)
    (dz,) = torch.autograd.grad(out, [z], g.to(out.dtype))
    return out.detach(), dz


def _check(z, dtype):
    B, N, _ = z.shape
    g = torch.randn(B, N * (N - 1) // 2, device=z.device)
    out, dz = _grad_and_out(K.dot_interaction, z, g)
    e_out, e_dz = _grad_and_out(R.dot_interaction, z, g)
    out64, dz64 = _grad_and_out(R.dot_interaction, z.double(), g.double())
    for name, k, e, r64 in (("out", out, e_out, out64), ("dz", dz, e_dz, dz64)):
        assert k.dtype == e.dtype and k.shape == e.shape, f"{name}: {k.dtype} {tuple(k.shape)}"
        if dtype == torch.float32:
            assert_rel(k, e, FP32_TOL, name + " vs eager")
            assert_rel(k, r64, FP32_TOL, name + " vs float64")
        else:
            assert_lowp(k, e, r64, name)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("d", [24, 40])
@pytest.mark.parametrize("N", [2, 5, 13])
def test_dot_interaction(N, d, dtype):
    B = 1 if N == 5 else 3
    _check(torch.randn(B, N, d, device=DEVICE).to(dtype), dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_single_token_has_no_pair(dtype):
    z = torch.randn(3, 1, 24, device=DEVICE, dtype=dtype, requires_grad=True)
    out = K.dot_interaction(z)
    assert out.shape == (3, 0) and out.dtype == dtype
    out.sum().backward()
    assert z.grad is not None and z.grad.shape == z.shape and not z.grad.any()


def test_multi_block_and_multi_sample_paths(monkeypatch):
    """Token blocks of 16 (N = 40: 3 blocks, 6 block pairs), 2 samples per program (B = 5: the last
    program has one), and d = 130 over two 128-wide chunks."""
    monkeypatch.setattr(K, "MAX_BLOCK_N", 16)
    monkeypatch.setattr(K, "TARGET_PROGRAMS", 2)
    assert K._config(5, 40, 24)[2:4] == (3, 2)
    _check(torch.randn(5, 40, 24, device=DEVICE), torch.float32)
    _check(torch.randn(2, 13, 130, device=DEVICE), torch.float32)
    _check(torch.randn(5, 40, 24, device=DEVICE).half(), torch.float16)


def test_one_tile_with_several_samples_per_program(monkeypatch):
    """The DESIGN shapes' path (every token in one tile, several samples per program), which the
    interpreter's default of one program per sample never takes: B = 5 over programs of 2 samples
    (the last has one). A backward accumulator carried from one sample to the next fails here."""
    monkeypatch.setattr(K, "TARGET_PROGRAMS", 2)
    assert K._config(5, 13, 24)[2:4] == (1, 2)
    _check(torch.randn(5, 13, 24, device=DEVICE), torch.float32)
    _check(torch.randn(5, 13, 24, device=DEVICE).half(), torch.float16)


def test_several_token_blocks_and_several_d_chunks_together(monkeypatch):
    """Off-diagonal block pairs (N = 40 in blocks of 16) whose products loop over d = 130 in two
    chunks: the other tests take one of the two loops at a time."""
    monkeypatch.setattr(K, "MAX_BLOCK_N", 16)
    assert K._config(2, 40, 130)[:3] == (16, 128, 3)
    _check(torch.randn(2, 40, 130, device=DEVICE), torch.float32)


def test_pair_index_past_int32_products():
    """The packed index at token counts whose products ``i (N - 1)``, ``i (i - 1)`` pass 2**31 while
    the index fits int32 (from N = 46341; a review found offsets 2**31 too small at N = 46344), and
    past where the index itself does not (N > 65536): ``_pair_index`` under the launchers' own
    choice (``_wide_pairs``), on int32 token indices as the kernels give it, against Python's
    integers, for the first, middle and last pairs. Without the int64 path it fails (the
    interpreter wraps int32 products as a GPU does)."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(OUT, I, J, N, WIDE: tl.constexpr, BLOCK: tl.constexpr):
        k = tl.arange(0, BLOCK)
        tl.store(OUT + k, K._pair_index(tl.load(I + k), tl.load(J + k), N, WIDE).to(tl.int64))

    assert not K._wide_pairs(72) and not K._wide_pairs(46340)  # the DESIGN shapes stay in int32
    for N in (40, 46340, 46341, 46344, 65536, 65537, 100_000):
        pairs = [(0, 1), (0, N - 1), (N // 2, N // 2 + 1), (N // 2 - 1, N - 1), (N - 3, N - 2), (N - 2, N - 1)]
        pairs += [pairs[-1]] * (16 - len(pairs))
        i = torch.tensor([p[0] for p in pairs], dtype=torch.int32, device=DEVICE)
        j = torch.tensor([p[1] for p in pairs], dtype=torch.int32, device=DEVICE)
        out = torch.empty(16, dtype=torch.int64, device=DEVICE)
        probe[(1,)](out, i, j, N, WIDE=K._wide_pairs(N), BLOCK=16)
        want = [a * (N - 1) - a * (a - 1) // 2 + (b - a - 1) for a, b in pairs]
        assert out.tolist() == want, (N, out.tolist(), want)
        assert want[-1] == N * (N - 1) // 2 - 1


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_int64_pair_index_path(dtype, monkeypatch):
    """Both kernels with the int64 pair index (what N > 46340 takes, forced here at N = 40 in token
    blocks of 16, the gathers of the backward's off-diagonal blocks included) give what the int32
    path gives."""
    monkeypatch.setattr(K, "MAX_BLOCK_N", 16)
    monkeypatch.setattr(K, "_wide_pairs", lambda N: True)
    _check(torch.randn(3, 40, 24, device=DEVICE).to(dtype), dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_zero_width_tokens_give_zeros(dtype):
    """d = 0: every inner product is an empty sum, as the reference gives it (zeros, a zero
    gradient); it raised before (a review's find)."""
    z = torch.randn(3, 5, 0, device=DEVICE, dtype=dtype, requires_grad=True)
    out = K.dot_interaction(z)
    want = R.dot_interaction(z.detach())
    assert out.shape == want.shape == (3, 10) and out.dtype == want.dtype and not out.any()
    out.sum().backward()
    assert z.grad is not None and z.grad.shape == z.shape


def test_noncontiguous_z_and_stride0_grad():
    base = torch.randn(3, 24, 13, device=DEVICE)
    results = []
    for fn in (K.dot_interaction, R.dot_interaction):
        z = base.clone().transpose(1, 2).requires_grad_()  # [3, 13, 24] with strides (312, 1, 13)
        assert not z.is_contiguous()
        out = fn(z)
        out.sum().backward()  # stride-0 upstream gradient
        results.append((out.detach(), z.grad))
    assert_rel(results[0][0], results[1][0], FP32_TOL, "out")
    assert_rel(results[0][1], results[1][1], FP32_TOL, "dz")
    # a strided slice of the token axis
    z = torch.randn(2, 26, 40, device=DEVICE)[:, ::2]
    assert_rel(K.dot_interaction(z), R.dot_interaction(z), FP32_TOL, "sliced")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("num_tokens", [1, 13])
def test_module_triton_vs_eager(num_tokens):
    eager = DotInteraction(num_tokens, 24, backend="eager").to(DEVICE)
    fused = DotInteraction(num_tokens, 24, backend="triton").to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    z = torch.randn(3, num_tokens, 24, device=DEVICE)
    outs, grads = [], []
    for m in (fused, eager):
        zi = z.clone().requires_grad_()
        out = m(zi)
        out.backward(torch.randn_like(out, generator=torch.Generator(DEVICE).manual_seed(1)))
        outs.append(out.detach())
        grads.append([zi.grad] + [p.grad for p in m.parameters()])
    assert_rel(outs[0], outs[1], FP32_TOL, "out")
    for name, k, e in zip(["z", "proj.weight", "proj.bias"], grads[0], grads[1]):
        assert_rel(k, e, FP32_TOL, f"grad {name}")


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_fx_symbolic_trace(backend):
    module = DotInteraction(13, 24, backend=backend).to(DEVICE)
    gm = torch.fx.symbolic_trace(module)
    if backend == "triton" or DEVICE.type == "cuda":
        assert K.dot_interaction in [n.target for n in gm.graph.nodes], gm.code
    z = torch.randn(3, 13, 24, device=DEVICE)
    assert_rel(gm(z), module(z), FP32_TOL)


def test_opcheck():
    z = torch.randn(3, 13, 24, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.interformer.dot_interaction_fwd.default, (z,))
    g = torch.randn(3, 78, device=DEVICE)
    torch.library.opcheck(torch.ops.interformer.dot_interaction_bwd.default, (g, z.detach()))
    torch.library.opcheck(torch.ops.interformer.dot_interaction_fwd.default, (torch.randn(2, 1, 24, device=DEVICE),))


@NO_POISON
def test_compile_fullgraph():
    torch._dynamo.reset()
    compiled = torch.compile(K.dot_interaction, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    z = torch.randn(3, 13, 24, device=DEVICE)
    g = torch.randn(3, 78, device=DEVICE)
    out, dz = _grad_and_out(compiled, z, g)
    e_out, e_dz = _grad_and_out(R.dot_interaction, z, g)
    assert_rel(out, e_out, FP32_TOL, "out")
    assert_rel(dz, e_dz, FP32_TOL, "dz")


def test_eager_entry_matches_custom_op_bitwise(monkeypatch):
    """Outside tracing :func:`dot_interaction` runs the launchers through a plain autograd.Function;
    the custom op called directly (what torch.compile records) gives the very same output and
    gradient, bit for bit (non-contiguous z, stride-0 upstream gradient, several token blocks); the
    public function down the custom-op route too; without grad the forward launcher alone gives the
    same output."""
    monkeypatch.setattr(K, "MAX_BLOCK_N", 16)
    base = torch.randn(3, 24, 20, device=DEVICE)

    def go(fn):
        z = base.clone().transpose(1, 2).requires_grad_()  # [3, 20, 24], not contiguous
        out = fn(z)
        meta = (type(out.grad_fn).__name__, out.dtype, out.shape, out.requires_grad)
        out.sum().backward()
        return out.detach(), meta, z.grad

    lean, op, public = go(K._DotInteraction.apply), go(torch.ops.interformer.dot_interaction_fwd), go(K.dot_interaction)
    assert lean[1][0] == public[1][0] == "_DotInteractionBackward"
    assert op[1][0].startswith("GeneratedBackwardFor_interformer_dot_interaction")
    assert lean[1][1:] == op[1][1:] == public[1][1:]
    for a, b, c in ((lean[0], op[0], public[0]), (lean[2], op[2], public[2])):
        assert a.dtype == b.dtype == c.dtype and torch.equal(a, b) and torch.equal(c, b)
    assert bool(op[2].abs().sum() > 0)
    with monkeypatch.context() as m:
        m.setattr(K, "tracing", lambda tensors: True)
        forced = go(K.dot_interaction)
    assert forced[1][0].startswith("GeneratedBackwardFor_interformer") and torch.equal(forced[0], op[0])
    assert torch.equal(forced[2], op[2])
    z = base.transpose(1, 2)
    with torch.no_grad():
        out_ng = K.dot_interaction(z.clone().requires_grad_())
    out_plain = K.dot_interaction(z)
    for o in (out_ng, out_plain):
        assert o.grad_fn is None and not o.requires_grad and torch.equal(o, op[0])


def test_input_errors():
    with pytest.raises(ValueError, match="3-D"):
        K.dot_interaction(torch.randn(3, 13, device=DEVICE))
    with pytest.raises(ValueError, match="one of"):
        K.dot_interaction(torch.randn(3, 13, 24, device=DEVICE).double())


@pytest.mark.gpu
@pytest.mark.parametrize("B,N,d", [(2048, 28, 64), (2048, 12, 64), (512, 72, 128)], ids=["taobao", "amazon", "long"])
def test_design_shapes_bf16(B, N, d):
    _check(torch.randn(B, N, d, device=DEVICE).to(torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_token_blocks_accumulate_in_fp32(dtype, monkeypatch):
    """The backward's sum over token blocks is an fp32 accumulation, so a 16-bit z split into blocks
    of 16 tokens gives what one 64-token block gives, to an ulp of the output: dz in fp16 blocks
    drifted by up to 1.6e-2 in a mutation test (2026-11-29) that the 2x-eager rule let through."""
    g = torch.Generator().manual_seed(11)
    z0 = torch.randn(3, 40, 24, generator=g).to(DEVICE, dtype)
    up = torch.randn(3, 40 * 39 // 2, generator=g).to(DEVICE, dtype)
    runs = []
    for block in (64, 16):
        monkeypatch.setattr(K, "MAX_BLOCK_N", block)
        z = z0.clone().requires_grad_()
        out = K.dot_interaction(z)
        out.backward(up)
        runs.append((out.detach(), z.grad))
    (out_one, dz_one), (out_blocks, dz_blocks) = runs
    assert_rel(out_blocks, out_one, 1e-6, "out")
    assert_rel(dz_blocks, dz_one, 1e-6 if dtype == torch.float32 else 2 ** -10, "dz")
    if dtype != torch.float32:
        # two fp32 sums in other orders (a few fp32 ulps apart) each rounded to 16 bits once: they
        # differ only where the two straddle a rounding boundary, about 1 element in 8000 (1 of
        # 2880 here); with 16-bit partial sums 1292 of 2880 differed
        assert (dz_blocks != dz_one).float().mean() <= 0.01, "dz: 16-bit partial sums across the token blocks?"
