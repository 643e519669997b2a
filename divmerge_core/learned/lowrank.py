"""LoRA experts in a learned merge: task vectors kept as their low-rank factors.

A LoRA expert ``base + adapter`` over the merge's own ``base_model`` has, for every tensor the adapter
adapts, the task vector ``tau_t,n = scale * B @ A`` (transposed for embeddings and ``fan_in_fan_out``). The
placements (:mod:`.placement`) keep ``(A, B, scale)`` (float32, on the compute device: ``r x (in + out)``
numbers instead of ``in x out``) and never store ``tau``:

* the merge adds ``Gamma[g, t] * scale * B @ A`` into one fp32 accumulator per tensor (``addmm_``, no
  ``B @ A`` of its own), so a step holds at most one tensor's transient whatever K is;
* ``dL/dGamma[g, t]`` gets ``<dL/dW_n, scale * B @ A> = scale * sum((B^T dL/dW_n) * A)``, an ``r x in``
  product, never the ``in x out`` one;
* tensors the adapter does not touch have ``tau = 0``: nothing is stored or computed for them;
* tensors the adapter replaces whole (``modules_to_save``, saved embeddings, ``bias: all``) keep a dense
  ``tau`` like a full-weight expert's.

The factors give ``tau`` exactly (fp32), where a full-weight copy of the same expert has its tensors rounded
to the stored dtype first (``(theta_0 + B @ A * scale)`` stored, then ``- theta_0``): equal to fp32 rounding
for fp32 checkpoints (tested against peft's ``merge_and_unload``), closer to the adapter for bf16 ones.

An expert whose adapter sits on another base than the merge's ``base_model`` (or a ``base_model`` that is
itself ``base+adapter``) has ``tau = (other base + delta) - theta_0``, which is not low-rank: it is read as
a full-weight expert.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..io.lora import LoraCheckpoint, open_model
from ..plan import MergePlan

DENSE, LOW_RANK, ZERO = "dense", "low_rank", "zero"


@dataclass
class LowRank:
    """``tau = scale * B @ A`` (``.T`` when ``transposed``), A ``[r, in]`` and B ``[out, r]`` in fp32."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transposed: bool

    def dense(self) -> torch.Tensor:
        """The fp32 task vector in the base tensor's layout (one tensor: online teachers only)."""
        out = (self.b @ self.a).mul_(self.scale)
        return out.T if self.transposed else out

    def add_to(self, acc: torch.Tensor, coeff: float | torch.Tensor) -> torch.Tensor:
        """``acc += coeff * tau`` in place (fp32 ``acc``); ``coeff`` a float or a 0-d tensor."""
        b = self.b * (coeff * self.scale)  # [out, r]: the only transient
        if self.transposed:
            return acc.addmm_(self.a.T, b.T)
        return acc.addmm_(b, self.a)

    def inner(self, g: torch.Tensor) -> torch.Tensor:
        """``<g, tau>`` (fp32 0-d tensor) for ``g`` of the base tensor's shape, without forming ``B @ A``."""
        g = g.float()
        bg = (g @ self.b).T if self.transposed else self.b.T @ g  # [r, in]
        return (bg * self.a).sum() * self.scale

    @property
    def nbytes(self) -> int:
        return (self.a.numel() + self.b.numel()) * 4


@dataclass(frozen=True)
class ExpertLayout:
    """How expert t's task vectors are held: ``low_rank`` names (-> factor elements) as factors, ``dense``
    names as full tensors (None: every name, a full-weight expert), every other name is zero."""

    dense: frozenset[str] | None = None
    low_rank: dict[str, int] = field(default_factory=dict)

    def kind(self, name: str) -> str:
        if self.dense is None or name in self.dense:
            return DENSE
        return LOW_RANK if name in self.low_rank else ZERO

    @property
    def is_low_rank(self) -> bool:
        return self.dense is not None


FULL = ExpertLayout()


def _same_folder(a: object, b: object) -> bool:
    return os.path.realpath(str(a)) == os.path.realpath(str(b))


def expert_layouts(plan: MergePlan) -> list[ExpertLayout]:
    """Every expert's layout, from the adapters' headers (nothing is loaded)."""
    base = plan.base
    out: list[ExpertLayout] = []
    for model in plan.models:
        adapter = getattr(model, "adapter", None)
        if (
            base is None
            or adapter is None
            or getattr(base, "adapter", None) is not None
            or not _same_folder(model.path, base.path)
        ):
            out.append(FULL)
            continue
        with open_model(model, plan.options) as ck:
            assert isinstance(ck, LoraCheckpoint)
            ad = ck.adapter
            dense = frozenset(ad.full)  # replaced whole (possibly plus a delta): a dense tau
            low = {n: ad.factor_numel(n) for n in ad.deltas if n not in ad.full}
        out.append(ExpertLayout(dense=dense, low_rank=low))
    return out


def read_factors(ck: LoraCheckpoint, name: str, device: torch.device) -> LowRank:
    a, b, scale, transposed = ck.adapter.factors(name, device)
    return LowRank(a, b, scale, transposed)


class LowRankSum(torch.autograd.Function):
    """``sum_i coeffs[i] * tau_i`` over low-rank task vectors, differentiable in ``coeffs`` (fp32 [m]).

    Forward: one fp32 accumulator of the tensor's shape (returned in ``dtype``); backward:
    ``dcoeffs[i] = <grad, tau_i>`` from the factors. Nothing of the tensor's size is saved for backward.
    """

    @staticmethod
    def forward(ctx, coeffs, factors, shape, dtype):  # type: ignore[override]
        ctx.factors = factors
        acc = torch.zeros(shape, dtype=torch.float32, device=coeffs.device)
        for i, f in enumerate(factors):
            f.add_to(acc, coeffs[i])
        return acc.to(dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        dc = torch.stack([f.inner(grad) for f in ctx.factors])
        return dc, None, None, None


def low_rank_sum(
    coeffs: torch.Tensor, factors: list[LowRank], shape: torch.Size, dtype: torch.dtype
) -> torch.Tensor:
    return LowRankSum.apply(coeffs, factors, shape, dtype)


def factor_bytes(layouts: list[ExpertLayout]) -> int:
    """fp32 bytes of every expert's factors."""
    return sum(4 * n for lay in layouts for n in lay.low_rank.values())


def dense_numel(layout: ExpertLayout, numel: dict[str, int]) -> int:
    """Elements of expert's dense task vectors over the merged names ``numel`` (name -> elements)."""
    if layout.dense is None:
        return sum(numel.values())
    return sum(v for n, v in numel.items() if n in layout.dense)


def touched(layouts: list[ExpertLayout], names: list[str]) -> list[str]:
    """The names some expert changes (a non-zero task vector)."""
    return [n for n in names if any(lay.kind(n) != ZERO for lay in layouts)]


__all__ = [
    "DENSE",
    "FULL",
    "LOW_RANK",
    "ZERO",
    "ExpertLayout",
    "LowRank",
    "dense_numel",
    "expert_layouts",
    "factor_bytes",
    "low_rank_sum",
    "read_factors",
    "touched",
]
