"""Expert scores on disk: an expert is scored once per (weights, tokenizer, eval set, scoring settings).

Entries are small JSON files (per-example correctness) in the ``evaluations`` folder of the teacher cache
(:func:`~divmerge_core.learned.teacher_cache.cache_dir`), written to a temporary file and renamed into place, so a
reader never sees half an entry. Label-free expert outputs are not cached (they are distributions, and
recomputed with the merge). A teacher-cache bound of 0 ("keep nothing") turns this cache off as well.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from ..learned.teacher_cache import cache_bytes, cache_dir, entry_key
from ..options import EngineOptions
from .scoring import Scores

FORMAT_VERSION = 1


class ExpertScoreCache:
    def __init__(self, options: EngineOptions):
        self.folder: Path | None = cache_dir(options) / "evaluations" if cache_bytes(options) > 0 else None
        self.hits = 0

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        return entry_key({"evaluation": FORMAT_VERSION, **parts})

    def get(self, key: str) -> Scores | None:
        if self.folder is None:
            return None
        path = self.folder / f"{key}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            scores = Scores.from_json(data["scores"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        with contextlib.suppress(OSError):
            os.utime(path)
        self.hits += 1
        return scores

    def put(self, key: str, scores: Scores) -> None:
        if self.folder is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{key}.{secrets.token_hex(4)}.tmp"
            tmp.write_text(
                json.dumps({"format": FORMAT_VERSION, "scores": scores.to_json()}), encoding="utf-8"
            )
            os.replace(tmp, self.folder / f"{key}.json")
        except OSError:  # a cache that cannot be written only costs time
            with contextlib.suppress(OSError):
                tmp.unlink()
