"""Backend switching: optimize(), config backend, the environment default, state_dict stability,
torch.compile of the eager model, two-stream flag on CPU."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import interformer
from interformer import FusedModule, InterFormerConfig, InterFormerCTR, optimize
from interformer.data import make_synthetic

from utils import DEVICE, bad_compile_setting_run

TINY = dict(d_model=16, num_heads=2, num_layers=2, max_seq_len=6, pffn_hidden=16, head=(16,), dcn_rank=4)


def fused_modules(model):
    return [m for m in model.modules() if isinstance(m, FusedModule)]


def test_optimize_switches_every_fused_module_and_keeps_weights():
    model = InterFormerCTR(InterFormerConfig(backend="eager", **TINY))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mods = fused_modules(model)
    # every op family of DESIGN §4 is present in the default model
    names = {type(m).__name__ for m in mods}
    assert {"GatedLCE", "PersonalizedFFN", "LowRankCrossNet", "DotInteraction",
            "RotaryMultiHeadAttention", "PoolingMultiHeadAttention"} <= names
    assert optimize(model, "triton") is model
    assert all(m.backend == "triton" for m in mods)
    assert model.config.backend == "triton"
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_optimize_reaches_modules_inside_a_user_model():
    class UserModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Sequential(torch.nn.Linear(8, 8))
            self.lce = interformer.GatedLCE(3, 2, 8, backend="eager")
            self.dcn = interformer.LowRankCrossNet(8, 2, 2, backend="eager")

    m = optimize(UserModel(), "triton")
    assert m.lce.backend == "triton" and m.dcn.backend == "triton"


def test_config_backend_applies_at_construction():
    model = InterFormerCTR(InterFormerConfig(backend="triton", **TINY))
    assert all(m.backend == "triton" for m in fused_modules(model))


def test_bad_backend_names_raise():
    with pytest.raises(ValueError, match="backend"):
        InterFormerConfig(backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        optimize(InterFormerCTR(InterFormerConfig(**TINY)), "fast")
    with pytest.raises(ValueError, match="backend"):
        interformer.GatedLCE(2, 2, 4, backend="trition")


def test_backend_names_are_case_insensitive_and_none_is_the_default(monkeypatch):
    """As in ``$INTERFORMER_BACKEND``: an argument or config value in any case, stored lower-case;
    None (module or config) means the environment's default."""
    assert interformer.GatedLCE(2, 2, 4, backend=" Triton").backend == "triton"
    assert InterFormerConfig(backend="EAGER", **TINY).backend == "eager"
    assert optimize(interformer.GatedLCE(2, 2, 4, backend="eager"), "Auto").backend == "auto"
    monkeypatch.setenv("INTERFORMER_BACKEND", "eager")
    assert interformer.GatedLCE(2, 2, 4, backend=None).backend == "eager"
    assert InterFormerConfig(backend=None, **TINY).backend == "eager"


def test_optimize_leaves_a_shared_config_alone():
    """Two models from one config object: switching one changes neither the other nor the config the
    user holds, and a model built later from that config gets the backend it names."""
    cfg = InterFormerConfig(backend="eager", **TINY)
    a, b = InterFormerCTR(cfg), InterFormerCTR(cfg)
    optimize(a, "triton")
    assert a.config.backend == "triton" and cfg.backend == "eager" and b.config.backend == "eager"
    assert all(m.backend == "eager" for m in fused_modules(b))
    assert all(m.backend == "eager" for m in fused_modules(InterFormerCTR(cfg)))
    assert all(m.backend == "triton" for m in fused_modules(InterFormerCTR(a.config)))
    # the model and its backbone shared one config object, and share its one copy: a setting the
    # user changes on model.config (validate_inputs) still reaches the backbone's forward
    assert a.config is a.backbone.config
    # optimize of the backbone alone: model.config is the backbone's, so it names the new backend
    # too (it was a reference taken at construction, left naming the old one: a review's find)
    optimize(b.backbone, "triton")
    assert b.config is b.backbone.config and b.config.backend == "triton" and cfg.backend == "eager"
    assert all(m.backend == "triton" for m in fused_modules(InterFormerCTR(b.config)))


