#!/usr/bin/env bash
# One training step window under Nsight Systems, then the per-NVTX-range time table.
#   profiling/nsys.sh [--shape taobao] [--backend triton] ...   (arguments go to train_step.py)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${NSYS_OUT:-$here/out/interformer}"
mkdir -p "$(dirname "$out")"
nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop -t cuda,nvtx -o "$out" --force-overwrite true \
  python "$here/train_step.py" "$@"
nsys stats --report nvtx_sum --report cuda_gpu_kern_sum "$out.nsys-rep"
