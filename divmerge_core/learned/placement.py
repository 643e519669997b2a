"""Where the task vectors live, and the merged weights ``theta_0 + sum_t Gamma[g(n), t] * tau_t,n`` the forward runs on.

* ``resident``: theta_0 and the stacked task vectors ``[K, ...]`` on the compute device; autograd
  differentiates the merge (fastest; device memory grows with K).
* ``offload``: the task vectors in host memory (pinned on CUDA), brought to the device tensor by tensor.
* ``stream``: no task vector is kept; each is formed as ``theta_t - theta_0`` from the experts' safetensors
  files, tensor by tensor, whenever it is needed (the OS page cache does the caching).

In ``offload`` and ``stream`` the forward runs on merged weights ``W`` held as leaf tensors (the module's own
storage). As soon as backward has accumulated ``dL/dW_n`` a hook adds ``<dL/dW_n, tau_t,n>`` to
``dL/dGamma[g(n), t]`` and frees it, and after the Adam step ``W`` is rebuilt tensor by tensor: the device
holds two models (theta_0 and W; ``stream`` reads theta_0 from the base's file too, so one) plus
activations and a few copies of one tensor, whatever K is.

Trimmed or sign-resolved task vectors (``tau_sparsify``, ``tau_consensus``: :mod:`.trimming`) are transformed
where each placement forms them: resident and offload as the expert pass hands them over (signs resolved
once over the stored stack in ``start``), stream each time it reads them.

LoRA experts over the merge's base (:mod:`.lowrank`) keep, in every placement, their task vectors as the
adapters' factors on the compute device (``add_low_rank``): only the tensors an adapter replaces whole have a
dense task vector (placed as above), and tensors no expert changes are neither copied, nor made leaves,
nor rebuilt.

Life cycle of a :class:`TaskVectors`: ``add`` for every dense expert tensor during the expert pass (when
``keeps_task_vectors``) and ``add_low_rank`` for every low-rank one, ``start`` once the module holds theta_0, then per optimisation step
``weights(gamma)`` -> forward/backward -> ``gradient(gamma)`` (fills ``gamma.grad`` where autograd did not)
-> optimiser step -> ``update(gamma)``; ``close`` at the end.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..io.lora import open_model
from ..plan import MergePlan
from .lowrank import DENSE, FULL, LOW_RANK, ZERO, ExpertLayout, LowRank, expert_layouts, low_rank_sum
from .model import MergeModule
from .trimming import TauRule

PLACEMENTS = ("resident", "offload", "stream")  # fastest first


class TaskVectors:
    """Base of the placements: which names are merged, their coefficient rows, compute dtype and device."""

    name = ""
    #: whether the expert pass hands every task vector to :meth:`add`.
    keeps_task_vectors = True

    def __init__(
        self,
        model: MergeModule,
        rows: dict[str, int],
        n_tasks: int,
        dtype: torch.dtype,
        device: torch.device,
        layouts: list[ExpertLayout] | None = None,
        rule: TauRule | None = None,
    ):
        self.model, self.rows, self.n_tasks = model, rows, n_tasks
        self.dtype, self.device = dtype, device
        #: how the task vectors are trimmed / sign-resolved (None: as they are)
        self.rule = rule
        self.names = list(model.merged_names)
        self.layouts = layouts or [FULL] * n_tasks
        #: name -> each task's kind of task vector (dense, low_rank, zero)
        self.kinds = {n: [lay.kind(n) for lay in self.layouts] for n in self.names}
        #: name -> the tasks with a dense task vector, and each one's index in the dense stack
        self.dense_tasks = {n: [t for t, k in enumerate(ks) if k == DENSE] for n, ks in self.kinds.items()}
        self.dense_pos = {n: {t: i for i, t in enumerate(ts)} for n, ts in self.dense_tasks.items()}
        #: name -> task -> its low-rank task vector (filled by add_low_rank)
        self.factors: dict[str, dict[int, LowRank]] = {n: {} for n in self.names}
        #: the names some expert changes
        self.touched = {n for n, ks in self.kinds.items() if any(k != ZERO for k in ks)}

    def kind(self, t: int, name: str) -> str | None:
        """Task ``t``'s kind of task vector for ``name`` (None: not a merged name)."""
        ks = self.kinds.get(name)
        return None if ks is None else ks[t]

    def needs_expert(self, t: int) -> bool:
        """Whether the expert pass must read expert ``t`` for its task vectors."""
        return self.keeps_task_vectors or self.layouts[t].is_low_rank

    def add(self, t: int, name: str, expert: torch.Tensor, base: torch.Tensor) -> None:
        """Task ``t``'s tensor ``name`` (fp32 expert and base weights on the compute device)."""
        raise NotImplementedError

    def add_low_rank(self, t: int, name: str, factors: LowRank) -> None:
        """Task ``t``'s low-rank task vector of ``name`` (fp32 factors on the compute device)."""
        self.factors[name][t] = factors

    def start(self, gamma: torch.Tensor) -> None:
        """Called once after the expert pass (the module's slots hold theta_0) with the initial Gamma."""
        raise NotImplementedError

    def weights(self, gamma: torch.Tensor) -> dict[str, torch.Tensor]:
        """The merged weights passed to ``functional_call``; the loss's gradient reaches Gamma through them."""
        raise NotImplementedError

    def gradient(self, gamma: torch.Tensor) -> None:
        """After backward: make sure ``gamma.grad`` holds dL/dGamma."""

    def task_weights(self, t: int) -> dict[str, torch.Tensor]:
        """Expert ``t``'s weights theta_0 + tau_t for the merged names (after :meth:`start`; online teachers)."""
        raise NotImplementedError

    def update(self, gamma: torch.Tensor) -> None:
        """After the optimiser step: bring the merged weights up to date with Gamma."""

    def close(self) -> None:
        """Release what the placement holds open."""


