"""Synthetic click data in the DESIGN §2 format, seeded and documented.

How a sample is drawn (defaults of :class:`InterFormerConfig`):

* ``sparse`` = ``[user_id, target_item, target_category, context]`` (``group`` = user id, for gAUC); ``seq`` has two channels,
  ``[item_id, category_id]`` of the user's recent behaviour, oldest first, ``lengths`` uniform in
  ``0 .. T`` (so empty and full histories both occur).
* Every item belongs to one category (a fixed random map). Each sample has a short-lived *session
  interest*: two categories that about 70% of its history events come from. The user id does not
  determine it, so only the sequence reveals it.
* The target item comes from the session interest half of the time, from anywhere otherwise.
* ``P(click) = sigmoid(-1.2 + 3.0 * match + 0.6 * dense_0 - 0.4 * dense_1 * dense_2 + u_user + c_context)``
  where ``match`` is the share of the last ``min(len, 10)`` events whose category is the target's
  (0 for an empty history), ``u_user ~ N(0, 0.3)`` per user and ``c_context ~ N(0, 0.3)`` per context
  value. A model that reads the sequence can reach the ``match`` term (the interaction of the
  target item with the recent behaviour); one that ignores it cannot.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .config import InterFormerConfig


@dataclass
class Batch:
    """One batch of the DESIGN §2 data contract.

    ``group`` (optional, int64 ``[B]``) is the key that per-user metrics such as gAUC group by;
    it is not a model input.
    """

    dense: torch.Tensor
    sparse: torch.Tensor
    seq: torch.Tensor
    lengths: torch.Tensor
    label: torch.Tensor
    group: Optional[torch.Tensor] = None

    def inputs(self):
        return self.dense, self.sparse, self.seq, self.lengths

    def to(self, device) -> "Batch":
        """The batch with ``dense``, ``sparse``, ``seq``, ``lengths`` and ``label`` on ``device``;
        ``group`` stays where it is (on the CPU, where the metrics run).

        The copies are asynchronous (``non_blocking=True``) only when ``device`` is a CUDA device:
        a host-to-device copy is ordered on the stream before the kernels that read it (and from
        pinned memory it overlaps with them). A copy to the CPU is blocking: a non-blocking
        device-to-host copy may return before the data has arrived, and the host would read
        stale memory."""
        non_blocking = torch.device(device).type == "cuda"
        moved = (t.to(device, non_blocking=non_blocking)
                 for t in (self.dense, self.sparse, self.seq, self.lengths, self.label))
        return Batch(*moved, group=self.group)  # the group key stays on the CPU, where metrics run

    def pin_memory(self) -> "Batch":
        """The batch with its five CPU tensors in page-locked memory (``group`` as it is), so that a
        non-blocking copy to a GPU is asynchronous: from pageable memory the copy first waits for the
        stream's queued work; a strided tensor is made contiguous first, since its copy would go
        through a pageable contiguous temporary. Needs a CUDA build of torch with a GPU."""
        pinned = (t.contiguous().pin_memory() for t in (self.dense, self.sparse, self.seq, self.lengths, self.label))
        return Batch(*pinned, group=self.group)

    def __len__(self) -> int:
        return self.label.shape[0]

    def __getitem__(self, idx) -> "Batch":
        group = None if self.group is None else self.group[idx]
        return Batch(self.dense[idx], self.sparse[idx], self.seq[idx], self.lengths[idx], self.label[idx], group)

    @staticmethod
    def cat(batches) -> "Batch":
        """Concatenate batches along the sample axis (``group`` kept only if every batch has it)."""
        batches = list(batches)
        fields = [torch.cat([getattr(b, f) for b in batches]) for f in ("dense", "sparse", "seq", "lengths", "label")]
        groups = [b.group for b in batches]
        return Batch(*fields, group=None if any(g is None for g in groups) else torch.cat(groups))


def _integer(value) -> Optional[int]:
    """``value`` as an int (NumPy integers are taken), or None where it is not one (a bool is not)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _count(where: str, name: str, value, minimum: int, alternative: str = "") -> int:
    """``value`` as an int (a bool is refused; numpy integers are taken), or ``ValueError`` naming it
    if it is not one or is below ``minimum``."""
    n = _integer(value)
    if n is None or n < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}{alternative}, got {value!r}")
    return n


