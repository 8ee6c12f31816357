#!/usr/bin/env bash
# The H200 calibration run: full grid for qwen3-30b-a3b (TP 1) and gpt-oss-20b, fit tables printed.
#
# Sizing (calibrate/grid.py, full CUDA grid): ~100 shapes per model, each timed for ~0.08 s
# after a warm-up (rotated inputs of up to 512 MB drawn on the device in milliseconds), plus an
# NVML energy window of >= 0.2 s on every other shape and 1.3 s of idle power: ~45 s of
# measurement and ~15 s of CUDA/torch start-up per model. The 170 s timeout per model enforces
# the 3-minute budget; a model that hits it writes no profile (writes are atomic, at the end).
#
# Writes $OUT/h200-<model>.json (or ./calibration-out/ without $OUT), and copies each as a
# candidate to costmodel/presets/profiles/h200-<model>.json; to ship one, review it and rename
# it to h200.json (resolve_profile finds profiles by GPU name).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-calibration-out}"
mkdir -p "$OUT" costmodel/presets/profiles
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    PYTHON=.venv/bin/python
  else
    PYTHON=python3
  fi
fi
"$PYTHON" - <<'PY'
import sys
try:
    import pynvml, torch
except ImportError as e:
    sys.exit(f"gpu_calibrate: {e}: install torch (CUDA build) and nvidia-ml-py")
if not torch.cuda.is_available():
    sys.exit("gpu_calibrate: torch sees no CUDA GPU")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PY
nvidia-smi --query-gpu=name,driver_version,power.draw,temperature.gpu --format=csv || true

status=0
for model in qwen3-30b-a3b gpt-oss-20b; do
  echo "=== $model (tp 1) ==="
  start=$(date +%s)
  if timeout 170 "$PYTHON" -m calibrate.cli --gpu 0 --model "$model" --tp 1 \
      --out "$OUT/h200-$model.json" --no-progress; then
    cp "$OUT/h200-$model.json" "costmodel/presets/profiles/h200-$model.json"
  else
    echo "$model: calibration failed or exceeded 170 s (exit $?)"; status=1
  fi
  echo "$model: $(( $(date +%s) - start )) s wall"
done
exit $status
