#!/usr/bin/env bash
# Train the shipped configs/toy.yaml, unchanged but for its paths, on the shipped toy world and on two
# other worlds (other seeds, targeted groups and bias strengths), and print its efficacy on each.
# Not in CI: each world takes 30-56 min to build (AVX512-BF16 vs AVX2-only CPU) and 10-15 min to fit on 2 CPU cores. Resumable.
#   bash scripts/check_generalisation.sh [--only NAME ...] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python scripts/check_generalisation.py "$@"
