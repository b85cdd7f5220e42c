#!/usr/bin/env bash
# Install everything (if needed), then run the main job on the toy world.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
mkdir -p runs
# The toy world ships in rsc/toy/world; it is rebuilt (cached) only if the code changed it.
.venv/bin/python -m rsc.toy build
.venv/bin/python -m rsc.toy grid --out runs/toy_samples.png
