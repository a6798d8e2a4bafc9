"""``interformer.set_compile_inline``: the kept custom ops traced into their Triton kernels.

On a CPU these graphs run through ``aot_eager`` (Inductor's code for user-defined Triton kernels
needs a GPU), with each recorded launch running the interpreted kernel. What is checked here:

* the setting (environment variable, setter, errors), the recompile a change causes and the
  compile caches' key;
* for every op with an inlining rule, forward and backward: with the setting on, the traced
  graphs hold Triton launches (``triton_kernel_wrapper_functional``) and none of the package's
  custom ops; off, they hold the custom ops; the outputs and every gradient are bitwise those of
  the custom ops (same launchers, same kernels, same arguments), in fp32 and fp16 (bf16 too on a
  GPU, where the launches and the analysis of what they write are Triton's own); and each traced
  launch copies as written only that kernel's outputs;
* the whole fused model, every op kept: only the cross nets' ops (which have no rule) stay custom
  ops, and logits, loss and every parameter's gradient are bitwise those without inlining;
* a graph traced with dynamic shapes keeps the custom ops;
* ``torch.export`` keeps the custom ops whatever the setting;
* the interpreter's stand-in for Triton's write analysis, kernel by kernel;
* a traced call leaves no traced tensor in the rotary-table cache;
* every launch of an inlined op's launchers goes through ``launch``;
* every kernel with a float argument builds for sm_90 with it typed fp64, as Inductor types it.

Inductor on the inlined fused model (a GPU), plain and under ``reduce-overhead``:
``tests/test_fused_model.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import interformer
from interformer import InterFormerCTR

from utils import DEVICE, KERNEL_DTYPES, bad_compile_setting_run

LAUNCH = "triton_kernel_wrapper_functional"


@pytest.fixture
def settings():
    """Every op kept as a custom op under compile, inlining set by the test; both restored after."""
    reference = interformer.set_compile_reference_ops("none")
    inline = interformer.set_compile_inline(False)
    yield interformer.set_compile_inline
    interformer.set_compile_inline(inline)
    interformer.set_compile_reference_ops(reference)
    torch._dynamo.reset()


def _compiled(fn, dynamic=None):
    """``(compiled fn, targets)``: ``fn`` under ``torch.compile(fullgraph=True, dynamic=dynamic)``
    through AOTAutograd with no compiler behind it (``aot_eager``), appending the call targets of
    every forward and backward graph to ``targets`` as they are traced."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    torch._dynamo.reset()
    targets = []

    def keep(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        LAUNCHES.extend(_launch(n) for n in gm.graph.nodes if str(n.target) == LAUNCH)
        GRIDS.extend(_grid(n) for n in gm.graph.nodes if str(n.target) == LAUNCH)
        return make_boxed_func(gm)

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep)

    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic), targets


#: (kernel name, arguments the traced launch copies as written) of every launch traced by _compiled
LAUNCHES = []
#: (kernel name, programs along the grid's first axis, its maxnreg launch option or None) of the same
GRIDS = []


def _launch(node):
    import inspect

    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
    while not inspect.isfunction(kernel):  # an Autotuner (launch options), a JITFunction, a stand-in
        kernel = kernel.fn
    return kernel.__name__, set(node.kwargs["tensors_to_clone"])


