"""profiling/train_step.py runs end to end on the smoke shape (interpreter on CPU, Triton on GPU)."""

import importlib.util
import os
import re
import sys
from collections import Counter

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"profiling_{name}", os.path.join(ROOT, "profiling", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _with_bench(script: str):
    """Load ``profiling/<script>.py`` with ``bench/`` importable (the scripts import bench/common.py
    and the benchmark modules), then leave no bench module importable by other tests: every path
    entry that is bench/ (the scripts add their own, spelled ``profiling/../bench``) goes, and so do
    the modules imported from it."""
    bench = os.path.realpath(os.path.join(ROOT, "bench"))
    sys.path.insert(0, bench)
    yield _load(script)
    sys.path[:] = [p for p in sys.path if not p or os.path.realpath(p) != bench]
    for name in [n for n in sys.modules if n == "common" or n.startswith("test_bench_")]:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def train_step():
    yield from _with_bench("train_step")


def test_host_breakdown_groups_the_profile(train_step, capsys):
    assert train_step.main(["--shape", "smoke", "--steps", "1", "--warmup", "0", "--host"]) == 0
    out = capsys.readouterr().out
    assert "plain step:" in out and "by group:" in out and "backward on the calling thread" in out
    # the fused path's time is found where it is spent: Triton's launcher (on a CPU the interpreter,
    # named as such: it runs the kernels) and the fused ops' own launchers are both named
    assert "fused-op launchers" in out
    if train_step.torch.cuda.is_available():
        assert "Triton launcher" in out
    else:
        assert "Triton interpreter" in out and "Triton launcher" not in out
        assert out.startswith("note: CPU smoke run under the Triton interpreter: timings are not meaningful\n")


@pytest.mark.parametrize("script, argv", [
    ("launch_overhead", ["--calls", "0"]),
    ("op_host", ["--shape", "smoke", "--calls", "0", "--ops", "dot_interaction"]),
    ("embedding_backward", ["--shape", "smoke", "--calls", "0"]),
    ("autograd_threads", ["--shape", "smoke", "--steps", "0", "--ops", "1"]),
    ("autograd_threads", ["--shape", "smoke", "--steps", "1", "--ops", "0"]),
    ("train_step", ["--shape", "smoke", "--backend", "eager", "--steps", "0", "--warmup", "0"]),
    ("train_step", ["--shape", "smoke", "--backend", "eager", "--steps", "1", "--warmup", "-1"]),
])
def test_a_count_of_zero_is_refused(script, argv, request, capsys):
    """A count that something is divided by (calls, steps, ops per backward) must be at least 1: 0
    ended the scripts with a ZeroDivisionError after the work; a negative warm-up is refused too
    (0 warm-up steps is fine). As op_kernels.py does, argparse's usage error (status 2)."""
    mod = _load(script) if script == "launch_overhead" else request.getfixturevalue(script)
    with pytest.raises(SystemExit) as exc:
        mod.main(argv)
    flag = argv[argv.index("0" if "0" in argv else "-1") - 1]
    assert exc.value.code == 2 and f"{flag} must be at least" in capsys.readouterr().err


def test_train_step_refuses_big_shapes_without_a_gpu(train_step, capsys, monkeypatch):
    """Without a GPU a shape other than smoke runs for hours under the interpreter, silently: it is
    refused, naming --allow-cpu, which lets it through."""
    if train_step.torch.cuda.is_available():
        pytest.skip("the refusal is for machines without a GPU")

    class Built(Exception):
        pass

    def build(shape, *args, **kwargs):  # stops before the model is built: no hours-long run either way
        raise Built(shape)

    monkeypatch.setattr(train_step, "build", build)
    with pytest.raises(SystemExit) as exc:
        train_step.main(["--shape", "taobao"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--shape taobao" in err and "interpreter" in err and "--allow-cpu" in err
    with pytest.raises(Built, match="taobao"):
        train_step.main(["--shape", "taobao", "--allow-cpu"])


def test_groups_by_file(train_step):
    assert train_step._group(("/x/site-packages/triton/runtime/jit.py", 1, "run")) == "Triton launcher (triton.runtime)"
    assert train_step._group(("/repo/interformer/kernels/pffn.py", 1, "_fwd_impl")) == "fused-op launchers"
    assert train_step._group(("/repo/interformer/model.py", 1, "forward")) == "model code (interformer)"
    assert train_step._group(("~", 0, "<method 'run_backward' of 'torch._C._EngineBase' objects>")).startswith("autograd")
    assert train_step._group(("~", 0, "<built-in method torch.mm>")) == "torch ops and the rest"


def test_launch_overhead_example_stays_under_the_launch_queue():
    """The docstring's example ``--calls`` stays below the ~1,000 launches the driver queues, the
    reason it gives for the default of 500 (the example said 2000)."""
    doc = _load("launch_overhead").__doc__
    examples = [int(n) for n in re.findall(r"--calls (\d+)", doc)]
    assert examples and all(1 <= n < 1000 for n in examples), examples
    assert "default 500 calls stay below the roughly 1,000 launches" in " ".join(doc.split())


def test_launch_overhead_measures_every_launcher():
    import torch

    lo = _load("launch_overhead")
    result = lo.measure(calls=2)
    times, notes = result["us_per_call"], result["notes"]
    assert set(times) == {"torch.add (aten op)", "Triton JIT, 3 args", "Triton direct, 3 args",
                          f"Triton JIT, {lo.MANY + 3} args", f"Triton direct, {lo.MANY + 3} args",
                          "fwd+bwd, aten op", "fwd+bwd, Function of aten ops", "fwd+bwd, Function of Triton JIT",
                          "fwd+bwd, Function of aten ops, one thread", "fwd+bwd, Function of Triton JIT, one thread"}
    for name, us in times.items():
        if "direct" in name and not torch.cuda.is_available():
            assert us is None and notes[name] == "needs a GPU"
        elif "direct" not in name or not notes.get(name):
            assert us is not None and us > 0, name
    # the fwd+bwd rows compute what they claim: each Function's gradient is its op's
    x = torch.randn(64, device="cuda" if torch.cuda.is_available() else "cpu", requires_grad=True)
    g = torch.randn_like(x)
    lo._fwd_bwd(lo._AtenFn.apply, x, g)()
    torch.testing.assert_close(x.grad, 2 * g)
    lo._fwd_bwd(lo._TritonFn.apply, x, g)()
    torch.testing.assert_close(x.grad, g)
    # the many-argument kernel really reads every argument (none is dead code the compiler drops)
    many = lo._many_kernel()
    x = torch.randn(64, device="cuda" if torch.cuda.is_available() else "cpu")
    y = torch.empty_like(x)
    many[(1,)](x, y, x.numel(), *range(lo.MANY), BLOCK=64)
    torch.testing.assert_close(y, x + sum(range(lo.MANY)))


@pytest.fixture(scope="module")
def op_host():
    yield from _with_bench("op_host")


def test_op_host_times_the_benchmarked_callables(op_host, capsys):
    """Every op's fused and eager callables are found; the skipped-launch variant counts the
    launches it skipped, the plain one those it ran, eager none."""
    assert op_host.main(["--shape", "smoke", "--calls", "1", "--ops", "layernorm_dhen,dot_interaction"]) == 0
    out = capsys.readouterr().out
    for op in ("layernorm_dhen", "dot_interaction"):
        for variant in ("fused", "fused, one thread", "fused, launches skipped", "eager"):
            assert f"{op:<16} {variant:<24}" in out
    rows = op_host.measure("dot_interaction", "smoke", calls=1)
    assert rows["fused"]["launches"] == rows["fused, one thread"]["launches"] == 2  # forward, backward
    assert rows["fused, launches skipped"]["launches"] == 2
    assert rows["eager"]["launches"] == 0 and rows["eager"]["aten_ops"] > 0
    fn = op_host.benchmarked_callable("pma", "fused", "smoke")
    assert callable(fn)
    with pytest.raises(SystemExit):
        op_host.main(["--ops", "no_such_op"])


def test_triton_launches_counts_runs_and_skips():
    """``triton_launches()`` counts launches by kernel and runs them; ``run=False`` counts and skips
    them (the output stays as allocated); on leaving, the JIT's own ``run`` is back."""
    import torch

    from interformer.kernels.dot_interaction import dot_interaction
    from interformer.profiling import triton_launches
    from poison import PoisonedAllocations
    from utils import DEVICE

    z = torch.randn(2, 3, 16, device=DEVICE)
    iu = torch.triu_indices(3, 3, 1, device=DEVICE)
    ref = (z @ z.transpose(1, 2))[:, iu[0], iu[1]]
    # fp32 on a GPU: tf32x3 dots; under the interpreter exact fp32 (this checks the launches
    # counted, the kernel's accuracy is test_kernel_dot_interaction's, at DESIGN's bounds)
    close = dict(rtol=1e-5, atol=1e-5) if DEVICE.type == "cpu" else dict(rtol=1e-4, atol=1e-4)
    with triton_launches() as ran:
        torch.testing.assert_close(dot_interaction(z), ref, **close)
    assert ran == {"_dot_fwd_kernel": 1}
    with triton_launches(run=False) as skipped, PoisonedAllocations():  # fresh memory is NaN
        out = dot_interaction(z)
    assert skipped == {"_dot_fwd_kernel": 1} and out.isnan().all()
    torch.testing.assert_close(dot_interaction(z), ref, **close)


def test_range_table_keeps_host_and_device_rows_apart(train_step):
    """The profiler lists a range twice (host row, device span row): the table must not add them
    (it once did: calls doubled, a 31.5 ms span plus 3.6 ms of forward kernels read as 35 ms of GPU
    time per step, against 12.9 ms of kernel time)."""
    import torch
    from types import SimpleNamespace as Row

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    rows = [Row(key="train_step", device_type=cpu, count=10, cpu_time_total=821_252.0, device_time_total=36_066.0),
            Row(key="train_step", device_type=cuda, count=10, cpu_time_total=0.0, device_time_total=314_791.0,
                self_device_time_total=314_791.0),
            Row(key="aten::mm", device_type=cpu, count=50, cpu_time_total=9_000.0, device_time_total=60_000.0,
                self_device_time_total=0.0),
            Row(key="sm90_gemm_kernel", device_type=cuda, count=50, cpu_time_total=0.0, device_time_total=60_000.0,
                self_device_time_total=60_000.0),
            Row(key="triton_kernel", device_type=cuda, count=20, cpu_time_total=0.0, device_time_total=68_715.0,
                self_device_time_total=68_715.0)]
    table = train_step.range_table(rows, steps=10)
    line = next(l for l in table.splitlines() if l.startswith("train_step"))
    assert line.split()[1:] == ["1.0", "82.125", "3.607", "31.479"]
    assert "all kernels: 12.872 ms" in table


def test_kernel_table_lists_this_packages_kernels_by_device_time(train_step):
    """Every Triton kernel of ``interformer.kernels`` is known by name; the table keeps their device
    rows only (not host rows, not cuBLAS or other kernels), largest first, per step and per launch,
    and sums all kernels for the total (not the device rows of ranges, which are GPU-timeline spans)."""
    import torch
    from types import SimpleNamespace as Row

    names = train_step.package_kernel_names()
    for k in ("_lr_fwd_kernel", "_lr_bwd_weights_kernel", "_sum_partials_kernel", "_attn_bwd_dq_kernel",
              "_glce_bwd_kernel", "_pffn_fwd_kernel", "_ln_bwd_kernel", "_dot_fwd_kernel", "_fr_residual_kernel"):
        assert k in names, (k, sorted(names))
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    rows = [Row(key="_lr_fwd_kernel", device_type=cpu, count=30, self_device_time_total=0.0),
            Row(key="_lr_fwd_kernel", device_type=cuda, count=30, self_device_time_total=600.0),
            Row(key="_sum_partials_kernel", device_type=cuda, count=230, self_device_time_total=920.0),
            Row(key="sm90_gemm_kernel", device_type=cuda, count=50, self_device_time_total=2480.0),
            Row(key="train_step", device_type=cuda, count=10, self_device_time_total=314_791.0),  # a span
            Row(key="my_range", device_type=cuda, count=10, self_device_time_total=9_000.0, is_user_annotation=True)]
    table = train_step.kernel_table(rows, steps=10, names=names).splitlines()
    assert table[1].split() == ["_sum_partials_kernel", "23.0", "92.0", "4.00"]
    assert table[2].split() == ["_lr_fwd_kernel", "3.0", "60.0", "20.00"]
    assert len(table) == 4 and "0.152 ms of 0.400 ms" in table[3]


@pytest.fixture(scope="module")
def sm90_audit():
    yield from _with_bench("sm90_audit")


def test_recorded_launches_describe_each_kernel_as_triton_specialises_it():
    """``record_launches`` sees every launch ``triton_launches`` counts (both skipping them, with the
    same H100 sizing) and describes each by its kernel's own parameters: the constexprs by value,
    every other argument by what Triton specialises on (a pointer's dtype, an int's width and
    divisibility by 16, the constexpr 1)."""
    import inspect

    import torch

    from interformer.kernel_audit import gpu_sized, record_launches, unique_cases
    from interformer.kernels import dot_interaction as dot_mod
    from interformer.kernels.gated_lce import gated_lce
    from interformer.profiling import triton_launches
    from utils import DEVICE

    x = torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)
    w, b = torch.randn(5, 3, device=DEVICE, requires_grad=True), torch.zeros(3, device=DEVICE)
    gw, gb = torch.randn(24, 24, device=DEVICE), torch.zeros(24, device=DEVICE)
    z = torch.randn(3, 4, 16, device=DEVICE)
    with gpu_sized(), triton_launches(run=False) as counted:
        gated_lce(x, w, b, gw, gb).sum().backward()
        dot_mod.dot_interaction(z)
    with gpu_sized(), record_launches() as cases:
        gated_lce(x, w, b, gw, gb).sum().backward()
        out = dot_mod.dot_interaction(z)
    assert sorted(c["kernel"] for c in cases) == sorted(counted.elements())
    assert out.shape == (3, 6)
    for case in cases:
        params = inspect.signature(getattr(__import__(case["module"], fromlist=["_"]), case["kernel"]).fn).parameters
        assert set(case["consts"]) | set(case["args"]) == set(params), case["kernel"]
        assert all("constexpr" in str(params[n].annotation) for n in case["consts"]), case["kernel"]
    dot = next(c for c in cases if c["kernel"] == "_dot_fwd_kernel")
    assert dot["args"]["OUT"] == dot["args"]["Z"] == "float32"
    assert dot["args"]["DM"] == 16 and dot["args"]["N"] == 17      # 16 divides d = 16, not N = 4
    assert dot["args"]["stride_zd"] == 1                          # the constexpr 1, as Triton has it
    assert [c["launches"] for c in unique_cases(cases + cases)] == [2] * len(unique_cases(cases))


def test_sm90_audit_builds_every_kernel_of_a_training_step(sm90_audit, capsys, tmp_path):
    """The audit compiles each distinct kernel of the smoke shape's fused training step for sm_90
    and reports registers, spills and shared memory for each (Triton's wheel ships cuobjdump)."""
    import json

    from interformer.kernel_audit import H100_SHARED_MEMORY

    out_json = tmp_path / "audit.json"
    assert sm90_audit.main(["--shape", "smoke", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    builds = report["builds"]
    kernels = {b["kernel"] for b in builds}
    for k in ("_glce_fwd_kernel", "_glce_bwd_kernel", "_attn_fwd_kernel", "_pffn_fwd_kernel", "_pffn_bwd_kernel",
              "_ln_fwd_kernel", "_ln_bwd_kernel", "_lr_fwd_kernel", "_sum_partials_kernel"):
        assert k in kernels, (k, sorted(kernels))
        assert k.lstrip("_") in text
    for b in builds:
        assert 0 < b["registers"] <= 255 and b["stack"] >= 0 and b["shared"] <= H100_SHARED_MEMORY, b
        assert b["programs"] >= 1, b  # from the recorded grid
    assert f"{sum(b['launches'] for b in builds)} launches, {len(builds)} distinct kernels" in text
    assert "warps/SM" in text and "waves" in text
    # the cross nets' compute dtype, a tl.dtype constexpr ({"tl_dtype": "bf16"} in the JSON), by its name
    assert any(b["consts"].get("DT") == {"tl_dtype": "bf16"} for b in builds)
    assert "DT=bf16" in text and "tl_dtype" not in text
    # the SASS fingerprint (for showing that a refactor leaves the machine code as it was): the same
    # for a case built again, different between two specialisations of one kernel
    from interformer.kernel_audit import build_sm90

    assert all(re.fullmatch(r"[0-9a-f]{16}", b["sass_sha"]) for b in builds)
    twice = next(k for k in kernels if sum(b["kernel"] == k for b in builds) >= 2)
    first, second = [b for b in builds if b["kernel"] == twice][:2]
    assert first["sass_sha"] != second["sass_sha"], twice
    case = {k: v for k, v in first.items() if k in ("module", "kernel", "consts", "args", "unaligned", "num_warps",
                                                   "num_stages", "float_type")}
    assert build_sm90([case])[0]["sass_sha"] == first["sass_sha"]
    # a register cap (Triton's maxnreg) is recorded from the launch and built with
    import torch

    from interformer.kernel_audit import record_launches
    from interformer.kernels import gated_lce
    from utils import DEVICE

    busiest = max((b for b in builds if b["kernel"] == "_glce_bwd_kernel"), key=lambda b: b["registers"])
    cap = max(24, busiest["registers"] // 8 * 4)
    assert cap < busiest["registers"]
    capped = build_sm90([dict(case, maxnreg=cap) for case in (busiest,)])[0]
    assert capped["registers"] <= cap and capped["sass_sha"] != busiest["sass_sha"], (cap, capped)
    old = (gated_lce.ACC_MAXNREG, gated_lce.GW_MODE)
    try:
        gated_lce.ACC_MAXNREG, gated_lce.GW_MODE = cap, "acc"
        with record_launches() as cases:
            shapes = ((3, 5, 16), (5, 4), (4,), (16, 16), (16,))
            gated_lce.gated_lce(*(torch.randn(*s, device=DEVICE, requires_grad=True) for s in shapes)).sum().backward()
    finally:
        gated_lce.ACC_MAXNREG, gated_lce.GW_MODE = old
    assert [c.get("maxnreg") for c in cases if c["kernel"] == "_glce_bwd_kernel"] == [cap]


def test_sm90_audit_compares_two_runs_kernel_by_kernel(sm90_audit, tmp_path, capsys):
    """``--compare BEFORE AFTER`` names each specialisation whose SASS fingerprint or registers
    differ, or that one run lacks, and exits 1; two runs with the same code exit 0; a file it cannot
    read exits 2 (it raised, status 1, as a difference does). Two builds of one kernel with the same
    constexprs but another argument dtype are told apart."""
    import json

    def build(kernel, sha, regs=64, x="bf16", **consts):
        return {"kernel": kernel, "consts": consts, "args": {"X": x}, "num_warps": 4, "sass_sha": sha,
                "registers": regs}

    base = [build("_k", "aaaa", BLOCK=16), build("_k", "bbbb", BLOCK=32), build("_k", "cccc", x="fp32", BLOCK=32),
            build("_j", "dddd")]
    runs = {"before": base, "same": [dict(b) for b in base],
            "after": [base[0], build("_k", "eeee", BLOCK=32), base[2], build("_i", "ffff")]}
    for name, builds in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(shape="smoke", step="train", triton="t",
                                                              builds=builds)))
    assert sm90_audit.main(["--compare", str(tmp_path / "before.json"), str(tmp_path / "same.json")]) == 0
    assert "4 kernels in both; the same code in every one" in capsys.readouterr().out
    assert sm90_audit.main(["--compare", str(tmp_path / "before.json"), str(tmp_path / "after.json")]) == 1
    out = capsys.readouterr().out
    assert "differs: _k BLOCK=32: registers 64 -> 64, SASS bbbb -> eeee" in out
    assert "only in before: _j" in out and "only in after: _i" in out and "cccc" not in out
    # a file that cannot be compared is a usage error (status 2), never the status 1 of "differs"
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "other.json").write_text("{}")
    (tmp_path / "list.json").write_text("[]")
    for name, message in (("missing.json", "No such file"), ("empty.json", "Expecting value"),
                          ("other.json", "not an sm90_audit --json file"), ("list.json", "not an sm90_audit")):
        with pytest.raises(SystemExit) as exit_:
            sm90_audit.main(["--compare", str(tmp_path / "before.json"), str(tmp_path / name)])
        assert exit_.value.code == 2 and message in capsys.readouterr().err, name
    # an unknown shape too (it was a KeyError traceback after the argument parsing)
    with pytest.raises(SystemExit) as exit_:
        sm90_audit.main(["--shape", "tobao"])
    assert exit_.value.code == 2 and "--shape 'tobao': not a bench shape (one of taobao," in capsys.readouterr().err


def test_recorded_argument_types_match_tritons_own_specialisation():
    """What ``record_launches`` writes for a kernel argument, turned into a type and attributes by
    the sm_90 build (``triton_signature``), is what the installed Triton's own specialisation
    gives: the same type, divisibility by 16 exactly where Triton finds it, constexprs alike."""
    import torch

    jit = pytest.importorskip("triton.runtime.jit")
    native = getattr(jit, "native_specialize_impl", None)
    if native is None:
        pytest.skip("this Triton does not expose native_specialize_impl")
    from triton.backends.compiler import BaseBackend

    from interformer.kernel_audit import _arg_spec, triton_signature

    values = [1, 0, 8, 16, 17, 24, -16, -3, 2**31 - 16, 2**31, 2**31 + 17, -2**31 - 1, 0.5, True, None,
              torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.int64), torch.zeros(4)[1:]]
    for v in values:
        case = dict(consts={}, args={"a": _arg_spec(v)})
        if isinstance(v, torch.Tensor) and v.data_ptr() % 16:
            case["unaligned"] = ["a"]
        sig, consts, attrs = triton_signature(case, ["a"])
        kind, key = native(BaseBackend, v, False, True, True)
        if kind == "constexpr":
            assert sig["a"] == "constexpr" and consts[(0,)] == key, (v, sig, consts)
            continue
        assert sig["a"] == kind, (v, sig["a"], kind)
        if key in ("D", ""):  # ints and pointers: divisible by 16 or not
            assert bool(attrs[(0,)]) == (key == "D"), (v, attrs, key)


def test_occupancy_follows_the_h100_limits():
    """Programs per SM from registers, shared memory and warps, against limits everyone quotes for
    an H100: 64K registers (a 256-thread program at 255 registers fills them), 64 warps, 228 KB of
    shared memory; and the waves and resident warps of a grid."""
    from interformer.kernel_audit import occupancy

    assert occupancy(dict(registers=255, num_warps=8, shared=0))["blocks_per_sm"] == 1
    assert occupancy(dict(registers=32, num_warps=4, shared=0))["blocks_per_sm"] == 16      # 64 warps
    assert occupancy(dict(registers=32, num_warps=1, shared=0))["blocks_per_sm"] == 32      # 32 programs
    assert occupancy(dict(registers=64, num_warps=4, shared=100 * 1024))["blocks_per_sm"] == 2  # 228 KB
    occ = occupancy(dict(registers=64, num_warps=4, shared=0, programs=128), sms=132)
    assert occ["resident_warps"] == 4 and occ["waves"] == 128 / (132 * 8)
    occ = occupancy(dict(registers=64, num_warps=4, shared=0, programs=132 * 8 * 3), sms=132)
    assert occ["resident_warps"] == 32 and occ["waves"] == 3.0


@pytest.mark.gpu
def test_recorded_cases_are_the_same_on_cpu_and_cuda(sm90_audit):
    """The audit records on whatever device it has (a CPU, under the interpreter) and claims the
    cases are those a GPU compiles: the launchers choose block sizes from shapes alone. On a GPU,
    the smoke training step recorded on CUDA and on the CPU gives the same specialisations."""
    import json

    import torch

    import common
    from interformer.kernel_audit import unique_cases

    def key(case):
        return json.dumps({k: v for k, v in case.items() if k not in ("programs", "launches", "unaligned")},
                          sort_keys=True)

    from interformer.kernels import _common

    seen = {}
    for device in ("cuda", "cpu"):
        old = common.DEVICE, _common._INTERPRETED
        common.DEVICE = torch.device(device)
        # the launchers' CPU-tensor check wants the interpreter, which this GPU process has off; the
        # launches are recorded and skipped, so none reaches Triton
        _common._INTERPRETED = device == "cpu" or old[1]
        try:
            seen[device] = {key(c) for c in unique_cases(sm90_audit.step_cases("smoke", "train"))}
        finally:
            common.DEVICE, _common._INTERPRETED = old
    assert seen["cuda"] == seen["cpu"], (sorted(seen["cuda"] - seen["cpu"]), sorted(seen["cpu"] - seen["cuda"]))


@pytest.fixture(scope="module")
def autograd_threads():
    yield from _with_bench("autograd_threads")


def test_autograd_threads_times_both_threads(autograd_threads, capsys):
    """Part 1 times every operation on all three threads and knows which thread ran the backward
    (the engine's device thread exists on a GPU only); part 2 runs the same autograd nodes in both
    modes and accounts a backward's wall time as node spans plus gaps."""
    import torch

    rows = autograd_threads.inside_backward(torch.device("cuda" if torch.cuda.is_available() else "cpu"), 2)
    on_caller = rows.pop("thread")
    assert on_caller == {"in backward, device thread": not torch.cuda.is_available(), "in backward, one thread": True}
    assert set(rows) == {"torch.add", "torch.empty", "Triton JIT launch"}
    for r in rows.values():
        assert set(r) == {"calling thread", "in backward, device thread", "in backward, one thread"}
        assert all(us > 0 for us in r.values())
    step = autograd_threads.train_step.build("smoke", "triton", backward_range=autograd_threads.BACKWARD)[1]()
    on, off = (autograd_threads.node_spans(step, 1, threads) for threads in (True, False))
    assert on["nodes"] == off["nodes"] > 0 and on["count_by_name"] == off["count_by_name"]
    for r in (on, off):
        assert 0 <= r["gap_us"] <= r["backward_us"] and 0 < r["node_span_us"] <= r["backward_us"]
    assert autograd_threads.main(["--shape", "smoke", "--steps", "1", "--ops", "1"]) == 0
    out = capsys.readouterr().out
    assert "backend=triton" in out and "backend=eager" in out and "the backward ran on the calling thread" in out


def test_train_step_profiles_a_compiled_inference_forward(train_step, capsys, monkeypatch):
    """``--compile --inference``: the model goes through ``torch.compile`` with the backend named,
    the steps run the forward alone (no gradient anywhere) and the per-range table is printed."""
    import torch

    compiled = []
    real = torch.compile

    def spy(model, **kw):
        compiled.append((model, kw))
        return real(model, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    assert train_step.main(["--shape", "smoke", "--steps", "1", "--warmup", "1", "--compile", "--compile-backend",
                            "aot_eager", "--inference", "--torch-profiler"]) == 0
    (model, kw), = compiled
    assert kw == {"backend": "aot_eager"}
    assert all(p.grad is None for p in model.parameters())
    out = capsys.readouterr().out
    assert "per-range time over 1 steps" in out
    # the header names the compile settings the profile ran under
    import interformer

    from utils import DEVICE

    setting = interformer.compile_inline()
    kept = "inlined" if (DEVICE.type == "cuda" if setting is None else setting) else "custom ops"
    reference = ",".join(sorted(interformer.compile_reference_ops())) or "none"
    assert f"compiled: reference ops {reference}, kept ops {kept}" in out


@pytest.fixture(scope="module")
def embedding_backward():
    yield from _with_bench("embedding_backward")


def test_embedding_backward_variants_agree_and_are_timed(embedding_backward, capsys):
    """The alternative backwards give nn.Embedding's weight gradient (padding row 0 left at zero, the
    rows it reads included), a broken one is refused before timing, and every variant gets a
    number for both tables."""
    import torch

    E = embedding_backward
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ids, weight, upstream = E._case(64, 8, device, padded=0.25)
    assert (ids == 0).any() and weight.grad is None
    for variant in E.VARIANTS:
        weight.grad = None
        E.lookup(variant)(ids, weight).backward(upstream)
        assert torch.all(weight.grad[0] == 0) and weight.grad.abs().sum() > 0, variant
    E.check(64, 8, device)

    real = E._ScatterEmbedding.backward

    def no_padding_zeroing(ctx, grad):  # the gradient of a lookup without padding_idx
        (ids,) = ctx.saved_tensors
        dw = torch.zeros(ctx.shape, dtype=grad.dtype, device=grad.device)
        return None, dw.index_add_(0, ids, grad), None, None

    E._ScatterEmbedding.backward = staticmethod(no_padding_zeroing)
    try:
        with pytest.raises(AssertionError, match="weight gradient"):
            E.check(64, 8, device)
    finally:
        E._ScatterEmbedding.backward = staticmethod(real)

    assert E.main(["--shape", "smoke", "--calls", "3"]) == 0
    out = capsys.readouterr().out
    for table in ("sparse field ", "behaviour channel "):
        assert sum(line.strip().startswith(table) for line in out.splitlines()) == len(E.VARIANTS), out
    for tokenizer in ("sparse fields", "behaviour channels"):
        assert sum(line.strip().startswith(tokenizer) for line in out.splitlines()) == len(E.GROUPINGS), out


def test_embedding_backward_checks_the_grouped_lookup_before_timing(embedding_backward, monkeypatch):
    """The grouped lookup passes the script's check against the per-table one at both tokenizer
    layouts, and a grouped backward that drops the tables' offsets (every table's gradient landing
    in table 0's rows) is refused."""
    import torch

    import interformer.kernels.embedding as emb

    E = embedding_backward
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for ids_shape, _ in E.tokenizer_cases(_smoke()).values():
        E.check_grouped(ids_shape, 8, device)

    def no_offsets(ids, sizes):
        return ids.movedim(1, -1)

    monkeypatch.setattr(emb, "_flat_ids", no_offsets)
    with pytest.raises(AssertionError, match="weight gradient of table"):
        E.check_grouped((5, 3), 8, device)


def _smoke():
    from types import SimpleNamespace

    return SimpleNamespace(B=4, n=4, k=2, T=5)


def test_compiled_steps_do_not_recompile_when_the_ranges_turn_on(train_step):
    """The ranges are on from the warm-up: ``ranged`` reads the flag, dynamo guards on it, and
    turning it on after a compiled warm-up recompiled inside the measured steps (seen in an H200
    profile). Dynamo's own backend (no Inductor) keeps this quick on a CPU."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        assert train_step.main(["--shape", "smoke", "--backend", "eager", "--steps", "2", "--warmup", "1",
                                "--compile", "--compile-backend", "eager", "--inference"]) == 0
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        # --host times the steps with the ranges off again: that recompile happens before its timings
        timed, real = [], train_step._timed

        def watched(fn, steps):
            before = counters["stats"]["unique_graphs"]
            out = real(fn, steps)
            timed.append(counters["stats"]["unique_graphs"] - before)
            return out

        train_step._timed = watched
        try:
            assert train_step.main(["--shape", "smoke", "--backend", "eager", "--steps", "1", "--warmup", "1",
                                    "--compile", "--compile-backend", "eager", "--inference", "--host"]) == 0
        finally:
            train_step._timed = real
        assert timed and not any(timed), timed
    finally:
        torch._dynamo.reset()


@pytest.fixture(scope="module")
def step_ops():
    yield from _with_bench("step_ops")


def test_step_ops_counts_a_training_step_of_each_backend(step_ops, capsys):
    """The counts are what the design says of a fused step: fewer forward and backward aten ops and
    fewer autograd nodes than eager, the fused ops' own Functions among the nodes, Triton launches
    only on the fused path, one ``AccumulateGrad`` per parameter either way (no parameter lost from
    the graph); and they do not depend on the batch."""
    counts = {}
    for backend in ("eager", "triton"):
        model, inputs, label = step_ops.build("smoke", backend, B=2)
        counts[backend] = step_ops.count(model, inputs, label, inference=False)
        n_params = sum(1 for _ in model.parameters())
        assert counts[backend]["nodes"]["AccumulateGrad"] == n_params
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed
    eager, fused = counts["eager"], counts["triton"]
    assert sum(fused["forward"].values()) < sum(eager["forward"].values())
    assert fused["backward"] < eager["backward"]
    assert sum(fused["nodes"].values()) < sum(eager["nodes"].values())
    assert fused["nodes"]["fused-op Functions"] > 0 and eager["nodes"]["fused-op Functions"] == 0
    assert fused["launches_fwd"] > 0 and fused["launches_bwd"] > 0
    assert eager["launches_fwd"] == eager["launches_bwd"] == 0
    # every arch issued something on the eager path, and its linear layers show apart
    assert set(step_ops.ARCHES) <= set(eager["forward"])
    assert eager["forward"]["Sequence Arch, nn.Linear"] > 0
    # the Cross Arch's linear layers are all children its fused modules read (gates, PMA's
    # projections): left unhooked, never called (a hooked one would be called, and counted)
    assert "Cross Arch, nn.Linear" not in fused["forward"] and "Cross Arch, nn.Linear" not in eager["forward"]
    from interformer import FusedModule

    read = [(m, c) for m in model.modules() if isinstance(m, FusedModule) for c in m.read_children]
    assert read and all(c in m._modules for m, c in read)  # the names are children's (a rename fails here)
    model, inputs, label = step_ops.build("smoke", "triton", B=5)
    assert step_ops.count(model, inputs, label, inference=False) == fused

    for r in counts.values():  # the ops by name add up to the counts by arch, forward and backward
        by_place = Counter()
        for (place, _), n in r["ops"].items():
            by_place[place] += n
        assert by_place == Counter(dict(r["forward"], backward=r["backward"]))
    assert fused["ops"]["backward", "mm"] < eager["ops"]["backward", "mm"]

    assert step_ops.main(["--shape", "smoke", "--batch", "2", "--by-op", "3"]) == 0
    out = capsys.readouterr().out
    assert "autograd nodes, all" in out and "backward Triton launches" in out
    listed = out.split("most frequent aten ops")[1]
    assert "triton:" in listed and re.search(r"  backward \(\d+\): \w+ x\d+, \w+ x\d+, \w+ x\d+", listed)


def test_step_ops_inference_and_timing(step_ops, capsys):
    """``--inference`` counts a forward under no_grad (no backward rows); ``--time`` prints both
    backends' step times and their ratio, timed on one torch thread and leaving the thread count
    as it was."""
    import torch

    threads = torch.get_num_threads()
    seen, real = [], torch.set_num_threads
    torch.set_num_threads(2)
    try:
        torch.set_num_threads = lambda n: (seen.append(n), real(n))[1]
        assert step_ops.main(["--shape", "smoke", "--inference", "--time"]) == 0
        torch.set_num_threads = real
        assert torch.get_num_threads() == 2 and 1 in seen, seen
    finally:
        torch.set_num_threads = real
        real(threads)
    out = capsys.readouterr().out
    assert "forward aten ops, all" in out and "backward aten ops" not in out and "autograd nodes" not in out
    assert "eager / triton:" in out
    with pytest.raises(SystemExit):
        step_ops.main(["--batch", "1"])


def _node_names(root) -> list:
    """The class names of the autograd nodes reachable from ``root`` (a grad_fn), each node once."""
    names, seen, todo = [], set(), [root]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.append(type(node).__name__)
            todo.extend(fn for fn, _ in node.next_functions)
    return names


def test_step_ops_linears_skipped_keep_the_graph_and_drop_the_arithmetic(step_ops):
    """Under ``linears_skipped`` every ``nn.Linear`` issues no GEMM, its output has the layer's shape
    and the autocast dtype, a training step's loss still reaches every parameter (one
    ``AccumulateGrad`` each, as without it) and the backward runs; afterwards the layers compute
    again."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    layer = torch.nn.Linear(6, 5)
    x = torch.randn(2, 3, 6)
    with step_ops.linears_skipped(), Ops() as ops, torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.shape == (2, 3, 5) and y.dtype == torch.bfloat16 and not y.any()  # zeros: no stray bits
    with step_ops.linears_skipped():
        assert layer(input=x).shape == (2, 3, 5)  # nn.Linear.forward's keyword, as a caller may pass it
    assert not {"addmm", "mm", "matmul", "linear", "_to_copy"} & set(ops.names), ops.names
    torch.testing.assert_close(layer(x), x @ layer.weight.t() + layer.bias)  # restored

    def reached(model, inputs, label):
        loss = model.loss(model(*inputs), label)
        names = _node_names(loss.grad_fn)
        loss.backward()
        return names

    model, inputs, label = step_ops.build("smoke", "eager", B=2)
    with_layers = reached(model, inputs, label)
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in model.modules()
             if isinstance(m, torch.nn.Linear)]
    with step_ops.linears_skipped():
        skipped = reached(model, inputs, label)
    for h in hooks:
        h.remove()
    n_params = len(list(model.parameters()))
    assert with_layers.count("AccumulateGrad") == skipped.count("AccumulateGrad") == n_params
    # one node per layer call in place of its GEMM's (the eager reference has functional GEMMs too)
    assert skipped.count("_LinearSkippedBackward") == len(calls) > 0
    assert skipped.count("AddmmBackward0") < with_layers.count("AddmmBackward0")
    assert all(p.grad is not None for p in model.parameters())


