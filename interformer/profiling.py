"""NVTX ranges around each arch and each fused op, for Nsight Systems; counting Triton launches.

Off by default, and then free: :func:`nvtx_range` returns one shared ``nullcontext``. Turn them on
with ``INTERFORMER_NVTX=1`` in the environment or :func:`enable_nvtx`. When on, each range is both
an NVTX range (the ``nvtx`` package when installed, else ``torch.cuda.nvtx``) and a
``torch.profiler.record_function`` of the same name, so the same names show in Nsight Systems and
in the PyTorch profiler. Ranges are host-side markers and are left out of what ``torch.compile``
traces; dynamo guards on the flag, so turning them on or off recompiles a compiled model on its
next call (``profiling/train_step.py`` turns them on before its warm-up).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import Counter
from typing import Callable, Iterator, Tuple

import torch

_ENABLED = os.environ.get("INTERFORMER_NVTX", "0") not in ("", "0", "false", "False")
_OFF = contextlib.nullcontext()


def enable_nvtx(enabled: bool = True) -> None:
    global _ENABLED
    _ENABLED = bool(enabled)


def nvtx_enabled() -> bool:
    return _ENABLED


@contextlib.contextmanager
def _range(name: str):
    try:
        import nvtx

        push, pop = (lambda: nvtx.push_range(name)), nvtx.pop_range
    except ImportError:
        push, pop = (lambda: torch.cuda.nvtx.range_push(name)), torch.cuda.nvtx.range_pop
    use_nvtx = torch.cuda.is_available()
    if use_nvtx:
        push()
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if use_nvtx:
            pop()


def nvtx_range(name: str):
    """A context manager marking ``name``; a shared no-op unless ranges are enabled."""
    if not _ENABLED or torch.compiler.is_compiling():
        return _OFF
    return _range(name)


def ranged(name: str):
    """Decorator form of :func:`nvtx_range` for a ``forward``."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if not _ENABLED:
                return fn(*args, **kwargs)
            with nvtx_range(name):
                return fn(*args, **kwargs)

        return inner

    return wrap


def seconds_per_call(fn: Callable[[], object], calls: int, warmup: int = 0) -> Tuple[float, float]:
    """``(issued, finished)``: wall seconds per call of ``fn`` over ``calls`` calls after ``warmup``
    unmeasured ones, before and after the final device synchronisation (the first is host time
    while the host is the bottleneck; on a CPU the two agree). The profiling scripts' one timer."""
    import time

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter() - t0
    sync()
    return issued / calls, (time.perf_counter() - t0) / calls


@contextlib.contextmanager
def replaced_triton_run(make: Callable[[Callable], Callable]) -> Iterator[None]:
    """Inside the block, every ``kernel[grid](...)`` launch goes to ``make(original_run)`` instead of
    Triton's own ``run`` (restored on leaving). The replacement receives ``(self, *args, **kwargs)``
    as ``run`` does; it may call the original or not.

    Works by replacing ``run`` on the class of this package's ``@triton.jit`` functions (the JIT
    class on a GPU, the interpreter's under ``TRITON_INTERPRET=1``), so it sees every kernel
    launched as ``kernel[grid](...)`` in the process, ours or not, but not the kernels
    ``torch.compile`` generates (Inductor launches those through its own launchers). Not
    thread-safe. Used by :func:`triton_launches` and :func:`interformer.kernel_audit.record_launches`."""
    from interformer.kernels import layernorm  # imports Triton

    cls = type(layernorm._ln_fwd_kernel)
    original = cls.run
    cls.run = make(original)
    try:
        yield
    finally:
        cls.run = original


@contextlib.contextmanager
def triton_launches(run: bool = True) -> Iterator[Counter]:
    """Count the Triton kernel launches made inside the block, by kernel name (yields the Counter).

    ``run=False`` skips them: each launch returns at once and its kernel never runs, so the fused
    ops' outputs are left unwritten (garbage), while everything around the launches -- the
    launchers' Python, their allocations, autograd -- runs as usual. That separates the cost of the
    launches from the rest (``profiling/op_host.py``) and lets tests see what an op allocates and
    launches at sizes the interpreter could not run. Sees what :func:`replaced_triton_run` sees.
    """
    counter = Counter()

    def make(original):
        def counted(self, *args, **kwargs):
            counter[getattr(self, "__name__", None) or self.fn.__name__] += 1
            return original(self, *args, **kwargs) if run else None
        return counted

    with replaced_triton_run(make):
        yield counter
