"""The embedded worker (``divmerge serve`` with no broker): one process polling the database for jobs,
running them one at a time with the same runner as the Celery task. ``python -m divmerge_worker.embedded``."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from divmerge_service import jobs
from divmerge_service.config import Settings, get_settings
from divmerge_service.db import session_scope

from . import capacity, webhooks
from .runner import new_worker_id, purge_kept, run_job

log = logging.getLogger("divmerge.embedded")


def serve_forever(settings: Settings, stop: threading.Event) -> None:
    worker_id = new_worker_id()
    parent = os.getppid()
    log.info("embedded worker %s polling %s", worker_id, settings.db_url)
    webhooks.start(settings, stop)  # the outbox's deliverer, stopped with the worker
    try:  # its devices and memory, for GET /v1/workers (it polls the database: no queue)
        heartbeat = capacity.Heartbeat(settings, f"embedded@{worker_id}", ["embedded"]).start()
    except Exception as err:  # noqa: BLE001 - a worker that cannot report itself still runs jobs
        log.warning("the capacity heartbeat did not start: %s", type(err).__name__)
        heartbeat = None
    purged_at = float("-inf")
    while not stop.is_set():
        if os.getppid() != parent:  # the server that started us is gone
            break
        try:
            with session_scope(settings.db_url) as s:
                jobs.expire_lost(s, settings.max_attempts)
                job_id = jobs.next_claimable(s)
            if time.monotonic() - purged_at >= settings.reconcile_interval_s:  # as often as the reconciler
                purge_kept(settings)
                purged_at = time.monotonic()
            if job_id is not None and run_job(job_id, settings, worker_id).status != "retry":
                continue  # next job at once; a job put back (its team at capacity) waits for the next poll
        except Exception as err:  # noqa: BLE001 - keep polling
            log.warning("embedded worker round failed: %s", type(err).__name__)
        stop.wait(settings.embedded_poll_s)
    if heartbeat is not None:
        heartbeat.stop()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    serve_forever(get_settings(), stop)


if __name__ == "__main__":
    main()
