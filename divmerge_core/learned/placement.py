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

Life cycle of a :class:`TaskVectors`: ``add`` for every expert tensor during the expert pass (when
``keeps_task_vectors``), ``start`` once the module holds theta_0, then per optimisation step
``weights(gamma)`` -> forward/backward -> ``gradient(gamma)`` (fills ``gamma.grad`` where autograd did not)
-> optimiser step -> ``update(gamma)``; ``close`` at the end.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..io.lora import open_model
from ..plan import MergePlan
from .model import MergeModule

PLACEMENTS = ("resident", "offload", "stream")  # fastest first


class TaskVectors:
    """Base of the placements: which names are merged, their coefficient rows, compute dtype and device."""

    name = ""
    #: whether the expert pass hands every task vector to :meth:`add`.
    keeps_task_vectors = True

    def __init__(
        self, model: MergeModule, rows: dict[str, int], n_tasks: int, dtype: torch.dtype, device: torch.device
    ):
        self.model, self.rows, self.n_tasks = model, rows, n_tasks
        self.dtype, self.device = dtype, device
        self.names = list(model.merged_names)

    def add(self, t: int, name: str, expert: torch.Tensor, base: torch.Tensor) -> None:
        """Task ``t``'s tensor ``name`` (fp32 expert and base weights on the compute device)."""
        raise NotImplementedError

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
        self, model: MergeModule, rows: dict[str, int], n_tasks: int, dtype: torch.dtype, device: torch.device
    ):
        super().__init__(model, rows, n_tasks, dtype, device)
        self.tau = {
            n: torch.empty((n_tasks, *model.slots[n].shape), dtype=dtype, device=device) for n in self.names
        }
        self.theta0: dict[str, torch.Tensor] = {}

    def add(self, t: int, name: str, expert: torch.Tensor, base: torch.Tensor) -> None:
        self.tau[name][t] = (expert - base).to(self.dtype)

    def start(self, gamma: torch.Tensor) -> None:
        self.theta0 = {n: self.model.slots[n].detach() for n in self.names}

    def weights(self, gamma: torch.Tensor) -> dict[str, torch.Tensor]:
        coeffs = gamma.to(self.dtype)
        return {
            n: self.theta0[n] + torch.tensordot(coeffs[self.rows[n]], self.tau[n], dims=1) for n in self.names
        }

    def task_weights(self, t: int) -> dict[str, torch.Tensor]:
        return {n: self.theta0[n] + self.tau[n][t] for n in self.names}


