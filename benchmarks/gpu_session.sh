#!/usr/bin/env bash
# A whole GPU session in one call: environment report, GPU tests, full-size benchmarks.
#
#   bash benchmarks/gpu_session.sh            # from the repository root; results also go to $OUT
#
# Steps, each under its own `timeout`, every one also cut to what is left of DEADLINE (seconds from the
# start, default 540: the device tool runs one command for at most 600 s), so the whole call ends in time
# and a late step is shortened or skipped rather than the call killed with nothing written:
#   1. nvidia-smi and versions                                  -> $OUT/env.txt
#   2. make minimind_fast importable (a kernels link if needed)  (wheels in .whl/ installed first;
#      with the device tool, carry ".whl" so that Liger-Kernel gets installed)
#   3. the engine itself: launch/pretrain.py (DeepSpeed, bf16) on the built-in corpus, small-26m at
#      MiniMind's batch (32 x 512), runs as ENGINE_RUNS says     -> $OUT/engine-*.jsonl (metrics)
#   3b. with PROFILE_PRESETS (e.g. "moe-145m"): benchmarks/profile_step.py per preset, GPU time per
#      kernel                                                  -> $OUT/profile-PRESET.txt
#   4. GPU tests: `pytest -m gpu tests/` + kernel tests at full size -> $OUT/gpu-tests.log
#   5. benchmarks at full sizes                                  -> benchmarks/results/*.json, copied to $OUT
# Knobs (environment): TEST_TIMEOUT (s, default 170), BENCH_TIMEOUT (s, default 330), ENGINE_STEPS
# (default 60), ENGINE_PROFILE (steps to profile, default 0), ENGINE_FLAGS (more pretrain flags),
# ENGINE_TIMEOUT (s per run, default 100; twice that for compile and cudagraphs runs), ENGINE_RUNS (default "triton:0 triton cudagraphs": ZeRO 0
# against the bf16 default, then CUDA graphs; each KIND[@MICRO_BATCH][:ZERO_STAGE], KIND one of
# triton, reference, compile, cudagraphs), BENCH_FILES (default: all), BENCH_ARGS (extra pytest args
# for the benchmarks, e.g. "-k kernels"), PROFILE_PRESETS (default none), PROFILE_TIMEOUT (s each, default 90), DEADLINE (s, default 540), TEST_FILES (default: the kernel tests and the GPU-marked
# ones), SKIP_TESTS=1, SKIP_BENCH=1, SKIP_ENGINE=1.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu-session}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
TEST_TIMEOUT="${TEST_TIMEOUT:-170}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-330}"
DEADLINE="${DEADLINE:-540}"
START=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }
# capped WANTED: WANTED seconds, or what is left before DEADLINE (less a margin to copy results) if less
capped() { local left=$(( DEADLINE - ($(date +%s) - START) - 15 )); echo $(( $1 < left ? $1 : left )); }

step "environment"
{
  nvidia-smi || echo "nvidia-smi not found"
  "$PY" - <<'EOF'
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
EOF
  git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -50
} 2>&1 | tee "$OUT/env.txt"

