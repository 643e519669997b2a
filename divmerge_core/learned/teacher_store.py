"""Where the loss reads each input's teacher distribution from.

The teacher stage hands every task's annotated examples to a store once; the optimisation asks it for the
targets of each step's picked inputs. :class:`InMemoryTeacherStore` keeps them on the examples
(``Example.target``/``target_index``); another store (a file-backed cache) implements the same two methods.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..teachers import Example


class TeacherStore(Protocol):
    def put(self, task: int, examples: list[Example]) -> None:
        """Take over task ``task``'s examples, just annotated by its teacher."""

    def targets(
        self, picked: list[Example], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(teacher log-probs [rows, C or V or k] in fp32, top-k token ids [rows, k] or None) of ``picked``.

        Rows follow ``picked``: one per example (classification), one per scored position (causal).
        """


class InMemoryTeacherStore:
    """Teacher outputs left on the examples, in host memory."""

    def put(self, task: int, examples: list[Example]) -> None:
        if any(e.target is None for e in examples):
            raise ValueError(f"task {task}: an example has no teacher output")

    def targets(
        self, picked: list[Example], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = [e.target.reshape(-1, e.target.shape[-1]) for e in picked]  # type: ignore[union-attr]
        target = torch.cat(rows).to(device, torch.float32)
        if picked[0].target_index is None:
            return target, None
        return target, torch.cat([e.target_index for e in picked]).to(device)  # type: ignore[misc]
