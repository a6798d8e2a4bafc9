"""Command line: python -m interformer {demo,train,evaluate,score,example-data} (--help on each)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import shlex
import sys
import typing


def _runs_on_cpu(device) -> bool:
    """Whether a command given ``--device device`` (None or empty: cuda when available) runs on the CPU.

    An empty ``--device ""`` (``--device "$DEVICE"`` with the variable unset) is unset, as the
    commands read it (:func:`interformer.train._default_device`, ``TrainConfig``); it was taken for
    a bad name here, so ``evaluate`` or ``score`` of a fused checkpoint on a machine without a GPU
    ran on the CPU without Triton's interpreter and failed at the first fused op."""
    import torch

    if device is None or device == "":
        return not torch.cuda.is_available()
    try:
        return torch.device(device).type == "cpu"
    except (RuntimeError, TypeError, ValueError):  # a bad name: the command reports it itself
        return False


def _interpret_on_cpu(device) -> None:
    """When the command runs on the CPU (``--device cpu``, or no GPU), its fused path can only run
    under Triton's interpreter: real Triton cannot launch a kernel on CPU tensors, even on a machine
    that has a GPU. The interpreter must be switched on before triton is imported, which the
    commands do only after this call (``import torch`` does not import triton). Decision: set to
    "1" even where the environment set it otherwise, as a CPU run cannot work without it."""
    if _runs_on_cpu(device):
        os.environ["TRITON_INTERPRET"] = "1"


def _positive_int(text: str) -> int:
    """argparse type of the count flags (samples, batch size, epochs): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def _parse_value(text: str):
    """``KEY=VALUE`` values: JSON when it parses (numbers, lists, null, true), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


_DEVICE_HELP = "cuda, cuda:N or cpu (default: cuda when available)"

