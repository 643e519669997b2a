"""Tokens and teams over HTTP: scopes, the admin routes, a team's own tokens, expiry, revocation on the next
request, last_used_at, the audit log, ``divmerge token create --admin`` and the migration of older tokens."""

from __future__ import annotations

import subprocess
from datetime import timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.orm import Session

from divmerge_api.security import authenticate, hash_token
from divmerge_service.db import alembic_config, session_scope
from divmerge_service.models import ApiToken, utcnow

from .procs import BIN, PostgresDB

pytestmark = pytest.mark.service


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _last_line(out: str) -> str:
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def admin(svc) -> str:
    """The first admin token, made as an operator would: ``divmerge token create --admin``."""
    return _last_line(svc.cli("token", "create", "--team", "platform", "--admin"))


def _new_token(svc, admin: str, team: str, **body) -> dict:
    r = svc.client.post("/v1/admin/tokens", json={"team": team, **body}, headers=_bearer(admin))
    assert r.status_code == 201, r.text
    return r.json()


def _row(svc, token_id: str) -> ApiToken:
    with session_scope(svc.settings.db_url) as s:
        return s.get(ApiToken, token_id)


def _set(svc, token_id: str, **values) -> None:
    with session_scope(svc.settings.db_url) as s:
        s.execute(sa.update(ApiToken).where(ApiToken.id == token_id).values(**values))


# --- CLI


def test_cli_admin_token_manages_teams_and_plain_tokens_do_not(svc, admin):
    out = svc.cli("token", "create", "--team", "ops", "--scopes", "read", "--expires-in-s", "3600")
    assert "scopes: read" in out and "expires: 20" in out
    assert svc.client.get("/v1/admin/teams", headers=_bearer(admin)).status_code == 200
    r = svc.client.get("/v1/admin/teams", headers=svc.h("team-a"))  # made by the fixture: read,submit
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden" and "'admin'" in r.json()["error"]["message"]
    teams = [t["name"] for t in svc.client.get("/v1/admin/teams", headers=_bearer(admin)).json()["items"]]
    assert {"platform", "ops", "team-a", "team-b"} <= set(teams)
    listed = svc.client.get("/v1/admin/tokens?team=platform", headers=_bearer(admin)).json()["items"]
    assert [t["scopes"] for t in listed] == [["read", "submit", "admin"]]


@pytest.mark.parametrize(
    "args",
    [
        ["--team", "ops", "--scopes", "read,root"],
        ["--team", "ops", "--scopes", ","],
        ["--team", "ops", "--expires-in-s", "5"],
        ["--team", "bad name!"],
    ],
)
def test_cli_refuses_bad_input(svc, args):
    res = subprocess.run([str(BIN / "divmerge"), "token", "create", *args], env=svc.env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "dm_" not in res.stdout


# --- scopes


def test_read_token_reads_but_cannot_write(svc, admin):
    job = svc.submit(svc.classic())  # team-a, read+submit
    created = _new_token(svc, admin, "team-a", scopes=["read"], expires_in_s=3600)
    assert created["scopes"] == ["read"] and created["team"] == "team-a"
    assert created["token"].startswith("dm_") and created["expires_at"]
    read = _bearer(created["token"])
    assert svc.client.get("/v1/merges", headers=read).status_code == 200
    assert svc.client.get(f"/v1/merges/{job['id']}", headers=read).status_code == 200
    writes = [
        ("/v1/merges", svc.classic()),
        (f"/v1/merges/{job['id']}/cancel", None),
        (f"/v1/merges/{job['id']}/retry", None),
        ("/v1/merges/validate", svc.classic()),
    ]
    for path, body in writes:
        r = svc.client.post(path, json=body, headers=read)
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"] == {
            "code": "forbidden",
            "message": "this token lacks the 'submit' scope",
            "field": None,
        }
    assert svc.client.get("/v1/tokens", headers=read).status_code == 403
    assert svc.client.get("/v1/admin/audit", headers=read).status_code == 403


def test_submit_token_submits(svc, admin):
    created = _new_token(svc, admin, "team-a", scopes=["submit"])
    assert created["expires_at"] is None
    r = svc.client.post("/v1/merges", json=svc.classic(), headers=_bearer(created["token"]))
    assert r.status_code == 202, r.text


# --- admin CRUD and bounds


