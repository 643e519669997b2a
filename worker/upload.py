"""Put a finished merge where the spec asked: a Hub repo or an allow-listed local directory. Once per job.

A delivery that fails with a transient error raises :class:`TransientError`; the runner retries it without
merging again, and keeps the merged folder for ``POST /retry`` when it runs out of tries.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from divmerge_core.errors import DivMergeError, OutputExistsError, TransientError, http_status, is_transient

#: Written into local outputs and Hub commit messages: lets a retry see that this job already delivered.
MARKER_FILE = ".divmerge-job.json"


class UploadError(DivMergeError):
    code = "upload_failed"


@dataclass(frozen=True)
class Delivery:
    destination: str
    revision: str | None = None
    commit: str | None = None


class Uploader(Protocol):
    def __init__(self, token: str | None): ...

    def find_commit(self, repo_id: str, marker: str) -> str | None:
        """The oid of an earlier commit whose message contains ``marker`` (an upload of this job), if any."""

    def upload(self, folder: Path, repo_id: str, *, private: bool, message: str) -> tuple[str, str]:
        """Create the repo if needed and commit the folder. Returns (revision, commit oid)."""


class HubUploader:
    """Uploads with huggingface_hub (HF_ENDPOINT applies). The token is used, never logged or stored."""

    def __init__(self, token: str | None):
        from huggingface_hub import HfApi

        self._api = HfApi(token=token)

    def find_commit(self, repo_id: str, marker: str) -> str | None:
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            for c in self._api.list_repo_commits(repo_id, repo_type="model"):
                if marker in (c.title or "") or marker in (c.message or ""):
                    return c.commit_id
        except RepositoryNotFoundError:
            return None
        return None

    def upload(self, folder: Path, repo_id: str, *, private: bool, message: str) -> tuple[str, str]:
        self._api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = self._api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=message, repo_type="model"
        )
        return "main", info.oid


def load_uploader(spec: str, token: str | None) -> Uploader:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)(token)


def deliver_hub(folder: Path, repo_id: str, *, private: bool, job_id: str, uploader: Uploader) -> Delivery:
    marker = f"divmerge job {job_id}"
    try:
        commit = uploader.find_commit(repo_id, marker)
        if commit is not None:
            return Delivery(f"hf://{repo_id}", "main", commit)
        revision, commit = uploader.upload(
            folder, repo_id, private=private, message=f"Upload merge ({marker})"
        )
    except DivMergeError:
        raise
    except Exception as err:  # noqa: BLE001 - classify Hub/network failures
        status = http_status(err)
        detail = f"HTTP {status}" if status else type(err).__name__
        if is_transient(err):
            raise TransientError(f"Hub upload to {repo_id!r} failed ({detail})") from None
        raise UploadError(f"Hub upload to {repo_id!r} failed ({detail})") from None
    return Delivery(f"hf://{repo_id}", revision, commit)


def local_already_delivered(dest: Path, job_id: str) -> bool:
    try:
        return json.loads((dest / MARKER_FILE).read_text())["job_id"] == job_id
    except (OSError, ValueError, KeyError):
        return False


def deliver_local(staged: Path, dest: Path, job_id: str, overwrite: bool = False) -> Delivery:
    """Rename the staged folder into place (atomic when it is a sibling of ``dest``). ``overwrite`` replaces
    an existing ``dest``: it is renamed aside first and removed once the new one is in place."""
    if local_already_delivered(dest, job_id):
        return Delivery(str(dest))
    (staged / MARKER_FILE).write_text(json.dumps({"job_id": job_id}))
    if dest.exists() and dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    old = dest.parent / f".{dest.name}.divmerge-replaced-{job_id}"
    aside = overwrite and dest.exists()
    if aside:
        os.rename(dest, old)
    try:
        if staged.parent == dest.parent:
            os.rename(staged, dest)
        else:  # a kept result re-delivered: it may be on another filesystem
            if dest.exists():
                raise FileExistsError(dest)
            shutil.move(str(staged), str(dest))
    except OSError as err:
        if aside and not dest.exists():
            os.rename(old, dest)  # put the previous output back
        if dest.exists():
            raise OutputExistsError(f"output path {str(dest)!r} already exists") from None
        raise UploadError(f"cannot move the result into {str(dest)!r}: {err.strerror}") from None
    remove(old)
    return Delivery(str(dest))


def file_info(folder: Path) -> list[dict]:
    """Name, size and sha256 of each file of a merged folder (what ``GET /files`` lists)."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != MARKER_FILE:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out.append({"name": p.name, "size": p.stat().st_size, "sha256": h.hexdigest()})
    return out


def remove(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
