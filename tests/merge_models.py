"""Tiny model folders for the merge-engine tests (base + 'fine-tunes'), written once per test module."""

from __future__ import annotations

from pathlib import Path

import yaml

from .tiny import make_bert_classifier, make_gpt2, make_llama, perturbed, save


def bert_family(root: Path, n: int = 2) -> dict[str, Path]:
    """``base`` and ``t1..tn``: a tiny BERT classifier and noisy copies of it."""
    base = make_bert_classifier(seed=0)
    out = {"base": save(base, root / "base")}
    for i in range(1, n + 1):
        out[f"t{i}"] = save(perturbed(base, seed=i), root / f"t{i}")
    return out


def gpt2_family(root: Path, n: int = 2) -> dict[str, Path]:
    """``base`` and ``t1..tn``: a tiny GPT-2 (tied embeddings) and noisy copies of it."""
    base = make_gpt2(seed=0)
    out = {"base": save(base, root / "base")}
    for i in range(1, n + 1):
        out[f"t{i}"] = save(perturbed(base, seed=i), root / f"t{i}")
    return out


def llama_family(root: Path, n: int = 2) -> dict[str, Path]:
    """``base`` and ``t1..tn``: a tiny 4-layer Llama (untied head) and noisy copies of it."""
    base = make_llama(seed=0)
    out = {"base": save(base, root / "base")}
    for i in range(1, n + 1):
        out[f"t{i}"] = save(perturbed(base, scale=0.3, seed=i), root / f"t{i}")
    return out


def config_dict(method: str, base: Path | None, models: list[Path], **parameters) -> dict:
    cfg: dict = {"merge_method": method, "models": [{"model": str(m)} for m in models]}
    if base is not None:
        cfg["base_model"] = str(base)
    if parameters:
        cfg["parameters"] = parameters
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path
