#!/usr/bin/env bash
# Rebuild the full toy world from scratch and compare it with the one shipped in rsc/toy/world.
# Run it before landing any change to rsc/toy (a code change alters the world's fingerprint, and the
# fast test tests/test_toy_world_full.py::test_shipped_world_is_the_current_full_world then fails):
#
#   bash scripts/rebuild_toy_world.sh            # rebuild into runs/toy_world_rebuild and compare
#   bash scripts/rebuild_toy_world.sh --ship     # ... and, if it meets its targets, replace the shipped world
#
# A shipped world with a new fingerprint also makes the shipped demo refiner stale (its fingerprint includes
# the world's): follow with `bash scripts/refit_demo.sh --ship`.
#
# About 30 min on 2 AVX512-BF16 CPU cores, 56 min on 2 AVX2-only ones. Exit status 1 if the rebuilt world misses its targets or its
# statistics differ from the shipped ones beyond tolerance (weights may differ bit-wise across CPUs and BLAS builds).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
out=runs/toy_world_rebuild
.venv/bin/python -m rsc.toy build --out "$out" --force --no-progress
status=0
.venv/bin/python -m rsc.toy compare "$out" rsc/toy/world || status=$?
if [ "${1:-}" = "--ship" ]; then
    if .venv/bin/python -c "import json, sys; sys.exit(0 if json.load(open('$out/manifest.json'))['meets_targets'] else 1)"; then
        rm -rf rsc/toy/world.old && mv rsc/toy/world rsc/toy/world.old && cp -r "$out" rsc/toy/world && rm -rf rsc/toy/world.old
        echo "shipped: rsc/toy/world replaced by the rebuilt world"
        status=0
    else
        echo "not shipped: the rebuilt world misses its targets" >&2
        status=1
    fi
fi
exit "$status"
