"""Real-data input: CSV and Parquet files streamed into DESIGN §2 batches.

The file layout is the BARS/FuxiCTR convention that the paper's public benchmarks use: a header
row, then one sample per row holding the click label, categorical columns, optional numeric
columns and behaviour histories written as ``^``-joined id lists. AmazonElectronics_x1, for
example, is ``label,user_id,item_id,cate_id,item_history,cate_history``. A small
:class:`Schema` (JSON or YAML) says which column plays which part. Parquet files with the same
columns are read the same way.

Decisions (what the code below does, and why):

* **Vocabularies come from the training split only.** :func:`build_vocabularies` makes one
  streaming pass over the training files. In every :class:`Vocabulary`, id 0 is missing/padding
  (an empty cell), id 1 is out-of-vocabulary (an id unseen in training, or seen fewer than
  ``min_count`` times), and known ids start at 2, ordered by descending count, then by string, so
  the same files always give the same ids. A sequence channel can share a vocabulary with a sparse
  column (``shared_vocab: {item_history: item_id}``); the shared vocabulary is counted over the
  union of both. History events are counted after truncation to the most recent ``max_seq_len``,
  because those are the only events the model ever sees: an id that only occurs in older events
  would get an embedding row that is never trained.
* **Raw ids are strings.** A cell is stripped of surrounding whitespace. Parquet values are turned
  into the string a CSV writer would produce for them, with integral floats written as integers
  (``123.0`` -> ``"123"``), a float NaN as an empty cell (missing, as a null is: pandas' ``to_csv``
  writes it so, and a Spark-written file may hold NaN where pandas would have stored a null; so is
  pandas' ``pd.NA``, which a :class:`RowEncoder` row made from a DataFrame may hold) and
  booleans as ``"1"``/``"0"``, so that CSV ``123`` and Parquet ``123`` share one key. (A CSV cell
  ``123.0`` stays the string ``"123.0"``: in a text file it is a different token.)
* **Histories.** A history cell is split on ``seq_sep`` (Parquet cells may also hold lists); an
  empty cell is an empty history. An empty event inside a history (``"3^^5"``, a trailing ``^``)
  is a malformed row, not an id 0: id 0 inside the valid length would read as padding. All
  channels of a row must hold the same number of events. Only the most recent ``max_seq_len``
  events are kept; ``seq_order="newest_first"`` files are reversed on read, so that ``seq`` is
  always oldest -> newest at positions ``0..len-1`` with zeros after (DESIGN §2).
* **Labels** must parse as the number 0 or 1 (``"0"``, ``"1"``, ``"0.0"``, ``"1.0"``, ...). Dense
  cells must be finite numbers that float32 holds (that round to a finite float32: ``3.4028235e38``,
  as NumPy prints float32's largest value, is taken); an empty dense cell takes ``dense_fill``
  (or is malformed when ``dense_fill`` is None).
* **Malformed rows are never dropped silently.** With ``on_error="raise"`` (the default) the first
  one raises :class:`DataError` ``"<path>:<line>: <reason>"``, where ``<line>`` is the physical
  line on which the CSV row starts (the header is line 1) or ``row <i>`` (1-based) for Parquet.
  With ``on_error="skip"`` it is counted in :attr:`TabularDataset.skipped` (the first few messages
  are kept in ``skipped_examples``), and it takes no part in ``num_rows`` or sharding;
  :func:`build_vocabularies` reports its skips with a :class:`DataWarning`. A wrong number of CSV
  fields, and a quoting error (below), are malformed rows. Problems with a whole file (no header,
  missing or duplicated required columns, bytes that are not UTF-8, a file that cannot be read
  such as a corrupt or truncated ``.gz`` or Parquet file) always raise, whatever ``on_error``
  says: after them nothing in the file can be trusted. Undecodable bytes are reported at their own
  physical line (``"not valid UTF-8 (byte 0xff at character 23 of the line)"``), a read error at
  the line it was reading (``"unreadable file (EOFError: ...)"``); a Parquet file that pyarrow
  cannot read at ``metadata`` (its footer) or at the first row of the record batch it was reading
  (``"row 8193: unreadable Parquet file (OSError: ...)"``); a binary Parquet value that is not UTF-8
  at its row and column (``"row 71: column 'tag': not valid UTF-8 (byte 0xff at byte 1 of the
  value)"``). A Parquet sequence column must hold strings or a list of scalars (a list of lists
  is refused at ``schema``). Completely blank CSV lines, before the header too, are not rows and
  are passed over (they carry no sample); the header is the first line that is not blank, and its
  line number is the one errors about it give.
* **Quoting.** By default one CSV row is one physical line: a quoted field may hold commas and
  doubled quotes, but not a line break. A row whose quote is still open at the end of its line (a
  stray quote) is malformed at that line (``"a quoted field runs past the end of line 12 (a stray
  quote? ...)"``) and reading goes on at the next line, so a stray quote costs one row, not the
  rows up to the next quote, and an unclosed quote at the end of the file costs one row too.
  Quoting is strict (``'"a"b'`` is a malformed row, not the field ``ab``). A schema that sets
  ``csv_multiline: true`` lets a quoted field span lines (the row's line is then the line it
  starts on); a quote still open at the end of the file is then the whole file's problem and
  raises, naming the row's first line and the file's last, and so does any other quoting error
  (where the next row starts is then unknown). Line breaks are ``\\n``, ``\\r\\n`` and ``\\r``.
* **Streaming.** Nothing reads a whole file: CSV is read line by line (gzip when the name ends in
  ``.gz``), Parquet through ``ParquetFile.iter_batches`` (pyarrow is imported only when it is
  used). The per-row path builds batches from ``batch_size`` rows at a time; the vectorised path
  reads 8192 rows (one Parquet record batch) ahead. Either way the first batch arrives before the
  rest of the file has been read. Reading CSV raises the process-wide ``csv.field_size_limit`` so
  that long histories fit in one field.
* **Groups for gAUC.** When ``schema.user`` is set and labels are read, ``Batch.group`` holds a
  stable 63-bit hash (blake2b, 8 bytes) of the raw user string, not the vocabulary id: users
  unseen in training would otherwise all collapse into the OOV id and be scored as one user. A
  sample whose user is missing (empty, or null in Parquet) gets the key -1, no group: gAUC leaves
  it out rather than score every anonymous sample as one user.
* **Sharding, shuffling, resuming** (:meth:`TabularDataset.batches`): rank ``r`` of ``world_size``
  takes the valid rows whose index ``i`` (counted over the files in the order they are read) has
  ``i % world_size == r``. Every rank yields exactly ``ceil(num_rows / world_size)`` rows, a rank
  that is one short repeating its first row at the end (as ``torch``'s ``DistributedSampler`` pads),
  so every rank yields the same number of batches and DDP never waits on a rank that has finished.
  ``shuffle=True`` passes each rank's rows through a streaming shuffle buffer seeded by
  ``(seed, epoch, rank)``; with several files, the order in which the files are read is also
  shuffled, seeded by ``(seed, epoch)`` alone so that every rank agrees on the row indices. With
  one file a rank therefore sees the same rows every epoch, in a new order (a stream cannot be
  permuted globally without holding it all). ``skip_batches=k`` drops the first
  ``k`` batches of exactly that order, for resuming mid-epoch; the skipped rows are still read.
* **Two paths, one result.** The *per-row* path (``vectorized=False``, and the only one without
  pyarrow) parses each row in Python (``_Parser``) and looks each id up in a dict: it is the
  reference. The *vectorised* path (the default when pyarrow is installed) reads the same rows a
  chunk at a time and converts them column by column with ``pyarrow.compute`` and numpy. CSV
  lines that hold no quote and no NUL character are split by Arrow (the :mod:`csv` module reads
  such a line as ``line.split(",")``); from the first line that holds one, the :mod:`csv` module
  reads the rest of the file, and lines are taken from the file one at a time as it takes them, so
  that a read error happens at the same line. Histories are split with ``split_pattern``, the
  most recent ``T`` events laid out oldest -> newest by index arithmetic on the list offsets, ids
  found with ``index_in`` against each vocabulary's tokens, group keys computed once per distinct
  user string. The column checks accept a row only where they can vouch for the parser giving the
  same values: the label by the parser's own check, once per distinct string; a dense cell only
  as a plain decimal literal, which Arrow's cast and ``float()`` both round correctly (the tests
  compare them bit for bit); whitespace stripped with exactly ``str.strip``'s characters. Every
  other row, malformed or merely unusual (``" 1_000 "``), is decided by the parser, which writes
  the error message; a chunk in which anything unexpected happens is decided by the parser row by
  row. Vocabularies, batches (bit for bit), errors with their lines and skip counts are therefore
  the same on both paths; the tests compare them on files holding every feature and every kind of
  malformed row, and a dataset's ``vectorized`` switch changes nothing but the speed.
* **Speed** (``bench/bench_dataio.py``: 50k rows, two channels of 0..80 events, T = 50, 100k
  items; one process on a 2-core machine): ``batches(2048)`` 24k -> 123k rows/s from CSV (about
  85 -> 17 ms a batch) and 22k -> 141k rows/s from Parquet; ``build_vocabularies`` 35k -> 110k
  rows/s; with ``prefetch=2``, 25 batches consumed at 40 ms each take 1.09 s instead of 1.44 s
  (1.00 s of consuming). On the vectorised path a row travels through sharding, the shuffle
  buffer and batching as one packed ``bytes`` record (about 450 bytes for that schema), so a full
  65536-row shuffle buffer holds about 30 MB.
* **Prefetch.** ``batches(..., prefetch=k)`` builds the batches in a daemon thread, at most ``k``
  waiting in a queue (plus the one being built); the order is unchanged, and an exception in the
  thread is raised in the consumer after the batches before it. Arrow's kernels release the GIL,
  so building batches overlaps a training step (the Python parts of reading still take turns
  with it). Stopping early (``break``, ``close()``, an exception, the iterator dropped) stops the
  thread (it builds no further batch) and waits for it, so no thread outlives the iteration (when
  the dropped iterator is freed by a garbage collection in the thread itself, the thread cannot
  wait for itself: it ends as soon as that collection returns). The thread updates ``skipped`` as
  it reads, so during an iteration it may count rows of batches not yet consumed; after a
  complete pass it is exact. Each DDP rank reads in its own process.
* **Scoring.** ``TabularDataset(..., labels=False)`` does not read the label column (files
  without one read; where there is one, its cells are not checked, so an empty or unusual label
  does not make a row malformed) and gives NaN labels. Nor does it read a ``schema.user`` column
  that is not a sparse feature, and its batches have no ``group``: gAUC needs labels, and new
  traffic need not carry the column the training data grouped by (a user column that is a sparse
  feature is a model input, read as always). :meth:`TabularDataset.positioned_batches`
  gives every valid row once in file order with its file and its 0-based row index in it, so that
  scores can be joined back to rows even where malformed rows were skipped. :class:`RowEncoder`
  encodes rows held in memory (mappings ``{column: value}``) as a file's rows would be.
* :class:`MemoryDataset` gives the same interface over an in-memory :class:`~interformer.data.Batch`
  (the synthetic data). Being in memory, it shuffles with a full permutation seeded by
  ``(seed, epoch)`` and then shards the permuted order, as ``DistributedSampler`` does, so the rows
  a rank sees change from epoch to epoch.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import decimal
import gzip
import hashlib
import itertools
import json
import math
import operator
import os
import queue
import random
import re
import sys
import threading
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
import typing
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .data import Batch, _integer
from .metrics import NO_GROUP

__all__ = [
    "DataError",
    "DataWarning",
    "MemoryDataset",
    "RowEncoder",
    "Schema",
    "TabularDataset",
    "Vocabulary",
    "build_vocabularies",
    "group_key",
    "load_vocabularies",
    "save_vocabularies",
    "vocabularies_from_dict",
    "vocabularies_to_dict",
]

PathLike = Union[str, os.PathLike]
PathsArg = Union[PathLike, Sequence[PathLike]]

ON_ERROR = ("raise", "skip")  # what a malformed row may do (on_error; train's on_bad_rows)
_MAX_EXAMPLES = 10  # malformed-row messages kept in ``skipped_examples``
# the smallest magnitude float32 rounds to inf: a dense value below it is stored finite (3.4028235e38,
# how NumPy prints float32's largest value, parses above that value and rounds to it)
_FLOAT32_INF = 2.0**128 * (1 - 2.0**-25)
_PARQUET_READ_ROWS = 8192  # rows per Parquet record batch: small enough for long histories
_WHITESPACE = re.compile(r"\s")


class DataError(ValueError):
    """A file or a row that cannot be read; the message is ``"<path>:<where>: <reason>"``.

    ``where`` is the physical line number on which a CSV row starts (header = line 1), ``"row <i>"``
    (1-based) for a Parquet row, ``"schema"`` for a Parquet file whose columns do not fit, or
    ``"metadata"`` for a Parquet file whose footer cannot be read (not Parquet, truncated).
    """

    def __init__(self, path: PathLike, where: Union[int, str], reason: str) -> None:
        self.path = str(path)
        self.where = where
        self.reason = reason
        super().__init__(f"{self.path}:{where}: {reason}")

    def __reduce__(self):  # picklable across worker processes despite the 3-argument constructor
        return (type(self), (self.path, self.where, self.reason))


class DataWarning(UserWarning):
    """Malformed rows were skipped while building vocabularies (``on_error="skip"``)."""


# --------------------------------------------------------------------------------------------- schema


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_KIND = {int: "an integer", float: "a number", bool: "true or false"}


def coerce_setting(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` says, for the int, float and bool fields and the optional text
    fields (each optionally None).

    Settings files and ``KEY=VALUE`` text give strings for some numbers (PyYAML reads ``1e-3`` as a
    string: YAML 1.1 floats need a dot). Accepted: numbers or numeric strings for numbers (an int
    field takes ``"1e3"`` or ``2.0``, not ``2.5``; ``True`` is not a number), ``true/false/yes/no/
    on/off/1/0`` for booleans, ``"none"``/``"null"`` for an optional field, text ones included (so
    ``--device none`` and ``--compile-mode none`` unset a settings file's value, as ``--patience
    none`` does); text fields take text (a path, a ``torch.device`` as its name, None for their own
    checks to judge), not a number. Anything else raises ValueError naming the field. Other fields
    pass through unchanged."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) is typing.Union and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    unset = optional and isinstance(value, str) and value.strip().lower() in ("none", "null")
    if base is str:
        if unset or value is None:  # (None for a text field that takes none is refused by its own check)
            return None
        if isinstance(value, torch.device):
            return str(value)
        if not isinstance(value, (str, os.PathLike)):  # (a settings file's ``device: 5`` reached torch)
            raise ValueError(f"{name} must be text{' or None' if optional else ''}, got {value!r}")
        return value
    if base not in (int, float, bool):
        return value
    if value is None or unset:
        if optional:
            return None
        raise ValueError(f"{name} must be {_KIND[base]}, got None")
    bad = ValueError(f"{name} must be {_KIND[base]}{' or None' if optional else ''}, got {value!r}")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise bad
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad
    try:
        if base is float:
            return float(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(value)
        number = float(value)
    except ValueError:
        raise bad from None
    if not number.is_integer():
        raise bad
    return int(number)


def _number_hint(hint: Any) -> bool:
    """Whether ``hint`` is int or float, optionally None (the schema keys :meth:`Schema.from_dict`
    converts with :func:`coerce_setting`; the others are checked by their own code)."""
    args = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
    return any(a in (int, float) for a in args)


def read_settings_file(path: PathLike, what: str, as_yaml: bool, json_hint: str = ""):
    """The value a JSON or (``as_yaml``) YAML file holds, read as UTF-8 with or without a byte-order
    mark (as some Windows editors write). Every failure names the file: a missing one or a
    directory (as ``what``, e.g. "schema file"), bytes that are not UTF-8 and text that does not
    parse (ValueError, with the parser's reason and where; ``json_hint`` ends a JSON one). Why: these files are named on the
    command line, whose errors are one line (``python -m interformer``); a YAML error was a
    traceback naming ``"<unicode string>"``, a JSON one named no file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory, not a file")
    if not path.exists():  # (a pipe, as <(...) gives, is no file but is read)
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {_not_utf8(e, of='')}") from None
    if not as_yaml:
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}){json_hint}") from None
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - pyyaml is in the train/test extras
        raise ImportError(f"reading {path} needs PyYAML: pip install pyyaml (or write it as .json)") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f": line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{path}: not valid YAML ({reason}{where})") from None


