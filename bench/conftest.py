import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The "bwd" mode times backward() of one saved graph repeatedly (retain_graph=True). Compiled
# backward graphs donate their saved buffers by default, which forbids retain_graph; turn that
# off so compiled providers can be timed in that mode (it costs them nothing in fwd/full modes).
try:
    import torch._functorch.config as _functorch_config

    _functorch_config.donated_buffer = False
except (ImportError, AttributeError):  # an older/newer torch without the flag
    pass


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each benchmark starts with dynamo's caches empty. Compiled code is cached on the code object
    it compiles (a model's ``forward``, an op's function), shared by every instance, and each row
    adds an entry (other sizes, backend, settings): past ``recompile_limit`` (8) a row would time
    the uncompiled code, and a shape seen after another would compile with dynamic sizes."""
    torch._dynamo.reset()
    common = sys.modules.get("common")  # the benchmarks' own module, imported by them at collection
    if common is not None:
        common.start_row()  # the row counts from here: its callable may compile before it is timed
    yield
    if common is not None:
        common._ROW_START = None


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's table
def pytest_terminal_summary(terminalreporter):
    """On a machine without a GPU, say under pytest-benchmark's console table what its times are
    (each row's skip reason and the report say it too, but the table itself did not)."""
    common = sys.modules.get("common")
    if getattr(common, "ON_GPU", True) is False:  # (a stand-in common, as a test of this file uses, has none)
        terminalreporter.write_line(f"note: {common.SMOKE_NOTE} (the README's Benchmarks section: the GPU run)",
                                    yellow=True)
