"""DOT interaction benchmarks: pairwise inner products of the Interaction Arch tokens.

Shapes (DESIGN §6): ``z [B, N, d]`` with ``N = n + n_ssum`` tokens (taobao 28, amazon 12, long 72) and
d = 64 / 64 / 128; output ``[B, N(N-1)/2]``. z requires grad. Providers, each computing the same
function:

* ``eager`` -- :func:`interformer.reference.dot_interaction` (``bmm`` + ``triu_indices`` gather);
* ``compile`` -- ``torch.compile`` of the reference (GPU only);
* ``fused`` -- :func:`interformer.kernels.dot_interaction.dot_interaction`;
* ``fused-compile`` -- ``torch.compile`` of the fused function (GPU only);
* ``eager-cudagraph`` / ``fused-cudagraph`` -- ``full`` mode captured in a CUDA graph and replayed:
  device time alone (GPU only; see bench/common.py).

Formulas (M = N(N-1)/2 pairs, element size e): bytes forward ``(B N d + B M) e`` (z in, pairs out),
backward ``(B M + 2 B N d) e`` (dout and z in, dz out), ``full`` the sum; FLOPs of the useful work
``2 B M d`` forward, 2x backward (``dz = (G + G^T) z``), 3x ``full``. Memory-bound: GB/s is the
meaningful column.
"""

from __future__ import annotations

import pytest
import torch

import common
from interformer import reference as R

PROVIDERS = ["eager", "compile", "compile-max-autotune", "fused", "fused-compile", "eager-cudagraph", "compile-cudagraph",
             "fused-cudagraph"]


def _fn(provider: str):
    if not common.base_provider(provider).startswith("fused"):
        fn = R.dot_interaction
    else:
        from interformer.kernels.dot_interaction import dot_interaction as fn
    return common.compiled(fn, provider)


def dot_bytes(B: int, N: int, d: int, elt: int, mode: str) -> float:
    M = N * (N - 1) // 2
    fwd = (B * N * d + B * M) * elt
    bwd = (B * M + 2 * B * N * d) * elt
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def dot_flops(B: int, N: int, d: int, mode: str) -> float:
    return 2.0 * B * (N * (N - 1) // 2) * d * {"fwd": 1, "bwd": 2, "full": 3}[mode]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", common.MODES)
@pytest.mark.parametrize("shape_name", common.SHAPE_NAMES)
def test_dot_interaction(benchmark, shape_name, mode, provider):
    common.skip_unless_runnable(provider, mode, shape_name=shape_name)
    shape = common.ALL_SHAPES[shape_name]
    B, N, d = shape.B, shape.Nz, shape.d
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, N, d, generator=g).to(common.DEVICE, common.DTYPE).requires_grad_()
    fn = _fn(provider)

    def forward():
        return fn(z)

    fn_check = forward if mode == "fwd" else (lambda: forward().sum().backward())
    fn_check()
    z.grad = None
    common.run(benchmark, common.mode_fn(forward, mode, [z]), op="dot_interaction", shape=shape,
               provider=provider, mode=mode, flops=dot_flops(B, N, d, mode),
               bytes_moved=dot_bytes(B, N, d, z.element_size(), mode))
