"""Out-of-bounds accesses, which the Triton interpreter lets through, made errors for a test.

Under ``TRITON_INTERPRET=1`` a kernel's ``tl.load`` and ``tl.store`` read and write raw host
addresses: an access past the end of a tensor touches whatever the process holds there and goes
unnoticed (a load usually returns a harmless neighbour, often zeros). On a GPU the same access
reads another tensor's data or garbage from the caching allocator (a wrong result, a NaN that
shows up steps later), writes over it, or faults. :func:`checked_accesses` is the interpreter's
counterpart of ``compute-sanitizer --tool memcheck``, stricter than it in one way:

* every launch's tensor arguments (tuples of tensors included) each give the byte range their
  view spans -- from the lowest to the highest element its sizes and strides reach, not the whole
  allocation, so reading a neighbouring part of the same buffer counts as out of bounds too;
* every element a load or store touches with its mask true must lie inside one of those ranges,
  whole (its first and last byte), or the launch raises :class:`OutOfBounds` naming the kernel,
  load or store, the number of offending lanes, the first address and where it lies relative to
  the nearest argument.

Masked-off lanes are not checked: their addresses are never dereferenced, on a GPU either. A
store into a range that is a strided view's extent but no element of the view (a gap between
rows) is not caught; the poisoned allocations of :mod:`poison` catch what such a store would have
to leave unwritten. Works only under the interpreter (it patches the interpreter's builder).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import numpy as np
import torch


class OutOfBounds(AssertionError):
    """A load or store of an interpreted kernel outside every tensor argument's view."""


def view_range(t: torch.Tensor) -> Tuple[int, int]:
    """``(first byte, one past the last byte)`` of the elements a view can reach; ``(p, p)`` (empty)
    for a tensor without elements."""
    start = t.data_ptr()
    if t.numel() == 0:
        return start, start
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))  # torch strides are >= 0
    return start, start + (last + 1) * t.element_size()


def _tensors(args) -> Iterator[torch.Tensor]:
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, tuple):
            yield from _tensors(a)


class _Launch:
    """The byte ranges of the tensor arguments of the launch being interpreted, and its kernel's name."""

    def __init__(self, name: str, tensors: List[torch.Tensor]) -> None:
        self.name = name
        ranges = [view_range(t) for t in tensors]
        self.starts = np.array([r[0] for r in ranges], dtype=np.uint64)
        self.ends = np.array([r[1] for r in ranges], dtype=np.uint64)
        self.checked = 0

    def check(self, what: str, ptrs: np.ndarray, mask: np.ndarray, itemsize: int) -> None:
        addr = np.asarray(ptrs, dtype=np.uint64)
        live = np.broadcast_to(np.asarray(mask, dtype=bool), addr.shape)
        addr = addr[live]
        if addr.size == 0:
            return
        self.checked += int(addr.size)
        end = addr + np.uint64(itemsize)
        inside = np.zeros(addr.shape, dtype=bool)
        for lo, hi in zip(self.starts, self.ends):  # a handful of arguments; views may overlap
            inside |= (addr >= lo) & (end <= hi)
        if inside.all():
            return
        bad = addr[~inside]
        first = int(bad[0])
        if not len(self.starts):
            raise OutOfBounds(f"{self.name}: {what} of {bad.size} lane(s) in a launch without tensor arguments")
        near = min(range(len(self.starts)), key=lambda j: min(abs(first - int(self.starts[j])),
                                                              abs(first - int(self.ends[j]))))
        lo, hi = int(self.starts[near]), int(self.ends[near])
        where = (f"{first - hi} bytes past the end of" if first >= hi else
                 f"{lo - first} bytes before" if first < lo else "straddling the end of")
        raise OutOfBounds(f"{self.name}: {what} of {bad.size} lane(s) outside every tensor argument; the "
                          f"first at {where} the nearest argument's view ([{lo:#x}, {hi:#x}), "
                          f"{hi - lo} bytes)")


_current: List[_Launch] = []  # the launch being interpreted (a list: empty outside a launch)
_watchers: List[List[_Launch]] = []  # one list per active checked_accesses(), nested ones included


@contextlib.contextmanager
def checked_accesses() -> Iterator[List[_Launch]]:
    """While active, every interpreted launch checks its loads and stores (module docstring).
    Yields the list of launches checked (each with ``name`` and ``checked``, the number of lane
    accesses it verified), so that a test can see the check ran at all. Nests: an inner one sees
    the same launches, each checked once."""
    seen: List[_Launch] = []
    _watchers.append(seen)
    try:
        if len(_watchers) == 1:
            with _patched_interpreter():
                yield seen
        else:
            yield seen
    finally:
        del _watchers[next(i for i, w in enumerate(_watchers) if w is seen)]  # by identity


@contextlib.contextmanager
def _patched_interpreter() -> Iterator[None]:
    from triton.runtime import interpreter as I

    orig_call, orig_init = I.GridExecutor.__call__, I.GridExecutor._init_args_hst
    orig_load, orig_store = I.InterpreterBuilder.create_masked_load, I.InterpreterBuilder.create_masked_store

    def init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
        # the host copies are what the kernel's pointers point into (the same tensors for CPU ones)
        launch = _Launch(getattr(self.fn, "__name__", "kernel"),
                         list(_tensors(list(args_hst) + list(kwargs_hst.values()))))
        _current[:] = [launch]
        for seen in _watchers:
            seen.append(launch)
        return args_hst, kwargs_hst

    def call(self, *args, **kwargs):
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            _current.clear()

    def itemsize(ptrs) -> int:
        return np.dtype(I._get_np_dtype(ptrs.get_element_ty())).itemsize

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        if _current:
            _current[0].check("load", ptrs.data, mask.data, itemsize(ptrs))
        return orig_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        if _current:
            _current[0].check("store", ptrs.data, mask.data, itemsize(ptrs))
        return orig_store(self, ptrs, value, mask, cache_policy)

    I.GridExecutor.__call__, I.GridExecutor._init_args_hst = call, init_args_hst
    I.InterpreterBuilder.create_masked_load, I.InterpreterBuilder.create_masked_store = load, store
    try:
        yield
    finally:
        I.GridExecutor.__call__, I.GridExecutor._init_args_hst = orig_call, orig_init
        I.InterpreterBuilder.create_masked_load, I.InterpreterBuilder.create_masked_store = orig_load, orig_store