def test_a_model_that_ran_on_two_streams_still_copies_and_saves():
    """The side CUDA stream a block makes on its first streamed forward is not state: deepcopy,
    pickle and ``torch.save`` of the model drop it (a stream cannot be pickled), the copy makes its
    own, and the original keeps its. A CPU stream stands in for the CUDA one a GPU forward stores."""
    import copy
    import io
    import pickle

    model = InterFormerCTR(InterFormerConfig(backend="eager", **TINY)).backbone.use_streams(True)
    stream = torch.Stream(device="cpu")
    for block in model.blocks:
        block._side_stream = stream
    with pytest.raises(TypeError):
        pickle.dumps(stream)  # what the model's pickling met before
    twin = copy.deepcopy(model)
    loaded = pickle.loads(pickle.dumps(model))
    torch.save(model, io.BytesIO())
    for copied in (twin, loaded):
        assert all(b._side_stream is None and b.use_streams for b in copied.blocks)
        assert copied.state_dict().keys() == model.state_dict().keys()
    assert all(b._side_stream is stream for b in model.blocks)


def test_auto_leaves_float64_modules_on_eager():
    """``auto`` takes Triton only for parameters in a kernel dtype; a float64 model runs as in eager
    (the kernels take fp32/fp16/bf16 only). Checked through ``resolve`` with a CUDA device, which
    needs no GPU."""
    from interformer import reference
    from interformer.backend import resolve

    cuda = torch.device("cuda")
    assert resolve("gated_lce", "gated_lce", "auto", cuda, torch.float64) is reference.gated_lce
    assert resolve("gated_lce", "gated_lce", "auto", cuda, torch.float32) is not reference.gated_lce
    lce = interformer.GatedLCE(3, 2, 8, backend="auto").double()
    assert lce._placement() == (torch.device("cpu"), torch.float64)


def test_triton_backend_names_the_way_out_for_other_dtypes():
    """A float64 module on an explicit ``triton`` backend: one ValueError naming the module and
    ``backend='auto'`` (each op's own dtype error named neither: an API audit helper's note); the
    tokenizers, whose grouped lookups are aten ops, run in any dtype; ``auto`` runs the reference."""
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    for module in (interformer.GatedLCE(3, 2, 8, backend="triton"), interformer.ResidualLayerNorm(8, backend="triton")):
        with pytest.raises(ValueError, match=rf"{type(module).__name__}: backend='triton' .* backend='auto'"):
            module.double()(x)
        module.backend = "auto"
        assert module(x).dtype == torch.float64
    tok = interformer.SparseTokenizer([5, 6], 8, backend="triton").double()
    assert tok(torch.tensor([[1, 2], [3, 0]])).dtype == torch.float64
    # where the ops run their reference anyway (a torch.func transform, forward-mode AD), no error
    import torch.autograd.forward_ad as fwad

    pma = interformer.PoolingMultiHeadAttention(2, 8, 2, backend="triton").double()
    lengths = torch.tensor([3, 1])
    s = torch.randn(2, 3, 8, dtype=torch.float64)
    assert torch.func.grad(lambda t: pma(t, lengths).sum())(s).dtype == torch.float64
    with fwad.dual_level():
        out = pma(fwad.make_dual(s, torch.ones_like(s)), lengths)
        assert fwad.unpack_dual(out).tangent is not None


def test_environment_variable_sets_the_default():
    code = ("import interformer as I; m = I.GatedLCE(2, 2, 4); c = I.InterFormerConfig(); "
            "print(m.backend, c.backend)")
    env = dict(os.environ, INTERFORMER_BACKEND="eager")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["eager", "eager"]
    env["INTERFORMER_BACKEND"] = "nonsense"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "INTERFORMER_BACKEND" in bad.stderr


def test_auto_on_cpu_parameters_is_the_eager_reference():
    from interformer import reference
    lce = interformer.GatedLCE(3, 2, 8, backend="auto")
    assert lce._op("gated_lce", "gated_lce") is reference.gated_lce