#: ``train --help`` text of each :class:`TrainConfig` field (every field has one: tests check it); the
#: choices of an enumerated setting and the default are added to it by :func:`_add_train_flags`.
_FLAG_HELP = {
    "data": "synthetic, csv or parquet; a split whose files all end in .csv, .csv.gz, .parquet or .pq is read "
            "by those suffixes",
    "train": "training files (csv/parquet data)",
    "valid": "validation files: scored every epoch, for best.pt and early stopping",
    "test": "test files, scored once at the end",
    "schema": "schema file (.json/.yaml) of the data columns (csv/parquet data)",
    "on_bad_rows": "what a malformed row does: stop the run naming its file and line, or be counted, reported "
                   "and left out",
    "synthetic_train": "training samples of the synthetic data",
    "synthetic_valid": "validation samples of the synthetic data",
    "synthetic_test": "test samples of the synthetic data",
    "model": "an InterFormerConfig field, e.g. --model d_model=32 (repeatable)",
    "backend": "the model's path: fused Triton kernels, eager PyTorch, or auto (Triton on a GPU)",
    "batch_size": "training batch size",
    "eval_batch_size": "batch size of validation and test scoring",
    "epochs": "passes over the training split",
    "lr": "AdamW learning rate of the dense parameters",
    "weight_decay": "AdamW weight decay of the weight matrices, not of biases, LayerNorms or embeddings",
    "embedding_optimizer": "optimiser of the embedding tables",
    "embedding_lr": "learning rate of the embedding tables (default: --lr)",
    "warmup_steps": "optimiser steps of linear learning-rate warm-up, 0 for none",
    "clip_grad_norm": "clip the gradients' global norm to this (default: no clipping)",
    "amp": "autocast dtype of forward and loss (fp16 adds a gradient scaler)",
    "compile": "torch.compile the model",
    "compile_backend": "torch.compile backend",
    "compile_mode": "torch.compile mode (reduce-overhead adds CUDA graphs; default: torch's)",
    "seed": "seed of the model's initialisation, the batch order and the synthetic data",
    "device": _DEVICE_HELP,
    "deterministic": "PyTorch's deterministic algorithms for the run (matters on CUDA)",
    "autograd_multithreading": "run the backward on autograd's own device thread, as PyTorch does by default, "
                               "instead of on the calling thread",
    "output_dir": "run directory: best.pt, last.pt, run.json (and curves.png with --plot)",
    "resume": "continue the run in --output-dir from its last.pt, with its settings",
    "overwrite": "a new run may delete the run already in --output-dir",
    "patience": "stop after this many epochs without a better validation AUC (default: never)",
    "max_steps": "stop, checkpointed, after this many optimiser steps in all (default: no limit)",
    "checkpoint_every": "also write last.pt every this many steps (default: at each epoch's end only)",
    "log_every": "steps between progress reports: the bar's loss and samples/s, or, without a bar "
                 "(--no-progress, output to a file), a line 'step N: loss L, S samples/s (epoch ...)'",
    "prefetch": "batches of file data built ahead by a background thread, 0 for none",
    "progress": "an epoch progress bar on stderr where it renders (a terminal or Jupyter)",
    "plot": "write curves.png (loss and metrics per epoch) into the run directory",
}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field, all defaulting to "not given" so that the settings
    file and the dataclass defaults fill what the command line leaves out; the help shows the
    dataclass default (an Optional number or string also takes "none", which unsets a settings
    file's value)."""
    from .backend import BACKENDS
    from .train import AMP_MODES, COMPILE_MODES, EMBEDDING_OPTIMIZERS, ON_BAD_ROWS, TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    choices = {"amp": AMP_MODES, "compile_mode": COMPILE_MODES + ("none",), "embedding_optimizer": EMBEDDING_OPTIMIZERS,
               "backend": BACKENDS, "on_bad_rows": ON_BAD_ROWS}
    p.add_argument("--config", help="YAML or JSON file of training settings (flags override it; its keys are "
                                    "the flags' names with underscores, e.g. output_dir)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        text = _FLAG_HELP[f.name]
        if f.name in choices:
            text += f"; one of {', '.join(choices[f.name])}"
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and default != "":
            text += f" (default {'on' if default is True else 'off' if default is False else default})"
        if f.name == "model":
            p.add_argument(flag, action="append", metavar="KEY=VALUE", default=None, help=text)
        elif hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(hint) in (list, typing.List):
            p.add_argument(flag, nargs="+", default=None, metavar="FILE", help=text)
        elif f.name == "schema":
            p.add_argument(flag, default=None, metavar="FILE", help=text)
        elif type(None) in args and base in (int, float):  # "none" unsets what a settings file sets
            p.add_argument(flag, type=str, default=None, metavar=f"{base.__name__.upper()}|none",
                           help=text)  # TrainConfig converts
        else:
            p.add_argument(flag, type=base if base in (int, float, str) else str, default=None, help=text)


def train_config_from_args(args: argparse.Namespace):
    from .train import TrainConfig, load_settings

    settings = load_settings(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name == "model":  # --model KEY=VALUE adds to the settings file's model section
            model = settings.get("model")
            model = {} if model is None else model
            if not isinstance(model, dict):  # TrainConfig's check, before dict() made it a TypeError
                raise ValueError(f"model must be a mapping of InterFormerConfig fields, got {model!r}")
            model = dict(model)
            for item in value:
                key, sep, text = item.partition("=")
                if not sep:
                    raise ValueError(f"--model expects KEY=VALUE (e.g. --model d_model=64), got {item!r}")
                model[key.strip()] = _parse_value(text)
            value = model
        settings[f.name] = value
    return TrainConfig.from_dict(settings)


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (``demo``, ``train``, ``example-data``, ``evaluate``, ``score``);
    :func:`main` runs what it parses."""
    from .backend import BACKENDS
    from .data import write_example_files
    from .train import AMP_MODES, ON_BAD_ROWS

    parser = argparse.ArgumentParser(prog="python -m interformer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build InterFormer, compare eager and fused paths, train briefly on synthetic data")
    demo.add_argument("--train-samples", type=_positive_int, default=16384,
                      help="synthetic training samples (>= 1; default %(default)s)")
    demo.add_argument("--test-samples", type=_positive_int, default=4096,
                      help="synthetic held-out samples (>= 1; default %(default)s)")
    demo.add_argument("--batch-size", type=_positive_int, default=256,
                      help="training batch size (>= 1; default %(default)s)")
    demo.add_argument("--epochs", type=_positive_int, default=1,
                      help="passes over the training samples (>= 1; default %(default)s)")
    demo.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default %(default)s)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the model's initialisation, the synthetic data and the batch order "
                           "(default %(default)s)")
    demo.add_argument("--device", default=None, help=_DEVICE_HELP)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(usage_error=demo.error)  # a setting the demo refuses is reported as argparse's own

    train = sub.add_parser("train", help="train InterFormerCTR (synthetic data, BARS CSV or Parquet); torchrun for several processes")
    _add_train_flags(train)

    ex = sub.add_parser("example-data", help="write small CSV files of the synthetic data, their schema and a "
                                             "settings file for `train --config`")
    ex.add_argument("directory", help="where to write train.csv, valid.csv, test.csv, schema.yaml, settings.yaml")
    example = inspect.signature(write_example_files).parameters  # its defaults are the command's
    for name in ("train", "valid", "test"):
        ex.add_argument(f"--{name}", type=_positive_int, default=example[name].default,
                        help=f"rows of {name}.csv (default %(default)s)")
    ex.add_argument("--seed", type=int, default=example["seed"].default,
                    help="seed of the synthetic data (default %(default)s)")
    ex.add_argument("--output-dir", default=example["output_dir"].default,
                    help="the run directory the settings file names (default %(default)s)")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace files of these names that example-data did not write (refused otherwise)")

    ev = sub.add_parser("evaluate", help="metrics of a checkpoint on files, or on its own validation/test splits")
    ev.add_argument("checkpoint", help="a best.pt or last.pt written by `train`")
    ev.add_argument("files", nargs="*", help="CSV/Parquet files read with the checkpoint's schema and vocabularies")
    sc = sub.add_parser("score", help="click probabilities of a checkpoint's model for every row of files (no "
                                      "labels needed), written to a CSV or Parquet file")
    sc.add_argument("checkpoint", help="a best.pt or last.pt written by `train`")
    sc.add_argument("files", nargs="+", help="CSV/Parquet files read with the checkpoint's schema and vocabularies; "
                                             "a label column is not needed (and not read)")
    for p in (ev, sc):  # the flags both share, with the same meanings and defaults
        p.add_argument("--data", choices=("csv", "parquet"), default=None,
                       help="format of the files (default: by their suffixes, else the checkpoint's data setting)")
        p.add_argument("--batch-size", type=_positive_int, default=None,
                       help="scoring batch size (default: the checkpoint's eval_batch_size, so that its splits "
                            "score as in training)")
        p.add_argument("--device", default=None, help=_DEVICE_HELP)
        p.add_argument("--backend", default=None, choices=BACKENDS,
                       help="the model's path (default: the one the checkpoint's model was built with)")
        p.add_argument("--amp", default=None, choices=AMP_MODES,
                       help="autocast of the model (default: the checkpoint's own setting, so that its splits score "
                            "as in training)")
        p.add_argument("--on-bad-rows", default=None, choices=ON_BAD_ROWS,
                       help="what a malformed row does: stop with its file and line, or be counted and left out "
                            "(default: the checkpoint's own setting)")
    ev.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    sc.add_argument("--output", required=True,
                    help="the file to write: columns file, row, score (row: the row's 0-based index in its file, "
                         "the header and empty lines not counted); CSV, or Parquet for a name ending in .parquet "
                         "or .pq")
    return parser


def _check_output_file(args, example: str) -> None:
    """Refuse an ``--output`` that names a directory or a file the command reads (the checkpoint, a
    data file), and make its folder, before any scoring (as ``train`` makes ``--output-dir``), so
    that a mistake costs no scoring pass."""
    from .train import refuse_overwriting

    output = args.output
    if os.path.isdir(output) or not os.path.basename(output):
        raise ValueError(f"--output {output} is a directory; give a file name (e.g. {os.path.join(output, example)})")
    refuse_overwriting(output, [args.checkpoint, *args.files])
    if output.lower().endswith((".parquet", ".pq")):
        try:
            importlib.import_module("pyarrow.parquet")  # Scores.write needs it, after the scoring
        except ImportError:
            raise ValueError(f"--output {output}: writing Parquet needs pyarrow (pip install pyarrow), or name "
                             "a .csv file") from None
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)


def _skipped_note(split: str, skipped: int, examples) -> str:
    return f"note: skipped {skipped} malformed row(s) in {split}, not scored (e.g. {'; '.join(examples)})"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.command == "demo":
        _interpret_on_cpu(args.device)
        from .demo import DemoSettingError, run_demo

        try:
            agree = run_demo(args)
        except DemoSettingError as exc:  # checked before any work: a usage error, as argparse reports its own
            args.usage_error(str(exc))
        return 0 if agree else 1  # 1: eager and fused disagree
    if args.command == "train":
        cfg = train_config_from_args(args)
        _interpret_on_cpu(cfg.device)
        from .train import train as run_train

        summary = run_train(cfg)
        # stopped by SIGINT/SIGTERM (checkpointed; --resume continues): 128 + the signal, as a shell
        # reports a process killed by it, so that a batch scheduler sees an unfinished job and can requeue it
        signum = summary.get("stopped_by_signal")
        return 128 + signum if signum else 0
    if args.command == "example-data":
        from .data import write_example_files

        paths = write_example_files(args.directory, args.train, args.valid, args.test, seed=args.seed,
                                    output_dir=args.output_dir, overwrite=args.overwrite)
        print("wrote " + ", ".join(paths.values()))
        print(f"train on them: python -m interformer train --config {shlex.quote(paths['settings'])}")
        return 0
    _interpret_on_cpu(args.device)
    if args.command == "score":
        from .train import rate, score_checkpoint

        _check_output_file(args, "scores.csv")
        scores = score_checkpoint(args.checkpoint, args.files, data=args.data, batch_size=args.batch_size,
                                  device=args.device, backend=args.backend, amp=args.amp,
                                  on_bad_rows=args.on_bad_rows)
        scores.write(args.output)
        print(f"scored {scores.score.numel()} row(s) of {len(scores.paths)} file(s) with {args.checkpoint} "
              f"(amp {scores.amp}, {rate(scores.samples_per_s)} rows/s): wrote {args.output}")
        if scores.amp_note:
            print(f"note: {scores.amp_note}")
        if scores.skipped_rows:
            print(_skipped_note("the files", scores.skipped_rows, scores.skipped_examples))
        return 0
    from .train import evaluate_checkpoint, json_safe, metric_notes, metrics_table

    if args.output:  # checked before the scoring, not after
        _check_output_file(args, "metrics.json")
    results = evaluate_checkpoint(args.checkpoint, args.files or None, data=args.data, batch_size=args.batch_size,
                                  device=args.device, backend=args.backend, amp=args.amp, output=args.output,
                                  on_bad_rows=args.on_bad_rows)
    amp = next(iter(results.values()))["amp"]
    print(metrics_table(results, title=f"metrics of {args.checkpoint} (amp {amp})"))
    for note in dict.fromkeys(m["amp_note"] for m in results.values() if "amp_note" in m):
        print(f"note: {note}")
    for note in metric_notes(results):
        print(note)
    for split, m in results.items():
        if m.get("skipped_rows"):  # on_bad_rows is "skip": say what was left out
            print(_skipped_note(split, m["skipped_rows"], m.get("skipped_examples", [])))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump(json_safe(results), fh, indent=2)
    return 0


def cli(argv=None) -> int:
    """:func:`main` as a command: a mistake of the user's (a ``ValueError`` -- bad settings, a
    malformed row, a refused resume --, an ``OSError`` such as a missing file, or one of this
    package's ``RuntimeError`` s, which start with "interformer:") is printed as one
    ``error:`` line with exit status 2, as argparse reports a bad flag, rather than as a traceback
    whose last line is the message. ``INTERFORMER_TRACEBACK=1`` shows the traceback. :func:`main`
    itself raises (tests and callers from Python see the exception)."""
    try:
        return main(argv)
    except (ValueError, OSError, RuntimeError) as exc:
        # of RuntimeErrors only this package's own (bf16 under the interpreter, say), not PyTorch's
        ours = not isinstance(exc, RuntimeError) or str(exc).startswith("interformer:")
        if not ours or os.environ.get("INTERFORMER_TRACEBACK", "").strip() not in ("", "0"):
            raise
        print(f"python -m interformer: error: {exc}\n(INTERFORMER_TRACEBACK=1 shows where it was raised)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
