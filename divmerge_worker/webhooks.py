"""The webhook deliverer: a daemon thread in every worker process (Celery and embedded) that drains the
outbox (``webhook_deliveries``, filled by the job transitions of :mod:`divmerge_service.jobs`).

Every ``webhook_poll_s`` it claims due rows (:func:`divmerge_service.webhooks.claim_due`, ``FOR UPDATE
SKIP LOCKED``, at most as many as it has free senders, ``webhook_concurrency``) and POSTs each from a sender
thread of its own, so a slow receiver holds one sender for at most the timeouts and never a merge (those
run in the worker's task thread). Each POST: the URL's host is checked against the allow-list again and
resolved, a non-public address refused unless allow-listed itself; the connection goes to that address (the
``Host`` header and TLS name stay the URL's); no redirect is followed (3xx is a failure); connect, write and
read each time out after ``webhook_timeout_s``. Then the attempt is recorded
(:func:`divmerge_service.webhooks.record_attempt`): delivered on 2xx, else retried with jittered
exponential backoff until ``webhook_attempts``. A worker killed mid-POST leaves its row claimed until the
claim lease passes; then any worker tries it again (at least once; receivers dedupe on the delivery id).
"""

from __future__ import annotations

import logging
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import httpx

from divmerge_service import webhooks
from divmerge_service.config import Settings
from divmerge_service.db import session_scope

log = logging.getLogger("divmerge.webhooks")
_stop = threading.Event()
USER_AGENT = "DivMerge-Webhooks/1"


def post(settings: Settings, c: webhooks.Claimed) -> tuple[int | None, str | None, bool]:
    """One attempt: (status code, error, final). ``error`` None with a 2xx code is a delivery; ``final``:
    not worth retrying (the host is no longer on the allow-list)."""
    try:
        target = webhooks.check_url(c.url, settings)
    except webhooks.InvalidWebhook as err:
        return None, f"refused: {err.message}", True
    try:
        address = webhooks.resolve(target, settings)
        with session_scope(settings.db_url) as s:
            secret = webhooks.team_secret(s, c.team_id, settings)
    except webhooks.InvalidWebhook as err:
        return None, f"refused: {err.message}", False
    except webhooks.SecretUnavailable as err:
        return None, f"not signed: {err}", False
    parts = urlsplit(c.url)
    host = f"[{address}]" if ":" in address else address
    url = urlunsplit((parts.scheme, f"{host}:{target.port}", parts.path or "/", parts.query, ""))
    headers = {
        "Host": parts.netloc,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        webhooks.SIGNATURE_HEADER: webhooks.sign(secret, c.body),
        webhooks.EVENT_HEADER: c.event,
        webhooks.DELIVERY_HEADER: c.id,
    }
    extensions = {"sni_hostname": target.host} if parts.scheme == "https" else {}
    try:
        with (
            httpx.Client(
                follow_redirects=False, timeout=httpx.Timeout(settings.webhook_timeout_s), trust_env=False
            ) as client,
            client.stream("POST", url, content=c.body, headers=headers, extensions=extensions) as r,
        ):
            code = r.status_code
    except httpx.TimeoutException as err:
        return None, f"timeout after {settings.webhook_timeout_s:g}s ({type(err).__name__})", False
    except httpx.HTTPError as err:
        return None, f"{type(err).__name__}: {str(err)[:200]}", False
    if 300 <= code < 400:
        return code, f"redirect (HTTP {code}) not followed", False
    if not 200 <= code < 300:
        return code, f"HTTP {code}", False
    return code, None, False


def deliver(settings: Settings, c: webhooks.Claimed) -> str:
    """POST one claimed delivery and record the attempt. Returns the outcome (see ``record_attempt``)."""
    t0 = time.monotonic()
    try:
        code, error, final = post(settings, c)
    except Exception as err:  # noqa: BLE001 - an attempt always ends recorded
        code, error, final = None, f"unexpected {type(err).__name__}", False
    elapsed = time.monotonic() - t0
    try:
        with session_scope(settings.db_url) as s:
            outcome = webhooks.record_attempt(
                s, settings, c, status_code=code, error=error, final=final, elapsed_s=elapsed
            )
    except Exception as err:  # noqa: BLE001 - the claim lease passes and the row is tried again
        log.warning("webhook %s (job %s): recording attempt %d failed: %s", c.id, c.job_id, c.attempt,
                    type(err).__name__)  # fmt: skip
        return "unrecorded"
    log.info("webhook %s %s (job %s) attempt %d: %s%s", c.id, c.event, c.job_id, c.attempt, outcome,
             f" ({error})" if error else "")  # fmt: skip
    return outcome


class Deliverer:
    """Claims due rows for its free senders and runs each in a daemon thread."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.free = threading.Semaphore(settings.webhook_concurrency)
        self.busy = 0
        self._lock = threading.Lock()

    def _run_one(self, c: webhooks.Claimed) -> None:
        try:
            deliver(self.settings, c)
        finally:
            with self._lock:
                self.busy -= 1
            self.free.release()

    def round(self) -> int:
        """Claim and start what the free senders can take now; returns how many were started."""
        with self._lock:
            slots = self.settings.webhook_concurrency - self.busy
        if slots <= 0:
            return 0
        with session_scope(self.settings.db_url) as s:
            claimed = webhooks.claim_due(s, self.settings, slots)
        for c in claimed:
            self.free.acquire()
            with self._lock:
                self.busy += 1
            threading.Thread(target=self._run_one, args=(c,), name=f"webhook-{c.id[:8]}", daemon=True).start()
        return len(claimed)


def _loop(settings: Settings, stop: threading.Event) -> None:
    d = Deliverer(settings)
    while not stop.is_set():
        try:
            started = d.round()
        except Exception as err:  # noqa: BLE001 - database down: try again next round
            log.warning("webhook round failed: %s", type(err).__name__)
            started = 0
        stop.wait(0.05 if started else settings.webhook_poll_s)


def start(settings: Settings, stop: threading.Event | None = None) -> threading.Thread:
    if stop is None:
        _stop.clear()
        stop = _stop
    t = threading.Thread(target=_loop, args=(settings, stop), name="divmerge-webhooks", daemon=True)
    t.start()
    return t


def stop() -> None:
    _stop.set()
