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
from .activations import enable_checkpointing
from .batching import collate, per_example_mean, scored_logits
from .convergence import Tracker, heldout_split, heldout_values
from .encoding import Example
from .inputs import LearnedInputs
from .model import MergeModule
from .objectives import loss_function
from .placement import TaskVectors
from .pull import layer_pull
from .ranks import SINGLE, Ranks
from .schedule import make_scheduler
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
    tracker: Tracker | None = None,
    groups: list[str] | None = None,
) -> list[float]:
    """Run every step in place on ``gamma``; return the loss of each step.

    Each task's held-out inputs (:mod:`.convergence`) are left out of the steps and scored before the first
    step and after every epoch; ``gamma`` ends as the Gamma with the lowest held-out value (the last one
    when nothing is held out) and the run stops early after ``patience`` epochs without improvement.
    ``tracker`` (when given) receives that record.

    The loss is ``mean_t mean_{x in step's task-t inputs} loss(x)``, a weighted sum over inputs (each input
    weighted by 1 / (n_tasks * the step's count of its task)). So the inputs may go through forward/backward
    in micro-batches (``micro_batch_size``) whose gradients add up to the whole batch's, and with several
    ranks each takes a share of every step's inputs and computes its part of that sum; Gamma's gradient and
    the loss are summed over the ranks, so every rank takes the same Adam step as a single process would.

    With ``pull`` > 0 (``granularity: tensor``; ``groups`` are Gamma's rows) each step's loss adds the pull
    toward the layer means (:mod:`.pull`), once (on rank 0); the held-out values do not.
    """
    n_tasks = len(inputs.examples)
    loss_fn = loss_function(objective, params, kind, store)
    split = heldout_split([len(e) for e in inputs.examples], params.heldout, params.seed)
    train = [[ex[i] for i in s.train] for ex, s in zip(inputs.examples, split, strict=True)]
    heldout = [[ex[i] for i in s.heldout] for ex, s in zip(inputs.examples, split, strict=True)]
    sampler = Sampler([len(e) for e in train], params.batch_size_per_task, params.seed)
    total = params.epochs * sampler.steps_per_epoch
    optimiser = torch.optim.Adam([gamma], lr=params.lr)
    scheduler = make_scheduler(optimiser, params, total)
    label_masks = inputs.label_masks
    record = tracker if tracker is not None else Tracker()
    pull = float(getattr(params, "pull", 0.0))
    if pull > 0 and (groups is None or len(groups) != gamma.shape[0]):
        raise ValueError("pull needs the coefficient groups (Gamma's rows)")
    penalty = layer_pull(groups, pull, device) if groups is not None else None
    record.start(
        params,
        steps_per_epoch=sampler.steps_per_epoch,
        planned_steps=total,
        heldout_inputs=[len(h) for h in heldout],
    )

    def chunk_loss(chunk: list[Example], weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Per-input loss [len(chunk)] of ``chunk`` on ``weights`` (default: the current Gamma's)."""
        batch = collate(kind, chunk, inputs.tokenizer, device)
        weights = vectors.weights(gamma) if weights is None else weights
        out = functional_call(
            model.module, weights, args=(), kwargs=batch.inputs, tie_weights=True, strict=False
        )
        logits = scored_logits(kind, out.logits, batch).float()
        if label_masks is not None:  # each input is scored on its own task's labels only
            owner_task = torch.tensor([e.task for e in chunk], device=device)
            logits = logits.masked_fill(~label_masks[owner_task], -math.inf)
        return per_example_mean(loss_fn(logits, chunk), batch, len(chunk))

    def evaluate(epoch: int, step: int) -> bool:
        """Score the held-out inputs, report them; whether to stop."""
        if not any(heldout):
            return False
        chunk = params.micro_batch_size or max(1, params.batch_size_per_task * n_tasks)
        per_task = heldout_values(heldout, chunk_loss, chunk_size=chunk, device=device, ranks=ranks)
        stop = record.record(epoch, step, per_task, gamma)
        reporter.report(
            "optimise",
            step,
            total,
            message=f"held-out {record.rows[-1][2]:.6g} after epoch {epoch}",
            heldout=tuple(record.rows[-1]),
        )
        return stop

    vectors.start(gamma)
    current: dict[str, torch.Tensor] = {}
    if params.gradient_checkpointing:
        enable_checkpointing(model.module, lambda: current)
    losses: list[float] = []
    evaluate(0, 0)
    for step in range(1, total + 1):
        reporter.check()
        chosen = sampler.next()
        picked = ranks.share([train[t][i] for t, idx in enumerate(chosen) for i in idx])
        counts = torch.tensor([len(idx) for idx in chosen], device=device, dtype=torch.float32)
        micro = params.micro_batch_size or max(1, len(picked))
        optimiser.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=device)  # this rank's part; stays 0 with more ranks than inputs
        for lo in range(0, len(picked), micro):
            chunk = picked[lo : lo + micro]
            current = vectors.weights(gamma)
            per_example = chunk_loss(chunk, current)
            owner_task = torch.tensor([e.task for e in chunk], device=device)
            part = (per_example / (n_tasks * counts[owner_task])).sum()
            part.backward()
            loss = loss + part.detach()
            del per_example, part
        current = {}
        if penalty is not None and ranks.is_main:  # counted once in the sum over ranks
            term = penalty(gamma)
            term.backward()
            loss = loss + term.detach()
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
        scheduler.step()
        if not torch.isfinite(gamma).all():
            raise NumericalError(f"{method}: the coefficients became non-finite at step {step}")
        vectors.update(gamma)
        losses.append(value)
        reporter.report("optimise", step, total, value)
        if step % sampler.steps_per_epoch == 0 and evaluate(step // sampler.steps_per_epoch, step):
            break
    record.steps = len(losses)
    record.restore_best(gamma)
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
