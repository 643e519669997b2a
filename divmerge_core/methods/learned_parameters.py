"""What the learned methods (divmerge, adamerging) declare: their parameters (one class, read by
``divmerge_core.learned`` as ``plan.config.parameters.<name>``; defaults
follow the DivMerge paper) and their :class:`Objective`, on the registry entry (:class:`LearnedMethod`).
``divmerge_core.learned`` runs whatever objective the entry names and compares no method names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import Field, FiniteFloat, ValidationInfo, field_validator

from .base import MergeMethod, MethodParameters


@dataclass(frozen=True)
class Objective:
    """What a learned method minimises over Gamma (torch-free: the registry is read by the API process).

    ``loss`` is ``"module:function"``; :func:`divmerge_core.learned.objectives.loss_function` imports it and
    calls ``function(params, kind, store)``, which returns the per-scored-row loss ``fn(logits, examples)``
    (``[B]`` for classification, ``[T]`` scored tokens for causal LMs). ``teachers``: the loss compares the
    merged model with each task's own fine-tuned model, so the teacher stage runs first (outputs cached
    or online, ``parameters.teacher``; causal LMs score the teacher's greedy continuation of each input,
    ``max_new_tokens``, optionally on its ``top_k`` tokens) and ``store`` is the teacher store; without
    teachers ``store`` is None and causal LMs are scored at every input position.
    """

    loss: str
    teachers: bool


@dataclass(frozen=True)
class LearnedMethod(MergeMethod):
    """A learned method's registry entry: a :class:`MergeMethod` plus the :class:`Objective` it minimises."""

    objective: Objective = field(kw_only=True)


class LearnedParameters(MethodParameters):
    """Optimisation and data parameters of the learned methods."""

    granularity: Literal["task", "layer", "tensor"] = Field(
        "layer", description="one coefficient per task, per (layer, task) or per (tensor, task)"
    )
    divergence: Literal["js", "kl"] = Field(
        "js", description="divmerge: Jensen-Shannon or forward KL (teacher first); unused by adamerging"
    )
    lr: Annotated[float, Field(gt=0)] = Field(1e-2, description="Adam learning rate")
    epochs: Annotated[int, Field(ge=1)] = Field(4, description="passes over the largest task's inputs")
    batch_size_per_task: Annotated[int, Field(ge=1)] = Field(4, description="inputs of every task per step")
    init: Literal["1/n", "task_arithmetic"] | FiniteFloat | None = Field(
        None,
        description="initial coefficient of every (group, task): '1/n' (1/n_tasks, the default), "
        "'task_arithmetic' (1.0) or a number",
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="learning rate over the steps: constant, or cosine decay to 0 at the last step",
    )
    warmup_steps: Annotated[int, Field(ge=0)] = Field(
        0, description="steps of linear warmup from 0 to lr (before the schedule)"
    )
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="warmup as a share of the planned steps (the larger of the two warmups applies)"
    )
    # --- held-out divergence, best Gamma and early stopping (docs/engine.md#convergence) ---
    heldout: Annotated[float, Field(ge=0, le=0.5)] = Field(
        0.1,
        description="share of each task's inputs held out of training to measure the objective once per "
        "epoch (at least 4 inputs; none for a task with fewer than 20 inputs; 0: none). The Gamma with the "
        "lowest held-out value is kept",
    )
    patience: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="stop once the held-out value has not improved for this many epochs (default: run "
        "every epoch)",
    )
    min_delta: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="relative improvement of the held-out value that counts as one (0: any decrease)"
    )
    max_length: Annotated[int, Field(ge=1)] = Field(128, description="input tokens kept per example")
    max_new_tokens: Annotated[int, Field(ge=1)] = Field(
        32, description="causal LMs: tokens the teacher generates per input"
    )
    top_k: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="store only the teacher's top-k token probabilities (approximation; default full vocab)",
    )
    seed: int = Field(0, description="seed of the data sampling and of the batch order")
    # --- at scale: memory placement and activation memory (docs/scale.md) ---
    placement: Literal["auto", "resident", "offload", "stream"] = Field(
        "auto",
        description="where the task vectors live: on the compute device (resident), in host memory "
        "(offload), read from the experts' files at every step (stream); auto picks the fastest that fits",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute each layer's activations in backward instead of keeping them"
    )
    micro_batch_size: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="inputs per forward/backward; a step's batch_size_per_task x K inputs are split into "
        "micro-batches whose gradients add up (default: the whole step at once)",
    )
    # --- teacher outputs (docs/teachers.md) ---
    teacher: Literal["cached", "online"] = Field(
        "cached",
        description="cached: teacher outputs computed once into the worker's teacher cache (on disk, shared "
        "across jobs); online: recomputed at every step from theta_0 + tau_t, nothing stored",
    )
    # --- variants past the paper (docs/engine.md#learned-merge-variants) ---
    tau_sparsify: Literal["none", "magnitude", "random"] = Field(
        "none",
        description="sparsify each task vector, per tensor, before learning its coefficients: magnitude "
        "keeps the tau_density share of largest magnitude (TIES's trim), random keeps each entry with "
        "probability tau_density and rescales by 1/tau_density (DARE's drop, seeded by seed); the final "
        "merge uses the same task vectors",
    )
    tau_density: Annotated[float, Field(gt=0, le=1)] = Field(
        0.2, description="share of each task vector's entries tau_sparsify keeps"
    )
    tau_consensus: Literal["none", "sign"] = Field(
        "none",
        description="sign: per entry keep only the task vectors whose sign is that of their sum over the "
        "tasks (TIES's sign election, after tau_sparsify), the others set to 0",
    )
    pull: Annotated[FiniteFloat, Field(ge=0)] = Field(
        0.0,
        description="granularity: tensor only: adds pull x the mean over (tensor, task) of the squared "
        "distance of each coefficient to the mean of its layer's tensors' coefficients (DAM-style)",
    )

    @field_validator("tau_sparsify", "tau_consensus")
    @classmethod
    def _dense_teachers(cls, value: str, info: ValidationInfo) -> str:
        if value != "none" and info.data.get("teacher") == "online":
            raise ValueError(
                f"{info.field_name}: {value} needs teacher: cached (online teachers are recomputed from the "
                "task vectors, which this would trim)"
            )
        return value

    @field_validator("pull")
    @classmethod
    def _pull_needs_tensors(cls, value: float, info: ValidationInfo) -> float:
        granularity = info.data.get("granularity")
        if value > 0 and granularity is not None and granularity != "tensor":
            raise ValueError(
                f"pull pulls each tensor's coefficient toward its layer's mean: it needs granularity: "
                f"tensor (got {granularity})"
            )
        return value
