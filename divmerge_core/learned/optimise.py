"""Stage 4 of a learned merge: Adam on Gamma, one step per batch of ``batch_size_per_task`` inputs of every task."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
from torch.func import functional_call

from ..errors import NumericalError
from ..methods.learned_parameters import Objective
from ..progress import Reporter
from ..teachers import collate, per_example_mean, scored_logits
from .activations import enable_checkpointing
from .inputs import LearnedInputs
from .model import MergeModule
from .objectives import loss_function
from .placement import TaskVectors
from .ranks import SINGLE, Ranks
from .teacher_store import TeacherStore

#: Called with Gamma's gradient after backward, before the optimiser step (e.g. an all-reduce across ranks).
GradientHook = Callable[[torch.Tensor], None]


def optimise(
    model: MergeModule,
    vectors: TaskVectors,
    inputs: LearnedInputs,
    store: TeacherStore | None,
    gamma: torch.nn.Parameter,
    *,
    method: str,
    objective: Objective,
    kind: str,
    params,
    device: torch.device,
    reporter: Reporter,
    on_gradient: GradientHook | None = None,
    ranks: Ranks = SINGLE,
) -> list[float]:
    """Run every step in place on ``gamma``; return the loss of each step.

    The loss is ``mean_t mean_{x in step's task-t inputs} loss(x)``, a weighted sum over inputs (each input
    weighted by 1 / (n_tasks * the step's count of its task)). So the inputs may go through forward/backward
    in micro-batches (``micro_batch_size``) whose gradients add up to the whole batch's, and with several
    ranks each takes a share of every step's inputs and computes its part of that sum; Gamma's gradient and
    the loss are summed over the ranks, so every rank takes the same Adam step as a single process would.
    """
    n_tasks = len(inputs.examples)
    loss_fn = loss_function(objective, params, kind, store)
    sampler = Sampler([len(e) for e in inputs.examples], params.batch_size_per_task, params.seed)
    total = params.epochs * sampler.steps_per_epoch
    optimiser = torch.optim.Adam([gamma], lr=params.lr)
    label_masks = inputs.label_masks
    vectors.start(gamma)
    current: dict[str, torch.Tensor] = {}
    if params.gradient_checkpointing:
        enable_checkpointing(model.module, lambda: current)
    losses: list[float] = []
    for step in range(1, total + 1):
        reporter.check()
        chosen = sampler.next()
        picked = ranks.share([inputs.examples[t][i] for t, idx in enumerate(chosen) for i in idx])
        counts = torch.tensor([len(idx) for idx in chosen], device=device, dtype=torch.float32)
        micro = params.micro_batch_size or max(1, len(picked))
        optimiser.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=device)  # this rank's part; stays 0 with more ranks than inputs
        for lo in range(0, len(picked), micro):
            chunk = picked[lo : lo + micro]
            batch = collate(kind, chunk, inputs.tokenizer, device)
            current = vectors.weights(gamma)
            out = functional_call(
                model.module, current, args=(), kwargs=batch.inputs, tie_weights=True, strict=False
            )
            logits = scored_logits(kind, out.logits, batch).float()
            owner_task = torch.tensor([e.task for e in chunk], device=device)
            if label_masks is not None:  # each input is scored on its own task's labels only
                logits = logits.masked_fill(~label_masks[owner_task], -math.inf)
            per_example = per_example_mean(loss_fn(logits, chunk), batch, len(chunk))
            part = (per_example / (n_tasks * counts[owner_task])).sum()
            part.backward()
            loss = loss + part.detach()
            del out, logits, part
        current = {}
        vectors.gradient(gamma)
        if gamma.grad is None:
            gamma.grad = torch.zeros_like(gamma)
        if ranks.world > 1:
            flat = torch.cat([gamma.grad.reshape(-1), loss.detach().reshape(1)])
            ranks.all_reduce_sum(flat)
            gamma.grad.copy_(flat[:-1].view_as(gamma))
            loss = flat[-1]
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NumericalError(f"{method}: the loss became {value} at step {step}; try a smaller lr")
        if on_gradient is not None:
            on_gradient(gamma.grad)
        optimiser.step()
        if not torch.isfinite(gamma).all():
            raise NumericalError(f"{method}: the coefficients became non-finite at step {step}")
        vectors.update(gamma)
        losses.append(value)
        reporter.report("optimise", step, total, value)
    return losses


class Sampler:
    """Each step takes ``batch`` inputs from every task; each task cycles through seeded reshuffles."""

    def __init__(self, sizes: list[int], batch: int, seed: int):
        self.sizes, self.batch = sizes, batch
        self.rngs = [random.Random(f"{seed}/batches/{t}") for t in range(len(sizes))]
        self.orders: list[list[int]] = [[] for _ in sizes]
        self.steps_per_epoch = max(1, max(math.ceil(n / batch) for n in sizes))

    def next(self) -> list[list[int]]:
        out = []
        for t, n in enumerate(self.sizes):
            take: list[int] = []
            while len(take) < min(self.batch, n):
                if not self.orders[t]:
                    order = list(range(n))
                    self.rngs[t].shuffle(order)
                    self.orders[t] = order
                i = self.orders[t].pop()
                if i not in take:
                    take.append(i)
                # an index already taken in this batch (at a reshuffle boundary) is simply skipped
            out.append(take)
        return out
