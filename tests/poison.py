"""Two things the Triton interpreter hides, switched on for a test.

* :class:`PoisonedAllocations` fills every tensor that ``torch.empty`` and its relatives return
  (``aten.empty*``, ``new_empty``, ``empty_like``) with NaN (floating point) or a large negative
  sentinel (integers) while it is active. On a CPU, fresh allocations of small tensors usually come
  back zeroed, so a kernel that forgets to write part of an output (a padded row, an empty sequence,
  a partial-sum row of a program that had no work) passes under the interpreter; on a GPU the
  caching allocator hands back whatever the last user left. Under this mode such a gap shows up as
  NaN (or as an out-of-range index) in the result.
* :func:`gpu_sized_grids` makes the launchers size their grids for an H100 (132 SMs) instead of the
  interpreter's 2, so persistent grids, split-K partial buffers and the gated LCE's choice between
  its two weight-gradient modes follow the path they take on a GPU, where a grid can be larger than
  the work and some programs get nothing to do.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from interformer.kernel_audit import H100_SMS

#: what a fresh integer allocation holds while poisoned: an index or length read from it before it
#: is written is far out of range
INT_SENTINEL = -(2**30)
#: marks a kernel test that runs without poisoning: ``torch.compile`` refuses to trace while a
#: Python dispatch mode is active ("non-infra torch dispatch mode present")
NO_POISON = pytest.mark.no_poison

_EMPTY = {
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.new_empty_strided.default,
    torch.ops.aten.empty_permuted.default,
}


def poison_(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    elif t.dtype in (torch.int8, torch.uint8):
        t.fill_(-99 if t.dtype == torch.int8 else 199)
    else:
        t.fill_(INT_SENTINEL)
    return t


class PoisonedAllocations(TorchDispatchMode):
    """While active, every uninitialised allocation made through the dispatcher is poisoned (see
    the module docstring), including those inside this package's custom ops (``interformer::*``,
    whose Python implementations run with the mode active). ``count`` says how many were, so a
    test can check the mode saw the launchers' allocations at all."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _own_custom_op(func, args, kwargs):
            # calling ``func`` would run the op's Python implementation with this mode switched
            # off (a mode steps aside while it handles an op), so its allocations would go
            # unpoisoned: run the registered implementation (torch.library's checks included,
            # e.g. no output aliasing an input) with the mode active
            with self:
                return func.redispatch(_IMPL_KEYS, *args, **kwargs)
        out = func(*args, **kwargs)
        if func in _EMPTY and isinstance(out, torch.Tensor) and out.numel():
            self.count += 1
            poison_(out)
        return out


#: where ``torch.library.custom_op`` registers an op's implementation (one for every device)
_IMPL_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def _own_custom_op(func, args, kwargs) -> bool:
    """Whether ``func`` is an ``interformer::`` custom op called on plain tensors (fake or functional
    tensors, under opcheck or tracing, are left to their own mode: the package's own
    :func:`interformer.kernels._dispatch.tracing` test)."""
    if getattr(func, "namespace", None) != "interformer":
        return False
    from torch.utils._pytree import tree_flatten

    from interformer.kernels._dispatch import tracing

    return not tracing([t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)])


def gpu_sized_grids(monkeypatch, sms: int = H100_SMS) -> None:
    """Make every kernel module size its grids as on a GPU with ``sms`` SMs (see module docstring)."""
    from interformer.kernel_audit import gpu_sized_patches

    for mod, attr, value in gpu_sized_patches(sms):
        monkeypatch.setattr(mod, attr, value)


