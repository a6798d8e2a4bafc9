"""Host cost of one kernel launch on this machine: a PyTorch op, a Triton kernel through its JIT
launcher (few and many arguments), and the same compiled Triton kernel launched directly.

    python profiling/launch_overhead.py [--calls 500]    (the default on a GPU; 20 without one)

Why: at the DESIGN §6 shapes a plain (not CUDA-graphed) training step is bound by the host, so
what one launch costs on the host decides how much the fused path can gain outside a graph. The
fused training step issues about 90 Triton launches and 1,560 PyTorch ops against eager's 2,800
PyTorch ops (counted on a CPU with ``TorchDispatchMode``); whether the Triton launches are cheap or
dear next to a PyTorch op on the GPU's host decides whether a leaner launcher is worth writing.

Method: each launcher is called ``--calls`` times back to back on tiny tensors and the wall time
is divided by the number of calls, without synchronising inside the loop; the device is
synchronised before and after. The default 500 calls stay below the roughly 1,000 launches the
driver queues, so the loop never waits for a full queue and the number is host time. "direct" calls the compiled kernel's own launcher
(``CompiledKernel.run``), skipping the JIT's argument binding and cache lookup; it is checked
against the expected output before it is timed and reported as unavailable where this Triton's
launcher takes other arguments.

The "fwd+bwd" rows time one forward and ``backward()`` of a one-op graph, the way a fused op runs
in a training step: an aten op with its built-in autograd, an ``autograd.Function`` around aten
ops, and an ``autograd.Function`` whose forward and backward each launch the Triton kernel (the
backward from the autograd engine's device thread). The H100 run of 2026-11-26 timed single fused
ops plainly at 80-200 us of host time per launch (``bench/results/nvidia-h100-2026-11-26-ops.md``
against ``-host.md``'s 20-46 us per JIT launch in a loop); these rows say whether the Function and
the engine's thread make up the difference; the "one thread" rows repeat the two Functions with
autograd's multithreading off (the backward on the calling thread), which isolates the thread
hand-off and the GIL the engine's thread must take for a Python backward. Each iteration issues
two launches, so these rows run half as many iterations. On a machine without a GPU the Triton kernels run under the interpreter
and the numbers say nothing about launch cost.
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402  (after TRITON_INTERPRET is set)
import triton.language as tl  # noqa: E402

from interformer.profiling import seconds_per_call  # noqa: E402

#: how many int arguments the "many arguments" kernel takes: as many as the attention backward
#: (four 4-D tensors' strides and the sizes) has.
MANY = 36


@triton.jit
def _copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < n
    tl.store(Y + offs, tl.load(X + offs, mask=m), mask=m)


def _many_args_kernel_source(count: int) -> str:
    names = ", ".join(f"a{i}" for i in range(count))
    total = " + ".join(f"a{i}" for i in range(count))
    return (f"def _many_kernel(X, Y, n, {names}, BLOCK: tl.constexpr):\n"
            f"    offs = tl.arange(0, BLOCK)\n"
            f"    m = offs < n\n"
            f"    tl.store(Y + offs, tl.load(X + offs, mask=m) + ({total}), mask=m)\n")


def _many_kernel():
    """A copy kernel that also adds ``MANY`` int arguments (so none of them is dead code).
    ``triton.jit`` reads a kernel's source with ``inspect``, so the generated one is written to a
    temporary file first."""
    import importlib.util
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="interformer-launch-"), "_many_kernel.py")
    with open(path, "w") as f:
        f.write("import triton\nimport triton.language as tl\n\n\n@triton.jit\n" + _many_args_kernel_source(MANY))
    spec = importlib.util.spec_from_file_location("_many_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._many_kernel


def _per_call_us(fn, calls: int) -> float:
    """Host microseconds per call (before the final synchronisation), after 20 warm-up calls."""
    return seconds_per_call(fn, calls, warmup=min(20, calls))[0] * 1e6


def _direct(compiled, args, y, expected):
    """A zero-argument launcher that calls ``compiled``'s own launcher, or a reason why not."""
    if not torch.cuda.is_available():
        return None, "needs a GPU"
    stream = torch.cuda.current_stream().cuda_stream
    try:
        def launch():
            compiled.run(1, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *args)
        y.zero_()
        launch()
        torch.cuda.synchronize()
    except Exception as exc:  # the launcher's arguments differ between Triton versions
        return None, f"{type(exc).__name__}: {exc}"[:120]
    if not torch.equal(y, expected):
        return None, "ran but wrote a wrong result (this Triton's launcher takes other arguments)"
    return launch, ""