@dataclass
class Schema:
    """Which column of the files plays which part (validated at construction).

    ``label``: the click column. ``dense``: float columns. ``sparse``: one categorical id per
    column. ``sequences``: behaviour channels, aligned by position, ``seq_sep``-joined ids (at least
    one: the model needs a channel). ``user``: the column whose raw value is the gAUC group key (it
    may also be a sparse column, or a column used for nothing else). ``max_seq_len``: T, the most
    recent events kept. ``seq_order``: how histories are written in the files, ``"oldest_first"`` or
    ``"newest_first"``. ``shared_vocab``: ``{column: column whose vocabulary it uses}``, e.g.
    ``{"item_history": "item_id"}``; the target must not itself be shared (no chains).
    ``min_count``: ids seen fewer times than this in training map to OOV. ``dense_fill``: the value
    of an empty dense cell, or None to treat an empty dense cell as malformed. ``csv_multiline``:
    whether a quoted CSV field may hold line breaks, so that one row spans several lines (module
    docstring, "Quoting"); off by default, so that a stray quote costs one row.
    """

    label: str
    dense: List[str] = field(default_factory=list)
    sparse: List[str] = field(default_factory=list)
    sequences: List[str] = field(default_factory=list)
    user: Optional[str] = None
    max_seq_len: int = 50
    seq_sep: str = "^"
    seq_order: str = "oldest_first"
    shared_vocab: Dict[str, str] = field(default_factory=dict)
    min_count: int = 1
    dense_fill: Optional[float] = 0.0
    csv_multiline: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label.strip():
            raise ValueError(f"schema key 'label': expected a column name, got {self.label!r}")
        for key in ("dense", "sparse", "sequences"):
            value = getattr(self, key)
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise ValueError(f"schema key {key!r}: expected a list of column names, got {value!r}")
            if not all(isinstance(c, str) and c.strip() for c in value):
                raise ValueError(f"schema key {key!r}: every entry must be a non-empty column name, got {value!r}")
            setattr(self, key, list(value))
        if not self.dense and not self.sparse:
            raise ValueError("schema keys 'dense' and 'sparse' are both empty: the model needs at least one "
                             "non-sequence feature")
        if not self.sequences:
            raise ValueError("schema key 'sequences': at least one behaviour channel is required (the model needs one)")
        seen: Dict[str, str] = {self.label: "label"}
        for key in ("dense", "sparse", "sequences"):
            for c in getattr(self, key):
                if c in seen:
                    raise ValueError(f"schema key {key!r}: column {c!r} is already used as {seen[c]!r}")
                seen[c] = key
        if self.user is not None:
            if not isinstance(self.user, str) or not self.user.strip():
                raise ValueError(f"schema key 'user': expected a column name or null, got {self.user!r}")
            if seen.get(self.user, "sparse") != "sparse":
                raise ValueError(f"schema key 'user': column {self.user!r} is the {seen[self.user]!r} column; "
                                 "the group key must be a sparse column or a column used for nothing else")
        if not _is_int(self.max_seq_len) or self.max_seq_len < 1:
            raise ValueError(f"schema key 'max_seq_len': expected an integer >= 1, got {self.max_seq_len!r}")
        if not isinstance(self.seq_sep, str) or not self.seq_sep or self.seq_sep in "\r\n":
            raise ValueError(f"schema key 'seq_sep': expected a non-empty separator, got {self.seq_sep!r}")
        if self.seq_order not in ("oldest_first", "newest_first"):
            raise ValueError("schema key 'seq_order': expected 'oldest_first' or 'newest_first', "
                             f"got {self.seq_order!r}")
        if not isinstance(self.shared_vocab, Mapping):
            raise ValueError("schema key 'shared_vocab': expected a mapping column -> column, "
                             f"got {self.shared_vocab!r}")
        self.shared_vocab = dict(self.shared_vocab)
        categorical = set(self.sparse) | set(self.sequences)
        for col, target in self.shared_vocab.items():
            if col not in categorical:
                raise ValueError(f"schema key 'shared_vocab': {col!r} is not a sparse or sequence column")
            if target not in categorical:
                raise ValueError(f"schema key 'shared_vocab': {col!r} -> {target!r}, and {target!r} is not a "
                                 "sparse or sequence column")
            if target == col:
                raise ValueError(f"schema key 'shared_vocab': {col!r} maps to itself")
            if target in self.shared_vocab:
                raise ValueError(f"schema key 'shared_vocab': {col!r} -> {target!r}, but {target!r} itself uses "
                                 f"{self.shared_vocab[target]!r}'s vocabulary; point {col!r} there directly")
        if not _is_int(self.min_count) or self.min_count < 1:
            raise ValueError(f"schema key 'min_count': expected an integer >= 1, got {self.min_count!r}")
        if self.dense_fill is not None:
            if isinstance(self.dense_fill, bool) or not isinstance(self.dense_fill, (int, float)) \
                    or not math.isfinite(self.dense_fill) or abs(self.dense_fill) >= _FLOAT32_INF:
                raise ValueError(f"schema key 'dense_fill': expected a finite number or null, got {self.dense_fill!r}")
            self.dense_fill = float(self.dense_fill)
        if not isinstance(self.csv_multiline, bool):
            raise ValueError(f"schema key 'csv_multiline': expected true or false, got {self.csv_multiline!r}")

    @classmethod
    def from_dict(cls, d: Mapping) -> "Schema":
        """Build from a mapping; unknown keys and a missing ``label`` raise ValueError naming the key."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a schema must be a mapping of keys to values, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known), key=str)
        if unknown:
            raise ValueError(f"unknown schema key(s) {unknown}; known keys: {known}")
        if "label" not in d:
            raise ValueError("schema key 'label' is required")
        # numbers as strings (PyYAML reads `dense_fill: 1e-3` as one) converted, as the README says of
        # settings files, whose other sections did (a review found them refused here); the
        # true/false keys stay strict, as they were
        hints = typing.get_type_hints(cls)
        return cls(**{k: coerce_setting(f"schema key '{k}'", v, hints[k]) if _number_hint(hints[k]) else v
                      for k, v in d.items()})

    @classmethod
    def from_file(cls, path: PathLike) -> "Schema":
        """Read a ``.json``, ``.yaml`` or ``.yml`` schema file (UTF-8, with or without a byte-order mark);
        errors name the file and the key (:func:`read_settings_file`)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".json", ".yaml", ".yml"):
            raise ValueError(f"{path}: a schema file must end in .json, .yaml or .yml")
        d = read_settings_file(path, "schema file", as_yaml=suffix != ".json")
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v
        return out

    def columns(self, labels: bool = True) -> List[str]:
        """Every column the files must have: label, dense, sparse, sequences, then user if extra.
        ``labels=False`` (scoring): the model's input columns only (dense, sparse, sequences), so a
        file needs neither the label nor a user column that serves only the gAUC groups: without
        labels there is no metric to group. (A user column that is also a sparse feature is
        an input, and stays required.)"""
        cols = [*([self.label] if labels else []), *self.dense, *self.sparse, *self.sequences]
        if labels and self.user is not None and self.user not in cols:
            cols.append(self.user)
        return cols

    def vocab_column(self, column: str) -> str:
        """The column whose vocabulary ``column`` uses (itself unless shared)."""
        return self.shared_vocab.get(column, column)


# ----------------------------------------------------------------------------------------- vocabulary


class Vocabulary:
    """Raw id string -> integer id: 0 = missing/padding, 1 = OOV, known ids 2, 3, ...

    ``tokens`` lists the known raw ids in id order (``tokens[j]`` has id ``j + 2``); ``counts`` are
    their training counts when known. ``len()`` is the size to give the embedding table.
    """

    MISSING = 0
    OOV = 1

    def __init__(self, tokens: Iterable[str] = (), counts: Optional[Iterable[int]] = None) -> None:
        self.tokens: List[str] = [str(t) for t in tokens]
        self.counts: Optional[List[int]] = None if counts is None else [int(c) for c in counts]
        if self.counts is not None and len(self.counts) != len(self.tokens):
            raise ValueError(f"Vocabulary: {len(self.tokens)} tokens but {len(self.counts)} counts")
        self._index: Dict[str, int] = {t: i + 2 for i, t in enumerate(self.tokens)}
        if len(self._index) != len(self.tokens):
            raise ValueError("Vocabulary: duplicate tokens")
        if "" in self._index:
            raise ValueError("Vocabulary: the empty string is the missing id 0, not a token")

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], min_count: int = 1) -> "Vocabulary":
        """Keep the ids counted at least ``min_count`` times, by descending count, then by string."""
        kept = sorted(((t, c) for t, c in counts.items() if c >= min_count and t != ""), key=lambda tc: (-tc[1], tc[0]))
        return cls([t for t, _ in kept], [c for _, c in kept])

    def __len__(self) -> int:
        return len(self.tokens) + 2

    def lookup(self, raw) -> int:
        """Id of one raw value: 0 for an empty cell (or None), 1 if unknown."""
        if raw is None:
            return self.MISSING
        s = (raw if isinstance(raw, str) else _cell_str(_plain(raw))).strip()  # NumPy scalars as RowEncoder reads them
        return self._index.get(s, self.OOV) if s else self.MISSING

    def to_dict(self) -> dict:
        d = {"tokens": list(self.tokens)}
        if self.counts is not None:
            d["counts"] = list(self.counts)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Vocabulary":
        if not isinstance(d, Mapping) or "tokens" not in d:
            raise ValueError("a vocabulary dict needs a 'tokens' list")
        return cls(d["tokens"], d.get("counts"))

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)})"


