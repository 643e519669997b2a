"""The HTTP service: FastAPI app, settings, database, job store and the queue producer (no torch here)."""
