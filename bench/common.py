"""Shared benchmark machinery: canonical shapes, providers, CUDA-event timing and result rows.

Every benchmark is a pytest-benchmark test that calls :func:`run` with a callable. On a GPU the
callable is timed with CUDA events (:func:`time_median`), and pytest-benchmark records a
synchronised host-clock run as well. Each row's
``extra_info`` carries device, versions, dtype, commit, median/p20/p80 in ms, samples/s, peak
memory and achieved GB/s or TFLOP/s against ceilings measured in the same run. A compiled
provider's row also counts the frames dynamo looked at over the row (``dynamo_frames``) and
compiled (``dynamo_frames_compiled``: 0 means the row ran uncompiled code), those it looked at
during the timed calls alone (``dynamo_frames_timed``: nonzero means the median is not of compiled
code alone), and its graph breaks; ``bench/report.py`` names the rows where one of these is off.

Host time versus device time: at the DESIGN shapes most single ops run for tens of microseconds
on the GPU, less than the Python and launch work that issues them, so a plain timing of
``eager`` or ``fused`` measures the host. Every op and the model therefore also have
``<provider>-cudagraph`` variants (``full`` mode): the same callable captured once in a CUDA graph
(:func:`captured`) and replayed, which measures the device time alone. Compare graphed with
graphed and plain with plain; the report keeps them in separate columns. ``compile-cudagraph``
captures the ``torch.compile``d eager op the same way (after its warm-up has compiled it): the
device time of what Inductor makes of the eager code, which says for each op whether the fused
kernel or Inductor's own should run inside a compiled model.

How each kind is timed (:func:`time_median`):
* plain providers -- steady state: each sample is the mean time per call over back-to-back calls
  between two CUDA events (the device synchronised at the end of the sample), 11 samples of at
  least 5 calls and 20 ms. That is the time per step a training loop sees, the slower of host and
  device; caches stay warm between calls, as they do in a loop. (``do_bench`` is not used here:
  it queues a 256 MB L2-flush memset before every start event, and a host-bound call enqueues its
  kernels while that memset runs, so its time came out about one flush, 65-90 us, below the host
  time, which flattered the faster of two host-bound providers; and at its 100 ms budget a 40 ms
  training step got only 2-3 runs.)
* graphed providers -- ``triton.testing.do_bench`` on the replay (L2 flushed before each replay:
  cold-cache device time), with the budget sized for at least 25 replays.

Every op and the model also have ``compile-max-autotune`` (``torch.compile(mode=
"max-autotune-no-cudagraphs")``), run only at the shapes named by ``$INTERFORMER_BENCH_AUTOTUNE_SHAPES``
(default ``taobao,amazon``): its autotuning takes minutes per shape.

Peak memory (``peak_extra_MiB``) is the peak allocated above what was allocated before the
provider's first call (parameters and inputs): activations, gradients, and whatever the warm-up
left allocated. For a plain provider the peak is taken over one extra call after the warm-up,
outside the timing; for a graphed provider over warming up and capturing (outside ``do_bench``,
whose 256 MB L2-flush buffer would otherwise be counted) (the graph's private pool holds it from then on).
Both kinds share the baseline, so gradients count in both (plain rows once measured from a baseline
taken after the warm-up, which already held the previous call's gradients).

Without a GPU the suite is a smoke test: shapes shrink to tiny ones (``smoke``) and kernels run
under the Triton interpreter; timings there are NOT meaningful and rows say so.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import subprocess
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# bf16 on GPU (DESIGN §6); the interpreter has no bf16, so smoke runs use fp32.
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
SMOKE_NOTE = "CPU smoke run under the Triton interpreter: timings are not meaningful"


@dataclass(frozen=True)
class Shape:
    """A canonical benchmark shape (DESIGN §6) and the InterFormer sizes derived from it."""

    name: str
    B: int
    n: int  # non-sequence tokens
    k: int  # behaviour channels
    T: int  # events per sequence
    d: int
    heads: int
    layers: int
    n_sum: int = 4
    n_pma: int = 2
    n_recent: int = 2
    n_ssum: int = 8
    dcn_rank: int = 32

    @property
    def n_cls(self) -> int:
        return self.n_sum

    @property
    def L(self) -> int:
        """Sequence Arch length: CLS tokens + events."""
        return self.n_cls + self.T

    @property
    def Nz(self) -> int:
        """Interaction Arch tokens ``n + n_ssum``."""
        return self.n + self.n_ssum

    @property
    def D(self) -> int:
        """DCN width ``(n + n_ssum) * d``."""
        return self.Nz * self.d

    @property
    def head_dim(self) -> int:
        return self.d // self.heads


GPU_SHAPES = {
    "taobao": Shape("taobao", B=2048, n=20, k=3, T=50, d=64, heads=4, layers=3),
    "amazon": Shape("amazon", B=2048, n=4, k=2, T=100, d=64, heads=4, layers=3),
    "long": Shape("long", B=512, n=64, k=2, T=1000, d=128, heads=4, layers=3),
}
SMOKE_SHAPES = {
    "smoke": Shape("smoke", B=3, n=5, k=2, T=7, d=32, heads=2, layers=1, n_ssum=3, dcn_rank=4),
}
#: Shapes outside DESIGN §6, each for one question, run only by the benchmarks that name them (not in
#: SHAPE_NAMES). ``taobao-b64k``: taobao's sizes at 32x its batch, where a memory-bound op's bytes
#: take far longer than its launches, so its time says what fraction of the copy bandwidth the
#: kernels reach when they are not bound by launch latency (issue 3's gated LCE target; at taobao
#: itself the bytes of a forward+backward take 2.5-4.3 us at copy speed).
EXTRA_SHAPES = {"taobao-b64k": replace(GPU_SHAPES["taobao"], name="taobao-b64k", B=65536)}
SHAPES = GPU_SHAPES if ON_GPU else SMOKE_SHAPES
#: every shape by name, smoke included whatever the machine (quick checks on a GPU)
ALL_SHAPES = {**GPU_SHAPES, **SMOKE_SHAPES, **EXTRA_SHAPES}
SHAPE_NAMES = list(SHAPES)
MODES = ("fwd", "bwd", "full")
#: Provider-name suffix of the CUDA-graph variants (see :func:`captured`).
GRAPH_SUFFIX = "-cudagraph"
CPU_PROVIDERS = ("eager", "fused")
# max-autotune compiles for minutes per shape; $INTERFORMER_BENCH_AUTOTUNE_SHAPES limits where it runs.
AUTOTUNE_SHAPES = os.environ.get("INTERFORMER_BENCH_AUTOTUNE_SHAPES", "taobao,amazon").split(",")


def base_provider(provider: str) -> str:
    """``provider`` without the CUDA-graph suffix: the implementation a graphed variant captures."""
    return provider[: -len(GRAPH_SUFFIX)] if provider.endswith(GRAPH_SUFFIX) else provider


def skip_unless_runnable(provider: str, mode: str, cpu_providers: Sequence[str] = CPU_PROVIDERS,
                         shape_name: Optional[str] = None, graph_modes: Sequence[str] = ("full",)) -> None:
    """Skip (with the reason) a provider this machine cannot run, graphed variants outside
    ``graph_modes`` (for ops, one graphed mode keeps the suite's GPU time down), and max-autotune at
    shapes outside ``$INTERFORMER_BENCH_AUTOTUNE_SHAPES``."""
    import pytest

    if not ON_GPU and provider not in cpu_providers:
        pytest.skip(f"{provider}: GPU only ({SMOKE_NOTE})")
    if provider.endswith(GRAPH_SUFFIX) and mode not in graph_modes:
        pytest.skip(f"{provider}: CUDA-graph variants run in {', '.join(graph_modes)} mode only")
    if provider == "compile-max-autotune" and shape_name is not None and shape_name not in AUTOTUNE_SHAPES:
        pytest.skip(f"max-autotune not run at {shape_name} (INTERFORMER_BENCH_AUTOTUNE_SHAPES)")


def lengths_for(shape: Shape, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Event counts uniform in ``[0, T]`` (a realistic padded batch), with one empty and one full row."""
    g = generator or torch.Generator().manual_seed(0)
    lengths = torch.randint(0, shape.T + 1, (shape.B,), generator=g)
    lengths[0] = shape.T
    if shape.B > 1:
        lengths[1] = 0
    return lengths.to(DEVICE)


@functools.lru_cache(maxsize=None)
def environment() -> dict:
    commit = os.environ.get("INTERFORMER_COMMIT")  # set by bench/gpu_session.sh where no .git travels
    try:
        commit = commit or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except Exception:  # not a checkout
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {
        "device": torch.cuda.get_device_name() if ON_GPU else "cpu (smoke)",
        "torch": torch.__version__,
        "triton": triton_version,
        "flash_attn": flash_attn_version(),
        "commit": commit,
    }


def flash_attn_version() -> str:
    """The optional ``flash_attn`` package's version, or "absent" where it does not import (DESIGN §6:
    its absence is reported, never an error; every row says which, and bench/report.py names it)."""
    try:
        import flash_attn
    except Exception:  # noqa: BLE001 - not installed, or installed for another torch / CUDA
        return "absent"
    return str(getattr(flash_attn, "__version__", "unknown"))


@functools.lru_cache(maxsize=None)
def ceilings() -> dict:
    """Measured ceilings of this device: copy bandwidth (bytes read + written) and bf16 matmul rate."""
    if not ON_GPU:
        return {"copy_GBps": float("nan"), "bf16_TFLOPs": float("nan")}
    from triton.testing import do_bench

    n = 1 << 28  # 512 MiB of bf16 per buffer
    src = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    copy = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    del src, dst
    m = 8192
    a = torch.randn(m, m, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=DEVICE, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, return_mode="median")
    tflops = 2 * m**3 / (ms * 1e-3) / 1e12
    return {"copy_GBps": copy, "bf16_TFLOPs": tflops}


def mode_fn(forward: Callable[[], torch.Tensor], mode: str, leaves: Sequence[torch.Tensor]) -> Callable[[], None]:
    """A callable that runs ``forward`` in ``mode``: ``fwd``, ``bwd`` (backward of a saved graph) or
    ``full`` (forward + backward). ``leaves`` are the tensors whose ``.grad`` is reset each call. The
    upstream gradient of ``bwd`` and ``full`` is made once (``full``: on the first call), not in the
    timed calls."""
    if mode == "fwd":
        def run_fwd():
            with torch.no_grad():
                forward()
        return run_fwd

    def zero():
        for t in leaves:
            t.grad = None

    if mode == "full":
        # The upstream gradient comes from outside the op, as in a training step: made on the first
        # call (the warm-up) and reused, so that no fill kernel is timed with the op (a write of
        # out's size and a launch: about 1-1.5 us, by estimate, against 18 us for the fused DOT's
        # whole graphed step on the H200; and a dispatch in every plain call).
        upstream = {}

        def run_full():
            zero()
            out = forward()
            key = (out.shape, out.dtype, out.device)
            if key not in upstream:
                upstream.clear()
                upstream[key] = torch.ones_like(out)
            out.backward(upstream[key])
        return run_full

    if mode == "bwd":
        out = forward()
        grad = torch.randn_like(out)

        def run_bwd():
            zero()
            out.backward(grad, retain_graph=True)
        return run_bwd
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _one_call_ms(fn: Callable[[], None]) -> float:
    """Wall time of one synchronised call, in ms (a first estimate that sizes the timing loops)."""
    import time

    if ON_GPU:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if ON_GPU:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def _quantiles(samples: Sequence[float]) -> dict:
    q = torch.tensor(samples, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return {"median_ms": float(q[0]), "p20_ms": float(q[1]), "p80_ms": float(q[2])}


def time_median(fn: Callable[[], None], graphed: bool = False, samples: int = 11,
                min_calls: int = 5, min_sample_ms: float = 20.0) -> dict:
    """Median, p20 and p80 of the time per call in ms (module docstring: plain providers in steady
    state, graphed ones with ``do_bench``); one synchronised host run without a GPU."""
    estimate = _one_call_ms(fn)
    if not ON_GPU:
        return {"median_ms": estimate, "p20_ms": estimate, "p80_ms": estimate}
    if graphed:
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=max(100.0, 25 * estimate))
        return {"median_ms": p50, "p20_ms": p20, "p80_ms": p80}
    calls = max(min_calls, math.ceil(min_sample_ms / max(estimate, 1e-3)))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    per_call = []
    for _ in range(samples):
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / calls)
    return _quantiles(per_call)


