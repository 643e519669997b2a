"""della_linear (mergekit's): DELLA's magnitude-ranked random pruning, then a weighted sum."""

from __future__ import annotations

from . import generalized as g
from .della import ModelParameters as ModelParameters


class Parameters(g.TaskVectorParameters):
    epsilon: g.Epsilon | None = g.model_default("epsilon")
    normalize: bool = g.normalize_field(False, consensus=False)
    rescale: bool = g.rescale_field(True)
    seed: int = g.seed_field()


METHOD = g.method(
    name="della_linear",
    sparsification="della_magprune",
    consensus=None,
    parameters=Parameters,
    model_parameters=ModelParameters,
    card="Linear DELLA: task vectors pruned at random with magnitude-ranked keep-probabilities, rescaled, "
    "summed with their weights",
    reference="https://arxiv.org/abs/2406.11617",
)
