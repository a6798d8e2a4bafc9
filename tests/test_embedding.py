"""The tokenizers' grouped embedding lookups (:mod:`interformer.kernels.embedding`).

* ``grouped_embedding`` gives the output of the per-table ``nn.Embedding`` lookups bit for bit and
  their weight gradients (fp32 within 1e-6, fp64 within 1e-12: the same sums, possibly in another
  order), padding rows zero, for tables of different sizes, repeated ids, all-padding ids, one
  field, one sample, ``[B, k, T]`` ids, int32 and non-contiguous ids, a non-contiguous upstream
  gradient, frozen tables and accumulation into existing gradients.
* The claim of the change: one backward is ONE autograd node and ONE ``aten::embedding_dense_backward``
  call for all F tables (F on the eager path); in the whole model, one per tokenizer.
* Tables the one call cannot serve (``sparse``, ``max_norm``, ``scale_grad_by_freq``, another
  ``padding_idx``, mixed dtypes) and ``torch.fx`` Proxies take the reference, with its results.
* ``SparseTokenizer`` and ``SequenceMaskNet`` on ``backend="triton"`` match eager, keep their
  ``state_dict`` keys, are switched by ``interformer.optimize``, trace with ``torch.fx`` and compile
  with ``fullgraph=True`` (the reference under the default compile setting, the Function under
  ``"none"``).
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter

import pytest
import torch
import torch.nn as nn

import interformer
from interformer import InterFormerCTR, SequenceMaskNet, SparseTokenizer, optimize
from interformer import reference as R
from interformer.backend import triton_available
from interformer.kernels import embedding as E
from test_model import random_batch, tiny_config
from utils import DEVICE, CountOps

needs_triton = pytest.mark.skipif(not triton_available(), reason="backend='triton' needs the triton package")
EMBEDDING_BWD = torch.ops.aten.embedding_dense_backward.default
CLOSE = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def embedding_nodes(out: torch.Tensor) -> Counter:
    """Names of the autograd nodes behind ``out`` with "Embedding" in them, counted."""
    seen, stack, names = set(), [out.grad_fn], Counter()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "Embedding" in type(node).__name__:
            names[type(node).__name__] += 1
        stack.extend(n for n, _ in node.next_functions)
    return names


def make_tables(sizes, d, dtype=torch.float32, **kw):
    """Tables with random weights everywhere, their padding rows too (a lookup of id 0 returns the
    row as stored; only its gradient is zero)."""
    tables = nn.ModuleList(nn.Embedding(v, d, padding_idx=0, **kw) for v in sizes).to(DEVICE, dtype)
    with torch.no_grad():
        for t in tables:
            t.weight.normal_()
    return tables


def random_ids(sizes, B, rest=(), pad=0.3, dtype=torch.int64):
    """``[B, F, *rest]``, field j's ids in ``[0, V_j)`` with about ``pad`` of them 0 (at least one
    per field when ``pad > 0``)."""
    cols = [torch.randint(1, v, (B, *rest)) for v in sizes]
    ids = torch.stack(cols, 1)
    ids = ids * (torch.rand(ids.shape) >= pad)
    if pad > 0:
        ids.view(B, len(sizes), -1)[0, :, 0] = 0
    return ids.to(DEVICE, dtype)


def per_table(ids, tables):
    """What ``nn.Embedding`` gives table by table: ``[B, *rest, F, d]``."""
    return torch.stack([t(ids[:, j]) for j, t in enumerate(tables)], dim=-2)


def run(fn, ids, tables, upstream):
    """``(out, weight gradients)`` of ``fn(ids, tables)`` backpropagating ``upstream``, into fresh ``.grad``."""
    tables.zero_grad(set_to_none=True)
    out = fn(ids, tables)
    out.backward(upstream)
    return out.detach(), [t.weight.grad for t in tables]


CASES = {
    # name: (vocab sizes, B, rest of the ids' shape, fraction of padding)
    "fields": ((13, 3, 40, 2, 7), 9, (), 0.3),
    "seq [B, k, T]": ((11, 6, 5), 3, (7,), 0.3),
    "one field": ((5,), 8, (), 0.3),
    "one sample": ((9, 4, 6), 1, (), 0.0),
    "all padding": ((5, 3, 4), 4, (3,), 1.0),
    "repeated ids": ((3, 2), 40, (), 0.1),  # every id many times per batch
    # tables of one size take another path to the flat ids (offsets from arange on the device)
    "fields, one size": ((7, 7, 7, 7), 9, (), 0.3),
    "seq, one size": ((6, 6, 6), 3, (7,), 0.3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_embedding_matches_per_table_lookups(case, dtype):
    sizes, B, rest, pad = CASES[case]
    d = 6
    tables = make_tables(sizes, d, dtype)
    ids = random_ids(sizes, B, rest, pad)
    upstream = torch.randn(B, *rest, len(sizes), d, device=DEVICE, dtype=dtype)
    want, want_g = run(per_table, ids, tables, upstream)
    for fn in (E.grouped_embedding, R.grouped_embedding):
        out, grads = run(fn, ids, tables, upstream)
        assert torch.equal(out, want), fn.__module__  # the same lookups
        for j, (g, w) in enumerate(zip(grads, want_g)):
            torch.testing.assert_close(g, w, **CLOSE[dtype], msg=f"{fn.__module__}: table {j}")
            assert torch.all(g[0] == 0), f"{fn.__module__}: padding row of table {j} got a gradient"
    if pad < 1:
        assert all(g.abs().sum() > 0 for g in want_g)  # the comparison is not between zeros
    else:
        assert all(torch.all(g == 0) for g in grads)


def test_grouped_embedding_with_strided_ids_int32_and_a_strided_gradient():
    sizes, d, B = (17, 4, 9), 5, 6
    tables = make_tables(sizes, d)
    base = random_ids(sizes, 2 * B).transpose(0, 1).contiguous().transpose(0, 1)  # [2B, F], column-major
    ids = base[::2]
    assert not ids.is_contiguous()
    upstream = torch.randn(len(sizes), d, B, device=DEVICE).permute(2, 0, 1)  # [B, F, d], not contiguous
    want, want_g = run(per_table, ids, tables, upstream)
    for i in (ids, ids.to(torch.int32)):
        out, grads = run(E.grouped_embedding, i, tables, upstream)
        assert torch.equal(out, want)
        for g, w in zip(grads, want_g):
            torch.testing.assert_close(g, w, **CLOSE[torch.float32])


def test_one_autograd_node_and_one_backward_call_for_all_tables():
    """The point of the op: F tables, one node and one ``embedding_dense_backward`` in the backward;
    the reference makes F of each."""
    sizes = (13, 3, 40, 2, 7)
    tables = make_tables(sizes, 4)
    ids = random_ids(sizes, 5, (3,))
    for fn, nodes, calls in ((E.grouped_embedding, {"_GroupedEmbeddingBackward": 1}, 1),
                             (R.grouped_embedding, {"EmbeddingBackward0": len(sizes)}, len(sizes))):
        out = fn(ids, tables)
        assert embedding_nodes(out) == nodes, fn.__module__
        with CountOps() as counted:
            out.sum().backward()
        assert counted.ops[EMBEDDING_BWD] == calls, (fn.__module__, counted.ops)


def test_grads_accumulate_and_frozen_tables_get_none():
    sizes, d = (6, 5, 4), 3
    tables = make_tables(sizes, d)
    ids = random_ids(sizes, 7)
    upstream = torch.randn(7, 3, d, device=DEVICE)
    _, once = run(E.grouped_embedding, ids, tables, upstream)
    once = [g.clone() for g in once]
    E.grouped_embedding(ids, tables).backward(upstream)  # into the existing .grad
    for g, t in zip(once, tables):
        torch.testing.assert_close(t.weight.grad, 2 * g, rtol=0, atol=0)
    tables[1].weight.requires_grad_(False)  # partly frozen: the reference (see the next test)
    _, want = run(per_table, ids, tables, upstream)
    _, grads = run(E.grouped_embedding, ids, tables, upstream)
    assert grads[1] is None and want[1] is None
    for j in (0, 2):
        torch.testing.assert_close(grads[j], want[j], **CLOSE[torch.float32])
    assert embedding_nodes(E.grouped_embedding(ids, tables)) == {"EmbeddingBackward0": 2}
    for t in tables:
        t.weight.requires_grad_(False)
    out = E.grouped_embedding(ids, tables)  # nothing needs a gradient: no node at all
    assert out.grad_fn is None and torch.equal(out, per_table(ids, tables))


def test_bad_ids_raise_as_in_the_reference():
    tables = make_tables((5, 3), 4)
    for fn in (E.grouped_embedding, R.grouped_embedding):
        for bad in (torch.ones(4, 3, dtype=torch.int64), torch.ones(4, dtype=torch.int64)):
            with pytest.raises(ValueError, match=r"\[B, 2, \.\.\.\]"):
                fn(bad.to(DEVICE), tables)
    if DEVICE.type == "cpu":  # on a GPU an out-of-range id is a device-side assert
        with pytest.raises(IndexError):
            E.grouped_embedding(torch.tensor([[1, 3]], device=DEVICE), tables)  # 3 >= V_1


@pytest.mark.parametrize("option", ["sparse", "max_norm", "scale_grad_by_freq", "padding_idx", "no padding_idx",
                                    "dtypes"])
def test_tables_the_one_call_cannot_serve_take_the_reference(option):
    """A table with an option the single dense backward would ignore sends all the lookups to the
    reference: nn.Embedding's results (sparse gradients, renormalised rows, frequency scaling,
    its own padding row), one node per table."""
    sizes, d = (9, 4, 6), 3
    tables = make_tables(sizes, d)
    ids = random_ids(sizes, 6, pad=0.2)
    ids[:, 1] = torch.tensor([1, 1, 2, 0, 1, 3])  # repeats and padding in the table that changes
    t = tables[1]
    if option == "sparse":
        t.sparse = True  # what interformer.train does for SparseAdam
    elif option == "max_norm":
        t.max_norm = 0.5
    elif option == "scale_grad_by_freq":
        t.scale_grad_by_freq = True
    elif option == "padding_idx":
        t.padding_idx = 2
    elif option == "no padding_idx":
        t.padding_idx = None
    else:
        t.double()
    copies = copy.deepcopy(tables)
    upstream = torch.randn(6, 3, d, device=DEVICE, dtype=torch.float64 if option == "dtypes" else torch.float32)
    out = E.grouped_embedding(ids, tables)
    assert embedding_nodes(out)["EmbeddingBackward0"] == len(sizes)
    out.backward(upstream)
    want = per_table(ids, copies)
    want.backward(upstream)
    assert torch.equal(out, want)
    for a, b in zip(tables, copies):
        assert torch.equal(a.weight, b.weight)  # max_norm renormalises the rows it reads, in place
        assert a.weight.grad.is_sparse == b.weight.grad.is_sparse == (a.sparse and a is t)
        assert torch.equal(a.weight.grad.to_dense(), b.weight.grad.to_dense())


class _ScaledEmbedding(nn.Embedding):
    """A subclass with its own forward (as a QAT embedding has): reading its weight is not calling it."""

    def forward(self, ids):
        return 2 * super().forward(ids)


class _ScaledCall(nn.Embedding):
    """nn.Embedding's forward, but a call that does more: reading the weight is not calling it either."""

    def __call__(self, ids):
        return 2 * super().__call__(ids)


