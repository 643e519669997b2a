"""Accuracy of a union-head classifier on one task: argmax over the task's own label slice."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .data import Example, UnionHead


def encode(tokenizer, examples: list[Example], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize single sentences or sentence pairs (as the engine's two-column data does), padded."""
    a = [ex.text_a for ex in examples]
    b = [ex.text_b for ex in examples] if examples and examples[0].text_b is not None else None
    return tokenizer(a, b, truncation=True, max_length=max_length, padding=True, return_tensors="pt")


def slice_predictions(logits: torch.Tensor, head: UnionHead, task: str) -> torch.Tensor:
    """Predicted label ids of ``task``: argmax over its slice of the union logits."""
    return logits[:, head.slice_of(task)].argmax(dim=-1)


@torch.no_grad()
def correctness(
    model,
    tokenizer,
    examples: list[Example],
    head: UnionHead,
    task: str,
    *,
    max_length: int = 128,
    batch_size: int = 64,
) -> list[bool]:
    """Per-example correctness on ``examples`` (input order); batches are length-sorted to cut padding."""
    model.eval()
    order = sorted(
        range(len(examples)), key=lambda i: len(examples[i].text_a) + len(examples[i].text_b or "")
    )
    out = [False] * len(examples)
    for s in range(0, len(order), batch_size):
        ids = order[s : s + batch_size]
        batch = [examples[i] for i in ids]
        pred = slice_predictions(model(**encode(tokenizer, batch, max_length)).logits.float(), head, task)
        for i, p, ex in zip(ids, pred.tolist(), batch, strict=True):
            out[i] = p == ex.label
    return out


def accuracy(model, tokenizer, examples: list[Example], head: UnionHead, task: str, **kw) -> float:
    """Accuracy (0..1) on ``examples``."""
    c = correctness(model, tokenizer, examples, head, task, **kw)
    return sum(c) / max(len(c), 1)


def evaluate_folder(
    folder: Path, evals: dict[str, list[Example]], head: UnionHead, *, max_length: int = 128
) -> dict[str, list[bool]]:
    """Load a checkpoint folder and return per-example correctness on each task's eval examples."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    return {t: correctness(model, tok, ex, head, t, max_length=max_length) for t, ex in evals.items()}
