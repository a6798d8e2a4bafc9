"""Input checks for one batch (DESIGN §2): bad input raises ``ValueError`` naming the tensor.

The value checks (lengths range, id range, NaN/inf, labels) read the data. They are computed on
the data's device as a handful of reductions (per-field and per-channel minima and maxima in one op
each) and read back in ONE transfer, so a batch costs one device-to-host sync, not one per field;
the error messages are then built on the host.

Models skip these value checks while being traced or compiled (``torch.compile``,
``torch.fx``), under CUDA graph capture (a sync there is not allowed), on the meta device (no
data: a model run there to infer shapes or count FLOPs), and when
``InterFormerConfig.validate_inputs`` is False: a compiled model checks only ranks, dtypes and
shapes, and silently takes lengths out of ``[0, T]``, ids out of their vocabulary or NaN/inf in
``dense``. Decision: they are not forced back in with ``torch.compiler.disable``, which would add a
graph break (the fused model must compile with ``fullgraph=True``). Callers of a compiled model
that need the checks call :func:`validate_batch` on each batch before the call. They are also
skipped inside :func:`values_checked`, where the caller has run them already: the trainer checks
each batch on the host, before its copy to a GPU, so that its steps never wait for that read, and
checks a compiled model's batches so on any device.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch

from .config import InterFormerConfig


def _check(cond: bool, name: str, problem) -> None:
    """Raise ``ValueError("<name>: <problem>")`` unless ``cond``. ``problem`` may be a callable
    that builds the message: the shape checks run while ``torch.compile`` traces, where formatting a
    symbolic size into a string would specialise the graph to that size (a recompile per batch size)."""
    if not cond:
        raise ValueError(f"{name}: {problem() if callable(problem) else problem}")


_HOST_CHECKED = threading.local()


@contextlib.contextmanager
def values_checked() -> Iterator[None]:
    """Inside the block, in this thread, :func:`validate_batch` (and so a model's forward) skips its
    value checks: the caller's promise that it has run them on the batch already. The trainer
    (:mod:`interformer.train`) checks each batch on the host before copying it to a GPU and calls
    the model in this block, since the model's own checks would read the copied values back from
    the device, a sync in every step. The type, device, rank, size and dtype checks still run."""
    previous = getattr(_HOST_CHECKED, "on", False)
    _HOST_CHECKED.on = True
    try:
        yield
    finally:
        _HOST_CHECKED.on = previous


def _value_checks_allowed(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or isinstance(t, torch.fx.Proxy) or t.is_meta:
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return not getattr(_HOST_CHECKED, "on", False)


def _check_batch_sizes(dense, sparse, seq, lengths) -> None:
    """The four tensors must agree on the batch size (their leading dimension). The message starts
    with the tensor(s) whose size differs from the others' (the most common size; on a tie, the size
    of ``dense``) and lists every tensor's batch size."""
    sizes = {"dense": dense.shape[0], "sparse": sparse.shape[0], "seq": seq.shape[0], "lengths": lengths.shape[0]}
    B = sizes["dense"]
    if all(b == B for b in sizes.values()):
        return
    values = [int(b) for b in sizes.values()]
    common = max(values, key=lambda b: (values.count(b), b == int(B)))
    odd = [n for n, b in sizes.items() if int(b) != common]
    listed = ", ".join(f"{n} {int(b)}" for n, b in sizes.items())
    raise ValueError(f"{', '.join(odd)}: batch size (leading dimension) differs from the other tensors' "
                     f"({common}); batch sizes: {listed}")


