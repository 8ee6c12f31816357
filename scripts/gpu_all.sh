#!/usr/bin/env bash
# Every GPU step the open issues ask for, in one prepared run (about 8 minutes on one H200):
#   1. calibrate qwen3-30b-a3b (TP 1) and gpt-oss-20b   (scripts/gpu_calibrate.sh, <= 2 x 170 s)
#   2. validate the engine against the simulator with the fresh qwen3 profile, chunked:512 vs
#      layered on a short arxiv-long trace, then the engine's roofline   (scripts/gpu_validate.sh)
# Results land in $OUT (profiles, validation tables, roofline.txt, the logs); commit them with
# the GPU, driver and torch versions this prints.
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
nvidia-smi | tee "$OUT/nvidia-smi.txt" || true
scripts/gpu_calibrate.sh 2>&1 | tee "$OUT/calibrate.log"
scripts/gpu_validate.sh "$OUT/h200-qwen3-30b-a3b.json" "$OUT/validation" 2>&1 | tee "$OUT/validate.log"
