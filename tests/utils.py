"""Helpers shared by the tests: relative errors, float64 copies and the low-precision rule."""

from __future__ import annotations

from typing import Iterable

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# DESIGN §5: fp32 <= 1e-5 under the interpreter, <= 1e-3 on GPU (tf32 where documented).
FP32_TOL = 1e-3 if HAS_CUDA else 1e-5
# dtypes exercised by kernel tests on this machine (the interpreter has no bfloat16)
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


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


def grads(tensors: Iterable[torch.Tensor]):
    return [t.grad for t in tensors]


def random_lengths(B: int, L: int, generator=None) -> torch.Tensor:
    """Random lengths in ``[0, L]`` that include 0 and L whenever B >= 2 (B == 1 gets L)."""
    lengths = torch.randint(0, L + 1, (B,), generator=generator)
    if B >= 1:
        lengths[0] = L
    if B >= 2:
        lengths[1] = 0
    return lengths


# Ahead-of-time sm_90 builds, in child processes without TRITON_INTERPRET (the interpreter replaces
# triton.jit, so it cannot compile). A case names a kernel ("module", "kernel"), its constexprs
# ("consts") and its other arguments ("args"): a dtype name is a pointer ("fp32", "bf16", ...; torch
# names such as "bfloat16" too), a list of them a tuple of pointers, an int an i32 (specialised as a
# multiple of 16 when it is one), a float an fp32; unnamed arguments are plain i32s. Pointers are
# taken as 16-byte aligned. Options: "num_warps" (4), "num_stages" (Triton's default). Other keys pass
# through to the result, which adds the compiled shared memory ("shared") and counts of warp-group
# dots ("wgmma") and async copies ("async_copies") in the TTGIR.
_AOT_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TY = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
ALIGNED = [["tt.divisibility", 16]]
for case in json.loads(sys.argv[1]):
    fn = getattr(importlib.import_module(case["module"]), case["kernel"])
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        a = case.get("args", {}).get(name, 0)
        if name in case["consts"]:
            sig[name], consts[(i,)] = "constexpr", case["consts"][name]
        elif isinstance(a, list):  # a tuple of pointers
            sig[name] = tuple("*" + TY.get(t, t) for t in a)
            for j in range(len(a)):
                attrs[(i, j)] = ALIGNED
        elif isinstance(a, str):  # a pointer
            sig[name], attrs[(i,)] = "*" + TY.get(a, a), ALIGNED
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            attrs[(i,)] = ALIGNED if a and a % 16 == 0 else []
    opts = {k: case[k] for k in ("num_warps", "num_stages") if k in case}
    opts.setdefault("num_warps", 4)
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    ir = k.asm["ttgir"]
    print(json.dumps(dict(case, shared=k.metadata.shared, wgmma=ir.count("warp_group_dot"),
                          async_copies=ir.count("async_copy"))), flush=True)
"""


def aot_build_sm90(cases, timeout: int = 900, workers: int = 1):
    """Compile each case for sm_90 (no GPU needed), in ``workers`` child processes; returns the
    cases with ``shared``, ``wgmma`` and ``async_copies`` added, in the given order."""
    import json
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    indexed = [dict(case, _index=i) for i, case in enumerate(cases)]
    chunks = [c for c in (indexed[i::workers] for i in range(max(1, workers))) if c]

    def build(chunk):
        res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, json.dumps(chunk)], env=env, cwd=root,
                             capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, res.stderr[-3000:]
        return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]

    with ThreadPoolExecutor(len(chunks)) as pool:
        results = [r for rs in pool.map(build, chunks) for r in rs]
    assert len(results) == len(cases), f"{len(results)} builds for {len(cases)} cases"
    return [{k: v for k, v in r.items() if k != "_index"} for r in sorted(results, key=lambda r: r["_index"])]
