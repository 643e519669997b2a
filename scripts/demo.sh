#!/usr/bin/env bash
# Quick start: install, then run a DivMerge job through the service on its embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
