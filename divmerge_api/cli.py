"""``divmerge serve`` and ``divmerge token create|revoke`` (registered as ``divmerge.commands`` plugins;
every token change is audited, by ``cli``)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from divmerge_service.config import Settings, get_settings

# The database and web modules are imported inside the commands: these subcommands are registered on every
# ``divmerge`` invocation (``divmerge merge`` included), which should not pay for importing them.


def _prepare_db(settings: Settings) -> None:
    """The embedded SQLite database is created and migrated on first use; PostgreSQL is migrated by
    ``alembic upgrade head`` (the compose file's ``migrate`` service)."""
    from divmerge_service.db import migrate

    if settings.db_url.startswith("sqlite"):
        settings.home.mkdir(parents=True, exist_ok=True)
        migrate(settings.db_url)


def _die_with_parent() -> None:
    """Linux: the embedded worker gets SIGTERM when the server dies, however it dies (uvicorn re-raises
    SIGTERM after its graceful shutdown, which skips our ``finally``)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # elsewhere the worker notices its parent is gone at its next poll


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .main import create_app

    settings = get_settings()
    _prepare_db(settings)
    worker = None
    if settings.embedded and not args.no_worker:
        # a separate process, launched by module name: the API process never imports torch or worker code
        worker = subprocess.Popen(
            [sys.executable, "-m", "divmerge_worker.embedded"],
            env=os.environ.copy(),
            preexec_fn=_die_with_parent,
        )
        print(f"divmerge: embedded worker started (pid {worker.pid}); database {settings.db_url}", flush=True)
    try:
        uvicorn.run(
            create_app(settings),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            server_header=False,  # no "server: uvicorn" banner
        )
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def _token_scopes(args: argparse.Namespace) -> tuple[str, ...]:
    """``--scopes read,submit`` (the default), plus ``admin`` with ``--admin``."""
    from .security import DEFAULT_SCOPES, normalise_scopes

    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()] if args.scopes else list(DEFAULT_SCOPES)
    if args.admin:
        scopes.append("admin")
    return normalise_scopes(scopes)


def cmd_token_create(args: argparse.Namespace) -> int:
    from divmerge_service.db import session_scope

    from .schemas import MAX_EXPIRES_IN_S
    from .security import create_token, valid_team_name

    if not valid_team_name(args.team):
        print("divmerge: --team: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        scopes = _token_scopes(args)
    except ValueError as err:
        print(f"divmerge: --scopes: {err} (known: read, submit, admin)", file=sys.stderr)
        return 2
    if args.expires_in_s is not None and not 60 <= args.expires_in_s <= MAX_EXPIRES_IN_S:
        print(f"divmerge: --expires-in-s: between 60 and {MAX_EXPIRES_IN_S}", file=sys.stderr)
        return 2
    settings = get_settings()
    _prepare_db(settings)
    with session_scope(settings.db_url) as s:
        row, plaintext = create_token(s, args.team, scopes, args.expires_in_s)
        token_id, expires_at = row.id, row.expires_at
    print(f"team: {args.team}")
    print(f"scopes: {','.join(scopes)}")
    print(f"expires: {expires_at.isoformat() if expires_at else 'never'}")
    print(f"token id: {token_id} (use it to revoke; the token below is shown only once)")
    print(plaintext)
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from divmerge_service.db import session_scope

    from .security import revoke_token

    settings = get_settings()
    _prepare_db(settings)
    with session_scope(settings.db_url) as s:
        row = revoke_token(s, args.token)
        token_id = row.id if row else None
    if token_id is None:
        print("divmerge: no such token", file=sys.stderr)
        return 1
    print(f"revoked {token_id}")
    return 0


def register_serve(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the merge service (API + embedded worker by default)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    p.add_argument("--no-worker", action="store_true", help="embedded mode: do not start the embedded worker")
    p.set_defaults(func=cmd_serve)


def register_token(subparsers) -> None:
    p = subparsers.add_parser("token", help="create or revoke API tokens (admin)")
    sub = p.add_subparsers(dest="token_command", required=True)
    c = sub.add_parser("create", help="create a token for a team (the team is created if new)")
    c.add_argument("--team", required=True)
    c.add_argument(
        "--scopes", default=None, help="comma-separated: read, submit, admin (default: read,submit)"
    )
    c.add_argument("--admin", action="store_true", help="add the admin scope (the /v1/admin routes)")
    c.add_argument(
        "--expires-in-s", type=int, default=None, help="lifetime in seconds (default: never expires)"
    )
    c.set_defaults(func=cmd_token_create)
    r = sub.add_parser("revoke", help="revoke a token, given the token itself or its id")
    r.add_argument("token", metavar="TOKEN_OR_ID")
    r.set_defaults(func=cmd_token_revoke)


def main(argv: list[str] | None = None) -> int:
    """``python -m divmerge_api.cli ...``: the same commands without the engine's CLI."""
    parser = argparse.ArgumentParser(prog="divmerge")
    sub = parser.add_subparsers(dest="command", required=True)
    register_serve(sub)
    register_token(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
