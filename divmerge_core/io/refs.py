"""Model references: a Hub id with optional revision, or a local directory; resolved to a folder and a commit."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..config import is_local_ref
from ..errors import ModelNotFoundError, TransientError, http_status, is_transient
from ..options import EngineOptions
from .paths import check_folder, check_local_path, check_tree, real_roots, strip_scheme

#: Files a merge needs from a model repo. Pickle weights are fetched only when allowed.
_SAFE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "tokenizer*", "*.md"]


@dataclass(frozen=True)
class ModelRef:
    raw: str
    repo_id: str | None = None
    revision: str | None = None
    path: Path | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None


@dataclass(frozen=True)
class ResolvedModel:
    ref: ModelRef
    path: Path
    #: The Hub commit SHA the revision resolved to (None for local directories).
    commit: str | None
    #: Real paths the folder's files may resolve under (None: anywhere, when no roots are configured).
    allowed: tuple[Path, ...] | None = None


def is_local_model(raw: str) -> bool:
    """The one answer to "is this model reference local?", for the engine and the API alike: a local path
    (absolute, ``./``, ``~``, ``file://``), or, as in mergekit, a bare name such as ``my-expert`` that is
    an existing folder of the current directory; anything else is a Hub id."""
    raw = raw.strip()
    return is_local_ref(raw) or os.path.isdir(raw)


def parse_model_ref(raw: str) -> ModelRef:
    """A local path (see :func:`is_local_model`), else a Hub id with an optional ``@revision``."""
    raw = raw.strip()
    if is_local_model(raw):
        return ModelRef(raw=raw, path=Path(os.path.expanduser(strip_scheme(raw))))
    repo_id, _, revision = raw.partition("@")
    return ModelRef(raw=raw, repo_id=repo_id, revision=revision or None)


def resolve_model(raw: str, options: EngineOptions) -> ResolvedModel:
    """Find the model's folder: a local directory, or a Hub snapshot (HF_ENDPOINT, offline mode and cache apply).

    With allow-listed roots, every file of the folder must resolve under them (a Hub snapshot's files
    under the cache's blobs of that repo), and index shard names must be plain file names.
    """
    ref = parse_model_ref(raw)
    if ref.is_local:
        path = check_local_path(strip_scheme(ref.raw), options.local_roots, "model path")
        if not path.is_dir():
            raise ModelNotFoundError(f"model directory {ref.raw!r} does not exist")
        allowed = real_roots(options.local_roots)
        check_folder(path, allowed, f"model {ref.raw!r}")
        return ResolvedModel(ref=ref, path=path, commit=None, allowed=allowed)
    snap = _snapshot(ref.repo_id or "", ref.revision, options, "model")
    allowed = snapshot_roots(snap["path"], options)
    check_folder(snap["path"], allowed, f"model {ref.raw!r}")
    return ResolvedModel(ref=ref, **snap, allowed=allowed)


def snapshot_roots(snapshot: Path, options: EngineOptions) -> tuple[Path, ...] | None:
    """Where a Hub snapshot's files may resolve: the snapshot itself and its repo's ``blobs`` folder in the
    HF cache (``.../models--org--name/snapshots/<sha>`` -> ``.../models--org--name/blobs``). None (no
    restriction) when no roots are configured."""
    if options.local_roots is None:
        return None
    return real_roots([snapshot, snapshot.parent.parent / "blobs"])


def _snapshot(repo_id: str, revision: str | None, options: EngineOptions, repo_type: str) -> dict:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = list(_SAFE_PATTERNS)
    if repo_type == "model" and options.allow_pickle:
        patterns.append("*.bin")
    if repo_type == "dataset":
        patterns = None  # a dataset repo's files are all data
    name = f"{repo_type} {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        folder = snapshot_download(
            repo_id,
            repo_type=repo_type,
            revision=revision,
            allow_patterns=patterns,
            token=options.hf_token,
            cache_dir=str(options.cache_dir) if options.cache_dir else None,
        )
    except GatedRepoError:
        raise ModelNotFoundError(f"{name} is gated: the server's Hub token has no access to it") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{name}: revision not found") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{name} was not found on the Hub (or is private)") from None
    except LocalEntryNotFoundError:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise ModelNotFoundError(f"{name} is not in the local cache (offline mode is on)") from None
        # not cached and the Hub did not answer: a network problem, worth retrying
        raise TransientError(f"{name} is not cached and the Hub cannot be reached") from None
    except EntryNotFoundError:
        raise ModelNotFoundError(f"{name}: a file listed by the Hub could not be found") from None
    except HfHubHTTPError as err:
        status = http_status(err)
        if not is_transient(err):
            raise ModelNotFoundError(f"{name}: the Hub answered HTTP {status}") from None
        raise TransientError(f"{name}: the Hub is unavailable (HTTP {status})") from None
    except Exception as err:
        if not is_transient(err):
            raise
        raise TransientError(f"{name}: cannot reach the Hub ({type(err).__name__})") from None
    path = Path(folder)
    # snapshot folders are named after the commit they hold: .../snapshots/<sha>
    commit = path.name if len(path.name) == 40 else None
    return {"path": path, "commit": commit}


def resolve_dataset_repo(repo_ref: str, options: EngineOptions) -> tuple[Path, str | None]:
    """Download a Hub dataset repo snapshot; return its folder and commit SHA."""
    repo_id, _, revision = repo_ref.partition("@")
    from ..errors import DatasetError

    try:
        snap = _snapshot(repo_id, revision or None, options, "dataset")
    except ModelNotFoundError as err:
        raise DatasetError(str(err)) from None
    check_tree(snap["path"], snapshot_roots(snap["path"], options), f"dataset {repo_ref!r}")
    return snap["path"], snap["commit"]