class _ScaledCallImpl(nn.Embedding):
    def _call_impl(self, ids):
        return 2 * super()._call_impl(ids)


@pytest.mark.parametrize("change", ["subclass forward", "forward on the object", "forward hook", "forward pre-hook",
                                    "global hook", "backward hook", "backward pre-hook", "global backward hook",
                                    "module without weight", "subclass __call__", "subclass _call_impl",
                                    "_call_impl on the object", "compiled table"])
def test_tables_whose_call_is_not_their_weight_take_the_reference(change):
    """The fast path reads the weights instead of calling the tables, so a table whose call does
    more (its own forward, set on the class or on the object as offloading hooks do, a hook of its
    own or a global one, forward or backward) sends the lookups to the reference: the result and
    the gradients are what calling the tables gives."""
    sizes, d = (9, 4, 6), 3
    tables = make_tables(sizes, d)
    ids = random_ids(sizes, 6, pad=0.2)
    handles = []
    if change.startswith("subclass"):
        cls = {"subclass forward": _ScaledEmbedding, "subclass __call__": _ScaledCall,
               "subclass _call_impl": _ScaledCallImpl}[change]
        scaled = cls(4, d, padding_idx=0).to(DEVICE)
        scaled.load_state_dict(tables[1].state_dict())
        tables[1] = scaled
    elif change == "forward on the object":
        plain = tables[1].forward
        tables[1].forward = lambda i: 2 * plain(i)
    elif change == "_call_impl on the object":
        plain = tables[1]._call_impl
        tables[1]._call_impl = lambda i: 2 * plain(i)
    elif change == "compiled table":  # what Module.compile sets: the table's call runs the compiled code (here
        # a stand-in for a backend that changes the output), not its forward
        plain = tables[1]._call_impl
        tables[1]._compiled_call_impl = lambda i: 2 * plain(i)
    elif change == "forward hook":
        handles.append(tables[2].register_forward_hook(lambda m, i, o: o * 3))
    elif change == "forward pre-hook":
        handles.append(tables[0].register_forward_pre_hook(lambda m, i: (i[0].clamp(max=1),)))
    elif change == "global hook":
        handles.append(nn.modules.module.register_module_forward_hook(lambda m, i, o: o + 1))
    elif change == "backward hook":  # the full backward hook's gradient goes to the module's inputs (ids): no
        # change of the weight's gradient, but it must fire
        fired = []
        handles.append(tables[1].register_full_backward_hook(lambda m, gi, go: fired.append(m) and None))
    elif change == "backward pre-hook":  # scales the gradient the table's lookup receives
        handles.append(tables[2].register_full_backward_pre_hook(lambda m, go: (go[0] * 10,)))
    elif change == "global backward hook":
        handles.append(nn.modules.module.register_module_full_backward_pre_hook(lambda m, go: (go[0] * 3,)))
    else:  # a module that is no nn.Embedding, first (its attributes are not read)
        class Lookup(nn.Module):
            def __init__(self, table):
                super().__init__()
                self.inner = table

            def forward(self, ids):
                return self.inner(ids)

        tables[0] = Lookup(tables[0])
    upstream = torch.randn(6, 3, d, device=DEVICE)
    params = [p for t in tables for p in t.parameters()]
    try:
        with pytest.warns(UserWarning, match="no inputs require gradients") if change == "backward hook" else \
                contextlib.nullcontext():  # the ids are integers: PyTorch says the hook sees no input gradient
            want = per_table(ids, tables)
            want_grads = torch.autograd.grad(want, params, upstream)
            out = E.grouped_embedding(ids, tables)
            grads = torch.autograd.grad(out, params, upstream)
        assert torch.equal(out, want)
        for g, w in zip(grads, want_grads):
            assert torch.equal(g, w)
        if change == "backward hook":
            assert fired == [tables[1], tables[1]]
        assert "_GroupedEmbeddingBackward" not in embedding_nodes(out)
        assert not E._eligible(ids, tables)
    finally:
        for h in handles:
            h.remove()
    if handles:  # the hook was the only reason
        assert E._eligible(ids, tables)
    if change == "forward on the object":
        del tables[1].forward
        assert E._eligible(ids, tables)
    elif change == "_call_impl on the object":
        del tables[1]._call_impl
        assert E._eligible(ids, tables)
    elif change == "compiled table":
        tables[1]._compiled_call_impl = None
        assert E._eligible(ids, tables)


