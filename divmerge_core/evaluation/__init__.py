"""Built-in evaluation: how much of each expert a merge keeps, on the tasks' own held-out examples.

A model's ``eval`` block (:class:`~divmerge_core.config.EvalSpec`) names its evaluation set. After the merge
the stage (:mod:`.stage`) scores the experts (once per weights and set: :mod:`.cache`), optionally the base,
and every merge candidate (the job's own and those of ``evaluation.compare``) with one module
(:mod:`.scoring`), and writes ``evaluation.json`` (:mod:`.report`) beside the weights. The CLI, the library,
the service worker and the quality benchmarks all score through this package.
"""

from __future__ import annotations

from .report import model_index, table
from .scoring import Scorer, Scores, match_answer
from .sets import EvalSet, evaluated_tasks, load_eval_sets
from .stage import Candidate, evaluate_merges

EVALUATION_FILE = "evaluation.json"

__all__ = [
    "EVALUATION_FILE",
    "Candidate",
    "EvalSet",
    "Scorer",
    "Scores",
    "evaluate_merges",
    "evaluated_tasks",
    "load_eval_sets",
    "match_answer",
    "model_index",
    "table",
]
