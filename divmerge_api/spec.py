"""Checks the API makes on a submitted MergeConfig before anything is enqueued (no engine, no torch)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from divmerge_core.config import (
    LEARNED_METHODS,
    TOKENIZER_KINDS,
    MergeConfig,
    compare_config,
    parse_config,
)
from divmerge_core.errors import ConfigError, DivMergeError
from divmerge_core.io.paths import check_folder, check_local_path, strip_scheme
from divmerge_core.io.refs import is_local_model, split_lora
from divmerge_service import webhooks
from divmerge_service.config import Settings

from .errors import ApiError

#: Deepest JSON nesting accepted in a body (a merge config needs 5); checked before parsing.
MAX_JSON_DEPTH = 32


def load_json(raw: bytes) -> Any:
    """Parse a JSON body; 422 ``invalid_json`` for bad JSON or nesting deeper than :data:`MAX_JSON_DEPTH`
    (checked before parsing, which would otherwise recurse without bound)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(422, "invalid_json", "the body is not valid UTF-8 JSON") from None
    if json_depth(text, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ApiError(422, "invalid_json", f"the body nests more than {MAX_JSON_DEPTH} levels deep")
    try:
        return json.loads(text or "null")
    except ValueError:
        raise ApiError(422, "invalid_json", "the body is not valid JSON") from None


def json_depth(text: str, stop_above: int | None = None) -> int:
    """The deepest nesting of ``[``/``{`` in a JSON text (brackets inside strings ignored); the scan stops
    as soon as the depth exceeds ``stop_above``."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub('""', text)):
        if m.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if stop_above is not None and depth > stop_above:
                break
        else:
            depth -= 1
    return deepest


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def _non_finite(value: Any, path: tuple = ()) -> tuple | None:
    """The path of the first NaN or infinite number in a parsed body (JSON ``NaN``, ``Infinity``,
    ``1e999``), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, (*path, key))
        if found is not None:
            return found
    return None


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
    return load_json(raw)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


def parse(body: Any) -> MergeConfig:
    """Validate against the engine's schema; 422 ``invalid_config`` naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_config", "the body must be a JSON object (a merge config)")
    bad = _non_finite(body)
    if bad is not None:
        field = ".".join(str(p) for p in bad)
        raise ApiError(422, "invalid_config", f"{field}: numbers must be finite (no NaN or infinity)", field)
    try:
        return parse_config(body)
    except ConfigError as err:
        raise ApiError(422, "invalid_config", err.message, err.field) from None


#: The submit body's one service-level field, beside the merge config (the engine never sees it).
NOTIFY = "notify"


def split_notify(body: Any) -> tuple[Any, Any]:
    """(the merge config, the ``notify`` value or None): ``notify`` is taken out of a body that is an
    object, so that the engine's schema (which forbids unknown keys) validates the rest."""
    if isinstance(body, dict) and NOTIFY in body:
        body = dict(body)
        return body, body.pop(NOTIFY)
    return body, None


#: The submit body's other service-level field: a learned merge's data-parallel devices.
DEVICES = "devices_per_job"


def split_devices(body: Any) -> tuple[Any, Any]:
    """(the rest of the body, ``devices_per_job`` or None), as :func:`split_notify`."""
    if isinstance(body, dict) and DEVICES in body:
        body = dict(body)
        return body, body.pop(DEVICES)
    return body, None


