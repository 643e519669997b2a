"""Test doubles for what cannot run here. Only the Hub upload side: downloads use a real local Hub (olah)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path


class _Response:
    def __init__(self, status_code: int):
        self.status_code = status_code


class FakeHubServerError(Exception):
    """Shaped like huggingface_hub's HTTP errors: carries ``response.status_code``."""

    def __init__(self, status_code: int):
        super().__init__(f"HTTP {status_code}")
        self.response = _Response(status_code)


class FakeHubUploadDouble:
    """Stands in for :class:`worker.upload.HubUploader` (olah is download-only). Records every upload in
    ``$DIVMERGE_TEST_FAKE_HUB_DIR/uploads.jsonl`` and keeps a copy of the files; the token is recorded only
    as a hash, to check which one the worker used. The first upload to a repo named ``*flaky*`` fails with
    HTTP 503, to exercise the transient-error retry."""

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

    def find_commit(self, repo_id: str, marker: str) -> str | None:
        for rec in self.uploads(self.root):
            if rec["repo_id"] == repo_id and marker in rec["message"]:
                return rec["commit"]
        return None

    def upload(self, folder: Path, repo_id: str, *, private: bool, message: str) -> tuple[str, str]:
        flaky = self.root / f"failed-once-{repo_id.replace('/', '__')}"
        if "flaky" in repo_id and not flaky.exists():  # the first upload to a 'flaky' repo answers 503
            flaky.touch()
            raise FakeHubServerError(503)
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
        return "main", commit
