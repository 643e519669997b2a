"""Where Gamma starts (``parameters.init``) and the learning rate at each step (``lr_schedule``, warmup)."""

from __future__ import annotations

import math

import torch


def initial_value(init: str | float | None, n_tasks: int) -> float:
    """Gamma's starting value: ``'1/n'`` or None (1 / n_tasks), ``'task_arithmetic'`` (1.0) or a number."""
    if init is None or init == "1/n":
        return 1.0 / n_tasks
    if init == "task_arithmetic":
        return 1.0
    return float(init)


def warmup_of(params, total: int) -> int:
    """Warmup steps: the larger of ``warmup_steps`` and ``warmup_ratio * total``, at most ``total``."""
    return min(total, max(params.warmup_steps, math.ceil(params.warmup_ratio * total)))


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """The share of ``lr`` step ``step`` (1-based, of ``total`` planned) runs at.

    Warmup: ``step / (warmup + 1)`` for the first ``warmup`` steps (never 0, so the first step moves Gamma).
    Then ``constant``: 1; ``cosine``: ``0.5 (1 + cos(pi * k / K))`` with ``k`` the steps after warmup so
    far (0 at the first one) and ``K`` the steps after warmup, so the first step after warmup runs at the
    full ``lr`` and the factor falls towards 0 at the last planned step.
    """
    if step <= warmup:
        return step / (warmup + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        after = total - warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup - 1) / after)) if after > 0 else 1.0
    raise ValueError(f"unknown lr_schedule {schedule!r}")


def make_scheduler(optimiser: torch.optim.Optimizer, params, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler whose factor at optimiser step ``s`` (0-based) is ``lr_factor(s + 1, ...)``;
    call ``step()`` after each ``optimiser.step()``."""
    warmup = warmup_of(params, total)
    return torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: lr_factor(s + 1, total, params.lr_schedule, warmup)
    )
