"""The data passed between the engine's stages: a resolved plan, learned coefficients, and the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import MergeConfig, ModelSpec
from .io.refs import ResolvedModel
from .options import EngineOptions
from .relayer import Relayering


@dataclass
class MergePlan:
    """A validated config whose model references are resolved to local folders and commits."""

    config: MergeConfig
    options: EngineOptions
    #: The base model (None when the config names no base_model; linear reads it only if listed in models).
    base: ResolvedModel | None
    #: The task models, in the order of ``config.task_models()``.
    models: list[ResolvedModel]
    specs: list[ModelSpec]
    #: The model whose config.json and tokenizer the output copies: the base, else the first model.
    reference: ResolvedModel
    #: The reference model's config.json.
    model_config: dict[str, Any]
    #: Tensor names of the merge, in checkpoint order (the output's names when ``layout`` is set).
    tensor_names: list[str]
    #: Layer-rebuilding merges (passthrough with slices): each output tensor's source.
    layout: Relayering | None = None
    #: A tokenizer source's output vocabulary (:class:`divmerge_core.vocab.Vocabulary`), None without one.
    vocab: Any = None
    #: The chat template the output tokenizer gets (``chat_template``), None to keep its own.
    chat_template: str | None = None

    @property
    def resolved(self) -> dict[str, str | None]:
        """Model reference -> resolved commit SHA (None for local folders)."""
        out = {} if self.base is None else {self.base.ref.raw: self.base.commit}
        out.update({m.ref.raw: m.commit for m in self.models})
        # a LoRA expert's adapter, under its own reference (the expert's entry is its base's commit)
        out.update({m.adapter.raw: m.adapter.commit for m in self.models if m.adapter is not None})
        return out


@dataclass
class Convergence:
    """How a learned merge's optimisation went, on each task's held-out inputs (``parameters.heldout``)."""

    #: per task, how many of its inputs were held out of training (0: none).
    heldout_inputs: list[int]
    #: ``[epoch, step, mean, value of task 0, task 1, ...]`` at epoch 0 (the initial Gamma) and after each
    #: epoch run; a task's value is None when it holds nothing out; empty when no task holds anything out.
    heldout: list[list[float | None]]
    #: the epoch whose Gamma is kept (lowest held-out value); None when nothing is held out (the last is kept).
    best_epoch: int | None
    best_step: int | None
    #: whether the held-out value stopped improving before the end (None when nothing is held out).
    converged: bool | None
    #: whether ``patience`` ended the run before its planned steps.
    stopped_early: bool
    #: optimisation steps run, and planned (epochs x steps_per_epoch).
    steps: int
    planned_steps: int
    steps_per_epoch: int

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class LearnedCoefficients:
    """Coefficients learned by divmerge/adamerging: one per (group, task)."""

    method: str
    granularity: str
    groups: list[str]
    tasks: list[str]
    #: values[g][t]: coefficient of task t in group g.
    values: list[list[float]]
    #: tensor name -> group name, for every tensor of the model.
    group_of: dict[str, str]
    #: mean loss per optimisation step, in order.
    losses: list[float]
    #: dataset reference -> resolved commit SHA (None for local files and inline texts).
    resolved_datasets: dict[str, str | None] = field(default_factory=dict)
    #: where the task vectors lived while learning (resident, offload or stream).
    placement: str = "resident"
    #: task -> the labels it was scored on, for tasks that set ``data.labels`` (explicit or ``auto``) or that
    #: the default restricted (experts on separate slices of one head).
    labels: dict[str, list[str | int]] | None = None
    #: the held-out record, best epoch and stopping of the run (None for coefficients made elsewhere).
    convergence: Convergence | None = None
    #: how the task vectors were trimmed or sign-resolved (``tau_sparsify``, ``tau_consensus``:
    #: :mod:`divmerge_core.learned.trimming`), applied again by the final merge; None: as they are.
    task_vectors: dict[str, Any] | None = None

    def for_tensor(self, name: str) -> list[float]:
        return self.values[self.groups.index(self.group_of[name])]

    def to_json(self) -> dict[str, Any]:
        out = {
            "method": self.method,
            "granularity": self.granularity,
            "tasks": self.tasks,
            "groups": self.groups,
            "coefficients": {
                g: dict(zip(self.tasks, row, strict=True))
                for g, row in zip(self.groups, self.values, strict=True)
            },
            "group_of": self.group_of,
            "losses": self.losses,
        } | ({"labels": self.labels} if self.labels is not None else {})
        if self.task_vectors is not None:
            out["task_vectors"] = self.task_vectors
        return out | (self.convergence.to_json() if self.convergence is not None else {})


@dataclass
class MergeResult:
    out_dir: Path
    #: Files written, relative to out_dir.
    files: list[str]
    #: Model and dataset reference -> resolved commit SHA.
    resolved: dict[str, str | None]
    #: ``LearnedCoefficients.to_json()`` without group_of/losses, for learned methods.
    coefficients: dict[str, Any] | None
    #: wall_s, peak_rss_mb, final_loss, steps, ...
    metrics: dict[str, Any]
    #: ``evaluation.json`` (None when no model has an ``eval`` set; ``{"error": ...}`` when it failed)
    evaluation: dict[str, Any] | None = None
