"""Aggregate item records into the ANP table and write ``<stem>.md``, ``<stem>.json`` and ``<stem>.png``."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from .metrics import anp, bootstrap_anp_ci, mean_ci


def restrict(record: dict[str, Any], only: set[str], expert_acc: dict[str, float]) -> dict[str, Any] | None:
    """The record with its accuracies and ANP limited to the tasks in ``only`` (None if none is left)."""
    tasks = [t for t in record["combo"] if t in only]
    if not tasks:
        return None
    acc = {t: record["acc"][t] for t in tasks}
    return {
        **record,
        "acc": acc,
        "correct": {t: record["correct"][t] for t in tasks},
        "anp": anp(acc, expert_acc),
    }


def aggregate(
    records: list[dict[str, Any]],
    expert_acc: dict[str, float],
    methods: list[str],
    ks: list[int],
    only: set[str] | None = None,
) -> dict[str, dict[int, dict[str, Any]]]:
    """table[method][k] = mean ANP, t-CI half-width across combinations, bootstrap CI, n combos.

    ``only``: score each merge on these tasks only (k stays the number of merged tasks).
    """
    by: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if only is not None:
            r = restrict(r, only, expert_acc)
            if r is None:
                continue
        by[(r["method"], r["k"])].append(r)
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for m in methods:
        table[m] = {}
        for k in ks:
            items = sorted(by.get((m, k), []), key=lambda r: r["combo"])
            if not items:
                continue
            mean, half = mean_ci([r["anp"] for r in items])
            lo, hi = bootstrap_anp_ci([r["correct"] for r in items], expert_acc)
            table[m][k] = {
                "anp": mean,
                "ci_t": half,
                "ci_boot": [lo, hi],
                "n": len(items),
                "combos": [r["combo"] for r in items],
                "anps": [r["anp"] for r in items],
            }
    return table


def _cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return "–"
    if c["ci_t"] is not None:
        return f"{c['anp']:.1f} ± {c['ci_t']:.1f}"
    return f"{c['anp']:.1f} [{c['ci_boot'][0]:.1f}, {c['ci_boot'][1]:.1f}]†"


def timings(
    records: list[dict[str, Any]], methods: list[str], ks: list[int]
) -> dict[str, dict[int, list[float]]]:
    """timings[method][k] = [mean merge seconds, mean eval seconds(, largest peak RSS of the merge in MiB,
    where the items recorded it)] over the finished items."""
    out: dict[str, dict[int, list[float]]] = {}
    for m in methods:
        out[m] = {}
        for k in ks:
            items = [r for r in records if r["method"] == m and r["k"] == k]
            if items:
                n = len(items)
                out[m][k] = [sum(r["merge_s"] for r in items) / n, sum(r["eval_s"] for r in items) / n]
                if all(r.get("merge_peak_rss_mb") for r in items):
                    out[m][k].append(max(r["merge_peak_rss_mb"] for r in items))
    return out


def convergence_lines(records: list[dict[str, Any]], ks: list[int]) -> list[str]:
    """Per learned method and k: optimisation steps run of those planned, the epoch whose Gamma was kept,
    and how many runs stopped early or had stopped improving (``coefficients.json``'s convergence)."""
    runs = [r for r in records if (r.get("coefficients") or {}).get("planned_steps")]
    if not runs:
        return []
    lines = [
        "| method | k | runs | steps run / planned (mean) | best epoch (mean) | stopped early | converged |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in sorted({r["method"] for r in runs}):
        for k in ks:
            items = [r["coefficients"] for r in runs if r["method"] == m and r["k"] == k]
            if not items:
                continue
            n = len(items)
            steps = sum(c["steps"] for c in items) / n
            planned = sum(c["planned_steps"] for c in items) / n
            best = [c["best_epoch"] for c in items if c.get("best_epoch") is not None]
            best_s = f"{sum(best) / len(best):.1f}" if best else "–"
            early = sum(bool(c.get("stopped_early")) for c in items)
            conv = sum(bool(c.get("converged")) for c in items)
            lines.append(f"| {m} | {k} | {n} | {steps:.0f} / {planned:.0f} | {best_s} | {early} | {conv} |")
    return lines


def coefficient_lines(records: list[dict[str, Any]]) -> list[str]:
    """Per learned method at the largest k: each task's mean coefficient over groups and the loss curve."""
    learned = [r for r in records if r.get("coefficients")]
    if not learned:
        return []
    k = max(r["k"] for r in learned)
    out = []
    for r in sorted((r for r in learned if r["k"] == k), key=lambda r: (r["method"], r["combo"])):
        rows = list(r["coefficients"]["coefficients"].values())
        parts = []
        for path, task in zip(r["coefficients"]["tasks"], r["combo"], strict=False):
            vals = [row[path] for row in rows]
            parts.append(f"{task} {sum(vals) / len(vals):.2f} [{min(vals):.2f}, {max(vals):.2f}]")
        loss = r.get("losses") or []
        curve = f"; loss {loss[0]:.4f} -> {loss[-1]:.4f} over {len(loss)} steps" if loss else ""
        out.append(f"* {r['method']} ({'+'.join(r['combo'])}): " + ", ".join(parts) + curve)
    return out


def _table_lines(table: dict[str, dict[int, dict[str, Any]]], ks: list[int]) -> list[str]:
    lines = [
        "| method | " + " | ".join(f"k={k}" for k in ks) + " |",
        "| --- | " + " | ".join("---:" for _ in ks) + " |",
    ]
    for m, row in table.items():
        lines.append(f"| {m} | " + " | ".join(_cell(row.get(k)) for k in ks) + " |")
    n = [max((row[k]["n"] for row in table.values() if k in row), default=0) for k in ks]
    lines.append("| *combinations* | " + " | ".join(f"*{c}*" for c in n) + " |")
    return lines


def markdown(
    title: str,
    table: dict[str, dict[int, dict[str, Any]]],
    ks: list[int],
    setup_md: str,
    expert_rows: list[tuple[str, float, int, float | None]],
    notes: list[str],
    times: dict[str, dict[int, list[float]]] | None = None,
    coeffs: list[str] | None = None,
    informative: tuple[dict[str, dict[int, dict[str, Any]]], list[str]] | None = None,
    convergence: list[str] | None = None,
) -> str:
    lines = [f"# {title}", "", setup_md, "", "## ANP (x100) by number of merged tasks k", ""]
    lines += _table_lines(table, ks)
    if informative is not None:
        t2, names = informative
        lines += [
            "",
            f"### ANP over the informative tasks only ({', '.join(names)})",
            "",
            "Same merges, scored only on the tasks whose expert beats the majority-class baseline by at "
            "least 5 points (an expert at chance level makes merged/expert a ratio of two chance accuracies).",
            "",
        ]
        lines += _table_lines(t2, ks)
    lines += [
        "",
        "Cells: mean ANP over the sampled task combinations ± the half-width of a 95 % Student-t interval "
        "across combinations. † only one combination: the bracket is a 95 % percentile bootstrap interval "
        "over the eval examples (1000 resamples; expert accuracies held fixed), which covers eval noise only.",
        "",
        "## Expert accuracies (eval split)",
        "",
        "| task | accuracy | majority-class baseline | eval examples |",
        "| --- | ---: | ---: | ---: |",
    ]
    for t, a, n, maj in expert_rows:
        flag = "" if maj is None or a >= maj + 0.05 else " (not above baseline)"
        lines.append(f"| {t} | {100 * a:.1f}{flag} | {'–' if maj is None else f'{100 * maj:.1f}'} | {n} |")
    if times:
        rss = any(len(v) > 2 for row in times.values() for v in row.values())
        lines += [
            "",
            "## Timings (seconds per merge / per evaluation of the merged model, mean over combinations"
            + ("; then the merge's peak RSS in GiB, largest over combinations)" if rss else ")"),
            "",
        ]
        lines.append("| method | " + " | ".join(f"k={k}" for k in ks) + " |")
        lines.append("| --- | " + " | ".join("---:" for _ in ks) + " |")
        for m, row in times.items():
            cells = [
                (
                    f"{row[k][0]:.0f} / {row[k][1]:.0f}"
                    + (f" / {row[k][2] / 1024:.2f}" if len(row[k]) > 2 else "")
                )
                if k in row
                else "–"
                for k in ks
            ]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if convergence:
        lines += [
            "",
            "## Convergence of the learned merges (held-out divergence once per epoch; best Gamma kept)",
            "",
            *convergence,
        ]
    if coeffs:
        lines += ["", "## Learned coefficients (largest k run; mean over groups, [min, max])", ""]
        lines += coeffs
    if notes:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(
    table: dict[str, dict[int, dict[str, Any]]],
    ks: list[int],
    title: str,
    path: Path,
    informative: tuple[dict[str, dict[int, dict[str, Any]]], list[str]] | None = None,
) -> None:
    """ANP vs k, one line per method (a second panel for the informative-task table when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(table, "all merged tasks")]
    if informative is not None:
        panels.append((informative[0], "informative tasks only: " + ", ".join(informative[1])))
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, (tab, sub) in zip(axes[0], panels, strict=True):
        for i, (m, row) in enumerate(tab.items()):
            xs = [k for k in ks if k in row]
            if not xs:
                continue
            style = "-" if m.startswith("divmerge") else "--" if m.startswith("adamerging") else ":"
            ax.plot(
                xs,
                [row[k]["anp"] for k in xs],
                style,
                marker="o",
                label=m,
                color=colors[(2 * i) % 20 + (i >= 10)],
                linewidth=2.4 if m.startswith("divmerge_layer_js") else 1.2,
            )
        ax.set_xlabel("number of merged tasks k")
        ax.set_ylabel("ANP (x100)")
        ax.set_title(sub, fontsize=9)
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    out_dir: Path, stem: str, title: str, payload: dict[str, Any], setup_md: str, notes: list[str]
) -> list[Path]:
    """Write the three files; ``payload`` holds table, ks, experts, records and setup."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ks, table = payload["ks"], payload["table"]
    experts = [(t, e["acc"], e["n"], e.get("majority")) for t, e in payload["experts"].items()]
    records = payload.get("records", [])
    informative = None
    good = [t for t, a, _, maj in experts if maj is not None and a >= maj + 0.05]
    if len(good) < len(experts) and good and records:
        acc = {t: a for t, a, _, _ in experts}
        t2 = aggregate(records, acc, list(table), ks, only=set(good))
        payload["table_informative"] = {"tasks": good, "table": t2}
        informative = (t2, good)
    md = out_dir / f"{stem}.md"
    times = timings(records, list(table), ks)
    coeffs = coefficient_lines(records)
    md.write_text(
        markdown(
            title,
            table,
            ks,
            setup_md,
            experts,
            notes,
            times,
            coeffs,
            informative,
            convergence_lines(records, ks),
        ),
        encoding="utf-8",
    )
    js = out_dir / f"{stem}.json"
    js.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    png = out_dir / f"{stem}.png"
    plot(table, ks, title, png, informative)
    return [md, js, png]
