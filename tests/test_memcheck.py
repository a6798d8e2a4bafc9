"""The checks of :mod:`memcheck` (bounds, races between the programs of a launch, a program reading back
its own store without a barrier) catch what the kernel tests rely on them for, and only that."""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

from memcheck import AccessError, checked_accesses, view_range

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="checks the interpreter's accesses; on a GPU the kernels are compiled")


@triton.jit
def _shifted_copy(X, Y, N, SHIFT, STORE_SHIFT, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    ok = o < N
    tl.store(Y + o + STORE_SHIFT, tl.load(X + o + SHIFT, mask=ok), mask=ok)


def _cause(excinfo) -> BaseException:
    e = excinfo.value
    while e.__cause__ is not None:  # the interpreter wraps a kernel's exception in InterpreterError
        e = e.__cause__
    return e


def test_in_bounds_and_masked_off_lanes_pass():
    x, y = torch.arange(10.0), torch.empty(10)
    with checked_accesses() as seen:
        _shifted_copy[(1,)](x, y, 10, 0, 0, BLOCK=16)  # lanes 10..15 masked off: their addresses are past x
    assert torch.equal(x, y)
    assert len(seen) == 1 and seen[0].checked == 20  # 10 loads, 10 stores


@pytest.mark.parametrize("load_shift,store_shift,what", [(1, 0, "load"), (-1, 0, "load"), (0, 1, "store")])
def test_an_access_past_either_end_raises(load_shift, store_shift, what):
    x, y = torch.arange(10.0), torch.empty(10)
    with checked_accesses(), pytest.raises(Exception) as e:
        _shifted_copy[(1,)](x, y, 10, load_shift, store_shift, BLOCK=16)
    err = _cause(e)
    assert isinstance(err, AccessError) and f"_shifted_copy: {what} of 1 lane(s)" in str(err)


def test_reading_past_a_view_into_the_rest_of_its_buffer_raises():
    """Stricter than a GPU's memcheck: the rest of the allocation is another tensor's data."""
    buf = torch.arange(10.0)
    x, y = buf[:5], torch.empty(5)
    with checked_accesses(), pytest.raises(Exception) as e:
        _shifted_copy[(1,)](x, y, 5, 1, 0, BLOCK=8)
    assert isinstance(_cause(e), AccessError)
    with checked_accesses():  # the same read of the whole buffer is fine
        _shifted_copy[(1,)](buf, torch.empty(10), 9, 1, 0, BLOCK=16)


@triton.jit
def _neighbour_sum(X, Y, N, READ_NEXT: tl.constexpr, BLOCK: tl.constexpr):
    """Program p writes block p of Y; with READ_NEXT it first reads block p+1 of Y (another
    program's output: a race on a GPU). Without it, it only writes its own block."""
    p = tl.program_id(0)
    o = p * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + o, mask=o < N, other=0.0)
    if READ_NEXT:
        x += tl.load(Y + o + BLOCK, mask=o + BLOCK < N, other=0.0)
    tl.store(Y + o, x, mask=o < N)


@triton.jit
def _all_store_first(X, Y, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(Y + o * 0, tl.load(X + o), mask=o == 0)  # every program writes Y[0]


def test_a_program_reading_another_programs_output_raises():
    x, y = torch.arange(8.0), torch.zeros(8)
    with checked_accesses():
        _neighbour_sum[(4,)](x, y, 8, READ_NEXT=False, BLOCK=2)
    assert torch.equal(x, y)
    with checked_accesses(), pytest.raises(Exception) as e:
        _neighbour_sum[(4,)](x, y, 8, READ_NEXT=True, BLOCK=2)
    assert isinstance(_cause(e), AccessError) and "load(s) of an element another program" in str(_cause(e))


def test_two_programs_storing_one_element_raises():
    x, y = torch.arange(4.0), torch.zeros(4)
    with checked_accesses():
        _all_store_first[(1,)](x, y, BLOCK=4)  # one program: fine
    with checked_accesses(), pytest.raises(Exception) as e:
        _all_store_first[(3,)](x, y, BLOCK=4)
    assert isinstance(_cause(e), AccessError) and "programs 0 and 1" in str(_cause(e))


@triton.jit
def _reverse_through_y(X, Y, BARRIER: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(Y + o, tl.load(X + o))
    if BARRIER:
        tl.debug_barrier()
    tl.store(Y + o, tl.load(Y + BLOCK - 1 - o))  # element i read back by the thread that holds BLOCK-1-i


def test_reading_back_a_store_needs_a_barrier():
    x, y = torch.arange(8.0), torch.empty(8)
    with checked_accesses():
        _reverse_through_y[(1,)](x, y, BARRIER=True, BLOCK=8)
    assert torch.equal(y, x.flip(0))
    with checked_accesses(), pytest.raises(Exception) as e:
        _reverse_through_y[(1,)](x, y, BARRIER=False, BLOCK=8)
    assert isinstance(_cause(e), AccessError) and "no tl.debug_barrier()" in str(_cause(e))


@triton.jit
def _store_twice(Y, BARRIER: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(Y + o, o.to(tl.float32))
    if BARRIER:
        tl.debug_barrier()
    tl.store(Y + BLOCK - 1 - o, o.to(tl.float32))  # element i written again, by the thread that holds BLOCK-1-i


def test_storing_an_element_twice_needs_a_barrier():
    """Two stores of one element by one program: on a GPU two threads may make them in either order
    unless a barrier lies between (the interpreter makes them in program order, so the last wins)."""
    y = torch.empty(8)
    with checked_accesses():
        _store_twice[(1,)](y, BARRIER=True, BLOCK=8)
    assert torch.equal(y, torch.arange(8.0).flip(0))
    with checked_accesses(), pytest.raises(Exception) as e:
        _store_twice[(1,)](y, BARRIER=False, BLOCK=8)
    assert isinstance(_cause(e), AccessError) and "a store to an element this program stored" in str(_cause(e))


def test_view_range_covers_strided_transposed_and_empty_views():
    t = torch.empty(4, 6)
    es = t.element_size()
    assert view_range(t) == (t.data_ptr(), t.data_ptr() + 24 * es)
    assert view_range(t.t()) == view_range(t)
    sub = t[1:3, 2:4]  # rows 1-2, columns 2-3: elements 8 .. 15
    assert view_range(sub) == (t.data_ptr() + 8 * es, t.data_ptr() + 16 * es)
    lo, hi = view_range(t[:0])
    assert lo == hi
    expanded = torch.empty(3, 1).expand(3, 7)  # stride 0: three elements
    assert view_range(expanded) == (expanded.data_ptr(), expanded.data_ptr() + 3 * es)


def test_the_suite_runs_under_the_check():
    """conftest's autouse fixture: a kernel launched by any test is checked."""
    from interformer.kernels.dot_interaction import dot_interaction
    from triton.runtime import interpreter

    assert interpreter.InterpreterBuilder.create_masked_load.__name__ == "load"  # memcheck's wrapper
    x = torch.randn(2, 5, 8)
    assert torch.allclose(dot_interaction(x), (x @ x.transpose(1, 2))[:, *torch.triu_indices(5, 5, 1)])
