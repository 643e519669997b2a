"""Teams and tokens over HTTP: ``/v1/admin/teams``, ``/v1/admin/tokens`` and ``/v1/admin/audit`` for admin
tokens; ``/v1/tokens`` for a team member (``submit`` scope) to list and revoke its own team's tokens. Every
change is written to the audit log; a token's plaintext appears only in the answer that creates it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from divmerge_service import webhooks
from divmerge_service.config import Settings
from divmerge_service.models import ApiToken, AuditEvent, Team, utcnow

from ..deps import AdminDep, SessionDep, SettingsDep, SubmitterDep
from ..errors import ApiError
from ..schemas import (
    AuditList,
    AuditOut,
    TeamCreate,
    TeamList,
    TeamOut,
    TeamWebhookOut,
    TeamWebhookSet,
    TokenCreate,
    TokenCreated,
    TokenList,
    TokenOut,
    WebhookSecretCreated,
)
from ..security import Caller, audit, create_token, get_or_create_team, revoke_token, scopes_of

_AUTH = {
    401: {"description": "missing, invalid, revoked or expired token"},
    403: {"description": "the token lacks the scope the route needs"},
}
_TOKEN_ID = Path(max_length=32, pattern=r"^tok_[0-9a-f]{1,28}$")
_TEAM = Path(max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

admin = APIRouter(prefix="/v1/admin", tags=["admin"], responses=_AUTH)
team = APIRouter(prefix="/v1/tokens", tags=["tokens"], responses=_AUTH)


def _token_out(row: ApiToken, team_name: str) -> TokenOut:
    return TokenOut(
        id=row.id,
        team=team_name,
        scopes=scopes_of(row),
        created_at=row.created_at,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )


def _tokens(s: Session, team_id: int | None) -> list[TokenOut]:
    q = select(ApiToken, Team.name).join(Team, Team.id == ApiToken.team_id)
    if team_id is not None:
        q = q.where(ApiToken.team_id == team_id)
    return [_token_out(t, name) for t, name in s.execute(q.order_by(ApiToken.created_at, ApiToken.id))]


def _revoke(s: Session, caller: Caller, token_id: str, team_id: int | None) -> TokenOut:
    row = s.get(ApiToken, token_id)
    if row is None or (team_id is not None and row.team_id != team_id):
        raise ApiError(404, "not_found", f"no token {token_id!r}")
    revoke_token(s, token_id, actor=caller)
    out = _token_out(row, s.get(Team, row.team_id).name)
    s.commit()
    return out


# --- admin


@admin.get("/teams", response_model=TeamList)
def list_teams(caller: Caller = AdminDep, s: Session = SessionDep) -> TeamList:
    rows = s.scalars(select(Team).order_by(Team.name))
    return TeamList(items=[TeamOut(id=t.id, name=t.name, created_at=t.created_at) for t in rows])


@admin.post(
    "/teams", status_code=201, response_model=TeamOut, responses={409: {"description": "team exists"}}
)
def create_team(body: TeamCreate, caller: Caller = AdminDep, s: Session = SessionDep) -> TeamOut:
    t, created = get_or_create_team(s, body.name, actor=caller)
    if not created:
        raise ApiError(409, "team_exists", f"team {body.name!r} already exists", "name")
    out = TeamOut(id=t.id, name=t.name, created_at=t.created_at)
    s.commit()
    return out


def _team(s: Session, name: str) -> Team:
    t = s.scalar(select(Team).where(Team.name == name))
    if t is None:
        raise ApiError(404, "not_found", f"no team {name!r}", "team")
    return t


def _webhook_out(t: Team) -> TeamWebhookOut:
    return TeamWebhookOut(
        team=t.name,
        url=t.webhook_url,
        events=[e for e in (t.webhook_events or "").split(",") if e] if t.webhook_url else [],
        has_secret=bool(t.webhook_secret),
        secret_created_at=t.webhook_secret_at,
    )


_NO_TEAM = {404: {"description": "no such team"}}


@admin.get("/teams/{team_name}/webhook", response_model=TeamWebhookOut, responses=_NO_TEAM)
def get_team_webhook(
    team_name: Annotated[str, _TEAM], caller: Caller = AdminDep, s: Session = SessionDep
) -> TeamWebhookOut:
    """The team's default webhook and whether it has a signing secret (never the secret itself)."""
    return _webhook_out(_team(s, team_name))


@admin.put(
    "/teams/{team_name}/webhook",
    response_model=TeamWebhookOut,
    responses={**_NO_TEAM, 422: {"description": "URL not http(s), with credentials, or off the allow-list"}},
)
def set_team_webhook(
    team_name: Annotated[str, _TEAM],
    body: TeamWebhookSet,
    caller: Caller = AdminDep,
    settings: Settings = SettingsDep,
    s: Session = SessionDep,
) -> TeamWebhookOut:
    """Set the team's default webhook: every job of the team without its own ``notify`` is reported there.
    Its URL meets the same checks as a job's ``notify.url``. Audited."""
    t = _team(s, team_name)
    try:
        webhooks.check_url(body.url, settings)
    except webhooks.InvalidWebhook as err:
        raise ApiError(422, "invalid_notify", err.message, "url") from None
    events = webhooks.check_events(body.events)
    t.webhook_url, t.webhook_events = body.url, ",".join(events)
    audit(s, "webhook_set", caller, team=t.name, data={"events": events})  # not the URL: it may hold a token
    out = _webhook_out(t)
    s.commit()
    return out


