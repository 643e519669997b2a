"""The host side of scripts/compose-check.sh.

``jobs.py models DIR``  makes tiny models in DIR (tests/tiny.py; nothing is downloaded): a BERT classifier
                        base with two perturbed "fine-tunes" and the same for a tiny GPT-2.
``jobs.py run``         with DIVMERGE_URL and DIVMERGE_TOKEN: through the client, one classic merge
                        (task_arithmetic, cpu queue) and one DivMerge (gpu queue) on those models, mounted at
                        /models in the containers; checks their results, events and coefficients, and
                        downloads one output file (sha256 checked).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODELS = "/models"  # where docker-compose.yml mounts MODELS_DIR
TEXTS = [["a b c", "cat dog up", "red blue", "1 2 3"], ["good bad", "left right", "x y z", "9 8"]]


def make_models(folder: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.tiny import make_bert_classifier, make_gpt2, perturbed, save

    bert, gpt = make_bert_classifier(seed=0), make_gpt2(seed=0)
    save(bert, folder / "base")
    save(gpt, folder / "gpt_base")
    for i in (1, 2):
        save(perturbed(bert, seed=i), folder / f"ft{i}")
        save(perturbed(gpt, seed=i), folder / f"gpt_ft{i}")


def say(msg: str) -> None:
    print(f"compose-check jobs: {msg}", flush=True)


def check(cond: bool, what: str) -> None:
    if not cond:
        raise SystemExit(f"compose-check jobs: FAILED: {what}")


def run_job(c, body: dict, queue: str, timeout_s: float) -> dict:
    job = c.submit(body)
    check(job["status"] == "queued" and job["queue"] == queue, f"queued on {queue}: {job}")
    say(f"{body['merge_method']}: job {job['id']} queued on {job['queue']}")
    t0, last = time.monotonic(), None
    while job["status"] in ("queued", "running"):
        check(
            time.monotonic() - t0 < timeout_s,
            f"job {job['id']} still {job['status']} after {timeout_s:.0f} s",
        )
        time.sleep(1)
        job = c.get(job["id"])
        p = job.get("progress") or {}
        line = f"{job['status']} {p.get('stage') or ''} {p.get('step') or 0}/{p.get('total') or 0}"
        if line != last:
            say(f"  {line}")
            last = line
    check(job["status"] == "succeeded", f"job {job['id']} ended {job['status']}: {job.get('error')}")
    say(
        f"{body['merge_method']}: succeeded in {time.monotonic() - t0:.1f} s -> {job['result']['destination']}"
    )
    return job


def run(args: argparse.Namespace) -> None:
    from divmerge_client import Client, ClientError

    with Client() as c:
        for _ in range(60):  # the API container answers once uvicorn is up
            try:
                c.jobs()
                break
            except ClientError:
                time.sleep(1)
        ready = c._http.get("/readyz")
        check(ready.status_code == 200, f"/readyz: {ready.status_code} {ready.text}")
        say(f"/readyz: {ready.json()}")
        classic = {
            "merge_method": "task_arithmetic",
            "base_model": f"{MODELS}/base",
            "models": [{"model": f"{MODELS}/ft1"}, {"model": f"{MODELS}/ft2"}],
            "parameters": {"lambda": 0.5},
            "output": {"path": "/data/outputs/compose-check-classic"},
        }
        # the API image carries no engine: the dry run answers 503 by design (docs/client.md)
        try:
            c.validate(classic)
            say("validate: answered (the API image has the engine?)")
        except ClientError as err:
            check(err.status == 503, f"validate: {err.status} {err.code} {err.message}")
            say(f"validate: 503 {err.code} as documented ({err.message})")
        job = run_job(c, classic, "cpu", args.timeout)
        if args.first_job_since:
            say(
                f"time to the first succeeded job since 'docker-compose up': {time.time() - args.first_job_since:.0f} s"
            )
        res = job["result"]
        check(
            res["destination"] == "/data/outputs/compose-check-classic", f"destination {res['destination']}"
        )
        check({"config.json", "model.safetensors", "README.md"} <= set(res["files"]), f"files {res['files']}")
        check(res["coefficients"] is None, "a classic merge has no coefficients")
        kinds = [e["kind"] for e in c.events(job["id"])]
        check(kinds[0] == "submitted" and "claimed" in kinds and kinds[-1] == "succeeded", f"events {kinds}")

        divmerge = {
            "merge_method": "divmerge",
            "base_model": f"{MODELS}/gpt_base",
            "models": [
                {"model": f"{MODELS}/gpt_ft1", "data": {"texts": TEXTS[0]}},
                {"model": f"{MODELS}/gpt_ft2", "data": {"texts": TEXTS[1]}},
            ],
            "parameters": {
                "granularity": "layer",
                "epochs": 2,
                "max_new_tokens": 4,
                "batch_size_per_task": 2,
            },
        }
        learned = run_job(c, divmerge, "gpu", args.timeout)
        coeffs = c.coefficients(learned["id"])
        check(coeffs["values"] and len(coeffs["tasks"]) == 2 and coeffs["losses"], f"coefficients {coeffs}")
        say(
            f"divmerge: {len(coeffs['groups'])} groups x {len(coeffs['tasks'])} tasks, {len(coeffs['losses'])} losses"
        )

        # one output file over HTTP, checked against the listing's sha256
        listing = {f["name"]: f for f in c.files(learned["id"])["files"]}
        name = "model.safetensors"
        check(name in listing, f"files {sorted(listing)}")
        dest = Path(args.download)
        dest.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(dest / name, "wb") as out:
            for chunk in c._stream(f"/v1/merges/{learned['id']}/files/{name}"):
                digest.update(chunk)
                out.write(chunk)
        check(digest.hexdigest() == listing[name]["sha256"], "sha256 of the downloaded file")
        size = (dest / name).stat().st_size
        check(size == listing[name]["size"], f"size {size} != {listing[name]['size']}")
        from safetensors import safe_open

        with safe_open(dest / name, "pt") as f:
            check(len(list(f.keys())) > 0, "the downloaded safetensors has tensors")
        say(f"downloaded {name} ({size} bytes, sha256 matches)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("models")
    m.add_argument("folder", type=Path)
    r = sub.add_parser("run")
    r.add_argument("--timeout", type=float, default=300.0, help="seconds per job")
    r.add_argument("--first-job-since", type=float, default=0.0, help="epoch seconds of 'up'")
    r.add_argument("--download", default="download")
    args = parser.parse_args()
    if args.cmd == "models":
        make_models(args.folder)
    else:
        run(args)


if __name__ == "__main__":
    main()
