"""Divergences between categorical distributions given as log-probabilities over the last dimension.

All functions take log-probabilities (``-inf`` marks a zero probability, as in a top-k support) and
return one value per distribution (the last dimension is summed out). Zero-probability entries contribute
exactly 0 and produce finite gradients: the ``0 * log 0`` terms are masked *before* they are multiplied,
so no NaN reaches the backward pass through ``torch.where``.
"""

from __future__ import annotations

import math

import torch

_LOG2 = math.log(2.0)


def _plogp_ratio(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over the last dim of p * (log p - log q) where ``mask`` (p > 0), 0 elsewhere."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp_safe = torch.where(mask, logp, zero)
    logq_safe = torch.where(mask, logq, zero)
    p = torch.where(mask, logp_safe.exp(), zero)
    return (p * (logp_safe - logq_safe)).sum(-1)


def kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Forward KL(teacher || student). Infinite where the student gives 0 to a teacher-supported token."""
    mask = teacher_logp > -math.inf
    return _plogp_ratio(teacher_logp, student_logp, mask)


def js(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence 0.5 KL(p||m) + 0.5 KL(q||m), m = (p+q)/2; symmetric, in [0, log 2]."""
    p_mask = p_logp > -math.inf
    q_mask = q_logp > -math.inf
    both_zero = ~(p_mask | q_mask)
    zero = torch.zeros((), dtype=p_logp.dtype, device=p_logp.device)
    # logaddexp(-inf, -inf) has a NaN gradient: feed it finite values where m = 0 (those terms are masked)
    lp = torch.where(both_zero, zero, p_logp)
    lq = torch.where(both_zero, zero, q_logp)
    log_m = torch.logaddexp(lp, lq) - _LOG2
    return 0.5 * _plogp_ratio(p_logp, log_m, p_mask) + 0.5 * _plogp_ratio(q_logp, log_m, q_mask)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Shannon entropy -sum p log p (nats)."""
    mask = logp > -math.inf
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp_safe = torch.where(mask, logp, zero)
    return -(torch.where(mask, logp_safe.exp(), zero) * logp_safe).sum(-1)


DIVERGENCES = {"js": js, "kl": kl}


def divergence(name: str, teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """D(teacher || student) by name ("js" or "kl")."""
    return DIVERGENCES[name](teacher_logp, student_logp)
