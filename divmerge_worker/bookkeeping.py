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

from sqlalchemy.orm import Session

from divmerge_service.config import Settings
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


def save_delivery(settings: Settings, job_id: str, values: dict[str, Any]) -> None:
    """Record a delivered job's final column values (atomically: a reader sees all or nothing)."""
    path = journal_path(settings, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values), encoding="utf-8")
    os.replace(tmp, path)


def load_delivery(settings: Settings, job_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(journal_path(settings, job_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def drop_delivery(settings: Settings, job_id: str) -> None:
    journal_path(settings, job_id).unlink(missing_ok=True)