#: the largest seed :func:`check_seed` takes: the generators take seeds up to ``2**64 - 1``, and the
#: commands derive a few from the one given (``seed + 1`` and ``seed + 2`` for the validation and test
#: samples, ``seed + 7`` in the demo)
MAX_SEED = 2**64 - 8


def check_seed(seed) -> int:
    """``seed`` if it is an integer in ``[-2**63, MAX_SEED]`` (a bool is refused, NumPy integers are
    taken), else ValueError naming it. A larger one failed deep inside with "Overflow when unpacking
    long long", naming no setting. (Every seed that a synthetic run or the demo could use before the
    check is in the range, so their checkpoints resume and evaluate; a run on files could also have
    used the 7 values above it, whose checkpoints are now refused.)"""
    n = _integer(seed)
    if n is None or not -2**63 <= n <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [-2**63, 2**64 - 8], got {seed!r}")
    return n


def _generator_seed(where: str, seed) -> int:
    """``seed`` as an int that ``torch.Generator.manual_seed`` takes (``[-2**63, 2**64 - 1]``; NumPy
    integers are taken, a bool is refused), else ``ValueError`` naming it. Wider than
    :func:`check_seed`'s range, since the commands pass ``seed + 1`` .. ``seed + 7`` of a checked
    seed. Without it a NumPy ``int64`` seed raised ``TypeError: an integer is required`` (where a
    NumPy ``num_samples`` is taken), and a float, a string or a seed past the range raised an
    error from the generator that named no argument (``Overflow when unpacking long long``)."""
    n = _integer(seed)
    if n is None or not -2**63 <= n <= 2**64 - 1:
        raise ValueError(f"{where}: seed must be an integer in [-2**63, 2**64 - 1], got {seed!r}")
    return n


def make_synthetic(
    num_samples: int,
    config: Optional[InterFormerConfig] = None,
    seed: int = 0,
    max_seq_len: Optional[int] = None,
) -> Batch:
    """Draw ``num_samples`` samples (see the module docstring) as one :class:`Batch` on the CPU.

    Needs a config with 4 sparse fields (user, item, category, context), 2 sequence channels
    (item, category) with the same item/category vocabularies, and ``n_dense >= 3`` for the dense
    terms (fewer dense fields drop those terms).
    """
    c = config if config is not None else InterFormerConfig()
    num_samples = _count("make_synthetic", "num_samples", num_samples, 0)
    seed = _generator_seed("make_synthetic", seed)
    if max_seq_len is not None:
        max_seq_len = _count("make_synthetic", "max_seq_len", max_seq_len, 1, " or None (the config's)")
    if len(c.sparse_vocab_sizes) != 4 or len(c.seq_vocab_sizes) != 2:
        raise ValueError("make_synthetic needs 4 sparse fields (user, item, category, context) and 2 sequence channels")
    n_users, n_items, n_cats, n_ctx = (v - 1 for v in c.sparse_vocab_sizes)
    if c.seq_vocab_sizes != (n_items + 1, n_cats + 1):
        raise ValueError("sequence channel vocabularies must equal the item and category vocabularies")
    T = c.max_seq_len if max_seq_len is None else max_seq_len
    # The world (item->category map, user and context effects) depends only on the schema, so
    # different seeds draw different samples from the same world.
    world = torch.Generator().manual_seed(1234)
    item_cat = torch.randint(1, n_cats + 1, (n_items + 1,), generator=world)
    item_cat[0] = 0
    cat_items = [torch.nonzero(item_cat == k).flatten() for k in range(n_cats + 1)]
    user_bias = torch.randn(n_users + 1, generator=world) * 0.3
    ctx_bias = torch.randn(n_ctx + 1, generator=world) * 0.3

    g = torch.Generator().manual_seed(seed)
    N = num_samples
    user = torch.randint(1, n_users + 1, (N,), generator=g)
    ctx = torch.randint(1, n_ctx + 1, (N,), generator=g)
    lengths = torch.randint(0, T + 1, (N,), generator=g)
    interest = torch.randint(1, n_cats + 1, (N, 2), generator=g)

    def item_in(cats: torch.Tensor) -> torch.Tensor:
        """A random item of each category in ``cats`` (any item where a category is empty)."""
        out = torch.randint(1, n_items + 1, cats.shape, generator=g)
        flat_c, flat_o = cats.flatten(), out.flatten()
        for k in torch.unique(flat_c).tolist():
            pool = cat_items[k]
            if len(pool):
                sel = flat_c == k
                flat_o[sel] = pool[torch.randint(0, len(pool), (int(sel.sum()),), generator=g)]
        return flat_o.view(cats.shape)

    from_interest = torch.rand(N, T, generator=g) < 0.7
    pick = torch.randint(0, 2, (N, T), generator=g)
    hist_cat = torch.where(from_interest, interest.gather(1, pick), torch.randint(1, n_cats + 1, (N, T), generator=g))
    hist_item = item_in(hist_cat)
    hist_cat = item_cat[hist_item]
    valid = torch.arange(T)[None, :] < lengths[:, None]
    hist_item = hist_item * valid
    hist_cat = hist_cat * valid

    target_from_interest = torch.rand(N, generator=g) < 0.5
    target_cat = torch.where(target_from_interest, interest[:, 0], torch.randint(1, n_cats + 1, (N,), generator=g))
    target_item = item_in(target_cat)
    target_cat = item_cat[target_item]

    recent = (torch.arange(T)[None, :] >= (lengths[:, None] - 10)) & valid
    hits = ((hist_cat == target_cat[:, None]) & recent).sum(1).float()
    match = hits / recent.sum(1).clamp(min=1).float()

    dense = torch.randn(N, c.n_dense, generator=g)
    logit = -1.2 + 3.0 * match + user_bias[user] + ctx_bias[ctx]
    if c.n_dense >= 3:
        logit = logit + 0.6 * dense[:, 0] - 0.4 * dense[:, 1] * dense[:, 2]
    label = (torch.rand(N, generator=g) < torch.sigmoid(logit)).float()
    sparse = torch.stack([user, target_item, target_cat, ctx], dim=1)
    seq = torch.stack([hist_item, hist_cat], dim=1)
    return Batch(dense, sparse, seq, lengths, label, group=user.clone())


