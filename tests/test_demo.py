"""The demo (`make demo`) end to end at a small size: eager and fused agree, both throughputs and
the metrics table are printed."""

from __future__ import annotations

import re

import torch

from interformer.__main__ import main


def test_demo_prints_agreement_throughputs_and_metrics(capsys):
    assert main(["demo", "--train-samples", "512", "--test-samples", "256", "--batch-size", "128", "--no-progress"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"rel\. diff logits (\S+), loss (\S+), worst parameter gradient (\S+)", out)
    assert m, out
    logits, loss, grad = (float(v) for v in m.groups())
    # the demo's model-level fp32 bound on the CPU (interpreter) path (agreement_tolerance; not DESIGN §5's per-op one)
    assert logits < 1e-4 and loss < 1e-4 and grad < 1e-4, out
    from interformer.demo import agreement_tolerance

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the demo runs by default
    assert f"they agree: each difference must be at most {agreement_tolerance(dev):g}" in out, out
    assert not _credits_the_demo_bound_to_design(out), out
    m = re.search(r"eager ([\d,.]+) samples/s, fused ([\d,.]+) samples/s", out)
    assert m and all(float(v.replace(",", "")) > 0 for v in m.groups()), out

    if not torch.cuda.is_available():  # the note on what CPU (interpreter) throughput means
        assert "interpreter" in out
    row = re.search(r"^\s+eager\s+(\S+)\s+(\S+)\s+([\d,]+)\s+([\d,]+)$", out, re.M)
    assert row, out
    auc, ll = float(row.group(1)), float(row.group(2))
    assert 0.0 <= auc <= 1.0 and ll > 0


def _credits_the_demo_bound_to_design(text: str) -> list:
    """The sentences of ``text`` that give the demo's CPU bound (:func:`agreement_tolerance`'s, as
    1e-4 or 0.0001) beside "DESIGN §5" without saying that it is not DESIGN §5's."""
    from interformer.demo import agreement_tolerance

    tol = agreement_tolerance(torch.device("cpu"))
    forms = {f"{tol:g}", f"{tol:.0e}".replace("e-0", "e-")}
    sentences = re.split(r"(?<=[.)])\s+(?=[A-Z`(])", " ".join(text.split()))
    return [s for s in sentences if "DESIGN §5" in s and any(f in s for f in forms) and "not DESIGN §5's" not in s]


def test_the_demo_bound_is_the_projects_not_design_5s():
    """DESIGN §5 bounds each op, fp32 at 1e-5 under the interpreter; the demo's CPU bound, 1e-4, is one
    for a whole model that the project chose (:func:`agreement_tolerance`). The README, that
    docstring and the demo's output called 1e-4 DESIGN §5's bound; where they name DESIGN §5 beside
    it now, they say it is not DESIGN's (the printed line: the demo test above)."""
    from pathlib import Path

    from interformer.demo import agreement_tolerance

    root = Path(__file__).resolve().parents[1]
    design = re.search(r"fp32 ≤ (\S+) \(interpreter\)", (root / "DESIGN.md").read_text(encoding="utf-8"))
    assert design and float(design.group(1)) < agreement_tolerance(torch.device("cpu"))
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "1e-4 on a CPU" in readme  # the README still gives the bound
    for text in (readme, agreement_tolerance.__doc__):
        assert not _credits_the_demo_bound_to_design(text)


def test_demo_progress_bar_only_where_it_renders(monkeypatch):
    """The epoch bar draws on a terminal; with stderr a pipe or file (a CI log would get every
    redraw as text), or with ``--no-progress``, there is no bar at all: the batches come back as
    they are, so the loop reads no loss back for a postfix."""
    import io
    import sys

    from interformer.demo import _progress
    from utils import TerminalStream as Terminal

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)  # not inside Jupyter (which draws)
    batches = range(3)
    for stream, no_progress, drawn in ((Terminal(), False, True), (io.StringIO(), False, False), (Terminal(), True, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        bar = _progress(batches, 3, "epoch", no_progress)
        assert (bar is not batches) == drawn, (type(stream).__name__, no_progress)
        assert list(bar) == [0, 1, 2]
        assert bool(stream.getvalue()) == drawn, (type(stream).__name__, no_progress, stream.getvalue())


def _bad_flag(capsys, argv):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2  # argparse's usage error, before anything runs
    return capsys.readouterr().err


def test_demo_count_flags_must_be_positive_integers(capsys):
    """--batch-size 0 divided by zero, -4 trained on nothing and printed numbers, --test-samples 0
    failed inside torch.cat: argparse now refuses them, naming the flag."""
    import argparse

    import pytest

    from interformer.demo import run_demo

    for flag in ("--train-samples", "--test-samples", "--batch-size", "--epochs"):
        for value in ("0", "-4"):
            err = _bad_flag(capsys, ["demo", flag, value, "--no-progress"])
            assert f"argument {flag}: must be a positive integer (>= 1), got {value}" in err, err
        err = _bad_flag(capsys, ["demo", flag, "2.5"])
        assert f"argument {flag}: expected a positive integer, got '2.5'" in err, err
    err = _bad_flag(capsys, ["evaluate", "x.pt", "--batch-size", "0"])
    assert "argument --batch-size: must be a positive integer" in err, err
    # a hand-built args (run_demo called from Python) is checked too, before any work
    args = argparse.Namespace(train_samples=64, test_samples=64, batch_size=0, epochs=1, lr=2e-3, seed=0,
                              device="cpu", no_progress=True)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        run_demo(args)
    assert capsys.readouterr().out == ""


def test_interpret_on_cpu_whenever_the_command_runs_on_the_cpu(monkeypatch):
    """TRITON_INTERPRET=1 whenever the run is on the CPU (--device cpu, or no GPU and no --device),
    also on a machine with a GPU (it was set only where no GPU exists); not for a CUDA run."""
    import interformer.__main__ as cli

    for gpu, device, expected in ((True, "cpu", "1"), (True, "cpu:0", "1"), (True, None, None), (True, "cuda", None),
                                  (False, None, "1"), (False, "cpu", "1"), (False, "", "1"), (True, "", None)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        cli._interpret_on_cpu(device)
        assert __import__("os").environ.get("TRITON_INTERPRET") == expected, (gpu, device)


def test_demo_device_cpu_on_a_gpu_host_runs_the_fused_check_in_the_interpreter():
    """`demo --device cpu` where torch.cuda.is_available() is True (simulated, in a fresh process
    without TRITON_INTERPRET): the interpreter is switched on before triton is imported, and the
    eager-vs-fused check runs on the CPU tensors (real Triton failed: "0 active drivers")."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import os, sys, torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "import interformer.__main__ as cli\n"
        "rc = cli.main(['demo', '--device', 'cpu', '--train-samples', '64', '--test-samples', '64',"
        " '--batch-size', '64', '--no-progress'])\n"
        "print('TRITON_INTERPRET =', os.environ.get('TRITON_INTERPRET'))\n"
        "sys.exit(rc)\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "TRITON_INTERPRET = 1" in res.stdout, res.stdout
    m = re.search(r"rel\. diff logits (\S+), loss (\S+), worst parameter gradient (\S+)", res.stdout)
    assert m and all(float(v) < 1e-4 for v in m.groups()), res.stdout


def test_run_demo_on_the_cpu_without_the_interpreter_skips_the_fused_check(monkeypatch, capsys):
    """run_demo called from Python on the CPU with TRITON_INTERPRET unset (``python -m interformer
    demo`` sets it; a caller of run_demo may not): real Triton cannot launch on CPU tensors, so the
    eager-vs-fused check is skipped with a note instead of failing in Triton's driver."""
    import argparse

    from interformer.demo import run_demo

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    run_demo(argparse.Namespace(train_samples=64, test_samples=64, batch_size=64, epochs=1, lr=2e-3, seed=0,
                                device="cpu", no_progress=True))
    out = capsys.readouterr().out
    assert "the kernels need Triton's interpreter" in out and "skipping the eager-vs-fused check" in out, out
    assert "rel. diff logits" not in out and "fused throughput above" not in out, out
    assert re.search(r"^\s+eager\s+\S+\s+\S+", out, re.M), out


def test_demo_says_why_an_auc_is_undefined(monkeypatch, capsys):
    """With one test sample (one label class) the demo's AUC is nan, and a note says why; it was a
    bare nan, where train and evaluate explain theirs."""
    import argparse

    from interformer.demo import run_demo

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the eager path alone: the check is skipped
    run_demo(argparse.Namespace(train_samples=8, test_samples=1, batch_size=4, epochs=1, lr=2e-3, seed=0,
                                device="cpu", no_progress=True))
    out = capsys.readouterr().out
    assert re.search(r"^\s+eager\s+nan\s", out, re.M), out
    assert "note: the eager path's AUC is undefined: the test samples hold one label class only" in out, out


def test_demo_throughput_leaves_out_the_warm_up_steps(monkeypatch):
    """The demo's samples/s start after the first steps, which compile the Triton kernels on a GPU
    (seconds, once): a clock that charges 10 s to each warm-up step and 1 s to every later one must
    give the later steps' rate; with no step past the warm-up, every step counts."""
    from interformer import demo

    clock = {"t": 0.0}
    monkeypatch.setattr(demo.time, "perf_counter", lambda: clock["t"])
    meter = demo._Throughput(torch.device("cpu"))
    for i in range(demo.WARMUP_STEPS + 4):
        clock["t"] += 10.0 if i < demo.WARMUP_STEPS else 1.0
        meter.step(8)
    assert meter.rate() == 8.0

    clock["t"] = 0.0
    short = demo._Throughput(torch.device("cpu"), warmup=3)
    for _ in range(2):
        clock["t"] += 10.0
        short.step(5)
    assert short.rate() == 0.5


def test_the_warm_up_note_says_what_the_numbers_leave_out():
    from argparse import Namespace

    from interformer import demo

    def note(train, test, batch, epochs=1):
        return demo.warmup_note(Namespace(train_samples=train, test_samples=test, batch_size=batch, epochs=epochs))

    assert note(16384, 4096, 256) == ("samples/s leave out the first 3 training steps and the first inference batch: "
                                      "warm-up (on a GPU, kernel compilation too)")
    assert note(512, 256, 128) == ("samples/s leave out the first 3 training steps: warm-up (on a GPU, kernel "
                                   "compilation too)")
    assert note(300, 256, 128).startswith("samples/s include every step")  # 3 steps: none past the warm-up
    assert note(300, 256, 128, epochs=2).startswith("samples/s leave out the first 3 training steps")


def test_throughputs_below_100_per_second_keep_three_digits():
    """A run of a few samples on a slow machine printed "0 samples/s"."""
    from interformer.train import _epoch_line, rate

    assert [rate(x) for x in (0.4567, 12.345, 99.94, 100.4, 123456.7)] == ["0.457", "12.3", "99.9", "100", "123,457"]
    assert rate(float("nan")) == "nan"
    assert "0.5 samples/s" in _epoch_line({"epoch": 1, "train_loss": 0.7, "train_samples_per_s": 0.5})


def test_demo_refuses_a_bad_device_lr_or_seed_before_any_work(monkeypatch, capsys):
    """--device foo failed in torch.device (RuntimeError), --device meta was taken for the CPU and
    failed inside the training loop, --device cuda without CUDA failed after the header with
    "Torch not compiled with CUDA enabled", --lr inf trained to NaN and printed a table of NaNs, and
    a seed past 64 bits, or one whose last epoch's seed (seed + epochs - 1) is, overflowed in a
    generator: each is a ValueError naming the setting now, before anything is printed."""
    import argparse

    import pytest

    from interformer.demo import run_demo

    def args(**kw):
        base = dict(train_samples=64, test_samples=64, batch_size=64, epochs=1, lr=2e-3, seed=0, device="cpu",
                    no_progress=True)
        base.update(kw)
        return argparse.Namespace(**base)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = [(dict(device="foo"), "device must be cpu or cuda"), (dict(device="meta"), "device must be cpu or cuda"),
             (dict(device="cuda:-1"), "device must be cpu or cuda"),
             (dict(device="cuda"), "CUDA is not available here"),
             (dict(lr=float("inf")), "lr must be a finite number >= 0, got inf"),
             (dict(lr=float("nan")), "lr must be a finite number >= 0"),
             (dict(lr=-1.0), "lr must be a finite number >= 0, got -1.0"),
             (dict(seed=2**64 - 7), r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 8\]"),
             (dict(seed=-2**63 - 1), "seed must be an integer"),
             # the epochs' batch-order seeds, seed + epoch: passed, then overflowed in the ninth epoch
             (dict(seed=2**64 - 8, epochs=9), rf"seed must be at most 2\*\*64 - epochs \({2**64 - 9}\) for 9 epochs"),
             (dict(seed=2**64 - 9, epochs=10), "seed must be at most 2\\*\\*64 - epochs")]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            run_demo(args(**kw))
        assert capsys.readouterr().out == "", kw
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"this machine has 1 CUDA device\(s\), cuda:0 to cuda:0"):
        run_demo(args(device="cuda:3"))
    assert capsys.readouterr().out == ""
    from interformer.demo import demo_device

    assert demo_device("cuda:0") == torch.device("cuda:0") and demo_device(None) == torch.device("cuda")
    assert demo_device("cpu") == torch.device("cpu")
    assert demo_device("") == torch.device("cuda")  # empty: unset, as train, evaluate and score read it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo_device(None) == demo_device("") == torch.device("cpu")


def test_the_largest_seed_the_epochs_allow_runs_every_epoch(monkeypatch, capsys):
    """``--seed 2**64 - 9 --epochs 9``: the ninth epoch's batch order takes seed + 8 = 2**64 - 1, the
    generators' largest seed, so the check above lets it through and the run ends (a seed one larger
    is refused there)."""
    import argparse

    from interformer import demo

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # no eager-vs-fused check: this test is about the seeds
    args = argparse.Namespace(train_samples=4, test_samples=4, batch_size=4, epochs=9, lr=2e-3, seed=2**64 - 9,
                              device="cpu", no_progress=True)
    assert demo.run_demo(args) is True
    assert re.search(r"^\s+eager\s+\S+\s+\S+\s+[\d,]+\s+[\d,]+$", capsys.readouterr().out, re.M)


def test_demo_prints_the_metrics_of_its_held_out_logits_and_is_reproducible(monkeypatch, capsys):
    """The table's AUC and LogLoss are those of the held-out logits (checked against scikit-learn),
    and a second run with the same seed prints the same metrics."""
    import argparse

    import numpy as np
    import sklearn.metrics as skm

    from interformer import demo

    captured = []
    evaluate = demo.evaluate

    def spy(model, data, batch_size, device):
        logits, sps = evaluate(model, data, batch_size, device)
        captured.append((logits.double().numpy(), data.label.numpy()))
        return logits, sps

    monkeypatch.setattr(demo, "evaluate", spy)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # no eager-vs-fused check: this test is about the table
    args = argparse.Namespace(train_samples=96, test_samples=80, batch_size=32, epochs=1, lr=2e-3, seed=3,
                              device="cpu", no_progress=True)
    rows = []
    for _ in range(2):
        demo.run_demo(args)
        out = capsys.readouterr().out
        row = re.search(r"^\s+eager\s+(\S+)\s+(\S+)\s+([\d,]+)\s+([\d,]+)$", out, re.M)
        assert row, out
        rows.append((row.group(1), row.group(2)))
    logits, labels = captured[0]
    assert rows[0] == (f"{skm.roc_auc_score(labels, logits):.4f}",
                       f"{skm.log_loss(labels, 1 / (1 + np.exp(-logits)), labels=[0, 1]):.4f}")
    assert rows[1] == rows[0]
    np.testing.assert_array_equal(captured[0][0], captured[1][0])


def test_the_demo_command_reports_a_bad_setting_as_a_usage_error(capsys):
    """``python -m interformer demo --lr inf`` (checked by the demo before any work) exits as argparse
    does for its own flags: status 2, the usage and the message, no traceback."""
    import pytest

    from interformer.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--lr", "inf", "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "error: lr must be a finite number >= 0, got inf" in err and "Traceback" not in err


def test_a_nan_gradient_on_the_fused_path_is_a_disagreement(monkeypatch, capsys):
    """One parameter's fused gradient NaN (not the first: Python's max() keeps a NaN only when it
    comes first, so the worst difference read 0 and the demo and the test above passed; a review's
    find, 2026-11-29): the worst gradient difference is NaN, the demo says the paths disagree and
    ``python -m interformer demo`` exits 1 (the test above sees it say they agree, as they do)."""
    import math

    from interformer import demo
    from interformer.config import InterFormerConfig
    from interformer.data import make_synthetic

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the demo runs by default
    small = ["demo", "--train-samples", "64", "--test-samples", "64", "--batch-size", "64", "--no-progress"]
    real = demo.optimize_available

    def poisoned(model):
        model = real(model)
        last = list(model.parameters())[-1]
        last.register_hook(lambda g: torch.full_like(g, float("nan")))
        return model

    monkeypatch.setattr(demo, "optimize_available", poisoned)
    cfg = InterFormerConfig(d_model=16, num_heads=1, num_layers=1, max_seq_len=8, pffn_hidden=32, head=(32,),
                            dcn_rank=4, backend="eager")
    diff = demo.compare_paths(cfg, make_synthetic(4, cfg, seed=3), dev)
    assert math.isnan(diff["max_grad"]) and diff["logits"] <= demo.agreement_tolerance(dev), diff
    assert main(small) == 1
    out = capsys.readouterr().out
    assert "THEY DISAGREE" in out and "worst parameter gradient nan" in out and "exit status 1" in out, out
