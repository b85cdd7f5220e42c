#!/usr/bin/env bash
# Fit the demo (configs/toy.yaml on the shipped toy world) again, check it and compare it with the demo
# refiner shipped in rsc/toy/demo_refiner. Run it before landing a change to the recipe or to the code a
# fit runs (the fast test tests/test_demo_refiner.py::test_shipped_demo_refiner_is_the_current_demo_fit
# fails until then):
#
#   bash scripts/refit_demo.sh            # refit into runs/demo_refit-<time> and compare
#   bash scripts/refit_demo.sh --ship     # ... and, if it meets its acceptance criteria, replace the shipped one
#
# About 15 min on 2 AVX2-only CPU cores (fit, two validations and the 64-seed efficacy report). Exit status 1
# if the refit misses its criteria or, without --ship, lands outside the tolerance of the shipped run
# (weights differ bit-wise across CPUs and BLAS builds; a few borderline images flip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python -m rsc.demo refit --out "runs/demo_refit-$(date +%Y%m%d-%H%M%S)" "$@"
