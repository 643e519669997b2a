"""Bearer tokens: high-entropy random strings, stored only as sha256 hashes; each belongs to a team."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from fastapi.security import HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from service_core.models import ApiToken, Team, utcnow

TOKEN_PREFIX = "dm_"


@dataclass(frozen=True)
class Caller:
    team_id: int
    team: str
    token_id: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, team_name: str) -> tuple[ApiToken, str]:
    """Create (team if needed and) a token. Returns the row and the plaintext, shown once."""
    team = session.scalar(select(Team).where(Team.name == team_name))
    if team is None:
        team = Team(name=team_name)
        session.add(team)
        session.flush()
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(id="tok_" + secrets.token_hex(8), team_id=team.id, token_hash=hash_token(plaintext))
    session.add(row)
    session.flush()
    return row, plaintext


def revoke_token(session: Session, token_or_id: str) -> ApiToken | None:
    if token_or_id.startswith(TOKEN_PREFIX):
        row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token_or_id)))
    else:
        row = session.get(ApiToken, token_or_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def lookup(session: Session, token: str) -> Caller | None:
    row = session.execute(
        select(ApiToken, Team)
        .join(Team, Team.id == ApiToken.team_id)
        .where(ApiToken.token_hash == hash_token(token), ApiToken.revoked_at.is_(None))
    ).first()
    if row is None:
        return None
    tok, team = row
    return Caller(team_id=team.id, team=team.name, token_id=tok.id)


#: Declares the bearer scheme in the OpenAPI document (the docs' "Authorize" button); errors are ours.
bearer = HTTPBearer(auto_error=False, description="an API token made with `divmerge token create`")


def __getattr__(name: str):
    """``get_caller`` and ``CallerDep`` moved to :mod:`api.deps` (one session per request); still found here."""
    if name in ("get_caller", "CallerDep"):
        from . import deps

        return getattr(deps, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
