"""Re-enqueue jobs Redis lost: queued longer than ``queued_stale_s``, or running with an expired lease.

Jobs are sent with :func:`divmerge_service.queue.enqueue`, the one place tasks are sent from. Runs as a daemon thread in every worker process, every ``reconcile_interval_s``. Postgres is the source of
truth, so duplicates are harmless: a message for a job that is running (live lease) or finished is dropped.
It also ends jobs whose lease expired once they are out of attempts (``worker_lost``) and deletes kept
results past ``keep_result_s``.
"""

from __future__ import annotations

import logging
import threading

from divmerge_service import jobs
from divmerge_service.config import Settings
from divmerge_service.db import session_scope
from divmerge_service.queue import enqueue

from .runner import purge_kept

log = logging.getLogger("divmerge.reconciler")
_stop = threading.Event()


def reconcile_once(settings: Settings) -> int:
    with session_scope(settings.db_url) as s:
        stale = jobs.stale_jobs(s, queued_stale_s=settings.queued_stale_s, max_attempts=settings.max_attempts)
    for job_id, queue in stale:
        if enqueue(settings, job_id, queue):
            log.info("reconciler: re-enqueued job %s on %s", job_id, queue)
    purge_kept(settings)
    return len(stale)


def _loop(settings: Settings) -> None:
    while not _stop.wait(settings.reconcile_interval_s):
        try:
            reconcile_once(settings)
        except Exception as err:  # noqa: BLE001 - broker or DB down: try again next round
            log.warning("reconciler round failed: %s", type(err).__name__)


def start(settings: Settings) -> threading.Thread:
    _stop.clear()
    t = threading.Thread(target=_loop, args=(settings,), name="divmerge-reconciler", daemon=True)
    t.start()
    return t


def stop() -> None:
    _stop.set()
