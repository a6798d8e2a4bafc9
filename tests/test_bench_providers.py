"""Each benchmark provider times the implementation its name promises.

A provider that silently measures the wrong thing (a ``compile-max-autotune`` column filled with
plain eager times, a ``fused-*`` row running the reference) corrupts every comparison built on it,
and the GPU-only providers never run on a CPU. So here every op benchmark is called once per
provider at the smoke shape with ``common.run`` replaced by a single call and ``torch.compile``
by a recorder, and spies on the reference and fused functions say which one ran.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

import interformer
from interformer import backend as backend_mod
from interformer import reference as R
from utils import backward_threading, recorded_calls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")

# bench module -> (test function, extra parametrisations, reference name, kernel module, kernel function)
OPS = {
    "test_bench_gated_lce": ("test_gated_lce", [dict(use="nonseq")], "gated_lce", "gated_lce", "gated_lce"),
    "test_bench_pffn": ("test_pffn", [dict(pffn_mode="mlp"), dict(pffn_mode="linear")], None, "pffn", None),
    "test_bench_dot_interaction": ("test_dot_interaction", [{}], "dot_interaction", "dot_interaction", "dot_interaction"),
    "test_bench_crossnet": ("test_crossnet", [dict(rank="full"), dict(rank="low")], None, "crossnet", None),
    "test_bench_layernorm": ("test_layernorm", [dict(use="dhen")], "add_layer_norm", "layernorm", "add_layer_norm"),
    "test_bench_attention": ("test_self_attention", [{}], "attention", "attention", "attention"),
    "test_bench_feed_forward": ("test_feed_forward", [{}], "feed_forward", "feed_forward", "feed_forward"),
    "test_bench_dcn_autocast": ("test_dcn_autocast", [dict(rank="full"), dict(rank="low")], None, "crossnet", None),
    "test_bench_pffn_autocast": ("test_pffn_autocast", [dict(pffn_mode="mlp"), dict(pffn_mode="linear")], None, "pffn",
                                 None),
}
# providers whose implementation is neither the reference nor ours (a user's pipeline)
FOREIGN = ("sdpa", "flex", "flash_attn", "nn.MultiheadAttention")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    for name in ["common", "test_bench_model"] + list(OPS):  # each bound to the common it imported
        sys.modules.pop(name, None)
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "skip_unless_runnable", lambda *a, **k: None)
    # the smoke shape is what runs here, also on a GPU, where common.SHAPES holds the GPU shapes only
    monkeypatch.setattr(common, "SHAPES", common.ALL_SHAPES)
    monkeypatch.setattr(common, "run", lambda benchmark, fn, **kw: fn())
    compiled = []

    def fake_compile(fn=None, **kw):
        compiled.append(kw.get("mode", "default"))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    yield common, compiled
    for name in ["common", "test_bench_model"] + list(OPS):
        sys.modules.pop(name, None)


def _spy(monkeypatch, module, name, calls, tag):
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(tag)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


def _expected_compile_mode(provider):
    provider = provider.removesuffix("-cudagraph")  # a graphed provider captures what its base runs
    if provider == "compile-max-autotune":
        return "max-autotune-no-cudagraphs"
    if provider.endswith("reduce-overhead"):
        return "reduce-overhead"
    if provider in ("compile", "fused-compile", "fused-compile-attention", "fused-compile-opaque"):
        return "default"
    return None


@pytest.mark.parametrize("bench_module", list(OPS))
def test_op_providers_run_what_they_name(bench, monkeypatch, bench_module):
    common, compiled = bench
    test_name, variants, ref_name, kmod_name, kfn_name = OPS[bench_module]
    mod = importlib.import_module(bench_module)
    kmod = importlib.import_module(f"interformer.kernels.{kmod_name}")
    calls = []
    ref_names = [ref_name] if ref_name else {"test_bench_pffn": ["pffn_mlp", "pffn_linear"],
                                              "test_bench_crossnet": ["cross_net", "low_rank_cross_net"],
                                              "test_bench_dcn_autocast": ["cross_net", "low_rank_cross_net"],
                                              "test_bench_pffn_autocast": ["pffn_mlp", "pffn_linear"]}[bench_module]
    for name in ref_names:
        _spy(monkeypatch, R, name, calls, "reference")
        _spy(monkeypatch, kmod, kfn_name or name, calls, "fused")
    providers = getattr(mod, "PROVIDERS", None) or getattr(mod, "SELF_PROVIDERS")
    checked = 0
    for provider in providers:
        if provider.startswith(FOREIGN):
            continue
        # a setting variant of one rank (bench/test_bench_crossnet.py's SETTING_PROVIDERS) skips the other
        only = getattr(mod, "SETTING_PROVIDERS", {}).get(provider.removesuffix(common.GRAPH_SUFFIX))
        for extra in variants:
            if only is not None and extra.get("rank", only[0]) != only[0]:
                continue
            calls.clear()
            compiled.clear()
            kwargs = dict(benchmark=None, shape_name="smoke", mode="full", provider=provider, **extra)
            if "monkeypatch" in getattr(mod, test_name).__code__.co_varnames:
                kwargs["monkeypatch"] = monkeypatch
            getattr(mod, test_name)(**kwargs)
            want = "fused" if common.base_provider(provider).startswith("fused") else "reference"
            assert calls and set(calls) == {want}, f"{bench_module} {provider} {extra}: ran {calls}, want {want}"
            mode = _expected_compile_mode(provider)
            assert compiled == ([mode] if mode else []), f"{bench_module} {provider}: torch.compile calls {compiled}"
            checked += 1
    assert checked >= 4


def test_gated_lce_bandwidth_rows_run_32x_taobao_on_a_gpu(bench, monkeypatch):
    """The bandwidth rows run the op benchmark's body at ``taobao-b64k`` on a GPU (the smoke shape
    otherwise, its setting variants only), in full mode; that shape is taobao with 32x the batch, and no other benchmark
    iterates over it."""
    import dataclasses

    common, _ = bench
    mod = importlib.import_module("test_bench_gated_lce")
    seen = []
    monkeypatch.setattr(mod, "_bench", lambda benchmark, shape_name, use, mode, provider: seen.append((shape_name, mode)))
    for on_gpu, provider in ((False, "fused-store"), (True, "fused")):
        monkeypatch.setattr(common, "ON_GPU", on_gpu)
        mod.test_gated_lce_bandwidth(None, monkeypatch, "seq", provider)
    assert seen == [("smoke", "full"), ("taobao-b64k", "full")]
    # without a GPU a provider test_gated_lce also times at the smoke shape is not run twice: a CPU
    # report named its rows as duplicates
    monkeypatch.setattr(common, "ON_GPU", False)
    for provider in ("eager", "fused"):
        with pytest.raises(pytest.skip.Exception, match="test_gated_lce times this provider already"):
            mod.test_gated_lce_bandwidth(None, monkeypatch, "seq", provider)
    mod.test_gated_lce_bandwidth(None, monkeypatch, "seq", "compile")  # skipped as GPU-only in _bench (patched)
    assert len(seen) == 3
    wide, taobao = common.ALL_SHAPES["taobao-b64k"], common.ALL_SHAPES["taobao"]
    assert wide.B == 32 * taobao.B and dataclasses.replace(wide, name="taobao", B=taobao.B) == taobao
    assert "taobao-b64k" not in common.SHAPE_NAMES


@pytest.mark.parametrize("provider", ["fused", "fused-store", "fused-store-cudagraph"])
def test_gated_lce_bandwidth_setting_providers_run_with_their_setting(bench, monkeypatch, provider):
    """Each fused bandwidth row runs the op with its settings (``SETTINGS``) in effect in the
    forward's and the backward's launchers and the others at their defaults: ``fused-store`` with
    ``GW_MODE = "store"``; ``fused`` leaves every one to the op (its "acc" backward the two capped
    programs an SM of ``_acc_plan``, which replaced the ``fused-acc2`` row). A ``-cudagraph`` row
    as its plain row."""
    mod = importlib.import_module("test_bench_gated_lce")
    import interformer.kernels.gated_lce as G

    names = ("GW_MODE", "ACC_PROGRAMS_PER_SM", "ACC_MAXNREG", "FWD_PROGRAMS_PER_SM")
    defaults = {n: getattr(G, n) for n in names}
    seen = []
    for launcher in ("_gw_mode", "_fwd_programs"):  # called by the launchers, which read the settings then
        real = getattr(G, launcher)
        monkeypatch.setattr(G, launcher, lambda *a, _real=real, **k: seen.append({n: getattr(G, n) for n in names})
                            or _real(*a, **k))
    mod.test_gated_lce_bandwidth(None, monkeypatch, "seq", provider)
    want = dict(defaults, **mod.SETTINGS.get(provider.removesuffix("-cudagraph"), {}))
    assert len(seen) >= 2 and all(s == want for s in seen), seen
    for setting in mod.SETTINGS.values():
        assert set(setting) <= set(names)


def test_pma_providers_run_what_they_name(bench, monkeypatch):
    common, compiled = bench
    mod = importlib.import_module("test_bench_attention")
    import interformer.kernels.attention as A

    calls = []
    _spy(monkeypatch, A, "pooled_attention", calls, "fused")
    _spy(monkeypatch, R, "pooled_attention", calls, "reference")
    monkeypatch.delitem(backend_mod._KERNELS, ("attention", "pooled_attention"), raising=False)  # resolve to the spy
    for provider in mod.PMA_PROVIDERS:
        calls.clear()
        compiled.clear()
        mod.test_pma(benchmark=None, monkeypatch=monkeypatch, shape_name="smoke", mode="full", provider=provider)
        base = common.base_provider(provider)
        want = {"fused": {"fused"}, "fused-delta-output": {"fused"}, "nn.MultiheadAttention": set()}.get(
            base, {"reference"})
        assert set(calls) == want, f"pma {provider}: ran {calls}"
        mode = _expected_compile_mode(provider)
        assert compiled == ([mode] if mode else []), f"pma {provider}: torch.compile calls {compiled}"


def test_model_providers_build_what_they_name(bench):
    common, compiled = bench
    mod = importlib.import_module("test_bench_model")
    shape = common.Shape("smoke", B=2, n=3, k=2, T=5, d=16, heads=2, layers=1, n_ssum=2, dcn_rank=4)
    for provider in mod.PROVIDERS:
        compiled.clear()
        model = mod.build(provider, shape)
        backends = {m.backend for m in model.modules() if isinstance(m, backend_mod.FusedModule)}
        want = "triton" if provider.startswith("fused") else "eager"
        assert backends == {want}, f"model {provider}: backends {backends}"
        mode = _expected_compile_mode(provider)
        assert compiled == ([mode] if mode else []), f"model {provider}: torch.compile calls {compiled}"
        streams = any(getattr(b, "use_streams", False) for b in model.modules() if hasattr(b, "_side_stream"))
        assert streams == provider.startswith("fused-streams"), f"model {provider}: streams {streams}"


def test_compile_keeping_providers_hold_their_setting_over_the_run(bench, monkeypatch):
    """``fused-compile-attention`` runs (traces and calls) the compiled model with every op but
    attention's left to Inductor, ``fused-compile-opaque`` with the kept ops left opaque custom
    ops; each leaves the process's settings as it found them; the other providers run under
    the default settings."""
    common, _ = bench
    mod = importlib.import_module("test_bench_model")
    before = interformer.compile_reference_ops()
    inline_before = interformer.compile_inline()
    seen = {}

    def run(benchmark, fn, provider, **kw):
        seen[provider] = (interformer.compile_reference_ops(), interformer.compile_inline())
        fn()

    monkeypatch.setattr(common, "run", run)
    for provider in ("fused-compile", "fused-compile-attention", "fused-compile-opaque"):
        mod.test_model(None, "smoke", "inference", provider)
        assert interformer.compile_reference_ops() == before and interformer.compile_inline() == inline_before
    assert seen["fused-compile"] == (before, inline_before)
    assert seen["fused-compile-attention"] == (set(backend_mod.FUSED_OPS) - {"attention", "pooled_attention"},
                                               inline_before)
    assert seen["fused-compile-opaque"] == (before, False)
    assert {"fused-compile-attention", "fused-compile-opaque"} <= set(mod.PROVIDERS)


class _Bench:
    """The part of pytest-benchmark's fixture ``common.run`` uses: one untimed call."""

    def __init__(self):
        self.extra_info = {}

    def pedantic(self, fn, **kw):
        fn()


