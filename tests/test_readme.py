"""The README's examples stay true: its settings file is a valid training config and schema, each of
its command lines parses with the command line's own parser, and its Python snippets run as written
(the first on a GPU: it uses CUDA and bf16, which the CPU interpreter does not have; the second, the
CPU one, everywhere)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def blocks(lang: str) -> list:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def test_the_settings_example_is_a_valid_config_and_schema():
    yaml = pytest.importorskip("yaml")
    from interformer.dataio import Schema
    from interformer.train import TrainConfig

    (text,) = blocks("yaml")
    settings = yaml.safe_load(text)
    cfg = TrainConfig.from_dict(settings)  # every key a field, every value of its type and range
    assert cfg.data == "csv" and cfg.patience == 2 and cfg.embedding_optimizer == "adagrad"
    assert Schema.from_dict(settings["schema"]).max_seq_len == 50


def test_the_command_lines_parse():
    """Each ``python -m interformer`` / ``torchrun -m interformer`` line of the README's shell blocks
    (continuation lines joined, comments dropped) parses: no flag renamed or removed under it."""
    from interformer.__main__ import build_parser, train_config_from_args

    lines = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "interformer" in words and "-m" in words:
                lines.append(words[words.index("interformer") + 1:])
    assert len(lines) >= 5, lines
    parser = build_parser()
    for argv in lines:
        args = parser.parse_args(argv)  # SystemExit on an unknown flag or a bad value
        if args.command == "train" and not args.config:
            train_config_from_args(args)  # the flags make a valid config


@pytest.mark.gpu
def test_the_python_snippet_runs_as_written():
    code, _ = blocks("python")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and all(p.grad is not None for p in scope["model"].parameters())


def test_the_cpu_snippet_runs_as_written():
    """The README's second snippet, the CPU one, in a fresh process without TRITON_INTERPRET in its
    environment (the snippet sets it itself, before triton is imported), ends with a finite loss
    and a gradient on every parameter."""
    import os
    import subprocess
    import sys

    _, code = blocks("python")
    assert 'os.environ["TRITON_INTERPRET"] = "1"' in code
    check = ("\nassert torch.isfinite(loss), loss\n"
             "assert all(p.grad is not None for p in model.parameters())\n"
             "assert model.config.backend == 'triton'\n"
             "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code + check], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.split()[-1:] == ["ok"], res.stderr[-3000:]
