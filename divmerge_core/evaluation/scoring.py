"""Scoring one checkpoint on one evaluation set, with one module whose weights are overwritten in place.

* Sequence classification: argmax over the head, restricted to the task's classes when it has some.
* Causal LM: greedy generation (left-padded batches, at most ``max_new_tokens``), through the chat template
  when asked; the prediction is the label whose answer word occurs earliest in the decoded output
  (case-insensitive, whole word; at the same position the longer word wins). No answer word: wrong, and
  counted as unparsed.
* Label-free: the expert's output distributions on the inputs (class probabilities, or next-token
  probabilities over its own greedy continuation, on its :data:`TOP_K` most likely tokens) are kept, and
  a checkpoint is scored by the mean Jensen-Shannon divergence to them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import IncompatibleModelsError
from ..io.lora import open_model
from ..io.refs import ResolvedModel
from ..learned.batching import collate, per_example_mean, scored_logits
from ..learned.divergence import js
from ..learned.encoding import ChatFormat, Example, encode
from ..learned.model import module_slots
from ..learned.reference import CAUSAL, build_module, load_tokenizer
from ..learned.teachers import continue_prompts
from ..plan import MergePlan
from .sets import EvalSet

#: Prompt tokens kept per input (longer inputs are cut from the end, the chat template's tokens kept).
MAX_LENGTH = 512
#: Label-free causal scoring compares expert and checkpoint on the expert's k most likely tokens.
TOP_K = 64
_LOG2 = math.log(2.0)


def batch_size(device: torch.device) -> int:
    return 32 if device.type == "cuda" else 16


def match_answer(text: str, answers: dict[str, list[str]]) -> str | None:
    """The label whose answer word occurs first in ``text`` (case-insensitive, whole word), or None."""
    best: tuple[int, int, str] | None = None
    for label, words in answers.items():
        for w in words:
            m = re.search(rf"(?<!\w){re.escape(w.strip())}(?!\w)", text, flags=re.IGNORECASE)
            if m is not None:
                key = (m.start(), -len(w), label)
                if best is None or key < best:
                    best = key
    return None if best is None else best[2]


@dataclass
class Scores:
    """One checkpoint on one evaluation set."""

    n: int
    #: labelled: per-example correctness (input order); label-free: None
    correct: list[bool] | None = None
    #: causal labelled: per-example "no answer word found"
    unparsed: list[bool] | None = None
    #: label-free: mean JS divergence to the expert (nats, in [0, log 2])
    js: float | None = None
    #: label-free, the expert only: its output distributions, the reference of every other checkpoint
    reference: Any = None
    #: a few decoded answers (causal), for the report
    samples: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        """Accuracy (labelled) or ``1 - JS / log 2`` (label-free; 1 for the expert itself)."""
        if self.correct is not None:
            return sum(self.correct) / max(self.n, 1)
        return 1.0 - (self.js or 0.0) / _LOG2

    @property
    def unparsed_share(self) -> float:
        return sum(self.unparsed) / max(self.n, 1) if self.unparsed is not None else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "correct": self.correct, "unparsed": self.unparsed, "js": self.js}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scores:
        return cls(n=data["n"], correct=data["correct"], unparsed=data["unparsed"], js=data["js"])


class Scorer:
    """The reference model's module, tokenizer and slots; :meth:`load` puts a checkpoint's weights in.

    :meth:`for_folder` builds one for a model folder alone (the quality benchmarks score through it).
    """

    def __init__(
        self,
        plan: MergePlan,
        kind: str,
        dtype: torch.dtype,
        device: torch.device,
        max_length: int = MAX_LENGTH,
        batch: int | None = None,
    ):
        self.plan, self.kind, self.dtype, self.device = plan, kind, dtype, device
        self.max_length = max_length
        self.tokenizer = load_tokenizer(plan.reference.path)
        self.module = build_module(plan.reference.path, kind, dtype, device)
        if kind != CAUSAL and getattr(self.module.config, "pad_token_id", None) is None:
            self.module.config.pad_token_id = self.tokenizer.pad_token_id
        self.slots, _, _ = module_slots(self.module, plan)
        self.batch = batch or batch_size(device)
        self.loaded: Path | ResolvedModel | None = None

    @classmethod
    def for_folder(
        cls, folder: Path, device: torch.device, dtype: torch.dtype = torch.float32, **kw: Any
    ) -> Scorer:
        """A scorer whose reference is ``folder`` (its config, tokenizer and tensor names), weights loaded."""
        from ..config import parse_config
        from ..learned.reference import model_kind
        from ..pipeline import prepare

        plan = prepare(
            parse_config({"merge_method": "linear", "models": [{"model": str(Path(folder).resolve())}]})
        )
        scorer = cls(plan, model_kind(plan.model_config), dtype, device, **kw)
        scorer.load(plan.reference.path)
        return scorer

    @torch.no_grad()
    def load(self, folder: Path | ResolvedModel) -> None:
        """Write ``folder``'s weights into the module (every slot; a missing tensor is an error); a
        resolved model (a LoRA expert: base + adapter) may stand for its folder."""
        with open_model(folder, self.plan.options) as ck:
            missing = [n for n in self.slots if n not in ck]
            if missing:
                raise IncompatibleModelsError(
                    [f"{str(getattr(folder, 'path', folder))!r} has no tensor {m!r}" for m in missing[:20]]
                )
            for n, slot in self.slots.items():
                slot.copy_(ck.get(n, None, self.device))
        self.loaded = folder

    def n_batches(self, es: EvalSet) -> int:
        return math.ceil(len(es) / self.batch)

    def _examples(self, es: EvalSet) -> list[Example]:
        chat = (
            ChatFormat(es.spec.system_prompt, f"{es.field}.chat_template") if es.spec.chat_template else None
        )
        return encode(
            self.kind,
            self.tokenizer,
            es.inputs,
            es.task,
            self.max_length,
            es.spec.max_new_tokens,
            self.plan.model_config,
            chat,
        )

    def _batches(self, examples: list[Example]) -> list[list[int]]:
        """Input indices in batches of similar length (less padding)."""
        order = sorted(range(len(examples)), key=lambda i: len(next(iter(examples[i].fields.values()))))
        return [order[i : i + self.batch] for i in range(0, len(order), self.batch)]

    @torch.no_grad()
    def score(self, es: EvalSet, tick: Callable[[], None], reference: Any = None) -> Scores:
        """Score the loaded checkpoint on ``es``; ``tick`` is called after every batch (progress, cancel).

        Label-free sets: without ``reference`` the checkpoint is the expert and its distributions are
        returned as ``Scores.reference``; with it, the mean JS divergence to them.
        """
        examples = self._examples(es)
        batches = self._batches(examples)
        if not es.labelled:
            return self._label_free(es, examples, batches, tick, reference)
        if self.kind == CAUSAL:
            return self._generate(es, examples, batches, tick)
        return self._classify(es, examples, batches, tick)

    def _classify(self, es: EvalSet, examples, batches, tick) -> Scores:
        assert es.gold_ids is not None
        correct = [False] * len(examples)
        for idx in batches:
            logits = self._logits([examples[i] for i in idx])
            if es.allowed is not None:
                mask = torch.full_like(logits, -math.inf)
                mask[:, es.allowed] = 0.0
                logits = logits + mask
            for i, p in zip(idx, logits.argmax(-1).tolist(), strict=True):
                correct[i] = p == es.gold_ids[i]
            tick()
        return Scores(len(examples), correct=correct)

    def _generate(self, es: EvalSet, examples, batches, tick) -> Scores:
        assert es.gold is not None and es.answers is not None
        n = len(examples)
        correct, unparsed, samples = [False] * n, [False] * n, []
        for idx in batches:
            chunk = [examples[i] for i in idx]
            prompt_len = [len(e.fields["input_ids"]) for e in chunk]
            self._continue(chunk, es)
            for i, e, k in zip(idx, chunk, prompt_len, strict=True):
                text = self.tokenizer.decode(e.fields["input_ids"][k:], skip_special_tokens=True)
                label = match_answer(text, es.answers)
                unparsed[i] = label is None
                correct[i] = label is not None and label == str(es.gold[i])
                if len(samples) < 3:
                    samples.append(text)
            tick()
        return Scores(n, correct=correct, unparsed=unparsed, samples=samples)

    def _label_free(self, es: EvalSet, examples, batches, tick, reference) -> Scores:
        """Expert (``reference`` None): its distributions per batch. Otherwise: mean JS to them."""
        own: list[tuple[list[Example], torch.Tensor, torch.Tensor | None]] = []
        total, count = 0.0, 0
        for b, idx in enumerate(batches):
            if reference is None:
                chunk = [examples[i] for i in idx]
                if self.kind == CAUSAL:
                    self._continue(chunk, es)
                logp, index = self._logp(chunk, es, None)
                own.append((chunk, logp, index))
            else:
                chunk, ref_logp, index = reference[b]
                logp, _ = self._logp(chunk, es, index)
                d = js(ref_logp, logp)
                if self.kind == CAUSAL:
                    d = per_example_mean(
                        d, collate(self.kind, chunk, self.tokenizer, self.device), len(chunk)
                    )
                total += float(d.sum())
                count += len(chunk)
            tick()
        if reference is None:
            return Scores(len(examples), js=0.0, reference=own)
        return Scores(len(examples), js=total / max(count, 1))

    def _continue(self, chunk: list[Example], es: EvalSet) -> None:
        """Greedy continuation of each prompt of ``chunk`` (one left-padded batch), in place."""
        continue_prompts(
            self.module,
            self.tokenizer,
            chunk,
            batch_size=len(chunk),
            max_new_tokens=es.spec.max_new_tokens,
            device=self.device,
        )

    def _logits(self, chunk: list[Example]) -> torch.Tensor:
        batch = collate(self.kind, chunk, self.tokenizer, self.device)
        return scored_logits(self.kind, self.module(**batch.inputs).logits, batch).float()

    def _logp(
        self, chunk: list[Example], es: EvalSet, index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probabilities on ``chunk``: classification over the task's classes; causal on ``index``
        (the expert's top-k token ids, chosen here when None), renormalised over them."""
        logits = self._logits(chunk)
        if self.kind != CAUSAL:
            if es.allowed is not None:
                logits = logits[:, es.allowed]
            return F.log_softmax(logits, -1), None
        if index is None:
            index = logits.topk(min(TOP_K, logits.shape[-1]), dim=-1).indices
        return F.log_softmax(logits.gather(-1, index), -1), index
