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
  (``123.0`` -> ``"123"``) and booleans as ``"1"``/``"0"``, so that CSV ``123`` and Parquet ``123``
  share one key. (A CSV cell ``123.0`` stays the string ``"123.0"``: in a text file it is a
  different token.)
* **Histories.** A history cell is split on ``seq_sep`` (Parquet cells may also hold lists); an
  empty cell is an empty history. An empty event inside a history (``"3^^5"``, a trailing ``^``)
  is a malformed row, not an id 0: id 0 inside the valid length would read as padding. All
  channels of a row must hold the same number of events. Only the most recent ``max_seq_len``
  events are kept; ``seq_order="newest_first"`` files are reversed on read, so that ``seq`` is
  always oldest -> newest at positions ``0..len-1`` with zeros after (DESIGN §2).
* **Labels** must parse as the number 0 or 1 (``"0"``, ``"1"``, ``"0.0"``, ``"1.0"``, ...). Dense
  cells must be finite numbers inside the float32 range; an empty dense cell takes ``dense_fill``
  (or is malformed when ``dense_fill`` is None).
* **Malformed rows are never dropped silently.** With ``on_error="raise"`` (the default) the first
  one raises :class:`DataError` ``"<path>:<line>: <reason>"``, where ``<line>`` is the physical
  line on which the CSV row starts (the header is line 1) or ``row <i>`` (1-based) for Parquet.
  With ``on_error="skip"`` it is counted in :attr:`TabularDataset.skipped` (the first few messages
  are kept in ``skipped_examples``), and it takes no part in ``num_rows`` or sharding;
  :func:`build_vocabularies` reports its skips with a :class:`DataWarning`. A wrong number of CSV
  fields is a malformed row. Problems with a whole file (no header, missing or duplicated required
  columns, undecodable bytes, broken CSV quoting) always raise, whatever ``on_error`` says: after
  them nothing in the file can be trusted. Completely blank CSV lines are not rows and are passed
  over (they carry no sample).
* **Streaming.** Nothing reads a whole file: CSV goes through the :mod:`csv` module line by line
  (gzip when the name ends in ``.gz``), Parquet through ``ParquetFile.iter_batches`` (pyarrow is
  imported only when a Parquet file is read). Batches are built from ``batch_size`` rows at a time,
  so the first batch arrives before the rest of the file has been read. Reading CSV raises the
  process-wide ``csv.field_size_limit`` so that long histories fit in one field.
* **Groups for gAUC.** When ``schema.user`` is set, ``Batch.group`` holds a stable 63-bit hash
  (blake2b, 8 bytes) of the raw user string, not the vocabulary id: users unseen in training
  would otherwise all collapse into the OOV id and be scored as one user.
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
* **Speed.** Parsing and id lookup are plain Python, one code path for CSV and Parquet with no
  required dependency beyond torch. Measured on the development machine's CPU: about 25k rows/s
  in one process for two channels of up to 50 kept events (most of it the per-event dictionary
  lookups), i.e. about 80 ms per 2048-row batch. Each DDP rank reads in its own process; within
  one process, reading is not overlapped with the model step.
* :class:`MemoryDataset` gives the same interface over an in-memory :class:`~interformer.data.Batch`
  (the synthetic data). Being in memory, it shuffles with a full permutation seeded by
  ``(seed, epoch)`` and then shards the permuted order, as ``DistributedSampler`` does, so the rows
  a rank sees change from epoch to epoch.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import os
import random
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .data import Batch

