#!/usr/bin/env bash
# Rewrite constraints.txt from the current .venv (run after changing dependencies in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
{
    echo "# Exact versions every fresh install resolves to (pip install -c constraints.txt ...)."
    echo "# Regenerate after changing dependencies: bash scripts/update_constraints.sh"
    .venv/bin/python -m pip freeze --exclude-editable | grep -v '^rsc'
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
