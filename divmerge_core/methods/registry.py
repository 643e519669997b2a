"""Every merge method, by name. Adding one: a module declaring ``METHOD`` and a line in :data:`METHODS`."""

from __future__ import annotations

from . import (
    adamerging,
    arcee_fusion,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    divmerge,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    ramplus_tl,
    sce,
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
        breadcrumbs.METHOD,
        breadcrumbs_ties.METHOD,
        della.METHOD,
        della_linear.METHOD,
        slerp.METHOD,
        multislerp.METHOD,
        nuslerp.METHOD,
        karcher.METHOD,
        model_stock.METHOD,
        nearswap.METHOD,
        sce.METHOD,
        arcee_fusion.METHOD,
        ram.METHOD,
        ramplus_tl.METHOD,
        passthrough.METHOD,
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


def markdown() -> str:
    """Every method with its parameters (defaults, meaning), as docs/methods.md shows them.

    ``divmerge methods`` prints it; a test keeps the docs equal to it.
    """
    out = []
    for name, m in METHODS.items():
        facts = [m.kind, f"base {m.base}", f"queue `{m.queue}`"]
        if m.n_models:
            facts.append(f"exactly {m.n_models} model besides the base")
        out += [
            f"### `{name}`",
            "",
            f"{m.card[0].upper()}{m.card[1:]} ([reference]({m.reference})); {', '.join(facts)}.",
            "",
        ]
        out += ["| parameter | where | default | meaning |", "| --- | --- | --- | --- |"]
        for where, cls in (("global", m.parameters), ("per model", m.model_parameters)):
            for key, f in cls.model_fields.items():
                default = "required" if f.is_required() else f.get_default()
                shown = (
                    "—"
                    if default is None
                    else f"`{str(default).lower() if isinstance(default, bool) else default}`"
                )
                out.append(
                    f"| `{f.serialization_alias or key}` | {where} | {shown if default != 'required' else 'required'} | {f.description or ''} |"
                )
        out.append("")
    return "\n".join(out)
