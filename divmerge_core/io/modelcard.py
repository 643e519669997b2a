"""The output's README.md: a Hugging Face model card with YAML front matter describing the merge."""

from __future__ import annotations

from typing import Any

import yaml

from ..plan import LearnedCoefficients, MergePlan
from .refs import ResolvedModel

#: Learned coefficient tables longer than this are cut (coefficients.json holds them all).
_MAX_ROWS = 60


def _hub_id(model: ResolvedModel) -> str | None:
    return None if model.ref.is_local else model.ref.repo_id


def _model_entry(model: ResolvedModel) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": model.ref.repo_id if not model.ref.is_local else model.ref.raw}
    if model.commit:
        entry["revision"] = model.commit
    return entry


def front_matter(plan: MergePlan, evaluation: dict[str, Any] | None = None) -> dict[str, Any]:
    config = plan.config
    meta: dict[str, Any] = {}
    # The Hub checks base_model against existing repos, so only Hub ids go there.
    if plan.base is not None:
        if _hub_id(plan.base):
            meta["base_model"] = _hub_id(plan.base)
    else:
        parents = [h for h in (_hub_id(m) for m in plan.models) if h]
        if parents:
            meta["base_model"] = parents
            meta["base_model_relation"] = "merge"
    meta["library_name"] = "transformers"
    meta["tags"] = ["merge", "divmerge"]
    meta["merge_method"] = config.merge_method
    if plan.base is not None:
        meta["base_model_resolved"] = _model_entry(plan.base)
    models = []
    for model, spec in zip(plan.models, plan.specs, strict=True):
        entry = _model_entry(model)
        entry.update(spec.parameters.model_dump(mode="json", by_alias=True, exclude_none=True))
        models.append(entry)
    meta["models"] = models
    meta["parameters"] = config.parameters.model_dump(mode="json", by_alias=True, exclude_none=True)
    meta["dtype"] = config.dtype
    meta["out_dtype"] = config.output_dtype
    spec = config.tokenizer_spec
    if spec is not None and plan.vocab is not None:
        meta["tokenizer_source"] = spec.source
        meta["vocab_size"] = plan.vocab.size
    if evaluation is not None:
        from ..evaluation.table import model_index

        index = model_index(evaluation, f"{config.merge_method} merge")
        if index:
            meta["model-index"] = index
    return meta


def _table(coeffs: LearnedCoefficients) -> str:
    head = "| group | " + " | ".join(coeffs.tasks) + " |"
    sep = "|---|" + "---:|" * len(coeffs.tasks)
    rows = [
        f"| {g} | " + " | ".join(f"{v:.4f}" for v in row) + " |"
        for g, row in zip(coeffs.groups[:_MAX_ROWS], coeffs.values[:_MAX_ROWS], strict=True)
    ]
    more = len(coeffs.groups) - _MAX_ROWS
    if more > 0:
        rows.append(f"| ... {more} more groups (see coefficients.json) |" + " |" * len(coeffs.tasks))
    return "\n".join([head, sep, *rows])


def _task_vectors(coeffs: LearnedCoefficients) -> list[str]:
    """How the task vectors were trimmed or sign-resolved before learning (nothing when they were not)."""
    tv = coeffs.task_vectors
    if tv is None:
        return []
    parts = []
    if tv.get("sparsify") == "magnitude":
        parts.append(f"trimmed to the {tv['density']:g} share of largest magnitude (TIES)")
    elif tv.get("sparsify") == "random":
        parts.append(f"randomly dropped to a {tv['density']:g} share, rescaled by 1/{tv['density']:g} (DARE)")
    if tv.get("consensus") == "sign":
        parts.append("sign-resolved (entries disagreeing with the sign of the sum over tasks set to 0)")
    return [
        f"The task vectors were {', then '.join(parts)} before the coefficients were learned, and the merge "
        "uses the same task vectors (`task_vectors` in `coefficients.json`).",
        "",
    ]


def _convergence(coeffs: LearnedCoefficients) -> list[str]:
    """The held-out record: a sentence on convergence and the per-epoch held-out table."""
    c = coeffs.convergence
    if c is None:
        return []
    if not c.heldout:
        return [
            "No input was held out (`parameters.heldout`, or every task has fewer than 20 inputs): the last "
            "step's coefficients are kept and convergence is not measured.",
            "",
        ]
    held = ", ".join(str(n) for n in c.heldout_inputs)
    if c.stopped_early:
        how = f"stopped early after {c.steps} of {c.planned_steps} planned steps"
    else:
        how = f"ran all {c.steps} planned steps"
    state = "converged" if c.converged else "was still improving at the end (not converged)"
    lines = [
        f"Held-out divergence (the objective on {held} held-out inputs per task, never trained on): the run "
        f"{state} and {how}; the coefficients above are those of epoch {c.best_epoch} (step {c.best_step}), "
        "the lowest held-out value.",
        "",
        "| epoch | step | held-out | " + " | ".join(coeffs.tasks) + " |",
        "|---:|---:|---:|" + "---:|" * len(coeffs.tasks),
    ]
    for row in c.heldout[:_MAX_ROWS]:
        cells = ["n/a" if v is None else f"{v:.6g}" for v in row[2:]]
        best = " (best)" if row[0] == c.best_epoch else ""
        lines.append(f"| {int(row[0])}{best} | {int(row[1])} | " + " | ".join(cells) + " |")  # type: ignore[arg-type]
    return [*lines, ""]


def render_model_card(
    plan: MergePlan, coeffs: LearnedCoefficients | None = None, evaluation: dict[str, Any] | None = None
) -> str:
    config = plan.config
    meta = yaml.safe_dump(front_matter(plan, evaluation), sort_keys=False, allow_unicode=True)
    lines = [
        "---",
        meta.rstrip(),
        "---",
        "",
        "# Merged model",
        "",
        f"This model was produced with [divmerge](https://arxiv.org/abs/2509.02108) using the "
        f"`{config.merge_method}` merge method ([reference]({config.method.reference})): "
        f"{config.method.card}.",
        "",
    ]
    if plan.base is not None:
        lines += [f"Base model: `{_model_entry(plan.base)['model']}`", ""]
    lines += ["## Merged models", ""]
    for model in plan.models:
        entry = _model_entry(model)
        rev = f" @ `{entry['revision']}`" if "revision" in entry else ""
        lines.append(f"- `{entry['model']}`{rev}")
    lines.append("")
    if coeffs is not None:
        final = f"{coeffs.losses[-1]:.6g}" if coeffs.losses else "n/a"
        lines += [
            "## Learned coefficients",
            "",
            f"Granularity `{coeffs.granularity}`, {len(coeffs.losses)} optimisation steps, final loss {final}. "
            "Each entry is the coefficient of a task vector in a parameter group "
            "(all of them are in `coefficients.json`).",
            "",
            *_task_vectors(coeffs),
            _table(coeffs),
            "",
            *_convergence(coeffs),
        ]
    if evaluation is not None:
        from ..evaluation.table import table

        lines += [
            "## Evaluation",
            "",
            "Each task's held-out examples, scored for its expert and for this merge "
            "(all figures in `evaluation.json`):",
            "",
            "```text",
            table(evaluation),
            "```",
            "",
        ]
    lines += [
        "## Configuration",
        "",
        "The merge configuration (also in `merge_config.yaml`):",
        "",
        "```yaml",
        config.to_yaml().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
