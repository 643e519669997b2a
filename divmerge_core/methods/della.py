"""della (mergekit's DELLA): each task-vector entry kept with a probability growing with its magnitude's
rank (``density +/- epsilon``, per row), rescaled to the L1 norm, then TIES' sign election and the
agreeing entries averaged by their weights."""

from __future__ import annotations

from . import generalized as g


class Parameters(g.TaskVectorParameters):
    epsilon: g.Epsilon | None = g.model_default("epsilon")
    normalize: bool = g.normalize_field(True, consensus=True)
    rescale: bool = g.rescale_field(True)
    seed: int = g.seed_field()


class ModelParameters(g.TaskVectorModelParameters):
    epsilon: g.Epsilon = 0.15


METHOD = g.method(
    name="della",
    sparsification="della_magprune",
    consensus="sum",
    parameters=Parameters,
    model_parameters=ModelParameters,
    card="DELLA: task vectors pruned at random with magnitude-ranked keep-probabilities, rescaled, signs "
    "elected, agreeing entries averaged",
    reference="https://arxiv.org/abs/2406.11617",
)
