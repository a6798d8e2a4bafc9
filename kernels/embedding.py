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
``nn.Embedding``'s (a subclass that overrides it, such as a QAT embedding, is not, nor is a table
given its own ``forward`` attribute, as offloading hooks do) and whose call runs that ``forward``
(no subclass that overrides ``__call__`` or ``_call_impl``, no ``_call_impl`` set on the table, no
``Module.compile`` of the table), no hook (forward, forward pre-, backward or backward pre-hook,
the table's or a global one: an old-style ``weight_norm`` recomputes the weight in a forward
pre-hook, and a backward hook may change the gradient),
``padding_idx=0``, no ``max_norm``, no ``scale_grad_by_freq``, ``sparse=False``
(``interformer.train`` sets ``sparse=True`` for SparseAdam). Otherwise, and under
``torch.fx.symbolic_trace`` (ids a Proxy) or ``torch.jit.trace``, the reference runs: each table
module called, one node per table. Each ``weight`` is read once per call (an
``nn.utils.parametrize`` parametrisation computes it there, with its gradient, as a call of the
table would, once). The one node needs the weights on one device in one dtype, all trainable or
all frozen (the one gradient buffer has rows for every table, and each trainable table's gradient,
a view of it, keeps it alive: a large frozen table would cost its full gradient every step);
otherwise, and without a weight that needs a gradient, the weights read are looked up one by one
(``F.embedding``, what each table's ``forward`` does). Forward-mode AD works either way: where
the one node is built (``torch.autograd.forward_ad`` duals of trainable weights, forward-over-reverse
as in ``torch.func.hessian``) it has the Function's ``jvp``, the same lookups of the weights'
tangents; ``torch.func.jvp`` and ``jacfwd`` of primals that need no gradient take the plain
lookups. Under ``torch.compile`` the op is in the default compile-reference set
(:mod:`interformer.backend`).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from interformer import reference
from interformer.backend import called_as_defined, global_module_hooks

from ._dispatch import needs_grad

#: ``nn.Embedding.forward`` (``type(t).forward`` of a subclass that keeps it, or of a table with
#: ``nn.utils.parametrize`` parametrisations, whose ``weight`` the fast path reads as they compute it)
_EMBEDDING_FORWARD = torch.nn.Embedding.forward
#: what calling a module runs before its ``forward`` (``Module.__call__`` -> ``_call_impl``): a subclass
#: that overrides either, or a table given its own ``_call_impl`` or compiled with ``Module.compile``
#: (``_compiled_call_impl``), is called through code that reading its weight would skip
_MODULE_CALL = torch.nn.Module.__call__
_MODULE_CALL_IMPL = torch.nn.Module._call_impl


def _eligible(ids, tables: Sequence[torch.nn.Module]) -> bool:
    """Whether reading the tables' weights gives exactly what calling each table would (see the
    module docstring): plain ``nn.Embedding`` forwards (a subclass that overrides ``forward``, e.g.
    a QAT embedding's fake quantisation, or ``__call__``/``_call_impl``, a ``forward`` or ``_call_impl``
    set on the table object, a table compiled by ``Module.compile``, or a hook, global or
    the table's, forward or backward, would be skipped by reading the weights directly) and no
    option the dense lookup ignores. Reads no weight (a parametrised one computes when read)."""
    if isinstance(ids, torch.fx.Proxy) or torch.jit.is_tracing() or not len(tables):
        return False
    if global_module_hooks():
        return False
    for t in tables:
        cls = type(t)
        if (cls.forward is not _EMBEDDING_FORWARD or cls.__call__ is not _MODULE_CALL
                or cls._call_impl is not _MODULE_CALL_IMPL or not called_as_defined(t)
                or t.padding_idx != 0 or t.max_norm is not None or t.scale_grad_by_freq or t.sparse):
            return False
    return True


def _groupable(weights: Sequence[torch.Tensor]) -> bool:
    """Whether one node can serve these weights: one device, one dtype, all trainable or all frozen."""
    w0 = weights[0]
    return all(w.device == w0.device and w.dtype == w0.dtype and w.requires_grad == w0.requires_grad
               for w in weights)


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


class _GroupedEmbeddingTraced(torch.autograd.Function):
    """The one node, for dynamo to trace (it refuses a Function with a custom ``jvp``); outside
    compilation :class:`_GroupedEmbedding` adds the jvp."""
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


class _GroupedEmbedding(_GroupedEmbeddingTraced):
    """:class:`_GroupedEmbeddingTraced` with a jvp: forward-mode AD (``torch.func.jvp``, ``jacfwd``,
    ``torch.autograd.forward_ad``) takes it, as it takes ``nn.Embedding``."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _GroupedEmbeddingTraced.setup_context(ctx, inputs, output)
        # for jvp: the ids (an input) and the output's width, dtype and device (not the output
        # itself: ctx is reachable from it, a reference cycle)
        ctx.ids, ctx.out_meta = inputs[0], (output.shape[-1], output.dtype, output.device)

    @staticmethod
    def jvp(ctx, ids_tangent, *weight_tangents):
        """The output's tangent: each table's lookup, at the same ids, of its weight's tangent (the
        output is linear in the weights; a padding id reads row 0, whose tangent counts as its value
        does), zeros for a weight without one."""
        d, dtype, device = ctx.out_meta
        return torch.stack([F.embedding(c, t) if t is not None else torch.zeros(*c.shape, d, dtype=dtype, device=device)
                            for c, t in zip(ctx.ids.unbind(1), weight_tangents)], dim=-2)


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
    weights = [t.weight for t in tables]  # once: a parametrised weight computes here
    if needs_grad(weights) and _groupable(weights):
        node = _GroupedEmbeddingTraced if torch.compiler.is_compiling() else _GroupedEmbedding
        return node.apply(ids, *weights)
    return _lookups(ids.unbind(1), weights)