def test_step_ops_hooks_leave_the_grouped_lookups_alone(step_ops):
    """No embedding table gets a hook from the counting (a hooked table sends the fused tokenizers
    down their per-table path, which would change what is counted): with the hooks on, each fused
    tokenizer's tables still share one grouped-lookup node."""
    import torch

    model, inputs, label = step_ops.build("smoke", "triton", B=2)
    where = step_ops._Where(model)
    try:
        assert any(m._forward_pre_hooks for m in model.modules() if isinstance(m, torch.nn.Linear))
        names = _node_names(model.loss(model(*inputs), label).grad_fn)
    finally:
        where.remove()
    assert names.count("_GroupedEmbeddingBackward") == 2 and "EmbeddingBackward0" not in names


# ----------------------------------------------------------------------------- NVTX ranges
def _fake_nvtx(monkeypatch):
    """A stand-in ``nvtx`` package recording ``(event, name, thread)``, made the ranges' NVTX
    implementation (resolved afresh, and again after the test)."""
    import threading
    import types

    from interformer import profiling

    log = []
    fake = types.ModuleType("nvtx")
    fake.push_range = lambda message=None, **kw: log.append(("push", message, threading.get_ident()))
    fake.pop_range = lambda **kw: log.append(("pop", None, threading.get_ident()))
    monkeypatch.setitem(sys.modules, "nvtx", fake)
    monkeypatch.setattr(profiling, "_MARKERS", getattr(profiling, "_UNRESOLVED", None), raising=False)
    return log


