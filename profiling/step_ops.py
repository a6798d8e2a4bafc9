"""What one model step asks of the host, counted: aten ops, Triton launches and autograd nodes of the
eager and the fused model, by arch. No GPU needed.

    python profiling/step_ops.py [--shape taobao] [--batch 4] [--inference] [--time] [--by-op N]

Why: at the DESIGN §6 shapes a plain (not CUDA-graphed, not compiled) step is bound by the host
(H200: the fused ``taobao`` training step took 31.6 ms on the calling thread, 10.8 ms as a graph
replay), so its time follows what the host issues: every aten op goes through the dispatcher,
every Triton launch through Triton's launcher, every autograd node through the engine. This
script counts those for one step of each backend and says where they come from, so that a change
meant to save host time can be judged on a CPU before a GPU times it.

Method: the bench model (``bench/test_bench_model.py``'s config at ``--shape``) at a small batch
(counts do not depend on it), bf16 autocast on the model's device, every Triton launch counted and
skipped (``interformer.profiling.triton_launches(run=False)``: outputs are garbage, which the
counts do not read). One warm-up step, then one counted step:

* forward aten ops (``TorchDispatchMode``, views and allocations included), by the arch whose
  forward issued them (forward hooks on the arches and on every ``nn.Linear``, so each arch's
  linear layers, which neither backend fuses, show apart);
* backward aten ops (the engine's thread runs them; no attribution);
* Triton launches, forward and backward;
* autograd nodes reachable from the loss, by kind: ``AccumulateGrad`` (one per parameter),
  ``ToCopyBackward0`` (autocast's casts), the fused ops' own Functions, and the rest.

``--inference`` counts the forward alone under ``torch.no_grad()`` (no backward, no nodes).
``--time`` also times each backend's step on this machine with the launches still skipped, at the
shape's structure with d = 16, T = 6 and B = 2 (so that arithmetic is small next to dispatching), on
one torch thread: on a CPU, a rough proxy of the plain step's host time. It does so twice: as run,
and with every ``nn.Linear`` skipped (:func:`linears_skipped`). The two columns bracket what the
linear layers cost a GPU's host: as run they cost this CPU's arithmetic, skipped nothing, where a
GPU's host pays a dispatch for each (the H200's plain inference profile at 80ba0f2 showed 42 us of
self CPU time per ``addmm``). That arithmetic is the casts of the weights under autocast and bf16
GEMMs, and it grows with the weights: the DOT projection alone is 378 x 448 at these sizes. The
fused forward calls 25 linear layers, eager's 31 (on the fused path the Interaction Arch's FFN is
one op). As run, they took 1.2-1.3 ms of the fused inference forward's 3.1-3.2 ms on 2026-11-28.
Eager's reference math has GEMMs of its own as well (60 in an inference forward, against the fused
path's 4), which both columns time as run. The CI CPU gave, for the fused inference against eager,
1.54-1.60x as run on 2026-11-27 (two threads) and 1.54-1.65x on 2026-11-28, 1.85-1.92x with the
linears skipped; for the training step 1.34-1.42x as run and 1.58-1.72x skipped (2026-11-28, three
runs each). The H200 measured 1.43x and 1.59x for the plain inference step (two leases) and
1.13-1.18x for the training step on the calling thread. The proxy leaves out the launches' own cost
(40 of them an inference forward, 109 a training step; 12-21 us each on the H200's host in
``launch_overhead.py``) and the GPU's host may weigh aten ops, Python and the autograd engine
otherwise than this CPU. One machine against one GPU: read it as a direction, not a number. Autocast
on a CPU follows the CPU's op lists, which differ from CUDA's in a few ops (e.g. which casts a
LayerNorm gets), so a GPU's counts differ slightly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import Counter
from typing import Dict, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: the arches, in the order of the table; the last takes what no arch's forward issued (the model's
#: glue between arches, the CTR head, the loss)
ARCHES = ("tokenizers", "Cross Arch", "Interaction Arch", "Sequence Arch", "other (glue, head, loss)")
OTHER = ARCHES[-1]


def _arch_of(name: str) -> Optional[str]:
    """The arch a submodule's qualified name belongs to (None: none of the hooked ones)."""
    parts = name.split(".")
    if parts[:1] == ["backbone"] and len(parts) >= 2:
        if parts[1].endswith("tokenizer"):
            return "tokenizers"
        if parts[1] == "final_cross" or (parts[1] == "blocks" and parts[3:4] == ["cross"]):
            return "Cross Arch"
        if parts[1] == "blocks" and parts[3:4] == ["interaction"]:
            return "Interaction Arch"
        if parts[1] == "blocks" and parts[3:4] == ["sequence"]:
            return "Sequence Arch"
    return None


