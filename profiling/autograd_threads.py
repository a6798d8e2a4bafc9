"""Why a plain backward costs more host time on a GPU than on the calling thread.

    python profiling/autograd_threads.py [--shape taobao] [--steps 10] [--ops 200]

Why: on the H200 (2026-11-27, ``bench/results/nvidia-h200-2026-11-27-host.md``) the plain fused
training step at ``taobao`` took 37.2 ms, and 26.6 ms with autograd's multithreading off (the
backward on the calling thread instead of the engine's CUDA device thread); eager's 41.3 and 35.7
ms. A fused op's plain forward+backward lost 110-680 us to the device thread (``op_host.py``), far
more than the two thread hand-offs one ``backward()`` needs. This script says where that goes.

Part 1 (``--ops`` calls each): the host cost of one small aten op (``torch.add`` on a tiny tensor),
one tensor allocation and one Triton launch, timed with ``perf_counter`` *inside* a Python
backward, so on the thread that runs it: the engine's device thread (multithreading on) or the
calling thread (off), beside the same loop on the calling thread outside autograd. If Python code
itself runs slower on the device thread, it shows here per op.

Part 2 (``--steps`` steps each): the training step of ``profiling/train_step.py`` (fused and
eager, bf16 autocast) under ``torch.profiler`` (host events only), multithreading on and off:
per step, the backward's wall time, the number of autograd nodes run and the sum of their own
spans (``autograd::engine::evaluate_function``), and the gaps between them on the thread that ran
them -- time the engine spends between nodes (queueing, waking a thread, taking the GIL). The
node names whose spans grow most with the device thread close the table.

Without a GPU there is no device thread (the CPU's ready queue is the calling thread) and the two
modes time the same thing.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import train_step  # noqa: E402  (profiling/, after TRITON_INTERPRET is set)

NODE = "autograd::engine::evaluate_function: "
#: the profiler range around each backward() call (train_step.build's backward_range)
BACKWARD = "backward_wall"


def _loop_us(body, n: int) -> float:
    """Microseconds per iteration of ``body`` over ``n`` iterations on the current thread."""
    start = time.perf_counter()
    for _ in range(n):
        body()
    return (time.perf_counter() - start) / n * 1e6


def _bodies(device):
    """name -> zero-argument callable of one small host-side operation."""
    from launch_overhead import _copy_kernel

    x = torch.ones(64, device=device)
    y = torch.empty_like(x)
    return {
        "torch.add": lambda: torch.add(x, 1.0),
        "torch.empty": lambda: torch.empty(64, device=device),
        "Triton JIT launch": lambda: _copy_kernel[(1,)](x, y, 64, BLOCK=64),
    }


def inside_backward(device, n: int) -> dict:
    """``{body: {"calling thread": us, "in backward, device thread": us, "in backward, one thread": us}}``,
    and under ``"thread"`` whether each backward ran on the calling thread (``{column: bool}``)."""
    bodies = _bodies(device)
    timings: dict = defaultdict(dict)
    caller = threading.get_ident()

    class Probe(torch.autograd.Function):
        where = ""

        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            timings["thread"][Probe.where] = threading.get_ident() == caller
            for name, body in bodies.items():
                body()  # warm on this thread
                timings[name][Probe.where] = _loop_us(body, n)
            return g

    for name, body in bodies.items():
        body()
        timings[name]["calling thread"] = _loop_us(body, n)
    leaf = torch.ones(8, device=device, requires_grad=True)
    for where, threads in (("in backward, device thread", True), ("in backward, one thread", False)):
        Probe.where = where
        with torch.autograd.set_multithreading_enabled(threads):
            Probe.apply(leaf).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return dict(timings)


def node_spans(step, steps: int, threads: bool) -> dict:
    """Per step: backward wall time, nodes run, the sum of their spans, the gaps between them on
    their thread (all in us), and the mean span per node name."""
    from torch.profiler import ProfilerActivity, profile

    with torch.autograd.set_multithreading_enabled(threads):
        step()
        step()
        with profile(activities=[ProfilerActivity.CPU], acc_events=True) as prof:
            for _ in range(steps):
                step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    events = prof.events()
    nodes = [e for e in events if e.name.startswith(NODE)]
    backward = [e for e in events if e.name == BACKWARD]
    by_thread = defaultdict(list)
    for e in nodes:
        by_thread[e.thread].append((e.time_range.start, e.time_range.end))
    # time inside each backward() call not covered by any node's span: the engine between nodes
    # (queueing, waking a thread, taking the GIL) and the hand-offs at its start and end
    spans = sorted(s for v in by_thread.values() for s in v)
    gaps = 0.0
    for b in backward:
        start, end = b.time_range.start, b.time_range.end
        covered, reach = 0.0, start
        for s, t in spans:
            s, t = max(s, reach), min(t, end)
            if t > s:
                covered += t - s
                reach = t
        gaps += (end - start) - covered
    per_name = defaultdict(list)
    for e in nodes:
        per_name[e.name[len(NODE):]].append(e.time_range.end - e.time_range.start)
    wall = sum(e.time_range.end - e.time_range.start for e in backward)
    return {
        "backward_us": wall / steps,
        "nodes": len(nodes) / steps,
        "node_span_us": sum(t - s for s, t in spans) / steps,
        "threads": len(by_thread),
        "mean_by_name": {k: sum(v) / len(v) for k, v in per_name.items()},
        "count_by_name": {k: len(v) / steps for k, v in per_name.items()},
        "gap_us": gaps / steps,
    }


def main(argv=None) -> int:
    import common

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="taobao" if common.ON_GPU else "smoke", choices=list(common.ALL_SHAPES))
    parser.add_argument("--steps", type=int, default=10 if common.ON_GPU else 1)
    parser.add_argument("--ops", type=int, default=200 if common.ON_GPU else 2)
    args = parser.parse_args(argv)
    for name in ("steps", "ops"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    where = torch.cuda.get_device_name() if common.ON_GPU else "CPU (no device thread: both modes run on this thread)"
    print(f"autograd's device thread vs the calling thread, {where}; torch {torch.__version__}")

    print(f"\nhost us per operation, {args.ops} calls, timed on the thread that runs them:")
    rows = inside_backward(common.DEVICE, args.ops)
    cols = ["calling thread", "in backward, device thread", "in backward, one thread"]
    print(f"  {'operation':<20}" + "".join(f"{c:>28}" for c in cols))
    on_caller = rows.pop("thread")
    for name, r in rows.items():
        print(f"  {name:<20}" + "".join(f"{r[c]:28.2f}" for c in cols))
    print("  (the backward ran on the calling thread: "
          + ", ".join(f"{c[len('in backward, '):]}: {'yes' if on_caller[c] else 'no'}" for c in cols[1:]) + ")")

    for backend in ("triton", "eager"):
        step = train_step.build(args.shape, backend, backward_range=BACKWARD)[1]()
        on, off = node_spans(step, args.steps, True), node_spans(step, args.steps, False)
        print(f"\ntraining step, {args.shape}, backend={backend}, {args.steps} steps under torch.profiler "
              f"(host events; profiling inflates every number), per step:")
        print(f"  {'':<28}{'backward us':>12}{'nodes':>8}{'node spans us':>15}{'gaps us':>10}{'threads':>9}")
        for label, r in (("device thread", on), ("one thread", off)):
            print(f"  {label:<28}{r['backward_us']:12.0f}{r['nodes']:8.0f}{r['node_span_us']:15.0f}"
                  f"{r['gap_us']:10.0f}{r['threads']:9d}")
        grow = sorted(((on["mean_by_name"][k] - off["mean_by_name"].get(k, 0.0)) * on["count_by_name"][k], k)
                      for k in on["mean_by_name"])
        print("  nodes whose spans grow most on the device thread (us per step, mean us on / off, count):")
        for d, k in reversed(grow[-8:]):
            print(f"    {d:9.1f}  {on['mean_by_name'][k]:8.1f} / {off['mean_by_name'].get(k, float('nan')):8.1f}"
                  f"  x{on['count_by_name'][k]:.0f}  {k[:90]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
