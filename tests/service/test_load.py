"""The sustained-load script (``python -m benchmarks.load``) in a tiny configuration, so that it cannot rot:
it starts its own topology (fresh database, private Redis, uvicorn --workers 2, two Celery workers), runs 3
clients for 20 s, drains, checks its invariants and writes its report. On quiet cores the whole run takes
about a minute (start-up and teardown included); the timeout leaves room for a busy machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psycopg
import pytest

from .procs import PG_ADMIN, REPO

pytestmark = pytest.mark.timeout(900)


def test_load_script_tiny_run(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks.load", "--clients", "3", "--duration-s", "20", "--api-workers", "2",
           "--drain-s", "120", "--timeout-s", "120", "--out-dir", str(out), "--name", "load_tiny", "--note", "test run"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIVMERGE_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]

    report = json.loads((out / "load_tiny.json").read_text())
    md = (out / "load_tiny.md").read_text()
    assert report["ok"] and all(report["checks"].values()), report["checks"]
    assert report["requests"]["5xx"] == 0 and report["requests"]["transport_errors"] == 0
    jobs = report["jobs"]
    assert jobs["accepted_202"] >= 1
    assert jobs["accepted_202"] == jobs["in_db"] == jobs["succeeded"]
    assert jobs["run_twice"] == []
    db = report["db_connections"]
    assert 0 < db["max_total"] <= db["bound"] == 10 * (2 + 2)
    assert report["routes"]["POST /v1/merges"]["n"] >= 1
    assert report["samples"] and report["commit"] and report["machine"]["cpus"] >= 1
    assert report["bottleneck"]["verdict"]
    for heading in (
        "# Sustained load",
        "## Requests",
        "## Jobs",
        "## Database connections",
        "## First bottleneck",
    ):
        assert heading in md
    assert "python -m benchmarks.load --clients 3 --duration-s 20" in md

    # the script cleaned up after itself: its database is gone
    with psycopg.connect(PG_ADMIN) as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'divmerge_load_%'").fetchall()
    assert all(name not in res.stdout for (name,) in left), left
