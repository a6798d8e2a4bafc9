"""``bench/gpu_session.sh``, the script a GPU lease runs, run here on the CPU with tiny selections.

Why: a lease is short and rare, and a change to the script that nobody ran costs it. On the H200
lease of 2026-11-27 (third) the tests stage hung after every shard had ended: its bare ``wait``
also waited on the console's ``tee``. The device tool cut the call at its limit, and the stage's
logs were lost with a third of the lease (bench/results/nvidia-h200-2026-11-27c.md). Here the
tests stage and one benchmark stage must end, and pack what the device tool brings back
(``results.tgz``) with each stage's logs and the console log in it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_session.sh"


def _run(tmp_path: Path, env: dict, *stages: str) -> tuple[int, str, dict]:
    """Run the script with ``stages``; returns its exit status, its console and the packed files by
    name. Fails the test if the script has not ended after 180 s."""
    out = tmp_path / "out"
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                "OUT": str(out), "PACK": "1", "SKIP_INSTALL": "1", **env}
    proc = subprocess.Popen(["bash", str(SCRIPT), "HEAD", *stages], cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:  # about 12 s on an idle 2-core machine
        console, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script, its shards and its console's tee
        console, _ = proc.communicate()
        pytest.fail(f"bench/gpu_session.sh {' '.join(stages)} did not end in 180 s; its console:\n{console[-3000:]}")
    packed = {}
    if (out / "results.tgz").exists():
        with tarfile.open(out / "results.tgz") as tar:
            packed = {Path(m.name).name: tar.extractfile(m).read().decode(errors="replace")
                      for m in tar.getmembers() if m.isfile()}
    return proc.returncode, console, packed


#: these check the script's plumbing by its CPU output (the interpreter, the smoke shape); on a GPU
#: the lease runs the script itself
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the script's output without a GPU")


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
@CPU_ONLY
def test_the_tests_and_ops_stages_end_and_pack_their_logs(tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("# a comment line, skipped\n"
                   "tests/test_kernel_attention.py::test_invalid_inputs_raise_value_error\n"
                   "tests/test_kernel_attention.py::test_strided_int32_lengths\n")
    rc, console, packed = _run(tmp_path, {
        "TESTS_IDS": str(ids), "TESTS_JOBS": "2", "TESTS_TIMEOUT": "200", "OPS_TIMEOUT": "200",
        "OPS_FILES": "bench/test_bench_dot_interaction.py",
        "OPS_K": "smoke and fwd and (fused or eager) and not compile and not cudagraph",
    }, "tests", "ops")
    assert rc == 0, console[-3000:]
    assert "2 tests in 2 shards" in console
    assert console.count("exit 0") >= 2 and "exit 1" not in console and "exit 124" not in console, console[-3000:]
    expected = {"tests.log", "tests_summary.txt", "session.log", "env.txt", "ops.jsonl", "ops.md"}
    assert expected <= set(packed), sorted(packed)
    assert packed["tests.log"].count("1 passed") == 2, packed["tests.log"][-2000:]
    assert "== stage tests took" in packed["session.log"] and "== stage ops took" in packed["session.log"]
    assert len(packed["ops.jsonl"].splitlines()) == 2  # eager and fused rows, as measured
    assert "device: cpu" in packed["env.txt"]


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
@CPU_ONLY
def test_the_kernels_stage_runs_each_argument_set_and_packs_its_log(tmp_path):
    """The ``kernels`` stage (profiling/op_kernels.py) runs once per ";"-separated set of
    ``KERNELS_ARGS`` and packs the log of all of them (on the CPU: the callables run once, no times)."""
    rc, console, packed = _run(tmp_path, {
        "KERNELS_ARGS": "--shape smoke --calls 1 --ops dot_interaction --providers fused;"
                        "--shape smoke --calls 1 --ops layernorm_dhen --providers eager",
    }, "kernels")
    assert rc == 0, console[-3000:]
    assert console.count("op_kernels --shape smoke") == 2 and console.count(" exit 0") == 2, console[-3000:]
    log = packed["kernels.log"]
    assert "dot_interaction, fused: built and ran once" in log and "layernorm_dhen, eager: built and ran once" in log
    assert log.count("no device kernels to time") == 2 and "== stage kernels took" in packed["session.log"]


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
@CPU_ONLY
@pytest.mark.parametrize("pack", ["0", "1"])
def test_the_exit_status_says_whether_everything_it_ran_succeeded(tmp_path, pack):
    """0 when every program it ran exited 0, with or without PACK; 1 when one failed, named on the
    last line, the stages after it still run. Until 2026-11-29 it returned the last pack's status:
    1 after any run without PACK=1, 0 with it even when a stage had failed (a review's find)."""
    good = "--shape smoke --calls 1 --ops dot_interaction --providers fused"
    rc, console, _ = _run(tmp_path / "good", {"PACK": pack, "KERNELS_ARGS": good}, "kernels")
    assert rc == 0 and "== failed" not in console, console[-3000:]
    rc, console, packed = _run(tmp_path / "bad", {"PACK": pack, "KERNELS_ARGS": f"--ops no_such_op;{good}"},
                               "kernels")
    assert rc == 1, console[-3000:]
    assert console.rstrip().endswith("== failed: op_kernels --ops no_such_op:2"), console[-3000:]
    assert f"op_kernels {good} exit 0" in console  # the next run still ran
    assert ("session.log" in packed) == (pack == "1")


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
@CPU_ONLY
def test_a_missing_rerun_list_or_commit_is_refused(tmp_path):
    """A TESTS_IDS file that does not exist stops the script (exit 2) instead of running no tests and
    reporting success; no arguments at all print the usage (it was bash's "unbound variable")."""
    rc, console, _ = _run(tmp_path, {"TESTS_IDS": str(tmp_path / "no_such_list.txt")}, "tests")
    assert rc == 2 and "TESTS_IDS: no file" in console and "tests in" not in console, console[-3000:]
    res = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.startswith("usage: bench/gpu_session.sh COMMIT STAGE"), res.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_help_and_bad_arguments_do_nothing_but_answer(tmp_path):
    """-h/--help print the usage and exit 0; a COMMIT without a STAGE, an option for the COMMIT and an
    unknown stage print it and exit 2; none of them installs or writes anything ($OUT is not made).
    Until 2026-12 only "no arguments" was refused: ``--help`` was taken for the COMMIT, the package
    installed (SKIP_INSTALL=1 here, so that a regression cannot re-point this environment), env.txt
    written, and 0 returned."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "SKIP_INSTALL": "1"}
    for args, rc in ((["--help"], 0), (["-h"], 0), (["-h", "tests"], 0), (["HEAD"], 2), (["--help-me", "tests"], 2),
                     (["HEAD", "tests", "no_such_stage"], 2)):
        res = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        usage = res.stdout if rc == 0 else res.stderr
        assert res.returncode == rc and "usage: bench/gpu_session.sh COMMIT STAGE" in usage, (args, res)
        assert "tests ops model" in usage and not out.exists(), (args, res)
    assert "unknown stage no_such_stage" in res.stderr, res.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
@CPU_ONLY
def test_the_ncu_stage_profiles_each_run_and_packs_its_log(tmp_path):
    """The ``ncu`` stage calls profiling/ncu.sh once per ";"-separated run of ``NCU_RUNS`` ("REGEX
    COUNT op_kernels.py flags") with op_kernels.py as the profiled program, and packs each run's
    log as it ends, but not the reports (a stand-in ncu here: it logs its arguments, runs the
    program it wraps and writes the report)."""
    fake = tmp_path / "ncu"
    calls = tmp_path / "ncu_calls"
    fake.write_text('#!/usr/bin/env bash\n'
                    f'printf "%s\\n" "$*" >> "{calls}"\n'
                    'if [[ " $* " == *" --import "* ]]; then echo "  _fake_kernel (1, 1, 1)x(32, 1, 1), CC 9.0"; '
                    'echo "    Duration    us    1.00"; exit 0; fi\n'
                    'out=""; while [[ $# -gt 0 ]]; do case "$1" in -o) out="$2"; shift 2;; '
                    '--profile-from-start|--kernel-name|--launch-skip|--launch-count|--set|--clock-control) shift 2;; '
                    '--force-overwrite) shift;; *) break;; esac; done\n'
                    '"$@" && touch "$out.ncu-rep"\n')
    fake.chmod(0o755)
    rc, console, packed = _run(tmp_path, {
        "NCU": str(fake), "PYTHON": sys.executable,
        "NCU_RUNS": "_dot_(fwd|bwd)_kernel 2 --shape smoke --ops dot_interaction --providers fused;"
                    "_lr_ 3 --shape smoke --ops crossnet_low --providers fused",
    }, "ncu")
    assert rc == 0, console[-3000:]
    assert "ncu _dot_(fwd|bwd)_kernel exit 0" in console and "ncu _lr_ exit 0" in console, console[-3000:]
    assert "_fake_kernel (1, 1, 1)" in console and "Duration" in console
    profiled = [line for line in calls.read_text().splitlines() if "--import" not in line]
    assert len(profiled) == 2 and " --launch-count 2 " in profiled[0] and " --launch-count 3 " in profiled[1]
    assert all("op_kernels.py --ncu --calls 1 --warmup 3 --shape smoke" in line for line in profiled), profiled
    assert "dot_interaction, fused: built and ran once" in packed["ncu-0.log"]
    assert "crossnet_low, fused: built and ran once" in packed["ncu-1.log"]
    assert "== stage ncu took" in packed["session.log"]
    assert not any(name.endswith(".ncu-rep") for name in packed)  # reports stay behind (16 MiB a file)


def test_every_id_of_the_rerun_list_names_a_test():
    """``bench/gpu_rerun.txt`` (the next lease's tests) names each test by id: one that a later
    change renamed or deleted would make its shard fail to collect and run nothing. Every listed id
    must collect here (bf16 cases too: they are collected and skipped without a GPU)."""
    listed = [line for line in (ROOT / "bench" / "gpu_rerun.txt").read_text().splitlines()
              if "::" in line and not line.lstrip().startswith("#")]
    assert listed
    code = "import sys, pytest; sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider'] + sys.argv[1:]))"
    res = subprocess.run([sys.executable, "-c", code, *listed], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    collected = [line for line in res.stdout.splitlines() if "::" in line]
    assert len(collected) >= len(listed), (len(collected), len(listed))
