"""Checks the API makes on a submitted MergeConfig before anything is enqueued (no engine, no torch)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from divmerge_core.config import MergeConfig, is_local_ref, parse_config
from divmerge_core.errors import ConfigError

from .core.config import Settings
from .errors import ApiError

_SECRET_WORDS = ("token", "secret", "password", "authorization")


def parse(body: Any) -> MergeConfig:
    """Validate against the engine's schema; 422 ``invalid_config`` naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_config", "the body must be a JSON object (a merge config)")
    try:
        return parse_config(body)
    except ConfigError as err:
        raise ApiError(422, "invalid_config", err.message, err.field) from None


def normalise(config: MergeConfig) -> dict:
    """The spec as stored and returned: the validated config as JSON, secrets removed."""
    return redact(config.model_dump(mode="json", by_alias=True, exclude_none=True))


def redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items() if not any(w in k.lower() for w in _SECRET_WORDS)}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_paths(config: MergeConfig, settings: Settings) -> None:
    """Every local path the spec names must be absolute, free of '..', and under an allow-listed root."""
    roots = settings.roots
    if config.base_model and is_local_ref(config.base_model):
        _check_path(config.base_model, roots, "base_model")
    for i, m in enumerate(config.models):
        if is_local_ref(m.model):
            _check_path(m.model, roots, f"models.{i}.model")
        if m.data is not None and m.data.path is not None:
            _check_path(m.data.path, roots, f"models.{i}.data.path")
    if config.output is not None and config.output.path is not None:
        _check_path(config.output.path, roots, "output.path")


def _check_path(raw: str, roots: tuple[Path, ...], field: str) -> None:
    text = raw[len("file://") :] if raw.startswith("file://") else raw
    if not os.path.isabs(text):
        raise ApiError(422, "path_not_allowed", f"local paths must be absolute: {raw!r}", field)
    if ".." in Path(text).parts:
        raise ApiError(422, "path_not_allowed", f"'..' is not allowed in local paths: {raw!r}", field)
    real = Path(os.path.realpath(text))
    if not any(real == r or r in real.parents for r in roots):
        raise ApiError(422, "path_not_allowed", f"{raw!r} is outside the allowed local roots", field)


def check_limits(config: MergeConfig, settings: Settings) -> None:
    def over(field: str, what: str, value: int, limit: int, status: int = 422) -> None:
        code = "payload_too_large" if status == 413 else "limit_exceeded"
        raise ApiError(status, code, f"{what} is {value}, the limit is {limit}", field)

    if len(config.models) > settings.max_models:
        over("models", "the number of models", len(config.models), settings.max_models)
    max_new_tokens = getattr(config.parameters, "max_new_tokens", 0)  # learned methods only
    if max_new_tokens > settings.max_new_tokens:
        over("parameters.max_new_tokens", "max_new_tokens", max_new_tokens, settings.max_new_tokens)
    n_texts = n_bytes = 0
    for i, m in enumerate(config.models):
        if m.data is None:
            continue
        if m.data.num_samples > settings.max_num_samples:
            over(f"models.{i}.data.num_samples", "num_samples", m.data.num_samples, settings.max_num_samples)
        if m.data.texts is not None:
            n_texts += len(m.data.texts)
            n_bytes += sum(len(t.encode()) for t in m.data.texts)
            if n_texts > settings.max_inline_texts:
                over(
                    f"models.{i}.data.texts", "the number of inline texts", n_texts, settings.max_inline_texts
                )
            if n_bytes > settings.max_inline_text_bytes:
                over(
                    f"models.{i}.data.texts",
                    "inline text bytes",
                    n_bytes,
                    settings.max_inline_text_bytes,
                    413,
                )
