"""Run-time options that are not part of a merge config: they belong to whoever runs the engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
