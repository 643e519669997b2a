"""Finer coefficients pulled toward their layer's value (``pull``, with ``granularity: tensor``; after
arcee-ai's DAM): one coefficient per (tensor, task), as free as ``granularity: tensor`` gives them, plus

    pull * mean over (tensor g, task t) of (Gamma[g, t] - mean of Gamma[., t] over the tensors of g's layer)^2

added to each step's loss. A tensor's layer is its ``granularity: layer`` group
(:func:`~divmerge_core.learned.grouping.layer_group`: ``...layer.3``, ``embeddings``, ``head``, ...); a layer
of one tensor adds nothing. ``pull: 0`` is ``granularity: tensor`` as it is; a large ``pull`` brings every
tensor of a layer to one value per task, i.e. towards ``granularity: layer``. The term is differentiated
as it is written (the layer mean moves with the coefficients too). It enters the step losses
(``coefficients.json`` ``losses``), not the held-out values, which stay the objective alone (so best-Gamma
selection and early stopping compare the divergence, or entropy, only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .grouping import layer_group

#: ``penalty(gamma)``: the pull term (a 0-d tensor, already multiplied by ``pull``).
Penalty = Callable[[torch.Tensor], torch.Tensor]


def layer_pull(groups: list[str], pull: float, device: torch.device) -> Penalty | None:
    """The pull term over ``groups`` (tensor names, Gamma's rows in order); None when ``pull`` is 0."""
    if pull <= 0:
        return None
    layers: dict[str, int] = {}
    index = torch.tensor([layers.setdefault(layer_group(g), len(layers)) for g in groups], device=device)
    counts = torch.bincount(index, minlength=len(layers)).to(torch.float32).unsqueeze(1)

    def penalty(gamma: torch.Tensor) -> torch.Tensor:
        g = gamma.float()
        sums = torch.zeros((len(layers), g.shape[1]), dtype=torch.float32, device=g.device)
        means = sums.index_add(0, index, g) / counts
        return pull * (g - means[index]).pow(2).mean()

    return penalty


def layer_spread(groups: list[str], values: list[list[float]]) -> float:
    """The mean over (tensor, task) of the squared distance to the layer mean (what ``pull`` weighs)."""
    penalty = layer_pull(groups, 1.0, torch.device("cpu"))
    assert penalty is not None
    return float(penalty(torch.tensor(values, dtype=torch.float64)))


__all__ = ["Penalty", "layer_pull", "layer_spread"]
