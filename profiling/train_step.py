"""Run InterFormerCTR training steps with NVTX ranges, for Nsight Systems / Nsight Compute.

    python profiling/train_step.py --shape taobao --backend triton --steps 10 [--torch-profiler]

Warm-up steps run first; the measured steps sit between ``cudaProfilerStart``/``Stop`` so
``nsys profile --capture-range=cudaProfilerApi`` records only them. With ``--torch-profiler`` the
script also records the steps with ``torch.profiler`` and prints a per-range CUDA time table (the
same range names as the NVTX ones), which works where Nsight Systems is not available.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

RANGES = ("CrossArch.nonseq", "CrossArch.seq", "InteractionArch", "SequenceArch", "GatedLCE", "PersonalizedFFN",
          "CrossNet", "LowRankCrossNet", "DotInteraction", "RotaryMultiHeadAttention", "PoolingMultiHeadAttention",
          "train_step")


def main(argv=None) -> int:
    import common
    from test_bench_model import batch_for, config_for

    from interformer import InterFormerCTR, optimize
    from interformer.profiling import enable_nvtx, nvtx_range

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="taobao" if common.ON_GPU else "smoke", choices=list(common.SHAPES))
    parser.add_argument("--backend", default="triton", choices=["eager", "triton", "auto"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--torch-profiler", action="store_true", help="print a per-range CUDA time table")
    args = parser.parse_args(argv)

    shape = common.SHAPES[args.shape]
    cfg = config_for(shape)
    model = optimize(InterFormerCTR(cfg).to(common.DEVICE), args.backend)
    inputs, label = batch_for(shape, cfg)
    autocast = torch.autocast(common.DEVICE.type, dtype=common.DTYPE, enabled=common.ON_GPU)

    def step():
        with nvtx_range("train_step"):
            for p in model.parameters():
                p.grad = None
            with autocast:
                loss = model.loss(model(*inputs), label)
            loss.backward()

    for _ in range(args.warmup):
        step()
    enable_nvtx(True)
    if common.ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    prof = None
    if args.torch_profiler:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if common.ON_GPU else [])
        prof = torch.profiler.profile(activities=acts)
        prof.__enter__()
    for _ in range(args.steps):
        step()
    if common.ON_GPU:
        torch.cuda.synchronize()
    if prof is not None:
        prof.__exit__(None, None, None)
    if common.ON_GPU:
        torch.cuda.profiler.stop()
    enable_nvtx(False)

    if prof is not None:
        totals = defaultdict(lambda: [0.0, 0.0, 0])
        for evt in prof.key_averages():
            if evt.key in RANGES:
                dev = getattr(evt, "device_time_total", 0.0) or getattr(evt, "cuda_time_total", 0.0)
                totals[evt.key][0] += dev
                totals[evt.key][1] += evt.cpu_time_total
                totals[evt.key][2] += evt.count
        print(f"\nper-range time over {args.steps} steps ({args.shape}, backend={args.backend}, {common.environment()['device']})")
        print(f"{'range':<28} {'calls':>6} {'GPU ms/step':>12} {'CPU ms/step':>12}")
        for name in RANGES:
            if name in totals:
                gpu, cpu, n = totals[name]
                print(f"{name:<28} {n:>6} {gpu / 1e3 / args.steps:>12.3f} {cpu / 1e3 / args.steps:>12.3f}")
        print("(GPU time of a range = device time of the kernels launched inside it; ranges nest.)")
        print("\nkernels by device time:")
        print(prof.key_averages().table(sort_by="device_time_total" if common.ON_GPU else "cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