def test_compiled_fused_rows_record_what_was_left_to_inductor(monkeypatch):
    """A compiled fused provider's row names the ops the compiled model left to Inductor (the process
    setting can come from the environment); other rows carry no such field."""
    monkeypatch.syspath_prepend(BENCH)
    sys.modules.pop("common", None)
    common = importlib.import_module("common")
    before = interformer.set_compile_reference_ops(None)
    try:
        rows = {}
        for provider in ("fused", "compile", "fused-compile", "fused-compile-attention", "fused-compile-opaque"):
            with common.compile_reference(provider):
                rows[provider] = common.run(_Bench(), lambda: None, op="x", shape=common.ALL_SHAPES["smoke"],
                                            provider=provider, mode="full")
    finally:
        interformer.set_compile_reference_ops(before)
        sys.modules.pop("common", None)
    assert not {"compile_reference", "compile_inline"} & (set(rows["fused"]) | set(rows["compile"]))
    inlined = {None: common.DEVICE.type == "cuda"}.get(interformer.compile_inline(), interformer.compile_inline())
    assert [rows[p]["compile_inline"] for p in ("fused-compile", "fused-compile-attention", "fused-compile-opaque")] \
        == [inlined, inlined, False]
    assert rows["fused-compile"]["compile_reference"] == \
        "add_layer_norm,cross_net,feed_forward,grouped_embedding,low_rank_cross_net"
    kept = {"attention", "pooled_attention"}
    assert rows["fused-compile-attention"]["compile_reference"] == ",".join(sorted(set(backend_mod.FUSED_OPS) - kept))


