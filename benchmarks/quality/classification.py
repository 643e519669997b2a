"""The classification track: MiniLM + union head, one expert per GLUE task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .data import Task, UnionHead, load_tasks, subset, union_head, write_merge_inputs
from .evaluate import evaluate_folder
from .zoo import Recipe, build_zoo


class ClassificationTrack:
    """Base, experts, eval sets and engine data specs of the sequence-classification track."""

    name = "cls"

    def __init__(
        self,
        data_dir: Path,
        cache: Path,
        tasks: tuple[str, ...],
        recipe: Recipe,
        eval_n: int,
        seed: int = 0,
        log=print,
    ):
        self.data_dir, self.cache, self.recipe = data_dir, cache, recipe
        self.tasks: dict[str, Task] = load_tasks(data_dir, list(tasks))
        self.head: UnionHead = union_head(data_dir)
        self.base, self.experts = build_zoo(data_dir, cache, list(tasks), recipe, log=log)
        self.evals = {t: subset(task.eval, eval_n, seed) for t, task in self.tasks.items()}
        self.merge_files = {
            t: write_merge_inputs(task, cache / "merge_inputs" / task.digest / f"{t}.tsv")
            for t, task in self.tasks.items()
        }

    def data_spec(self, task: str, num_samples: int, own_labels: bool = False) -> dict[str, Any]:
        spec = {
            "path": str(self.merge_files[task]),
            "text_columns": self.tasks[task].columns,
            "num_samples": num_samples,
        }
        if own_labels:  # label names only (the union head's slice), never labelled examples
            spec["labels"] = list(self.head.label_names[self.head.slice_of(task)])
        return spec

    def evaluate(self, folder: Path, tasks: list[str]) -> dict[str, list[bool]]:
        return evaluate_folder(
            folder, {t: self.evals[t] for t in tasks}, self.head, max_length=self.recipe.max_length
        )

    def fingerprint(self) -> str:
        return json.dumps([self.base.name, sorted(p.name for p in self.experts.values())])

    def setup(self) -> dict[str, Any]:
        return {
            "base": "sentence-transformers/all-MiniLM-L6-v2 (BertModel, 22.7M params) + one seeded "
            f"classification head over {self.head.num_labels} union labels",
            "expert_recipe": self.recipe.__dict__,
            "eval_source": {t: task.eval_source for t, task in self.tasks.items()},
            "eval_n": {t: len(e) for t, e in self.evals.items()},
            "merge_pool": {t: len(task.merge_pool) for t, task in self.tasks.items()},
        }
