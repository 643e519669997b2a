"""Stage 3 of a learned merge: one pass over the experts.

Each expert's weights are written into the module in place (never K live models); its task vector goes to the
placement (:mod:`.placement`) and, for divmerge, its outputs on its own task's inputs go to the teacher store.
The module holds theta_0 again at the end.
"""

from __future__ import annotations

import torch

from ..errors import IncompatibleModelsError
from ..loading import Checkpoint
from ..plan import MergePlan
from ..progress import Reporter
from ..teachers import annotate_teacher, teacher_batch_size
from .inputs import LearnedInputs
from .model import MergeModule
from .placement import TaskVectors
from .teacher_store import TeacherStore


def run_experts(
    plan: MergePlan,
    model: MergeModule,
    kind: str,
    inputs: LearnedInputs,
    vectors: TaskVectors,
    store: TeacherStore | None,
    *,
    dtype: torch.dtype,
    device: torch.device,
    reporter: Reporter,
) -> None:
    """Load every expert once; ``store`` None (adamerging) runs no teacher."""
    params = plan.config.parameters
    n_tasks = len(plan.models)
    with Checkpoint(plan.base.path, plan.options) as base_ck:
        for t, expert in enumerate(plan.models):
            reporter.check()
            with Checkpoint(expert.path, plan.options) as ck, torch.no_grad():
                missing = [n for n in model.slots if n not in ck]
                if missing:
                    raise IncompatibleModelsError(
                        [f"{expert.ref.raw!r} has no tensor {m!r}" for m in missing[:20]]
                    )
                for n, slot in model.slots.items():
                    w = ck.get(n, torch.float32 if slot.is_floating_point() else None, device)
                    if vectors.keeps_task_vectors and n in vectors.names:
                        vectors.add(t, n, w, base_ck.get(n, torch.float32, device))
                    slot.copy_(w)
            if store is not None:
                annotate_teacher(
                    model.module,
                    kind,
                    inputs.tokenizer,
                    inputs.examples[t],
                    batch_size=teacher_batch_size(params.batch_size_per_task),
                    max_new_tokens=params.max_new_tokens,
                    top_k=params.top_k,
                    label_mask=None if inputs.label_masks is None else inputs.label_masks[t],
                    store_dtype=torch.float32 if dtype == torch.float32 else dtype,
                    device=device,
                    check=reporter.check,
                )
                store.put(t, inputs.examples[t])
                reporter.report("teacher", t + 1, n_tasks)
        with torch.no_grad():
            for n, slot in model.slots.items():
                slot.copy_(base_ck.get(n, None, device))
