"""Learned merge coefficients: DivMerge (Touayouch et al., arXiv 2509.02108) and the AdaMerging baseline.

Merged weights are ``theta_0 + sum_t Gamma[g, t] * tau_t`` with task vectors ``tau_t = theta_t - theta_0``
and one coefficient per (group, task); Gamma is real, may be negative and is not clipped.

Each method declares its objective on its registry entry (:class:`~divmerge_core.methods.learned_parameters.Objective`:
the loss, and whether it needs teachers); :mod:`.objectives` holds the losses:

* divmerge minimises ``mean_t E_{x ~ X_t} D(p_teacher_t(.|x) || p_merged(.|x))`` (D = JS or forward KL);
  every input is compared with its own task's teacher only, teacher outputs are computed once.
* adamerging minimises the Shannon entropy of the merged model's predictions on each task's inputs
  (causal LMs: the next-token predictions at every input position, averaged per input).

A run goes through named stages, one module each: :mod:`.inputs` (data and tokenising), :mod:`.model`
(the one module run with ``torch.func.functional_call``, coefficient groups), :mod:`.experts` (one pass over
the experts: task vectors to the :mod:`.placement`, teacher outputs to the :mod:`.teacher_store`) and
:mod:`.optimise` (the Adam loop, with :mod:`.activations` for gradient checkpointing). :mod:`.memory`
estimates the memory of each placement and picks one (``placement: auto``).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..io.loading import DTYPES
from ..plan import LearnedCoefficients, MergePlan
from ..progress import Reporter
from .convergence import Tracker
from .experts import run_experts
from .inputs import label_names, load_inputs, resolve_label_masks
from .memory import choose_placement, estimate_learned_memory
from .model import build_merge_module, coefficient_groups
from .objectives import objective_of
from .optimise import GradientHook, optimise
from .placement import make_task_vectors
from .ranks import SINGLE, Ranks
from .reference import model_kind
from .schedule import initial_value
from .teacher_store import OnlineTeachers, teacher_stage
from .trimming import check_plan, tau_rule


def learn_coefficients(
    plan: MergePlan,
    *,
    device: torch.device,
    reporter: Reporter,
    on_gradient: GradientHook | None = None,
    ranks: Ranks = SINGLE,
) -> LearnedCoefficients:
    """Learn Gamma for ``plan`` (a learned method: the objective its registry entry declares, see
    :mod:`.objectives`); ``on_gradient`` sees Gamma's gradient every step.

    ``ranks``: the processes of a data-parallel run (see :mod:`.distributed`); every rank returns the same
    coefficients.
    """
    cfg, params = plan.config, plan.config.parameters
    method = cfg.merge_method
    objective = objective_of(plan)  # what the registry entry declares; no method name is compared
    if plan.base is None:
        raise ConfigError(f"merge_method {method!r} needs a base_model", field="base_model")
    dtype = DTYPES[cfg.dtype]
    kind = model_kind(plan.model_config)
    n_tasks = len(plan.models)

    check_plan(plan)  # trimmed task vectors and LoRA factors: refused before anything is loaded
    placement, _ = choose_placement(plan, device)  # refuses before anything is loaded when nothing fits
    inputs = load_inputs(plan, kind, device, reporter)
    model = build_merge_module(plan, kind, dtype, device, inputs.tokenizer)
    groups, group_of = coefficient_groups(plan, model.aliases)
    group_index = {g: i for i, g in enumerate(groups)}
    rows = {n: group_index[group_of[n]] for n in model.merged_names}
    rule = tau_rule(params, model.aliases)
    vectors = make_task_vectors(placement, plan, model, rows, dtype, device, rule=rule)
    teachers = None
    try:
        if objective.teachers:
            teachers = teacher_stage(
                plan, kind, inputs, dtype=dtype, device=device, reporter=reporter, ranks=ranks
            )
        run_experts(
            plan, model, kind, inputs, vectors, teachers, dtype=dtype, device=device, reporter=reporter
        )
        if isinstance(teachers, OnlineTeachers):
            teachers.bind(model.module, vectors)
        init = initial_value(params.init, n_tasks)
        tracker = Tracker()
        gamma = torch.nn.Parameter(torch.full((len(groups), n_tasks), float(init), device=device))
        losses = optimise(
            model,
            vectors,
            inputs,
            teachers,
            gamma,
            method=method,
            objective=objective,
            kind=kind,
            params=params,
            device=device,
            reporter=reporter,
            on_gradient=on_gradient,
            ranks=ranks,
            tracker=tracker,
            groups=groups,
        )
    finally:
        if teachers is not None:
            teachers.close()
        vectors.close()
    return LearnedCoefficients(
        method=method,
        granularity=params.granularity,
        groups=groups,
        tasks=[m.ref.raw for m in plan.models],
        values=gamma.detach().cpu().double().tolist(),
        group_of=group_of,
        losses=losses,
        resolved_datasets={t.source: t.commit for t in inputs.tasks if t.source != "inline"},
        labels=label_names(plan, inputs.label_masks, inputs.shared_head),
        placement=placement,
        convergence=tracker.to_plan(),
        task_vectors=rule.to_json() if rule is not None else None,
    )


__all__ = ["estimate_learned_memory", "learn_coefficients", "resolve_label_masks"]
