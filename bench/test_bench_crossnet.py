"""DCNv2 cross-layer benchmarks: full rank (``cross_net``) and low rank (``low_rank_cross_net``).

Shapes (DESIGN §6): ``x0 [B, D]`` with ``D = (n + n_ssum) * d`` (taobao 28 * 64 = 1792, amazon
12 * 64 = 768, long 72 * 128 = 9216), 2 layers (the model's ``dcn_layers``), rank ``dcn_rank`` = 32
for the low-rank variant. Parameters as leaf tensors in the benchmark dtype (bf16 on GPU), x0 requires
grad. Providers, each computing the same function:

* ``eager`` -- :func:`interformer.reference.cross_net` / ``low_rank_cross_net``;
* ``compile`` -- ``torch.compile`` of the reference (Inductor; GPU only);
* ``fused`` -- :mod:`interformer.kernels.crossnet`;
* ``fused-compile`` -- ``torch.compile`` of the fused function (the custom ops inside a compiled
  graph; GPU only);
* ``eager-cudagraph`` / ``fused-cudagraph`` -- ``full`` mode captured in a CUDA graph and replayed:
  device time alone (GPU only; see bench/common.py);
* ``fused-8warps`` (and its ``-cudagraph``) -- low rank only: the fused function with
  ``LOW_RANK_ROW_WARPS = 8`` (8-warp forward and rows kernels with up to 256-column tiles), to
  measure against the default's 4 warps;
* ``fused-phases`` (and its ``-cudagraph``) -- low rank only, ``bwd`` and ``full``: the fused
  function with ``LOW_RANK_BACKWARD = "phases"`` (dp_i and dx0 by launches over row blocks x column
  ranges instead of one 16-row program per row block, and a wider batch split of the weight-gradient
  kernel), to measure against the default's backward;
* ``fused-fphases`` (and its ``-cudagraph``) -- low rank only, ``fwd`` and ``full``: the fused
  function with ``LOW_RANK_FORWARD = "phases"`` (``p_i`` by one launch per layer over row blocks x
  column ranges, then the output tiles, instead of DESIGN §4's one launch of one 16-row program per
  row block), to measure against the default's forward;
* ``fused-deep`` (and its ``-cudagraph``) -- low rank only: the fused function with
  ``LOW_RANK_MAX_STAGES = 5`` (up to 5 software-pipeline stages in the forward and backward rows
  kernels instead of 3), to measure against the default;
* ``fused-triton-gemm`` (and its ``-cudagraph``) -- full rank only: the fused function with
  ``FULL_RANK_GEMM = "triton"`` (Triton GEMM kernels with fused epilogues instead of cuBLAS GEMMs
  with Triton element-wise kernels), to keep the default's choice measured.

Full rank at ``long`` is ``9216 x 9216`` (85M parameters, 170 MB in bf16) per layer; with two layers,
their gradients and the activations it needs well under 2 GB, so it runs (an out-of-memory error
would be recorded as a skip with its reason).

Formulas (L layers, element size e): FLOPs ``2 B D^2 L`` (full rank) or ``4 B D r L`` (low rank) for
the forward, 2x that for the backward (input and weight gradients), 3x for ``full``. Bytes (each
tensor read or written once): forward ``2 B D e`` (x0 in, out) + the parameters ``P e``; backward
``3 B D e`` (dout and x0 in, dx0 out) + ``2 P e`` (parameters in, gradients out); ``full`` the sum.
Full rank is compute-bound (TFLOP/s is the meaningful column), low rank memory-bound (GB/s).
"""

from __future__ import annotations

import math

import pytest
import torch

import common
from interformer import reference as R

PROVIDERS = ["eager", "compile", "compile-max-autotune", "fused", "fused-compile", "eager-cudagraph",
             "compile-cudagraph", "fused-cudagraph", "fused-triton-gemm", "fused-triton-gemm-cudagraph", "fused-8warps",
             "fused-8warps-cudagraph", "fused-phases", "fused-phases-cudagraph", "fused-fphases",
             "fused-fphases-cudagraph", "fused-deep", "fused-deep-cudagraph"]
