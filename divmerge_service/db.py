"""Database engine and sessions (PostgreSQL in production, SQLite when embedded)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # several processes share the file: WAL + busy wait
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


#: Errors that mean "the database cannot be reached right now" (down, restarting, connection lost, pool
#: exhausted), as opposed to a bad query: the API answers 503 and workers wait and retry.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError, PoolTimeout)


def is_unavailable(err: BaseException) -> bool:
    if isinstance(err, UNAVAILABLE_ERRORS):
        return True
    return isinstance(err, DBAPIError) and bool(err.connection_invalidated)


@lru_cache(maxsize=8)
def _factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


def new_session(url: str) -> Session:
    """A session of the database at ``url`` (the caller commits and closes it; see :func:`session_scope`)."""
    return _factory(url)()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = _factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str, script_location: str):
    """Alembic's configuration, built in code (no alembic.ini needed): the migrations ship inside this
    package (``divmerge_service/migrations``), so an installed wheel can migrate from any directory."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", script_location)
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logging"] = False
    return cfg


def migrate(url: str) -> None:
    """Bring the schema to the newest Alembic revision (used by ``serve`` in embedded mode and by tests)."""
    from importlib.resources import as_file, files
    from pathlib import Path

    from alembic import command

    with as_file(files(__package__) / "migrations") as location:
        cfg = alembic_config(url, str(location))
        database = make_url(url).database if url.startswith("sqlite") else None
        if (
            not database or database == ":memory:"
        ):  # PostgreSQL: Alembic's own transaction (and the migrate job of the topology)
            command.upgrade(cfg, "head")
            return
        # SQLite (embedded): `divmerge serve` and `divmerge token create` may migrate a fresh home at the
        # same moment; an exclusive file lock makes the second wait and then find the schema at head.
        import fcntl

        Path(database).parent.mkdir(parents=True, exist_ok=True)
        with open(f"{database}.migrate.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            command.upgrade(cfg, "head")