def test_timing_quantiles_and_plain_timing_on_cpu(bench):
    """The per-call statistics of ``time_median``: median, p20 and p80 of the samples; without a
    GPU one synchronised run (the steady-state and do_bench paths need CUDA events)."""
    common, _ = bench
    q = common._quantiles([float(v) for v in range(1, 12)])
    assert q == {"median_ms": 6.0, "p20_ms": 3.0, "p80_ms": 9.0}
    calls = []
    t = common.time_median(lambda: calls.append(1))
    assert set(t) == {"median_ms", "p20_ms", "p80_ms"} and t["median_ms"] >= 0
    if not torch.cuda.is_available():
        assert len(calls) == 1


def _run_attention_provider(monkeypatch, provider, test="test_self_attention"):
    """The attention benchmark ``test`` for ``provider`` at the smoke shape in full mode; a setting
    variant (not plain ``fused``) must then skip the forward-only mode, which it leaves as the
    default's."""
    run = getattr(importlib.import_module("test_bench_attention"), test)
    run(benchmark=None, monkeypatch=monkeypatch, shape_name="smoke", mode="full", provider=provider)
    if provider != "fused":
        with pytest.raises(pytest.skip.Exception, match="a backward setting"):
            run(benchmark=None, monkeypatch=monkeypatch, shape_name="smoke", mode="fwd", provider=provider)


@pytest.mark.parametrize("test", ["test_self_attention", "test_pma"])
@pytest.mark.parametrize("provider, delta", [("fused", "probs"), ("fused-delta-output", "output"),
                                             ("fused-delta-output-cudagraph", "output")])
def test_attention_setting_providers_run_with_their_setting(bench, monkeypatch, provider, delta, test):
    """``fused-delta-output`` (and its graphed row) times the self-attention and PMA backwards with
    ``BACKWARD_DELTA = "output"`` in effect, plain ``fused`` with the default (the setting seen where
    the backward chooses its delta form); the variant skips the forward-only mode, which it leaves
    as the default's."""
    import interformer.kernels.attention as A

    seen = []
    real = A._backward_delta

    def spy():
        seen.append(A.BACKWARD_DELTA)
        return real()

    monkeypatch.setattr(A, "_backward_delta", spy)  # read by every backward launch
    _run_attention_provider(monkeypatch, provider, test)
    assert seen and set(seen) == {delta}, seen


@pytest.mark.parametrize("provider, kernels", [
    ("fused", {"_attn_bwd_fused_kernel"}),
    ("fused-general", {"_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"}),
    ("fused-general-cudagraph", {"_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"})],
    ids=["fused", "fused-general", "fused-general-cudagraph"])
