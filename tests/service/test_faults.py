"""Faults with real processes: cancel mid-job, kill -9 of the worker mid-job, Redis losing its messages,
and a job whose worker keeps dying. Intervals are shrunk by settings (lease 3 s, heartbeat 0.5 s,
reconciler every 0.5 s, queued jobs re-enqueued after 3 s); the deep tiny BERT takes ~5 s to write."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from divmerge_service.db import session_scope
from divmerge_service.models import Job

from .procs import wait_until

pytestmark = pytest.mark.service


def running_with_progress(svc, job_id: str, min_step: int = 1):
    def check():
        job = svc.get(job_id)
        p = job["progress"] or {}
        return (
            job
            if job["status"] == "running" and p.get("stage") == "write" and p["step"] >= min_step
            else None
        )

    return wait_until(check, 60, interval=0.05, what=f"job {job_id} writing")


def test_cancel_running_job(svc):
    svc.ensure_worker()
    out = svc.models["base"].parent.parent / "outputs" / "cancelled"
    job = svc.submit(svc.classic("deep_", output={"path": str(out)}))
    running_with_progress(svc, job["id"])
    staging = out.parent / f".{out.name}.divmerge-job-{job['id']}-a1"
    staged = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") or job["id"] in p.name]
    assert staged == [staging], "one staging folder"
    t0 = time.monotonic()
    r = svc.client.post(f"/v1/merges/{job['id']}/cancel", headers=svc.h())
    assert r.status_code == 202 and r.json()["status"] == "running" and r.json()["cancel_requested"]
    done = svc.wait(job["id"])
    took = time.monotonic() - t0
    print(f"\ncancel of a running job took effect in {took:.2f}s")
    assert done["status"] == "cancelled" and done["error"] is None and done["result"] is None
    assert took < 5
    assert not out.exists() and not list(out.parent.glob(f".*{out.name}*")), "partial output left behind"
    assert svc.client.post(f"/v1/merges/{job['id']}/cancel", headers=svc.h()).status_code == 409


def test_kill9_worker_mid_job_recovers_and_uploads_once(svc, fake_hub_uploads):
    """Worker A (slowed down) runs the job; worker B stands by; kill -9 A mid-job. B's reconciler sees the
    lease expire, re-sends the job, B claims it (attempt 2) and delivers it once."""
    svc.stop_worker()
    a = svc.new_worker(DIVMERGE_STEP_DELAY_S="0.1")  # ~27 s of work: B has time to start
    repo = "team-a/after-kill"
    job = svc.submit(svc.classic("deep_", output={"repo_id": repo}))
    running_with_progress(svc, job["id"])
    b = svc.new_worker()  # the standby: started while A works, so that recovery is not worker start-up time
    running_with_progress(svc, job["id"], min_step=40)
    a.kill9()
    t_kill = time.monotonic()

    def reclaimed():
        j = svc.get(job["id"])
        return j if j["attempts"] == 2 and j["status"] in ("running", "succeeded") else None

    wait_until(reclaimed, 60, interval=0.05, what="the job to be claimed again")
    t_reclaim = time.monotonic() - t_kill
    done = svc.wait(job["id"], timeout=90)
    t_done = time.monotonic() - t_kill
    numbers = {"lease_s": svc.settings.lease_s, "heartbeat_s": svc.settings.heartbeat_s,
               "reconcile_interval_s": svc.settings.reconcile_interval_s,
               "reclaimed_after_kill_s": round(t_reclaim, 2), "succeeded_after_kill_s": round(t_done, 2),
               "rerun_wall_s": done["result"]["metrics"]["wall_s"]}  # fmt: skip
    print(f"\nkill -9 recovery: {json.dumps(numbers)}")
    (svc.tmp / "recovery.json").write_text(json.dumps(numbers))
    assert done["status"] == "succeeded" and done["attempts"] == 2
    assert f"re-enqueued job {job['id']}" in b.log.read_text()
    uploads = [u for u in fake_hub_uploads() if u["repo_id"] == repo]
    assert len(uploads) == 1 and done["result"]["commit"] == uploads[0]["commit"]
    assert not any((svc.settings.home / "tmp").glob(f"{job['id']}*")), "scratch of the killed attempt left"
    assert t_reclaim >= svc.settings.lease_s - 2 * svc.settings.heartbeat_s  # not before the lease expired


def test_worker_killed_right_after_its_upload_does_not_upload_again(svc, fake_hub_uploads):
    """The worker dies (SIGKILL, in FakeHubUploadDouble) just after its Hub commit, before it can record
    it. The other worker takes the job over (attempt 2), merges again, and ``divmerge_worker.upload`` finds the
    first attempt's commit by the job's marker: no second upload, and the job reports that commit."""
    svc.stop_worker()
    workers = [svc.new_worker(), svc.new_worker()]
    repo = "team-a/dies-after-upload"
    job = svc.submit(svc.classic(output={"repo_id": repo}))
    try:
        done = wait_until(
            lambda: (j := svc.get(job["id"]))["status"] in ("succeeded", "failed", "cancelled") and j,
            90,
            interval=0.2,
            what="the job to finish after its worker died",
        )
        assert sum(not w.alive() for w in workers) == 1, "the uploading worker was not killed"
    finally:
        for w in workers:  # later tests start the worker they need
            w.stop()
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    uploads = [u for u in fake_hub_uploads() if u["repo_id"] == repo]
    assert len(uploads) == 1, "uploaded again"
    assert done["result"]["commit"] == uploads[0]["commit"]


def test_redis_loses_messages(svc):
    svc.stop_worker()
    a = svc.submit(svc.classic())  # its message is in Redis...
    svc.redis.kill()  # ...and is lost (no persistence)
    assert svc.client.get("/readyz").status_code == 503
    b = svc.submit(svc.classic(parameters={"lambda": 0.3}))  # accepted while the broker is down
    assert b["status"] == "queued"
    t0 = time.monotonic()
    svc.redis.start()
    svc.new_worker()
    for job in (a, b):
        done = svc.wait(job["id"], timeout=60)
        assert done["status"] == "succeeded", done["error"]
    took = time.monotonic() - t0
    print(f"\nafter a Redis restart, both lost jobs succeeded {took:.2f}s after Redis came back")
    assert "reconciler: re-enqueued job" in svc.worker.log.read_text()


def test_job_whose_workers_keep_dying_fails_worker_lost(svc):
    """Out of attempts with an expired lease: the reconciler ends the job as failed/worker_lost."""
    svc.ensure_worker()
    job = svc.submit(svc.classic())
    svc.wait(job["id"])
    with session_scope(svc.settings.db_url) as s:  # as if its last allowed attempt's worker had died
        s.execute(
            update(Job)
            .where(Job.id == job["id"])
            .values(
                status="running",
                attempts=svc.settings.max_attempts,
                finished_at=None,
                upload=None,
                result=None,
                lease_expires_at=datetime.now(UTC) - timedelta(seconds=1),
            )  # fmt: skip
        )
    done = svc.wait(job["id"], timeout=20)
    assert done["status"] == "failed" and done["error"]["code"] == "worker_lost"
