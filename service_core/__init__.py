"""What the API and the workers share: settings, the database (engine, sessions, migrations), the tables,
the job store's lease protocol and history (:mod:`service_core.jobs`) and the queue producer. ``api/`` holds
the HTTP app, ``worker/`` the runner; neither imports the other."""
