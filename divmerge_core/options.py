"""Run-time options that are not part of a merge config: they belong to whoever runs the engine."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EngineOptions:
    #: Load pickle ``.bin`` checkpoints (with ``torch.load(weights_only=True)``). Off by default.
    allow_pickle: bool = False
    #: Directories local model/data paths must lie under. ``None`` allows any path (library and CLI use);
    #: the service always passes its allow-list.
    local_roots: tuple[Path, ...] | None = None
    #: Hub token used for downloads (never logged).
    hf_token: str | None = None
    #: Hugging Face cache directory (default: huggingface_hub's, honouring HF_HOME / HF_HUB_CACHE).
    cache_dir: Path | None = None
    #: Largest output shard, in bytes.
    max_shard_size: int = 2 * 1024**3
    #: Teacher-output cache directory (default: $DIVMERGE_TEACHER_CACHE_DIR, else ~/.cache/divmerge/teachers).
    teacher_cache_dir: Path | None = None
    #: Teacher-output cache bound in bytes (default: $DIVMERGE_TEACHER_CACHE_BYTES, else 16 GiB).
    teacher_cache_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Every option but the Hub token, as JSON (the service's dry-run request: the token, a secret,
        travels in the subprocess's environment instead)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "hf_token":
                continue
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = [str(v) for v in value]
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], hf_token: str | None = None) -> EngineOptions:
        """The inverse of :meth:`to_json` (missing keys keep their defaults)."""
        paths = ("cache_dir", "teacher_cache_dir")
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data or f.name == "hf_token":
                continue
            value = data[f.name]
            if f.name == "local_roots" and value is not None:
                value = tuple(Path(v) for v in value)
            elif f.name in paths and value:
                value = Path(value)
            elif f.name in paths:
                value = None
            kwargs[f.name] = value
        return cls(**kwargs, hf_token=hf_token or None)
