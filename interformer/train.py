"""Training and evaluation of InterFormerCTR on synthetic data or on the user's click logs.

``python -m interformer train``, ``evaluate`` and ``score`` (see ``--help``) wrap :func:`train`,
:func:`evaluate_checkpoint` and :func:`score_checkpoint`. Settings come from :class:`TrainConfig`: its
defaults, then a YAML/JSON file (``--config``), then command-line flags, later ones winning.

Decisions:

* **Optimisers.** Dense parameters use AdamW; weight decay applies to matrices only (not to biases,
  LayerNorm or embedding tables). Embedding tables get their own optimiser
  (``embedding_optimizer``): ``"adamw"`` (same as the dense parameters, no decay), ``"adagrad"``
  (rows that no sample touched keep their weights and their state: the usual choice for large
  tables), or ``"sparse_adam"`` (the tables emit sparse gradients and ``torch.optim.SparseAdam``
  updates only the rows in the batch; not under DistributedDataParallel, and gradient clipping then
  covers the dense parameters only).
* **Learning rate**: linear warm-up over the first ``warmup_steps`` optimiser steps, then constant:
  optimiser step ``k`` (1-based) uses ``lr * min(1, k / warmup_steps)``, so the first step already
  uses ``lr / warmup_steps`` and step ``warmup_steps`` the full ``lr``.
* **AMP**: ``bf16`` runs forward and loss under ``torch.autocast(dtype=bfloat16)``; ``fp16`` adds a
  ``GradScaler`` (its state is checkpointed). Weights and optimiser states stay float32.
* **Output directory.** A new run refuses a directory that already holds a run (``last.pt``,
  ``best.pt`` or ``run.json``): ``--resume`` continues it, ``--overwrite`` deletes those files (and
  ``curves.png``) once the new run's data, model, optimisers and DDP/``torch.compile`` wrappers are
  built (a mistake in the new settings leaves the old run in place). So the final table never shows
  another run's ``best.pt``; it is also only read when this run (or the run it resumes) wrote it.
* **Checkpoints** (``output_dir``): ``last.pt`` at the end of every epoch, every
  ``checkpoint_every`` steps and when a run stops early (``max_steps``, SIGINT/SIGTERM);
  ``best.pt`` whenever validation AUC improves. Each holds the model, optimisers, scheduler, scaler,
  epoch, position in the epoch, global step, best AUC, early-stopping counter, metric history, the
  run status (``running``, ``stopped``, ``early_stopped`` or ``finished``), the RNG states of every
  rank (torch, the CUDA generator of the rank's own device, ``random``, NumPy), the full config, the
  schema and the vocabularies, so ``evaluate`` needs nothing else (not even the schema file), and
  each split's row count and data file's size, which a resume compares (:func:`_check_same_data`).
  Written to a temporary file and renamed, so a crash never leaves half a checkpoint. Only tensors
  and plain Python values, so :func:`load_checkpoint` reads them with ``weights_only=True``.
* **Resume** (``--resume``) continues from ``last.pt`` with the checkpoint's own settings, so
  ``train --resume --output-dir X`` alone is enough. Without a ``last.pt`` there, it starts a new
  run if it names the data to train on, and is refused otherwise (:func:`_new_run_data`). A
  setting counts as given when the command line
  or settings file names it (:meth:`TrainConfig.from_dict`; for a config built otherwise, when it
  differs from the :class:`TrainConfig` default). The run-control settings (:data:`RUN_CONTROL`) may
  be changed on resume (e.g. a larger ``--epochs`` or ``--max-steps`` continues a finished or stopped run);
  any other given setting that differs from the checkpoint's raises ValueError, since it would
  silently make a different run. (A flag counts as given whatever its value, so ``--max-steps none``
  unsets the limit; only a :class:`TrainConfig` built directly, not by ``from_dict``, cannot set a
  run-control setting back to its default this way.) A resumed run that has nothing left to do
  (``max_steps`` reached, its epochs done, or early stopping's patience used up) trains no step; it
  says so and rewrites ``run.json``, and a finished or early-stopped one also rescores the final
  table (a run stopped at ``max_steps`` has none, resumed or not: it is unfinished). A larger
  ``--patience`` continues an early-stopped run, like a larger ``--epochs`` a finished one. The
  order of batches is a pure function of (seed, epoch, rank), so the resumed run skips the batches
  already seen in the interrupted epoch and then takes exactly the steps the uninterrupted run
  would have taken; on the same machine both end with the same weights, as far as the operations
  themselves are reproducible: on CUDA some PyTorch operations accumulate with atomics unless
  ``deterministic`` is on, and with ``--compile`` on CUDA the generated kernels may use atomics as
  well, which is not bitwise reproducible, so there the equality holds to rounding only (as it
  does between two uninterrupted compiled runs).
* **torch.compile** (``compile``, ``compile_backend``, ``compile_mode``): the DDP-wrapped model is
  compiled (DDP first, as PyTorch recommends). ``compile_mode="reduce-overhead"`` adds CUDA graphs;
  at the DESIGN shapes a training step is launch-bound (on an H200 the fused model's 45.5 ms step
  held 12.9 ms of kernel time), so that is the mode to
  try on a GPU. It does not change the math, so a resumed run may switch ``compile_mode`` (not
  ``compile`` itself).
* **Backward thread** (``autograd_multithreading``, off by default): the backward runs on the
  thread that calls it (``torch.autograd.set_multithreading_enabled(False)`` around each
  ``backward()``), not on autograd's own thread for the GPU, PyTorch's default. Decision: a plain
  training step at the DESIGN shapes is bound by the host, and on an H200 (2026-11-27,
  ``profiling/train_step.py --host``) the device thread cost the fused model's ``taobao`` step
  37.2 ms against 26.6 ms on the calling thread, eager's 41.3 against 35.7 ms. The math and the
  kernels are the same either way, so a resumed run may switch it. On a CPU there is no such
  thread and the setting changes nothing.
* **Batches on a GPU** are checked on the host (``validate_batch``, where the model's
  ``validate_inputs`` is on), pinned and copied without blocking, and the step runs inside
  ``values_checked()`` (:func:`on_device`): the model's own value checks would read the copied
  batch back, a device-to-host sync in every step that lets the host launch the next step's
  kernels only once the device has run out of work. A compiled model's batches are checked so on
  any device (its forward skips the value checks). ``amp: fp16`` (the GradScaler's step) and
  ``sparse_adam`` (coalescing its sparse gradients) still read back every step. Not timed on a GPU.
* **Determinism** (``deterministic``): ``torch.use_deterministic_algorithms(True, warn_only=True)``
  for the run (restored afterwards), and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless already set (it
  must be set before cuBLAS starts, so set it yourself if CUDA was used earlier in the process).
  Operations without a deterministic implementation warn rather than fail. Off by default: it
  slows some CUDA operations and changes nothing on CPU.
* **Validation** runs on rank 0 only, over the whole validation split (exact metrics, no padded
  duplicates), and the result is broadcast so every rank takes the same early-stopping decision.
  Early stopping: after ``patience`` epochs without a better validation AUC (a run without a
  validation split warns that ``patience`` has no effect, and trains every epoch). An epoch whose
  validation AUC is NaN (undefined: the validation rows hold one label class, or the scores are not
  finite) prints a warning saying which, does not count toward ``patience`` and cannot write
  ``best.pt``; when no epoch had a defined AUC, the run ends saying that no best checkpoint could
  be chosen, and the final table is the last weights'.
* **Multi-process**: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in
  DistributedDataParallel (NCCL on GPUs, gloo on CPUs), every rank reads its own shard of each epoch
  (equal batch counts per rank), and only rank 0 touches the output directory: it checks (and with
  ``overwrite`` clears) it, reads ``last.pt`` on resume and broadcasts it to the other ranks (so
  ranks never disagree and no shared disk is needed), writes checkpoints, ``run.json`` and the plot.
  The process group's timeout is ``INTERFORMER_DIST_TIMEOUT_MIN`` minutes (default 60): the other
  ranks wait in a collective while rank 0 alone runs validation, so it must exceed that. Whether
  any rank must stop (``max_steps``, a signal) is asked after every step over gloo, also beside
  NCCL (a second group; on several nodes set ``GLOO_SOCKET_IFNAME`` as you set
  ``NCCL_SOCKET_IFNAME``), so that the question never waits for a GPU.
* **Skipped rows** (``on_bad_rows: skip``): the ``data:`` line, ``run.json``'s ``skipped_rows`` and
  the closing note (with examples) give the malformed rows of ONE pass over each split (the first,
  counting pass), not a sum over the epochs.
* **Signals**: the first SIGINT/SIGTERM asks for a checkpoint at the next step boundary. A
  second Ctrl-C aborts at once (SIGINT's previous handler is back after the first); repeated
  SIGTERMs are ignored until the checkpoint is written, since schedulers and torchrun send it to
  every process of a job at once (they escalate to SIGKILL after their grace period).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import random
import signal
import sys
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from . import __version__
from .backend import check_backend
from .config import InterFormerConfig
from .data import Batch, check_seed, make_synthetic
from .dataio import ON_ERROR as ON_BAD_ROWS
from .dataio import coerce_setting as _coerce
from .layers import LowRankCrossNet
from .metrics import auc, gauc, logloss, normalized_entropy, scored_groups
from .model import InterFormerCTR
from .validation import validate_batch, values_checked

AMP_MODES = ("off", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
EMBEDDING_OPTIMIZERS = ("adamw", "adagrad", "sparse_adam")
DATA_KINDS = ("synthetic", "csv", "parquet")


def _named_backend(value) -> Optional[str]:
    """A backend setting's canonical name when it names one; None for unset or "auto"."""
    name = None if value is None else str(value).strip().lower()
    return None if name in (None, "auto") else name


