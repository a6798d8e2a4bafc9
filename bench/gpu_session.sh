#!/usr/bin/env bash
# What one GPU lease runs, in one call:  bench/gpu_session.sh COMMIT STAGE...  (-h/--help: the usage;
#   no COMMIT, no STAGE, an option or an unknown stage: the usage and exit 2, before anything is run)
#   stages: tests (CUDA test suite, fp32/fp16/bf16), ops (per-op benchmarks), model (whole-model
#   benchmarks), profile (per-range and per-kernel tables of one training step), kernels (every
#   kernel's device time in one call of an op, per provider: profiling/op_kernels.py), ncu (Nsight
#   Compute's details pages of named kernels in one call of ops: profiling/ncu.sh), embed (the
#   tokenizers' embedding backward, profiling/embedding_backward.py), host (per-launch host cost, plain
#   vs CUDA-graph step time and where the host time goes, fused and eager; profiling/step_ops.py), threads (the autograd
#   device thread's host cost: profiling/autograd_threads.py). Logs, JSON and JSONL go to $OUT.
# Each stage is time-boxed ($<STAGE>_TIMEOUT seconds) so one call never loses everything to its
# limit: benchmark rows are appended to $OUT/<stage>.jsonl as they are measured. Selections:
#   OPS_K / MODEL_K   pytest -k expressions for the benchmark stages (default: everything)
#   TESTS_K           pytest -k expression for the test stage (default: everything)
#   TESTS_IDS         a file of test ids (one per line) to run instead of collecting (e.g.
#                     bench/gpu_rerun.txt: what the last lease did not reach or must rerun)
# Seen on an H200 (the second lease of 2026-11-28, bench/results/nvidia-h200-2026-11-28b.md): a start
# and each call's install and transfers about 30 s; call 1 (tests ops model) 195 s: 217 tests in 16
# shards 74 s (the longest shard 66 s), 20 graphed op rows 58 s, 4 plain model rows 46 s; compiled
# model rows about 45 s each (6 in 276 s); a plain profile 12 s, a compiled one 37 s; a kernels
# stage 11 s. Earlier leases' plans and results: git log of this file, docs/benchmarks.md.
# Planned for the next lease (device-tool timeout_s 460, then 240, then what is left; issue each call
# as soon as the last returns: an idle machine is given back after about 30 s):
#   1. PACK=1 TESTS_IDS=bench/gpu_rerun.txt TESTS_JOBS=16 TESTS_TIMEOUT=260 OPS_TIMEOUT=130 KERNELS_TIMEOUT=50 \
#      KERNELS_ARGS="--ops gated_lce_nonseq,gated_lce_seq --shape taobao-b64k --providers fused" \
#      OPS_FILES="bench/test_bench_gated_lce.py bench/test_bench_feed_forward.py bench/test_bench_crossnet.py \
#      bench/test_bench_attention.py bench/test_bench_dcn_autocast.py bench/test_bench_pffn_autocast.py" \
#      OPS_K="(gated_lce_bandwidth and fused-cudagraph) or (feed_forward and (taobao or amazon) and full and \
#      (fused-cudagraph or compile-cudagraph)) or (crossnet and low and taobao and (fwd or full) and \
#      (fused-cudagraph or fused-deep-cudagraph or compile-cudagraph)) or \
#      (self_attention and amazon and full and (fused-cudagraph or fused-general-cudagraph or \
#      fused-narrow-cudagraph or fused-delta-output-cudagraph)) or (dcn_autocast and low and taobao and \
#      (fwd or full) and (fused-cudagraph or fused-cast-cudagraph)) or (pffn_autocast and taobao and mlp and \
#      full and (fused-cudagraph or fused-rows32-cudagraph))" bench/gpu_session.sh COMMIT tests ops kernels
#      Tests: bench/gpu_rerun.txt's header (820 tests: the fp32 attention backward's pivoted dS, every
#      cross-net kernel as the thirty-eighth session changed them (x0 read in its own dtype under
#      autocast), the PFFN backward's 16-row blocks for an fp32 s (thirty-ninth session), attention's fp32
#      inputs under autocast (fortieth), the gated LCE and the
#      feed-forward block as the thirty-third session changed them, every test that
#      compiles now that the kept ops are inlined on a GPU by default). Ops (22 rows, selection checked on a CPU with
#      torch.cuda.is_available patched to True): the feed-forward block at taobao and amazon against
#      Inductor with the fast sigmoid (sm_90: its loops 398 -> 285, 456 -> 346 and 1087 -> 806
#      instructions a warp; 0.91x and 1.19x Inductor at 5eea83c); the gated LCE at 32x taobao's batch after the
#      thirty-third and thirty-fourth sessions' changes (docs/benchmarks.md, "Since H200-5": 566 -> 270 and
#      933 -> 523 instructions a warp per forward block, 355 -> 296 and 523 -> 402 per backward block in
#      sm_90 builds; 0.3796 / 0.2705 ms at 5eea83c); the low-rank cross
#      net's 5-stage plan (fused-deep: 2.0% and 2.8% faster in training in the two leases of
#      2026-11-28) in its forward's graphed row, which the variant rule below still wants; self-
#      attention at amazon with every backward on the general path (fused-general: the single-
#      query-block backward took 430 us a launch in the compiled amazon step, one 8-warp program an
#      SM), with that backward on 16-key tiles at 4 warps (fused-narrow: three programs an SM) and
#      with delta from the output; the low-rank cross net as the model calls it (fp32 x0 and parameters,
#      bf16 autocast), x0 read as fp32 (fused, the default since the thirty-eighth session) against x0
#      cast to bf16 first (fused-cast, the way before), graphed, forward and training; the PFFN as the
#      model calls it (fp32 s, bf16 autocast), its backward on 16-row blocks (fused, the default since the
#      thirty-ninth session: no spill in sm_90 builds) against 32 (fused-rows32, the plan before: 3/2
#      spill instructions), graphed training at taobao. Kernels (about
#      15 s: the ops stage has built them): the device time of
#      each gated LCE kernel at 32x taobao's batch, so the bandwidth row splits into forward, backward
#      and the partials' reduction (no lease has timed them apart; the ncu stage of call 3 may not run).
#   2. PACK=1 MODEL_TIMEOUT=210 MODEL_FILES="$(for p in amazon-train-fused-compile-reduce-overhead \
#      amazon-train-compile-reduce-overhead taobao-train-fused-compile-reduce-overhead \
#      taobao-train-compile-reduce-overhead; do printf 'bench/test_bench_model.py::test_model[%s] ' $p; \
#      done)" bench/gpu_session.sh COMMIT model
#      (issue 6's compile target, fused + compile >= 1.15x compile, under the new default (the kept
#      ops inlined): amazon is a tie in plain steps (0.84x and 1.09x in two orders at 5eea83c) with
#      1.69x the device speed under the profiler, so its reduce-overhead pair decides; inlined under
#      reduce-overhead has never been timed (opaque: 8.764 against 9.284 ms at taobao, 7bea4b3).
#      One process; each pair in order.)
#   3. With 150 s or more left: PACK=1 NCU_TIMEOUT=100 bench/gpu_session.sh COMMIT ncu (Nsight Compute
#      on the gated LCE's forward and backward at 32x taobao's batch, both uses, then on the low-rank
#      cross net's three kernels at taobao: where issue 3's 70% of copy and issue 4's 1.2x Inductor
#      are lost. sm_90 builds count 288-641 instructions a warp per forward block and 296-402 per
#      backward block, with 5-10 barriers: the kernels look bound by issue and latency, and the stall
#      reasons would say so or not. No lease has run ncu yet: the first run also tells whether it
#      works. Each run is packed when it ends, so a call cut at its limit keeps the gated LCE's.)
#      With less left: PACK=1 PROFILE_TIMEOUT=100 PROFILE_ARGS="--compile --inference" ... profile.
#   Variant rule (graphed rows, one process): a variant that beats the default by more than the rows'
#   p20-p80 spread in both uses becomes the default (its builds are in profiling/sm90-audit-triton3.6.md
#   and the settings' comments); the settings that lose are deleted with their providers and tests.
#   Left for a later lease: the host stage, the eager training profiles, the op stage at amazon and
#   long, the third plain amazon compile pair, the compiled inference profile.
set -uo pipefail
# The arguments are checked before anything is done: until 2026-12 only their number was, so
# `bench/gpu_session.sh --help` took "--help" for the COMMIT, ran the editable install (re-pointing
# the caller's environment at this checkout) and exited 0.
STAGES="tests ops model profile kernels ncu embed host threads"  # the case below, in the order of the header
usage() { echo "usage: bench/gpu_session.sh COMMIT STAGE... (stages: $STAGES; see the header)"; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -lt 2 ]; then usage >&2; exit 2; fi
case "$1" in -*) echo "not a commit: $1" >&2; usage >&2; exit 2 ;; esac
for stage in "${@:2}"; do
  case " $STAGES " in *" $stage "*) ;; *) echo "unknown stage $stage" >&2; usage >&2; exit 2 ;; esac
