"""The causal-LM track: a small GPT-2 pretrained briefly on the shared task texts, then fine-tuned per task
to answer a prompt with the label words.

The base is deliberately tiny (4 layers, 128 wide, word-level vocabulary) and is pretrained for only a few
minutes on ~30k sentences, so it is a *weak* language model; the experts reach useful accuracy only on the
easier tasks. Accuracy is measured by scoring: the prediction is the label whose words (+ end of text) get
the highest log-likelihood after the prompt. Learned merges see only the prompts (inline ``texts``); the
engine generates each expert's answer and teacher-forces the merged model on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from .data import Example, Task, load_tasks, subset

EOS = "<|endoftext|>"
CAUSAL_VERSION = 2
_PIECES = re.compile(r"\w+|[^\w\s]+")


@dataclass(frozen=True)
class CausalRecipe:
    vocab_size: int = 4000
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 192
    pretrain_steps: int = 400
    pretrain_batch: int = 16
    pretrain_len: int = 64
    pretrain_lr: float = 3e-3
    n_train: int = 2000
    epochs: int = 2
    lr: float = 2e-3
    batch_size: int = 32
    max_words: int = 40
    seed: int = 0

    def key(self, *parts: str) -> str:
        blob = json.dumps([CAUSAL_VERSION, dataclasses.asdict(self), *parts], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


CAUSAL_RECIPES = {
    "full": CausalRecipe(),
    "quick": CausalRecipe(n_layer=2, pretrain_steps=150, n_train=600, vocab_size=3000),
}


def clip_words(text: str, n: int) -> str:
    """The first ``n`` word/punctuation pieces of ``text``, lower-cased and space-joined (= its tokens)."""
    return " ".join(_PIECES.findall(text.lower())[:n])


def label_words(label: str) -> str:
    return label.replace("_", " ").lower()


def prompt(task: str, ex: Example, max_words: int) -> str:
    """``<task> : <a> [| <b>] answer :`` with each text clipped to ``max_words`` tokens."""
    body = clip_words(ex.text_a, max_words)
    if ex.text_b is not None:
        body += " | " + clip_words(ex.text_b, max_words)
    return f"{task} : {body} answer :"


def build_tokenizer(texts: list[str], extra: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer (words and punctuation runs) trained on ``texts``."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, "<unk>"])
    # the prompt and label words must be in the vocabulary whatever their corpus frequency
    tok.train_from_iterator(texts + extra * 1000, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token=EOS, bos_token=EOS, pad_token=EOS
    )


def _save(model, tok, out: Path, meta: dict[str, Any]) -> Path:
    """Write a model folder whole or not at all; two processes building the same one both succeed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "benchmark.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.replace(out)
        except OSError:  # another process finished the same folder first: keep its copy
            if not (out / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_causal_base(
    tasks: dict[str, Task], all_tasks: dict[str, Task], recipe: CausalRecipe, cache: Path, log=print
) -> Path:
    """Tokenizer + tiny GPT-2, pretrained on the train texts of ``all_tasks`` (cached)."""
    digest = "".join(all_tasks[t].digest for t in sorted(all_tasks))
    out = cache / f"causal-base-{recipe.key(digest, *sorted(tasks))}"
    if (out / "model.safetensors").is_file():
        return out
    texts = [
        clip_words(x, 10_000)
        for t in all_tasks.values()
        for ex in t.train
        for x in (ex.text_a, ex.text_b)
        if x
    ]
    extra = [f"{n} : answer :" for n in tasks] + [
        label_words(lab) for t in tasks.values() for lab in t.labels
    ]
    tok = build_tokenizer(texts, extra, recipe.vocab_size)
    torch.manual_seed(recipe.seed)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=recipe.n_positions,
        n_embd=recipe.n_embd,
        n_layer=recipe.n_layer,
        n_head=recipe.n_head,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    ids: list[int] = []
    rng = random.Random(recipe.seed)
    rng.shuffle(texts)
    for enc in tok(texts)["input_ids"]:
        ids += enc + [tok.eos_token_id]
    stream = torch.tensor(ids)
    n_seq = len(stream) // recipe.pretrain_len
    seqs = stream[: n_seq * recipe.pretrain_len].view(n_seq, recipe.pretrain_len)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.pretrain_lr, weight_decay=0.01)
    total = recipe.pretrain_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / 50, 0.5 * (1 + math.cos(math.pi * s / total)))
    )
    model.train()
    t0 = time.time()
    gen = torch.Generator().manual_seed(recipe.seed)
    for step in range(total):
        batch = seqs[torch.randint(0, n_seq, (recipe.pretrain_batch,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0:
            log(
                f"  [causal pretrain] step {step + 1}/{total} loss {loss.item():.3f} ({time.time() - t0:.0f}s)"
            )
    model.eval()
    return _save(
        model,
        tok,
        out,
        {
            "recipe": dataclasses.asdict(recipe),
            "pretrain_tokens": int(seqs.numel()),
            "pretrain_s": round(time.time() - t0, 1),
            "final_loss": loss.item(),
        },
    )


def _sequences(tok, task: Task, examples: list[Example], recipe: CausalRecipe) -> list[tuple[list[int], int]]:
    """(prompt + answer + eos ids, prompt length) per example."""
    out = []
    for ex in examples:
        p = tok(prompt(task.name, ex, recipe.max_words))["input_ids"]
        a = tok(" " + label_words(task.labels[ex.label]))["input_ids"] + [tok.eos_token_id]
        out.append((p + a, len(p)))
    return out


def _batch(seqs: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and labels holding only the answer tokens (-100 elsewhere)."""
    n = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), n), pad)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    labels = torch.full((len(seqs), n), -100)
    for i, (s, p) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, p : len(s)] = torch.tensor(s[p:])
    return ids, mask, labels


def train_causal_expert(base: Path, task: Task, recipe: CausalRecipe, cache: Path, log=print) -> Path:
    out = cache / "causal-experts" / f"{task.name}-{recipe.key(base.name, task.digest)}"
    if (out / "model.safetensors").is_file():
        return out
    log(f"training causal expert {task.name} -> {out.name}")
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    tok = PreTrainedTokenizerFast.from_pretrained(base)
    model = GPT2LMHeadModel.from_pretrained(base)
    model.train()
    data = _sequences(tok, task, subset(task.train, recipe.n_train, recipe.seed), recipe)
    total = math.ceil(len(data) / recipe.batch_size) * recipe.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / 10, max(0.0, (total - s) / total)))
    t0 = time.time()
    for _ in range(recipe.epochs):
        order = list(range(len(data)))
        rng.shuffle(order)
        for s in range(0, len(order), recipe.batch_size):
            ids, mask, labels = _batch([data[i] for i in order[s : s + recipe.batch_size]], tok.eos_token_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    model.eval()
    if any(w == tok.unk_token for lab in task.labels for w in tok.tokenize(label_words(lab))):
        raise ValueError(f"{task.name}: a label word maps to the unknown token")
    return _save(
        model,
        tok,
        out,
        {
            "task": task.name,
            "recipe": dataclasses.asdict(recipe),
            "train_s": round(time.time() - t0, 1),
            "final_loss": loss.item(),
        },
    )


@torch.no_grad()
def score_correctness(
    model, tok, task: Task, examples: list[Example], recipe: CausalRecipe, batch_size: int = 64
) -> list[bool]:
    """Per-example correctness: predicted label = argmax of the summed log-prob of its words + eos."""
    model.eval()
    n_lab = len(task.labels)
    flat = []
    for ex in examples:
        for lab in range(n_lab):
            flat += _sequences(tok, task, [dataclasses.replace(ex, label=lab)], recipe)
    scores = []
    for s in range(0, len(flat), batch_size):
        ids, mask, labels = _batch(flat[s : s + batch_size], tok.eos_token_id)
        logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)[:, :-1]
        tgt = labels[:, 1:]
        tok_lp = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (tgt != -100)
        scores += tok_lp.sum(-1).tolist()
    out = []
    for i, ex in enumerate(examples):
        row = scores[i * n_lab : (i + 1) * n_lab]
        out.append(max(range(n_lab), key=row.__getitem__) == ex.label)
    return out


class CausalTrack:
    """Harness track of the causal-LM path (see the module docstring)."""

    name = "causal"

    def __init__(
        self,
        data_dir: Path,
        cache: Path,
        tasks: tuple[str, ...],
        recipe: CausalRecipe,
        eval_n: int,
        seed: int = 0,
        log=print,
    ):
        self.recipe = recipe
        all_tasks = load_tasks(data_dir)
        self.tasks = {t: all_tasks[t] for t in tasks}
        self.base = build_causal_base(self.tasks, all_tasks, recipe, cache, log=log)
        self.experts = {
            t: train_causal_expert(self.base, self.tasks[t], recipe, cache, log=log) for t in tasks
        }
        self.evals = {t: subset(task.eval, eval_n, seed) for t, task in self.tasks.items()}

    def data_spec(self, task: str, num_samples: int, own_labels: bool = False) -> dict[str, Any]:
        if own_labels:
            raise ValueError(
                "the causal track answers with label words: it has no label slice to restrict to"
            )
        texts = [prompt(task, ex, self.recipe.max_words) for ex in self.tasks[task].merge_pool]
        return {"texts": texts, "num_samples": num_samples}

    def evaluate(self, folder: Path, tasks: list[str]) -> dict[str, list[bool]]:
        tok = PreTrainedTokenizerFast.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return {t: score_correctness(model, tok, self.tasks[t], self.evals[t], self.recipe) for t in tasks}

    def fingerprint(self) -> str:
        return json.dumps([self.base.name, sorted(p.name for p in self.experts.values())])

    def setup(self) -> dict[str, Any]:
        meta = json.loads((self.base / "benchmark.json").read_text())
        return {
            "base": f"GPT-2 style, {self.recipe.n_layer} layers x {self.recipe.n_embd} wide, word-level vocab, "
            f"pretrained {self.recipe.pretrain_steps} steps on {meta['pretrain_tokens']} tokens of the "
            "shared train texts (weak base)",
            "expert_recipe": dataclasses.asdict(self.recipe),
            "eval_source": {t: task.eval_source for t, task in self.tasks.items()},
            "eval_n": {t: len(e) for t, e in self.evals.items()},
            "merge_pool": {t: len(task.merge_pool) for t, task in self.tasks.items()},
        }
