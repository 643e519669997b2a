"""The producer side of the queue: a Celery app the API uses to send tasks by name (it never imports worker).

The worker builds its own app from :func:`celery_config`, so both agree on broker options.
"""

from __future__ import annotations

import logging

from celery import Celery

from .config import Settings

log = logging.getLogger("divmerge.queue")

TASK_NAME = "divmerge.run_merge"


def celery_config(settings: Settings) -> dict:
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_connect_timeout": 3,
        },
        "broker_connection_retry_on_startup": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": settings.gpu_queue,
        "worker_hijack_root_logger": False,
    }


_producers: dict[tuple, Celery] = {}


def producer(settings: Settings) -> Celery:
    key = (settings.broker_url, settings.visibility_timeout_s, settings.gpu_queue)
    if key not in _producers:
        app = Celery("divmerge-api", set_as_current=False)
        app.conf.update(celery_config(settings))
        _producers[key] = app
    return _producers[key]


def enqueue(settings: Settings, job_id: str, queue: str, countdown: float | None = None) -> bool:
    """Send ``divmerge.run_merge(job_id)``: the one place tasks are sent from (the API on submit and retry,
    the worker's retry after a transient error, the reconciler). False if the broker is unreachable: the
    job stays queued in the database and a worker's reconciler enqueues it again later."""
    if settings.embedded:
        return True  # the embedded worker polls the database
    try:
        producer(settings).send_task(
            TASK_NAME,
            args=[job_id],
            queue=queue,
            countdown=countdown,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1},
        )
        return True
    except Exception as err:  # noqa: BLE001 - any broker failure leaves the job to the reconciler
        log.warning("could not enqueue job %s: %s", job_id, type(err).__name__)
        return False
