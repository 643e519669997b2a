"""Webhooks: who is told when a job finishes, and the outbox that tells them (docs/service.md#webhooks).

* A job's ``notify`` ({url, events}) or else its team's default webhook says where to POST and for which
  events: ``succeeded``, ``failed``, ``cancelled``, ``kept`` (a failed delivery whose merged result is kept
  for ``POST /retry``; sent beside ``failed``).
* :func:`on_finished` is called by the transitions of :mod:`divmerge_service.jobs` that end a job, in their
  transaction: it inserts one :class:`~divmerge_service.models.WebhookDelivery` row per subscribed event,
  so a finished job and its deliveries commit together or not at all (the outbox).
* Workers claim due rows (:func:`claim_due`, ``FOR UPDATE SKIP LOCKED``), POST them
  (``divmerge_worker.webhooks``) and record each attempt (:func:`record_attempt`) as a job event. A row stays
  until it is delivered or out of attempts: delivery is at least once; receivers dedupe on the delivery id.
* Bodies are signed with HMAC-SHA256 under the team's secret (``X-DivMerge-Signature: sha256=<hex>``). The
  secret must be readable to sign, so it is stored sealed (:func:`seal`): encrypted when
  ``DIVMERGE_WEBHOOK_SECRET_KEY`` is set, else as is; it is never returned after its creation nor logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import random
import secrets
import socket
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .config import Settings
from .models import Job, JobEvent, Team, WebhookDelivery, WebhookStatus, utcnow

#: The events a webhook can subscribe to (all of them when ``events`` is omitted).
EVENTS: tuple[str, ...] = ("succeeded", "failed", "cancelled", "kept")
SIGNATURE_HEADER = "X-DivMerge-Signature"
EVENT_HEADER = "X-DivMerge-Event"
DELIVERY_HEADER = "X-DivMerge-Delivery"
MAX_URL_LENGTH = 2000


class InvalidWebhook(ValueError):
    """A notify URL that may not be used; ``field`` is relative to the notify object (``url``, ``events``)."""

    def __init__(self, message: str, field: str = "url"):
        super().__init__(message)
        self.message, self.field = message, field


# --- URLs and the allow-list -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # lower case, IPv6 without brackets
    port: int

    @property
    def explicit(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_url(url: str) -> Target:
    """Split a webhook URL, refusing what is never sent to: not http(s), userinfo, no host, fragments."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise InvalidWebhook(f"the URL must be a string of 1-{MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise InvalidWebhook("the URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise InvalidWebhook(f"not a valid URL: {err}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidWebhook("only http:// and https:// URLs are accepted")
    if "@" in parts.netloc or parts.username is not None or parts.password is not None:
        raise InvalidWebhook("credentials (user:password@) are not accepted in the URL")
    if not parts.hostname:
        raise InvalidWebhook("the URL has no host")
    if parts.fragment:
        raise InvalidWebhook("the URL may not have a #fragment")
    return Target(scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80))


def allowed(target: Target, allow: list[str]) -> bool:
    """The host is on the allow-list: as itself (any port) or as host:port."""
    names = {a.lower() for a in allow}
    bare = f"[{target.host}]" if ":" in target.host else target.host
    return bool(names & {target.host, bare, target.explicit})


def check_url(url: str, settings: Settings) -> Target:
    """What the API checks at submit (and a worker again before each POST): the URL's form and that its host
    is on ``DIVMERGE_WEBHOOK_ALLOWED_HOSTS``."""
    target = parse_url(url)
    if not settings.webhook_allowed_hosts:
        raise InvalidWebhook("webhooks are disabled on this server (DIVMERGE_WEBHOOK_ALLOWED_HOSTS is empty)")
    if not allowed(target, settings.webhook_allowed_hosts):
        raise InvalidWebhook(f"host {target.host!r} is not on the server's webhook allow-list")
    return target


def check_events(events: Any) -> list[str]:
    if events is None:
        return list(EVENTS)
    if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
        raise InvalidWebhook(f"events must be a non-empty list of {', '.join(EVENTS)}", "events")
    bad = [e for e in events if e not in EVENTS]
    if bad:
        raise InvalidWebhook(f"unknown event {bad[0]!r} (one of {', '.join(EVENTS)})", "events")
    return [e for e in EVENTS if e in events]  # deduplicated, in a fixed order


def _private(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
    )


def resolve(target: Target, settings: Settings) -> str:
    """The address to connect to, checked at delivery time: a host resolving to a private, loopback,
    link-local (or otherwise non-public) address is refused unless that address itself is on the allow-list
    (e.g. ``127.0.0.1``), so that a public name cannot be pointed at the internal network (DNS rebinding).
    The POST goes to the address checked here, not to a second lookup."""
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise InvalidWebhook(f"host {target.host!r} does not resolve ({err.strerror or err})") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if _private(ip) and not allowed(
            Target(target.scheme, str(ip), target.port), settings.webhook_allowed_hosts
        ):
            raise InvalidWebhook(
                f"host {target.host!r} resolves to the non-public address {ip}, which is not on the allow-list"
            )
    if not addresses:
        raise InvalidWebhook(f"host {target.host!r} does not resolve")
    return addresses[0]


# --- secrets -----------------------------------------------------------------------------------------------
def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def _fernet(settings: Settings) -> Fernet | None:
    """Fernet (AES-128-CBC with HMAC-SHA256, from ``cryptography``) under a key derived from the setting
    (any string: HKDF-SHA256 stretches it to Fernet's 32 bytes)."""
    if settings.webhook_secret_key is None:
        return None
    master = settings.webhook_secret_key.get_secret_value().encode()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"divmerge-webhook-secret").derive(
        master
    )
    return Fernet(base64.urlsafe_b64encode(key))


