"""The job store's exactly-once rules on a real PostgreSQL (its own database: no worker or reconciler)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from divmerge_service import jobs
from divmerge_service.db import get_engine, migrate, session_scope
from divmerge_service.models import Job, Team, utcnow

from .procs import PostgresDB

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def url():
    db = PostgresDB().create()
    try:
        migrate(db.url)
        with session_scope(db.url) as s:
            s.add(Team(id=1, name="t"))
        yield db.url
    finally:
        get_engine(db.url).dispose()
        db.drop()


def new_job(url: str) -> str:
    with session_scope(url) as s:
        job, _ = jobs.create_job(s, team_id=1, spec={}, spec_hash="h", queue="q", idempotency_key=None)
        return job.id


def expire(url: str, job_id: str) -> None:
    with session_scope(url) as s:
        s.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def claim(url: str, job_id: str, worker: str, max_attempts: int = 3):
    with session_scope(url) as s:
        return jobs.claim(s, job_id, worker, lease_s=30, max_attempts=max_attempts)


def status(url: str, job_id: str) -> Job:
    with session_scope(url) as s:
        return jobs.load(s, job_id)


def test_concurrent_claims_one_winner(url):
    job_id = new_job(url)
    wins, barrier = [], threading.Barrier(8)

    def go(i):
        barrier.wait()
        if claim(url, job_id, f"w{i}") is not None:
            wins.append(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and status(url, job_id).attempts == 1


def test_live_lease_blocks_expired_lease_allows_and_fences_the_old_owner(url):
    job_id = new_job(url)
    first = claim(url, job_id, "a")
    assert first is not None and claim(url, job_id, "b") is None  # duplicate message dropped
    expire(url, job_id)
    second = claim(url, job_id, "b")
    assert second is not None and second.attempt == 2
    with session_scope(url) as s:  # the old owner comes back to life: all its writes are refused
        assert jobs.heartbeat(s, first, 30) == (False, False)
        assert not jobs.update_running(s, first, progress={"stage": "x"})
        assert not jobs.finish(s, first, "succeeded")
        assert jobs.finish(s, second, "succeeded")
    assert claim(url, job_id, "c") is None and status(url, job_id).status == "succeeded"


def test_out_of_attempts_is_worker_lost_and_cancel_wins(url):
    job_id = new_job(url)
    assert claim(url, job_id, "a", max_attempts=1) is not None
    expire(url, job_id)
    assert claim(url, job_id, "b", max_attempts=1) is None
    job = status(url, job_id)
    assert job.status == "failed" and job.error_code == "worker_lost"

    other = new_job(url)
    assert claim(url, other, "a") is not None
    with session_scope(url) as s:
        jobs.cancel_job(s, 1, other)
    expire(url, other)
    assert claim(url, other, "b") is None and status(url, other).status == "cancelled"


def test_reconciler_selection(url):
    fresh, stale, lost = new_job(url), new_job(url), new_job(url)
    with session_scope(url) as s:
        s.execute(update(Job).where(Job.id == stale).values(enqueued_at=utcnow() - timedelta(seconds=60)))
    assert claim(url, lost, "a") is not None
    expire(url, lost)
    with session_scope(url) as s:  # as in life: enqueued long before its lease ran out
        s.execute(update(Job).where(Job.id == lost).values(enqueued_at=utcnow() - timedelta(seconds=10)))
    with session_scope(url) as s:
        picked = {j for j, _ in jobs.stale_jobs(s, queued_stale_s=30, max_attempts=3)}
    assert stale in picked and lost in picked and fresh not in picked
    with session_scope(url) as s:  # just re-sent: not again until stale again
        again = {j for j, _ in jobs.stale_jobs(s, queued_stale_s=30, max_attempts=3)}
    assert not again & {stale, lost}


def test_transient_requeue_waits_for_run_after(url):
    job_id = new_job(url)
    c = claim(url, job_id, "a")
    with session_scope(url) as s:
        assert jobs.requeue(s, c, 0.5, "hub_unavailable", "HTTP 503")
        assert jobs.next_claimable(s) != job_id
    time.sleep(0.6)
    with session_scope(url) as s:
        s.execute(
            update(Job)
            .where(Job.id != job_id, Job.status.in_(["queued", "running"]))
            .values(status="cancelled")
        )
        assert jobs.next_claimable(s) == job_id
    assert claim(url, job_id, "b").attempt == 2


def test_a_message_before_run_after_does_not_claim_and_says_how_long_to_wait(url):
    """claim() honours run_after like next_claimable() and stale_jobs() (one ``claimable`` rule): a message
    that arrives before a retry's delay ran out claims nothing, and due_in() tells the runner to wait."""
    job_id = new_job(url)
    c = claim(url, job_id, "a")
    with session_scope(url) as s:
        assert jobs.requeue(s, c, 30, "hub_unavailable", "HTTP 503")
    assert claim(url, job_id, "b") is None
    with session_scope(url) as s:
        wait = jobs.due_in(s, job_id)
    assert wait is not None and 25 < wait <= 30
    job = status(url, job_id)
    assert (job.status, job.attempts) == ("queued", 1)
    with session_scope(url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(run_after=utcnow() - timedelta(seconds=1)))
        assert jobs.due_in(s, job_id) is None
    assert claim(url, job_id, "b").attempt == 2


def test_kept_results_expire_only_when_past_their_time_and_not_being_delivered(url):
    """A failed job's kept result is deleted once ``until`` has passed; a job retried (queued or running
    again) is delivering its kept result, which must survive its expiry time until the job ends."""
    past = (utcnow() - timedelta(seconds=1)).isoformat()
    future = (utcnow() + timedelta(hours=1)).isoformat()
    ids = {}
    for name, job_status, until in [("expired", "failed", past), ("fresh", "failed", future),
                                    ("retrying", "running", past), ("requeued", "queued", past)]:  # fmt: skip
        ids[name] = new_job(url)
        with session_scope(url) as s:
            s.execute(
                update(Job)
                .where(Job.id == ids[name])
                .values(status=job_status, kept={"path": f"/kept/{name}", "until": until})
            )
    with session_scope(url) as s:
        paths = jobs.expired_kept(s)
    assert "/kept/expired" in paths
    assert not {"/kept/fresh", "/kept/retrying", "/kept/requeued"} & set(paths)
    assert status(url, ids["expired"]).kept is None
    assert status(url, ids["retrying"]).kept == {"path": "/kept/retrying", "until": past}
