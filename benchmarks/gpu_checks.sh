#!/usr/bin/env bash
# GPU checks for imu2clip_plugin (not part of CI, which has no GPU). Run from the repo root on a CUDA machine
# with the project installed (`pip install -e '.[dev]'`):
#   1. the plugin's tests with CUDA visible (device="auto" picks CUDA + AMP where a test does not pin the CPU)
#   2. a short IMU<->video<->text run through torchrun (NCCL, one process per GPU, AMP) on the sample data
#   3. benchmarks/train_step.py with ViT-B-32 towers on the GPU: embedding cache vs online towers
set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
python -m pytest -q -x -p no:cacheprovider tests/test_imu2clip_train.py tests/test_imu2clip_loss.py \
  tests/test_imu2clip_encoder.py tests/test_imu2clip_towers.py tests/test_imu2clip_evaluate.py 2>&1 | tail -15
torchrun --standalone --nproc-per-node "${NPROC:-1}" -m imu2clip_plugin.cli train --config imu_video_text \
  --set store=sample:ego4d --set epochs=2 --set sec=4 --set stride=2 --set progress=false \
  --set run_dir="${RUN_DIR:-/tmp/imu2clip_gpu_check}" 2>&1 | tail -15
head -c 600 "${RUN_DIR:-/tmp/imu2clip_gpu_check}/metrics.jsonl"; echo
python benchmarks/train_step.py --model ViT-B-32 --frames 4 --reduce mean --steps 8 2>&1 | tail -12
