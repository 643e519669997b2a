"""Stage 1 of a learned merge: each task's unlabelled inputs, loaded and tokenised, and its label restriction."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..plan import MergePlan
from ..progress import Reporter
from .data import TaskInputs, load_task_inputs
from .encoding import ChatFormat, Example, encode
from .reference import CAUSAL, load_tokenizer, model_kind


@dataclass
class LearnedInputs:
    """What the teachers and the optimisation read: per task, its encoded inputs."""

    tasks: list[TaskInputs]
    tokenizer: Any
    #: examples[t]: task t's encoded inputs (teacher targets are attached by the teacher stage).
    examples: list[list[Example]]
    #: [n_tasks, num_labels] bool, or None when no task restricts its labels.
    label_masks: torch.Tensor | None
    #: the tasks without ``data.labels`` that the teacher stage restricted to their expert's labels (the
    #: experts use separate slices of one head)
    shared_head: list[int] = field(default_factory=list)


def load_inputs(plan: MergePlan, kind: str, device: torch.device, reporter: Reporter) -> LearnedInputs:
    """Load every task's ``data`` (seeded sample) and tokenise it with the reference model's tokenizer."""
    params = plan.config.parameters
    tasks: list[TaskInputs] = []
    for t, spec in enumerate(plan.specs):
        reporter.check()
        if spec.data is None:
            raise ConfigError(
                f"model {plan.models[t].ref.raw!r} has no 'data'", field=f"{model_field(plan, t)}.data"
            )
        tasks.append(load_task_inputs(spec.data, plan.options, params.seed))
        reporter.report(
            "data", t + 1, len(plan.models), message=f"{len(tasks[-1])} inputs from {tasks[-1].source}"
        )
    label_masks = resolve_label_masks(plan, device)
    tokenizer = load_tokenizer(plan.reference.path)
    examples = [
        encode(
            kind,
            tokenizer,
            inputs,
            t,
            params.max_length,
            params.max_new_tokens,
            plan.model_config,
            chat_format(plan, t),
        )
        for t, inputs in enumerate(tasks)
    ]
    return LearnedInputs(tasks, tokenizer, examples, label_masks)


def model_field(plan: MergePlan, t: int) -> str:
    """The config path of task model ``t`` (``models.<i>``; the base may sit in the list before it)."""
    i = next((i for i, m in enumerate(plan.config.models) if m is plan.specs[t]), t)
    return f"models.{i}"


def chat_format(plan: MergePlan, t: int) -> ChatFormat | None:
    """Task ``t``'s ``data.chat_template`` / ``data.system_prompt`` as a :class:`ChatFormat` (None when off)."""
    data = plan.specs[t].data
    if data is None or not data.chat_template:
        return None
    return ChatFormat(data.system_prompt, field=f"{model_field(plan, t)}.data.chat_template")


def model_labels(model_config: dict[str, Any]) -> tuple[dict[int, str], int]:
    """config.json's ``id2label`` and number of labels; transformers' defaults (2 labels, ``LABEL_<i>``) when
    it names none."""
    id2label = {int(k): str(v) for k, v in (model_config.get("id2label") or {}).items()}
    n = int(model_config.get("num_labels") or len(id2label) or 2)
    return id2label or {i: f"LABEL_{i}" for i in range(n)}, n


def label_id(label: Any, model_config: dict[str, Any], field: str, what: str = "label") -> int:
    """A class given by id (an int, or digits) or by name (config.json ``id2label``); else a ConfigError
    naming ``field`` and the model's labels."""
    id2label, n = model_labels(model_config)
    i = label if isinstance(label, int) and not isinstance(label, bool) else None
    if i is None:
        i = {v: k for k, v in id2label.items()}.get(str(label))
    if i is None and isinstance(label, str) and label.strip().lstrip("-").isdigit():
        i = int(label)
    if i is None or not 0 <= i < n:
        known = ", ".join(repr(v) for v in list(id2label.values())[:20])
        raise ConfigError(
            f"{what} {label!r} is not one of the model's {n} labels (id2label: {known})", field=field
        )
    return i


def resolve_label_masks(plan: MergePlan, device: torch.device) -> torch.Tensor | None:
    """[n_tasks, num_labels] bool: the labels each task is scored on (``data.labels``), None if no task sets any.

    A task without ``labels`` or with ``labels: all`` keeps every label. Names resolve through config.json
    ``id2label``. A task with ``labels: auto`` keeps every label here; the teacher stage narrows it to what its
    expert predicts (and, for tasks without ``labels``, to it when the experts use separate slices of one head).
    """
    wanted = [spec.data.labels if spec.data is not None else None for spec in plan.specs]
    wanted = [None if w == "all" else w for w in wanted]
    if all(w is None for w in wanted):
        return None
    kind = model_kind(plan.model_config)
    _, n_labels = model_labels(plan.model_config)
    masks = torch.ones((len(wanted), n_labels), dtype=torch.bool)
    for t, labels in enumerate(wanted):
        if labels is None:
            continue
        field = f"{model_field(plan, t)}.data.labels"
        if kind == CAUSAL:
            raise ConfigError("'labels' applies to sequence-classification models only", field=field)
        if labels == "auto":
            continue
        ids = [label_id(label, plan.model_config, field) for label in labels]
        masks[t] = False
        masks[t, ids] = True
    return masks.to(device)


def separate_slices(used: dict[int, set[int]], candidates: list[int]) -> list[int]:
    """The ``candidates`` (tasks without ``data.labels``) to score on their own labels by default: those whose
    labels ``used[t]`` are at least two and shared with no other task of ``used`` (the tasks sit on separate
    slices of one head). ``used``: each task's labels, as its expert predicts them or as the config lists them."""
    out = []
    for t in candidates:
        mine = used.get(t, set())
        others = set().union(*(s for u, s in used.items() if u != t))
        if len(mine) >= 2 and others and not mine & others:
            out.append(t)
    return out


def label_names(
    plan: MergePlan, masks: torch.Tensor | None, shared_head: Collection[int] = ()
) -> dict[str, list[str | int]] | None:
    """Task reference -> the labels it is scored on (names from ``id2label``, else ids), for every task that
    sets ``data.labels`` (a list or ``auto``) or that ``shared_head`` restricted; None when none is."""
    if masks is None:
        return None
    id2label = {int(k): str(v) for k, v in (plan.model_config.get("id2label") or {}).items()}
    out: dict[str, list[str | int]] = {}
    for t, row in enumerate(masks.cpu()):
        data = plan.specs[t].data
        if t in shared_head or (data is not None and data.labels not in (None, "all")):
            out[plan.models[t].ref.raw] = [id2label.get(i, i) for i in row.nonzero().flatten().tolist()]
    return out