def test_parametrized_tables_keep_the_fast_path_and_their_gradients():
    """A parametrisation (``nn.utils.parametrize``) is computed by reading ``weight``: the one node
    stays, and the gradient reaches the parametrisation's own parameter."""
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.tensor(1.5))

        def forward(self, w):
            return w * self.s

    sizes, d = (7, 5), 4
    tables = make_tables(sizes, d)
    parametrize.register_parametrization(tables[1], "weight", Scale().to(DEVICE))
    ids = random_ids(sizes, 6, pad=0.2)
    upstream = torch.randn(6, 2, d, device=DEVICE)
    out = E.grouped_embedding(ids, tables)
    assert embedding_nodes(out) == {"_GroupedEmbeddingBackward": 1}
    out.backward(upstream)
    got = tables[1].parametrizations.weight.original.grad.clone(), tables[1].parametrizations.weight[0].s.grad.clone()
    tables.zero_grad(set_to_none=True)
    per_table(ids, tables).backward(upstream)
    want = tables[1].parametrizations.weight.original.grad, tables[1].parametrizations.weight[0].s.grad
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **CLOSE[torch.float32])


def test_a_parametrized_weight_is_computed_once_per_call():
    """Each table's ``weight`` is read once per call, as one call of each table reads it: a
    parametrisation runs once (a stateful one, such as spectral norm's power iteration, would
    otherwise drift from the per-table lookups). Also where the tables cannot share one node (one
    frozen, one trainable), which looks them up one by one with the weights read."""
    from torch.nn.utils import parametrize

    runs = []

    class Counted(nn.Module):
        def forward(self, w):
            runs.append(1)
            return w * 1.0

    for frozen in (False, True):
        sizes, d = (7, 5), 4
        tables = make_tables(sizes, d)
        parametrize.register_parametrization(tables[1], "weight", Counted())
        if frozen:
            tables[0].weight.requires_grad_(False)
        ids = random_ids(sizes, 6, pad=0.2)
        runs.clear()
        out = E.grouped_embedding(ids, tables)
        assert len(runs) == 1, frozen
        assert ("_GroupedEmbeddingBackward" in embedding_nodes(out)) == (not frozen)
        torch.testing.assert_close(out, per_table(ids, tables), rtol=0, atol=0)