def iterate_batches(data: Batch, batch_size: int, shuffle: bool = True, seed: int = 0) -> Iterator[Batch]:
    """Mini-batches of ``data`` (the last one may be smaller). A bad ``batch_size`` or ``seed`` raises
    here, not at the first ``next``."""
    return _batches(data, _count("iterate_batches", "batch_size", batch_size, 1), shuffle,
                    _generator_seed("iterate_batches", seed))


def _batches(data: Batch, batch_size: int, shuffle: bool, seed: int) -> Iterator[Batch]:
    n = len(data)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        yield data[order[i : i + batch_size]]


#: Columns of the CSV files :func:`write_example_files` writes, in the BARS/FuxiCTR layout the README describes.
EXAMPLE_COLUMNS = ("label", "user_id", "item_id", "cate_id", "context", "dense_0", "dense_1", "dense_2", "dense_3",
                   "item_history", "cate_history")

_EXAMPLE_SCHEMA = """\
# the columns of {files} (written by `python -m interformer example-data`)
label: label
dense: [{dense}]
sparse: [user_id, item_id, cate_id, context]
sequences: [item_history, cate_history]     # '^'-joined ids, oldest first
shared_vocab: {{item_history: item_id, cate_history: cate_id}}
user: user_id                               # groups for gAUC
max_seq_len: {max_seq_len}
"""

_EXAMPLE_SETTINGS = """\
# `python -m interformer train --config {settings_arg}` trains on the example files; every flag of
# `train --help` is a key here, and flags given on the command line win over this file.
data: csv
train: [{train}]
valid: [{valid}]
test: [{test}]
schema: {schema}
output_dir: {output_dir}
epochs: 2
batch_size: 256
"""


