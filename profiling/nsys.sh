#!/usr/bin/env bash
# Training steps under Nsight Systems (the warm-up left out), then the per-NVTX-range time tables.
#   profiling/nsys.sh [train_step.py arguments...]      e.g. profiling/nsys.sh --shape taobao --backend triton
# Environment: NSYS (the nsys binary, if not on the PATH), PYTHON (default python, else python3),
# NSYS_OUT (the report's path without extension; default profiling/out/interformer).
# -h/--help prints this (for train_step.py's own: python profiling/train_step.py --help);
# --torch-profiler is refused (it and nsys both want CUPTI).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/_nsight.sh"
for arg in "$@"; do
  if [[ "$arg" == -h || "$arg" == --help ]]; then usage "${BASH_SOURCE[0]}"; exit 0; fi
done
no_torch_profiler "$@" || exit 2
nsys="$(find_tool nsys "${NSYS:-}" /usr/local/cuda/bin/nsys /usr/local/cuda*/bin/nsys \
        /opt/nvidia/nsight-systems/*/bin/nsys)" || exit 127
python="$(find_python)" || exit 127
out="${NSYS_OUT:-$here/out/interformer}"
mkdir -p "$(dirname "$out")"
# an earlier run's report must not stand in for this one's if this one records nothing
rm -f "$out.nsys-rep" "$out.sqlite"
# train_step.py brackets its measured steps with cudaProfilerStart/Stop: only they are recorded
"$nsys" profile --trace=cuda,nvtx --capture-range=cudaProfilerApi --capture-range-end=stop \
  --force-overwrite=true -o "$out" "$python" "$here/train_step.py" "$@"
if [[ ! -f "$out.nsys-rep" ]]; then
  echo "error: nsys wrote no $out.nsys-rep (no CUDA device, or the steps never called cudaProfilerStart)" >&2
  exit 1
fi
# nvtx_sum: each range's host (push-to-pop) time; nvtx_gpu_proj_sum: the GPU time of the work
# launched inside each range from the range's own thread, projected onto it (the forward ranges on
# the calling thread, the <name>.backward ranges on the thread that ran the backward); then per
# kernel. Totals over all measured steps (--steps, default 10), in ns. --force-export: never reuse
# the .sqlite of an earlier run.
"$nsys" stats --force-export=true --report nvtx_sum --report nvtx_gpu_proj_sum --report cuda_gpu_kern_sum \
  "$out.nsys-rep"