class Resident(TaskVectors):
    """Base and stacked task vectors ``[K, ...]`` on the compute device; autograd differentiates the merge."""

    name = "resident"

    def __init__(
        self,
        model: MergeModule,
        rows: dict[str, int],
        n_tasks: int,
        dtype: torch.dtype,
        device: torch.device,
        layouts: list[ExpertLayout] | None = None,
        rule: TauRule | None = None,
    ):
        super().__init__(model, rows, n_tasks, dtype, device, layouts, rule)
        self.tau = {
            n: torch.empty((len(ts), *model.slots[n].shape), dtype=dtype, device=device)
            for n, ts in self.dense_tasks.items()
            if ts
        }
        # which coefficients multiply the dense stack (None: all K, the stack is [K, ...])
        self._dense_index = {
            n: None if len(ts) == n_tasks else torch.tensor(ts, device=device)
            for n, ts in self.dense_tasks.items()
            if ts
        }
        self.theta0: dict[str, torch.Tensor] = {}

    def add(self, t: int, name: str, expert: torch.Tensor, base: torch.Tensor) -> None:
        if self.rule is None:
            self.tau[name][self.dense_pos[name][t]] = (expert - base).to(self.dtype)
        else:
            self.tau[name][self.dense_pos[name][t]] = self.rule.form(name, t, expert - base, self.dtype)

    def start(self, gamma: torch.Tensor) -> None:
        if self.rule is not None:
            for stack in self.tau.values():
                self.rule.resolve_(stack)
        self.theta0 = {n: self.model.slots[n].detach() for n in self.names}
        self._low_index = {
            n: torch.tensor(sorted(f), device=self.device) for n, f in self.factors.items() if f
        }

    def weights(self, gamma: torch.Tensor) -> dict[str, torch.Tensor]:
        coeffs = gamma.to(self.dtype)
        out = {}
        for n in self.names:
            w, row = self.theta0[n], coeffs[self.rows[n]]
            if n in self.tau:
                index = self._dense_index[n]
                w = w + torch.tensordot(row if index is None else row[index], self.tau[n], dims=1)
            if self.factors[n]:  # the coefficients rounded as the dense ones, the sum in fp32
                lows = self.factors[n]
                c = row[self._low_index[n]].float()
                w = w + low_rank_sum(c, [lows[t] for t in sorted(lows)], w.shape, self.dtype)
            out[n] = w
        return out

    def task_weights(self, t: int) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.names:
            kind = self.kinds[n][t]
            if kind == DENSE:
                out[n] = self.theta0[n] + self.tau[n][self.dense_pos[n][t]]
            elif kind == LOW_RANK:
                out[n] = self.theta0[n] + self.factors[n][t].dense().to(self.dtype)
            else:
                out[n] = self.theta0[n]
        return out


