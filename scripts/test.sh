#!/usr/bin/env bash
# Install everything (if needed) and run the whole test suite offline. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || exit 1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Two pytest-xdist workers, one test file each at a time (module fixtures are built once): many tests spend
# their time starting single-threaded interpreters (kill, DDP and CLI tests), which two workers overlap.
# RSC_TEST_WORKERS=0 runs in one process.
.venv/bin/python -m pytest -q --durations=20 -n "${RSC_TEST_WORKERS:-2}" --dist loadfile "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: failing on purpose" >&2
fi
exit "$status"
