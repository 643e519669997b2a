"""Every merge method, by name. Adding one: a module declaring ``METHOD`` and a line in :data:`METHODS`."""

from __future__ import annotations

from . import (
    adamerging,
    dare_linear,
    dare_ties,
    divmerge,
    linear,
    multislerp,
    slerp,
    task_arithmetic,
    ties,
)
from .base import MergeMethod

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        linear.METHOD,
        task_arithmetic.METHOD,
        ties.METHOD,
        dare_linear.METHOD,
        dare_ties.METHOD,
        slerp.METHOD,
        multislerp.METHOD,
        divmerge.METHOD,
        adamerging.METHOD,
    )
}


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; a KeyError names the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge_method {name!r} (known: {', '.join(METHODS)})") from None


def names(kind: str | None = None) -> tuple[str, ...]:
    """Method names, optionally only the ``classic`` or ``learned`` ones."""
    return tuple(n for n, m in METHODS.items() if kind is None or m.kind == kind)


def cpu_methods() -> list[str]:
    """The methods the service sends to its cpu queue by default."""
    return [n for n, m in METHODS.items() if m.queue == "cpu"]