class _TablesLookup(nn.Module):
    """``fn(ids, tables)`` (the reference or the fused grouped lookup) as a module whose parameters
    are the tables' weights, for ``torch.func.functional_call``."""

    def __init__(self, tables, fn):
        super().__init__()
        self.tables, self.fn = tables, fn

    def forward(self, i):
        return self.fn(i, self.tables)


def test_forward_mode_ad_through_the_fused_lookups():
    """Forward-mode AD (``torch.func.jvp``, ``jacfwd``) has the Function's jvp: the output's tangent
    is the lookups of the weights' tangents, as through ``nn.Embedding``; a weight that is not
    differentiated (jacfwd over one table) contributes zeros."""
    from torch.func import functional_call, jacfwd, jvp

    sizes, d = (7, 5, 9), 3
    tables = make_tables(sizes, d)
    ids = random_ids(sizes, 4, pad=0.3)

    primals = {k: v.detach() for k, v in _TablesLookup(tables, None).named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in primals.items()}
    results = {}
    for name, fn in (("reference", R.grouped_embedding), ("fused", E.grouped_embedding)):
        m = _TablesLookup(tables, fn)
        out, tangent = jvp(lambda p: functional_call(m, p, (ids,)), (primals,), (tangents,))
        jac = jacfwd(lambda w: functional_call(m, {"tables.1.weight": w}, (ids,)))(primals["tables.1.weight"])
        results[name] = (out, tangent, jac)
    for a, b in zip(results["fused"], results["reference"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert results["fused"][1].abs().sum() > 0 and results["fused"][2].abs().sum() > 0


def test_forward_ad_of_trainable_weights_runs_the_one_nodes_jvp():
    """``torch.autograd.forward_ad`` with weights that require a gradient goes through the one node
    (``torch.func.jvp``'s own primals need none, so the lookups there are plain ``F.embedding``):
    its jvp gives the reference's tangent, zeros for the tables without one, and the same output's
    backward still gives the reference's gradients."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call

    sizes, d = (7, 5, 9), 3
    tables = make_tables(sizes, d)
    ids = random_ids(sizes, 4, (2,), pad=0.3)
    upstream = torch.randn(4, 2, 3, d, device=DEVICE)
    for dual in ((0, 1, 2), (1,)):
        tangents = {j: torch.randn_like(tables[j].weight) for j in dual}
        results = []
        for fn in (R.grouped_embedding, E.grouped_embedding):
            tables.zero_grad(set_to_none=True)
            with fwAD.dual_level():
                params = {f"tables.{j}.weight": fwAD.make_dual(tables[j].weight, t) for j, t in tangents.items()}
                out = functional_call(_TablesLookup(tables, fn), params, (ids,))
                primal, tangent = fwAD.unpack_dual(out)
                nodes = embedding_nodes(out)
            out.backward(upstream)
            results.append((primal.detach(), tangent, [t.weight.grad for t in tables], nodes))
        (want, want_t, want_g, _), (got, got_t, got_g, nodes) = results
        assert nodes == {"_GroupedEmbeddingBackward": 1}, dual
        assert torch.equal(got, want) and torch.equal(got_t, want_t), dual
        assert got_t.abs().sum() > 0
        for g, w in zip(got_g, want_g):
            torch.testing.assert_close(g, w, **CLOSE[torch.float32])


def test_double_backward_and_retain_graph_match_the_reference():
    """The node's backward is differentiable (``create_graph``) and can run twice (``retain_graph``)."""
    sizes, d = (7, 5, 9), 3
    tables = make_tables(sizes, d, torch.float64)
    ids = random_ids(sizes, 6, pad=0.3)
    upstream = torch.randn(6, 3, d, device=DEVICE, dtype=torch.float64)
    results = []
    for fn in (per_table, E.grouped_embedding):
        tables.zero_grad(set_to_none=True)
        out = fn(ids, tables)
        grads = torch.autograd.grad((out ** 3).sum(), list(tables.parameters()), create_graph=True)
        sum((g ** 2).sum() for g in grads).backward(retain_graph=True)
        out.backward(upstream, retain_graph=True)
        out.backward(upstream)
        results.append([t.weight.grad for t in tables])
    for g, w in zip(*results[::-1]):
        assert torch.all(g[0] == 0)
        torch.testing.assert_close(g, w, **CLOSE[torch.float64])


def test_flat_ids_widen_int32_past_two_to_the_31():
    """Flat ids of int32 ids over tables whose rows add up past 2**31 are int64 (both the one-size
    and the mixed-size paths); the sizes alone decide it, no table is allocated."""
    ids = torch.tensor([[1, 0, 7], [0, 2, 3]], dtype=torch.int32)
    for sizes in ([2**30 + 5] * 3, [2**30 + 5, 2**30, 2**30 + 7]):
        flat = E._flat_ids(ids, sizes)
        assert flat.dtype == torch.int64, sizes
        offsets = torch.tensor([0, sizes[0], sizes[0] + sizes[1]])
        want = torch.where(ids == 0, 0, ids.long() + offsets)
        assert torch.equal(flat, want), sizes
    small = E._flat_ids(ids, [10, 10, 10])
    assert small.dtype == torch.int32 and torch.equal(small.long(), torch.where(ids == 0, 0, ids.long() + torch.tensor([0, 10, 20])))


def test_torch_func_grad_and_vmap_through_the_fused_lookups():
    """``torch.func.grad`` and ``vmap`` take the Function (split forward/setup_context, generated vmap
    rule), as they take ``nn.Embedding``: the same gradients and per-row values as the reference."""
    from torch.func import functional_call, grad, vmap

    sizes = (7, 5, 9)
    tables = make_tables(sizes, 4)
    ids = random_ids(sizes, 5, pad=0.3)

    results = []
    for fn in (R.grouped_embedding, E.grouped_embedding):
        m = _TablesLookup(tables, fn)
        p = {k: v.detach() for k, v in m.named_parameters()}
        g = grad(lambda p: functional_call(m, p, (ids,)).pow(2).sum())(p)
        rows = vmap(lambda row: functional_call(m, p, (row[None],)).sum())(ids)
        results.append((g, rows))
    (g_ref, rows_ref), (g, rows) = results
    assert g.keys() == g_ref.keys()
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], **CLOSE[torch.float32], msg=k)
    torch.testing.assert_close(rows, rows_ref, rtol=0, atol=0)


