"""Residual + LayerNorm benchmarks: the model's three LayerNorms per block at the DESIGN §6 shapes.

Uses (rows of ``d`` features, under bf16 autocast as in the training step, where LayerNorm runs
in fp32 and returns fp32):

* ``dhen``: ``LN(Z + mix)`` over ``B * (n + n_ssum)`` rows, Z the fp32 stream, mix a bf16 linear output;
* ``interaction``: ``LN(X + FFN)`` over ``B * n`` rows, the same dtypes;
* ``seq``: the attention pre-norm ``LN(S_mid)`` over ``B * (n_cls + T)`` rows, no residual: fp32
  rows, as the model's sequence stream is under autocast (since 2026-11-29 on the fused path too:
  docs/benchmarks.md, "Since H200-5"; the leases before timed bf16 rows here).

Providers: ``eager`` (:func:`interformer.reference.add_layer_norm`: an add and ``F.layer_norm``),
``compile`` (``torch.compile`` of it), ``fused`` (:func:`interformer.kernels.layernorm.add_layer_norm`),
``fused-compile``, and ``eager-cudagraph`` / ``fused-cudagraph`` (``full`` mode captured in a CUDA
graph: device time alone, see bench/common.py). Without a GPU only ``eager`` and ``fused`` run, on
the smoke shape, under the Triton interpreter, without autocast.

Bytes (each tensor read or written once): forward reads x (and the residual) and the fp32 weight
and bias and writes y; backward reads the upstream gradient, x (and the residual) and the weight and
writes their gradient(s) and those of the weight and bias; ``full`` both. (The per-row mean and
rstd a kernel may save are its choice, not counted.)
"""

from __future__ import annotations

import pytest
import torch

import common
from interformer import reference as R

PROVIDERS = ["eager", "compile", "compile-max-autotune", "fused", "fused-compile", "eager-cudagraph", "compile-cudagraph",
             "fused-cudagraph"]
EPS = 1e-5


def rows_for(shape: common.Shape, use: str) -> int:
    return shape.B * {"dhen": shape.Nz, "interaction": shape.n, "seq": shape.L}[use]


def ln_bytes(rows: int, d: int, x_elt: int, r_elt: int, mode: str, p_elt: int = 4) -> float:
    out_elt = 4  # fp32 under autocast (the GPU runs); the smoke run is fp32 too
    fwd = rows * d * (x_elt + r_elt + out_elt) + 2 * d * p_elt  # x, residual in, y out; weight, bias in
    bwd = rows * d * (out_elt + 2 * (x_elt + r_elt)) + 3 * d * p_elt  # dy, x, residual in, dx, dres out; weight in, dw, db out
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", common.MODES)
@pytest.mark.parametrize("use", ["dhen", "interaction", "seq"])
@pytest.mark.parametrize("shape_name", common.SHAPE_NAMES)
def test_layernorm(benchmark, shape_name, use, mode, provider):
    common.skip_unless_runnable(provider, mode, shape_name=shape_name)
    shape = common.ALL_SHAPES[shape_name]
    rows, d = rows_for(shape, use), shape.d
    g = torch.Generator().manual_seed(0)

    def leaf(*size, dtype, scale=1.0, shift=0.0):
        t = torch.randn(*size, generator=g) * scale + shift
        return t.to(common.DEVICE, dtype).requires_grad_()

    x = leaf(rows, d, dtype=torch.float32)
    r = leaf(rows, d, dtype=common.DTYPE) if use != "seq" else None
    w, b = leaf(d, dtype=torch.float32, scale=0.1, shift=1.0), leaf(d, dtype=torch.float32, scale=0.1)
    if common.base_provider(provider).startswith("fused"):
        from interformer.kernels.layernorm import add_layer_norm as base
    else:
        base = R.add_layer_norm
    fn = common.compiled(base, provider)
    autocast = common.autocast_for(provider)

    def forward():
        with autocast:
            return fn(x, r, w, b, EPS)

    leaves = [t for t in (x, r, w, b) if t is not None]
    run = common.mode_fn(forward, mode, leaves)
    common.run(benchmark, run, op=f"layernorm_{use}", shape=shape, provider=provider, mode=mode,
               bytes_moved=ln_bytes(rows, d, x.element_size(), r.element_size() if r is not None else 0, mode,
                                    w.element_size()))
