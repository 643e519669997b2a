"""The Celery task. It only carries a job id: everything else is in the database."""

from __future__ import annotations

from api import crud
from api.db import session_scope
from api.queue import TASK_NAME, enqueue

from .celery_app import app, settings
from .runner import new_worker_id, run_job

WORKER_ID = new_worker_id()


@app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_merge(job_id: str) -> str:
    outcome = run_job(job_id, settings, WORKER_ID)
    if outcome.status == "retry":
        with session_scope(settings.db_url) as s:
            job = crud.load(s, job_id)
            queue = job.queue if job else settings.gpu_queue
        enqueue(settings, job_id, queue, countdown=outcome.retry_in)
    return outcome.status
