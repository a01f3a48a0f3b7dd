#!/usr/bin/env bash
# GPU checks for imu2clip_plugin (not part of CI, which has no GPU). Run from the repo root on a CUDA machine
# with the project installed (`pip install -e '.[dev]'`):
#   1. the plugin's tests with CUDA visible (device="auto" picks CUDA + AMP where a test does not pin the CPU)
#   2. a short IMU<->video<->text run through torchrun (NCCL, one process per GPU, AMP) on the sample data
#   3. benchmarks/train_step.py with ViT-B-32 towers on the GPU: embedding cache vs online towers
#
#   bash benchmarks/gpu_checks.sh            # run every check; exit 1 if any failed (each one still runs)
#   bash benchmarks/gpu_checks.sh --dry-run  # print the checks without running them
#
# Each check's full output goes to $LOG_DIR/<check>.log (default: a new temp dir); its last lines are printed
# after its exit status is recorded, so a failing check is never hidden behind a pipe. Without a working
# nvidia-smi nothing runs and the script exits 2. Environment: NPROC (torchrun processes, default 1),
# RUN_DIR (the torchrun check's run dir), PYTHON (default: python), LOG_DIR.
set -euo pipefail
export PYTHONUNBUFFERED=1

PYTHON="${PYTHON:-python}"
RUN_DIR="${RUN_DIR:-/tmp/imu2clip_gpu_check}"
DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

failed=()
passed=()

# check NAME CMD...: run CMD with its output in $LOG_DIR/NAME.log, print the log's tail and the verdict.
check() {
  local name="$1"; shift
  if [[ $DRY_RUN == 1 ]]; then
    printf '[dry-run] %s:' "$name"; printf ' %q' "$@"; echo
    return 0
  fi
  local log="$LOG_DIR/$name.log" rc=0
  echo "== $name: $*"
  "$@" >"$log" 2>&1 || rc=$?
  tail -n 15 "$log"
  if [[ $rc == 0 ]]; then
    passed+=("$name"); echo "== $name: PASSED"
  else
    failed+=("$name"); echo "== $name: FAILED (exit $rc; full log: $log)"
  fi
}

# (run as `check`'s command, where `set -e` does not apply: every step returns its own failure)
torchrun_check() {
  rm -rf "$RUN_DIR" || return
  torchrun --standalone --nproc-per-node "${NPROC:-1}" -m imu2clip_plugin.cli train --config imu_video_text \
    --set store=sample:ego4d --set epochs=2 --set sec=4 --set stride=2 --set progress=false \
    --set run_dir="$RUN_DIR" || return
  if [[ ! -s "$RUN_DIR/metrics.jsonl" ]]; then
    echo "no metrics written to $RUN_DIR/metrics.jsonl" >&2; return 1
  fi
  head -c 600 "$RUN_DIR/metrics.jsonl" && echo
}

if [[ $DRY_RUN == 0 ]]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi --query-gpu=name,memory.total --format=csv; then
    echo "gpu_checks: no working nvidia-smi here: no GPU to check; nothing was run" >&2
    exit 2
  fi
  LOG_DIR="${LOG_DIR:-$(mktemp -d -t gpu_checks.XXXXXX)}"
  mkdir -p "$LOG_DIR"
fi

check plugin_tests "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/plugin/test_imu2clip_train.py \
  tests/plugin/test_imu2clip_loss.py tests/plugin/test_imu2clip_encoder.py tests/plugin/test_imu2clip_towers.py \
  tests/plugin/test_imu2clip_evaluate.py
check torchrun_train torchrun_check
check train_step_vit "$PYTHON" benchmarks/train_step.py --model ViT-B-32 --frames 4 --reduce mean --steps 8

[[ $DRY_RUN == 1 ]] && exit 0
echo "gpu_checks: ${#passed[@]} passed${passed[*]:+ (${passed[*]})}, ${#failed[@]} failed${failed[*]:+ (${failed[*]})}"
if (( ${#failed[@]} > 0 )); then
  exit 1
fi