def test_admin_teams_and_tokens_crud(svc, admin):
    r = svc.client.post("/v1/admin/teams", json={"name": "crud-team"}, headers=_bearer(admin))
    assert r.status_code == 201 and r.json()["name"] == "crud-team"
    r = svc.client.post("/v1/admin/teams", json={"name": "crud-team"}, headers=_bearer(admin))
    assert r.status_code == 409 and r.json()["error"]["code"] == "team_exists"
    created = _new_token(svc, admin, "crud-team", scopes=["read"], expires_in_s=3600)
    assert set(created) == {
        "id",
        "team",
        "scopes",
        "created_at",
        "expires_at",
        "last_used_at",
        "revoked_at",
        "token",
    }
    r = svc.client.get("/v1/admin/tokens?team=crud-team", headers=_bearer(admin))
    assert r.status_code == 200
    (listed,) = r.json()["items"]
    assert listed["id"] == created["id"] and "token" not in listed
    everything = svc.client.get("/v1/admin/tokens", headers=_bearer(admin)).text
    assert created["token"] not in everything and hash_token(created["token"]) not in everything
    assert created["id"] in everything
    assert svc.client.get("/v1/admin/tokens?team=nope", headers=_bearer(admin)).status_code == 404
    # revoked: refused from the next request on
    assert svc.client.get("/v1/merges", headers=_bearer(created["token"])).status_code == 200
    r = svc.client.delete(f"/v1/admin/tokens/{created['id']}", headers=_bearer(admin))
    assert r.status_code == 200 and r.json()["revoked_at"]
    r = svc.client.get("/v1/merges", headers=_bearer(created["token"]))
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert (
        svc.client.delete("/v1/admin/tokens/tok_0000000000000000", headers=_bearer(admin)).status_code == 404
    )


@pytest.mark.parametrize(
    "body",
    [
        {"team": "x", "scopes": ["root"]},
        {"team": "x", "scopes": []},
        {"team": "x", "expires_in_s": 0},
        {"team": "x", "expires_in_s": 10**9},
        {"team": "bad name"},
        {"team": "a" * 65},
        {"team": "x", "token": "dm_chosen"},
    ],
)
def test_admin_token_input_is_bounded(svc, admin, body):
    r = svc.client.post("/v1/admin/tokens", json=body, headers=_bearer(admin))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request"


def test_admin_team_name_is_bounded(svc, admin):
    for name in ("", "-x", "a/b", "a" * 65, "é"):
        r = svc.client.post("/v1/admin/teams", json={"name": name}, headers=_bearer(admin))
        assert r.status_code == 422, name


# --- a team's own tokens


def test_team_lists_and_revokes_only_its_own_tokens(svc, admin):
    a1 = _new_token(svc, admin, "iso-a")
    a2 = _new_token(svc, admin, "iso-a")
    b1 = _new_token(svc, admin, "iso-b")
    r = svc.client.get("/v1/tokens", headers=_bearer(a1["token"]))
    assert r.status_code == 200
    assert [t["id"] for t in r.json()["items"]] == [a1["id"], a2["id"]]
    assert a1["token"] not in r.text and a2["token"] not in r.text
    # another team's token: 404, and it keeps working
    r = svc.client.delete(f"/v1/tokens/{b1['id']}", headers=_bearer(a1["token"]))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert svc.client.get("/v1/merges", headers=_bearer(b1["token"])).status_code == 200
    # its own: revoked on the next request
    r = svc.client.delete(f"/v1/tokens/{a2['id']}", headers=_bearer(a1["token"]))
    assert r.status_code == 200 and r.json()["revoked_at"]
    assert svc.client.get("/v1/merges", headers=_bearer(a2["token"])).status_code == 401
    assert svc.client.get("/v1/merges", headers=_bearer(a1["token"])).status_code == 200


# --- expiry and last use


def test_expired_token_gets_401_saying_so(svc, admin):
    created = _new_token(svc, admin, "team-a", scopes=["read"], expires_in_s=60)
    assert svc.client.get("/v1/merges", headers=_bearer(created["token"])).status_code == 200
    _set(svc, created["id"], expires_at=utcnow() - timedelta(seconds=1))
    r = svc.client.get("/v1/merges", headers=_bearer(created["token"]))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "token_expired" and "expired" in r.json()["error"]["message"]
    assert r.headers["WWW-Authenticate"] == "Bearer"


