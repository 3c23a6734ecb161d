#!/usr/bin/env bash
# A whole GPU session in one call: environment report, GPU tests, full-size benchmarks.
#
#   bash benchmarks/gpu_session.sh            # from the repository root; results also go to $OUT
#   GPU_SESSION_DRY_RUN=1 bash benchmarks/gpu_session.sh   # the same steps on the CPU, tiny sizes
#
# Steps, each under its own `timeout`, every one also cut to what is left of DEADLINE (seconds from the
# start, default 540: the device tool runs one command for at most 600 s), so the whole call ends in time
# and a late step is shortened or skipped rather than the call killed with nothing written. Everything
# this script prints is also kept in $OUT/session.log, and each step's own output in its file:
#   1. nvidia-smi and versions                                  -> $OUT/env.txt
#   2. make minimind_fast importable (a kernels link if needed)  (wheels in .whl/ installed first;
#      with the device tool, carry ".whl" so that Liger-Kernel gets installed)
#   then SESSION_STEPS in order (default "engine profile tests bench"):
#   engine: launch/pretrain.py (DeepSpeed, bf16) on the built-in corpus, small-26m at
#      MiniMind's batch (32 x 512), runs as ENGINE_RUNS says     -> $OUT/engine-*.log, engine-*.jsonl
#   profile: with PROFILE_PRESETS (e.g. "moe-145m"): benchmarks/profile_step.py per preset, GPU time per
#      kernel                                                  -> $OUT/profile-PRESET.txt
#   tests: `pytest -m gpu tests/` + kernel tests at full size  -> $OUT/gpu-tests.log
#   bench: benchmarks at full sizes                            -> $OUT/bench.log, the new results JSON
#      (written to BENCH_RESULTS_DIR, default benchmarks/results, and copied to $OUT), $OUT/report.md
# Knobs (environment): TEST_TIMEOUT (s, default 170), BENCH_TIMEOUT (s, default 330), ENGINE_STEPS
# (default 60), ENGINE_PROFILE (steps to profile, default 0), ENGINE_FLAGS (more pretrain flags),
# ENGINE_TIMEOUT (s per run, default 100; twice that for compile and cudagraphs runs), ENGINE_RUNS (default "triton:0 triton cudagraphs": ZeRO 0
# against the bf16 default, then CUDA graphs; each KIND[@MICRO_BATCH][:ZERO_STAGE], KIND one of
# triton, reference, compile, cudagraphs), ENGINE_PRESET / ENGINE_SEQ / ENGINE_MICRO_BATCH / ENGINE_VOCAB
# (default small-26m, 512, 32, 6400), BENCH_FILES (default: all), BENCH_ARGS (extra pytest args
# for the benchmarks, e.g. "-k kernels"), PROFILE_PRESETS (default none), PROFILE_TIMEOUT (s each, default 90),
# PROFILE_ARGS (more profile_step.py flags), DEADLINE (s, default 540), TEST_FILES (default: the kernel tests
# and the GPU-marked ones), SESSION_STEPS, SKIP_TESTS=1, SKIP_BENCH=1, SKIP_ENGINE=1, ENGINE_WORKDIR
# (default /tmp/engine).
# GPU_SESSION_DRY_RUN=1 runs every step on the CPU (CUDA hidden, Triton's interpreter, tiny sizes: the
# tiny preset at 2 x 64 tokens for 2 steps, the benchmarks' CPU sizes, results in $OUT/bench-results),
# so that a failure other than "no CUDA here" is found before a GPU call is spent on it.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu-session}"
mkdir -p "$OUT"
if [ -z "${GPU_SESSION_LOGGED:-}" ]; then
  # Run once more with everything printed also kept in $OUT: the device tool returns only the tail.
  GPU_SESSION_LOGGED=1 OUT="$OUT" bash "$0" "$@" 2>&1 | tee "$OUT/session.log"
  exit "${PIPESTATUS[0]}"
