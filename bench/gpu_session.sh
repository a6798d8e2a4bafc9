#!/usr/bin/env bash
# What one GPU lease runs, in one call:  bench/gpu_session.sh COMMIT STAGE...
#   stages: tests (CUDA test suite, fp32/fp16/bf16), ops (per-op benchmarks), model (whole-model
#   benchmarks), profile (per-range and per-kernel tables of one training step), embed (the
#   tokenizers' embedding backward, profiling/embedding_backward.py), host (per-launch host cost, plain
#   vs CUDA-graph step time and where the host time goes, fused and eager), threads (the autograd
#   device thread's host cost: profiling/autograd_threads.py). Logs, JSON and JSONL go to $OUT.
# Each stage is time-boxed ($<STAGE>_TIMEOUT seconds) so one call never loses everything to its
# limit: benchmark rows are appended to $OUT/<stage>.jsonl as they are measured. Selections:
#   OPS_K / MODEL_K   pytest -k expressions for the benchmark stages (default: everything)
#   TESTS_K           pytest -k expression for the test stage (default: everything)
#   TESTS_IDS         a file of test ids (one per line) to run instead of collecting (e.g.
#                     bench/gpu_rerun.txt: what the last lease did not reach or must rerun)
# Seen on an H200 (2026-11-27, 15-minute lease, the device tool's default kind then; a start took
# about 30 s, each call's transfers a few seconds): 106 listed tests in 8 shards of 120 s; the op
# stage (taobao: every op with eager, compile, fused and both graphed variants; amazon and long:
# attention and PMA against SDPA, FlexAttention and nn.MultiheadAttention) 136 s for 92 rows; the
# host stage 48 s; amazon's training rows with torch.compile about 60 s each, taobao's inference
# rows about 30 s each, so 12 model rows did not fit 210 s (taobao's compiled training rows were
# left). Two calls used 728 s of the 900.
# Planned for the next lease (two calls; run them with the device tool's timeout_s = 420 and 320,
# which leaves the starts and transfers room inside 900 s):
#   1. PACK=1 TESTS_IDS=bench/gpu_rerun.txt TESTS_TIMEOUT=120 THREADS_TIMEOUT=60 OPS_TIMEOUT=70 \
#      OPS_FILES="bench/test_bench_pffn.py bench/test_bench_attention.py bench/test_bench_crossnet.py" MODEL_TIMEOUT=140 \
#      OPS_K="(pma and full and not compile) or (taobao and low and full and fused and not compile and not triton) or (taobao and linear and full and (eager or fused) and not compile and not cudagraph)" \
#      MODEL_FILES="$(for p in train-calling-thread-fused train-calling-thread-eager train-fused train-compile train-fused-compile; do printf 'bench/test_bench_model.py::test_model[taobao-%s] ' $p; done)" \
#      bench/gpu_session.sh COMMIT tests ops threads model
#      (the tests the last two sessions added or changed: the folded PMA, now one autograd node
#      (pooled_attention) whose attention reads k = v = s once and writes ds = dk + dv itself, the
#      backward thread, the profiling scripts; then the folded PMA's rows at every shape against nn.MultiheadAttention, issue 5's
#      last target, and the low-rank cross net with 8 warps per row block beside the default 4
#      (its 128 programs at taobao fill half an H100's slots: profiling/sm90-audit-triton3.6.md);
#      autograd_threads.py's eager half, cut by its box last time; the training step with the
#      backward on the calling thread, as interformer train runs it, fused and eager;
#      taobao's compiled training rows on the H200, beside a plain fused row of the same run;
#      first of all, the plain linear PFFN, fused and eager, in a process that has run nothing
#      else: on 2026-11-27 the op stage and op_host.py's loop of the same callables, two processes
#      of one call at one commit, disagreed on plain rows by up to a third, either way (fused PFFN
#      0.61 vs 0.38 ms, attention 0.71 vs 0.48, DHEN LayerNorm 0.32 vs 0.42; eager LCE 0.71 vs
#      0.94): these rows, against the op stage's later ones, say how far a plain ratio repeats)
#   2. PACK=1 MODEL_TIMEOUT=130 MODEL_FILES="$(for p in amazon-train-fused-compile-attention \
#      amazon-train-fused-compile; do printf 'bench/test_bench_model.py::test_model[%s] ' $p; done)" \
#      PROFILE_BACKENDS=triton PROFILE_ARGS=";--compile --inference;--inference --host" PROFILE_TIMEOUT=50 \
#      EMBED_TIMEOUT=25 bench/gpu_session.sh COMMIT model profile embed
#      (device timeout_s = 320: 130 + 3 x 50 + 25 at most, about 260 s expected)
#      Issue 6's compile target at amazon, fused+compile >= 1.15x compile (25.3 ms on the H200 of
#      2026-11-27): fused-compile-attention, the fused model compiled with only the attention
#      kernels as custom ops and every other op left to Inductor (interformer.
#      set_compile_reference_ops; each row records the setting), beside fused-compile in the same
#      run; if it wins, the default set should grow. Then three profiles of the fused model at
#      taobao: the training step's per-range and per-kernel device time (the newest is from
#      2026-11-26, before the fused LayerNorm and the folded PMA); the compiled inference (12.2 ms
#      on the H200, slower than the plain fused 9.4 ms and than compiled eager 5.3 ms); the plain
#      inference with --host, where its host time goes (issue 6's inference target, 2x eager, was
#      1.43x: 9.4 ms plain against 3.5 ms graphed, with 424 aten ops and 33 Triton launches per
#      forward, counted on a CPU, against eager's 1,177). Last, the embedding backward
#      (profiling/embedding_backward.py): 2.05 ms of a fused taobao step's device time on the H200
#      of 2026-11-26, in eager and fused alike; whether index_add_ or index_put_ forms the same
#      gradient faster. Left for a later lease: the host stage, the eager profiles, and
#      fused-compile-attention's taobao inference row.
#   3. (next, if a lease has room) OPS_TIMEOUT=280 OPS_K="taobao and full and (compile-cudagraph or fused-cudagraph)" \
#      bench/gpu_session.sh COMMIT ops: Inductor's device time per op beside the fused kernel's,
#      which decides which fused ops a compiled model should keep as custom ops (as
#      ResidualLayerNorm already leaves its add + LayerNorm to Inductor) - issue 6's compile target
set -uo pipefail
commit="$1"; shift
export INTERFORMER_COMMIT="$commit" PYTHONUNBUFFERED=1
OUT="${OUT:-$(pwd)/bench/results/tmp}"; mkdir -p "$OUT"
# The device tool brings back at most 8 files from its $OUT: with PACK=1 the stages write to a work
# folder and every finished stage packs it into $OUT/results.tgz (one file; a call cut short keeps
# the stages done before it).
if [ "${PACK:-0}" = 1 ]; then PACK_DEST="$OUT"; OUT="$(mktemp -d)"; fi
pack() { [ -n "${PACK_DEST:-}" ] && tar -czf "$PACK_DEST/results.part" -C "$OUT" . && mv "$PACK_DEST/results.part" "$PACK_DEST/results.tgz"; }
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
  # Offline images can fail an editable install (setuptools' develop shim fetches build deps).
  # The source tree works as is once interformer.kernels (the top-level kernels/) is reachable.
  echo "editable install failed (see install.log); using the source tree on PYTHONPATH"
  [ -e interformer/kernels ] || ln -s ../kernels interformer/kernels
  export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, triton
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| triton", triton.__version__)
PY
bench() {  # bench STAGE FILES... : time-boxed pytest-benchmark run, rows to JSONL, report from them
  local stage="$1" sel="$2"; shift 2
  INTERFORMER_BENCH_ROWS="$OUT/$stage.jsonl" timeout "${TIMEOUT}" python3 -m pytest "$@" -q -p no:cacheprovider \
    ${sel:+-k "$sel"} --benchmark-json="$OUT/$stage.json" --benchmark-columns=median >"$OUT/$stage.log" 2>&1
  echo "pytest exit $?"; grep -E "passed|failed|error" "$OUT/$stage.log" | tail -n 3
  grep -E "^(FAILED|ERROR)" "$OUT/$stage.log" | head -n 20
  [ -s "$OUT/$stage.jsonl" ] && python3 bench/report.py "$OUT/$stage.jsonl" --out "$OUT/$stage" | tail -n 70
}
for stage in "$@"; do
  start=$(date +%s)
  case "$stage" in
    tests)   # the CUDA test suite in TESTS_JOBS shards (round-robin over the collected test ids, so
             # a file of many slow-to-compile cases -- attention -- is spread over all of them), each
             # its own process under TESTS_TIMEOUT (a CUDA fault poisons one shard only); the shard
             # logs are joined into one tests.log because only a handful of files come back.
             TIMEOUT="${TESTS_TIMEOUT:-300}"; logs=$(mktemp -d); jobs="${TESTS_JOBS:-8}"
             if [ -n "${TESTS_IDS:-}" ]; then
               grep "::" "$TESTS_IDS" > "$logs/ids.txt"; : > "$logs/collect.log"
             else
               python3 -m pytest --collect-only -q -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} tests \
                 > "$logs/collect.log" 2>&1
               echo "collection exit $?"  # a file that fails to import is listed here, not in the shards
               grep -E "^(ERROR|E  )" "$logs/collect.log" | head -n 20
               grep "::" "$logs/collect.log" > "$logs/ids.txt"
             fi
             echo "$(wc -l < "$logs/ids.txt") tests in $jobs shards"
             for i in $(seq 0 $((jobs - 1))); do awk -v n="$jobs" -v i="$i" 'NR % n == i' "$logs/ids.txt" > "$logs/shard$i.ids"; done
             for i in $(seq 0 $((jobs - 1))); do
               ( timeout "$TIMEOUT" python3 -c 'import sys, pytest
ids = [l for l in open(sys.argv[1]).read().splitlines() if l]
sys.exit(pytest.main(["-q", "-rfE", "-p", "no:cacheprovider"] + ids) if ids else 0)' "$logs/shard$i.ids" \
                   > "$logs/shard$i.log" 2>&1; echo "shard $i exit $?" ) &
             done | sort | tee "$OUT/tests_summary.txt"
             wait
             for f in "$logs"/collect.log "$logs"/shard*.log; do echo "===== $(basename "$f" .log)"; cat "$f"; done \
               > "$OUT/tests.log"
             for f in "$logs"/shard*.log; do echo "$(basename "$f" .log): $(tail -n 1 "$f")"; done
             grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 40 ;;
    ops)     # OPS_FILES: the op benchmark files in the order to run them (default: all, alphabetically)
             TIMEOUT="${OPS_TIMEOUT:-500}" bench ops "${OPS_K:-}" ${OPS_FILES:-bench --ignore=bench/test_bench_model.py} ;;
    model)   # MODEL_FILES: the model benchmark's file or node ids, run in the order given
             TIMEOUT="${MODEL_TIMEOUT:-500}" bench model "${MODEL_K:-}" ${MODEL_FILES:-bench/test_bench_model.py} ;;
    embed)   # the tokenizers' embedding backward against two other eager formulations (plain, graphed, deterministic)
             timeout "${EMBED_TIMEOUT:-60}" python3 profiling/embedding_backward.py >"$OUT/embed.log" 2>&1
             echo "exit $?"; cat "$OUT/embed.log" ;;
    threads) # where the plain backward's extra host time on the engine's device thread goes
             timeout "${THREADS_TIMEOUT:-120}" python3 profiling/autograd_threads.py >"$OUT/threads.log" 2>&1
             echo "exit $?"; grep -v "^USDT" "$OUT/threads.log" | head -n 60 ;;
    profile) # PROFILE_BACKENDS (default triton); PROFILE_ARGS: more train_step.py flags, several runs
             # separated by ";" (e.g. "--compile --inference;--inference --host"), each run per backend
             IFS=';' read -r -a arg_sets <<< "${PROFILE_ARGS:-}"; [ ${#arg_sets[@]} -gt 0 ] || arg_sets=("")
             for i in "${!arg_sets[@]}"; do
               for be in ${PROFILE_BACKENDS:-triton}; do
                 log="$OUT/profile-$be$([ "$i" -gt 0 ] && echo "-$i").log"
                 timeout "${PROFILE_TIMEOUT:-120}" python3 profiling/train_step.py --shape taobao --backend $be \
                   --torch-profiler ${arg_sets[$i]} >"$log" 2>&1
                 echo "profile $be ${arg_sets[$i]} exit $?"; head -n 70 "$log"
               done
             done ;;
    host)    # host cost of one launch (PyTorch op, Triton JIT, Triton direct), of one fused op (op_host.py), then plain vs CUDA-graph
             # step time and the host time by group, both backends
             timeout "${LAUNCH_TIMEOUT:-60}" python3 profiling/launch_overhead.py >"$OUT/launch.log" 2>&1
             echo "launch_overhead exit $?"; tail -n 10 "$OUT/launch.log"
             # one fused op's plain fwd+bwd: as benchmarked, with its Triton launches skipped, eager
             timeout "${OP_HOST_TIMEOUT:-90}" python3 profiling/op_host.py --profile >"$OUT/op_host.log" 2>&1
             echo "op_host exit $?"; grep -E "^  [a-z_]+ +(fused|eager)" "$OUT/op_host.log"
             for be in triton eager; do
               timeout "${HOST_TIMEOUT:-120}" python3 profiling/train_step.py --shape taobao --backend $be \
                 --steps 10 --host >"$OUT/host-$be.log" 2>&1
               echo "host $be exit $?"; head -n 12 "$OUT/host-$be.log"
             done ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  echo "== stage $stage took $(( $(date +%s) - start ))s"
  pack
done
