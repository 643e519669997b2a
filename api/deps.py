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

from service_core.config import Settings
from service_core.db import new_session

from .errors import ApiError
from .security import Caller, bearer, lookup


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
    """The caller's team, from ``Authorization: Bearer <token>``. The read transaction ends at once, so the
    request holds no database connection while it does other work (a dry run can take minutes)."""
    token = credentials.credentials if credentials is not None else ""
    if not token.strip():
        raise ApiError(401, "unauthorized", "missing bearer token")
    caller = lookup(session, token.strip())
    session.commit()
    if caller is None:
        raise ApiError(401, "unauthorized", "invalid or revoked token")
    return caller


SettingsDep = Depends(request_settings)
SessionDep = Depends(get_session)
CallerDep = Depends(get_caller)
