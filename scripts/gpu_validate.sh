#!/usr/bin/env bash
# The prepared H200 validation run: the engine serving qwen3-30b-a3b (all 48 layers, bf16,
# random weights drawn on the GPU) under chunked:512 and layered on a short arxiv-long trace,
# checked against the simulator with the H200 profile, then the engine's own roofline.
#
#   scripts/gpu_validate.sh H200_PROFILE.json [OUT_DIR]
#
# OUT_DIR defaults to $OUT (set by the device runner) or reports/validation/h200. It receives
# validation.json/.csv, <policy>/{engine,sim}/*.parquet, validation.txt (the error table with the
# engine's achieved bandwidth) and roofline.txt. Sized for about 2-3 minutes on one H200: 8
# requests at 1 req/s (~7k-token median prompts, ~200 output tokens), each engine run capped at
# 100 s, each step under `timeout`, so the whole script ends within 5 minutes.
# Needs a CUDA build of torch 2.13 and nvidia-ml-py in the Python used ($PYTHON, default python).
set -euo pipefail
PROFILE=${1:?usage: scripts/gpu_validate.sh H200_PROFILE.json [OUT_DIR]}
DEST=${2:-${OUT:-reports/validation/h200}}
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
PROFILE=$(cd "$(dirname "$PROFILE")" && pwd)/$(basename "$PROFILE")
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1
"$PY" -c 'import torch, pynvml; assert torch.cuda.is_available(), "no CUDA"; print(torch.__version__, torch.cuda.get_device_name(0))'

start=$(date +%s)
timeout 210 "$PY" -m engine.cli --model qwen3-30b-a3b --device cuda:0 --profile "$PROFILE" \
    --policies chunked:512,layered --workload arxiv-long --rate 1.0 --num-requests 8 --seed 0 \
    --time-limit 100 --out "$DEST" | tee "$DEST/validation.txt"
echo "validation: $(( $(date +%s) - start )) s"

timeout 75 "$PY" benchmarks/engine_roofline.py --model qwen3-30b-a3b --device cuda:0 \
    --batch 1,16,64 --context 4096 --prefill 2048,8192 --repeats 5 | tee "$DEST/roofline.txt" \
    || echo "roofline benchmark did not finish (status $?)" | tee -a "$DEST/roofline.txt"
echo "total: $(( $(date +%s) - start )) s"