class _Where:
    """Forward hooks that keep a stack of ``(arch, is a linear layer)`` while the model runs; the top
    names where an aten op comes from. Hooked: every module of an arch and every ``nn.Linear``, but
    no ``nn.Embedding`` and no child a fused module reads rather than calls (``read_children``: a
    ``FeedForward``'s layers, a gated LCE's gate, ...): a table with a forward hook makes the fused
    tokenizers take their per-table path, a hooked child makes its module call it, either of which
    would change what is counted."""

    def __init__(self, model: torch.nn.Module) -> None:
        from interformer import FusedModule

        self.stack = []
        self.handles = []
        read = {f"{name}.{child}" for name, module in model.named_modules() if isinstance(module, FusedModule)
                for child in module.read_children}
        for name, module in model.named_modules():
            arch = _arch_of(name)
            linear = isinstance(module, torch.nn.Linear)
            if (isinstance(module, torch.nn.Embedding) or (arch is None and not linear)
                    or any(name == r or name.startswith(r + ".") for r in read)):
                continue
            entry = (arch or OTHER, linear)
            self.handles.append(module.register_forward_pre_hook(lambda m, a, entry=entry: self.stack.append(entry)))
            self.handles.append(module.register_forward_hook(self._pop))

    def _pop(self, module, args, output) -> None:  # a forward hook's return value would replace the output
        self.stack.pop()

    def key(self) -> str:
        if not self.stack:
            return OTHER
        arch, linear = self.stack[-1]
        return f"{arch}, nn.Linear" if linear else arch

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _counting_mode(counter: Counter, where: Optional[_Where], ops: Counter):
    """A dispatch mode counting each aten op under the arch it comes from (``counter``) and, by name,
    under ``(arch, op)`` (``ops``; op = the overload packet's name, e.g. ``_to_copy``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            key = where.key() if where is not None else "backward"
            counter[key] += 1
            ops[key, func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    return Count()


def _nodes(root) -> Counter:
    """Autograd nodes reachable from ``root`` (a grad_fn), by kind."""
    kinds, seen, todo = Counter(), set(), [root]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        if name in ("AccumulateGrad", "ToCopyBackward0"):
            kinds[name] += 1
        elif name.startswith("_"):  # this package's Functions (_GatedLCE, _AttentionQKV, ...)
            kinds["fused-op Functions"] += 1
        else:
            kinds["other aten backward"] += 1
        todo.extend(fn for fn, _ in node.next_functions)
    return kinds


#: the sizes :func:`seconds_per_step` runs at: the shape's structure (tokens, channels, layers) with
#: d = 16, T = 6 and B = 2, so that the CPU's arithmetic is small next to its dispatching
TIMING_SIZES = {"B": 2, "T": 6, "d": 16}


def build(shape_name: str, backend: str, **sizes):
    """``(model, inputs, label)``: the bench config at ``shape_name``, with ``sizes`` (e.g. ``B=4``)
    replacing the shape's."""
    from dataclasses import replace

    import common
    from test_bench_model import batch_for, config_for

    from interformer import InterFormerCTR, optimize

    shape = replace(common.ALL_SHAPES[shape_name], **sizes)
    cfg = config_for(shape)
    torch.manual_seed(0)
    model = optimize(InterFormerCTR(cfg).to(common.DEVICE), backend)
    inputs, label = batch_for(shape, cfg)
    return model, inputs, label


def _step(model, inputs, label, inference: bool):
    """``(forward, backward)``, the two halves of one step as the benchmark runs it: ``forward()``
    (bf16 autocast; a training step first drops the gradients) returns the logits or the loss,
    ``backward(loss)`` runs on the calling thread; and the grad mode the step runs in."""
    device = inputs[0].device.type
    params = list(model.parameters())

    def forward():
        if not inference:
            for p in params:
                p.grad = None
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(*inputs)
            return out if inference else model.loss(out, label)

    def backward(loss):
        if not inference:
            with torch.autograd.set_multithreading_enabled(False):
                loss.backward()

    return forward, backward, (torch.no_grad() if inference else contextlib.nullcontext())


