"""The personalized FFN as the model calls it: an fp32 sequence stream under bf16 autocast.

The op rows of ``bench/test_bench_pffn.py`` time bf16 tensors without autocast. Under autocast the
model's sequence stream ``s`` is fp32 (its summary tokens lead it, and the gated LCE returns fp32
there, as eager's does), so the fused PFFN reads ``s`` and the upstream gradient in fp32 and writes
the output and ``ds`` in fp32, with bf16 dots. For that case the backward has taken 16-row blocks
since 2026-11-29, where it took 32 (which spilled registers in the sm_90 builds: ``kernels/pffn.py``,
``_config``), a choice made from compile-time counts. These rows time the two side by side, so that
a lease can say which is faster (``FP32_BACKWARD_ROWS``, the setting the ``fused-rows32`` provider
changes), apart from the model's other work.

Inputs as the model's: ``s`` fp32 ``[B, L, d]``; mlp mode's per-sample weight ``w_b`` in bf16 (the
hypernetwork's output under autocast), linear mode's ``x_sum`` (the gated LCE's output) and ``a``
in fp32, the LayerNorm parameters fp32. Shapes and lengths as ``test_bench_pffn.py``'s. Providers
(GPU only, except where said; on the CPU everything is fp32 without autocast, at the smoke shape):

* ``eager`` -- :mod:`interformer.reference` under autocast (CPU too);
* ``compile`` -- ``torch.compile`` of it;
* ``fused`` -- :mod:`interformer.kernels.pffn`, the default plan (CPU too);
* ``fused-rows32`` -- the same with ``FP32_BACKWARD_ROWS = 32``, the backward's plan before (CPU
  too; ``bwd`` and ``full`` only: the forward is the default's);
* ``eager-cudagraph`` / ``compile-cudagraph`` / ``fused-cudagraph`` / ``fused-rows32-cudagraph``
  -- captured in a CUDA graph (``full`` mode): device time alone.

Bytes: as ``test_bench_pffn.py`` counts them, with ``s``, the output and their gradients at fp32's 4
bytes and the weights at their own dtype's (the LayerNorm parameters, 2d elements, counted with
them).
"""

from __future__ import annotations

import pytest
import torch

import common
from interformer import reference as R
from test_bench_pffn import EPS, pffn_bytes, pffn_flops

PROVIDERS = ["eager", "compile", "fused", "fused-rows32", "eager-cudagraph", "compile-cudagraph", "fused-cudagraph",
             "fused-rows32-cudagraph"]
#: setting variants of the fused op (provider, and its -cudagraph): the settings of
#: interformer.kernels.pffn they run with; each changes the backward only
SETTINGS = {"fused-rows32": {"FP32_BACKWARD_ROWS": 32}}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", common.MODES)
@pytest.mark.parametrize("pffn_mode", ["mlp", "linear"])
@pytest.mark.parametrize("shape_name", common.SHAPE_NAMES)
def test_pffn_autocast(benchmark, monkeypatch, shape_name, pffn_mode, mode, provider):
    base = common.base_provider(provider)
    common.skip_unless_runnable(provider, mode, cpu_providers=("eager", "fused", "fused-rows32"), shape_name=shape_name)
    if base in SETTINGS:
        from interformer.kernels import pffn as K

        common.apply_setting_variant(monkeypatch, K, SETTINGS, provider, mode)
    shape = common.ALL_SHAPES[shape_name]
    B, L, d, n_sum = shape.B, shape.L, shape.d, shape.n_sum
    g = torch.Generator().manual_seed(0)
    lengths = common.lengths_for(shape, g) + shape.n_cls  # valid rows: CLS tokens + events
    weight_dtype = common.DTYPE if pffn_mode == "mlp" else torch.float32

    def leaf(*size, scale=1.0, shift=0.0, dtype=torch.float32):
        return (torch.randn(*size, generator=g) * scale + shift).to(common.DEVICE, dtype).requires_grad_()

    s = leaf(B, L, d)
    ln_w, ln_b = leaf(d, scale=0.1, shift=1.0), leaf(d, scale=0.1)
    if pffn_mode == "mlp":
        weights = [leaf(B, d, d, scale=d ** -0.5, dtype=weight_dtype)]
    else:
        weights = [leaf(B, n_sum, d), leaf(n_sum, d, scale=(n_sum * d) ** -0.5)]
    if base.startswith("fused"):
        from interformer.kernels import pffn as K

        fn = K.pffn_mlp if pffn_mode == "mlp" else K.pffn_linear
    else:
        fn = common.compiled(R.pffn_mlp if pffn_mode == "mlp" else R.pffn_linear, provider)
    autocast = common.autocast_for(provider)

    def forward():
        with autocast:
            return fn(s, lengths, *weights, ln_w, ln_b, EPS)

    leaves = [s, *weights, ln_w, ln_b]
    common.run(benchmark, common.mode_fn(forward, mode, leaves), op=f"pffn_{pffn_mode}-autocast", shape=shape,
               provider=provider, mode=mode, flops=pffn_flops(shape, pffn_mode, mode),
               bytes_moved=pffn_bytes(shape, pffn_mode, 4, mode, weight_elt=weights[0].element_size()))
