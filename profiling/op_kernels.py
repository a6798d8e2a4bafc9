"""The device time of every CUDA kernel one call of a fused op launches, per benchmark provider.

    python profiling/op_kernels.py [--ops crossnet_low,gated_lce_seq] [--providers fused,compile,eager]
                                   [--shape taobao] [--calls 20] [--set crossnet.LOW_RANK_BACKWARD=phases ...]
                                   [--ncu]

Why: a benchmark row gives one number per op and provider (the low-rank cross net's fused forward
+ backward took 0.136 ms graphed, Inductor's 0.124 ms) and says nothing of which kernel costs it.
This script lists each kernel of one call, so the slow one can be looked at (``ncu.sh`` then says why:
``NCU_SCRIPT=op_kernels profiling/ncu.sh REGEX --ops ... --shape ...`` runs this script with ``--ncu``,
which makes the calls between ``cudaProfilerStart`` and ``cudaProfilerStop`` instead of timing them).

Each (op, provider) runs the callable its benchmark times (``bench/test_bench_<op>.py``, ``full``
mode: forward and backward; ``op_host.benchmarked_callable``), with any setting the benchmark makes
for that provider (``fused-phases``: ``crossnet.LOW_RANK_BACKWARD``) held over the calls. It is
called ``--warmup`` times (compilation, autotuning, caches), then ``--calls`` times under
``torch.profiler`` with CUDA activity. Every device row counts: cuBLAS, Inductor's ``triton_*``
kernels, this package's ``_..._kernel``s, memsets and copies; range rows do not. Per kernel: launches
per call, device microseconds per call and per launch, largest first; then their sum per call (the
op's device time, gaps between kernels excluded) and the kernel count per call.

The kernels run from plain calls, back to back (warm L2). A CUDA-graph replay runs the same kernels
for about the same durations; what it takes beyond their sum is the gaps between them (and, in
the benchmarks' ``do_bench``, an L2 flush before each replay: the first kernels read cold). So a
graphed row minus this sum is the idle time between kernels, not any one kernel's.

``--set MODULE.ATTR=VALUE`` (repeatable) sets a module-level setting of ``interformer.kernels.MODULE``
for the run (VALUE: an int, ``None``, ``True``/``False``, or else a string), e.g.
``crossnet.LOW_RANK_BACKWARD=phases``, ``gated_lce.GW_MODE=store``, ``crossnet.LOW_RANK_ROW_WARPS=8``.

Without a GPU each callable is still built and run once (the kernels under the Triton interpreter),
and the script says there are no device kernels to time: it prints no timing at all.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
from types import ModuleType

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def _sibling(name: str) -> ModuleType:
    """``profiling/<name>.py``, loaded by path (not registered in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(f"profiling_{name}", os.path.join(_HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# loading op_host puts bench/ on sys.path and, without a GPU, sets TRITON_INTERPRET before Triton loads
op_host = _sibling("op_host")
train_step = _sibling("train_step")

DEFAULT_PROVIDERS = ("fused", "compile", "eager")
NAME_WIDTH = 60


# --- --set ---------------------------------------------------------------------------------------

def _value(text: str):
    if text == "None":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        return text


def parse_setting(text: str):
    """``"MODULE.ATTR=VALUE"`` -> ``(module, attr, value)``; ValueError for a malformed, unknown or
    non-setting name (a function, class or module is not a setting)."""
    from interformer.kernels import OP_MODULES

    target, sep, raw = text.partition("=")
    module_name, dot, attr = target.strip().partition(".")
    if not sep or not dot or not module_name.isidentifier() or not attr.isidentifier():
        raise ValueError(f"--set {text!r}: expected MODULE.ATTR=VALUE, e.g. crossnet.LOW_RANK_BACKWARD=phases")
    full = f"interformer.kernels.{module_name}"
    try:
        module = importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if exc.name != full:
            raise
        raise ValueError(f"--set {text!r}: no module {full} (the op modules: {', '.join(OP_MODULES)})") from None
    current = getattr(module, attr, None)
    if not hasattr(module, attr) or callable(current) or isinstance(current, ModuleType):
        names = sorted(n for n, v in vars(module).items()
                       if n.isupper() and not callable(v) and not isinstance(v, ModuleType))
        raise ValueError(f"--set {text!r}: {full} has no setting {attr} (its settings: {', '.join(names)})")
    return module, attr, _value(raw.strip())


@contextlib.contextmanager
def settings(assignments):
    """Inside the block, each ``"MODULE.ATTR=VALUE"`` of ``assignments`` holds in
    ``interformer.kernels.MODULE``; the old values are back on leaving (ValueError: see
    :func:`parse_setting`, raised before anything is set)."""
    parsed = [parse_setting(a) for a in assignments]
    saved = []
    try:
        for module, attr, value in parsed:
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, value)
        yield parsed
    finally:
        for module, attr, old in reversed(saved):
            setattr(module, attr, old)


# --- the callables ---------------------------------------------------------------------------------

def benchmark_providers(op: str):
    """The providers ``op``'s benchmark function is parametrised with (None if it names none)."""
    module_name, func_name, _ = op_host.OPS[op]
    func = getattr(importlib.import_module(module_name), func_name)
    for mark in getattr(func, "pytestmark", []):
        if mark.name == "parametrize" and mark.args[0] == "provider":
            return list(mark.args[1])
    return None


def build(op: str, provider: str, shape_name: str):
    """``(fn, patches)``: the callable ``op``'s benchmark times for ``provider`` and the
    ``monkeypatch.setattr`` calls (their arguments) it made for that provider. ``benchmarked_callable``
    undoes those before it returns, so :func:`with_patches` puts them back around the calls."""
    import common
    import pytest

    patches = []
    original = pytest.MonkeyPatch.setattr

    def recording(self, *args, **kwargs):
        if args[:2] != (common, "run"):  # the capture's own patch
            patches.append((args, kwargs))
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pytest.MonkeyPatch, "setattr", recording)
        fn = op_host.benchmarked_callable(op, provider, shape_name)
    return fn, patches


@contextlib.contextmanager
def with_patches(patches):
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        for args, kwargs in patches:
            mp.setattr(*args, **kwargs)
        yield


def _describe(patches) -> str:
    out = []
    for args, _ in patches:
        if len(args) == 3:
            target, name, value = args
            out.append(f"{getattr(target, '__name__', type(target).__name__)}.{name}={value!r}")
        else:
            out.append(f"{args[0]}={args[1]!r}")
    return ", ".join(out)


# --- the table (pure) ---------------------------------------------------------------------------

def _short(name: str, width: int = NAME_WIDTH) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def per_call_rows(averages, calls: int):
    """``[(name, launches per call, us per call, us per launch)]`` of the device kernels among
    ``averages`` (rows as ``key_averages()`` gives them: host rows, range and user-annotation rows
    left out), largest device time first."""
    rows = [(evt.key, evt.count, train_step._self_device_time(evt)) for evt in train_step._kernel_rows(averages)]
    rows.sort(key=lambda r: (-r[2], r[0]))
    return [(key, n / calls, t / calls, t / max(n, 1)) for key, n, t in rows]


def per_call_table(averages, calls: int) -> str:
    """:func:`per_call_rows` as a table, then the sum of all kernels' device time per call and the
    number of kernel launches per call."""
    rows = per_call_rows(averages, calls)
    lines = [f"  {'kernel':<{NAME_WIDTH}} {'launches/call':>13} {'us/call':>9} {'us/launch':>10}"]
    lines += [f"  {_short(k):<{NAME_WIDTH}} {n:>13.1f} {t:>9.2f} {per:>10.2f}" for k, n, t, per in rows]
    total, count = sum(r[2] for r in rows), sum(r[1] for r in rows)
    lines.append(f"  all kernels: {total:.2f} us of device time per call, {count:.1f} kernels per call")
    return "\n".join(lines)


# --- running ---------------------------------------------------------------------------------------

def profile(fn, calls: int, warmup: int):
    """``key_averages()`` of ``calls`` calls of ``fn`` under the profiler, after ``warmup`` calls (GPU only)."""
    from torch.profiler import ProfilerActivity

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages()


def bracketed(fn, calls: int, warmup: int) -> None:
    """``calls`` calls of ``fn`` between ``cudaProfilerStart`` and ``cudaProfilerStop``, after
    ``warmup`` calls outside them (GPU only): what an outside profiler started with
    ``--profile-from-start off`` sees (``ncu.sh`` with ``NCU_SCRIPT=op_kernels``). No
    ``torch.profiler`` here: its CUPTI session would share the device with Nsight Compute's."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    try:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    finally:
        torch.cuda.profiler.stop()


def run_one(op: str, provider: str, shape_name: str, calls: int, warmup: int, ncu: bool = False) -> bool:
    """Print one (op, provider) section; False if its callable could not be built or run. With
    ``ncu``, the calls run for an outside profiler (:func:`bracketed`) and no times are printed."""
    import common
    import pytest

    title = f"{op}, {provider}"
    known = benchmark_providers(op)
    if known is not None and provider not in known:
        print(f"{title}: not a provider of this benchmark (it has {', '.join(known)})")
        return True
    try:
        fn, patches = build(op, provider, shape_name)
    except pytest.skip.Exception as exc:
        print(f"{title}: skipped by the benchmark: {getattr(exc, 'msg', exc)}")
        return True
    except Exception as exc:
        print(f"{title}: cannot build at shape {shape_name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return False
    extra = f" (benchmark settings: {_describe(patches)})" if patches else ""
    try:
        with with_patches(patches):
            if not common.ON_GPU:
                fn()
                print(f"{title}{extra}: built and ran once on the CPU")
                return True
            if ncu:
                bracketed(fn, calls, warmup)
            else:
                averages = profile(fn, calls, warmup)
    except Exception as exc:
        print(f"{title}{extra}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return False
    if ncu:
        print(f"{title}{extra}: {calls} call(s) between cudaProfilerStart and cudaProfilerStop")
        return True
    print(f"{title}{extra}:")
    print(per_call_table(averages, calls))
    return True


def main(argv=None) -> int:
    import common
    import triton

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(op_host.OPS), help=f"comma-separated, from {', '.join(op_host.OPS)}")
    parser.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS),
                        help="comma-separated benchmark providers (not the -cudagraph ones)")
    parser.add_argument("--shape", default="taobao" if common.ON_GPU else "smoke", choices=list(common.ALL_SHAPES))
    parser.add_argument("--calls", type=int, default=20, help="profiled calls (GPU)")
    parser.add_argument("--warmup", type=int, default=3, help="unprofiled calls first (GPU)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="MODULE.ATTR=VALUE",
                        help="a setting of interformer.kernels.MODULE for the run (repeatable)")
    parser.add_argument("--ncu", action="store_true",
                        help="no torch.profiler: run the calls between cudaProfilerStart/Stop for Nsight Compute "
                             "(profiling/ncu.sh with NCU_SCRIPT=op_kernels), print no times")
    args = parser.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    unknown = [o for o in ops if o not in op_host.OPS]
    if unknown:
        parser.error(f"unknown op(s) {unknown}; choose from {list(op_host.OPS)}")
    providers = [p for p in args.providers.split(",") if p]
    graphed = [p for p in providers if p.endswith(common.GRAPH_SUFFIX)]
    if graphed:
        parser.error(f"{graphed}: a CUDA-graph provider replays its base provider's kernels; name that one")
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    for text in args.settings:
        try:
            parse_setting(text)
        except ValueError as exc:
            parser.error(str(exc))

    where = torch.cuda.get_device_name() if common.ON_GPU else "no GPU (CPU, Triton interpreter)"
    print(f"CUDA kernels of one plain forward+backward call: {where}, torch {torch.__version__}, "
          f"triton {triton.__version__}, shape {args.shape}, {args.calls} calls, "
          f"--set {' '.join(args.settings) or 'none'}")
    ok = True
    with settings(args.settings):
        for op in ops:
            for provider in providers:
                ok = run_one(op, provider, args.shape, args.calls, args.warmup, args.ncu) and ok
    if not common.ON_GPU:
        print("no GPU: each callable above ran once on the CPU; there are no device kernels to time, "
              "so no times are printed")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
