"""The local-path allow-list: the one place that decides whether a file or folder may be read or written.

The service configures allow-listed roots; every local path a spec names, and every file the engine then
opens or copies from a model or dataset folder, is resolved (symlinks and ``..`` followed, ``realpath``)
and must lie under one of them. With no roots (the CLI and library default) any local path is accepted,
but shard names in an index must still be plain file names of the same folder.

Nothing here imports torch: the API process uses it to check a spec before enqueueing it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import ModelNotFoundError, PathNotAllowedError

Roots = Sequence[Path] | None


def strip_scheme(raw: str) -> str:
    """``file:///srv/m`` -> ``/srv/m``; anything else unchanged."""
    return raw[len("file://") :] if raw.startswith("file://") else raw


def _describe(roots: Sequence[Path]) -> str:
    return ", ".join(repr(str(r)) for r in roots) or "(none)"


def real_roots(roots: Roots) -> tuple[Path, ...] | None:
    """The roots as real paths (None stays None: no restriction)."""
    if roots is None:
        return None
    return tuple(dict.fromkeys(Path(os.path.realpath(os.path.expanduser(r))) for r in roots))


def is_under(real: Path, roots: Sequence[Path]) -> bool:
    """Whether the real path ``real`` is one of ``roots`` (real paths) or inside one."""
    return any(real == r or r in real.parents for r in roots)


def check_local_path(raw: str | Path, roots: Roots, what: str) -> Path:
    """The real path of a local path a spec names, refused (``PathNotAllowedError`` naming ``what``, the
    path and the roots) unless it lies under an allowed root. With roots configured the path must be
    absolute and free of ``..``; with ``roots=None`` any path is accepted (``~`` expanded)."""
    text = strip_scheme(str(raw))
    if roots is None:
        return Path(os.path.realpath(os.path.expanduser(text)))
    allowed = real_roots(roots) or ()
    if "\x00" in text:
        raise PathNotAllowedError(f"{what} {text!r} contains a NUL byte")
    if not os.path.isabs(text):
        raise PathNotAllowedError(
            f"{what} {text!r}: local paths must be absolute (allowed roots: {_describe(allowed)})"
        )
    if ".." in Path(text).parts:
        raise PathNotAllowedError(
            f"{what} {text!r}: '..' is not allowed in local paths (allowed roots: {_describe(allowed)})"
        )
    real = Path(os.path.realpath(text))
    if not is_under(real, allowed):
        raise PathNotAllowedError(
            f"{what} {text!r} is outside the allowed local roots ({_describe(allowed)})"
        )
    return real


def check_file(path: Path, allowed: Sequence[Path] | None, what: str) -> Path:
    """The real path of a file the engine is about to read or copy; refused if it resolves outside
    ``allowed`` (real paths; None: no restriction). Catches symlinks to secrets, ``/proc`` and the like."""
    real = Path(os.path.realpath(path))
    if allowed is not None and not is_under(real, allowed):
        raise PathNotAllowedError(
            f"{what} {str(path)!r} resolves to {str(real)!r}, outside the allowed local roots "
            f"({_describe(allowed)})"
        )
    return real


def plain_name(name: object, folder: Path, index: str) -> str:
    """A shard name from an index's weight_map: a plain file name of the same folder (no '/', no '..')."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "\x00" in name
        or "/" in name
        or "\\" in name
    ):
        raise PathNotAllowedError(
            f"{str(folder / index)!r} names shard {name!r}: shards must be plain file names in the same folder"
        )
    return name


def index_shards(folder: Path, index: str) -> list[str]:
    """The distinct shard names an index file lists, each checked to be a plain file name."""
    path = folder / index
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"cannot read {str(path)!r}: {err}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ModelNotFoundError(f"{str(path)!r} has no 'weight_map' mapping")
    return list(dict.fromkeys(plain_name(v, folder, index) for v in weight_map.values()))


def check_folder(folder: Path, allowed: Sequence[Path] | None, what: str) -> None:
    """Every file at the top of a model folder (the engine and transformers read only those) must resolve
    under ``allowed``, and every shard an index names must be a plain file name of the folder."""
    for entry in sorted(folder.iterdir()):
        if entry.is_file() or entry.is_symlink():
            check_file(entry, allowed, f"{what}: file")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            index_shards(folder, index)


def check_tree(folder: Path, allowed: Sequence[Path] | None, what: str) -> None:
    """Like :func:`check_folder` for a dataset snapshot, whose files may sit in sub-folders."""
    for dirpath, dirs, files in os.walk(folder):  # symlinked folders are checked, not walked into
        for name in files + [d for d in dirs if (Path(dirpath) / d).is_symlink()]:
            check_file(Path(dirpath) / name, allowed, f"{what}: file")
