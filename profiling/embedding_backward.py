"""Device and host time of the tokenizers' embedding backward, beside two other eager formulations.

    python profiling/embedding_backward.py [--shape taobao] [--calls 200]

Why: in the H200 profile of 2026-11-26 (``bench/results/nvidia-h200-2026-11-26-profile.txt``)
``aten::embedding_dense_backward`` took 20.5 ms of device time over 10 fused ``taobao`` training
steps. That is 2.05 ms a step, in 22 calls (19 sparse fields and 3 behaviour channels), about a
sixth of the step's kernel time, and 3.8 ms a step of host time under the profiler; eager and
fused models then shared the tokenizers' per-table lookups. The tokenizers stay eager by design
(DESIGN §3), so no Triton kernel is on the table; the first table this script prints says whether
another eager formulation of one table's gradient is worth adopting, the second what the grouped
lookups the fused path adopted instead change (below).

Variants, each a forward and backward of one lookup ``ids [N] -> table [V, d]`` (padding row 0
gets no gradient), with the same upstream gradient:

* ``embedding``: ``F.embedding(..., padding_idx=0)``, what ``nn.Embedding`` runs; its backward
  is ``aten::embedding_dense_backward``;
* ``index_add``: the same forward; the backward is ``zeros(V, d).index_add_(0, ids, grad)``,
  then row 0 is zeroed;
* ``index_put``: the backward is ``zeros(V, d).index_put_((ids,), grad, accumulate=True)``, then
  row 0 is zeroed.

Each variant's weight gradient is checked against ``embedding``'s first (fp32, sums in another
order: ``rtol=1e-5``). Both of this model's table shapes are timed: a sparse field (``N = B`` ids)
and a behaviour channel (``N = B * T``), with the benchmark's vocabulary (1,000 rows) and ``d``.
Columns: plain time per call in a back-to-back loop (host-bound at these sizes), the same call
replayed from a CUDA graph (device time), and the plain time under
``torch.use_deterministic_algorithms(True)`` (what ``interformer train --deterministic`` sets;
"error" where the variant has no deterministic version). Without a GPU every number is CPU time
and says nothing about a GPU.

Measured on the H200 (``bench/results/nvidia-h200-2026-11-27b-embed.txt``): ``index_add_`` was 6.4x
(sparse field) and 1.4x (behaviour channel) faster on the device, but it accumulates with atomics,
its deterministic mode was up to 60x slower and plainly it cost more host time. What the package
adopted instead keeps the aten op and changes how often it runs: the fused path of the tokenizers
(:func:`interformer.kernels.embedding.grouped_embedding`) looks up all of a tokenizer's tables in
one autograd node with one ``embedding_dense_backward`` call. The second table printed here times
that against the per-table lookups of the eager path (:func:`interformer.reference.grouped_embedding`)
for each tokenizer at the shape: all its tables, forward and backward, same three columns.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

from interformer.profiling import seconds_per_call  # noqa: E402

VOCAB = 1000  # bench/test_bench_model.py's config_for: every table has 1,000 rows


class _ScatterEmbedding(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose weight gradient is formed by ``accumulate(zeros, ids, grad)``
    with row ``padding_idx`` then zeroed (the gradient ``F.embedding(padding_idx=...)`` gives)."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, accumulate):
        ctx.save_for_backward(ids)
        ctx.shape, ctx.padding_idx, ctx.accumulate = weight.shape, padding_idx, accumulate
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        flat_ids, flat_grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        dw = torch.zeros(ctx.shape, dtype=grad.dtype, device=grad.device)
        if ctx.accumulate == "index_add":
            dw.index_add_(0, flat_ids, flat_grad)
        else:
            dw.index_put_((flat_ids,), flat_grad, accumulate=True)
        dw[ctx.padding_idx].zero_()
        return None, dw, None, None


def lookup(variant: str):
    """``f(ids, weight) -> rows`` for a variant name."""
    if variant == "embedding":
        return lambda ids, weight: F.embedding(ids, weight, padding_idx=0)
    return lambda ids, weight: _ScatterEmbedding.apply(ids, weight, 0, variant)


VARIANTS = ("embedding", "index_add", "index_put")


def tables(shape) -> dict:
    """name -> (ids per lookup, the fraction of them that are padding) for the model's two kinds of
    table at ``shape``: a sparse field has one id per sample (0 only when missing); a behaviour
    channel has ``T`` per sample, padded after a length uniform in ``[0, T]`` (about half)."""
    return {"sparse field": (shape.B, 0.0), "behaviour channel": (shape.B * shape.T, 0.5)}


def _case(n: int, d: int, device, padded: float = 0.0):
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(1, VOCAB, (n,), generator=g)
    ids[torch.rand(n, generator=g) < padded] = 0  # 0 = padding (its row gets no gradient)
    weight = torch.randn(VOCAB, d, generator=g).to(device).requires_grad_()
    upstream = torch.randn(n, d, generator=g).to(device)
    return ids.to(device), weight, upstream


def _step(variant, ids, weight, upstream):
    fn = lookup(variant)

    def step():
        weight.grad = None
        fn(ids, weight).backward(upstream)
    return step


def check(n: int, d: int, device, padded: float = 0.5) -> None:
    """Every variant's output and weight gradient match ``embedding``'s (raise otherwise)."""
    ids, weight, upstream = _case(n, d, device, padded)
    ref_out = F.embedding(ids, weight, padding_idx=0)
    ref_out.backward(upstream)
    ref = weight.grad.clone()
    for variant in VARIANTS[1:]:
        weight.grad = None
        out = lookup(variant)(ids, weight)
        out.backward(upstream)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0, msg=f"{variant}: rows")
        torch.testing.assert_close(weight.grad, ref, rtol=1e-5, atol=1e-5, msg=f"{variant}: weight gradient")


def _graphed_us(step, calls: int) -> float:
    import common
    from triton.testing import do_bench

    replay = common.captured(step)
    return do_bench(replay, warmup=10, rep=max(20, calls // 10)) * 1e3


def _timings(step, calls: int, device) -> dict:
    """``{"plain": us, "graphed": us or None, "deterministic": us or "error"}`` of one step: back to
    back, replayed from a CUDA graph (GPU only), and under ``torch.use_deterministic_algorithms``
    ("error" where the step has no deterministic version)."""
    plain = seconds_per_call(step, calls, warmup=min(10, calls))[1] * 1e6
    graphed = _graphed_us(step, calls) if device.type == "cuda" else None
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = seconds_per_call(step, calls, warmup=min(10, calls))[1] * 1e6
    except RuntimeError:
        det = "error"
    finally:
        torch.use_deterministic_algorithms(before)
    return {"plain": plain, "graphed": graphed, "deterministic": det}


def measure(shape, calls: int, device) -> dict:
    """``{table: {variant: {"plain": us, "graphed": us or None, "deterministic": us or "error"}}}``."""
    out = {}
    for table, (n, padded) in tables(shape).items():
        check(n, shape.d, device)
        rows = out[table] = {}
        for variant in VARIANTS:
            rows[variant] = _timings(_step(variant, *_case(n, shape.d, device, padded)), calls, device)
    return out


# ----------------------------------------------------------------------------- whole tokenizers
GROUPINGS = ("per table", "grouped")


def grouping(name: str):
    """``f(ids, tables) -> [B, *rest, F, d]`` for a grouping name."""
    if name == "per table":
        from interformer.reference import grouped_embedding
    else:
        from interformer.kernels.embedding import grouped_embedding
    return grouped_embedding


def tokenizer_cases(shape) -> dict:
    """tokenizer -> (ids shape, fraction of padding ids): the sparse tokenizer's ``[B, n - 1]`` (one
    id per field) and the sequence tokenizer's ``[B, k, T]`` (about half padding)."""
    return {"sparse fields": ((shape.B, shape.n - 1), 0.0), "behaviour channels": ((shape.B, shape.k, shape.T), 0.5)}


