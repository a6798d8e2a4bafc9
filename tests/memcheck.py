"""Two kinds of kernel bug the Triton interpreter lets through, made errors for a test.

Under ``TRITON_INTERPRET=1`` a kernel's ``tl.load`` and ``tl.store`` read and write raw host
addresses, and the programs of a launch run one after another. So:

* an access past the end of a tensor touches whatever the process holds there and goes unnoticed
  (a load usually returns a harmless neighbour, often zeros). On a GPU the same access reads
  another tensor's data or garbage from the caching allocator (a wrong result, a NaN that shows up
  steps later), writes over it, or faults;
* a program that loads an element another program of the same launch stores gets, in the
  interpreter, whatever the program order leaves there. On a GPU programs run in no set order (nor
  all at once), so it is a race. Two programs storing one element race the same way.

:func:`checked_accesses` is the interpreter's counterpart of ``compute-sanitizer --tool memcheck``,
plus race checks on global memory that compute-sanitizer does not make (its racecheck covers
shared memory only):

* every launch's tensor arguments (tuples of tensors included) each give the byte range their
  view spans -- from the lowest to the highest element its sizes and strides reach, not the whole
  allocation, so reading a neighbouring part of the same buffer that is not itself an argument of
  the launch counts as out of bounds too (memcheck sees only allocations);
* every element a load or store touches with its mask true must lie inside one of those ranges,
  whole (its first and last byte), or the launch raises :class:`AccessError` naming the kernel,
  load or store, the number of offending lanes, the first address and where it lies relative to
  the nearest argument;
* at the end of the launch, an element stored by one program and loaded or stored by another
  raises :class:`AccessError` naming the two programs (this package's kernels use no atomics or
  inter-program synchronisation, which would make such an access legitimate);
* a program that loads an element it stored itself with no ``tl.debug_barrier()`` in between
  raises too: the threads that load an element of a tile need not be those that stored it, and
  Triton orders global memory between a program's threads only at a barrier. (Where the layouts
  happen to give both to the same thread the access is safe; the check does not know layouts, so
  a kernel re-reading its own output needs the barrier anyway, as the cross nets' have.) So does
  a program that stores an element twice with no barrier between: two of its threads may write
  it in either order (the interpreter runs the stores in program order and hides that; the gated
  LCE's forward masks its first store off instead of overwriting it).

Masked-off lanes are not checked: their addresses are never dereferenced, on a GPU either. Not
caught: an access that leaves one argument's view but lands in another's (the check asks only
that each element lie in some argument); a load or store in a strided view's extent that is no
element of the view (a gap between rows; the poisoned allocations of :mod:`poison` catch what
such a store would leave unwritten); a store after a load of the same element by another thread of
the program (an in-place update), which no kernel here makes; and launches in child processes
(the tests' export, DDP and offset children; the last enables the check itself). Works only
under the interpreter (it patches the interpreter's builder).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import numpy as np
import pytest
import torch


class AccessError(AssertionError):
    """A load or store of an interpreted kernel outside every tensor argument's view, or one that
    races with another program of the launch."""


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
    """One interpreted launch: its kernel's name, its tensor arguments' byte ranges, and while it
    runs the addresses each program accessed (dropped once the launch is checked)."""

    def __init__(self, name: str, tensors: List[torch.Tensor]) -> None:
        self.name = name
        ranges = [view_range(t) for t in tensors]
        self.starts = np.array([r[0] for r in ranges], dtype=np.uint64)
        self.ends = np.array([r[1] for r in ranges], dtype=np.uint64)
        self.checked = 0
        self.program = 0  # the linear id of the program being interpreted
        self._accesses = {"load": [], "store": []}  # (addresses, program) per access
        self._unfenced: List[np.ndarray] = []  # this program's stores since its last barrier

    def new_program(self, program: int) -> None:
        self.program = program
        self._unfenced = []

    def barrier(self) -> None:
        self._unfenced = []

    def check(self, what: str, ptrs: np.ndarray, mask: np.ndarray, itemsize: int) -> None:
        addr = np.asarray(ptrs, dtype=np.uint64)
        live = np.broadcast_to(np.asarray(mask, dtype=bool), addr.shape)
        addr = addr[live]
        if addr.size == 0:
            return
        self.checked += int(addr.size)
        self._accesses[what].append((addr, self.program))
        if self._unfenced and np.isin(addr, np.concatenate(self._unfenced)).any():
            if what == "load":
                raise AccessError(f"{self.name}: a load of an element this program stored with no "
                                  "tl.debug_barrier() since (another thread of the program may not see the store yet)")
            raise AccessError(f"{self.name}: a store to an element this program stored with no tl.debug_barrier() "
                              "since (two threads of the program may write it, in no set order)")
        if what == "store":
            self._unfenced.append(addr)
        end = addr + np.uint64(itemsize)
        inside = np.zeros(addr.shape, dtype=bool)
        for lo, hi in zip(self.starts, self.ends):  # a handful of arguments; views may overlap
            inside |= (addr >= lo) & (end <= hi)
        if inside.all():
            return
        bad = addr[~inside]
        first = int(bad[0])
        if not len(self.starts):
            raise AccessError(f"{self.name}: {what} of {bad.size} lane(s) in a launch without tensor arguments")
        near = min(range(len(self.starts)), key=lambda j: min(abs(first - int(self.starts[j])),
                                                              abs(first - int(self.ends[j]))))
        lo, hi = int(self.starts[near]), int(self.ends[near])
        where = (f"{first - hi} bytes past the end of" if first >= hi else
                 f"{lo - first} bytes before" if first < lo else "straddling the end of")
        raise AccessError(f"{self.name}: {what} of {bad.size} lane(s) outside every tensor argument; the "
                          f"first at {where} the nearest argument's view ([{lo:#x}, {hi:#x}), "
                          f"{hi - lo} bytes)")

    def check_races(self) -> None:
        """At the end of the launch: no element stored by one program is loaded or stored by
        another (programs of a launch run in no set order on a GPU, and these kernels have no
        atomics or inter-program synchronisation)."""
        def flat(what):
            acc = self._accesses[what]
            if not acc:
                return np.zeros(0, np.uint64), np.zeros(0, np.int64)
            return (np.concatenate([a for a, _ in acc]),
                    np.concatenate([np.full(a.size, p, np.int64) for a, p in acc]))

        w, wp = flat("store")
        if w.size == 0:
            return
        order = np.lexsort((wp, w))
        w, wp = w[order], wp[order]
        clash = (w[1:] == w[:-1]) & (wp[1:] != wp[:-1])
        if clash.any():
            i = int(np.argmax(clash))
            raise AccessError(f"{self.name}: {int(clash.sum())} store(s) to an element another program of the "
                              f"launch also stores (programs {wp[i]} and {wp[i + 1]}, address {int(w[i]):#x})")
        r, rp = flat("load")
        addr, first = np.unique(w, return_index=True)
        last = np.append(first[1:], w.size) - 1
        k = np.searchsorted(addr, r)
        hit = k < addr.size
        hit[hit] = addr[k[hit]] == r[hit]
        other = hit.copy()
        other[hit] = (wp[first[k[hit]]] != rp[hit]) | (wp[last[k[hit]]] != rp[hit])
        if other.any():
            i = int(np.argmax(other))
            raise AccessError(f"{self.name}: {int(other.sum())} load(s) of an element another program of the "
                              f"launch stores (program {rp[i]} loads address {int(r[i]):#x}, program "
                              f"{wp[first[k[i]]]} stores it)")


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
    orig_idx, orig_barrier = I.InterpreterBuilder.set_grid_idx, I.InterpreterBuilder.create_barrier

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
            out = orig_call(self, *args, **kwargs)
            if _current:
                _current[0].check_races()
            return out
        finally:
            if _current:  # keep the counts, free the addresses (a test may launch thousands of times)
                _current[0]._accesses = _current[0]._unfenced = None
            _current.clear()

    def set_grid_idx(self, x, y, z):
        orig_idx(self, x, y, z)
        if _current:
            _current[0].new_program((z * self.grid_dim[1] + y) * self.grid_dim[0] + x)

    def barrier(self):
        if _current:
            _current[0].barrier()
        return orig_barrier(self)

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

    with pytest.MonkeyPatch.context() as patch:
        for cls, name, fn in ((I.GridExecutor, "__call__", call), (I.GridExecutor, "_init_args_hst", init_args_hst),
                              (I.InterpreterBuilder, "create_masked_load", load),
                              (I.InterpreterBuilder, "create_masked_store", store),
                              (I.InterpreterBuilder, "set_grid_idx", set_grid_idx),
                              (I.InterpreterBuilder, "create_barrier", barrier)):
            patch.setattr(cls, name, fn)
        yield