def _start_peak() -> int:
    """Reset the peak-memory counter; returns the bytes allocated now (0 without a GPU)."""
    if not ON_GPU:
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_since(base: int) -> float:
    """MiB allocated above ``base`` at the peak since :func:`_start_peak` (NaN without a GPU)."""
    if not ON_GPU:
        return float("nan")
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def captured(fn: Callable[[], None], warmup: int = 3) -> Callable[[], None]:
    """``fn`` warmed up on a side stream (Triton compilation, allocator, autotuning), then captured
    in a CUDA graph; returns the graph's replay. ``fn`` must be capturable: no host syncs, no CPU
    tensors created per call, and under autocast ``cache_enabled=False``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def autocast_for(provider: str) -> torch.autocast:
    """The benchmarks' autocast: ``DTYPE`` on a GPU, off on the CPU; without its weight-cast cache
    for a CUDA-graph provider (:func:`captured`: a cast cached during capture would be a tensor the
    replays never refresh)."""
    return torch.autocast(DEVICE.type, dtype=DTYPE, enabled=ON_GPU,
                          cache_enabled=not provider.endswith(GRAPH_SUFFIX))


def synchronized(fn: Callable[[], None]) -> Callable[[], None]:
    def call():
        fn()
        if ON_GPU:
            torch.cuda.synchronize()
    return call


def dynamo_counts() -> tuple:
    """``(frames looked at, frames compiled, graph breaks)`` by ``torch.compile`` in this process so
    far. Dynamo's frame callback runs only on a cache miss, so every frame it looks at is one it
    compiles, recompiles, skips or gives up on (past ``recompile_limit`` the frame then runs
    uncompiled: looked at, not compiled); a call that hits the cache adds nothing."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"], counters["frames"]["ok"], sum(counters["graph_break"].values())


