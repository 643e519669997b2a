"""The job store: every state change of a job is one conditional UPDATE here (API and workers share it)."""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .models import FINISHED, Job, utcnow


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different body."""


class NotCancellable(Exception):
    """The job has already finished."""


# ---------------------------------------------------------------- API side


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
        status="queued",
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
        .where(*base, Job.status == "queued")
        .values(
            status="cancelled", cancel_requested=True, finished_at=now, error_code=None, error_message=None
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    changed += session.execute(
        update(Job)
        .where(*base, Job.status == "running")
        .values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    ).rowcount
    session.expire_all()
    job = get_job(session, team_id, job_id)
    if job is not None and not changed and job.status in FINISHED:
        raise NotCancellable()
    return job


def count_by_status(session: Session) -> dict[str, int]:
    return dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())


def queued_by_queue(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.queue, func.count()).where(Job.status == "queued").group_by(Job.queue))
    return dict(rows.all())


def recent_durations(session: Session, since: datetime, limit: int = 10_000) -> list[tuple[str, float]]:
    rows = session.execute(
        select(Job.status, Job.started_at, Job.finished_at)
        .where(Job.finished_at >= since, Job.started_at.is_not(None))
        .order_by(Job.finished_at.desc())
        .limit(limit)
    ).all()
    return [(s, (f - b).total_seconds()) for s, b, f in rows]


# ---------------------------------------------------------------- worker side


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
            Job.status == "running",
        )


def claim(
    session: Session, job_id: str, worker_id: str, *, lease_s: float, max_attempts: int
) -> Claim | None:
    """Atomically take a queued job, or a running one whose lease expired. None: drop the message."""
    now = utcnow()
    claimable = or_(Job.status == "queued", and_(Job.status == "running", Job.lease_expires_at < now))
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, claimable, Job.attempts < max_attempts, Job.cancel_requested.is_(False))
        .values(
            status="running",
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
        return Claim(job_id, worker_id, row[0])
    expire_lost(session, max_attempts, job_id=job_id)
    return None


def team_at_capacity(session: Session, job_id: str, cap: int) -> bool:
    """Whether the job's team already has ``cap`` other jobs running with a live lease. On PostgreSQL the
    team's claims are serialised for the rest of the transaction (an advisory lock), so that concurrent
    claims cannot both slip under the cap; call it in the transaction that then claims."""
    team_id = session.scalar(
        select(Job.team_id).where(Job.id == job_id, Job.status.in_(("queued", "running")))
    )
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
            Job.status == "running",
            Job.lease_expires_at >= utcnow(),
        )
    )
    return (running or 0) >= cap


def expire_lost(session: Session, max_attempts: int, job_id: str | None = None) -> int:
    """End jobs whose lease expired: cancelled if a cancel was requested, failed (worker_lost) when out of
    attempts. Returns how many rows changed."""
    now = utcnow()
    expired = and_(Job.status == "running", Job.lease_expires_at < now)
    scope = (Job.id == job_id,) if job_id else ()
    n = session.execute(
        update(Job)
        .where(expired, Job.cancel_requested.is_(True), *scope)
        .values(status="cancelled", finished_at=now, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    n += session.execute(
        update(Job)
        .where(expired, Job.attempts >= max_attempts, *scope)
        .values(
            status="failed",
            finished_at=now,
            lease_expires_at=None,
            error_code="worker_lost",
            error_message=f"the worker running this job was lost {max_attempts} time(s)",
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    return n


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


def finish(session: Session, c: Claim, status: str, **values: Any) -> bool:
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(*c.fence())
        .values(status=status, finished_at=now, lease_expires_at=None, **values)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1


def requeue(session: Session, c: Claim, delay_s: float, code: str, message: str) -> bool:
    """Give a job back for a later attempt (transient error)."""
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(*c.fence())
        .values(
            status="queued",
            lease_expires_at=None,
            worker_id=None,
            run_after=now + timedelta(seconds=delay_s),
            enqueued_at=now,
            error_code=code,
            error_message=message,
        )
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1


def load(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def stale_jobs(session: Session, *, queued_stale_s: float, max_attempts: int) -> list[tuple[str, str]]:
    """Jobs a reconciler should enqueue again: queued too long (message lost) or lease expired (worker lost).
    Marks them re-enqueued now so that concurrent reconcilers do not pile up duplicates."""
    expire_lost(session, max_attempts)
    now = utcnow()
    old = now - timedelta(seconds=queued_stale_s)
    due = or_(Job.run_after.is_(None), Job.run_after <= now)
    queued = and_(Job.status == "queued", due, or_(Job.enqueued_at.is_(None), Job.enqueued_at < old))
    lost = and_(
        Job.status == "running",
        Job.lease_expires_at < now,
        or_(Job.enqueued_at.is_(None), Job.enqueued_at < Job.lease_expires_at, Job.enqueued_at < old),
    )
    rows = session.execute(
        update(Job)
        .where(or_(queued, lost))
        .values(enqueued_at=now)
        .returning(Job.id, Job.queue)
        .execution_options(synchronize_session=False)
    ).all()
    return [(r[0], r[1]) for r in rows]


def next_claimable(session: Session) -> str | None:
    """Embedded worker: the oldest job that can run now."""
    now = utcnow()
    due = or_(Job.run_after.is_(None), Job.run_after <= now)
    return session.scalar(
        select(Job.id)
        .where(
            or_(and_(Job.status == "queued", due), and_(Job.status == "running", Job.lease_expires_at < now))
        )
        .order_by(Job.created_at)
        .limit(1)
    )