def seal(secret: str, settings: Settings) -> str:
    """The stored form of a team's secret. With ``DIVMERGE_WEBHOOK_SECRET_KEY``: ``fernet:`` + a Fernet
    token (authenticated encryption). Without it: ``plain:`` + the secret (readable by whoever reads the
    database: set the key in production)."""
    f = _fernet(settings)
    if f is None:
        return "plain:" + secret
    return "fernet:" + f.encrypt(secret.encode()).decode()


class SecretUnavailable(Exception):
    """The team has no secret, or it is sealed under a key this process does not have."""


def unseal(stored: str | None, settings: Settings) -> str:
    if not stored:
        raise SecretUnavailable("the team has no webhook secret (POST /v1/admin/teams/{team}/webhook-secret)")
    if stored.startswith("plain:"):
        return stored[len("plain:") :]
    f = _fernet(settings)
    if not stored.startswith("fernet:") or f is None:
        raise SecretUnavailable(
            "the team's webhook secret is encrypted and DIVMERGE_WEBHOOK_SECRET_KEY is unset"
        )
    try:
        return f.decrypt(stored[len("fernet:") :].encode()).decode()
    except InvalidToken:
        raise SecretUnavailable(
            "the team's webhook secret does not open with DIVMERGE_WEBHOOK_SECRET_KEY"
        ) from None


def sign(secret: str, body: bytes) -> str:
    """The ``X-DivMerge-Signature`` value: ``sha256=`` + HMAC-SHA256(secret, raw body) in hex."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def rotate_secret(session: Session, team: Team, settings: Settings) -> str:
    """A new secret for the team (the old one stops signing at once); the plaintext is returned once."""
    secret = new_secret()
    team.webhook_secret = seal(secret, settings)
    team.webhook_secret_at = utcnow()
    return secret


# --- the outbox --------------------------------------------------------------------------------------------
def subscription(session: Session, job_id: str) -> tuple[str, list[str]] | None:
    """(url, events) of the job: its own ``notify``, else its team's default webhook, else None."""
    row = session.execute(
        select(Job.notify, Team.webhook_url, Team.webhook_events)
        .join(Team, Team.id == Job.team_id)
        .where(Job.id == job_id)
    ).first()
    if row is None:
        return None
    notify, team_url, team_events = row
    if notify:
        return notify["url"], list(notify.get("events") or EVENTS)
    if team_url:
        return team_url, [e for e in (team_events or ",".join(EVENTS)).split(",") if e]
    return None


