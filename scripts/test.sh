#!/usr/bin/env bash
# Install, start the services the tests talk to, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
