#!/usr/bin/env bash
# Nsight Compute (--set full) on one launch of a named kernel in a training step, or in one call of ops.
#   profiling/ncu.sh KERNEL_REGEX [train_step.py arguments...]    e.g. profiling/ncu.sh '_attn_fwd' --shape taobao
#   NCU_SCRIPT=op_kernels profiling/ncu.sh KERNEL_REGEX [op_kernels.py arguments...]
#     e.g. NCU_SCRIPT=op_kernels NCU_COUNT=4 profiling/ncu.sh '_glce_(fwd|bwd)_kernel' \
#            --ops gated_lce_nonseq,gated_lce_seq --providers fused --shape taobao-b64k
# Only the measured steps (or calls) are profiled (train_step.py, and op_kernels.py --ncu, bracket them
# with cudaProfilerStart/Stop; --profile-from-start off), so the warm-up's first launches (JIT compiles)
# never are. NCU_SKIP (default 0) launches of matching kernels in those steps are skipped first (ncu's
# --launch-skip counts matching launches only), then NCU_COUNT (default 1) are profiled. The clocks are
# left as they are (--clock-control none: the GPU machines' notes ask for it; ncu's default locks them
# to base clocks).
# Environment: NCU (the ncu binary), PYTHON, NCU_OUT (report path without extension), NCU_SKIP, NCU_COUNT,
# NCU_SCRIPT (train_step, the default: 2 steps after 3 of warm-up; op_kernels: one call of each op and
# provider named, after 3 of warm-up).
# -h/--help as the first argument prints this; --torch-profiler is refused (it and ncu both want CUPTI).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/_nsight.sh"
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then usage "${BASH_SOURCE[0]}"; exit 0; fi
no_torch_profiler "$@" || exit 2
kernel="${1:?usage: profiling/ncu.sh KERNEL_REGEX [train_step.py arguments...]}"; shift
ncu="$(find_tool ncu "${NCU:-}" /usr/local/cuda/bin/ncu /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu)" \
  || exit 127
python="$(find_python)" || exit 127
# the report is named after the regex, with anything but [A-Za-z0-9_.-] replaced (ncu expands
# %-sequences in -o, and | ( ) * / make awkward file names)
out="${NCU_OUT:-$here/out/ncu-$(printf '%s' "$kernel" | tr -c 'A-Za-z0-9_.-' '_')}"
mkdir -p "$(dirname "$out")"
rm -f "$out.ncu-rep"
case "${NCU_SCRIPT:-train_step}" in
  train_step) run=("$here/train_step.py" --steps 2 --warmup 3) ;;
  op_kernels) run=("$here/op_kernels.py" --ncu --calls 1 --warmup 3) ;;
  *) echo "error: NCU_SCRIPT must be train_step or op_kernels, not '${NCU_SCRIPT}'" >&2; exit 2 ;;
esac
# the profiled program's failure (e.g. one of several ops failed to build) still prints what was
# profiled: its status is kept and returned at the end
status=0
"$ncu" --profile-from-start off --kernel-name "regex:$kernel" --launch-skip "${NCU_SKIP:-0}" \
  --launch-count "${NCU_COUNT:-1}" --set full --clock-control none --force-overwrite -o "$out" \
  "$python" "${run[@]}" "$@" || status=$?
if [[ ! -f "$out.ncu-rep" ]]; then
  echo "error: no launch of a kernel matching 'regex:$kernel' was profiled (after skipping ${NCU_SKIP:-0}," \
       "ncu exit $status; its ==ERROR== lines above say why when it could not profile at all);" \
       "the names are the @triton.jit functions' (e.g. _attn_fwd_kernel; train_step.py --torch-profiler and op_kernels.py list them)" >&2
  exit 1
fi
# the whole details page (not piped into head: under pipefail a closed pipe failed the script), then
# every warp-stall metric the set collected, per kernel (the details page gives only their sum)
"$ncu" --import "$out.ncu-rep" --page details --print-units base
"$ncu" --import "$out.ncu-rep" --page raw --print-units base --metrics "regex:issue_stalled" || true
exit "$status"
