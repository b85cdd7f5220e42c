#!/usr/bin/env bash
# Create .venv if missing and install rsc with its pinned dependencies (idempotent, quick when up to date).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.rsc-install-stamp
wanted=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "[setup] installing torch 2.14.1 / torchvision 0.29.1 and rsc[test] (pinned by constraints.txt)"
    # torch first and pinned: these exact builds install from local disk on our machines.
    .venv/bin/python -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
    .venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
    echo "$wanted" > "$stamp"
fi
