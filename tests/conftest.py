"""Test setup: the Triton interpreter on machines without a GPU, and shared fixtures.

``TRITON_INTERPRET=1`` must be set before Triton is imported, so it is set here, before any test
module imports a kernel.
"""

import inspect
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# Under pytest-xdist (`make test` runs one test process per core) each process gets its share of the
# cores for torch's intra-op threads, rather than every process starting one thread per core.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (bf16 and performance checks)")
    config.addinivalue_line("markers", "no_poison: a kernel test that runs without poisoned allocations (torch.compile)")


def _poisoned(item) -> bool:
    """Whether ``item`` runs under :class:`poison.PoisonedAllocations` (see the fixture below)."""
    return item.module.__name__.startswith("test_kernel_") and "no_poison" not in item.keywords


def pytest_collection_modifyitems(config, items):
    # A poisoned test that calls torch.compile fails (fullgraph) or silently runs eagerly: caught
    # here, at collection, so that a GPU-only test is caught on a CPU too.
    unmarked = [i.nodeid for i in items if _poisoned(i) and "torch.compile(" in inspect.getsource(i.function)]
    if unmarked:
        raise pytest.UsageError("kernel tests calling torch.compile must be marked no_poison: " + ", ".join(unmarked))
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; CPU CI runs the interpreter tests instead")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=[None, False], ids=["default", "opaque"])
def inline_setting(request):
    """An Inductor compile test run twice: under the default inline setting (on a GPU the kept ops
    are traced into their Triton kernels, which Inductor launches itself) and with the ops opaque
    custom ops (``interformer.set_compile_inline``); the setting restored after."""
    import interformer

    before = interformer.set_compile_inline(request.param)
    torch._dynamo.reset()
    yield request.param
    interformer.set_compile_inline(before)
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _checked_kernel_accesses():
    """Under the interpreter every kernel launch a test makes in its own process has its loads and
    stores checked against the bounds of its tensor arguments and for races (see :mod:`memcheck`):
    an access past a tensor, to an element another program stores, or to one the program stored
    itself before a barrier, which the interpreter lets through and a GPU does not, fails the test.
    About 7% of the kernel tests' time. On a GPU the kernels are compiled and nothing is checked."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from memcheck import checked_accesses

    with checked_accesses():
        yield


@pytest.fixture(autouse=True)
def _poisoned_kernel_tests(request):
    """Every kernel test (``test_kernel_*``) runs with each fresh allocation filled with NaN or an
    out-of-range integer (see :mod:`poison`), so that no test passes because the interpreter's CPU
    memory happened to come back zeroed; ``no_poison`` marks the few that ``torch.compile`` needs
    to run without a dispatch mode."""
    if not _poisoned(request.node):
        yield
        return
    from poison import PoisonedAllocations

    def refuse(*args, **kwargs):  # a helper's torch.compile, which the collection check cannot see
        raise AssertionError("torch.compile in a poisoned kernel test: dynamo does not trace under a Python "
                             "dispatch mode (it fails, or runs the function eagerly); mark the test no_poison")

    with pytest.MonkeyPatch.context() as patch, PoisonedAllocations():
        patch.setattr(torch, "compile", refuse)
        yield
