"""The job store shared by the API and the workers, and every job transition in one module: a job's history
(events), the API's submit, cancel and retry, and the workers' lease protocol. Every state change is one
conditional UPDATE (a claimed job's fenced on the claim). A transition that finishes a job queues its
webhooks (:func:`divmerge_service.webhooks.on_finished`) in the same transaction."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, null, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import webhooks
from .models import ACTIVE, FINISHED, Job, JobEvent, JobStatus, utcnow


def add_event(session: Session, job_id: str, kind: str, message: str, **data: Any) -> None:
    """Append to the job's history (in the caller's transaction, so it commits with the state change)."""
    session.add(JobEvent(job_id=job_id, at=utcnow(), kind=kind, message=message, data=data))


def list_events(session: Session, job_id: str, limit: int = 1000) -> list[JobEvent]:
    return list(
        session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id).limit(limit))
    )


# --- the API's transitions: submit, cancel, retry --------------------------------------------------------
class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different body."""


class NotCancellable(Exception):
    """The job has already finished."""


class NotRetryable(Exception):
    """Only a failed job can be retried."""


def create_job(
    session: Session,
    *,
    team_id: int,
    spec: dict,
    spec_hash: str,
    queue: str,
    idempotency_key: str | None,
    notify: dict | None = None,
    devices_per_job: int | None = None,
) -> tuple[Job, bool]:
    """Insert a queued job; with an idempotency key, return the existing job instead (created=False).
    ``notify`` ({url, events}) is the job's webhook; ``spec_hash`` covers it (the caller's business)."""
    if idempotency_key is not None:
        existing = _by_key(session, team_id, idempotency_key)
        if existing is not None:
            return _same_body(existing, spec_hash), False
    now = utcnow()
    job = Job(
        id=str(uuid.uuid4()),
        team_id=team_id,
        status=JobStatus.QUEUED,
        spec=spec,
        spec_hash=spec_hash,
        idempotency_key=idempotency_key,
        queue=queue,
        notify=notify,
        devices_per_job=devices_per_job,
        attempts=0,
        cancel_requested=False,
        created_at=now,
        enqueued_at=now,  # the reconciler re-sends it if it is still queued queued_stale_s from now
    )
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
            add_event(session, job.id, "submitted", f"queued on {queue}", queue=queue)
    except IntegrityError:  # a concurrent request with the same key won the race
        existing = _by_key(session, team_id, idempotency_key or "")
        if existing is None:
            raise
        return _same_body(existing, spec_hash), False
    return job, True


def _by_key(session: Session, team_id: int, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.team_id == team_id, Job.idempotency_key == key))


def _same_body(job: Job, spec_hash: str) -> Job:
    if job.spec_hash != spec_hash:
        raise IdempotencyConflict()
    return job


def get_job(session: Session, team_id: int, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.team_id == team_id))


def cancel_job(session: Session, team_id: int, job_id: str) -> Job | None:
    """Queued -> cancelled now; running -> cancel requested (the worker stops at its next step)."""
    now = utcnow()
    base = (Job.id == job_id, Job.team_id == team_id)
    cancelled = session.execute(
        update(Job)
        .where(*base, Job.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.CANCELLED,
            cancel_requested=True,
            finished_at=now,
            error_code=None,
            error_message=None,
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).all()
    changed = len(cancelled)
    if cancelled:
        webhooks.on_finished(session, job_id, JobStatus.CANCELLED.value)
    changed += session.execute(
        update(Job)
        .where(*base, Job.status == JobStatus.RUNNING)
        .values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    ).rowcount
    session.expire_all()
    job = get_job(session, team_id, job_id)
    if job is not None and not changed and job.status in FINISHED:
        raise NotCancellable()
    return job


def retry_job(session: Session, team_id: int, job_id: str) -> Job | None:
    """Queue a failed job again with fresh attempts: the worker re-delivers its kept result if there is one,
    else runs the merge from scratch."""
    now = utcnow()
    changed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.team_id == team_id, Job.status == JobStatus.FAILED)
        .values(
            status=JobStatus.QUEUED,
            attempts=0,
            cancel_requested=False,
            worker_id=None,
            lease_expires_at=None,
            run_after=None,
            enqueued_at=now,
            finished_at=None,
            error_code=None,
            error_message=None,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    session.expire_all()
    job = get_job(session, team_id, job_id)
    if job is None:
        return None
    if not changed:
        raise NotRetryable()
    what = "re-deliver the kept result" if job.kept else "run the merge again"
    add_event(session, job_id, "retry_requested", f"retry requested: {what}", redeliver=bool(job.kept))
    return job


# --- the workers' lease protocol ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    """A worker's hold on a running job; every write is fenced on (worker_id, attempt)."""

    job_id: str
    worker_id: str
    attempt: int

    def fence(self):
        return (
            Job.id == self.job_id,
            Job.worker_id == self.worker_id,
            Job.attempts == self.attempt,
            Job.status == JobStatus.RUNNING,
        )


def claimable(now: datetime):
    """The one rule for "a worker may take this job now": queued and due (a retry's ``run_after`` passed),
    or running with an expired lease (its worker is gone). Used by :func:`claim`, :func:`stale_jobs` and
    :func:`next_claimable`."""
    due = or_(Job.run_after.is_(None), Job.run_after <= now)
    return or_(
        and_(Job.status == JobStatus.QUEUED, due),
        and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now),
    )


