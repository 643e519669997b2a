"""``evaluation.json``: per task the expert's and the merge's score, the retention, and the ANP.

* ``retained`` = 100 x merged / expert; ``anp`` = the mean of ``retained`` over the evaluated tasks
  (average normalised performance, the paper's Table 6 measure).
* ``anp_ci95``: a 95 % percentile bootstrap over each task's examples (expert scores held fixed; 1000
  resamples, seeded), so two methods' ANPs can be told apart or not.
* Labelled tasks score accuracy; label-free tasks score ``1 - JS/log 2`` against the expert (1 for the
  expert itself), their ``retained`` being that score x 100.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .scoring import Scores
from .sets import EvalSet

if TYPE_CHECKING:
    from .stage import Candidate

N_BOOT = 1000


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def retained(merged: float, expert: float) -> float | None:
    return None if expert <= 0 else 100.0 * merged / expert


def bootstrap_anp(
    combos: Sequence[Mapping[str, Sequence[bool] | float]],
    expert: Mapping[str, float],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean ANP over one or more merges (``combos``): per merge and
    task, the per-example correctness is resampled (a float is a label-free score, held fixed); the
    experts' scores are held fixed. Tasks whose expert scores 0 are left out."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(n_boot, dtype=torch.float64)
    for combo in combos:
        part = torch.zeros(n_boot, dtype=torch.float64)
        used = [t for t in combo if expert[t] > 0]
        for t in used:
            v = combo[t]
            if isinstance(v, float | int):
                part += float(v) / expert[t]
                continue
            arr = torch.tensor(v, dtype=torch.float64)
            idx = torch.randint(0, len(arr), (n_boot, len(arr)), generator=gen)
            part += arr[idx].mean(1) / expert[t]
        total += 100.0 * part / max(1, len(used))
    total /= max(1, len(combos))
    lo, hi = torch.quantile(total, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def anp_interval(
    sets: Sequence[EvalSet], experts: Mapping[int, Scores], merged: Mapping[int, Scores], seed: int = 0
) -> list[float] | None:
    """95 % bootstrap interval of one merge's ANP (labelled tasks resampled; label-free ones fixed)."""
    expert = {str(es.task): experts[es.task].score for es in sets}
    if not any(e > 0 for e in expert.values()):
        return None
    combo = {
        str(es.task): merged[es.task].score if merged[es.task].correct is None else merged[es.task].correct
        for es in sets
    }
    lo, hi = bootstrap_anp([combo], expert, seed=seed)
    return [round(lo, 2), round(hi, 2)]


def _summary(sets: Sequence[EvalSet], experts, scores: Mapping[int, Scores]) -> dict[str, Any]:
    tasks, kept = {}, []
    for es in sets:
        s, e = scores[es.task], experts[es.task].score
        r = retained(s.score, e)
        if r is not None:
            kept.append(r)
        tasks[es.name] = {"merged": _r(s.score), "retained": _r(r, 2), "unparsed": _r(s.unparsed_share)}
        if s.js is not None and s.correct is None:
            tasks[es.name]["js"] = _r(s.js, 6)
    return {
        "tasks": tasks,
        "anp": _r(sum(kept) / len(kept), 2) if kept else None,
        "anp_ci95": anp_interval(sets, experts, scores),
    }


def build_report(
    sets: Sequence[EvalSet],
    experts: Mapping[int, Scores],
    base: Mapping[int, Scores] | None,
    candidates: Sequence[Candidate],
    merged: Mapping[str, Mapping[int, Scores]],
    *,
    select: str | None,
    kind: str,
) -> dict[str, Any]:
    """The whole ``evaluation.json``; ``candidates[0]`` is the job's own merge."""
    summaries = {c.label: _summary(sets, experts, merged[c.label]) for c in candidates}
    chosen = candidates[0].label
    if select == "best":
        ranked = [c.label for c in candidates if summaries[c.label]["anp"] is not None]
        if ranked:
            chosen = max(ranked, key=lambda label: summaries[label]["anp"])
    tasks: dict[str, Any] = {}
    for es in sets:
        e, m = experts[es.task], merged[chosen][es.task]
        row: dict[str, Any] = {
            "metric": es.metric,
            "n": len(es),
            "source": es.inputs.source,
            "expert": _r(e.score),
        }
        if base is not None:
            row["base"] = _r(base[es.task].score)
        row |= summaries[chosen]["tasks"][es.name]  # merged, retained, unparsed (and js)
        if e.unparsed is not None:
            row["expert_unparsed"] = _r(e.unparsed_share)
        if m.samples:
            row["sample_answers"] = m.samples
        tasks[es.name] = row
    metrics = {es.metric for es in sets}
    chosen_c = next(c for c in candidates if c.label == chosen)
    return {
        "metric": metrics.pop() if len(metrics) == 1 else "mixed",
        "kind": kind,
        "method": chosen_c.method,
        "tasks": tasks,
        "anp": summaries[chosen]["anp"],
        "anp_ci95": summaries[chosen]["anp_ci95"],
        "selected": chosen,
        "select": select,
        "compare": [
            {"label": c.label, "method": c.method, "parameters": c.parameters, **summaries[c.label]}
            for c in candidates
        ],
        "warnings": [w for es in sets for w in es.warnings]
        + [
            f"{es.field}: the expert scores 0 on its own eval set; the task has no retention and is left "
            "out of the ANP (check the labels and answers)"
            for es in sets
            if experts[es.task].score <= 0
        ],
    }