done
commit="$1"; shift
export INTERFORMER_COMMIT="$commit" PYTHONUNBUFFERED=1
OUT="${OUT:-$(pwd)/bench/results/tmp}"; mkdir -p "$OUT"
# The device tool brings back at most 8 files from its $OUT: with PACK=1 the stages write to a work
# folder and every finished stage packs it into $OUT/results.tgz (one file; a call cut short keeps
# the stages done before it).
if [ "${PACK:-0}" = 1 ]; then PACK_DEST="$OUT"; OUT="$(mktemp -d)"; fi
# Everything printed also goes to a log copied into $OUT as session.log at every stage's end (and
# so packed): the device tool returns only the last 12,000 characters of the output, and the stage
# times and pytest exit codes are printed. tee writes a file outside $OUT, so tar never reads a
# file that changes under it ("file changed as we read it" fails the pack).
SESSION_LOG="$(mktemp)"
exec > >(tee -a "$SESSION_LOG") 2>&1
PACKS=0
pack() {
  # tee appends to the log in its own time: print a mark and wait (5 s at most) until the log holds
  # it, so that the copy has every line printed before it (the stage's "== stage ... took" line was
  # missing from a packed log once, on a loaded CI machine)
  PACKS=$((PACKS + 1)); local mark="(packing the results, $PACKS)"
  echo "$mark"
  for _ in $(seq 50); do grep -qxF "$mark" "$SESSION_LOG" && break; sleep 0.1; done
  cp "$SESSION_LOG" "$OUT/session.log"
  if [ -n "${PACK_DEST:-}" ]; then
    tar -czf "$PACK_DEST/results.part" -C "$OUT" . && mv "$PACK_DEST/results.part" "$PACK_DEST/results.tgz"
  fi
}
# The script's exit status: 0 when every pytest run, shard and program it ran exited 0 (a stage cut
# at its time box exits 124), else 1, with the failures named on the last line. Until 2026-11-29
# it returned the last pack's status (1 without PACK=1, 0 with it), whatever had failed.
FAILED=""
note_exit() {  # note_exit WHAT CODE: print "WHAT exit CODE" and remember a non-zero CODE
  echo "$1 exit $2"; [ "$2" = 0 ] || FAILED="$FAILED $1:$2"
}
# SKIP_INSTALL=1: use the installed package as it is (the CPU test of this script, tests/test_gpu_session.py,
# which must not point an environment's editable install at its checkout)
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
  echo "install skipped (SKIP_INSTALL=1)"
