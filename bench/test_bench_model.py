"""Whole-model benchmarks: InterFormerCTR training step (forward + backward under bf16 autocast)
and inference forward, at the DESIGN §6 shapes, for every provider.

Providers: ``eager``; ``compile`` and ``compile-max-autotune`` (torch.compile of the eager model);
``fused`` (every op on its Triton kernel); ``fused-compile``; ``fused-compile-attention`` (the
fused model compiled with only the attention kernels kept as custom ops, every other op left to
Inductor: :data:`common.COMPILE_KEEPS`); ``fused-compile-opaque`` (the fused model compiled with
the kept ops left opaque custom ops, where ``fused-compile`` on a GPU has them traced into their
Triton kernels, which Inductor then launches itself: ``interformer.set_compile_inline``); ``fused-streams`` (fused, with the
Interaction and Sequence arches of each block on two CUDA streams); ``eager-cudagraph`` /
``fused-cudagraph``: the inference forward, or the whole training step (forward and backward,
gradients written into static buffers), captured once in a CUDA graph and replayed
(:func:`common.captured`), which removes the launch overhead that dominates at these shapes (a
fused training step on an H200 took 45.5 ms with 12.9 ms of kernel time);
``fused-streams-cudagraph``: the two-stream model captured (the arches become parallel branches of
the graph; a capture the streams do not allow is recorded as a skip with its reason);
``compile-reduce-overhead`` / ``fused-compile-reduce-overhead``: ``torch.compile(mode=
"reduce-overhead")`` of the eager / fused model, PyTorch's own CUDA-graph path (what
``python -m interformer train --compile --compile-mode reduce-overhead`` runs), the fair
counterpart of the graphed variants. Autocast runs with ``cache_enabled=False`` in the graph
variants, as CUDA-graph capture requires.

Modes: ``train`` runs the backward as PyTorch does by default (on a GPU, on autograd's device
thread); ``train-calling-thread`` the same step with the backward on the calling thread
(``torch.autograd.set_multithreading_enabled(False)``), as ``interformer train`` runs it (on an
H200 that took the plain fused ``taobao`` step from 37.2 to 26.6 ms); ``inference`` the forward
alone. A CUDA graph replays no autograd, so the graphed providers have no calling-thread mode.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import common
from interformer import InterFormerConfig, InterFormerCTR, optimize

PROVIDERS = ["eager", "compile", "compile-max-autotune", "compile-reduce-overhead", "fused", "fused-compile",
             "fused-compile-attention", "fused-compile-opaque", "fused-streams", "fused-compile-reduce-overhead", "eager-cudagraph",
             "fused-cudagraph", "fused-streams-cudagraph"]


def config_for(shape: common.Shape) -> InterFormerConfig:
    """An InterFormer config with ``shape``'s sizes: one dense token plus ``n - 1`` sparse fields."""
    return InterFormerConfig(
        n_dense=8, sparse_vocab_sizes=(1000,) * (shape.n - 1), seq_vocab_sizes=(1000,) * shape.k,
        max_seq_len=shape.T, d_model=shape.d, num_heads=shape.heads, num_layers=shape.layers,
        n_sum=shape.n_sum, n_pma=shape.n_pma, n_recent=shape.n_recent, n_ssum=shape.n_ssum,
        dcn_rank=shape.dcn_rank, validate_inputs=False, backend="eager",
    )


def batch_for(shape: common.Shape, cfg: InterFormerConfig):
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(shape.B, cfg.n_dense, generator=g)
    sparse = torch.randint(1, 1000, (shape.B, len(cfg.sparse_vocab_sizes)), generator=g)
    lengths = common.lengths_for(shape, g).cpu()
    seq = torch.randint(1, 1000, (shape.B, shape.k, shape.T), generator=g)
    seq = seq * (torch.arange(shape.T)[None, None, :] < lengths[:, None, None])
    label = (torch.rand(shape.B, generator=g) < 0.3).float()
    return [t.to(common.DEVICE) for t in (dense, sparse, seq, lengths)], label.to(common.DEVICE)


def build(provider: str, shape: common.Shape):
    cfg = config_for(shape)
    torch.manual_seed(0)
    model = InterFormerCTR(cfg).to(common.DEVICE)
    if provider.startswith("fused"):
        optimize(model, "triton")
    if provider.startswith("fused-streams"):
        model.backbone.use_streams(True)
    return common.compiled(model, provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["train", "train-calling-thread", "inference"])
@pytest.mark.parametrize("shape_name", common.SHAPE_NAMES)
def test_model(benchmark, shape_name, mode, provider):
    shape = common.ALL_SHAPES[shape_name]
    common.skip_unless_runnable(provider, mode, shape_name=shape.name, graph_modes=("train", "inference"))
    if not common.ON_GPU:
        shape = common.Shape("smoke", B=2, n=3, k=2, T=5, d=16, heads=2, layers=1, n_ssum=2, dcn_rank=4)
    with common.compile_reference(provider):  # held over every call: dynamo guards on it
        _measure(benchmark, provider, shape, mode)


def _measure(benchmark, provider, shape, mode):
    model = build(provider, shape)
    inputs, label = batch_for(shape, model.config if hasattr(model, "config") else config_for(shape))
    autocast = common.autocast_for(provider)

    if mode.startswith("train"):
        model.train()
        params = [p for p in model.parameters()]
        calling_thread = mode == "train-calling-thread"

        def step():
            for p in params:
                p.grad = None
            with autocast:
                loss = InterFormerCTR.loss(model(*inputs), label)
            with torch.autograd.set_multithreading_enabled(False) if calling_thread else contextlib.nullcontext():
                loss.backward()
        fn = step  # common.run captures it for the -cudagraph providers
    else:
        model.eval()

        def infer():
            with torch.no_grad(), autocast:
                return model(*inputs)
        fn = infer
    common.run(benchmark, fn, op="model-" + mode, shape=shape, provider=provider, mode=mode)
