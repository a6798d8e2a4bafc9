"""Input checks for one batch (DESIGN §2): bad input raises ``ValueError`` naming the tensor.

The value checks (lengths range, id range, NaN) read the data, which costs a device-to-host sync;
models skip them while being traced or compiled, or under CUDA graph capture, and when
``InterFormerConfig.validate_inputs`` is False.
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import InterFormerConfig


def _check(cond: bool, name: str, problem: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {problem}")


def _value_checks_allowed(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or isinstance(t, torch.fx.Proxy):
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def validate_batch(
    config: InterFormerConfig,
    dense: torch.Tensor,
    sparse: torch.Tensor,
    seq: torch.Tensor,
    lengths: torch.Tensor,
    label: Optional[torch.Tensor] = None,
) -> None:
    """Raise ``ValueError`` for a batch that breaks the data contract of ``config``."""
    for name, t in (("dense", dense), ("sparse", sparse), ("seq", seq), ("lengths", lengths)):
        _check(isinstance(t, torch.Tensor), name, f"expected a torch.Tensor, got {type(t).__name__}")
    _check(dense.dim() == 2, "dense", f"expected rank 2 [B, n_dense], got shape {tuple(dense.shape)}")
    _check(dense.is_floating_point(), "dense", f"expected a floating dtype, got {dense.dtype}")
    B = dense.shape[0]
    _check(dense.shape[1] == config.n_dense, "dense", f"expected {config.n_dense} columns, got {dense.shape[1]}")
    _check(sparse.dim() == 2, "sparse", f"expected rank 2 [B, n_sparse], got shape {tuple(sparse.shape)}")
    _check(sparse.dtype == torch.int64, "sparse", f"expected dtype int64, got {sparse.dtype}")
    n_sparse = len(config.sparse_vocab_sizes)
    _check(tuple(sparse.shape) == (B, n_sparse), "sparse", f"expected shape {(B, n_sparse)}, got {tuple(sparse.shape)}")
    _check(seq.dim() == 3, "seq", f"expected rank 3 [B, k, T], got shape {tuple(seq.shape)}")
    _check(seq.dtype == torch.int64, "seq", f"expected dtype int64, got {seq.dtype}")
    k = config.n_seq_channels
    _check(seq.shape[0] == B and seq.shape[1] == k, "seq", f"expected shape [{B}, {k}, T], got {tuple(seq.shape)}")
    _check(seq.shape[2] >= 1, "seq", "needs T >= 1 positions")
    _check(lengths.dim() == 1, "lengths", f"expected rank 1 [B], got shape {tuple(lengths.shape)}")
    _check(lengths.dtype == torch.int64, "lengths", f"expected dtype int64, got {lengths.dtype}")
    _check(lengths.shape[0] == B, "lengths", f"expected {B} entries, got {lengths.shape[0]}")
    if label is not None:
        _check(label.dim() == 1 and label.shape[0] == B, "label", f"expected shape [{B}], got {tuple(label.shape)}")
        _check(label.is_floating_point(), "label", f"expected a floating dtype, got {label.dtype}")
    if not _value_checks_allowed(lengths):
        return
    T = seq.shape[2]
    if B:
        lo, hi = int(lengths.min()), int(lengths.max())
        _check(lo >= 0 and hi <= T, "lengths", f"values must lie in [0, T={T}], got min {lo}, max {hi}")
    if dense.numel():
        _check(not bool(torch.isnan(dense).any()), "dense", "contains NaN")
        _check(bool(torch.isfinite(dense).all()), "dense", "contains inf")
    for j, v in enumerate(config.sparse_vocab_sizes):
        col = sparse[:, j]
        if B:
            lo, hi = int(col.min()), int(col.max())
            _check(lo >= 0 and hi < v, "sparse", f"field {j}: ids must lie in [0, {v}), got min {lo}, max {hi}")
    for c, v in enumerate(config.seq_vocab_sizes):
        ch = seq[:, c]
        if ch.numel():
            lo, hi = int(ch.min()), int(ch.max())
            _check(lo >= 0 and hi < v, "seq", f"channel {c}: ids must lie in [0, {v}), got min {lo}, max {hi}")
    if label is not None and B:
        _check(bool(((label == 0) | (label == 1)).all()), "label", "values must be 0 or 1")