class _Rebuilt(TaskVectors):
    """Merged weights as leaves, Gamma's gradient by inner products (``offload`` and ``stream``).

    Task vectors come one at a time (:meth:`task_vectors` yields them), so the device holds a few copies of
    one tensor at most, whatever K is.
    """

    #: whether theta_0 is kept as a copy (else :meth:`theta0_of` reads it when needed)
    keeps_theta0 = True

    def __init__(
        self, model: MergeModule, rows: dict[str, int], n_tasks: int, dtype: torch.dtype, device: torch.device
    ):
        super().__init__(model, rows, n_tasks, dtype, device)
        self.theta0: dict[str, torch.Tensor] = {}
        self.merged: dict[str, torch.Tensor] = {}
        self._grad: torch.Tensor | None = None
        self._hooks: list = []

    def task_vectors(self, name: str) -> Iterator[torch.Tensor]:
        """Task vector of tensor ``name`` for t = 0..K-1, on the compute device, in the compute dtype."""
        raise NotImplementedError

    def task_vector(self, name: str, t: int) -> torch.Tensor:
        """Task ``t``'s vector of tensor ``name`` (as :meth:`task_vectors` yields it)."""
        raise NotImplementedError

    def theta0_of(self, name: str) -> torch.Tensor:
        """theta_0 of tensor ``name`` in the compute dtype, on the compute device."""
        return self.theta0[name]

    def task_weights(self, t: int) -> dict[str, torch.Tensor]:
        return {n: self.theta0_of(n) + self.task_vector(n, t) for n in self.names}

    def start(self, gamma: torch.Tensor) -> None:
        self._grad = torch.zeros_like(gamma, dtype=torch.float32)
        for n in self.names:
            slot = self.model.slots[n]
            if self.keeps_theta0:
                self.theta0[n] = slot.clone()
            slot.requires_grad_(True)  # the module's own storage becomes the leaf W_n
            self.merged[n] = slot
            self._hooks.append(slot.register_post_accumulate_grad_hook(self._hook(n)))
        self.update(gamma)

    def _hook(self, name: str):
        row = self.rows[name]

        def accumulate(w: torch.Tensor) -> None:
            assert w.grad is not None and self._grad is not None
            g = w.grad.reshape(-1).float()
            w.grad = None  # dL/dW_n is not kept: its inner products with the task vectors are
            for t, tau in enumerate(self.task_vectors(name)):  # fp32 inner products
                self._grad[row, t] += torch.dot(tau.reshape(-1).float(), g)

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
            row = coeffs[self.rows[n]]
            acc: torch.Tensor | None = None
            for t, tau in enumerate(self.task_vectors(n)):
                acc = row[t] * tau.float() if acc is None else acc.addcmul_(tau.float(), row[t])
            assert acc is not None
            self.merged[n].copy_(acc.to(self.dtype)).add_(self.theta0_of(n))

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for w in self.merged.values():
            w.requires_grad_(False)


class Offload(_Rebuilt):
    """Task vectors in host memory (pinned when the compute device is CUDA), moved one at a time."""

    name = "offload"

    def __init__(
        self, model: MergeModule, rows: dict[str, int], n_tasks: int, dtype: torch.dtype, device: torch.device
    ):
        super().__init__(model, rows, n_tasks, dtype, device)
        pin = device.type == "cuda"
        self.tau = {
            n: torch.empty((n_tasks, *model.slots[n].shape), dtype=dtype, pin_memory=pin) for n in self.names
        }

    def add(self, t: int, name: str, expert: torch.Tensor, base: torch.Tensor) -> None:
        self.tau[name][t].copy_((expert - base).to(self.dtype))

    def task_vectors(self, name: str) -> Iterator[torch.Tensor]:
        for t in range(self.n_tasks):
            yield self.task_vector(name, t)

    def task_vector(self, name: str, t: int) -> torch.Tensor:
        return self.tau[name][t].to(self.device, non_blocking=True)


class Stream(_Rebuilt):
    """No task vector kept: ``theta_t - theta_0`` read from the checkpoints, one tensor at a time, when needed."""

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
    ):
        super().__init__(model, rows, n_tasks, dtype, device)
        assert plan.base is not None
        self.base = open_model(plan.base, plan.options)
        self.experts = [open_model(m, plan.options) for m in plan.models]

    def task_vectors(self, name: str) -> Iterator[torch.Tensor]:
        # read in the stored dtype, converted on the device; the same rounding as resident/offload:
        # (theta_t - theta_0) in fp32, then the compute dtype
        base = self.base.get(name, None, self.device).float()
        for ck in self.experts:
            yield (ck.get(name, None, self.device).float() - base).to(self.dtype)

    def theta0_of(self, name: str) -> torch.Tensor:
        return self.base.get(name, None, self.device).to(self.dtype)

    def task_vector(self, name: str, t: int) -> torch.Tensor:
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
) -> TaskVectors:
    n_tasks = len(plan.models)
    if placement == "resident":
        return Resident(model, rows, n_tasks, dtype, device)
    if placement == "offload":
        return Offload(model, rows, n_tasks, dtype, device)
    if placement == "stream":
        return Stream(model, rows, n_tasks, dtype, device, plan)
    raise ValueError(f"unknown placement {placement!r}")
