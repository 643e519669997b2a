"""Where the task vectors live, and the merged weights ``theta_0 + sum_t Gamma[g(n), t] * tau_t,n`` the forward runs on.

Life cycle of a :class:`TaskVectors`: ``add`` for every expert tensor during the expert pass (when
``keeps_task_vectors``), ``start`` once the module holds theta_0, then per optimisation step
``weights(gamma)`` -> forward/backward -> ``gradient(gamma)`` (fills ``gamma.grad`` where autograd did not)
-> optimiser step -> ``update(gamma)``.
"""

from __future__ import annotations

import torch

from .model import MergeModule


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