__all__ = [
    "DataError",
    "DataWarning",
    "MemoryDataset",
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

_ON_ERROR = ("raise", "skip")
_MAX_EXAMPLES = 10  # malformed-row messages kept in ``skipped_examples``
_FLOAT32_MAX = 3.4028234663852886e38
_PARQUET_READ_ROWS = 8192  # rows per Parquet record batch: small enough for long histories
_WHITESPACE = re.compile(r"\s")


class DataError(ValueError):
    """A file or a row that cannot be read; the message is ``"<path>:<where>: <reason>"``.

    ``where`` is the physical line number on which a CSV row starts (header = line 1), ``"row <i>"``
    (1-based) for a Parquet row, or ``"schema"`` for a Parquet file whose columns do not fit.
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
    of an empty dense cell, or None to treat an empty dense cell as malformed.
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
                    or not math.isfinite(self.dense_fill) or abs(self.dense_fill) > _FLOAT32_MAX:
                raise ValueError(f"schema key 'dense_fill': expected a finite number or null, got {self.dense_fill!r}")
            self.dense_fill = float(self.dense_fill)

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
        return cls(**dict(d))

    @classmethod
    def from_file(cls, path: PathLike) -> "Schema":
        """Read a ``.json``, ``.yaml`` or ``.yml`` schema file; errors name the file and the key."""
        path = Path(path)
        suffix = path.suffix.lower()
        with open(path, encoding="utf-8") as fh:
            if suffix == ".json":
                d = json.load(fh)
            elif suffix in (".yaml", ".yml"):
                try:
                    import yaml
                except ImportError as e:  # pragma: no cover - pyyaml is in the train/test extras
                    raise ImportError("reading a YAML schema needs PyYAML: pip install pyyaml "
                                      "(or write the schema as .json)") from e
                d = yaml.safe_load(fh)
            else:
                raise ValueError(f"{path}: a schema file must end in .json, .yaml or .yml")
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

    def columns(self) -> List[str]:
        """Every column the files must have: label, dense, sparse, sequences, then user if extra."""
        cols = [self.label, *self.dense, *self.sparse, *self.sequences]
        if self.user is not None and self.user not in cols:
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
        s = (raw if isinstance(raw, str) else _cell_str(raw)).strip()
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
        if not p.is_file():
            raise FileNotFoundError(f"data file not found: {p}")
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
    if on_error not in _ON_ERROR:
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _cell_str(v) -> str:
    """A Parquet scalar as the string a CSV file would hold (see the module docstring)."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
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


_RawRow = Tuple[Union[int, str], Optional[list], Optional[str]]  # (where, cells, problem)


def _csv_rows(path: Path, columns: List[str]) -> Iterator[_RawRow]:
    _raise_csv_field_limit()
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        last = 0
        header = None
        while True:
            start = last + 1
            try:
                cells = next(reader)
            except StopIteration:
                if header is None:
                    raise DataError(path, 1, "empty file: a header row is required") from None
                return
            except (csv.Error, UnicodeDecodeError) as e:
                raise DataError(path, start, f"unreadable CSV ({e})") from None
            last = reader.line_num
            if header is None:
                header = [h.strip() for h in cells]
                width = len(header)
                positions = _header_columns(path, start, header, columns)
                continue
            if not cells:
                continue  # a blank line is not a row
            if len(cells) != width:
                yield start, None, f"expected {width} fields, got {len(cells)}"
            else:
                yield start, [cells[p] for p in positions], None


def _import_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading Parquet files needs pyarrow: pip install pyarrow "
                          "(or pip install 'interformer-kernels[train]')") from e
    return pq


def _parquet_rows(path: Path, columns: List[str], list_columns: Sequence[str]) -> Iterator[_RawRow]:
    """Rows of a Parquet file; only ``list_columns`` (the sequence channels) may be nested types."""
    pq = _import_parquet()
    import pyarrow.types as pat

    pf = pq.ParquetFile(path)
    try:
        arrow = pf.schema_arrow
        _header_columns(path, "schema", list(arrow.names), columns)
        for c in columns:
            t = arrow.field(c).type
            if pat.is_nested(t) and (c not in list_columns or not (pat.is_list(t) or pat.is_large_list(t))):
                raise DataError(path, "schema", f"column {c!r} has type {t}; only sequence columns may hold lists")
        row = 0
        for rb in pf.iter_batches(batch_size=_PARQUET_READ_ROWS, columns=columns):
            names = rb.schema.names
            cols = [rb.column(names.index(c)).to_pylist() for c in columns]
            for cells in zip(*cols):
                row += 1
                yield f"row {row}", [_parquet_cell(v) for v in cells], None
    finally:
        pf.close()


