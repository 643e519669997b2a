#!/usr/bin/env bash
# Create .venv and install the project with its test tools (idempotent; a no-op when up to date).
# Also creates benchmarks/.venvs/mergekit (mergekit 0.1.5, ~1.5 min, ~1.6 GB), which the mergekit
# comparison tests and the speed benchmark use; DIVMERGE_SKIP_MERGEKIT=1 skips it (those tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.divmerge-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, at the version of constraints.txt (the CPU build where the index has one)
  .venv/bin/python -m pip install -q -c constraints.txt torch
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test,bench]"
  touch "$stamp"
fi
MK=benchmarks/.venvs/mergekit
if [ "${DIVMERGE_SKIP_MERGEKIT:-0}" != 1 ] && [ ! -x "$MK/bin/mergekit-yaml" ]; then
  "$PY" -m venv "$MK"
  "$MK/bin/python" -m pip install -q -c constraints.txt torch "mergekit==0.1.5"
fi
# The dashboard's browser tests drive Debian's chromium through Playwright (never `playwright install`).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium
fi
