"""The batches the merged (student) model and the teachers are run on: right-padded :class:`Batch` es of
examples, and the scored logits (classification: one row per example; causal LMs: the scored positions)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .encoding import Example
from .reference import CLASSIFICATION


@dataclass
class Batch:
    #: keyword arguments of the model's forward
    inputs: dict[str, Any]
    #: causal: (row, position) of every scored prediction and the example (0..B-1) it belongs to.
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    owner: torch.Tensor | None = None


def collate(kind: str, examples: Sequence[Example], tokenizer: Any, device: torch.device) -> Batch:
    """Right-padded batch (positions 0..L-1 for every sequence, as in left-padded generation)."""
    if kind == CLASSIFICATION:
        padded = tokenizer.pad([e.fields for e in examples], padding=True, return_tensors="pt")
        return Batch({k: v.to(device) for k, v in padded.items()})
    seqs = [e.fields["input_ids"] for e in examples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, owner = [], [], []
    for b, (s, e) in enumerate(zip(seqs, examples, strict=True)):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
        rows += [b] * (e.stop - e.start)
        cols += range(e.start, e.stop)
        owner += [b] * (e.stop - e.start)
    as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return Batch(
        {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False},
        as_long(rows),
        as_long(cols),
        as_long(owner),
    )


def scored_logits(kind: str, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The logits that are scored: [B, C] (classification) or [T, V] (causal, flattened positions)."""
    if kind == CLASSIFICATION:
        return logits
    return logits[batch.rows, batch.cols]


def per_example_mean(values: torch.Tensor, batch: Batch, n_examples: int) -> torch.Tensor:
    """Average per-token values over each example's scored positions (identity for classification)."""
    if batch.owner is None:
        return values
    sums = torch.zeros(n_examples, dtype=values.dtype, device=values.device).index_add(0, batch.owner, values)
    counts = torch.bincount(batch.owner, minlength=n_examples).clamp_min(1).to(values.dtype)
    return sums / counts


def scored_rows(kind: str, example: Example) -> int:
    """How many target rows an example has: 1 (classification) or its scored positions (causal)."""
    return 1 if kind == CLASSIFICATION else example.stop - example.start
