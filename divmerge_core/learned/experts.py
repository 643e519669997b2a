"""Stage 3 of a learned merge: one pass over the experts.

Each expert's task vector goes to the placement (:mod:`.placement`): a LoRA expert's, where it is low-rank
(:mod:`.lowrank`), as the adapter's factors, never as a full tensor; and, for divmerge, when its teacher must
run (a teacher-cache miss, a causal continuation, online teachers finding a classifier's labels), its
weights are written into the module in place (never K live models) and the teacher stage
(:mod:`.teacher_store`) runs it on the expert's own task's inputs. Once every expert has run, the stage
settles the default label restriction. The module holds theta_0 at the end.
"""

from __future__ import annotations

import torch

from ..errors import IncompatibleModelsError
from ..io.loading import Checkpoint
from ..io.lora import LoraCheckpoint, open_model
from ..plan import MergePlan
from ..progress import Reporter
from .inputs import LearnedInputs
from .lowrank import DENSE, LOW_RANK, read_factors
from .model import MergeModule
from .placement import TaskVectors
from .teacher_store import TeacherStage


def run_experts(
    plan: MergePlan,
    model: MergeModule,
    kind: str,
    inputs: LearnedInputs,
    vectors: TaskVectors,
    teachers: TeacherStage | None,
    *,
    dtype: torch.dtype,
    device: torch.device,
    reporter: Reporter,
) -> None:
    """Load every expert once; ``teachers`` None (adamerging) runs no teacher."""
    with open_model(plan.base, plan.options) as base_ck:
        for t in range(len(plan.models)):
            reporter.check()
            run_teacher = teachers is not None and teachers.begin(t)
            if run_teacher or vectors.needs_expert(t):
                _load_expert(plan, t, model, vectors, base_ck, device, into_module=run_teacher)
            if teachers is not None:
                teachers.run(t, model.module)
        if teachers is not None:
            teachers.finish()  # every expert's labels known: the default label restriction
        with torch.no_grad():
            for n, slot in model.slots.items():
                slot.copy_(base_ck.get(n, None, device))


def _load_expert(
    plan: MergePlan,
    t: int,
    model: MergeModule,
    vectors: TaskVectors,
    base_ck: Checkpoint | LoraCheckpoint,
    device: torch.device,
    *,
    into_module: bool,
) -> None:
    """Hand expert ``t``'s task vector to the placement and, ``into_module``, its weights to the module."""
    expert = plan.models[t]
    with open_model(expert, plan.options) as ck, torch.no_grad():
        missing = [n for n in model.slots if n not in ck]
        if missing:
            raise IncompatibleModelsError([f"{expert.ref.raw!r} has no tensor {m!r}" for m in missing[:20]])
        for n, slot in model.slots.items():
            kind = vectors.kind(t, n)
            if kind == LOW_RANK:
                assert isinstance(ck, LoraCheckpoint)
                vectors.add_low_rank(t, n, read_factors(ck, n, device))
            keep = vectors.keeps_task_vectors and kind == DENSE
            if not (keep or into_module):
                continue
            w = ck.get(n, None, device)  # converted on the device, not on the host
            if slot.is_floating_point():
                w = w.float()
            if keep:
                vectors.add(t, n, w, base_ck.get(n, None, device).float())
            if into_module:
                slot.copy_(w)