# -------------------------------------------------------------------------------------------- reading


def _as_paths(paths: PathsArg) -> List[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = [Path(p) for p in paths]
    if not out:
        raise ValueError("no data files given")
    for p in out:
        if p.is_dir():
            raise IsADirectoryError(f"{p} is a directory; give the data files in it (.csv, .csv.gz, .parquet, "
                                    ".pq), not the directory")
        if not p.exists():
            raise FileNotFoundError(f"data file not found: {p}")
        if not p.is_file():  # a pipe (``<(zcat ...)``), a device: it is there, but was reported missing
            raise ValueError(f"{p} is not a regular file (a pipe?): the data files are read several times "
                             "(vocabularies, row count, every epoch), so give a file")
    return out


def _file_format(path: Path, fmt: Optional[str]) -> str:
    if fmt is not None:
        if fmt not in ("csv", "parquet"):
            raise ValueError(f"fmt must be 'csv', 'parquet' or None (infer from the suffix), got {fmt!r}")
        return fmt
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise ValueError(f"cannot tell the format of {path} from its suffix (.csv, .csv.gz, .parquet, .pq); "
                     "pass fmt='csv' or fmt='parquet'")


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _missing_marker(v) -> bool:
    """Whether ``v`` is pandas' missing value (``pd.NA``, as ``df.to_dict("records")`` gives a
    nullable integer or string column's gaps, or ``pd.NaT``), told by its type's name and module so
    that pandas need not be imported."""
    kind = type(v)
    return kind.__name__ in ("NAType", "NaTType") and kind.__module__.split(".")[0] == "pandas"


def _cell_str(v) -> str:
    """A Parquet scalar as the string a CSV file would hold (see the module docstring). pandas'
    ``pd.NA`` and ``pd.NaT`` are missing, as None is (written as ``"<NA>"``, ``pd.NA`` was an id,
    the unknown one)."""
    if v is None or _missing_marker(v):
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:  # NaN: missing, as a CSV writer (pandas' to_csv) writes it
            return ""
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, bytes):
        return v.decode("utf-8")
    return str(v)


def _parquet_cell(v):
    if isinstance(v, (list, tuple)):
        return [_cell_str(x) for x in v]
    return _cell_str(v)


def _raise_csv_field_limit() -> None:
    limit = sys.maxsize
    while limit > csv.field_size_limit():
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # C long smaller than sys.maxsize on some platforms
            limit //= 2


def _header_columns(path: Path, where, header: List[str], columns: List[str]) -> List[int]:
    counts = Counter(header)
    missing = [c for c in columns if c not in counts]
    if missing:
        raise DataError(path, where, f"missing required column(s) {missing}; the file has {header}")
    dup = [c for c in columns if counts[c] > 1]
    if dup:
        raise DataError(path, where, f"required column(s) {dup} appear more than once")
    return [header.index(c) for c in columns]


_RawRow = Tuple[Union[int, str], Optional[Sequence], Optional[str]]  # (where, cells, problem)


def _open_csv(path: Path):
    # errors="surrogateescape": an undecodable byte becomes a lone surrogate, which _next_line finds
    # on its own physical line (a decode error would surface wherever the decoder's 8 kB read ends)
    _raise_csv_field_limit()
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="")


_SURROGATE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8
_READ_ERRORS = (OSError, EOFError, zlib.error)  # a corrupt or truncated (gzip) file, a failing disk


def _unreadable(path: Path, line: int, error: BaseException) -> DataError:
    e = DataError(path, line, f"unreadable file ({type(error).__name__}: {error})")
    e.__suppress_context__ = True  # as ``raise ... from None``
    return e


def _undecodable(path: Path, line: int, text: str, at: int) -> DataError:
    byte = ord(text[at]) - 0xDC00
    return DataError(path, line, f"not valid UTF-8 (byte 0x{byte:02x} at character {at + 1} of the line)")


def _next_line(path: Path, lines: Iterator[str], line_no: int) -> str:
    """The next physical line (line ``line_no + 1``), checked; StopIteration at the end."""
    try:
        line = next(lines)
    except _READ_ERRORS as e:
        raise _unreadable(path, line_no + 1, e) from None
    m = _SURROGATE.search(line)
    if m is not None:
        raise _undecodable(path, line_no + 1, line, m.start())
    return line


class _Spans(Exception):
    """The csv module asked for a second physical line for one record."""


class _LineFeed:
    """The physical lines of a CSV file, as the csv module's input, counted (``line_no``: the lines
    given so far) and checked (:func:`_next_line`). With ``one_line``, a record may not go on past
    its first line: when the reader asks for another line before the record has ended (a quote left
    open), ``next`` raises :class:`_Spans` instead, without reading that line, so reading goes on at
    the next line. ``start()`` is called before each record."""

    def __init__(self, path: Path, lines: Iterable[str], line0: int = 0, one_line: bool = True) -> None:
        self.path, self.lines, self.line_no, self.one_line = path, iter(lines), line0, one_line
        self.given = False

    def start(self) -> int:
        """Begin a record; its first line's number."""
        self.given = False
        return self.line_no + 1

    def __iter__(self) -> "_LineFeed":
        return self

    def __next__(self) -> str:
        if self.given and self.one_line:
            raise _Spans
        line = _next_line(self.path, self.lines, self.line_no)
        self.line_no += 1
        self.given = True
        return line


def _csv_reader(feed: _LineFeed):
    # strict: a quote that is not followed by a separator, or left open at the end of the file, is
    # an error, not silently part of the field
    return csv.reader(feed, strict=True)


def _csv_header(path: Path, reader, feed: _LineFeed, columns: List[str]) -> Tuple[int, List[int]]:
    """Read the header row (the first line that is not blank): the number of fields and the
    positions of ``columns``."""
    while True:
        where = feed.start()
        try:
            cells = next(reader)
        except StopIteration:
            raise DataError(path, where, "empty file: a header row is required") from None
        except _Spans:
            raise DataError(path, where, "unreadable CSV header (a quote is not closed on its line)") from None
        except csv.Error as e:
            raise DataError(path, where, f"unreadable CSV header ({e})") from None
        if cells:
            break
    header = [h.strip() for h in cells]
    return len(header), _header_columns(path, where, header, columns)


def _csv_records(path: Path, reader, feed: _LineFeed, width: int, positions: List[int]) -> Iterator[_RawRow]:
    """The rows ``reader`` parses from ``feed``; each row's ``where`` is the line it starts on."""
    # a tuple (the schema has at least 3 columns), not a list: a tuple of strings drops out of the
    # cyclic garbage collector's view, so chunks of held rows do not trigger full collections
    pick = operator.itemgetter(*positions)
    while True:
        start = feed.start()
        try:
            cells = next(reader)
        except StopIteration:
            return
        except _Spans:
            yield start, None, (f"a quoted field runs past the end of line {start} (a stray quote? a field may "
                                "not span lines unless the schema sets csv_multiline)")
            continue
        except csv.Error as e:
            if feed.one_line:  # the error is confined to this line: reading goes on at the next one
                yield start, None, f"bad CSV quoting ({e})"
                continue
            if str(e) == "unexpected end of data":
                raise DataError(path, start, f"the quoted field of the row that starts here is still open at the "
                                             f"end of the file (line {feed.line_no})") from None
            raise DataError(path, start, f"unreadable CSV ({e})") from None
        if not cells:
            continue  # a blank line is not a row
        if len(cells) != width:
            yield start, None, f"expected {width} fields, got {len(cells)}"
        else:
            yield start, pick(cells), None


def _csv_rows(path: Path, columns: List[str], multiline: bool) -> Iterator[_RawRow]:
    with _open_csv(path) as fh:
        feed = _LineFeed(path, fh, one_line=not multiline)
        reader = _csv_reader(feed)
        width, positions = _csv_header(path, reader, feed, columns)
        yield from _csv_records(path, reader, feed, width, positions)


def _import_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading Parquet files needs pyarrow: pip install pyarrow "
                          "(or pip install 'interformer-kernels[train]')") from e
    return pq


def _unreadable_parquet(path: Path, where: str, error: BaseException) -> DataError:
    e = DataError(path, where, f"unreadable Parquet file ({type(error).__name__}: {' '.join(str(error).split())})")
    e.__suppress_context__ = True  # as ``raise ... from None``
    return e


def _parquet_batches(path: Path, columns: List[str], list_columns: Sequence[str]) -> Iterator:
    """Record batches of a Parquet file, its schema checked first; only ``list_columns`` (the
    sequence channels) may be nested types.

    A file pyarrow cannot read (not Parquet, truncated, corrupt; pyarrow raises ``ArrowInvalid``,
    ``OSError``, ...) raises :class:`DataError` ``"<path>:metadata: unreadable Parquet file (...)"``
    when its footer (schema and row groups) cannot be read, or ``"<path>:row <i>: ..."`` for a
    record batch that cannot be decoded, ``i`` being that batch's first row (the rows before it
    have been yielded)."""
    pq = _import_parquet()
    import pyarrow as pa
    import pyarrow.types as pat

    errors = (pa.ArrowException, OSError)
    try:
        pf = pq.ParquetFile(path)
    except errors as e:
        raise _unreadable_parquet(path, "metadata", e) from None
    try:
        try:
            arrow = pf.schema_arrow
        except errors as e:
            raise _unreadable_parquet(path, "metadata", e) from None
        _header_columns(path, "schema", list(arrow.names), columns)
        for c in columns:
            t = arrow.field(c).type
            if not pat.is_nested(t):
                continue
            if c not in list_columns:
                raise DataError(path, "schema", f"column {c!r} has type {t}; only sequence columns may hold lists")
            # a list of lists (or structs, maps) would reach the vocabulary as str(list) tokens
            if not (pat.is_list(t) or pat.is_large_list(t)) or pat.is_nested(t.value_type):
                raise DataError(path, "schema", f"sequence column {c!r} has type {t}; a sequence column holds "
                                                "seq_sep-joined strings or a list (or large_list) of scalar ids")
        batches, row = None, 0
        while True:
            try:
                if batches is None:  # pyarrow may already read when it starts the iterator
                    batches = pf.iter_batches(batch_size=_PARQUET_READ_ROWS, columns=columns)
                rb = next(batches)
            except StopIteration:
                return
            except errors as e:
                raise _unreadable_parquet(path, f"row {row + 1}", e) from None
            yield rb
            row += rb.num_rows
    finally:
        pf.close()


def _parquet_chunks(path: Path, columns: List[str], list_columns: Sequence[str]) -> Iterator["_ParquetChunk"]:
    """The rows of :func:`_parquet_rows` in chunks, one record batch each (the vectorised path)."""
    row = 0
    for rb in _parquet_batches(path, columns, list_columns):
        yield _ParquetChunk(path, rb, columns, row)
        row += rb.num_rows


def _not_utf8(e: UnicodeDecodeError, of: str = " of the value") -> str:
    """Why bytes could not be read as text: a value (a Parquet cell, a :class:`RowEncoder` value)
    or, with ``of=""``, a whole file (:func:`read_settings_file`)."""
    return f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at byte {e.start + 1}{of})"