def check_devices(value: Any, config: MergeConfig, settings: Settings) -> int | None:
    """``devices_per_job``: an integer from 1 to ``DIVMERGE_MAX_DEVICES_PER_JOB``, for a learned method only
    (422 ``invalid_config`` / ``limit_exceeded`` naming the field). None: the worker's setting applies."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(422, "invalid_config", "devices_per_job must be an integer of at least 1", DEVICES)
    if value > settings.max_devices_per_job:
        raise ApiError(
            422,
            "limit_exceeded",
            f"devices_per_job is {value}, the limit is {settings.max_devices_per_job}",
            DEVICES,
        )
    if value > 1 and not config.method.learned:
        raise ApiError(
            422,
            "invalid_config",
            f"devices_per_job applies to learned methods, not {config.merge_method!r}",
            DEVICES,
        )
    return value


def check_notify(notify: Any, settings: Settings) -> dict | None:
    """The job's webhook as stored ({url, events}); 422 ``invalid_notify`` naming the field
    (``notify.url``, ``notify.events``) when the URL is not http(s), holds credentials, or its host is not on
    ``DIVMERGE_WEBHOOK_ALLOWED_HOSTS``, or an event is unknown."""
    if notify is None:
        return None
    if not isinstance(notify, dict):
        raise ApiError(422, "invalid_notify", "notify must be an object {url, events}", NOTIFY)
    unknown = sorted(set(notify) - {"url", "events"})
    if unknown:
        raise ApiError(422, "invalid_notify", f"unknown field {unknown[0]!r}", f"{NOTIFY}.{unknown[0]}")
    try:
        if "url" not in notify:
            raise webhooks.InvalidWebhook("notify.url is required")
        webhooks.check_url(notify["url"], settings)
        events = webhooks.check_events(notify.get("events"))
    except webhooks.InvalidWebhook as err:
        raise ApiError(422, "invalid_notify", err.message, f"{NOTIFY}.{err.field}") from None
    return {"url": notify["url"], "events": events}


def submit_hash(stored: dict, notify: dict | None, devices: int | None = None) -> str:
    """The idempotency hash of a submit: the spec's, with the notify and devices_per_job when there are
    (so a job submitted without them hashes as before)."""
    extra = ({NOTIFY: notify} if notify is not None else {}) | (
        {DEVICES: devices} if devices is not None else {}
    )
    return spec_hash({**stored, **extra})


def normalise(config: MergeConfig) -> dict:
    """The spec as stored, hashed and returned: the validated config as JSON, every field kept. No secret
    can be in it: the schema forbids unknown keys and has no field for one (Hub tokens are settings)."""
    return config.model_dump(mode="json", by_alias=True, exclude_none=True)


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_paths(config: MergeConfig, settings: Settings) -> None:
    """Every local path the spec names must be absolute, free of '..', and under an allow-listed root, and
    every file of a local model folder must resolve under one too (the engine's allow-list, applied at
    submit so that the caller gets a 422 rather than a failed job; the worker checks again)."""
    roots = settings.roots
    for field, raw in _local_models(config):
        real = _allowed(raw, roots, field)
        if real.is_dir():
            _guard(field, lambda: check_folder(real, roots, f"model {raw!r}"))  # noqa: B023
    for i, m in enumerate(config.models):
        if m.data is not None and m.data.path is not None:
            _allowed(m.data.path, roots, f"models.{i}.data.path")
        if m.eval is not None and m.eval.path is not None:
            _allowed(m.eval.path, roots, f"models.{i}.eval.path")
    if config.output is not None and config.output.path is not None:
        _allowed(config.output.path, roots, "output.path")


def _local_models(config: MergeConfig) -> list[tuple[str, str]]:
    """(field, reference) of each local model the spec names, the base first (local as the engine reads
    it: :func:`divmerge_core.io.refs.is_local_model`, so a bare folder name meets the allow-list here)."""
    models = [("base_model", config.base_model)] if config.base_model else []
    models += [(f"models.{i}.model", m.model) for i, m in enumerate(config.models)]
    models += _tokenizer_models(config)
    # a LoRA expert 'base+adapter': each side checked on its own
    parts = [(field, part) for field, raw in models for part in _lora_parts(raw)]
    return [(field, raw) for field, raw in parts if is_local_model(raw)]


def _tokenizer_models(config: MergeConfig) -> list[tuple[str, str]]:
    """(field, reference) of a ``tokenizer_source`` / ``tokenizer.source`` model: it need not be merged.
    (A ``tokens`` row's model must be a model of the merge: the config refuses any other.)"""
    spec = config.tokenizer_spec
    if spec is None or spec.source in TOKENIZER_KINDS:
        return []
    field = "tokenizer_source" if config.tokenizer is None else "tokenizer.source"
    return [(field, spec.source.removeprefix("model:").strip())]


def _lora_parts(raw: str) -> list[str]:
    base, adapter = split_lora(raw)
    return [base] if adapter is None else [base, adapter]


def check_submit(config: MergeConfig, settings: Settings, team: str) -> None:
    """The cheap checks that would otherwise fail the job late (after check_paths): local models and data
    exist, a local output does not (unless ``output.overwrite``), a Hub output has a write token."""
    for field, raw in _local_models(config):
        if not Path(strip_scheme(raw)).is_dir():
            raise ApiError(422, "model_not_found", f"model directory {raw!r} does not exist", field)
    for i, m in enumerate(config.models):
        if m.data is not None and m.data.path is not None and not Path(strip_scheme(m.data.path)).is_file():
            raise ApiError(
                422, "invalid_dataset", f"data file {m.data.path!r} does not exist", f"models.{i}.data.path"
            )
        if m.eval is not None and m.eval.path is not None and not Path(strip_scheme(m.eval.path)).is_file():
            raise ApiError(
                422, "invalid_dataset", f"eval file {m.eval.path!r} does not exist", f"models.{i}.eval.path"
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
        dest = Path(strip_scheme(out.path))
        if dest.is_file() or (dest.is_dir() and any(dest.iterdir())):
            raise ApiError(
                409,
                "output_exists",
                f"output path {out.path!r} already exists (set output.overwrite: true to replace it)",
                "output.path",
            )


def methods_run(config: MergeConfig) -> list[str]:
    """The job's own merge method and those its evaluation compares."""
    compared = [c.merge_method for c in config.evaluation.compare] if config.evaluation else []
    return [config.merge_method, *compared]


def evaluates(config: MergeConfig) -> bool:
    return any(m.eval is not None for m in config.task_models())


def has_evaluation(stored: dict) -> bool:
    """A stored spec (JSON) whose models carry an ``eval`` set."""
    return any(m.get("eval") is not None for m in stored.get("models", []))


def is_learned(stored: dict) -> bool:
    return stored.get("merge_method") in LEARNED_METHODS


def task_names(stored: dict) -> list[str]:
    """A learned merge's tasks, as it names them: its task models (:meth:`MergeConfig.task_models`)."""
    return [m.model for m in parse_config(stored).task_models()]


def _allowed(raw: str, roots: tuple[Path, ...], field: str) -> Path:
    return _guard(field, lambda: check_local_path(raw, roots, field))


def _guard(field: str, check: Callable[[], Any]) -> Any:
    try:
        return check()
    except DivMergeError as err:
        raise ApiError(422, err.code, err.message, field) from None


def check_limits(config: MergeConfig, settings: Settings) -> None:
    def over(field: str, what: str, value: int, limit: int, status: int = 422) -> None:
        code = "payload_too_large" if status == 413 else "limit_exceeded"
        raise ApiError(status, code, f"{what} is {value}, the limit is {limit}", field)

    if len(config.models) > settings.max_models:
        over("models", "the number of models", len(config.models), settings.max_models)
    compared = config.evaluation.compare if config.evaluation else []
    runs = [("parameters", config.parameters)] + [
        (f"evaluation.compare.{j}.parameters", compare_config(config, c).parameters)
        for j, c in enumerate(compared)
    ]
    for where, params in runs:
        for name, limit in (
            ("max_new_tokens", settings.max_new_tokens),
            ("epochs", settings.max_epochs),
            ("max_length", settings.max_length),
            ("batch_size_per_task", settings.max_batch_size_per_task),
        ):
            value = getattr(params, name, None)  # the learned methods' parameters
            if value is not None and value > limit:
                over(f"{where}.{name}", name, value, limit)
    n_texts = n_bytes = 0
    for i, m in enumerate(config.models):
        for block, source in (("data", m.data), ("eval", m.eval)):
            if source is None:
                continue
            where = f"models.{i}.{block}"
            if source.num_samples > settings.max_num_samples:
                over(f"{where}.num_samples", "num_samples", source.num_samples, settings.max_num_samples)
            if source.texts is None:
                continue
            n_texts += len(source.texts)
            n_bytes += sum(len(t.encode()) for t in source.texts)
            if n_texts > settings.max_inline_texts:
                over(f"{where}.texts", "the number of inline texts", n_texts, settings.max_inline_texts)
            if n_bytes > settings.max_inline_text_bytes:
                over(
                    f"{where}.texts",
                    "inline text bytes",
                    n_bytes,
                    settings.max_inline_text_bytes,
                    413,
                )