def on_finished(session: Session, job_id: str, status: str, *, kept: bool = False) -> list[str]:
    """Queue the job's webhooks for its outcome (``status``, and ``kept`` when a failed job's result is kept
    for retry), in the caller's transaction. Returns the delivery ids."""
    sub = subscription(session, job_id)
    if sub is None:
        return []
    url, events = sub
    wanted = [e for e in (status, "kept" if kept else None) if e and e in events]
    if not wanted:
        return []
    job = session.execute(
        select(Job.team_id, Team.name, Job.error_code, Job.kept, Job.attempts)
        .join(Team, Team.id == Job.team_id)
        .where(Job.id == job_id)
    ).one()
    team_id, team, error_code, kept_row, attempts = job
    now = utcnow()
    ids = []
    for event in wanted:
        delivery_id = str(uuid.uuid4())
        payload = {
            "delivery_id": delivery_id,
            "event": event,
            "job_id": job_id,
            "status": status,
            "team": team,
            "timestamp": now.isoformat(),
            "attempts": attempts,
            "error_code": error_code if status == "failed" else None,
            "kept_until": (kept_row or {}).get("until") if event == "kept" else None,
        }
        session.add(
            WebhookDelivery(
                id=delivery_id,
                job_id=job_id,
                team_id=team_id,
                event=event,
                url=url,
                body=json.dumps(payload, separators=(",", ":"), sort_keys=True),
                status=WebhookStatus.PENDING.value,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
        session.add(
            JobEvent(
                job_id=job_id,
                at=now,
                kind="webhook_queued",
                message=f"webhook {event} queued for {_where(url)}",
                data={"delivery": delivery_id, "event": event},
            )
        )
        ids.append(delivery_id)
    return ids


def _where(url: str) -> str:
    """The URL as events and logs show it: scheme, host and path, never the query (it may hold a token)."""
    try:
        p = urlsplit(url)
        return f"{p.scheme}://{p.netloc}{p.path}"
    except ValueError:
        return "<invalid url>"


@dataclass(frozen=True)
class Claimed:
    id: str
    job_id: str
    team_id: int
    event: str
    url: str
    body: bytes
    attempt: int


def claim_lease_s(settings: Settings) -> float:
    """How long a claimed row is left to its deliverer before another one may try it (a worker that died
    mid-POST): longer than a POST can take (connect, write and read timeouts) with room to record it."""
    return 4 * settings.webhook_timeout_s + 5


def claim_due(session: Session, settings: Settings, limit: int) -> list[Claimed]:
    """Take up to ``limit`` due pending rows: ``FOR UPDATE SKIP LOCKED`` (concurrent deliverers take
    different rows), count the attempt and push ``next_attempt_at`` by the claim lease; the caller commits
    before it POSTs, so no lock is held over the network."""
    now = utcnow()
    rows = list(
        session.scalars(
            select(WebhookDelivery)
            .where(
                WebhookDelivery.status == WebhookStatus.PENDING.value, WebhookDelivery.next_attempt_at <= now
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    out = []
    for row in rows:
        if row.attempts >= settings.webhook_attempts:  # the last attempt's deliverer died before recording it
            row.status = WebhookStatus.FAILED.value
            row.last_error = f"attempt {row.attempts} was never reported (its worker was lost); given up"
            session.add(
                JobEvent(
                    job_id=row.job_id,
                    at=now,
                    kind="webhook_attempt",
                    message=f"webhook {row.event} to {_where(row.url)}: {row.last_error}",
                    data={
                        "delivery": row.id,
                        "event": row.event,
                        "attempt": row.attempts,
                        "status_code": None,
                        "error": row.last_error,
                        "outcome": "failed",
                    },
                )
            )
            continue
        row.attempts += 1
        row.next_attempt_at = now + timedelta(seconds=claim_lease_s(settings))
        out.append(
            Claimed(row.id, row.job_id, row.team_id, row.event, row.url, row.body.encode(), row.attempts)
        )
    return out


def backoff_s(settings: Settings, attempt: int, rand: random.Random | None = None) -> float:
    """Wait after failed attempt ``attempt`` (1-based): ``webhook_backoff_s`` doubling, capped at
    ``webhook_backoff_max_s``, jittered to between half and all of it (deliverers do not retry in step)."""
    base = min(settings.webhook_backoff_s * 2 ** (attempt - 1), settings.webhook_backoff_max_s)
    return base * (0.5 + 0.5 * (rand or random).random())


def record_attempt(
    session: Session,
    settings: Settings,
    c: Claimed,
    *,
    status_code: int | None,
    error: str | None,
    final: bool = False,
    elapsed_s: float | None = None,
) -> str:
    """Write an attempt's outcome on its row (fenced on the attempt: a row another deliverer re-claimed
    meanwhile is left alone) and as a ``webhook_attempt`` job event. ``final``: no point retrying (the host
    is refused). Returns delivered, retry, failed or stale."""
    ok = error is None and status_code is not None and 200 <= status_code < 300
    now = utcnow()
    exhausted = not ok and (final or c.attempt >= settings.webhook_attempts)
    delay = None if ok or exhausted else backoff_s(settings, c.attempt)
    values: dict[str, Any] = {"last_status_code": status_code, "last_error": error}
    if ok:
        values.update(status=WebhookStatus.DELIVERED.value, delivered_at=now)
        outcome = "delivered"
    elif exhausted:
        values.update(status=WebhookStatus.FAILED.value)
        outcome = "failed"
    else:
        values.update(next_attempt_at=now + timedelta(seconds=delay or 0.0))
        outcome = "retry"
    changed = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == c.id,
            WebhookDelivery.attempts == c.attempt,
            WebhookDelivery.status == WebhookStatus.PENDING.value,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not changed:
        return "stale"
    answer = f"HTTP {status_code}" if status_code is not None else "no answer"
    if outcome == "delivered":
        what = f"delivered ({answer})"
    elif outcome == "retry":
        what = f"failed ({error or answer}); next try in {delay or 0.0:.1f}s"
    else:
        what = f"failed ({error or answer}); given up after {c.attempt} attempt(s)"
    data = {
        "delivery": c.id,
        "event": c.event,
        "attempt": c.attempt,
        "status_code": status_code,
        "error": error,
        "outcome": outcome,
    }
    if elapsed_s is not None:
        data["elapsed_s"] = round(elapsed_s, 3)
    if delay is not None:
        data["delay_s"] = round(delay, 3)
    session.add(
        JobEvent(
            job_id=c.job_id,
            at=now,
            kind="webhook_attempt",
            message=f"webhook {c.event} to {_where(c.url)}, attempt {c.attempt}: {what}"[:1000],
            data=data,
        )
    )
    return outcome


def team_secret(session: Session, team_id: int, settings: Settings) -> str:
    return unseal(session.scalar(select(Team.webhook_secret).where(Team.id == team_id)), settings)


def pending_count(session: Session) -> int:
    from sqlalchemy import func

    return (
        session.scalar(
            select(func.count())
            .select_from(WebhookDelivery)
            .where(WebhookDelivery.status == WebhookStatus.PENDING.value)
        )
        or 0
    )
