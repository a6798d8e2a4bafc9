"""NVTX ranges around each arch and each fused op, for Nsight Systems.

Off by default, and then free: :func:`nvtx_range` returns one shared ``nullcontext``. Turn them on
with ``INTERFORMER_NVTX=1`` in the environment or :func:`enable_nvtx`. When on, each range is both
an NVTX range (the ``nvtx`` package when installed, else ``torch.cuda.nvtx``) and a
``torch.profiler.record_function`` of the same name, so the same names show in Nsight Systems and
in the PyTorch profiler. Ranges are host-side markers: under ``torch.compile`` leave them off.
"""

from __future__ import annotations

import contextlib
import functools
import os

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