def count(model, inputs, label, inference: bool) -> Dict[str, object]:
    """One counted step of ``model`` (after one warm-up): ``{"forward": Counter by arch,
    "backward": int, "launches_fwd": int, "launches_bwd": int, "nodes": Counter by kind, "ops":
    Counter by (arch or "backward", aten op name)}``."""
    from interformer.profiling import triton_launches

    forward, backward, grad_mode = _step(model, inputs, label, inference)
    result = {"forward": Counter(), "backward": 0, "launches_fwd": 0, "launches_bwd": 0, "nodes": Counter(),
              "ops": Counter()}
    where = _Where(model)
    try:
        with triton_launches(run=False) as launches, grad_mode:
            backward(forward())  # warm-up
            launches.clear()
            with _counting_mode(result["forward"], where, result["ops"]):
                loss = forward()
            result["launches_fwd"] = sum(launches.values())
            if not inference:
                result["nodes"] = _nodes(loss.grad_fn)
                launches.clear()
                counted = Counter()
                with _counting_mode(counted, None, result["ops"]):
                    backward(loss)
                result["backward"] = counted["backward"]
                result["launches_bwd"] = sum(launches.values())
    finally:
        where.remove()
    return result


class _LinearSkipped(torch.autograd.Function):
    """The autograd node :func:`linears_skipped` puts where a linear layer's nodes were: its
    gradients are zeros of the inputs' shapes (what a timing needs, not values)."""

    @staticmethod
    def forward(ctx, out, x, weight, bias):
        ctx.like = [None if t is None else (t.shape, t.dtype) for t in (x, weight, bias)]
        return out

    @staticmethod
    def backward(ctx, grad):
        return (None, *(None if like is None else grad.new_zeros(like[0], dtype=like[1]) for like in ctx.like))


@contextlib.contextmanager
def linears_skipped():
    """Every ``nn.Linear`` returns zeros of its output's shape and dtype (the autocast dtype where
    autocast is on, whatever the input's) and, with grad on, one autograd node that returns zeros
    as the gradients of its input, weight and bias: the graph keeps its shape, the layer's
    arithmetic and its own aten ops (casts, ``addmm``) are gone. ``nn.Linear.forward`` itself is
    replaced, process-wide, while the context is active: a subclass that overrides ``forward`` and
    a layer given its own ``forward`` attribute run as they are. Why: under autocast on a CPU a
    linear layer casts its weight and runs a bf16 GEMM, both growing with the weight, so the
    layers, which neither backend fuses, weigh on both steps by CPU-specific amounts (1.2-1.3 ms
    of the fused inference forward's 3.1-3.2 ms at :data:`TIMING_SIZES` on the CI CPU,
    2026-11-28), where a GPU's host only queues their kernels. Zeros, not uninitialised memory:
    whatever bits ``torch.empty`` returned would flow through the rest of the step, and denormals
    or NaNs can make a CPU's arithmetic much slower."""
    plain = torch.nn.Linear.forward

    def forward(self, input):  # nn.Linear.forward's parameter name: layer(input=x) works too
        dev = input.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else input.dtype
        out = input.new_zeros((*input.shape[:-1], self.out_features), dtype=dtype)
        if torch.is_grad_enabled():
            out = _LinearSkipped.apply(out, input, self.weight, self.bias)
        return out

    torch.nn.Linear.forward = forward
    try:
        yield
    finally:
        torch.nn.Linear.forward = plain


