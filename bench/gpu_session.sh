#!/usr/bin/env bash
# What one GPU lease runs, in one call:  bench/gpu_session.sh COMMIT STAGE...
#   stages: tests (CUDA test suite, fp32/fp16/bf16), ops (per-op benchmarks), model (whole-model
#   benchmarks), profile (per-range table of one training step). Logs and JSON go to $OUT.
set -uo pipefail
commit="$1"; shift
export INTERFORMER_COMMIT="$commit" PYTHONUNBUFFERED=1
OUT="${OUT:-$(pwd)/bench/results/tmp}"; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, triton
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
PY
for stage in "$@"; do
  start=$(date +%s)
  case "$stage" in
    tests)   python3 -m pytest tests -q -x -n 6 -p no:cacheprovider 2>&1 | tail -n 60 >"$OUT/tests.log"; tail -n 25 "$OUT/tests.log" ;;
    ops)     python3 -m pytest bench -q -k "not test_model" -p no:cacheprovider --benchmark-json="$OUT/ops.json" \
               --benchmark-columns=median >"$OUT/ops.log" 2>&1; tail -n 5 "$OUT/ops.log"
             python3 bench/report.py "$OUT/ops.json" --out "$OUT/ops" | tail -n 60 ;;
    model)   python3 -m pytest bench/test_bench_model.py -q -p no:cacheprovider --benchmark-json="$OUT/model.json" \
               --benchmark-columns=median >"$OUT/model.log" 2>&1; tail -n 5 "$OUT/model.log"
             python3 bench/report.py "$OUT/model.json" --out "$OUT/model" | tail -n 30 ;;
    profile) python3 profiling/train_step.py --shape taobao --backend triton --torch-profiler >"$OUT/profile.log" 2>&1
             head -n 20 "$OUT/profile.log" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  echo "== stage $stage took $(( $(date +%s) - start ))s"
done