class _AtenFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2.0

    @staticmethod
    def backward(ctx, g):
        return g * 2.0


def _triton_copy(x):
    y = torch.empty_like(x)
    _copy_kernel[(1,)](x, y, x.numel(), BLOCK=64)
    return y


class _TritonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _triton_copy(x)

    @staticmethod
    def backward(ctx, g):
        return _triton_copy(g)


def _fwd_bwd(op, x, g):
    def step():
        x.grad = None
        op(x).backward(g)
    return step


def measure(calls: int) -> dict:
    """Microseconds of host time per launch, by launcher (None where unavailable), and notes."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(64, device=device)
    y = torch.empty_like(x)
    out = {}
    notes = {}
    out["torch.add (aten op)"] = _per_call_us(lambda: torch.add(x, x, out=y), calls)

    few_args = (x, y, x.numel(), 64)
    compiled = _copy_kernel[(1,)](*few_args[:3], BLOCK=64)
    out["Triton JIT, 3 args"] = _per_call_us(lambda: _copy_kernel[(1,)](*few_args[:3], BLOCK=64), calls)
    launch, why = _direct(compiled, few_args, y, x)
    out["Triton direct, 3 args"] = _per_call_us(launch, calls) if launch else None
    notes["Triton direct, 3 args"] = why

    many = _many_kernel()
    ints = [0] * MANY  # zeros keep the result a plain copy, so the direct launch can be checked
    compiled = many[(1,)](x, y, x.numel(), *ints, BLOCK=64)
    out[f"Triton JIT, {MANY + 3} args"] = _per_call_us(lambda: many[(1,)](x, y, x.numel(), *ints, BLOCK=64), calls)
    launch, why = _direct(compiled, (x, y, x.numel(), *ints, 64), y, x)
    out[f"Triton direct, {MANY + 3} args"] = _per_call_us(launch, calls) if launch else None
    notes[f"Triton direct, {MANY + 3} args"] = why

    xg = torch.randn(64, device=device, requires_grad=True)
    g = torch.randn(64, device=device)
    half = max(1, calls // 2)
    out["fwd+bwd, aten op"] = _per_call_us(_fwd_bwd(lambda t: t * 2.0, xg, g), half)
    out["fwd+bwd, Function of aten ops"] = _per_call_us(_fwd_bwd(_AtenFn.apply, xg, g), half)
    out["fwd+bwd, Function of Triton JIT"] = _per_call_us(_fwd_bwd(_TritonFn.apply, xg, g), half)
    # the same with the backward on this thread instead of the autograd engine's device thread
    with torch.autograd.set_multithreading_enabled(False):
        out["fwd+bwd, Function of aten ops, one thread"] = _per_call_us(_fwd_bwd(_AtenFn.apply, xg, g), half)
        out["fwd+bwd, Function of Triton JIT, one thread"] = _per_call_us(_fwd_bwd(_TritonFn.apply, xg, g), half)
    return {"us_per_call": out, "notes": notes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500 if torch.cuda.is_available() else 20)
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter: not launch cost)"
    print(f"host time per launch, {args.calls} calls each, {where}; torch {torch.__version__}, triton {triton.__version__}")
    result = measure(args.calls)
    for name, us in result["us_per_call"].items():
        why = result["notes"].get(name, "")
        print(f"  {name:<44} " + (f"{us:9.2f} us" if us is not None else f"{'n/a':>9}     ({why})"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
