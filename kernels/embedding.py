"""Grouped embedding lookups: F tables, one autograd node and one backward call.

Public function (same name and signature as :func:`interformer.reference.grouped_embedding`)::

    grouped_embedding(ids, tables)   # ids [B, F, *rest], F nn.Embedding of width d -> [B, *rest, F, d]

No Triton kernel: the tokenizers stay eager PyTorch (DESIGN §3). What this saves is host time and
launches in the backward. Called table by table, ``nn.Embedding`` builds F ``EmbeddingBackward0``
nodes and F ``aten::embedding_dense_backward`` calls (on an H200: about 100 us of host time per
node, and 77 us of device time for one table's lookup and backward, 2048 ids into 1000 x 64, replayed
from a CUDA graph; 22 tables per taobao training step). Here the F lookups run in one
``torch.autograd.Function``: its forward looks up each table with ``F.embedding`` (an out-of-range
id raises as in ``nn.Embedding``) and saves the ids moved into one concatenated vocabulary (table
j's rows start at ``offset_j = V_0 + ... + V_{j-1}``); its backward makes ONE
``embedding_dense_backward`` call over ``sum V_j`` rows and splits the result into the F weight
gradients (views of one buffer). It is the op ``nn.Embedding`` uses, so it is as deterministic (no
atomics, no ``index_add_``); each row sums the gradients of the same ids, possibly in another order.

Padding: every padding id (0) is saved as flat id 0, table 0's padding row, and the call passes
``padding_idx=0``, so no padding id contributes; a nonzero id of table j > 0 is saved as at least
``offset_j >= V_0 >= 1``.

Decision: the fast path needs every table to be an ``nn.Embedding`` with ``padding_idx=0``, no
``max_norm``, no ``scale_grad_by_freq``, ``sparse=False`` (``interformer.train`` sets
``sparse=True`` for SparseAdam), and all weights on one device in one dtype; otherwise, and under
``torch.fx.symbolic_trace`` (ids a Proxy), the reference runs (one node per table, each table
module called). The fast path reads the weights and does not call the table modules (their hooks do
not run). Without a weight that needs a gradient the lookups run without the Function. Under
``torch.compile`` the op is in the default compile-reference set (:mod:`interformer.backend`).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from interformer import reference

from ._dispatch import needs_grad


def _eligible(ids, tables: Sequence[torch.nn.Module]) -> bool:
    if isinstance(ids, torch.fx.Proxy) or not len(tables):
        return False
    w0 = tables[0].weight
    for t in tables:
        if not isinstance(t, torch.nn.Embedding):
            return False
        w = t.weight
        if (t.padding_idx != 0 or t.max_norm is not None or t.scale_grad_by_freq or t.sparse
                or w.device != w0.device or w.dtype != w0.dtype):
            return False
    return True


def _lookups(cols: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[B, *rest, F, d]``: table j looked up at ``cols[j]``."""
    return torch.stack([F.embedding(c, w, padding_idx=0) for c, w in zip(cols, weights)], dim=-2)


def _flat_ids(ids: torch.Tensor, cols: Sequence[torch.Tensor], sizes: List[int]) -> torch.Tensor:
    """``[B, *rest, F]``: field j's ids plus ``offset_j``, padding ids 0. A device tensor of the
    offsets from the host would cost a host-to-device copy per call (which a CUDA-graph capture
    refuses): tables of one size (the common case, and every benchmark shape) get theirs from
    ``arange`` on the device, four ops in all; others take F - 1 adds and a stack."""
    wide = ids.dtype == torch.int32 and sum(sizes) > 2**31  # flat ids past int32
    fields = ids.movedim(1, -1)
    if len(set(sizes)) == 1:
        dtype = torch.int64 if wide else ids.dtype
        offsets = torch.arange(0, len(sizes) * sizes[0], sizes[0], device=ids.device, dtype=dtype)
        flat = fields + offsets
    else:
        if wide:
            cols = [c.long() for c in cols]
        shifted, offset = [], 0
        for c, size in zip(cols, sizes):
            shifted.append(c + offset if offset else c)
            offset += size
        flat = torch.stack(shifted, dim=-1)
    return flat.masked_fill_(fields == 0, 0)


class _GroupedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, *weights):
        cols = ids.unbind(1)
        out = _lookups(cols, weights)  # first: a bad id raises here, as in nn.Embedding
        ctx.sizes = [w.shape[0] for w in weights]
        ctx.save_for_backward(_flat_ids(ids, cols, ctx.sizes))
        return out

    @staticmethod
    def backward(ctx, grad):
        (flat,) = ctx.saved_tensors
        d = grad.shape[-1]
        dw = torch.ops.aten.embedding_dense_backward(grad.reshape(-1, d), flat.reshape(-1), sum(ctx.sizes), 0, False)
        return None, *(g if need else None for g, need in zip(dw.split(ctx.sizes), ctx.needs_input_grad[1:]))


def grouped_embedding(ids: torch.Tensor, tables: Sequence[torch.nn.Module]) -> torch.Tensor:
    """F embedding lookups with one autograd node; same contract as
    :func:`interformer.reference.grouped_embedding` (see the module docstring for when it takes
    the reference instead).

    ids ``[B, F, *rest]`` (any strides) -> ``[B, *rest, F, d]`` in the tables' dtype.
    """
    if not _eligible(ids, tables):
        return reference.grouped_embedding(ids, tables)
    if ids.dim() < 2 or ids.shape[1] != len(tables):
        raise ValueError(f"grouped_embedding: ids must be [B, {len(tables)}, ...] (one field per table), "
                         f"got {tuple(ids.shape)}")
    weights = [t.weight for t in tables]
    if needs_grad(weights):
        return _GroupedEmbedding.apply(ids, *weights)
    return _lookups(ids.unbind(1), weights)
