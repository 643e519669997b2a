"""The embedded default: ``divmerge serve`` with no configuration (SQLite in DIVMERGE_HOME, a worker process
polling it) runs a job end to end, no Postgres or Redis involved."""

from __future__ import annotations

import os
import subprocess

import httpx
import pytest

from .procs import REPO, DivmergeServe, wait_until

pytestmark = pytest.mark.service


def test_serve_embedded_runs_a_job(svc, tmp_path):
    home = tmp_path / "divmerge-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIVMERGE_", "HF_"))}
    env.update(
        DIVMERGE_HOME=str(home), DIVMERGE_LOCAL_ROOTS=str(svc.models["base"].parent), PYTHONPATH=str(REPO)
    )
    server = DivmergeServe(env, tmp_path / "serve.log").start()
    try:
        token = svc.cli("token", "create", "--team", "solo", env=env).strip().splitlines()[-1]
        base = server.url
        server.wait_ready()
        assert httpx.get(f"{base}/readyz").json()["checks"] == {"database": "ok", "broker": "embedded"}
        h = {"Authorization": f"Bearer {token}"}
        r = httpx.post(f"{base}/v1/merges", json=svc.classic(), headers=h)
        assert r.status_code == 202, r.text
        assert "server" not in r.headers, "no server banner"
        job_id = r.json()["id"]

        def finished():
            job = httpx.get(f"{base}/v1/merges/{job_id}", headers=h).json()
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        job = wait_until(finished, 90, interval=0.3, what="the embedded job")
        assert job["status"] == "succeeded", job["error"]
        assert (home / "divmerge.db").exists()
        assert (home / "outputs" / job_id / "model.safetensors").exists()
    finally:
        server.stop()

    def worker_gone():
        ps = subprocess.run(
            ["pgrep", "-g", str(server.proc.pid), "-f", "divmerge_worker.embedded"],
            capture_output=True,
            text=True,
        )
        return not ps.stdout.strip()

    # it exits once its current round ends (a DB round can wait on SQLite's lock, and the heartbeat's join
    # takes up to 5 s): 30 s bounds that on 2 loaded cores, where 10 s ran out once in a full suite
    wait_until(worker_gone, 30, what="the embedded worker to exit with the server")