@dataclass
class TrainConfig:
    """Everything a training run needs. Paths may be one string or a list of files."""

    # data
    data: str = "synthetic"  # or "csv"/"parquet": then a split whose files all end in .csv, .csv.gz, .parquet
    # or .pq is read by those suffixes (whatever ``data`` says), any other split as ``data`` says (_format_of)
    train: List[str] = field(default_factory=list)
    valid: List[str] = field(default_factory=list)
    test: List[str] = field(default_factory=list)
    schema: Optional[Any] = None  # path of a schema file, or the schema itself as a dict
    on_bad_rows: str = "raise"  # or "skip": counted, reported, excluded
    synthetic_train: int = 16384
    synthetic_valid: int = 4096
    synthetic_test: int = 0
    # model
    model: Dict[str, Any] = field(default_factory=dict)  # InterFormerConfig fields
    backend: str = "auto"  # the model's backend; while "auto", a model["backend"] given decides (model_backend())
    # optimisation
    batch_size: int = 256
    eval_batch_size: int = 1024
    epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    embedding_optimizer: str = "adamw"
    embedding_lr: Optional[float] = None  # default: lr
    warmup_steps: int = 0
    clip_grad_norm: Optional[float] = None
    amp: str = "off"
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: Optional[str] = None  # torch.compile mode, e.g. "reduce-overhead" (CUDA graphs)
    seed: int = 0
    device: Optional[str] = None
    deterministic: bool = False  # torch.use_deterministic_algorithms(True, warn_only=True) for the run
    autograd_multithreading: bool = False  # backward on autograd's GPU thread (PyTorch's default), not the caller's
    # run control
    output_dir: str = "runs/interformer"
    resume: bool = False
    overwrite: bool = False  # a new run may delete the run already in output_dir
    patience: Optional[int] = None  # early stopping
    max_steps: Optional[int] = None  # stop (and checkpoint) after this many optimiser steps in total
    checkpoint_every: Optional[int] = None
    log_every: int = 20  # steps between progress reports: the bar's loss and samples/s, or without a bar a printed line
    prefetch: int = 2  # batches built ahead by a background thread (file data; 0 = none)
    progress: bool = True  # an epoch bar on stderr, where it renders (a terminal or Jupyter; not in a log file)
    plot: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), _train_config_hints()[f.name]))
        for name in ("train", "valid", "test"):
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)):
                value = [value]
            elif not isinstance(value, (list, tuple)) and value is not None:
                raise ValueError(f"{name} must be a file path or a list of them, got {value!r}")
            setattr(self, name, [os.fspath(v) if isinstance(v, os.PathLike) else str(v) for v in value or []])
        if self.model is None:  # a settings file's ``model:`` section with every key commented out
            self.model = {}
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be a mapping of InterFormerConfig fields, got {self.model!r}")
        # paths as text: a checkpoint holds the config, and must hold plain values only (load_checkpoint)
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = os.fspath(self.output_dir)
        if isinstance(self.schema, os.PathLike):
            self.schema = os.fspath(self.schema)
        if self.schema is not None and not isinstance(self.schema, (str, dict)):  # (a TypeError once read)
            raise ValueError(f"schema must be the path of a schema file or a mapping of schema keys, got {self.schema!r}")
        if self.data not in DATA_KINDS:
            raise ValueError(f"data must be one of {DATA_KINDS}, got {self.data!r}")
        if not self.resume:  # a resumed run's data settings are its checkpoint's (check_data_source)
            self.check_data_source()
        if self.on_bad_rows not in ON_BAD_ROWS:
            raise ValueError(f"on_bad_rows must be 'raise' or 'skip', got {self.on_bad_rows!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES} (or unset), got {self.compile_mode!r}")
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise ValueError(f"embedding_optimizer must be one of {EMBEDDING_OPTIMIZERS}, got {self.embedding_optimizer!r}")
        if self.device == "":  # empty: unset, the default device (as it always read; settings from before parse_device)
            self.device = None
        if self.device is not None:
            parse_device(self.device)  # cpu or cuda: a mistyped name is a setting's error, not torch's traceback
        for name in ("batch_size", "eval_batch_size", "epochs", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "prefetch", "synthetic_train", "synthetic_valid", "synthetic_test"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("patience", "max_steps", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be >= 1 (or unset), got {value}")
        self.seed = check_seed(self.seed)
        for name in ("lr", "embedding_lr", "weight_decay", "clip_grad_norm"):  # NaN passes every comparison below
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.lr <= 0 or (self.embedding_lr is not None and self.embedding_lr <= 0):
            raise ValueError("learning rates must be > 0")
        if self.weight_decay < 0:  # AdamW checks only its default, not the per-group values build_optimizers sets
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be > 0 (or unset), got {self.clip_grad_norm}")
        unknown = set(self.model) - {f.name for f in dataclasses.fields(InterFormerConfig)}
        if unknown:
            raise ValueError(f"model: unknown InterFormerConfig field(s) {sorted(unknown)}")
        # a misspelt backend is a setting's error, not build_model's once the vocabularies and row
        # counts have been read (passes over the training files); None: $INTERFORMER_BACKEND
        for name, value in (("backend", self.backend), ("model.backend", self.model.get("backend"))):
            if value is not None:
                try:
                    check_backend(value)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
        # numbers written as strings (PyYAML reads ``1e-6`` as one) are converted here too
        hints = typing.get_type_hints(InterFormerConfig)
        self.model = {k: _coerce(f"model.{k}", v, hints[k]) for k, v in self.model.items()}

    def check_data_source(self) -> None:
        """ValueError unless ``data`` and the files agree: files need ``train`` and a ``schema``, and
        ``synthetic`` takes no file and needs ``synthetic_train >= 1``. Run at construction, except
        for a config with ``resume`` set: its command line may name a file and leave ``data`` to the checkpoint, whose settings
        :func:`resume_config` merges in first (and refuses a file that differs from the checkpoint's,
        naming both); a resume that finds no checkpoint starts a new run and checks it then, before
        it makes the output directory.
        (Before, ``--resume --train other.csv`` on a CSV run was told that data is 'synthetic'.)"""
        if self.data != "synthetic":
            if not self.train:
                raise ValueError(f"data={self.data!r} needs training files (train)")
            if self.schema is None:
                raise ValueError(f"data={self.data!r} needs a schema (a file or a dict)")
        given_files = [n for n in ("train", "valid", "test") if getattr(self, n)] + (["schema"] if self.schema else [])
        if self.data == "synthetic" and given_files:
            raise ValueError(f"{', '.join(given_files)} given but data is 'synthetic' (the default): set data to "
                             "'csv' or 'parquet' to train on the files")
        # a setting's error, not the run's "train: no rows (an empty file, ...)" once the other splits
        # are drawn; a run on files ignores the synthetic sizes (evaluate and score never train)
        if self.data == "synthetic" and self.synthetic_train < 1:
            raise ValueError(f"synthetic_train must be >= 1 when data is 'synthetic' (the training samples), got "
                             f"{self.synthetic_train}")

    def model_backend(self) -> Optional[str]:
        """The backend a new run builds its model with: ``backend`` when it names one, else
        ``model["backend"]`` when given, else ``backend`` ("auto", or None: ``$INTERFORMER_BACKEND``).

        Decision: a backend written into the model's settings is kept while the run's is left at
        "auto" (it used to be replaced by "auto" without a word); when both name one, the run's
        wins, as it always did, and a new run refuses the pair if they disagree
        (:meth:`check_backends`). A resumed run and ``evaluate`` use the backend the checkpoint's
        model was built with (its ``model_config``), so old checkpoints keep theirs."""
        inner = self.model.get("backend")
        if _named_backend(self.backend) or inner is None:
            return self.backend
        return inner

    def check_backends(self) -> None:
        """Raise if ``backend`` and ``model["backend"]`` both name a backend and disagree (a new run)."""
        top, inner = _named_backend(self.backend), _named_backend(self.model.get("backend"))
        if top and inner and top != inner:
            raise ValueError(f"backend {self.backend!r} and model.backend {self.model['backend']!r} disagree: "
                             "give one of them")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """The config of a settings dict; its keys are remembered as the fields the user gave
        (``given_fields``: on resume, a given field that differs from the checkpoint is refused even
        when its value is the default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training setting(s) {sorted(unknown)}; known: {sorted(names)}")
        cfg = cls(**d)
        cfg.given_fields = frozenset(d)
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# The settings of one data source that the other ignores.
_SYNTHETIC_ONLY = ("synthetic_train", "synthetic_valid", "synthetic_test")
_FILES_ONLY = ("train", "valid", "test", "schema", "on_bad_rows")


def run_settings(cfg: TrainConfig) -> Dict[str, Any]:
    """``cfg`` as ``run.json`` lists it: :meth:`TrainConfig.to_dict` without the settings its data
    source ignores (a CSV or Parquet run's ``synthetic_*`` sizes, a synthetic run's files, schema and
    ``on_bad_rows``), so that a reader of a file run does not see synthetic sizes and wonder which data
    it trained on. Checkpoints keep the whole config: a resume compares every setting."""
    ignored = _FILES_ONLY if cfg.data == "synthetic" else _SYNTHETIC_ONLY
    return {k: v for k, v in cfg.to_dict().items() if k not in ignored}


# Settings that steer one invocation rather than define the run; a resumed run may change them.
RUN_CONTROL = ("epochs", "max_steps", "patience", "checkpoint_every", "log_every", "progress", "plot",
               "output_dir", "resume", "overwrite", "device", "eval_batch_size", "compile_mode", "prefetch",
               "autograd_multithreading")
# Of those, the ones that always come from the invocation (where to look, whether to resume).
_INVOCATION = ("output_dir", "resume", "overwrite")


@functools.lru_cache(maxsize=None)
def _train_config_hints() -> Dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def resume_config(saved: Dict[str, Any], given: TrainConfig) -> tuple:
    """The settings of a resumed run: the checkpoint's ``train_config`` (``saved``), with the
    run-control fields (:data:`RUN_CONTROL`) that ``given`` sets. Returns (config, {field: (old, new)}
    of the run-control settings changed).

    The fields ``given`` was built with (:meth:`TrainConfig.from_dict`'s ``given_fields``: the
    command line's flags and settings file) count as given, whatever their value; for a config built
    otherwise, a field at its :class:`TrainConfig` default counts as not given. ``output_dir``,
    ``resume`` and ``overwrite`` always come from ``given``. Any other field given with a value that
    differs from the checkpoint's raises ValueError naming them (values compare by ``==``, so dicts
    and lists by content)."""
    defaults, mine = TrainConfig().to_dict(), given.to_dict()
    given_names = _given_fields(given)
    merged, changed, conflicts = {}, {}, []
    for name, value in mine.items():
        old = saved.get(name, defaults[name])  # a field added after the checkpoint was written
        explicit = name in given_names
        if name in _INVOCATION:
            merged[name] = value
        elif not explicit or value == old:
            merged[name] = old
        elif name in RUN_CONTROL:
            merged[name], changed[name] = value, (old, value)
        else:
            merged[name] = old
            conflicts.append(f"{name} (checkpoint {old!r}, given {value!r})")
    if conflicts:
        raise ValueError(f"resume: {'; '.join(conflicts)}: a resumed run keeps the checkpoint's settings except "
                         f"{', '.join(n for n in RUN_CONTROL if n not in _INVOCATION)}; drop the other(s), or start "
                         "a new run (another --output-dir, or --overwrite)")
    if merged.get("device") not in (None, "") and "device" not in given_names:
        try:  # a device of another type, saved before parse_device refused it (mps, say)
            parse_device(merged["device"])
        except ValueError as exc:
            raise ValueError(f"resume: the checkpoint's device setting: {exc}; --device cpu or --device cuda "
                             "resumes the run there") from None
    return TrainConfig.from_dict(merged), changed


def _given_fields(cfg: TrainConfig) -> frozenset:
    """The fields ``cfg`` counts as given (:func:`resume_config`'s rule): those it was built with by
    :meth:`TrainConfig.from_dict`; for a config built otherwise, those not at their default."""
    given = getattr(cfg, "given_fields", None)
    if given is not None:
        return frozenset(given)
    defaults = TrainConfig().to_dict()
    return frozenset(name for name, value in cfg.to_dict().items() if value != defaults[name])


def _check_not_below_progress(cfg: TrainConfig, state: Dict[str, Any]) -> None:
    """ValueError when a resumed run's ``epochs`` or ``max_steps`` is below what its ``last.pt`` has
    already done: nothing could be trained, and ``run.json`` would record a limit its own history
    exceeds (e.g. the original settings file, ``epochs: 3``, given to a run extended to 7). A run
    stopped partway into an epoch has begun that epoch: ``epochs`` must count it (``epochs`` equal
    to the epochs completed was once taken as "finished", and the final metrics were those of
    weights trained past it)."""
    begun = state["epoch"] + (1 if state.get("batch_in_epoch", 0) > 0 else 0)
    for name, limit, need in (("epochs", cfg.epochs, begun), ("max_steps", cfg.max_steps, state["step"])):
        if limit is not None and limit < need:
            flag = "--" + name.replace("_", "-")
            done = (f"{state['epoch']} epoch(s) and {state['batch_in_epoch']} batch(es) of the next"
                    if name == "epochs" and need > state["epoch"] else f"{need}")
            raise ValueError(f"resume: {name} {limit} is below the {done} this run has already done ({name} of its "
                             f"last.pt); give {flag} {need} or more to continue, or leave {name} out to keep the "
                             "checkpoint's")


@contextlib.contextmanager
def _paths_of_the_run(paths: List[str], reader: str):
    """Adds to a FileNotFoundError raised inside, where one of ``paths`` (data files named by a
    checkpoint's config, as the run was started with them) is relative and missing here, that such
    a path is relative to the directory the run was started in, and which directory this is."""
    try:
        yield
    except FileNotFoundError as e:
        if not any(not Path(p).is_absolute() and not Path(p).exists() for p in paths):
            raise
        raise FileNotFoundError(f"{e} ({reader} reads its checkpoint's data files, and a relative path there is "
                                f"relative to the directory the run was started in; this one is {os.getcwd()})") from e


def _data_record(cfg: TrainConfig, rows: Dict[str, int]) -> Dict[str, Any]:
    """What a checkpoint records of the data its run reads, for a resume to compare
    (:func:`_check_same_data`): each split's row count (malformed rows skipped excluded) and each
    data file's size in bytes."""
    files = {str(p): Path(p).stat().st_size for n in ("train", "valid", "test") for p in getattr(cfg, n)}
    return {"rows": dict(rows), "file_bytes": files}


def _check_same_data(saved: Optional[Dict[str, Any]], now: Dict[str, Any], last: Path) -> None:
    """ValueError when the data a resumed run reads is not what ``last.pt`` recorded
    (:func:`_data_record`): a split with another row count, or a data file of another size.

    Decision: refused, not warned about, for every split and also where a finished run is
    continued with more epochs. A resumed run skips the batches of the interrupted epoch already
    trained, by position in an order drawn from the row count, keeps the checkpoint's vocabularies,
    and compares its validation metrics with those of earlier epochs (early stopping, best.pt); on
    changed files it would be a different run, silently (a run's settings that differ are refused
    for the same reason, :func:`resume_config`). New data is a new run. Sizes and counts do not
    see an edit that keeps both; reading every byte again to hash it would cost a resume a pass
    over the data. A checkpoint from before this record has none, and is not checked."""
    if saved is None:
        return
    changed = [f"{name}: {then:,} rows then, {now['rows'].get(name, 0):,} now" for name, then in saved["rows"].items()
               if now["rows"].get(name, 0) != then]
    changed += [f"{name}: {then:,} bytes then, {now['file_bytes'][name]:,} now"
                for name, then in saved["file_bytes"].items()
                if name in now["file_bytes"] and now["file_bytes"][name] != then]
    if changed:
        raise ValueError(f"resume: the data changed since {last} was written ({'; '.join(changed)}); a resumed run "
                         "reads the data it started on (its vocabularies, its metrics and its place in the epoch are "
                         "that data's). Restore the files, or train a new run on the new data: the command without "
                         "--resume, naming the data, with --overwrite or another --output-dir")


def load_settings(path: str) -> Dict[str, Any]:
    """A YAML (``.yaml``/``.yml``, in any case) or JSON settings file as a dict (a UTF-8 byte-order
    mark, as some Windows editors write, is skipped)."""
    from .dataio import read_settings_file

    as_yaml = str(path).lower().endswith((".yaml", ".yml"))
    d = read_settings_file(path, "settings file", as_yaml, json_hint="; settings files are JSON, or YAML named "
                                                                     ".yaml or .yml")
    if d is None and as_yaml:  # an empty YAML file, or one of comments only
        d = {}
    if not isinstance(d, dict):
        raise ValueError(f"{path}: settings must be a mapping, got {type(d).__name__}")
    return d


# --------------------------------------------------------------------------------------------
# processes, devices, seeds


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: a gloo group over the same ranks for the per-step stop flag (:func:`_any_rank`) where the
    #: default group is not gloo (NCCL on GPUs); None: the default group
    control: Any = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_timeout() -> datetime.timedelta:
    """The process group's timeout: ``INTERFORMER_DIST_TIMEOUT_MIN`` minutes (default 60). Every
    collective must complete within it, and the other ranks wait in one while rank 0 validates."""
    return datetime.timedelta(minutes=int(os.environ.get("INTERFORMER_DIST_TIMEOUT_MIN", "60")))


def _device_for(device: Optional[str], d: "Dist") -> torch.device:
    """The device a process uses: under torchrun CUDA device ``LOCAL_RANK`` (unless ``device`` names
    another type; ``cuda:N`` only selects CUDA), else ``device`` or CUDA when there is one."""
    if d.enabled:
        use_cuda = torch.cuda.is_available() and (device is None or parse_device(device).type == "cuda")
        return torch.device("cuda", d.local_rank) if use_cuda else torch.device("cpu")
    return _default_device(device)


#: the device types the commands (and :func:`load_model`) run on
DEVICE_TYPES = ("cpu", "cuda")


def parse_device(name: str) -> torch.device:
    """The device ``name`` names, or ValueError unless it is the CPU or a CUDA device (``cpu``,
    ``cuda``, ``cuda:N``). Decision: refused where the settings are checked, before any work. A name
    torch cannot read (``gpu``, ``cuda:x``) was torch's RuntimeError, a traceback with exit status
    1, and another device type (``mps``, ``meta``) got as far as moving the model or reading the
    data; neither is a device the package is built or tested for. Whether CUDA and a GPU of that
    index are there is :func:`check_device`'s (a config may be written on another machine)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ValueError(f"device must be cpu or cuda (optionally cuda:N), got {name!r}")
    return device


def _default_device(device: Optional[str]) -> torch.device:
    """``device`` (:func:`parse_device`), or CUDA when there is one, else the CPU (one process:
    ``train``, ``evaluate``, :func:`load_model`)."""
    if device is None or device == "":  # (empty: unset, as the settings read it)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return parse_device(device)


def _interpret_on_cpu(device: torch.device) -> None:
    """A resumed run that moves to its checkpoint's CPU device (the command line named none) switches
    on Triton's interpreter, as the CLI does for ``--device cpu`` before anything imports Triton
    (``interformer.__main__``): a fused model can run on CPU tensors only under it. Only while
    Triton is not yet imported (it decides at import); otherwise the first fused op raises, saying
    so (``kernels._common.device_guard``)."""
    if device.type == "cpu" and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"


def check_device(device: torch.device) -> None:
    """ValueError unless ``device`` can be used here: a CUDA device needs CUDA and a GPU of that
    index. Checked before the data are read (which can take long), instead of PyTorch's
    "Torch not compiled with CUDA enabled" once the model moves."""
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device {str(device)!r}: CUDA is not available here ({why}); pass --device cpu "
                         "(device='cpu' from Python)")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def setup_distributed(device: Optional[str]) -> tuple:
    """Join the process group torchrun describes (if any; timeout :func:`dist_timeout`); return
    (Dist, device). Where the group's backend has no gloo (NCCL), also make a gloo group over the
    same ranks for the per-step stop flag (:func:`_any_rank`; ``Dist.control``, with the same
    timeout): a multi-node job then needs gloo to reach the other nodes too (set
    ``GLOO_SOCKET_IFNAME`` where ``NCCL_SOCKET_IFNAME`` is set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        dev = _device_for(device, d)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if dist.is_initialized():  # the caller's group
            backend = dist.get_backend()
        else:
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=dist_timeout())
        if "gloo" not in str(backend):  # (a caller's "cpu:gloo,cuda:nccl" sends CPU tensors to gloo)
            d.control = dist.new_group(backend="gloo", timeout=dist_timeout())
        return d, dev
    d = Dist()
    return d, _device_for(device, d)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random stream once the model is built (dropout masks): a fixed
    function of ``(seed, rank)``, different for every rank, so that the ranks of one run do not
    drop the same units."""
    import numpy as np

    return int(np.random.SeedSequence([seed % 2**64, rank]).generate_state(1)[0])  # (negative seeds too)


def rng_state(device: torch.device) -> Dict[str, Any]:
    """This process's RNG states. CUDA: only the generator of ``device`` (the ``*_all`` variants
    would create a context on every GPU of the machine)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np

        # plain values (the key array as a list of ints), so that the checkpoint loads with
        # torch.load(weights_only=True) (load_checkpoint)
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (str(name), keys.tolist(), int(pos), int(has_gauss), float(cached))
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints: get_rng_state_all(), one per GPU
            index = torch.cuda.current_device() if device.index is None else device.index
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
    if "numpy" in state:
        import numpy as np

        name, keys, *rest = state["numpy"]  # keys: a list (or, in older checkpoints, a uint32 array)
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


# --------------------------------------------------------------------------------------------
# data


def build_data(cfg: TrainConfig, vocabs=None, schema: Optional[dict] = None) -> tuple:
    """(model config overrides, {split: dataset}, vocabularies or None, schema dict or None).

    ``vocabs`` and ``schema`` (a dict), when given, replace building the vocabularies and reading
    ``cfg.schema``: a resumed run uses its checkpoint's, whatever happened to the files since.

    With ``on_bad_rows="skip"`` the vocabulary pass's :class:`~interformer.dataio.DataWarning` about
    the training files' malformed rows is not shown: the training split's dataset counts the same
    rows, and :func:`train` reports them once (the ``data:`` line gives each split's count, the
    closing note examples), not as a raw warning pointing into this module."""
    from .dataio import DataWarning, Schema, build_vocabularies

    if cfg.data == "synthetic":
        return {}, _synthetic_splits(cfg, ("train", "valid", "test")), None, None
    source = cfg.schema if schema is None else schema
    schema = Schema.from_dict(source) if isinstance(source, dict) else Schema.from_file(source)
    if vocabs is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            vocabs, _ = build_vocabularies(cfg.train, schema, fmt=_format_of(cfg.train, cfg.data),
                                           on_error=cfg.on_bad_rows)
    splits = {split: _dataset(cfg, getattr(cfg, split), schema, vocabs)
              for split in ("train", "valid", "test") if getattr(cfg, split)}
    return splits["train"].model_overrides(), splits, vocabs, schema.to_dict()


def _synthetic_splits(cfg: TrainConfig, names) -> Dict[str, Any]:
    """The synthetic splits of ``names`` (``"train"``, ``"valid"``, ``"test"``) as
    :class:`~interformer.dataio.MemoryDataset` s; a validation or test split of 0 samples is left out.
    Each split is drawn from its own seed (``seed``, ``seed + 1``, ``seed + 2``) by its own generator,
    so one is the same whether or not the others are drawn: ``evaluate`` draws only the two it
    scores, not the training split (often the largest; at T = 50 its ``seq`` tensor alone takes
    160 MB per 200k rows)."""
    from .dataio import MemoryDataset

    model_cfg = InterFormerConfig(**{**cfg.model, "backend": "eager"})
    sizes = {"train": cfg.synthetic_train, "valid": cfg.synthetic_valid, "test": cfg.synthetic_test}
    return {name: MemoryDataset(make_synthetic(sizes[name], model_cfg, seed=cfg.seed + offset))
            for offset, name in enumerate(("train", "valid", "test"))
            if name in names and (sizes[name] or name == "train")}


def _dataset(cfg: TrainConfig, paths, schema, vocabs, data: Optional[str] = None, labels: bool = True):
    """The :class:`~interformer.dataio.TabularDataset` of one split's files, as training, ``evaluate``
    and ``score`` read them: in the format ``data`` names, else by their suffixes, else ``cfg.data``
    (:func:`_format_of`); malformed rows as ``cfg.on_bad_rows`` says."""
    from .dataio import TabularDataset

    return TabularDataset(paths, schema, vocabs, fmt=data or _format_of(paths, cfg.data), on_error=cfg.on_bad_rows,
                          labels=labels)


def _vocabs_to_dict(vocabs) -> Optional[dict]:
    """The vocabularies as a checkpoint holds them: :func:`~interformer.dataio.vocabularies_to_dict`'s
    dict, each table's token list packed into one string plus a tensor of lengths (its counts into
    a tensor) under ``"packed"``.

    Decision: ``torch.load(weights_only=True)`` (:func:`load_checkpoint`) unpickles in Python, one
    object at a time. For one table of 2M tokens with counts (2026-11-27, the 2-core CPU machine),
    loading the checkpoint and rebuilding the vocabulary took 5.9 s as lists (1.4 s with the unsafe
    ``weights_only=False`` used before) and takes 1.2 s packed; saving went from 1.6 s to 0.4 s."""
    from .dataio import vocabularies_to_dict

    if vocabs is None:
        return None
    d = vocabularies_to_dict(vocabs)
    packed = {}
    for name, table in d.pop("vocabularies").items():
        tokens = [str(t) for t in table["tokens"]]
        counts = table.get("counts")
        packed[name] = {"text": "".join(tokens), "lengths": torch.tensor([len(t) for t in tokens], dtype=torch.int64),
                        "counts": None if counts is None else torch.tensor(list(counts), dtype=torch.int64)}
    d["packed"] = packed
    return d


def _vocabs_from_dict(d: Optional[dict]):
    """Inverse of :func:`_vocabs_to_dict`; also reads the unpacked form of older checkpoints."""
    from .dataio import vocabularies_from_dict

    if d is None:
        return None
    if "packed" in d:
        tables = {}
        for name, table in d["packed"].items():
            text, ends = table["text"], table["lengths"].cumsum(0).tolist()
            tokens = [text[a:b] for a, b in zip([0] + ends[:-1], ends)]
            tables[name] = {"tokens": tokens}
            if table["counts"] is not None:
                tables[name]["counts"] = table["counts"].tolist()
        d = {k: v for k, v in d.items() if k != "packed"}
        d["vocabularies"] = tables
    return vocabularies_from_dict(d, "checkpoint vocabularies")


# --------------------------------------------------------------------------------------------
# model, optimisers


def _check_model_overrides(cfg: TrainConfig, overrides: Dict[str, Any]) -> None:
    """ValueError when a new run's model settings give a size that its data files decide (the schema's
    dense columns, the vocabularies' sizes, ``max_seq_len``) with another value: :func:`build_model`
    takes the data's, and a run given ``n_dense=7`` used to build one with the schema's count without
    a word. The same value is accepted. (A resumed run keeps its checkpoint's settings unchecked.)"""
    clashes = [f"{name}={cfg.model[name]!r} (the data's: {value!r})" for name, value in overrides.items()
               if name in cfg.model and _as_sizes(cfg.model[name]) != _as_sizes(value)]
    if clashes:
        raise ValueError(f"model: {'; '.join(clashes)}: with data={cfg.data!r} these come from the schema and the "
                         "vocabularies; drop them from the model settings")


def _as_sizes(value: Any) -> tuple:
    """``value`` (a size or a list of sizes) as a tuple of floats where they read as numbers, so that
    ``[10]``, ``(10,)``, ``10.0`` and ``"10"`` (a settings file may write numbers as strings) agree."""
    def number(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return v
    return tuple(number(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def build_model(cfg: TrainConfig, overrides: Dict[str, Any], backend: Optional[str] = None) -> InterFormerCTR:
    """The run's model; ``backend`` (a resumed run's, from its checkpoint) replaces
    :meth:`TrainConfig.model_backend` when given."""
    model_cfg = InterFormerConfig(**{**cfg.model, **overrides,
                                     "backend": cfg.model_backend() if backend is None else backend})
    return InterFormerCTR(model_cfg)


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> List[torch.optim.Optimizer]:
    """AdamW for dense parameters (decay on the weight matrices only) plus the embedding optimiser.

    A weight matrix is a parameter of two or more dimensions that is not a bias: ``CrossNet``'s
    biases are ``[D, 1]`` (torchrec's layout; named ``bias.<i>``), and were once told apart by
    shape (no size of 1), which also left out matrices with one row, such as the CTR head's output
    layer ``[1, width]`` or PMA's learned queries with one query (a CLI fuzzing helper's find)."""
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    table_ids = {id(m.weight) for m in tables}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if id(p) in table_ids:
            continue
        (decay if p.dim() >= 2 and "bias" not in name.split(".") else no_decay).append(p)
    emb_params = [m.weight for m in tables]
    emb_lr = cfg.embedding_lr or cfg.lr
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.embedding_optimizer == "adamw":
        groups.append({"params": emb_params, "weight_decay": 0.0, "lr": emb_lr})
        return [torch.optim.AdamW(groups, lr=cfg.lr)]
    dense_opt = torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.embedding_optimizer == "adagrad":
        return [dense_opt, torch.optim.Adagrad(emb_params, lr=emb_lr)]
    for m in tables:
        m.sparse = True
    return [dense_opt, torch.optim.SparseAdam(emb_params, lr=emb_lr)]


def _bias_state_in_param_shapes(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Reshape an optimiser's saved ``[D, 1]`` state of a ``LowRankCrossNet`` bias (AdamW's moments,
    from a checkpoint written before 2026-11-29, when those biases were ``[D, 1]``; they are ``[D]``
    now, as torchrec's) to the bias's ``[D]``: the module's ``state_dict`` hook views the bias itself
    in its shape, and ``Optimizer.load_state_dict`` checks no shapes, so the moments would broadcast
    against the ``[D]`` gradient at the first step and fail there. Only those biases' state is
    touched; anything else keeps its saved shape."""
    for m in model.modules():
        if isinstance(m, LowRankCrossNet):
            for p in m.bias:
                for k, v in opt.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor) and v.shape == (p.numel(), 1):
                        opt.state[p][k] = v.reshape(p.shape)


def warmup_schedulers(optimizers, warmup_steps: int) -> list:
    def factor(step: int) -> float:
        return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)

    return [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in optimizers]


def make_scaler(cfg: TrainConfig, device: torch.device):
    return torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


def unwrap(model: nn.Module) -> InterFormerCTR:
    """The InterFormerCTR under DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def on_device(batch: Batch, device: torch.device, model: nn.Module):
    """(``batch`` on ``device``, the context to call ``model`` in).

    On a GPU the batch's values are checked here, on the host, where the model's input checks are
    on (``validate_batch`` with the model's ``dense_dtype``: what its forward checks after the
    copy by reading the values back, a device-to-host sync in every step, which drains the queue of
    launched kernels), and the model is called inside
    :func:`interformer.validation.values_checked`; the tensors are pinned and copied without
    blocking (a copy from pageable memory first waits for the stream's queued work). So checking a
    batch no longer makes the step wait for the device (with ``amp: fp16`` the GradScaler's step
    and with ``sparse_adam`` the sparse gradients' coalescing still read back every step).

    A compiled (or DDP-wrapped) model has its batches checked here on any device: a compiled
    forward skips the value checks (``interformer.validation``). Otherwise, on a CPU, the batch
    moves as it is and the model checks it itself."""
    core = unwrap(model)
    cuda = device.type == "cuda"
    if not cuda and core is model:
        return batch.to(device), contextlib.nullcontext()
    if core.config.validate_inputs:
        validate_batch(core.config, *batch.inputs(), dense_dtype=core.backbone.dense_dtype())
    return (batch.pin_memory() if cuda else batch).to(device), values_checked()


# --------------------------------------------------------------------------------------------
# evaluation


def _closing(batches):
    """Iterate ``batches`` and close it however the loop ends (a prefetching generator joins its
    thread on close)."""
    try:
        yield from batches
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _logits(model: nn.Module, batch: Batch, device: torch.device, cfg: TrainConfig) -> torch.Tensor:
    """The model's fp32 logits of one batch, as evaluation and scoring call it (no grad, eval mode:
    the caller's)."""
    b, checked = on_device(batch, device, model)
    with checked, autocast(cfg, device):
        return model(*b.inputs()).float()


@torch.no_grad()
def predict(model: nn.Module, dataset, batch_size: int, device: torch.device, cfg: TrainConfig):
    """(logits, labels, groups or None, samples/s) over a whole split, in file order, one process."""
    model.eval()
    logits, labels, groups = [], [], []
    t0 = time.perf_counter()
    for batch in _closing(dataset.batches(batch_size, shuffle=False, prefetch=cfg.prefetch)):
        logits.append(_logits(model, batch, device, cfg))
        labels.append(batch.label)
        groups.append(batch.group)
    if not logits:
        files = ", ".join(str(p) for p in getattr(dataset, "paths", ()))
        raise ValueError(f"{files + ': ' if files else ''}no rows to evaluate (an empty file, or every row skipped "
                         "as malformed)")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    logits = torch.cat(logits).cpu()
    group = None if any(g is None for g in groups) else torch.cat(groups)
    return logits, torch.cat(labels), group, logits.numel() / max(seconds, 1e-9)


def metrics_of(logits: torch.Tensor, labels: torch.Tensor, groups: Optional[torch.Tensor]) -> Dict[str, float]:
    out = {"auc": auc(logits, labels), "logloss": logloss(logits, labels), "ne": normalized_entropy(logits, labels)}
    if groups is not None:
        out["gauc"] = gauc(logits, labels, groups)
        out["gauc_users"] = scored_groups(labels, groups)  # 0 says why a gAUC on finite scores is NaN
    out["samples"] = int(labels.numel())
    return out


def evaluate_split(model, dataset, cfg: TrainConfig, device) -> Dict[str, float]:
    logits, labels, groups, sps = predict(unwrap(model), dataset, cfg.eval_batch_size, device, cfg)
    m = metrics_of(logits, labels, groups)
    m["samples_per_s"] = sps
    return m


# --------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


CHECKPOINT_KEYS = ("model", "model_config", "train_config")  # what every checkpoint of `train` holds, at least


def _legacy_checkpoint_globals() -> list:
    """The classes and functions that checkpoints written before they held plain values only need
    to unpickle: NumPy's RNG state (a uint32 array, under the module name of NumPy 1 or 2),
    ``versions()["torch"]`` (a ``TorchVersion``, a ``str`` subclass) and the ``pathlib`` paths a
    config built through the Python API held (``output_dir``, ``schema``). None of them runs code
    of the file's choosing."""
    import pathlib

    from torch.torch_version import TorchVersion

    allowed: list = [TorchVersion, pathlib.PosixPath, pathlib.WindowsPath]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return allowed
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    allowed += [np.ndarray, np.dtype, (reconstruct, "numpy.core.multiarray._reconstruct"),
                (reconstruct, "numpy._core.multiarray._reconstruct")]
    dtypes = getattr(np, "dtypes", None)  # NumPy >= 1.25 builds the array's dtype as this class
    if dtypes is not None:
        allowed.append(dtypes.UInt32DType)
    return allowed


def load_checkpoint(path) -> Dict[str, Any]:
    """A checkpoint written by :func:`train` (``best.pt``, ``last.pt``), its tensors on the CPU.

    Decision: loaded with ``torch.load(weights_only=True)``, so a file that holds anything but
    tensors and plain Python values (which unpickling could turn into running code of the file's
    choosing) is refused, not executed: ``evaluate`` is run on checkpoints from elsewhere. A
    checkpoint of :func:`train` holds plain values only; older ones also a NumPy array and a
    ``TorchVersion``, which are allowed (:func:`_legacy_checkpoint_globals`). A missing, truncated
    or corrupt file, or one that is not such a checkpoint (a bare ``state_dict``, say), raises an
    error naming it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a checkpoint: pass its best.pt or last.pt")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    allowed = _legacy_checkpoint_globals()
    scope = getattr(torch.serialization, "safe_globals", None)  # a context manager since torch 2.5
    if scope is None:  # pragma: no cover - torch 2.4: process-wide, and without the (function, name) pairs
        torch.serialization.add_safe_globals(list({a[0] if isinstance(a, tuple) else a: None for a in allowed}))
    with open(path, "rb") as fh:
        head = fh.read(4)
    if 0 < len(head) < 4:  # (torch.load would unpickle it, and refuse it as holding Python objects)
        raise ValueError(f"{path}: not a readable checkpoint ({len(head)} bytes: truncated, corrupt, or not written "
                         "by torch.save)")
    if head and not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # zip, legacy pickle
        raise ValueError(f"{path} is not a checkpoint: torch.save writes a zip archive (or, in its legacy format, a "
                         f"pickle), and this file is neither (it starts with {head!r}; a data file given in the "
                         "checkpoint's place?)")
    try:
        with scope(allowed) if scope is not None else contextlib.nullcontext():
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights only load failed" in str(e).lower():
            after = str(e).partition("WeightsUnpickler error:")[2]
            detail = next((line.strip() for line in after.splitlines() if line.strip()), "")[:300]
            raise ValueError(f"{path}: refused: the file holds Python objects other than tensors and plain values "
                             f"({detail or 'see the error above'}), and unpickling them could run code of the "
                             "file's choosing. Checkpoints of `python -m interformer train` hold none but a few "
                             "known types of older versions; if you trust "
                             "this file, read it with torch.load(path, weights_only=False) yourself") from e
        # zip reader errors, EOFError, KeyError, OSError...: a truncated or corrupt file
        raise ValueError(f"{path}: not a readable checkpoint ({path.stat().st_size:,} bytes: truncated, corrupt, "
                         f"or not written by torch.save): {type(e).__name__}: {e}") from e
    missing = [k for k in CHECKPOINT_KEYS if not (isinstance(state, dict) and k in state)]
    if missing:
        what = (f"a {type(state).__name__}" if not isinstance(state, dict) else
                "a bare state_dict" if state and all(isinstance(v, torch.Tensor) for v in state.values()) else
                f"a dict with keys {sorted(map(str, state))[:8]}")
        raise ValueError(f"{path} is not a checkpoint written by `python -m interformer train` (it is {what}, "
                         f"without {', '.join(repr(k) for k in missing)})")
    return state


def versions() -> Dict[str, Any]:
    out = {"interformer": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
           "cuda": torch.version.cuda, "platform": platform.platform()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


# --------------------------------------------------------------------------------------------
# the run


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and stops."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: Optional[int] = None  # the signal that asked to stop (the CLI exits with 128 + it)
        self._old = {}

    def __enter__(self):
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        """The first signal: ask for a checkpoint. SIGINT's handler is handed back, so a second
        Ctrl-C acts as it would have without us (KeyboardInterrupt at once). SIGTERM stays caught
        and its repeats are ignored until the checkpoint is written: a batch scheduler and torchrun
        send it to every process of a job within milliseconds (torchrun forwards its own to each
        worker), and a second one restoring the default action would kill the process before its
        stop checkpoint (they escalate to SIGKILL after their grace period, so a stuck run still
        ends)."""
        first = not self.requested
        self.requested = True
        if first:
            self.signum = signum
        if signum == signal.SIGINT and signal.SIGINT in self._old:
            old = self._old.pop(signal.SIGINT)
            signal.signal(signal.SIGINT, signal.SIG_DFL if old is None else old)

    def _restore(self) -> None:
        for sig, handler in self._old.items():
            # None: a handler not installed from Python; the default is the closest we can restore
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._old.clear()

    def __exit__(self, *exc) -> None:
        self._restore()


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def interactive_stderr() -> bool:
    """Whether a progress bar on stderr is seen as one: a terminal, or a Jupyter kernel (whose
    stderr is not a TTY but renders tqdm's redraws). Elsewhere -- a log file, CI -- every redraw
    would land as a line of text."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)()) or "ipykernel" in sys.modules


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar, or None when disabled or when stderr is not interactive (:func:`interactive_stderr`;
    the per-epoch lines say the same). None rather than a disabled tqdm: that still starts tqdm's
    monitor thread, and the loop would still read the running loss to the host (``.item()``) for
    its postfix."""
    if not enabled or not interactive_stderr():
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _any_rank(flag: bool, d: Dist) -> bool:
    """Whether ``flag`` holds on any rank, asked after every step: a MAX all-reduce of one CPU
    number over gloo (``d.control``, or the default group where that is gloo), so that it never
    waits for a GPU. Over NCCL the number would be a device tensor read back to the host (``.item()``),
    a sync per step that lets the host launch the next step only once the device has run out of
    work."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=d.control)
    return bool(t.item())


def _broadcast(obj, d: Dist):
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _on_rank0(fn, d: Dist):
    """``fn()`` run by rank 0 alone, its result broadcast to every rank. An exception on rank 0 is
    raised there and, as a RuntimeError with its message, on the other ranks (instead of leaving
    them waiting for a broadcast that never comes)."""
    result, error = None, None
    if d.is_main:
        try:
            result = fn()
        except Exception as e:
            if not d.enabled:
                raise
            error = e
    if d.enabled:
        box = [(result, None if error is None else f"{type(error).__name__}: {error}")]
        dist.broadcast_object_list(box, src=0)
        result, message = box[0]
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"rank 0: {message}")
    return result


RUN_FILES = ("last.pt", "best.pt", "run.json")  # their presence means: output_dir holds a run


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, so that ``json.dumps`` writes strict
    JSON (``NaN`` is not JSON; a metric with no value, e.g. gAUC when no user has both classes, is null)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _open_output_dir(cfg: TrainConfig, say) -> Optional[Dict[str, Any]]:
    """Rank 0: create ``output_dir``; return ``last.pt``'s state when resuming from it, else check
    that no other run lives there (ValueError) unless ``overwrite`` (:func:`_clear_old_run` deletes
    it later)."""
    out_dir = Path(cfg.output_dir)
    blocked = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:  # mkdir's "[Errno 17] File exists" named no setting
        raise ValueError(f"--output-dir {out_dir}: {blocked} is a file, not a directory; give a directory")
    last = out_dir / "last.pt"
    if cfg.resume and last.is_file():
        return load_checkpoint(last)
    existing = [n for n in RUN_FILES if (out_dir / n).exists()]
    if existing and not cfg.overwrite:
        hint = "--overwrite to start a new run there" if cfg.resume else "--resume to continue it or --overwrite to replace it"
        raise ValueError(f"{out_dir} already holds a run ({', '.join(existing)}); pass {hint}, "
                         "or choose another --output-dir")
    if cfg.resume:  # no checkpoint: a new run, if the command describes one (and its data settings agree)
        if not _new_run_data(cfg):
            raise ValueError(f"resume: there is no {last} to resume, and the command names no data for a new run "
                             f"(it would need one of {', '.join(_RUN_DATA)}, on the command line or in a settings "
                             "file): check --output-dir")
        cfg.check_data_source()
        say(f"resume: no {last} yet, starting a new run")
    out_dir.mkdir(parents=True, exist_ok=True)
    return None


#: the settings that say what a run trains on: a ``--resume`` that finds no checkpoint needs one of them
_RUN_DATA = ("data", "train", "valid", "test", "schema", "synthetic_train", "synthetic_valid", "synthetic_test",
             "model")


def _new_run_data(cfg: TrainConfig) -> List[str]:
    """The settings of :data:`_RUN_DATA` that ``cfg`` was given (a settings file gives each key it
    holds), as :func:`resume_config` counts given fields (:func:`_given_fields`).

    Decision: ``--resume`` in a directory without ``last.pt`` starts a new run, so that a job
    requeued with its full command line (``--resume`` among its flags) before its first checkpoint
    starts over; but ``train --resume --output-dir X``, with or without flags such as ``--epochs``,
    ``--backend`` or ``--seed``, names no data to train on, and there a typo in X used to start a
    new run on every default (the synthetic data) after one line of output. Such a command is
    refused now; a first launch names its data (or drops ``--resume``)."""
    return sorted(_given_fields(cfg) & set(_RUN_DATA))


def _clear_old_run(out_dir: Path, say) -> None:
    """``--overwrite``: delete the run in ``out_dir``; called once the new run's data and model are
    built, so a mistake in the new settings does not cost the old run."""
    if any((out_dir / n).exists() for n in RUN_FILES):
        say(f"overwrite: deleting the run in {out_dir}")
        for name in (*RUN_FILES, "curves.png", "last.pt.tmp", "best.pt.tmp"):
            (out_dir / name).unlink(missing_ok=True)


def _missing_dirs(path: Path) -> List[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first (what making
    ``path`` creates)."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_if_empty(dirs: List[Path]) -> None:
    """Remove ``dirs`` (deepest first) while each is an empty directory: a run that failed before it
    wrote anything (bad settings, a malformed file, a refused resume) leaves no empty output
    directory behind, as if it had never started. One that wrote a file keeps it."""
    for p in dirs:
        try:
            p.rmdir()
        except OSError:  # not empty, not made (another rank's), or gone
            return


def train(cfg: TrainConfig, log=print) -> Dict[str, Any]:
    """Run (or resume) training as ``cfg`` says (module docstring: output directory, resume).

    Returns the run summary that ``run.json`` holds (on every rank), plus ``"model"``: the trained
    :class:`InterFormerCTR` (last weights, unwrapped from DDP and ``torch.compile``). The process's
    deterministic-algorithms setting is restored on return. A process group this call joined
    (under torchrun, when none existed) is destroyed when it returns normally, and so is the gloo
    group it made beside a caller's non-gloo group (:func:`setup_distributed`). Under torchrun it
    first lets the backend's worker threads have the GIL (:func:`_let_collectives_settle`; without
    that a rank could abort at exit). The group is not destroyed after an exception: NCCL's destroy
    waits for the other ranks, which may sit in a collective the failed rank will never join (the
    job would hang until the timeout instead of failing).
    """
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    joins = distributed and not dist.is_initialized()
    d = None
    made = _missing_dirs(Path(cfg.output_dir))
    try:
        d, device = setup_distributed(cfg.device)
        result = _train(cfg, log, d, device)
    except BaseException:
        if d is None or d.is_main:  # rank 0 makes the directory (and may still be writing to it)
            _remove_if_empty(made)
        raise
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        if distributed:  # also when the group is the caller's, and after an exception
            _let_collectives_settle()
    if joins and dist.is_initialized():
        dist.destroy_process_group()  # (with every group made in it)
    elif d.control is not None and dist.is_initialized():
        dist.destroy_process_group(d.control)
    return result


def _let_collectives_settle(seconds: float = 0.05) -> None:
    """Give gloo's worker threads the GIL before the process can exit.

    A finished collective's ``Work`` is destroyed on the backend's worker thread, and when it holds
    tensors whose Python objects were already dropped (``all_gather_object``'s, for instance), that
    thread must take the GIL to release them. If the main thread returns from ``train()`` and the
    script ends first, the interpreter kills the thread in the middle of that C++ destructor and the
    process aborts ("terminate called without an active exception"; a core dump shows
    ``~AsyncAllgatherWork`` in ``ProcessGroupGloo::runLoop`` under ``Py_FinalizeEx``). Destroying
    the group does not stop those threads (after DDP something in C++ keeps the group alive), and a
    barrier does not wait for an earlier work's destruction. Sleeping releases the GIL so that the
    workers can finish: a mitigation, not a guarantee (on a loaded machine a worker may still be
    late), measured on the 2-CPU torchrun test at 4 aborts in 95 runs before and 0 in 120 after. A
    guarantee would need every collective's tensors kept referenced by Python until the workers drop
    theirs (no ``*_object`` collectives), which this code does not do."""
    time.sleep(seconds)


def _train(cfg: TrainConfig, log, d: Dist, device: torch.device) -> Dict[str, Any]:
    check_device(device)  # before the output directory is made (a resumed run's own device: below)
    say = log if d.is_main else (lambda *a, **k: None)
    resume_state = _on_rank0(lambda: _open_output_dir(cfg, say), d)
    if resume_state is not None:
        cfg, changed = resume_config(resume_state["train_config"], cfg)
        _check_not_below_progress(cfg, resume_state)
        for name, (old, new) in changed.items():
            say(f"resume: {name} {old!r} -> {new!r}")
        if _device_for(cfg.device, d) != device:
            if d.enabled:
                raise ValueError(f"resume: the checkpoint's device {cfg.device!r} is not this process group's "
                                 f"{device}; pass --device")
            device = _device_for(cfg.device, d)
            check_device(device)
            _interpret_on_cpu(device)
        if resume_state["world_size"] != d.world_size:
            raise ValueError(f"{Path(cfg.output_dir) / 'last.pt'} was written by {resume_state['world_size']} "
                             f"process(es); resume with the same number (now {d.world_size})")
    else:  # (a --resume that found no checkpoint checked its data source in _open_output_dir)
        cfg.check_backends()
    if cfg.plot:  # found now, not after the run has trained
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise ImportError("--plot (plot: true) needs matplotlib: pip install matplotlib") from e
    out_dir = Path(cfg.output_dir)
    if cfg.embedding_optimizer == "sparse_adam" and d.enabled:
        raise ValueError("embedding_optimizer='sparse_adam' is not supported under DistributedDataParallel; use 'adagrad'")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)

    seed_everything(cfg.seed)
    if resume_state is not None:
        with _paths_of_the_run(cfg.train + cfg.valid + cfg.test, "a resumed run"):
            data = build_data(cfg, _vocabs_from_dict(resume_state["vocabularies"]), resume_state["schema"])
    else:
        data = build_data(cfg)
    overrides, splits, vocabs, schema = data
    if resume_state is None:
        _check_model_overrides(cfg, overrides)
    train_set = splits["train"]
    rows = {k: v.num_rows for k, v in splits.items()}
    empty = [k for k, n in rows.items() if n == 0]
    if empty:  # found now, not after an epoch of training
        raise ValueError(f"{', '.join(empty)}: no rows (an empty file, or every row skipped as malformed)")
    # the counting pass above was the first full pass: ``skipped`` now holds one pass's bad rows
    skipped = {k: v.skipped for k, v in splits.items()}
    data_record = _data_record(cfg, rows)
    if resume_state is not None:
        _check_same_data(resume_state.get("data"), data_record, out_dir / "last.pt")
    if cfg.patience is not None and "valid" not in splits:
        say(f"warning: patience {cfg.patience} has no effect: early stopping follows the validation AUC, and "
            "this run has no validation split (valid files, or synthetic_valid > 0)")

    seed_everything(cfg.seed)  # the same initial weights on every rank and for every data source
    # a resumed run keeps the backend its model was built with (its checkpoint's model_config)
    model = build_model(cfg, overrides, None if resume_state is None else resume_state["model_config"]["backend"])
    model = model.to(device)
    if d.enabled:  # same weights on every rank; from here each rank draws its own (a resume restores them)
        seed_everything(rank_seed(cfg.seed, d.rank))
    optimizers = build_optimizers(model, cfg)
    schedulers = warmup_schedulers(optimizers, cfg.warmup_steps)
    scaler = make_scaler(cfg, device)

    epoch, batch_in_epoch, step, best_auc, stale, history = 0, 0, 0, -math.inf, 0, []
    carry_loss = (0.0, 0)  # (sum, count) of the training losses of the interrupted epoch, on resume
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        for opt, s in zip(optimizers, resume_state["optimizers"], strict=True):
            opt.load_state_dict(s)
            _bias_state_in_param_shapes(model, opt)
        for sch, s in zip(schedulers, resume_state["schedulers"], strict=True):
            sch.load_state_dict(s)
        scaler.load_state_dict(resume_state["scaler"])
        epoch, batch_in_epoch, step = resume_state["epoch"], resume_state["batch_in_epoch"], resume_state["step"]
        best_auc, stale, history = resume_state["best_auc"], resume_state["stale_epochs"], resume_state["history"]
        carry_loss = tuple(resume_state["epoch_loss"][d.rank])
        if resume_state.get("epoch_loss_per") != "sample":  # written before 2026-11-29: (sum, count)
            # of batch means; the interrupted epoch's batches so far were full, so per sample that is
            # each times the batch size, exactly
            carry_loss = (carry_loss[0] * cfg.batch_size, carry_loss[1] * cfg.batch_size)
        set_rng_state(resume_state["rng"][d.rank], device)
        say(f"resumed from {out_dir / 'last.pt'} ({resume_state.get('status', 'running')}): epoch {epoch + 1}, "
            f"batch {batch_in_epoch}, step {step}")
    # best.pt is written exactly when the validation AUC improves, so this run (or the one it
    # resumes) wrote it iff best_auc is finite; a best.pt found otherwise is not ours
    best_written = best_auc > -math.inf

    net: nn.Module = model
    if d.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        mode = {} if cfg.compile_mode is None else {"mode": cfg.compile_mode}
        net = torch.compile(net, backend=cfg.compile_backend, **mode)
    # only now that data, model, optimisers and wrappers are built (an unknown compile backend, say,
    # fails above) does --overwrite delete the old run
    if resume_state is None and cfg.overwrite:
        _on_rank0(lambda: _clear_old_run(out_dir, say), d)

    n_params = sum(p.numel() for p in model.parameters())
    say(f"InterFormerCTR: {n_params:,} parameters, backend={model.config.backend}, device={device}, "
        f"processes={d.world_size}, amp={cfg.amp}, compile={cfg.compile}, deterministic={cfg.deterministic}")
    say(f"data: {cfg.data}, " + ", ".join(f"{k} {v:,} rows" + (f" ({skipped[k]:,} malformed, skipped)" if skipped[k]
                                                                else "") for k, v in rows.items()))
    if device.type == "cpu" and model.config.backend == "triton":
        say("note: the fused kernels run in Triton's interpreter on the CPU: right, but hundreds of times "
            "slower than eager (backend auto or eager trains on the CPU at PyTorch's speed)")

    def checkpoint(name: str, status: str, epoch_loss=(0.0, 0)) -> None:
        """Rank 0 writes ``name``; ``epoch_loss`` = (sum, count) of this rank's per-sample losses so
        far in an unfinished epoch, so a resumed run reports the same epoch loss as an uninterrupted
        one."""
        mine = (rng_state(device), tuple(epoch_loss))
        if d.enabled:
            per_rank = [None] * d.world_size
            dist.all_gather_object(per_rank, mine)
        else:
            per_rank = [mine]
        rngs, epoch_losses = [r for r, _ in per_rank], [e for _, e in per_rank]
        if not d.is_main:
            return
        state = {
            "model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
            "schedulers": [s.state_dict() for s in schedulers], "scaler": scaler.state_dict(),
            "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": step, "best_auc": best_auc,
            "stale_epochs": stale, "history": history, "rng": rngs, "world_size": d.world_size,
            "epoch_loss": epoch_losses, "epoch_loss_per": "sample", "status": status,
            "train_config": cfg.to_dict(), "model_config": model.config.to_dict(), "schema": schema,
            "vocabularies": _vocabs_to_dict(vocabs), "data": data_record, "versions": versions(),
        }
        save_checkpoint(out_dir / name, state)

    def write_run_json(status: str, **extra) -> Dict[str, Any]:
        summary = {
            "status": status, "train_config": run_settings(cfg), "model_config": model.config.to_dict(),
            "schema": schema, "versions": versions(), "device": str(device), "world_size": d.world_size,
            "parameters": n_params, "epochs": history, "best_valid_auc": None if best_auc == -math.inf else best_auc,
            "step": step, "skipped_rows": skipped, **extra,
        }
        if d.is_main:
            (out_dir / "run.json").write_text(json.dumps(json_safe(summary), indent=2, default=str), encoding="utf-8")
        return summary

    def max_steps_reached() -> bool:
        return cfg.max_steps is not None and step >= cfg.max_steps

    n_batches = math.ceil(math.ceil(train_set.num_rows / d.world_size) / cfg.batch_size)
    dense_params = [p for g in optimizers[0].param_groups for p in g["params"]]
    clip_params = dense_params if cfg.embedding_optimizer == "sparse_adam" else list(model.parameters())
    status, t_start = "finished", time.perf_counter()
    if resume_state is not None and cfg.patience is not None and stale >= cfg.patience:
        status = "early_stopped"
        say(f"resume: the run stopped early ({stale} epoch(s) without a better validation AUC, patience "
            f"{cfg.patience}); nothing to train (a larger --patience continues it)")
    elif resume_state is not None and epoch >= cfg.epochs:
        say(f"resume: the run finished its {cfg.epochs} epoch(s); nothing to train (a larger --epochs continues it)")
    with _StopRequest() as stop:
        while status != "early_stopped" and epoch < cfg.epochs:
            if max_steps_reached():  # before any step: a resumed run may already be there
                status = "stopped"
                say(f"max_steps={cfg.max_steps} reached at step {step}; nothing to train (a larger --max-steps "
                    "continues)")
                break
            net.train()
            bar = _progress(n_batches, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and d.is_main)
            if bar is not None:
                bar.update(batch_in_epoch)
            loss_sum, seen, t0 = torch.tensor(carry_loss[0], device=device, dtype=torch.float64), 0, time.perf_counter()
            loss_n, carry_loss = carry_loss[1], (0.0, 0)
            batches = train_set.batches(cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch, rank=d.rank,
                                        world_size=d.world_size, skip_batches=batch_in_epoch, prefetch=cfg.prefetch)
            halted = False
            lr_used = schedulers[0].get_last_lr()[0]  # (an epoch that takes no step: the next step's)
            for batch in _closing(batches):
                b, checked = on_device(batch, device, net)
                with checked, autocast(cfg, device):
                    logits = net(*b.inputs())
                loss = InterFormerCTR.loss(logits, b.label)
                with torch.autograd.set_multithreading_enabled(cfg.autograd_multithreading):
                    scaler.scale(loss).backward()
                if cfg.clip_grad_norm is not None:
                    for opt in optimizers:
                        scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(clip_params, cfg.clip_grad_norm)
                for opt in optimizers:
                    scaler.step(opt)
                scaler.update()
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                lr_used = schedulers[0].get_last_lr()[0]  # the step just taken used it: the history's "lr"
                for sch in schedulers:
                    sch.step()
                step += 1
                batch_in_epoch += 1
                seen += len(b)
                # per sample: the epoch's loss is the mean over its samples, so a last partial batch
                # weighs its size (a mean of batch means weighed it as a full one: a review's find)
                loss_sum += loss.detach().double() * len(b)
                loss_n += len(b)
                if bar is not None:
                    bar.update(1)
                    if batch_in_epoch % cfg.log_every == 0:
                        mean = (loss_sum / loss_n).item()  # (first: it waits for the queued steps)
                        sps = seen * d.world_size / (time.perf_counter() - t0)
                        bar.set_postfix(loss=f"{mean:.4f}", samples_s=rate(sps))
                elif d.is_main and step % cfg.log_every == 0:  # no bar (a log file, --no-progress): a line
                    mean = (loss_sum / loss_n).item()  # (first: it waits for the queued steps)
                    sps = seen * d.world_size / max(time.perf_counter() - t0, 1e-9)
                    say(f"step {step}: loss {mean:.4f}, {rate(sps)} samples/s "
                        f"(epoch {epoch + 1}, batch {batch_in_epoch}/{n_batches}; means over the epoch so far)")
                if _any_rank(max_steps_reached() or stop.requested, d):
                    halted = True
                    break
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    checkpoint("last.pt", "running", (float(loss_sum), loss_n))
            if bar is not None:
                bar.close()
            finished_epoch = batch_in_epoch >= n_batches
            if halted and not finished_epoch:
                status = "stopped"
                checkpoint("last.pt", status, (float(loss_sum), loss_n))
                say(f"stopped at epoch {epoch + 1}, batch {batch_in_epoch}/{n_batches}, step {step}; "
                    f"`--resume` continues from {out_dir / 'last.pt'}")
                break
            # --- end of epoch: validation, best/last checkpoints, early stopping ---------------
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_sps = seen * d.world_size / max(time.perf_counter() - t0, 1e-9)
            if d.enabled:  # pooled over the ranks' samples
                t = torch.stack([loss_sum, torch.tensor(float(loss_n), device=device, dtype=torch.float64)])
                dist.all_reduce(t)
                train_loss = (t[0] / t[1].clamp_min(1)).item()
            else:
                train_loss = (loss_sum / max(loss_n, 1)).item()
            record = {"epoch": epoch + 1, "step": step, "train_loss": train_loss, "train_samples_per_s": train_sps,
                      "lr": lr_used}  # the dense parameters' rate at the epoch's last step (get_last_lr() after
            # it is the next step's, past the epoch during warm-up: a review's find, 2026-11-29)
            if "valid" in splits:
                valid = evaluate_split(model, splits["valid"], cfg, device) if d.is_main else None
                valid = _broadcast(valid, d)
                record["valid"] = valid
                improved = valid["auc"] > best_auc
                if improved:
                    best_auc, stale = valid["auc"], 0
                elif not math.isnan(valid["auc"]):
                    stale += 1
                # a NaN AUC is neither better nor worse: the epoch does not count toward patience
            else:
                improved = False
            history.append(record)
            say(_epoch_line(record))
            if "valid" in record and math.isnan(record["valid"]["auc"]):
                say(f"warning: epoch {epoch + 1}: the validation AUC is undefined (NaN): "
                    f"{_why_auc_is_nan(record['valid'])}. This epoch does not count toward early stopping "
                    "and cannot become the best checkpoint.")
            epoch, batch_in_epoch = epoch + 1, 0
            if cfg.patience is not None and stale >= cfg.patience:
                status = "early_stopped"
            elif epoch >= cfg.epochs:
                status = "finished"
            elif halted:
                status = "stopped"
            else:
                status = "running"
            if improved:
                checkpoint("best.pt", status)
                best_written = True
            checkpoint("last.pt", status)
            write_run_json(status)
            if status == "early_stopped":
                say(f"early stopping: no better validation AUC for {stale} epoch(s)")
            elif status == "stopped":
                say(f"stopped after epoch {epoch}, step {step}; `--resume` continues from {out_dir / 'last.pt'}")
            if status != "running":
                break

    final, source = {}, "last weights"
    if status != "stopped" and d.is_main:
        final_model = model
        best = out_dir / "best.pt"
        if best_written and best.is_file():
            final_model = copy.deepcopy(model)
            final_model.load_state_dict(load_checkpoint(best)["model"])
            source = "best checkpoint"
        elif best_written:
            say(f"note: {best} is gone; the final metrics are the last weights'")
        elif "valid" in splits and any("valid" in r for r in history):
            say("note: no best checkpoint could be chosen by validation AUC (it was undefined, NaN, in every "
                "epoch), so no best.pt was written; the final metrics are the last weights'")
        for split in ("valid", "test"):
            if split in splits:
                final[split] = evaluate_split(final_model, splits[split], cfg, device)
    stopped_by = stop.signum if status == "stopped" else None  # None: finished, or stopped by max_steps
    summary = write_run_json(status, final=final, seconds=time.perf_counter() - t_start, stopped_by_signal=stopped_by)
    if d.is_main:
        if final:
            say("")
            say(metrics_table(final, source))
            for note in metric_notes(final):
                say(note)
        if cfg.plot and history:
            say(f"curves: {plot_curves(history, out_dir / 'curves.png')}")
        for split, ds in splits.items():
            if skipped[split]:
                say(f"note: skipped {skipped[split]} malformed row(s) in {split} "
                    f"(e.g. {'; '.join(ds.skipped_examples[:3])})")
    summary["model"] = model  # the trained module itself (not in run.json), on every rank
    return summary


def _why_auc_is_nan(m: Dict[str, float], split: str = "validation") -> str:
    """Why :func:`~interformer.metrics.auc` gave NaN for split metrics ``m`` (:func:`metrics_of`):
    NE is NaN exactly when the labels hold one class, LogLoss finite when the logits are."""
    if not math.isfinite(m["logloss"]):
        return "the model's scores are not all finite (NaN or infinite logits: has training diverged?)"
    if math.isnan(m["ne"]):
        return f"the {split} rows hold one label class only (all 0 or all 1), and AUC needs both"
    return "the model's scores are not all finite"


def metric_notes(results: Dict[str, Dict[str, float]]) -> List[str]:
    """One line per undefined (NaN) metric of :func:`metrics_table`'s ``results`` that says why, so
    that a table's ``nan`` is never left unexplained: AUC as :func:`_why_auc_is_nan` reads it, gAUC
    from ``gauc_users`` (the users holding both a click and a non-click; gAUC averages their AUCs)."""
    notes = []
    for split, m in results.items():
        if math.isnan(m["auc"]):
            what = "AUC and NE are" if math.isnan(m["ne"]) and math.isfinite(m["logloss"]) else "AUC is"
            notes.append(f"note: {what} undefined on {split}: {_why_auc_is_nan(m, split)}")
        if "gauc" in m and math.isnan(m["gauc"]):
            if m.get("gauc_users", 1) == 0:
                why = ("no user in it has both a click and a non-click (gAUC averages the AUCs of those who do; "
                       "rows without a user id count for none)")
            else:
                why = "the model's scores are not all finite"
            notes.append(f"note: gAUC is undefined on {split}: {why}")
    return notes


def rate(per_s: float) -> str:
    """A throughput as printed: whole numbers with thousands separators, three significant digits
    below 100 (a run of a few samples on a slow machine printed "0 samples/s")."""
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.3g}"


def _epoch_line(r: Dict[str, Any]) -> str:
    line = f"epoch {r['epoch']}: train loss {r['train_loss']:.4f}, {rate(r['train_samples_per_s'])} samples/s"
    v = r.get("valid")
    if v:
        line += f" | valid AUC {v['auc']:.4f}" + (f", gAUC {v['gauc']:.4f}" if "gauc" in v else "")
        line += f", LogLoss {v['logloss']:.4f}, NE {v['ne']:.4f}"
    return line


def metrics_table(results: Dict[str, Dict[str, float]], source: str = "", title: Optional[str] = None) -> str:
    """A fixed-width table: one row per split, AUC, gAUC, LogLoss, NE, samples, samples/s; headed
    ``title``, or by default "final metrics (source)" (a training run's closing table)."""
    head = f"{'split':<8} {'AUC':>7} {'gAUC':>7} {'LogLoss':>8} {'NE':>7} {'samples':>9} {'samples/s':>11}"
    if title is None:
        title = f"final metrics ({source})" if source else "metrics"
    lines = [title, head, "-" * len(head)]
    for split, m in results.items():
        g = f"{m['gauc']:>7.4f}" if "gauc" in m else f"{'-':>7}"
        lines.append(f"{split:<8} {m['auc']:>7.4f} {g} {m['logloss']:>8.4f} {m['ne']:>7.4f} "
                     f"{m['samples']:>9,} {rate(m.get('samples_per_s', float('nan'))):>11}")
    return "\n".join(lines)


def plot_curves(history: List[Dict[str, Any]], path: Path) -> Path:
    """Train loss and validation LogLoss / AUC per epoch, as a PNG. The AUC panel is drawn only where
    every epoch was validated: a run without a validation split gets the loss panel alone (an empty
    AUC panel, and matplotlib's warning that its legend had nothing to show, came before)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    validated = all("valid" in r for r in history)
    fig, axes = plt.subplots(1, 2 if validated else 1, figsize=(9 if validated else 4.5, 3.5), squeeze=False)
    ax_loss = axes[0][0]
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train loss")
    panels = [(ax_loss, "loss")]
    if validated:
        ax_auc = axes[0][1]
        ax_loss.plot(epochs, [r["valid"]["logloss"] for r in history], marker="o", label="valid LogLoss")
        ax_auc.plot(epochs, [r["valid"]["auc"] for r in history], marker="o", label="valid AUC")
        if all("gauc" in r["valid"] for r in history):
            ax_auc.plot(epochs, [r["valid"]["gauc"] for r in history], marker="o", label="valid gAUC")
        panels.append((ax_auc, "AUC"))
    for ax, title in panels:
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _format_of(paths: List[str], fallback: str) -> Optional[str]:
    """The ``fmt`` one split's files are read with: None (dataio reads each file by its suffix) when
    every suffix tells the format (.csv, .csv.gz, .parquet, .pq), else ``fallback`` (the ``data``
    setting) for all of them. Training and ``evaluate`` both use it, so ``data: csv`` with a
    ``.parquet`` file reads that file as Parquet."""
    known = (".csv", ".csv.gz", ".parquet", ".pq")
    return None if all(str(p).lower().endswith(known) for p in paths) else fallback


def _model_of(state: Dict[str, Any], backend: Optional[str], device: torch.device) -> InterFormerCTR:
    """The checkpoint's model with its weights on ``device``, on the backend it was built with unless
    ``backend`` names another."""
    settings = dict(state["model_config"])
    if backend is not None:
        settings["backend"] = backend
    model = InterFormerCTR(InterFormerConfig(**settings)).to(device)
    model.load_state_dict(state["model"])
    return model


def load_model(checkpoint, backend: Optional[str] = None, device: Optional[str] = None) -> InterFormerCTR:
    """The trained :class:`InterFormerCTR` of a checkpoint of ``python -m interformer train``
    (``best.pt`` or ``last.pt``), for use from Python: built from the checkpoint's model settings
    on the backend it was trained with (``backend`` picks another: the weights are the same on
    every backend), with its weights, on ``device`` (default: CUDA when available, else the CPU),
    in eval mode. Its inputs are encoded batches (README, "Data contract"; :func:`evaluate_checkpoint`
    encodes files with the schema and vocabularies the checkpoint carries). The file is read as
    :func:`load_checkpoint` reads it (tensors and plain values only)."""
    dev = _default_device(device)
    check_device(dev)
    return _model_of(load_checkpoint(checkpoint), backend, dev).eval()


def _scoring_setup(checkpoint, batch_size: Optional[int], device: Optional[str], backend: Optional[str],
                   amp: Optional[str], on_bad_rows: Optional[str]) -> tuple:
    """``(state, cfg, device, model, amp_note)`` for :func:`evaluate_checkpoint` and
    :func:`score_checkpoint`: the checkpoint, its training settings with the given ``amp``,
    ``on_bad_rows`` and ``batch_size`` (as ``cfg.eval_batch_size``; None: its own), the device and
    the model on it, and why the amp used is not the checkpoint's (None when it is)."""
    from .dataio import _check_batch_args

    if batch_size is not None:
        _check_batch_args(batch_size, 0, 1, 0)
    dev = _default_device(device)  # before the checkpoint is read
    check_device(dev)
    state = load_checkpoint(checkpoint)
    # a given on_bad_rows, amp or batch size replaces the checkpoint's, checked by TrainConfig as every setting is
    given = {name: value for name, value in (("on_bad_rows", on_bad_rows), ("amp", amp), ("eval_batch_size", batch_size))
             if value is not None}
    # the device is this call's (the run's own is not checked: one of another type, from before
    # parse_device, does not stop its checkpoint from being scored here)
    cfg = TrainConfig.from_dict({**state["train_config"], **given,
                                 "device": None if device is None or device == "" else str(dev)})  # (0: "cuda:0")
    model = _model_of(state, backend, dev)
    amp_note = None
    if amp is None and cfg.amp == "bf16" and dev.type == "cpu" and model.config.backend == "triton":
        cfg.amp = "off"
        amp_note = ("the checkpoint's amp, bf16, cannot run on the fused path on a CPU (Triton's interpreter has no "
                    "bfloat16): scored without autocast (--amp fp16, or --backend eager with --amp bf16, choose "
                    "otherwise)")
    return state, cfg, dev, model, amp_note


def _path_list(paths) -> List[str]:
    """``paths`` (one path, or an iterable of them: a generator is read once) as a list of strings."""
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    return [os.fspath(p) for p in paths]


def refuse_overwriting(output, inputs) -> None:
    """ValueError when the file ``output`` would be written over one of ``inputs`` (a data file or the
    checkpoint being read): ``--output test.csv`` given by mistake would otherwise replace the data
    with its scores."""
    if not os.path.exists(output):
        return
    for p in inputs:
        if os.path.exists(p) and os.path.samefile(output, p):
            raise ValueError(f"{output} is {p}, which is read here; write the output to another file")


def _schema_and_vocabs(checkpoint, state: Dict[str, Any], what: str) -> tuple:
    """The :class:`~interformer.dataio.Schema` and vocabularies a checkpoint carries, to read files
    or encode rows with (``what``, for the error); ValueError for a checkpoint of synthetic data."""
    from .dataio import Schema

    if state["schema"] is None:
        raise ValueError(f"{checkpoint} was trained on synthetic data; it has no schema to {what} with")
    return Schema.from_dict(state["schema"]), _vocabs_from_dict(state["vocabularies"])


def evaluate_checkpoint(checkpoint: str, paths: Optional[List[str]] = None, data: Optional[str] = None,
                        batch_size: Optional[int] = None, device: Optional[str] = None, backend: Optional[str] = None,
                        amp: Optional[str] = None, on_bad_rows: Optional[str] = None,
                        output: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """Metrics of a checkpoint on files (with the checkpoint's schema and vocabularies) or on its
    own validation/test splits when ``paths`` is not given: the files its config names, read with
    the schema and vocabularies it carries (the schema file it was trained from is not read).

    Returns {split: metrics} (``"eval"`` for ``paths``: all of them as one split). For files, the
    metrics also give ``skipped_rows``: the malformed rows left out, and, when there are any,
    ``skipped_examples`` (the first three reasons). ``on_bad_rows`` ("raise" or "skip") decides
    what a malformed row does; None (the default) takes the checkpoint's own setting, so that its
    run's validation/test splits are read as they were in training. With "raise" the first one
    raises, naming its file and line. ``amp`` ("off", "bf16" or "fp16"): the autocast the model runs
    under; None (the default) takes the checkpoint's, so that a split scores as it did in training,
    except where that cannot run: a bf16 checkpoint evaluated on the fused path on a CPU (Triton's
    interpreter has no bfloat16) is scored without autocast and says so. Each split's metrics give
    the ``amp`` used, and ``amp_note`` where it is not the checkpoint's for that reason.
    ``batch_size``: rows scored at a time; None (the default) takes the run's ``eval_batch_size``,
    so that its splits score in the batches of training's validation, to the last digit (a sum
    over batches of another size differs in about the tenth). ``output``:
    a file the caller will write the results to, refused (ValueError, before any scoring) when it is
    the checkpoint or a file read: ``evaluate --output`` once wrote its metrics over the
    checkpoint's own validation file."""
    from .dataio import TabularDataset

    state, cfg, dev, model, amp_note = _scoring_setup(checkpoint, batch_size, device, backend, amp, on_bad_rows)
    if paths:
        paths = _path_list(paths)
        if output is not None:
            refuse_overwriting(output, [checkpoint, *paths])
        splits = {"eval": _dataset(cfg, paths, *_schema_and_vocabs(checkpoint, state, "read files"), data)}
    elif state["schema"] is None:  # synthetic: the splits are regenerated from the seed, the training one not
        splits = _synthetic_splits(cfg, ("valid", "test"))
    else:  # the validation/test files its config names; the training files need not exist any more
        if output is not None:
            refuse_overwriting(output, [checkpoint, *cfg.valid, *cfg.test])
        schema, vocabs = _schema_and_vocabs(checkpoint, state, "read files")
        with _paths_of_the_run(cfg.valid + cfg.test, "evaluate without files"):
            splits = {name: _dataset(cfg, getattr(cfg, name), schema, vocabs) for name in ("valid", "test")
                      if getattr(cfg, name)}
    if not splits:  # (a synthetic run's checkpoint has no schema to read files with: its own splits only)
        why = ("its run drew synthetic data with synthetic_valid = synthetic_test = 0, and it has no schema to "
               "read files with: nothing to evaluate" if state["schema"] is None else "pass files to evaluate")
        raise ValueError(f"{checkpoint}: no validation or test split in its config; {why}")
    results = {}
    for name, ds in splits.items():
        results[name] = evaluate_split(model, ds, cfg, dev)
        results[name]["amp"] = cfg.amp
        if amp_note:
            results[name]["amp_note"] = amp_note
        if isinstance(ds, TabularDataset):  # one pass read the files: their malformed rows, left out (on_bad_rows)
            results[name]["skipped_rows"] = ds.skipped
            if ds.skipped:
                results[name]["skipped_examples"] = ds.skipped_examples[:3]
    return results


@dataclass
class Scores:
    """What :func:`score_checkpoint` returns: one score per scored row, in the files' order.

    ``paths``: the files, as given. ``file`` (int64): each score's file, an index into ``paths``.
    ``row`` (int64): its row's 0-based index among that file's rows (the first row after the
    header is 0; empty CSV lines are not rows; a malformed row is, so a skipped one leaves a gap;
    :meth:`~interformer.dataio.TabularDataset.positioned_batches`). ``score`` (float32): the
    predicted click probability, ``sigmoid`` of the model's logit. ``skipped_rows``: the malformed
    rows left out (``on_bad_rows="skip"``), ``skipped_examples`` the first reasons. ``amp``: the
    autocast the model ran under, ``amp_note`` why it is not the checkpoint's (or None).
    ``samples_per_s``: rows scored per second, reading included."""

    paths: List[str]
    file: torch.Tensor
    row: torch.Tensor
    score: torch.Tensor
    skipped_rows: int
    skipped_examples: List[str]
    amp: str
    amp_note: Optional[str]
    samples_per_s: float

    def write(self, path) -> None:
        """Write the columns ``file``, ``row`` and ``score``: as Parquet when ``path`` ends in
        ``.parquet`` or ``.pq`` (string, int64 and float32 columns; needs pyarrow), else as CSV (a
        header, then one line per score; the file as given, the score with the 9 significant digits
        that give its float32 back exactly). The folder is made; a ``path`` that is one of the
        scored files is refused."""
        refuse_overwriting(path, self.paths)
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        if os.fspath(path).lower().endswith((".parquet", ".pq")):
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ImportError as e:
                raise ImportError("writing Parquet needs pyarrow: pip install pyarrow (or write a .csv)") from e
            files = pa.DictionaryArray.from_arrays(pa.array(self.file.numpy()), pa.array(self.paths, pa.string()))
            table = pa.table({"file": files.dictionary_decode(), "row": pa.array(self.row.numpy()),
                              "score": pa.array(self.score.numpy())})
            pq.write_table(table, path)
            return
        import csv

        with open(path, "w", newline="", encoding="utf-8") as fh:
            out = csv.writer(fh)
            out.writerow(["file", "row", "score"])
            for f, r, v in zip(self.file.tolist(), self.row.tolist(), self.score.tolist()):
                out.writerow([self.paths[f], r, f"{v:.9g}"])


@torch.no_grad()
def score_checkpoint(checkpoint: str, paths: List[str], data: Optional[str] = None, batch_size: Optional[int] = None,
                     device: Optional[str] = None, backend: Optional[str] = None, amp: Optional[str] = None,
                     on_bad_rows: Optional[str] = None) -> Scores:
    """Click probabilities of a checkpoint's model for every row of ``paths`` (CSV/Parquet files read
    with the checkpoint's schema and vocabularies; one path or several): :class:`Scores`. A file
    given twice is refused, as its rows' ``(file, row)`` would name two scores.

    The files need no label column; where they have one it is not read, so an unlabeled file with
    an empty label column scores too. Nor do they need the schema's ``user`` column where it only
    groups gAUC (it is not a sparse feature): scores need no groups, and new traffic may lack the
    column the training data grouped by. ``data``, ``batch_size``, ``device``, ``backend``, ``amp``
    and ``on_bad_rows`` are those of :func:`evaluate_checkpoint`, defaults included: a malformed
    row raises, naming its file and line, unless ``on_bad_rows`` (or the checkpoint's setting) is
    "skip"; then it has no score, and ``row`` says which rows the scores belong to. A file with no
    rows gives no scores (no error: there is nothing to score)."""
    paths = _path_list(paths)
    seen: Dict[str, int] = {}
    for i, p in enumerate(paths):
        first = seen.setdefault(os.path.realpath(p), i)
        if first != i:
            raise ValueError(f"{p} is given twice (also as {paths[first]}); each file is scored once, so that "
                             "its file and row name one score")
    state, cfg, dev, model, amp_note = _scoring_setup(checkpoint, batch_size, device, backend, amp, on_bad_rows)
    ds = _dataset(cfg, paths, *_schema_and_vocabs(checkpoint, state, "read files"), data, labels=False)
    model.eval()
    files, rows, scores = [], [], []
    t0 = time.perf_counter()
    for batch, f, r in _closing(ds.positioned_batches(cfg.eval_batch_size, prefetch=cfg.prefetch)):
        scores.append(torch.sigmoid(_logits(model, batch, dev, cfg)))
        files.append(f)
        rows.append(r)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0

    def cat(parts, dtype):
        return torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=dtype)

    score = cat(scores, torch.float32)
    return Scores(paths=paths, file=cat(files, torch.int64), row=cat(rows, torch.int64),
                  score=score, skipped_rows=ds.skipped, skipped_examples=ds.skipped_examples[:3], amp=cfg.amp,
                  amp_note=amp_note, samples_per_s=score.numel() / max(seconds, 1e-9))


class Scorer:
    """A checkpoint's model with the schema and vocabularies it was trained with, for rows held in
    memory (:func:`load_scorer` makes one). ``scorer(rows)``: the click probabilities (float32, on
    the CPU, in the rows' order) of ``rows``, mappings ``{column: value}`` encoded as
    :class:`~interformer.dataio.RowEncoder` says (no label needed, nor a user column that only groups
    gAUC); the model runs on ``batch_size`` rows at a time, in eval mode (set once, here), without gradients, under the autocast ``amp``
    (``amp_note``: why it is not the checkpoint's, or None). A row that lacks a column or that a
    file reader would call malformed raises ValueError naming it (0-based), before any row is scored.
    ``model`` and ``encoder`` are its parts."""

    def __init__(self, model: InterFormerCTR, encoder, cfg: TrainConfig, device: torch.device,
                 amp_note: Optional[str], batch_size: int) -> None:
        self.model, self.encoder, self.device, self.batch_size = model.eval(), encoder, device, batch_size
        self.amp, self.amp_note, self._cfg = cfg.amp, amp_note, cfg

    @torch.no_grad()
    def __call__(self, rows) -> torch.Tensor:
        if isinstance(rows, Mapping):  # (list() made one row its keys: "row 0: expected a mapping, got str",
            # and an empty one no rows, scored silently as none)
            raise TypeError("expected a list of rows, got one mapping: pass [row]")
        rows = list(rows)
        if not rows:
            return torch.zeros(0, dtype=torch.float32)
        batch = self.encoder(rows)
        parts = [torch.sigmoid(_logits(self.model, batch[start:start + self.batch_size], self.device, self._cfg))
                 for start in range(0, len(rows), self.batch_size)]
        return torch.cat(parts).cpu()


def load_scorer(checkpoint, device: Optional[str] = None, backend: Optional[str] = None, amp: Optional[str] = None,
                batch_size: Optional[int] = None) -> Scorer:
    """A :class:`Scorer` of a checkpoint of ``python -m interformer train`` trained on files (it needs
    their schema and vocabularies, which the checkpoint carries). ``device``, ``backend``, ``amp``
    and ``batch_size`` as for :func:`score_checkpoint`, whose scores it gives for the same rows."""
    from .dataio import RowEncoder

    state, cfg, dev, model, amp_note = _scoring_setup(checkpoint, batch_size, device, backend, amp, None)
    encoder = RowEncoder(*_schema_and_vocabs(checkpoint, state, "encode rows"))
    return Scorer(model, encoder, cfg, dev, amp_note, cfg.eval_batch_size)
