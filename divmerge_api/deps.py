"""FastAPI dependencies, as in the FastAPI full-stack template: the settings, one database session per
request, and the caller (whose token is looked up in that same session).

A handler commits what it writes itself, before any side effect that another process may act on (the task
sent to the workers, say); whatever is left uncommitted when the request ends is rolled back.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy.orm import Session

from divmerge_service.config import Settings
from divmerge_service.db import new_session

from .errors import ApiError
from .security import AuthError, Caller, authenticate, bearer


def request_settings(request: Request) -> Settings:
    """The app's settings (``create_app(settings)``)."""
    return request.app.state.settings


def get_session(settings: Settings = Depends(request_settings)) -> Iterator[Session]:
    """The request's one database session, closed (uncommitted work rolled back) when the request ends."""
    session = new_session(settings.db_url)
    try:
        yield session
    finally:
        session.close()


def get_caller(
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    session: Session = Depends(get_session),
) -> Caller:
    """The caller's team and scopes, from ``Authorization: Bearer <token>``; looked up on every request, so
    a revocation takes effect on the next one. The read transaction (and the at-most-once-a-minute
    ``last_used_at`` write) ends at once, so the request holds no database connection while it does other
    work (a dry run can take minutes)."""
    token = credentials.credentials if credentials is not None else ""
    if not token.strip():
        raise ApiError(401, "unauthorized", "missing bearer token")
    try:
        caller = authenticate(session, token.strip())
    except AuthError as err:
        session.rollback()
        raise ApiError(401, err.code, err.message) from None
    session.commit()
    return caller


def require(scope: str):
    """A dependency: the caller, if its token has ``scope`` (or a stronger one); else 403 ``forbidden``."""

    def _check(caller: Caller = Depends(get_caller)) -> Caller:
        if not caller.has(scope):
            raise ApiError(403, "forbidden", f"this token lacks the {scope!r} scope")
        return caller

    _check.__name__ = f"require_{scope}"
    return _check


SettingsDep = Depends(request_settings)
SessionDep = Depends(get_session)
CallerDep = Depends(get_caller)
#: The caller, with the scope each kind of route needs.
ReaderDep = Depends(require("read"))
SubmitterDep = Depends(require("submit"))
AdminDep = Depends(require("admin"))
