"""`python -m interformer train` / `evaluate`: end to end on synthetic data, BARS CSV and Parquet;
resume equivalence; early stopping; bad files; settings precedence; two gloo processes under DDP.

Every run is a tiny model on a few hundred rows (seconds on 2 CPU threads)."""

from __future__ import annotations

import datetime
import json
import math
import os
import signal
import subprocess
import sys
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


def quiet(*a, **k) -> None:
    pass


# ------------------------------------------------------------------------------- synthetic, CLI
def test_cli_trains_on_synthetic_data_and_writes_its_artifacts(tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", *SYNTH, *TINY_FLAGS, "--epochs", "2", "--output-dir", str(out), "--plot", "--seed", "3"])
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
])
def test_bad_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        T.TrainConfig.from_dict(bad)


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


def test_a_second_sigint_aborts_at_once():
    """The first SIGINT only asks for a checkpoint; it hands the signals back, so the second one
    raises KeyboardInterrupt right away (Python's own handler)."""
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with T._StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested
            assert signal.getsignal(signal.SIGINT) is before
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("the second SIGINT was swallowed")
    assert signal.getsignal(signal.SIGINT) is before


# ------------------------------------------------------------------------------- resume
RESUME_CASES = {
    "adamw": dict(),
    "adagrad-warmup-clip-bf16-dropout": dict(embedding_optimizer="adagrad", warmup_steps=5, clip_grad_norm=0.5,
                                             amp="bf16", model=dict(TINY, dropout=0.2)),
    "sparse_adam-fp16": dict(embedding_optimizer="sparse_adam", amp="fp16", embedding_lr=0.01),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, case):
    """max_steps stops mid-epoch 2 (8 batches per epoch); --resume continues: same weights, optimiser
    state and per-epoch history as the uninterrupted run."""
    kw = RESUME_CASES[case]
    full = T.train(tiny_config(tmp_path / "full", **kw), log=lambda *a: None)
    part = T.train(tiny_config(tmp_path / "part", max_steps=11, **kw), log=lambda *a: None)
    assert part["status"] == "stopped"
    assert T.load_checkpoint(tmp_path / "part" / "last.pt")["batch_in_epoch"] == 3
    resumed = T.train(tiny_config(tmp_path / "part", resume=True, **kw), log=lambda *a: None)
    assert resumed["status"] == "finished" and resumed["step"] == full["step"] == 16
    a, b = T.load_checkpoint(tmp_path / "full" / "last.pt"), T.load_checkpoint(tmp_path / "part" / "last.pt")
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(weights(tmp_path / "full" / "best.pt"), weights(tmp_path / "part" / "best.pt"))
    for sa, sb in zip(a["optimizers"], b["optimizers"]):
        for pa, pb in zip(sa["state"].values(), sb["state"].values()):
            for k in pa:
                assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])), k
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
    T.train(tiny_config(tmp_path / "part", resume=True), log=lambda *a: None)
    a, b = weights(tmp_path / "full" / "last.pt"), weights(tmp_path / "part" / "last.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_sigint_checkpoints_and_resume_matches(tmp_path, monkeypatch):
    """A real SIGINT in the middle of a step: the loop finishes the step, writes last.pt and stops;
    the resumed run ends where the uninterrupted one does."""
    T.train(tiny_config(tmp_path / "full"), log=lambda *a: None)
    calls = {"n": 0}
    real_loss = T.InterFormerCTR.loss

    def loss_with_interrupt(logits, label):
        calls["n"] += 1
        if calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(logits, label)

    monkeypatch.setattr(T.InterFormerCTR, "loss", staticmethod(loss_with_interrupt))
    part = T.train(tiny_config(tmp_path / "part"), log=lambda *a: None)
    monkeypatch.undo()
    assert part["status"] == "stopped" and part["step"] == 6
    T.train(tiny_config(tmp_path / "part", resume=True), log=lambda *a: None)
    assert_same_weights(weights(tmp_path / "full" / "last.pt"), weights(tmp_path / "part" / "last.pt"))


def test_early_stopping_after_patience_epochs(tmp_path, monkeypatch):
    aucs = iter([0.70, 0.72, 0.71, 0.715, 0.9, 0.9])
    real = T.evaluate_split

    def fake(model, dataset, cfg, device):
        m = real(model, dataset, cfg, device)
        m["auc"] = next(aucs)
        return m

    monkeypatch.setattr(T, "evaluate_split", fake)
    s = T.train(tiny_config(tmp_path, epochs=6, patience=2), log=lambda *a: None)
    assert s["status"] == "early_stopped"
    assert [e["epoch"] for e in s["epochs"]] == [1, 2, 3, 4]
    assert T.load_checkpoint(tmp_path / "best.pt")["epoch"] == 2  # saved after epoch 2 (0-based next epoch)
    assert s["best_valid_auc"] == 0.72


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
    main(["evaluate", str(out / "best.pt"), str(bars / "valid.csv"), "--output", str(bars / "m.json")])
    m = json.loads((bars / "m.json").read_text())["eval"]
    for k in ("auc", "gauc", "logloss", "ne"):
        assert m[k] == pytest.approx(final[k], abs=1e-9), k
    assert "eval" in capsys.readouterr().out
    # without files: the checkpoint's own validation split, read with the schema it carries
    (bars / "schema.yaml").unlink()
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
            "--schema", str(bars / "schema.yaml"), "--epochs", "1", "--batch-size", "64", "--no-progress",
            *model_flags(skip=("backend", "max_seq_len"))]
    from interformer.dataio import DataError, DataWarning

    with pytest.raises(DataError, match=r"train\.csv:6: "):
        main(base + ["--output-dir", str(bars / "r1")])
    with pytest.warns(DataWarning, match=r"train\.csv:41: "):
        main(base + ["--output-dir", str(bars / "r2"), "--on-bad-rows", "skip"])
    run = json.loads((bars / "r2" / "run.json").read_text())
    assert run["status"] == "finished" and run["skipped_rows"]["train"] >= 2
    assert "skipped" in capsys.readouterr().out


