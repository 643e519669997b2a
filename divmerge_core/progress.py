"""Progress reporting and cooperative cancellation hooks (the worker and the CLI plug in here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import MergeCancelled


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report. ``stage`` is one of: resolve, validate, eval_data, data, teacher,
    optimise, write, compare (a compared method's merge), evaluate, done.

    ``heldout`` (optimise, learned methods): a held-out measurement before the first step and after each
    epoch, ``(epoch, step, mean, value of task 0, task 1, ...)``, a task's value None when it holds no
    input out; such an event carries no ``loss``."""

    stage: str
    step: int
    total: int
    loss: float | None = None
    message: str | None = None
    heldout: tuple[float | None, ...] | None = None


ProgressCallback = Callable[[ProgressEvent], None]
StopCheck = Callable[[], bool]


class Reporter:
    """Bundles the two hooks so engine code can call ``report(...)`` and ``check()`` without None checks."""

    def __init__(self, progress: ProgressCallback | None = None, should_stop: StopCheck | None = None):
        self._progress = progress
        self._should_stop = should_stop

    def report(
        self,
        stage: str,
        step: int,
        total: int,
        loss: float | None = None,
        message: str | None = None,
        heldout: tuple[float | None, ...] | None = None,
    ):
        if self._progress is not None:
            self._progress(ProgressEvent(stage, step, total, loss, message, heldout))

    def relay(self, progress: ProgressCallback) -> Reporter:
        """A reporter with the same stop check that reports to ``progress`` instead."""
        return Reporter(progress, self._should_stop)

    def check(self) -> None:
        """Raise :class:`MergeCancelled` if the caller asked to stop. Call between steps."""
        if self._should_stop is not None and self._should_stop():
            raise MergeCancelled()