#: :func:`dynamo_counts` when the current benchmark began (``bench/conftest.py`` sets it after
#: resetting dynamo), so that a row counts what was compiled while its callable was built (a ``bwd``
#: row runs the compiled forward then); None: :func:`run` takes its own when it starts
_ROW_START: Optional[tuple] = None


def apply_setting_variant(monkeypatch, module, settings: dict, provider: str, mode: Optional[str] = None) -> None:
    """A setting-variant provider's settings (``settings[provider without -cudagraph]``: kernel-module
    attribute -> value) set on ``module`` for this row; nothing for another provider. ``mode``, for
    a variant that changes the backward only: a ``fwd`` row is skipped (it would time the default's
    forward again)."""
    values = settings.get(base_provider(provider))
    if values is None:
        return
    if mode == "fwd":
        import pytest

        pytest.skip(f"{provider}: a backward setting (the forward is the default's)")
    for name, value in values.items():
        monkeypatch.setattr(module, name, value)


def start_row() -> None:
    """Mark the start of a benchmark for the dynamo counts of its row (see :data:`_ROW_START`)."""
    global _ROW_START
    _ROW_START = dynamo_counts()


def run(
    benchmark,
    fn: Callable[[], None],
    *,
    op: str,
    shape: Shape,
    provider: str,
    mode: str,
    dtype: torch.dtype = DTYPE,
    bytes_moved: Optional[float] = None,
    flops: Optional[float] = None,
    samples: Optional[int] = None,
) -> dict:
    """Time ``fn`` (already warm or not) and record one result row in ``benchmark.extra_info``.

    ``bytes_moved`` (fewest bytes: each input read once, each output written once) gives GB/s and a
    fraction of the measured copy bandwidth; ``flops`` gives TFLOP/s and a fraction of the bf16
    matmul rate. The floor time is the larger of the two lower bounds, reported as ``x_floor``.
    """
    graphed = provider.endswith(GRAPH_SUFFIX)
    compiled_provider = compile_options(base_provider(provider)) is not None
    frames0, compiled0, breaks0 = _ROW_START if _ROW_START is not None else dynamo_counts()
    base = _start_peak()  # before any call: parameters and inputs only
    if graphed:
        try:
            fn = captured(fn)  # compiles, warms up and captures; the pool is allocated here
        except RuntimeError as exc:
            if base_provider(provider) in ("fused", "fused-triton-gemm"):
                raise  # the fused ops promise to be capturable (tests/test_fused_model.py): a failure is a bug
            import pytest

            pytest.skip(f"{provider}: not capturable ({str(exc).splitlines()[0][:200]})")
        peak_mb = _peak_since(base)
    fn()  # warm-up: compilation, autotuning, caches
    if not graphed:
        _start_peak()  # resets the peak counter; the baseline stays the one taken before the warm-up
        fn()
        peak_mb = _peak_since(base)
    frames_warm = dynamo_counts()[0]
    timing = time_median(fn, graphed=graphed)
    frames_end, compiled_end, breaks_end = dynamo_counts()
    ms = timing["median_ms"]
    row = {
        "op": op, "shape": shape.name, "provider": provider, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
        **timing, "peak_extra_MiB": peak_mb, "samples_per_s": (samples or shape.B) / (ms * 1e-3),
        **environment(),
    }
    ceil = ceilings()
    floor_ms = 0.0
    for name, key in (("ceil_copy_GBps", "copy_GBps"), ("ceil_bf16_TFLOPs", "bf16_TFLOPs")):
        if math.isfinite(ceil[key]):  # the ceilings the fractions and the floor are taken against
            row[name] = ceil[key]
    if bytes_moved:
        row["bytes_moved"] = bytes_moved
        row["GBps"] = bytes_moved / (ms * 1e-3) / 1e9
        row["frac_copy_bw"] = row["GBps"] / ceil["copy_GBps"]
        floor_ms = max(floor_ms, bytes_moved / (ceil["copy_GBps"] * 1e9) * 1e3)
    if flops:
        row["flops"] = flops
        row["TFLOPs"] = flops / (ms * 1e-3) / 1e12
        row["frac_bf16_peak"] = row["TFLOPs"] / ceil["bf16_TFLOPs"]
        floor_ms = max(floor_ms, flops / (ceil["bf16_TFLOPs"] * 1e12) * 1e3)
    if floor_ms > 0:
        row["floor_ms"] = floor_ms
        row["x_floor"] = ms / floor_ms
    if compiled_provider:
        # a compiled row whose timed calls compiled, or which compiled nothing (past dynamo's
        # recompile limit a frame runs uncompiled), did not time the compiled code alone: the report
        # names such rows (bench/conftest.py resets dynamo before each benchmark)
        row["dynamo_frames"] = frames_end - frames0
        row["dynamo_frames_compiled"] = compiled_end - compiled0
        row["dynamo_frames_timed"] = frames_end - frames_warm
        row["graph_breaks"] = breaks_end - breaks0
    if compiled_provider and provider.startswith("fused"):
        from interformer import compile_reference_ops  # how the fused model was compiled
        from interformer.backend import inlines_on

        row["compile_reference"] = ",".join(sorted(compile_reference_ops())) or "none"
        row["compile_inline"] = inlines_on(DEVICE)  # whether the kept ops were inlined (the setting, applied)
    if not ON_GPU:
        row["note"] = SMOKE_NOTE
    benchmark.extra_info.update(row)
    rows_path = os.environ.get("INTERFORMER_BENCH_ROWS")
    if rows_path:  # one JSON line per row as it is measured: a run cut short still keeps its rows
        import json

        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
    benchmark.pedantic(synchronized(fn), rounds=3 if ON_GPU else 1, iterations=1, warmup_rounds=0)
    return row


