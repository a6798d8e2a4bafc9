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


def _load(name):
    spec = importlib.util.spec_from_file_location(f"profiling_{name}", os.path.join(ROOT, "profiling", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_launch_overhead_measures_every_launcher():
    import torch

    lo = _load("launch_overhead")
    result = lo.measure(calls=2)
    times, notes = result["us_per_call"], result["notes"]
    assert set(times) == {"torch.add (aten op)", "Triton JIT, 3 args", "Triton direct, 3 args",
                          f"Triton JIT, {lo.MANY + 3} args", f"Triton direct, {lo.MANY + 3} args"}
    for name, us in times.items():
        if "direct" in name and not torch.cuda.is_available():
            assert us is None and notes[name] == "needs a GPU"
        elif "direct" not in name or not notes.get(name):
            assert us is not None and us > 0, name
    # the many-argument kernel really reads every argument (none is dead code the compiler drops)
    many = lo._many_kernel()
    x = torch.randn(64, device="cuda" if torch.cuda.is_available() else "cpu")
    y = torch.empty_like(x)
    many[(1,)](x, y, x.numel(), *range(lo.MANY), BLOCK=64)
    torch.testing.assert_close(y, x + sum(range(lo.MANY)))
