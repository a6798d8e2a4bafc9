#!/usr/bin/env bash
# Nsight Compute (--set full) on one launch of a named kernel in a training step.
#   profiling/ncu.sh KERNEL_REGEX [train_step.py arguments...]    e.g. profiling/ncu.sh '_attn_fwd' --shape taobao
# Only the measured steps are profiled (train_step.py brackets them with cudaProfilerStart/Stop;
# --profile-from-start off), so the warm-up's first launches (JIT compiles) never are. NCU_SKIP
# (default 0) launches of matching kernels in those steps are skipped first (ncu's --launch-skip
# counts matching launches only), then NCU_COUNT (default 1) are profiled.
# Environment: NCU (the ncu binary), PYTHON, NCU_OUT (report path without extension), NCU_SKIP, NCU_COUNT.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/_nsight.sh"
kernel="${1:?usage: profiling/ncu.sh KERNEL_REGEX [train_step.py arguments...]}"; shift
ncu="$(find_tool ncu "${NCU:-}" /usr/local/cuda/bin/ncu /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu)" \
  || exit 127
python="$(find_python)" || exit 127
# the report is named after the regex, with anything but [A-Za-z0-9_.-] replaced (ncu expands
# %-sequences in -o, and | ( ) * / make awkward file names)
out="${NCU_OUT:-$here/out/ncu-$(printf '%s' "$kernel" | tr -c 'A-Za-z0-9_.-' '_')}"
mkdir -p "$(dirname "$out")"
rm -f "$out.ncu-rep"
"$ncu" --profile-from-start off --kernel-name "regex:$kernel" --launch-skip "${NCU_SKIP:-0}" \
  --launch-count "${NCU_COUNT:-1}" --set full --force-overwrite -o "$out" \
  "$python" "$here/train_step.py" --steps 2 --warmup 3 "$@"
if [[ ! -f "$out.ncu-rep" ]]; then
  echo "error: no launch of a kernel matching 'regex:$kernel' was profiled (after skipping ${NCU_SKIP:-0});" \
       "the names are the @triton.jit functions' (e.g. _attn_fwd_kernel; train_step.py --torch-profiler lists them)" >&2
  exit 1
fi
# the whole details page (not piped into head: under pipefail a closed pipe failed the script)
"$ncu" --import "$out.ncu-rep" --page details --print-units base
