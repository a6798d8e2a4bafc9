"""Run InterFormerCTR training steps with NVTX ranges, for Nsight Systems / Nsight Compute.

    python profiling/train_step.py --shape taobao --backend triton --steps 10 [--torch-profiler] [--host]
                                   [--compile [--compile-backend inductor]] [--inference]

Warm-up steps run first; the measured steps sit between ``cudaProfilerStart``/``Stop`` so
``nsys profile --capture-range=cudaProfilerApi`` (and ``ncu --profile-from-start off``) records only
them. With ``--torch-profiler`` the script also records the steps with ``torch.profiler`` and prints
a per-range CUDA time table (the same range names as the NVTX ones), which works where Nsight
Systems is not available (do not combine it with nsys or ncu: all three want CUPTI). The ranges:
``train_step``, ``backward`` (the ``backward()`` call), each arch and fused op's forward and its
``<name>.backward`` (on the thread running the backward; ``--no-backward-ranges`` leaves those out).

``--compile`` runs the model through ``torch.compile`` (warm-up steps included, so the measured
steps are steady state), ``--inference`` times the forward alone under ``torch.no_grad()``: on
the H200 the compiled fused model's inference (12.2 ms) was slower than the plain one (9.4 ms),
and ``--compile --inference --torch-profiler`` shows where.

``--host`` answers "is this step launch-bound, and where does the host time go?": it prints the
plain step time, the same with the backward on the calling thread instead of the autograd
engine's device thread, the same step captured in a CUDA graph and replayed (device time alone; GPU only),
and a cProfile of the plain steps, summed by where the Python time is spent (Triton's launcher,
the fused ops' launchers, the model code, ``torch.nn`` module machinery, the autograd engine, which
includes the C++ of every backward op and the fused ops' backward launchers) plus the top entries.

Without a GPU the kernels run under the Triton interpreter: only the ``smoke`` shape (the default
there) runs in reasonable time, so another shape is refused unless ``--allow-cpu`` is given; the
run says its timings are not meaningful, the ``--torch-profiler`` tables have no device-time
columns (there is no device) and ``--host`` names the interpreter, not Triton's launcher.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections import defaultdict
from typing import Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: the ranges the model marks (``interformer.profiling.ranged``), each also as ``<name>.backward``
MODEL_RANGES = ("CrossArch.nonseq", "CrossArch.seq", "InteractionArch", "SequenceArch", "GatedLCE", "PersonalizedFFN",
                "CrossNet", "LowRankCrossNet", "DotInteraction", "RotaryMultiHeadAttention",
                "PoolingMultiHeadAttention", "ResidualLayerNorm", "FeedForward")
#: every range of a step, in the table's order: the step's own (``backward``: the ``backward()`` call
#: on the calling thread), the model's forward ranges, then their backward ranges (on the thread
#: that runs the backward: autograd's device thread on a GPU)
RANGES = ("train_step", "backward") + MODEL_RANGES + tuple(f"{name}.backward" for name in MODEL_RANGES)


def build(shape_name: str, backend: str, compile: bool = False, compile_backend: str = "inductor",
          inference: bool = False, backward_range: Optional[str] = None):
    """``(model, make_step)`` at the benchmark shape ``shape_name``: ``make_step(cache_enabled=True)``
    builds one training step (bf16 autocast on a GPU; CUDA-graph capture needs autocast without its
    cast cache), or the inference forward under ``torch.no_grad()``; ``compile`` runs the model
    through ``torch.compile``; ``backward_range`` names a ``torch.profiler.record_function`` range
    around ``backward()`` (``profiling/autograd_threads.py`` finds the backward by it)."""
    import common
    from test_bench_model import batch_for, config_for

    from interformer import InterFormerCTR, optimize
    from interformer.profiling import nvtx_range

    shape = common.ALL_SHAPES[shape_name]
    cfg = config_for(shape)
    model = optimize(InterFormerCTR(cfg).to(common.DEVICE), backend)
    inputs, label = batch_for(shape, cfg)
    params = list(model.parameters())
    run = torch.compile(model, backend=compile_backend) if compile else model

    def make_step(cache_enabled: bool = True):
        autocast = torch.autocast(common.DEVICE.type, dtype=common.DTYPE, enabled=common.ON_GPU,
                                  cache_enabled=cache_enabled)
        marked = torch.profiler.record_function(backward_range) if backward_range else contextlib.nullcontext()

        def step():
            with nvtx_range("train_step"):
                if inference:
                    with torch.no_grad(), autocast:
                        run(*inputs)
                    return
                for p in params:
                    p.grad = None
                with autocast:
                    loss = model.loss(run(*inputs), label)
                with nvtx_range("backward"), marked:
                    loss.backward()
        return step
    return model, make_step


def main(argv=None) -> int:
    import common

    from interformer.profiling import enable_nvtx

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="taobao" if common.ON_GPU else "smoke", choices=list(common.ALL_SHAPES))
    parser.add_argument("--backend", default="triton", choices=["eager", "triton", "auto"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--torch-profiler", action="store_true", help="print a per-range CUDA time table")
    parser.add_argument("--host", action="store_true",
                        help="plain vs CUDA-graph step time and a cProfile of the host side")
    parser.add_argument("--compile", action="store_true", help="run the model through torch.compile")
    parser.add_argument("--compile-backend", help="torch.compile's backend (with --compile; default inductor)")
    parser.add_argument("--inference", action="store_true", help="the forward alone, under torch.no_grad()")
    parser.add_argument("--no-backward-ranges", action="store_true",
                        help="mark the forward only (the backward ranges add two autograd nodes per marked call)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without a GPU, run a shape other than smoke anyway (the interpreter takes hours)")
    args = parser.parse_args(argv)
    if args.compile_backend is not None and not args.compile:
        parser.error("--compile-backend needs --compile")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if not common.ON_GPU and args.shape != "smoke" and not args.allow_cpu:
        parser.error(f"--shape {args.shape}: no GPU, so every kernel runs under the Triton interpreter, which "
                     "takes hours at this shape; use --shape smoke, or --allow-cpu to run it anyway")
    if not common.ON_GPU:
        print(f"note: {common.SMOKE_NOTE}")
    args.compile_backend = args.compile_backend or "inductor"

    _, make_step = build(args.shape, args.backend, args.compile, args.compile_backend, args.inference)
    step = make_step()

    # Ranges on before the warm-up: ``ranged`` reads the flag, dynamo guards on it, and turning it
    # on after a compiled warm-up recompiled inside the measured steps (H200, 2026-11-27: the
    # compiled profile's "Torch-Compiled Region: 0/1" and its fake-tensor dispatches). The capture
    # range (cudaProfilerStart/Stop) still starts after the warm-up.
    enable_nvtx(True, backward=not args.no_backward_ranges)
    prof = None
    try:  # the flag is process-wide: never left on (tests call main in-process)
        for _ in range(args.warmup):
            step()
        if common.ON_GPU:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        if args.torch_profiler:
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if common.ON_GPU else [])
            prof = torch.profiler.profile(activities=acts)
            prof.__enter__()
        for _ in range(args.steps):
            step()
        if common.ON_GPU:
            torch.cuda.synchronize()
    finally:
        if prof is not None:
            prof.__exit__(None, None, None)
        if common.ON_GPU:
            torch.cuda.profiler.stop()
        enable_nvtx(False)

    if args.host:
        host_breakdown(make_step, args.steps)

    if prof is not None:
        averages = prof.key_averages()
        compiled = ""
        if args.compile:
            from interformer import compile_reference_ops
            from interformer.backend import inlines_on

            compiled = (f", compiled: reference ops {','.join(sorted(compile_reference_ops())) or 'none'}, "
                        f"kept ops {'inlined' if inlines_on(common.DEVICE) else 'custom ops'}")
        print(f"\nper-range time over {args.steps} steps ({args.shape}, backend={args.backend}{compiled}, "
              f"{common.environment()['device']})")
        print(range_table(averages, args.steps, device=common.ON_GPU))
        if common.ON_GPU:
            print("\nthis package's Triton kernels by device time:")
            print(kernel_table(averages, args.steps, package_kernel_names()))
            print("\nkernels by device time:")
            print(averages.table(sort_by="device_time_total", row_limit=15))
        else:
            print("\nops by CPU time (no GPU: no device kernels or device time):")
            print(averages.table(sort_by="cpu_time_total", row_limit=15))
    return 0


def _self_device_time(evt) -> float:
    return getattr(evt, "self_device_time_total", 0.0) or getattr(evt, "self_cuda_time_total", 0.0)


def _kernel_rows(averages):
    """The rows of a ``torch.profiler`` ``key_averages()`` that are device kernels: device rows that
    are not a range's (a range's device row is its span on the GPU timeline, not a kernel)."""
    cpu_type = torch.autograd.DeviceType.CPU
    return [evt for evt in averages if getattr(evt, "device_type", cpu_type) != cpu_type
            and evt.key not in RANGES and not getattr(evt, "is_user_annotation", False)]


def range_table(averages, steps: int, device: bool = True) -> str:
    """The per-range table of a ``torch.profiler`` run (its ``key_averages()``).

    The profiler reports a named range twice: a host row (its CPU time, its call count, and the
    device time of the kernels launched from that thread inside it) and a device row (the range's
    span on the GPU timeline, first kernel start to last kernel end, idle gaps included). Adding the
    two, as this script once did, doubled the calls and mixed a span with a kernel sum. Here they
    are separate columns. Backward kernels run on the thread that runs the backward (autograd's own
    device thread on a GPU), so a module's forward range has only forward kernels in "kernels" and
    its ``<name>.backward`` range (opened on that thread) the backward's; ``backward`` is the
    ``backward()`` call on the calling thread (its host time; on a GPU its kernels are launched from
    the device thread and show under the ``.backward`` ranges). The last line is the device time of
    all kernels per step (range rows excluded). ``device=False`` (no GPU) leaves the device columns
    and that line out: there is no device time to show."""
    cpu_type = torch.autograd.DeviceType.CPU
    host, span = {}, defaultdict(float)
    for evt in averages:
        if evt.key in RANGES:
            device_total = getattr(evt, "device_time_total", 0.0) or getattr(evt, "cuda_time_total", 0.0)
            if getattr(evt, "device_type", cpu_type) == cpu_type:
                host[evt.key] = (evt.count, evt.cpu_time_total, device_total)
            else:
                span[evt.key] += device_total
    if not device:
        lines = [f"{'range':<28} {'calls/step':>10} {'CPU ms':>9}   (per step; no GPU: no device time)"]
        lines += [f"{name:<28} {host[name][0] / steps:>10.1f} {host[name][1] / 1e3 / steps:>9.3f}"
                  for name in RANGES if name in host]
        return "\n".join(lines)
    kernels_total = sum(_self_device_time(evt) for evt in _kernel_rows(averages))
    lines = [f"{'range':<28} {'calls/step':>10} {'CPU ms':>9} {'kernels ms':>11} {'GPU span ms':>12}   (per step)"]
    for name in RANGES:
        if name in host or name in span:
            n, cpu, kern = host.get(name, (0, 0.0, 0.0))
            lines.append(f"{name:<28} {n / steps:>10.1f} {cpu / 1e3 / steps:>9.3f} {kern / 1e3 / steps:>11.3f} "
                         f"{span.get(name, 0.0) / 1e3 / steps:>12.3f}")
    lines.append(f"all kernels: {kernels_total / 1e3 / steps:.3f} ms of device time per step")
    lines.append("(kernels = device time of the kernels launched inside the range from its thread; GPU span = "
                 "first kernel start to last kernel end; ranges nest)")
    return "\n".join(lines)


def package_kernel_names() -> set:
    """Names of every ``@triton.jit`` kernel of ``interformer.kernels`` (as the profiler names them)."""
    from interformer.kernels import kernel_modules

    return {attr for mod in kernel_modules() for attr, value in vars(mod).items()
            if attr.endswith("_kernel") and hasattr(value, "arg_names")}  # a JIT (or interpreted) kernel


def kernel_table(averages, steps: int, names: set) -> str:
    """Device time per step of each of this package's Triton kernels (``names``), largest first,
    with launches per step and time per launch, and their sum against all kernels' time: which
    fused kernel to look at next (the range table only says which module)."""
    kernels = _kernel_rows(averages)
    total = sum(_self_device_time(evt) for evt in kernels)
    rows = sorted(((_self_device_time(evt), evt.count, evt.key) for evt in kernels if evt.key in names), reverse=True)
    mine = sum(t for t, _, _ in rows)
    lines = [f"{'fused kernel':<28} {'launches/step':>13} {'us/step':>9} {'us/launch':>10}"]
    lines += [f"{k:<28} {n / steps:>13.1f} {t / steps:>9.1f} {t / max(n, 1):>10.2f}" for t, n, k in rows]
    lines.append(f"these kernels: {mine / 1e3 / steps:.3f} ms of {total / 1e3 / steps:.3f} ms device time per step")
    return "\n".join(lines)


#: cProfile entries by file: the first matching fragment names the group.
HOST_GROUPS = (("triton/", "Triton launcher (triton.runtime)"), ("interformer/kernels/", "fused-op launchers"),
               ("/kernels/", "fused-op launchers"), ("interformer/", "model code (interformer)"),
               ("torch/nn/", "torch.nn module machinery"), ("run_backward", "autograd engine (backward ops, C++ and Python)"))
#: without a GPU ``triton/`` is the interpreter running the kernels, not a launcher
INTERPRETER_GROUP = "Triton interpreter (triton/: runs the kernels, no GPU)"


def _group(func, on_gpu: bool = True) -> str:
    filename, _, name = func
    where = f"{filename}:{name}"
    for fragment, group in HOST_GROUPS:
        if fragment in where:
            return group if on_gpu or fragment != "triton/" else INTERPRETER_GROUP
    return "torch ops and the rest"


def _timed(fn, steps: int) -> float:
    """ms per call of ``fn`` over ``steps`` calls, the device synchronised at the end."""
    from interformer.profiling import seconds_per_call

    return seconds_per_call(fn, steps)[1] * 1e3


def host_breakdown(make_step, steps: int) -> dict:
    """Print (and return) plain and graphed step times and the host time by group;
    ``make_step(cache_enabled)`` builds the training step."""
    import cProfile
    import pstats

    import common

    step = make_step()
    step()  # untimed: a compiled model recompiles here once the ranges are off again (main's flag)
    plain = _timed(step, steps)
    # on a GPU the autograd engine runs the backward on its own device thread, which must take the
    # GIL for every Python backward (each fused op's); the same step with the backward on this thread
    with torch.autograd.set_multithreading_enabled(False):
        one_thread = _timed(step, steps)
    graphed = _timed(common.captured(make_step(cache_enabled=False)), steps) if common.ON_GPU else None
    prof = cProfile.Profile()
    prof.enable()
    _timed(step, steps)
    prof.disable()
    stats = pstats.Stats(prof)
    groups = defaultdict(float)
    for func, (_, _, tottime, _, _) in stats.stats.items():
        groups[_group(func, common.ON_GPU)] += tottime
    total = sum(groups.values())
    print(f"\nplain step: {plain:.2f} ms" + (f"; the same step as a CUDA graph replay: {graphed:.2f} ms "
                                              f"(device time; the plain step is {plain / graphed:.2f}x that)"
                                              if graphed else " (no GPU: no CUDA-graph replay)"))
    print(f"plain step with the backward on the calling thread (autograd multithreading off): {one_thread:.2f} ms")
    print(f"host time under cProfile, {total / steps * 1e3:.1f} ms/step (profiling inflates it), by group:")
    for group, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {group:<48} {t / steps * 1e3:8.2f} ms/step  {100 * t / total:5.1f}%")
    print("\ntop entries by own time:")
    stats.sort_stats("tottime").print_stats(20)
    return {"plain_ms": plain, "one_thread_ms": one_thread, "graphed_ms": graphed,
            "host_groups_ms": {k: v / steps * 1e3 for k, v in groups.items()}}


if __name__ == "__main__":
    raise SystemExit(main())