def test_deterministic_mode():
    sizes = (7, 5, 30)
    tables = make_tables(sizes, 8)
    ids = random_ids(sizes, 64, (3,))
    upstream = torch.randn(64, 3, 3, 8, device=DEVICE)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out, grads = run(E.grouped_embedding, ids, tables, upstream)
        grads = [g.clone() for g in grads]
        again, grads2 = run(E.grouped_embedding, ids, tables, upstream)
        want, want_g = run(per_table, ids, tables, upstream)
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(out, want) and torch.equal(again, want)
    for g, g2, w in zip(grads, grads2, want_g):
        assert torch.equal(g, g2)  # run to run: bitwise
        torch.testing.assert_close(g, w, **CLOSE[torch.float32])


# ----------------------------------------------------------------------------- the tokenizers
@needs_triton
def test_sparse_tokenizer_fused_matches_eager_and_keeps_its_state_dict():
    eager = SparseTokenizer((13, 7, 5), 8, backend="eager").to(DEVICE)
    fused = SparseTokenizer((13, 7, 5), 8, backend="triton").to(DEVICE)
    assert list(fused.state_dict()) == ["tables.0.weight", "tables.1.weight", "tables.2.weight"]
    fused.load_state_dict(eager.state_dict())
    assert fused._op("embedding", "grouped_embedding") is E.grouped_embedding
    ids = random_ids((13, 7, 5), 6)
    outs = []
    for m in (eager, fused):
        out = m(ids)
        out.backward(torch.ones_like(out))
        outs.append((out, [t.weight.grad for t in m.tables]))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(b, a, **CLOSE[torch.float32])
    assert embedding_nodes(fused(ids)) == {"_GroupedEmbeddingBackward": 1}
    with pytest.raises(ValueError, match=r"sparse must be an integer tensor \[\*, 3\]"):
        fused(ids[:, :2])
    empty = SparseTokenizer((), 8, backend="triton")(torch.zeros(3, 0, dtype=torch.int64))
    assert empty.shape == (3, 0, 8)


