"""Feed-forward block benchmarks (``Linear -> SiLU -> Linear``) at the DESIGN §6 shapes, where the
model runs it: the Interaction Arch's FFN, ``d -> 4d -> d`` over the ``n`` non-sequence tokens. x is
``z[:, :n]``, a non-contiguous slice of the ``[B, n + n_ssum, d]`` token tensor (as the model passes
it), ``B * n`` rows (taobao 40,960 rows of 64, amazon 8,192 of 64, long 32,768 of 128). (The sequence
tokenizer's mask MLP has the same form but stays eager, DESIGN §3, so it is not benchmarked here.)

As in the training step, the block runs under bf16 autocast (GPU only) on fp32 inputs and fp32
parameters (the model's token stream and embeddings are fp32: LayerNorm and the embedding return
fp32 under autocast), returning bf16. Eager casts x to bf16 first (for the slice a contiguous
copy) and each weight and bias; the fused kernels read x through its strides and the
fp32 parameters as they are stored, rounding each tile to bf16 in registers. Without a GPU: fp32,
no autocast.

Providers, each computing ``feed_forward(x, w1, b1, w2, b2)``: ``eager``
(:func:`interformer.reference.feed_forward`: two ``F.linear`` and ``F.silu``), ``compile``
(``torch.compile`` of it), ``compile-max-autotune``, ``fused``
(:func:`interformer.kernels.feed_forward.feed_forward`, which runs the eager reference for blocks
wider than its ``FUSED_MAX_FEATURES``, 64: at ``long`` the kernels lost to cuBLAS), ``fused-wide``
(the same with that limit raised to ``MAX_FEATURES``: the kernels at every shape, what a change to
their wider tiers must beat eager with), ``fused-compile`` (``torch.compile`` around the fused
function: on a GPU Inductor inlines the op into its Triton kernels, ``interformer.set_compile_inline``'s
default, and each row records ``compile_inline``; past 64 wide, as at ``long``, it is Inductor
compiling the reference, like ``compile``), and ``eager-cudagraph`` / ``compile-cudagraph`` /
``fused-cudagraph`` / ``fused-wide-cudagraph`` (``full`` mode captured in a CUDA graph: device
time alone, see bench/common.py). Without a GPU only ``eager``, ``fused`` and ``fused-wide`` run, on the tiny smoke
shape, under the Triton interpreter; the others are skipped with their reason.

Bytes (each tensor read or written once): forward reads x (fp32) and the four parameters (fp32)
and writes out (bf16 on a GPU); backward reads x, the parameters and the upstream gradient (out's
dtype) and writes dx (x's dtype) and the four parameter gradients; ``full`` is both. The hidden
activation is not counted (the fused kernels never store it). FLOPs (K inputs, H hidden, N
outputs): ``2 rows (K H + H N)`` forward, twice that backward (input and weight gradients), 3x
``full``. The fused backward does more than that count: it recomputes ``h = x w1^T`` and
``da = dy w2`` in both of its kernels (dx, and the parameter gradients), ``2 rows (4 K H + 3 H N)``
in all, 1.75x the counted backward where K = N (as here); the count is of the useful work, the
same for every provider.
"""

from __future__ import annotations

import pytest
import torch

import common
from interformer import reference as R

PROVIDERS = ["eager", "compile", "compile-max-autotune", "fused", "fused-compile", "fused-wide", "eager-cudagraph",
             "compile-cudagraph", "fused-cudagraph", "fused-wide-cudagraph"]
#: element size of x and the parameters: fp32 (the model's stream and parameters, autocast or not)
X_ELT = P_ELT = 4


def sizes(shape: common.Shape):
    """(rows, K, H, N) of the Interaction Arch's FFN."""
    return shape.B * shape.n, shape.d, 4 * shape.d, shape.d


def ffn_bytes(rows: int, K: int, H: int, N: int, out_elt: int, mode: str, x_elt: int = X_ELT,
              p_elt: int = P_ELT) -> float:
    params = (H * K + H + N * H + N) * p_elt
    fwd = rows * K * x_elt + params + rows * N * out_elt  # x, parameters in; out
    bwd = 2 * rows * K * x_elt + rows * N * out_elt + 2 * params  # x, dy, parameters in; dx, their gradients out
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def ffn_flops(rows: int, K: int, H: int, N: int, mode: str) -> float:
    return 2.0 * rows * (K * H + H * N) * {"fwd": 1, "bwd": 2, "full": 3}[mode]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", common.MODES)
@pytest.mark.parametrize("shape_name", common.SHAPE_NAMES)
def test_feed_forward(benchmark, monkeypatch, shape_name, mode, provider):
    common.skip_unless_runnable(provider, mode, cpu_providers=common.CPU_PROVIDERS + ("fused-wide",),
                                shape_name=shape_name)
    if common.base_provider(provider) == "fused-wide":  # the kernels at every width they hold
        from interformer.kernels import feed_forward as ffn

        monkeypatch.setattr(ffn, "FUSED_MAX_FEATURES", ffn.MAX_FEATURES)
    shape = common.ALL_SHAPES[shape_name]
    rows, K, H, N = sizes(shape)
    g = torch.Generator().manual_seed(0)

    def leaf(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(common.DEVICE, torch.float32).requires_grad_()

    z = leaf(shape.B, shape.Nz, shape.d)
    x = z[:, : shape.n]  # the model's slice (a view: the gradient lands in z, the leaf)
    params = [leaf(H, K, scale=K ** -0.5), leaf(H, scale=0.1), leaf(N, H, scale=H ** -0.5), leaf(N, scale=0.1)]
    if common.base_provider(provider).startswith("fused"):
        from interformer.kernels.feed_forward import feed_forward as base
    else:
        base = R.feed_forward
    fn = common.compiled(base, provider)
    autocast = common.autocast_for(provider)

    def forward():
        with autocast:
            return fn(x, *params)

    run = common.mode_fn(forward, mode, [z, *params])
    common.run(benchmark, run, op="feed_forward", shape=shape, provider=provider, mode=mode,
               bytes_moved=ffn_bytes(rows, K, H, N, common.DTYPE.itemsize, mode),
               flops=ffn_flops(rows, K, H, N, mode))
