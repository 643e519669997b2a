"""What the API and the workers share: settings, the database (engine, sessions, migrations), the tables,
the job store's lease protocol and history (:mod:`divmerge_service.jobs`), the queue producer and the typed
contracts of the progress and result blobs the workers write and the API reads
(:mod:`divmerge_service.contracts`). ``divmerge_api/`` holds the HTTP app, ``divmerge_worker/`` the runner;
neither imports the other, and this package imports neither."""
