"""NVTX ranges around each arch and each fused op, for Nsight Systems; counting Triton launches.

Off by default, and then free: :func:`nvtx_range` returns one shared ``nullcontext`` and
:func:`ranged` calls the method after one flag check. Turn them on with ``INTERFORMER_NVTX=1`` in
the environment (``0``, ``false``, ``no``, ``off`` or empty keep them off) or :func:`enable_nvtx`.
When on, each range is both an NVTX push/pop range (the ``nvtx`` package when installed, else
``torch.cuda.nvtx`` on a CUDA machine; resolved once) and a ``torch.profiler.record_function`` of the
same name, so the same names show in Nsight Systems and in the PyTorch profiler.

Backward ranges. A training step's backward does not run inside the forward ranges: autograd runs
it after the forward returns and, on a GPU, on its own device thread, so the kernels it launches
fall under no range of the calling thread (not even one around the whole step: Nsight Systems
projects a push/pop range onto the GPU through the CUDA calls made on the range's own thread).
With ranges on, :func:`ranged` therefore also marks each method's backward as ``<name>.backward``:
two identity autograd nodes, one on the method's outputs (its backward opens the range once their
gradients are ready) and one on its tensor inputs that require grad (its backward closes the range
once the method's own gradient contributions to them are done). Both run on the thread that runs
the backward, so the range sits on that thread's stack, around the backward kernels it launches;
a range still open when the backward ends is closed then (same thread only). A call gets no
backward range unless one of its tensor arguments (passed directly, not in a container) and one of
its outputs require grad: a call over inputs that need no gradient (frozen tokenizers upstream, say)
has no node to close the range at, though its parameters get gradients. While backward ranges are
on, a marked method's outputs are outputs of the opening node, which returns its inputs unchanged,
so autograd refuses to modify them in place ("Output 0 of _BackwardMark is a view and is being
modified inplace"); the package's model never does. ``enable_nvtx(True, backward=False)`` keeps the
forward ranges alone (the two nodes per call cost host time in the backward) and lifts that limit.

Ranges are host-side markers and are left out of what ``torch.compile`` traces; dynamo guards on
the flag, so turning them on or off recompiles a compiled model on its next call
(``profiling/train_step.py`` turns them on before its warm-up). A step captured in a CUDA graph
records its ranges once, at capture; replays have none.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections import Counter
from typing import Callable, Iterator, Optional, Tuple

import torch


def _env_flag(value: Optional[str]) -> bool:
    """``INTERFORMER_NVTX``'s value as a flag: unset, empty, ``0``, ``false``, ``no``, ``off`` (any
    case) are off, anything else on."""
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


_ENABLED = _env_flag(os.environ.get("INTERFORMER_NVTX"))
_BACKWARD = True
_OFF = contextlib.nullcontext()


def enable_nvtx(enabled: bool = True, backward: bool = True) -> None:
    """Turn the ranges on or off (process-wide); ``backward=False`` leaves out the backward ranges."""
    global _ENABLED, _BACKWARD
    _ENABLED = bool(enabled)
    _BACKWARD = bool(backward)


def nvtx_enabled() -> bool:
    return _ENABLED


_UNRESOLVED = object()
_MARKERS = _UNRESOLVED


def _resolve_markers():
    """``(push(name), pop())`` of the NVTX implementation to use, or None (no NVTX here)."""
    try:
        import nvtx
    except ImportError:
        if torch.cuda.is_available():
            return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
        return None
    return nvtx.push_range, nvtx.pop_range


def _markers():
    """:func:`_resolve_markers`, once per process (a failed ``import nvtx`` is not cached by Python:
    retried on every range it cost ~30 us each, inflating the host time the ranges measure)."""
    global _MARKERS
    if _MARKERS is _UNRESOLVED:
        _MARKERS = _resolve_markers()
    return _MARKERS


class _Range:
    """An NVTX push/pop range and a ``record_function`` of the same name; popped on any exit."""

    __slots__ = ("name", "_rf", "_pushed")

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self):
        markers = _markers()
        self._pushed = None
        if markers is not None:
            markers[0](self.name)
            self._pushed = markers[1]
        try:
            self._rf = torch.profiler.record_function(self.name)
            self._rf.__enter__()
        except BaseException:
            self._pop()
            raise
        return self

    def _pop(self) -> None:
        pop, self._pushed = self._pushed, None
        if pop is not None:
            pop()

    def __exit__(self, *exc) -> None:
        try:
            self._rf.__exit__(*exc)
        finally:
            self._pop()


def nvtx_range(name: str):
    """A context manager marking ``name``; a shared no-op unless ranges are enabled."""
    if not _ENABLED or torch.compiler.is_compiling():
        return _OFF
    return _Range(name)


class _BackwardRange:
    """The backward range of one call: opened and closed by :class:`_BackwardMark` (opening and
    closing) on the thread running the backward (closed only on the thread that
    opened it, so a push is never popped from another thread's stack)."""

    __slots__ = ("range", "thread")

    def __init__(self, name: str) -> None:
        self.range = _Range(name)
        self.thread = None

    def open(self) -> None:
        if self.thread is not None:
            return
        self.range.__enter__()
        self.thread = threading.get_ident()
        # closes it at the end of this backward if the closing node never runs (e.g. a backward
        # restricted by ``inputs=``): a push without a pop would shift every later range
        torch.autograd.Variable._execution_engine.queue_callback(self.close)

    def close(self) -> None:
        if self.thread is None or self.thread != threading.get_ident():
            return
        self.thread = None
        self.range.__exit__(None, None, None)


class _BackwardMark(torch.autograd.Function):
    """Identity on tensors whose backward opens (``opening``: on a method's outputs, once their
    gradients are ready) or closes (on its inputs, once its gradients for them are done) the
    backward range ``state``."""

    @staticmethod
    def forward(ctx, state, opening, *tensors):
        ctx.state, ctx.opening = state, opening
        ctx.set_materialize_grads(False)
        return tensors

    @staticmethod
    def backward(ctx, *grads):
        (ctx.state.open if ctx.opening else ctx.state.close)()
        return (None, None, *grads)


def _needs_grad(x) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def _with_backward_range(fn, name: str, args, kwargs):
    """``fn(*args, **kwargs)`` with its backward marked ``<name>.backward`` (see the module doc).
    The inputs marked are the tensors passed directly (not inside containers, which are passed on
    untouched); the outputs, every tensor of the returned structure."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    args, kwargs = list(args), dict(kwargs)
    slots = [(args, i) for i, x in enumerate(args) if _needs_grad(x)]
    slots += [(kwargs, k) for k, x in kwargs.items() if _needs_grad(x)]
    if not slots:
        return fn(*args, **kwargs)
    state = _BackwardRange(name + ".backward")
    for (where, key), x in zip(slots, _BackwardMark.apply(state, False, *(where[key] for where, key in slots))):
        where[key] = x
    out = fn(*args, **kwargs)
    flat, spec = tree_flatten(out)
    marked = [i for i, x in enumerate(flat) if _needs_grad(x)]
    if not marked:
        return out
    for i, x in zip(marked, _BackwardMark.apply(state, True, *(flat[i] for i in marked))):
        flat[i] = x
    return tree_unflatten(flat, spec)


def ranged(name: str):
    """Decorator form of :func:`nvtx_range` for a ``forward`` (or another method), which also marks
    the method's backward as ``<name>.backward`` (see the module doc)."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if not _ENABLED or torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            with _Range(name):
                if _BACKWARD and torch.is_grad_enabled():
                    return _with_backward_range(fn, name, args, kwargs)
                return fn(*args, **kwargs)

        # each wrapper its own code object: dynamo keeps its compiled graphs, and its recompile
        # limit (8), per code object, so with one shared code every fused module compiled on its own
        # (regional compilation) spent one budget: the ninth graph failed under fullgraph=True, and
        # without it ran uncompiled
        inner.__code__ = inner.__code__.replace(co_name=f"{fn.__name__}_of_{name}")
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
