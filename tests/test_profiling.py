"""profiling/train_step.py runs end to end on the smoke shape (interpreter on CPU, Triton on GPU)."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def train_step():
    bench = os.path.join(ROOT, "bench")
    sys.path.insert(0, bench)  # train_step imports bench/common.py as "common"
    spec = importlib.util.spec_from_file_location("profiling_train_step", os.path.join(ROOT, "profiling", "train_step.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    sys.path.remove(bench)
    for name in ("common", "test_bench_model"):  # no bench module left importable by other tests
        sys.modules.pop(name, None)


def test_host_breakdown_groups_the_profile(train_step, capsys):
    assert train_step.main(["--shape", "smoke", "--steps", "1", "--warmup", "0", "--host"]) == 0
    out = capsys.readouterr().out
    assert "plain step:" in out and "by group:" in out
    # the fused path's time is found where it is spent: Triton's launcher (the interpreter on CPU)
    # and the fused ops' own launchers are both named
    assert "Triton launcher" in out and "fused-op launchers" in out


def test_groups_by_file(train_step):
    assert train_step._group(("/x/site-packages/triton/runtime/jit.py", 1, "run")) == "Triton launcher (triton.runtime)"
    assert train_step._group(("/repo/interformer/kernels/pffn.py", 1, "_fwd_impl")) == "fused-op launchers"
    assert train_step._group(("/repo/interformer/model.py", 1, "forward")) == "model code (interformer)"
    assert train_step._group(("~", 0, "<method 'run_backward' of 'torch._C._EngineBase' objects>")).startswith("autograd")
    assert train_step._group(("~", 0, "<built-in method torch.mm>")) == "torch ops and the rest"