def _check_nesting(log):
    """Each thread's pushes and pops pair up (never a pop on an empty stack, nothing left open);
    returns ``{thread: [names pushed]}``."""
    stacks, pushed = {}, {}
    for event, name, thread in log:
        stack = stacks.setdefault(thread, [])
        if event == "push":
            stack.append(name)
            pushed.setdefault(thread, []).append(name)
        else:
            assert stack, f"pop without a push on thread {thread}: {log}"
            stack.pop()
    assert not any(stacks.values()), f"ranges left open: {stacks}"
    return pushed


@pytest.fixture
def ranges_on():
    from interformer import profiling

    profiling.enable_nvtx(True)
    yield profiling
    profiling.enable_nvtx(False)


def test_a_missing_nvtx_package_is_looked_for_once(monkeypatch, ranges_on):
    """Without the ``nvtx`` package, each range used to retry ``import nvtx`` (Python does not cache
    a failed import): ~30 us of path searching per range, inside the host time the ranges measure.
    The NVTX implementation is resolved once."""
    from interformer import profiling

    attempts = []

    class Hide:  # makes ``import nvtx`` fail here, installed or not, and counts the attempts
        def find_spec(self, name, path=None, target=None):
            if name == "nvtx":
                attempts.append(name)
                raise ModuleNotFoundError("No module named 'nvtx'")
            return None

    monkeypatch.delitem(sys.modules, "nvtx", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Hide()] + sys.meta_path)
    monkeypatch.setattr(profiling, "_MARKERS", getattr(profiling, "_UNRESOLVED", None), raising=False)
    for _ in range(50):
        with profiling.nvtx_range("x"):
            pass
    assert len(attempts) <= 1, len(attempts)


