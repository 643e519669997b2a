"""Learned coefficients over trimmed or sign-resolved task vectors (``tau_sparsify``, ``tau_density``,
``tau_consensus``): the learned merge of TIES- or DARE-style task vectors.

Before optimisation each expert's task vector ``tau_t,n = theta_t,n - theta_0,n`` is, tensor by tensor:

1. sparsified (``tau_sparsify``): ``magnitude`` keeps the ``max(1, int(tau_density * numel))`` entries of
   largest magnitude (TIES's trim, mergekit's ``magnitude``: :func:`~divmerge_core.methods.sparsify.mk_magnitude_`);
   ``random`` keeps each entry with probability ``tau_density`` and rescales the kept ones by
   ``1 / tau_density`` (DARE's drop: :func:`~divmerge_core.methods.sparsify.dare_drop_`), drawn from a
   generator seeded per (tensor, task) with ``seed``, on the host, so every placement, every step and the
   final merge draw the same mask whatever the device;
2. rounded to the compute dtype;
3. with ``tau_consensus: sign``, sign-resolved across the tasks (TIES's sign election,
   :func:`~divmerge_core.methods.sparsify.sign_consensus_`): per entry the elected sign is the sign of the
   sum of the (sparsified) task vectors over the tasks, and every entry of another sign is set to 0.

The rule is the classic methods' own code (:mod:`divmerge_core.methods.sparsify`); unlike ``ties`` the
sign is elected on the unweighted vectors (the weights are what is learned) and nothing is normalised:
the learned merge is ``theta_0 + sum_t Gamma[g, t] * tau'_t`` with the transformed ``tau'``.

Where: resident and offload transform each task vector as the expert pass hands it over and resolve the
signs once over the stored ``[K, ...]`` stack (:meth:`TaskVectors.start`); stream, which forms the task
vectors again from the experts' files at every step, applies the same rule each time (with consensus it
reads the K task vectors of one tensor together: K fp32 copies of one tensor in transit). The final merge
(:func:`~divmerge_core.learned.apply.merged_tensor`) applies it once more from ``coefficients.json``'s
``task_vectors`` record, so the written model is the one whose coefficients were learned. Tied tensors
draw with their canonical name's generator, as the forward used it.

Not supported (refused, naming the field): LoRA experts over the merge's base, whose task vectors are kept
as low-rank factors (:mod:`.lowrank`) and never formed as dense tensors, which trimming would need (it
would give up the factors' memory saving and is not low-rank any more); and ``teacher: online``, which
recomputes each teacher from theta_0 + tau_t (the teacher is the expert itself, not its trimmed vector).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..methods import sparsify as sp
from ..plan import MergePlan
from .lowrank import ExpertLayout, expert_layouts


@dataclass(frozen=True)
class TauRule:
    """How the task vectors are transformed before they are merged (None of it: :func:`tau_rule` is None)."""

    sparsify: str = "none"
    density: float = 1.0
    consensus: str = "none"
    seed: int = 0
    #: tied checkpoint name -> its canonical name (the random draw is the canonical tensor's)
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def sign(self) -> bool:
        return self.consensus == "sign"

    def generator(self, name: str, t: int) -> torch.Generator:
        """The host generator of task ``t``'s draw on tensor ``name`` (independent of order and device)."""
        canonical = self.aliases.get(name, name)
        return torch.Generator().manual_seed(sp.tensor_seed(self.seed, f"{canonical}#task{t}"))

    def sparsify_(self, name: str, t: int, tau: torch.Tensor) -> torch.Tensor:
        """Task ``t``'s vector of tensor ``name`` (float32), sparsified in place."""
        if self.sparsify == "magnitude":
            return sp.mk_magnitude_(tau, self.density)
        if self.sparsify == "random":
            return sp.dare_drop_(tau, self.density, self.generator(name, t))
        return tau

    def form(self, name: str, t: int, diff: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Steps 1 and 2 for one task: ``diff`` (float32 theta_t - theta_0, overwritten) -> compute dtype."""
        return self.sparsify_(name, t, diff).to(dtype)

    def resolve_(self, stacked: torch.Tensor) -> torch.Tensor:
        """Step 3 over one tensor's ``[K, ...]`` stack, in place (nothing without consensus)."""
        return sp.sign_consensus_(stacked) if self.sign else stacked

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sparsify": self.sparsify,
            "density": self.density,
            "consensus": self.consensus,
        }
        if self.sparsify == "random":
            out["seed"] = self.seed
            if self.aliases:
                out["aliases"] = dict(self.aliases)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TauRule:
        return cls(
            sparsify=data.get("sparsify", "none"),
            density=float(data.get("density", 1.0)),
            consensus=data.get("consensus", "none"),
            seed=int(data.get("seed", 0)),
            aliases=dict(data.get("aliases") or {}),
        )


def tau_rule(params: Any, aliases: dict[str, str] | None = None) -> TauRule | None:
    """The rule of a learned method's parameters; None with ``tau_sparsify: none, tau_consensus: none``
    (the task vectors as they are: every code path is then the one without this module)."""
    sparsify = getattr(params, "tau_sparsify", "none")
    consensus = getattr(params, "tau_consensus", "none")
    if sparsify == "none" and consensus == "none":
        return None
    density = float(params.tau_density) if sparsify != "none" else 1.0
    return TauRule(sparsify, density, consensus, int(params.seed), dict(aliases or {}))


def check_plan(plan: MergePlan, layouts: Sequence[ExpertLayout] | None = None) -> None:
    """Refuse a rule the plan cannot take: LoRA experts kept as low-rank factors (see the module's text)."""
    params = plan.config.parameters
    if tau_rule(params) is None:
        return
    layouts = expert_layouts(plan) if layouts is None else layouts
    low = [i for i, lay in enumerate(layouts) if lay.is_low_rank]
    if low:
        name = "tau_sparsify" if params.tau_sparsify != "none" else "tau_consensus"
        raise ConfigError(
            f"parameters.{name}: trimmed or sign-resolved task vectors need dense task vectors, and models "
            f"{low} are LoRA experts over the base, whose task vectors are kept as low-rank factors; "
            f"use their merged weights (a full checkpoint) or {name}: none",
            field=f"parameters.{name}",
        )


__all__ = ["TauRule", "check_plan", "tau_rule"]
