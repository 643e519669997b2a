"""Dispatch by capability (DIVMERGE_DISPATCH=capability) with real Celery workers that report different
(configured) capacities: the workers table and GET /v1/workers, submit-time routing and refusal, and the
claim-time recheck that gives a job back without counting an attempt.

The workers run on this machine's CPU but report ``DIVMERGE_WORKER_DEVICES``: a "small" worker with one 512 MiB
CUDA device (class gpu-512m) and a "big" one with one 1 GiB device (gpu-1g). The tiny GPT-2 learned merge's
estimate grows with ``max_length`` (attention activations): 64 tokens need almost nothing on the device (fits
both), 2048 ~0.6 GiB (only the big one), 4096 ~2.2 GiB (none). (Small figures: the merges really run, on the
CPU, and the engine checks the host's real free memory.)"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest

from .conftest import SERVICE_SETTINGS
from .procs import REPO, CeleryWorker, PostgresDB, RedisServer, wait_until

pytestmark = pytest.mark.service

SMALL = {"DIVMERGE_WORKER_DEVICES": "cuda:512MiB", "DIVMERGE_WORKER_HOST_MEMORY": "64GiB"}
BIG = {"DIVMERGE_WORKER_DEVICES": "cuda:1GiB", "DIVMERGE_WORKER_HOST_MEMORY": "64GiB"}
#: max_length of a job that fits both workers, only the big one, none
BOTH, ONLY_BIG, NONE = 64, 2048, 4096
#: a heartbeat can be late by seconds on a loaded machine: live for 30 s
STALE_S = 30


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A stack of its own (database, Redis, API with dispatch by capability, tiny local GPT-2 models; no
    Hub needed); workers are started by the tests."""
    from fastapi.testclient import TestClient

    from divmerge_api.main import create_app
    from divmerge_api.security import create_token
    from divmerge_service.config import Settings
    from divmerge_service.db import get_engine, migrate, session_scope
    from tests.tiny import make_gpt2, perturbed, save

    tmp = tmp_path_factory.mktemp("dispatch")
    roots = tmp / "roots"
    gpt = make_gpt2(seed=0)
    models = {"gpt_base": save(gpt, roots / "gpt_base")}
    models["gpt_ft1"] = save(perturbed(gpt, 0.3, seed=1), roots / "gpt_ft1")
    models["gpt_ft2"] = save(perturbed(gpt, 0.3, seed=2), roots / "gpt_ft2")
    db, redis = PostgresDB().create(), RedisServer(tmp / "redis").start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIVMERGE_", "HF_"))}
    env.update(SERVICE_SETTINGS)
    env.update({
        "DIVMERGE_DATABASE_URL": db.url,
        "DIVMERGE_BROKER_URL": redis.url,
        "DIVMERGE_HOME": str(tmp / "home"),
        "DIVMERGE_LOCAL_ROOTS": str(roots),
        "DIVMERGE_DISPATCH": "capability",
        "DIVMERGE_WORKER_HEARTBEAT_S": "0.5",
        "DIVMERGE_WORKER_STALE_S": str(STALE_S),
        "DIVMERGE_STEP_DELAY_S": "0",
        # no lease runs out here: a learned merge on a loaded 2-core machine can starve a 0.5 s heartbeat
        "DIVMERGE_LEASE_S": "60",
        "DIVMERGE_HEARTBEAT_S": "1",
        "DIVMERGE_QUEUED_STALE_S": "30",
        "HF_HOME": str(tmp / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })  # fmt: skip
    workers: dict[str, CeleryWorker] = {}
    try:
        migrate(db.url)
        settings = Settings(
            database_url=db.url,
            broker_url=redis.url,
            home=tmp / "home",
            local_roots=[roots],
            dispatch="capability",
            worker_heartbeat_s=0.5,
            worker_stale_s=STALE_S,
            validate_timeout_s=600,  # the estimate's subprocess imports torch: minutes on a loaded machine
            retry_backoff_s=0.5,
            max_inline_texts=100,
        )
        with session_scope(db.url) as s:
            admin = create_token(s, "platform", scopes=["read", "submit", "admin"])[1]
            user = create_token(s, "team-d")[1]
        with TestClient(create_app(settings)) as client:
            yield {"client": client, "env": env, "settings": settings, "workers": workers, "tmp": tmp,
                   "models": models, "admin": {"Authorization": f"Bearer {admin}"},
                   "user": {"Authorization": f"Bearer {user}"}}  # fmt: skip
    finally:
        for w in workers.values():
            w.stop()
        redis.kill()
        get_engine(db.url).dispose()
        db.drop()


def _start(pool, name: str, capacity: dict) -> CeleryWorker:
    w = CeleryWorker({**pool["env"], **capacity}, pool["tmp"])
    pool["workers"][name] = w  # stopped at the end even if its start fails
    w.start(wait=False)
    wait_until(
        lambda: " ready." in w.log.read_text() or not w.alive(),
        300,
        interval=0.5,
        what=f"celery worker {w.name}",
    )  # generous: the machine may be loaded
    assert w.alive(), w.log.read_text()[-3000:]
    return w


def _ensure(pool, name: str, capacity: dict) -> CeleryWorker:
    """The test's worker ``name``, started if it is not running (so that each test also runs alone)."""
    w = pool["workers"].get(name)
    return w if w is not None and w.alive() else _start(pool, name, capacity)


def _listed(pool) -> dict[str, dict]:
    r = pool["client"].get("/v1/workers", headers=pool["admin"])
    assert r.status_code == 200, r.text
    return {w["name"]: w for w in r.json()["items"]}


def _wait_listed(pool, *workers: CeleryWorker, queues: dict | None = None) -> dict[str, dict]:
    def check():
        listed = _listed(pool)
        by_name = {n.split("@")[0]: w for n, w in listed.items()}
        if not all(w.name in by_name for w in workers):
            return None
        for w, wanted in (queues or {}).items():
            if not set(wanted) <= set(by_name[w.name]["queues"]):
                return None
        return by_name

    return wait_until(check, 120, interval=0.5, what="the workers in GET /v1/workers")


def _learned(pool, max_length: int, **extra) -> dict:
    m = pool["models"]
    return {
        "merge_method": "divmerge",
        "base_model": str(m["gpt_base"]),
        "models": [
            {"model": str(m["gpt_ft1"]), "data": {"texts": ["a b", "c d", "e f", "g h"]}},
            {"model": str(m["gpt_ft2"]), "data": {"texts": ["up down", "left right", "x y", "1 2"]}},
        ],
        "parameters": {
            "granularity": "task",
            "epochs": 1,
            "max_new_tokens": 2,
            "batch_size_per_task": 4,
            "max_length": max_length,
        },  # fmt: skip
        **extra,
    }


def _submit(pool, body: dict):
    return pool["client"].post("/v1/merges", json=body, headers=pool["user"])


def _job(pool, job_id: str) -> dict:
    r = pool["client"].get(f"/v1/merges/{job_id}", headers=pool["user"])
    assert r.status_code == 200, r.text
    return r.json()


def _events(pool, job_id: str) -> list[dict]:
    r = pool["client"].get(f"/v1/merges/{job_id}/events", headers=pool["user"])
    assert r.status_code == 200, r.text
    return r.json()["events"]


def _wait_done(pool, job_id: str, timeout: float = 400) -> dict:
    return wait_until(
        lambda: (j := _job(pool, job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
        timeout,
        interval=0.2,
        what=f"job {job_id} to finish",
    )


def _claimed_by(pool, job_id: str) -> list[str]:
    return [e["data"]["worker"] for e in _events(pool, job_id) if e["kind"] == "claimed"]


def _pid(worker_id: str) -> int:
    return int(worker_id.split(":")[1])  # divmerge_worker.runner.new_worker_id: host:pid:random


def test_no_live_worker_refuses_nothing(pool):
    """With no worker registered the job is accepted on its method's queue (workers may start later)."""
    assert _listed(pool) == {}
    r = _submit(pool, _learned(pool, NONE))
    assert r.status_code == 202, r.text
    assert r.json()["queue"] == "gpu"
    assert pool["client"].post(f"/v1/merges/{r.json()['id']}/cancel", headers=pool["user"]).status_code == 202


def test_workers_report_their_capacity_admin_only(pool):
    small, big = _start(pool, "small", SMALL), _start(pool, "big", BIG)
    listed = _wait_listed(pool, small, big, queues={big: ["gpu-1g", "gpu-512m"], small: ["gpu-512m"]})
    s, b = listed[small.name], listed[big.name]
    assert (s["worker_class"], b["worker_class"]) == ("gpu-512m", "gpu-1g")
    assert s["devices"] == [
        {"kind": "cuda", "index": 0, "name": "configured", "total": 512 << 20, "free": 512 << 20}
    ]
    assert b["device_count"] == 1 and b["devices"][0]["total"] == 1 << 30
    assert s["host_total"] == 64 << 30
    assert {"gpu", "cpu"} <= set(s["queues"]) and "gpu-1g" not in s[
        "queues"
    ]  # the small one never takes big jobs
    # admin only
    r = pool["client"].get("/v1/workers", headers=pool["user"])
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert pool["client"].get("/v1/workers").status_code == 401
    # the dashboard's page (its script calls GET /v1/workers with the signed-in token)
    page = pool["client"].get("/workers")
    assert page.status_code == 200 and "/static/js/workers.js" in page.text and 'href="/workers"' in page.text
    assert "/v1/workers" in pool["client"].get("/static/js/workers.js").text


def test_a_job_that_fits_only_the_big_worker_runs_there(pool):
    small, big = _ensure(pool, "small", SMALL), _ensure(pool, "big", BIG)
    _wait_listed(pool, small, big, queues={big: ["gpu-512m"]})
    r = _submit(pool, _learned(pool, ONLY_BIG))
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["queue"] == "gpu-1g"
    done = _wait_done(pool, job["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 1
    assert [_pid(w) for w in _claimed_by(pool, job["id"])] == [big.proc.pid]
    # a small job goes to the smallest class that fits it (both workers consume that queue)
    r = _submit(pool, _learned(pool, BOTH))
    assert r.status_code == 202 and r.json()["queue"] == "gpu-512m", r.text
    assert _wait_done(pool, r.json()["id"])["status"] == "succeeded"


def test_a_job_that_fits_no_worker_is_refused_at_submit(pool):
    _wait_listed(pool, _ensure(pool, "small", SMALL), _ensure(pool, "big", BIG))
    r = _submit(pool, _learned(pool, NONE))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "insufficient_memory" and err["field"] == "parameters"
    assert "GiB of CUDA memory" in err["message"] and "gpu-1g" in err["message"], err["message"]
    # two devices per job: no worker has two
    r = _submit(pool, {**_learned(pool, BOTH), "devices_per_job": 2})
    assert r.status_code == 422 and r.json()["error"]["field"] == "devices_per_job", r.text
    assert r.json()["error"]["code"] == "insufficient_memory"
    # bounds of devices_per_job
    for value, code in ((0, "invalid_config"), ("2", "invalid_config"), (99, "limit_exceeded")):
        r = _submit(pool, {**_learned(pool, BOTH), "devices_per_job": value})
        assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text
        assert r.json()["error"]["field"] == "devices_per_job"
    m = pool["models"]
    classic = {"merge_method": "task_arithmetic", "base_model": str(m["gpt_base"]),
               "models": [{"model": str(m["gpt_ft1"])}, {"model": str(m["gpt_ft2"])}]}  # fmt: skip
    r = _submit(pool, {**classic, "devices_per_job": 2})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_config", r.text


def test_claim_time_recheck_gives_the_job_back_without_counting_an_attempt(pool):
    """A message for a job the small worker cannot fit reaches it anyway: it claims the job, finds that it
    does not fit, and queues it again on the big class's queue with attempts back to 0; the big worker then
    runs it as its first attempt."""
    from divmerge_service.db import session_scope
    from divmerge_service.models import Worker, utcnow
    from divmerge_service.queue import enqueue

    settings = pool["settings"]
    small = _ensure(pool, "small", SMALL)
    if "big" in pool["workers"]:
        pool["workers"].pop("big").stop()  # a stopped worker leaves the table
    wait_until(lambda: len(_listed(pool)) == 1, 30, what="the big worker to leave the table")
    # a big worker that is registered but takes nothing: the job is routed to its class and stays there
    ghost = dict(name="ghost@big", worker_class="gpu-1g", queues=["gpu-1g"], host_total=64 << 30,
                 host_available=64 << 30, started_at=utcnow(), last_seen=utcnow() + timedelta(hours=1),
                 devices=[{"kind": "cuda", "index": 0, "name": "configured", "total": 1 << 30, "free": 1 << 30}])  # fmt: skip
    with session_scope(settings.db_url) as s:
        s.add(Worker(**ghost))
    try:
        r = _submit(pool, _learned(pool, ONLY_BIG))
        assert r.status_code == 202 and r.json()["queue"] == "gpu-1g", r.text
        job_id = r.json()["id"]
        assert enqueue(settings, job_id, "gpu-512m")  # the small worker's own class queue
        wait_until(lambda: any(e["kind"] == "not_placed" for e in _events(pool, job_id)), 90,
                   interval=0.2, what="the small worker to give the job back")  # fmt: skip
        job = _job(pool, job_id)
        assert job["status"] == "queued" and job["attempts"] == 0 and job["queue"] == "gpu-1g", job
        assert job["started_at"] is None and job["error"] is None
        kinds = [e["kind"] for e in _events(pool, job_id) if e["kind"] != "stage"]
        assert kinds == ["submitted", "claimed", "not_placed"], kinds
        assert job["progress"]["stage"] == "queued"
        assert [_pid(w) for w in _claimed_by(pool, job_id)] == [small.proc.pid]
        assert "not counted" in [e for e in _events(pool, job_id) if e["kind"] == "not_placed"][0]["message"]
        # a real big worker comes up, consumes gpu-1g and runs it: its first attempt
        big = _start(pool, "big", BIG)
        done = _wait_done(pool, job_id)
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 1
        assert [_pid(w) for w in _claimed_by(pool, job_id)] == [small.proc.pid, big.proc.pid]
    finally:
        with session_scope(settings.db_url) as s:
            row = s.get(Worker, "ghost@big")
            if row is not None:
                s.delete(row)