class _Malformed(Exception):
    pass


# A parsed, validated row: (label, dense floats, sparse raw strings, histories as lists of raw
# strings, oldest first and truncated, user raw string or None).
_Record = Tuple[float, List[float], List[str], List[List[str]], Optional[str]]


class _Parser:
    """Validates one row's cells (in ``schema.columns()`` order) into a :data:`_Record`."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        cols = schema.columns()
        self.nd, self.ns, self.nk = len(schema.dense), len(schema.sparse), len(schema.sequences)
        self.d0 = 1
        self.s0 = self.d0 + self.nd
        self.q0 = self.s0 + self.ns
        self.user_pos = None if schema.user is None else cols.index(schema.user)
        self.T = schema.max_seq_len
        self.reverse = schema.seq_order == "newest_first"

    def parse(self, cells: list) -> _Record:
        s = self.schema
        raw = cells[0].strip()
        try:
            label = float(raw)
        except ValueError:
            label = -1.0
        if label != 0.0 and label != 1.0:
            raise _Malformed(f"column {s.label!r}: label must be 0 or 1, got {raw!r}")
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
            if not math.isfinite(v) or abs(v) > _FLOAT32_MAX:
                raise _Malformed(f"column {name!r}: dense value must be finite (in float32 range), got {raw!r}")
            dense.append(v)
        sparse = [c.strip() for c in cells[self.s0:self.q0]]
        hists = []
        for name, cell in zip(s.sequences, cells[self.q0:self.q0 + self.nk]):
            if isinstance(cell, list):
                events = [t.strip() for t in cell]
            else:
                events = cell.split(s.seq_sep) if cell and not cell.isspace() else []
                if _WHITESPACE.search(cell):  # rare: strip only when there is something to strip
                    events = [t.strip() for t in events]
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
    """The files of one split, read row by row as validated records."""

    def __init__(self, paths: PathsArg, schema: Schema, fmt: Optional[str]) -> None:
        self.schema = schema
        self.files = [(p, _file_format(p, fmt)) for p in _as_paths(paths)]
        self.columns = schema.columns()
        self.parser = _Parser(schema)

    def records(self, on_error: str, on_skip: Callable[[str], None],
                order: Optional[Sequence[int]] = None) -> Iterator[_Record]:
        files = self.files if order is None else [self.files[i] for i in order]
        for path, fmt in files:
            rows = _csv_rows(path, self.columns) if fmt == "csv" else _parquet_rows(path, self.columns, self.schema.sequences)
            for where, cells, problem in rows:
                if problem is None:
                    try:
                        record = self.parser.parse(cells)
                    except _Malformed as e:
                        problem = str(e)
                    else:
                        yield record
                        continue
                if on_error == "raise":
                    raise DataError(path, where, problem)
                on_skip(f"{path}:{where}: {problem}")


# ------------------------------------------------------------------------------------- vocabularies


def build_vocabularies(paths: PathsArg, schema: Schema, fmt: Optional[str] = None,
                       on_error: str = "raise") -> Tuple[Dict[str, Vocabulary], int]:
    """One streaming pass over the TRAINING files: ``({column: Vocabulary}, valid rows)``.

    Every sparse and sequence column gets an entry; columns that share a vocabulary
    (``schema.shared_vocab``) get the same object, counted over all of them. Skipped malformed rows
    (``on_error="skip"``) are reported with a :class:`DataWarning` giving their number and the first
    few locations.
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

    n = 0
    for _, _, sparse, hists, _ in source.records(on_error, on_skip):
        n += 1
        for counter, raw in zip(sparse_counters, sparse):
            if raw:
                counter[raw] += 1
        for counter, events in zip(seq_counters, hists):
            counter.update(events)
    if n_skipped:
        warnings.warn(f"build_vocabularies skipped {n_skipped} malformed row(s); first: " + "; ".join(skipped),
                      DataWarning, stacklevel=2)
    by_root = {r: Vocabulary.from_counts(c, schema.min_count) for r, c in counters.items()}
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
    tables = {name: Vocabulary.from_dict(t) for name, t in d["vocabularies"].items()}
    try:
        return {col: tables[name] for col, name in d["columns"].items()}
    except KeyError as e:
        raise ValueError(f"{where}: column refers to a missing vocabulary {e}") from None


