"""Teacher outputs: greedy continuations and log-probabilities of each task's fine-tuned model.

Teacher outputs are computed one expert at a time, on that expert's own task inputs only, with a single
module whose weights are overwritten in place (never K live models), or run on theta_0 + tau_t through
``functional_call`` (online teachers). Where they are kept is ``learned.teacher_store``'s business.

* Sequence classification: the teacher's class log-probabilities.
* Causal LM: each prompt is greedily continued by its teacher (left-padded batches, ``do_sample=False``,
  up to EOS or ``max_new_tokens``); the sequence prompt + continuation is then scored teacher-forced in the
  exact right-padded layout the student will see, and the teacher's next-token log-probabilities over the
  generated positions are the targets (full vocabulary, or with ``top_k`` the teacher's k most likely tokens,
  renormalised over those k). With ``top_k`` the student is also renormalised over the teacher's k tokens,
  so the divergence is computed on that shared support only: an approximation that ignores the mass both
  models put outside it (exact when the teacher's top-k mass is ~1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .batching import collate, scored_logits
from .encoding import Example


@torch.no_grad()
def continue_prompts(
    module: torch.nn.Module,
    tokenizer: Any,
    examples: list[Example],
    *,
    batch_size: int,
    max_new_tokens: int,
    device: torch.device,
    check: Callable[[], None] | None = None,
) -> None:
    """Causal LMs: greedily continue every prompt with the current module (a teacher), in batches.

    Sets each example's ``input_ids`` to prompt + continuation and ``start``/``stop`` to the scored span.
    ``check`` is called before every batch (cooperative cancellation).
    """
    for lo in range(0, len(examples), batch_size):
        if check is not None:
            check()
        _generate(module, tokenizer, examples[lo : lo + batch_size], max_new_tokens, device)


@torch.no_grad()
def teacher_logp(
    module: torch.nn.Module,
    kind: str,
    tokenizer: Any,
    chunk: Sequence[Example],
    device: torch.device,
    weights: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The teacher's log-probabilities on ``chunk``, fp32: [B, C] or [scored positions, V].

    Causal examples must hold their continuation (:func:`continue_prompts`). ``weights`` (name -> tensor)
    runs the module on those weights through ``functional_call`` instead of the ones it holds.
    """
    batch = collate(kind, chunk, tokenizer, device)
    if weights is None:
        out = module(**batch.inputs)
    else:
        out = functional_call(module, weights, args=(), kwargs=batch.inputs, tie_weights=True, strict=False)
    return F.log_softmax(scored_logits(kind, out.logits, batch).float(), dim=-1)


def top_k_support(logp: torch.Tensor, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """With ``top_k`` below the width: the k most likely entries renormalised over them, and their ids."""
    if top_k is None or top_k >= logp.shape[-1]:
        return logp, None
    logp, index = logp.topk(top_k, dim=-1)
    return F.log_softmax(logp, dim=-1), index


def restrict_labels(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Renormalise classification log-probs ``[B, C]`` over the labels where ``mask`` ([B, C] bool) is set."""
    return F.log_softmax(logp.masked_fill(~mask, -math.inf), dim=-1)


def _generate(
    module: torch.nn.Module, tokenizer: Any, chunk: list[Example], max_new_tokens: int, device: torch.device
) -> None:
    """Greedy continuation of each prompt (left-padded); sets input_ids/start/stop to the generated span."""
    prompts = [e.fields["input_ids"] for e in chunk]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    eos = getattr(module.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
    out = module.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=None,
        pad_token_id=pad,
        eos_token_id=sorted(eos_ids) or None,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    for e, p, row in zip(chunk, prompts, out[:, width:].tolist(), strict=True):
        gen: list[int] = []
        for tok in row:
            gen.append(tok)
            if tok in eos_ids:
                break
        e.fields = {"input_ids": p + gen}
        e.start, e.stop = len(p) - 1, len(p) - 1 + len(gen)


def teacher_batch_size(batch_size_per_task: int) -> int:
    return max(1, min(32, 4 * batch_size_per_task))