def _parquet_row_cells(path: Path, where: str, columns: List[str], values: Sequence) -> list:
    """One Parquet row's values as :func:`_parquet_cell` s; a binary value that is not UTF-8 raises
    :class:`DataError` naming the file, the row and the column (as undecodable CSV bytes do)."""
    try:
        return [_parquet_cell(v) for v in values]
    except UnicodeDecodeError:
        pass
    for name, v in zip(columns, values):
        for j, x in enumerate(v if isinstance(v, (list, tuple)) else [v]):
            try:
                _cell_str(x)
            except UnicodeDecodeError as e:
                what = f"event {j + 1} of column {name!r}" if isinstance(v, (list, tuple)) else f"column {name!r}"
                raise DataError(path, where, f"{what}: {_not_utf8(e)}") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _parquet_batch_rows(path: Path, rb, columns: List[str], row0: int) -> Iterator[_RawRow]:
    """The rows of one record batch whose first row is row ``row0 + 1`` of its file."""
    names = rb.schema.names
    cols = [rb.column(names.index(c)).to_pylist() for c in columns]
    for row, cells in enumerate(zip(*cols), row0 + 1):
        where = f"row {row}"
        yield where, _parquet_row_cells(path, where, columns, cells), None


def _parquet_rows(path: Path, columns: List[str], list_columns: Sequence[str]) -> Iterator[_RawRow]:
    """Rows of a Parquet file (:func:`_parquet_batches` says which types it may hold)."""
    row = 0
    for rb in _parquet_batches(path, columns, list_columns):
        yield from _parquet_batch_rows(path, rb, columns, row)
        row += rb.num_rows


class _Malformed(Exception):
    pass


# A parsed, validated row: (label, dense floats, sparse raw strings, histories as lists of raw
# strings, oldest first and truncated, user raw string or None).
_Record = Tuple[float, List[float], List[str], List[List[str]], Optional[str]]


class _Parser:
    """Validates one row's cells (in ``columns`` order) into a :data:`_Record`. ``labels=False``:
    neither the label nor the gAUC group is read (:meth:`Schema.columns`); every record's label is
    NaN and its user None, and ``groups`` is False (batches have no ``group``)."""

    def __init__(self, schema: Schema, labels: bool = True) -> None:
        self.schema, self.labels = schema, labels
        #: the columns a row's cells hold: ``schema.columns(labels)``
        self.columns = cols = schema.columns(labels)
        self.nd, self.ns, self.nk = len(schema.dense), len(schema.sparse), len(schema.sequences)
        self.d0 = 1 if labels else 0
        self.s0 = self.d0 + self.nd
        self.q0 = self.s0 + self.ns
        self.user_pos = cols.index(schema.user) if labels and schema.user is not None else None
        #: whether records carry a user and batches a ``group`` (gAUC): only where labels are read
        self.groups = self.user_pos is not None
        self.T = schema.max_seq_len
        self.reverse = schema.seq_order == "newest_first"

    def label(self, cell: str) -> float:
        """The label of one cell (also called once per distinct label string by the vectorised path)."""
        raw = cell.strip()
        try:
            label = float(raw)
        except ValueError:
            label = -1.0
        if label != 0.0 and label != 1.0:
            raise _Malformed(f"column {self.schema.label!r}: label must be 0 or 1, got {raw!r}")
        return label

    def parse(self, cells: list) -> _Record:
        s = self.schema
        label = self.label(cells[0]) if self.labels else math.nan
        dense = []
        for name, cell in zip(s.dense, cells[self.d0:self.s0]):
            raw = cell.strip()
            if not raw:
                if s.dense_fill is None:
                    raise _Malformed(f"column {name!r}: empty dense value (schema dense_fill is null)")
                dense.append(s.dense_fill)
                continue
            try:
                v = float(raw)
            except ValueError:
                raise _Malformed(f"column {name!r}: not a number: {raw!r}") from None
            if not math.isfinite(v) or abs(v) >= _FLOAT32_INF:
                raise _Malformed(f"column {name!r}: dense value must be finite (in float32 range), got {raw!r}")
            dense.append(v)
        sparse = [c.strip() for c in cells[self.s0:self.q0]]
        hists = []
        for name, cell in zip(s.sequences, cells[self.q0:self.q0 + self.nk]):
            if isinstance(cell, list):
                events = [t.strip() for t in cell]
            elif cell and _WHITESPACE.search(cell):  # rare: strip the cell, then its events
                stripped = cell.strip()  # first, so that a separator that is whitespace splits no edge
                events = [t.strip() for t in stripped.split(s.seq_sep)] if stripped else []
            else:
                events = cell.split(s.seq_sep) if cell else []
            if "" in events:
                raise _Malformed(f"column {name!r}: empty event in the history {cell!r}")
            hists.append(events)
        n = len(hists[0])
        if any(len(h) != n for h in hists):
            counts = {name: len(h) for name, h in zip(s.sequences, hists)}
            raise _Malformed(f"sequence columns hold different numbers of events: {counts}")
        if self.reverse:
            hists = [h[: self.T][::-1] for h in hists]
        elif n > self.T:
            hists = [h[n - self.T:] for h in hists]
        user = None if self.user_pos is None else cells[self.user_pos].strip()
        return label, dense, sparse, hists, user


class _Source:
    """The files of one split, read row by row as validated records (``labels``: :class:`_Parser`)."""

    def __init__(self, paths: PathsArg, schema: Schema, fmt: Optional[str], labels: bool = True) -> None:
        self.schema = schema
        self.files = [(p, _file_format(p, fmt)) for p in _as_paths(paths)]
        self.parser = _Parser(schema, labels)
        self.columns = self.parser.columns
        self._columnar: Optional[_Columnar] = None

    def columnar(self) -> Optional["_Columnar"]:
        """The vectorised checks, or None without pyarrow (the per-row path is then used)."""
        if self._columnar is None and _pyarrow() is not None:
            self._columnar = _Columnar(self.schema, self.parser)
        return self._columnar

    def chunks(self, order: Optional[Sequence[int]] = None) -> Iterator:
        """The rows of :meth:`records`, before parsing, in chunks (for the vectorised path); each
        chunk's ``file`` is its file's index in ``files``."""
        for f in range(len(self.files)) if order is None else order:
            path, fmt = self.files[f]
            if fmt == "csv":
                chunks = _csv_chunks(path, self.columns, self.schema.csv_multiline)
            else:
                chunks = _parquet_chunks(path, self.columns, self.schema.sequences)
            for chunk in chunks:
                chunk.file = f
                yield chunk

    def records(self, on_error: str, on_skip: Callable[[str], None], order: Optional[Sequence[int]] = None,
                positions: bool = False) -> Iterator:
        """The valid rows' records, in file order (``order``: the files' indices, in the order to
        read them); with ``positions``, ``(file, row, record)``: the file's index in ``files`` and
        the row's 0-based index among the file's rows (:meth:`TabularDataset.positioned_batches`)."""
        for f in range(len(self.files)) if order is None else order:
            path, fmt = self.files[f]
            rows = _csv_rows(path, self.columns, self.schema.csv_multiline) if fmt == "csv" else _parquet_rows(path, self.columns, self.schema.sequences)
            # closing: a DataError raised here keeps this frame (and ``rows``) alive in its
            # traceback; the file must not stay open for as long as the caller keeps the error
            with contextlib.closing(rows):
                for i, (where, cells, problem) in enumerate(rows):
                    if problem is None:
                        try:
                            record = self.parser.parse(cells)
                        except _Malformed as e:
                            problem = str(e)
                        else:
                            yield (f, i, record) if positions else record
                            continue
                    if on_error == "raise":
                        raise DataError(path, where, problem)
                    on_skip(f"{path}:{where}: {problem}")


# --------------------------------------------------------------------------------- vectorised reading
#
# The vectorised path (module docstring) reads the same rows as :meth:`_Source.records`, with the
# same line numbers, but checks and converts them a chunk at a time, column by column, with
# pyarrow.compute and numpy. A row whose cells the column checks cannot vouch for (a failed check,
# an unusual number, ...) is decided by the per-row :class:`_Parser`, which stays the reference and
# writes every error message; a chunk in which anything unexpected happens is decided by it row by
# row. The column checks only ever accept rows that the parser would turn into the same values,
# which the tests compare bit for bit.

_CHUNK_ROWS = 8192  # CSV rows checked together (a Parquet chunk is one record batch of the same size)
# Strings that Python's float() and Arrow's string->float64 cast both read, as the same double
# (both round correctly); anything else (underscores, "inf", "nan", non-ASCII digits, ...) goes to
# the parser.
_NUMBER_RE = r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"
_NUMBER_MAX_LEN = 64
# The characters str.strip() removes: those for which str.isspace() holds (a test checks every
# code point), so that pyarrow's utf8_trim strips exactly as str.strip() does.
_PY_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                  "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_GROUP_CACHE = 1 << 18  # group keys remembered across chunks (the cache is emptied when full)
_TALLY_MERGE = 1 << 20  # distinct strings a vocabulary count holds unmerged (beyond twice its merged size)


def _pyarrow():
    """``(pyarrow, pyarrow.compute)``, or None when pyarrow is not installed."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
    except ImportError:
        return None
    return pa, pc


def _np(arr) -> np.ndarray:
    """An Arrow array as numpy (float nulls become NaN); the result may be read-only."""
    return arr.to_numpy(zero_copy_only=False)


class _CsvChunk:
    """Consecutive rows of one CSV file as :func:`_csv_rows` yields them, kept as columns of
    ``wheres``, ``raw`` cells (None for a row with the wrong number of fields) and ``bad``
    ``{row: problem}``; ``error`` (an exception the reader raised after the last of these rows) is
    raised once those rows are out."""

    def __init__(self, path: Path, wheres: list, raw: list, bad: Dict[int, str],
                 error: Optional[BaseException]) -> None:
        self.path, self.wheres, self.raw, self.bad, self.error, self.n = path, wheres, raw, bad, error, len(raw)

    def where(self, i: int):
        return self.wheres[i]

    def cells(self, i: int):
        return self.raw[i]

    def rows(self) -> Iterator[_RawRow]:
        for i, (where, cells) in enumerate(zip(self.wheres, self.raw)):
            yield where, cells, self.bad.get(i)

    def problems(self) -> Dict[int, str]:
        return self.bad

    def arrays(self, columnar: "_Columnar") -> list:
        pa, _ = _pyarrow()
        blank = ("",) * len(columnar.columns)  # the cells of a row with the wrong number of fields
        rows = [blank if cells is None else cells for cells in self.raw] if self.bad else self.raw
        return [pa.array(col, pa.string()) for col in zip(*rows)]


class _CsvBlock:
    """Consecutive lines of a CSV file that hold no quote and no NUL character, split by Arrow.

    On such a line the csv module reads exactly ``line.split(",")`` after the line's terminator
    (``\\n``, ``\\r\\n`` or ``\\r``: a text file opened with ``newline=""`` ends a line at the
    first of them), and a line with nothing else is blank; so these lines need no per-row parsing.
    ``line0``: the lines before the block. ``error``: raised once the block's rows are out.
    """

    def __init__(self, path: Path, line0: int, lines: List[str], width: int, positions: List[int],
                 error: Optional[BaseException]) -> None:
        pa, pc = _pyarrow()
        self.path, self.error = path, error
        text = pc.utf8_rtrim(pa.array(lines, pa.string()), characters="\r\n")
        keep = np.flatnonzero(_np(pc.binary_length(text)) > 0)  # a blank line is not a row
        self.n = len(keep)
        self.wheres = line0 + 1 + keep
        fields = pc.split_pattern(text.take(pa.array(keep, pa.int64())), pattern=",")
        count = _np(pc.list_value_length(fields)).astype(np.int64)
        flat = pc.list_flatten(fields)
        first = np.cumsum(count) - count
        wrong = count != width
        self.bad = {i: f"expected {width} fields, got {count[i]}" for i in np.flatnonzero(wrong).tolist()}
        self.cols = [pc.fill_null(flat.take(pa.array(np.where(wrong, 0, first + p), mask=wrong)), "")
                     for p in positions]

    def where(self, i: int) -> int:
        return int(self.wheres[i])

    def cells(self, i: int) -> tuple:
        return tuple(col[i].as_py() for col in self.cols)

    def rows(self) -> Iterator[_RawRow]:
        for i, cells in enumerate(zip(*(col.to_pylist() for col in self.cols))):
            yield int(self.wheres[i]), None if i in self.bad else cells, self.bad.get(i)

    def problems(self) -> Dict[int, str]:
        return self.bad

    def arrays(self, columnar: "_Columnar") -> list:
        return self.cols


def _raising(error: BaseException) -> Iterator[str]:
    raise error
    yield ""  # pragma: no cover - makes this a generator


def _csv_chunks(path: Path, columns: List[str], multiline: bool) -> Iterator:
    """The rows of :func:`_csv_rows` in chunks: :class:`_CsvBlock` s while the lines are simple,
    then, from the first line with a quote or a NUL on, :class:`_CsvChunk` s of the csv module's rows.

    Lines are taken from the file one ``next`` at a time, as the csv module takes them, so that a
    read error (a corrupt gzip stream) happens at the same line as on the per-row path; a line with
    undecodable bytes ends the block before it, and raises once the rows before it are out.
    """
    size = _CHUNK_ROWS
    with _open_csv(path) as fh:
        feed = _LineFeed(path, fh, one_line=not multiline)
        reader = _csv_reader(feed)
        width, positions = _csv_header(path, reader, feed, columns)
        line0 = feed.line_no
        while True:
            lines: List[str] = []
            error: Optional[BaseException] = None
            try:
                for line in fh:
                    lines.append(line)
                    if len(lines) == size:
                        break
            except _READ_ERRORS as e:  # raised after the rows before it, as the per-row path does
                error = _unreadable(path, line0 + len(lines) + 1, e)
            j = len(lines)
            text = "".join(lines)
            if '"' in text or "\0" in text:
                j = next(k for k, line in enumerate(lines) if '"' in line or "\0" in line)
            if _SURROGATE.search(text) is not None:
                k, m = next((k, m) for k, m in enumerate(map(_SURROGATE.search, lines)) if m is not None)
                if k < j:  # undecodable bytes before any quote: the block ends there
                    error = _undecodable(path, line0 + k + 1, lines[k], m.start())
                    del lines[k:]
                    j = k
            if j:
                yield _CsvBlock(path, line0, lines[:j], width, positions, error if j == len(lines) else None)
            elif error is not None and j == len(lines):
                raise error
            line0 += j
            if j < len(lines):  # the csv module takes over at line j (and meets the error, if any, after it)
                more = fh if error is None else _raising(error)
                feed = _LineFeed(path, itertools.chain(lines[j:], more), line0, one_line=not multiline)
                reader = _csv_reader(feed)
                yield from _chunked(path, _csv_records(path, reader, feed, width, positions))
                return
            if error is not None or len(lines) < size:
                return


def _chunked(path: Path, rows: Iterator[_RawRow]) -> Iterator[_CsvChunk]:
    size = _CHUNK_ROWS
    while True:
        wheres: list = []
        raw: list = []
        bad: Dict[int, str] = {}
        error = None
        try:
            for where, cells, problem in rows:
                if problem is not None:
                    bad[len(raw)] = problem
                wheres.append(where)
                raw.append(cells)
                if len(raw) == size:
                    break
        except Exception as e:  # noqa: BLE001 - re-raised by the consumer after the rows before it
            error = e
        if raw or error is not None:
            yield _CsvChunk(path, wheres, raw, bad, error)
        if error is not None or len(raw) < size:
            return


class _Floats:
    """A Parquet float column read as dense values without a detour through strings."""

    def __init__(self, values: np.ndarray, valid: np.ndarray) -> None:
        self.values, self.valid = values, valid


class _Lists:
    """A Parquet list column: every event of the chunk as strings, and each row's event count."""

    def __init__(self, values, counts: np.ndarray) -> None:
        self.values, self.counts = values, counts


