#!/usr/bin/env bash
# Install, start the services the tests talk to, lint, check that the wheel installs and serves outside the
# checkout (scripts/wheel-check.sh, ~1.5 min; DIVMERGE_SKIP_WHEEL_CHECK=1 skips it), and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
.venv/bin/ruff check .
if [ "${DIVMERGE_SKIP_WHEEL_CHECK:-0}" != 1 ]; then
  bash scripts/wheel-check.sh
fi
# Opt-in: the deployment check (both images built, the compose topology up, two jobs end to end; see
# docs/deploy.md). Minutes with a warm image cache, longer cold: DIVMERGE_COMPOSE_CHECK=1 turns it on.
if [ "${DIVMERGE_COMPOSE_CHECK:-0}" = 1 ]; then
  bash scripts/compose-check.sh
else
  echo "compose check skipped: set DIVMERGE_COMPOSE_CHECK=1 to run scripts/compose-check.sh (docs/deploy.md)"
fi
.venv/bin/python -m pytest -q "$@"
