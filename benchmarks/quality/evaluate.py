"""Accuracy of a union-head classifier on one task, through the engine's evaluator.

Each task's eval examples become an :class:`~divmerge_core.evaluation.sets.EvalSet` whose argmax is
restricted to the task's slice of the union head (what a user's ``data.labels`` does), and the engine's
:class:`~divmerge_core.evaluation.scoring.Scorer` scores a folder on it: the benchmark's numbers and a
user's ``evaluation.json`` come from the same code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from divmerge_core.config import EvalSpec
from divmerge_core.evaluation.scoring import Scorer
from divmerge_core.evaluation.sets import EvalSet
from divmerge_core.learned.data import TaskInputs

from .data import Example, UnionHead


def eval_set(task: str, index: int, examples: list[Example], head: UnionHead) -> EvalSet:
    """``examples`` (in order) as the engine's eval set of ``task``: gold ids and allowed classes in the head."""
    part = head.slice_of(task)
    texts = [ex.text_a if ex.text_b is None else (ex.text_a, ex.text_b) for ex in examples]
    return EvalSet(
        task=index,
        name=task,
        field=f"benchmark.{task}",
        spec=EvalSpec(texts=["x"]),  # the scorer reads only its chat and generation settings
        inputs=TaskInputs(texts, source=f"benchmark:{task}"),
        gold=[ex.label for ex in examples],
        gold_ids=[part.start + ex.label for ex in examples],
        allowed=list(range(part.start, part.stop)),
    )


def evaluate_folder(
    folder: Path, evals: dict[str, list[Example]], head: UnionHead, *, max_length: int = 128
) -> dict[str, list[bool]]:
    """Per-example correctness (input order) of the checkpoint in ``folder`` on each task's examples."""
    scorer = Scorer.for_folder(folder, torch.device("cpu"), max_length=max_length, batch=64)
    return {
        t: scorer.score(eval_set(t, i, ex, head), lambda: None).correct
        for i, (t, ex) in enumerate(evals.items())
    }