def test_each_ranged_forward_compiles_on_its_own_budget():
    """Dynamo keeps compiled graphs and its recompile limit per code object. Every fused module's
    forward is wrapped by ``ranged``; the wrappers shared one code object, so modules compiled one
    by one (regional compilation) spent one limit between them: with the limit at 2 here, the third
    module failed under ``fullgraph=True``."""
    import torch

    from interformer.layers import (DotInteraction, FeedForward, GatedLCE, LowRankCrossNet, ResidualLayerNorm,
                                    RotaryMultiHeadAttention)

    forwards = [cls.forward for cls in (DotInteraction, FeedForward, GatedLCE, LowRankCrossNet, ResidualLayerNorm,
                                        RotaryMultiHeadAttention)]
    assert len({f.__code__ for f in forwards}) == len(forwards)
    assert GatedLCE.forward.__code__.co_name == "forward_of_GatedLCE"
    modules = [(GatedLCE(5, 3, 8, backend="eager"), (torch.randn(2, 5, 8),)),
               (DotInteraction(4, 8, backend="eager"), (torch.randn(2, 4, 8),)),
               (ResidualLayerNorm(8, backend="eager"), (torch.randn(2, 3, 8),))]
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=2):
            for module, args in modules:
                torch.compile(module, backend="eager", fullgraph=True)(*args)
    finally:
        torch._dynamo.reset()


