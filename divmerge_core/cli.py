"""The ``divmerge`` command line: ``merge``, ``eval``, ``validate`` and ``methods``, plus subcommands from installed plugins.

Plugins (e.g. the service's ``serve``/``token``) register through the ``divmerge.commands`` entry-point
group: each entry point is loaded and its ``register(subparsers)`` called (or the object itself, if it is
a function). Subcommands set ``func`` (a callable taking the parsed namespace, returning an exit code).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from .config import load_config
from .errors import (
    ConfigError,
    DatasetError,
    DivMergeError,
    IncompatibleModelsError,
    ModelNotFoundError,
    UnsafeCheckpointError,
)
from .options import EngineOptions
from .progress import ProgressEvent

PROG = "divmerge"
PLUGIN_GROUP = "divmerge.commands"
#: Top-level modules of the optional extras: a plugin that needs one that is missing is skipped quietly.
_OPTIONAL_MODULES = {
    "pydantic_settings",
    "fastapi",
    "uvicorn",
    "sqlalchemy",
    "celery",
    "redis",
    "alembic",
    "httpx",
}
#: Errors in what the user gave us (config, models, data): exit code 2. Anything else: 1.
USER_ERRORS = (ConfigError, IncompatibleModelsError, ModelNotFoundError, UnsafeCheckpointError, DatasetError)


class _Progress:
    """A tqdm bar that restarts at each stage and shows the loss while optimising."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.stage: str | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        if event.stage == "done":
            self.close()
            return
        from tqdm import tqdm

        if event.stage != self.stage or self.bar is None:
            self.close()
            self.stage = event.stage
            self.bar = tqdm(
                total=event.total or None, desc=event.stage, unit="step", leave=False, file=sys.stderr
            )
        bar = self.bar
        if event.total and bar.total != event.total:
            bar.total = event.total
        bar.n = event.step
        if event.loss is not None:
            bar.set_postfix(loss=f"{event.loss:.4g}", refresh=False)
        bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _convergence_note(coefficients: dict | None) -> str:
    """``, held-out best after epoch 2 of 4 (converged)`` for a learned merge that held inputs out."""
    if not coefficients or not coefficients.get("heldout"):
        return ""
    last = coefficients["heldout"][-1][0]
    state = "converged" if coefficients.get("converged") else "not converged"
    if coefficients.get("stopped_early"):
        state += f", stopped early at step {coefficients['steps']} of {coefficients['planned_steps']}"
    return f", held-out best after epoch {coefficients['best_epoch']} of {last} ({state})"