def save_vocabularies(vocabs: Mapping[str, Vocabulary], path: PathLike) -> None:
    """Write ``{column: Vocabulary}`` as JSON; columns holding the same object stay shared on load.

    The file is written next to its destination and renamed into place, so a reader never sees a
    half-written file.
    """
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(vocabularies_to_dict(vocabs), fh)
    os.replace(tmp, path)


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


def group_key(raw_user: str) -> int:
    """The gAUC group key of a raw user string: blake2b (8 bytes) masked to 63 bits."""
    digest = hashlib.blake2b(raw_user.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _check_batch_args(batch_size, rank, world_size, skip_batches) -> None:
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not _is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank!r}")
    if not _is_int(skip_batches) or skip_batches < 0:
        raise ValueError(f"skip_batches must be an integer >= 0, got {skip_batches!r}")


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


class TabularDataset:
    """CSV/Parquet files of one split, streamed as :class:`~interformer.data.Batch` es.

    ``vocabs`` must hold a :class:`Vocabulary` for every sparse and sequence column (those of the
    TRAINING split, from :func:`build_vocabularies` or :func:`load_vocabularies`). ``fmt``
    overrides the suffix-based format. ``on_error``: ``"raise"`` or ``"skip"`` malformed rows
    (module docstring). ``shuffle_buffer``: rows held by the streaming shuffle.

    ``num_rows`` (valid rows) is counted by one streaming pass the first time it is needed and
    cached; a complete pass of :meth:`batches` also fills it, and a later pass that finds a
    different number raises RuntimeError (the files changed under us). ``skipped`` counts the
    malformed rows skipped by every pass so far, the counting pass included, so with ``k`` bad rows
    it grows by ``k`` per pass; ``skipped_examples`` keeps the first 10 distinct messages.
    """

    def __init__(self, paths: PathsArg, schema: Schema, vocabs: Mapping[str, Vocabulary], fmt: Optional[str] = None,
                 on_error: str = "raise", shuffle_buffer: int = 65536) -> None:
        _check_on_error(on_error)
        if not _is_int(shuffle_buffer) or shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be an integer >= 1, got {shuffle_buffer!r}")
        missing = [c for c in [*schema.sparse, *schema.sequences] if c not in vocabs]
        if missing:
            raise ValueError(f"no vocabulary for column(s) {missing}")
        self.schema = schema
        self.vocabs = {c: vocabs[c] for c in [*schema.sparse, *schema.sequences]}
        self.on_error = on_error
        self.shuffle_buffer = shuffle_buffer
        self._source = _Source(paths, schema, fmt)
        self.paths = [p for p, _ in self._source.files]
        self._num_rows: Optional[int] = None
        self.skipped = 0
        self.skipped_examples: List[str] = []
        self._sparse_index = [self.vocabs[c]._index for c in schema.sparse]
        self._seq_index = [self.vocabs[c]._index for c in schema.sequences]

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
            for _ in self._source.records(self.on_error, self._on_skip):
                total += 1
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

    def _encode(self, record: _Record) -> _Row:
        label, dense, sparse, hists, user = record
        # Tuples, not lists: a tuple of ints drops out of the cyclic garbage collector's view, which
        # keeps a full shuffle buffer from slowing every collection down.
        sparse_ids = tuple([index.get(raw, 1) if raw else 0 for index, raw in zip(self._sparse_index, sparse)])
        seq_ids = tuple([tuple([index.get(t, 1) for t in events]) for index, events in zip(self._seq_index, hists)])
        group = None if user is None else group_key(user)
        return label, tuple(dense), sparse_ids, seq_ids, len(hists[0]), group

    def _rank_rows(self, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int) -> Iterator[_Row]:
        order = None
        if shuffle and len(self._source.files) > 1:
            order = list(range(len(self._source.files)))
            random.Random(_seed_of(seed, epoch, "files")).shuffle(order)
        first: Optional[_Row] = None
        taken = total = 0
        for record in self._source.records(self.on_error, self._on_skip, order):
            if total % world_size == rank:
                row = self._encode(record)
                if first is None:
                    first = row
                taken += 1
                yield row
            total += 1
        self._seen_total(total)
        if taken < -(-total // world_size):  # one short: repeat the first row (DistributedSampler padding)
            yield first

    def _collate(self, rows: List[_Row]) -> Batch:
        B, k, T = len(rows), len(self.schema.sequences), self.schema.max_seq_len
        flat = [0] * (B * k * T)
        for b, row in enumerate(rows):
            n, base = row[4], b * k * T
            for ids in row[3]:
                flat[base:base + n] = ids
                base += T
        group = None if self.schema.user is None else torch.tensor([r[5] for r in rows], dtype=torch.int64)
        return Batch(
            dense=torch.tensor([r[1] for r in rows], dtype=torch.float32).reshape(B, len(self.schema.dense)),
            sparse=torch.tensor([r[2] for r in rows], dtype=torch.int64).reshape(B, len(self.schema.sparse)),
            seq=torch.tensor(flat, dtype=torch.int64).view(B, k, T),
            lengths=torch.tensor([r[4] for r in rows], dtype=torch.int64),
            label=torch.tensor([r[0] for r in rows], dtype=torch.float32),
            group=group,
        )

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0, rank: int = 0,
                world_size: int = 1, skip_batches: int = 0, drop_last: bool = False) -> Iterator[Batch]:
        """This rank's batches for one epoch (module docstring: sharding, shuffling, resuming).

        Arguments are checked at the call; with ``world_size > 1`` the call also counts
        ``num_rows`` (one pass, cached) and raises ValueError if there are fewer rows than ranks.
        """
        _check_batch_args(batch_size, rank, world_size, skip_batches)
        if world_size > 1 and self.num_rows < world_size:
            raise ValueError(f"{self.num_rows} valid rows cannot be shared among {world_size} ranks")
        return self._batches(batch_size, shuffle, seed, epoch, rank, world_size, skip_batches, drop_last)

    def _batches(self, batch_size, shuffle, seed, epoch, rank, world_size, skip_batches, drop_last):
        rows: Iterable[_Row] = self._rank_rows(shuffle, seed, epoch, rank, world_size)
        if shuffle:
            rows = _shuffle_buffer(rows, self.shuffle_buffer, random.Random(_seed_of(seed, epoch, rank)))
        chunk: List[_Row] = []
        done = 0
        for row in rows:
            chunk.append(row)
            if len(chunk) == batch_size:
                if done >= skip_batches:
                    yield self._collate(chunk)
                done += 1
                chunk = []
        if chunk and not drop_last and done >= skip_batches:
            yield self._collate(chunk)


class MemoryDataset:
    """The :class:`TabularDataset` iteration interface over one in-memory :class:`Batch`.

    ``batches`` shards, pads, shuffles and skips as :meth:`TabularDataset.batches` does, except
    that shuffling is a full permutation seeded by ``(seed, epoch)``, applied before sharding (module
    docstring). ``group`` is the Batch's own. ``skipped`` is always 0.
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
                world_size: int = 1, skip_batches: int = 0, drop_last: bool = False) -> Iterator[Batch]:
        _check_batch_args(batch_size, rank, world_size, skip_batches)
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
