"""Checks the API makes on a submitted MergeConfig before anything is enqueued (no engine, no torch)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from divmerge_core.config import LEARNED_METHODS, TASK_VECTOR_METHODS, MergeConfig, is_local_ref

from .core.config import Settings
from .errors import ApiError

_SECRET_WORDS = ("token", "secret", "password", "authorization")


#: Media types a config body may have (YAML as the CLI writes it, or JSON).
BODY_TYPES = ("application/json", "application/yaml")
_YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


def load_body(raw: bytes, content_type: str | None) -> Any:
    """Decode a (size-checked) body as YAML when its media type says so, else as JSON. YAML is read with
    ``safe_load`` and refused if it uses aliases (a few bytes of aliases can expand to gigabytes)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media in _YAML_TYPES:
        try:
            text = raw.decode("utf-8")
            if any(isinstance(ev, yaml.AliasEvent) for ev in yaml.parse(text)):
                raise ApiError(422, "invalid_yaml", "YAML aliases (*name) are not accepted")
            return yaml.safe_load(text)
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ApiError(
                422, "invalid_yaml", f"the body is not valid YAML: {_one_line(str(err))}"
            ) from None
    try:
        return json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError):
        raise ApiError(422, "invalid_json", "the body is not valid JSON") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


def parse(body: Any) -> MergeConfig:
    """Validate against the engine's schema; 422 ``invalid_config`` naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_config", "the body must be a JSON object (a merge config)")
    try:
        return MergeConfig.model_validate(body)
    except ValidationError as err:
        errs = err.errors()
        field = ".".join(str(p) for p in errs[0]["loc"]) if errs else None
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in errs[:10])
        raise ApiError(422, "invalid_config", msg, field or None) from None


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
        allowed = ", ".join(str(r) for r in roots)
        raise ApiError(
            422, "path_not_allowed", f"{raw!r} is outside the allowed local roots ({allowed})", field
        )


def local_path(raw: str) -> Path:
    return Path(raw[len("file://") :] if raw.startswith("file://") else raw)


def check_submit(config: MergeConfig, settings: Settings, team: str) -> None:
    """The cheap checks that would otherwise fail the job late (after check_paths): local models and data
    exist, a local output does not (unless ``output.overwrite``), a Hub output has a write token."""
    if config.base_model and is_local_ref(config.base_model) and not local_path(config.base_model).is_dir():
        raise ApiError(
            422, "model_not_found", f"model directory {config.base_model!r} does not exist", "base_model"
        )
    for i, m in enumerate(config.models):
        if is_local_ref(m.model) and not local_path(m.model).is_dir():
            raise ApiError(
                422, "model_not_found", f"model directory {m.model!r} does not exist", f"models.{i}.model"
            )
        if m.data is not None and m.data.path is not None and not local_path(m.data.path).is_file():
            raise ApiError(
                422, "invalid_dataset", f"data file {m.data.path!r} does not exist", f"models.{i}.data.path"
            )
    out = config.output
    if out is not None and out.repo_id is not None and settings.hub_write_token(team) is None:
        raise ApiError(
            422,
            "no_hub_token",
            f"no Hub write token is configured for team {team!r}: set DIVMERGE_TEAM_HUB_TOKENS or "
            "DIVMERGE_HUB_TOKEN on the server, or write to a local output.path",
            "output.repo_id",
        )
    if out is not None and out.path is not None and not out.overwrite:
        dest = local_path(out.path)
        if dest.is_file() or (dest.is_dir() and any(dest.iterdir())):
            raise ApiError(
                409,
                "output_exists",
                f"output path {out.path!r} already exists (set output.overwrite: true to replace it)",
                "output.path",
            )


def is_learned(stored: dict) -> bool:
    return stored.get("merge_method") in LEARNED_METHODS


def task_names(stored: dict) -> list[str]:
    """The models that contribute tasks, as the learned methods name them."""
    base = stored.get("base_model")
    drop_base = stored.get("merge_method") in TASK_VECTOR_METHODS
    return [m["model"] for m in stored.get("models", []) if not (drop_base and m["model"] == base)]


def check_limits(config: MergeConfig, settings: Settings) -> None:
    def over(field: str, what: str, value: int, limit: int, status: int = 422) -> None:
        code = "payload_too_large" if status == 413 else "limit_exceeded"
        raise ApiError(status, code, f"{what} is {value}, the limit is {limit}", field)

    if len(config.models) > settings.max_models:
        over("models", "the number of models", len(config.models), settings.max_models)
    if config.parameters.max_new_tokens > settings.max_new_tokens:
        over(
            "parameters.max_new_tokens",
            "max_new_tokens",
            config.parameters.max_new_tokens,
            settings.max_new_tokens,
        )
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