def test_nvtx_env_values_that_mean_off():
    """``INTERFORMER_NVTX=off`` (or no, false, FALSE, 0, empty) leaves the ranges off; it used to turn
    them on (only "", "0", "false", "False" counted as off)."""
    import subprocess

    code = ("import importlib, os, interformer.profiling as p\n"
            "for v in ['off', 'no', 'FALSE', 'Off', '0', '', ' 0 ', '1', 'yes', 'on']:\n"
            "    os.environ['INTERFORMER_NVTX'] = v\n"
            "    print(repr(v), importlib.reload(p).nvtx_enabled())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env=dict(os.environ, TRITON_INTERPRET="1")).stdout
    seen = dict(line.rsplit(" ", 1) for line in out.splitlines())
    assert seen == {"'off'": "False", "'no'": "False", "'FALSE'": "False", "'Off'": "False", "'0'": "False",
                    "''": "False", "' 0 '": "False", "'1'": "True", "'yes'": "True", "'on'": "True"}, seen


def test_backward_ranges_sit_on_the_thread_that_runs_the_backward(train_step, monkeypatch, ranges_on):
    """The backward of each arch and fused op is marked ``<name>.backward`` on the thread that runs
    the backward (on a GPU autograd's device thread, where the backward's kernels are launched, so
    Nsight projects them onto these ranges; before, they fell under no range at all), while the
    forward ranges stay on the calling thread. Here ``backward()`` runs on another Python thread,
    which the CPU engine then runs the backward on. Every thread's ranges nest, and the gradients
    are the ones without ranges."""
    import threading

    import torch

    log = _fake_nvtx(monkeypatch)
    model, make_step = train_step.build("smoke", "eager")
    model.eval()  # no dropout: the same gradients with and without ranges
    import common
    from test_bench_model import batch_for, config_for

    inputs, label = batch_for(common.ALL_SHAPES["smoke"], config_for(common.ALL_SHAPES["smoke"]))

    def grads(on):
        ranges_on.enable_nvtx(on)
        model.zero_grad(set_to_none=True)
        loss = model.loss(model(*inputs), label)
        worker = threading.Thread(target=loss.backward)
        worker.start()
        worker.join()
        return worker.ident, [p.grad.clone() for p in model.parameters()]

    _, plain = grads(False)
    assert not log
    backward_thread, marked = grads(True)
    for a, b in zip(plain, marked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    pushed = _check_nesting(log)
    forward = pushed.pop(threading.get_ident())
    backward = pushed.pop(backward_thread)
    assert not pushed, pushed
    expected = {"CrossArch.nonseq", "CrossArch.seq", "InteractionArch", "SequenceArch", "GatedLCE",
                "PersonalizedFFN", "DotInteraction", "RotaryMultiHeadAttention", "PoolingMultiHeadAttention",
                "ResidualLayerNorm", "FeedForward"}
    assert expected <= set(forward) and not any(n.endswith(".backward") for n in forward), forward
    assert {f"{n}.backward" for n in expected} <= set(backward), backward
    assert sorted(backward) == sorted(f"{n}.backward" for n in forward), (forward, backward)


def test_backward_ranges_close_on_errors_and_partial_backwards(monkeypatch, ranges_on):
    """A forward that raises pops its range; a backward that stops before a marked call's inputs
    (``backward(inputs=...)``) still closes that call's backward range at its end; a call without
    an input that requires grad gets no backward range. Nothing is left open on any thread."""
    import torch

    log = _fake_nvtx(monkeypatch)

    class Op(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        @ranges_on.ranged("Op")
        def forward(self, x, fail=False):
            if fail:
                raise ValueError("boom")
            return self.lin(x).tanh()

    op = Op()
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(ValueError):
        op(x, fail=True)
    hidden = op(x)
    out = op(hidden).sum()
    out.backward(inputs=[op.lin.weight], retain_graph=True)  # never reaches the first call's inputs
    out.backward()
    op(torch.randn(2, 4)).sum().backward()  # only parameters need grad: no backward range
    pushed = _check_nesting(log)
    names = [n for thread in pushed.values() for n in thread]
    assert names.count("Op") == 4 and names.count("Op.backward") == 4, names


def test_ranges_under_torch_compile_fullgraph(monkeypatch):
    """A marked module compiles with ``fullgraph=True`` with the ranges off and on (dynamo drops
    them inside the compiled region) and trains to the same gradients."""
    import torch

    from interformer import profiling

    log = _fake_nvtx(monkeypatch)

    class Op(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        @profiling.ranged("Op")
        def forward(self, x):
            return self.lin(x).relu()

    op, x = Op(), torch.randn(3, 4)
    op(x).sum().backward()
    ref = op.lin.weight.grad.clone()
    try:
        for on in (False, True):
            profiling.enable_nvtx(on)
            torch._dynamo.reset()
            op.zero_grad(set_to_none=True)
            torch.compile(op, backend="eager", fullgraph=True)(x).sum().backward()
            torch.testing.assert_close(op.lin.weight.grad, ref)
    finally:
        profiling.enable_nvtx(False)
        torch._dynamo.reset()
    _check_nesting(log)


def test_train_step_table_has_the_backward_ranges(train_step, capsys):
    """``--torch-profiler``'s per-range table has a row for ``backward()`` and for each arch's and
    fused op's backward range; ``--compile-backend`` without ``--compile`` is refused (it did
    nothing)."""
    assert train_step.main(["--shape", "smoke", "--backend", "eager", "--steps", "1", "--warmup", "0",
                            "--torch-profiler"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0] for line in out.split("per-range time", 1)[1].splitlines()[2:] if line.strip()}
    assert {"train_step", "backward", "SequenceArch", "SequenceArch.backward", "GatedLCE.backward",
            "InteractionArch.backward"} <= rows, rows
    if not train_step.torch.cuda.is_available():  # no device columns or tables of CPU ops as "kernels"
        assert "timings are not meaningful" in out and "no GPU: no device time" in out
        assert "kernels ms" not in out and "GPU span" not in out and "by device time" not in out
    with pytest.raises(SystemExit):
        train_step.main(["--shape", "smoke", "--compile-backend", "eager"])


# ----------------------------------------------------------------------------- nsys.sh / ncu.sh
def _fake_tools(tmp_path, details_lines=5000):
    """A directory with stand-ins for nsys, ncu and python that log their arguments to ``log`` and
    write the report named by ``-o`` (ncu's ``--import`` prints a long details page)."""
    import stat

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "log"
    scripts = {
        "nsys": 'if [[ "$1" == profile && -z "${NO_REPORT:-}" ]]; then\n'
                '  while [[ $# -gt 0 ]]; do [[ "$1" == -o ]] && touch "$2.nsys-rep"; shift; done\nfi\n',
        "ncu": 'if [[ " $* " == *" --page raw "* ]]; then echo "    smsp__issue_stalled_barrier 1.0"; exit 0; fi\n'
               'if [[ " $* " == *" --import "* ]]; then\n'
               f'  for i in $(seq 1 {details_lines}); do echo "    Metric $i ...................... 1.0"; done\n'
               '  exit 0\nfi\n'
               'if [[ -z "${NO_REPORT:-}" ]]; then\n'
               '  while [[ $# -gt 0 ]]; do [[ "$1" == -o ]] && touch "$2.ncu-rep"; shift; done\nfi\n'
               'exit "${APP_STATUS:-0}"\n',
        "python": "",
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "{name} $*" >> "{log}"\n' + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir, log


def _run_script(name, args, env, where=None):
    """Run ``profiling/<name>`` (or its copy in ``where``) with bash from another directory."""
    import subprocess

    script = os.path.join(where or os.path.join(ROOT, "profiling"), name)
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, env=dict(os.environ, **env),
                          cwd="/")


@pytest.mark.skipif(not __import__("shutil").which("bash"), reason="needs bash")
def test_ncu_script_profiles_the_measured_steps_and_prints_the_page(tmp_path):
    """ncu.sh profiles inside the measured steps (``--profile-from-start off``; train_step.py calls
    cudaProfilerStart after its warm-up), names the report after the regex without its special
    characters, and prints the whole details page with exit status 0 (it piped the page into
    ``head -n 120`` under ``pipefail``: a page longer than the pipe buffer ended the script with
    141), then the warp-stall metrics of the raw page. A profiled program that fails still gets its
    pages printed, and its status returned. A run that profiled nothing says so."""
    bin_dir, log = _fake_tools(tmp_path)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "NCU_OUT": str(tmp_path / "out" / "report"),
           "PYTHON": str(bin_dir / "python")}
    done = _run_script("ncu.sh", ["_attn_(fwd|bwd)", "--shape", "tao bao"], env)
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert len(done.stdout.splitlines()) == 5001 and done.stdout.splitlines()[-1].endswith("stalled_barrier 1.0")
    profile, show, stalls = log.read_text().splitlines()[:3]
    assert stalls.endswith("--page raw --print-units base --metrics regex:issue_stalled"), stalls
    assert profile.startswith("ncu --profile-from-start off --kernel-name regex:_attn_(fwd|bwd) --launch-skip 0 "
                              "--launch-count 1 --set full"), profile
    assert profile.endswith(f"-o {tmp_path}/out/report {bin_dir}/python {ROOT}/profiling/train_step.py "
                            "--steps 2 --warmup 3 --shape tao bao"), profile
    assert show == f"ncu --import {tmp_path}/out/report.ncu-rep --page details --print-units base"

    # the default report path, next to the script (a copy here), named after the regex
    import shutil

    copy = tmp_path / "profiling"
    copy.mkdir()
    for name in ("ncu.sh", "_nsight.sh"):
        shutil.copy(os.path.join(ROOT, "profiling", name), copy / name)
    env.pop("NCU_OUT")
    log.unlink()
    done = _run_script("ncu.sh", ["_attn_(fwd|bwd)"], dict(env, NCU_SKIP="4"), where=copy)
    assert done.returncode == 0, done.stderr
    assert f"-o {copy}/out/ncu-_attn__fwd_bwd_ " in log.read_text() and " --launch-skip 4 " in log.read_text()
    assert (copy / "out" / "ncu-_attn__fwd_bwd_.ncu-rep").exists()

    # one call of ops instead of training steps (op_kernels.py brackets its calls itself)
    log.unlink()
    done = _run_script("ncu.sh", ["_glce_(fwd|bwd)_kernel", "--ops", "gated_lce_seq", "--shape", "taobao-b64k"],
                       dict(env, NCU_SCRIPT="op_kernels", NCU_COUNT="2"), where=copy)
    assert done.returncode == 0, done.stderr
    profile = log.read_text().splitlines()[0]
    assert " --launch-count 2 --set full --clock-control none " in profile, profile
    assert profile.endswith(f"{bin_dir}/python {copy}/op_kernels.py --ncu --calls 1 --warmup 3 --ops gated_lce_seq "
                            "--shape taobao-b64k"), profile
    done = _run_script("ncu.sh", ["_x"], dict(env, NCU_SCRIPT="nsys"), where=copy)
    assert done.returncode == 2 and "NCU_SCRIPT must be train_step or op_kernels" in done.stderr
    # the profiled program failed after some launches were profiled: the pages, then its status
    done = _run_script("ncu.sh", ["_x"], dict(env, APP_STATUS="3"), where=copy)
    assert done.returncode == 3 and len(done.stdout.splitlines()) == 5001, (done.returncode, done.stderr)

    env.update(NO_REPORT="1", NCU_OUT=str(tmp_path / "none"))
    done = _run_script("ncu.sh", ["_no_such_kernel"], env)
    assert done.returncode == 1 and "no launch of a kernel matching 'regex:_no_such_kernel'" in done.stderr


@pytest.mark.skipif(not __import__("shutil").which("bash"), reason="needs bash")
def test_nsys_script_command_lines_and_missing_tools(tmp_path):
    """nsys.sh records the cudaProfilerApi capture range with CUDA and NVTX traced, then prints the
    three stats reports (re-exporting the SQLite file, never reusing an earlier run's); arguments
    with spaces reach train_step.py intact. Without nsys it says where it looked and what to use
    instead; a run that records nothing says so (it used to print the stats of the last run's report)."""
    bin_dir, log = _fake_tools(tmp_path)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "NSYS_OUT": str(tmp_path / "rep"),
           "PYTHON": str(bin_dir / "python")}
    done = _run_script("nsys.sh", ["--shape", "tao bao", "--backend", "triton"], env)
    assert done.returncode == 0, done.stderr
    profile, stats = log.read_text().splitlines()
    assert profile == (f"nsys profile --trace=cuda,nvtx --capture-range=cudaProfilerApi --capture-range-end=stop "
                       f"--force-overwrite=true -o {tmp_path}/rep {bin_dir}/python {ROOT}/profiling/train_step.py "
                       "--shape tao bao --backend triton")
    assert stats == (f"nsys stats --force-export=true --report nvtx_sum --report nvtx_gpu_proj_sum "
                     f"--report cuda_gpu_kern_sum {tmp_path}/rep.nsys-rep")

    done = _run_script("nsys.sh", [], dict(env, NSYS=str(tmp_path / "no-nsys")))
    assert done.returncode == 127 and "no-nsys" in done.stderr and "not an executable" in done.stderr
    done = _run_script("nsys.sh", [], dict(env, NO_REPORT="1"))
    assert done.returncode == 1 and "wrote no" in done.stderr


@pytest.mark.skipif(not __import__("shutil").which("bash"), reason="needs bash")
@pytest.mark.parametrize("script", ["nsys.sh", "ncu.sh"])
def test_nsight_scripts_print_their_usage_and_refuse_the_torch_profiler(script, tmp_path):
    """-h/--help prints the header comment's usage with status 0 and runs nothing (ncu.sh took it for
    the kernel regex, nsys.sh passed it to train_step.py under nsys); --torch-profiler, which wants
    CUPTI as Nsight does, is refused with status 2 before anything runs."""
    bin_dir, log = _fake_tools(tmp_path)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "NSYS_OUT": str(tmp_path / "rep"),
           "NCU_OUT": str(tmp_path / "rep"), "PYTHON": str(bin_dir / "python")}
    for flag in ("-h", "--help"):
        done = _run_script(script, [flag], env)
        assert done.returncode == 0 and done.stdout.startswith(("Training steps under Nsight Systems",
                                                                "Nsight Compute (--set full)")), done
        assert f"profiling/{script} " in done.stdout and "Environment:" in done.stdout and "#" not in done.stdout
    args = ["--shape", "smoke", "--torch-profiler"] if script == "nsys.sh" else ["_attn_fwd", "--torch-profiler"]
    done = _run_script(script, args, env)
    assert done.returncode == 2 and "--torch-profiler" in done.stderr and "CUPTI" in done.stderr, done
    assert not log.exists()


@pytest.fixture(scope="module")
def op_kernels():
    yield from _with_bench("op_kernels")


def test_op_kernels_table_lists_every_device_kernel_per_call(op_kernels):
    """The per-call table keeps every device kernel row (cuBLAS, Inductor's, this package's, a
    memset), not host rows (whose self device time repeats their kernels') nor user annotations; it
    divides by the calls, sorts by device time and sums all kernels for the op's device time."""
    import torch
    from types import SimpleNamespace as Row

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    gemm = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off"
    rows = [Row(key="aten::mm", device_type=cpu, count=60, self_device_time_total=2400.0),
            Row(key="_lr_fwd_kernel", device_type=cpu, count=20, self_device_time_total=0.0),
            Row(key="_lr_fwd_kernel", device_type=cuda, count=20, self_device_time_total=600.0),
            Row(key="triton_per_fused_mul_sum_0", device_type=cuda, count=40, self_device_time_total=300.0),
            Row(key=gemm, device_type=cuda, count=60, self_device_time_total=2400.0),
            Row(key="Memset (Device)", device_type=cuda, count=20, self_device_time_total=40.0),
            Row(key="CompiledFunction", device_type=cuda, count=20, self_device_time_total=9_000.0,
                is_user_annotation=True)]
    assert op_kernels.per_call_rows(rows, calls=20) == [
        (gemm, 3.0, 120.0, 40.0), ("_lr_fwd_kernel", 1.0, 30.0, 30.0),
        ("triton_per_fused_mul_sum_0", 2.0, 15.0, 7.5), ("Memset (Device)", 1.0, 2.0, 2.0)]
    table = op_kernels.per_call_table(rows, calls=20).splitlines()
    assert len(table) == 6 and table[0].split() == ["kernel", "launches/call", "us/call", "us/launch"]
    assert table[1].startswith(f"  {gemm[:57]}... ") and table[1].split()[1:] == ["3.0", "120.00", "40.00"]
    assert table[3].split() == ["triton_per_fused_mul_sum_0", "2.0", "15.00", "7.50"]
    assert table[5] == "  all kernels: 167.00 us of device time per call, 7.0 kernels per call"


def test_op_kernels_runs_each_provider_once_without_a_gpu(op_kernels, capsys):
    """On the smoke shape each provider's callable is built and run (the fused one launches its two
    kernels per call); without a GPU the script says there is nothing to time and prints no time,
    on a GPU it prints each provider's kernel table."""
    import torch

    from interformer.profiling import triton_launches

    argv = ["--shape", "smoke", "--calls", "1", "--ops", "dot_interaction", "--providers", "fused,eager"]
    with triton_launches() as launches:
        assert op_kernels.main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("CUDA kernels of one plain forward+backward call: ")
    assert "shape smoke, 1 calls, --set none" in lines[0]
    if torch.cuda.is_available():
        # the benchmark's own check when it is built, 3 warm-up calls, 1 profiled
        assert dict(launches) == {"_dot_fwd_kernel": 5, "_dot_bwd_kernel": 5}
        assert "no GPU" not in out and out.count("all kernels: ") == 2
        fused = lines[lines.index("dot_interaction, fused:") + 2:]
        assert {fused[0].split()[0], fused[1].split()[0]} == {"_dot_fwd_kernel", "_dot_bwd_kernel"}
    else:
        assert dict(launches) == {"_dot_fwd_kernel": 2, "_dot_bwd_kernel": 2}  # the benchmark's check, our call
        assert lines[1:] == ["dot_interaction, fused: built and ran once on the CPU",
                             "dot_interaction, eager: built and ran once on the CPU",
                             "no GPU: each callable above ran once on the CPU; there are no device kernels to "
                             "time, so no times are printed"]
    assert op_kernels.main(argv[:-1] + ["compile"]) == 0
    if not torch.cuda.is_available():  # the benchmark's skip, with its reason, not a failure
        assert "dot_interaction, compile: skipped by the benchmark: compile: GPU only" in capsys.readouterr().out


def test_op_kernels_ncu_mode_brackets_the_calls_for_an_outside_profiler(op_kernels, monkeypatch):
    """``--ncu``: the warm-up calls run before ``cudaProfilerStart``, the measured ones between it and
    ``cudaProfilerStop`` (synchronised before the stop, so their kernels ran inside), with no
    ``torch.profiler`` (its CUPTI session and Nsight Compute's would share the device); the stop
    comes even when a call fails. The flag reaches :func:`run_one`."""
    import torch

    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: events.append("start"))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: events.append("stop"))
    monkeypatch.setattr(torch.profiler, "profile", lambda *a, **k: pytest.fail("torch.profiler under --ncu"))
    op_kernels.bracketed(lambda: events.append("call"), calls=2, warmup=3)
    assert events == ["call"] * 3 + ["sync", "start", "call", "call", "sync", "stop"]

    def failing():
        raise RuntimeError("boom")
    events.clear()
    with pytest.raises(RuntimeError):
        op_kernels.bracketed(failing, calls=1, warmup=0)
    assert events == ["sync", "start", "stop"]

    seen = []
    monkeypatch.setattr(op_kernels, "run_one", lambda *a: seen.append(a) or True)
    assert op_kernels.main(["--ncu", "--calls", "1", "--ops", "dot_interaction", "--providers", "fused"]) == 0
    assert seen and seen[0][-1] is True


