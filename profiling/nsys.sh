#!/usr/bin/env bash
# One training step window under Nsight Systems, then the per-NVTX-range time table.
#   profiling/nsys.sh [--shape taobao] [--backend triton] ...   (arguments go to train_step.py)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${NSYS_OUT:-$here/out/interformer}"
mkdir -p "$(dirname "$out")"
nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop -t cuda,nvtx -o "$out" --force-overwrite true \
  python "$here/train_step.py" "$@"
# nvtx_sum: each range's host (push-to-pop) time; nvtx_gpu_proj_sum: the GPU time of the work
# launched inside each range, projected onto it (what the range costs the device); then per kernel.
nsys stats --report nvtx_sum --report nvtx_gpu_proj_sum --report cuda_gpu_kern_sum "$out.nsys-rep"
