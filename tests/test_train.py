"""`python -m interformer train` / `evaluate`: end to end on synthetic data, BARS CSV and Parquet;
resume equivalence; early stopping; bad files; settings precedence; two gloo processes under DDP.

Every run is a tiny model on a few hundred rows (seconds on 2 CPU threads)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from interformer import InterFormerConfig
from interformer import train as T
from interformer.__main__ import main
from interformer.data import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(d_model=16, num_heads=2, num_layers=1, pffn_hidden=16, head=[16], dcn_rank=4, max_seq_len=10,
            backend="eager")


def model_flags(skip=("backend",)) -> list:
    return [a for k, v in TINY.items() if k not in skip for a in ("--model", f"{k}={json.dumps(v)}")]


TINY_FLAGS = model_flags()
SYNTH = ["--synthetic-train", "512", "--synthetic-valid", "192", "--batch-size", "64", "--no-progress"]


def tiny_config(out, **kw) -> T.TrainConfig:
    settings = dict(model=dict(TINY), synthetic_train=512, synthetic_valid=192, batch_size=64, epochs=2,
                    progress=False, output_dir=str(out))
    settings.update(kw)
    return T.TrainConfig.from_dict(settings)


def weights(path) -> dict:
    return T.load_checkpoint(path)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_state(a, b, where="state") -> None:
    """Exact equality of nested checkpoint state (dicts, lists, tensors, numbers), keys and lengths
    included: nothing escapes through a ``zip`` that stops at the shorter side."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two checkpoints: the same weights, optimiser states, scheduler states and AMP scaler state."""
    assert_same_weights(a["model"], b["model"])
    for key in ("optimizers", "schedulers", "scaler"):
        assert_same_state(a[key], b[key], key)


def script_validation_aucs(monkeypatch, aucs) -> None:
    """Make each validation report the next AUC of ``aucs`` (its other metrics as measured)."""
    aucs, real = iter(aucs), T.evaluate_split

    def scripted(model, dataset, cfg, device):
        m = real(model, dataset, cfg, device)
        m["auc"] = next(aucs)
        return m

    monkeypatch.setattr(T, "evaluate_split", scripted)


def quiet(*a, **k) -> None:
    pass


def test_state_comparison_sees_a_missing_optimiser_and_scaler_changes():
    """assert_same_training_state can fail: one optimiser fewer, or another loss scale."""
    state = {"model": {"w": torch.ones(2)}, "optimizers": [{"state": {}}, {"state": {0: {"step": torch.tensor(1.0)}}}],
             "schedulers": [{"last_epoch": 3}], "scaler": {"scale": 65536.0}}
    assert_same_training_state(state, state)
    with pytest.raises(AssertionError, match="lengths"):
        assert_same_training_state(state, dict(state, optimizers=state["optimizers"][:1]))
    with pytest.raises(AssertionError, match="scaler"):
        assert_same_training_state(state, dict(state, scaler={"scale": 32768.0}))
    with pytest.raises(AssertionError, match="schedulers"):
        assert_same_training_state(state, dict(state, schedulers=[{"last_epoch": 4}]))


# ------------------------------------------------------------------------------- synthetic, CLI
def test_cli_trains_on_synthetic_data_and_writes_its_artifacts(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SYNTH, *TINY_FLAGS, "--epochs", "2", "--output-dir", str(out), "--plot", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert {"best.pt", "last.pt", "run.json", "curves.png"} <= {p.name for p in out.iterdir()}
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["train_config"]["seed"] == 3
    assert run["model_config"]["d_model"] == 16 and run["versions"]["torch"] == torch.__version__
    assert [e["epoch"] for e in run["epochs"]] == [1, 2]
    for e in run["epochs"]:
        assert e["train_samples_per_s"] > 0 and math.isfinite(e["train_loss"])
        assert {"auc", "gauc", "logloss", "ne"} <= set(e["valid"])
    assert run["best_valid_auc"] == max(e["valid"]["auc"] for e in run["epochs"])
    # the final table is the best checkpoint on the validation split
    assert run["final"]["valid"]["auc"] == pytest.approx(run["best_valid_auc"], abs=1e-12)
    assert "final metrics (best checkpoint)" in printed and "gAUC" in printed
    # evaluate with no files scores the checkpoint on its own validation split, the same numbers
    main(["evaluate", str(out / "best.pt"), "--output", str(tmp_path / "m.json")])
    again = json.loads((tmp_path / "m.json").read_text())["valid"]
    for k in ("auc", "gauc", "logloss", "ne"):
        assert again[k] == pytest.approx(run["final"]["valid"][k], abs=1e-9), k


def test_settings_file_then_flags_win(tmp_path):
    settings = tmp_path / "s.yaml"
    settings.write_text("epochs: 3\nlr: 0.005\nmodel:\n  d_model: 32\n  num_heads: 2\n")
    parser_args = ["train", "--config", str(settings), "--lr", "0.01", "--model", "num_heads=4"]
    import argparse

    from interformer.__main__ import _add_train_flags, train_config_from_args

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    _add_train_flags(sub.add_parser("train"))
    cfg = train_config_from_args(p.parse_args(parser_args))
    assert (cfg.epochs, cfg.lr, cfg.model) == (3, 0.01, {"d_model": 32, "num_heads": 4})
    assert cfg.batch_size == T.TrainConfig().batch_size  # untouched default
    # PyYAML reads 1e-3 as a string (YAML 1.1 floats need a dot): numbers and booleans are converted
    settings.write_text("lr: 1e-3\nmax_steps: 1e3\nclip_grad_norm: 1\nembedding_lr: null\nprogress: 'off'\n"
                        "warmup_steps: '5'\n")
    cfg = train_config_from_args(p.parse_args(["train", "--config", str(settings)]))
    got = (cfg.lr, cfg.max_steps, cfg.clip_grad_norm, cfg.embedding_lr, cfg.progress, cfg.warmup_steps)
    assert got == (1e-3, 1000, 1.0, None, False, 5)
    assert [type(v) for v in got] == [float, int, float, type(None), bool, int]


@pytest.mark.parametrize("bad, match", [
    (dict(amp="fp8"), "amp must be one of"),
    (dict(embedding_optimizer="sgd"), "embedding_optimizer"),
    (dict(model={"d_modle": 8}), "unknown InterFormerConfig field"),
    (dict(data="csv"), "needs training files"),
    (dict(data="csv", train=["x.csv"]), "needs a schema"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(epoch=2), "unknown training setting"),
    (dict(lr="fast"), "lr must be a number, got 'fast'"),
    (dict(epochs="2.5"), "epochs must be an integer, got '2.5'"),
    (dict(max_steps=[3]), "max_steps must be an integer or None"),
    (dict(compile="maybe"), "compile must be true or false"),
    (dict(batch_size=True), "batch_size must be an integer"),
    # numbers that used to train a run to NaN (or with negative decay) without a word
    (dict(weight_decay=-0.1), "weight_decay must be >= 0, got -0.1"),
    (dict(weight_decay="nan"), "weight_decay must be a finite number"),
    (dict(lr=float("inf")), "lr must be a finite number"),
    (dict(embedding_lr="inf"), "embedding_lr must be a finite number"),
    (dict(clip_grad_norm=float("nan")), "clip_grad_norm must be a finite number"),
    (dict(synthetic_valid=-1), "synthetic_valid must be >= 0"),
    # trained on nothing: the run failed later with "train: no rows (an empty file, ...)", of no file
    (dict(synthetic_train=0), "synthetic_train must be >= 1 when data is 'synthetic' .*, got 0"),
    # a seed past 64 bits failed in the generator with "Overflow when unpacking long long"
    (dict(seed=2**64 - 7), r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 8\], got 18446744073709551609"),
    (dict(seed=-2**63 - 1), r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 8\]"),
    # values of the wrong kind from a settings file (they ended in a TypeError or PyTorch's error)
    (dict(valid=3), "valid must be a file path or a list of them, got 3"),
    (dict(device=5), "device must be text or None, got 5"),
    (dict(device="gpu"), r"device must be cpu or cuda \(optionally cuda:N\), got 'gpu'"),
    (dict(device="mps"), r"device must be cpu or cuda \(optionally cuda:N\), got 'mps'"),
    (dict(model=[1]), "model must be a mapping"),
    (dict(data="csv", train=["t.csv"], schema=["label", "user_id"]),
     r"schema must be the path of a schema file or a mapping of schema keys, got \['label', 'user_id'\]"),
    (dict(data="csv", train=["t.csv"], schema=5), "schema must be the path of a schema file .*, got 5"),
    # a misspelt backend failed in build_model, after the passes over the training files (last, so
    # that the cases above keep the ids bench/gpu_rerun.txt lists)
    (dict(backend="tritn"), r"backend: backend must be one of \('auto', 'eager', 'triton'\), got 'tritn'"),
    (dict(model={"backend": "Tritn"}), r"model.backend: backend must be one of .*, got 'Tritn'"),
])
def test_bad_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        T.TrainConfig.from_dict(bad)


def test_no_synthetic_training_samples_is_a_settings_error_of_synthetic_runs_only(tmp_path, capsys, monkeypatch):
    """``synthetic_train: 0`` trained on nothing: the run drew its other splits, then failed with
    "train: no rows (an empty file, or every row skipped as malformed)", of no file. It is refused
    as a setting (the CLI's one-line error, no output directory made), also by a ``--resume`` that
    finds no checkpoint and so starts a new run; a run on files ignores the synthetic sizes."""
    from interformer.__main__ import cli

    monkeypatch.delenv("INTERFORMER_TRACEBACK", raising=False)
    assert cli(["train", "--synthetic-train", "0", "--output-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "error: synthetic_train must be >= 1 when data is 'synthetic'" in capsys.readouterr().err
    cfg = T.TrainConfig.from_dict(dict(resume=True, synthetic_train=0, output_dir=str(tmp_path / "run")))
    with pytest.raises(ValueError, match="synthetic_train must be >= 1"):
        T.train(cfg, log=quiet)
    assert not (tmp_path / "run").exists()
    T.TrainConfig.from_dict(dict(data="csv", train=["t.csv"], schema="s.yaml", synthetic_train=0))


def test_the_largest_seed_trains_and_resumes(tmp_path):
    """A seed of 2**64 - 8 (MAX_SEED: the generators take up to 2**64 - 1, and the runs derive
    seed + 2 for their test samples) trains and resumes; such seeds ran before the range check
    (a first version of it, [-2**63, 2**63), refused their checkpoints)."""
    from interformer.data import MAX_SEED

    cfg = tiny_config(tmp_path, seed=MAX_SEED, max_steps=1, synthetic_train=64, synthetic_valid=32, synthetic_test=32)
    assert T.train(cfg, log=quiet)["step"] == 1
    resumed = T.TrainConfig.from_dict(dict(resume=True, output_dir=str(tmp_path), max_steps=2))
    assert T.train(resumed, log=quiet)["step"] == 2


def test_a_backend_in_the_model_settings_is_kept():
    """``model.backend`` decides while ``backend`` is left at "auto" (or unset). It used to be
    replaced by "auto" without a word, so these tests' tiny runs (TINY says eager) trained the
    fused model on the H100. When both name one the run's wins, as before."""
    cfg = T.TrainConfig(model=dict(TINY))
    assert cfg.model_backend() == "eager" and T.build_model(cfg, {}).config.backend == "eager"
    assert T.TrainConfig(model=dict(TINY), backend="AUTO").model_backend() == "eager"  # names: any case
    assert T.TrainConfig(model=dict(TINY), backend=None).model_backend() == "eager"
    assert T.TrainConfig(model=dict(TINY, backend="triton")).model_backend() == "triton"
    assert T.TrainConfig(model=dict(TINY, backend="auto"), backend="eager").model_backend() == "eager"
    assert T.TrainConfig().model_backend() == "auto" and T.TrainConfig(backend=None).model_backend() is None
    assert T.build_model(T.TrainConfig(backend=None), {}).config.backend == "auto"  # $INTERFORMER_BACKEND's default
    # a saved config whose two disagree (the run's won) still loads: old checkpoints stay readable
    old = T.TrainConfig.from_dict(dict(T.TrainConfig().to_dict(), backend="triton", model=dict(TINY)))
    assert old.model_backend() == "triton"


def test_a_new_run_refuses_two_backends_that_disagree(tmp_path):
    with pytest.raises(ValueError, match="backend 'triton' and model.backend 'eager' disagree"):
        T.train(tiny_config(tmp_path, backend="triton"), log=quiet)
    assert not (tmp_path / "last.pt").exists()


def test_resume_and_evaluate_use_the_backend_the_checkpoint_was_built_with(tmp_path, monkeypatch):
    """Not a backend its settings resolve to now: a run saved before ``model.backend`` was honoured
    (backend "auto", model.backend "triton", built on "auto") resumes on "auto". ``evaluate``'s
    backend argument, "auto" included, replaces it."""
    T.train(tiny_config(tmp_path, epochs=2, max_steps=2, synthetic_valid=0, synthetic_test=32), log=quiet)
    ckpt = T.load_checkpoint(tmp_path / "last.pt")
    assert ckpt["model_config"]["backend"] == "eager"
    ckpt["train_config"]["model"]["backend"] = "triton"  # as an old run with model.backend "triton" saved it
    ckpt["model_config"]["backend"] = "auto"
    torch.save(ckpt, tmp_path / "last.pt")
    built = []

    class Spy(T.InterFormerCTR):
        def __init__(self, config):
            built.append(config.backend)
            super().__init__(config)

    monkeypatch.setattr(T, "InterFormerCTR", Spy)
    s = T.train(tiny_config(tmp_path, epochs=2, max_steps=3, synthetic_valid=0, synthetic_test=32, resume=True,
                            model=dict(TINY, backend="triton")), log=quiet)
    assert s["status"] == "stopped" and built[0] == "auto"
    built.clear()
    T.evaluate_checkpoint(str(tmp_path / "last.pt"))
    T.evaluate_checkpoint(str(tmp_path / "last.pt"), backend="auto")
    T.evaluate_checkpoint(str(tmp_path / "last.pt"), backend="eager")
    assert built == ["auto", "auto", "eager"]


def test_evaluate_runs_under_the_checkpoints_amp_unless_given_its_own(tmp_path):
    """A bf16 run's checkpoint scores its splits under bf16 autocast, as its training did (it used
    to run without autocast unless ``--amp`` was repeated); a given ``amp`` replaces it."""
    T.train(tiny_config(tmp_path, epochs=1, amp="bf16"), log=quiet)
    ckpt = str(tmp_path / "last.pt")
    assert T.load_checkpoint(ckpt)["train_config"]["amp"] == "bf16"
    default, bf16, off = (T.evaluate_checkpoint(ckpt, **kw)["valid"] for kw in ({}, dict(amp="bf16"), dict(amp="off")))
    assert default["logloss"] == bf16["logloss"] and default["auc"] == bf16["auc"]
    assert off["logloss"] != bf16["logloss"]
    with pytest.raises(ValueError, match="amp must be one of"):
        T.evaluate_checkpoint(ckpt, amp="fp8")
    assert default["amp"] == "bf16" and off["amp"] == "off" and "amp_note" not in default
    from interformer.__main__ import build_parser

    assert build_parser().parse_args(["evaluate", ckpt]).amp is None  # the command line's default: the checkpoint's


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's path: on a GPU evaluate runs bf16 there")
def test_evaluate_of_a_bf16_fused_checkpoint_on_a_cpu_scores_without_autocast_and_says_so(tmp_path, capsys):
    """The checkpoint's bf16 cannot run on the fused path on a CPU (Triton's interpreter has no
    bfloat16): ``evaluate`` without ``--amp`` scores it without autocast and says why, where it used
    to stop with the interpreter's error; a given ``--amp bf16`` still raises that error."""
    T.train(tiny_config(tmp_path, epochs=1, amp="bf16", synthetic_train=128, synthetic_valid=24), log=quiet)
    state = T.load_checkpoint(tmp_path / "last.pt")
    state["model_config"]["backend"] = "triton"  # as a run trained on the fused path on a GPU saves it
    torch.save(state, tmp_path / "fused.pt")
    ckpt = str(tmp_path / "fused.pt")
    got, off = T.evaluate_checkpoint(ckpt)["valid"], T.evaluate_checkpoint(ckpt, amp="off")["valid"]
    assert got["amp"] == "off" and "cannot run on the fused path on a CPU" in got["amp_note"]
    assert got["logloss"] == off["logloss"] and "amp_note" not in off
    main(["evaluate", ckpt])
    printed = capsys.readouterr().out
    assert f"metrics of {ckpt} (amp off)" in printed and "note: the checkpoint's amp, bf16, cannot run" in printed
    with pytest.raises(RuntimeError, match="bfloat16"):
        T.evaluate_checkpoint(ckpt, amp="bf16")


def test_warmup_step_k_uses_lr_times_k_over_warmup_steps():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.4)
    (sch,) = T.warmup_schedulers([opt], 4)
    used = []
    for _ in range(6):
        used.append(opt.param_groups[0]["lr"])  # the lr the next optimiser step uses
        opt.step()
        sch.step()
    assert used == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])