def test_op_kernels_set_applies_and_restores_settings(op_kernels):
    """``--set`` holds a kernel module's setting inside the block only (an error inside included),
    parses ints and None, and refuses unknown modules and attributes; a provider's own benchmark
    setting (``fused-phases``), undone once the callable is captured, is held again around its calls."""
    from interformer.kernels import crossnet, gated_lce

    before = (gated_lce.GW_MODE, crossnet.LOW_RANK_ROW_WARPS, crossnet.LOW_RANK_BACKWARD)
    with op_kernels.settings(["gated_lce.GW_MODE=store", "crossnet.LOW_RANK_ROW_WARPS=8"]):
        assert gated_lce.GW_MODE == "store" and crossnet.LOW_RANK_ROW_WARPS == 8
    assert (gated_lce.GW_MODE, crossnet.LOW_RANK_ROW_WARPS, crossnet.LOW_RANK_BACKWARD) == before
    with pytest.raises(RuntimeError), op_kernels.settings(["crossnet.LOW_RANK_BACKWARD=phases"]):
        assert crossnet.LOW_RANK_BACKWARD == "phases"
        raise RuntimeError
    assert crossnet.LOW_RANK_BACKWARD == before[2]
    assert op_kernels.parse_setting("gated_lce.GW_MODE=None")[1:] == ("GW_MODE", None)
    assert op_kernels.parse_setting("crossnet.LOW_RANK_ROW_WARPS=16")[2] == 16
    for bad in ("no_such_module.X=1", "gated_lce.NO_SUCH=1", "gated_lce.gated_lce=1", "gated_lce.GW_MODE"):
        with pytest.raises(ValueError), op_kernels.settings(["gated_lce.GW_MODE=store", bad]):
            pass
        assert gated_lce.GW_MODE == before[0]
        with pytest.raises(SystemExit):
            op_kernels.main(["--set", bad, "--ops", "dot_interaction", "--shape", "smoke"])

    fn, patches = op_kernels.build("crossnet_low", "fused-phases", "smoke")
    assert callable(fn) and crossnet.LOW_RANK_BACKWARD == before[2]
    with op_kernels.with_patches(patches):
        assert crossnet.LOW_RANK_BACKWARD == "phases"
    assert crossnet.LOW_RANK_BACKWARD == before[2]


