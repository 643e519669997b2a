"""adamerging (Yang et al., ICLR 2024): coefficients learned by minimising the entropy of the merged
model's predictions on unlabelled inputs (the engine is ``divmerge_core.learned``)."""

from __future__ import annotations

from .base import NoModelParameters
from .learned_parameters import LearnedMethod, LearnedParameters, Objective

METHOD = LearnedMethod(
    name="adamerging",
    kind="learned",
    parameters=LearnedParameters,
    model_parameters=NoModelParameters,
    card="AdaMerging: task-vector coefficients learned by minimising the entropy of the merged model's "
    "predictions on unlabelled inputs",
    reference="https://arxiv.org/abs/2310.02575",
    queue="gpu",
    objective=Objective(loss="divmerge_core.learned.objectives:entropy", teachers=False),
)