step "install"
SITE=/tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --upgrade --no-index --no-deps --target "$SITE" .whl/*.whl && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
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

if [ "${SKIP_ENGINE:-0}" != 1 ]; then
  step "engine: launch/pretrain.py under DeepSpeed, small-26m, 32 x 512 tokens per step"
  # The built-in corpus has a small vocabulary; --vocab-size keeps the preset's 6400 so the FLOPs are
  # small-26m's. Metrics (tokens/s, MFU) come from the engine's own metrics.jsonl.
  E=/tmp/engine && mkdir -p $E
  "$PY" launch/make_corpus.py --out $E/corpus >/dev/null &&
    "$PY" launch/train_tokenizer.py --data $E/corpus/pretrain.jsonl --vocab-size 6400 --out $E/tok >/dev/null &&
    "$PY" launch/tokenize.py --kind pretrain --data $E/corpus/pretrain.jsonl --tokenizer $E/tok --out $E/shards
  for run in ${ENGINE_RUNS:-triton:0 triton cudagraphs}; do
    # RUN is KIND[@MICRO_BATCH][:ZERO_STAGE]: KIND triton, reference, compile, or cudagraphs (compile,
    # reduce-overhead); without a stage, the engine's default (1 with bf16).
    zero=; [ "${run#*:}" != "$run" ] && zero="--zero-stage ${run#*:}"
    kind_mb=${run%%:*}
    mb=32; [ "${kind_mb#*@}" != "$kind_mb" ] && mb=${kind_mb#*@}
    name=$(echo "$run" | sed 's/@/-mb/; s/:/-zero/')
    case "${kind_mb%@*}" in
      reference) flags="--kernels reference" ;;
      compile) flags="--kernels triton --compile" ;;
      cudagraphs) flags="--kernels triton --compile --compile-mode reduce-overhead" ;;
      *) flags="--kernels triton" ;;
    esac
    # torch.compile's first step took over 80 s on an H200 (2026-11-30): compiled runs get twice as long.
    want=${ENGINE_TIMEOUT:-100}; case "${kind_mb%@*}" in compile|cudagraphs) want=$((want * 2)) ;; esac
    limit=$(capped "$want")
    if [ "$limit" -lt 30 ]; then echo "engine $run: skipped, ${limit}s left before DEADLINE"; continue; fi
    timeout -k 5 "$limit" "$PY" launch/pretrain.py --preset small-26m --vocab-size 6400 \
      --data $E/shards --out $E/run-$name --steps "${ENGINE_STEPS:-60}" --micro-batch-size $mb --seq-len 512 \
      --log-every 10 --eval-every 0 --save-every 100000 --profile-steps "${ENGINE_PROFILE:-0}" $flags $zero ${ENGINE_FLAGS:-} \
      >"$OUT/engine-$name.log" 2>&1
    echo "engine $run: exit $?"
    cp $E/run-$name/metrics.jsonl "$OUT/engine-$name.jsonl" 2>/dev/null && tail -n 3 "$OUT/engine-$name.jsonl"
    cp $E/run-$name/profile.txt "$OUT/engine-$name-profile.txt" 2>/dev/null
  done
fi

if [ -n "${PROFILE_PRESETS:-}" ]; then
  # Where each preset's training step spends GPU time, kernel by kernel (benchmarks/profile_step.py).
  for preset in $PROFILE_PRESETS; do
    limit=$(capped "${PROFILE_TIMEOUT:-90}")
    if [ "$limit" -lt 20 ]; then echo "profile $preset: skipped, ${limit}s left before DEADLINE"; continue; fi
    step "profile_step.py --preset $preset (timeout ${limit}s) -> $OUT/profile-$preset.txt"
    timeout -k 5 "$limit" "$PY" benchmarks/profile_step.py --preset "$preset" --kernels triton \
      >"$OUT/profile-$preset.txt" 2>&1
    echo "profile $preset: exit $?"; grep -E "^=== " "$OUT/profile-$preset.txt"
  done
fi

TEST_TIMEOUT=$(capped "$TEST_TIMEOUT")
if [ "$TEST_TIMEOUT" -lt 20 ]; then echo "GPU tests: skipped, ${TEST_TIMEOUT}s left before DEADLINE"; SKIP_TESTS=1; fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  step "GPU tests (timeout ${TEST_TIMEOUT}s) -> $OUT/gpu-tests.log"
  # The GPU-marked tests and the kernel tests (which run at full size on CUDA).
  TEST_FILES=${TEST_FILES:-$( (ls tests/test_kernels*.py 2>/dev/null; grep -l "mark.gpu" tests/test_*.py 2>/dev/null) | sort -u | tr '\n' ' ')}
  timeout -k 5 "$TEST_TIMEOUT" "$PY" -m pytest -q --no-header -p no:cacheprovider --maxfail=20 -rfE --tb=short \
    -m "gpu or not slow" ${TEST_FILES:-tests/} >"$OUT/gpu-tests.log" 2>&1
  echo "tests exit status: $?"
  tail -n 25 "$OUT/gpu-tests.log"
fi

BENCH_TIMEOUT=$(capped "$BENCH_TIMEOUT")
if [ "$BENCH_TIMEOUT" -lt 20 ]; then echo "benchmarks: skipped, ${BENCH_TIMEOUT}s left before DEADLINE"; SKIP_BENCH=1; fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  step "benchmarks at full size (timeout ${BENCH_TIMEOUT}s)"
  mkdir -p benchmarks/results
  eval "EXTRA=(${BENCH_ARGS:-})"  # keeps quoted words, e.g. BENCH_ARGS='-k "moe or decode"'
  # Results are rewritten after every case, so a timeout still leaves a valid (partial) file.
  # Most telling first: kernels, MoE, training step, decode, then any other bench_*.py (data).
  # BENCH_FILES (e.g. "model decode") runs just those.
  FILES=$(for f in ${BENCH_FILES:-kernels moe model minimind_baseline decode}; do echo benchmarks/bench_$f.py; done
          [ -z "${BENCH_FILES:-}" ] && ls benchmarks/bench_*.py)
  FILES=$(echo "$FILES" | awk '!seen[$0]++' | while read -r f; do [ -f "$f" ] && echo "$f"; done | tr '\n' ' ')
  # The suite's own deadline (4/5 of the timeout) ends it cleanly, naming the tests it left out.
  timeout -k 5 "$BENCH_TIMEOUT" "$PY" -m pytest $FILES -q --no-header -p no:cacheprovider --gpu-sizes \
    --bench-deadline $((BENCH_TIMEOUT * 4 / 5)) \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name "${EXTRA[@]}" >"$OUT/bench.log" 2>&1
  echo "benchmarks exit status: $?"
  grep -E "passed|failed|error|results \(" "$OUT/bench.log" | tail -n 5
  grep -E "^(FAILED|ERROR)" "$OUT/bench.log" | head -n 20
  newest=$(ls -t benchmarks/results/*.json 2>/dev/null | head -n 1)
  if [ -n "$newest" ]; then
    cp "$newest" "$OUT/"
    "$PY" benchmarks/report.py --readme /nonexistent --png "$OUT/ratios.png" >"$OUT/report.md" 2>>"$OUT/bench.log"
    head -c 6000 "$OUT/report.md"
  fi
fi
step "done"
