"""DCNv2 cross layers as the model calls them: fp32 x0 and fp32 parameters under bf16 autocast.

The op rows of ``bench/test_bench_crossnet.py`` time bf16 tensors without autocast. The model's
Interaction Arch hands its cross net an fp32 ``x0`` (its token stream is fp32 under autocast) with
fp32 parameters, under bf16 autocast, and there the fused path changed on 2026-11-29: the kernels
read x0 as fp32 (the dots' operands rounded to bf16 in registers), where the public function cast x0
to bf16 first (a ``[B, D]`` cast each way: x0 to bf16 in the forward, its bf16 gradient back to
fp32 in the backward) and the kernels read 2 bytes an element. These rows time the two ways side by
side, so that a lease can say what the change (made for DESIGN §5's 2x rule, see
``interformer.layers.CrossNet``) costs or saves at the op, apart from the model's other work.

Shapes, layers and ranks as ``test_bench_crossnet.py``'s (2 layers; rank ``dcn_rank`` = 32 for the
low rank). Providers, each computing the cross layers of fp32 ``x0`` under autocast (GPU only; on
the CPU, fp32 without autocast at the smoke shape):

* ``eager`` -- :func:`interformer.reference.cross_net` / ``low_rank_cross_net`` under autocast;
* ``compile`` -- ``torch.compile`` of it;
* ``fused`` -- :mod:`interformer.kernels.crossnet`, x0 read as it is (the default since 2026-11-29);
* ``fused-cast`` -- the same function given ``x0.to(bf16)``: the path before (the cast and the
  gradient's cast back inside the timed region), on today's kernels and plans (planned for the fp32
  upstream gradient either way, so the low-rank weight kernel takes 16-row tiles in both, where
  the plan before took 32);
* ``eager-cudagraph`` / ``compile-cudagraph`` / ``fused-cudagraph`` / ``fused-cast-cudagraph`` --
  captured in a CUDA graph (forward and ``full`` modes): device time alone.

Bytes: as ``test_bench_crossnet.py`` counts them, with x0, the output and their gradients at fp32's
4 bytes (the model's), the parameters at 4 as well. The ``fused-cast`` rows move more than that
count (the casts), which is the point of timing them.
"""

from __future__ import annotations

import math

import pytest
import torch

import common
from interformer import reference as R
from test_bench_crossnet import GRAPH_MODES, NUM_LAYERS, cross_bytes, cross_flops

PROVIDERS = ["eager", "compile", "fused", "fused-cast", "eager-cudagraph", "compile-cudagraph", "fused-cudagraph",
             "fused-cast-cudagraph"]
#: element size of x0, the output, their gradients and the parameters: fp32, the model's
ELT = 4


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", common.MODES)
@pytest.mark.parametrize("rank", ["full", "low"])
@pytest.mark.parametrize("shape_name", common.SHAPE_NAMES)
def test_dcn_autocast(benchmark, shape_name, rank, mode, provider):
    common.skip_unless_runnable(provider, mode, cpu_providers=("eager", "fused", "fused-cast"),
                                shape_name=shape_name, graph_modes=GRAPH_MODES)
    shape = common.ALL_SHAPES[shape_name]
    B, D, L = shape.B, shape.D, NUM_LAYERS
    r = None if rank == "full" else shape.dcn_rank
    g = torch.Generator().manual_seed(0)

    def leaf(*size, scale):
        return (torch.randn(*size, generator=g) * scale).to(common.DEVICE, torch.float32).requires_grad_()

    x0 = leaf(B, D, scale=1.0)
    if r is None:
        params = [[leaf(D, D, scale=0.5 / math.sqrt(D)) for _ in range(L)], [leaf(D, 1, scale=0.1) for _ in range(L)]]
        name = "cross_net"
    else:
        params = [[leaf(D, r, scale=0.5 / math.sqrt(r)) for _ in range(L)],
                  [leaf(r, D, scale=1.0 / math.sqrt(D)) for _ in range(L)], [leaf(D, scale=0.1) for _ in range(L)]]
        name = "low_rank_cross_net"
    base = common.base_provider(provider)
    if base.startswith("fused"):
        from interformer.kernels import crossnet

        fn = getattr(crossnet, name)
    else:
        fn = common.compiled(getattr(R, name), provider)
    cast = base == "fused-cast"
    autocast = common.autocast_for(provider)

    def forward():
        with autocast:
            return fn(x0.to(common.DTYPE) if cast else x0, *params)

    leaves = [x0] + [t for lst in params for t in lst]
    n_params = sum(t.numel() for lst in params for t in lst)
    common.run(benchmark, common.mode_fn(forward, mode, leaves), op=f"crossnet-{rank}-autocast", shape=shape,
               provider=provider, mode=mode, flops=cross_flops(B, D, r, L, mode),
               bytes_moved=cross_bytes(B, D, n_params, ELT, mode))
