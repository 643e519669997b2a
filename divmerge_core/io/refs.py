"""Model references: a Hub id with optional revision, or a local directory; resolved to a folder and a commit.

A LoRA expert is ``base+adapter`` (mergekit's syntax: each side a Hub id, ``@revision`` allowed, or a local
path), or a bare adapter folder (or Hub repo) whose ``adapter_config.json`` names the base
(``base_model_name_or_path``). Both sides are resolved like any model: the same allow-list and Hub download.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import is_local_ref, is_whole_local_folder
from ..errors import (
    ConfigError,
    ModelNotFoundError,
    TransientError,
    UnsupportedAdapterError,
    http_status,
    is_transient,
)
from ..options import EngineOptions
from .paths import check_folder, check_local_path, check_tree, real_roots, strip_scheme

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Files a merge needs from a model repo. Pickle weights are fetched only when allowed.
_SAFE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "tokenizer*", "*.md"]


@dataclass(frozen=True)
class ModelRef:
    raw: str
    repo_id: str | None = None
    revision: str | None = None
    path: Path | None = None
    #: ``base+adapter``: this ref is the base (``raw`` the whole text), ``adapter`` the LoRA's reference.
    adapter: ModelRef | None = None

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
    #: A LoRA expert: the adapter applied over ``path`` (which is then the base's folder: its config.json,
    #: tokenizer and tensors); :func:`divmerge_core.io.lora.open_model` reads the expert's weights.
    adapter: ResolvedAdapter | None = None


@dataclass(frozen=True)
class ResolvedAdapter:
    #: the adapter's own reference (``./adapter``, ``org/adapter@rev``)
    raw: str
    path: Path
    commit: str | None


def is_adapter_folder(folder: Path) -> bool:
    """A peft adapter folder: ``adapter_config.json`` and no ``config.json`` (a full model may ship both)."""
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def read_adapter_config(folder: Path, label: str) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise ModelNotFoundError(
            f"adapter {label!r} has no {ADAPTER_CONFIG} (not a peft LoRA adapter folder)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"adapter {label!r}: cannot read {ADAPTER_CONFIG}: {err}") from None
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"adapter {label!r}: {ADAPTER_CONFIG} is not a JSON object")
    return config


def adapter_base(folder: Path, label: str) -> str:
    """The base model a bare adapter folder names (``base_model_name_or_path``)."""
    base = read_adapter_config(folder, label).get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise UnsupportedAdapterError(
            f"adapter {label!r}: {ADAPTER_CONFIG} names no base_model_name_or_path; "
            "name the base explicitly as 'base+adapter'"
        )
    return base.strip()


def is_local_model(raw: str) -> bool:
    """The one answer to "is this model reference local?", for the engine and the API alike: a local path
    (absolute, ``./``, ``~``, ``file://``), or, as in mergekit, a bare name such as ``my-expert`` that is
    an existing folder of the current directory; anything else is a Hub id."""
    raw = raw.strip()
    return is_local_ref(raw) or os.path.isdir(raw)


def split_lora(raw: str) -> tuple[str, str | None]:
    """``base+adapter`` -> (base, adapter); anything else -> (raw, None). As in mergekit, one ``+``
    separates the two; more than one is an error. Unlike mergekit, a local folder that exists under its
    whole name (``out/sst2+qnli``) is that folder, not a base and an adapter."""
    raw = raw.strip()
    parts = raw.split("+")
    if len(parts) == 1 or is_whole_local_folder(raw):
        return raw, None
    if len(parts) > 2 or not parts[0].strip() or not parts[1].strip():
        raise ConfigError(
            f"model reference {raw!r}: a LoRA expert is 'base+adapter' (one '+', both sides non-empty)",
            field="models",
        )
    return parts[0].strip(), parts[1].strip()


def parse_model_ref(raw: str) -> ModelRef:
    """A local path (see :func:`is_local_model`), else a Hub id with an optional ``@revision``; either
    may be ``base+adapter`` (``adapter`` set)."""
    raw = raw.strip()
    base, adapter = split_lora(raw)
    if adapter is not None:
        b, a = parse_model_ref(base), parse_model_ref(adapter)
        return ModelRef(raw=raw, repo_id=b.repo_id, revision=b.revision, path=b.path, adapter=a)
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
    if ref.adapter is not None:  # base+adapter (the adapter's own base_model_name_or_path is not read)
        adapter = _resolve_adapter(ref.adapter.raw, ref.adapter, options)
        base = _resolve_folder(split_lora(raw)[0], ref, options, "model", base_of=raw)
    else:
        path, commit, allowed = _resolve_folder(ref.raw, ref, options, "model")
        if not is_adapter_folder(path):
            return ResolvedModel(ref=ref, path=path, commit=commit, allowed=allowed)
        # a bare adapter folder or repo: its adapter_config.json names the base
        adapter = ResolvedAdapter(ref.raw, path, commit)
        base_raw = adapter_base(path, ref.raw)
        base_ref = parse_model_ref(base_raw)
        if base_ref.adapter is not None:
            raise ConfigError(f"adapter {ref.raw!r}: its base {base_raw!r} is itself 'base+adapter'")
        base = _resolve_folder(base_raw, base_ref, options, "model", base_of=raw)
    path, commit, allowed = base
    if is_adapter_folder(path):
        raise ConfigError(
            f"the base of LoRA expert {raw!r} is itself an adapter; name a full model as the base"
        )
    return ResolvedModel(ref=ref, path=path, commit=commit, allowed=allowed, adapter=adapter)


def _resolve_adapter(name: str, ref: ModelRef, options: EngineOptions) -> ResolvedAdapter:
    path, commit, _ = _resolve_folder(name, ref, options, "adapter")
    if not (path / ADAPTER_CONFIG).is_file():
        raise ModelNotFoundError(f"adapter {name!r} has no {ADAPTER_CONFIG} (not a peft LoRA adapter folder)")
    return ResolvedAdapter(raw=name, path=path, commit=commit)


def _resolve_folder(
    name: str, ref: ModelRef, options: EngineOptions, what: str, base_of: str | None = None
) -> tuple[Path, str | None, tuple[Path, ...] | None]:
    """One folder, local (allow-listed) or a Hub snapshot, every file checked: (path, commit, allowed).
    ``name``: the reference's text; ``base_of``: the LoRA expert whose base this is (for the messages)."""
    of = f" (the base of LoRA expert {base_of!r})" if base_of else ""
    if ref.is_local:
        path = check_local_path(strip_scheme(name), options.local_roots, f"{what} path")
        if not path.is_dir():
            raise ModelNotFoundError(f"{what} directory {name!r} does not exist{of}")
        allowed = real_roots(options.local_roots)
        check_folder(path, allowed, f"{what} {name!r}")
        return path, None, allowed
    snap = _snapshot(ref.repo_id or "", ref.revision, options, "model")
    allowed = snapshot_roots(snap["path"], options)
    check_folder(snap["path"], allowed, f"{what} {name!r}")
    return snap["path"], snap["commit"], allowed


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