def test_eager_model_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) traces the whole eager model (validation's host reads are
    skipped while compiling). aot_eager checks tracing and autograd without a C++ toolchain."""
    cfg = InterFormerConfig(backend="eager", **TINY)
    model = InterFormerCTR(cfg)
    batch = make_synthetic(4, cfg, seed=3)
    ref = model(*batch.inputs())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(*batch.inputs())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    compiled.loss(out, batch.label).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_streams_flag_is_harmless_on_cpu():
    cfg = InterFormerConfig(backend="eager", **TINY)
    model = InterFormerCTR(cfg)
    batch = make_synthetic(3, cfg, seed=4)
    ref = model(*batch.inputs())
    model.backbone.use_streams(True)
    torch.testing.assert_close(model(*batch.inputs()), ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------- compile policy
def _kernel_op_names():
    """The op names the package's fused-capable modules resolve, from their ``kernel_ops``."""
    import interformer.layers as layers
    import interformer.tokenizers as tokenizers

    classes = [c for mod in (layers, tokenizers) for c in vars(mod).values()
               if isinstance(c, type) and issubclass(c, FusedModule)]
    return {op for c in classes for _, op in c.kernel_ops}


def test_fused_ops_names_every_modules_op_and_each_has_a_reference():
    from interformer import reference
    from interformer.backend import FUSED_OPS

    assert set(FUSED_OPS) == _kernel_op_names()
    assert all(callable(getattr(reference, op, None)) for op in FUSED_OPS)


@pytest.fixture
def compile_reference():
    """``set_compile_reference_ops``, starting from the default whatever the environment says, with
    the process's setting restored after the test."""
    before = interformer.set_compile_reference_ops(None)
    yield interformer.set_compile_reference_ops
    interformer.set_compile_reference_ops(before)


def test_compile_reference_setting_parses_and_rejects(compile_reference):
    from interformer.backend import DEFAULT_COMPILE_REFERENCE, FUSED_OPS

    assert interformer.compile_reference_ops() == DEFAULT_COMPILE_REFERENCE == {
        "add_layer_norm", "cross_net", "feed_forward", "grouped_embedding", "low_rank_cross_net"}
    assert compile_reference("none") == DEFAULT_COMPILE_REFERENCE  # returns the previous setting
    assert interformer.compile_reference_ops() == frozenset()
    compile_reference("ALL")
    assert interformer.compile_reference_ops() == frozenset(FUSED_OPS)
    compile_reference(" Gated_LCE, dot_interaction ,")
    assert interformer.compile_reference_ops() == {"gated_lce", "dot_interaction"}
    compile_reference(["Attention", "pooled_attention"])
    assert interformer.compile_reference_ops() == {"attention", "pooled_attention"}
    compile_reference(None)
    assert interformer.compile_reference_ops() == DEFAULT_COMPILE_REFERENCE
    for bad in ("attention,layer_norm", ["attention", "layer_norm"]):
        with pytest.raises(ValueError, match=r"unknown op\(s\) \['layer_norm'\]"):
            compile_reference(bad)
        assert interformer.compile_reference_ops() == DEFAULT_COMPILE_REFERENCE  # unchanged by the error


def test_compile_reference_environment_variable():
    """The variable sets the starting value; a bad one leaves the package importable and fails the
    first module construction (naming the variable and the op), until an explicit setting; the
    inline setting's query is unaffected."""
    code = "import interformer as I; print(sorted(I.compile_reference_ops()))"
    env = dict(os.environ, INTERFORMER_COMPILE_REFERENCE="pffn_mlp,PFFN_linear")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['pffn_linear', 'pffn_mlp']"
    # the other setting's query does not raise it: an op called directly in a compiled function
    # reads only the inline setting, and must compile
    assert bad_compile_setting_run("INTERFORMER_COMPILE_REFERENCE", "pffn", "compile_reference_ops",
                                   "set_compile_reference_ops('none')", "compile_inline") == ("None", "[]")