elif ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
  # Offline images can fail an editable install (setuptools' develop shim fetches build deps).
  # The source tree works as is once interformer.kernels (the top-level kernels/) is reachable.
  echo "editable install failed (see install.log); using the source tree on PYTHONPATH"
  [ -e interformer/kernels ] || ln -s ../kernels interformer/kernels
  export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, triton
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "| torch", torch.__version__,
      "| cuda", torch.version.cuda, "| triton", triton.__version__)
PY
bench() {  # bench STAGE FILES... : time-boxed pytest-benchmark run, rows to JSONL, report from them
  local stage="$1" sel="$2"; shift 2
  INTERFORMER_BENCH_ROWS="$OUT/$stage.jsonl" timeout "${TIMEOUT}" python3 -m pytest "$@" -q -rs -p no:cacheprovider \
    ${sel:+-k "$sel"} --benchmark-json="$OUT/$stage.json" --benchmark-columns=median >"$OUT/$stage.log" 2>&1
  note_exit pytest $?; grep -E "passed|failed|error" "$OUT/$stage.log" | tail -n 3
  grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/$stage.log" | cut -c1-300 | head -n 20
  [ -s "$OUT/$stage.jsonl" ] && python3 bench/report.py "$OUT/$stage.jsonl" --out "$OUT/$stage" --force | tail -n 70
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
               [ -r "$TESTS_IDS" ] || { echo "TESTS_IDS: no file $TESTS_IDS"; exit 2; }
               grep -v '^[[:space:]]*#' "$TESTS_IDS" | grep "::" > "$logs/ids.txt"; : > "$logs/collect.log"
             else
               python3 -m pytest --collect-only -q -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} tests \
                 > "$logs/collect.log" 2>&1
               note_exit collection $?  # a file that fails to import is listed here, not in the shards
               grep -E "^(ERROR|E  )" "$logs/collect.log" | head -n 20
               grep "::" "$logs/collect.log" > "$logs/ids.txt"
             fi
             echo "$(wc -l < "$logs/ids.txt") tests in $jobs shards"
             [ -s "$logs/ids.txt" ] || note_exit "tests (none selected)" 5  # pytest's "no tests ran"
             for i in $(seq 0 $((jobs - 1))); do awk -v n="$jobs" -v i="$i" 'NR % n == i' "$logs/ids.txt" > "$logs/shard$i.ids"; done
             for i in $(seq 0 $((jobs - 1))); do
               ( timeout "$TIMEOUT" python3 -c 'import sys, pytest
ids = [l for l in open(sys.argv[1]).read().splitlines() if l]
sys.exit(pytest.main(["-q", "-rfE", "-p", "no:cacheprovider"] + ids) if ids else 0)' "$logs/shard$i.ids" \
                   > "$logs/shard$i.log" 2>&1; echo "shard $i exit $?" ) &
             done | sort | tee "$OUT/tests_summary.txt"
             # no bare wait here: it would also wait for the console tee (exec > >(tee ...)), which never ends
             for f in "$logs"/collect.log "$logs"/shard*.log; do echo "===== $(basename "$f" .log)"; cat "$f"; done \
               > "$OUT/tests.log"
             for f in "$logs"/shard*.log; do echo "$(basename "$f" .log): $(tail -n 1 "$f")"; done
             bad=$(grep -cv " exit 0$" "$OUT/tests_summary.txt")
             [ "$bad" = 0 ] || FAILED="$FAILED tests:$bad-shards"
             grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 40 ;;
    ops)     # OPS_FILES: the op benchmark files in the order to run them (default: all, alphabetically)
             TIMEOUT="${OPS_TIMEOUT:-500}" bench ops "${OPS_K:-}" ${OPS_FILES:-bench --ignore=bench/test_bench_model.py} ;;
    model)   # MODEL_FILES: the model benchmark's file or node ids, run in the order given
             TIMEOUT="${MODEL_TIMEOUT:-500}" bench model "${MODEL_K:-}" ${MODEL_FILES:-bench/test_bench_model.py} ;;
    embed)   # the tokenizers' embedding backward against two other eager formulations (plain, graphed, deterministic)
             timeout "${EMBED_TIMEOUT:-60}" python3 profiling/embedding_backward.py >"$OUT/embed.log" 2>&1
             note_exit embed $?; cat "$OUT/embed.log" ;;
    threads) # where the plain backward's extra host time on the engine's device thread goes
             timeout "${THREADS_TIMEOUT:-120}" python3 profiling/autograd_threads.py >"$OUT/threads.log" 2>&1
             note_exit threads $?; grep -v "^USDT" "$OUT/threads.log" | head -n 60 ;;
    profile) # PROFILE_BACKENDS (default triton); PROFILE_ARGS: more train_step.py flags, several runs
             # separated by ";" (e.g. "--compile --inference;--inference --host"), each run per backend
             IFS=';' read -r -a arg_sets <<< "${PROFILE_ARGS:-}"; [ ${#arg_sets[@]} -gt 0 ] || arg_sets=("")
             for i in "${!arg_sets[@]}"; do
               for be in ${PROFILE_BACKENDS:-triton}; do
                 log="$OUT/profile-$be$([ "$i" -gt 0 ] && echo "-$i").log"
                 timeout "${PROFILE_TIMEOUT:-120}" python3 profiling/train_step.py --shape taobao --backend $be \
                   --torch-profiler ${arg_sets[$i]} >"$log" 2>&1
                 note_exit "profile $be ${arg_sets[$i]}" $?; head -n 70 "$log"
               done
             done ;;
    kernels) # the device time of every kernel of one op call, per provider (profiling/op_kernels.py);
             # KERNELS_ARGS: its flags, several runs separated by ";" (default: the cross nets' kernels, the
             # default fused path, both phased settings, Inductor and eager)
             IFS=';' read -r -a arg_sets <<< "${KERNELS_ARGS:---ops crossnet_low,crossnet_full --providers fused,fused-phases,fused-fphases,compile,eager}"
             for i in "${!arg_sets[@]}"; do
               timeout "${KERNELS_TIMEOUT:-150}" python3 profiling/op_kernels.py ${arg_sets[$i]} >>"$OUT/kernels.log" 2>&1
               note_exit "op_kernels ${arg_sets[$i]}" $?
             done
             head -n 150 "$OUT/kernels.log" ;;
    ncu)     # Nsight Compute (--set full) on one call of fused ops (profiling/ncu.sh with NCU_SCRIPT=op_kernels):
             # NCU_RUNS, runs separated by ";", each "KERNEL_REGEX COUNT op_kernels.py flags" (COUNT: the
             # matching launches to profile). Default: the gated LCE's forward and backward at 32x taobao's
             # batch in both uses, then the low-rank cross net's three kernels at taobao. Each run's
             # details page and stall metrics go to ncu-<run>.log, packed as soon as the run ends (a call
             # cut short keeps the runs done); the console shows their throughput, stall and error lines.
             # The .ncu-rep reports stay out of $OUT (a file over 16 MiB would not come back, and the
             # packed results with it).
             ncu_reports=$(mktemp -d)
             IFS=';' read -r -a runs <<< "${NCU_RUNS:-_glce_(fwd|bwd)_kernel 4 --ops gated_lce_nonseq,gated_lce_seq --providers fused --shape taobao-b64k;_lr_(fwd|bwd) 3 --ops crossnet_low --providers fused --shape taobao}"
             for i in "${!runs[@]}"; do
               read -r regex count args <<< "${runs[$i]}"
               PYTHON=python3 NCU_SCRIPT=op_kernels NCU_COUNT="$count" NCU_OUT="$ncu_reports/ncu-$i" \
                 timeout -k 10 "${NCU_TIMEOUT:-240}" bash profiling/ncu.sh "$regex" $args >"$OUT/ncu-$i.log" 2>&1
               note_exit "ncu $regex" $?
               grep -iE "^  [_A-Za-z][^ ]* \(|==ERROR==|==WARNING==|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per Thread|Issue Slots Busy|Warp Cycles Per Issued|stall|One or More Eligible" \
                 "$OUT/ncu-$i.log" | head -n 90
               pack
             done ;;
    host)    # host cost of one launch (PyTorch op, Triton JIT, Triton direct), of one fused op (op_host.py), then plain vs CUDA-graph
             # step time and the host time by group, both backends
             timeout "${LAUNCH_TIMEOUT:-60}" python3 profiling/launch_overhead.py >"$OUT/launch.log" 2>&1
             note_exit launch_overhead $?; tail -n 10 "$OUT/launch.log"
             # one fused op's plain fwd+bwd: as benchmarked, with its Triton launches skipped, eager
             timeout "${OP_HOST_TIMEOUT:-90}" python3 profiling/op_host.py --profile >"$OUT/op_host.log" 2>&1
             note_exit op_host $?; grep -E "^  [a-z_]+ +(fused|eager)" "$OUT/op_host.log"
             # what a step issues (aten ops, launches, autograd nodes by arch) under CUDA's autocast, and
             # its time with the launches skipped (the host time minus the launches' own)
             for mode in "" --inference; do
               timeout "${STEP_OPS_TIMEOUT:-60}" python3 profiling/step_ops.py --shape taobao --time $mode \
                 >>"$OUT/step_ops.log" 2>&1
               note_exit "step_ops $mode" $?
             done
             tail -n 40 "$OUT/step_ops.log"
             for be in triton eager; do
               timeout "${HOST_TIMEOUT:-120}" python3 profiling/train_step.py --shape taobao --backend $be \
                 --steps 10 --host >"$OUT/host-$be.log" 2>&1
               note_exit "host $be" $?; head -n 12 "$OUT/host-$be.log"
             done ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  echo "== stage $stage took $(( $(date +%s) - start ))s"
  pack
done
if [ -n "$FAILED" ]; then echo "== failed:$FAILED"; exit 1; fi
