"""A worker's database writes through a database outage, and the journal that keeps a delivered merge.

PostgreSQL going away for a while must neither lose queued work nor redo finished work:

* :func:`with_db` runs one transaction, and while the database is unreachable (connection refused or lost,
  pool exhausted) waits and tries again, backing off up to ``db_retry_max_s``, until a deadline. A claim
  waits up to ``db_wait_s`` (the message stays with this worker meanwhile, unacknowledged); the writes of a
  claimed job wait until its lease would expire (after that another worker may take the job over).
* Once a merge is delivered, its outcome is written to a journal file (``$DIVMERGE_HOME/delivered/<job>``)
  before the database is told. If that write cannot be made, the next attempt of the job finds the journal
  and records the delivery without merging again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy.orm import Session

from divmerge_service.config import Settings
from divmerge_service.contracts import JobResult
from divmerge_service.db import is_unavailable, session_scope

log = logging.getLogger("divmerge.worker")
T = TypeVar("T")


class DatabaseUnavailable(Exception):
    """The database stayed unreachable until the deadline of the write (or the worker is shutting down)."""


#: Set when the worker is asked to stop: waits for the database end at once (the message goes back).
shutting_down = threading.Event()


def with_db(settings: Settings, what: str, fn: Callable[[Session], T], until: float | None) -> T:
    """``fn(session)`` in one transaction, retried while the database is unreachable until the monotonic
    time ``until`` (None: retry forever). Other database errors are raised at once."""
    delay = 0.25
    while True:
        try:
            with session_scope(settings.db_url) as s:
                return fn(s)
        except Exception as err:
            if not is_unavailable(err):
                raise
            if (until is not None and time.monotonic() + delay > until) or shutting_down.is_set():
                raise DatabaseUnavailable(f"{what}: the database is unavailable") from err
            log.warning("%s: database unavailable (%s); retrying in %.2fs", what, type(err).__name__, delay)
            shutting_down.wait(delay)
            delay = min(delay * 2, settings.db_retry_max_s)


def journal_path(settings: Settings, job_id: str) -> Path:
    return settings.home / "delivered" / f"{job_id}.json"


class DeliveryJournal(BaseModel):
    """A delivered job's outcome, as the journal file holds it: its result (with its destination), the
    commit SHAs of its references and its losses. Journals of older workers (a flat ``destination`` string in
    ``result``, an ``upload`` and a ``kept`` key) still load."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    result: JobResult
    resolved: dict[str, str | None] | None = None
    losses: list[float] | None = None

    def columns(self) -> dict[str, Any]:
        """The job row's final column values (``resolved`` and ``losses`` only when known)."""
        dest = self.result.destination
        values: dict[str, Any] = {
            "result": self.result.model_dump(mode="json"),
            "upload": dest.model_dump(mode="json") if dest is not None else None,
            "kept": None,
        }
        if self.resolved is not None:
            values["resolved"] = dict(self.resolved)
        if self.losses:
            values["losses"] = list(self.losses)
        return values


def save_delivery(settings: Settings, job_id: str, journal: DeliveryJournal) -> None:
    """Record a delivered job's outcome (atomically: a reader sees all or nothing)."""
    path = journal_path(settings, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(journal.model_dump(mode="json")), encoding="utf-8")
    os.replace(tmp, path)


def load_delivery(settings: Settings, job_id: str) -> DeliveryJournal | None:
    """The journal of an earlier attempt's delivery, or None (none, or unreadable: it is logged)."""
    try:
        raw = json.loads(journal_path(settings, job_id).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("job %s: the delivery journal cannot be read (%s); ignored", job_id, err)
        return None
    try:
        return DeliveryJournal.model_validate(raw)
    except ValidationError as err:
        log.warning("job %s: the delivery journal does not validate (%s); ignored", job_id, err)
        return None


def drop_delivery(settings: Settings, job_id: str) -> None:
    journal_path(settings, job_id).unlink(missing_ok=True)
