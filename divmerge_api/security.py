"""Bearer tokens: high-entropy random strings, stored only as sha256 hashes; each belongs to a team and
carries scopes (``read``, ``submit``, ``admin``), an optional expiry and its last use. Admin actions on
teams and tokens are written to the audit log (:class:`divmerge_service.models.AuditEvent`)."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fastapi.security import HTTPBearer
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from divmerge_service.models import ApiToken, AuditEvent, Team, utcnow

TOKEN_PREFIX = "dm_"

#: The scopes, weakest first. Each implies the ones before it: ``submit`` can read, ``admin`` can submit.
SCOPES: tuple[str, ...] = ("read", "submit", "admin")
#: What tokens made without explicit scopes get (and what the migration gave every older token).
DEFAULT_SCOPES: tuple[str, ...] = ("read", "submit")
#: ``last_used_at`` is written at most this often per token (one UPDATE a minute, not one per request).
LAST_USED_EVERY_S = 60
#: Team names: letters, digits, ``.``, ``_``, ``-``; starting with a letter or digit; 1 to 64 characters.
TEAM_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_TEAM_NAME = re.compile(TEAM_NAME_PATTERN)


@dataclass(frozen=True)
class Caller:
    team_id: int
    team: str
    token_id: str
    scopes: frozenset[str] = frozenset(DEFAULT_SCOPES)

    def has(self, scope: str) -> bool:
        """True if the token's scopes include ``scope`` or a stronger one."""
        need = SCOPES.index(scope)
        return any(SCOPES.index(s) >= need for s in self.scopes if s in SCOPES)

    @property
    def actor(self) -> str:
        return f"{self.token_id} ({self.team})"


class AuthError(Exception):
    """The token is missing, unknown, revoked or expired (``code`` and ``message`` for the 401)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def valid_team_name(name: str) -> bool:
    return bool(_TEAM_NAME.fullmatch(name))


def normalise_scopes(scopes) -> tuple[str, ...]:
    """Known scopes, deduplicated, in :data:`SCOPES` order; ValueError on an unknown or empty list."""
    scopes = list(scopes)
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise ValueError(f"unknown scope {unknown[0]!r}" if unknown else "no scope given")
    return tuple(s for s in SCOPES if s in scopes)


def scopes_of(row: ApiToken) -> list[str]:
    return [s for s in (row.scopes or "").split(",") if s]


def audit(
    session: Session,
    action: str,
    actor: Caller | None,
    *,
    team: str | None = None,
    token_id: str | None = None,
    data: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append an audit event; ``actor`` None means the server-side CLI. Never holds a secret."""
    event = AuditEvent(
        action=action,
        actor=actor.actor if actor is not None else "cli",
        actor_token_id=actor.token_id if actor is not None else None,
        team=team,
        token_id=token_id,
        data=data or {},
    )
    session.add(event)
    return event


def get_or_create_team(session: Session, team_name: str, actor: Caller | None = None) -> tuple[Team, bool]:
    team = session.scalar(select(Team).where(Team.name == team_name))
    if team is not None:
        return team, False
    team = Team(name=team_name)
    session.add(team)
    session.flush()
    audit(session, "team_created", actor, team=team_name)
    return team, True


def create_token(
    session: Session,
    team_name: str,
    scopes=DEFAULT_SCOPES,
    expires_in_s: int | None = None,
    actor: Caller | None = None,
) -> tuple[ApiToken, str]:
    """Create (team if needed and) a token, audited. Returns the row and the plaintext, shown once."""
    scopes = normalise_scopes(scopes)
    team, _ = get_or_create_team(session, team_name, actor)
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires_at = utcnow() + timedelta(seconds=expires_in_s) if expires_in_s is not None else None
    row = ApiToken(
        id="tok_" + secrets.token_hex(8),
        team_id=team.id,
        token_hash=hash_token(plaintext),
        scopes=",".join(scopes),
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    audit(
        session,
        "token_created",
        actor,
        team=team_name,
        token_id=row.id,
        data={"scopes": list(scopes), "expires_at": expires_at.isoformat() if expires_at else None},
    )
    return row, plaintext


def find_token(session: Session, token_or_id: str) -> ApiToken | None:
    if token_or_id.startswith(TOKEN_PREFIX):
        return session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token_or_id)))
    return session.get(ApiToken, token_or_id)


def revoke_token(session: Session, token_or_id: str, actor: Caller | None = None) -> ApiToken | None:
    """Revoke a token (given itself or its id); audited the first time. None if there is no such token."""
    row = find_token(session, token_or_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
        team = session.get(Team, row.team_id)
        audit(session, "token_revoked", actor, team=team.name if team else None, token_id=row.id)
    return row


def authenticate(session: Session, token: str, now: datetime | None = None) -> Caller:
    """The caller behind ``token``; raises :class:`AuthError` for an unknown, revoked or expired token.
    Writes ``last_used_at`` when it is older than :data:`LAST_USED_EVERY_S` (the caller commits)."""
    now = now or utcnow()
    row = session.execute(
        select(ApiToken, Team)
        .join(Team, Team.id == ApiToken.team_id)
        .where(ApiToken.token_hash == hash_token(token))
    ).first()
    if row is None or row[0].revoked_at is not None:
        raise AuthError("unauthorized", "invalid or revoked token")
    tok, team = row
    if tok.expires_at is not None and tok.expires_at <= now:
        raise AuthError("token_expired", f"the token expired at {tok.expires_at.isoformat()}")
    if tok.last_used_at is None or tok.last_used_at <= now - timedelta(seconds=LAST_USED_EVERY_S):
        cutoff = now - timedelta(seconds=LAST_USED_EVERY_S)
        session.execute(
            update(ApiToken)
            .where(
                ApiToken.id == tok.id, or_(ApiToken.last_used_at.is_(None), ApiToken.last_used_at <= cutoff)
            )
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )
    return Caller(team_id=team.id, team=team.name, token_id=tok.id, scopes=frozenset(scopes_of(tok)))


def lookup(session: Session, token: str) -> Caller | None:
    """The caller, or None for a token that is unknown, revoked or expired."""
    try:
        return authenticate(session, token)
    except AuthError:
        return None


#: Declares the bearer scheme in the OpenAPI document (the docs' "Authorize" button); errors are ours.
bearer = HTTPBearer(auto_error=False, description="an API token made with `divmerge token create`")


def __getattr__(name: str):
    """``get_caller`` and ``CallerDep`` moved to :mod:`divmerge_api.deps` (one session per request); still found here."""
    if name in ("get_caller", "CallerDep"):
        from . import deps

        return getattr(deps, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