# ------------------------------------------------------------------------------- DDP
_DDP_SCRIPT = r"""
import json, os, sys, torch
from interformer import train as T
cfg = T.TrainConfig.from_dict(json.loads(sys.argv[1]))
s = T.train(cfg, log=lambda *a: None)
torch.save(s["model"].state_dict(), os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
"""


def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    """torchrun with 2 CPU processes (gloo): DDP keeps the replicas equal; only rank 0 writes the run."""
    cfg = tiny_config(tmp_path / "run", epochs=1, synthetic_train=256, synthetic_valid=64, device="cpu").to_dict()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          "--no-python", sys.executable, "-c", _DDP_SCRIPT, json.dumps(cfg),
                          str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert_same_weights(r0, r1)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["world_size"] == 2 and run["status"] == "finished"
    # 256 rows, 2 ranks, batch 64: 2 steps per rank; the weights moved from their initial values
    assert run["step"] == 2
    assert_same_weights(weights(tmp_path / "run" / "last.pt"), r0)
    T.seed_everything(cfg["seed"])
    init = T.build_model(T.TrainConfig.from_dict(cfg), {})  # what both ranks started from
    assert any(not torch.equal(v, r0[k]) for k, v in init.state_dict().items())


def test_compiled_training_checkpoints_plain_state_dict_keys(tmp_path):
    """--compile wraps the model in torch.compile (aot_eager here: no C++ toolchain needed); the
    checkpoint's keys are the module's own (no ``_orig_mod.``), and training matches the eager run."""
    s = T.train(tiny_config(tmp_path / "c", epochs=1, compile=True, compile_backend="aot_eager"), log=lambda *a: None)
    e = T.train(tiny_config(tmp_path / "e", epochs=1), log=lambda *a: None)
    assert s["status"] == "finished"
    wc, we = weights(tmp_path / "c" / "last.pt"), weights(tmp_path / "e" / "last.pt")
    assert wc.keys() == we.keys()
    for k in we:
        torch.testing.assert_close(wc[k], we[k], rtol=1e-4, atol=1e-5)
