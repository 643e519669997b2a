"""``divmerge submit|jobs|status|cancel|retry|logs|download``: the service's client commands, registered as
``divmerge.commands`` plugins. Server and token come from ``--server``/``--token`` or ``DIVMERGE_URL`` /
``DIVMERGE_TOKEN``. Exit codes: 0 done, 1 the job failed or was cancelled, 2 the server refused the request
or could not be reached."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime

from .client import Client, ClientError

PROG = "divmerge"


class _Bar:
    """A tqdm bar per stage for ``--wait``: step/total, the loss and the server's ETA."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.stage = enabled, None, None

    def __call__(self, job: dict) -> None:
        p = job.get("progress") or {}
        if not self.enabled or job["status"] != "running" or not p.get("stage"):
            return
        from tqdm import tqdm

        if p["stage"] != self.stage:
            self.close()
            self.stage = p["stage"]
            self.bar = tqdm(
                total=p.get("total") or None, desc=p["stage"], unit="step", file=sys.stderr, leave=False
            )
        bar = self.bar
        if p.get("total") and bar.total != p["total"]:
            bar.total = p["total"]
        bar.n = p.get("step") or 0
        post = {}
        if p.get("loss") is not None:
            post["loss"] = f"{p['loss']:.4g}"
        if p.get("eta_s") is not None:
            post["eta"] = f"{p['eta_s']:.0f}s"
        if job.get("last_error"):
            post["retrying"] = job["last_error"]["code"]
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _client(args: argparse.Namespace) -> Client:
    return Client(args.server, args.token)


def _summary(job: dict) -> str:
    p = job.get("progress") or {}
    line = f"{job['id']}  {job['status']}"
    if job["status"] == "running" and p.get("stage"):
        line += f"  {p['stage']} {p.get('step') or 0}/{p.get('total') or 0}"
    if job.get("result"):
        line += f"  -> {job['result']['destination']}"
    if job.get("error"):
        line += f"  {job['error']['code']}: {job['error']['message']}"
    elif job.get("last_error"):
        line += f"  (retrying after {job['last_error']['code']}: {job['last_error']['message']})"
    evaluation = (job.get("result") or {}).get("evaluation")
    if evaluation:
        from divmerge_core.evaluation.table import table

        line += "\n" + table(evaluation)
    return line


def cmd_submit(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = c.submit(args.config)
        print(job["id"], flush=True)
        if not args.wait:
            return 0
        bar = _Bar(enabled=not args.quiet)
        try:
            job = c.wait(job["id"], on_update=bar, poll_s=args.poll)
        finally:
            bar.close()
    print(_summary(job))
    return 0 if job["status"] == "succeeded" else 1


def cmd_validate_remote(args: argparse.Namespace) -> int:
    with _client(args) as c:
        report = c.validate(args.config)
    for p in report["problems"]:
        where = f"{p['field']}: " if p.get("field") else ""
        print(f"{PROG}: error: {where}{p['message']} [{p['code']}]", file=sys.stderr)
    if report["ok"]:
        print(f"ok: {json.dumps(report['estimate'])}")
    return 0 if report["ok"] else 2


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as c:
        jobs = c.jobs(status=args.status, limit=args.limit)
    print(f"{'ID':36}  {'STATUS':9}  {'METHOD':15}  {'STAGE':12}  CREATED")
    for j in jobs:
        stage = (j.get("progress") or {}).get("stage") or ""
        created = datetime.fromisoformat(j["created_at"].replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{j['id']:36}  {j['status']:9}  {j['spec'].get('merge_method', ''):15}  {stage:12}  {created}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = c.get(args.id)
    print(json.dumps(job, indent=2) if args.json else _summary(job))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as c:
        print(_summary(c.cancel(args.id)))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    with _client(args) as c:
        print(_summary(c.retry(args.id)))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    with _client(args) as c:
        for e in c.events(args.id):
            print(f"{e['at']}  {e['kind']:15}  {e['message']}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    with _client(args) as c:
        for path in c.download(args.id, args.dir):
            print(path)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server", default=None, help="service URL (default $DIVMERGE_URL or http://127.0.0.1:8000)"
    )
    p.add_argument("--token", default=None, help="API token (default $DIVMERGE_TOKEN)")


def _guard(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ClientError as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 2

    return run


def register(subparsers) -> None:
    def add(name: str, help: str, func) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help)
        _common(p)
        p.set_defaults(func=_guard(func))
        return p

    p = add("submit", "send a merge config (YAML) to the service", cmd_submit)
    p.add_argument("config", help="merge config (YAML), as for divmerge merge")
    p.add_argument(
        "--wait", action="store_true", help="follow the job with a progress bar; exit 1 if it fails"
    )
    p.add_argument("--poll", type=float, default=1.0, help="seconds between status reads with --wait")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p = add("check", "dry-run a merge config on the service (POST /v1/merges/validate)", cmd_validate_remote)
    p.add_argument("config", help="merge config (YAML)")
    p = add("jobs", "list your team's jobs, newest first", cmd_jobs)
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--limit", type=int, default=20)
    p = add("status", "show one job", cmd_status)
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="the whole job as JSON")
    add("cancel", "cancel a job", cmd_cancel).add_argument("id")
    add("retry", "retry a failed job (re-delivers its kept result if there is one)", cmd_retry).add_argument(
        "id"
    )
    add(
        "logs", "a job's events: stages, retries and their reason, warnings, the worker", cmd_logs
    ).add_argument("id")
    p = add("download", "download a job's output files (local destinations), checking sha256", cmd_download)
    p.add_argument("id")
    p.add_argument("dir", help="folder to write the files into (created if missing)")
