"""The evaluation stage: experts (once, cached), optionally the base, then every merge candidate.

One module is built from the reference config and each checkpoint's weights are written into it in turn
(never two models at once). Progress is reported as stage ``evaluate``, one step per batch, and the
cancel check runs between batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..io.loading import DTYPES
from ..io.lora import adapter_identity
from ..learned.reference import model_kind
from ..learned.teacher_cache import expert_identity, tokenizer_identity
from ..plan import MergePlan
from ..progress import Reporter
from .cache import ExpertScoreCache
from .report import build_report
from .scoring import TOP_K, Scorer, Scores
from .sets import EvalSet


@dataclass
class Candidate:
    """One merge to score: the job's own, or one of ``evaluation.compare``."""

    label: str
    method: str
    parameters: dict[str, Any]
    folder: Path


def evaluate_merges(
    plan: MergePlan,
    sets: list[EvalSet],
    candidates: list[Candidate],
    *,
    device: torch.device,
    reporter: Reporter,
    base: bool = False,
    select: str | None = None,
) -> dict[str, Any]:
    """Score the experts (and the base, with ``base``) and every candidate; return ``evaluation.json``."""
    start = time.perf_counter()
    kind = model_kind(plan.model_config)
    scorer = Scorer(plan, kind, DTYPES[plan.config.dtype], device)
    cache = ExpertScoreCache(plan.options)
    tok_id = tokenizer_identity(plan.reference.path)
    keys = {es.task: _key(plan, es, tok_id, kind, device, scorer.max_length) for es in sets}
    experts: dict[int, Scores] = {}
    for es in sets:
        hit = cache.get(keys[es.task]) if es.labelled else None
        if hit is not None and hit.n == len(es):
            experts[es.task] = hit
    todo = [es for es in sets if es.task not in experts]
    per_model = sum(scorer.n_batches(es) for es in sets)
    total = sum(scorer.n_batches(es) for es in todo) + per_model * (len(candidates) + int(base))
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        reporter.report("evaluate", done, total)
        reporter.check()

    reporter.report("evaluate", 0, total)
    for es in todo:
        reporter.check()
        scorer.load(plan.models[es.task])
        experts[es.task] = scorer.score(es, tick)
        if es.labelled:
            cache.put(keys[es.task], experts[es.task])
    base_scores: dict[int, Scores] | None = None
    if base:
        assert plan.base is not None
        scorer.load(plan.base)
        base_scores = {es.task: scorer.score(es, tick, experts[es.task].reference) for es in sets}
    merged: dict[str, dict[int, Scores]] = {}
    for c in candidates:
        reporter.check()
        scorer.load(c.folder)
        merged[c.label] = {es.task: scorer.score(es, tick, experts[es.task].reference) for es in sets}
    report = build_report(sets, experts, base_scores, candidates, merged, select=select, kind=kind)
    report["expert_cache"] = {"hits": cache.hits, "misses": len(todo)}
    report["wall_s"] = round(time.perf_counter() - start, 3)
    return report


def _key(plan: MergePlan, es: EvalSet, tok_id: str, kind: str, device: torch.device, max_length: int) -> str:
    expert = plan.models[es.task]
    return ExpertScoreCache.key(
        {
            "expert": expert_identity(expert.path, expert.commit),
            **({"adapter": adapter_identity(expert.adapter)} if expert.adapter else {}),
            "tokenizer": tok_id,
            "set": es.digest(),
            "kind": kind,
            "dtype": plan.config.dtype,
            "device": device.type,
            "max_length": max_length,
            "top_k": TOP_K,
            "chat": [es.spec.chat_template, es.spec.system_prompt],
            "max_new_tokens": es.spec.max_new_tokens,
        }
    )
