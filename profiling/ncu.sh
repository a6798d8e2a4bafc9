#!/usr/bin/env bash
# Nsight Compute on one named kernel of a training step.
#   profiling/ncu.sh KERNEL_REGEX [train_step.py arguments...]
# e.g. profiling/ncu.sh '_attn_fwd' --shape taobao
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kernel="${1:?usage: profiling/ncu.sh KERNEL_REGEX [args]}"; shift
out="${NCU_OUT:-$here/out/$kernel}"
mkdir -p "$(dirname "$out")"
ncu --kernel-name "regex:$kernel" --launch-skip "${NCU_SKIP:-10}" --launch-count 1 --set full \
  -o "$out" --force-overwrite python "$here/train_step.py" --steps 2 --warmup 3 "$@"
ncu --import "$out.ncu-rep" --page details --print-units base | head -n 120