@needs_triton
def test_sequence_masknet_fused_matches_eager():
    """``Z`` is the channels' embeddings side by side, as ``torch.cat`` of the per-channel lookups
    gave it; the output and every gradient match eager."""
    vocabs, d, T = (11, 6, 9), 4, 7
    eager = SequenceMaskNet(vocabs, d, backend="eager").to(DEVICE)
    fused = copy.deepcopy(eager)
    fused.backend = "triton"
    assert list(fused.state_dict()) == ["tables.0.weight", "tables.1.weight", "tables.2.weight",
                                        "mask_mlp.0.weight", "mask_mlp.0.bias", "mask_mlp.2.weight",
                                        "mask_mlp.2.bias", "proj.weight", "proj.bias"]
    lengths = torch.tensor([0, 7, 3, 1], device=DEVICE)
    seq = random_ids(vocabs, 4, (T,), pad=0.0) * (torch.arange(T, device=DEVICE) < lengths[:, None])[:, None]
    z = torch.cat([t(seq[:, c]) for c, t in enumerate(eager.tables)], dim=-1)
    want_s = eager.proj(z * eager.mask_mlp(z)) * (torch.arange(T, device=DEVICE) < lengths[:, None])[..., None]
    upstream = torch.randn(4, T, d, device=DEVICE)
    grads = []
    for m in (eager, fused):
        s = m(seq, lengths)
        assert torch.equal(s, want_s.detach())
        s.backward(upstream)
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], **CLOSE[torch.float32], msg=n)


