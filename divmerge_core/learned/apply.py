"""A learned merge's weights from its coefficients: ``theta_0 + sum_t Gamma[g, t] * tau_t`` for one tensor,
with ``tau_t = theta_t - theta_0`` and ``g`` the tensor's coefficient group. The pipeline streams the
checkpoints through :func:`merged_tensor` one tensor at a time, as it does a classic method."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import DivMergeError
from ..plan import LearnedCoefficients


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
    for t, c in zip(tensors, coeffs.for_tensor(name), strict=True):
        out.add_(t.sub_(base), alpha=float(c))
    return out