NUM_LAYERS = 2
#: The setting variants (provider, and its -cudagraph): ``(the rank it applies to, the direction it
#: changes ("fwd", "bwd", or None for both), the setting of interformer.kernels.crossnet, its value)``.
#: A variant is skipped at the other rank and in the mode of the direction it leaves as it is.
SETTING_PROVIDERS = {
    "fused-triton-gemm": ("full", None, "FULL_RANK_GEMM", "triton"),
    "fused-8warps": ("low", None, "LOW_RANK_ROW_WARPS", 8),
    "fused-phases": ("low", "bwd", "LOW_RANK_BACKWARD", "phases"),
    "fused-fphases": ("low", "fwd", "LOW_RANK_FORWARD", "phases"),
    "fused-deep": ("low", None, "LOW_RANK_MAX_STAGES", 5),
}
_WORDS = {"fwd": "forward", "bwd": "backward"}
#: The modes the CUDA-graph providers run in: the forward too (the model's inference use), so that a
#: setting that changes both directions (``fused-deep``) is timed in each use by device time.
GRAPH_MODES = ("fwd", "full")


def _fused_module():
    from interformer.kernels import crossnet

    return crossnet


def _fused(name: str):
    return getattr(_fused_module(), name)


def _fn(provider: str, name: str):
    if not common.base_provider(provider).startswith("fused"):
        fn = getattr(R, name)
    else:
        fn = _fused(name)
    return common.compiled(fn, provider)


def _try(fn, provider: str):
    try:
        fn()
    except torch.OutOfMemoryError as exc:
        if common.ON_GPU:
            torch.cuda.empty_cache()
        pytest.skip(f"{provider}: out of memory ({str(exc).splitlines()[0]})")


def _leaf(*shape, scale: float, g: torch.Generator) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(common.DEVICE, common.DTYPE).requires_grad_()


def cross_flops(B: int, D: int, rank, L: int, mode: str) -> float:
    fwd = (2.0 * B * D * D if rank is None else 4.0 * B * D * rank) * L
    return fwd * {"fwd": 1, "bwd": 2, "full": 3}[mode]


def cross_bytes(B: int, D: int, n_params: int, elt: int, mode: str) -> float:
    fwd = (2 * B * D + n_params) * elt
    bwd = (3 * B * D + 2 * n_params) * elt
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", common.MODES)
@pytest.mark.parametrize("rank", ["full", "low"])
@pytest.mark.parametrize("shape_name", common.SHAPE_NAMES)
def test_crossnet(benchmark, monkeypatch, shape_name, rank, mode, provider):
    common.skip_unless_runnable(provider, mode, cpu_providers=("eager", "fused", *SETTING_PROVIDERS),
                                shape_name=shape_name, graph_modes=GRAPH_MODES)
    setting = SETTING_PROVIDERS.get(provider.removesuffix(common.GRAPH_SUFFIX))
    if setting is not None:
        only_rank, direction, name, value = setting
        if rank != only_rank:
            pytest.skip(f"{provider}: a {only_rank}-rank setting")
        if direction is not None and mode not in ("full", direction):
            pytest.skip(f"{provider}: a {_WORDS[direction]} setting (the {_WORDS[mode]} is the default's)")
        monkeypatch.setattr(_fused_module(), name, value)
    shape = common.ALL_SHAPES[shape_name]
    B, D, L = shape.B, shape.D, NUM_LAYERS
    r = None if rank == "full" else shape.dcn_rank
    g = torch.Generator().manual_seed(0)
    x0 = _leaf(B, D, scale=1.0, g=g)
    if r is None:
        params = [[_leaf(D, D, scale=0.5 / math.sqrt(D), g=g) for _ in range(L)]]
        name = "cross_net"
    else:
        params = [[_leaf(D, r, scale=0.5 / math.sqrt(r), g=g) for _ in range(L)],
                  [_leaf(r, D, scale=1.0 / math.sqrt(D), g=g) for _ in range(L)]]
        name = "low_rank_cross_net"
    bias_shape = (D, 1) if r is None else (D,)  # the modules' (torchrec's) layouts
    params.append([_leaf(*bias_shape, scale=0.1, g=g) for _ in range(L)])
    fn = _fn(provider, name)

    def forward():
        return fn(x0, *params)

    leaves = [x0] + [t for lst in params for t in lst]
    _try(forward if mode == "fwd" else (lambda: forward().sum().backward()), provider)
    for t in leaves:
        t.grad = None
    n_params = sum(t.numel() for lst in params for t in lst)
    common.run(benchmark, common.mode_fn(forward, mode, leaves), op=f"crossnet-{rank}", shape=shape,
               provider=provider, mode=mode, flops=cross_flops(B, D, r, L, mode),
               bytes_moved=cross_bytes(B, D, n_params, x0.element_size(), mode))