@needs_triton
def test_model_tokenizers_follow_the_backend_and_group_their_backward():
    """In the whole model ``optimize`` switches both tokenizers; a training step makes one
    ``embedding_dense_backward`` per tokenizer (one per table in eager); the state_dict keys are
    the eager model's. Only the tokenizers switched here, so the rest of the step is the same
    eager math and the logits are bitwise eager's."""
    cfg = tiny_config()
    eager = InterFormerCTR(cfg).to(DEVICE)
    fused = copy.deepcopy(eager)
    for tok in (fused.backbone.sparse_tokenizer, fused.backbone.seq_tokenizer):
        optimize(tok, "triton")
    assert fused.state_dict().keys() == eager.state_dict().keys()
    assert "backbone.sparse_tokenizer.tables.0.weight" in fused.state_dict()
    dense, sparse, seq, lengths, label = [t.to(DEVICE) for t in random_batch(cfg, [0, 6, 3, 1], 6)]
    results = []
    for m in (eager, fused):
        with CountOps() as counted:
            logits = m(dense, sparse, seq, lengths)
            m.loss(logits, label).backward()
        grads = {n: p.grad for n, p in m.named_parameters() if "tables" in n}
        results.append((logits, grads, counted.ops[EMBEDDING_BWD]))
    (le, ge, ce), (lf, gf, cf) = results
    assert torch.equal(lf, le)
    assert ge.keys() == gf.keys() and len(ge) == len(cfg.sparse_vocab_sizes) + len(cfg.seq_vocab_sizes)
    for n in ge:
        torch.testing.assert_close(gf[n], ge[n], **CLOSE[torch.float32], msg=n)
    assert (ce, cf) == (len(ge), 2)