def _arrow_strings(arr):
    """Each value of an Arrow array as :func:`_cell_str` writes it, a null as ``""``.

    Strings, integers, booleans and integral float32/float64 values (below 2**53) are converted by
    Arrow; other floats and every other type by :func:`_cell_str` itself, value by value.
    """
    pa, pc = _pyarrow()
    import pyarrow.types as pat

    if pat.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t = arr.type
    is_view = getattr(pat, "is_string_view", lambda _: False)
    if pat.is_string(t) or pat.is_large_string(t) or is_view(t) or pat.is_integer(t):
        out = pc.cast(arr, pa.string())
    elif pat.is_boolean(t):
        out = pc.if_else(arr, "1", "0")
    elif pat.is_float32(t) or pat.is_float64(t):
        v = _np(pc.cast(arr, pa.float64()))
        valid = _np(arr.is_valid()) & ~np.isnan(v)  # a NaN is missing, as a null is (_cell_str)
        with np.errstate(invalid="ignore"):
            integral = valid & np.isfinite(v) & (np.trunc(v) == v) & (np.abs(v) < 2.0 ** 53)
        out = pc.cast(pa.array(np.where(integral, v, 0.0).astype(np.int64), mask=~integral), pa.string())
        other = np.flatnonzero(valid & ~integral).tolist()
        if other:
            strs = out.to_pylist()
            for i in other:
                strs[i] = _cell_str(float(v[i]))
            out = pa.array(strs, pa.string())
    else:
        out = pa.array([_cell_str(v) for v in arr.to_pylist()], pa.string())
    return pc.fill_null(out, "")


class _ParquetChunk:
    """One record batch of a Parquet file, its first row being row ``row0 + 1``."""

    error = None

    def __init__(self, path: Path, batch, columns: List[str], row0: int) -> None:
        self.path, self.batch, self.columns, self.row0, self.n = path, batch, columns, row0, batch.num_rows
        names = batch.schema.names
        self.positions = [names.index(c) for c in columns]

    def where(self, i: int) -> str:
        return f"row {self.row0 + i + 1}"

    def cells(self, i: int) -> list:
        return _parquet_row_cells(self.path, self.where(i), self.columns,
                                  [self.batch.column(j)[i].as_py() for j in self.positions])

    def rows(self) -> Iterator[_RawRow]:
        return _parquet_batch_rows(self.path, self.batch, self.columns, self.row0)

    def problems(self) -> Dict[int, str]:
        return {}

    def arrays(self, columnar: "_Columnar") -> list:
        pa, pc = _pyarrow()
        import pyarrow.types as pat

        out = []
        for name, j in zip(self.columns, self.positions):
            arr = self.batch.column(j)
            t = arr.type
            if name in columnar.list_columns and (pat.is_list(t) or pat.is_large_list(t)):
                counts = _np(pc.fill_null(pc.list_value_length(arr), 0)).astype(np.int64)
                out.append(_Lists(_arrow_strings(pc.list_flatten(arr)), counts))
            elif name in columnar.dense_columns and (pat.is_float32(t) or pat.is_float64(t)):
                out.append(_Floats(_np(pc.cast(arr, pa.float64())), _np(arr.is_valid())))
            else:
                out.append(_arrow_strings(arr))
        return out


