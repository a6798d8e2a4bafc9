"""Where the host time of one fused op, run plainly (no CUDA graph), goes.

    python profiling/op_host.py [--shape taobao] [--ops layernorm_dhen,dot_interaction,...] [--calls 100] [--profile]

Why: on the H100 (2026-11-26, ``bench/results/nvidia-h100-2026-11-26-ops.md``) a fused op's forward
+ backward took 0.45-0.86 ms plainly and 0.02-0.08 ms as a CUDA-graph replay, so its plain time is
host time; but its few Triton launches (20-46 us each in ``launch_overhead.py``'s loop) and a dozen
aten ops do not add up to that. This script splits one op's plain host time so the next GPU run
says where the rest goes.

Each op's callable is the one its benchmark times (``bench/test_bench_<op>.py``, ``full`` mode, the
``fused`` and ``eager`` providers): the benchmark function runs with ``common.run`` replaced by a
capture. Each callable is then timed in a loop of ``--calls`` calls without synchronising inside it
(fewer than the ~1,000 launches the driver queues, so the loop does not wait for the device):

* ``fused``: as benchmarked;
* ``fused, one thread``: the same with autograd's multithreading off, so that the backward runs
  on the calling thread (on a GPU it otherwise runs on the engine's device thread, which takes the
  GIL for each Python backward: the fused ops' are Python, eager's are not);
* ``fused, launches skipped``: the same with every Triton launch returning at once (the JIT's
  ``run`` replaced), leaving the launchers' Python, the aten ops around the kernels and autograd;
* ``eager``: the eager provider.

"issue" is the loop's wall time per call before the final synchronisation (host time while the
host is the bottleneck), "with device" after it. Each row also counts, in one call, the aten ops
(``TorchDispatchMode``; views included) and the Triton launches. ``--profile`` adds a cProfile of
the fused calls, top entries by own time. Without a GPU the kernels run under the interpreter
(the "fused" rows then time the interpreter) and nothing here says anything about a GPU's host.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import os
import pstats
import sys

import torch

from interformer.profiling import seconds_per_call, triton_launches

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: op name -> (benchmark module, benchmark function, its extra arguments)
OPS = {
    "layernorm_dhen": ("test_bench_layernorm", "test_layernorm", {"use": "dhen"}),
    "dot_interaction": ("test_bench_dot_interaction", "test_dot_interaction", {}),
    "gated_lce_seq": ("test_bench_gated_lce", "test_gated_lce", {"use": "seq"}),
    "gated_lce_nonseq": ("test_bench_gated_lce", "test_gated_lce", {"use": "nonseq"}),
    "pffn_linear": ("test_bench_pffn", "test_pffn", {"pffn_mode": "linear"}),
    "pffn_mlp": ("test_bench_pffn", "test_pffn", {"pffn_mode": "mlp"}),
    "crossnet_low": ("test_bench_crossnet", "test_crossnet", {"rank": "low"}),
    "crossnet_full": ("test_bench_crossnet", "test_crossnet", {"rank": "full"}),
    "attention": ("test_bench_attention", "test_self_attention", {}),
    "pma": ("test_bench_attention", "test_pma", {}),
    "feed_forward": ("test_bench_feed_forward", "test_feed_forward", {}),
}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def benchmarked_callable(op: str, provider: str, shape_name: str):
    """The zero-argument callable ``bench/test_bench_<op>.py`` times for (shape, ``full``, provider)."""
    import common
    import pytest

    module_name, func_name, extra = OPS[op]
    func = getattr(importlib.import_module(module_name), func_name)
    captured = []
    patch = pytest.MonkeyPatch()
    patch.setattr(common, "run", lambda benchmark, fn, **kw: captured.append(fn) or {})
    try:
        kwargs = dict(extra, benchmark=None, shape_name=shape_name, mode="full", provider=provider)
        if "monkeypatch" in func.__code__.co_varnames[: func.__code__.co_argcount]:
            kwargs["monkeypatch"] = patch
        func(**kwargs)
    finally:
        patch.undo()
    if len(captured) != 1:
        raise RuntimeError(f"{op}: the benchmark captured {len(captured)} callables")
    return captured[0]


def aten_ops(fn) -> int:
    """Aten ops dispatched by one call of ``fn`` (views and allocations included)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def per_call_us(fn, calls: int):
    """(issue, with device): microseconds per call before and after the final synchronisation."""
    issued, done = seconds_per_call(fn, calls, warmup=min(5, calls))
    return issued * 1e6, done * 1e6


def measure(op: str, shape_name: str, calls: int) -> dict:
    """The rows of one op: ``{variant: {"issue_us", "device_us", "aten_ops", "launches"}}``."""
    fused = benchmarked_callable(op, "fused", shape_name)
    eager = benchmarked_callable(op, "eager", shape_name)
    rows = {}
    variants = (("fused", fused, True, True), ("fused, one thread", fused, True, False),
                ("fused, launches skipped", fused, False, True), ("eager", eager, True, True))
    for name, fn, run, threads in variants:
        with triton_launches(run) as counter, torch.autograd.set_multithreading_enabled(threads):
            fn()  # warm: compilation, caches
            counter.clear()
            ops = aten_ops(fn)
            n_launch = sum(counter.values())
            issue, device = per_call_us(fn, calls)
        rows[name] = {"issue_us": issue, "device_us": device, "aten_ops": ops, "launches": n_launch}
    return rows


def profile(fn, calls: int, top: int = 14) -> str:
    fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    _sync()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    # where a Triton launch's own time goes (binding, cache lookup, the driver's launcher, or a
    # compile or disk-cache load that should not happen in steady state)
    stats.sort_stats("cumulative").print_callees(r"triton/runtime/\w+\.py:\d+\(run\)")
    return out.getvalue()


def main(argv=None) -> int:
    import common
    import triton

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="taobao" if common.ON_GPU else "smoke", choices=list(common.ALL_SHAPES))
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {', '.join(OPS)}")
    parser.add_argument("--calls", type=int, default=100 if common.ON_GPU else 3)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of each fused op")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    ops = [o for o in args.ops.split(",") if o]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        parser.error(f"unknown op(s) {unknown}; choose from {list(OPS)}")

    where = torch.cuda.get_device_name() if common.ON_GPU else "CPU (Triton interpreter: not a GPU's host)"
    print(f"plain fwd+bwd host time per call, shape {args.shape}, {args.calls} calls, {where}; "
          f"torch {torch.__version__}, triton {triton.__version__}")
    print(f"  {'op':<16} {'variant':<24} {'issue us':>9} {'w/ device':>10} {'aten ops':>9} {'launches':>9}")
    for op in ops:
        rows = measure(op, args.shape, args.calls)
        for name, r in rows.items():
            print(f"  {op:<16} {name:<24} {r['issue_us']:9.1f} {r['device_us']:10.1f} {r['aten_ops']:9d} {r['launches']:9d}")
        if args.profile:
            print(profile(benchmarked_callable(op, "fused", args.shape), args.calls))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
