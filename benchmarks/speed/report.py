"""Render the benchmark results (a JSON-able dict) as Markdown and an optional PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .measure import median


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def summarise_runs(runs: list[dict]) -> dict[str, Any]:
    """Median wall / CPU / peak memory over repeated runs of one configuration."""
    ok = [r for r in runs if r.get("rc") == 0]
    if not ok:
        return {"ok": False, "n": 0, "error": (runs[-1].get("stderr_tail", "") if runs else "")[-500:]}
    cpu = [(r.get("user_s") or 0.0) + (r.get("sys_s") or 0.0) for r in ok]
    return {
        "ok": True,
        "n": len(ok),
        "wall_s": median([r["wall_s"] for r in ok]),
        "wall_all_s": [round(r["wall_s"], 2) for r in ok],
        "cpu_s": median(cpu),
        "max_rss_mb": median([r["max_rss_mb"] or 0.0 for r in ok]),
        "tree_rss_mb": median([r["tree_rss_mb"] for r in ok]),
        "tree_anon_mb": median([r["tree_anon_mb"] for r in ok]),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b in (None, 0):
        return None
    return a / b


def classic_table(rows: list[dict]) -> list[str]:
    lines = [
        "| size | K | method | tool | wall s (median) | runs | CPU s | peak RSS MiB | peak anon MiB "
        "| wall ours/mk | CPU ours/mk | RSS ours/mk |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["summary"]
        if not s.get("ok"):
            lines.append(f"| {r['size']} | {r['k']} | {r['method']} | {r['tool']} | failed | 0 | | | | | | |")
            continue
        lines.append(
            f"| {r['size']} | {r['k']} | {r['method']} | {r['tool']} | {_fmt(s['wall_s'])} | "
            f"{', '.join(_fmt(w) for w in s['wall_all_s'])} | {_fmt(s['cpu_s'])} | {_fmt(s['max_rss_mb'], 0)} | "
            f"{_fmt(s['tree_anon_mb'], 0)} | {_fmt(r.get('wall_ratio'))} | {_fmt(r.get('cpu_ratio'))} | "
            f"{_fmt(r.get('rss_ratio'))} |"
        )
    return lines


def learned_table(rows: list[dict]) -> list[str]:
    lines = [
        "| size | K | tool | granularity / coefficients | batch/task × seq | step wall s (median) "
        "| step CPU s (median) | steps | peak RSS MiB (optimisation) | anon MiB | setup s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r.get("ok"):
            lines.append(
                f"| {r.get('size')} | {r.get('k')} | {r.get('tool')} | — | — | failed: {r.get('error', '')[:200]} | | | | | |"
            )
            continue
        lines.append(
            f"| {r['size']} | {r['k']} | {r['tool']} | {r.get('granularity')} ({r.get('coefficients')}) | "
            f"{r['batch_per_task']} × {r['seq_len']} | {_fmt(r['step_s'], 2)} | {_fmt(r.get('step_cpu_s_median'), 2)} | "
            f"{r['steps']} | "
            f"{_fmt(r['peak_rss_mb'], 0)} | {_fmt(r.get('anon_mb'), 0)} | {_fmt(r.get('setup_s'), 1)} |"
        )
    return lines


def floor_summary(rows: list[dict]) -> dict[str, Any] | None:
    """Median process wall / CPU / RSS and in-process read+write seconds of the floor runs."""
    ok = [r for r in rows if r.get("rc") == 0 and r.get("floor")]
    if not ok:
        return None
    return {
        "size": ok[0]["size"],
        "k": ok[0]["k"],
        "n": len(ok),
        "wall_s": median([r["wall_s"] for r in ok]),
        "cpu_s": median([(r.get("user_s") or 0.0) + (r.get("sys_s") or 0.0) for r in ok]),
        "max_rss_mb": median([r["max_rss_mb"] or 0.0 for r in ok]),
        "import_s": median([r["floor"]["import_s"] for r in ok]),
        "read_write_s": median([r["floor"]["read_s"] + r["floor"]["write_s"] for r in ok]),
        "read_gb": ok[0]["floor"]["read_bytes"] / 1e9,
    }


def floor_table(rows: list[dict]) -> list[str]:
    f = floor_summary(rows)
    if f is None:
        return ["The floor run failed: see the results .json."]
    return [
        "| size | K+1 inputs read | GB read | process wall s (median) | runs | in-process read + write s "
        "| torch import s | CPU s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {f['size']} | {f['k'] + 1} | {f['read_gb']:.2f} | {_fmt(f['wall_s'])} | {f['n']} | "
        f"{_fmt(f['read_write_s'])} | {_fmt(f['import_s'])} | {_fmt(f['cpu_s'])} | {_fmt(f['max_rss_mb'], 0)} |",
    ]


def _check(c: dict | None) -> str:
    if not c:
        return "—"
    if "error" in c:
        return f"error: {c['error']}"
    if "note" in c:
        return "random masks: not compared"
    only = len(c["only_in_first"]) + len(c["only_in_second"])
    return f"{c['max_abs_diff']:.3g}" + (f" ({only} names on one side)" if only else "")


def methods_table(rows: list[dict], floor_rows: list[dict]) -> list[str]:
    """One line per method: ours and mergekit side by side, ours over the I/O floor, the cross-check."""
    f = floor_summary(floor_rows)
    by = {(r["method"], r["tool"]): r for r in rows}
    lines = [
        "| method | K used | ours wall s | mergekit wall s | wall ours/mk | ours CPU s | mergekit CPU s "
        "| ours RSS MiB | mergekit RSS MiB | RSS ours/mk | ours / I/O floor | max abs diff vs mergekit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        ours, mk = by.get((method, "divmerge")), by.get((method, "mergekit"))
        o = ours["summary"] if ours else {}
        m = mk["summary"] if mk else {}
        k_used = (ours or mk or {}).get("k_used", "—")
        over_floor = ratio(o.get("wall_s"), f["wall_s"]) if f and o.get("ok") else None
        lines.append(
            f"| {method} | {k_used} | {_fmt(o.get('wall_s')) if o.get('ok') else 'failed'} | "
            f"{_fmt(m.get('wall_s')) if m.get('ok') else ('failed' if mk else '—')} | "
            f"{_fmt(ours.get('wall_ratio') if ours else None)} | {_fmt(o.get('cpu_s'))} | {_fmt(m.get('cpu_s'))} | "
            f"{_fmt(o.get('max_rss_mb'), 0)} | {_fmt(m.get('max_rss_mb'), 0)} | "
            f"{_fmt(ours.get('rss_ratio') if ours else None)} | {_fmt(over_floor)} | "
            f"{_check(ours.get('vs_mergekit') if ours else None)} |"
        )
    return lines


def _stamp(results: dict[str, Any], section: str) -> list[str]:
    run = results.get("section_runs", {}).get(section)
    engine = results.get("meta", {}).get("engine_commit")
    if not run or run.get("engine_commit") == engine:
        return []
    return [f"_From an earlier run: engine {run.get('engine_commit')}, {run.get('date')}._", ""]


def _section(results: dict[str, Any], key: str, title: str, body: list[str]) -> list[str]:
    """A titled section: its earlier-run stamp, its lines and a blank line."""
    return [title, "", *_stamp(results, key), *body, ""]


def render_markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    out = ["# Speed and memory benchmark", ""]
    out.append(
        f"Generated by `python -m benchmarks.speed{' --quick' if meta.get('quick') else ''}` on {meta.get('date', '?')}."
    )
    out.append("")
    for k in ("machine", "engine_commit", "torch", "mergekit", "fusion_bench", "contention"):
        if k in meta:
            out.append(f"- **{k}**: {meta[k]}")
    out.append("")
    if results.get("headline"):
        out += _section(
            results,
            "headline",
            "## Classic merges: ours vs mergekit (same checkpoints, same config)",
            classic_table(results["headline"]),
        )
    if results.get("floor"):
        out += _section(
            results,
            "floor",
            "## The I/O floor: read the K+1 inputs once, write one output, merge nothing",
            floor_table(results["floor"]),
        )
    if results.get("methods"):
        f = floor_summary(results.get("floor", []))
        shape = f"{results['methods'][0]['size']}, K={results['methods'][0]['k']} experts built"
        out += [f"## Every classic method, ours vs mergekit ({shape}; one fresh process per run)", ""]
        out += _stamp(results, "methods")
        out += methods_table(results["methods"], results.get("floor", []))
        out.append("")
        if f:
            out.append(
                f"'ours / I/O floor' divides our wall time by the floor's process wall time "
                f"({f['wall_s']:.2f} s, of which {f['import_s']:.2f} s import torch): both are fresh processes on "
                "the same warm page cache. Methods that take fewer experts ('K used') read fewer inputs than the floor."
            )
            out.append("")
    if results.get("correctness"):
        out += ["## Correctness cross-check vs mergekit (max |ours − mergekit| over all tensors)", ""]
        out += _stamp(results, "correctness")
        out += [
            "| method | size | K | tensors | max abs diff | max rel diff | worst tensor | names only on one side |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in results["correctness"]:
            if "note" in c:
                out.append(f"| {c['method']} | {c.get('size')} | {c.get('k')} | {c['note']} | | | | |")
                continue
            if "error" in c:
                out.append(
                    f"| {c['method']} | {c.get('size')} | {c.get('k')} | error: {c['error']} | | | | |"
                )
                continue
            only = len(c["only_in_first"]) + len(c["only_in_second"])
            out.append(
                f"| {c['method']} | {c['size']} | {c['k']} | {c['tensors_compared']} | {c['max_abs_diff']:.3g} | "
                f"{c['max_rel_diff']:.3g} | `{c['worst_tensor']}` | {only} |"
            )
        out.append("")
    if results.get("learned"):
        out += ["## Learned merging: DivMerge step vs FusionBench layer-wise AdaMerging step", ""]
        out += _stamp(results, "learned")
        out += learned_table(results["learned"])
        out.append("")
        for note in results.get("learned_notes", []):
            out.append(f"- {note}")
        out.append("")
    if results.get("scaling"):
        out += _section(
            results,
            "scaling",
            "## Scaling of the classic merge (task_arithmetic) with K and model size",
            classic_table(results["scaling"]),
        )
    if results.get("learned_scaling"):
        out += _section(
            results,
            "learned_scaling",
            "## DivMerge step time vs K",
            learned_table(results["learned_scaling"]),
        )
    if results.get("verdict"):
        out += ["## Targets", ""]
        out += [f"- {v}" for v in results["verdict"]]
        out.append("")
    if results.get("notes"):
        out += ["## Notes", ""]
        out += [f"- {n}" for n in results["notes"]]
        out.append("")
    return "\n".join(out)


def plot(results: dict[str, Any], path: Path) -> bool:
    """Wall time and peak RSS vs K per size and tool (classic scaling). False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in results.get("scaling", []) if r["summary"].get("ok")]
    if not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for r in rows:
        series.setdefault((r["size"], r["tool"]), []).append(
            (r["k"], r["summary"]["wall_s"], r["summary"]["max_rss_mb"])
        )
    for (size, tool), pts in sorted(series.items()):
        pts.sort()
        style = "-o" if tool == "divmerge" else "--s"
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{tool} {size}")
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], style, label=f"{tool} {size}")
    axes[0].set(xlabel="K (models merged)", ylabel="wall s (median)", title="task_arithmetic wall time")
    axes[1].set(xlabel="K (models merged)", ylabel="peak RSS MiB", title="task_arithmetic peak RSS")
    for ax in axes:
        ax.set_xticks(sorted({r["k"] for r in rows}))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