def _written_here(path: str, first_line: str) -> bool:
    """Whether the first line of the file at ``path`` is ``first_line`` as :func:`write_example_files`
    writes it: the whole line, where ``first_line`` holds one ``{field}`` (a template's first line)
    the text before and after it (a hand-written schema starting "# the columns of our logs" is
    not); False for a file it cannot read."""
    try:
        with open(path, "rb") as fh:
            line = fh.readline(4096).decode("utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return False
    if "{" not in first_line:
        return line == first_line
    head, rest = first_line.split("{", 1)
    tail = rest.split("}", 1)[1]
    return line.startswith(head) and line.endswith(tail) and len(line) > len(head) + len(tail)


def write_example_files(directory, train: int = 4096, valid: int = 1024, test: int = 1024, seed: int = 0,
                        output_dir: str = "runs/example", overwrite: bool = False) -> dict:
    """Write the synthetic data (:func:`make_synthetic`, default config: 4 dense features, 4 sparse
    fields, 2 behaviour channels) as BARS-layout CSV files ``train.csv``, ``valid.csv`` and
    ``test.csv`` (seeds ``seed``, ``seed + 1``, ``seed + 2``) in ``directory`` (created if needed), with
    ``schema.yaml`` describing their columns and ``settings.yaml``, a ``train --config`` file for
    them; returns ``{name: path}``. Ids are written as the raw values a click log would hold (the
    loaders build vocabularies from the training file), histories ``^``-joined, oldest first.

    Why: the README's file-based commands need files; these let a newcomer run them end to end.

    Decision: the paths inside ``settings.yaml`` are written as ``directory`` was given, since a
    settings file's paths are taken relative to the directory ``train`` runs from. A file already
    in ``directory`` under one of these names is replaced if this function wrote it (its first line
    is the one written here: the CSV header, the YAML files' comment), so the command can be run
    again; any other such file is refused, before anything is written, unless ``overwrite``
    (``example-data DIR`` pointed at a directory of one's own click logs replaced ``train.csv``)."""
    import json
    import os
    import shlex

    sizes = {name: _count("write_example_files", name, n, 1) for name, n in (("train", train), ("valid", valid),
                                                                            ("test", test))}
    seed = check_seed(seed)
    paths = {name: os.path.join(directory, f"{name}.csv") for name in sizes}
    paths["schema"] = os.path.join(directory, "schema.yaml")
    paths["settings"] = os.path.join(directory, "settings.yaml")
    first_lines = {name: ",".join(EXAMPLE_COLUMNS) for name in sizes}  # how each file starts
    first_lines.update(schema=_EXAMPLE_SCHEMA.splitlines()[0], settings=_EXAMPLE_SETTINGS.splitlines()[0])
    folders = [os.path.basename(p) for p in paths.values() if os.path.isdir(p)]
    if folders:
        raise IsADirectoryError(f"{directory}: {', '.join(folders)} is a directory, where example-data writes a file")
    taken = [os.path.basename(p) for k, p in paths.items()
             if os.path.lexists(p) and not _written_here(p, first_lines[k])]
    if taken and not overwrite:
        raise FileExistsError(f"{directory} already holds {', '.join(taken)}, not written by example-data; give "
                              "another directory, or --overwrite (overwrite=True) to replace "
                              + ("them" if len(taken) > 1 else "it"))
    os.makedirs(directory, exist_ok=True)
    config = InterFormerConfig()
    dense_columns = [c for c in EXAMPLE_COLUMNS if c.startswith("dense_")]
    assert len(dense_columns) == config.n_dense, "EXAMPLE_COLUMNS must name every dense feature of the config"
    for i, (name, n) in enumerate(sizes.items()):
        b = make_synthetic(n, config, seed=seed + i)
        with open(paths[name], "w", encoding="utf-8", newline="") as fh:
            fh.write(",".join(EXAMPLE_COLUMNS) + "\n")
            for r in range(n):
                L = int(b.lengths[r])
                hist = ["^".join(str(int(v)) for v in b.seq[r, c, :L].tolist()) for c in range(2)]
                ids = ",".join(str(int(v)) for v in b.sparse[r].tolist())
                dense = ",".join(f"{float(v):.5f}" for v in b.dense[r].tolist())
                fh.write(f"{int(b.label[r])},{ids},{dense},{hist[0]},{hist[1]}\n")
    with open(paths["schema"], "w", encoding="utf-8") as fh:
        fh.write(_EXAMPLE_SCHEMA.format(files=", ".join(os.path.basename(paths[n]) for n in sizes),
                                        dense=", ".join(dense_columns), max_seq_len=config.max_seq_len))
    with open(paths["settings"], "w", encoding="utf-8") as fh:
        # paths as JSON strings, which YAML reads as they are (spaces, colons, quotes and all)
        quoted = {k: json.dumps(v) for k, v in paths.items() if k != "settings"}
        fh.write(_EXAMPLE_SETTINGS.format(settings_arg=shlex.quote(paths["settings"]),
                                          output_dir=json.dumps(output_dir), **quoted))
    return paths
