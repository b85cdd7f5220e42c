#!/usr/bin/env bash
# Create .venv if missing and install rsc with its pinned dependencies (idempotent, quick when up to date).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
stamp=.venv/.rsc-install-stamp
wanted=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
    exit 0
fi

# torch with its CUDA libraries makes a new .venv about 6.5 GiB, and pip unpacks wheels in TMPDIR first: a full
# disk fails pip half-way through with a bare "No space left on device", so check first and say where space is short.
if [ -x .venv/bin/python ]; then need_default=1; else need_default=8; fi
need_gib="${RSC_SETUP_MIN_FREE_GIB:-$need_default}"
for place in . "${TMPDIR:-/tmp}"; do
    read -r free_kib mount < <(df -Pk "$place" | awk 'NR == 2 {print $4, $6}')
    if [ "$free_kib" -lt $((need_gib * 1024 * 1024)) ]; then
        echo "[setup] not enough disk space to install: $(awk -v k="$free_kib" 'BEGIN {printf "%.1f", k / 1048576}') GiB free" \
             "at $(cd "$place" && pwd) ($mount), expected at least $need_gib GiB" \
             "(.venv with torch is about 6.5 GiB; pip unpacks in TMPDIR). Free space there, or set TMPDIR to a larger disk." >&2
        exit 1
    fi
done

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
echo "[setup] installing torch 2.14.1 / torchvision 0.29.1 and rsc[test] (pinned by constraints.txt)"
# torch first and pinned: these exact builds install from local disk on our machines.
.venv/bin/python -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
echo "$wanted" > "$stamp"
