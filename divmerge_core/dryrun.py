"""A dry run of a merge: everything ``divmerge validate`` and ``POST /v1/merges/validate`` check, nothing
merged. Every problem found is reported (not only the first), each with its code and the field it is about.

``python -m divmerge_core.dryrun`` reads ``{"config": {...}, "options": {...}}`` as JSON on stdin and prints
the report as JSON: the service runs it in a subprocess, so the API process never imports torch and a slow
Hub cannot hold it past its time limit.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import MergeConfig, parse_config
from .errors import DivMergeError, IncompatibleModelsError
from .options import EngineOptions
from .plan import MergePlan

#: Rows read from each dataset to check its columns (and that it yields text).
PROBE_ROWS = 4


@dataclass
class DryRun:
    plan: MergePlan | None = None
    problems: list[dict[str, Any]] = field(default_factory=list)
    estimate: dict[str, Any] | None = None
    #: task name -> examples in its eval set
    eval_sets: dict[str, int] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, err: DivMergeError, field: str | None) -> None:
        self.problems.append({"code": err.code, "message": err.message, "field": err.field or field})

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "estimate": self.estimate}


def dry_run(config: MergeConfig, options: EngineOptions, device: str = "cpu") -> DryRun:
    """Resolve every model (each problem naming its field), check the models can be merged, read a few
    rows of each dataset and check its columns, read every eval set and check its labels, and estimate
    the work."""
    from .io.refs import resolve_model
    from .learned.data import load_task_inputs
    from .pipeline import prepare

    out = DryRun()
    refs = [("base_model", config.base_model)] if config.base_model else []
    refs += [(f"models.{i}.model", m.model) for i, m in enumerate(config.models)]
    resolved = {}
    for where, raw in refs:
        try:
            if raw not in resolved:
                resolved[raw] = resolve_model(raw, options)
        except DivMergeError as err:
            out.add(err, where)
    if out.ok:
        try:
            out.plan = prepare(config, options, resolved_models=resolved)
        except IncompatibleModelsError as err:
            out.problems += [{"code": err.code, "message": p, "field": "models"} for p in err.problems]
        except DivMergeError as err:
            out.add(err, None)
    for i, m in enumerate(config.models):
        if m.data is not None:
            try:
                load_task_inputs(m.data.model_copy(update={"num_samples": PROBE_ROWS}), options)
            except DivMergeError as err:
                out.add(err, f"models.{i}.data")
    if out.plan is not None and any(m.eval is not None for m in out.plan.specs):
        from .evaluation.sets import load_eval_sets

        try:  # every label read and checked against the model and the answers
            out.eval_sets = {es.name: len(es) for es in load_eval_sets(out.plan)}
        except DivMergeError as err:
            out.add(err, None)
    if out.plan is not None:
        out.estimate = estimate(out.plan, device)
    return out


def estimate(plan: MergePlan, device: str = "cpu") -> dict[str, Any]:
    """Sizes from the checkpoints: bytes read (every model once) and written (the reference's tensors in
    the output dtype); for the learned methods, ``memory``: what each placement needs on ``device`` and the
    host, and what is free where the dry run runs (:func:`~divmerge_core.learned.memory.estimate_learned_memory`)."""
    from .io.loading import DTYPES
    from .io.lora import open_model

    read = sum(
        _weights_bytes(m.path) + (_weights_bytes(m.adapter.path) if m.adapter else 0)
        for m in ([plan.base] if plan.base else []) + plan.models
    )
    with open_model(plan.reference, plan.options) as ref:
        sources = plan.layout.sources if plan.layout else {}
        vocab = set(plan.vocab.names) if plan.vocab is not None else set()

        def shape(name: str) -> tuple[int, ...]:
            s = ref.shape(sources[name].name if name in sources else name)
            return (plan.vocab.size, *s[1:]) if name in vocab else s  # a tokenizer source's rows

        elements = sum(math.prod(shape(name)) for name in plan.tensor_names)
    return {
        "tensors": len(plan.tensor_names),
        "parameters": elements,
        "read_bytes": read,
        "output_bytes": elements * DTYPES[plan.config.output_dtype].itemsize,
        "memory": _learned_memory(plan, device),
    }


def _learned_memory(plan: MergePlan, device: str) -> dict[str, Any] | None:
    if not plan.config.method.learned:
        return None
    from .learned.memory import estimate_learned_memory
    from .pipeline import resolve_device

    return estimate_learned_memory(plan, resolve_device(device))


def placements(config: MergeConfig, options: EngineOptions) -> dict[str, Any]:
    """A learned merge's memory needs per placement on a CUDA and a CPU-only worker
    (:func:`~divmerge_core.learned.memory.placement_needs`): the models are resolved and their headers read,
    no data. ``{"ok": true, "needs": ...}`` or ``{"ok": false, "problems": [...]}``."""
    from .learned.memory import placement_needs
    from .pipeline import prepare

    try:
        return {"ok": True, "needs": placement_needs(prepare(config, options))}
    except DivMergeError as err:
        return {"ok": False, "problems": [{"code": err.code, "message": err.message, "field": err.field}]}


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


def main() -> int:
    """stdin: {"config": {...}, "options": EngineOptions.to_json(), "device": "cpu"}; HF_TOKEN from the env.
    With ``"mode": "placements"``: only :func:`placements`."""
    import os

    request = json.load(sys.stdin)
    options = EngineOptions.from_json(request.get("options", {}), hf_token=os.environ.get("HF_TOKEN"))
    if request.get("mode") == "placements":
        json.dump(placements(parse_config(request["config"]), options), sys.stdout)
        return 0
    try:
        report = dry_run(parse_config(request["config"]), options, request.get("device", "cpu")).to_json()
    except DivMergeError as err:
        report = {"ok": False, "problems": [{"code": err.code, "message": err.message, "field": err.field}]}
        report["estimate"] = None
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
