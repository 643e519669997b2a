"""The Celery task. It only carries a job id: everything else is in the database."""

from __future__ import annotations

from celery.exceptions import Reject

from divmerge_service import jobs
from divmerge_service.queue import TASK_NAME, enqueue

from .bookkeeping import DatabaseUnavailable, with_db
from .celery_app import app, settings
from .runner import new_worker_id, run_job

WORKER_ID = new_worker_id()


@app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_merge(job_id: str) -> str:
    """Run one job. A database outage never costs the message: the claim waits for the database
    (``db_wait_s``), and if it is still down the message goes back to the queue unacknowledged."""
    try:
        outcome = run_job(job_id, settings, WORKER_ID)
    except DatabaseUnavailable:
        raise Reject("the database is unavailable", requeue=True) from None
    if outcome.status == "retry":

        def queue_of(s):
            job = jobs.load(s, job_id)
            return job.queue if job else settings.gpu_queue

        try:
            queue = with_db(settings, f"job {job_id}: requeue", queue_of, None)
        except Exception:  # noqa: BLE001 - the reconciler re-sends the job once it is due
            return outcome.status
        enqueue(settings, job_id, queue, countdown=outcome.retry_in)
    return outcome.status