def test_the_history_records_the_rate_of_each_epochs_last_step(tmp_path):
    """Each epoch's ``lr`` in the history (``run.json``) is the rate its last optimiser step used:
    with 128 samples in batches of 32 (4 steps an epoch) and a 10-step warm-up, 4/10 and 8/10 of
    ``lr``, not the next step's 5/10 and 9/10 as it recorded until 2026-11-29. The same run (synthetic,
    no validation split) then shows ``evaluate``'s reason for having nothing to score: it asked for
    files, which a checkpoint without a schema cannot read."""
    run = T.train(tiny_config(tmp_path, lr=0.02, warmup_steps=10, synthetic_train=128, synthetic_valid=0,
                              batch_size=32), log=quiet)
    assert [r["step"] for r in run["epochs"]] == [4, 8]
    assert [r["lr"] for r in run["epochs"]] == pytest.approx([0.02 * 4 / 10, 0.02 * 8 / 10])
    # (no validation or test split, no schema: evaluate names why rather than asking for files it cannot read)
    with pytest.raises(ValueError, match=r"synthetic_valid = synthetic_test = 0, and it has no schema to read files"):
        T.evaluate_checkpoint(str(tmp_path / "last.pt"))


def test_deterministic_turns_on_deterministic_algorithms_for_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []
    real_loss = T.InterFormerCTR.loss

    def loss(logits, label):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()))
        return real_loss(logits, label)

    monkeypatch.setattr(T.InterFormerCTR, "loss", staticmethod(loss))
    T.train(tiny_config(tmp_path / "d", epochs=1, synthetic_train=128, deterministic=True), log=quiet)
    assert seen and set(seen) == {(True, True)}
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled()  # the process's setting is back
    seen.clear()
    T.train(tiny_config(tmp_path / "n", epochs=1, synthetic_train=128), log=quiet)
    assert set(seen) == {(False, False)}


def test_rng_state_touches_only_this_devices_cuda_generator(monkeypatch):
    """Faked CUDA: the ``*_all`` functions would open a context on every GPU; only the rank's own
    device's generator is saved and restored."""
    calls = []

    def forbidden(*a, **k):
        raise AssertionError("an *_all CUDA RNG function was called")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", forbidden)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", forbidden)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": calls.append(("get", device)) or "S")
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(("set", state, device)))
    dev = torch.device("cuda", 1)
    state = T.rng_state(dev)
    assert state["cuda"] == "S"
    T.set_rng_state(state, dev)
    assert calls == [("get", dev), ("set", "S", dev)]
    assert "cuda" not in T.rng_state(torch.device("cpu"))
    # a checkpoint written by the earlier get_rng_state_all(): this device's entry is restored
    calls.clear()
    T.set_rng_state(dict(state, cuda=["S0", "S1"]), dev)
    assert calls == [("set", "S1", dev)]