@contextlib.contextmanager
def _one_thread():
    """torch's intra-op threads set to one, then restored. The host proxy times dispatching, which
    is one thread's work; with two threads on a two-core machine where another process kept one
    core busy, every parallel region waited for the descheduled thread and a step took 50 to 100
    times as long (2026-11-28: an eager inference forward 186-318 ms instead of 3.6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def seconds_per_step(model, inputs, label, inference: bool, steps: int = 20, skip_linears: bool = False) -> float:
    """Wall seconds per step with every Triton launch skipped (best of 3 runs of ``steps``), on one
    torch thread (:func:`_one_thread`); ``skip_linears``: under :func:`linears_skipped`."""
    from interformer.profiling import triton_launches

    forward, backward, grad_mode = _step(model, inputs, label, inference)
    best = float("inf")
    with (triton_launches(run=False), grad_mode, _one_thread(),
          linears_skipped() if skip_linears else contextlib.nullcontext()):
        backward(forward())
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(steps):
                backward(forward())
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / steps)
    return best


def table(results: Dict[str, Dict[str, object]], inference: bool) -> str:
    """The side-by-side table of :func:`count`'s results for each backend."""
    names = list(results)
    rows = []
    keys = [k for a in ARCHES for k in (a, f"{a}, nn.Linear")
            if any(r["forward"].get(k) for r in results.values())]
    rows += [(f"forward aten ops: {k}", [r["forward"].get(k, 0) for r in results.values()]) for k in keys]
    rows.append(("forward aten ops, all", [sum(r["forward"].values()) for r in results.values()]))
    rows.append(("forward Triton launches", [r["launches_fwd"] for r in results.values()]))
    if not inference:
        rows.append(("backward aten ops", [r["backward"] for r in results.values()]))
        rows.append(("backward Triton launches", [r["launches_bwd"] for r in results.values()]))
        kinds = sorted({k for r in results.values() for k in r["nodes"]})
        rows += [(f"autograd nodes: {k}", [r["nodes"].get(k, 0) for r in results.values()]) for k in kinds]
        rows.append(("autograd nodes, all", [sum(r["nodes"].values()) for r in results.values()]))
    width = max(len(label) for label, _ in rows)
    lines = [f"{'':<{width}} " + " ".join(f"{n:>9}" for n in names)]
    lines += [f"{label:<{width}} " + " ".join(f"{v:>9}" for v in values) for label, values in rows]
    return "\n".join(lines)


def by_op(results: Dict[str, Dict[str, object]], most: int) -> str:
    """Where each backend's aten ops come from, by name: for every arch (and the backward) the
    ``most`` most frequent ops, ``name x count``. What a change meant to cut ops would remove."""
    lines = []
    for backend, r in results.items():
        lines.append(f"{backend}:")
        places = [a for a in ARCHES for a in (a, f"{a}, nn.Linear")] + ["backward"]
        for place in places:
            ops = Counter({op: n for (where, op), n in r["ops"].items() if where == place})
            if ops:
                top = ", ".join(f"{op} x{n}" for op, n in ops.most_common(most))
                more = len(ops) - min(most, len(ops))
                lines.append(f"  {place} ({sum(ops.values())}): {top}" + (f", ... ({more} more)" if more else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    import common

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="taobao", choices=list(common.ALL_SHAPES))
    parser.add_argument("--batch", type=int, default=4, help="samples per step (the counts do not depend on it)")
    parser.add_argument("--inference", action="store_true", help="the forward alone, under torch.no_grad()")
    parser.add_argument("--time", action="store_true", help="also time each step, launches skipped (a host proxy)")
    parser.add_argument("--by-op", type=int, default=0, metavar="N",
                        help="also list, per arch and for the backward, each backend's N most frequent aten ops")
    args = parser.parse_args(argv)
    if args.batch < 2:
        parser.error("--batch must be at least 2 (the bench batch has one full and one empty sequence)")

    results, seconds = {}, {}
    for backend in ("eager", "triton"):
        model, inputs, label = build(args.shape, backend, B=args.batch)
        model.train(not args.inference)
        results[backend] = count(model, inputs, label, args.inference)
        if args.time:
            model, inputs, label = build(args.shape, backend, **TIMING_SIZES)
            model.train(not args.inference)
            seconds[backend] = [seconds_per_step(model, inputs, label, args.inference, skip_linears=skip)
                                for skip in (False, True)]
    what = "inference forward" if args.inference else "training step (forward, loss, backward)"
    print(f"one {what} at {args.shape}'s sizes (batch {args.batch}), bf16 autocast on "
          f"{common.DEVICE.type}, Triton launches counted and skipped")
    print(table(results, args.inference))
    if args.by_op > 0:
        print(f"\nmost frequent aten ops by where they come from (top {args.by_op}):")
        print(by_op(results, args.by_op))
    if seconds:
        sizes = ", ".join(f"{k} = {v}" for k, v in TIMING_SIZES.items())
        print(f"\nstep time with every launch skipped, at {sizes} (this machine's host; on a CPU a rough proxy, "
              f"see --help):")
        print(f"  {'':<7} {'as run':>10} {'nn.Linear skipped':>18}")
        for backend, (run, skipped) in seconds.items():
            print(f"  {backend:<7} {run * 1e3:7.3f} ms {skipped * 1e3:15.3f} ms")
        ratios = [e / t for e, t in zip(seconds["eager"], seconds["triton"])]
        print(f"  eager / triton: {ratios[0]:.2f}x as run, {ratios[1]:.2f}x with nn.Linear skipped "
              f"(the two bracket the linear layers' host cost on a GPU: see --help)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
