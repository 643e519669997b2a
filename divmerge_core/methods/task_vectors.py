"""The last step shared by the task-vector methods: ``base + lambda * mixed``."""

from __future__ import annotations

import torch


def add_to_base(mixed: torch.Tensor, base: torch.Tensor, lambda_: float) -> torch.Tensor:
    """``base + lambda * mixed``, in ``mixed``'s storage when the dtypes allow it."""
    if lambda_ != 1.0:
        mixed = mixed.mul_(lambda_)
    return mixed.add_(base) if mixed.dtype == torch.promote_types(mixed.dtype, base.dtype) else base + mixed