class _Rebuilt(TaskVectors):
    """Merged weights as leaves, Gamma's gradient by inner products (``offload`` and ``stream``).

    Dense task vectors come one at a time (:meth:`dense_vectors` yields them), so the device holds a few
    copies of one tensor at most, whatever K is; low-rank ones are used through their factors.
    """

    #: whether theta_0 is kept as a copy (else :meth:`theta0_of` reads it when needed)
    keeps_theta0 = True

    def __init__(
        self,
        model: MergeModule,
        rows: dict[str, int],
        n_tasks: int,
        dtype: torch.dtype,
        device: torch.device,
        layouts: list[ExpertLayout] | None = None,
        rule: TauRule | None = None,
    ):
        super().__init__(model, rows, n_tasks, dtype, device, layouts, rule)
        self.theta0: dict[str, torch.Tensor] = {}
        self.merged: dict[str, torch.Tensor] = {}
        self._grad: torch.Tensor | None = None
        self._hooks: list = []

    def dense_vectors(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        """``(t, task vector)`` of tensor ``name`` for the tasks with a dense one, on the compute device, in
        the compute dtype."""
        raise NotImplementedError

    def dense_vector(self, name: str, t: int) -> torch.Tensor:
        """Task ``t``'s dense vector of tensor ``name`` (as :meth:`dense_vectors` yields it)."""
        raise NotImplementedError

    def task_vector(self, name: str, t: int) -> torch.Tensor:
        """Task ``t``'s vector of tensor ``name`` in the compute dtype, whatever its kind."""
        kind = self.kinds[name][t]
        if kind == DENSE:
            return self.dense_vector(name, t)
        if kind == LOW_RANK:
            return self.factors[name][t].dense().to(self.dtype)
        return torch.zeros_like(self.model.slots[name])

    def theta0_of(self, name: str) -> torch.Tensor:
        """theta_0 of tensor ``name`` in the compute dtype, on the compute device."""
        if name not in self.touched:  # the module's own tensor, never changed
            return self.model.slots[name]
        return self.theta0[name]

    def task_weights(self, t: int) -> dict[str, torch.Tensor]:
        return {
            n: self.theta0_of(n) if self.kinds[n][t] == ZERO else self.theta0_of(n) + self.task_vector(n, t)
            for n in self.names
        }

    def start(self, gamma: torch.Tensor) -> None:
        self._grad = torch.zeros_like(gamma, dtype=torch.float32)
        for n in self.names:
            slot = self.model.slots[n]
            self.merged[n] = slot
            if n not in self.touched:  # tau = 0 for every task: W_n = theta_0, no leaf, no gradient
                continue
            if self.keeps_theta0:
                self.theta0[n] = slot.clone()
            slot.requires_grad_(True)  # the module's own storage becomes the leaf W_n
            self._hooks.append(slot.register_post_accumulate_grad_hook(self._hook(n)))
        self.update(gamma)

    def _hook(self, name: str):
        row = self.rows[name]
        lows = self.factors[name]

        def accumulate(w: torch.Tensor) -> None:
            assert w.grad is not None and self._grad is not None
            grad = w.grad.float()
            g = grad.reshape(-1)
            w.grad = None  # dL/dW_n is not kept: its inner products with the task vectors are
            for t, tau in self.dense_vectors(name):  # fp32 inner products
                self._grad[row, t] += torch.dot(tau.reshape(-1).float(), g)
            for t, f in lows.items():
                self._grad[row, t] += f.inner(grad)

        return accumulate

    def weights(self, gamma: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.merged

    def gradient(self, gamma: torch.Tensor) -> None:
        assert self._grad is not None
        gamma.grad = self._grad.clone() if gamma.grad is None else gamma.grad + self._grad
        self._grad.zero_()

    @torch.no_grad()
    def update(self, gamma: torch.Tensor) -> None:
        # the coefficients rounded to the compute dtype as in resident, the sum over tasks in fp32
        coeffs = gamma.detach().to(self.dtype).float()
        for n in self.names:
            if n not in self.touched:
                continue
            row = coeffs[self.rows[n]]
            acc: torch.Tensor | None = None
            for t, tau in self.dense_vectors(n):
                acc = row[t] * tau.float() if acc is None else acc.addcmul_(tau.float(), row[t])
            for t, f in self.factors[n].items():
                if acc is None:
                    acc = torch.zeros(self.merged[n].shape, dtype=torch.float32, device=self.device)
                f.add_to(acc, row[t])
            assert acc is not None
            self.merged[n].copy_(acc.to(self.dtype)).add_(self.theta0_of(n))

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for w in self.merged.values():
            w.requires_grad_(False)


class Offload(_Rebuilt):
    """Dense task vectors in host memory (pinned when the compute device is CUDA), moved one at a time."""

    name = "offload"

    def __init__(
        self,
        model: MergeModule,
        rows: dict[str, int],
        n_tasks: int,
        dtype: torch.dtype,
        device: torch.device,
        layouts: list[ExpertLayout] | None = None,
        rule: TauRule | None = None,
    ):
        super().__init__(model, rows, n_tasks, dtype, device, layouts, rule)
        pin = device.type == "cuda"
        self.tau = {
            n: torch.empty((len(ts), *model.slots[n].shape), dtype=dtype, pin_memory=pin)
            for n, ts in self.dense_tasks.items()
            if ts
        }

    def add(self, t: int, name: str, expert: torch.Tensor, base: torch.Tensor) -> None:
        if self.rule is None:
            self.tau[name][self.dense_pos[name][t]].copy_((expert - base).to(self.dtype))
        else:
            self.tau[name][self.dense_pos[name][t]].copy_(self.rule.form(name, t, expert - base, self.dtype))

    def start(self, gamma: torch.Tensor) -> None:
        if self.rule is not None:  # on the host stack, once
            for stack in self.tau.values():
                self.rule.resolve_(stack)
        super().start(gamma)

    def dense_vectors(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        for t in self.dense_tasks[name]:
            yield t, self.dense_vector(name, t)

    def dense_vector(self, name: str, t: int) -> torch.Tensor:
        return self.tau[name][self.dense_pos[name][t]].to(self.device, non_blocking=True)


class Stream(_Rebuilt):
    """No dense task vector kept: ``theta_t - theta_0`` read from the checkpoints, one tensor at a time, when
    needed (low-rank ones are kept as their factors: they are small)."""

    name = "stream"
    keeps_task_vectors = False
    keeps_theta0 = False  # read from the base's file like the task vectors: one model (W) on the device

    def __init__(
        self,
        model: MergeModule,
        rows: dict[str, int],
        n_tasks: int,
        dtype: torch.dtype,
        device: torch.device,
        plan: MergePlan,
        layouts: list[ExpertLayout] | None = None,
        rule: TauRule | None = None,
    ):
        super().__init__(model, rows, n_tasks, dtype, device, layouts, rule)
        assert plan.base is not None
        self.base = open_model(plan.base, plan.options)
        self.experts = [open_model(m, plan.options) for m in plan.models]

    def dense_vectors(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        # read in the stored dtype, converted on the device; the same rounding as resident/offload:
        # (theta_t - theta_0) in fp32, then the compute dtype
        tasks = self.dense_tasks[name]
        if not tasks:
            return
        base = self.base.get(name, None, self.device).float()
        if self.rule is not None:
            yield from zip(tasks, self._formed(name, tasks, base), strict=True)
            return
        for t in tasks:
            yield t, (self.experts[t].get(name, None, self.device).float() - base).to(self.dtype)

    def _formed(self, name: str, tasks: list[int], base: torch.Tensor) -> Iterator[torch.Tensor]:
        """The tasks' transformed vectors of ``name`` (:mod:`.trimming`), as resident stores them: one at a
        time, or with consensus all of them at once (the signs are elected over the tasks)."""
        assert self.rule is not None
        formed = (
            self.rule.form(name, t, self.experts[t].get(name, None, self.device).float() - base, self.dtype)
            for t in tasks
        )
        if not self.rule.sign:
            yield from formed
            return
        yield from self.rule.resolve_(torch.stack(list(formed)))

    def theta0_of(self, name: str) -> torch.Tensor:
        if name not in self.touched:
            return self.model.slots[name]
        return self.base.get(name, None, self.device).to(self.dtype)

    def dense_vector(self, name: str, t: int) -> torch.Tensor:
        if self.rule is not None:
            return dict(self.dense_vectors(name))[t]
        base = self.base.get(name, None, self.device).float()
        return (self.experts[t].get(name, None, self.device).float() - base).to(self.dtype)

    def close(self) -> None:
        super().close()
        for ck in (self.base, *self.experts):
            ck.close()


def make_task_vectors(
    placement: str,
    plan: MergePlan,
    model: MergeModule,
    rows: dict[str, int],
    dtype: torch.dtype,
    device: torch.device,
    layouts: list[ExpertLayout] | None = None,
    rule: TauRule | None = None,
) -> TaskVectors:
    """The placement's task vectors; ``layouts`` (default: :func:`.lowrank.expert_layouts`) says which
    experts keep low-rank ones, ``rule`` how they are trimmed or sign-resolved (:mod:`.trimming`)."""
    n_tasks = len(plan.models)
    if layouts is None:
        layouts = expert_layouts(plan)
    if placement == "resident":
        return Resident(model, rows, n_tasks, dtype, device, layouts, rule)
    if placement == "offload":
        return Offload(model, rows, n_tasks, dtype, device, layouts, rule)
    if placement == "stream":
        return Stream(model, rows, n_tasks, dtype, device, plan, layouts, rule)
    raise ValueError(f"unknown placement {placement!r}")
