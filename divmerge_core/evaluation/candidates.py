"""The evaluation stage inside a merge: the compared methods' merges, scoring, and ``select: best``.

The job's own merge is already written in its staging folder. Each method of ``evaluation.compare`` is
merged into a hidden folder inside it (same experts, already resolved), everything is scored, and with
``select: best`` the best-ANP merge's files replace the job's own; the hidden folder is always removed.

A finished merge is never thrown away: when the evaluation fails (anything but a cancel), the job's own
merge stays the output and ``evaluation.json`` says ``{"error": ...}``.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import MergeConfig, compare_config
from ..errors import DivMergeError, MergeCancelled
from ..plan import LearnedCoefficients, MergePlan
from ..progress import ProgressEvent, Reporter
from .sets import EvalSet
from .stage import Candidate, evaluate_merges

log = logging.getLogger("divmerge.evaluation")
#: The compared merges are written inside the output's own staging folder, so that whatever removes a
#: half-written output (a failure, a cancel, the next attempt after a killed worker) removes them too.
COMPARE_DIR = ".divmerge-compare"


@dataclass
class Chosen:
    """The merge that ends up in the output folder, and the evaluation report."""

    plan: MergePlan
    coeffs: LearnedCoefficients | None
    files: list[str]
    evaluation: dict[str, Any]


def evaluate_output(
    plan: MergePlan,
    coeffs: LearnedCoefficients | None,
    folder: Path,
    files: list[str],
    sets: list[EvalSet],
    device: torch.device,
    reporter: Reporter,
) -> Chosen:
    """Run the compared merges, score them all, keep the selected one in ``folder``, write the report."""
    from ..pipeline import write_metadata

    spec = plan.config.evaluation
    own = Candidate(_label(plan.config.merge_method, []), plan.config.merge_method, _params(plan), folder)
    chosen = Chosen(plan, coeffs, files, {})
    others: dict[str, tuple[MergePlan, LearnedCoefficients | None, list[str]]] = {}
    swap: tuple[Path, list[str]] | None = None
    try:
        candidates = [own]
        for i, c in enumerate(spec.compare if spec else []):
            reporter.check()
            label = _label(c.merge_method, [x.label for x in candidates])
            where = folder / COMPARE_DIR / str(i)
            where.mkdir(parents=True)
            cplan, ccoeffs, cfiles = _merge_other(
                plan, compare_config(plan.config, c), where, device, reporter, label
            )
            others[label] = (cplan, ccoeffs, cfiles)
            candidates.append(Candidate(label, c.merge_method, dict(c.parameters), where))
        report = evaluate_merges(
            plan,
            sets,
            candidates,
            device=device,
            reporter=reporter,
            base=bool(spec and spec.base),
            select=spec.select if spec else None,
        )
        if report["selected"] != own.label:  # a failed swap is no evaluation error: it fails the merge
            cplan, ccoeffs, cfiles = others[report["selected"]]
            winner = next(c for c in candidates if c.label == report["selected"])
            swap = (winner.folder, cfiles)
            chosen = Chosen(cplan, ccoeffs, cfiles, report)
        chosen.evaluation = report
    except MergeCancelled:
        shutil.rmtree(folder / COMPARE_DIR, ignore_errors=True)
        raise
    except Exception as err:  # noqa: BLE001 - the finished merge is kept whatever the evaluation error
        if not isinstance(err, DivMergeError):
            log.exception("evaluation failed")
        message = str(err) if isinstance(err, DivMergeError) else f"unexpected {type(err).__name__}: {err}"
        code = err.code if isinstance(err, DivMergeError) else "internal_error"
        chosen = Chosen(
            plan, coeffs, files, {"error": message, "code": code, "field": getattr(err, "field", None)}
        )
    try:
        if swap is not None:
            _replace_weights(folder, files, *swap)
    finally:
        shutil.rmtree(folder / COMPARE_DIR, ignore_errors=True)
    weights = [f for f in chosen.files if _is_weights(f)]
    if chosen.coeffs is None:
        (folder / "coefficients.json").unlink(missing_ok=True)  # the job's own learned merge lost
    chosen.files = weights + write_metadata(chosen.plan, folder, chosen.coeffs, chosen.evaluation)
    return chosen


def _params(plan: MergePlan) -> dict[str, Any]:
    return plan.config.parameters.model_dump(mode="json", by_alias=True, exclude_none=True)


def _label(method: str, taken: list[str]) -> str:
    """The method's name, numbered when the same method is compared more than once."""
    if method not in taken:
        return method
    n = 2
    while f"{method}#{n}" in taken:
        n += 1
    return f"{method}#{n}"


def _merge_other(
    plan: MergePlan, config: MergeConfig, folder: Path, device: torch.device, reporter: Reporter, label: str
) -> tuple[MergePlan, LearnedCoefficients | None, list[str]]:
    """Merge a compared method's config into ``folder`` (models resolved once, by the job's own plan)."""
    from ..pipeline import learn, prepare, write_metadata, write_weights

    def relay(ev: ProgressEvent) -> None:
        if ev.stage != "done":
            reporter.report("compare", ev.step, ev.total, ev.loss, message=f"{label}: {ev.stage}")

    sub = reporter.relay(relay)
    known = {m.ref.raw: m for m in ([plan.base] if plan.base else []) + plan.models}
    cplan = prepare(config, plan.options, sub, resolved_models=known)
    coeffs = learn(cplan, device, sub) if config.method.learned else None
    files = write_weights(cplan, folder, device, sub, coeffs)
    files += write_metadata(cplan, folder, coeffs)
    return cplan, coeffs, files


def _replace_weights(folder: Path, own_files: list[str], winner: Path, winner_files: list[str]) -> None:
    """Swap the job's own weight files in ``folder`` for the winner's (metadata is rewritten after)."""
    for name in filter(_is_weights, own_files):
        (folder / name).unlink(missing_ok=True)
    for name in filter(_is_weights, winner_files):
        shutil.move(str(winner / name), str(folder / name))


def _is_weights(name: str) -> bool:
    return name.endswith((".safetensors", ".safetensors.index.json"))
