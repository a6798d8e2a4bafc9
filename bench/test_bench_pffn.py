"""Personalized FFN benchmarks (``pffn_mlp`` and ``pffn_linear``) at the DESIGN §6 shapes.

The Sequence Arch's PFFN on ``S [B, L, d]`` with ``L = n_cls + T`` rows, of which ``n_cls + len``
are valid (len uniform in ``[0, T]``, one empty and one full row, as ``common.lengths_for``):

* ``mlp`` mode: ``s + LN(s) @ w_b[b]`` with a per-sample ``w_b [B, d, d]`` (a leaf here: the
  hypernetwork that makes it runs on cuBLAS in every provider and is not part of the op);
* ``linear`` mode: ``s + (LN(s) @ x_sum[b]^T) @ a`` with ``x_sum [B, n_sum, d]``, ``a [n_sum, d]``.

Providers, each computing the same function: ``eager`` (:mod:`interformer.reference`), ``compile``
(``torch.compile`` of it), ``fused`` (:mod:`interformer.kernels.pffn`) and ``fused-compile``
(``torch.compile`` around the fused function, what the op costs inside a compiled model: on a GPU
Inductor inlines the ops into their Triton kernels, ``interformer.set_compile_inline``'s default,
and each row records ``compile_inline``), and ``eager-cudagraph`` / ``fused-cudagraph`` (``full`` mode
captured in a CUDA graph: device time alone, see bench/common.py). Without a GPU only ``eager`` and ``fused`` run, on the tiny smoke
shape, under the Triton interpreter; the compile providers are skipped with their reason.

Bytes (each tensor read or written once, full padded tensors, in the benchmark dtype): forward reads
s, the weight (w_b, or x_sum and a) and the LayerNorm parameters and writes out; backward reads s,
the weight, the LayerNorm parameters and the upstream gradient and writes ds and the gradients of
the weight(s) and the LayerNorm parameters; ``full`` is both (``lengths``, 8 bytes a sample, is left
out, as in every op's count).
FLOPs: ``2 B L d^2`` (mlp) or ``4 B L d n_sum`` (linear) forward, twice that backward.
"""

from __future__ import annotations

import pytest
import torch

import common
from interformer import reference as R

PROVIDERS = ["eager", "compile", "compile-max-autotune", "fused", "fused-compile", "eager-cudagraph", "compile-cudagraph",
             "fused-cudagraph"]
EPS = 1e-5


def _fn(pffn_mode: str, provider: str):
    if provider.startswith("fused"):
        from interformer.kernels import pffn as K

        base = K.pffn_mlp if pffn_mode == "mlp" else K.pffn_linear
    else:
        base = R.pffn_mlp if pffn_mode == "mlp" else R.pffn_linear
    return common.compiled(base, provider)


def pffn_bytes(shape: common.Shape, pffn_mode: str, elt: int, mode: str, weight_elt: int = 0) -> float:
    """Bytes moved with ``elt`` bytes an element; ``weight_elt``, if given, for the weights (w_b, or
    x_sum and a) and the LayerNorm parameters (bench/test_bench_pffn_autocast.py: fp32 rows, bf16
    w_b)."""
    B, L, d, n_sum = shape.B, shape.L, shape.d, shape.n_sum
    rows = B * L * d
    weight = B * d * d if pffn_mode == "mlp" else B * n_sum * d + n_sum * d
    welt = weight_elt or elt
    fwd = 2 * rows * elt + (weight + 2 * d) * welt
    bwd = 3 * rows * elt + (2 * weight + 4 * d) * welt  # s, dout in, ds out; weight(s) and LN params in, their grads out
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def pffn_flops(shape: common.Shape, pffn_mode: str, mode: str) -> float:
    B, L, d, n_sum = shape.B, shape.L, shape.d, shape.n_sum
    fwd = 2.0 * B * L * d * d if pffn_mode == "mlp" else 4.0 * B * L * d * n_sum
    return fwd * {"fwd": 1, "bwd": 2, "full": 3}[mode]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", common.MODES)
@pytest.mark.parametrize("pffn_mode", ["mlp", "linear"])
@pytest.mark.parametrize("shape_name", common.SHAPE_NAMES)
def test_pffn(benchmark, shape_name, pffn_mode, mode, provider):
    common.skip_unless_runnable(provider, mode, shape_name=shape_name)
    shape = common.ALL_SHAPES[shape_name]
    B, L, d, n_sum = shape.B, shape.L, shape.d, shape.n_sum
    g = torch.Generator().manual_seed(0)
    lengths = common.lengths_for(shape, g) + shape.n_cls  # valid rows: CLS tokens + events

    def leaf(*size, scale=1.0, shift=0.0):
        t = torch.randn(*size, generator=g) * scale + shift
        return t.to(common.DEVICE, common.DTYPE).requires_grad_()

    s = leaf(B, L, d)
    ln_w, ln_b = leaf(d, scale=0.1, shift=1.0), leaf(d, scale=0.1)
    if pffn_mode == "mlp":
        weights = [leaf(B, d, d, scale=d ** -0.5)]
    else:
        weights = [leaf(B, n_sum, d), leaf(n_sum, d, scale=(n_sum * d) ** -0.5)]
    fn = _fn(pffn_mode, provider)

    def forward():
        return fn(s, lengths, *weights, ln_w, ln_b, EPS)

    leaves = [s, *weights, ln_w, ln_b]
    run = common.mode_fn(forward, mode, leaves)
    common.run(benchmark, run, op=f"pffn_{pffn_mode}", shape=shape, provider=provider, mode=mode,
               bytes_moved=pffn_bytes(shape, pffn_mode, s.element_size(), mode),
               flops=pffn_flops(shape, pffn_mode, mode))
