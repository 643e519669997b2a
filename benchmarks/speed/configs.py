"""Merge configs for the benchmark: one YAML that both our CLI and ``mergekit-yaml`` accept."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .checkpoints import vocab_words


@dataclass(frozen=True)
class MethodSpec:
    """How the benchmark spells one classic method for both tools: its global parameters, the per-model
    parameters, whether a base model is named, and how many experts it takes (``None``: all K)."""

    parameters: dict[str, Any] = field(default_factory=dict)
    per_model: dict[str, Any] = field(default_factory=lambda: {"weight": "1/K"})
    base: bool = True
    n_models: int | None = None
    #: Random masks: mergekit draws from torch's global generator, we from a per-tensor seed (docs/methods.md).
    randomised: bool = False


_SPARSE = {"weight": "1/K", "density": 0.5}
#: Every classic method of mergekit 0.1.5, parameters spelled out so neither tool's defaults decide the result.
METHOD_SPECS: dict[str, MethodSpec] = {
    "linear": MethodSpec({"normalize": True}, base=False),
    "task_arithmetic": MethodSpec({"normalize": False, "lambda": 1.0}),
    "ties": MethodSpec({"normalize": True, "lambda": 1.0}, _SPARSE),
    "dare_linear": MethodSpec({"normalize": False}, _SPARSE, randomised=True),
    "dare_ties": MethodSpec({"normalize": True}, _SPARSE, randomised=True),
    "breadcrumbs": MethodSpec({"normalize": False, "gamma": 0.01}, _SPARSE),
    "breadcrumbs_ties": MethodSpec({"normalize": True, "gamma": 0.01}, _SPARSE),
    "della": MethodSpec({"normalize": True}, {**_SPARSE, "epsilon": 0.1}, randomised=True),
    "della_linear": MethodSpec({"normalize": False}, {**_SPARSE, "epsilon": 0.1}, randomised=True),
    "slerp": MethodSpec({"t": 0.5}, {}, n_models=1),
    "multislerp": MethodSpec({}, base=False),
    "nuslerp": MethodSpec({}, base=False, n_models=2),
    "karcher": MethodSpec({}, {}, base=False),
    "model_stock": MethodSpec({}, {}),
    "nearswap": MethodSpec({"t": 0.5}, {}, n_models=1),
    "sce": MethodSpec({"select_topk": 0.5}, {}),
    "arcee_fusion": MethodSpec({}, {}, n_models=1),
    "ram": MethodSpec({"epsilon": 1e-5}, {}),
    "ramplus_tl": MethodSpec({"epsilon": 1e-5, "r": 0.1, "alpha": 0.2}, {}),
    "passthrough": MethodSpec({}, {}, base=False, n_models=1),
}
#: Kept for the callers that only need the global parameters.
METHOD_PARAMETERS: dict[str, dict[str, Any]] = {m: s.parameters for m, s in METHOD_SPECS.items()}


def classic_config(
    method: str,
    base: Path,
    experts: list[Path],
    *,
    weight: float | None = None,
    density: float | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """A mergekit-layout config dict for ``method`` over the first experts it takes (all by default)."""
    if method not in METHOD_SPECS:
        raise ValueError(f"unknown classic method {method!r}")
    spec = METHOD_SPECS[method]
    chosen = experts[: spec.n_models] if spec.n_models else experts
    models = []
    for e in chosen:
        params: dict[str, Any] = {}
        for key, value in spec.per_model.items():
            if value == "1/K":
                value = weight if weight is not None else round(1.0 / len(chosen), 6)
            if key == "density" and density is not None:
                value = density
            params[key] = value
        entry: dict[str, Any] = {"model": str(Path(e).resolve())}
        if params:
            entry["parameters"] = params
        models.append(entry)
    cfg: dict[str, Any] = {"merge_method": method}
    if spec.base:
        cfg["base_model"] = str(Path(base).resolve())
    cfg["models"] = models
    if spec.parameters:
        cfg["parameters"] = dict(spec.parameters)
    cfg["dtype"] = dtype
    return cfg


def random_texts(n: int, n_words: int, vocab_size: int, seed: int) -> list[str]:
    """``n`` texts of exactly ``n_words`` in-vocabulary words (each one token for our tokenizer)."""
    words = vocab_words(vocab_size)[5:]
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(n_words)) for _ in range(n)]


def divmerge_config(
    base: Path,
    experts: list[Path],
    *,
    texts_per_task: int,
    seq_len: int,
    vocab_size: int,
    batch_size: int,
    epochs: int = 1,
    granularity: str = "layer",
    lr: float = 1e-2,
) -> dict[str, Any]:
    """A layer-level DivMerge config with ``texts_per_task`` inline texts per expert.

    Texts hold ``seq_len - 2`` words so, with [CLS]/[SEP], every input is exactly ``seq_len`` tokens.
    """
    models = []
    for i, e in enumerate(experts):
        texts = random_texts(texts_per_task, seq_len - 2, vocab_size, seed=100 + i)
        models.append(
            {
                "model": str(Path(e).resolve()),
                "data": {"texts": texts, "num_samples": texts_per_task, "seed": 0},
            }
        )
    return {
        "merge_method": "divmerge",
        "base_model": str(Path(base).resolve()),
        "models": models,
        "parameters": {
            "granularity": granularity,
            "divergence": "js",
            "lr": lr,
            "epochs": epochs,
            "batch_size_per_task": batch_size,
            "max_length": seq_len,
        },
        "dtype": "float32",
    }


def write_yaml(cfg: dict[str, Any], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path
