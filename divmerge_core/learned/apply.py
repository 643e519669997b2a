"""A learned merge's weights from its coefficients: ``theta_0 + sum_t Gamma[g, t] * tau_t`` for one tensor,
with ``tau_t = theta_t - theta_0`` and ``g`` the tensor's coefficient group. The pipeline streams the
checkpoints through :func:`merged_tensor` one tensor at a time, as it does a classic method.

Coefficients learned over trimmed or sign-resolved task vectors (``coeffs.task_vectors``, see
:mod:`.trimming`) are applied to the task vectors transformed by the same rule."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import DivMergeError
from ..plan import LearnedCoefficients
from .trimming import TauRule


def merged_tensor(
    coeffs: LearnedCoefficients, name: str, base: torch.Tensor, tensors: Iterable[torch.Tensor]
) -> torch.Tensor:
    """Tensor ``name`` of the merge: ``base + sum_t coeffs[group(name), t] * (tensors[t] - base)``.

    ``tensors`` are the task models' copies, in ``coeffs.tasks`` order; each is consumed (overwritten with
    its task vector), so a caller may hand the same reused buffer for every task.
    """
    if name not in coeffs.group_of:
        raise DivMergeError(f"the learned coefficients assign no group to tensor {name!r}")
    out = base.clone()
    if coeffs.task_vectors is not None:
        return _merged_transformed(TauRule.from_json(coeffs.task_vectors), coeffs, name, base, tensors, out)
    for t, c in zip(tensors, coeffs.for_tensor(name), strict=True):
        out.add_(t.sub_(base), alpha=float(c))
    return out


def _merged_transformed(
    rule: TauRule,
    coeffs: LearnedCoefficients,
    name: str,
    base: torch.Tensor,
    tensors: Iterable[torch.Tensor],
    out: torch.Tensor,
) -> torch.Tensor:
    """As the learning formed them: ``theta_t - theta_0`` in fp32, sparsified, rounded to the compute dtype,
    then (consensus) sign-resolved over the K task vectors of this tensor."""
    base32 = base.float()
    taus = []
    for t, (x, c) in enumerate(zip(tensors, coeffs.for_tensor(name), strict=True)):
        tau = rule.form(name, t, x.float() - base32, base.dtype)  # a new tensor (x may be a reused buffer)
        if rule.sign:
            taus.append(tau)
        else:
            out.add_(tau, alpha=float(c))
    if rule.sign:
        for tau, c in zip(rule.resolve_(torch.stack(taus)), coeffs.for_tensor(name), strict=True):
            out.add_(tau, alpha=float(c))
    return out
