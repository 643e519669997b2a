"""What the API and the workers share: settings, the database (engine, sessions, migrations), the tables,
the job store's lease protocol and history (:mod:`divmerge_service.jobs`) and the queue producer. ``divmerge_api/`` holds
the HTTP app, ``divmerge_worker/`` the runner; neither imports the other."""