class _Checked:
    """What the vectorised checks made of one chunk of ``n`` rows.

    ``ok``: the valid rows. ``stops``: ``(row, reason)`` for every other row in order, where the
    reason is a malformed-row message or an exception to raise there (after which no row of the
    chunk is ok). ``records``: the parser's records of the valid rows it decided. ``fast``: the
    valid rows the column checks accepted, described by the other fields (meaningless elsewhere):
    ``label`` and ``dense`` (float64), ``sparse`` and ``user`` (stripped strings), ``lengths``
    (events kept) and, per channel, ``kept`` (the kept events, in ``seq`` order, of row ``rows[e]``
    at position ``pos[e]``).
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.ok = np.zeros(n, dtype=bool)
        self.fast = np.zeros(n, dtype=bool)
        self.stops: List[Tuple[int, Union[str, BaseException]]] = []
        self.records: Dict[int, _Record] = {}


class _Columnar:
    """The column checks of the vectorised path (see the comment above :data:`_CHUNK_ROWS`)."""

    def __init__(self, schema: Schema, parser: _Parser) -> None:
        self.schema, self.parser = schema, parser
        self.columns = parser.columns
        self.list_columns = set(schema.sequences)
        self.dense_columns = set(schema.dense)
        self.chunk_fallbacks = 0  # chunks the parser decided row by row (tests expect 0 on ordinary files)

    def check(self, chunk) -> _Checked:
        if chunk.n == 0:
            return _Checked(0)
        try:
            return self._check_columns(chunk)
        except Exception:  # noqa: BLE001 - anything unexpected: the reference decides every row
            return self.check_rows(chunk)

    def check_rows(self, chunk) -> _Checked:
        self.chunk_fallbacks += 1
        out = _Checked(chunk.n)
        done = 0
        try:
            for _, cells, problem in chunk.rows():
                if problem is None:
                    try:
                        out.records[done] = self.parser.parse(cells)
                    except _Malformed as e:
                        problem = str(e)
                    else:
                        out.ok[done] = True
                if problem is not None:
                    out.stops.append((done, problem))
                done += 1
        except Exception as e:  # noqa: BLE001 - raised where the per-row path raises it
            out.stops.append((done, e))
        return out

    def _check_columns(self, chunk) -> _Checked:
        pa, pc = _pyarrow()
        s, p, n = self.schema, self.parser, chunk.n
        cols = chunk.arrays(self)
        out = _Checked(n)
        need = np.zeros(n, dtype=bool)  # rows the parser must decide

        # label: the parser's own check, once per distinct string
        if p.labels:
            distinct = pc.unique(cols[0])
            values, good = [], []
            for u in distinct.to_pylist():
                try:
                    values.append(p.label(u))
                    good.append(True)
                except _Malformed:
                    values.append(0.0)
                    good.append(False)
            at = _np(pc.index_in(cols[0], value_set=distinct))
            out.label = np.array(values, dtype=np.float64)[at]
            need |= ~np.array(good, dtype=bool)[at]
        else:
            out.label = np.full(n, np.nan)

        out.dense = np.zeros((n, p.nd), dtype=np.float64)
        null = pa.scalar(None, pa.string())
        for j in range(p.nd):
            col = cols[p.d0 + j]
            with np.errstate(invalid="ignore"):
                if isinstance(col, _Floats):  # _cell_str then float() gives the value itself, -0.0 as 0.0
                    empty = ~col.valid
                    v = col.values + 0.0
                    ok = col.valid & np.isfinite(v) & (np.abs(v) < _FLOAT32_INF)
                else:
                    t = pc.utf8_trim(col, _PY_WHITESPACE)
                    length = _np(pc.binary_length(t))
                    empty = length == 0
                    number = _np(pc.match_substring_regex(t, _NUMBER_RE)) & (length <= _NUMBER_MAX_LEN)
                    v = _np(pc.cast(pc.if_else(pa.array(number), t, null), pa.float64()))
                    ok = number & np.isfinite(v) & (np.abs(v) < _FLOAT32_INF)
            if s.dense_fill is None:
                need |= ~ok
                out.dense[:, j] = np.where(ok, v, 0.0)
            else:
                need |= ~(ok | empty)
                out.dense[:, j] = np.where(ok, v, s.dense_fill)

        out.sparse = [pc.utf8_trim(cols[p.s0 + j], _PY_WHITESPACE) for j in range(p.ns)]
        out.user = None if p.user_pos is None else pc.utf8_trim(cols[p.user_pos], _PY_WHITESPACE)

        events, counts = [], []
        for c in range(p.nk):
            col = cols[p.q0 + c]
            if isinstance(col, _Lists):
                ev, cnt = col.values, col.counts
            else:  # an empty or all-whitespace cell is an empty history; others are split stripped
                col = pc.utf8_trim(col, _PY_WHITESPACE)  # as the row parser does (a whitespace seq_sep)
                blank = _np(pc.binary_length(col)) == 0
                lists = pc.split_pattern(pc.if_else(pa.array(~blank), col, null), pattern=s.seq_sep)
                cnt = _np(pc.fill_null(pc.list_value_length(lists), 0)).astype(np.int64)
                ev = pc.list_flatten(lists)
            ev = pc.utf8_trim(ev, _PY_WHITESPACE)
            if len(ev) != cnt.sum():
                raise RuntimeError("event counts do not add up")  # -> the parser decides the chunk
            hole = _np(pc.binary_length(ev)) == 0
            if hole.any():  # an empty event
                need[np.repeat(np.arange(n), cnt)[hole]] = True
            events.append(ev)
            counts.append(cnt)
        for cnt in counts[1:]:
            need |= cnt != counts[0]

        problems = chunk.problems()
        bad = np.zeros(n, dtype=bool)
        bad[list(problems)] = True
        out.fast = ~need & ~bad
        out.ok = out.fast.copy()
        for i in np.flatnonzero(need | bad).tolist():
            if i in problems:
                out.stops.append((i, problems[i]))
                continue
            try:
                out.records[i] = p.parse(chunk.cells(i))
            except _Malformed as e:
                out.stops.append((i, str(e)))
            else:
                out.ok[i] = True

        # the kept events: the most recent T, oldest -> newest
        keep = np.where(out.fast, np.minimum(counts[0], p.T), 0)
        ends = np.cumsum(keep)
        out.lengths = keep
        out.rows = np.repeat(np.arange(n), keep)
        out.pos = np.arange(int(ends[-1])) - np.repeat(ends - keep, keep)
        out.kept = []
        for ev, cnt in zip(events, counts):
            first = (np.cumsum(cnt) - cnt)[out.rows]  # the row's first event
            if p.reverse:  # newest first in the file: its first T events, reversed
                idx = first + keep[out.rows] - 1 - out.pos
            else:
                idx = first + cnt[out.rows] - keep[out.rows] + out.pos
            out.kept.append(ev.take(pa.array(idx, pa.int64())))
        return out


def _lookup(vocab: Vocabulary, tokens, values) -> np.ndarray:
    """The ids of ``values`` (strings, none of them empty where it matters) in ``vocab``.

    ``index_in`` hashes its value set on every call (about 25 ns a token), so it is used unless the
    vocabulary is more than 16 times larger than the values to look up; then each distinct value
    is looked up in the vocabulary's dict instead (about 0.5 us each), a cost that follows the
    chunk, not a vocabulary of millions of ids.
    """
    _, pc = _pyarrow()
    if len(tokens) <= 16 * len(values):
        return _np(pc.fill_null(pc.index_in(values, value_set=tokens), -1)).astype(np.int64) + 2  # missing -> 1
    distinct = pc.unique(values)
    index = vocab._index
    ids = np.array([index.get(t, Vocabulary.OOV) for t in distinct.to_pylist()], dtype=np.int64)
    return ids[_np(pc.index_in(values, value_set=distinct))]


def _stop(chunk, row: int, reason: Union[str, BaseException], on_error: str, on_skip: Callable[[str], None]) -> None:
    """Act on a row that is not valid, as :meth:`_Source.records` does."""
    if isinstance(reason, BaseException):
        raise reason
    if on_error == "raise":
        raise DataError(chunk.path, chunk.where(row), reason)
    on_skip(f"{chunk.path}:{chunk.where(row)}: {reason}")


class _Tally:
    """String counts accumulated chunk by chunk in Arrow tables, merged now and then."""

    def __init__(self) -> None:
        self.parts: list = []
        self.size = 0
        self.merged_size = 0

    def add(self, values) -> None:
        pa, pc = _pyarrow()
        if len(values) == 0:
            return
        vc = pc.value_counts(values)
        self.parts.append(pa.table({"v": vc.field("values"), "c": vc.field("counts")}))
        self.size += len(vc)
        if self.size > 2 * self.merged_size + _TALLY_MERGE:  # amortised: a merge at least doubles merged_size
            self._merge()

    def _merge(self) -> None:
        pa, _ = _pyarrow()
        if len(self.parts) > 1:
            t = pa.concat_tables(self.parts).group_by("v").aggregate([("c", "sum")])
            self.parts = [pa.table({"v": t["v"], "c": t["c_sum"]})]
        self.size = self.merged_size = sum(len(t) for t in self.parts)

    def vocabulary(self, extra: Counter, min_count: int) -> Vocabulary:
        """The vocabulary of these counts plus ``extra`` (as :meth:`Vocabulary.from_counts`)."""
        pa, pc = _pyarrow()
        if extra:
            self.parts.append(pa.table({"v": pa.array(list(extra), pa.string()),
                                        "c": pa.array(list(extra.values()), pa.int64())}))
        self._merge()
        if not self.parts:
            return Vocabulary([], [])  # as Vocabulary.from_counts({}) gives
        t = self.parts[0]
        t = t.filter(pc.and_(pc.greater_equal(t["c"], min_count), pc.not_equal(t["v"], "")))
        # descending count, then ascending string: UTF-8 byte order is code point order, as str's
        t = t.take(pc.sort_indices(t, sort_keys=[("c", "descending"), ("v", "ascending")]))
        return Vocabulary(t["v"].to_pylist(), t["c"].to_pylist())


# ------------------------------------------------------------------------------------- vocabularies


def build_vocabularies(paths: PathsArg, schema: Schema, fmt: Optional[str] = None, on_error: str = "raise",
                       vectorized: bool = True) -> Tuple[Dict[str, Vocabulary], int]:
    """One streaming pass over the TRAINING files: ``({column: Vocabulary}, valid rows)``.

    Every sparse and sequence column gets an entry; columns that share a vocabulary
    (``schema.shared_vocab``) get the same object, counted over all of them. Skipped malformed rows
    (``on_error="skip"``) are reported with a :class:`DataWarning` giving their number and the first
    few locations. ``vectorized`` counts with pyarrow when it is installed (same result, faster;
    ``False`` forces the per-row reference path).
    """
    _check_on_error(on_error)
    source = _Source(paths, schema, fmt)
    roots = {c: schema.vocab_column(c) for c in [*schema.sparse, *schema.sequences]}
    counters: Dict[str, Counter] = {r: Counter() for r in roots.values()}
    sparse_counters = [counters[roots[c]] for c in schema.sparse]
    seq_counters = [counters[roots[c]] for c in schema.sequences]
    skipped: List[str] = []
    n_skipped = 0

    def on_skip(msg: str) -> None:
        nonlocal n_skipped
        n_skipped += 1
        if len(skipped) < _MAX_EXAMPLES:
            skipped.append(msg)

    def count(records: Iterable[_Record]) -> None:
        for _, _, sparse, hists, _ in records:
            for counter, raw in zip(sparse_counters, sparse):
                if raw:
                    counter[raw] += 1
            for counter, events in zip(seq_counters, hists):
                counter.update(events)

    n = 0
    columnar = source.columnar() if vectorized else None
    if columnar is None:
        def valid() -> Iterator[_Record]:
            nonlocal n
            for record in source.records(on_error, on_skip):
                n += 1
                yield record

        count(valid())
        by_root = {r: Vocabulary.from_counts(c, schema.min_count) for r, c in counters.items()}
    else:
        pa, pc = _pyarrow()
        tallies = {r: _Tally() for r in counters}
        for chunk in source.chunks():
            checked = columnar.check(chunk)
            for row, reason in checked.stops:
                _stop(chunk, row, reason, on_error, on_skip)
            n += int(checked.ok.sum())
            if checked.fast.any():  # the rows the column checks accepted, per vocabulary
                parts: Dict[str, list] = {r: [] for r in counters}
                for j, c in enumerate(schema.sparse):
                    raw = checked.sparse[j]
                    parts[roots[c]].append(raw.filter(pa.array(checked.fast & (_np(pc.binary_length(raw)) > 0))))
                for k, c in enumerate(schema.sequences):
                    parts[roots[c]].append(checked.kept[k])
                for r, arrays in parts.items():
                    tallies[r].add(pa.concat_arrays(arrays))
            count(checked.records.values())  # the rows the parser decided, as the per-row path counts
            if chunk.error is not None:
                raise chunk.error
        by_root = {r: tallies[r].vocabulary(counters[r], schema.min_count) for r in counters}
    if n_skipped:
        warnings.warn(f"build_vocabularies skipped {n_skipped} malformed row(s); first: " + "; ".join(skipped),
                      DataWarning, stacklevel=2)
    return {c: by_root[r] for c, r in roots.items()}, n


_VOCAB_FORMAT = "interformer-vocabularies"


def vocabularies_to_dict(vocabs: Mapping[str, Vocabulary]) -> dict:
    """``{column: Vocabulary}`` as a JSON-able dict; columns holding the same object stay shared."""
    owner: Dict[int, str] = {}
    columns: Dict[str, str] = {}
    tables: Dict[str, dict] = {}
    for col, v in vocabs.items():
        if id(v) not in owner:
            owner[id(v)] = col
            tables[col] = v.to_dict()
        columns[col] = owner[id(v)]
    return {"format": _VOCAB_FORMAT, "version": 1, "columns": columns, "vocabularies": tables}


def vocabularies_from_dict(d: Mapping, where: str = "vocabularies") -> Dict[str, Vocabulary]:
    """Inverse of :func:`vocabularies_to_dict` (``where`` names the source in errors)."""
    if not isinstance(d, Mapping) or d.get("format") != _VOCAB_FORMAT:
        raise ValueError(f"{where}: not vocabularies written by save_vocabularies / vocabularies_to_dict")
    missing = [k for k in ("vocabularies", "columns") if not isinstance(d.get(k), Mapping)]
    if missing:  # (a KeyError or an AttributeError until 2026-11-29: a review's note)
        raise ValueError(f"{where}: no mapping {missing} in these vocabularies (a truncated or edited file?)")
    tables = {name: Vocabulary.from_dict(t) for name, t in d["vocabularies"].items()}
    try:
        return {col: tables[name] for col, name in d["columns"].items()}
    except KeyError as e:
        raise ValueError(f"{where}: column refers to a missing vocabulary {e}") from None


def save_vocabularies(vocabs: Mapping[str, Vocabulary], path: PathLike) -> None:
    """Write ``{column: Vocabulary}`` as JSON; columns holding the same object stay shared on load.

    The file is written next to its destination and renamed into place, so a reader never sees a
    half-written file; where writing fails (a full disk, a value JSON cannot take), the partial
    file is removed and the error raised.
    """
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(vocabularies_to_dict(vocabs), fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_vocabularies(path: PathLike) -> Dict[str, Vocabulary]:
    """Read what :func:`save_vocabularies` wrote."""
    with open(path, encoding="utf-8") as fh:
        d = json.load(fh)
    return vocabularies_from_dict(d, str(path))


# ------------------------------------------------------------------------------------------ datasets


def _seed_of(*parts) -> int:
    """A 63-bit seed from the parts, the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)




def group_key(raw_user: Optional[str]) -> int:
    """The gAUC group key of a raw user string: blake2b (8 bytes) masked to 63 bits, so >= 0;
    :data:`NO_GROUP` for a missing user (empty or None), which would otherwise make every anonymous
    sample one "user" and weigh that group by all their clicks.

    The string is stripped first, as the readers strip a cell, so that the key of a raw cell is the
    one its batches carry (``" u1 "`` is ``"u1"``, a blank cell is missing). Why: the readers
    called it on stripped strings only, so called on a raw cell it gave another key, and a blank
    user a group of its own."""
    raw_user = raw_user.strip() if raw_user else raw_user
    if not raw_user:
        return NO_GROUP
    digest = hashlib.blake2b(raw_user.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _order_args(seed, epoch) -> Tuple[int, int]:
    """``seed`` and ``epoch`` as Python ints (NumPy and tensor integers taken), else ValueError.
    Why: the order they seed is drawn from their ``repr`` (:func:`_seed_of`), in which
    ``np.int64(3)`` is not ``3``: a caller restoring the epoch as a NumPy integer got another order
    than the run it resumes, and skip_batches skipped the wrong rows."""
    out = []
    for name, v in (("seed", seed), ("epoch", epoch)):
        n = _integer(v)
        if n is None:
            raise ValueError(f"{name} must be an integer, got {v!r}")
        out.append(n)
    return out[0], out[1]


def _check_batch_args(batch_size, rank, world_size, skip_batches) -> None:
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not _is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank!r}")
    if not _is_int(skip_batches) or skip_batches < 0:
        raise ValueError(f"skip_batches must be an integer >= 0, got {skip_batches!r}")


def _check_prefetch(prefetch) -> None:
    if not _is_int(prefetch) or prefetch < 0:
        raise ValueError(f"prefetch must be an integer >= 0, got {prefetch!r}")