def _traced_custom_ops(model):
    """``(compiled model, graphs)``: ``model`` under ``torch.compile(fullgraph=True)`` with a backend
    that appends, for each graph dynamo builds, the interformer custom ops in it, and runs the graph
    as traced (no Inductor). Dynamo's caches are reset first."""
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(sorted({str(n.target).split(".")[1] for n in gm.graph.nodes
                              if str(n.target).startswith("interformer.")}))
        return gm.forward

    compiled = torch.compile(model, backend=record, fullgraph=True)
    return compiled, graphs


def test_compile_reference_ops_leave_the_graph_and_a_change_recompiles(compile_reference):
    """While torch.compile traces, the ops named take the reference (no custom op in the graph)
    and the others stay custom ops; outside tracing the modules stay fused; changing the setting
    recompiles on the next call (dynamo guards on it), and every variant computes the same."""
    d = 8

    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lce = interformer.GatedLCE(4, 3, d, backend="triton")
            self.dot = interformer.DotInteraction(3, d, backend="triton")
            self.norm = interformer.ResidualLayerNorm(d, backend="triton")

        def forward(self, x):
            y = self.lce(x)
            return self.norm(y, y), self.dot(y)  # whole tensors: a LayerNorm's row sums are about 0

    model = Small().to(DEVICE)
    x = torch.randn(2, 4, d, device=DEVICE)
    ref = model(x)
    # fp32 kernels against the reference math in the graph, element-wise (DESIGN's 1e-5 is norm-wise:
    # a small element's relative error can be larger); this checks which ops run, their accuracy is
    # the kernel tests'
    close = dict(rtol=1e-4, atol=1e-5)
    compiled, graphs = _traced_custom_ops(model)
    torch.testing.assert_close(compiled(x), ref, **close)  # the default: add_layer_norm left to the compiler
    assert graphs == [["dot_interaction_fwd", "gated_lce_fwd"]]
    compile_reference("gated_lce")
    torch.testing.assert_close(compiled(x), ref, **close)
    assert graphs[1:] == [["add_layer_norm_fwd", "dot_interaction_fwd"]]
    compile_reference("all")
    torch.testing.assert_close(compiled(x), ref, **close)
    assert graphs[2:] == [[]]
    compiled(x)
    assert len(graphs) == 3  # an unchanged setting reuses the graph
    assert model.lce._op("gated_lce", "gated_lce") is not interformer.reference.gated_lce  # eager call: fused


def test_all_ops_as_reference_leaves_no_custom_op_in_the_fused_model(compile_reference):
    """With every op named, the compiled fused model traces no custom op at all: every module
    resolves its ops through the setting (none calls a kernel around it)."""
    cfg = InterFormerConfig(backend="triton", **TINY)
    model = InterFormerCTR(cfg).to(DEVICE)
    inputs = [t.to(DEVICE) for t in make_synthetic(3, cfg, seed=5).inputs()]
    compile_reference("all")
    compiled, graphs = _traced_custom_ops(model)
    with torch.no_grad():
        out, fused = compiled(*inputs), model(*inputs)
    torch.testing.assert_close(out, fused, rtol=1e-4, atol=1e-5)  # reference math against the kernels, fp32,
    # element-wise (see test_compile_reference_ops_leave_the_graph_and_a_change_recompiles)
    assert graphs == [[]]


