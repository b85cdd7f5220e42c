#!/usr/bin/env bash
# The prepared check for a lent GPU (at most 8 minutes; nothing is downloaded): training pairs/s and peak
# memory at batch 8 and 32 and inference time per image, plain vs corrected, of an SD-1.5-architecture
# backbone with random weights (bf16, gradient checkpointing, 64x64 latents), as JSON in $OUT/gpu_check.json.
#   OUT=/some/dir bash scripts/gpu_check.sh [--tiny] [more scripts/gpu_check.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec timeout 480 "$PYTHON" scripts/gpu_check.py --out "${OUT:-gpu_check_out}" "$@"
