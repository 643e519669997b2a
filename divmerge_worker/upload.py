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
from pathlib import Path
from typing import Protocol

from divmerge_core.errors import DivMergeError, OutputExistsError, TransientError, http_status, is_transient
from divmerge_service.contracts import FileInfo, HubDestination, LocalDestination

#: Written into local outputs and Hub commit messages: lets a retry see that this job already delivered.
MARKER_FILE = ".divmerge-job.json"


class UploadError(DivMergeError):
    code = "upload_failed"


#: Where a merge was delivered: the typed destination of the job's result (:mod:`divmerge_service.contracts`).
Delivery = HubDestination | LocalDestination


class Uploader(Protocol):
    def __init__(self, token: str | None): ...

    def commits(self, repo_id: str) -> list[tuple[str, str]]:
        """(oid, title and message) of each commit of the repo; empty when the repo does not exist."""

    def upload(self, folder: Path, repo_id: str, *, private: bool, message: str) -> tuple[str, str]:
        """Create the repo if needed and commit the folder. Returns (revision, commit oid)."""


class HubUploader:
    """Uploads with huggingface_hub (HF_ENDPOINT applies). The token is used, never logged or stored."""

    def __init__(self, token: str | None):
        from huggingface_hub import HfApi

        self._api = HfApi(token=token)

    def commits(self, repo_id: str) -> list[tuple[str, str]]:
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            found = self._api.list_repo_commits(repo_id, repo_type="model")
        except RepositoryNotFoundError:
            return []
        return [(c.commit_id, f"{c.title or ''}\n{c.message or ''}") for c in found]

    def upload(self, folder: Path, repo_id: str, *, private: bool, message: str) -> tuple[str, str]:
        self._api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = self._api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=message, repo_type="model"
        )
        return "main", info.oid


def load_uploader(spec: str, token: str | None) -> Uploader:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)(token)


def earlier_upload(uploader: Uploader, repo_id: str, job_id: str) -> str | None:
    """The oid of a commit of ``repo_id`` made by an earlier attempt of this job (its message carries the
    job's marker), if any: the job then delivered already and must not upload again."""
    marker = upload_marker(job_id)
    return next((oid for oid, text in uploader.commits(repo_id) if marker in text), None)


def upload_marker(job_id: str) -> str:
    return f"divmerge job {job_id}"


def deliver_hub(
    folder: Path, repo_id: str, *, private: bool, job_id: str, uploader: Uploader
) -> HubDestination:
    """Upload the folder once per job: an attempt after one that uploaded but could not record it (killed,
    database down) finds that commit (:func:`earlier_upload`) and reports it instead."""
    marker = upload_marker(job_id)
    try:
        commit = earlier_upload(uploader, repo_id, job_id)
        if commit is not None:
            return HubDestination(repo_id=repo_id, revision="main", commit=commit)
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
    return HubDestination(repo_id=repo_id, revision=revision, commit=commit)


def local_already_delivered(dest: Path, job_id: str) -> bool:
    try:
        return json.loads((dest / MARKER_FILE).read_text())["job_id"] == job_id
    except (OSError, ValueError, KeyError):
        return False


def deliver_local(staged: Path, dest: Path, job_id: str, overwrite: bool = False) -> LocalDestination:
    """Rename the staged folder (a hidden sibling of ``dest``) into place, atomically. A kept result
    re-delivered from elsewhere (``$DIVMERGE_HOME/kept``, maybe another filesystem) is first copied into such
    a sibling, so ``dest`` never holds half a model; the kept folder stays until the rename succeeded.
    ``overwrite`` replaces an existing ``dest``: it is renamed aside first and removed once the new one is in
    place."""
    if local_already_delivered(dest, job_id):
        return LocalDestination(path=str(dest))
    (staged / MARKER_FILE).write_text(json.dumps({"job_id": job_id}))
    source = staged
    if staged.parent != dest.parent:
        staged = dest.parent / f".{dest.name}.divmerge-job-{job_id}-kept"
        remove(staged)
        try:
            shutil.copytree(source, staged)
        except OSError as err:
            remove(staged)
            raise UploadError(f"cannot copy the result next to {str(dest)!r}: {err.strerror}") from None
    if dest.exists() and dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    old = dest.parent / f".{dest.name}.divmerge-replaced-{job_id}"
    aside = overwrite and dest.exists()
    if aside:
        os.rename(dest, old)
    try:
        os.rename(staged, dest)
    except OSError as err:
        if aside and not dest.exists():
            os.rename(old, dest)  # put the previous output back
        if staged != source:
            remove(staged)
        if dest.exists():
            raise OutputExistsError(f"output path {str(dest)!r} already exists") from None
        raise UploadError(f"cannot move the result into {str(dest)!r}: {err.strerror}") from None
    remove(old)
    if staged != source:
        remove(source)
    return LocalDestination(path=str(dest))


def file_info(folder: Path) -> list[FileInfo]:
    """Name, size and sha256 of each file of a merged folder (what ``GET /files`` lists)."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != MARKER_FILE:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out.append(FileInfo(name=p.name, size=p.stat().st_size, sha256=h.hexdigest()))
    return out


def remove(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