fi
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1  # a step cut by its timeout keeps everything it printed
TEST_TIMEOUT="${TEST_TIMEOUT:-170}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-330}"
DEADLINE="${DEADLINE:-540}"
DRY="${GPU_SESSION_DRY_RUN:-0}"
GPU_SIZES=--gpu-sizes
if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 BENCH_DEVICE=cpu
  ENGINE_PRESET=${ENGINE_PRESET:-tiny} ENGINE_SEQ=${ENGINE_SEQ:-64} ENGINE_MICRO_BATCH=${ENGINE_MICRO_BATCH:-2}
  ENGINE_STEPS=${ENGINE_STEPS:-2} ENGINE_VOCAB=${ENGINE_VOCAB:-1024} CORPUS_SIZE=test
  PROFILE_ARGS="--device cpu --tiny --batch 2 --seq 32 ${PROFILE_ARGS:-}"
  BENCH_RESULTS_DIR=${BENCH_RESULTS_DIR:-$OUT/bench-results} GPU_SIZES=
fi
RESULTS="${BENCH_RESULTS_DIR:-benchmarks/results}"
START=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }
# capped WANTED: WANTED seconds, or what is left before DEADLINE (less a margin to copy results) if less
capped() { local left=$(( DEADLINE - ($(date +%s) - START) - 15 )); echo $(( $1 < left ? $1 : left )); }

step "environment$([ "$DRY" = 1 ] && echo " (dry run: CPU, tiny sizes)")"
{
  timeout 20 nvidia-smi || echo "nvidia-smi not found"
  timeout 60 "$PY" - <<'PYEOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "pytest", "pytest_benchmark", "liger_kernel", "flash_attn"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001 - report whatever stops an import
        print(name, "absent:", type(exc).__name__, exc)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PYEOF
  git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -50
} 2>&1 | tee "$OUT/env.txt"