def test_process_group_timeout_from_the_environment(monkeypatch):
    got = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(T.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(T.dist, "init_process_group", lambda backend, **kw: got.update(kw, backend=backend))
    monkeypatch.setenv("INTERFORMER_DIST_TIMEOUT_MIN", "7")
    d, dev = T.setup_distributed("cpu")
    assert (d.rank, d.world_size, dev.type) == (1, 2, "cpu")
    assert got == {"backend": "gloo", "timeout": datetime.timedelta(minutes=7)}
    monkeypatch.delenv("INTERFORMER_DIST_TIMEOUT_MIN")
    T.setup_distributed("cpu")
    assert got["timeout"] == datetime.timedelta(minutes=60)


def test_the_per_step_stop_flag_goes_over_gloo_never_a_gpu(monkeypatch):
    """Under NCCL (a GPU run, mocked) the setup also makes a gloo group over the same ranks, and the
    stop flag asked after every step is a CPU number all-reduced over it: no device tensor read
    back (a sync per step), with the run's timeout. Under gloo (CPU runs) the default group carries
    it; a caller's group is asked its backend (one with gloo in it, "cpu:gloo,cuda:nccl", carries
    it too)."""
    made, reduced = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(T.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(T.torch.cuda, "set_device", lambda dev: None)
    monkeypatch.setattr(T.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(T.dist, "init_process_group", lambda backend, **kw: made.append(("init", backend)))
    monkeypatch.setattr(T.dist, "new_group", lambda backend, timeout: made.append(("group", backend, timeout))
                        or "gloo-group")
    monkeypatch.setenv("INTERFORMER_DIST_TIMEOUT_MIN", "9")
    nine = datetime.timedelta(minutes=9)

    def all_reduce(t, op, group):
        reduced.append((t.device.type, group))
        t.fill_(1.0)

    monkeypatch.setattr(T.dist, "all_reduce", all_reduce)
    d, dev = T.setup_distributed(None)
    assert dev.type == "cuda" and made == [("init", "nccl"), ("group", "gloo", nine)] and d.control == "gloo-group"
    assert T._any_rank(False, d) is True and reduced == [("cpu", "gloo-group")]
    made.clear()
    d, dev = T.setup_distributed("cpu")
    assert made == [("init", "gloo")] and d.control is None
    monkeypatch.setattr(T.dist, "is_initialized", lambda: True)
    for backend, control in (("nccl", "gloo-group"), ("gloo", None), ("cpu:gloo,cuda:nccl", None)):
        monkeypatch.setattr(T.dist, "get_backend", lambda: backend)
        made.clear()
        d, _ = T.setup_distributed(None)
        assert made == ([("group", "gloo", nine)] if control else []) and d.control == control, backend
    assert T._any_rank(True, T.Dist()) is True and len(reduced) == 1  # one process: no collective


def test_a_control_group_made_beside_a_callers_group_is_destroyed(monkeypatch):
    """``train`` under a caller's NCCL group destroys the gloo group it made for the stop flag (and
    only that) when it returns; after an exception it destroys nothing, as for its own group."""
    destroyed = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(T.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(T.dist, "destroy_process_group", lambda group=None: destroyed.append(group))
    monkeypatch.setattr(T, "setup_distributed", lambda device: (T.Dist(0, 2, 0, control="gloo-group"), None))
    monkeypatch.setattr(T, "_train", lambda cfg, log, d, device: {"status": "finished"})
    assert T.train(T.TrainConfig())["status"] == "finished"
    assert destroyed == ["gloo-group"]

    def fail(cfg, log, d, device):
        raise RuntimeError("boom")

    monkeypatch.setattr(T, "_train", fail)
    with pytest.raises(RuntimeError, match="boom"):
        T.train(T.TrainConfig())
    assert destroyed == ["gloo-group"]


def test_repeated_sigterms_wait_for_the_stop_checkpoint():
    """SIGTERM stays caught after the first: a scheduler and torchrun send it to every process of a
    job within milliseconds, and a second one must not kill the run before its stop checkpoint (the
    default action, once restored, would). The first signal is the one the exit status names; on
    leaving, the previous handlers are back. In a child process, so that a regression kills the
    child, not the test run."""
    code = (
        "import os, signal\n"
        "from interformer import train as T\n"
        "before = signal.getsignal(signal.SIGTERM)\n"
        "with T._StopRequest() as stop:\n"
        "    for _ in range(3):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    assert stop.requested and stop.signum == signal.SIGTERM\n"
        "    assert signal.getsignal(signal.SIGTERM) == stop._handle\n"
        "    os.kill(os.getpid(), signal.SIGINT)  # still only asks; SIGINT's own handler is back after it\n"
        "    assert stop.signum == signal.SIGTERM and signal.getsignal(signal.SIGINT) != stop._handle\n"
        "assert signal.getsignal(signal.SIGTERM) is before\n"
        "print('survived')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "survived" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_a_second_sigint_aborts_at_once():
    """The first SIGINT only asks for a checkpoint; it hands the signals back, so the second one
    raises KeyboardInterrupt right away (Python's own handler, installed here: in a full CI run,
    twice on 2026-11-27, the handler this test inherited from earlier tests did not raise, and the
    "second SIGINT" was swallowed by it, not by ``_StopRequest``). ``signal.raise_signal`` runs
    the handler before it returns (``os.kill`` to the process may land on another thread)."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with T._StopRequest() as stop:
                signal.raise_signal(signal.SIGINT)
                assert stop.requested
                assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
                signal.raise_signal(signal.SIGINT)
                pytest.fail("the second SIGINT was swallowed")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


# ------------------------------------------------------------------------------- resume
RESUME_CASES = {
    "adamw": dict(),
    "adagrad-warmup-clip-bf16-dropout": dict(embedding_optimizer="adagrad", warmup_steps=5, clip_grad_norm=0.5,
                                             amp="bf16", model=dict(TINY, dropout=0.2)),
    "sparse_adam-fp16": dict(embedding_optimizer="sparse_adam", amp="fp16", embedding_lr=0.01),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, case):
    """max_steps stops mid-epoch 2 (8 batches per epoch); --resume with a larger --max-steps
    continues: same weights, optimiser, scheduler and scaler state and per-epoch history as the
    uninterrupted run."""
    kw = RESUME_CASES[case]
    full = T.train(tiny_config(tmp_path / "full", **kw), log=quiet)
    part = T.train(tiny_config(tmp_path / "part", max_steps=11, **kw), log=quiet)
    assert part["status"] == "stopped"
    stopped = T.load_checkpoint(tmp_path / "part" / "last.pt")
    assert (stopped["batch_in_epoch"], stopped["status"]) == (3, "stopped")
    resumed = T.train(tiny_config(tmp_path / "part", resume=True, max_steps=100, **kw), log=quiet)
    assert resumed["status"] == "finished" and resumed["step"] == full["step"] == 16
    a, b = T.load_checkpoint(tmp_path / "full" / "last.pt"), T.load_checkpoint(tmp_path / "part" / "last.pt")
    assert_same_training_state(a, b)
    assert a["status"] == b["status"] == "finished"
    assert_same_weights(weights(tmp_path / "full" / "best.pt"), weights(tmp_path / "part" / "best.pt"))
    strip = lambda h: [{k: v for k, v in e.items() if k != "train_samples_per_s" and k != "valid"} for e in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    assert [e["valid"]["auc"] for e in a["history"]] == [e["valid"]["auc"] for e in b["history"]]


def test_a_resume_that_skipped_the_restore_would_be_caught(tmp_path):
    """The comparison above can fail: restarting from the stopped checkpoint's weights without the
    optimiser state gives different final weights."""
    T.train(tiny_config(tmp_path / "full"), log=lambda *a: None)
    T.train(tiny_config(tmp_path / "part", max_steps=11), log=lambda *a: None)
    state = T.load_checkpoint(tmp_path / "part" / "last.pt")
    state["optimizers"] = [{"state": {}, "param_groups": o["param_groups"]} for o in state["optimizers"]]
    T.save_checkpoint(tmp_path / "part" / "last.pt", state)
    T.train(tiny_config(tmp_path / "part", resume=True, max_steps=100), log=lambda *a: None)
    a, b = weights(tmp_path / "full" / "last.pt"), weights(tmp_path / "part" / "last.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def interrupt_at_step(monkeypatch, n: int) -> None:
    """Send this process a real SIGINT from inside the n-th loss computation (undo with
    ``monkeypatch.undo()``)."""
    calls = {"n": 0}
    real_loss = T.InterFormerCTR.loss

    def loss_with_interrupt(logits, label):
        calls["n"] += 1
        if calls["n"] == n:
            signal.raise_signal(signal.SIGINT)  # to this thread (see test_a_second_sigint_aborts_at_once)
        return real_loss(logits, label)

    monkeypatch.setattr(T.InterFormerCTR, "loss", staticmethod(loss_with_interrupt))


def test_sigint_checkpoints_and_resume_matches(tmp_path, monkeypatch):
    """A real SIGINT in the middle of a step: the loop finishes the step, writes last.pt and stops;
    the resumed run ends where the uninterrupted one does."""
    T.train(tiny_config(tmp_path / "full"), log=lambda *a: None)
    interrupt_at_step(monkeypatch, 6)
    part = T.train(tiny_config(tmp_path / "part"), log=lambda *a: None)
    monkeypatch.undo()
    assert part["status"] == "stopped" and part["step"] == 6
    T.train(tiny_config(tmp_path / "part", resume=True), log=lambda *a: None)
    assert_same_weights(weights(tmp_path / "full" / "last.pt"), weights(tmp_path / "part" / "last.pt"))


def test_early_stopping_after_patience_epochs_and_its_resume_trains_no_more(tmp_path, monkeypatch):
    """Stops after 2 epochs without a better AUC; --resume of that run takes no step (its status is
    in last.pt); a larger --patience continues it."""
    script_validation_aucs(monkeypatch, itertools.chain([0.70, 0.72, 0.71, 0.715], itertools.repeat(0.5)))
    s = T.train(tiny_config(tmp_path, epochs=6, patience=2), log=quiet)
    assert s["status"] == "early_stopped"
    assert [e["epoch"] for e in s["epochs"]] == [1, 2, 3, 4]
    assert T.load_checkpoint(tmp_path / "best.pt")["epoch"] == 2  # saved after epoch 2 (0-based next epoch)
    assert s["best_valid_auc"] == 0.72
    stopped = T.load_checkpoint(tmp_path / "last.pt")
    assert (stopped["status"], stopped["step"], stopped["stale_epochs"]) == ("early_stopped", 32, 2)
    lines = []
    again = T.train(tiny_config(tmp_path, resume=True, epochs=6), log=lines.append)  # patience=2 from last.pt
    assert again["status"] == "early_stopped" and again["step"] == 32 and len(again["epochs"]) == 4
    assert_same_training_state(stopped, T.load_checkpoint(tmp_path / "last.pt"))
    assert any("nothing to train" in str(line) for line in lines)
    more = T.train(tiny_config(tmp_path, resume=True, epochs=6, patience=3), log=quiet)
    assert more["status"] == "early_stopped" and [e["epoch"] for e in more["epochs"]] == [1, 2, 3, 4, 5]
    assert more["step"] == 40


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted 2-epoch run (8 steps per epoch): the reference of the resume tests below."""
    out = tmp_path_factory.mktemp("full")
    T.train(tiny_config(out), log=quiet)
    return T.load_checkpoint(out / "last.pt")


def test_max_steps_on_an_epoch_end_then_resume(tmp_path, full_run):
    """max_steps=8 ends exactly with epoch 1: the epoch is validated and checkpointed as complete;
    resuming with max_steps still 8 takes no (extra) step; a larger one ends as the full run."""
    out = tmp_path / "part"
    part = T.train(tiny_config(out, max_steps=8), log=quiet)
    assert part["status"] == "stopped" and part["step"] == 8 and len(part["epochs"]) == 1
    stopped = T.load_checkpoint(out / "last.pt")
    assert (stopped["epoch"], stopped["batch_in_epoch"], stopped["status"]) == (1, 0, "stopped")
    again = T.train(tiny_config(out, resume=True, max_steps=8), log=quiet)
    assert again["status"] == "stopped" and again["step"] == 8 and len(again["epochs"]) == 1
    assert_same_training_state(stopped, T.load_checkpoint(out / "last.pt"))
    assert json.loads((out / "run.json").read_text())["status"] == "stopped"
    T.train(tiny_config(out, resume=True), log=quiet)  # max_steps=8 comes from the checkpoint
    assert T.load_checkpoint(out / "last.pt")["step"] == 8
    done = T.train(tiny_config(out, resume=True, max_steps=16), log=quiet)
    assert done["status"] == "finished" and done["step"] == 16
    assert_same_training_state(full_run, T.load_checkpoint(out / "last.pt"))
    assert done["epochs"][1]["train_loss"] == full_run["history"][1]["train_loss"]


def test_resuming_a_finished_run_trains_only_with_more_epochs(tmp_path, full_run):
    out = tmp_path / "one"
    T.train(tiny_config(out, epochs=1), log=quiet)
    finished = T.load_checkpoint(out / "last.pt")
    assert (finished["status"], finished["step"]) == ("finished", 8)
    same = T.train(tiny_config(out, resume=True, epochs=1), log=quiet)
    assert same["status"] == "finished" and same["step"] == 8
    assert_same_training_state(finished, T.load_checkpoint(out / "last.pt"))
    more = T.train(tiny_config(out, resume=True, epochs=2), log=quiet)
    assert more["status"] == "finished" and more["step"] == 16
    assert_same_training_state(full_run, T.load_checkpoint(out / "last.pt"))


def test_a_new_run_refuses_a_directory_holding_a_run_unless_overwrite(tmp_path, capsys):
    """No --resume into a run directory: ValueError naming it; --overwrite deletes the old run, so
    its best.pt can not end up in the new run's final table."""
    out = tmp_path / "run"
    T.train(tiny_config(out, epochs=1, plot=True), log=quiet)
    assert {"best.pt", "last.pt", "run.json", "curves.png"} <= {p.name for p in out.iterdir()}
    with pytest.raises(ValueError, match=rf"{out}.*--resume.*--overwrite"):
        T.train(tiny_config(out, epochs=1, synthetic_valid=0, synthetic_test=64), log=quiet)
    (out / "last.pt").unlink()  # what is left is still a run: resume has nothing to resume from
    with pytest.raises(ValueError, match="--overwrite"):
        T.train(tiny_config(out, epochs=1, resume=True, synthetic_valid=0, synthetic_test=64), log=quiet)
    s = T.train(tiny_config(out, epochs=1, overwrite=True, synthetic_valid=0, synthetic_test=64), log=print)
    assert {p.name for p in out.iterdir()} == {"last.pt", "run.json"}  # no validation: no best.pt
    assert "final metrics (last weights)" in capsys.readouterr().out
    mine = T.evaluate_checkpoint(str(out / "last.pt"))["test"]
    assert s["final"]["test"]["auc"] == mine["auc"] and s["final"]["test"]["logloss"] == mine["logloss"]
    # a mistake through the CLI: refused, exit with the message
    with pytest.raises(ValueError, match="already holds a run"):
        main(["train", *SYNTH, *TINY_FLAGS, "--output-dir", str(out)])


def test_evaluate_scores_in_the_runs_eval_batches_by_default(tmp_path):
    """``evaluate`` without a batch size scores in the run's ``eval_batch_size`` (here 50: four
    batches of the 192 validation samples), so its metrics are the run's final ones to the last bit;
    it scored in batches of 1024, whose sums differed in about the tenth digit (logloss 1.8e-10 off).
    A given batch size still applies, and one that is not an integer >= 1 is refused."""
    s = T.train(tiny_config(tmp_path / "run", epochs=1, eval_batch_size=50), log=quiet)
    ckpt = str(tmp_path / "run" / "last.pt")
    got = T.evaluate_checkpoint(ckpt)["valid"]
    for k in ("auc", "gauc", "logloss", "ne"):
        assert got[k] == s["final"]["valid"][k], k
    assert T.evaluate_checkpoint(ckpt, batch_size=1024)["valid"]["samples"] == 192
    for bad in (0, 2.5, "64"):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            T.evaluate_checkpoint(ckpt, batch_size=bad)


def test_evaluate_of_a_synthetic_checkpoint_draws_only_the_splits_it_scores(tmp_path, monkeypatch):
    """``evaluate`` of a synthetic run draws its validation and test splits again from the seed, and
    not its training split, which it used to draw in full and throw away; the splits are the run's
    own (each has its own seed), so the metrics are the run's final ones."""
    s = T.train(tiny_config(tmp_path / "run", epochs=1, synthetic_train=320, synthetic_valid=48, synthetic_test=40),
                log=quiet)
    drawn, real = [], T.make_synthetic
    monkeypatch.setattr(T, "make_synthetic", lambda n, *a, **k: drawn.append(n) or real(n, *a, **k))
    got = T.evaluate_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert sorted(drawn) == [40, 48]
    for split in ("valid", "test"):
        assert (got[split]["auc"], got[split]["logloss"]) == (s["final"][split]["auc"], s["final"][split]["logloss"])


def test_the_final_table_ignores_a_best_pt_this_run_did_not_write(tmp_path, capsys):
    """A run without validation, resumed in a directory where a best.pt of another run appeared:
    its final metrics are its own last weights."""
    other, out = tmp_path / "other", tmp_path / "run"
    s_other = T.train(tiny_config(other, epochs=1, synthetic_test=64, lr=1e-2), log=quiet)  # other weights, same data
    # on an H100 (2026-11-26) this run, then on the fused path (see the next test), wrote no best.pt
    assert (other / "best.pt").exists(), f"no best.pt; epochs: {s_other['epochs']}"
    T.train(tiny_config(out, epochs=1, max_steps=4, synthetic_valid=0, synthetic_test=64), log=quiet)
    (out / "best.pt").write_bytes((other / "best.pt").read_bytes())
    s = T.train(tiny_config(out, epochs=1, resume=True, max_steps=8, synthetic_valid=0, synthetic_test=64), log=print)
    assert s["status"] == "finished"
    assert "final metrics (last weights)" in capsys.readouterr().out
    mine = T.evaluate_checkpoint(str(out / "last.pt"))["test"]
    assert s["final"]["test"]["auc"] == mine["auc"]
    assert s["final"]["test"]["auc"] != T.evaluate_checkpoint(str(other / "best.pt"))["test"]["auc"]


def _watched_run(out, backend: str) -> tuple:
    """(first epoch's record, the first module whose forward output was non-finite, described, or
    None) of the tiny lr = 1e-2 run on ``backend``."""
    first = []

    def watch(module, inputs, output):
        outs = [t for t in (output if isinstance(output, tuple) else (output,)) if isinstance(t, torch.Tensor)]
        if first or all(bool(t.isfinite().all()) for t in outs if t.is_floating_point()):
            return
        ins = [t for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
        bad = [n for n, p in module.named_parameters(recurse=False) if not bool(p.isfinite().all())]
        first.append(f"{type(module).__name__} (inputs finite: {all(bool(t.isfinite().all()) for t in ins)}, "
                     f"non-finite parameters: {bad})")

    hook = torch.nn.modules.module.register_module_forward_hook(watch)
    try:
        s = T.train(tiny_config(out, epochs=1, synthetic_test=64, lr=1e-2, model=dict(TINY, backend=backend)),
                    log=quiet)
    finally:
        hook.remove()
    return s["epochs"][0], (first[0] if first else None)


@pytest.mark.gpu
def test_fused_training_at_a_high_learning_rate_stays_finite_and_tracks_eager(tmp_path, monkeypatch):
    """The first run of the test above, with each backend. On the H100 (2026-11-26) it ran on the
    fused path in fp32 (``model.backend`` was then overridden by ``backend="auto"``) and validation
    AUC came out NaN; on the CPU both backends give the same finite metrics (the fused one under the
    interpreter, also with poisoned allocations, H100-sized grids and checked accesses). If
    anything goes non-finite this names the first module whose forward output did, whether its
    inputs were finite, and which of its parameters were not (a NaN gradient shows up as NaN
    parameters after the optimiser step); a fused run that does is repeated with exact fp32 dots
    ("ieee" instead of "tf32x3": the gated LCE's fp32 backward met a compiler fault there before,
    see ``gated_lce._bwd_launch_options``), and the message says whether that one stayed finite."""
    runs = {b: _watched_run(tmp_path / b, b) for b in ("eager", "triton")}
    if runs["triton"][1] is not None or not math.isfinite(runs["triton"][0]["valid"]["auc"]):
        from interformer.kernels import kernel_modules

        for mod in kernel_modules():
            if hasattr(mod, "dot_precision"):
                monkeypatch.setattr(mod, "dot_precision", lambda dtype: "ieee" if dtype == torch.float32 else "tf32")
        runs["triton, ieee fp32 dots"] = _watched_run(tmp_path / "ieee", "triton")
    for name, (epoch, first) in runs.items():
        assert first is None and math.isfinite(epoch["valid"]["auc"]), \
            f"{name}: first non-finite module output: {first}; epoch: {epoch}; all runs: {runs}"
    # fp32 on both paths (the kernels' tl.dot at tf32x3, about fp32): 8 Adam steps at lr 1e-2 may
    # drift apart by rounding, but not by more than 1% of the mean training loss
    assert runs["triton"][0]["train_loss"] == pytest.approx(runs["eager"][0]["train_loss"], rel=1e-2), runs


def test_resume_takes_the_checkpoint_settings(tmp_path):
    """Run-control settings given on resume replace the checkpoint's; a given setting at its default
    is "not given"; any other difference is refused, naming the fields."""
    saved = tiny_config(tmp_path, lr=3e-3, epochs=2, max_steps=5, embedding_optimizer="adagrad").to_dict()
    cfg, changed = T.resume_config(saved, T.TrainConfig(output_dir="elsewhere", resume=True))
    assert cfg.to_dict() == dict(saved, output_dir="elsewhere", resume=True) and changed == {}
    given = T.TrainConfig(output_dir="o", resume=True, epochs=4, max_steps=20, progress=True, plot=True, lr="0.003",
                          model=dict(TINY), embedding_optimizer="adagrad")
    cfg, changed = T.resume_config(saved, given)
    assert (cfg.epochs, cfg.max_steps, cfg.plot, cfg.lr, cfg.model) == (4, 20, True, 3e-3, TINY)
    assert changed == {"epochs": (2, 4), "max_steps": (5, 20), "plot": (False, True)}
    bad = T.TrainConfig(resume=True, lr=0.01, model=dict(TINY, d_model=32), batch_size=64, seed=1)
    with pytest.raises(ValueError, match=r"model \(.*\); lr \(checkpoint 0.003, given 0.01\); seed \(checkpoint 0, given 1\)") as e:
        T.resume_config(saved, bad)
    assert " batch_size (" not in str(e.value)  # given, but equal to the checkpoint's
    # a checkpoint written before a field existed: that field is at its default there
    old = {k: v for k, v in saved.items() if k not in ("deterministic", "overwrite")}
    assert T.resume_config(old, T.TrainConfig(resume=True))[0].deterministic is False


def test_cli_resume_needs_only_the_output_dir(bars, monkeypatch):
    """`train --resume --output-dir X` alone continues a CSV run (data, schema, model, optimiser all
    from last.pt) to the weights of the uninterrupted run; a conflicting --lr is refused."""
    settings = dict(data="csv", train=[str(bars / "train.csv")], valid=[str(bars / "valid.csv")],
                    schema=str(bars / "schema.yaml"), epochs=2, batch_size=64, lr=3e-3, progress=False,
                    model={k: v for k, v in TINY.items() if k not in ("max_seq_len", "backend")})
    (bars / "settings.json").write_text(json.dumps(settings))
    main(["train", "--config", str(bars / "settings.json"), "--output-dir", str(bars / "full")])
    interrupt_at_step(monkeypatch, 3)
    # stopped by SIGINT (checkpointed): the exit status says so, 128 + 2, as a shell would report it
    assert main(["train", "--config", str(bars / "settings.json"), "--output-dir", str(bars / "part")]) == 130
    monkeypatch.undo()
    assert T.load_checkpoint(bars / "part" / "last.pt")["step"] == 3
    with pytest.raises(ValueError, match=r"lr \(checkpoint 0.003, given 0.5\)"):
        main(["train", "--resume", "--output-dir", str(bars / "part"), "--lr", "0.5"])
    (bars / "schema.yaml").unlink()  # the resumed run reads its schema from the checkpoint
    assert main(["train", "--resume", "--output-dir", str(bars / "part")]) == 0
    run = json.loads((bars / "part" / "run.json").read_text())
    assert run["status"] == "finished" and run["step"] == 10
    assert_same_training_state(T.load_checkpoint(bars / "full" / "last.pt"), T.load_checkpoint(bars / "part" / "last.pt"))


def test_resume_without_a_checkpoint_needs_the_settings_of_a_new_run(tmp_path):
    """`--resume` where there is no last.pt: with only run-control flags (a typo in --output-dir, say)
    it is refused and makes no directory (it used to train a new run with every default, the
    synthetic data); with a run's settings (a job requeued before its first checkpoint) it starts
    that run, and checks its data settings as a new run's then (they are deferred on resume)."""
    for flags in (["--epochs", "3"], ["--backend", "eager", "--seed", "1"], []):
        with pytest.raises(ValueError, match=r"resume: there is no .*last\.pt to resume, and the command names "
                                             r"no data"):
            main(["train", "--resume", "--output-dir", str(tmp_path / "typo"), *flags])
    assert not (tmp_path / "typo").exists()
    T.train(tiny_config(tmp_path / "new", resume=True, epochs=1, synthetic_train=64, synthetic_valid=0,
                        synthetic_test=0), log=quiet)
    assert T.load_checkpoint(tmp_path / "new" / "last.pt")["status"] == "finished"
    cfg = T.TrainConfig.from_dict(dict(resume=True, train=["x.csv"], output_dir=str(tmp_path / "files")))
    with pytest.raises(ValueError, match=r"train given but data is 'synthetic'"):
        T.train(cfg, log=quiet)
    assert not (tmp_path / "files").exists()  # checked before the directory is made
    with pytest.raises(ValueError, match=r"train given but data is 'synthetic'"):  # the same, without --resume
        T.TrainConfig.from_dict(dict(train=["x.csv"]))
    (tmp_path / "new" / "last.pt").unlink()  # a run's other files but no last.pt: the --overwrite hint, as before
    with pytest.raises(ValueError, match=r"already holds a run \(run\.json\); pass --overwrite"):
        main(["train", "--resume", "--output-dir", str(tmp_path / "new"), "--epochs", "3"])


def test_a_resumed_file_run_names_a_changed_data_file_and_a_path_relative_elsewhere(bars, monkeypatch):
    """Resuming a CSV run with another --train (with or without --data csv) is refused naming the
    checkpoint's file and the given one (it used to say that data is 'synthetic', or that csv needs
    a schema: the checks ran before the checkpoint's settings were merged in). A run started with
    relative paths and resumed (or evaluated on its own splits) from another directory says where
    they are relative to."""
    monkeypatch.chdir(bars)
    settings = dict(data="csv", train=["train.csv"], valid=["valid.csv"], schema="schema.yaml", epochs=1,
                    batch_size=64, progress=False,
                    model={k: v for k, v in TINY.items() if k not in ("max_seq_len", "backend")})
    (bars / "settings.json").write_text(json.dumps(settings))
    main(["train", "--config", "settings.json", "--output-dir", "run"])
    (bars / "moved.csv").write_text((bars / "valid.csv").read_text())
    for extra in (["--train", "valid.csv"], ["--data", "csv", "--train", "valid.csv"]):
        with pytest.raises(ValueError, match=r"^resume: train \(checkpoint \['train.csv'\], given \['valid.csv'\]\)"):
            main(["train", "--resume", "--output-dir", "run", "--epochs", "2", *extra])
    (bars / "elsewhere").mkdir()
    monkeypatch.chdir(bars / "elsewhere")
    with pytest.raises(FileNotFoundError, match=r"train.csv \(a resumed run reads its checkpoint's data files, and "
                                                r"a relative path there is relative to the directory the run was "
                                                r"started in"):
        main(["train", "--resume", "--output-dir", str(bars / "run"), "--epochs", "2"])
    with pytest.raises(FileNotFoundError, match=r"valid.csv \(evaluate without files reads its checkpoint's data "
                                                r"files, and a relative path there is relative to the directory the "
                                                rf"run was started in; this one is {re.escape(os.getcwd())}\)$"):
        main(["evaluate", str(bars / "run" / "last.pt")])
    monkeypatch.chdir(bars)
    assert main(["train", "--resume", "--output-dir", "run", "--epochs", "2"]) == 0
    # a missing absolute path gets no such hint
    main(["train", "--config", "settings.json", "--output-dir", "abs", "--train", str(bars / "moved.csv")])
    (bars / "moved.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"moved.csv$"):
        main(["train", "--resume", "--output-dir", "abs", "--epochs", "2"])


def test_a_resume_on_changed_data_files_is_refused_naming_what_changed(bars, monkeypatch):
    """A data file that changed between the stop and the resume (rows appended to the training file,
    the validation file cut short) is refused, with the split's row counts and the file's sizes
    then and now: the resumed epoch would skip the wrong batches (it went unnoticed). Restored, the
    run resumes; a checkpoint without the record (written before it) resumes unchecked."""
    monkeypatch.chdir(bars)
    settings = dict(data="csv", train=["train.csv"], valid=["valid.csv"], schema="schema.yaml", epochs=1,
                    batch_size=64, max_steps=2, progress=False,
                    model={k: v for k, v in TINY.items() if k not in ("max_seq_len", "backend")})
    (bars / "settings.json").write_text(json.dumps(settings))
    main(["train", "--config", "settings.json", "--output-dir", "run"])
    train, valid = (bars / "train.csv").read_text(), (bars / "valid.csv").read_text()
    size = len(train.encode())
    extra = "".join(valid.splitlines(keepends=True)[1:11])  # ten more rows, no header
    (bars / "train.csv").write_text(train + extra)
    with pytest.raises(ValueError, match=rf"^resume: the data changed since run.last\.pt was written \(train: "
                                         rf"320 rows then, 330 now; train\.csv: {size:,} bytes then, "
                                         rf"{size + len(extra.encode()):,} now\); a resumed run reads the data it "
                                         r"started on .* the command without --resume, naming the data, with "
                                         r"--overwrite or another --output-dir$"):
        main(["train", "--resume", "--output-dir", "run", "--max-steps", "3"])
    (bars / "train.csv").write_text(train)
    (bars / "valid.csv").write_text("".join(valid.splitlines(keepends=True)[:-1]))  # one row fewer
    with pytest.raises(ValueError, match=r"\(valid: 120 rows then, 119 now; valid\.csv: "):
        main(["train", "--resume", "--output-dir", "run", "--max-steps", "3"])
    (bars / "valid.csv").write_text(valid)
    assert main(["train", "--resume", "--output-dir", "run", "--max-steps", "3"]) == 0
    assert T.load_checkpoint(bars / "run" / "last.pt")["step"] == 3
    state = T.load_checkpoint(bars / "run" / "last.pt")
    del state["data"]  # as written before the record existed
    T.save_checkpoint(bars / "run" / "last.pt", state)
    (bars / "train.csv").write_text(train + extra)
    assert main(["train", "--resume", "--output-dir", "run", "--max-steps", "4"]) == 0


def test_model_sizes_the_data_decides_are_refused_when_they_differ(bars):
    """With files, n_dense, the vocabulary sizes and max_seq_len come from the schema and the
    vocabularies: a model setting that gives another value is refused naming both (it was replaced
    without a word); the data's own value is accepted."""
    base = dict(data="csv", train=[str(bars / "train.csv")], schema=str(bars / "schema.yaml"), batch_size=64,
                max_steps=1, progress=False, output_dir=str(bars / "run"))
    model = {k: v for k, v in TINY.items() if k not in ("max_seq_len", "backend")}
    with pytest.raises(ValueError, match=r"^model: n_dense=7 \(the data's: 1\); max_seq_len=3 \(the data's: 10\): "
                                         r"with data='csv'"):
        T.train(T.TrainConfig.from_dict({**base, "model": {**model, "n_dense": 7, "max_seq_len": 3}}), log=quiet)
    assert not (bars / "run" / "last.pt").exists()
    # the data's values, however written (a settings file may give numbers as strings)
    T.train(T.TrainConfig.from_dict({**base, "model": {**model, "n_dense": "1", "max_seq_len": 10.0}}), log=quiet)
    assert T.load_checkpoint(bars / "run" / "last.pt")["model_config"]["n_dense"] == 1


def test_load_model_gives_the_trained_model_on_either_backend(tmp_path):
    """load_model: the checkpoint's model, its weights, in eval mode, on the backend it was trained
    with or on one given; its logits are the trained model's (the fused path's within fp32 rounding)."""
    summary = T.train(tiny_config(tmp_path, epochs=1, synthetic_train=64, synthetic_valid=0, synthetic_test=0),
                      log=quiet)
    trained = summary["model"].eval()
    dev = next(trained.parameters()).device  # where train put it: a GPU when there is one
    batch = make_synthetic(8, trained.config, seed=5).to(dev)
    with torch.no_grad():
        want = trained(*batch.inputs())
        model = T.load_model(tmp_path / "last.pt", device=str(dev))
        assert not model.training and model.config.backend == trained.config.backend == "eager"
        assert torch.equal(model(*batch.inputs()), want)
        fused = T.load_model(str(tmp_path / "last.pt"), backend="triton", device=str(dev))
        assert fused.config.backend == "triton"
        torch.testing.assert_close(fused(*batch.inputs()), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not a checkpoint"):
        (tmp_path / "x.csv").write_text("label,a\n1,2\n")
        T.load_model(tmp_path / "x.csv")


# ------------------------------------------------------------------------------- BARS CSV, Parquet
def write_bars(path: Path, n: int, seed: int, bad_lines=()) -> None:
    """Synthetic samples in the AmazonElectronics_x1 layout (raw ids offset, histories ``^``-joined)."""
    cfg = InterFormerConfig(**TINY)
    b = make_synthetic(n, cfg, seed=seed)
    lines = ["label,user_id,item_id,cate_id,context,price,item_history,cate_history"]
    for i in range(n):
        L = int(b.lengths[i])
        hist = ["^".join(str(int(v) + 5000) for v in b.seq[i, c, :L]) for c in range(2)]
        u, it, ca, cx = (int(v) + 5000 for v in b.sparse[i])
        lines.append(f"{int(b.label[i])},{u},{it},{ca},{cx},{float(b.dense[i, 0]):.5f},{hist[0]},{hist[1]}")
    for at, text in bad_lines:
        lines.insert(at, text)
    path.write_text("\n".join(lines) + "\n")


SCHEMA = """label: label
dense: [price]
sparse: [user_id, item_id, cate_id, context]
sequences: [item_history, cate_history]
user: user_id
max_seq_len: 10
shared_vocab: {item_history: item_id, cate_history: cate_id}
"""


@pytest.fixture
def bars(tmp_path):
    write_bars(tmp_path / "train.csv", 320, seed=1)
    write_bars(tmp_path / "valid.csv", 120, seed=2)
    (tmp_path / "schema.yaml").write_text(SCHEMA)
    return tmp_path


def test_bars_csv_trains_end_to_end_and_evaluates(bars, capsys):
    settings = dict(data="csv", train=[str(bars / "train.csv")], valid=[str(bars / "valid.csv")],
                    schema=str(bars / "schema.yaml"), epochs=2, batch_size=64, lr=3e-3, progress=False,
                    model={k: v for k, v in TINY.items() if k not in ("max_seq_len", "backend")})
    (bars / "settings.json").write_text(json.dumps(settings))
    out = bars / "run"
    main(["train", "--config", str(bars / "settings.json"), "--output-dir", str(out)])
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and len(run["epochs"]) == 2
    assert run["model_config"]["n_dense"] == 1 and run["model_config"]["max_seq_len"] == 10
    assert run["schema"]["sequences"] == ["item_history", "cate_history"]
    assert run["epochs"][0]["valid"]["samples"] == 120
    final = run["final"]["valid"]
    assert all(math.isfinite(final[k]) for k in ("auc", "gauc", "logloss", "ne"))
    # evaluate: the checkpoint carries schema and vocabularies; the same file gives the same metrics
    capsys.readouterr()
    for where in (str(bars), str(bars / "newdir") + os.sep):  # refused before the scoring
        with pytest.raises(ValueError, match=r"--output .* is a directory"):
            main(["evaluate", str(out / "best.pt"), str(bars / "valid.csv"), "--output", where])
    # --output's folder is made (it used to fail after the scoring)
    main(["evaluate", str(out / "best.pt"), str(bars / "valid.csv"), "--output", str(bars / "new" / "m.json")])
    m = json.loads((bars / "new" / "m.json").read_text())["eval"]
    for k in ("auc", "gauc", "logloss", "ne"):
        assert m[k] == pytest.approx(final[k], abs=1e-9), k
    printed = capsys.readouterr().out
    assert "eval" in printed and f"metrics of {out / 'best.pt'} (amp off)\n" in printed and "final metrics" not in printed
    # without files: the checkpoint's own validation split, read with the schema it carries (neither
    # the schema file nor the training files need to exist any more)
    (bars / "schema.yaml").unlink()
    (bars / "train.csv").unlink()
    valid_text = (bars / "valid.csv").read_text()
    with pytest.raises(ValueError, match="which is read here"):  # its own split's file: refused, not replaced
        main(["evaluate", str(out / "best.pt"), "--output", str(bars / "valid.csv")])
    for read in (bars / "valid.csv", out / "best.pt"):  # from Python too, files given or not
        for files in (None, [bars / "valid.csv"]):
            with pytest.raises(ValueError, match="which is read here"):
                T.evaluate_checkpoint(str(out / "best.pt"), files, output=str(read))
    assert (bars / "valid.csv").read_text() == valid_text
    main(["evaluate", str(out / "best.pt"), "--output", str(bars / "own.json")])
    own = json.loads((bars / "own.json").read_text())["valid"]
    for k in ("auc", "gauc", "logloss", "ne"):
        assert own[k] == pytest.approx(final[k], abs=1e-9), k


def test_parquet_with_the_same_schema_trains(bars):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is installed by make test")
    import csv

    import pyarrow as pa

    for split in ("train", "valid"):
        with open(bars / f"{split}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        cols = {k: [r[k] for r in rows] for k in rows[0]}
        cols["label"] = [int(v) for v in cols["label"]]
        cols["price"] = [float(v) for v in cols["price"]]
        for k in ("user_id", "item_id", "cate_id", "context"):
            cols[k] = [int(v) for v in cols[k]]
        pq.write_table(pa.table(cols), bars / f"{split}.parquet")
    kw = dict(data="parquet", schema=str(bars / "schema.yaml"), epochs=1, batch_size=64, progress=False,
              model={k: v for k, v in TINY.items() if k != "max_seq_len"})
    s_pq = T.train(T.TrainConfig(train=[str(bars / "train.parquet")], valid=[str(bars / "valid.parquet")],
                                 output_dir=str(bars / "pq"), **kw), log=lambda *a: None)
    kw["data"] = "csv"
    s_csv = T.train(T.TrainConfig(train=[str(bars / "train.csv")], valid=[str(bars / "valid.csv")],
                                  output_dir=str(bars / "csv"), **kw), log=lambda *a: None)
    # the same rows and ids in both formats: the same training run
    assert_same_weights(weights(bars / "pq" / "last.pt"), weights(bars / "csv" / "last.pt"))
    assert s_pq["final"]["valid"]["auc"] == s_csv["final"]["valid"]["auc"]


def test_malformed_rows_raise_with_file_and_line_or_are_counted(bars, capsys):
    write_bars(bars / "train.csv", 320, seed=1, bad_lines=[(5, "1,7,8,9,1,0.5,1^2,3"), (40, "x,1,2,3,4,0.1,,")])
    base = ["train", "--data", "csv", "--train", str(bars / "train.csv"), "--valid", str(bars / "valid.csv"),
            "--schema", str(bars / "schema.yaml"), "--epochs", "2", "--batch-size", "64", "--no-progress",
            *model_flags(skip=("backend", "max_seq_len"))]
    from interformer.dataio import DataError, DataWarning

    with pytest.raises(DataError, match=r"train\.csv:6: "):
        main(base + ["--output-dir", str(bars / "r1")])
    capsys.readouterr()
    with warnings.catch_warnings():
        # reported once by train itself, not also as the vocabulary pass's raw DataWarning
        warnings.simplefilter("error", DataWarning)
        main(base + ["--output-dir", str(bars / "r2"), "--on-bad-rows", "skip"])
    run = json.loads((bars / "r2" / "run.json").read_text())
    # 2 bad rows, however many passes (counting, 2 epochs) read the file
    assert run["status"] == "finished" and run["skipped_rows"] == {"train": 2, "valid": 0}
    out = capsys.readouterr().out
    assert "data: csv, train 320 rows (2 malformed, skipped), valid 120 rows\n" in out
    assert out.count("note: skipped 2 malformed row(s) in train (e.g. ") == 1 and "train.csv:41: " in out


def test_example_data_writes_files_a_run_trains_and_evaluates_on(tmp_path, capsys):
    """``example-data DIR`` writes BARS-layout CSVs, their schema and a settings file that ``train
    --config`` takes as it is (paths quoted: the directory has a space and a colon), so the README's
    file-based commands run end to end without files of one's own."""
    from interformer.data import EXAMPLE_COLUMNS, write_example_files

    where = tmp_path / "my data: 1"
    main(["example-data", str(where), "--train", "192", "--valid", "64", "--test", "48",
          "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert f"train --config {shlex.quote(str(where / 'settings.yaml'))}" in out  # pasted into a shell as it is
    for name, rows in (("train", 192), ("valid", 64), ("test", 48)):
        lines = (where / f"{name}.csv").read_text().splitlines()
        assert lines[0] == ",".join(EXAMPLE_COLUMNS) and len(lines) == rows + 1, name
    settings = T.load_settings(str(where / "settings.yaml"))
    assert settings["train"] == [str(where / "train.csv")] and settings["schema"] == str(where / "schema.yaml")
    main(["train", "--config", str(where / "settings.yaml"), "--epochs", "1", "--batch-size", "64", "--no-progress",
          *model_flags(skip=("backend", "max_seq_len"))])
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "finished" and run["final"]["valid"]["samples"] == 64 and run["final"]["test"]["samples"] == 48
    capsys.readouterr()
    main(["evaluate", str(tmp_path / "run" / "last.pt"), str(where / "test.csv"), "--output", str(tmp_path / "m.json")])
    assert json.loads((tmp_path / "m.json").read_text())["eval"]["samples"] == 48
    with pytest.raises(ValueError, match="valid must be an int >= 1"):
        write_example_files(tmp_path / "x", valid=0)


def test_example_data_replaces_only_its_own_files_unless_told(tmp_path, capsys):
    """``example-data DIR`` run again replaces the files it wrote; a ``train.csv`` (or schema or
    settings file) of one's own there is refused, naming it, before any file is written (it was
    replaced without a word), and ``--overwrite`` replaces it; a directory under one of the names
    is refused even then."""
    from interformer.data import write_example_files

    small = ["--train", "8", "--valid", "4", "--test", "4"]
    main(["example-data", str(tmp_path), *small])
    main(["example-data", str(tmp_path), *small, "--seed", "3"])  # its own files: replaced
    fresh = write_example_files(tmp_path / "seed3", 8, 4, 4, seed=3)
    assert (tmp_path / "train.csv").read_text() == Path(fresh["train"]).read_text()
    mine = {"train.csv": "label,clicked_at\n1,2\n", "settings.yaml": "epochs: 9\n",
            "schema.yaml": "# the columns of our click logs, by hand\nlabel: clicked\n"}  # the template's start
    for name, text in mine.items():
        (tmp_path / name).write_text(text)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.is_file()}
    with pytest.raises(FileExistsError, match=rf"^{re.escape(str(tmp_path))} already holds train\.csv, schema\.yaml, "
                                              r"settings\.yaml, not written by example-data; give another directory, "
                                              r"or --overwrite \(overwrite=True\) to replace them$"):
        main(["example-data", str(tmp_path), *small])
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.is_file()} == before  # nothing written
    (tmp_path / "settings.yaml").unlink()
    (tmp_path / "schema.yaml").unlink()
    with pytest.raises(FileExistsError, match=r"holds train\.csv, not written .* to replace it$"):
        write_example_files(tmp_path, 8, 4, 4)
    main(["example-data", str(tmp_path), *small, "--overwrite"])
    assert (tmp_path / "train.csv").read_text().startswith("label,user_id,")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "schema.yaml").mkdir()
    for overwrite in (False, True):
        with pytest.raises(IsADirectoryError, match=r"d: schema\.yaml is a directory, where example-data writes"):
            write_example_files(tmp_path / "d", 8, 4, 4, overwrite=overwrite)
    assert sorted(f.name for f in (tmp_path / "d").iterdir()) == ["schema.yaml"]
    with pytest.raises(ValueError, match=r"^seed must be an integer in \[-2\*\*63, 2\*\*64 - 8\], got 18446744073709551616$"):
        main(["example-data", str(tmp_path / "e"), *small, "--seed", str(2**64)])
    assert not (tmp_path / "e").exists()


def test_example_data_reads_back_as_the_synthetic_samples(tmp_path):
    """What the loader makes of the example files is ``make_synthetic``'s samples: labels, lengths,
    every dense feature (to the 5 decimals written), the raw ids of every sparse field and history
    event (oldest first, padding 0; ids unseen in the training file become 1, the unknown id) and
    the gAUC groups."""
    from interformer.data import Batch, write_example_files
    from interformer.dataio import Schema, TabularDataset, build_vocabularies, group_key

    sizes = {"train": 300, "valid": 120, "test": 90}
    paths = write_example_files(tmp_path, seed=7, **sizes)
    schema = Schema.from_file(paths["schema"])
    vocabs, _ = build_vocabularies([paths["train"]], schema, fmt="csv")
    cfg = InterFormerConfig()
    for i, (name, n) in enumerate(sizes.items()):
        want = make_synthetic(n, cfg, seed=7 + i)
        got = Batch.cat(list(TabularDataset([paths[name]], schema, vocabs, fmt="csv").batches(64)))
        assert torch.equal(got.label, want.label) and torch.equal(got.lengths, want.lengths), name
        assert got.dense.shape == want.dense.shape and torch.allclose(got.dense, want.dense, atol=5e-6), name

        def raw(column, ids):  # the loader's index back to the id written (1: unseen, -1 here)
            tokens = vocabs[schema.vocab_column(column)].tokens
            return torch.tensor([0 if j == 0 else -1 if j == 1 else int(tokens[j - 2]) for j in ids.flatten().tolist()]
                                ).view(ids.shape)

        for c, column in enumerate(schema.sparse):
            r = raw(column, got.sparse[:, c])
            assert ((r == want.sparse[:, c]) | ((r == -1) & (name != "train"))).all(), (name, column)
        for c, column in enumerate(schema.sequences):
            r, w = raw(column, got.seq[:, c]), want.seq[:, c, :got.seq.shape[2]]
            assert not want.seq[:, c, got.seq.shape[2]:].any()
            assert ((r == w) | ((r == -1) & (name != "train"))).all(), (name, column)
        assert torch.equal(got.group, torch.tensor([group_key(str(int(u))) for u in want.sparse[:, 0]])), name


def test_evaluate_on_bad_rows_overrides_the_checkpoints_setting(bars, capsys):
    """A checkpoint trained on clean files (on_bad_rows "raise") can score a file with malformed rows
    (``evaluate --on-bad-rows skip``), and a "skip" checkpoint can be made strict."""
    base = ["--data", "csv", "--train", str(bars / "train.csv"), "--schema", str(bars / "schema.yaml"),
            "--epochs", "1", "--batch-size", "64", "--no-progress", *model_flags(skip=("backend", "max_seq_len"))]
    main(["train", *base, "--output-dir", str(bars / "strict")])
    main(["train", *base, "--output-dir", str(bars / "lax"), "--on-bad-rows", "skip"])
    write_bars(bars / "bad.csv", 40, seed=3, bad_lines=[(7, "1,2,3")])
    from interformer.dataio import DataError

    with pytest.raises(DataError, match=r"bad\.csv:8: "):  # the checkpoint's own setting
        main(["evaluate", str(bars / "strict" / "last.pt"), str(bars / "bad.csv")])
    capsys.readouterr()
    main(["evaluate", str(bars / "strict" / "last.pt"), str(bars / "bad.csv"), "--on-bad-rows", "skip",
          "--output", str(bars / "m.json")])
    m = json.loads((bars / "m.json").read_text())["eval"]
    assert m["samples"] == 40 and m["skipped_rows"] == 1
    assert re.search(r"note: skipped 1 malformed row\(s\) in eval, not scored \(e\.g\. \S*bad\.csv:8: ",
                     capsys.readouterr().out)
    with pytest.raises(DataError, match=r"bad\.csv:8: "):
        main(["evaluate", str(bars / "lax" / "last.pt"), str(bars / "bad.csv"), "--on-bad-rows", "raise"])
    with pytest.raises(ValueError, match="on_bad_rows must be"):
        T.evaluate_checkpoint(str(bars / "lax" / "last.pt"), [str(bars / "bad.csv")], on_bad_rows="ignore")


def test_run_json_lists_the_settings_of_its_data_source(bars, tmp_path):
    """A file run's run.json has no synthetic sizes (a reader would wonder which data it trained on),
    a synthetic run's none of the file settings; the checkpoints keep the whole config (resume)."""
    main(["train", "--data", "csv", "--train", str(bars / "train.csv"), "--schema", str(bars / "schema.yaml"),
          "--epochs", "1", "--batch-size", "64", "--no-progress", *model_flags(skip=("backend", "max_seq_len")),
          "--output-dir", str(bars / "csv")])
    main(["train", "--synthetic-train", "128", "--synthetic-valid", "0", "--epochs", "1", "--batch-size", "64",
          "--no-progress", *model_flags(), "--output-dir", str(tmp_path / "syn")])
    full = set(dataclasses.asdict(T.TrainConfig()))
    for run_dir, left_out in ((bars / "csv", {"synthetic_train", "synthetic_valid", "synthetic_test"}),
                              (tmp_path / "syn", {"train", "valid", "test", "schema", "on_bad_rows"})):
        listed = json.loads((run_dir / "run.json").read_text())["train_config"]
        assert set(listed) == full - left_out, run_dir
        assert set(T.load_checkpoint(run_dir / "last.pt")["train_config"]) == full, run_dir


def test_undefined_metrics_are_explained_under_the_table(bars, capsys):
    """A ``nan`` in the metrics table comes with a note saying why: gAUC when no user holds both
    classes (here every row is its own user), AUC and NE when the rows hold one class."""
    settings = ["--data", "csv", "--train", str(bars / "train.csv"), "--schema", str(bars / "schema.yaml"),
                "--epochs", "1", "--batch-size", "64", "--no-progress",
                *model_flags(skip=("backend", "max_seq_len")), "--output-dir", str(bars / "run")]
    main(["train", *settings])
    rows = (bars / "valid.csv").read_text().splitlines()
    head, body = rows[0], rows[1:]
    user = head.split(",").index("user_id")

    def with_user(i, line, label=None):
        cells = line.split(",")
        cells[user] = str(900000 + i)
        if label is not None:
            cells[0] = label
        return ",".join(cells)

    (bars / "alone.csv").write_text("\n".join([head] + [with_user(i, r) for i, r in enumerate(body)]) + "\n")
    (bars / "zeros.csv").write_text("\n".join([head] + [with_user(i, r, "0") for i, r in enumerate(body)]) + "\n")
    capsys.readouterr()
    main(["evaluate", str(bars / "run" / "last.pt"), str(bars / "alone.csv"), "--output", str(bars / "a.json")])
    out = capsys.readouterr().out
    m = json.loads((bars / "a.json").read_text())["eval"]
    assert m["gauc"] is None and m["gauc_users"] == 0 and math.isfinite(m["auc"])
    assert "note: gAUC is undefined on eval: no user in it has both a click and a non-click" in out
    assert "AUC and NE" not in out
    main(["evaluate", str(bars / "run" / "last.pt"), str(bars / "zeros.csv")])
    out = capsys.readouterr().out
    assert ("note: AUC and NE are undefined on eval: the eval rows hold one label class only (all 0 or all 1)"
            in out)
    assert "note: gAUC is undefined on eval" in out
    # a defined gAUC: no note
    main(["evaluate", str(bars / "run" / "last.pt"), str(bars / "valid.csv")])
    assert "note:" not in capsys.readouterr().out


# ------------------------------------------------------------------------------- DDP
_DDP_SCRIPT = r"""
import json, os, sys, torch
from interformer import train as T
if os.environ["RANK"] != "0":  # only rank 0 may read the run directory: no shared disk needed
    def no_reading(*a, **k):
        raise AssertionError("rank %s read a checkpoint" % os.environ["RANK"])
    T.load_checkpoint = no_reading
cfg = T.TrainConfig.from_dict(json.loads(sys.argv[1]))
s = T.train(cfg, log=lambda *a: None)
assert not torch.distributed.is_initialized()  # train() leaves no process group it created
torch.save(s["model"].state_dict(), os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
"""


def torchrun2(cfg: dict, where: Path) -> None:
    """``cfg`` trained by 2 CPU processes (gloo) under torchrun; each rank saves its final weights
    as ``where/rank{r}.pt``."""
    where.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          "--no-python", sys.executable, "-c", _DDP_SCRIPT, json.dumps(cfg), str(where)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]


def ddp_config(out, **kw) -> dict:
    """256 rows, 2 ranks, batch 32: 4 steps per rank per epoch, 2 epochs."""
    return tiny_config(out, synthetic_train=256, synthetic_valid=64, batch_size=32, device="cpu", **kw).to_dict()


@pytest.fixture(scope="module")
def ddp_full(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = ddp_config(tmp / "run")
    torchrun2(cfg, tmp / "w")
    return cfg, tmp


def test_two_gloo_processes_end_with_identical_weights(ddp_full):
    """torchrun with 2 CPU processes (gloo): DDP keeps the replicas equal; only rank 0 writes the run."""
    cfg, tmp = ddp_full
    r0, r1 = (torch.load(tmp / "w" / f"rank{r}.pt") for r in (0, 1))
    assert_same_weights(r0, r1)
    run = json.loads((tmp / "run" / "run.json").read_text())
    assert run["world_size"] == 2 and run["status"] == "finished"
    assert run["step"] == 8
    assert_same_weights(weights(tmp / "run" / "last.pt"), r0)
    T.seed_everything(cfg["seed"])
    init = T.build_model(T.TrainConfig.from_dict(cfg), {})  # what both ranks started from
    assert any(not torch.equal(v, r0[k]) for k, v in init.state_dict().items())


def test_two_gloo_processes_draw_different_random_streams(ddp_full):
    """Both ranks start from the same weights, but after that each draws its own random numbers
    (dropout masks): every rank used the run's seed, so with dropout both dropped the same units.
    The checkpoint keeps each rank's generator state: they differ."""
    _, tmp = ddp_full
    rngs = T.load_checkpoint(tmp / "run" / "last.pt")["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
    assert len({T.rank_seed(s, r) for s in (0, -1) for r in range(8)}) == 16  # negative seeds too


def test_two_gloo_processes_stopped_mid_epoch_and_resumed_match_the_uninterrupted_run(tmp_path, ddp_full):
    """max_steps=6 stops both ranks in the middle of epoch 2 (checkpoint_every=3 also checkpoints
    mid-epoch 1); the resumed run (rank 0 reads last.pt and broadcasts it; rank 1 reads nothing) ends
    with the weights and optimiser state of the uninterrupted 2-process run."""
    _, full = ddp_full
    out = tmp_path / "run"
    torchrun2(ddp_config(out, max_steps=6, checkpoint_every=3), tmp_path / "w1")
    stopped = T.load_checkpoint(out / "last.pt")
    assert (stopped["status"], stopped["epoch"], stopped["batch_in_epoch"], stopped["step"]) == ("stopped", 1, 2, 6)
    assert len(stopped["rng"]) == 2 and len(stopped["epoch_loss"]) == 2
    torchrun2(ddp_config(out, resume=True, max_steps=100), tmp_path / "w2")
    r0, r1 = (torch.load(tmp_path / "w2" / f"rank{r}.pt") for r in (0, 1))
    assert_same_weights(r0, r1)
    resumed, reference = T.load_checkpoint(out / "last.pt"), T.load_checkpoint(full / "run" / "last.pt")
    assert (resumed["status"], resumed["step"]) == ("finished", 8)
    assert_same_training_state(reference, resumed)
    assert [e["train_loss"] for e in resumed["history"]] == [e["train_loss"] for e in reference["history"]]


def test_compiled_training_checkpoints_plain_state_dict_keys(tmp_path):
    """--compile wraps the model in torch.compile (aot_eager here: no C++ toolchain needed); the
    checkpoint's keys are the module's own (no ``_orig_mod.``), and training matches the eager run."""
    s = T.train(tiny_config(tmp_path / "c", epochs=1, compile=True, compile_backend="aot_eager"), log=lambda *a: None)
    T.train(tiny_config(tmp_path / "e", epochs=1), log=lambda *a: None)
    assert s["status"] == "finished"
    wc, we = weights(tmp_path / "c" / "last.pt"), weights(tmp_path / "e" / "last.pt")
    assert wc.keys() == we.keys()
    for k in we:
        # an epoch of AdamW steps on both, the compiled one's sums in aot_eager's order: element-wise
        torch.testing.assert_close(wc[k], we[k], rtol=1e-4, atol=1e-5)


def test_compile_mode_reaches_torch_compile_and_is_validated(tmp_path, monkeypatch):
    seen = {}
    real = torch.compile

    def spy(model, **kw):
        seen.update(kw)
        return real(model, backend="eager")  # the spy only records; nothing to build here

    monkeypatch.setattr(torch, "compile", spy)
    T.train(tiny_config(tmp_path, epochs=1, compile=True, compile_mode="reduce-overhead"), log=lambda *a: None)
    assert seen == {"backend": "inductor", "mode": "reduce-overhead"}
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        tiny_config(tmp_path, compile_mode="fast")


def test_backward_runs_on_the_calling_thread_unless_asked(tmp_path, monkeypatch):
    """Every training backward runs with autograd's multithreading off (the GPU's device thread
    unused) by default, on when ``autograd_multithreading`` says so, and the process's own setting
    is back afterwards (whatever it was). On a CPU the setting changes nothing else: both runs give the same weights."""
    from utils import backward_threading

    seen = backward_threading(monkeypatch)
    before = torch._C._is_multithreading_enabled()  # PyTorch's default (on, as of 2.13)
    runs = {}
    for threads in (False, True):
        seen.clear()
        out = tmp_path / f"threads-{threads}"
        T.train(tiny_config(out, epochs=1, autograd_multithreading=threads), log=lambda *a: None)
        assert seen and set(seen) == {threads}
        assert torch._C._is_multithreading_enabled() == before
        runs[threads] = weights(out / "last.pt")
    assert_same_weights(runs[False], runs[True])
    assert "autograd_multithreading" in T.RUN_CONTROL  # it changes no math: a resumed run may switch it


def test_prefetching_changes_nothing_and_leaves_no_thread(bars):
    """Batches built ahead by a background thread: the same training run as without, and a run that
    stops mid-epoch (max_steps) leaves no prefetch thread behind."""
    import threading

    kw = dict(data="csv", train=[str(bars / "train.csv")], valid=[str(bars / "valid.csv")], epochs=1,
              schema=str(bars / "schema.yaml"), batch_size=64, progress=False,
              model={k: v for k, v in TINY.items() if k != "max_seq_len"})
    before = set(threading.enumerate())  # run alone, this test saw tqdm's monitor thread left (see train._progress)
    T.train(T.TrainConfig(output_dir=str(bars / "p0"), prefetch=0, **kw), log=lambda *a: None)
    T.train(T.TrainConfig(output_dir=str(bars / "p3"), prefetch=3, **kw), log=lambda *a: None)
    assert_same_weights(weights(bars / "p0" / "last.pt"), weights(bars / "p3" / "last.pt"))
    s = T.train(T.TrainConfig(output_dir=str(bars / "stop"), prefetch=3, max_steps=2, **kw), log=lambda *a: None)
    assert s["status"] == "stopped"
    left = set(threading.enumerate()) - before
    assert not left, f"threads left behind: {sorted(t.name for t in left)}"



# ------------------------------------------------------------------------------- review fixes
def test_resume_refuses_a_given_flag_at_its_default_that_differs_from_the_checkpoint():
    """A flag given on the command line counts as given even at TrainConfig's default: --lr 0.001
    (the default) against a run trained at 0.003 is refused, and a run-control flag may go back to
    its default (--progress after --no-progress)."""
    saved = T.TrainConfig(lr=3e-3, progress=False, amp="bf16").to_dict()
    given = T.TrainConfig.from_dict({"resume": True, "lr": 1e-3})
    with pytest.raises(ValueError, match=r"lr \(checkpoint 0.003, given 0.001\)"):
        T.resume_config(saved, given)
    cfg, changed = T.resume_config(saved, T.TrainConfig.from_dict({"resume": True, "progress": True}))
    assert cfg.progress is True and changed == {"progress": (False, True)} and cfg.amp == "bf16"
    # not given: the checkpoint's value, whatever the default
    assert T.resume_config(saved, T.TrainConfig.from_dict({"resume": True}))[0].lr == 3e-3


def test_model_numbers_written_as_strings_are_converted():
    cfg = T.TrainConfig(model={"ln_eps": "1e-6", "d_model": "16", "rope_base": "1e4", "dcn_rank": "none"})
    assert cfg.model == {"ln_eps": 1e-6, "d_model": 16, "rope_base": 1e4, "dcn_rank": None}
    with pytest.raises(ValueError, match="model.d_model"):
        T.TrainConfig(model={"d_model": "wide"})


def test_files_with_synthetic_data_are_refused(tmp_path):
    with pytest.raises(ValueError, match="data is 'synthetic'"):
        T.TrainConfig(train=[str(tmp_path / "train.csv")])


def test_an_empty_validation_split_is_refused_before_training(bars):
    (bars / "empty.csv").write_text((bars / "valid.csv").read_text().splitlines()[0] + "\n")
    cfg = T.TrainConfig(data="csv", train=[str(bars / "train.csv")], valid=[str(bars / "empty.csv")],
                        schema=str(bars / "schema.yaml"), progress=False, output_dir=str(bars / "run"),
                        model={k: v for k, v in TINY.items() if k not in ("max_seq_len", "backend")})
    with pytest.raises(ValueError, match="valid: no rows"):
        T.train(cfg, log=quiet)
    assert not (bars / "run" / "last.pt").exists()


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(tmp_path, bars):
    out = tmp_path / "run"
    T.train(tiny_config(out, epochs=1), log=quiet)
    cfg = T.TrainConfig(data="csv", train=[str(bars / "no-such-file.csv")], schema=str(bars / "schema.yaml"),
                        output_dir=str(out), overwrite=True, progress=False)
    with pytest.raises(FileNotFoundError):
        T.train(cfg, log=quiet)
    assert all((out / n).exists() for n in ("last.pt", "run.json"))


def test_weight_decay_takes_every_weight_matrix_and_no_bias():
    """Decay on every parameter of two or more dimensions except the cross nets' biases (``[D, 1]``
    in ``CrossNet``, ``[D]`` in ``LowRankCrossNet``; the model is built with each) and the embedding
    tables, which have their own optimiser: the head's ``[1, width]`` output weight too, which a
    shape rule (no size of 1) once left out."""
    for rank in (TINY["dcn_rank"], None):
        model = T.build_model(T.TrainConfig(model={**TINY, "dcn_rank": rank}), {})
        decay = {id(p) for p in T.build_optimizers(model, T.TrainConfig())[0].param_groups[0]["params"]}
        tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        names = {n for n, p in model.named_parameters() if id(p) in decay}
        dcn_biases = [n for n, p in model.named_parameters() if ".bias." in n]  # ParameterList entries
        assert {p.dim() for n, p in model.named_parameters() if n in dcn_biases} == {1 if rank else 2}
        assert dcn_biases and not set(dcn_biases) & names and not any(".bias" in n for n in names)
        assert names == {n for n, p in model.named_parameters()
                         if p.dim() >= 2 and id(p) not in tables and n not in dcn_biases}
        out = f"head.{len(model.head) - 1}.weight"
        assert out in names and model.head[-1].weight.shape[0] == 1


def test_a_resume_below_the_runs_progress_is_refused(tmp_path):
    """Resuming with ``epochs`` (or ``max_steps``) below what last.pt has done -- the original
    settings file given to a run since extended -- is refused, naming what would continue it. It
    used to say "nothing to train" and rewrite run.json with the lower limit beside the longer
    history."""
    out = tmp_path / "run"
    T.train(tiny_config(out, synthetic_train=128, synthetic_valid=0, epochs=2), log=quiet)
    before = (out / "run.json").read_text()
    with pytest.raises(ValueError, match=r"resume: epochs 1 is below the 2 .* --epochs 2 or more"):
        T.train(tiny_config(out, synthetic_train=128, synthetic_valid=0, epochs=1, resume=True), log=quiet)
    with pytest.raises(ValueError, match=r"resume: max_steps 1 is below the 4 .* --max-steps 4 or more"):
        T.train(tiny_config(out, synthetic_train=128, synthetic_valid=0, max_steps=1, resume=True), log=quiet)
    assert (out / "run.json").read_text() == before
    s = T.train(tiny_config(out, synthetic_train=128, synthetic_valid=0, epochs=2, resume=True), log=quiet)
    assert s["status"] == "finished"  # the same limit: nothing to do, not refused
    # stopped partway into epoch 2 (2 steps an epoch, stopped at step 3): epochs=1 is below what it
    # did (it was taken as "finished", with the final metrics of weights trained past epoch 1)
    part = tmp_path / "part"
    T.train(tiny_config(part, synthetic_train=128, synthetic_valid=0, epochs=2, max_steps=3), log=quiet)
    stopped = T.load_checkpoint(part / "last.pt")
    assert (stopped["epoch"], stopped["batch_in_epoch"]) == (1, 1)
    with pytest.raises(ValueError, match=r"resume: epochs 1 is below the 1 epoch\(s\) and 1 batch\(es\) of the next "
                                         r".* --epochs 2 or more"):
        T.train(tiny_config(part, synthetic_train=128, synthetic_valid=0, epochs=1, max_steps=None, resume=True),
                log=quiet)


def test_patience_without_a_validation_split_warns_and_trains_every_epoch(tmp_path, capsys):
    s = T.train(tiny_config(tmp_path / "run", synthetic_train=128, synthetic_valid=0, patience=1, epochs=2))
    assert s["status"] == "finished" and len(s["epochs"]) == 2
    assert "warning: patience 1 has no effect" in capsys.readouterr().out
    T.train(tiny_config(tmp_path / "run2", synthetic_train=128, synthetic_valid=64, patience=1, epochs=1))
    assert "has no effect" not in capsys.readouterr().out


def test_a_run_resumed_onto_its_checkpoints_cpu_switches_on_the_interpreter():
    """A resumed run takes its checkpoint's device; moved to the CPU that way (on a GPU machine, the
    command line naming none) it switches on Triton's interpreter, as ``--device cpu`` does, while
    Triton is not yet imported. In a fresh process: this one imported Triton long ago."""
    script = ("import os, sys, torch\n"
              "from interformer import train as T\n"
              "assert 'triton' not in sys.modules\n"
              "T._interpret_on_cpu(torch.device('cuda', 0))\n"
              "print(os.environ.get('TRITON_INTERPRET'))\n"
              "T._interpret_on_cpu(torch.device('cpu'))\n"
              "print(os.environ.get('TRITON_INTERPRET'))\n"
              "del os.environ['TRITON_INTERPRET']\n"
              "import triton\n"
              "T._interpret_on_cpu(torch.device('cpu'))\n"  # too late to matter: left alone
              "print(os.environ.get('TRITON_INTERPRET'))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["None", "1", "None"]


def test_cli_none_unsets_a_settings_file_value(tmp_path):
    import argparse

    from interformer.__main__ import _add_train_flags, train_config_from_args

    (tmp_path / "s.json").write_text(json.dumps({"patience": 3, "clip_grad_norm": 1.0, "device": "cuda",
                                                 "compile_mode": "reduce-overhead"}))
    parser = argparse.ArgumentParser()
    _add_train_flags(parser)
    args = parser.parse_args(["--config", str(tmp_path / "s.json"), "--patience", "none", "--clip-grad-norm", "None",
                              "--device", "none", "--compile-mode", "NULL"])
    cfg = train_config_from_args(args)
    assert cfg.patience is None and cfg.clip_grad_norm is None
    # the optional text settings too (before, "none" was taken as a device name, and refused as a mode)
    assert cfg.device is None and cfg.compile_mode is None
    assert train_config_from_args(parser.parse_args(["--patience", "4"])).patience == 4
    assert train_config_from_args(parser.parse_args(["--device", "cpu"])).device == "cpu"
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "s.json").read_bytes())  # a Windows editor's
    assert T.load_settings(str(tmp_path / "bom.json"))["patience"] == 3
    assert T.TrainConfig(data="synthetic").data == "synthetic"  # a text setting that cannot be None is kept


def test_settings_files_of_any_suffix_case_and_an_empty_model_section(tmp_path):
    """``S.YAML`` is read as YAML (it was read as JSON, failing with a message that named no file);
    a file that is not valid JSON is named; a ``model:`` section whose keys are all commented out
    (YAML null) is an empty one (it raised a TypeError); a ``torch.device`` from Python is kept as
    its name."""
    (tmp_path / "S.YAML").write_text("patience: 2\nmodel:\n  # d_model: 64\n")
    settings = T.load_settings(str(tmp_path / "S.YAML"))
    assert settings == {"patience": 2, "model": None}
    assert T.TrainConfig.from_dict(settings).model == {}
    (tmp_path / "s.txt").write_text("patience: 2\n")
    with pytest.raises(ValueError, match=r"s\.txt: not valid JSON .* YAML named \.yaml or \.yml"):
        T.load_settings(str(tmp_path / "s.txt"))
    assert T.TrainConfig(device=torch.device("cpu")).device == "cpu"


def test_json_safe_writes_strict_json_and_evaluate_infers_the_format():
    text = json.dumps(T.json_safe({"gauc": float("nan"), "x": [1.0, float("inf")], "n": 3}))
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == \
        {"gauc": None, "x": [1.0, None], "n": 3}
    assert T._format_of(["a.parquet", "b.PQ"], "csv") is None  # each file by its suffix
    assert T._format_of(["a.txt"], "csv") == "csv"  # no telling suffix: the checkpoint's format


def test_training_progress_bar_only_where_it_renders(monkeypatch):
    """The epoch bar of ``train()`` draws on a terminal and in a Jupyter kernel (whose stderr is no
    TTY); with stderr piped to a log, or ``progress=False``, there is no bar (and so no host read
    of the running loss for it)."""
    import io

    from interformer.train import _progress
    from utils import TerminalStream as Terminal

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    for stream, enabled, drawn in ((Terminal(), True, True), (io.StringIO(), True, False), (Terminal(), False, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        bar = _progress(3, "epoch 1/1", enabled)
        assert (bar is not None) == drawn, (type(stream).__name__, enabled)
        if bar is not None:
            bar.update(3)
            bar.close()
            assert stream.getvalue()
    monkeypatch.setitem(sys.modules, "ipykernel", type(sys)("ipykernel"))  # as inside Jupyter
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = _progress(3, "epoch 1/1", True)
    assert bar is not None
    bar.close()


def _bars_config(bars, **kw) -> T.TrainConfig:
    settings = dict(data="csv", train=[str(bars / "train.csv")], valid=[str(bars / "valid.csv")],
                    schema=str(bars / "schema.yaml"), batch_size=64, epochs=1, progress=False,
                    output_dir=str(bars / "run"), model={k: v for k, v in TINY.items() if k != "max_seq_len"})
    settings.update(kw)
    return T.TrainConfig.from_dict(settings)


def test_a_validation_split_of_one_class_warns_and_does_not_stop_the_run_early(bars, capsys):
    """Validation labels all 0: AUC is NaN every epoch. Each epoch warns and says why, none counts
    toward patience (the run does all its epochs instead of 'early stopping' after one), no best.pt
    is written, and the end of the run says that no best checkpoint could be chosen."""
    lines = (bars / "valid.csv").read_text().splitlines()
    (bars / "valid.csv").write_text("\n".join([lines[0]] + ["0" + line[1:] for line in lines[1:]]) + "\n")
    s = T.train(_bars_config(bars, epochs=3, patience=1), log=print)
    out = capsys.readouterr().out
    assert s["status"] == "finished" and [e["epoch"] for e in s["epochs"]] == [1, 2, 3]
    assert all(math.isnan(e["valid"]["auc"]) for e in s["epochs"])
    assert T.load_checkpoint(bars / "run" / "last.pt")["stale_epochs"] == 0
    assert not (bars / "run" / "best.pt").exists() and s["best_valid_auc"] is None
    for epoch in (1, 2, 3):
        assert (f"warning: epoch {epoch}: the validation AUC is undefined (NaN): the validation rows hold one "
                "label class only") in out
    assert "does not count toward early stopping" in out and "early stopping:" not in out
    assert "no best checkpoint could be chosen by validation AUC" in out
    assert "final metrics (last weights)" in out


def test_a_nan_auc_epoch_between_defined_ones_keeps_the_patience_count(bars, monkeypatch, capsys):
    """Normal epochs still count: AUCs 0.7, NaN, 0.6, 0.65 with patience 2 stop after epoch 4 (two
    epochs worse than 0.7; the NaN epoch is left out), best.pt is epoch 1's, no closing note."""
    script_validation_aucs(monkeypatch, [0.7, float("nan"), 0.6, 0.65, 0.9])
    s = T.train(_bars_config(bars, epochs=6, patience=2), log=print)
    out = capsys.readouterr().out
    assert s["status"] == "early_stopped" and len(s["epochs"]) == 4 and s["best_valid_auc"] == 0.7
    assert T.load_checkpoint(bars / "run" / "best.pt")["epoch"] == 1
    assert "warning: epoch 2: the validation AUC is undefined (NaN): the model's scores are not all finite" in out
    assert "no best checkpoint" not in out


def test_training_reads_each_split_by_its_files_suffix(bars):
    """data: csv with Parquet files reads them as Parquet (as evaluate does), not as CSV text
    (which failed with a misleading UTF-8 error); a corrupt Parquet file raises DataError naming it."""
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is installed by make test")
    import pyarrow.csv as pacsv

    from interformer.dataio import DataError

    pq.write_table(pacsv.read_csv(bars / "train.csv", convert_options=pacsv.ConvertOptions(
        column_types={"item_history": "string", "cate_history": "string"})), bars / "train.parquet")
    s = T.train(_bars_config(bars, train=[str(bars / "train.parquet")]), log=quiet)
    assert s["status"] == "finished" and s["epochs"][0]["valid"]["samples"] == 120
    ref = T.train(_bars_config(bars, output_dir=str(bars / "ref")), log=quiet)
    assert_same_weights(weights(bars / "run" / "last.pt"), weights(bars / "ref" / "last.pt"))
    assert s["final"]["valid"]["auc"] == ref["final"]["valid"]["auc"]
    # data: parquet with CSV files: read as CSV
    T.train(_bars_config(bars, data="parquet", output_dir=str(bars / "pq")), log=quiet)
    assert_same_weights(weights(bars / "pq" / "last.pt"), weights(bars / "ref" / "last.pt"))
    # the checkpoint's own splits, as `evaluate` reads them, by the same rule
    own = T.evaluate_checkpoint(str(bars / "pq" / "last.pt"))["valid"]
    assert own["auc"] == ref["final"]["valid"]["auc"]
    (bars / "bad.parquet").write_bytes((bars / "train.parquet").read_bytes()[:100])
    with pytest.raises(DataError, match=rf"^{re.escape(str(bars / 'bad.parquet'))}:metadata: unreadable Parquet file"):
        T.train(_bars_config(bars, train=[str(bars / "bad.parquet")], output_dir=str(bars / "bad")), log=quiet)


def test_without_a_bar_log_every_prints_a_step_line(tmp_path, monkeypatch, capsys):
    """No bar (progress off, or stderr not a terminal): a line every log_every steps; with a bar,
    the bar shows them and no line is printed."""
    lines = []
    T.train(tiny_config(tmp_path / "a", log_every=3), log=lines.append)  # 8 steps an epoch, 2 epochs
    steps = [line for line in lines if line.startswith("step ")]
    assert [int(line.split()[1].rstrip(":")) for line in steps] == [3, 6, 9, 12, 15]
    for line in steps:
        assert re.match(r"^step \d+: loss \d+\.\d{4}, [\d,]+ samples/s \(epoch [12], batch \d/8; ", line), line
    assert "(epoch 2, batch 1/8;" in steps[2]  # step 9
    lines.clear()
    T.train(tiny_config(tmp_path / "b", epochs=1), log=lines.append)  # the default, 20: no line in 8 steps
    assert not [line for line in lines if line.startswith("step ")]
    # progress on, but stderr is a log file: lines
    T.train(tiny_config(tmp_path / "c", epochs=1, progress=True, log_every=4), log=lines.append)
    assert [line.split(":")[0] for line in lines if line.startswith("step ")] == ["step 4", "step 8"]
    # a bar that renders: no lines
    monkeypatch.setattr(T, "interactive_stderr", lambda: True)
    lines.clear()
    T.train(tiny_config(tmp_path / "d", epochs=1, progress=True, log_every=4), log=lines.append)
    assert not [line for line in lines if line.startswith("step ")]
    assert capsys.readouterr().err  # the bar was drawn


# ------------------------------------------------------------------------------- checkpoints, evaluate
def test_checkpoints_hold_plain_values_and_a_foreign_object_is_not_unpickled(tmp_path):
    """best.pt and last.pt load with ``torch.load(weights_only=True)`` (the NumPy RNG state and
    ``versions()["torch"]`` used to force ``weights_only=False``, and so did a ``Path`` given as
    ``output_dir``); load_checkpoint, which ``evaluate`` and ``--resume`` use, refuses a file that
    would run code when unpickled instead of running it."""
    out = tmp_path / "run"
    T.train(tiny_config(out, epochs=1, synthetic_train=128, synthetic_valid=64, output_dir=out), log=quiet)
    for name in ("best.pt", "last.pt"):
        state = torch.load(out / name, map_location="cpu", weights_only=True)
        assert state["train_config"]["output_dir"] == str(out)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    state = T.load_checkpoint(out / "last.pt")
    state["extra"] = Payload()
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'evil.pt'))}: refused: .*weights_only=False"):
        T.load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_a_checkpoint_with_numpy_rng_state_from_before_still_loads_and_resumes(tmp_path, full_run):
    """A checkpoint as written before they held plain values only (NumPy's RNG state as an array,
    the torch version as a TorchVersion, the output directory as a pathlib.Path when the config was
    built with one) still loads with weights_only=True and resumes to the weights of the
    uninterrupted run."""
    import numpy as np

    out = tmp_path / "part"
    T.train(tiny_config(out, max_steps=11), log=quiet)
    state = T.load_checkpoint(out / "last.pt")
    for rng in state["rng"]:
        name, keys, *rest = rng["numpy"]
        rng["numpy"] = (name, np.asarray(keys, dtype=np.uint32), *rest)
    state["versions"]["torch"] = torch.__version__  # a TorchVersion
    state["train_config"]["output_dir"] = Path(state["train_config"]["output_dir"])
    torch.save(state, out / "last.pt")
    with pytest.raises(Exception):  # what it holds is not plain: the allowlist below is what loads it
        torch.load(out / "last.pt", weights_only=True)
    assert isinstance(T.load_checkpoint(out / "last.pt")["rng"][0]["numpy"][1], np.ndarray)
    T.train(tiny_config(out, resume=True, max_steps=100), log=quiet)
    assert_same_training_state(full_run, T.load_checkpoint(out / "last.pt"))


def test_a_checkpoint_with_the_earlier_low_rank_bias_layout_resumes(tmp_path, full_run):
    """Checkpoints written before 2026-11-29 hold the ``LowRankCrossNet`` biases as ``[D, 1]`` (now
    ``[D]``, as torchrec's), and AdamW's moments of them in that shape. Such a last.pt resumes to the
    weights of the uninterrupted run: the module's load hook views the biases as ``[D]``, and
    ``train._bias_state_in_param_shapes`` the moments (without it the first step's update fails)."""
    from interformer.layers import LowRankCrossNet

    out = tmp_path / "part"
    cfg = tiny_config(out, max_steps=11)
    T.train(cfg, log=quiet)
    state = T.load_checkpoint(out / "last.pt")
    model = T.build_model(cfg, {})  # the run's model and dense optimiser: their parameter order
    order = [p for g in T.build_optimizers(model, cfg)[0].param_groups for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    moved = 0
    for m in model.modules():
        if isinstance(m, LowRankCrossNet):
            for p in m.bias:
                state["model"][names[id(p)]] = state["model"][names[id(p)]].reshape(-1, 1)
                saved = state["optimizers"][0]["state"][next(i for i, q in enumerate(order) if q is p)]
                for k in ("exp_avg", "exp_avg_sq"):
                    saved[k] = saved[k].reshape(-1, 1)
                    moved += 1
    assert moved
    torch.save(state, out / "last.pt")
    T.train(tiny_config(out, resume=True, max_steps=100), log=quiet)
    assert_same_training_state(full_run, T.load_checkpoint(out / "last.pt"))


def test_the_epoch_train_loss_is_the_mean_over_its_samples(tmp_path, monkeypatch):
    """65 samples in batches of 32: the epoch's train loss is the mean over the 65 samples, the last
    batch of one weighing one sample (it was the mean of the three batch means, that sample
    weighing as much as a full batch: a review's find, 2026-11-29). The same after a stop at the
    first batch and a resume, also from a checkpoint written before, which held (sum, count) of
    batch means: its full batches are converted exactly. A stand-in loss of 1 for a full batch and
    0 for the partial one makes the means 64 / 65 against the old 2 / 3."""
    monkeypatch.setattr(T.InterFormerCTR, "loss",
                        staticmethod(lambda logits, label: logits.sum() * 0 + float(len(label) == 32)))

    def cfg(out, **kw):
        return tiny_config(out, synthetic_train=65, synthetic_valid=0, batch_size=32, epochs=1, **kw)

    whole = T.train(cfg(tmp_path / "whole"), log=quiet)
    assert whole["epochs"][0]["train_loss"] == pytest.approx(64 / 65)
    for earlier in (False, True):
        out = tmp_path / f"part-{earlier}"
        T.train(cfg(out, max_steps=1), log=quiet)
        if earlier:  # as such a checkpoint held it: the first batch's mean, one batch
            state = T.load_checkpoint(out / "last.pt")
            assert state.pop("epoch_loss_per") == "sample" and state["epoch_loss"] == [(32.0, 32)]
            state["epoch_loss"] = [(1.0, 1)]
            torch.save(state, out / "last.pt")
        resumed = T.train(cfg(out, resume=True, max_steps=100), log=quiet)
        assert resumed["epochs"][0]["train_loss"] == pytest.approx(64 / 65), earlier


def test_an_unreadable_or_foreign_checkpoint_raises_naming_the_file(tmp_path):
    """Truncated, empty, a bare state_dict, a directory: each error names the path and says what is
    wrong (they were OSError "[Errno 22] Invalid argument", EOFError, KeyError 'train_config')."""
    T.train(tiny_config(tmp_path / "run", epochs=1, synthetic_train=64, synthetic_valid=0, synthetic_test=32),
            log=quiet)
    whole = (tmp_path / "run" / "last.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[: len(whole) // 3])
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(T.build_model(T.TrainConfig(model=dict(TINY)), {}).state_dict(), tmp_path / "bare.pt")
    (tmp_path / "data.csv").write_text("label,user_id\n1,7\n")  # a data file in the checkpoint's place
    (tmp_path / "p.pt").write_bytes(b"PK")  # too short for any header (torch.load unpickled it and refused it)
    (tmp_path / "xy.pt").write_bytes(b"xy")
    for name, match in (("truncated.pt", "not a readable checkpoint"), ("empty.pt", "not a readable checkpoint"),
                        ("p.pt", "not a readable checkpoint"), ("xy.pt", r"not a readable checkpoint \(2 bytes"),
                        ("data.csv", "not a checkpoint: torch.save writes a zip archive .* starts with b'labe'"),
                        ("bare.pt", "not a checkpoint written by `python -m interformer train` .*bare state_dict")):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / name))}:? .*{match}"):
            main(["evaluate", str(tmp_path / name)])
    with pytest.raises(IsADirectoryError, match="pass its best.pt or last.pt"):
        T.evaluate_checkpoint(str(tmp_path / "run"))
    (tmp_path / "run" / "last.pt").write_bytes(whole[:5000])  # --resume reads it the same way
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'run' / 'last.pt'))}: not a readable"):
        T.train(tiny_config(tmp_path / "run", resume=True), log=quiet)


def test_overwrite_keeps_the_old_run_when_its_compile_backend_is_unknown(tmp_path):
    """--overwrite deleted the old run before torch.compile looked up its backend; now it deletes
    only once everything the run needs is built."""
    out = tmp_path / "run"
    T.train(tiny_config(out, epochs=1, synthetic_train=64, synthetic_valid=0), log=quiet)
    before = {p.name for p in out.iterdir()}
    with pytest.raises(Exception, match="nosuch"):
        T.train(tiny_config(out, epochs=1, overwrite=True, compile=True, compile_backend="nosuch"), log=quiet)
    assert {p.name for p in out.iterdir()} == before == {"last.pt", "run.json"}


def test_an_unusable_cuda_device_is_refused_before_the_data_are_read(tmp_path, monkeypatch):
    """No CUDA (or no such GPU): a ValueError naming the device, raised before the data are read
    (it was PyTorch's AssertionError "Torch not compiled with CUDA enabled", after them)."""
    T.train(tiny_config(tmp_path / "run", epochs=1, synthetic_train=64, synthetic_valid=32), log=quiet)
    device = f"cuda:{torch.cuda.device_count()}"  # never there: the index is one past the last GPU

    def no_reading(*a, **k):
        raise AssertionError("the data were read before the device was checked")

    monkeypatch.setattr(T, "build_data", no_reading)
    with pytest.raises(ValueError, match=rf"device '{device}': (CUDA is not available|this machine has)"):
        T.train(tiny_config(tmp_path / "new", device=device), log=quiet)
    with pytest.raises(ValueError, match=rf"device '{device}'"):
        T.evaluate_checkpoint(str(tmp_path / "run" / "last.pt"), device=device)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "mps", "meta"],
                         ids=["typo", "bad-index", "mps", "meta"])  # (an id "gpu" would mark it a GPU test: conftest)
def test_a_device_other_than_cpu_or_cuda_is_a_one_line_error_before_any_work(tmp_path, capsys, monkeypatch, device):
    """``--device gpu`` or ``cuda:x`` (names torch cannot read) was torch's RuntimeError, a traceback
    with status 1, and ``mps`` or ``meta`` got as far as reading the data or moving the model. Each
    command refuses them as the demo does: one ``error:`` line, status 2, before any work (no
    output directory made, the checkpoint, here missing, not read); :func:`load_model` too."""
    from interformer.__main__ import cli

    monkeypatch.delenv("INTERFORMER_TRACEBACK", raising=False)
    message = f"python -m interformer: error: device must be cpu or cuda (optionally cuda:N), got {device!r}\n"
    missing = str(tmp_path / "none.pt")
    for argv in (["train", "--output-dir", str(tmp_path / "run"), "--no-progress"], ["evaluate", missing],
                 ["score", missing, str(tmp_path / "none.csv"), "--output", str(tmp_path / "s.csv")]):
        assert cli([*argv, "--device", device]) == 2, argv
        assert capsys.readouterr().err.startswith(message), argv
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        T.load_model(missing, device=device)


def test_a_checkpoint_whose_run_named_another_device_type_still_evaluates_elsewhere(tmp_path):
    """A run's own device is not checked when its checkpoint is scored on the device given (a run on
    ``mps``, say, from before devices were limited to cpu and cuda)."""
    T.train(tiny_config(tmp_path / "run", epochs=1, synthetic_train=64, synthetic_valid=32), log=quiet)
    state = T.load_checkpoint(tmp_path / "run" / "last.pt")
    state["train_config"]["device"] = "mps"
    torch.save(state, tmp_path / "mps.pt")
    assert T.evaluate_checkpoint(str(tmp_path / "mps.pt"), device="cpu")["valid"]["samples"] == 32


def test_an_empty_device_is_the_default_and_a_resumed_run_names_a_refused_saved_one(tmp_path):
    """``device: ""`` reads as unset, the default device, as it did before devices were checked
    (``None or "cuda"``): in a settings file, for ``evaluate``, and in a run saved with it, which
    resumes. A run saved with a device now refused (``mps``) resumes with ``--device`` given, and
    without it the error says the value is the checkpoint's and how to resume (a review's finds);
    ``evaluate_checkpoint`` takes a device as ``load_model`` does, a ``torch.device`` or text."""
    assert T.TrainConfig(device="").device is None
    T.train(tiny_config(tmp_path / "run", epochs=4, max_steps=1, synthetic_train=64, synthetic_valid=32,
                        device=""), log=quiet)
    assert T.evaluate_checkpoint(str(tmp_path / "run" / "last.pt"), device="")["valid"]["samples"] == 32
    assert T.evaluate_checkpoint(str(tmp_path / "run" / "last.pt"), device=torch.device("cpu"))["valid"]["samples"] == 32
    assert T.train(T.TrainConfig.from_dict(dict(resume=True, output_dir=str(tmp_path / "run"), max_steps=2)),
                   log=quiet)["step"] == 2
    state = T.load_checkpoint(tmp_path / "run" / "last.pt")
    state["train_config"]["device"] = "mps"
    torch.save(state, tmp_path / "run" / "last.pt")
    with pytest.raises(ValueError, match=r"resume: the checkpoint's device setting: .*'mps'.*--device cpu"):
        T.train(T.TrainConfig.from_dict(dict(resume=True, output_dir=str(tmp_path / "run"), max_steps=3)), log=quiet)
    resumed = T.TrainConfig.from_dict(dict(resume=True, output_dir=str(tmp_path / "run"), max_steps=3, device="cpu"))
    assert T.train(resumed, log=quiet)["step"] == 3


def test_a_falsy_model_section_that_is_not_a_mapping_is_refused_beside_model_flags(tmp_path, capsys, monkeypatch):
    """``model: ""`` (or ``[]``, ``0``) in a settings file with ``--model KEY=VALUE`` on the command
    line: refused as without the flag, not read as an empty section (a review's find)."""
    from interformer.__main__ import cli

    monkeypatch.delenv("INTERFORMER_TRACEBACK", raising=False)
    for value in ('""', "[]", "0"):
        settings = tmp_path / "s.yaml"
        settings.write_text(f"model: {value}\nsynthetic_train: 64\n")
        assert cli(["train", "--config", str(settings), "--model", "d_model=16", "--output-dir",
                    str(tmp_path / "run"), "--no-progress"]) == 2, value
        assert "model must be a mapping" in capsys.readouterr().err, value
    assert not (tmp_path / "run").exists()


def test_the_plot_has_an_auc_panel_only_where_there_is_validation(tmp_path):
    """``curves.png`` of a run without a validation split is the loss panel alone (half the width),
    drawn without a warning; it had an empty AUC panel, and matplotlib warned that its legend had
    nothing to show. With validation: both panels."""
    image = pytest.importorskip("matplotlib.image")
    history = [{"epoch": e, "train_loss": 0.7 - 0.1 * e} for e in (1, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alone = image.imread(T.plot_curves(history, tmp_path / "alone.png"))
        valid = [dict(r, valid={"logloss": 0.6, "auc": 0.7, "gauc": 0.65}) for r in history]
        both = image.imread(T.plot_curves(valid, tmp_path / "both.png"))
    assert (alone.shape[1], both.shape[1]) == (450, 900)


def test_plot_without_matplotlib_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as when it is not installed
    with pytest.raises(ImportError, match="--plot .*needs matplotlib"):
        T.train(tiny_config(tmp_path, epochs=1, plot=True), log=quiet)
    assert not (tmp_path / "last.pt").exists()


def _model_and_file(ckpt, path):
    """A checkpoint's eager model (eval mode) built here from its settings and weights, and ``path``
    read with its schema and vocabularies: the independent side of the evaluate and score tests."""
    from interformer.dataio import Schema, TabularDataset

    state = T.load_checkpoint(ckpt)
    model = T.InterFormerCTR(InterFormerConfig(**state["model_config"])).eval()
    model.load_state_dict(state["model"])
    return model, TabularDataset([str(path)], Schema.from_dict(state["schema"]), T._vocabs_from_dict(state["vocabularies"]))


def test_evaluate_reports_skipped_rows_scores_right_and_names_an_empty_file(bars, capsys):
    """A checkpoint trained with on_bad_rows=skip: evaluate says how many rows of the file it left
    out (it said nothing); its metrics are those of the model's own logits; a header-only file
    raises naming it."""
    from interformer import metrics as M

    T.train(_bars_config(bars, valid=[], on_bad_rows="skip"), log=quiet)
    ckpt = str(bars / "run" / "last.pt")
    (bars / "bad.csv").write_text((bars / "valid.csv").read_text() + "x,1,2,3,4,0.1,,\n2,1,2,3,4,0.1,,\n")
    main(["evaluate", ckpt, str(bars / "bad.csv"), "--batch-size", "13", "--output", str(bars / "m.json")])
    printed = capsys.readouterr().out
    m = json.loads((bars / "m.json").read_text())["eval"]
    assert m["samples"] == 120 and m["skipped_rows"] == 2
    assert "note: skipped 2 malformed row(s) in eval" in printed and "bad.csv:122:" in printed
    # the same numbers from the loaded model's logits, computed here
    model, ds = _model_and_file(ckpt, bars / "valid.csv")
    with torch.no_grad():
        parts = [(model(*b.inputs()), b.label, b.group) for b in ds.batches(32, shuffle=False)]
    logits, labels, groups = (torch.cat(x) for x in zip(*parts))
    want = {"auc": M.auc(logits, labels), "gauc": M.gauc(logits, labels, groups),
            "logloss": M.logloss(logits, labels), "ne": M.normalized_entropy(logits, labels)}
    for k, v in want.items():
        assert m[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert T.evaluate_checkpoint(ckpt, [str(bars / "valid.csv")])["eval"]["skipped_rows"] == 0
    (bars / "empty.csv").write_text((bars / "valid.csv").read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bars / 'empty.csv'))}: no rows to evaluate"):
        T.evaluate_checkpoint(ckpt, [str(bars / "empty.csv")])


def test_score_writes_each_rows_probability_and_where_it_is(bars, capsys, full_run):
    """``score`` on a file without labels (a malformed row skipped, a blank line) and on a labeled
    file with a label that is not 0/1 (not read, so not malformed): one CSV line per scored row with
    its file, its 0-based row and sigmoid of the logit that the checkpoint's model, loaded here,
    gives that row; the CSV's text reads back to the exact float32 scores. A directory as --output
    is refused before scoring; a checkpoint of synthetic data has no schema to read files with."""
    T.train(_bars_config(bars, valid=[], on_bad_rows="skip"), log=quiet)
    ckpt = str(bars / "run" / "last.pt")
    lines = (bars / "valid.csv").read_text().splitlines()
    unlabeled = [line.split(",", 1)[1] for line in lines]
    unlabeled[1 + 3] = unlabeled[1 + 3].rsplit(",", 2)[0]  # row 3: two fields short
    unlabeled.insert(1 + 6, "")  # a blank line after row 5: not a row
    (bars / "nolabel.csv").write_text("\n".join(unlabeled) + "\n")
    lines[1 + 9] = "7" + lines[1 + 9][1:]
    (bars / "odd.csv").write_text("\n".join(lines) + "\n")
    files = [str(bars / "nolabel.csv"), str(bars / "odd.csv")]
    capsys.readouterr()
    for where in (str(bars), str(bars / "newdir") + os.sep):
        with pytest.raises(ValueError, match=r"--output .* is a directory"):
            main(["score", ckpt, *files, "--output", where])
    out = bars / "scores" / "s.csv"
    main(["score", ckpt, *files, "--batch-size", "13", "--output", str(out)])
    printed = capsys.readouterr().out
    assert f"scored 239 row(s) of 2 file(s) with {ckpt}" in printed
    assert "note: skipped 1 malformed row(s) in the files, not scored" in printed and "nolabel.csv:5:" in printed
    with open(out, newline="") as fh:
        got = list(csv.DictReader(fh))
    want_rows = [i for i in range(120) if i != 3] + list(range(120))
    assert [(r["file"], int(r["row"])) for r in got] == [(files[0], i) for i in want_rows[:119]] + \
        [(files[1], i) for i in want_rows[119:]]
    # the model's own logits, computed here on the original labeled file, at another batch size
    model, ds = _model_and_file(ckpt, bars / "valid.csv")
    with torch.no_grad():
        p = torch.sigmoid(torch.cat([model(*b.inputs()) for b in ds.batches(32, shuffle=False)]))
    want = torch.cat([p[[i for i in range(120) if i != 3]], p])
    scores = torch.tensor([float(r["score"]) for r in got], dtype=torch.float32)
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-7)
    api = T.score_checkpoint(ckpt, (f for f in files), batch_size=13)  # a generator of paths is read once
    assert torch.equal(api.score, scores)  # the printed digits give the float32 back (same batches: same bits)
    assert api.row.tolist() == want_rows and api.file.tolist() == [0] * 119 + [1] * 120 and api.skipped_rows == 1
    assert api.paths == files
    one = T.score_checkpoint(ckpt, bars / "odd.csv", batch_size=13)  # one path, a Path
    # (not bitwise: above, odd.csv's rows began at row 119, inside a batch of 13 shared with
    # nolabel.csv's, so its batches were made up otherwise, and a CPU's GEMMs may sum in another
    # order for another batch: 2 of 120 scores one float32 step apart on the CI CPU of 2026-11-29)
    assert one.paths == files[1:]
    torch.testing.assert_close(one.score, scores[119:], rtol=1e-5, atol=1e-7)
    assert T.evaluate_checkpoint(ckpt, bars / "odd.csv")["eval"]["skipped_rows"] == 1  # the label 7 is read here
    pq = pytest.importorskip("pyarrow.parquet")
    api.write(bars / "s.parquet")  # Parquet for that suffix: the same columns, the exact scores
    table = pq.read_table(bars / "s.parquet")
    assert table.column_names == ["file", "row", "score"] and table["file"].to_pylist() == [r["file"] for r in got]
    assert table["row"].to_pylist() == want_rows and torch.equal(torch.tensor(table["score"].to_numpy()), scores)
    # written over what it reads: refused before scoring (the CLI) and before writing (Python)
    for target in (files[1], ckpt):
        with pytest.raises(ValueError, match="which is read here"):
            main(["score", ckpt, *files, "--output", target])
    with pytest.raises(ValueError, match="which is read here"):
        one.write(bars / "odd.csv")
    with pytest.raises(ValueError, match="which is read here"):
        main(["evaluate", ckpt, files[1], "--output", files[1]])
    assert (bars / "odd.csv").read_text() == "\n".join(lines) + "\n"
    for twice in ([files[1], str(bars / "." / "odd.csv")], files[1:] * 2):  # also one string object twice
        with pytest.raises(ValueError, match=r"odd\.csv is given twice"):
            T.score_checkpoint(ckpt, twice)
    # rows held in memory: load_scorer encodes them as the file's rows and gives the same scores
    scorer = T.load_scorer(ckpt, batch_size=13)
    with open(bars / "odd.csv", newline="") as fh:
        in_memory = list(csv.DictReader(fh))
    assert torch.equal(scorer(in_memory), one.score) and scorer([]).shape == (0,)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        T.load_scorer(ckpt, batch_size=0)
    for one_row in (in_memory[0], {}):  # one mapping, not a list of them: RowEncoder's error, not its keys as rows
        with pytest.raises(TypeError, match=r"got one mapping: pass \[row\]"):
            scorer(one_row)
    del in_memory[4]["price"]
    with pytest.raises(ValueError, match=r"^row 4: missing column\(s\) \['price'\]$"):
        scorer(in_memory)
    torch.save(full_run, bars / "synthetic.pt")
    with pytest.raises(ValueError, match="trained on synthetic data; it has no schema"):
        main(["score", str(bars / "synthetic.pt"), files[0], "--output", str(bars / "x.csv")])
    assert not (bars / "x.csv").exists()
    with pytest.raises(ValueError, match="trained on synthetic data; it has no schema"):
        T.load_scorer(bars / "synthetic.pt")


def test_scoring_needs_no_user_column_that_only_groups_gauc(bars, capsys):
    """A schema whose ``user`` is not a sparse feature: the model never reads that column, so ``score``,
    :func:`score_checkpoint` and :func:`load_scorer` take rows without it, and score them as the
    same rows with it (before, each refused them: "missing required column(s) ['user_id']"; new
    traffic need not carry the id the training data grouped by). ``evaluate`` still needs it: gAUC."""
    from interformer.__main__ import cli

    schema = dict(label="label", dense=["price"], sparse=["item_id", "cate_id", "context"],
                  sequences=["item_history", "cate_history"], user="user_id", max_seq_len=10,
                  shared_vocab={"item_history": "item_id", "cate_history": "cate_id"})
    T.train(_bars_config(bars, schema=schema, valid=[]), log=quiet)
    ckpt = str(bars / "run" / "last.pt")
    lines = (bars / "valid.csv").read_text().splitlines()
    (bars / "new.csv").write_text("\n".join(",".join(c for i, c in enumerate(line.split(",")) if i not in (0, 1))
                                            for line in lines[:21]) + "\n")  # no label, no user_id: 20 rows
    with_user = T.score_checkpoint(ckpt, [bars / "valid.csv"], batch_size=20)
    new = T.score_checkpoint(ckpt, [bars / "new.csv"], batch_size=20)
    assert torch.equal(new.score, with_user.score[:20])
    assert cli(["score", ckpt, str(bars / "new.csv"), "--output", str(bars / "s.csv")]) == 0
    assert len((bars / "s.csv").read_text().splitlines()) == 21
    with open(bars / "new.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert "user_id" not in rows[0]
    assert torch.equal(T.load_scorer(ckpt, batch_size=20)(rows), new.score)
    capsys.readouterr()
    assert cli(["evaluate", ckpt, str(bars / "new.csv")]) == 2  # metrics need the label and the groups
    assert "missing required column(s) ['label', 'user_id']" in capsys.readouterr().err


def test_score_to_parquet_without_pyarrow_is_refused_before_scoring(tmp_path, monkeypatch):
    """Parquet output needs pyarrow: without it the command stops before it reads the checkpoint
    (here there is none), not after scoring every row."""
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import pyarrow.parquet raises ImportError
    with pytest.raises(ValueError, match="writing Parquet needs pyarrow"):
        main(["score", str(tmp_path / "none.pt"), str(tmp_path / "none.csv"), "--output", str(tmp_path / "s.pq")])


def test_checkpoint_vocabularies_round_trip_packed_and_old_ones_still_read(tmp_path):
    """The packed form a checkpoint holds (loadable with weights_only=True, and fast to load) gives
    back the same tokens, counts and shared tables; the unpacked dict of older checkpoints reads too."""
    from interformer.dataio import Vocabulary, vocabularies_to_dict

    shared = Vocabulary(["7", "é😀", "a,b", "x\ny"], [5, 3, 2, 1])
    vocabs = {"item_id": shared, "item_history": shared, "user_id": Vocabulary(["u1", "u22"])}
    torch.save({"v": T._vocabs_to_dict(vocabs)}, tmp_path / "v.pt")
    for d in (torch.load(tmp_path / "v.pt", weights_only=True)["v"], vocabularies_to_dict(vocabs)):
        back = T._vocabs_from_dict(d)
        assert back.keys() == vocabs.keys() and back["item_id"] is back["item_history"]
        for k, v in vocabs.items():
            assert (back[k].tokens, back[k].counts) == (v.tokens, v.counts), k


def test_the_command_reports_a_users_mistake_in_one_line(tmp_path):
    """``python -m interformer`` prints a refused run (here: an output directory that already holds
    one), and this package's own RuntimeErrors (bf16 under the interpreter), as one ``error:`` line
    with status 2, not as a traceback; INTERFORMER_TRACEBACK=1 shows the traceback. A CPU run of the
    fused kernels says that the interpreter is slow."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "interformer", "train", *SYNTH, *TINY_FLAGS, "--epochs", "1", "--backend", "triton",
            "--synthetic-train", "64", "--synthetic-valid", "8", "--batch-size", "64", "--no-progress",
            "--device", "cpu", "--output-dir", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "INTERFORMER_TRACEBACK"}
    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "note: the fused kernels run in Triton's interpreter" in first.stdout
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert re.search(r"^python -m interformer: error: .*already holds a run", again.stderr, flags=re.M)
    shown = subprocess.run(argv, env=dict(env, INTERFORMER_TRACEBACK="1"), capture_output=True, text=True, timeout=600)
    assert shown.returncode == 1 and "Traceback" in shown.stderr and "already holds a run" in shown.stderr
    # one of this package's RuntimeErrors too: bf16 under the interpreter (the fused path on the CPU)
    bf16 = subprocess.run([sys.executable, "-m", "interformer", "evaluate", str(out / "last.pt"), "--amp", "bf16",
                           "--device", "cpu"], env=env, capture_output=True, text=True, timeout=600)
    assert bf16.returncode == 2 and "Traceback" not in bf16.stderr, bf16.stderr[-3000:]
    assert "error: interformer: a fused Triton op was given bfloat16 tensors" in bf16.stderr


def test_unreadable_settings_and_schema_files_are_named_in_one_line_and_leave_no_directory(tmp_path, capsys,
                                                                                           monkeypatch):
    """A settings or schema file that is missing, a directory, not UTF-8 or not valid YAML/JSON, a
    ``--model`` without ``=``, and a ``schema`` or ``model`` setting of the wrong kind (a list, a
    number), end the command with one ``error:`` line naming the file or the key (status 2).
    Before, broken YAML was a traceback naming "<unicode string>" (status 1), broken JSON in a
    schema named no file, a missing file was a bare "[Errno 2]", and ``--model`` exited with status
    1 and no ``error:``; an ``--output-dir`` that is a file (or under one) said "[Errno 17] File
    exists". A run that fails before writing anything (here, a training file without
    the schema's columns) removes the output directory it made, parents too (it left them empty),
    and keeps one that was there."""
    from interformer.__main__ import cli

    monkeypatch.delenv("INTERFORMER_TRACEBACK", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "b.yaml").write_text("epochs: [1\n")
    (tmp_path / "b.json").write_text('{"epochs": ')
    (tmp_path / "bin.yaml").write_bytes(b"epochs: 1\n\xff\n")
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "list_schema.yaml").write_text("data: csv\ntrain: [bad.csv]\nschema: [label, user_id]\n")
    (tmp_path / "int_schema.yaml").write_text("data: csv\ntrain: [bad.csv]\nschema: 5\n")
    (tmp_path / "list_model.yaml").write_text("model: [1, 2]\n")
    (tmp_path / "schema.yaml").write_text(SCHEMA)
    (tmp_path / "bad.csv").write_text("label,user_id\n1,2\n")
    csv_run = ["--data", "csv", "--train", "bad.csv"]
    yaml_error = "not valid YAML (expected ',' or ']', but got '<stream end>': line 2 column 1)"
    for argv, message in [
        (["--config", "b.yaml"], f"b.yaml: {yaml_error}"),
        (["--config", "b.json"], "b.json: not valid JSON (Expecting value: line 1 column 12 (char 11)); settings files "
                                 "are JSON, or YAML named .yaml or .yml"),
        (["--config", "bin.yaml"], "bin.yaml: not valid UTF-8 (byte 0xff at byte 11)"),
        (["--config", "missing.yaml"], "settings file not found: missing.yaml"),
        (["--config", "dir.yaml"], "settings file dir.yaml is a directory, not a file"),
        ([*csv_run, "--schema", "b.yaml"], f"b.yaml: {yaml_error}"),
        ([*csv_run, "--schema", "b.json"], "b.json: not valid JSON (Expecting value: line 1 column 12 (char 11))"),
        ([*csv_run, "--schema", "missing.json"], "schema file not found: missing.json"),
        (["--model", '{"d_model": 8}'], "--model expects KEY=VALUE (e.g. --model d_model=64), got '{\"d_model\": 8}'"),
        # settings of the wrong kind (they were TypeErrors: a traceback, status 1)
        (["--config", "list_schema.yaml"], "schema must be the path of a schema file or a mapping of schema keys, "
                                           "got ['label', 'user_id']"),
        (["--config", "int_schema.yaml"], "schema must be the path of a schema file or a mapping of schema keys, "
                                          "got 5"),
        (["--config", "list_model.yaml", "--model", "d_model=16"], "model must be a mapping of InterFormerConfig "
                                                                   "fields, got [1, 2]"),
        ([*csv_run, "--schema", "schema.yaml"], "bad.csv:1: missing required column(s) ['price', 'item_id', "
                                                "'cate_id', 'context', 'item_history', 'cate_history']; the file has "
                                                "['label', 'user_id']"),
    ]:
        assert cli(["train", *argv, "--output-dir", "out/run"]) == 2, argv
        assert capsys.readouterr().err == (f"python -m interformer: error: {message}\n"
                                           "(INTERFORMER_TRACEBACK=1 shows where it was raised)\n"), argv
        assert not (tmp_path / "out").exists(), argv
    for out in ("bad.csv", "bad.csv/run"):  # mkdir said "[Errno 17] File exists" ("[Errno 20] Not a directory")
        assert cli(["train", "--output-dir", out]) == 2
        assert capsys.readouterr().err.startswith(f"python -m interformer: error: --output-dir {out}: bad.csv is a "
                                                  "file, not a directory; give a directory\n")
    (tmp_path / "out").mkdir()
    assert cli(["train", *csv_run, "--schema", "schema.yaml", "--output-dir", "out/run"]) == 2
    assert (tmp_path / "out").is_dir() and not (tmp_path / "out" / "run").exists()


def test_a_settings_file_may_be_a_pipe(tmp_path):
    """``--config <(...)`` (a pipe, no regular file) is read, as before the one reader of settings
    and schema files, which first called it "not found"."""
    import threading

    fifo = tmp_path / "settings.json"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text('{"epochs": 3}'), daemon=True)
    writer.start()
    assert T.load_settings(str(fifo)) == {"epochs": 3}
    writer.join(timeout=10)


def test_every_train_flag_says_what_it_does_and_its_default(capsys):
    """``train --help`` had no text for most flags and showed defaults only for the enumerated ones:
    each TrainConfig field's flag now has a description, and its default where it has one."""
    import argparse

    from interformer.__main__ import _FLAG_HELP, build_parser

    assert set(_FLAG_HELP) == {f.name for f in dataclasses.fields(T.TrainConfig)}
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    helps = {a.dest: a.help for a in sub._actions}
    for f in dataclasses.fields(T.TrainConfig):
        assert helps[f.name] and helps[f.name].startswith(_FLAG_HELP[f.name]), f.name
        if f.default is not dataclasses.MISSING and f.default not in (None, ""):
            want = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
            assert helps[f.name].endswith(f"(default {want})"), (f.name, helps[f.name])
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default 16384)" in text and "(default runs/interformer)" in text


def test_train_help_lists_the_choices_of_the_enumerated_settings(capsys):
    from interformer.__main__ import build_parser
    from interformer.train import AMP_MODES, COMPILE_MODES, EMBEDDING_OPTIMIZERS

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    for values in (AMP_MODES, COMPILE_MODES, EMBEDDING_OPTIMIZERS, ("auto", "eager", "triton"), ("raise", "skip")):
        assert "oneof" + ",".join(values) in text, values


def _mock_gpu_copies(monkeypatch):
    """Record ``Tensor.pin_memory`` and ``Tensor.to`` (device, non_blocking) calls, doing neither:
    a CPU stands in for the GPU of :func:`T.on_device`'s CUDA branch."""
    calls = []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        device = args[0] if args else kwargs.get("device")
        if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
            calls.append(("to", str(device), kwargs.get("non_blocking", False)))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append(("pin", self.is_contiguous())) or self)
    monkeypatch.setattr(torch.Tensor, "to", to)
    return calls


