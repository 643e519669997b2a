#!/usr/bin/env bash
# Quick start: install, then run a DivMerge job through the service on its embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f .venv/.divmerge-installed ] || [ pyproject.toml -nt .venv/.divmerge-installed ]; then
  echo "demo: installing into .venv: torch (CPU build) and the project with its test and benchmark tools;"
  echo "demo: the first time this downloads about 1 GB and takes a few minutes"
fi
bash scripts/setup.sh
echo "demo: installed; running scripts/demo.py $*"
exec .venv/bin/python scripts/demo.py "$@"