def _grid(node):
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    name = _launch(node)[0]
    options = {**kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"]), **node.kwargs["kwargs"]}
    return name, node.kwargs["grid"][0][0], options.get("maxnreg")


def _custom_ops(targets):
    return sorted({t.split(".")[1] for t in targets if t.startswith("interformer.")})


def _run(module, make_inputs, inline: bool, set_inline, dynamic=None):
    """Outputs, input gradients and parameter gradients of ``module`` compiled with inlining
    ``inline``, and the traced graphs' call targets."""
    set_inline(inline)
    module.zero_grad(set_to_none=True)
    inputs = make_inputs()
    compiled, targets = _compiled(module, dynamic)
    out = compiled(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward([o.float().square().sum() for o in outs])
    grads = [t.grad for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads += [p.grad for p in module.parameters()]
    return [o.detach() for o in outs], grads, targets


def _lengths(B, L):
    return torch.tensor([L, 0, max(L - 2, 1)][:B], device=DEVICE)


CASES = {
    # name: (module builder, inputs builder, custom ops the module traces)
    "gated_lce": (lambda: interformer.GatedLCE(5, 3, 24, backend="triton"),
                  lambda dt: [torch.randn(3, 5, 24, device=DEVICE, dtype=dt, requires_grad=True)],
                  ["gated_lce_bwd", "gated_lce_fwd"]),
    "pffn_mlp": (lambda: interformer.PersonalizedFFN(24, 2, mode="mlp", hidden=16, backend="triton"),
                 lambda dt: [torch.randn(3, 7, 24, device=DEVICE, dtype=dt, requires_grad=True),
                             torch.randn(3, 2, 24, device=DEVICE, dtype=dt, requires_grad=True), _lengths(3, 7)],
                 ["pffn_mlp_bwd", "pffn_mlp_fwd"]),
    "pffn_linear": (lambda: interformer.PersonalizedFFN(24, 2, mode="linear", backend="triton"),
                    lambda dt: [torch.randn(3, 7, 24, device=DEVICE, dtype=dt, requires_grad=True),
                                torch.randn(3, 2, 24, device=DEVICE, dtype=dt, requires_grad=True), _lengths(3, 7)],
                    ["pffn_linear_bwd", "pffn_linear_fwd"]),
    "dot_interaction": (lambda: interformer.DotInteraction(5, 24, backend="triton"),
                        lambda dt: [torch.randn(3, 5, 24, device=DEVICE, dtype=dt, requires_grad=True)],
                        ["dot_interaction_bwd", "dot_interaction_fwd"]),
    "add_layer_norm": (lambda: interformer.ResidualLayerNorm(24, backend="triton"),
                       lambda dt: [torch.randn(3, 5, 24, device=DEVICE, dtype=dt, requires_grad=True),
                                   torch.randn(3, 5, 24, device=DEVICE, dtype=dt, requires_grad=True)],
                       ["add_layer_norm_bwd", "add_layer_norm_fwd"]),
    "attention": (lambda: interformer.RotaryMultiHeadAttention(16, 2, backend="triton"),
                  lambda dt: [torch.randn(3, 6, 16, device=DEVICE, dtype=dt, requires_grad=True), _lengths(3, 6)],
                  ["attention_bwd", "attention_fwd"]),
    "pooled_attention": (lambda: interformer.PoolingMultiHeadAttention(2, 16, 2, backend="triton"),
                         lambda dt: [torch.randn(3, 6, 16, device=DEVICE, dtype=dt, requires_grad=True),
                                     _lengths(3, 6)],
                         ["attention_bwd", "attention_fwd"]),
    # H = 40: two hidden chunks (fwd, dx and weight kernels loop over them), the second partial
    "feed_forward": (lambda: interformer.FeedForward(24, 40, 24, backend="triton"),
                     lambda dt: [torch.randn(3, 5, 24, device=DEVICE, dtype=dt, requires_grad=True)],
                     ["feed_forward_bwd", "feed_forward_fwd"]),
}


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_inlined_op_launches_its_kernels_with_bitwise_the_custom_ops_results(case, dtype, settings):
    _check_inlined(case, dtype, settings)


@pytest.mark.parametrize("mode", ["store", "acc"])
def test_inlined_gated_lce_in_both_gate_weight_modes(mode, settings, monkeypatch):
    """The gated LCE's backward in each way of forming the gate weight's gradient: "acc" passes
    placeholders for the tensors only "store" writes (``unused_arg``)."""
    from interformer.kernels import gated_lce

    monkeypatch.setattr(gated_lce, "GW_MODE", mode)
    _check_inlined("gated_lce", torch.float32, settings)


def test_inlined_gated_lce_acc_backward_takes_one_uncapped_program_an_sm(settings, monkeypatch):
    """The "acc" backward's two programs an SM under a 128-register cap (``_acc_plan``; fp16, d = 64,
    8 warps), traced into a graph, become one program an SM, uncapped: Inductor drops the traced
    launch's ``maxnreg``, and uncapped the two would not fit on an SM together. Plain, the same
    call takes the capped pair. The batch has one row block more than two an SM, so that both
    grids are capped by the SM count (the interpreter's 2 "SMs": 4 programs against 2; an H200's
    132: 264 against 132)."""
    from interformer.kernel_audit import record_launches
    from interformer.kernels import gated_lce
    from interformer.kernels._common import num_sms

    monkeypatch.setattr(gated_lce, "GW_MODE", "acc")
    sms, rows_per_block = num_sms(DEVICE), gated_lce._config(5, 3, 64, True)[0]
    module = interformer.GatedLCE(5, 3, 64, backend="triton").to(device=DEVICE, dtype=torch.float16)
    x = torch.randn(rows_per_block * (2 * sms + 1), 5, 64, device=DEVICE, dtype=torch.float16, requires_grad=True)
    with record_launches() as plain:
        module(x).float().square().sum().backward()
    bwd = [(c["programs"], c.get("maxnreg")) for c in plain if c["kernel"] == "_glce_bwd_kernel"]
    assert bwd == [(2 * sms, 128)], plain
    settings(True)
    compiled, targets = _compiled(module)
    LAUNCHES.clear()
    GRIDS.clear()
    compiled(x.detach().requires_grad_()).float().square().sum().backward()
    assert [(g, o) for name, g, o in GRIDS if name == "_glce_bwd_kernel"] == [(sms, None)], GRIDS


@pytest.mark.parametrize("case", sorted(CASES))
def test_dynamic_shapes_keep_the_custom_ops(case, settings):
    """A graph traced with symbolic sizes keeps each op opaque, inlining on or off (the launchers
    pick block sizes from the sizes, which a traced launch needs as constants), and computes what
    the custom ops do."""
    _check_inlined(case, torch.float32, settings, dynamic=True)


@pytest.mark.parametrize("delta", ["probs", "output"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("case", ["attention", "pooled_attention"])
def test_inlined_attention_with_the_general_backward(case, dtype, delta, settings, monkeypatch):
    """Attention's long-sequence backward inlined, forced at a short length by lowering the
    threshold of the single-kernel backward: delta formed by a pass over the keys
    (``BACKWARD_DELTA = "probs"``: in the dq kernel, which stores it for the dk/dv kernel after it,
    or in fp32 by a kernel of its own), or by the preprocess kernel from O (``"output"``)."""
    from interformer.kernels import attention

    monkeypatch.setattr(attention, "_FUSED_BWD_MAX_LQ", 0)
    monkeypatch.setattr(attention, "BACKWARD_DELTA", delta)
    _check_inlined(case, dtype, settings)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("case", ["attention", "pooled_attention"])
def test_inlined_attention_with_the_delta_pass(case, dtype, settings, monkeypatch):
    """The single-query-block backward with its delta pass (``DELTA=2``, keys past one block), forced
    at the cases' few keys (a pass over one block gives the in-loop delta, up to rounding)."""
    from interformer.kernels import attention

    monkeypatch.setattr(attention, "_delta_form", lambda Lk, block_n: attention._DELTA_PASS)
    _check_inlined(case, dtype, settings)


def _check_inlined(case, dtype, settings, dynamic=None):
    build, make_inputs, ops = CASES[case]
    torch.manual_seed(0)
    module = build().to(device=DEVICE, dtype=dtype)
    torch.manual_seed(1)
    fixed = make_inputs(dtype)

    def inputs():  # fresh leaves holding the same values, for each run
        return [t.detach().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in fixed]

    outs_op, grads_op, targets_op = _run(module, inputs, False, settings, dynamic)
    LAUNCHES.clear()
    outs_in, grads_in, targets_in = _run(module, inputs, True, settings, dynamic)
    writes = {kernel: w for (_, kernel), (w, _) in KERNEL_POINTERS.items()}
    for kernel, copied in LAUNCHES:  # what the trace took each launch to write: at most its outputs
        assert copied <= writes[kernel], (kernel, copied - writes[kernel])
    assert _custom_ops(targets_op) == ops and LAUNCH not in targets_op
    if dynamic:
        assert _custom_ops(targets_in) == ops and LAUNCH not in targets_in, targets_in
    else:
        assert _custom_ops(targets_in) == [], targets_in
        assert targets_in.count(LAUNCH) >= 2, targets_in  # the forward's and the backward's kernels
    assert all(g is not None for g in grads_in) and len(grads_in) == len(grads_op)
    for a, b in zip(outs_op + grads_op, outs_in + grads_in):
        assert a.dtype == b.dtype and torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "16-bit autocast"])
def test_whole_model_inlined_keeps_only_the_cross_nets_as_custom_ops(settings, autocast):
    """A fused model compiled with every op kept: inlined, only the cross net's ops (no rule: its
    kernels take tuples of tensors) remain custom ops, and logits, loss and every parameter's
    gradient are bitwise those of the custom ops; variable lengths, one of them 0; in fp32 and
    under autocast (fp16 on the CPU, whose interpreter has no bf16; bf16 on a GPU, as trained)."""
    from test_model import random_batch, tiny_config

    cfg = tiny_config(backend="triton")
    torch.manual_seed(0)
    model = InterFormerCTR(cfg).to(DEVICE)
    *inputs, label = [t.to(DEVICE) for t in random_batch(cfg, [0, 3, 5], 5)]
    results = {}
    for inline in (False, True):
        settings(inline)
        model.zero_grad(set_to_none=True)
        compiled, targets = _compiled(model)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16 if DEVICE.type == "cuda" else torch.float16,
                            enabled=autocast):
            logits = compiled(*inputs)
            loss = InterFormerCTR.loss(logits, label)
        loss.backward()
        results[inline] = ([logits.detach(), loss.detach()] + [p.grad for p in model.parameters()], targets)
    (ref, targets_op), (got, targets_in) = results[False], results[True]
    cross = {op for op in _custom_ops(targets_op) if "cross_net" in op}
    assert cross and set(_custom_ops(targets_op)) > cross
    assert set(_custom_ops(targets_in)) == cross, _custom_ops(targets_in)
    assert LAUNCH in targets_in and LAUNCH not in targets_op
    assert all(g is not None for g in got[2:])
    for a, b in zip(ref, got):
        assert torch.equal(a, b), (a - b).abs().max()


# (module, kernel): (pointer arguments it stores to, pointer arguments it only reads), from the kernels' code
KERNEL_POINTERS = {
    ("attention", "_attn_fwd_kernel"): ({"O", "STATS"}, {"Q", "K", "V", "LENS", "TAB"}),
    ("attention", "_attn_bwd_fused_kernel"): ({"DQ", "DK", "DV"}, {"DO", "Q", "K", "V", "O", "STATS", "LENS", "TAB"}),
    ("attention", "_attn_bwd_preprocess_kernel"): ({"DELTA"}, {"DO", "O"}),
    ("attention", "_attn_bwd_delta_kernel"): ({"DELTA"}, {"DO", "Q", "K", "V", "STATS", "LENS", "TAB"}),
    ("attention", "_attn_bwd_dkdv_kernel"): ({"DK", "DV"}, {"DO", "Q", "K", "V", "STATS", "DELTA", "LENS", "TAB"}),
    ("attention", "_attn_bwd_dq_kernel"): ({"DQ", "DELTA"}, {"DO", "Q", "K", "V", "STATS", "LENS", "TAB"}),
    ("gated_lce", "_glce_fwd_kernel"): ({"OUT"}, {"X", "W", "BIAS", "GW", "GB"}),
    ("gated_lce", "_glce_bwd_kernel"): ({"DX", "PART", "DZ", "YS"}, {"DO", "X", "W", "BIAS", "GW", "GB"}),
    ("pffn", "_pffn_fwd_kernel"): ({"OUT"}, {"S", "LENS", "WX", "A", "LNW", "LNB"}),
    ("pffn", "_pffn_bwd_kernel"): ({"DS", "DWX", "PART"}, {"DO", "S", "LENS", "WX", "A", "LNW", "LNB"}),
    ("dot_interaction", "_dot_fwd_kernel"): ({"OUT"}, {"Z"}),
    ("dot_interaction", "_dot_bwd_kernel"): ({"DZ"}, {"G", "Z"}),
    ("layernorm", "_ln_fwd_kernel"): ({"Y", "MEAN", "RSTD"}, {"X", "R", "W", "Bias"}),
    ("layernorm", "_ln_bwd_kernel"): ({"DH", "PART"}, {"DY", "X", "R", "W", "MEAN", "RSTD"}),
    ("feed_forward", "_ffn_fwd_kernel"): ({"OUT"}, {"X", "W1", "B1", "W2", "B2"}),
    ("feed_forward", "_ffn_bwd_dx_kernel"): ({"DX"}, {"DY", "X", "W1", "B1", "W2"}),
    ("feed_forward", "_ffn_bwd_w_kernel"): ({"PART"}, {"DY", "X", "W1", "B1", "W2"}),
    ("_common", "_sum_partials_kernel"): ({"OUT0", "OUT1", "OUT2", "OUT3"}, {"PART"}),
}


@pytest.mark.parametrize("module, kernel", sorted(KERNEL_POINTERS))
def test_written_params_finds_the_outputs_and_no_input_of_each_inlined_kernel(module, kernel):
    """The interpreter's stand-in for Triton's analysis (which arguments a kernel writes) on every
    kernel an inlined op launches: each output pointer found, no read-only pointer taken for one."""
    import importlib

    from interformer.kernels._dispatch import written_params

    fn = getattr(importlib.import_module(f"interformer.kernels.{module}"), kernel).fn
    writes, reads = KERNEL_POINTERS[(module, kernel)]
    found = written_params(fn)
    assert writes <= found, writes - found
    assert not reads & found, reads & found


def test_inductors_own_write_analysis_takes_no_input_of_an_inlined_kernel_for_written(monkeypatch):
    """What ``torch.compile`` itself takes each inlined kernel to write (torch's analysis of the
    kernel's TTIR, run for sm_90 without a GPU: :func:`interformer.kernel_audit.inductor_writes`),
    for every specialisation the cases above launch, in fp32 and fp16, with the general attention
    backward in both forms of delta, causal attention on both backward paths, and the gated LCE in
    both gate-weight modes: at most the
    kernel's outputs, and some. A traced launch copies every argument taken as written before the
    kernel runs. The analysis follows a stored address back through every argument of a call that
    made part of it, so the general backward's dq and delta kernels, whose addresses came from a
    helper that also loaded Q, DO, STATS, LENS and TAB, had those five copied at each launch (the
    H200's run of the tests above at 7bea4b3, where the graphs launch Triton's analysis; the
    interpreter's stand-in, ``written_params``, follows only the stores)."""
    from interformer.kernel_audit import inductor_writes, record_launches, unique_cases
    from interformer.kernels import attention, gated_lce

    writes = {kernel: w for (_, kernel), (w, _) in KERNEL_POINTERS.items()}
    with record_launches() as cases:
        for dtype in (torch.float32, torch.float16):
            for name, (build, make_inputs, _) in sorted(CASES.items()):
                settings = [("", "", "")]
                if name in ("attention", "pooled_attention"):  # the general backward too, both deltas
                    settings += [("_FUSED_BWD_MAX_LQ", 0, d) for d in ("probs", "output")]
                if name == "gated_lce":
                    settings += [("GW_MODE", m, "") for m in ("store", "acc")]
                for attr, value, delta in settings:
                    with monkeypatch.context() as m:
                        if attr:
                            m.setattr(gated_lce if name == "gated_lce" else attention, attr, value)
                        if delta:
                            m.setattr(attention, "BACKWARD_DELTA", delta)
                        torch.manual_seed(0)
                        out = build().to(device=DEVICE, dtype=dtype)(*make_inputs(dtype))
                        sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
            for general, delta in ((False, "probs"), (True, "probs"), (True, "output")):  # causal attention
                with monkeypatch.context() as m:
                    if general:
                        m.setattr(attention, "_FUSED_BWD_MAX_LQ", 0)
                    m.setattr(attention, "BACKWARD_DELTA", delta)
                    q, k, v = (torch.randn(2, 40, 2, 16, device=DEVICE, dtype=dtype, requires_grad=True)
                               for _ in range(3))
                    lengths = torch.tensor([40, 7], device=DEVICE)
                    attention.attention(q, k, v, lengths, rope_base=1e4, causal=True).float().sum().backward()
    inlined = [c for c in unique_cases(cases) if c["kernel"] in writes]
    assert {c["kernel"] for c in inlined} == set(writes), set(writes) - {c["kernel"] for c in inlined}
    for c in inductor_writes(inlined):
        found = set(c["written"])
        assert not c["analysis_error"], (c["kernel"], c["analysis_error"])
        assert found and found <= writes[c["kernel"]], (c["kernel"], c["consts"], found - writes[c["kernel"]])


@pytest.mark.parametrize("module", sorted({m for m, _ in KERNEL_POINTERS}))
def test_every_launch_of_an_inlined_op_goes_through_launch(module):
    """A launch written ``_kernel[grid](...)`` instead of ``launch(_kernel)[grid](...)`` would run
    the kernel on traced tensors when the op is inlined; the tests above reach most launch sites,
    this one all of them."""
    import importlib
    import inspect
    import re

    source = inspect.getsource(importlib.import_module(f"interformer.kernels.{module}"))
    direct = re.findall(r"^\s*(_\w+_kernel)\[", source, flags=re.M)
    assert direct == [], direct
    assert re.search(r"launch\(_\w+_kernel\)\[", source)


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")  # torch's own
def test_export_keeps_the_custom_op(settings):
    """An exported program keeps the op, also once decomposed to ATen (which traces it under
    FunctionalTensorMode, like torch.compile): a Triton launch in it could not be serialised."""
    settings(True)
    module = interformer.DotInteraction(4, 8, backend="triton").to(DEVICE)
    program = torch.export.export(module, (torch.randn(2, 4, 8, device=DEVICE),))
    for graph in (program.graph, program.run_decompositions().graph):
        targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
        assert "interformer.dot_interaction_fwd.default" in targets and LAUNCH not in targets, targets


def test_an_inlined_trace_leaves_no_traced_table_in_the_rotary_cache(settings):
    """A trace that reaches the attention launcher without a table (the op's ``rope_table=None``)
    builds one in the graph instead of caching a traced tensor, which the next eager call would
    read."""
    from interformer.kernels import attention as A

    settings(True)
    A._ROPE_TABLES.clear()
    q = torch.randn(2, 5, 2, 8, device=DEVICE)
    lengths = torch.tensor([5, 3], device=DEVICE)

    def f(q):
        return torch.ops.interformer.attention_fwd(q, q, q, lengths, False, 10000.0, True, False, None)[0]

    compiled, targets = _compiled(f)
    out = compiled(q)
    assert LAUNCH in targets
    assert all(type(t) is torch.Tensor for t in A._ROPE_TABLES.values())
    torch.testing.assert_close(out, f(q), rtol=0, atol=0)


def test_a_change_of_setting_recompiles_a_compiled_module(settings):
    """Dynamo guards on the setting (read where a module picks its op): the same compiled module,
    called again after a change, is traced again, with launches in its graph."""
    module = interformer.DotInteraction(4, 8, backend="triton").to(DEVICE)
    z = torch.randn(2, 4, 8, device=DEVICE)
    compiled, targets = _compiled(module)
    compiled(z)
    first = list(targets)
    settings(True)
    compiled(z)
    second = targets[len(first):]
    assert "interformer.dot_interaction_fwd.default" in first and LAUNCH not in first
    assert second and LAUNCH in second and _custom_ops(second) == []
    compiled(z)
    assert targets[len(first) + len(second):] == []  # unchanged: the graph is reused


def test_the_setting_keys_the_compile_caches(settings):
    """The graph dynamo builds is the same whatever the setting, and holds the custom ops alone, so
    ``torch.compiler.config.cache_key_tag`` carries the setting and a hash of the kernels' source:
    each setting replaces the package's tag of the one before, and a tag the user set stays."""
    from interformer.backend import _kernels_source_hash

    config = torch.compiler.config
    before = config.cache_key_tag
    try:
        config.cache_key_tag = "mine"
        for setting, word in ((True, "inline"), (True, "inline"), (False, "opaque"), (None, "auto")):
            settings(setting)
            assert config.cache_key_tag.split(";") == ["mine", f"interformer-{word}-{_kernels_source_hash()}"]
    finally:
        config.cache_key_tag = before


def test_the_kernels_source_hash_follows_every_kernel_module(monkeypatch, tmp_path):
    """The tag's hash changes with any kernel module's source (an inlined graph bakes in the kernels
    and the launchers' plans), and not with other files."""
    import importlib.util

    from interformer import backend

    real = importlib.util.find_spec

    def find_spec(name, *args):  # the package's modules in tmp_path
        if name != "interformer.kernels":
            return real(name, *args)
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(tmp_path)]
        return spec

    def digest():
        backend._kernels_source_hash.cache_clear()
        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        try:
            return backend._kernels_source_hash()
        finally:
            monkeypatch.setattr(importlib.util, "find_spec", real)
            backend._kernels_source_hash.cache_clear()

    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    first = digest()
    (tmp_path / "notes.txt").write_text("not a module")
    assert digest() == first
    (tmp_path / "b.py").write_text("y = 3\n")
    assert digest() != first
    (tmp_path / "b.py").write_text("y = 2\n")
    assert digest() == first
    (tmp_path / "c.py").write_text("")
    assert digest() != first


def test_the_default_inlines_the_calls_on_a_gpu(settings):
    """The default setting (None) inlines a traced call whose tensors are on a CUDA device and keeps
    any other call opaque (Inductor launches Triton kernels on a GPU only); True and False hold on
    every device. The rule, then a compiled module under the default on this machine's device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from interformer.kernels._dispatch import _inlines

    with FakeTensorMode():
        on_gpu = torch.empty(2, device="cuda")
    on_cpu = torch.empty(2)
    assert _inlines(None, (on_cpu, [on_gpu]), {}) and _inlines(None, (), {"x": on_gpu})
    assert not _inlines(None, (on_cpu, 3), {"y": [on_cpu]}) and not _inlines(None, (), {})
    assert _inlines(True, (on_cpu,), {}) and not _inlines(False, (on_gpu,), {})
    settings(None)
    assert interformer.compile_inline() is None
    module = interformer.DotInteraction(4, 8, backend="triton").to(DEVICE)
    compiled, targets = _compiled(module)
    compiled(torch.randn(2, 4, 8, device=DEVICE))
    assert (LAUNCH in targets) == (DEVICE.type == "cuda"), targets
    assert ("interformer.dot_interaction_fwd.default" in targets) == (DEVICE.type != "cuda"), targets


def test_setting_env_var_setter_and_errors():
    code = "import interformer as I; print(I.compile_inline())"
    for value, expected in [("1", "True"), ("on", "True"), ("0", "False"), ("", "None"), (" Auto ", "None")]:
        env = dict(os.environ, INTERFORMER_COMPILE_INLINE=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected, (value, out.stdout)
    default = repr(sorted(interformer.backend.DEFAULT_COMPILE_REFERENCE))
    assert bad_compile_setting_run("INTERFORMER_COMPILE_INLINE", "maybe", "compile_inline",
                                   "set_compile_inline(True)", "compile_reference_ops") == (default, "True")
    before = interformer.set_compile_inline(True)
    try:
        assert interformer.set_compile_inline(False) is True and interformer.compile_inline() is False
        with pytest.raises(TypeError, match="bool"):
            interformer.set_compile_inline("yes")
    finally:
        interformer.set_compile_inline(before)


def test_kernels_compile_with_their_float_arguments_typed_fp64():
    """Inductor launches a traced kernel with its Python floats typed fp64, where a plain launch
    types them fp32 (kernels/_dispatch.py, "Float arguments"). Attention's fp64 ``qk_scale`` reached
    its fp32 accumulator in the key loop, and no inlined model compiled on the H200 (c77021c). Every
    kernel that a fused training step and inference forward launch with a float argument, and the
    general attention backward (three kernels in fp32 the tiny model's short sequences do not take), must
    compile for sm_90 with those floats typed fp64. No GPU needed (Triton's own compiler)."""
    from interformer.kernel_audit import record_launches, unique_cases
    from interformer.kernels import attention as A
    from test_model import random_batch, tiny_config
    from utils import aot_build_sm90

    torch.manual_seed(0)
    model = InterFormerCTR(tiny_config(backend="triton")).to(DEVICE)
    *inputs, label = [t.to(DEVICE) for t in random_batch(model.config, [0, 3, 5], 5)]
    q, k, v = (torch.randn(2, 150, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    assert not A._use_fused_bwd(150, 16, torch.float32)
    with record_launches() as cases:
        InterFormerCTR.loss(model(*inputs), label).backward()
        with torch.no_grad():
            model(*inputs)
        A.attention(q, k, v, torch.tensor([150, 7], device=DEVICE), rope_base=10000.0).sum().backward()
    floats = [dict(c, float_type="fp64") for c in unique_cases(cases)
              if any(isinstance(a, float) for a in c["args"].values())]
    for c in floats:
        c.pop("launches"), c.pop("programs")
    names = {c["kernel"] for c in floats}
    assert {"_attn_fwd_kernel", "_attn_bwd_fused_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
            "_attn_bwd_delta_kernel", "_ln_fwd_kernel", "_pffn_fwd_kernel", "_pffn_bwd_kernel"} <= names, names
    built = aot_build_sm90(floats, workers=2)
    assert [b["kernel"] for b in built] == [c["kernel"] for c in floats]
