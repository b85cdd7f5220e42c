#!/usr/bin/env bash
# Install everything (if needed), then run the main job: train a refiner on the toy world.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The toy world ships in rsc/toy/world; it is rebuilt (and cached) only if the code changed it.
.venv/bin/python -m rsc.toy build --no-progress
.venv/bin/python -m rsc.fit --config configs/toy.yaml "$@"
