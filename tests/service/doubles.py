"""Test doubles for what cannot run here. Only the Hub upload side: downloads use a real local Hub (olah)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import uuid
from pathlib import Path

import httpx


class _Response:
    def __init__(self, status_code: int):
        self.status_code = status_code


class FakeHubServerError(Exception):
    """Shaped like huggingface_hub's HTTP errors: carries ``response.status_code``."""

    def __init__(self, status_code: int):
        super().__init__(f"HTTP {status_code}")
        self.response = _Response(status_code)


class FakeHubUploadDouble:
    """Stands in for :class:`divmerge_worker.upload.HubUploader` (olah is download-only). Records every upload in
    ``$DIVMERGE_TEST_FAKE_HUB_DIR/uploads.jsonl`` and keeps a copy of the files; the token is recorded only
    as a hash, to check which one the worker used. Failures, to exercise the delivery retries:

    - the first upload to a repo named ``*flaky*`` fails with HTTP 503;
    - the first N uploads to a repo named ``*connfail-N*`` fail with a real connection error (httpx
      connecting to a local port nothing listens on);
    - every upload to a repo fails that way while the file ``blocked-<org>__<name>`` exists in the fake
      Hub's folder (the Hub is "down" until the test removes it);
    - the first upload to a repo named ``*dies-after-upload*`` is recorded, then the worker process is
      killed (SIGKILL) before it can record it: the next attempt must find that upload, not upload again.
    """

    def __init__(self, token: str | None):
        self.root = Path(os.environ["DIVMERGE_TEST_FAKE_HUB_DIR"])
        self.root.mkdir(parents=True, exist_ok=True)
        self.token_sha = hashlib.sha256(token.encode()).hexdigest() if token else None

    @staticmethod
    def uploads(root: Path) -> list[dict]:
        log = Path(root) / "uploads.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]

    def commits(self, repo_id: str) -> list[tuple[str, str]]:
        """The Hub's side of :meth:`divmerge_worker.upload.HubUploader.commits`: the commits recorded for the repo,
        newest first. Whether one of them is this job's upload is decided by ``divmerge_worker.upload``."""
        return [
            (r["commit"], r["message"]) for r in reversed(self.uploads(self.root)) if r["repo_id"] == repo_id
        ]

    @staticmethod
    def blocked_marker(root: Path, repo_id: str) -> Path:
        return Path(root) / f"blocked-{repo_id.replace('/', '__')}"

    def upload(self, folder: Path, repo_id: str, *, private: bool, message: str) -> tuple[str, str]:
        slug = repo_id.replace("/", "__")
        flaky = self.root / f"failed-once-{slug}"
        if "flaky" in repo_id and not flaky.exists():  # the first upload to a 'flaky' repo answers 503
            flaky.touch()
            raise FakeHubServerError(503)
        tries = self.root / f"tries-{slug}"
        n = int(tries.read_text()) + 1 if tries.exists() else 1
        tries.write_text(str(n))
        fail = re.search(r"connfail-(\d+)", repo_id)
        if (fail and n <= int(fail.group(1))) or self.blocked_marker(self.root, repo_id).exists():
            _connect_to_closed_port()
        commit = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        shutil.copytree(folder, self.root / "repos" / repo_id / commit)
        rec = {
            "repo_id": repo_id,
            "commit": commit,
            "message": message,
            "private": private,
            "token_sha256": self.token_sha,
            "files": sorted(p.name for p in Path(folder).iterdir()),
        }
        with open(self.root / "uploads.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        died = self.root / f"died-after-{slug}"
        if "dies-after-upload" in repo_id and not died.exists():
            died.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return "main", commit


def _connect_to_closed_port() -> None:
    """Raise the real ``httpx.ConnectError`` of a Hub that does not answer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        httpx.post(f"http://127.0.0.1:{port}/api/repos/create", timeout=2)
    raise AssertionError("a connection to a closed port succeeded")
