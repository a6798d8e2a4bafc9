"""The test harness of :mod:`poison` does what the kernel tests rely on it for."""

from __future__ import annotations

import torch

from interformer.kernels import _common, gated_lce, layernorm, pffn
from poison import INT_SENTINEL, PoisonedAllocations, gpu_sized_grids
from utils import DEVICE


def test_fresh_allocations_are_poisoned_and_initialised_ones_are_not():
    with PoisonedAllocations() as mode:
        f = torch.empty(3, 4, device=DEVICE)
        h = torch.empty_like(f, dtype=torch.float16)
        i = f.new_empty((5,), dtype=torch.int32)
        s = torch.empty_strided((2, 3), (1, 2), device=DEVICE)
        z = torch.zeros(4, device=DEVICE)
        r = torch.randn(4, device=DEVICE)
    assert torch.isnan(f).all() and torch.isnan(h).all() and torch.isnan(s).all()
    assert (i == INT_SENTINEL).all()
    assert (z == 0).all() and torch.isfinite(r).all()
    assert mode.count == 4


def test_allocations_inside_a_custom_op_are_poisoned_too():
    """A dispatch mode steps aside while it handles an op, so the buffers a ``torch.library`` custom
    op's implementation allocates would escape it; the mode runs ``interformer::`` implementations
    itself. With the launch skipped the output is never written: NaN through both entry points,
    and in the backward."""
    from interformer.kernels import dot_interaction
    from interformer.profiling import triton_launches

    z = torch.randn(2, 3, 4, device=DEVICE)
    for call in (lambda: dot_interaction.dot_interaction(z), lambda: torch.ops.interformer.dot_interaction_fwd(z)):
        with triton_launches(run=False), PoisonedAllocations() as mode:
            out = call()
        assert mode.count == 1 and out.isnan().all()
    with PoisonedAllocations():  # and with the launch, the custom op's result is the lean one's
        out = torch.ops.interformer.dot_interaction_fwd(z)
    assert torch.equal(out, dot_interaction.dot_interaction(z))
    # a backward's allocations too (on a GPU it runs on the autograd engine's device thread)
    z.requires_grad_()
    out = dot_interaction.dot_interaction(z)
    with triton_launches(run=False), PoisonedAllocations() as mode:
        (dz,) = torch.autograd.grad(out, z, torch.ones_like(out))
    assert mode.count >= 1 and dz.isnan().all()


def test_a_partial_row_left_unwritten_poisons_the_reduction():
    """What the mode is for: a [G, P] partial-sum buffer whose last program had no work and wrote
    nothing gives NaN once reduced, instead of whatever the memory held."""
    G, P = 5, 8
    with PoisonedAllocations():
        part = torch.empty((G, P), device=DEVICE)
        part[: G - 1] = 1.0
        out = torch.empty(P, device=DEVICE)
        _common.sum_partials(part, [out])
    assert torch.isnan(out).all()
    part[G - 1] = 0.0
    _common.sum_partials(part, [out])
    assert (out == G - 1).all()


def test_gpu_sized_grids_reach_every_launcher_and_are_undone(monkeypatch):
    before = (layernorm.persistent_programs(DEVICE), pffn.persistent_programs(DEVICE), gated_lce.num_sms(DEVICE))
    with monkeypatch.context() as m:
        gpu_sized_grids(m)
        assert layernorm.persistent_programs(DEVICE) == pffn.persistent_programs(DEVICE) == 4 * 132
        assert gated_lce.num_sms(DEVICE) == 132
    assert (layernorm.persistent_programs(DEVICE), pffn.persistent_programs(DEVICE), gated_lce.num_sms(DEVICE)) == before
