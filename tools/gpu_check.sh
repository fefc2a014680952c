#!/usr/bin/env bash
# One call on the GPU machine: the test suite, tools/split_ab.py (rows of 2^15 held whole or
# split), then experiments/benchmark.py with every peer, each part time-boxed, so that the whole
# fits in about 9 minutes of one `run` call.
#
# Before the call, here (once):
#   (.whl/ is in .gitignore)
#   python3 -m pip download --no-deps entmax==1.3 adasplash==0.2.2 -d .whl   # pure-Python wheels
# The call (from the repo root; name .whl in `carry`, leave a minute for the transfers):
#   bash tools/gpu_check.sh          with timeout_s=600
# What comes back under $OUT (at most 8 files): gpu_check.log (versions, pytest, the benchmark's
# summaries), bench-f32/ and bench-bf16/ (benchmark.json, .md, .csv; rewritten after each shape,
# so a part stopped at its time box keeps the shapes it finished).
#
# Settings (environment): TEST_S, SPLIT_S, F32_S, BF16_S (seconds for each part; 0 skips it),
# TEST_ARGS (pytest selection; default: the whole suite), PYTEST_WORKERS (default 8),
# F32_SHAPES, BF16_SHAPES, BENCH_VARIANTS (default: every variant and peer), BENCH_ARGS (more
# benchmark flags, without spaces inside one, e.g. "--min-batch-ms 10").
# On a machine without a GPU the same script runs what it can (used to test it on the CPU).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu_check_out}
TEST_S=${TEST_S:-180}
SPLIT_S=${SPLIT_S:-60}
F32_S=${F32_S:-210}
BF16_S=${BF16_S:-90}
TEST_ARGS=${TEST_ARGS:-tests}
PYTEST_WORKERS=${PYTEST_WORKERS:-8}
# The large shapes first (the copy roofline, and the backward kernel against XLA's fusion of the
# rule): a shape takes about a minute, so the time box may stop before the last ones.
# 16x262144: rows split across kernels, re-solved by XLA.
F32_SHAPES=${F32_SHAPES:-large,default,16x262144}
BF16_SHAPES=${BF16_SHAPES:-4096x32,65536x1024,8192x32000}
BENCH_VARIANTS=${BENCH_VARIANTS:-}
BENCH_ARGS=${BENCH_ARGS:-}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
began=$(date +%s)

say() { echo "== [$(($(date +%s) - began)) s] $*" | tee -a "$LOG"; }

# Wheels that travel with the tree (entmax, adasplash): no index there.
SITE=/tmp/gpu_check_site
if compgen -G ".whl/*.whl" >/dev/null; then
  say "installing $(ls .whl | tr '\n' ' ')"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl >>"$LOG" 2>&1 || say "wheel install failed (peers will be missing)"
else
  say "no .whl/ folder: the PyTorch entmax and AdaSplash peers run only if already installed"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1

say "machine"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 || true
  "$PYTHON" - <<'PY' 2>&1
import importlib
import jax
print("jax", jax.__version__, jax.default_backend(), jax.devices())
for name in ("torch", "triton", "entmax", "adasplash", "optax"):
    try:
        module = importlib.import_module(name)
        extra = ""
        if name == "torch":
            extra = f" cuda={module.cuda.is_available()}"
        print(name, getattr(module, "__version__", "?") + extra)
    except Exception as error:
        print(name, "missing:", type(error).__name__, error)
PY
} | tee -a "$LOG"

status=0
if [ "$TEST_S" -gt 0 ]; then
  say "pytest -n $PYTEST_WORKERS $TEST_ARGS (time box ${TEST_S} s)"
  # -p no:benchmark: the image's pytest-benchmark warns under xdist, and filterwarnings=error
  # turns that into an internal error.
  # shellcheck disable=SC2086
  timeout -k 10 "$TEST_S" "$PYTHON" -m pytest -n "$PYTEST_WORKERS" -p no:benchmark -q -rfE \
    --durations=10 $TEST_ARGS 2>&1 | tee -a "$LOG" | tail -n 40
  rc=${PIPESTATUS[0]}
  say "pytest exit status $rc$([ "$rc" = 124 ] && echo ' (time box reached)')"
  [ "$rc" = 0 ] || status=1
fi

if [ "$SPLIT_S" -gt 0 ]; then
  say "tools/split_ab.py (time box ${SPLIT_S} s)"
  timeout -k 10 "$SPLIT_S" "$PYTHON" tools/split_ab.py --rounds 2 --min-batch-ms 10 2>&1 |
    tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  say "split_ab exit status $rc$([ "$rc" = 124 ] && echo ' (time box reached)')"
fi

bench() {  # bench NAME SECONDS DTYPES SHAPES
  local name=$1 seconds=$2 dtypes=$3 shapes=$4
  [ "$seconds" -gt 0 ] || return 0
  # Stop starting new shapes 75 s before the time box: one shape (every variant compiled twice,
  # the peers, Triton's autotuning) can take about a minute on the GPU.
  local deadline=$((seconds > 100 ? seconds - 75 : seconds / 2))
  local variants=()
  [ -z "$BENCH_VARIANTS" ] || variants=(--variants "$BENCH_VARIANTS")
  say "benchmark $name: --dtypes $dtypes --shapes $shapes (time box ${seconds} s)"
  # shellcheck disable=SC2086
  timeout -k 15 "$seconds" "$PYTHON" experiments/benchmark.py --out "$OUT/$name" --force \
    --dtypes "$dtypes" --shapes "$shapes" --deadline-s "$deadline" "${variants[@]}" $BENCH_ARGS \
    2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "benchmark $name exit status $rc$([ "$rc" = 124 ] && echo ' (time box reached)')"
  [ "$rc" = 0 ] || status=1
}
bench bench-f32 "$F32_S" float32 "$F32_SHAPES"
bench bench-bf16 "$BF16_S" bfloat16 "$BF16_SHAPES"

say "done; files under $OUT:"
find "$OUT" -type f | sort | tee -a "$LOG"
exit "$status"