@admin.delete("/teams/{team_name}/webhook", response_model=TeamWebhookOut, responses=_NO_TEAM)
def clear_team_webhook(
    team_name: Annotated[str, _TEAM], caller: Caller = AdminDep, s: Session = SessionDep
) -> TeamWebhookOut:
    """Remove the team's default webhook (jobs' own ``notify`` still apply; the secret stays). Audited."""
    t = _team(s, team_name)
    t.webhook_url = t.webhook_events = None
    audit(s, "webhook_cleared", caller, team=t.name)
    out = _webhook_out(t)
    s.commit()
    return out


@admin.post(
    "/teams/{team_name}/webhook-secret",
    status_code=201,
    response_model=WebhookSecretCreated,
    responses=_NO_TEAM,
)
def rotate_team_webhook_secret(
    team_name: Annotated[str, _TEAM],
    caller: Caller = AdminDep,
    settings: Settings = SettingsDep,
    s: Session = SessionDep,
) -> WebhookSecretCreated:
    """Create or rotate the team's webhook signing secret. The answer is the only place its plaintext ever
    appears; from now on every delivery (pending ones included) is signed with it. Audited."""
    t = _team(s, team_name)
    secret = webhooks.rotate_secret(s, t, settings)
    audit(s, "webhook_secret_rotated", caller, team=t.name)
    out = WebhookSecretCreated(team=t.name, secret=secret, created_at=t.webhook_secret_at or utcnow())
    s.commit()
    return out


@admin.get("/tokens", response_model=TokenList, responses={404: {"description": "no such team"}})
def list_all_tokens(
    caller: Caller = AdminDep,
    s: Session = SessionDep,
    team_name: Annotated[str | None, Query(alias="team", max_length=64)] = None,
) -> TokenList:
    """Every token (``?team=`` for one team's), oldest first: ids, scopes and dates, never a secret."""
    team_id = None
    if team_name is not None:
        team_id = s.scalar(select(Team.id).where(Team.name == team_name))
        if team_id is None:
            raise ApiError(404, "not_found", f"no team {team_name!r}", "team")
    return TokenList(items=_tokens(s, team_id))


@admin.post("/tokens", status_code=201, response_model=TokenCreated)
def create_admin_token(body: TokenCreate, caller: Caller = AdminDep, s: Session = SessionDep) -> TokenCreated:
    """A token for ``team`` (created if new) with ``scopes``, expiring after ``expires_in_s`` (never if
    null). The answer is the only place its plaintext ``token`` ever appears."""
    row, plaintext = create_token(s, body.team, body.scopes, body.expires_in_s, actor=caller)
    out = TokenCreated(**_token_out(row, body.team).model_dump(), token=plaintext)
    s.commit()
    return out


@admin.delete(
    "/tokens/{token_id}", response_model=TokenOut, responses={404: {"description": "no such token"}}
)
def revoke_any_token(
    token_id: Annotated[str, _TOKEN_ID], caller: Caller = AdminDep, s: Session = SessionDep
) -> TokenOut:
    """Revoke any token; it is refused from the next request on. Revoking a revoked token changes nothing."""
    return _revoke(s, caller, token_id, None)


@admin.get("/audit", response_model=AuditList)
def list_audit(
    caller: Caller = AdminDep,
    s: Session = SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    before: Annotated[int | None, Query(ge=1)] = None,
) -> AuditList:
    """The audit log, newest first: who created a team, created or revoked a token, and when."""
    q = select(AuditEvent)
    if before is not None:
        q = q.where(AuditEvent.id < before)
    rows = list(s.scalars(q.order_by(AuditEvent.id.desc()).limit(limit + 1)))
    nxt = rows[limit - 1].id if len(rows) > limit else None
    items = [
        AuditOut(
            id=e.id,
            at=e.at,
            action=e.action,
            actor=e.actor,
            actor_token_id=e.actor_token_id,
            team=e.team,
            token_id=e.token_id,
            data=e.data or {},
        )
        for e in rows[:limit]
    ]
    return AuditList(items=items, next_before=nxt)


# --- a team's own tokens


@team.get("", response_model=TokenList)
def list_team_tokens(caller: Caller = SubmitterDep, s: Session = SessionDep) -> TokenList:
    """The caller's team's tokens, oldest first (never a secret)."""
    return TokenList(items=_tokens(s, caller.team_id))


@team.delete(
    "/{token_id}", response_model=TokenOut, responses={404: {"description": "no such token in this team"}}
)
def revoke_team_token(
    token_id: Annotated[str, _TOKEN_ID], caller: Caller = SubmitterDep, s: Session = SessionDep
) -> TokenOut:
    """Revoke one of the team's tokens (another team's answers 404); audited."""
    return _revoke(s, caller, token_id, caller.team_id)
