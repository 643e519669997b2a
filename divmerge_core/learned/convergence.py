"""Held-out divergence, best-Gamma selection and early stopping (``parameters.heldout``, ``patience``).

Each task's unlabelled inputs are split once, by a seeded shuffle, into training inputs (the only ones the
optimisation samples) and held-out inputs (:func:`heldout_split`). The teacher stage still sees every input,
so the teacher cache entry is the same with or without a split. Before the first step and after every
epoch the objective (the same per-input loss as training, here without gradient) is averaged over each
task's held-out inputs; the run's held-out value is the mean over the tasks that hold some out, as the
training loss is a mean over tasks.

:class:`Tracker` keeps the Gamma with the lowest held-out value and says when to stop: after ``patience``
epochs without an improvement (a value below the best by more than ``min_delta`` times the best). With
several ranks every rank evaluates its share of the held-out inputs and the per-task sums are all-reduced,
so every rank sees the same values and takes the same decisions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..plan import Convergence
from .encoding import Example
from .ranks import SINGLE, Ranks

#: The fewest held-out inputs of a task that holds any out.
HELDOUT_MIN = 4
#: A task with fewer inputs holds none out (all of them train).
HELDOUT_MIN_TASK = 20


def heldout_count(n: int, share: float) -> int:
    """How many of a task's ``n`` inputs are held out: ``max(4, round(share * n))``; 0 when ``share`` is 0 or
    the task has fewer than 20 inputs."""
    if share <= 0 or n < HELDOUT_MIN_TASK:
        return 0
    return max(HELDOUT_MIN, round(share * n))


@dataclass(frozen=True)
class Split:
    """One task's input indices: ``train`` (in input order) and ``heldout`` (in input order)."""

    train: list[int]
    heldout: list[int]


def heldout_split(sizes: list[int], share: float, seed: int) -> list[Split]:
    """Per task, a seeded choice of :func:`heldout_count` inputs to hold out; the rest train."""
    out = []
    for t, n in enumerate(sizes):
        order = list(range(n))
        random.Random(f"{seed}/heldout/{t}").shuffle(order)
        held = set(order[: heldout_count(n, share)])
        out.append(Split([i for i in range(n) if i not in held], sorted(held)))
    return out


#: The per-input losses of a chunk of examples with the current Gamma: [len(chunk)] (what training averages).
ChunkLoss = Callable[[list[Example]], torch.Tensor]


@torch.no_grad()
def heldout_values(
    heldout: list[list[Example]],
    chunk_loss: ChunkLoss,
    *,
    chunk_size: int,
    device: torch.device,
    ranks: Ranks = SINGLE,
) -> list[float | None]:
    """Each task's mean per-input loss over its held-out inputs (None for a task holding none out).

    Every rank takes its share of each task's inputs; the per-task sums are all-reduced, so all ranks
    return the same values.
    """
    n_tasks = len(heldout)
    sums = torch.zeros(n_tasks, device=device, dtype=torch.float64)
    for t, examples in enumerate(heldout):
        mine = ranks.share(examples)
        for lo in range(0, len(mine), chunk_size):
            sums[t] += chunk_loss(mine[lo : lo + chunk_size]).double().sum()
    ranks.all_reduce_sum(sums)
    return [float(sums[t]) / len(e) if e else None for t, e in enumerate(heldout)]


def mean_value(per_task: list[float | None]) -> float | None:
    """The mean over the tasks that hold inputs out (None when none does)."""
    known = [v for v in per_task if v is not None]
    return sum(known) / len(known) if known else None


class Tracker:
    """The held-out record of one run, the best Gamma so far and the stopping decision."""

    def __init__(self) -> None:
        self.patience: int | None = None
        self.min_delta = 0.0
        self.steps_per_epoch = self.planned_steps = 0
        #: per task, how many of its inputs are held out
        self.heldout_inputs: list[int] = []
        #: [epoch, step, mean, per-task value or None ...] for epoch 0 (the initial Gamma) and each epoch run
        self.rows: list[list[float | None]] = []
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.best_gamma: torch.Tensor | None = None
        self.stale = 0  # epochs since the last improvement
        self.stopped_early = False
        #: optimisation steps run
        self.steps = 0

    def start(self, params, *, steps_per_epoch: int, planned_steps: int, heldout_inputs: list[int]) -> None:
        """Called once by the optimisation before its first step."""
        self.patience, self.min_delta = params.patience, params.min_delta
        self.steps_per_epoch, self.planned_steps = steps_per_epoch, planned_steps
        self.heldout_inputs = heldout_inputs

    def record(self, epoch: int, step: int, per_task: list[float | None], gamma: torch.Tensor) -> bool:
        """Record the held-out values after ``epoch`` (0: before the first step); return whether to stop."""
        value = mean_value(per_task)
        if value is None:
            return False
        if not math.isfinite(value):
            value = math.inf
        self.rows.append([epoch, step, value, *per_task])
        if self.best_value is None or value < self.best_value - self.min_delta * abs(self.best_value):
            self.best_value, self.best_epoch = value, epoch
            self.best_gamma = gamma.detach().clone()
            self.stale = 0
        else:
            self.stale += 1
        if self.patience is not None and self.stale >= self.patience and step < self.planned_steps:
            self.stopped_early = True
            return True
        return False

    @property
    def active(self) -> bool:
        """Whether any held-out value was recorded (some task holds inputs out)."""
        return bool(self.rows)

    def restore_best(self, gamma: torch.Tensor) -> None:
        """Put the best Gamma back into ``gamma`` (no-op when nothing was held out)."""
        if self.best_gamma is not None:
            with torch.no_grad():
                gamma.copy_(self.best_gamma)

    @property
    def converged(self) -> bool | None:
        """Whether the held-out value stopped improving before the run ended: its best epoch is not the last
        one recorded (None when nothing is held out). A run whose best Gamma is its last is still improving."""
        if not self.active:
            return None
        return self.best_epoch != self.rows[-1][0]

    def to_plan(self) -> Convergence:
        """What ``coefficients.json`` records (see :class:`~divmerge_core.plan.Convergence`)."""
        best_step = None
        if self.best_epoch is not None:
            best_step = next(int(r[1]) for r in self.rows if r[0] == self.best_epoch)  # type: ignore[arg-type]
        return Convergence(
            heldout_inputs=list(self.heldout_inputs),
            heldout=[list(r) for r in self.rows],
            best_epoch=self.best_epoch,
            best_step=best_step,
            converged=self.converged,
            stopped_early=self.stopped_early,
            steps=self.steps,
            planned_steps=self.planned_steps,
            steps_per_epoch=self.steps_per_epoch,
        )
