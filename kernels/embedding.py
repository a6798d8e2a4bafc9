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

Decision: the fast path reads the weights and does not call the table modules, so it is taken
only where calling them would give the same: every table an ``nn.Embedding`` whose ``forward`` is
``nn.Embedding``'s (a subclass that overrides it, such as a QAT embedding, is not), no forward
hook or pre-hook (the table's or a global one: an old-style ``weight_norm`` recomputes the weight
in one), ``padding_idx=0``, no ``max_norm``, no ``scale_grad_by_freq``, ``sparse=False``
(``interformer.train`` sets ``sparse=True`` for SparseAdam), all weights on one device in one
dtype, and all trainable or all frozen (the one gradient buffer has rows for every table, and each
trainable table's gradient, a view of it, keeps it alive: a large frozen table would cost its full
gradient every step). Otherwise, and under ``torch.fx.symbolic_trace`` (ids a Proxy), the
reference runs: each table module called, one node per table. ``nn.utils.parametrize``
parametrisations keep the fast path (reading ``weight`` computes them, with their gradients).
Without a weight that needs a gradient the lookups run without the Function. Under
``torch.compile`` the op is in the default compile-reference set (:mod:`interformer.backend`).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from interformer import reference

from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ._dispatch import needs_grad

#: ``nn.Embedding.forward`` (``type(t).forward`` of a subclass that keeps it, or of a table with
#: ``nn.utils.parametrize`` parametrisations, whose ``weight`` the fast path reads as they compute it)
_EMBEDDING_FORWARD = torch.nn.Embedding.forward


def _eligible(ids, tables: Sequence[torch.nn.Module]) -> bool:
    """Whether the one backward call gives exactly what calling each table would (see the module
    docstring): plain ``nn.Embedding`` forwards (a subclass that overrides ``forward``, e.g. a QAT
    embedding's fake quantisation, or a forward hook, global or the table's, would be skipped by
    reading the weights directly), options the dense call ignores, one device and dtype, and every
    table trainable or none (a frozen table would still get its rows in the one gradient buffer,
    which every trainable table's gradient view keeps alive)."""
    if isinstance(ids, torch.fx.Proxy) or not len(tables):
        return False
    if _global_forward_hooks or _global_forward_pre_hooks:
        return False
    for t in tables:
        if (type(t).forward is not _EMBEDDING_FORWARD or t._forward_hooks or t._forward_pre_hooks
                or t.padding_idx != 0 or t.max_norm is not None or t.scale_grad_by_freq or t.sparse):
            return False
    w0 = tables[0].weight
    for t in tables:
        w = t.weight
        if w.device != w0.device or w.dtype != w0.dtype or w.requires_grad != w0.requires_grad:
            return False
    return True


def _lookups(cols: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[B, *rest, F, d]``: table j looked up at ``cols[j]``."""
    return torch.stack([F.embedding(c, w, padding_idx=0) for c, w in zip(cols, weights)], dim=-2)


def _flat_ids(ids: torch.Tensor, sizes: List[int]) -> torch.Tensor:
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
        cols = ids.unbind(1)
        if wide:
            cols = [c.long() for c in cols]
        shifted, offset = [], 0
        for c, size in zip(cols, sizes):
            shifted.append(c + offset if offset else c)
            offset += size
        flat = torch.stack(shifted, dim=-1)
    return flat.masked_fill_(fields == 0, 0)


class _GroupedEmbedding(torch.autograd.Function):
    # forward / setup_context apart and a generated vmap rule: torch.func (grad, vmap) takes it,
    # as it takes nn.Embedding (its body is aten ops)
    generate_vmap_rule = True

    @staticmethod
    def forward(ids, *weights):
        return _lookups(ids.unbind(1), weights)  # a bad id raises here, as in nn.Embedding

    @staticmethod
    def setup_context(ctx, inputs, output):
        ids, *weights = inputs
        ctx.sizes = [w.shape[0] for w in weights]
        ctx.save_for_backward(_flat_ids(ids, ctx.sizes))

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
