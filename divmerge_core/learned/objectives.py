"""The learned methods' losses, and the one place an objective declared on a registry entry
(:class:`~divmerge_core.methods.learned_parameters.Objective`) is looked up and turned into a loss.

A loss factory is called as ``factory(params, kind, store)`` and returns the per-scored-row loss
``fn(logits, examples)``: ``[B]`` for classification, ``[T]`` (scored tokens) for causal LMs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from ..errors import ConfigError
from ..methods.learned_parameters import Objective
from ..plan import MergePlan
from .divergence import divergence as _divergence
from .divergence import entropy as _entropy
from .encoding import Example

LossFn = Callable[[torch.Tensor, list[Example]], torch.Tensor]


def objective_of(plan: MergePlan) -> Objective:
    """The objective the plan's method declares; a ConfigError for a method that declares none."""
    method = plan.config.method
    objective = getattr(method, "objective", None)
    if not isinstance(objective, Objective):
        raise ConfigError(f"merge_method {method.name!r} declares no learned objective")
    return objective


def loss_function(objective: Objective, params, kind: str, store) -> LossFn:
    """The objective's per-scored-row loss (its ``loss`` factory imported and called)."""
    module, _, name = objective.loss.partition(":")
    factory = getattr(importlib.import_module(module), name)
    if objective.teachers and store is None:
        raise ConfigError(f"the loss {objective.loss!r} needs teacher outputs and none were computed")
    return factory(params, kind, store)


def divergence(params, kind: str, store) -> LossFn:
    """divmerge: ``D(teacher || merged)`` per scored row (D = ``params.divergence``, JS or forward KL); with
    a top-k teacher the merged model is renormalised on the teacher's top-k support."""

    def loss(logits: torch.Tensor, picked: list[Example]) -> torch.Tensor:
        target, index = store.targets(picked, logits.device)
        if index is not None:
            logits = logits.gather(-1, index)
        return _divergence(params.divergence, target, torch.log_softmax(logits, dim=-1))

    return loss


def entropy(params, kind: str, store) -> LossFn:
    """adamerging: the Shannon entropy of the merged model's predictions (no teachers)."""
    return lambda logits, _: _entropy(torch.log_softmax(logits, dim=-1))
