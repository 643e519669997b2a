"""The API's side of the job store: create, read, list, cancel and retry a team's jobs, and the metrics'
counts. Each state change is one conditional UPDATE; the workers' side is :mod:`service_core.jobs`."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service_core.jobs import add_event
from service_core.models import FINISHED, Job, JobStatus, utcnow


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different body."""


class NotCancellable(Exception):
    """The job has already finished."""


class NotRetryable(Exception):
    """Only a failed job can be retried."""


def create_job(
    session: Session, *, team_id: int, spec: dict, spec_hash: str, queue: str, idempotency_key: str | None
) -> tuple[Job, bool]:
    """Insert a queued job; with an idempotency key, return the existing job instead (created=False)."""
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


def encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Raises ValueError on a malformed cursor."""
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    stamp, _, job_id = raw.partition("|")
    if not job_id:
        raise ValueError("bad cursor")
    return datetime.fromisoformat(stamp), job_id


def list_jobs(
    session: Session, team_id: int, *, status: str | None, limit: int, cursor: str | None
) -> tuple[list[Job], str | None]:
    """Newest first; returns the page and the cursor of the next one (None at the end)."""
    q = select(Job).where(Job.team_id == team_id)
    if status:
        q = q.where(Job.status == status)
    if cursor:
        stamp, job_id = decode_cursor(cursor)
        q = q.where(or_(Job.created_at < stamp, and_(Job.created_at == stamp, Job.id < job_id)))
    rows = list(session.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    nxt = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], nxt


def cancel_job(session: Session, team_id: int, job_id: str) -> Job | None:
    """Queued -> cancelled now; running -> cancel requested (the worker stops at its next step)."""
    now = utcnow()
    base = (Job.id == job_id, Job.team_id == team_id)
    changed = session.execute(
        update(Job)
        .where(*base, Job.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.CANCELLED,
            cancel_requested=True,
            finished_at=now,
            error_code=None,
            error_message=None,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
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


def count_by_status(session: Session) -> dict[str, int]:
    return dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())


def queued_by_queue(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(Job.queue, func.count()).where(Job.status == JobStatus.QUEUED).group_by(Job.queue)
    )
    return dict(rows.all())


def recent_durations(session: Session, since: datetime, limit: int = 10_000) -> list[tuple[str, float]]:
    rows = session.execute(
        select(Job.status, Job.started_at, Job.finished_at)
        .where(Job.finished_at >= since, Job.started_at.is_not(None))
        .order_by(Job.finished_at.desc())
        .limit(limit)
    ).all()
    return [(s, (f - b).total_seconds()) for s, b, f in rows]