def _count_batches(num_rows: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    per_rank = -(-num_rows // world_size)
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def _shuffle_buffer(rows: Iterable, size: int, rng: random.Random) -> Iterator:
    """Streaming shuffle: hold ``size`` rows, emit a random one as each new row arrives."""
    buf: list = []
    for row in rows:
        if len(buf) < size:
            buf.append(row)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = row
    rng.shuffle(buf)
    yield from buf


# An encoded row: (label, dense, sparse ids, per-channel ids, length, group key or None)
_Row = Tuple[float, Tuple[float, ...], Tuple[int, ...], Tuple[Tuple[int, ...], ...], int, Optional[int]]


class _Encoder:
    """Parsed records (:data:`_Record`) to encoded rows (:data:`_Row`: ids from the vocabularies,
    group keys) and encoded rows to a :class:`~interformer.data.Batch`: the per-row path's encoding,
    shared by :class:`TabularDataset` and :class:`RowEncoder`."""

    def __init__(self, schema: Schema, vocabs: Mapping[str, Vocabulary], groups: bool) -> None:
        self.schema, self.groups = schema, groups  # groups: the parser's (records carry a user)
        self._sparse_index = [vocabs[c]._index for c in schema.sparse]
        self._seq_index = [vocabs[c]._index for c in schema.sequences]

    def encode(self, record: _Record) -> _Row:
        label, dense, sparse, hists, user = record
        # Tuples, not lists: a tuple of ints drops out of the cyclic garbage collector's view, which
        # keeps a full shuffle buffer from slowing every collection down.
        sparse_ids = tuple([index.get(raw, 1) if raw else 0 for index, raw in zip(self._sparse_index, sparse)])
        seq_ids = tuple([tuple([index.get(t, 1) for t in events]) for index, events in zip(self._seq_index, hists)])
        group = None if user is None else group_key(user)
        return label, tuple(dense), sparse_ids, seq_ids, len(hists[0]), group

    def collate(self, rows: List[_Row]) -> Batch:
        B, k, T = len(rows), len(self.schema.sequences), self.schema.max_seq_len
        flat = [0] * (B * k * T)
        for b, row in enumerate(rows):
            n, base = row[4], b * k * T
            for ids in row[3]:
                flat[base:base + n] = ids
                base += T
        group = torch.tensor([r[5] for r in rows], dtype=torch.int64) if self.groups else None
        return Batch(
            dense=torch.tensor([r[1] for r in rows], dtype=torch.float32).reshape(B, len(self.schema.dense)),
            sparse=torch.tensor([r[2] for r in rows], dtype=torch.int64).reshape(B, len(self.schema.sparse)),
            seq=torch.tensor(flat, dtype=torch.int64).view(B, k, T),
            lengths=torch.tensor([r[4] for r in rows], dtype=torch.int64),
            label=torch.tensor([r[0] for r in rows], dtype=torch.float32),
            group=group,
        )


def _check_vocabs(schema: Schema, vocabs: Mapping[str, Vocabulary]) -> Dict[str, Vocabulary]:
    """The vocabularies of the schema's sparse and sequence columns; ValueError naming any missing."""
    missing = [c for c in [*schema.sparse, *schema.sequences] if c not in vocabs]
    if missing:
        raise ValueError(f"no vocabulary for column(s) {missing}")
    return {c: vocabs[c] for c in [*schema.sparse, *schema.sequences]}


class RowEncoder:
    """In-memory rows, each a mapping ``{column: value}``, encoded into one
    :class:`~interformer.data.Batch` exactly as :class:`TabularDataset` encodes a file's rows with
    the same schema and vocabularies: for scoring a model on rows that are not in a file (online
    requests, say; :func:`interformer.train.load_scorer` pairs one with a checkpoint's model).

    A value is what a Parquet cell may hold, read as that cell would be (module docstring, "Raw
    ids are strings"): a string, an int, a float (integral ones as integers, NaN as missing), a
    bool, None or pandas' ``pd.NA`` (missing) or bytes; a history is a list (or tuple) of such events or a
    ``seq_sep``-joined string. NumPy scalars and arrays and tensors, and the events of a list, are
    taken as their Python values (``tolist()``). Keys the schema does not name are ignored.
    ``labels`` as in :class:`TabularDataset`: False (the default here) reads no label, and no user
    column that is not a sparse feature (the batch's ``group`` is None).

    Calling it with a list of rows returns their batch; a row that lacks a column, holds a list
    outside a sequence column, a list of lists, a set or a mapping as a value (which a Parquet
    file's schema would refuse), or that a file reader would call malformed, raises ValueError
    naming the row (0-based), the column and the reason, and no row is skipped (the caller decides
    what to do with it).
    """

    def __init__(self, schema: Schema, vocabs: Mapping[str, Vocabulary], labels: bool = False) -> None:
        self.schema = schema
        self.vocabs = _check_vocabs(schema, vocabs)
        self._parser = _Parser(schema, bool(labels))
        self._encoder = _Encoder(schema, self.vocabs, self._parser.groups)

    def __call__(self, rows: Iterable[Mapping]) -> Batch:
        if isinstance(rows, Mapping):
            raise TypeError("expected a list of rows, got one mapping: pass [row]")
        columns = self._parser.columns
        sequences = set(self.schema.sequences)
        encoded = []
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise TypeError(f"row {i}: expected a mapping {{column: value}}, got {type(row).__name__}")
            missing = [c for c in columns if c not in row]
            if missing:
                raise ValueError(f"row {i}: missing column(s) {missing}")
            cells = []
            for c in columns:
                try:
                    cells.append(_row_cell(row[c], c in sequences))
                except _Malformed as e:
                    raise ValueError(f"row {i}: column {c!r}: {e}") from None
            try:
                record = self._parser.parse(cells)
            except _Malformed as e:
                raise ValueError(f"row {i}: {e}") from None
            encoded.append(self._encoder.encode(record))
        if not encoded:
            raise ValueError("no rows to encode")
        return self._encoder.collate(encoded)


def _plain(v):
    """A NumPy value or a tensor as its Python value (``tolist()``); anything else as it is."""
    return v.tolist() if hasattr(v, "tolist") and not isinstance(v, (str, bytes)) else v


#: the Python values a Parquet cell of a scalar column reads as (``pyarrow``'s ``to_pylist``: strings,
#: numbers, booleans, bytes, decimals, dates, times, durations), which a :class:`RowEncoder` takes
_SCALARS = (str, int, float, bool, bytes, decimal.Decimal, datetime.date, datetime.time, datetime.timedelta)


def _scalar(v) -> bool:
    """Whether ``v`` is one value a Parquet cell holds (:data:`_SCALARS`) or a missing one."""
    return v is None or _missing_marker(v) or isinstance(v, _SCALARS)


def _row_cell(v, sequence: bool):
    """One value of a :class:`RowEncoder` row as a Parquet cell of that column would be read
    (:func:`_parquet_cell`); :class:`_Malformed` (the caller names the row and the column) for a
    value a Parquet column could not hold there. A value of another kind (a ``range``, a
    generator, a ``deque``, a complex number, any object) is refused: its ``str`` was taken as one
    id, the unknown one, so a history given as a deque scored as one unknown event."""
    v = _plain(v)
    if isinstance(v, (list, tuple)):
        if not sequence:
            raise _Malformed(f"a list ({v!r}) where one value is expected (only sequence columns hold lists)")
        v = [_plain(x) for x in v]
        if any(isinstance(x, (list, tuple, set, frozenset, Mapping)) for x in v):
            raise _Malformed(f"a history's events must be single values, got {v!r}")
        odd = next((x for x in v if not _scalar(x)), None)
        if odd is not None:
            raise _Malformed(f"a history's events must be single values (ids), got a {type(odd).__name__}")
    elif isinstance(v, (set, frozenset, Mapping)):
        raise _Malformed(f"expected a single value{' or a list' if sequence else ''}, got a {type(v).__name__}")
    elif not _scalar(v):
        hint = " (give a history as a list or a tuple)" if sequence and hasattr(v, "__iter__") else ""
        raise _Malformed(f"expected a single value{' or a list' if sequence else ''}, got a {type(v).__name__}"
                         + hint)
    try:
        return _parquet_cell(v)
    except UnicodeDecodeError as e:
        raise _Malformed(_not_utf8(e)) from None


class TabularDataset:
    """CSV/Parquet files of one split, streamed as :class:`~interformer.data.Batch` es.

    ``vocabs`` must hold a :class:`Vocabulary` for every sparse and sequence column (those of the
    TRAINING split, from :func:`build_vocabularies` or :func:`load_vocabularies`). ``fmt``
    overrides the suffix-based format. ``on_error``: ``"raise"`` or ``"skip"`` malformed rows
    (module docstring). ``shuffle_buffer``: rows held by the streaming shuffle.

    ``vectorized``: use the vectorised path when pyarrow is installed (module docstring; the
    result is the same, ``False`` forces the per-row reference path).

    ``labels=False`` reads files without labels, for scoring: the label column is not read (a
    file need not have it, and where it has one its cells are not parsed; bytes that are not UTF-8
    still stop a CSV file's reading there, as anywhere in it) and every batch's ``label`` is NaN;
    nor is a user column that only gives the gAUC groups, and ``group`` is None (module docstring,
    "Scoring").

    ``num_rows`` (valid rows) is counted by one streaming pass the first time it is needed and
    cached; a complete pass of :meth:`batches` also fills it, and a later pass that finds a
    different number raises RuntimeError (the files changed under us). ``skipped`` counts the
    malformed rows skipped by every pass so far, the counting pass included, so with ``k`` bad rows
    it grows by ``k`` per pass; ``skipped_examples`` keeps the first 10 distinct messages.
    """

    def __init__(self, paths: PathsArg, schema: Schema, vocabs: Mapping[str, Vocabulary], fmt: Optional[str] = None,
                 on_error: str = "raise", shuffle_buffer: int = 65536, vectorized: bool = True,
                 labels: bool = True) -> None:
        _check_on_error(on_error)
        if not _is_int(shuffle_buffer) or shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be an integer >= 1, got {shuffle_buffer!r}")
        self.schema = schema
        self.vocabs = _check_vocabs(schema, vocabs)
        self.on_error = on_error
        self.shuffle_buffer = shuffle_buffer
        self.labels = bool(labels)
        self._source = _Source(paths, schema, fmt, self.labels)
        self.paths = [p for p, _ in self._source.files]
        self._num_rows: Optional[int] = None
        self.skipped = 0
        self.skipped_examples: List[str] = []
        self._groups = self._source.parser.groups
        self._encoder = _Encoder(schema, self.vocabs, self._groups)
        self.vectorized = vectorized
        self._lookups: Optional[list] = None  # vectorised path: [(Arrow tokens, [("sparse"|"seq", j), ...])]
        self._group_cache: Dict[str, int] = {}
        seq_int = "<i4" if max(len(self.vocabs[c]) for c in schema.sequences) <= 2**31 else "<i8"
        self._row_dtype = np.dtype([("label", "<f4"), ("dense", "<f4", (len(schema.dense),)),
                                    ("sparse", "<i8", (len(schema.sparse),)),
                                    ("seq", seq_int, (len(schema.sequences), schema.max_seq_len)),
                                    ("length", "<i8"), ("group", "<i8")])

    def _columnar(self) -> Optional[_Columnar]:
        return self._source.columnar() if self.vectorized else None

    # -- counting

    def _on_skip(self, msg: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < _MAX_EXAMPLES and msg not in self.skipped_examples:
            self.skipped_examples.append(msg)

    def _seen_total(self, total: int) -> None:
        if self._num_rows is None:
            self._num_rows = total
        elif self._num_rows != total:
            raise RuntimeError(f"{self.paths}: a pass found {total} valid rows, an earlier one {self._num_rows}; "
                               "the files changed while in use")

    @property
    def num_rows(self) -> int:
        if self._num_rows is None:
            total = 0
            columnar = self._columnar()
            if columnar is None:
                for _ in self._source.records(self.on_error, self._on_skip):
                    total += 1
            else:
                for chunk in self._source.chunks():
                    checked = columnar.check(chunk)
                    for row, reason in checked.stops:
                        _stop(chunk, row, reason, self.on_error, self._on_skip)
                    total += int(checked.ok.sum())
                    if chunk.error is not None:
                        raise chunk.error
            self._seen_total(total)
        return self._num_rows

    def num_batches(self, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        """Batches each rank yields per epoch (before ``skip_batches``)."""
        _check_batch_args(batch_size, 0, world_size, 0)
        return _count_batches(self.num_rows, batch_size, world_size, drop_last)

    def model_overrides(self) -> dict:
        """The schema part of :class:`~interformer.config.InterFormerConfig`: ``InterFormerConfig(**this, ...)``."""
        return {
            "n_dense": len(self.schema.dense),
            "sparse_vocab_sizes": tuple(len(self.vocabs[c]) for c in self.schema.sparse),
            "seq_vocab_sizes": tuple(len(self.vocabs[c]) for c in self.schema.sequences),
            "max_seq_len": self.schema.max_seq_len,
        }

    # -- iteration

    def _file_order(self, shuffle: bool, seed: int, epoch: int) -> Optional[List[int]]:
        """The order the files are read in: shuffled by (seed, epoch) alone, so every rank agrees on
        the row indices; None (as listed) without shuffling or with one file."""
        if not shuffle or len(self._source.files) < 2:
            return None
        order = list(range(len(self._source.files)))
        random.Random(_seed_of(seed, epoch, "files")).shuffle(order)
        return order

    def _rank_rows(self, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int,
                   positions: bool = False) -> Iterator[_Row]:
        """This rank's encoded rows; with ``positions``, ``(row, file, row index)`` (one rank only)."""
        order = self._file_order(shuffle, seed, epoch)
        first: Optional[_Row] = None
        taken = total = 0
        for record in self._source.records(self.on_error, self._on_skip, order, positions):
            if total % world_size == rank:
                if positions:
                    f, i, record = record
                    row = self._encoder.encode(record), f, i
                else:
                    row = self._encoder.encode(record)
                if first is None:
                    first = row
                taken += 1
                yield row
            total += 1
        self._seen_total(total)
        if taken < -(-total // world_size):  # one short: repeat the first row (DistributedSampler padding)
            yield first

    def _rank_rows_vectorized(self, columnar: _Columnar, shuffle: bool, seed: int, epoch: int, rank: int,
                              world_size: int, positions: bool = False) -> Iterator:
        """:meth:`_rank_rows` for the vectorised path: each row packed as one ``bytes`` record of
        ``_row_dtype`` (a few hundred bytes, so a full shuffle buffer stays small); with
        ``positions``, ``(record, file, row index)``."""
        order = self._file_order(shuffle, seed, epoch)
        first: Optional[bytes] = None
        taken = total = 0
        size = self._row_dtype.itemsize
        file = base = None  # the file being read, and its rows before this chunk
        for chunk in self._source.chunks(order):
            if chunk.file != file:
                file, base = chunk.file, 0
            checked = columnar.check(chunk)
            try:
                packed = self._pack(checked)
            except Exception:  # noqa: BLE001 - anything unexpected: the reference decides every row
                if not checked.fast.any():
                    raise
                checked = columnar.check_rows(chunk)
                packed = self._pack(checked)
            start = 0
            for stop, reason in [*checked.stops, (checked.n, None)]:
                run = np.flatnonzero(checked.ok[start:stop]) + start  # valid rows before the stop
                mine = run[(total + np.arange(len(run))) % world_size == rank]
                total += len(run)
                if len(mine):
                    buf = packed[mine].tobytes()
                    for i, at in zip(mine.tolist(), range(0, len(buf), size)):
                        row = buf[at:at + size]
                        if first is None:
                            first = row
                        taken += 1
                        yield (row, file, base + i) if positions else row
                if reason is not None:
                    _stop(chunk, stop, reason, self.on_error, self._on_skip)
                start = stop + 1
            base += checked.n
            if chunk.error is not None:
                raise chunk.error
        self._seen_total(total)
        if taken < -(-total // world_size):  # one short: repeat the first row (DistributedSampler padding)
            yield first

    def _pack(self, checked: _Checked) -> np.ndarray:
        """The chunk's rows as ``_row_dtype`` records (meaningful for its valid rows)."""
        pa, pc = _pyarrow()
        out = np.zeros(checked.n, self._row_dtype)
        if checked.fast.any():
            out["label"] = checked.label
            out["dense"] = checked.dense
            out["length"] = checked.lengths
            sparse, seq = out["sparse"], out["seq"]
            for vocab, tokens, members in self._lookup_plan():
                parts = [checked.sparse[j] if kind == "sparse" else checked.kept[j] for kind, j in members]
                ids = _lookup(vocab, tokens, pa.concat_arrays(parts))
                at = 0
                for (kind, j), part in zip(members, parts):
                    part_ids = ids[at:at + len(part)]
                    at += len(part)
                    if kind == "sparse":
                        part_ids[_np(pc.binary_length(part)) == 0] = 0  # an empty cell -> 0 (missing)
                        sparse[:, j] = part_ids
                    else:
                        seq[checked.rows, j, checked.pos] = part_ids
            if self._groups:
                out["group"] = self._group_keys(checked.user)
        for i, record in checked.records.items():  # rows the parser decided
            label, dense, sparse_ids, seq_ids, n, group = self._encoder.encode(record)
            out["label"][i] = label
            out["dense"][i] = dense
            out["sparse"][i] = sparse_ids
            for c, ids in enumerate(seq_ids):
                out["seq"][i, c, :n] = ids
            out["length"][i] = n
            if group is not None:
                out["group"][i] = group
        return out

    def _lookup_plan(self) -> list:
        """One ``index_in`` per distinct vocabulary object per chunk: its tokens and the columns using it."""
        if self._lookups is None:
            pa, _ = _pyarrow()
            by_vocab: Dict[int, list] = {}
            vocab_of: Dict[int, Vocabulary] = {}
            columns = [("sparse", j, c) for j, c in enumerate(self.schema.sparse)]
            columns += [("seq", j, c) for j, c in enumerate(self.schema.sequences)]
            for kind, j, c in columns:
                v = self.vocabs[c]
                vocab_of[id(v)] = v
                by_vocab.setdefault(id(v), []).append((kind, j))
            self._lookups = [(vocab_of[k], pa.array(vocab_of[k].tokens, pa.string()), members)
                             for k, members in by_vocab.items()]
        return self._lookups

    def _group_keys(self, users) -> np.ndarray:
        """:func:`group_key` of each user string, computed once per distinct string."""
        _, pc = _pyarrow()
        distinct = pc.unique(users)
        cache = self._group_cache
        keys = []
        for u in distinct.to_pylist():
            k = cache.get(u)
            if k is None:
                if len(cache) >= _GROUP_CACHE:
                    cache.clear()
                k = cache[u] = group_key(u)
            keys.append(k)
        return np.array(keys, dtype=np.int64)[_np(pc.index_in(users, value_set=distinct))]

    def _collate_packed(self, rows: List[bytes]) -> Batch:
        a = np.frombuffer(b"".join(rows), self._row_dtype)

        def column(name, dtype):
            return torch.from_numpy(np.array(a[name], dtype=dtype))  # a writable, contiguous copy

        return Batch(
            dense=column("dense", np.float32),
            sparse=column("sparse", np.int64),
            seq=column("seq", np.int64),
            lengths=column("length", np.int64),
            label=column("label", np.float32),
            group=column("group", np.int64) if self._groups else None,
        )

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0, rank: int = 0,
                world_size: int = 1, skip_batches: int = 0, drop_last: bool = False,
                prefetch: int = 0) -> Iterator[Batch]:
        """This rank's batches for one epoch (module docstring: sharding, shuffling, resuming).

        Arguments are checked at the call; with ``world_size > 1`` the call also counts
        ``num_rows`` (one pass, cached) and raises ValueError if there are fewer rows than ranks.
        ``prefetch > 0`` builds the batches in a background thread, up to that many ahead of the
        consumer (module docstring).
        """
        _check_batch_args(batch_size, rank, world_size, skip_batches)
        _check_prefetch(prefetch)
        seed, epoch = _order_args(seed, epoch)
        if world_size > 1 and self.num_rows < world_size:
            raise ValueError(f"{self.num_rows} valid rows cannot be shared among {world_size} ranks")

        def make() -> Iterator[Batch]:
            return self._batches(batch_size, shuffle, seed, epoch, rank, world_size, skip_batches, drop_last)

        return _prefetched(make, prefetch) if prefetch else make()

    def _batches(self, batch_size, shuffle, seed, epoch, rank, world_size, skip_batches, drop_last):
        columnar = self._columnar()
        if columnar is None:
            rows: Iterable = self._rank_rows(shuffle, seed, epoch, rank, world_size)
            collate: Callable[[list], Batch] = self._encoder.collate
        else:
            rows = self._rank_rows_vectorized(columnar, shuffle, seed, epoch, rank, world_size)
            collate = self._collate_packed
        if shuffle:
            rows = _shuffle_buffer(rows, self.shuffle_buffer, random.Random(_seed_of(seed, epoch, rank)))
        for done, chunk in enumerate(_groups(rows, batch_size)):
            if done >= skip_batches and (len(chunk) == batch_size or not drop_last):
                yield collate(chunk)

    def positioned_batches(self, batch_size: int, prefetch: int = 0) -> Iterator[Tuple[Batch, torch.Tensor, torch.Tensor]]:
        """Every valid row once, in the files' order (no sharding, no shuffling), as ``(batch,
        file, row)`` (for scoring: which row each score belongs to). ``file[b]`` (int64) is the
        index in ``paths`` of the file that row ``b`` of ``batch`` comes from, ``row[b]`` its 0-based
        index among that file's rows: the first row after the header is 0, empty CSV lines are not
        rows (a line of spaces is, a malformed one), a malformed row is (a skipped one leaves a
        gap), and a row that spans lines under ``csv_multiline`` is one. Error messages give lines
        instead (1-based, the header and empty lines counted). ``prefetch``: as :meth:`batches`."""
        _check_batch_args(batch_size, 0, 1, 0)
        _check_prefetch(prefetch)

        def make() -> Iterator[Tuple[Batch, torch.Tensor, torch.Tensor]]:
            columnar = self._columnar()
            if columnar is None:
                rows: Iterable = self._rank_rows(False, 0, 0, 0, 1, positions=True)
                collate: Callable[[list], Batch] = self._encoder.collate
            else:
                rows = self._rank_rows_vectorized(columnar, False, 0, 0, 0, 1, positions=True)
                collate = self._collate_packed
            for chunk in _groups(rows, batch_size):
                encoded, files, at = zip(*chunk)
                yield collate(list(encoded)), torch.tensor(files, dtype=torch.int64), torch.tensor(at, dtype=torch.int64)

        return _prefetched(make, prefetch) if prefetch else make()


def _groups(items: Iterable, size: int) -> Iterator[list]:
    """``items`` in lists of ``size``, the last one shorter when they do not divide evenly."""
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _prefetched(make: Callable[[], Iterator], depth: int) -> Iterator:
    """``make()``'s items, produced by a daemon thread into a queue of ``depth`` items.

    The thread starts at the first ``next``. An exception in the thread is raised in the consumer
    after the items produced before it. When the consumer stops early (``close()``, garbage
    collection, an exception), the thread is told to stop, the queue is emptied so that a blocked
    ``put`` returns, and the consumer waits for the thread to end (at most the time to finish the
    item it is building), so no thread outlives the iteration.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        it = None
        try:
            it = make()
            for item in it:
                if not put((True, item)) or stop.is_set():  # stopped while the item went in: build no more
                    return
            put((False, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((False, e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="interformer-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if ok:
                yield item
            elif item is None:
                return
            else:
                raise item
    finally:
        stop.set()
        while True:
            try:
                q.get_nowait()
            except queue.Empty:
                break
        # The generator may be finalised in the producer thread itself (a reference cycle collected
        # by a garbage collection that an allocation there triggered): that thread, seeing ``stop``,
        # ends on its own, and joining it from itself would raise.
        if threading.current_thread() is not thread:
            thread.join()


class MemoryDataset:
    """The :class:`TabularDataset` iteration interface over one in-memory :class:`Batch`.

    ``batches`` shards, pads, shuffles and skips as :meth:`TabularDataset.batches` does, except
    that shuffling is a full permutation seeded by ``(seed, epoch)``, applied before sharding (module
    docstring). ``group`` is the Batch's own. ``skipped`` is always 0. ``prefetch`` is accepted, so
    that a caller can pass it to either dataset, and ignored: a batch here is one index gather in
    memory, cheaper than handing it over from a thread.
    """

    def __init__(self, data: Batch) -> None:
        self.data = data
        self.skipped = 0
        self.skipped_examples: List[str] = []

    @property
    def num_rows(self) -> int:
        return len(self.data)

    def num_batches(self, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        """Batches each rank yields per epoch (before ``skip_batches``)."""
        _check_batch_args(batch_size, 0, world_size, 0)
        return _count_batches(self.num_rows, batch_size, world_size, drop_last)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0, rank: int = 0,
                world_size: int = 1, skip_batches: int = 0, drop_last: bool = False,
                prefetch: int = 0) -> Iterator[Batch]:
        _check_batch_args(batch_size, rank, world_size, skip_batches)
        _check_prefetch(prefetch)
        seed, epoch = _order_args(seed, epoch)
        n = len(self.data)
        if world_size > 1 and n < world_size:
            raise ValueError(f"{n} rows cannot be shared among {world_size} ranks")
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_seed_of(seed, epoch)))
        else:
            order = torch.arange(n)
        mine = order[rank::world_size]
        if len(mine) < -(-n // world_size):
            mine = torch.cat([mine, mine[:1]])
        return self._batches(mine, batch_size, skip_batches, drop_last)

    def _batches(self, mine, batch_size, skip_batches, drop_last):
        for start in range(skip_batches * batch_size, len(mine), batch_size):
            idx = mine[start:start + batch_size]
            if drop_last and len(idx) < batch_size:
                return
            yield self.data[idx]
