"""The API's reads of the job store: a team's jobs (one, or a page of them), the workers' progress and
result blobs read through their contracts, and the metrics' counts. Every job transition (submit, cancel,
retry, and the workers' claims and writes) is in :mod:`divmerge_service.jobs`."""

from __future__ import annotations

import base64
import logging
import threading
from datetime import datetime
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from divmerge_service.contracts import JobProgress, JobResult
from divmerge_service.jobs import get_job
from divmerge_service.models import Job, JobStatus

__all__ = [
    "MalformedBlob",
    "count_by_status",
    "decode_cursor",
    "encode_cursor",
    "get_job",
    "list_jobs",
    "queued_by_queue",
    "stored_progress",
    "stored_result",
]

log = logging.getLogger("divmerge.api")
M = TypeVar("M", bound=BaseModel)


class MalformedBlob(ValueError):
    """A job's stored JSON column does not validate as its contract (:mod:`divmerge_service.contracts`)."""

    def __init__(self, job_id: str, column: str, error: ValidationError):
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        super().__init__(
            f"job {job_id}: its stored {column} does not validate as {error.title} "
            f"({error.error_count()} error(s); first at {where}: {first['msg']})"
        )
        self.job_id, self.column = job_id, column


#: (job id, column) already warned about: a dashboard polling a broken job logs it once per process.
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def _read(job: Job, column: str, model: type[M]) -> M | None:
    """``model.model_validate`` of the job's ``column`` (None when empty); :class:`MalformedBlob` if it does
    not validate, logged as a warning (once per job and column)."""
    raw = getattr(job, column)
    if raw is None:
        return None
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        bad = MalformedBlob(job.id, column, err)
        with _warned_lock:
            first = (job.id, column) not in _warned
            if first and len(_warned) < 10_000:
                _warned.add((job.id, column))
        if first:
            log.warning("%s", bad)
        raise bad from None


def stored_progress(job: Job) -> JobProgress | None:
    """The worker's last progress write (:class:`~divmerge_service.contracts.JobProgress`), or None.
    Raises :class:`MalformedBlob` (logged) if the stored blob does not validate."""
    return _read(job, "progress", JobProgress)


def stored_result(job: Job) -> JobResult | None:
    """The worker's result (:class:`~divmerge_service.contracts.JobResult`; old-shape blobs with a flat
    ``destination`` string validate too), or None. Raises :class:`MalformedBlob` (logged) if it does not
    validate."""
    return _read(job, "result", JobResult)


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
