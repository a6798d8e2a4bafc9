"""Helpers every kernel file uses: block-size arithmetic, ``tl.dot`` precision, grid sizing from the
device, and the fixed-order reduction of per-program partial sums.

Partial sums: a backward that computes a gradient shared by every sample (a weight, a bias, a
LayerNorm's gamma) lets each program accumulate its share in fp32 registers and store it once into
an fp32 ``[G, P]`` buffer; :func:`sum_partials` then reduces over G in one launch, in a fixed
order (deterministic on a given device, no atomics), and writes up to four gradients, each cast to
its own dtype.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from interformer import backend as _backend

from ._dispatch import launch, layer_norm_takes, unused_arg

#: the dtypes every kernel takes (one definition, shared with ``backend="auto"``'s choice)
KERNEL_DTYPES = _backend.KERNEL_DTYPES


_NO_GUARD = contextlib.nullcontext()


def device_guard(device: torch.device):
    """A context making ``device`` the current CUDA device for the Triton launches inside it (Triton
    launches on the current device, not on the tensors'), or a shared no-op when it already is one,
    or for a CPU tensor (the interpreter). RuntimeError for a CPU tensor when this process's kernels
    were built for a GPU (see :func:`interpreted`)."""
    if device.type != "cuda":
        if device.type == "cpu" and not interpreted():
            raise RuntimeError(_NOT_INTERPRETED)
        return _NO_GUARD
    if device.index is None or device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device)


_NOT_INTERPRETED = (
    "interformer: a fused Triton op was given CPU tensors, but Triton runs kernels on CPU tensors only "
    "through its interpreter, which must be switched on (TRITON_INTERPRET=1) before Triton is imported. "
    "On the CPU use backend='auto' or 'eager' (the same math in PyTorch ops; 'auto' takes it for CPU "
    "parameters), or start the process with TRITON_INTERPRET=1 (slow: for tests)")


def interpreted() -> bool:
    """Whether this process's kernels run under Triton's interpreter: ``TRITON_INTERPRET=1`` was set
    when Triton decorated them (it decides once, at ``@triton.jit``; setting it later changes
    nothing). Without it a launch on CPU tensors fails inside Triton with a message that names no
    cause ("0 active drivers" on a machine without a GPU, a pointer error on one with), so
    :func:`device_guard` refuses such a launch first, naming the fix."""
    return _INTERPRETED


def on_input_device(launcher):
    """Decorator for a launcher (a function that launches Triton kernels): its launches go to the
    device of its first tensor argument. Without it, a model on ``cuda:1`` run while ``cuda:0`` is
    current would hand Triton pointers of another device (an error from Triton's launcher at best).
    Every launcher in ``kernels/`` carries it (``tests/test_kernel_common.py`` checks)."""
    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor):
                with device_guard(a.device):
                    return launcher(*args, **kwargs)
        return launcher(*args, **kwargs)
    return guarded


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for grid sizes on the host: a plain function (``triton.cdiv`` is a
    ``constexpr_function`` in recent Triton, a few microseconds per call from Python)."""
    return -(-a // b)


def int32_block(t: torch.Tensor, samples: int) -> torch.Tensor:
    """``t``, or a contiguous copy of it when an element offset inside a block of ``samples`` entries
    of its first dimension could reach 2**31.

    Kernels take the offset of a block's first sample (or of a sample) in int64 and the offsets
    inside it in int32 (half the registers of an int64 offset tile). A contiguous block spans only
    its own elements, so a contiguous tensor is returned at once (an offset inside it passes 2**31
    only if one block holds 2**31 elements, e.g. one sample of 16.8M tokens of width 128, which no
    launcher here guards); a view whose strides are huge (a slice of an enormous buffer, a
    time-major buffer seen batch-major) can pass 2**31, and it is copied.
    ``tests/test_int64_offsets.py`` runs every op on such views."""
    if t.is_contiguous():  # the common case, decided without a loop over the dimensions (host time)
        return t
    span = (min(samples, t.shape[0]) - 1) * abs(t.stride(0))
    for n, st in zip(t.shape[1:], t.stride()[1:]):
        span += (n - 1) * abs(st) if n > 0 else 0
    return t if span < 2**31 else t.contiguous()


def affine_params(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]):
    """A LayerNorm's ``(weight, bias)`` over ``x``'s last dimension with None taken as ``F.layer_norm``
    takes it: fp32 ones for the weight, fp32 zeros for the bias (the kernels read them as they read
    any parameter dtype)."""
    n = x.shape[-1]
    if weight is None:
        weight = x.new_ones(n, dtype=torch.float32)
    if bias is None:
        bias = x.new_zeros(n, dtype=torch.float32)
    return weight, bias


def layer_norm_params(dtype: torch.dtype, *params):
    """LayerNorm parameters as ``F.layer_norm`` takes them for an input of ``dtype`` (the eager
    fallbacks of shapes the kernels do not take; the kernels read them in any float dtype): as they
    are where it takes them (:func:`._dispatch.layer_norm_takes`: all of dtype ``dtype``, or all
    fp32 with a 16-bit input, and rounding those would change the result); else cast to fp32, which
    is exact for every dtype the kernels take and which it takes with any of them. None stays None."""
    if layer_norm_takes([p.dtype for p in params if p is not None], dtype):
        return params
    return tuple(None if p is None else p.float() for p in params)


def describe_shape(t) -> str:
    """A tensor's shape for an error message (the type's name for anything else)."""
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision``: fp32 operands use 3-pass tf32 on a GPU ("tf32x3", about fp32
    accuracy on tensor cores); for fp16/bf16 operands the option is ignored."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


#: torch.promote_types over the kernel dtypes, built once: the call is an aten op (a dispatcher call,
#: host time, each time), a read-only table look-up is not (and torch.compile traces it without a
#: cache-wrapper warning)
_PROMOTED = {(a, b): torch.promote_types(a, b) for a in KERNEL_DTYPES for b in KERNEL_DTYPES}


def promote_dtypes(a: torch.dtype, b: torch.dtype, *more: torch.dtype) -> torch.dtype:
    """``torch.promote_types`` of two or more dtypes; by :data:`_PROMOTED` for the kernel dtypes."""
    out = _PROMOTED.get((a, b)) or torch.promote_types(a, b)
    return promote_dtypes(out, *more) if more else out


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def tl_dtype(dtype: torch.dtype):
    """Triton's dtype for a kernel dtype, to pass as a ``tl.constexpr`` (a kernel whose dot operands
    are rounded to a dtype no pointer argument has: the autocast dtype, with fp32 x0 and parameters)."""
    return _TL_DTYPES[dtype]


#: log2(e): ``exp(x) = 2 ** (x * LOG2E)``
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def sigmoid(z, FAST: tl.constexpr):
    """``sigmoid(z)`` of an fp32 tile: ``tl.sigmoid``, or with ``FAST`` ``q * q`` for ``q = rsqrt(1 +
    2**(-z log2 e))``, which is 0 for z far below zero (the power overflows to inf) and 1 far above
    it. ``tl.exp2`` and ``tl.math.rsqrt`` build to one ``ex2.approx.ftz.f32`` and one
    ``rsqrt.approx.ftz.f32`` (denormal results flushed to zero; NaN stays NaN), where
    ``tl.sigmoid``'s exponential (``ex2.approx.f32``) carries four instructions of denormal-range
    fix-ups and its division five (sm_90, Triton 3.6 and 3.9). Error: a float32 emulation at the two
    instructions' error bounds (a review, 2026-11-28) gave up to about 13 ulp of fp32 for ``|z| <
    4``, against about 5 for ``tl.sigmoid``'s form, growing for very negative z in both (the
    rounding of ``z log2 e``); an fp16 result's half ulp is about 4096. Kernels pass ``FAST`` for
    fp16/bf16 inputs; fp32, the correctness mode, keeps ``tl.sigmoid``. The interpreter runs both
    branches with numpy's exact functions, so the approximation itself shows only on a GPU."""
    if FAST:
        q = tl.math.rsqrt(1.0 + tl.exp2(z * -LOG2E))
        return q * q
    else:
        return tl.sigmoid(z)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """The GPU's SM count; 2 under the interpreter, so that persistent loops run several times in tests."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


#: per-SM limits of compute capability 9.0 (H100, H200) that bound how many programs run at once:
#: registers, warps, programs, shared memory (bytes; each program also takes ``shared_reserved``)
#: and the register allocation unit per warp
SM90_LIMITS = dict(registers=65536, warps=64, blocks=32, shared=233472, shared_reserved=1024, reg_unit=256)


def programs_per_sm(registers: int, shared: int, warps: int, limits: dict = SM90_LIMITS) -> int:
    """Programs of a kernel one SM holds at once, from its registers per thread, shared memory per
    program (bytes) and warps per program, as the CUDA occupancy calculator counts (0: none fits)."""
    regs_per_warp = -(-registers * 32 // limits["reg_unit"]) * limits["reg_unit"]
    by_regs = limits["registers"] // max(1, regs_per_warp * warps)
    by_smem = limits["shared"] // (shared + limits["shared_reserved"])
    return max(0, min(limits["blocks"], limits["warps"] // warps, by_regs, by_smem))


@functools.lru_cache(maxsize=None)
def _device_limits(device: torch.device) -> dict:
    """:data:`SM90_LIMITS` with what ``device`` reports in their place (torch's device properties)."""
    props = torch.cuda.get_device_properties(device)
    limits = dict(SM90_LIMITS)
    for key, attr in (("registers", "regs_per_multiprocessor"), ("shared", "shared_memory_per_multiprocessor")):
        value = getattr(props, attr, None)
        if isinstance(value, int) and value > 0:
            limits[key] = value
    threads = getattr(props, "max_threads_per_multi_processor", None)
    if isinstance(threads, int) and threads > 0:
        limits["warps"] = threads // 32
    return limits


def resident_programs(compiled, device: torch.device) -> int:
    """Programs of the kernel a launch returned (``compiled = kernel[grid](...)``) one SM of
    ``device`` holds at once, by its registers, shared memory and warps; 0 when that is not known:
    not a GPU, or not a compiled kernel (the interpreter, a recorded, skipped or traced launch)."""
    if device.type != "cuda":
        return 0
    registers = getattr(compiled, "n_regs", None)
    meta = getattr(compiled, "metadata", None)
    shared, warps = getattr(meta, "shared", None), getattr(meta, "num_warps", None)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (registers, shared, warps)) or registers <= 0:
        return 0
    return programs_per_sm(registers, shared, warps, _device_limits(device))


def int_setting(name: str, value, low: int, high: Optional[int] = None, optional: bool = True):
    """``value``, the module setting ``name``, when it is None (where ``optional``) or an int, not a
    bool, in ``[low, high]`` (no upper bound for None); ValueError naming the setting otherwise. The
    kernel modules' integer settings (pipeline stages, register caps, programs per SM) are read
    through it at every launch."""
    if value is None and optional:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and low <= value and (high is None or value <= high):
        return value
    what = f"an int in [{low}, {high}]" if high is not None else "a positive int" if low == 1 else f"an int >= {low}"
    raise ValueError(f"{name} must be {'None or ' if optional else ''}{what}, got {value!r}")


def persistent_programs(device: torch.device) -> int:
    """Grid size of a persistent kernel: 4 programs per SM on a GPU, 2 under the interpreter."""
    return 4 * num_sms(device) if device.type == "cuda" else 2


@triton.jit
def _sum_partials_kernel(
    OUT0, OUT1, OUT2, OUT3,
    PART,
    G, P, e1, e2, e3, spg,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``sum_g PART[g, c]`` for columns ``c`` of a ``[G, P]`` fp32 buffer, written to four outputs:
    columns ``[0, e1)`` to OUT0, ``[e1, e2)`` to OUT1, ``[e2, e3)`` to OUT2, ``[e3, P)`` to OUT3
    (each cast to its output's dtype; an empty segment writes nothing). Fixed summation order."""
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < P
    acc = tl.zeros([BLOCK_C], tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = (g0 + tl.arange(0, BLOCK_G)).to(tl.int64)
        v = tl.load(PART + g[:, None] * spg + c[None, :], mask=(g < G)[:, None] & c_ok[None, :], other=0.0)
        acc += tl.sum(v, 0)
    s0 = c < e1
    s1 = (c >= e1) & (c < e2)
    s2 = (c >= e2) & (c < e3)
    s3 = (c >= e3) & c_ok
    tl.store(OUT0 + tl.where(s0, c, 0), acc.to(OUT0.dtype.element_ty), mask=s0)
    tl.store(OUT1 + tl.where(s1, c - e1, 0), acc.to(OUT1.dtype.element_ty), mask=s1)
    tl.store(OUT2 + tl.where(s2, c - e2, 0), acc.to(OUT2.dtype.element_ty), mask=s2)
    tl.store(OUT3 + tl.where(s3, c - e3, 0), acc.to(OUT3.dtype.element_ty), mask=s3)


_INTERPRETED = not isinstance(_sum_partials_kernel, triton.runtime.jit.JITFunction)

_BF16_INTERPRETED = (
    "interformer: a fused Triton op was given bfloat16 tensors, or bfloat16 as its compute dtype (bf16 autocast), "
    "under Triton's interpreter (TRITON_INTERPRET=1, the fused path on the CPU), which has no bfloat16: its tl.dot "
    "results are wrong (garbage, not an error). "
    "On the CPU run the fused path in float32 or float16 (autocast dtype=torch.float16, or none), or "
    "backend='eager' for bfloat16; bfloat16 kernels need a GPU")


def _refusing_bf16(run):
    """``run`` of the interpreter's kernel class, refusing a launch of one of this package's kernels
    with a bfloat16 tensor argument (see :data:`_BF16_INTERPRETED`).

    Decision: checked at the interpreter's ``run``, the launch itself, so that launches counted and
    skipped (:func:`interformer.profiling.triton_launches` with ``run=False``, which replaces ``run``
    and does not call it) still work at bf16 on a CPU. A kernel computes in bf16 when a bf16 tensor
    is among its arguments (most take the compute dtype from their output's type) or when it is
    given ``tl.bfloat16`` as a constexpr (the cross nets' ``DT``, with fp32 tensors under bf16
    autocast)."""
    def bf16(a):
        return (isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16) or (
            isinstance(a, tl.dtype) and a == tl.bfloat16)

    def checked(self, *args, **kwargs):
        if self.fn.__module__.startswith(__package__) and any(bf16(a) for a in (*args, *kwargs.values())):
            raise RuntimeError(_BF16_INTERPRETED)
        return run(self, *args, **kwargs)
    checked.interformer_refuses_bf16 = True
    return checked


if _INTERPRETED and not getattr(type(_sum_partials_kernel).run, "interformer_refuses_bf16", False):
    type(_sum_partials_kernel).run = _refusing_bf16(type(_sum_partials_kernel).run)


def sum_partials(part: torch.Tensor, outs: Sequence[torch.Tensor]) -> None:
    """Reduce an fp32 ``[G, P]`` partial-sum buffer (unit column stride) over G into one to four
    contiguous outputs whose sizes add up to P, in that order (one launch).

    Tiles: many partial rows (a persistent grid's G of several hundred) take ``[128, 32]`` tiles,
    a few rows (row tiles of a batch) over many columns ``[<=16, 256]``; either way a program reads
    a handful of tiles and the order of the sum is fixed by (G, P) alone."""
    outs = list(outs)
    sizes = [o.numel() for o in outs]
    G, P = part.shape
    if not 1 <= len(outs) <= 4 or sum(sizes) != P:
        raise ValueError(f"sum_partials: {len(outs)} outputs of sizes {sizes} for a [{G}, {P}] buffer")
    if P == 0:
        return
    assert part.dtype == torch.float32 and (P == 1 or part.stride(1) == 1)
    while len(outs) < 4:  # padding: written nowhere (size 0)
        outs.append(unused_arg(outs[0]))
        sizes.append(0)
    e1 = sizes[0]
    e2 = e1 + sizes[1]
    e3 = e2 + sizes[2]
    if G >= 64:
        block_g, block_c = 128, 32
    else:
        block_g, block_c = min(16, max(2, next_pow2(G))), 256
    launch(_sum_partials_kernel)[(cdiv(P, block_c),)](
        outs[0], outs[1], outs[2], outs[3], part, G, P, e1, e2, e3, part.stride(0),
        BLOCK_G=block_g, BLOCK_C=block_c, num_warps=4,
    )
