"""Helpers shared by the tests: relative errors, float64 copies and the low-precision rule."""

from __future__ import annotations

import io
from collections import Counter
from typing import Iterable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# DESIGN §5: fp32 <= 1e-5 under the interpreter, <= 1e-3 on GPU (tf32 where documented).
FP32_TOL = 1e-3 if HAS_CUDA else 1e-5
# dtypes of the kernel tests' parametrisations: bfloat16 is a GPU-only check (DESIGN §5; the
# interpreter has no bfloat16), marked ``gpu`` so that ``-m gpu`` selects it and a CPU run lists it
# as skipped rather than leaving it out
KERNEL_DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (``||out - ref||`` when ref is all zero). NaN stays NaN."""
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    num = torch.linalg.vector_norm(out - ref)
    den = torch.linalg.vector_norm(ref)
    return float(num / den) if den > 0 else float(num)


def first_mismatch(out: torch.Tensor, ref: torch.Tensor, k: int = 5) -> str:
    diff = (out.detach().double() - ref.detach().double().to(out.device)).abs()
    flat = diff.flatten()
    idx = torch.topk(flat, min(k, flat.numel())).indices
    rows = [f"{tuple(int(i) for i in torch.unravel_index(j, diff.shape))}: out={out.flatten()[j].item():.6g} ref={ref.flatten()[j].item():.6g}" for j in idx]
    return "; ".join(rows)


def assert_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "output") -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err == err, f"{name}: NaN in result"
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}; largest differences at {first_mismatch(out, ref)}"


def assert_lowp(out: torch.Tensor, eager_lowp: torch.Tensor, ref64: torch.Tensor, name: str = "output", floor: float = 1e-6) -> None:
    """DESIGN §5 low-precision rule: the kernel's error against float64 is at most twice the error
    of the eager path run in the same low precision (``floor`` guards the case where the eager
    error is exactly zero)."""
    k_err, e_err = rel_err(out, ref64), rel_err(eager_lowp, ref64)
    assert k_err == k_err, f"{name}: NaN in kernel result"
    assert k_err <= 2 * max(e_err, floor), (
        f"{name}: kernel error {k_err:.3e} > 2 x eager low-precision error {e_err:.3e}; "
        f"largest differences at {first_mismatch(out, ref64)}"
    )


def perturb_constant_parameters(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> list:
    """Add noise to every parameter of ``module`` whose elements are all equal (as built: LayerNorm
    weights of 1 and biases of 0, torchrec's zero cross-net biases, any zero-initialised bias), in
    place; returns their names. Reason: a fused forward that leaves out such a parameter (a dropped
    LayerNorm bias or cross-net bias) gives the built model's numbers exactly, so a fused-vs-eager
    comparison of a freshly built model cannot see it. Embedding tables (zero padding row, random
    rest) are not constant and stay as they are."""
    g = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.numel() > 1 and bool((p == p.reshape(-1)[0]).all()):
                p.add_((scale * torch.randn(p.shape, generator=g)).to(p.device, p.dtype))
                names.append(name)
    return names


def grads(tensors: Iterable[torch.Tensor]):
    return [t.grad for t in tensors]


def assert_compiled_grads_match(compiled, f, leaves, names, tol: float) -> None:
    """The gradients of ``leaves`` from ``compiled(*leaves)`` (a scalar loss; a ``torch.compile`` of
    ``f``) against those of ``f(*leaves)`` run eagerly, each within ``tol`` (named by ``names``)."""
    compiled(*leaves).backward()
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    f(*leaves).backward()
    for name, a, e in zip(names, got, grads(leaves)):
        assert_rel(a, e, tol, "compiled " + name)


class TerminalStream(io.StringIO):
    """A text stream that says it is a terminal (``isatty()``): stderr as an interactive user has it."""

    def isatty(self) -> bool:
        return True


def random_lengths(B: int, L: int, generator=None) -> torch.Tensor:
    """Random lengths in ``[0, L]`` that include 0 and L whenever B >= 2 (B == 1 gets L)."""
    lengths = torch.randint(0, L + 1, (B,), generator=generator)
    if B >= 1:
        lengths[0] = L
    if B >= 2:
        lengths[1] = 0
    return lengths


def recorded_calls(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` for the test by a wrapper that records ``(args, result)`` of each call
    (positional arguments) in the list it returns. A ``functools.lru_cache``'d function keeps its
    ``__wrapped__``, which callers that bypass the cache read (``pffn._linear_fits``; dynamo)."""
    real, calls = getattr(module, name), []

    def recording(*args):
        calls.append((args, real(*args)))
        return calls[-1][1]

    if hasattr(real, "__wrapped__"):
        recording.__wrapped__ = real.__wrapped__
    monkeypatch.setattr(module, name, recording)
    return calls


def aot_build_sm90(cases, timeout: int = 900, workers: int = 1):
    """Compile each case for sm_90 without a GPU (:func:`interformer.kernel_audit.build_sm90`, where
    the case format is described); returns the cases with ``shared``, ``wgmma``, ``async_copies``
    and, where Triton ships ``cuobjdump``, registers and spills added, in the given order."""
    from interformer.kernel_audit import build_sm90

    return build_sm90(cases, workers=workers, timeout=timeout)


def backward_threading(monkeypatch) -> list:
    """Spy on ``Tensor.backward``: the returned list gets, for every call, whether autograd's
    multithreading was on at that moment (off: the backward runs on the calling thread)."""
    seen = []
    real = torch.Tensor.backward

    def spy(self, *args, **kwargs):
        seen.append(torch._C._is_multithreading_enabled())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", spy)
    return seen


def bad_compile_setting_run(env_var: str, value: str, query: str, setter: str, other: str):
    """Run a fresh interpreter with ``$env_var=value`` (an invalid compile setting) and check that
    building a fused-capable module and calling ``interformer.<query>()`` both raise a ``ValueError``
    naming the variable and the value, that ``interformer.<other>()``, the query of the other
    compile setting, does not raise, and that ``interformer.<setter>`` (a call, e.g.
    ``"set_compile_inline(True)"``) then replaces the bad value: returns ``(what <other>() gave,
    what <query>() gave after the setter)``, each as ``repr``, a set as a sorted list."""
    import os
    import subprocess
    import sys

    code = ("import interformer as I\n"
            "show = lambda v: repr(sorted(v) if isinstance(v, frozenset) else v)  # sets: in a fixed order\n"
            "try:\n    I.GatedLCE(2, 2, 4, backend='eager')\nexcept ValueError as e:\n    print('module:', e)\n"
            f"try:\n    I.{query}()\nexcept ValueError as e:\n    print('query:', e)\n"
            f"print('other:', show(I.{other}()))\n"
            f"I.{setter}; I.GatedLCE(2, 2, 4); print('set:', show(I.{query}()))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERFORMER_COMPILE_")}
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, **{env_var: value}),
                         capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["module", "query", "other", "set"], out.stdout
    assert all(f"${env_var}" in line and repr(value) in line for line in lines[:2]), out.stdout
    return lines[2].removeprefix("other: "), lines[3].removeprefix("set: ")


class CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched inside the block (``ops``: op overload -> calls)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))