def test_fused_general_runs_the_general_attention_backward(bench, monkeypatch, provider, kernels):
    """``fused-general`` (and its graphed row) times the self-attention backward on the general path
    (a dq kernel, then a dk/dv kernel) at a length the default gives the single-query-block kernel;
    it skips the forward-only mode, which it leaves as the default's."""
    from test_kernel_attention import _backward_kernels

    _, launched = _backward_kernels(monkeypatch, lambda: _run_attention_provider(monkeypatch, provider))
    # fp32 on the smoke shape: the general path forms delta in a kernel of its own
    assert {n for n in launched if "_bwd_" in n} - {"_attn_bwd_delta_kernel"} == kernels, launched


@pytest.mark.parametrize("provider, tile", [("fused", None), ("fused-narrow", (16, 4)),
                                            ("fused-narrow-cudagraph", (16, 4))],
                         ids=["fused", "fused-narrow", "fused-narrow-cudagraph"])
def test_fused_narrow_runs_the_single_block_backward_on_narrow_tiles(bench, monkeypatch, provider, tile):
    """``fused-narrow`` (and its graphed row) times the self-attention backward with
    ``FUSED_BWD_TILE = (16, 4)``, plain ``fused`` with the default tile (what the single-query-block
    backward's launcher is given); the forward-only mode is skipped."""
    import interformer.kernels.attention as A

    seen, real = [], A._fused_bwd_config

    def spy(*args):
        config = real(*args)
        seen.append((A.FUSED_BWD_TILE, config[1:]))
        return config

    monkeypatch.setattr(A, "_fused_bwd_config", spy)
    _run_attention_provider(monkeypatch, provider)
    assert seen and {setting for setting, _ in seen} == {tile}, seen
    if tile is not None:
        assert {config for _, config in seen} == {tile}, seen


@pytest.mark.parametrize("provider, warps, gemm, backward, forward, stages", [
    ("fused", 4, "cublas", "rows", "rows", 3), ("fused-8warps", 8, "cublas", "rows", "rows", 3),
    ("fused-triton-gemm", 4, "triton", "rows", "rows", 3), ("fused-phases", 4, "cublas", "phases", "rows", 3),
    ("fused-fphases", 4, "cublas", "rows", "phases", 3), ("fused-deep", 4, "cublas", "rows", "rows", 5)])
def test_crossnet_setting_providers_run_with_their_setting(bench, monkeypatch, provider, warps, gemm, backward,
                                                           forward, stages):
    """``fused-8warps`` times the low-rank op with ``LOW_RANK_ROW_WARPS = 8`` in effect,
    ``fused-triton-gemm`` the full-rank op with ``FULL_RANK_GEMM = "triton"``, ``fused-phases`` the
    low-rank op with ``LOW_RANK_BACKWARD = "phases"``, ``fused-fphases`` with ``LOW_RANK_FORWARD =
    "phases"`` and ``fused-deep`` with ``LOW_RANK_MAX_STAGES = 5``; plain ``fused`` with none of them
    (the settings seen inside the launchers, forward and backward, as they are called)."""
    mod = importlib.import_module("test_bench_crossnet")
    import interformer.kernels.crossnet as C

    seen = []
    for name in ("_lr_fwd_impl", "_fr_fwd_impl", "_lr_bwd_impl", "_fr_bwd_impl"):
        real = getattr(C, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, C.LOW_RANK_ROW_WARPS, C.FULL_RANK_GEMM, C.LOW_RANK_BACKWARD, C.LOW_RANK_FORWARD,
                         C.LOW_RANK_MAX_STAGES))
            return _real(*args, **kwargs)

        monkeypatch.setattr(C, name, spy)
    rank = "full" if "gemm" in provider else "low"
    mod.test_crossnet(benchmark=None, monkeypatch=monkeypatch, shape_name="smoke", rank=rank, mode="full",
                      provider=provider)
    prefix = "_fr" if rank == "full" else "_lr"
    assert {name for name, *_ in seen} == {f"{prefix}_fwd_impl", f"{prefix}_bwd_impl"}, seen
    assert {tuple(settings) for _, *settings in seen} == {(warps, gemm, backward, forward, stages)}, seen