def due_in(session: Session, job_id: str) -> float | None:
    """Seconds until a queued job's ``run_after`` (a message that came early waits that long); None if the
    job is not queued or already due."""
    row = session.execute(select(Job.status, Job.run_after).where(Job.id == job_id)).first()
    if row is None or row[0] != JobStatus.QUEUED or row[1] is None:
        return None
    left = (row[1] - utcnow()).total_seconds()
    return left if left > 0 else None


def claim(
    session: Session, job_id: str, worker_id: str, *, lease_s: float, max_attempts: int
) -> Claim | None:
    """Atomically take a job that is :func:`claimable`. None: not claimable now (see :func:`due_in`)."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, claimable(now), Job.attempts < max_attempts, Job.cancel_requested.is_(False))
        .values(
            status=JobStatus.RUNNING,
            attempts=Job.attempts + 1,
            worker_id=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_s),
            started_at=func.coalesce(Job.started_at, now),
            run_after=None,
        )
        .returning(Job.attempts)
        .execution_options(synchronize_session=False)
    ).first()
    if row is not None:
        add_event(
            session,
            job_id,
            "claimed",
            f"attempt {row[0]} on worker {worker_id}",
            worker=worker_id,
            attempt=row[0],
        )
        return Claim(job_id, worker_id, row[0])
    expire_lost(session, max_attempts, job_id=job_id)
    return None


def team_at_capacity(session: Session, job_id: str, cap: int) -> bool:
    """Whether the job's team already has ``cap`` other jobs running with a live lease. On PostgreSQL the
    team's claims are serialised for the rest of the transaction (an advisory lock), so that concurrent
    claims cannot both slip under the cap; call it in the transaction that then claims."""
    team_id = session.scalar(select(Job.team_id).where(Job.id == job_id, Job.status.in_(ACTIVE)))
    if team_id is None:
        return False
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(0x0D1F_0000 + team_id)))
    running = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.team_id == team_id,
            Job.id != job_id,
            Job.status == JobStatus.RUNNING,
            Job.lease_expires_at >= utcnow(),
        )
    )
    return (running or 0) >= cap


def expire_lost(session: Session, max_attempts: int, job_id: str | None = None) -> int:
    """End jobs whose lease expired: cancelled if a cancel was requested, failed (worker_lost) when out of
    attempts. Returns how many rows changed."""
    now = utcnow()
    expired = and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
    scope = (Job.id == job_id,) if job_id else ()
    cancelled = session.execute(
        update(Job)
        .where(expired, Job.cancel_requested.is_(True), *scope)
        .values(status=JobStatus.CANCELLED, finished_at=now, lease_expires_at=None)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).all()
    lost = session.execute(
        update(Job)
        .where(expired, Job.attempts >= max_attempts, *scope)
        .values(
            status=JobStatus.FAILED,
            finished_at=now,
            lease_expires_at=None,
            error_code="worker_lost",
            error_message=f"the worker running this job was lost {max_attempts} time(s)",
        )
        .returning(Job.id, Job.kept)
        .execution_options(synchronize_session=False)
    ).all()
    for (jid,) in cancelled:
        webhooks.on_finished(session, jid, JobStatus.CANCELLED.value)
    for jid, kept in lost:
        webhooks.on_finished(session, jid, JobStatus.FAILED.value, kept=bool(kept))
    return len(cancelled) + len(lost)


def heartbeat(session: Session, c: Claim, lease_s: float) -> tuple[bool, bool]:
    """Extend the lease. Returns (still ours, cancel requested)."""
    row = session.execute(
        update(Job)
        .where(*c.fence())
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False)
    ).first()
    return (row is not None, bool(row[0]) if row else False)


def update_running(session: Session, c: Claim, **values: Any) -> bool:
    """Write progress/resolved/upload on a job we hold. False if we no longer hold it."""
    res = session.execute(
        update(Job).where(*c.fence()).values(**values).execution_options(synchronize_session=False)
    )
    return res.rowcount == 1


def finish(session: Session, c: Claim, status: JobStatus, message: str = "", **values: Any) -> bool:
    """End a claimed job as ``status`` (one of :data:`~divmerge_service.models.FINISHED`)."""
    status = JobStatus(status)
    if not status.finished:
        raise ValueError(f"a job finishes as one of {', '.join(FINISHED)}, not {status!r}")
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(*c.fence())
        .values(status=status, finished_at=now, lease_expires_at=None, **values)
        .returning(Job.kept)
        .execution_options(synchronize_session=False)
    ).first()
    if row is not None:
        add_event(session, c.job_id, status.value, message or status.value, code=values.get("error_code"))
        kept = status == JobStatus.FAILED and bool(row[0])
        webhooks.on_finished(session, c.job_id, status.value, kept=kept)
    return row is not None


def requeue(session: Session, c: Claim, delay_s: float, code: str, message: str) -> bool:
    """Give a job back for a later attempt (transient error)."""
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(*c.fence())
        .values(
            status=JobStatus.QUEUED,
            lease_expires_at=None,
            worker_id=None,
            run_after=now + timedelta(seconds=delay_s),
            enqueued_at=now,
            error_code=code,
            error_message=message,
        )
        .execution_options(synchronize_session=False)
    )
    if res.rowcount == 1:
        add_event(
            session,
            c.job_id,
            "retry",
            f"{code}: {message}; next attempt in {delay_s:.0f}s",
            code=code,
            delay_s=delay_s,
        )
    return res.rowcount == 1


def unclaim(session: Session, c: Claim, *, queue: str, delay_s: float, message: str, **data: Any) -> bool:
    """Give back a job this worker claimed but cannot fit (the claim-time recheck): queued again on
    ``queue`` after ``delay_s``, its attempt **not** counted (``attempts`` back to what it was before the
    claim), with a ``not_placed`` event."""
    now = utcnow()
    values: dict[str, Any] = dict(
        status=JobStatus.QUEUED,
        attempts=c.attempt - 1,
        queue=queue,
        lease_expires_at=None,
        worker_id=None,
        run_after=now + timedelta(seconds=delay_s),
        enqueued_at=now,
    )
    if c.attempt == 1:
        values["started_at"] = None  # it never started (max_job_s counts from a real start)
    res = session.execute(
        update(Job).where(*c.fence()).values(**values).execution_options(synchronize_session=False)
    )
    if res.rowcount == 1:
        add_event(session, c.job_id, "not_placed", message, worker=c.worker_id, queue=queue, **data)
    return res.rowcount == 1


def times_not_placed(session: Session, job_id: str) -> int:
    """How often workers gave the job back because it did not fit them (:func:`unclaim`)."""
    return (
        session.scalar(
            select(func.count())
            .select_from(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.kind == "not_placed")
        )
        or 0
    )


def load(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def stale_jobs(session: Session, *, queued_stale_s: float, max_attempts: int) -> list[tuple[str, str]]:
    """Jobs a reconciler should enqueue again: queued too long (message lost) or lease expired (worker lost).
    Marks them re-enqueued now so that concurrent reconcilers do not pile up duplicates."""
    expire_lost(session, max_attempts)
    now = utcnow()
    old = now - timedelta(seconds=queued_stale_s)
    # not sent since it became claimable: never, too long ago, or (worker lost) before its lease ran out
    unsent = or_(
        Job.enqueued_at.is_(None),
        Job.enqueued_at < old,
        and_(Job.status == JobStatus.RUNNING, Job.enqueued_at < Job.lease_expires_at),
    )
    rows = session.execute(
        update(Job)
        .where(claimable(now), unsent)
        .values(enqueued_at=now)
        .returning(Job.id, Job.queue)
        .execution_options(synchronize_session=False)
    ).all()
    return [(r[0], r[1]) for r in rows]


def next_claimable(session: Session) -> str | None:
    """Embedded worker: the oldest job that can run now."""
    return session.scalar(select(Job.id).where(claimable(utcnow())).order_by(Job.created_at).limit(1))


def expired_kept(session: Session) -> list[str]:
    """Kept results past their time: the paths to delete. Clears them from their jobs.

    A job queued or running again (``POST /retry``) is delivering its kept result, which must not be
    deleted under it: only a finished job's kept result expires.
    """
    now = utcnow()
    rows = session.execute(
        select(Job.id, Job.kept).where(Job.kept.is_not(None), Job.status.not_in(ACTIVE))
    ).all()
    paths = []
    for job_id, kept in rows:
        if kept and datetime.fromisoformat(kept["until"]) <= now:
            paths.append(kept["path"])
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(kept=null())
                .execution_options(synchronize_session=False)
            )
            add_event(session, job_id, "kept_expired", "the kept result was deleted (keep_result_s passed)")
    return paths
