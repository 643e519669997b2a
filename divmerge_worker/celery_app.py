"""The Celery worker app: ``celery -A divmerge_worker.celery_app worker -Q gpu,cpu --concurrency 1``.

Broker options come from :func:`divmerge_service.queue.celery_config` (acks late, reject on worker lost, prefetch 1,
visibility timeout longer than the longest job). Each worker process also runs the reconciler thread and the
webhook deliverer thread (:mod:`divmerge_worker.webhooks`).
"""

from __future__ import annotations

import logging
import threading

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down

from divmerge_service.config import get_settings
from divmerge_service.queue import celery_config

from . import bookkeeping, reconciler, webhooks

settings = get_settings()
app = Celery("divmerge-worker", include=["divmerge_worker.tasks"])
app.conf.update(celery_config(settings))

log = logging.getLogger("divmerge.worker")


@worker_ready.connect
def _start_reconciler(**_kw) -> None:
    reconciler.start(settings)
    webhooks.start(settings)
    # import the engine (torch, transformers) now rather than in the first job
    threading.Thread(target=lambda: __import__("divmerge_core.pipeline"), daemon=True).start()


@worker_shutting_down.connect
def _stop_reconciler(**_kw) -> None:
    reconciler.stop()
    webhooks.stop()
    bookkeeping.shutting_down.set()  # a task waiting for the database gives its message back
