"""The processes of one learned merge: one (the default) or N ranks of a ``torch.distributed`` group.

Every stage that splits work goes through :class:`Ranks`, so a single process is simply the group of one:
each rank takes ``share(items)`` (items ``rank, rank + world, ...``), and the collectives are no-ops.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

T = TypeVar("T")


class Ranks:
    """A single process: rank 0 of 1."""

    rank, world = 0, 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This rank's part of ``items`` (every ``world``-th item from ``rank``)."""
        return items[self.rank :: self.world]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return obj

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` in place over the ranks."""


class Distributed(Ranks):
    """The ranks of the default ``torch.distributed`` process group (initialised by the caller)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        self._dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM)


SINGLE = Ranks()