def test_a_gpu_batch_is_checked_on_the_host_pinned_and_copied_without_blocking(monkeypatch):
    """On a GPU (mocked: pinning and copies are recorded, not done) ``on_device`` checks the
    batch's values on the host before anything is copied (a bad id, or a dense value past a
    ``.half()`` model's range, raises there), pins its five tensors (contiguous; ``group`` stays on
    the CPU), copies each without blocking, and hands back ``values_checked()``, inside which the
    model's forward makes no device-to-host read of the values; a model with its checks off is not
    checked. On a CPU the batch is moved as before and the model checks it itself."""
    from interformer import InterFormerCTR
    from interformer import validation as V

    cfg = InterFormerConfig(**TINY)
    model = InterFormerCTR(cfg)
    cuda = torch.device("cuda", 0)
    batch = make_synthetic(4, cfg, seed=1)
    batch.group = torch.arange(4)
    batch.seq = batch.seq.transpose(0, 1).contiguous().transpose(0, 1)  # strided: pinned contiguous
    calls = _mock_gpu_copies(monkeypatch)
    b, checked = T.on_device(batch, cuda, model)
    assert calls == [("pin", True)] * 5 + [("to", "cuda:0", True)] * 5, calls
    assert b.group is batch.group
    monkeypatch.undo()
    reads = []
    monkeypatch.setattr(V, "_value_checks", lambda *a, **k: reads.append(1))
    b = batch.to("cpu")
    with checked:
        model(*b.inputs())
    assert reads == []
    model(*b.inputs())
    assert reads == [1]  # outside the block the model reads them (the sync the block avoids)
    monkeypatch.undo()

    bad = make_synthetic(4, cfg, seed=1)
    bad.sparse[2, 0] = cfg.sparse_vocab_sizes[0]
    calls = _mock_gpu_copies(monkeypatch)
    with pytest.raises(ValueError, match=r"^sparse: field 0: ids must lie in"):
        T.on_device(bad, cuda, model)
    half = InterFormerCTR(cfg).half()
    wide = make_synthetic(4, cfg, seed=1)
    wide.dense[1, 0] = 1e5
    with pytest.raises(ValueError, match=r"^dense: has values beyond torch.float16's range"):
        T.on_device(wide, cuda, half)
    assert calls == []
    T.on_device(bad, cuda, InterFormerCTR(dataclasses.replace(cfg, validate_inputs=False)))
    assert len(calls) == 10
    monkeypatch.undo()

    b, checked = T.on_device(batch, torch.device("cpu"), model)
    assert isinstance(checked, contextlib.nullcontext)
    with pytest.raises(ValueError, match=r"^sparse"):
        model(*T.on_device(bad, torch.device("cpu"), model)[0].inputs())