def test_near_one_hot_emulation_replays_the_interpreter():
    """``profiling/near_one_hot_emulation.py``'s model of IEEE arithmetic gives the dq and dk errors
    the kernels give under the interpreter on the two-key near one-hot case (its GPU models are only
    as good as this replay): pivoted, as the fp32 backward forms dS, within 1% (4.26e-6 against
    4.22e-6); unpivoted, within 0.2% of eager's, which rounds delta as the unpivoted dS did (dv, at
    rounding level, is not compared). And its GPU model makes the unpivoted dq worse than the
    pivoted one by orders of magnitude."""
    import numpy as np
    import torch

    from interformer import reference as R
    from interformer.kernels import attention as A
    from test_kernel_attention import _near_one_hot_case, _run_near_one_hot

    emu = _load("near_one_hot_emulation")
    case = _near_one_hot_case(2, [2, 1, 2], True, None)
    ref = emu.exact(case)
    ieee = emu.MODELS["interpreter (ieee dots, exact exp2, ieee /)"]

    def errors(**kw):
        return [emu.rel(x, r) for x, r in zip(emu.run_case(case, emu.Model(**kw, rng=np.random.default_rng(0))), ref)]

    fused = [t.detach().cpu().double().numpy() for t in _run_near_one_hot(case, A.attention, torch.float32)[1:]]
    eager = [t.detach().cpu().double().numpy() for t in _run_near_one_hot(case, R.attention, torch.float32)[1:]]
    kernel = [emu.rel(x, r) for x, r in zip(fused, ref)]
    unpivoted = [emu.rel(x, r) for x, r in zip(eager, ref)]  # eager rounds delta as the old dS did
    for got, want, tol in zip(errors(**ieee, pivot=True)[:2] + errors(**ieee, pivot=False)[:2],
                              kernel[:2] + unpivoted[:2], (0.02, 0.02, 0.005, 0.005)):
        assert abs(got - want) <= tol * want, (got, want)
    gpu = dict(emu.MODELS["tf32x3 + ex2 + lg2 + FMA + div.full (GPU)"])
    assert errors(**gpu, pivot=False)[0] > 100 * errors(**gpu, pivot=True)[0]
