"""CrossNet / LowRankCrossNet as drop-ins for torchrec's: parameter names and shapes, a golden test
with hand-computed numbers, biases saved in the other layout (``[D]`` or ``[D, 1]``), and an FX trace
(torchrec's own test habits).
"""

from __future__ import annotations

import pytest
import torch

from interformer import CrossNet, LowRankCrossNet


def test_crossnet_parameter_names_and_shapes():
    m = CrossNet(5, 3, backend="eager")
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {**{f"kernels.{i}": (5, 5) for i in range(3)}, **{f"bias.{i}": (5, 1) for i in range(3)}}
    # torchrec initialisation: zero biases
    assert all(not b.any() for b in m.bias)


def test_low_rank_crossnet_parameter_names_and_shapes():
    m = LowRankCrossNet(6, 2, 3, backend="eager")
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    expected = {}
    for i in range(2):
        expected.update({f"W_kernels.{i}": (6, 3), f"V_kernels.{i}": (3, 6), f"bias.{i}": (6,)})  # torchrec's current
    assert shapes == expected
    assert all(not b.any() for b in m.bias)


def _set(module, **lists):
    with torch.no_grad():
        for name, values in lists.items():
            for p, v in zip(getattr(module, name), values):
                p.copy_(torch.tensor(v, dtype=p.dtype).view_as(p))


def test_crossnet_golden():
    m = CrossNet(2, 2, backend="eager")
    _set(m, kernels=[[[1, 0], [1, 1]], [[0, 1], [2, 0]]], bias=[[[1], [-1]], [[0], [1]]])
    x0 = torch.tensor([[1.0, 2.0], [-1.0, 0.0]])
    # row 0, x0 = [1, 2]:
    #   layer 0: W0 x0 = [1, 3]; + b0 = [2, 2]; x0 * . = [2, 4]; + x0 -> x1 = [3, 6]
    #   layer 1: W1 x1 = [6, 6]; + b1 = [6, 7]; x0 * . = [6, 14]; + x1 -> x2 = [9, 20]
    # row 1, x0 = [-1, 0]:
    #   layer 0: W0 x0 = [-1, -1]; + b0 = [0, -2]; x0 * . = [0, 0]; + x0 -> x1 = [-1, 0]
    #   layer 1: W1 x1 = [0, -2]; + b1 = [0, -1]; x0 * . = [0, 0]; + x1 -> x2 = [-1, 0]
    assert torch.equal(m(x0), torch.tensor([[9.0, 20.0], [-1.0, 0.0]]))


def test_low_rank_crossnet_golden():
    m = LowRankCrossNet(2, 2, 1, backend="eager")
    _set(m, W_kernels=[[[1], [2]], [[0], [1]]], V_kernels=[[[3, -1]], [[1, 1]]], bias=[[1, 0], [0, -2]])
    x0 = torch.tensor([[1.0, 2.0]])
    # layer 0: V0 x0 = 3 - 2 = 1; U0 * 1 = [1, 2]; + b0 = [2, 2]; x0 * . = [2, 4]; + x0 -> x1 = [3, 6]
    # layer 1: V1 x1 = 9;        U1 * 9 = [0, 9]; + b1 = [0, 7]; x0 * . = [0, 14]; + x1 -> x2 = [3, 20]
    assert torch.equal(m(x0), torch.tensor([[3.0, 20.0]]))


@pytest.mark.parametrize("low_rank", [None, 2])
@pytest.mark.parametrize("saved", [(4,), (4, 1)], ids=["D", "D-1"])
def test_loads_biases_saved_in_either_layout(low_rank, saved):
    """Biases saved as ``[D]`` (torchrec's current ``LowRankCrossNet``) or ``[D, 1]`` (its
    ``CrossNet``, its earlier ``LowRankCrossNet``, this package's before 2026-11-29) load into either
    module, in the module's own shape, and give the same output; any other shape is refused."""
    D, L = 4, 2

    def make():
        return CrossNet(D, L, backend="eager") if low_rank is None else LowRankCrossNet(D, L, low_rank, backend="eager")

    src = make()
    with torch.no_grad():
        for b in src.bias:
            b.normal_()
    own = tuple(src.bias[0].shape)
    sd = {k: (v.reshape(saved) if k.startswith("bias.") else v).clone() for k, v in src.state_dict().items()}
    dst = make()
    dst.load_state_dict(sd)  # strict
    assert all(tuple(b.shape) == own for b in dst.bias)
    x = torch.randn(3, D)
    assert torch.equal(dst(x), src(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        make().load_state_dict({**sd, "bias.1": torch.zeros(1, D)})


@pytest.mark.parametrize("cls", [CrossNet, LowRankCrossNet])
def test_fx_trace(cls):
    m = cls(6, 2, backend="eager")
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(3, 6)
    assert torch.equal(gm(x), m(x))
