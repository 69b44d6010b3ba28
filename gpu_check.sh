#!/usr/bin/env bash
# The checks that need a GPU, in one go, for one H100/H200: about 8 minutes, at most about 9.
#   tests        the whole test suite with CUDA visible (mind.py's runs in it then train on the GPU)
#   bench-1.5b   bench.py at the Qwen2.5-1.5B shape, 512 and 1024 tokens: mind, mind-all8, naive
#   bench-7b     bench.py at the Qwen2.5-7B shape, 1024 tokens: mind
#   oom-check    python oom_check.py (the out-of-memory retry check), where that file exists
#   speed-test   python evaluate.py --speed-test, on fewer prompts and tokens than its defaults
# Each step runs under `timeout` with its own limit; one that fails or runs out of time is recorded
# and the next one runs. At the end, ONE Markdown report: the device and versions, each step's exit
# status and wall time, bench.py's tables and the last lines of each step's log (bench.py --report).
#
#   bash gpu_check.sh [REPORT.md]     # or GPU_REPORT=REPORT.md; default results/gpu_report.md
#
# Logs (logs/STEP.log), bench.py's JSON and the steps file go in the report's folder. Limits in
# seconds: T_TESTS, T_BENCH_15B, T_BENCH_7B, T_OOM, T_SPEED; SPEED_ARGS replaces the speed test's
# options. Exit status: 0 if every step that ran passed, 1 otherwise or without a CUDA device.
set -u
report=${1:-${GPU_REPORT:-results/gpu_report.md}}
case $report in /*) ;; *) report=$PWD/$report ;; esac
cd "$(dirname "$0")" || exit 1

if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  echo "gpu_check.sh: no CUDA device visible to PyTorch (torch.cuda.is_available() False); nothing run" >&2
  exit 1
fi

T_TESTS=${T_TESTS:-170} T_BENCH_15B=${T_BENCH_15B:-140} T_BENCH_7B=${T_BENCH_7B:-80}
T_OOM=${T_OOM:-40} T_SPEED=${T_SPEED:-100}
SPEED_ARGS=${SPEED_ARGS:---speed-prompts 64 --speed-new-tokens 64}
dir=$(dirname "$report")
steps=$dir/gpu_check_steps.tsv
mkdir -p "$dir/logs" || exit 1
rm -f "$steps" "$dir/bench_1.5b.json" "$dir/bench_7b.json"  # nothing left from an earlier run
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1  # no network; logs written as they come
failed=0

run_step() {  # NAME LIMIT_S COMMAND...: one line in the steps file, the output in logs/NAME.log
  local name=$1 limit=$2 log=$dir/logs/$1.log t0 rc wall
  shift 2
  echo "gpu_check.sh: $name (limit $limit s): $*"
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$wall" "$limit" "$log" "$*" >>"$steps"
  echo "gpu_check.sh: $name: exit $rc after $wall s"
  [ "$rc" -eq 0 ] || failed=1
}

run_step tests "$T_TESTS" python -m pytest -q
run_step bench-1.5b "$T_BENCH_15B" python bench.py --shapes 1.5b --lens 512 1024 \
  --methods mind mind-all8 naive --out "$dir/bench_1.5b.json"
run_step bench-7b "$T_BENCH_7B" python bench.py --shapes 7b --lens 1024 --methods mind \
  --out "$dir/bench_7b.json"
if [ -f oom_check.py ]; then
  run_step oom-check "$T_OOM" python oom_check.py
else
  printf '%s\t%s\t\t%s\t\t%s\n' oom-check "not run: oom_check.py missing" "$T_OOM" \
    "python oom_check.py" >>"$steps"
  echo "gpu_check.sh: oom-check: not run: oom_check.py missing"
fi
# shellcheck disable=SC2086  # SPEED_ARGS is a list of options
run_step speed-test "$T_SPEED" python evaluate.py --speed-test $SPEED_ARGS

if ! python bench.py --report "$report" --steps-file "$steps" \
    --bench-json "$dir/bench_1.5b.json" "$dir/bench_7b.json" >"$dir/logs/report.log" 2>&1; then
  { echo "# GPU check: bench.py --report failed (see logs/report.log); the steps file as written:"
    echo; echo '```'; cat "$steps"; echo '```'; } >"$report"
  failed=1
fi
echo "gpu_check.sh: report in $report"
exit "$failed"