def _tokenizer_case(ids_shape, d: int, device, padded: float = 0.0):
    g = torch.Generator().manual_seed(sum(ids_shape))
    ids = torch.randint(1, VOCAB, ids_shape, generator=g)
    ids[torch.rand(ids_shape, generator=g) < padded] = 0
    tables = torch.nn.ModuleList(torch.nn.Embedding(VOCAB, d, padding_idx=0) for _ in range(ids_shape[1]))
    upstream = torch.randn(ids_shape[0], *ids_shape[2:], ids_shape[1], d, generator=g)
    return ids.to(device), tables.to(device), upstream.to(device)


def _tokenizer_step(name: str, ids, tables, upstream):
    fn = grouping(name)

    def step():
        for t in tables:
            t.weight.grad = None
        fn(ids, tables).backward(upstream)
    return step


def check_grouped(ids_shape, d: int, device, padded: float = 0.5) -> None:
    """The grouped lookup's rows and every table's weight gradient match the per-table ones
    (raise otherwise)."""
    ids, tables, upstream = _tokenizer_case(ids_shape, d, device, padded)
    results = []
    for name in GROUPINGS:
        for t in tables:
            t.weight.grad = None
        out = grouping(name)(ids, tables)
        out.backward(upstream)
        results.append((out.detach(), [t.weight.grad.clone() for t in tables]))
    (ref_out, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0, msg="grouped: rows")
    for j, (g, r) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=f"grouped: weight gradient of table {j}")


