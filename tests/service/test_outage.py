"""A 20 s PostgreSQL outage against the production topology, all real processes: a private PostgreSQL
cluster (stopped with ``pg_ctl stop -m fast`` and started again), a private Redis, two Celery workers and
``divmerge serve`` (uvicorn). Production timings (lease 60 s, reconciler every 30 s, queued jobs re-sent
after 300 s), so nothing is rescued by the reconciler: the jobs must get through on their own.

Expected: the running job's final write waits for the database (attempts stays 1, no merge redone);
the queued jobs are not lost (a claim that meets the outage waits instead of acking the message) and
start within 30 s of the database's return; every API endpoint answers 503 ``database_unavailable`` with
``Retry-After`` during the outage, never 500 or a reset, and /healthz stays 200."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from .procs import CeleryWorker, DivmergeServe, PrivatePostgres, RedisServer, wait_until

pytestmark = pytest.mark.service

OUTAGE_S = 20


@pytest.fixture
def stack(svc, tmp_path):
    pg, redis = PrivatePostgres(), RedisServer(tmp_path / "redis")
    server: DivmergeServe | None = None
    workers: list[CeleryWorker] = []
    try:  # whatever fails part way, everything started so far is stopped
        pg.init()
        redis.start()
        env = {**svc.env}
        env.update(
            DIVMERGE_DATABASE_URL=pg.url,
            DIVMERGE_BROKER_URL=redis.url,
            DIVMERGE_HOME=str(tmp_path / "home"),
            DIVMERGE_LEASE_S="60",
            DIVMERGE_HEARTBEAT_S="2",
            DIVMERGE_RECONCILE_INTERVAL_S="30",
            DIVMERGE_QUEUED_STALE_S="300",
            DIVMERGE_STEP_DELAY_S="0",
        )
        from divmerge_service.db import get_engine, migrate

        migrate(pg.url)
        get_engine(pg.url).dispose()
        server = DivmergeServe(env, tmp_path / "serve.log", "--no-worker").start()
        token = svc.cli("token", "create", "--team", "ops", env=env).strip().splitlines()[-1]
        base = server.url
        server.wait_ready()
        yield {"pg": pg, "env": env, "base": base, "h": {"Authorization": f"Bearer {token}"},
               "workers": workers, "tmp": tmp_path}  # fmt: skip
    finally:
        for w in workers:
            w.stop()
        if server is not None:
            server.stop()
        redis.kill()
        pg.destroy()


class Prober(threading.Thread):
    """Hits every endpoint in a loop and records what came back (status, error code, Retry-After, or the
    transport error), until stopped."""

    def __init__(self, base: str, headers: dict, body: dict, job_id: str):
        super().__init__(daemon=True)
        self.base, self.h, self.body, self.job_id = base, headers, body, job_id
        self.seen: list[tuple[str, str, str | None, str | None]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        calls = [
            ("GET /v1/merges/{id}", "GET", f"/v1/merges/{self.job_id}", None),
            ("GET /v1/merges", "GET", "/v1/merges", None),
            ("POST /v1/merges", "POST", "/v1/merges", self.body),
            ("POST /v1/merges/{id}/cancel", "POST", "/v1/merges/00000000-0000-0000-0000-000000000000/cancel", None),
            ("GET /metrics", "GET", "/metrics", None),
            ("GET /readyz", "GET", "/readyz", None),
            ("GET /healthz", "GET", "/healthz", None),
        ]  # fmt: skip
        with httpx.Client(base_url=self.base, timeout=10) as client:
            while not self.stop.is_set():
                for name, method, path, body in calls:
                    try:
                        r = client.request(method, path, json=body, headers=self.h)
                        code = None
                        if r.headers.get("content-type", "").startswith("application/json"):
                            code = (r.json().get("error") or {}).get("code")
                        self.seen.append((name, str(r.status_code), code, r.headers.get("retry-after")))
                    except httpx.HTTPError as err:
                        self.seen.append((name, type(err).__name__, None, None))
                time.sleep(0.1)


def test_postgres_outage_loses_nothing_and_redoes_nothing(svc, stack):
    base, h, env, pg = stack["base"], stack["h"], stack["env"], stack["pg"]
    out = svc.models["base"].parent.parent / "outputs"
    w1 = CeleryWorker({**env, "DIVMERGE_STEP_DELAY_S": "0.1"}, stack["tmp"]).start()  # the running job
    stack["workers"].append(w1)

    def post(body):
        r = httpx.post(f"{base}/v1/merges", json=body, headers=h, timeout=10)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def job(job_id):
        return httpx.get(f"{base}/v1/merges/{job_id}", headers=h, timeout=10).json()

    dest = out / f"outage-running-{stack['tmp'].name}"
    running = post(svc.classic("deep_", output={"path": str(dest)}))

    def near_the_end():
        j = job(running)
        p = j.get("progress") or {}
        return p.get("stage") == "write" and p["step"] >= p["total_steps"] - 50

    wait_until(near_the_end, 90, interval=0.1, what="the running job to near its end")
    queued = [post(svc.classic()) for _ in range(3)]  # w1 is busy: they wait in Redis
    w2 = CeleryWorker(env, stack["tmp"]).start(wait=False)  # comes up during the outage, meets it
    stack["workers"].append(w2)

    prober = Prober(base, h, svc.classic(), running)
    pg.stop()
    t_down = time.monotonic()
    prober.start()
    wait_until(lambda: "] received" in w2.log.read_text(), 60, interval=0.2, what="w2 to take a message")
    wait_until(lambda: (dest / ".divmerge-job.json").exists(), 60, interval=0.2,
               what="the running job to deliver its merge during the outage")  # fmt: skip
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t_down)))
    prober.stop.set()
    prober.join(timeout=30)
    pg.start()
    back, t_back = datetime.now(UTC), time.monotonic()
    outage_s = t_back - t_down

    def api_back():
        try:
            return httpx.get(f"{base}/v1/merges/{running}", headers=h, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(api_back, 30, interval=0.1, what="the API to answer again")
    api_back_s = time.monotonic() - t_back
    jobs = {i: wait_until(lambda i=i: (j := job(i))["status"] in ("succeeded", "failed") and j, 120,
                          interval=0.2, what=f"job {i}") for i in [running, *queued]}  # fmt: skip

    waits = [(datetime.fromisoformat(jobs[i]["started_at"]) - back).total_seconds() for i in queued]
    seen = Counter(f"{name} -> {status} {code or ''}".strip() for name, status, code, _ in prober.seen)
    numbers = {
        "outage_s": round(outage_s, 1),
        "api_answers_again_after_s": round(api_back_s, 2),
        "running_job": {"status": jobs[running]["status"], "attempts": jobs[running]["attempts"]},
        "queued_jobs_started_after_db_return_s": [round(w, 2) for w in waits],
        "queued_jobs": [(jobs[i]["status"], jobs[i]["attempts"]) for i in queued],
        "responses_during_outage": dict(sorted(seen.items())),
    }
    print(f"\npostgres outage: {json.dumps(numbers, indent=1)}")
    (svc.tmp / "outage.json").write_text(json.dumps(numbers, indent=1))

    assert all(j["status"] == "succeeded" for j in jobs.values()), {i: j["error"] for i, j in jobs.items()}
    assert jobs[running]["attempts"] == 1, "the finished merge was run again"
    assert "final write: database unavailable" in w1.log.read_text()  # it did meet the outage
    assert all(jobs[i]["attempts"] == 1 for i in queued)
    assert max(waits) < 30, waits
    statuses = {(name, status) for name, status, _, _ in prober.seen}
    assert ("GET /healthz", "200") in statuses
    for name, status, code, retry_after in prober.seen:
        if name == "GET /healthz":
            assert status == "200"
        elif name == "GET /readyz":
            assert status == "503"
        else:
            assert (status, code) == ("503", "database_unavailable") and retry_after, (name, status, code)
    assert {name for name, *_ in prober.seen} >= {"GET /v1/merges/{id}", "POST /v1/merges", "GET /metrics"}


def test_outage_longer_than_the_lease_records_the_delivered_merge_without_merging_again(svc, stack):
    """Lease 3 s, outage ~8 s: the running job delivers its merge during the outage, its final write gives
    up when the lease runs out, and the next attempt (after the database returns) finds the journaled
    delivery and records it: the merge ran once, the job succeeds with attempts=2."""
    base, h, env, pg = stack["base"], stack["h"], stack["env"], stack["pg"]
    short = {"DIVMERGE_LEASE_S": "3", "DIVMERGE_HEARTBEAT_S": "0.5", "DIVMERGE_RECONCILE_INTERVAL_S": "0.5"}
    w = CeleryWorker({**env, **short, "DIVMERGE_STEP_DELAY_S": "0.05"}, stack["tmp"]).start()
    stack["workers"].append(w)
    dest = svc.models["base"].parent.parent / "outputs" / f"outage-lease-{stack['tmp'].name}"
    r = httpx.post(f"{base}/v1/merges", json=svc.classic("deep_", output={"path": str(dest)}), headers=h)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    def job():
        return httpx.get(f"{base}/v1/merges/{job_id}", headers=h, timeout=10).json()

    def near_the_end():
        p = job().get("progress") or {}
        return p.get("stage") == "write" and p["step"] >= p["total_steps"] - 30

    wait_until(near_the_end, 90, interval=0.1, what="the job to near its end")
    pg.stop()
    wait_until(lambda: (dest / ".divmerge-job.json").exists(), 60, interval=0.1, what="the delivery")
    wait_until(lambda: "until the lease ran out" in w.log.read_text(), 30, interval=0.2,
               what="the final write to give up")  # fmt: skip
    pg.start()
    done = wait_until(lambda: (j := job())["status"] in ("succeeded", "failed") and j, 60, interval=0.2,
                      what="the job to finish")  # fmt: skip
    log = w.log.read_text()
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert "recorded without merging again" in log
    assert done["result"]["destination"] == str(dest) and done["result"]["metrics"]["tensors"] > 0
    assert not list(Path(env["DIVMERGE_HOME"]).glob("delivered/*")), "the journal is dropped once recorded"


def test_claim_that_outwaits_db_wait_s_gives_the_message_back(svc, stack):
    """DB_WAIT_S=2: a claim that meets a longer outage hands its message back to Redis (not acked), takes
    it again, and the job runs once the database returns."""
    base, h, env, pg = stack["base"], stack["h"], stack["env"], stack["pg"]
    r = httpx.post(f"{base}/v1/merges", json=svc.classic(), headers=h)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    pg.stop()
    w = CeleryWorker({**env, "DIVMERGE_DB_WAIT_S": "2"}, stack["tmp"]).start()
    stack["workers"].append(w)
    wait_until(lambda: w.log.read_text().count("] received") >= 2, 60, interval=0.2,
               what="the message to come back after the claim gave up")  # fmt: skip
    pg.start()

    def finished():
        j = httpx.get(f"{base}/v1/merges/{job_id}", headers=h, timeout=10).json()
        return j if j["status"] in ("succeeded", "failed") else None

    done = wait_until(finished, 60, interval=0.2, what="the job")
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    assert "reject requeue=True" in w.log.read_text()
