"""kernels/_common.py: the fixed-order partial-sum reduction every backward shares, and the sizing helpers."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from interformer.kernels import _common as C
from utils import DEVICE

#: the kernel sources
KERNELS = pathlib.Path(__file__).resolve().parents[1] / "kernels"


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


class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on ``cuda:1`` (what the guard reads), so that the guard's
    choice can be exercised without two GPUs."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_launches_go_to_the_first_tensor_arguments_device(monkeypatch):
    """Triton launches on the current CUDA device: a launcher entered with tensors on another one
    switches to their device for its launches (and back); on their device, or on a CPU, it enters
    nothing. Simulated (one GPU at most here): ``torch.cuda.device`` and the current device are
    stand-ins, and the tensor only claims to be on ``cuda:1``."""
    entered = []

    class FakeCudaDevice:
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    seen = []

    @C.on_input_device
    def launcher(note, x, *, flag=False):
        seen.append((note, list(entered), flag))
        return x

    x = torch.zeros(2).as_subclass(_OnCuda1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert launcher("other device", x, flag=True) is x
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    launcher("same device", x)
    monkeypatch.setattr(C, "_INTERPRETED", True)  # a CPU tensor passes the guard under the interpreter only
    launcher("cpu", torch.zeros(2))
    assert seen == [("other device", [1], True), ("same device", [1, "exit"], False), ("cpu", [1, "exit"], False)]
    assert entered == [1, "exit"]


def test_the_inline_tracing_flag_is_per_thread():
    """``launch`` records a traced launch only in the thread whose op is being traced into its
    kernels (``inline_when_compiled``): another thread launching meanwhile (a serving thread, the
    autograd engine's device thread) gets the kernel itself."""
    import threading

    from interformer.kernels import _dispatch as D

    kernel = object()
    assert not D._decomposing() and D.launch(kernel) is kernel
    D._TRACE.on = True
    try:
        seen = []
        worker = threading.Thread(target=lambda: seen.append((D._decomposing(), D.launch(kernel) is kernel)))
        worker.start()
        worker.join()
        assert seen == [(False, True)] and D._decomposing()
    finally:
        D._TRACE.on = False


def test_interpreted_says_how_triton_built_the_kernels():
    assert C.interpreted() == (os.environ.get("TRITON_INTERPRET") == "1")


def test_a_launch_on_cpu_tensors_without_the_interpreter_names_the_fix(monkeypatch):
    """Kernels built for a GPU cannot run on CPU tensors; Triton's own error names no cause."""
    monkeypatch.setattr(C, "_INTERPRETED", False)

    @C.on_input_device
    def launcher(x):
        return x

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*backend='auto' or 'eager'"):
        launcher(torch.zeros(2))
    assert launcher(3) == 3  # no tensor argument: nothing to check


def test_a_fused_model_on_the_cpu_without_the_interpreter_raises_the_named_fix():
    """The same, end to end in a process that imported Triton without its interpreter (on a machine
    without a GPU, Triton's launcher said "0 active drivers")."""
    script = (
        "import torch\n"
        "from interformer import InterFormerCTR, InterFormerConfig\n"
        "from interformer.data import make_synthetic\n"
        "c = InterFormerConfig(d_model=16, num_heads=1, num_layers=1, max_seq_len=8, pffn_hidden=32, backend='triton')\n"
        "try:\n"
        "    InterFormerCTR(c)(*make_synthetic(4, c).inputs())\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "interformer: a fused Triton op was given CPU tensors" in res.stdout, res.stdout[-3000:]


@pytest.mark.skipif(not C.interpreted(), reason="a check of Triton's interpreter (CPU runs); a GPU runs bf16")
def test_bf16_under_the_interpreter_raises_instead_of_computing_garbage():
    """The interpreter has no bfloat16: a bf16 ``tl.dot`` gave values off by 1e9 without an error
    (a model's LogLoss of 1.7e9 on the CPU with --amp bf16 --backend triton). A launch of one of our
    kernels with a bf16 tensor, or with ``tl.bfloat16`` as its compute dtype, raises, naming the fix;
    counted and skipped launches still pass."""
    from interformer.kernels.gated_lce import gated_lce
    from interformer.profiling import triton_launches

    args = [torch.randn(2, 5, 8), torch.randn(5, 3), torch.randn(3), torch.randn(8, 8), torch.randn(8)]
    with pytest.raises(RuntimeError, match="has no bfloat16.*float16"):
        gated_lce(*[a.bfloat16() for a in args])
    with pytest.raises(RuntimeError, match="has no bfloat16"), torch.autocast("cpu", dtype=torch.bfloat16):
        gated_lce(*args)  # fp32 tensors, bf16 compute: the kernel's output is bf16
    with triton_launches(run=False) as launched, torch.autocast("cpu", dtype=torch.bfloat16):
        gated_lce(*args)
    assert launched
    # the cross nets under bf16 autocast: fp32 tensors in and out, bf16 dots by a constexpr (DT)
    from interformer.kernels.crossnet import cross_net, low_rank_cross_net

    x0, w, u, v, b = torch.randn(3, 8), torch.randn(8, 8), torch.randn(8, 2), torch.randn(2, 8), torch.randn(8)
    for call in (lambda: cross_net(x0, [w], [b]), lambda: low_rank_cross_net(x0, [u], [v], [b])):
        with pytest.raises(RuntimeError, match="has no bfloat16"), torch.autocast("cpu", dtype=torch.bfloat16):
            call()
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.isfinite(gated_lce(*args)).all()


def test_every_launcher_is_guarded():
    """Every function in kernels/ that launches a Triton kernel carries ``@on_input_device``, except
    the helpers only ever called from a guarded launcher."""
    import ast

    # called from guarded launchers only; ``launch`` is the tracing hook every launch goes through
    helpers = {"sum_partials", "_fr_bwd_cublas", "launch"}
    unguarded = []
    for path in sorted(KERNELS.glob("*.py")):
        text = path.read_text()
        for node in ast.parse(text).body:
            if not isinstance(node, ast.FunctionDef) or node.name in helpers:
                continue
            decorators = {ast.unparse(d) for d in node.decorator_list}
            source = ast.get_source_segment(text, node)
            # a launch is written ``_kernel[grid](...)`` or, through the tracing hook, ``launch(_kernel)[grid](...)``
            if "triton.jit" in decorators or ("_kernel[" not in source and "_kernel)[" not in source):
                continue
            if "on_input_device" not in decorators:
                unguarded.append(f"{path.name}:{node.name}")
    assert not unguarded, f"launchers without @on_input_device: {unguarded}"
    for name in helpers:  # the exemptions still exist (a rename would leave them unchecked)
        assert any(f"def {name}(" in p.read_text() for p in KERNELS.glob("*.py"))


def test_every_masked_load_says_what_masked_lanes_hold():
    """Every ``tl.load`` with a mask in kernels/ gives ``other``. Without it a masked-off lane holds
    whatever the register had on a GPU (a NaN can flow into a sum or a dot), while the interpreter
    fills it with 0, so no CPU test would see the difference."""
    import ast

    missing = []
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and ast.unparse(node.func.value) == "tl"):
                names = {k.arg for k in node.keywords}
                if (len(node.args) >= 2 or "mask" in names) and len(node.args) < 3 and "other" not in names:
                    missing.append(f"{path.name}:{node.lineno}")
    assert not missing, f"masked tl.load without other=: {missing}"


def test_a_subclass_tensor_made_a_parameter_takes_the_custom_op():
    """``tracing`` sends every argument that is not exactly a tensor or a plain ``nn.Parameter`` to
    the custom op, where the subclass handles it. ``isinstance(t, nn.Parameter)`` is also true of a
    subclass tensor wrapped as a parameter (``nn.Parameter(DTensor)``, quantized weights) and of a
    FakeTensor made from a parameter, whose data a launcher cannot read."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.two_tensor import TwoTensor

    from interformer import reference
    from interformer.kernels._dispatch import tracing
    from interformer.kernels.dot_interaction import dot_interaction

    plain = torch.randn(2, 4, 8, device=DEVICE)
    assert not tracing([plain, torch.nn.Parameter(plain.clone())])
    param = torch.nn.Parameter(TwoTensor(plain, 2 * plain))
    assert isinstance(param, torch.nn.Parameter) and tracing([plain, param])
    mode = FakeTensorMode()
    assert tracing([mode.from_tensor(torch.nn.Parameter(plain.clone()))])
    out = dot_interaction(param)
    assert type(out) is TwoTensor
    torch.testing.assert_close(out.a, reference.dot_interaction(plain), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.b, reference.dot_interaction(2 * plain), rtol=1e-5, atol=1e-5)
