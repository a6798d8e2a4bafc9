"""Self-gating LCE benchmarks at the DESIGN §6 shapes, in its two uses in the Cross Arch:

* ``nonseq``: ``X_sum = GatedLCE(n -> n_sum)(X)`` over the ``n`` non-sequence tokens;
* ``seq``: ``S_sum = GatedLCE(n_cls + n_pma + n_recent -> n_ssum)([S_CLS; S_PMA; S_recent])``.

Providers, each computing ``gated_lce(x, weight, bias, gate_weight, gate_bias)``: ``eager``
(:func:`interformer.reference.gated_lce`), ``compile`` (``torch.compile`` of it), ``fused``
(:func:`interformer.kernels.gated_lce.gated_lce`) and ``fused-compile`` (``torch.compile`` around the
fused function: on a GPU Inductor inlines the ops into their Triton kernels,
``interformer.set_compile_inline``'s default, and each row records ``compile_inline``), and ``eager-cudagraph`` / ``fused-cudagraph`` (``full``
mode captured in a CUDA graph: device time alone, see bench/common.py). Without a GPU only ``eager`` and ``fused`` run, on the
tiny smoke shape, under the Triton interpreter; the compile providers are skipped with their reason.
``test_gated_lce_bandwidth`` runs ``full`` mode at 32x taobao's batch (``taobao-b64k``), where the
bytes, not the launches, set the time, with also the fused variants of :data:`SETTINGS` (other
launch plans); without a GPU it runs those variants alone, at the smoke shape (``test_gated_lce``
times eager and fused there).

Bytes (each tensor read or written once, in the benchmark dtype): forward reads x and the four
parameters and writes out; backward reads x, the parameters and the upstream gradient and writes dx
and the four parameter gradients; ``full`` is both. FLOPs: ``2 B n_out d (n_in + d)`` forward (the
compression and the gate), twice that backward.
"""

from __future__ import annotations

import pytest
import torch

import common
from interformer import reference as R

PROVIDERS = ["eager", "compile", "compile-max-autotune", "fused", "fused-compile", "eager-cudagraph", "compile-cudagraph",
             "fused-cudagraph"]


def sizes(shape: common.Shape, use: str):
    """(n_in, n_out) of the two GatedLCE uses."""
    if use == "nonseq":
        return shape.n, shape.n_sum
    return shape.n_cls + shape.n_pma + shape.n_recent, shape.n_ssum


def lce_bytes(B: int, n_in: int, n_out: int, d: int, elt: int, mode: str) -> float:
    params = n_in * n_out + n_out + d * d + d
    fwd = (B * n_in * d + params + B * n_out * d) * elt
    bwd = (2 * B * n_in * d + B * n_out * d + 2 * params) * elt
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def lce_flops(B: int, n_in: int, n_out: int, d: int, mode: str) -> float:
    fwd = 2.0 * B * n_out * d * (n_in + d)
    return fwd * {"fwd": 1, "bwd": 2, "full": 3}[mode]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", common.MODES)
@pytest.mark.parametrize("use", ["nonseq", "seq"])
@pytest.mark.parametrize("shape_name", common.SHAPE_NAMES)
def test_gated_lce(benchmark, shape_name, use, mode, provider):
    _bench(benchmark, shape_name, use, mode, provider)


#: the bandwidth rows' fused variants: what each sets in ``interformer.kernels.gated_lce`` (module
#: attribute -> value) for its run; a ``-cudagraph`` row sets what its plain row does. The launch
#: plans timed here on an H200 at commit 7bea4b3 were decided by the pre-registered rule: two capped
#: "acc" backward programs an SM became the default (``fused`` measures it; gated_lce._acc_plan),
#: and larger backward blocks, deeper pipelines and one forward program per block lost and were
#: deleted with their rows (gated_lce._config, gated_lce._fwd_programs)
SETTINGS = {
    # the backward's dgate_weight in "store" mode, which the batch would not pick
    "fused-store": {"GW_MODE": "store"},
}
BANDWIDTH_PROVIDERS = ["eager", "compile", "fused", *SETTINGS, "eager-cudagraph", "compile-cudagraph",
                       "fused-cudagraph", *(p + common.GRAPH_SUFFIX for p in SETTINGS)]


@pytest.mark.parametrize("provider", BANDWIDTH_PROVIDERS)
@pytest.mark.parametrize("use", ["nonseq", "seq"])
def test_gated_lce_bandwidth(benchmark, monkeypatch, use, provider):
    """Forward+backward at ``taobao-b64k`` (32x taobao's batch, bench/common.py's EXTRA_SHAPES; the
    smoke shape without a GPU): the fraction of the copy bandwidth the kernels reach once launch
    latency no longer sets the time (the report's "fused x floor", the fused time over the bytes'
    time at copy speed; without a GPU only the :data:`SETTINGS` rows run, whose cells no other
    benchmark fills). At that batch the backward picks the "acc" dgate_weight mode (persistent
    programs, two per SM under a 128-register cap at taobao's d = 64) and the forward loops over the
    blocks in one wave of programs; the :data:`SETTINGS` rows change one of those choices each, to
    see which is faster there."""
    from interformer.kernels import gated_lce

    if not common.ON_GPU and provider in common.CPU_PROVIDERS:  # else two rows for one cell of the report
        pytest.skip(f"{provider}: without a GPU the bandwidth rows run at the smoke shape, where test_gated_lce "
                    "times this provider already")
    common.apply_setting_variant(monkeypatch, gated_lce, SETTINGS, provider)
    _bench(benchmark, "taobao-b64k" if common.ON_GPU else "smoke", use, "full", provider)


def _bench(benchmark, shape_name, use, mode, provider):
    common.skip_unless_runnable(provider, mode, cpu_providers=common.CPU_PROVIDERS + tuple(SETTINGS),
                                shape_name=shape_name)
    shape = common.ALL_SHAPES[shape_name]
    B, d = shape.B, shape.d
    n_in, n_out = sizes(shape, use)
    g = torch.Generator().manual_seed(0)

    def leaf(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(common.DEVICE, common.DTYPE).requires_grad_()

    x = leaf(B, n_in, d)
    params = [leaf(n_in, n_out, scale=n_in ** -0.5), leaf(n_out, scale=0.1), leaf(d, d, scale=d ** -0.5),
              leaf(d, scale=0.1)]
    if provider.startswith("fused"):
        from interformer.kernels.gated_lce import gated_lce as base
    else:
        base = R.gated_lce
    fn = common.compiled(base, provider)

    def forward():
        return fn(x, *params)

    run = common.mode_fn(forward, mode, [x, *params])
    common.run(benchmark, run, op=f"gated_lce_{use}", shape=shape, provider=provider, mode=mode,
               bytes_moved=lce_bytes(B, n_in, n_out, d, x.element_size(), mode),
               flops=lce_flops(B, n_in, n_out, d, mode))
