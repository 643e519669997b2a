#!/usr/bin/env bash
# The package installs and serves outside the checkout: build the wheel from the working tree's files,
# install it (with the service extra) into a fresh venv under a temporary folder, then, from an empty
# directory, create a token, start `divmerge serve` (embedded: SQLite + in-process worker), check /healthz
# and run one tiny task-arithmetic job to success with `divmerge submit --wait`. About 1.5 minutes on an
# idle 2-core machine (4 with other test runs beside it), most of it installing torch into the fresh venv.
# Needs: python3 with venv; torch comes from the local wheel at constraints.txt's version.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
start=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/divmerge-wheel-check.XXXXXX")
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "wheel-check: FAILED: $*" >&2; [ -f "$WORK/serve.log" ] && tail -40 "$WORK/serve.log" >&2; exit 1; }

# 1. the wheel, built from a copy of the tracked and untracked-but-not-ignored files (no build/ or
#    egg-info left in the checkout, and nothing ignored sneaks in)
mkdir -p "$WORK/src" "$WORK/dist"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | tar -C "$REPO" --null -T - -cf - | tar -C "$WORK/src" -xf -
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK/dist"/divmerge-*.whl)
echo "wheel-check: built $(basename "$WHEEL") ($((SECONDS - start)) s)"

# 2. what the wheel must carry (checked on the archive, before installing)
"$VPY" - "$WHEEL" <<'EOF' || fail "the wheel lacks files"
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = [
    "divmerge_service/migrations/env.py",
    "divmerge_service/migrations/script.py.mako",
    "divmerge_api/dashboard/layout.html",
    "divmerge_api/dashboard/pages/job.html",
    "divmerge_api/dashboard/static/dashboard.css",
    "divmerge_api/dashboard/static/favicon.svg",
    "divmerge_api/dashboard/static/js/common.js",
    "divmerge_api/dashboard/static/examples/divmerge.yaml",
]
missing = [n for n in need if n not in names]
if not any(n.startswith("divmerge_service/migrations/versions/") and n.endswith(".py") for n in names):
    missing.append("divmerge_service/migrations/versions/*.py")
if any(n.startswith(("tests/", "benchmarks/", "migrations/")) for n in names):
    missing.append("(no tests/, benchmarks/ or top-level migrations/ expected)")
if missing:
    sys.exit("missing: " + ", ".join(missing))
EOF

# 3. a fresh venv outside the checkout: torch first (the local CPU wheel), then the wheel with its extra
"$VPY" -m pip install -q -c "$REPO/constraints.txt" torch
"$VPY" -m pip install -q -c "$REPO/constraints.txt" "${WHEEL}[service]"
echo "wheel-check: installed into a fresh venv ($((SECONDS - start)) s)"

# 4. from an empty directory, with nothing of the checkout on the path
EMPTY="$WORK/empty"
mkdir -p "$EMPTY"
cd "$EMPTY"
unset PYTHONPATH
for v in $(env | sed -n 's/^\(DIVMERGE_[A-Z_]*\)=.*/\1/p'); do unset "$v"; done
export DIVMERGE_HOME="$WORK/home" DIVMERGE_LOCAL_ROOTS="$WORK/models" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
DM="$WORK/venv/bin/divmerge"
"$VPY" -c "import divmerge_api, divmerge_service, divmerge_worker, divmerge_core; import sys
for m in (divmerge_api, divmerge_service, divmerge_worker, divmerge_core):
    assert m.__file__.startswith('$WORK/venv/'), m.__file__" || fail "the packages do not come from the venv"

# three tiny BERT classifiers (a base and two fine-tunes), written with the venv's transformers
"$VPY" - "$WORK/models" 2>"$WORK/models.log" <<'EOF' || { cat "$WORK/models.log" >&2; fail "could not write the tiny models"; }
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

root = Path(sys.argv[1])
cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=32, num_labels=2)
torch.manual_seed(0)
base = BertForSequenceClassification(cfg)
base.save_pretrained(root / "base")
for i in (1, 2):
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p))
    base.save_pretrained(root / f"ft{i}")
EOF

TOKEN=$("$DM" token create --team wheel-check | tail -1)
[ -n "$TOKEN" ] || fail "divmerge token create printed no token"
PORT=$("$VPY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$DM" serve --port "$PORT" >"$WORK/serve.log" 2>&1 &
server_pid=$!
URL="http://127.0.0.1:$PORT"
for _ in $(seq 120); do
  "$VPY" -c "import httpx, sys; sys.exit(httpx.get('$URL/healthz').status_code != 200)" 2>/dev/null && break
  kill -0 "$server_pid" 2>/dev/null || fail "divmerge serve exited"
  sleep 0.5
done
"$VPY" -c "import httpx; r = httpx.get('$URL/healthz'); r.raise_for_status(); print('wheel-check: healthz', r.json())" \
  || fail "/healthz did not answer 200"
"$VPY" -c "import httpx; r = httpx.get('$URL/static/js/common.js'); r.raise_for_status()" \
  || fail "the dashboard's static files are not served"

cat >merge.yaml <<EOF
merge_method: task_arithmetic
base_model: $WORK/models/base
models:
  - model: $WORK/models/ft1
  - model: $WORK/models/ft2
parameters:
  lambda: 0.5
EOF
export DIVMERGE_URL="$URL" DIVMERGE_TOKEN="$TOKEN"
out=$(timeout 120 "$DM" submit merge.yaml --wait --poll 0.5 2>"$WORK/submit.err") \
  || { cat "$WORK/submit.err" >&2; fail "the job did not succeed: $out"; }
job=$(printf '%s\n' "$out" | head -1 | tr -d ' ')
printf '%s\n' "$out" | grep -q "succeeded" || fail "the job did not succeed: $out"
[ -f "$DIVMERGE_HOME/outputs/$job/model.safetensors" ] || fail "no merged model in outputs/$job"
echo "wheel-check: job $job succeeded; OK in $((SECONDS - start)) s"
