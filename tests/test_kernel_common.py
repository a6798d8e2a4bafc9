"""kernels/_common.py: the fixed-order partial-sum reduction every backward shares, and the sizing helpers."""

import pytest
import torch

from interformer.kernels import _common as C
from utils import DEVICE


@pytest.mark.parametrize("G", [1, 3, 63, 64, 200])  # both tile shapes (G < 64: [<=16, 256]; else [128, 32])
@pytest.mark.parametrize("sizes", [(7,), (5, 300), (1, 2, 3), (33, 0, 40, 9)])
def test_sum_partials_matches_torch(G, sizes):
    P = sum(sizes)
    part = torch.randn(G, P + 5, device=DEVICE)[:, :P]  # strided rows, as a [G, P] view of a wider buffer
    dtypes = (torch.float32, torch.float16, torch.float32, torch.float16)
    outs = [torch.full((n,), float("nan"), device=DEVICE, dtype=dt) for n, dt in zip(sizes, dtypes)]
    C.sum_partials(part, outs)
    ref = part.double().sum(0)
    start = 0
    for out, n in zip(outs, sizes):
        expect = ref[start:start + n]
        tol = 1e-5 if out.dtype == torch.float32 else 1e-3
        torch.testing.assert_close(out.double(), expect, rtol=tol, atol=tol * max(1.0, G ** 0.5))
        start += n


def test_sum_partials_rejects_sizes_that_do_not_cover_the_buffer():
    part = torch.zeros(4, 10, device=DEVICE)
    with pytest.raises(ValueError, match="outputs of sizes"):
        C.sum_partials(part, [torch.empty(4, device=DEVICE), torch.empty(5, device=DEVICE)])
    with pytest.raises(ValueError, match="outputs of sizes"):
        C.sum_partials(part, [torch.empty(2, device=DEVICE)] * 5)


def test_sizing_helpers():
    assert [C.next_pow2(n) for n in (0, 1, 2, 3, 16, 17, 1000)] == [1, 1, 2, 4, 16, 32, 1024]
    assert C.dot_precision(torch.float32) == "tf32x3" and C.dot_precision(torch.bfloat16) == "tf32"
    expect = 4 * torch.cuda.get_device_properties(DEVICE).multi_processor_count if DEVICE.type == "cuda" else 2
    assert C.persistent_programs(DEVICE) == expect
