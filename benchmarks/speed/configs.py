"""Merge configs for the benchmark: one YAML that both our CLI and ``mergekit-yaml`` accept."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import yaml

from .checkpoints import vocab_words

#: Per-method global parameters, spelled out so neither tool's defaults decide the result.
METHOD_PARAMETERS: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False, "lambda": 1.0},
    "ties": {"normalize": True, "lambda": 1.0},
}


def classic_config(
    method: str,
    base: Path,
    experts: list[Path],
    *,
    weight: float | None = None,
    density: float = 0.5,
    dtype: str = "float32",
) -> dict[str, Any]:
    """A mergekit-layout config dict. ``linear`` averages the experts without a base model."""
    if method not in METHOD_PARAMETERS:
        raise ValueError(f"unknown classic method {method!r}")
    w = weight if weight is not None else round(1.0 / len(experts), 6)
    models = []
    for e in experts:
        params: dict[str, Any] = {"weight": w}
        if method == "ties":
            params["density"] = density
        models.append({"model": str(Path(e).resolve()), "parameters": params})
    cfg: dict[str, Any] = {"merge_method": method}
    if method != "linear":
        cfg["base_model"] = str(Path(base).resolve())
    cfg["models"] = models
    cfg["parameters"] = dict(METHOD_PARAMETERS[method])
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