@needs_triton
def test_whole_fused_model_matches_eager_in_the_tables():
    """``InterFormerConfig(backend="triton")`` builds fused tokenizers, and ``optimize`` switches an
    eager model's; logits and the embedding gradients of the whole fused model agree with eager
    (DESIGN §5 fp32 tolerance: the Triton kernels around the tokenizers reorder sums)."""
    from utils import FP32_TOL, rel_err

    cfg = tiny_config()
    built = InterFormerCTR(tiny_config(backend="triton"))
    assert built.backbone.sparse_tokenizer.backend == built.backbone.seq_tokenizer.backend == "triton"
    eager = InterFormerCTR(cfg).to(DEVICE)
    fused = optimize(copy.deepcopy(eager), "triton")
    for tok in (fused.backbone.sparse_tokenizer, fused.backbone.seq_tokenizer):
        assert tok.backend == "triton" and tok._op("embedding", "grouped_embedding") is E.grouped_embedding
    batch = [t.to(DEVICE) for t in random_batch(cfg, [0, 6, 3, 1], 6)]
    outs = []
    for m in (eager, fused):
        logits = m(*batch[:4])
        m.loss(logits, batch[4]).backward()
        outs.append((logits, {n: p.grad for n, p in m.named_parameters() if "tables" in n}))
    assert rel_err(outs[1][0], outs[0][0]) <= FP32_TOL
    for n, g in outs[0][1].items():
        assert rel_err(outs[1][1][n], g) <= FP32_TOL, n


@needs_triton
def test_fx_symbolic_trace_of_a_fused_tokenizer_records_the_reference():
    tok = SparseTokenizer((10, 12, 7), 8, backend="triton").to(DEVICE)
    ids = torch.tensor([[1, 2, 3], [4, 0, 6]], device=DEVICE)
    gm = torch.fx.symbolic_trace(tok)
    assert torch.equal(gm(ids), tok(ids))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["tables.0", "tables.1", "tables.2"]


@pytest.fixture
def compile_reference():
    before = interformer.set_compile_reference_ops(None)
    yield interformer.set_compile_reference_ops
    interformer.set_compile_reference_ops(before)


@needs_triton
@pytest.mark.parametrize("setting", ["default", "none"])
def test_fused_tokenizer_compiles_fullgraph(setting, compile_reference):
    """Under the default setting the compiled tokenizer takes the reference (F lookups, F backward
    calls, left to the compiler); with ``"none"`` dynamo traces the Function: one backward call.
    Either way the results are eager's."""
    compile_reference(setting)
    sizes = (10, 12, 7)
    eager = SparseTokenizer(sizes, 8, backend="eager").to(DEVICE)
    fused = copy.deepcopy(eager)
    fused.backend = "triton"
    ids = random_ids(sizes, 5)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    want = eager(ids)
    want.sum().backward()
    out = compiled(ids)
    assert torch.equal(out, want)
    with CountOps() as counted:
        out.sum().backward()
    assert counted.ops[EMBEDDING_BWD] == (len(sizes) if setting == "default" else 1)
    for a, b in zip(eager.tables, fused.tables):
        torch.testing.assert_close(b.weight.grad, a.weight.grad, **CLOSE[torch.float32])
    torch._dynamo.reset()


def test_a_forward_set_after_compiling_reaches_the_compiled_fused_lookup():
    """``forward`` set on a table's instance after the first compiled call (as offloading wrappers
    do): the compiled fused lookup recompiles and takes the per-table path, as the compiled
    reference does. Its check read ``module.__dict__``, on which dynamo installs no guard, so the
    compiled code kept the grouped lookup and ignored the new forward (0.8 relative off; an
    embedding fuzzing helper's case); it now compares ``module.forward`` with the class's, which
    dynamo guards."""
    from interformer.kernels.embedding import grouped_embedding

    torch.manual_seed(0)
    tables = [nn.Embedding(5, 3, padding_idx=0), nn.Embedding(7, 3, padding_idx=0)]
    ids = torch.tensor([[1, 2], [3, 6]])
    compiled = torch.compile(lambda i: grouped_embedding(i, tables), backend="aot_eager")
    compiled(ids)
    t = tables[1]
    t.forward = lambda x: nn.Embedding.forward(t, x) * 5
    assert torch.equal(compiled(ids), R.grouped_embedding(ids, tables))