def test_last_used_at_is_written_at_most_once_a_minute(svc, admin):
    created = _new_token(svc, admin, "team-a", scopes=["read"])
    assert created["last_used_at"] is None and _row(svc, created["id"]).last_used_at is None
    before = utcnow()
    assert svc.client.get("/v1/merges", headers=_bearer(created["token"])).status_code == 200
    first = _row(svc, created["id"]).last_used_at
    assert first is not None and first >= before - timedelta(seconds=1)
    assert svc.client.get("/v1/merges", headers=_bearer(created["token"])).status_code == 200
    assert _row(svc, created["id"]).last_used_at == first  # within the minute: no write
    stale = utcnow() - timedelta(seconds=120)
    _set(svc, created["id"], last_used_at=stale)
    assert svc.client.get("/v1/merges", headers=_bearer(created["token"])).status_code == 200
    assert _row(svc, created["id"]).last_used_at > stale + timedelta(seconds=100)
    listed = svc.client.get("/v1/admin/tokens?team=team-a", headers=_bearer(admin)).json()["items"]
    assert next(t for t in listed if t["id"] == created["id"])["last_used_at"]


# --- audit


def test_audit_records_every_admin_action_and_who(svc, admin):
    admin_id = svc.client.get("/v1/admin/tokens?team=platform", headers=_bearer(admin)).json()["items"][0][
        "id"
    ]
    svc.client.post("/v1/admin/teams", json={"name": "audited"}, headers=_bearer(admin))
    member = _new_token(svc, admin, "audited", scopes=["submit"], expires_in_s=600)
    other = _new_token(svc, admin, "audited", scopes=["read"])
    svc.client.delete(f"/v1/tokens/{other['id']}", headers=_bearer(member["token"]))
    svc.client.delete(f"/v1/admin/tokens/{member['id']}", headers=_bearer(admin))
    r = svc.client.get("/v1/admin/audit?limit=500", headers=_bearer(admin))
    assert r.status_code == 200
    events = [e for e in r.json()["items"] if e["team"] == "audited"]
    got = [(e["action"], e["actor_token_id"], e["token_id"]) for e in reversed(events)]
    assert got == [
        ("team_created", admin_id, None),
        ("token_created", admin_id, member["id"]),
        ("token_created", admin_id, other["id"]),
        ("token_revoked", member["id"], other["id"]),
        ("token_revoked", admin_id, member["id"]),
    ]
    assert events[-2]["data"] == {"scopes": ["submit"], "expires_at": events[-2]["data"]["expires_at"]}
    assert events[-2]["data"]["expires_at"] and events[0]["actor"] == f"{admin_id} (platform)"
    assert member["token"] not in r.text and other["token"] not in r.text
    everything = r.json()["items"]
    assert any(
        e["actor"] == "cli" and e["action"] == "token_created" and e["team"] == "platform" for e in everything
    )
    page = svc.client.get("/v1/admin/audit?limit=2", headers=_bearer(admin)).json()
    assert len(page["items"]) == 2 and page["next_before"] == page["items"][1]["id"]
    older = svc.client.get(
        f"/v1/admin/audit?limit=2&before={page['next_before']}", headers=_bearer(admin)
    ).json()
    assert older["items"][0]["id"] < page["next_before"]


# --- migration


def _migrate_old_token_then_upgrade(url: str) -> None:
    from importlib.resources import as_file, files

    with as_file(files("divmerge_service") / "migrations") as location:
        cfg = alembic_config(url, str(location))
        command.upgrade(cfg, "0002")
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO teams (id, name, created_at) VALUES (1, 'old', CURRENT_TIMESTAMP)")
            )
            conn.execute(
                sa.text(
                    "INSERT INTO api_tokens (id, team_id, token_hash, created_at) "
                    "VALUES ('tok_old', 1, :h, CURRENT_TIMESTAMP)"
                ),
                {"h": hash_token("dm_old")},
            )
        command.upgrade(cfg, "head")
        with engine.begin() as conn:
            row = conn.execute(sa.text("SELECT scopes, expires_at, last_used_at FROM api_tokens")).one()
            assert tuple(row) == ("read,submit", None, None)
            assert conn.execute(sa.text("SELECT count(*) FROM audit_events")).scalar() == 0
        with Session(engine) as s:
            caller = authenticate(s, "dm_old")
            assert caller.has("submit") and not caller.has("admin")
        command.downgrade(cfg, "0002")
        command.upgrade(cfg, "head")
        engine.dispose()


def test_migration_gives_older_tokens_read_and_submit_on_sqlite(tmp_path):
    _migrate_old_token_then_upgrade(f"sqlite:///{tmp_path / 'old.db'}")


def test_migration_gives_older_tokens_read_and_submit_on_postgresql():
    db = PostgresDB().create()
    try:
        _migrate_old_token_then_upgrade(db.url)
    finally:
        db.drop()
