"""The Python client: one method per endpoint of ``/v1/merges``, plus :meth:`Client.wait` and
:meth:`Client.download`."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

FINISHED = ("succeeded", "failed", "cancelled")


class ClientError(Exception):
    """The server refused a request (``status``, ``code``, ``field`` from its error body) or could not be
    reached (``status`` 0)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        where = f" ({field})" if field else ""
        super().__init__(f"{code}: {message}{where}" if status else message)
        self.status, self.code, self.message, self.field = status, code, message, field


class Client:
    """``Client(server, token)``; both default to ``$DIVMERGE_URL`` and ``$DIVMERGE_TOKEN``."""

    def __init__(self, server: str | None = None, token: str | None = None, timeout: float = 60.0):
        server = server or os.environ.get("DIVMERGE_URL") or "http://127.0.0.1:8000"
        token = token or os.environ.get("DIVMERGE_TOKEN")
        if not token:
            raise ClientError(0, "no_token", "no API token: pass --token or set DIVMERGE_TOKEN")
        self.server = server.rstrip("/")
        self._http = httpx.Client(
            base_url=self.server, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- requests
    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as err:
            raise ClientError(0, "unreachable", f"cannot reach {self.server}: {err}") from None
        if r.status_code >= 400:
            self._raise(r)
        return r

    @staticmethod
    def _body(config: dict | str | Path) -> dict[str, Any]:
        """A dict is sent as JSON; a path (or YAML text) as ``application/yaml``, read as it is."""
        if isinstance(config, dict):
            return {"json": config}
        text = Path(config).read_text(encoding="utf-8") if Path(str(config)).is_file() else str(config)
        return {"content": text.encode(), "headers": {"Content-Type": "application/yaml"}}

    def submit(self, config: dict | str | Path, idempotency_key: str | None = None) -> dict:
        kw = self._body(config)
        if idempotency_key:
            kw.setdefault("headers", {})["Idempotency-Key"] = idempotency_key
        return self._request("POST", "/v1/merges", **kw).json()

    def validate(self, config: dict | str | Path) -> dict:
        return self._request("POST", "/v1/merges/validate", **self._body(config)).json()

    def get(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/merges/{job_id}").json()

    def jobs(self, status: str | None = None, limit: int = 20) -> list[dict]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return self._request("GET", "/v1/merges", params=params).json()["items"]

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/v1/merges/{job_id}/cancel").json()

    def retry(self, job_id: str) -> dict:
        return self._request("POST", f"/v1/merges/{job_id}/retry").json()

    def events(self, job_id: str) -> list[dict]:
        return self._request("GET", f"/v1/merges/{job_id}/events").json()["events"]

    def files(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/merges/{job_id}/files").json()

    def coefficients(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/merges/{job_id}/coefficients").json()

    def evaluation(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/merges/{job_id}/evaluation").json()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until the server answers ``/healthz`` (a server just started); ClientError after
        ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._request("GET", "/healthz")
                return
            except ClientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    # ---------------------------------------------------------------- helpers
    def wait(self, job_id: str, on_update: Callable[[dict], None] | None = None, poll_s: float = 1.0) -> dict:
        """Poll until the job finishes; ``on_update`` sees every job state read. Returns the final job."""
        while True:
            job = self.get(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in FINISHED:
                return job
            time.sleep(poll_s)

    def download(self, job_id: str, folder: str | Path) -> list[Path]:
        """Download every output file of a local destination into ``folder``, checking each sha256."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        listing = self.files(job_id)
        if listing.get("hub"):
            hub = listing["hub"]
            raise ClientError(
                409, "hub_output", f"the output is on the Hub: {hub['repo_id']}@{hub['commit']}"
            )
        written = []
        for f in listing["files"]:
            name = Path(f["name"]).name  # the server lists plain names; never write outside folder
            target = folder / name
            digest = hashlib.sha256()
            with open(target, "wb") as out:
                for chunk in self._stream(f"/v1/merges/{job_id}/files/{name}"):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != f["sha256"]:
                raise ClientError(0, "checksum_mismatch", f"{name}: the downloaded file's sha256 differs")
            written.append(target)
        return written

    def _stream(self, path: str) -> Iterator[bytes]:
        try:
            with self._http.stream("GET", path) as r:
                if r.status_code >= 400:
                    r.read()
                    self._raise(r)
                yield from r.iter_bytes(1 << 20)
        except httpx.HTTPError as err:
            raise ClientError(0, "unreachable", f"cannot reach {self.server}: {err}") from None

    @staticmethod
    def _raise(r: httpx.Response) -> None:
        try:
            e = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            raise ClientError(r.status_code, "http_error", f"HTTP {r.status_code}") from None
        raise ClientError(r.status_code, e["code"], e["message"], e.get("field"))
