"""Test setup: the Triton interpreter on machines without a GPU, and shared fixtures.

``TRITON_INTERPRET=1`` must be set before Triton is imported, so it is set here, before any test
module imports a kernel.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (bf16 and performance checks)")
    config.addinivalue_line("markers", "no_poison: a kernel test that runs without poisoned allocations (torch.compile)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; CPU CI runs the interpreter tests instead")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _poisoned_kernel_tests(request):
    """Every kernel test (``test_kernel_*``) runs with each fresh allocation filled with NaN or an
    out-of-range integer (see :mod:`poison`), so that no test passes because the interpreter's CPU
    memory happened to come back zeroed; ``no_poison`` marks the few that ``torch.compile`` needs
    to run without a dispatch mode."""
    if not request.node.module.__name__.startswith("test_kernel_") or "no_poison" in request.keywords:
        yield
        return
    from poison import PoisonedAllocations

    with PoisonedAllocations():
        yield
