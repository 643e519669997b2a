"""Each task's evaluation set: its held-out inputs, their gold labels (or none), and how labels are read.

Loaded after :func:`~divmerge_core.pipeline.prepare` and before anything is merged, so a label value that
is not one of the model's labels or has no answer word is an error at its field, with nothing spent.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import EvalSpec, ModelSpec
from ..errors import ConfigError, DatasetError
from ..learned.data import TaskInput, TaskInputs, extractor, read_rows, sample
from ..learned.inputs import label_id, model_field, resolve_label_masks, separate_slices
from ..learned.reference import CAUSAL, model_kind
from ..plan import MergePlan
from ..progress import Reporter

#: The label column read when ``label_column`` is not given (used only when the data has it).
DEFAULT_LABEL_COLUMN = "label"
_WORD = re.compile(r"^[^\W\d][\w'-]*$")


@dataclass
class EvalSet:
    """One task's evaluation inputs, as the scorer reads them."""

    #: index of the task model in ``plan.models``
    task: int
    name: str
    #: the config path of its ``eval`` block (``models.<i>.eval``)
    field: str
    spec: EvalSpec
    inputs: TaskInputs
    #: gold labels, one per input (None: the task is scored label-free)
    gold: list[str | int] | None
    #: classification: the class id of each input's gold label
    gold_ids: list[int] | None = None
    #: classification: the class ids the argmax is restricted to (None: every class)
    allowed: list[int] | None = None
    #: causal: label -> its answer words
    answers: dict[str, list[str]] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return self.gold is not None

    @property
    def metric(self) -> str:
        """``accuracy`` (gold labels) or ``js_retention`` (label-free)."""
        return "accuracy" if self.labelled else "js_retention"

    def __len__(self) -> int:
        return len(self.inputs)

    def digest(self) -> str:
        """What identifies these inputs and labels (the expert score cache's key part)."""
        blob = json.dumps(
            [self.inputs.texts, self.gold, self.allowed, self.answers, self.inputs.commit], default=str
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def evaluated_tasks(plan: MergePlan) -> list[int]:
    """Indices (in ``plan.models``) of the task models that carry an ``eval`` block."""
    return [t for t, spec in enumerate(plan.specs) if spec.eval is not None]


def load_eval_sets(plan: MergePlan, reporter: Reporter | None = None) -> list[EvalSet]:
    """Load every ``eval`` block (seeded sample) and check its labels against the model."""
    reporter = reporter or Reporter()
    kind = model_kind(plan.model_config)
    tasks = evaluated_tasks(plan)
    out = []
    for n, t in enumerate(tasks):
        reporter.check()
        out.append(_load(plan, t, kind))
        reporter.report("eval_data", n + 1, len(tasks), message=f"{len(out[-1])} examples for {out[-1].name}")
    if kind != CAUSAL:
        _default_slices(plan, out)
    return out


def _default_slices(plan: MergePlan, sets: list[EvalSet]) -> None:
    """Tasks without ``data.labels`` whose gold classes no other task uses are scored on those classes, as the
    learned methods score them on their expert's (the experts sit on separate slices of one head)."""
    used = {es.task: set(es.allowed or es.gold_ids or ()) for es in sets}
    unset = [
        es.task
        for es in sets
        if es.gold_ids and (plan.specs[es.task].data is None or plan.specs[es.task].data.labels is None)
    ]
    chosen = set(separate_slices(used, unset))
    for es in sets:
        if es.task in chosen:
            es.allowed = sorted(set(es.gold_ids))


def _load(plan: MergePlan, t: int, kind: str) -> EvalSet:
    spec: ModelSpec = plan.specs[t]
    ev = spec.eval
    assert ev is not None
    where = f"{model_field(plan, t)}.eval"
    if ev.chat_template and kind != CAUSAL:
        raise ConfigError("'chat_template' applies to causal LMs only", field=f"{where}.chat_template")
    if ev.answers is not None and kind != CAUSAL:
        raise ConfigError(
            "'answers' applies to causal LMs (a classifier predicts its labels)", field=f"{where}.answers"
        )
    rows, source, commit = read_rows(ev, plan.options)
    label_column = ev.label_column
    if label_column is None and ev.texts is None and DEFAULT_LABEL_COLUMN in rows.columns:
        label_column = DEFAULT_LABEL_COLUMN
    if ev.texts is not None and ev.labels is not None:
        label_column = "label"
    if label_column is not None and label_column not in rows.columns:
        raise DatasetError(
            f"eval dataset {source!r} has no label column {label_column!r}; available columns: {rows.columns}",
            field=f"{where}.label_column",
        )
    text_of = extractor(ev, rows.columns, source)

    def pick(row: dict) -> tuple[TaskInput, Any] | None:
        x = text_of(row)
        if x is None:
            return None
        if label_column is None:
            return x, None
        label = row.get(label_column)
        if label is None or label == "" or label == -1:  # unlabelled rows (GLUE test splits use -1)
            return None
        return x, label

    rng = random.Random(f"eval/{ev.seed}")
    picked = sample(rows, pick, ev.num_samples, rng)
    if not picked:
        raise DatasetError(
            f"eval set {source!r} yielded no example (no row with a non-empty input"
            + (f" and a label in {label_column!r})" if label_column else ")"),
            field=where,
        )
    inputs = TaskInputs([x for x, _ in picked], source, commit)
    gold = [y for _, y in picked] if label_column is not None else None
    es = EvalSet(t, spec.task_name, where, ev, inputs, gold)
    if gold is not None:
        if kind == CAUSAL:
            es.answers = _answers(ev, gold, f"{where}.answers")
        else:
            es.gold_ids = _class_ids(plan, gold, f"{where}.{'labels' if ev.texts else 'label_column'}")
    if kind != CAUSAL:
        es.allowed = _allowed(plan, t, es.gold_ids)
    overlap = _overlap(spec, es)
    if overlap:
        es.warnings.append(overlap)
    return es


def _answers(ev: EvalSpec, gold: list[Any], field: str) -> dict[str, list[str]]:
    """label -> answer words: ``answers``, else the label values themselves when they are words."""
    values = sorted({str(g) for g in gold})
    if ev.answers is None:
        not_words = [v for v in values if not _WORD.match(v)]
        if not_words:
            raise ConfigError(
                f"the labels {not_words[:5]} are not words: give 'answers', the answer word(s) of each label",
                field=field,
            )
        return {v: [v] for v in values}
    missing = [v for v in values if v not in ev.answers]
    if missing:
        raise ConfigError(
            f"label value(s) {missing[:10]} of the eval set have no entry in 'answers' "
            f"(it has {sorted(ev.answers)[:10]})",
            field=field,
        )
    return {k: [w] if isinstance(w, str) else list(w) for k, w in ev.answers.items()}


def _class_ids(plan: MergePlan, gold: list[Any], field: str) -> list[int]:
    """Each gold label's class id: an id (int or digits) or a name from config.json ``id2label``."""
    return [label_id(g, plan.model_config, field, what="gold label") for g in gold]


def _allowed(plan: MergePlan, t: int, gold_ids: list[int] | None) -> list[int] | None:
    """The classes a task's argmax is restricted to: its ``data.labels`` (resolved as the learned methods
    resolve them), or with ``labels: auto`` the classes of its gold labels; None (every class) otherwise."""
    data = plan.specs[t].data
    wanted = data.labels if data is not None else None
    if wanted is None or wanted == "all":
        return None
    if wanted == "auto":
        return sorted(set(gold_ids)) if gold_ids else None
    masks = resolve_label_masks(plan, torch.device("cpu"))
    assert masks is not None
    return masks[t].nonzero().flatten().tolist()


def _overlap(spec: ModelSpec, es: EvalSet) -> str | None:
    """A warning when the eval set is (part of) the task's merge inputs: its score would be optimistic."""
    data, ev = spec.data, es.spec
    if data is None:
        return None
    same = (
        (
            ev.dataset is not None
            and (ev.dataset, ev.config, ev.split) == (data.dataset, data.config, data.split)
        )
        or (ev.path is not None and ev.path == data.path)
        or (ev.texts is not None and data.texts is not None and bool(set(ev.texts) & set(data.texts)))
    )
    if not same:
        return None
    return (
        f"{es.field}: the eval set is drawn from the task's merge inputs ('data'); "
        "its score is optimistic (use a held-out split)"
    )
