"""Backend switching: optimize(), config backend, the environment default, state_dict stability,
torch.compile of the eager model, two-stream flag on CPU."""

import os
import subprocess
import sys

import pytest
import torch

import interformer
from interformer import FusedModule, InterFormerConfig, InterFormerCTR, optimize
from interformer.data import make_synthetic

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