#: Fused providers compiled with some ops left to Inductor (``interformer.set_compile_reference_ops``),
#: by name -> the fused ops that stay custom ops in the compiled graph. ``fused-compile-attention``
#: keeps the attention kernels alone (where the fused kernel beats Inductor's code for the reference
#: math most: 2-9x in the op benchmarks) and leaves every other op to Inductor to fuse with its
#: neighbours: against ``fused-compile`` it says whether the other custom ops cost the compiled
#: model more (opaque graph boundaries, a dispatch each) than their kernels save.
COMPILE_KEEPS = {"fused-compile-attention": ("attention", "pooled_attention")}

#: Fused providers compiled under a forced inline setting (``interformer.set_compile_inline``), by
#: name -> the setting. ``fused-compile`` has the default, which on a GPU traces the kept custom ops
#: into their Triton kernels (Inductor launches them from its own code); ``fused-compile-opaque``
#: keeps them opaque custom ops, to keep measured what their dispatch costs a compiled step (the
#: default until the H200 leases of 2026-11-28; ``fused-compile-inline`` in their results).
COMPILE_INLINE = {"fused-compile-opaque": False}


@contextlib.contextmanager
def compile_reference(provider: str):
    """Inside the block, the compile settings ``provider`` names hold: the ops it leaves to Inductor
    take the reference while ``torch.compile`` traces (the providers of :data:`COMPILE_KEEPS`), and
    the kept ops are inlined or not as :data:`COMPILE_INLINE` says; both settings are restored
    on leaving. Hold it over the compiled model's every call: dynamo guards on the first."""
    keeps = COMPILE_KEEPS.get(base_provider(provider))
    inline = base_provider(provider) in COMPILE_INLINE
    from interformer.backend import FUSED_OPS, set_compile_inline, set_compile_reference_ops

    before = set_compile_reference_ops([op for op in FUSED_OPS if op not in keeps]) if keeps is not None else None
    inline_before = set_compile_inline(COMPILE_INLINE[base_provider(provider)]) if inline else None
    try:
        yield
    finally:
        if keeps is not None:
            set_compile_reference_ops(before)
        if inline:
            set_compile_inline(inline_before)


def compile_options(provider: str) -> Optional[dict]:
    """The ``torch.compile`` keyword arguments a provider's name asks for; None: not compiled."""
    if provider in COMPILE_KEEPS or provider in COMPILE_INLINE:
        return {}
    if provider.endswith("compile-max-autotune"):
        return {"mode": "max-autotune-no-cudagraphs"}
    if provider.endswith("compile-reduce-overhead"):
        return {"mode": "reduce-overhead"}
    if provider.endswith("compile"):
        return {}
    return None


def compiled(fn: Callable, provider: str) -> Callable:
    """``fn`` for a provider name: as is, or through ``torch.compile`` (:func:`compile_options`)."""
    options = compile_options(base_provider(provider))  # "compile-cudagraph": compiled, then captured
    return fn if options is None else torch.compile(fn, **options)
