"""Workers: the Celery task, the job runner shared with the embedded worker, delivery and the reconciler."""