def measure_grouped(shape, calls: int, device) -> dict:
    """``{tokenizer: {grouping: {"plain": us, "graphed": us or None, "deterministic": us or "error"}}}``."""
    out = {}
    for case, (ids_shape, padded) in tokenizer_cases(shape).items():
        check_grouped(ids_shape, shape.d, device)
        rows = out[case] = {}
        for name in GROUPINGS:
            rows[name] = _timings(_tokenizer_step(name, *_tokenizer_case(ids_shape, shape.d, device, padded)),
                                  calls, device)
    return out


def main(argv=None) -> int:
    import common

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="taobao" if common.ON_GPU else "smoke", choices=list(common.ALL_SHAPES))
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    shape = common.ALL_SHAPES[args.shape]
    env = common.environment()
    print(f"embedding forward+backward per table, shape {args.shape} (vocabulary {VOCAB}, d {shape.d}), "
          f"{env['device']}; torch {env['torch']}")
    fmt = lambda v: "-" if v is None else (v if isinstance(v, str) else f"{v:.1f}")  # noqa: E731

    def times(r):  # the three timing columns of a row
        return f"{fmt(r['plain']):>9} {fmt(r['graphed']):>11} {fmt(r['deterministic']):>17}"

    print(f"  {'table':<18} {'ids':>8}  {'variant':<10} {'plain us':>9} {'graphed us':>11} {'deterministic us':>17}")
    for table, rows in measure(shape, args.calls, common.DEVICE).items():
        n = tables(shape)[table][0]
        for variant, r in rows.items():
            print(f"  {table:<18} {n:>8}  {variant:<10} {times(r)}")
    print("(each model step runs one lookup per sparse field and per behaviour channel: 19 and 3 at taobao)")
    print("\neach tokenizer's tables together, per-table lookups (eager path) against one grouped node (fused path)")
    print(f"  {'tokenizer':<20} {'ids':>14}  {'lookup':<10} {'plain us':>9} {'graphed us':>11} {'deterministic us':>17}")
    for case, rows in measure_grouped(shape, args.calls, common.DEVICE).items():
        ids_shape = tokenizer_cases(shape)[case][0]
        for grouping, r in rows.items():
            print(f"  {case:<20} {'x'.join(map(str, ids_shape)):>14}  {grouping:<10} {times(r)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
