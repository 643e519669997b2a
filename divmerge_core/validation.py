"""Compatibility checks run before any merge work, from config.json and safetensors headers only.

Every mismatch is collected (architecture, model type, vocabulary size, tied embeddings, tensor names,
shapes, dtype families) and reported at once in one :class:`IncompatibleModelsError`, so a user fixes a
config in one round trip. Problems that make a model unreadable (no weights, pickle refused, quantized)
are raised as they are met, by :class:`~divmerge_core.io.loading.Checkpoint`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import IncompatibleModelsError
from .io.lora import open_model
from .io.refs import ResolvedModel
from .options import EngineOptions

#: Show at most this many tensor names when listing missing/extra tensors of one model.
_SHOW = 5


@dataclass
class ModelHeader:
    """What validation needs from one model: its config and its tensors' shapes and dtypes."""

    label: str
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]


@dataclass
class ValidationReport:
    """The reference model's layout (the first model checked), shared by all models once validated."""

    reference: ModelHeader

    @property
    def model_config(self) -> dict[str, Any]:
        return self.reference.config

    @property
    def tensor_names(self) -> list[str]:
        return list(self.reference.shapes)

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.reference.shapes.values())


def read_header(label: str, folder: Path | ResolvedModel, options: EngineOptions) -> ModelHeader:
    """``folder``: a model folder, or a resolved model (a LoRA expert reads as base + adapter)."""
    with open_model(folder, options) as ckpt:
        names = ckpt.names
        return ModelHeader(
            label=label,
            config=ckpt.config,
            shapes={n: ckpt.shape(n) for n in names},
            dtypes={n: ckpt.dtype(n) for n in names},
        )


def validate_models(
    models: Sequence[tuple[str, Path | ResolvedModel]],
    options: EngineOptions,
    vocab_tensors: Sequence[str] | None = None,
) -> ValidationReport:
    """Check that every model can be merged with the first one. ``models`` is (label, folder or resolved
    model) pairs. ``vocab_tensors``: a tokenizer source aligns the vocabularies, so ``vocab_size`` may differ
    and so may these tensors' first dimension (their token rows)."""
    headers = [read_header(label, folder, options) for label, folder in models]
    problems = find_problems(headers, vocab_tensors)
    if problems:
        if vocab_tensors is None and any("has vocab_size" in p for p in problems):
            problems.append(
                "the vocabularies differ: set 'tokenizer_source' (base, union or a model) to merge them, "
                "as in mergekit"
            )
        raise IncompatibleModelsError(problems)
    return ValidationReport(reference=headers[0])


def find_problems(headers: Sequence[ModelHeader], vocab_tensors: Sequence[str] | None = None) -> list[str]:
    """Every mismatch between ``headers[0]`` and each other model, one readable line each."""
    ref, problems = headers[0], []
    vocab = set(vocab_tensors) if vocab_tensors is not None else None
    for other in headers[1:]:
        problems += _config_problems(ref, other, vocab is not None)
        problems += _tensor_problems(ref, other, vocab or set())
    return problems


def _vocab_size(config: dict[str, Any]) -> int | None:
    if config.get("vocab_size") is not None:
        return config["vocab_size"]
    text = config.get("text_config")
    return text.get("vocab_size") if isinstance(text, dict) else None


def _tied(config: dict[str, Any]) -> bool:
    """``tie_word_embeddings``, or the model type's default when config.json does not say."""
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    try:
        from transformers import AutoConfig

        return bool(AutoConfig.for_model(config.get("model_type", "")).tie_word_embeddings)
    except Exception:  # noqa: BLE001 - unknown model type: transformers' own default
        return True


def _config_problems(ref: ModelHeader, other: ModelHeader, aligned: bool = False) -> list[str]:
    out = []
    checks = [
        ("architecture", lambda c: c.get("architectures")),
        ("model_type", lambda c: c.get("model_type")),
        ("vocab_size", _vocab_size),
        ("tie_word_embeddings", _tied),
    ]
    if aligned:
        checks.pop(2)  # a tokenizer source aligns the vocabularies
    if ref.config.get("model_type") == other.config.get("model_type") and not any(
        "tie_word_embeddings" in c for c in (ref.config, other.config)
    ):
        checks.pop()  # both take the same model-type default: equal, without importing transformers
    for what, get in checks:
        a, b = get(ref.config), get(other.config)
        if a != b:
            out.append(f"{other.label} has {what} {b!r} but {ref.label} has {a!r}")
    return out


def _family(dtype: torch.dtype) -> str:
    """Float widths mix freely (everything is cast to the compute dtype); other dtypes must match."""
    return "float" if dtype.is_floating_point else str(dtype).removeprefix("torch.")


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOW])
    return shown + (f" and {len(names) - _SHOW} more" if len(names) > _SHOW else "")


def _tensor_problems(ref: ModelHeader, other: ModelHeader, vocab: set[str]) -> list[str]:
    out = []
    missing = [n for n in ref.shapes if n not in other.shapes]
    extra = [n for n in other.shapes if n not in ref.shapes]
    if missing:
        out.append(f"{other.label} lacks {len(missing)} tensor(s) that {ref.label} has: {_names(missing)}")
    if extra:
        out.append(f"{other.label} has {len(extra)} tensor(s) that {ref.label} lacks: {_names(extra)}")
    for name, shape in ref.shapes.items():
        if name not in other.shapes:
            continue
        if name in vocab and other.shapes[name][1:] == shape[1:] and len(other.shapes[name]) == len(shape):
            pass  # token rows are aligned by the tokenizer source
        elif other.shapes[name] != shape:
            out.append(
                f"{other.label}: tensor {name!r} has shape {list(other.shapes[name])}, "
                f"{ref.label} has {list(shape)}"
            )
        fa, fb = _family(ref.dtypes[name]), _family(other.dtypes[name])
        if fa != fb:
            out.append(f"{other.label}: tensor {name!r} is {fb}, {ref.label}'s is {fa}")
    return out
