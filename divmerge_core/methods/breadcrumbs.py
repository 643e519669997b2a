"""breadcrumbs (mergekit's Model Breadcrumbs): each task vector loses its ``gamma`` largest magnitudes
(outliers) and its smallest ones, keeping ``density`` of its entries, then a weighted sum."""

from __future__ import annotations

from . import generalized as g


class Parameters(g.TaskVectorParameters):
    gamma: g.Gamma | None = g.model_default("gamma")
    normalize: bool = g.normalize_field(False, consensus=False)
    rescale: bool = g.rescale_field(False)


class ModelParameters(g.TaskVectorModelParameters):
    gamma: g.Gamma = 0.01


METHOD = g.method(
    name="breadcrumbs",
    sparsification="magnitude_outliers",
    consensus=None,
    parameters=Parameters,
    model_parameters=ModelParameters,
    card="Model Breadcrumbs: task vectors without their largest (outliers) and smallest entries, summed "
    "with their weights",
    reference="https://arxiv.org/abs/2312.06795",
)