def test_the_default_leaves_the_cross_nets_layernorm_and_ffn_of_a_whole_model_to_the_compiler(compile_reference):
    """In a whole fused model compiled under the default set, the cross net, the residual
    LayerNorms and the feed-forward blocks are the compiler's (no custom op of theirs in the graph)
    and every other fused op is a custom op; under ``"none"`` the graph gains exactly those ops."""
    from test_model import random_batch, tiny_config

    cfg = tiny_config(backend="triton")
    model = InterFormerCTR(cfg).to(DEVICE)
    cross_op = "low_rank_cross_net_fwd" if any(isinstance(m, interformer.LowRankCrossNet) for m in model.modules()) \
        else "cross_net_fwd"
    assert any(isinstance(m, (interformer.LowRankCrossNet, interformer.CrossNet)) for m in model.modules())
    batch = [t.to(DEVICE) for t in random_batch(cfg, [0, 3, 5], 5)][:4]
    compiled, graphs = _traced_custom_ops(model)
    compiled(*batch)
    compile_reference("none")
    compiled(*batch)
    assert len(graphs) == 2, graphs
    default, none = set(graphs[0]), set(graphs[1])
    assert none - default == {cross_op, "add_layer_norm_fwd", "feed_forward_fwd"}, (default, none)
    assert default and default < none


# ----------------------------------------------------------------------------- wrappers, pickling, errors
def test_a_dataparallel_replica_reports_the_placement_of_its_parameter_copies(monkeypatch):
    """``nn.DataParallel`` runs replicas that register no parameters (``replicate`` stores each copy as
    a plain attribute, listed in ``_former_parameters``): ``auto`` must still see their device and
    dtype, or every GPU replica runs the eager reference. torch's own ``replicate`` runs here with its
    CUDA broadcast replaced by a copy; the copies are float64, so a replica that misses them shows."""
    import sys

    replicate = sys.modules["torch.nn.parallel.replicate"]
    monkeypatch.setattr(replicate, "_broadcast_coalesced_reshape", lambda tensors, devices, detach=False: [
        [t.detach().clone() if detach else t.clone() for t in tensors] for _ in devices])
    modules = [interformer.GatedLCE(4, 3, 8, backend="auto"), interformer.ResidualLayerNorm(8, backend="auto"),
               interformer.PersonalizedFFN(8, 2, hidden=8, backend="auto"),
               interformer.SparseTokenizer([5, 6], 8, backend="auto")]
    for module in modules:
        (replica,) = replicate.replicate(module.double(), [0])
        assert not list(replica.parameters())  # what DataParallel hands the module: no registered parameter
        assert replica._placement() == (torch.device("cpu"), torch.float64), type(module).__name__


