"""Re-enqueue jobs Redis lost: queued longer than ``queued_stale_s``, or running with an expired lease.

Runs as a daemon thread in every worker process, every ``reconcile_interval_s``. Postgres is the source of
truth, so duplicates are harmless: a message for a job that is running (live lease) or finished is dropped.
It also ends jobs whose lease expired once they are out of attempts (``worker_lost``).
"""

from __future__ import annotations

import logging
import threading

from celery import Celery

from api import crud
from api.core.config import Settings
from api.db import session_scope
from api.queue import TASK_NAME

log = logging.getLogger("divmerge.reconciler")
_stop = threading.Event()


def reconcile_once(settings: Settings, app: Celery) -> int:
    with session_scope(settings.db_url) as s:
        stale = crud.stale_jobs(s, queued_stale_s=settings.queued_stale_s, max_attempts=settings.max_attempts)
    for job_id, queue in stale:
        app.send_task(TASK_NAME, args=[job_id], queue=queue)
        log.info("reconciler: re-enqueued job %s on %s", job_id, queue)
    return len(stale)


def _loop(settings: Settings, app: Celery) -> None:
    while not _stop.wait(settings.reconcile_interval_s):
        try:
            reconcile_once(settings, app)
        except Exception as err:  # noqa: BLE001 - broker or DB down: try again next round
            log.warning("reconciler round failed: %s", type(err).__name__)


def start(settings: Settings, app: Celery) -> threading.Thread:
    _stop.clear()
    t = threading.Thread(target=_loop, args=(settings, app), name="divmerge-reconciler", daemon=True)
    t.start()
    return t


def stop() -> None:
    _stop.set()
