"""The Celery worker app: ``celery -A divmerge_worker.celery_app worker -Q gpu,cpu --concurrency 1``.

Broker options come from :func:`divmerge_service.queue.celery_config` (acks late, reject on worker lost, prefetch 1,
visibility timeout longer than the longest job). Each worker process also runs the reconciler thread, the
webhook deliverer thread (:mod:`divmerge_worker.webhooks`) and the capacity heartbeat
(:mod:`divmerge_worker.capacity`: its devices and memory in the ``workers`` table; with ``dispatch: capability``
it also consumes its class queues).
"""

from __future__ import annotations

import logging
import threading

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down

from divmerge_service.config import get_settings
from divmerge_service.queue import celery_config

from . import bookkeeping, capacity, reconciler, webhooks

settings = get_settings()
app = Celery("divmerge-worker", include=["divmerge_worker.tasks"])
app.conf.update(celery_config(settings))

log = logging.getLogger("divmerge.worker")


_heartbeat: capacity.Heartbeat | None = None


@worker_ready.connect
def _start_reconciler(sender=None, **_kw) -> None:
    global _heartbeat
    reconciler.start(settings)
    webhooks.start(settings)
    try:  # sender: the worker's consumer (its node name, the queues it was started with)
        queues = [q.name for q in sender.task_consumer.queues]
        name = sender.hostname

        def later(q: str) -> None:  # from the heartbeat thread: a control message to this worker only
            app.control.add_consumer(q, destination=[name], reply=False)

        _heartbeat = capacity.Heartbeat(settings, name, queues, sender.add_task_queue, later).start()
    except Exception:  # noqa: BLE001 - a worker that cannot report itself still runs jobs
        log.exception("the capacity heartbeat did not start")
    # import the engine (torch, transformers) now rather than in the first job
    threading.Thread(target=lambda: __import__("divmerge_core.pipeline"), daemon=True).start()


@worker_shutting_down.connect
def _stop_reconciler(**_kw) -> None:
    reconciler.stop()
    webhooks.stop()
    if _heartbeat is not None:
        _heartbeat.stop()
    bookkeeping.shutting_down.set()  # a task waiting for the database gives its message back