@pytest.mark.parametrize("as_on_gpu", [False, True], ids=["here", "as-on-gpu"])
@pytest.mark.parametrize("provider, rows", [("fused", 16), ("fused-rows32", 32), ("fused-rows32-cudagraph", 32)])
@pytest.mark.parametrize("pffn_mode", ["mlp", "linear"])
def test_pffn_autocast_setting_providers_run_with_their_setting(bench, monkeypatch, provider, rows, pffn_mode,
                                                                as_on_gpu):
    """``fused-rows32`` (and its graphed row) times the PFFN's fp32 backward with
    ``FP32_BACKWARD_ROWS = 32`` in effect, plain ``fused`` with the default 16: the backward's row
    block as its launcher plans it; in ``fwd`` mode the variant is skipped, its forward being the
    default's. The op is given the model's dtypes (an fp32 s and LayerNorm parameters, mlp's w_b in
    ``common.DTYPE``, the hypernetwork's output under autocast, linear's x_sum and a in fp32), and
    its backward gets them as autocast makes them (x_sum cast to ``common.DTYPE`` by the op).
    ``here``: as this machine runs the rows (on the CPU all fp32, autocast off); ``as-on-gpu``: as
    a GPU does, ``ON_GPU`` set and autocast on (on the CPU in fp16, the interpreter having no bf16).
    (Until 2026-11-29 the test set ``ON_GPU`` False, which on a GPU turned autocast off with a bf16
    w_b: pffn_mlp's ValueError in every mlp case.)"""
    common, _ = bench
    mod = importlib.import_module("test_bench_pffn_autocast")
    import interformer.kernels.pffn as K

    if as_on_gpu and not common.ON_GPU:
        monkeypatch.setattr(common, "ON_GPU", True)  # autocast_for: on, on the CPU device
        monkeypatch.setattr(common, "DTYPE", torch.float16)
    dtypes = []
    real_bwd = K._bwd_impl

    def bwd_spy(grad_out, s, lengths, wx, a, ln_weight, ln_bias, *rest):
        dtypes.append((grad_out.dtype, s.dtype, wx.dtype, None if a is None else a.dtype, ln_weight.dtype))
        return real_bwd(grad_out, s, lengths, wx, a, ln_weight, ln_bias, *rest)

    def op_spy(*args, _real=getattr(K, f"pffn_{pffn_mode}")):
        given.append(tuple(t.dtype for t in args if isinstance(t, torch.Tensor)))
        return _real(*args)

    given = []
    seen = recorded_calls(monkeypatch, K, "_config")
    monkeypatch.setattr(K, "_bwd_impl", bwd_spy)
    monkeypatch.setattr(K, f"pffn_{pffn_mode}", op_spy)
    kwargs = dict(benchmark=None, monkeypatch=monkeypatch, shape_name="smoke", pffn_mode=pffn_mode, provider=provider)
    mod.test_pffn_autocast(mode="full", **kwargs)
    # the forward's plan, then the backward's, asked with its row block (the smoke shape's few rows
    # fit one 16-row block either way: the request, not the block, tells the setting)
    assert [args[3:] for args, _ in seen] == [(False,), (True, rows)], seen
    f32 = torch.float32
    # given: s, lengths, w_b (the hypernetwork's output, in the autocast dtype) or x_sum and a (fp32), LN parameters
    weights = (common.DTYPE,) if pffn_mode == "mlp" else (f32, f32)
    assert given == [(f32, torch.int64, *weights, f32, f32)], given
    assert dtypes == [(f32, f32, common.DTYPE, None if pffn_mode == "mlp" else f32, f32)], dtypes
    if provider != "fused":
        with pytest.raises(pytest.skip.Exception, match="a backward setting"):
            mod.test_pffn_autocast(mode="fwd", **kwargs)


def test_model_train_modes_run_the_backward_where_they_say(bench, monkeypatch):
    """``train`` leaves autograd's threading as PyTorch has it; ``train-calling-thread`` runs the
    backward with multithreading off (as ``interformer train`` does); inference runs none."""
    common, _ = bench
    mod = importlib.import_module("test_bench_model")
    seen = backward_threading(monkeypatch)
    default = torch._C._is_multithreading_enabled()
    for mode, want in (("train", [default]), ("train-calling-thread", [False]), ("inference", [])):
        seen.clear()
        mod.test_model(None, "smoke", mode, "eager")
        assert seen == want, f"{mode}: backward ran with multithreading {seen}"
        assert torch._C._is_multithreading_enabled() == default


def test_compiled_rows_count_what_dynamo_compiled_and_when(monkeypatch):
    """A compiled provider's row counts the frames dynamo looked at and compiled over the row and
    looked at during its timed calls, and the graph breaks: a guard that fails on every call shows
    as compilation inside the timing (H200, 2026-11-27: a compiled model toggled into recompiling
    in its measured steps), a frame dynamo gave up on (past the recompile limit) as nothing
    compiled; an uncompiled provider's row has no such fields."""
    monkeypatch.syspath_prepend(BENCH)
    sys.modules.pop("common", None)
    common = importlib.import_module("common")
    x = torch.ones(3)
    state = {"tag": ""}

    def steady(t):
        return t * 2

    def drifting(t):  # dynamo guards on the string it reads (ints it would make dynamic): each call recompiles
        return t + len(state["tag"])

    def broken(t):
        t = t + 1
        torch._dynamo.graph_break()
        return t * 3

    def call(f):
        def fn():
            state["tag"] += "x"
            f(x)
        return fn

    rows = {}
    try:
        for name, f in (("steady", steady), ("drifting", drifting), ("broken", broken)):
            torch._dynamo.reset()
            compiled = torch.compile(f, backend="eager")
            rows[name] = common.run(_Bench(), call(compiled), op=name, shape=common.ALL_SHAPES["smoke"],
                                    provider="compile", mode="full")
        rows["plain"] = common.run(_Bench(), call(steady), op="plain", shape=common.ALL_SHAPES["smoke"],
                                   provider="eager", mode="full")
        # a row whose callable ran its compiled part while it was built (a bwd row's forward) counts
        # that compile when the benchmark marked its start (bench/conftest.py does)
        torch._dynamo.reset()
        common.start_row()
        early = torch.compile(steady, backend="eager")
        early(x)
        rows["built compiled"] = common.run(_Bench(), lambda: early(x), op="built", shape=common.ALL_SHAPES["smoke"],
                                            provider="compile", mode="bwd")
        common._ROW_START = None
        # past the recompile limit dynamo gives up on the frame: the row then runs uncompiled code
        torch._dynamo.reset()
        with torch._dynamo.config.patch(recompile_limit=2):
            given_up = torch.compile(drifting, backend="eager")
            for _ in range(3):
                call(given_up)()
            rows["given up"] = common.run(_Bench(), call(given_up), op="given up", shape=common.ALL_SHAPES["smoke"],
                                          provider="compile", mode="full")
    finally:
        torch._dynamo.reset()
        sys.modules.pop("common", None)
    assert [rows["steady"][k] for k in ("dynamo_frames", "dynamo_frames_compiled", "dynamo_frames_timed", "graph_breaks")] \
        == [1, 1, 0, 0]
    assert rows["drifting"]["dynamo_frames_timed"] >= 1 and rows["drifting"]["dynamo_frames"] >= 3
    assert rows["drifting"]["graph_breaks"] == 0
    assert rows["broken"]["graph_breaks"] >= 1 and rows["broken"]["dynamo_frames_timed"] == 0
    assert rows["given up"]["dynamo_frames_compiled"] == 0 and rows["drifting"]["dynamo_frames_compiled"] >= 1
    assert rows["built compiled"]["dynamo_frames_compiled"] == 1 and rows["built compiled"]["dynamo_frames_timed"] == 0
    assert not {"dynamo_frames", "dynamo_frames_compiled", "dynamo_frames_timed", "graph_breaks"} & set(rows["plain"])