def _check_devices(dense, sparse, seq, lengths, label, device) -> None:
    """The batch's tensors must share one device, ``device`` where given (the model's): a fused
    kernel handed a tensor on another device would read it through a pointer that is not valid
    there. The message starts with the first tensor that is elsewhere."""
    tensors = {"dense": dense, "sparse": sparse, "seq": seq, "lengths": lengths}
    if isinstance(label, torch.Tensor):
        tensors["label"] = label
    where = torch.device(device) if device is not None else dense.device
    for name, t in tensors.items():
        _check(_same_device(t.device, where), name, lambda: f"is on {t.device}, expected {where} ("
               + ("the model's device" if device is not None else "the device of dense") + "); devices: "
               + ", ".join(f"{n} {u.device}" for n, u in tensors.items()))


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``a`` and ``b`` name one device; an index-less ``cuda`` means the current one."""
    if a.type != b.type:
        return False
    if a.type == "cuda" and (a.index is None or b.index is None):
        current = torch.cuda.current_device()
        return (current if a.index is None else a.index) == (current if b.index is None else b.index)
    return a.index == b.index or a.type == "cpu"


def validate_batch(
    config: InterFormerConfig,
    dense: torch.Tensor,
    sparse: torch.Tensor,
    seq: torch.Tensor,
    lengths: torch.Tensor,
    label: Optional[torch.Tensor] = None,
    dense_dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
) -> None:
    """Raise ``ValueError`` for a batch that breaks the data contract of ``config``; the message
    starts with the offending tensor's name. ``dense_dtype``: the dtype the model's dense tokenizer
    computes in (its parameters'): dense must be float32 (the contract's dtype, cast by the
    tokenizer) or that dtype; None accepts any float. ``device``: the device the tensors must be on
    (the model's); None asks only that they share one device.

    Order: types, then devices, then ranks, then the batch size (the leading dimension of the four tensors,
    compared first so that the message names the tensor whose size differs), then dtypes and the
    other sizes, then the values (lengths in ``[0, T]``, ids in their vocabularies, no NaN/inf in
    ``dense``, labels 0 or 1).

    The value checks are skipped while ``torch.compile`` (or ``torch.fx``) traces, which includes
    every call of a compiled model, under CUDA graph capture, and inside :func:`values_checked`: a
    compiled model does not catch bad values (see the module docstring). Called directly, outside
    the compiled region and outside :func:`values_checked`, this function always runs them: call it
    on the batches you feed to a compiled model if you need them."""
    for name, t in (("dense", dense), ("sparse", sparse), ("seq", seq), ("lengths", lengths), ("label", label)):
        if t is not None or name != "label":  # a list or array label would fail below with an AttributeError
            _check(isinstance(t, torch.Tensor), name, f"expected a torch.Tensor, got {type(t).__name__}")
    _check_devices(dense, sparse, seq, lengths, label, device)
    _check(dense.dim() == 2, "dense", lambda: f"expected rank 2 [B, n_dense], got shape {tuple(dense.shape)}")
    _check(sparse.dim() == 2, "sparse", lambda: f"expected rank 2 [B, n_sparse], got shape {tuple(sparse.shape)}")
    _check(seq.dim() == 3, "seq", lambda: f"expected rank 3 [B, k, T], got shape {tuple(seq.shape)}")
    _check(lengths.dim() == 1, "lengths", lambda: f"expected rank 1 [B], got shape {tuple(lengths.shape)}")
    B = dense.shape[0]
    _check_batch_sizes(dense, sparse, seq, lengths)
    _check(dense.is_floating_point(), "dense", lambda: f"expected a floating dtype, got {dense.dtype}")
    if dense_dtype is not None:
        _check(dense.dtype in (torch.float32, dense_dtype), "dense",
               lambda: "expected torch.float32" + ("" if dense_dtype == torch.float32 else
                                                     f" (or {dense_dtype}, the model's parameter dtype)") +
               f", got {dense.dtype}")
    _check(dense.shape[1] == config.n_dense, "dense", lambda: f"expected {config.n_dense} columns, got {dense.shape[1]}")
    _check(sparse.dtype == torch.int64, "sparse", lambda: f"expected dtype int64, got {sparse.dtype}")
    n_sparse = len(config.sparse_vocab_sizes)
    _check(tuple(sparse.shape) == (B, n_sparse), "sparse", lambda: f"expected shape {(B, n_sparse)}, got {tuple(sparse.shape)}")
    _check(seq.dtype == torch.int64, "seq", lambda: f"expected dtype int64, got {seq.dtype}")
    k = config.n_seq_channels
    _check(seq.shape[0] == B and seq.shape[1] == k, "seq", lambda: f"expected shape [{B}, {k}, T], got {tuple(seq.shape)}")
    _check(seq.shape[2] >= 1, "seq", "needs T >= 1 positions")
    _check(lengths.dtype == torch.int64, "lengths", lambda: f"expected dtype int64, got {lengths.dtype}")
    _check(lengths.shape[0] == B, "lengths", lambda: f"expected {B} entries, got {lengths.shape[0]}")
    if label is not None:
        _check(label.dim() == 1 and label.shape[0] == B, "label", lambda: f"expected shape [{B}], got {tuple(label.shape)}")
        _check(label.is_floating_point(), "label", lambda: f"expected a floating dtype, got {label.dtype}")
    if not _value_checks_allowed(lengths) or B == 0:
        return
    _value_checks(config, dense, sparse, seq, lengths, label, dense_dtype)


def _value_checks(config, dense, sparse, seq, lengths, label, dense_dtype=None) -> None:
    """The data-dependent checks of a non-empty batch, read back from the device in one transfer.
    float32 ``dense`` bound for a narrower parameter dtype (a ``.half()`` model) must also be finite
    once cast to it: a value past fp16's 65504 would become inf in the tokenizer."""
    T = seq.shape[2]
    parts = [lengths.min().view(1), lengths.max().view(1)]
    narrowing = dense_dtype is not None and dense.dtype != dense_dtype
    if dense.numel():
        parts += [torch.isnan(dense).any().view(1), (~torch.isfinite(dense)).any().view(1)]
        if narrowing:
            parts.append((~torch.isfinite(dense.to(dense_dtype))).any().view(1))
    if sparse.shape[1]:
        parts += [sparse.amin(0), sparse.amax(0)]
    if seq.shape[1]:
        parts += [seq.amin((0, 2)), seq.amax((0, 2))]
    if label is not None:
        parts.append((~((label == 0) | (label == 1))).any().view(1))
    values = iter(torch.cat([t.to(device=lengths.device, dtype=torch.int64) for t in parts]).tolist())
    lo, hi = next(values), next(values)
    _check(lo >= 0 and hi <= T, "lengths", f"values must lie in [0, T={T}], got min {lo}, max {hi}")
    if dense.numel():
        has_nan, has_inf = next(values), next(values)
        _check(not has_nan, "dense", "contains NaN")
        _check(not has_inf, "dense", "contains inf")
        if narrowing:
            limit = torch.finfo(dense_dtype).max
            _check(not next(values), "dense", f"has values beyond {dense_dtype}'s range (|x| > {limit:g}), the "
                   "model's parameter dtype it is cast to")
    for name, what, vocab in (("sparse", "field", config.sparse_vocab_sizes), ("seq", "channel", config.seq_vocab_sizes)):
        if not vocab:
            continue
        lows = [next(values) for _ in vocab]
        highs = [next(values) for _ in vocab]
        for j, (v, lo, hi) in enumerate(zip(vocab, lows, highs)):
            _check(lo >= 0 and hi < v, name, f"{what} {j}: ids must lie in [0, {v}), got min {lo}, max {hi}")
    if label is not None:
        _check(not next(values), "label", "values must be 0 or 1")