def test_a_compiled_model_has_its_batches_checked_on_any_device():
    """A compiled forward skips the value checks; ``on_device`` checks its batches on the host
    (CPU too) and runs it inside ``values_checked()``."""
    from interformer import InterFormerCTR

    cfg = InterFormerConfig(**TINY)
    compiled = torch.compile(InterFormerCTR(cfg), backend="eager")
    bad = make_synthetic(4, cfg, seed=1)
    bad.lengths[0] = cfg.max_seq_len + 1
    with pytest.raises(ValueError, match=r"^lengths"):
        T.on_device(bad, torch.device("cpu"), compiled)
    b, checked = T.on_device(make_synthetic(4, cfg, seed=1), torch.device("cpu"), compiled)
    assert not isinstance(checked, contextlib.nullcontext)


def test_the_training_and_evaluation_loops_call_the_model_through_on_device(tmp_path, monkeypatch):
    """Every training step and every evaluation batch gets its batch from :func:`T.on_device` and
    calls the model inside the context it returns (a CPU run; the context recorded)."""
    seen = {"calls": 0, "entered": 0}
    real = T.on_device

    class Recording(contextlib.AbstractContextManager):
        def __init__(self, inner):
            self.inner = inner

        def __enter__(self):
            seen["entered"] += 1
            return self.inner.__enter__()

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    def spy(batch, device, model):
        seen["calls"] += 1
        b, checked = real(batch, device, model)
        return b, Recording(checked)

    monkeypatch.setattr(T, "on_device", spy)
    cfg = T.TrainConfig(output_dir=str(tmp_path / "run"), epochs=1, batch_size=64, synthetic_train=128,
                        synthetic_valid=64, progress=False, model=dict(TINY))
    T.train(cfg, log=lambda *a, **k: None)
    assert seen["calls"] >= 3 and seen["entered"] == seen["calls"], seen  # 2 steps + 1 validation batch