def test_each_benchmark_starts_with_dynamo_reset(tmp_path):
    """``bench/conftest.py`` resets dynamo before every benchmark: compiled code is cached on the code
    object (shared by all rows of one model or op), so without it the rows of one process add
    entries until dynamo gives up (past recompile_limit, the frame runs uncompiled) and a later
    shape compiles with dynamic sizes. A copy of the conftest with two tests: the second compiles
    the shared function again; and each benchmark marks its row's start (``common.start_row``)."""
    import shutil
    import subprocess

    shutil.copy(os.path.join(BENCH, "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "common.py").write_text("starts = []\n_ROW_START = None\ndef start_row():\n    starts.append(1)\n")
    (tmp_path / "test_two_rows.py").write_text(
        "import torch\n"
        "import common\n"
        "from torch._dynamo.utils import counters\n"
        "f = torch.compile(lambda t: t * 2, backend='eager')\n"
        "seen = []\n"
        "def test_first():\n    f(torch.ones(2)); seen.append(counters['frames']['ok'])\n"
        "def test_second():\n    f(torch.ones(2)); assert counters['frames']['ok'] == seen[0] + 1, (seen, dict(counters['frames']))\n"
        "def test_each_row_marked_its_start():\n    assert len(common.starts) == 3\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "3 passed" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


# ----------------------------------------------------------------------------- floors: bytes and FLOPs
def _hand_counts(S, elt: int, valid_lengths) -> dict:
    """(bytes, FLOPs) of every op benchmark by (op, mode), derived from DESIGN §3/§4 and each op's
    signature, independently of bench/: each tensor the op (forward, backward) takes or gives read
    or written once, in the benchmark's element size ``elt`` (LayerNorm: fp32 stream, fp32 output
    and parameters under autocast; the feed-forward block: fp32 input and parameters, output in
    ``elt`` under autocast); FLOPs of the matmuls, the backward twice the forward (input and
    weight gradients; a kernel's recomputation is its choice, not counted); ``full`` the sum. Not
    counted anywhere: the int64 lengths (8 bytes a sample)."""
    B, d = S.B, S.d
    L, Nz, D, r = S.n_cls + S.T, S.n + S.n_ssum, (S.n + S.n_ssum) * S.d, S.dcn_rank
    out = {}

    def put(op, fwd_b, bwd_b, fwd_f=0.0):
        out[op] = {"fwd": (fwd_b, fwd_f), "bwd": (bwd_b, 2 * fwd_f), "full": (fwd_b + bwd_b, 3 * fwd_f)}

    seq = B * L * d
    for mode_name, weight, flops in (("mlp", B * d * d, 2 * B * L * d * d),
                                     ("linear", B * S.n_sum * d + S.n_sum * d, 4 * B * L * d * S.n_sum)):
        # fwd: s, weight(s), LN weight and bias in; out. bwd: s, weight(s), LN params, dout in; ds, their grads out
        put(f"pffn_{mode_name}", (2 * seq + weight + 2 * d) * elt, (3 * seq + 2 * weight + 4 * d) * elt, flops)
    for use, n_in, n_out in (("nonseq", S.n, S.n_sum), ("seq", S.n_cls + S.n_pma + S.n_recent, S.n_ssum)):
        params = n_in * n_out + n_out + d * d + d  # weight, bias, gate weight, gate bias
        put(f"gated_lce_{use}", (B * n_in * d + params + B * n_out * d) * elt,
            (B * n_in * d + params + B * n_out * d + B * n_in * d + params) * elt,
            2 * B * n_out * n_in * d + 2 * B * n_out * d * d)
    layers = 2
    for rank, params, flops in (("full", layers * (D * D + D), layers * 2 * B * D * D),
                                ("low", layers * (2 * D * r + D), layers * 4 * B * D * r)):
        put(f"crossnet-{rank}", (2 * B * D + params) * elt, (3 * B * D + 2 * params) * elt, flops)
    pairs = Nz * (Nz - 1) // 2
    put("dot_interaction", (B * Nz * d + B * pairs) * elt, (B * pairs + 2 * B * Nz * d) * elt, 2 * B * pairs * d)
    qkv = B * L * d  # each of q, k, v, out, dout, dq, dk, dv
    put("attention", 4 * qkv * elt, 7 * qkv * elt, 4 * d * sum(float(n) ** 2 for n in valid_lengths))
    params = S.n_pma * d + 3 * (d * d + d)  # query; K, V, O weights and biases
    put("pma", (B * S.T * d + params + B * S.n_pma * d) * elt, (2 * B * S.T * d + 2 * params + B * S.n_pma * d) * elt)
    for use, rows, x_elt, r_elt in (("dhen", B * Nz, 4, elt), ("interaction", B * S.n, 4, elt), ("seq", B * L, elt, 0)):
        put(f"layernorm_{use}", rows * d * (x_elt + r_elt + 4) + 2 * d * 4,
            rows * d * (4 + 2 * (x_elt + r_elt)) + 3 * d * 4)
    rows, k_in, hidden, n_out = B * S.n, d, 4 * d, d  # the Interaction Arch's FFN
    params = 4 * (hidden * k_in + hidden + n_out * hidden + n_out)  # w1, b1, w2, b2 in fp32
    # fwd: x (fp32), parameters in; out. bwd: x, dout, parameters in; dx (fp32), their gradients out
    put("feed_forward", rows * k_in * 4 + params + rows * n_out * elt,
        rows * k_in * 4 + rows * n_out * elt + params + rows * k_in * 4 + params,
        2 * rows * k_in * hidden + 2 * rows * hidden * n_out)
    return out


def _valid_lengths(common, shape):
    return (common.lengths_for(shape, torch.Generator().manual_seed(0)) + shape.n_cls).tolist()


def _bench_counts(mods, common, S, elt: int) -> dict:
    """(bytes, FLOPs) by (op, mode) from the benchmark modules' own count functions."""
    attn, pffn, lce, dcn, dot, ln, ff = (mods[m] for m in ("test_bench_attention", "test_bench_pffn",
                                                           "test_bench_gated_lce", "test_bench_crossnet",
                                                           "test_bench_dot_interaction", "test_bench_layernorm",
                                                           "test_bench_feed_forward"))
    lengths = torch.tensor(_valid_lengths(common, S))
    out = {}
    for mode in common.MODES:
        for m in ("mlp", "linear"):
            out[(f"pffn_{m}", mode)] = (pffn.pffn_bytes(S, m, elt, mode), pffn.pffn_flops(S, m, mode))
        for use in ("nonseq", "seq"):
            n_in, n_out = lce.sizes(S, use)
            out[(f"gated_lce_{use}", mode)] = (lce.lce_bytes(S.B, n_in, n_out, S.d, elt, mode),
                                               lce.lce_flops(S.B, n_in, n_out, S.d, mode))
        for rank, params, r in (("full", 2 * (S.D * S.D + S.D), None), ("low", 2 * (2 * S.D * S.dcn_rank + S.D), S.dcn_rank)):
            out[(f"crossnet-{rank}", mode)] = (dcn.cross_bytes(S.B, S.D, params, elt, mode),
                                               dcn.cross_flops(S.B, S.D, r, 2, mode))
        out[("dot_interaction", mode)] = (dot.dot_bytes(S.B, S.Nz, S.d, elt, mode), dot.dot_flops(S.B, S.Nz, S.d, mode))
        out[("attention", mode)] = (attn.attention_bytes(S.B, S.L, S.heads, S.head_dim, elt, mode),
                                    attn.attention_flops(lengths, S.heads, S.head_dim, mode))
        out[("pma", mode)] = (attn.pma_bytes(S.B, S.T, S.d, S.n_pma, elt, mode), 0.0)
        for use, x_elt, r_elt in (("dhen", 4, elt), ("interaction", 4, elt), ("seq", elt, 0)):
            out[(f"layernorm_{use}", mode)] = (ln.ln_bytes(ln.rows_for(S, use), S.d, x_elt, r_elt, mode, 4), 0.0)
        rows, k_in, hidden, n_out = ff.sizes(S)
        out[("feed_forward", mode)] = (ff.ffn_bytes(rows, k_in, hidden, n_out, elt, mode),
                                       ff.ffn_flops(rows, k_in, hidden, n_out, mode))
    return out


def test_floor_counts_match_the_hand_derivation_at_taobao(bench):
    """Every op's bytes and FLOPs at ``taobao`` in bf16 equal the hand derivation (found: attention's
    backward counted reading O, 8 tensor-sizes for 7, and its FLOPs 2.5x the forward for 2x; PMA's
    backward counted writing the pooled output and no parameters; PFFN's and LayerNorm's left out
    the norm parameters' gradients); and the forward floors at an H100's 3.0 TB/s and 798 TFLOP/s
    are DESIGN §6's orders of magnitude (PFFN ~15, gated LCE ~2, DCN ~5, DOT ~3, attention ~19,
    PMA ~4 us)."""
    common, _ = bench
    mods = {m: importlib.import_module(m) for m in ("test_bench_attention", "test_bench_pffn", "test_bench_gated_lce",
                                                    "test_bench_crossnet", "test_bench_dot_interaction",
                                                    "test_bench_layernorm", "test_bench_feed_forward")}
    S = common.ALL_SHAPES["taobao"]
    hand = _hand_counts(S, 2, _valid_lengths(common, S))
    got = _bench_counts(mods, common, S, 2)
    wrong = {k: (got[k], hand[k[0]][k[1]]) for k in got
             if got[k][0] != pytest.approx(hand[k[0]][k[1]][0], rel=1e-12)
             or got[k][1] != pytest.approx(hand[k[0]][k[1]][1], rel=1e-12)}
    assert not wrong, wrong

    def floor_us(op):
        b, f = got[(op, "fwd")]
        return max(b / 3.0e12, f / 798e12) * 1e6
    design = {"pffn_mlp": 15, "gated_lce_nonseq": 2, "crossnet-low": 5, "dot_interaction": 3, "attention": 19, "pma": 4}
    off = {op: round(floor_us(op), 2) for op, us in design.items() if not 0.85 <= floor_us(op) / us <= 1.2}
    assert not off, off


_COUNTED_BENCHMARKS = [  # (module, test function, extra arguments, op name of the row)
    ("test_bench_pffn", "test_pffn", dict(pffn_mode="mlp"), "pffn_mlp"),
    ("test_bench_pffn", "test_pffn", dict(pffn_mode="linear"), "pffn_linear"),
    ("test_bench_gated_lce", "test_gated_lce", dict(use="nonseq"), "gated_lce_nonseq"),
    ("test_bench_gated_lce", "test_gated_lce", dict(use="seq"), "gated_lce_seq"),
    ("test_bench_crossnet", "test_crossnet", dict(rank="full"), "crossnet-full"),
    ("test_bench_crossnet", "test_crossnet", dict(rank="low"), "crossnet-low"),
    ("test_bench_dot_interaction", "test_dot_interaction", {}, "dot_interaction"),
    ("test_bench_attention", "test_self_attention", {}, "attention"),
    ("test_bench_attention", "test_pma", {}, "pma"),
    ("test_bench_layernorm", "test_layernorm", dict(use="dhen"), "layernorm_dhen"),
    ("test_bench_layernorm", "test_layernorm", dict(use="seq"), "layernorm_seq"),
    ("test_bench_feed_forward", "test_feed_forward", {}, "feed_forward"),
]


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
def test_benchmarks_pass_the_hand_counts_to_their_rows(bench, monkeypatch, mode):
    """What each op benchmark hands ``common.run`` (the row's bytes and FLOPs) at the smoke shape is
    the hand derivation, in the dtype the benchmark runs (fp32 on the CPU, bf16 on a GPU)."""
    common, _ = bench
    seen = {}
    monkeypatch.setattr(common, "run", lambda benchmark, fn, **kw: seen.setdefault(kw["op"], kw))
    S = common.ALL_SHAPES["smoke"]
    hand = _hand_counts(S, common.DTYPE.itemsize, _valid_lengths(common, S))
    wrong = {}
    for module, test, extra, op in _COUNTED_BENCHMARKS:
        mod = importlib.import_module(module)
        kwargs = dict(benchmark=None, shape_name="smoke", mode=mode, provider="eager", **extra)
        if "monkeypatch" in getattr(mod, test).__code__.co_varnames:
            kwargs["monkeypatch"] = monkeypatch
        getattr(mod, test)(**kwargs)
        kw = seen.pop(op)
        got = (kw.get("bytes_moved") or 0.0, kw.get("flops") or 0.0)
        want = hand[op][mode]
        if got[0] != pytest.approx(want[0], rel=1e-12) or got[1] != pytest.approx(want[1], rel=1e-12):
            wrong[op] = (got, want)
    assert not wrong, wrong


def test_full_mode_times_no_fill_of_the_upstream_gradient(bench):
    """``full`` runs forward and backward with an upstream gradient made once, outside the timed
    calls (found: ``torch.ones_like(out)`` in every call, a fill kernel of out's size timed with the
    op, about 1-1.5 us by estimate where the fused DOT's whole graphed step on the H200 is 18 us)."""
    common, _ = bench
    x = torch.randn(64, 32, requires_grad=True)
    grads = []

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t * 2

        @staticmethod
        def backward(ctx, g):
            grads.append(g)
            return g * 2

    fn = common.mode_fn(lambda: Spy.apply(x), "full", [x])
    fn()  # the warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            fn()
    fills = [e.name for e in prof.events() if e.name in ("aten::ones_like", "aten::fill_", "aten::ones")]
    assert not fills, fills
    assert len(grads) == 4 and all(torch.equal(g, torch.ones(64, 32)) for g in grads)
    assert torch.equal(x.grad, torch.full((64, 32), 2.0))  # each call's gradient, not accumulated


def test_rows_record_their_counts_and_the_ceilings_their_floor_is_taken_against(monkeypatch):
    """A row names the bytes, FLOPs and measured ceilings it was judged by, so its floor can be
    checked from the results file alone; floor = the larger of bytes/copy and FLOPs/matmul."""
    monkeypatch.syspath_prepend(BENCH)
    sys.modules.pop("common", None)
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "ceilings", lambda: {"copy_GBps": 3000.0, "bf16_TFLOPs": 800.0})
    try:
        row = common.run(_Bench(), lambda: None, op="x", shape=common.ALL_SHAPES["smoke"], provider="fused",
                         mode="full", bytes_moved=3.0e6, flops=1.6e9)
    finally:
        sys.modules.pop("common", None)
    assert (row["bytes_moved"], row["flops"], row["ceil_copy_GBps"], row["ceil_bf16_TFLOPs"]) == (3.0e6, 1.6e9, 3000.0, 800.0)
    assert row["floor_ms"] == pytest.approx(2e-3)  # 1.6 GFLOP at 800 TFLOP/s: 2 us; 3 MB at 3 TB/s: 1 us
    assert row["x_floor"] == pytest.approx(row["median_ms"] / 2e-3)


def test_attention_rows_fail_on_our_errors_and_skip_on_outside_ones(bench):
    """The attention benchmarks' ``_try``: an error of the fused path or of the eager reference
    fails the row; an outside implementation that rejects the call (an SDPA backend, flex,
    flash_attn, Inductor, ``nn.MultiheadAttention``) is a skip. Every RuntimeError was a skip, so a
    kernel fault on a GPU lease showed only as a missing column (a review's find, 2026-11-29)."""
    mod = importlib.import_module("test_bench_attention")

    def fault():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    for provider in ("fused", "fused-cudagraph", "fused-general", "fused-delta-output-cudagraph", "eager",
                     "eager-cudagraph"):
        with pytest.raises(RuntimeError, match="illegal memory access"):
            mod._try(fault, provider)
    for provider in ("sdpa-flash", "sdpa-cudnn-cudagraph", "flex", "flash_attn", "compile",
                     "nn.MultiheadAttention-cudagraph"):
        with pytest.raises(pytest.skip.Exception, match="unsupported here"):
            mod._try(fault, provider)