def test_a_fused_model_loaded_in_a_fresh_process_compiles_with_fullgraph(tmp_path):
    """``torch.load`` of a whole fused model restores its backend without the setter; its kernels are
    resolved on load all the same, so the first compiled call does not import a kernel file while
    dynamo traces (a graph break, an error under ``fullgraph=True``)."""
    path = tmp_path / "lce.pt"
    torch.save(interformer.GatedLCE(4, 3, 8, backend="triton"), path)
    code = (
        "import torch, interformer as I\n"
        "I.set_compile_reference_ops('none')\n"
        "dev = 'cuda' if torch.cuda.is_available() else 'cpu'\n"
        f"m = torch.load({str(path)!r}, weights_only=False).to(dev)\n"
        "ops = []\n"
        "def record(gm, example_inputs):\n"
        "    ops.extend(str(n.target) for n in gm.graph.nodes if str(n.target).startswith('interformer.'))\n"
        "    return gm.forward\n"
        "x = torch.randn(2, 4, 8, device=dev)\n"
        "out = torch.compile(m, backend=record, fullgraph=True)(x)\n"
        "assert torch.equal(out, m(x))\n"
        "print(ops)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["['interformer.gated_lce_fwd']"]


def test_a_backend_that_is_not_a_string_is_named_by_its_type():
    """A model passed where the backend goes (``optimize("triton", model)``) raises a short error that
    names the type, not one that prints the whole module tree."""
    model = InterFormerCTR(InterFormerConfig(backend="eager", **TINY))
    for call in (lambda: optimize("triton", model), lambda: optimize(model, model)):
        with pytest.raises(ValueError, match=r"backend must be a string.*interformer\.model\.InterFormerCTR") as err:
            call()
        assert len(str(err.value)) < 200
    with pytest.raises(ValueError, match="backend must be a string.*int"):
        interformer.GatedLCE(2, 2, 4, backend=3)
    with pytest.raises(ValueError, match="backend must be a string"):
        InterFormerConfig(backend=["triton"], **TINY)


def test_optimize_with_a_bad_compile_setting_changes_nothing(monkeypatch):
    """A bad ``$INTERFORMER_COMPILE_REFERENCE`` (simulated: the error it leaves) makes every module's
    switch raise: ``optimize`` raises it before touching anything, where it used to replace the
    model's config first (config "triton", every module still "eager")."""
    import interformer.backend as B

    model = InterFormerCTR(InterFormerConfig(backend="eager", **TINY))
    monkeypatch.setattr(B, "_COMPILE_ENV_ERROR", "INTERFORMER_COMPILE_REFERENCE: bad (simulated)")
    with pytest.raises(ValueError, match="simulated"):
        optimize(model, "triton")
    assert model.config.backend == "eager" and model.backbone.config.backend == "eager"
    assert all(m.backend == "eager" for m in fused_modules(model))


def test_optimize_warns_when_there_is_nothing_to_switch():
    """A model without fused-capable modules, e.g. one ``torch.fx.symbolic_trace`` made of a fused
    module (the graph holds the ops, not the module), is returned unchanged with a warning."""
    from interformer import GatedLCE

    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.warns(UserWarning, match="holds no fused-capable module"):
        assert optimize(plain, "triton") is plain
    traced = torch.fx.symbolic_trace(GatedLCE(3, 2, 4, backend="eager"))
    with pytest.warns(UserWarning, match="GatedLCE holds no fused-capable module"):
        optimize(traced, "triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimize(GatedLCE(3, 2, 4), "eager")  # one to switch: no warning


# ---------------------------------------------------------------------------- children read, not called
# GatedLCE reads its gate's weights, PersonalizedFFN its norm's, PMA its three projections' (into the
# fused op, or into the reference). Where calling such a child would compute something else (a hook on
# it, pruning, a subclass, no bias), the module calls it instead, on either backend.

def _gated_lce():
    from interformer.layers import GatedLCE

    def expected(m, x):  # DESIGN's gated LCE, with the gate called as the module it is
        y = torch.einsum("bnd,nm->bmd", x, m.weight) + m.bias[None, :, None]
        return y * torch.sigmoid(m.gate(y))
    return GatedLCE(5, 3, 8), lambda m: m.gate, "gate", (torch.randn(2, 5, 8, device=DEVICE),), expected


def _pffn(mode):
    from interformer.layers import PersonalizedFFN

    def expected(m, s, x_sum, lengths):
        w_b = m.personal_weight(x_sum)
        out = s + torch.bmm(m.norm(s), w_b)
        return out * (torch.arange(s.shape[1], device=DEVICE)[None, :, None] < lengths[:, None, None])
    inputs = (torch.randn(2, 6, 8, device=DEVICE), torch.randn(2, 3, 8, device=DEVICE),
              torch.tensor([0, 4], device=DEVICE))
    return PersonalizedFFN(8, 3, mode=mode, hidden=16), lambda m: m.norm, "norm", inputs, expected


def _pma(proj):
    from interformer.layers import PoolingMultiHeadAttention

    def expected(m, s, lengths):  # softmax attention of the learned queries over the valid rows
        B, L, d = s.shape
        H, dh = m.num_heads, d // m.num_heads
        k, v = m.k_proj(s).view(B, L, H, dh), m.v_proj(s).view(B, L, H, dh)
        scores = torch.einsum("qhe,blhe->bhql", m.query.view(-1, H, dh), k) / dh ** 0.5
        valid = torch.arange(L, device=DEVICE)[None, None, None, :] < lengths[:, None, None, None]
        p = torch.softmax(scores.masked_fill(~valid, float("-inf")), -1).nan_to_num(0.0)
        o = torch.einsum("bhql,blhe->bqhe", p, v).reshape(B, -1, d)
        return m.o_proj(o) * (lengths > 0)[:, None, None]
    inputs = (torch.randn(2, 6, 8, device=DEVICE), torch.tensor([0, 4], device=DEVICE))
    return PoolingMultiHeadAttention(2, 8, 2), lambda m: getattr(m, proj), proj, inputs, expected


def _prune(child):
    from torch.nn.utils import prune

    prune.l1_unstructured(child, "weight", amount=0.5)


def _hook(child):
    child.register_forward_hook(lambda mod, args, out: out * 2.0)


def _subclass(parent, name):
    child = getattr(parent, name)

    class Shifted(type(child)):
        def forward(self, x):
            return super().forward(x) + 1.0

    swapped = Shifted(*([child.in_features, child.out_features] if isinstance(child, torch.nn.Linear)
                        else [child.normalized_shape])).to(DEVICE)
    swapped.load_state_dict(child.state_dict())
    setattr(parent, name, swapped)


def _no_bias(parent, name):
    child = getattr(parent, name)
    if isinstance(child, torch.nn.Linear):
        setattr(parent, name, torch.nn.Linear(child.in_features, child.out_features, bias=False).to(DEVICE))
    else:
        setattr(parent, name, torch.nn.LayerNorm(child.normalized_shape, bias=False).to(DEVICE))


@pytest.mark.parametrize("make", [_gated_lce, lambda: _pffn("mlp"), lambda: _pffn("linear"), lambda: _pma("k_proj"),
                                  lambda: _pma("v_proj"), lambda: _pma("o_proj")],
                         ids=["gated-lce", "pffn-mlp", "pffn-linear", "pma-k", "pma-v", "pma-o"])
@pytest.mark.parametrize("change", ["prune", "hook", "subclass", "no-bias"])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_a_child_that_is_not_plain_is_called(make, change, backend):
    """Pruned (the weight used is the masked one, also after the unpruned weight is updated), hooked,
    subclassed or bias-free: the module's output is what calling its child gives, on either backend
    (no fused launch); a plain child is read, and the triton backend launches the op."""
    from interformer.profiling import triton_launches

    torch.manual_seed(3)
    module, child_of, name, inputs, expected = make()
    module = module.to(DEVICE)
    module.backend = backend
    with triton_launches() as launched:
        module(*inputs)
    assert bool(launched) == (backend == "triton"), dict(launched)
    if change == "prune":
        _prune(child_of(module))
    elif change == "hook":
        _hook(child_of(module))
    elif change == "subclass":
        _subclass(module, name)
    else:
        _no_bias(module, name)
    with triton_launches() as launched:
        out = module(*inputs)
    assert not launched, dict(launched)
    torch.testing.assert_close(out, expected(module, *inputs), rtol=1e-5, atol=1e-6)
    if change == "prune":  # the masked weight follows the unpruned one (the pre-hook runs each call)
        with torch.no_grad():
            child_of(module).weight_orig.mul_(-1.5)
        torch.testing.assert_close(module(*inputs), expected(module, *inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["gated-lce", "pma", "feed-forward"])
def test_a_global_module_hook_sees_the_children_called(kind):
    """A global module hook runs around every module call: the children a fused op would read are
    called instead (no fused launch), so that it sees them."""
    from interformer.layers import FeedForward, GatedLCE, PoolingMultiHeadAttention
    from interformer.profiling import triton_launches

    module, args, children = {
        "gated-lce": (GatedLCE(5, 3, 8), (torch.randn(2, 5, 8, device=DEVICE),), {"Linear"}),
        "pma": (PoolingMultiHeadAttention(2, 8, 2),
                (torch.randn(2, 6, 8, device=DEVICE), torch.tensor([0, 4], device=DEVICE)), {"Linear"}),
        "feed-forward": (FeedForward(8, 16, 8), (torch.randn(2, 8, device=DEVICE),), {"Linear", "SiLU"}),
    }[kind]
    module = module.to(DEVICE)
    module.backend = "triton"
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: calls.append(type(m).__name__))
    try:
        with triton_launches() as launched:
            module(*args)
    finally:
        handle.remove()
    assert not launched and children <= set(calls) and calls[-1] == type(module).__name__, (dict(launched), calls)
