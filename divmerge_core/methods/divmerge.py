"""divmerge (Touayouch et al., arXiv 2509.02108): coefficients learned by minimising each task's
divergence from its own fine-tuned teacher on unlabelled inputs (the engine is ``divmerge_core.learned``)."""

from __future__ import annotations

from .base import NoModelParameters
from .learned_parameters import LearnedMethod, LearnedParameters, Objective

METHOD = LearnedMethod(
    name="divmerge",
    kind="learned",
    parameters=LearnedParameters,
    model_parameters=NoModelParameters,
    card="DivMerge: task-vector coefficients learned by minimising the Jensen-Shannon (or KL) divergence "
    "between each fine-tuned model and the merged model on unlabelled inputs",
    reference="https://arxiv.org/abs/2509.02108",
    queue="gpu",
    objective=Objective(loss="divmerge_core.learned.objectives:divergence", teachers=True),
)
