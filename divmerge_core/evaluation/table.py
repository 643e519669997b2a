"""Plain-text and model-card views of an ``evaluation.json`` (no torch: ``divmerge status`` prints them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def table(evaluation: Mapping[str, Any]) -> str:
    """A plain-text table of an ``evaluation.json`` (the CLI and ``divmerge status`` print it)."""
    if evaluation.get("error"):
        return f"evaluation failed: {evaluation['error']}"
    tasks = evaluation.get("tasks") or {}
    others = [c for c in evaluation.get("compare") or [] if c["label"] != evaluation.get("selected")]
    has_base = any("base" in t for t in tasks.values())
    head = (
        ["task", "n", "expert"] + (["base"] if has_base else []) + [f"merged ({evaluation.get('selected')})"]
    )
    head += [c["label"] for c in others] + ["retained", "unparsed"]
    rows = [head]
    for name, t in tasks.items():
        row = [name, str(t["n"]), _pct(t["expert"])] + ([_pct(t.get("base"))] if has_base else [])
        row.append(_pct(t["merged"]))
        row += [_pct(c["tasks"].get(name, {}).get("merged")) for c in others]
        row += [f"{t['retained']:.1f}" if t.get("retained") is not None else "-", _pct(t.get("unparsed"))]
        rows.append(row)
    ci = evaluation.get("anp_ci95")
    anp_row = ["ANP", "", ""] + ([""] if has_base else []) + [_anp(evaluation.get("anp"), ci)]
    anp_row += [_anp(c.get("anp"), c.get("anp_ci95")) for c in others] + ["", ""]
    rows.append(anp_row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    metric = evaluation.get("metric", "accuracy")
    lines.insert(1, "-" * len(lines[0]))
    lines.append(
        f"(metric: {metric}; retained = 100 x merged / expert; ANP = mean retained, 95% bootstrap CI)"
    )
    for w in evaluation.get("warnings") or []:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _anp(v: float | None, ci: list[float] | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def model_index(evaluation: Mapping[str, Any], model_name: str) -> list[dict[str, Any]] | None:
    """The Hub's ``model-index`` front matter: one result per evaluated task (the merged model's score)."""
    if not evaluation.get("tasks") or evaluation.get("error"):
        return None
    task_type = "text-generation" if evaluation.get("kind") == "causal" else "text-classification"
    results = []
    for name, t in evaluation["tasks"].items():
        metric = t["metric"]
        results.append(
            {
                "task": {"type": task_type, "name": name},
                "dataset": {"name": name, "type": _dataset_type(t.get("source"), name)},
                "metrics": [
                    {"type": metric, "value": t["merged"], "name": f"{metric} (merged)"},
                    {"type": "retained", "value": t["retained"], "name": "retained vs expert (%)"},
                ],
            }
        )
    return [{"name": model_name, "results": results}]


def _dataset_type(source: str | None, name: str) -> str:
    """A Hub dataset id as is; a local file or inline texts by the task's name (no local paths on a card)."""
    if not source or source == "inline" or source.startswith(("/", ".", "~", "file:")):
        return name
    return source