def _options(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions(allow_pickle=getattr(args, "allow_pickle", False))


def _load(path: str):
    """The config, its mergekit no-op warnings printed to stderr."""
    config = load_config(path)
    for warning in config.warnings():
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return config


def cmd_merge(args: argparse.Namespace) -> int:
    from .pipeline import run_merge

    config = _load(args.config)
    force = args.force or (config.output is not None and config.output.overwrite)
    progress = _Progress(enabled=not args.quiet and sys.stderr.isatty())
    try:
        result = run_merge(
            config,
            args.out,
            options=_options(args),
            device=args.device,
            progress=progress,
            force=force,
            devices=args.devices,
        )
    finally:
        progress.close()
    metrics = result.metrics
    if metrics.get("rank"):  # torchrun: a rank other than 0 took part in learning; rank 0 wrote the outputs
        return 0
    loss = f", final loss {metrics['final_loss']:.6g}" if metrics.get("final_loss") is not None else ""
    loss += _convergence_note(result.coefficients)
    evaluation = result.evaluation
    method = evaluation.get("method", config.merge_method) if evaluation else config.merge_method
    print(
        f"merged {len(config.task_models())} model(s) with {method} into {result.out_dir} "
        f"({len(result.files)} files, {metrics['wall_s']:.1f}s, peak RSS {metrics['peak_rss_mb']:.0f} MB{loss})"
    )
    if evaluation is not None:
        from .evaluation.table import table

        print(table(evaluation))
        if evaluation.get("error"):
            return 1
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Score an existing merged folder on the config's ``eval`` sets, beside each expert."""
    from pathlib import Path

    from .evaluation.sets import load_eval_sets
    from .evaluation.stage import Candidate, evaluate_merges
    from .evaluation.table import table
    from .pipeline import prepare, resolve_device
    from .progress import Reporter

    config = _load(args.config)
    if not any(m.eval is not None for m in config.task_models()):
        raise ConfigError("no model of the config has an 'eval' set to score on", field="models")
    folder = Path(args.model_dir)
    if not folder.is_dir():
        raise ConfigError(f"model directory {args.model_dir!r} does not exist")
    progress = _Progress(enabled=not args.quiet and sys.stderr.isatty())
    try:
        reporter = Reporter(progress)
        plan = prepare(config, _options(args), reporter)
        sets = load_eval_sets(plan, reporter)
        label = folder.resolve().name or str(folder)
        report = evaluate_merges(
            plan,
            sets,
            [Candidate(label, config.merge_method, {}, folder)],
            device=resolve_device(args.device),
            reporter=reporter,
            base=args.base,
        )
    finally:
        progress.close()
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table(report))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Resolve the models, check they can be merged and that each dataset has the columns it needs."""
    from .dryrun import dry_run

    config = _load(args.config)
    report = dry_run(config, _options(args), args.device)
    if not report.ok:
        for p in report.problems:
            where = f"{p['field']}: " if p["field"] else ""
            print(f"{PROG}: error: {where}{_one_line(p['message'])} [{p['code']}]", file=sys.stderr)
        return 2
    plan = report.plan
    assert plan is not None
    models = ([plan.base] if plan.base else []) + plan.models
    arch = plan.model_config.get("architectures") or [plan.model_config.get("model_type", "?")]
    method = config.method
    print(f"ok: {config.merge_method} merge of {len(plan.models)} model(s), {', '.join(arch)}")
    print(f"  {method.kind} method ({method.queue} queue): {method.card}")
    for m in models:
        role = "base " if m is plan.base else "model"
        where = f"@{m.commit}" if m.commit else f"({m.path})"
        print(f"  {role} {m.ref.raw} {where}")
    print(f"  {len(plan.tensor_names)} tensors, all compatible")
    n_data = sum(1 for m in config.models if m.data is not None)
    if n_data:
        print(f"  {n_data} dataset(s) read, columns found")
    for name, n in (report.eval_sets or {}).items():
        print(f"  eval set of {name}: {n} examples, labels checked")
    est = report.estimate or {}
    if est:
        print(
            f"  estimate: {est['parameters']:,} parameters, reads {est['read_bytes'] / 1e6:.1f} MB, "
            f"writes {est['output_bytes'] / 1e6:.1f} MB"
        )
    if est.get("memory") is not None:
        from .learned.memory import describe

        for line in describe(est["memory"]):
            print(f"  {line}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods.registry import markdown

    print(markdown())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Merge fine-tuned models of one base model.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    merge = sub.add_parser("merge", help="run a merge described by a YAML config")
    merge.add_argument("config", help="merge config (YAML)")
    merge.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    merge.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    merge.add_argument(
        "--allow-pickle", action="store_true", help="load pickle .bin checkpoints (weights only)"
    )
    merge.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty output directory (same as output.overwrite: true)",
    )
    merge.add_argument(
        "--devices",
        type=_positive_int,
        default=1,
        help="learned methods: run as one data-parallel job over N processes (N GPUs with --device cuda)",
    )
    merge.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    merge.set_defaults(func=cmd_merge)

    validate = sub.add_parser(
        "validate", help="resolve the models and data, check they can be merged (a dry run, nothing written)"
    )
    validate.add_argument("config", help="merge config (YAML)")
    validate.add_argument("--allow-pickle", action="store_true", help="load pickle .bin checkpoints")
    validate.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="device the memory estimate is for"
    )
    validate.set_defaults(func=cmd_validate)

    evaluate = sub.add_parser(
        "eval", help="score a merged model folder on the config's eval sets, beside each expert"
    )
    evaluate.add_argument("config", help="merge config (YAML) whose models carry 'eval' sets")
    evaluate.add_argument("model_dir", metavar="MODEL_DIR", help="the merged model folder to score")
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    evaluate.add_argument("--base", action="store_true", help="score the base model too")
    evaluate.add_argument("--json", metavar="FILE", help="also write the report (evaluation.json) to FILE")
    evaluate.add_argument("--allow-pickle", action="store_true", help="load pickle .bin checkpoints")
    evaluate.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=cmd_eval)

    methods = sub.add_parser("methods", help="list the merge methods and their parameters (markdown)")
    methods.set_defaults(func=cmd_methods)

    load_plugins(sub)
    return parser


def load_plugins(subparsers: argparse._SubParsersAction) -> list[str]:
    """Let installed packages add subcommands. A broken plugin is reported and skipped."""
    loaded: list[str] = []
    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.name in loaded:  # the same plugin seen twice on sys.path (e.g. a checkout and an install)
            continue
        try:
            obj = ep.load()
            register = getattr(obj, "register", obj)
            register(subparsers)
            loaded.append(ep.name)
        except ModuleNotFoundError as err:
            if err.name in _OPTIONAL_MODULES:  # its extra ([service] or [client]) is not installed
                continue
            print(f"{PROG}: warning: plugin {ep.name!r} failed to load: {err}", file=sys.stderr)
        except Exception as err:  # noqa: BLE001 - a plugin must never break the engine's own commands
            print(f"{PROG}: warning: plugin {ep.name!r} failed to load: {err}", file=sys.stderr)
    return loaded


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except DivMergeError as err:
        print(f"{PROG}: error: {_one_line(str(err))}", file=sys.stderr)
        code = 2 if isinstance(err, USER_ERRORS) else 1
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        code = 130
    except Exception as err:  # noqa: BLE001 - one line for the user; --debug shows the traceback
        if args.debug:
            raise
        print(f"{PROG}: error: unexpected {type(err).__name__}: {_one_line(str(err))}", file=sys.stderr)
        code = 1
    return int(code or 0)


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