step "install"
SITE=/tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
  timeout "$(capped 120)" "$PY" -m pip install -q --upgrade --no-index --no-deps --target "$SITE" .whl/*.whl &&
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import minimind_fast.kernels" 2>/dev/null; then
  # setup.py's package_dir maps kernels/ to minimind_fast.kernels. `pip install -e .` cannot run
  # offline (setuptools' develop step fetches build deps), PYTHONPATH alone cannot do the mapping,
  # and the checkout's own minimind_fast/ comes first on sys.path from the repository root: so link
  # minimind_fast/kernels -> ../kernels in the checkout for this session; removed on exit.
  echo "minimind_fast.kernels not importable: linking minimind_fast/kernels -> ../kernels for this session"
  if [ ! -e minimind_fast/kernels ]; then
    ln -s ../kernels minimind_fast/kernels && trap 'rm -f minimind_fast/kernels' EXIT
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import importlib.util as u, minimind_fast.kernels as k, minimind_fast.model; \
print('minimind_fast ok; triton ops:', sorted(k.triton_ops()), '; liger_kernel:', bool(u.find_spec('liger_kernel')))" \
  2>&1 | tee -a "$OUT/env.txt"

run_engine() {
  local preset=${ENGINE_PRESET:-small-26m} seq=${ENGINE_SEQ:-512} vocab=${ENGINE_VOCAB:-6400}
  step "engine: launch/pretrain.py under DeepSpeed, $preset, ${ENGINE_MICRO_BATCH:-32} x $seq tokens per step"
  # The built-in corpus has a small vocabulary; --vocab-size keeps the preset's 6400 so the FLOPs are
  # small-26m's. Metrics (tokens/s, MFU) come from the engine's own metrics.jsonl.
  local E=${ENGINE_WORKDIR:-/tmp/engine} limit status
  mkdir -p "$E"
  limit=$(capped 120)
  if [ "$limit" -lt 10 ]; then echo "engine: skipped, ${limit}s left before DEADLINE"; return; fi
  timeout -k 5 "$limit" bash -c '"$0" launch/make_corpus.py --out "$1/corpus" --size "$2" &&
      "$0" launch/train_tokenizer.py --data "$1/corpus/pretrain.jsonl" --vocab-size "$3" --out "$1/tok" &&
      "$0" launch/tokenize.py --kind pretrain --data "$1/corpus/pretrain.jsonl" --tokenizer "$1/tok" --out "$1/shards" --force' \
      "$PY" "$E" "${CORPUS_SIZE:-demo}" "$vocab" >"$OUT/engine-data.log" 2>&1
  status=$?  # taken here: inside `if ! cmd; then`, $? is the status of `! cmd`, always 0
  if [ "$status" -ne 0 ]; then
    echo "engine: preparing the corpus failed or ran out of time (exit $status), runs skipped:"; tail -n 5 "$OUT/engine-data.log"
    return
  fi
  tail -n 1 "$OUT/engine-data.log"
  local run zero kind_mb mb name flags want
  for run in ${ENGINE_RUNS:-triton:0 triton cudagraphs}; do
    # RUN is KIND[@MICRO_BATCH][:ZERO_STAGE]: KIND triton, reference, compile, or cudagraphs (compile,
    # reduce-overhead); without a stage, the engine's default (1 with bf16).
    zero=; [ "${run#*:}" != "$run" ] && zero="--zero-stage ${run#*:}"
    kind_mb=${run%%:*}
    mb=${ENGINE_MICRO_BATCH:-32}; [ "${kind_mb#*@}" != "$kind_mb" ] && mb=${kind_mb#*@}
    name=$(echo "$run" | sed 's/@/-mb/; s/:/-zero/')
    case "${kind_mb%@*}" in
      reference) flags="--kernels reference" ;;
      compile) flags="--kernels triton --compile" ;;
      cudagraphs) flags="--kernels triton --compile --compile-mode reduce-overhead" ;;
      triton) flags="--kernels triton" ;;
      *) echo "engine $run: unknown kind ${kind_mb%@*} (triton, reference, compile, cudagraphs), skipped"; continue ;;
    esac
    # torch.compile's first step took over 80 s on an H200 (2026-11-30): compiled runs get twice as long.
    want=${ENGINE_TIMEOUT:-100}; case "${kind_mb%@*}" in compile|cudagraphs) want=$((want * 2)) ;; esac
    limit=$(capped "$want")
    if [ "$limit" -lt 30 ]; then echo "engine $run: skipped, ${limit}s left before DEADLINE"; continue; fi
    rm -rf "$E/run-$name"  # a run left by an earlier call would be resumed, or refused
    timeout -k 5 "$limit" "$PY" launch/pretrain.py --preset "$preset" --vocab-size "$vocab" \
      --data "$E/shards" --out "$E/run-$name" --steps "${ENGINE_STEPS:-60}" --micro-batch-size "$mb" --seq-len "$seq" \
      --log-every 10 --eval-every 0 --save-every 100000 --profile-steps "${ENGINE_PROFILE:-0}" $flags $zero ${ENGINE_FLAGS:-} \
      >"$OUT/engine-$name.log" 2>&1
    echo "engine $run (timeout ${limit}s): exit $?"
    cp "$E/run-$name/metrics.jsonl" "$OUT/engine-$name.jsonl" 2>/dev/null && tail -n 3 "$OUT/engine-$name.jsonl"
    cp "$E/run-$name/profile.txt" "$OUT/engine-$name-profile.txt" 2>/dev/null
    grep -E "^(error|Traceback)|Error" "$OUT/engine-$name.log" | tail -n 3
  done
}

run_profile() {
  # Where each preset's training step spends GPU time, kernel by kernel (benchmarks/profile_step.py).
  local preset limit
  for preset in ${PROFILE_PRESETS:-}; do
    limit=$(capped "${PROFILE_TIMEOUT:-90}")
    if [ "$limit" -lt 20 ]; then echo "profile $preset: skipped, ${limit}s left before DEADLINE"; continue; fi
    step "profile_step.py --preset $preset (timeout ${limit}s) -> $OUT/profile-$preset.txt"
    timeout -k 5 "$limit" "$PY" benchmarks/profile_step.py --preset "$preset" --kernels triton ${PROFILE_ARGS:-} \
      >"$OUT/profile-$preset.txt" 2>&1
    echo "profile $preset: exit $?"; grep -E "^=== |Error" "$OUT/profile-$preset.txt"
  done
}

run_tests() {
  local limit files
  limit=$(capped "$TEST_TIMEOUT")
  if [ "$limit" -lt 20 ]; then echo "GPU tests: skipped, ${limit}s left before DEADLINE"; return; fi
  step "GPU tests (timeout ${limit}s) -> $OUT/gpu-tests.log"
  # The GPU-marked tests and the kernel tests (which run at full size on CUDA). -v names each test as it
  # starts, so a run cut by its timeout shows which one it was in.
  files=${TEST_FILES:-$( (ls tests/test_kernels*.py 2>/dev/null; grep -l "mark.gpu" tests/test_*.py 2>/dev/null) | sort -u | tr '\n' ' ')}
  timeout -k 5 "$limit" "$PY" -m pytest -v --no-header -p no:cacheprovider --maxfail=20 -rfE --tb=short \
    -m "gpu or not slow" ${files:-tests/} >"$OUT/gpu-tests.log" 2>&1
  echo "tests exit status: $?"
  grep -cE " PASSED" "$OUT/gpu-tests.log" | sed 's/$/ passed so far/'
  grep -E "^(FAILED|ERROR)| FAILED| ERROR" "$OUT/gpu-tests.log" | head -n 20
  tail -n 5 "$OUT/gpu-tests.log"
}

run_bench() {
  local limit files new
  limit=$(capped "$BENCH_TIMEOUT")
  if [ "$limit" -lt 20 ]; then echo "benchmarks: skipped, ${limit}s left before DEADLINE"; return; fi
  step "benchmarks${GPU_SIZES:+ at full size} (timeout ${limit}s) -> $RESULTS"
  mkdir -p "$RESULTS"
  eval "EXTRA=(${BENCH_ARGS:-})"  # keeps quoted words, e.g. BENCH_ARGS='-k "moe or decode"'
  # Results are rewritten after every case, so a timeout still leaves a valid (partial) file.
  # Most telling first: kernels, MoE, training step, decode, then any other bench_*.py (data).
  # BENCH_FILES (e.g. "model decode") runs just those.
  files=$(for f in ${BENCH_FILES:-kernels moe model minimind_baseline decode}; do echo benchmarks/bench_$f.py; done
          [ -z "${BENCH_FILES:-}" ] && ls benchmarks/bench_*.py)
  files=$(echo "$files" | awk '!seen[$0]++' | while read -r f; do [ -f "$f" ] && echo "$f"; done | tr '\n' ' ')
  local before; before=$(ls "$RESULTS"/*.json 2>/dev/null)
  # The suite's own deadline (4/5 of the timeout) ends it cleanly, naming the tests it left out.
  timeout -k 5 "$limit" "$PY" -m pytest $files -q --no-header -p no:cacheprovider $GPU_SIZES \
    --bench-results-dir "$RESULTS" --bench-deadline $((limit * 4 / 5)) \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name "${EXTRA[@]}" >"$OUT/bench.log" 2>&1
  echo "benchmarks exit status: $?"
  grep -E "passed|failed|error|results \(|left out" "$OUT/bench.log" | tail -n 5
  grep -E "^(FAILED|ERROR)" "$OUT/bench.log" | head -n 20
  # Only this call's results file: an older one would pass for this run's.
  new=$(ls "$RESULTS"/*.json 2>/dev/null | grep -vxF -e "${before:-/nonexistent}")
  if [ -z "$new" ]; then echo "benchmarks: no results file written"; return; fi
  cp $new "$OUT/"
  timeout 60 "$PY" benchmarks/report.py --results-dir "$RESULTS" --readme /nonexistent --png "$OUT/ratios.png" \
    >"$OUT/report.md" 2>>"$OUT/bench.log"
  head -c 6000 "$OUT/report.md"
}

for name in ${SESSION_STEPS:-engine profile tests bench}; do
  case "$name" in
    engine) [ "${SKIP_ENGINE:-0}" != 1 ] && run_engine ;;
    profile) run_profile ;;
    tests) [ "${SKIP_TESTS:-0}" != 1 ] && run_tests ;;
    bench) [ "${SKIP_BENCH:-0}" != 1 ] && run_bench ;;
    *) echo "SESSION_STEPS: unknown step $name (engine, profile, tests, bench)" ;;
  esac
done
step "done"
