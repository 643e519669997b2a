"""Model kinds, input encoding, teacher outputs, and the batches the merged (student) model is scored on.

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

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..errors import ConfigError
from .data import TaskInputs

CLASSIFICATION, CAUSAL = "classification", "causal"


def model_kind(model_config: dict[str, Any]) -> str:
    """``classification`` or ``causal`` from config.json ``architectures``; ConfigError otherwise."""
    archs = model_config.get("architectures") or []
    for arch in archs:
        if arch.endswith("ForSequenceClassification"):
            return CLASSIFICATION
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return CAUSAL
    raise ConfigError(
        "learned methods support sequence-classification and causal-LM checkpoints "
        f"(config.json architectures: {archs or 'none'})",
        field="base_model",
    )


#: Files that hold a tokenizer's vocabulary (one of them must be present; transformers 5 otherwise builds
#: an empty tokenizer and the merge would run on meaningless ids).
VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "*.model", "*.tiktoken")


def require_tokenizer(folder: Path, label: str) -> None:
    """Refuse a reference model folder with no tokenizer vocabulary file (ConfigError naming the folder)."""
    if not any(p.is_file() for pattern in VOCAB_FILES for p in folder.glob(pattern)):
        raise ConfigError(
            f"{label} ({str(folder)!r}) has no tokenizer files (none of {', '.join(VOCAB_FILES)}); "
            "learned methods need the base model's tokenizer",
            field="base_model",
        )


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    require_tokenizer(folder, "the reference model")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - tokenizers fail with many types
        raise ConfigError(
            f"cannot load the tokenizer of {str(folder)!r}: {err}", field="base_model"
        ) from None
    if len(tok) == 0:
        raise ConfigError(f"the tokenizer of {str(folder)!r} has no tokens", field="base_model")
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError("the tokenizer has neither a pad nor an EOS token", field="base_model")
        tok.pad_token = tok.eos_token
    return tok


def build_module(folder: Path, kind: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """One module from the reference config.json (never remote code), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    auto = AutoModelForSequenceClassification if kind == CLASSIFICATION else AutoModelForCausalLM
    try:
        # every parameter is overwritten from the checkpoints, so skip the (slow) random init
        with _no_init_weights(), torch.device(device):
            module = auto.from_config(config, trust_remote_code=False)
        module.tie_weights()  # skipped init also skips tying (transformers 5); tied tensors must be shared
    except (ValueError, AssertionError, TypeError, KeyError) as err:
        raise ConfigError(f"cannot build the model from config.json: {err}", field="base_model") from None
    module.to(device=device, dtype=dtype).eval()
    module.requires_grad_(False)
    return module


def _no_init_weights() -> contextlib.AbstractContextManager:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


@dataclass
class Example:
    """One encoded input and, for divmerge, its teacher's target distribution(s)."""

    task: int
    #: classification: the tokenizer's fields (input_ids, attention_mask, token_type_ids ...) unpadded.
    #: causal: {"input_ids": prompt + teacher continuation}.
    fields: dict[str, list[int]]
    #: causal: sequence positions whose next-token prediction is scored.
    start: int = 0
    stop: int = 0
    #: this example's first row in its task's teacher outputs (see ``learned.teacher_store``).
    row: int = 0


@dataclass(frozen=True)
class ChatFormat:
    """``data.chat_template``: each input becomes the user turn of the tokenizer's chat template."""

    system_prompt: str | None = None
    #: the config path reported when the tokenizer cannot apply a template (``models.<i>.data.chat_template``)
    field: str = "data.chat_template"


def encode(
    kind: str,
    tokenizer: Any,
    inputs: TaskInputs,
    task: int,
    max_length: int,
    max_new_tokens: int,
    model_config: dict[str, Any],
    chat: ChatFormat | None = None,
) -> list[Example]:
    """Tokenize a task's inputs (truncated so prompt + continuation fits the model's positions).

    With ``chat`` (causal LMs only) every input is wrapped by :func:`chat_prompt_ids`.
    """
    if chat is not None and kind != CAUSAL:
        raise ConfigError("'chat_template' applies to causal LMs only", field=chat.field)
    if kind == CLASSIFICATION:
        out = []
        for x in inputs.texts:
            enc = tokenizer(*((x,) if isinstance(x, str) else x), truncation=True, max_length=max_length)
            out.append(Example(task, {k: list(v) for k, v in enc.items()}))
        return out
    limit = max_length
    n_pos = model_config.get("max_position_embeddings") or model_config.get("n_positions")
    if n_pos:
        limit = max(1, min(limit, int(n_pos) - max_new_tokens))
    out = []
    for x in inputs.texts:
        text = x if isinstance(x, str) else "\n".join(x)
        if chat is not None:
            ids = chat_prompt_ids(tokenizer, text, limit, chat)
        else:
            ids = tokenizer(text, truncation=True, max_length=limit)["input_ids"]
        if not ids:
            ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        # adamerging scores the predictions after every prompt token; divmerge overrides start/stop
        out.append(Example(task, {"input_ids": list(ids)}, start=0, stop=len(ids)))
    return out


_SLOT = "\u2063DIVMERGE-INPUT\u2063"  # stands for the input while the template is rendered


def chat_prompt_ids(tokenizer: Any, text: str, limit: int, chat: ChatFormat) -> list[int]:
    """Token ids of ``text`` as the user turn of the chat template plus the assistant generation prompt.

    When the whole prompt exceeds ``limit`` tokens, the input text is cut (from its end) so that the
    template's own tokens, including the generation prompt, are always kept.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the tokenizer has no chat template", field=chat.field)

    def render(content: str) -> str:
        messages = [{"role": "user", "content": content}]
        if chat.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": chat.system_prompt})
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # noqa: BLE001 - jinja raises many types
            raise ConfigError(
                f"cannot apply the tokenizer's chat template: {err}", field=chat.field
            ) from None

    ids = tokenizer(render(text), add_special_tokens=False)["input_ids"]
    if len(ids) <= limit:
        return list(ids)
    head, sep, tail = render(_SLOT).partition(_SLOT)
    if not sep:
        raise ConfigError("the chat template does not include the user's message", field=chat.field)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    room = limit - len(head_ids) - len(tail_ids)
    if room < 1:
        raise ConfigError(
            f"the chat template alone takes {len(head_ids) + len(tail_ids)} tokens; "
            f"raise max_length (now {limit} after leaving room for max_new_tokens)",
            field="parameters.max_length",
        )
    body = tokenizer(text, add_special_tokens=False)["input_ids"][:room]
    return list(head_ids) + list(body) + list(tail_ids)


# --- batches ---------------------------------------------------------------------------------------------
@dataclass
class Batch:
    #: keyword arguments of the model's forward
    inputs: dict[str, Any]
    #: causal: (row, position) of every scored prediction and the example (0..B-1) it belongs to.
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    owner: torch.Tensor | None = None


def collate(kind: str, examples: Sequence[Example], tokenizer: Any, device: torch.device) -> Batch:
    """Right-padded batch (positions 0..L-1 for every sequence, as in left-padded generation)."""
    if kind == CLASSIFICATION:
        padded = tokenizer.pad([e.fields for e in examples], padding=True, return_tensors="pt")
        return Batch({k: v.to(device) for k, v in padded.items()})
    seqs = [e.fields["input_ids"] for e in examples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, owner = [], [], []
    for b, (s, e) in enumerate(zip(seqs, examples, strict=True)):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
        rows += [b] * (e.stop - e.start)
        cols += range(e.start, e.stop)
        owner += [b] * (e.stop - e.start)
    as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return Batch(
        {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False},
        as_long(rows),
        as_long(cols),
        as_long(owner),
    )


def scored_logits(kind: str, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The logits that are scored: [B, C] (classification) or [T, V] (causal, flattened positions)."""
    if kind == CLASSIFICATION:
        return logits
    return logits[batch.rows, batch.cols]


def per_example_mean(values: torch.Tensor, batch: Batch, n_examples: int) -> torch.Tensor:
    """Average per-token values over each example's scored positions (identity for classification)."""
    if batch.owner is None:
        return values
    sums = torch.zeros(n_examples, dtype=values.dtype, device=values.device).index_add(0, batch.owner, values)
    counts = torch.bincount(batch.owner, minlength=n_examples).clamp_min(1).to(values.dtype)
    return sums / counts


# --- teachers --------------------------------------------------------------------------------------------
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


def scored_rows(kind: str, example: Example) -> int:
    """How many target rows an example has: 1 (classification) or its scored positions (causal)."""
    return 1 if kind == CLASSIFICATION else example.stop - example.start


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


__all__ = [
    "CAUSAL",
    "CLASSIFICATION",
    "Batch",
    "ChatFormat",
    "Example",
    "continue_prompts",
    "build_module",
    "chat_prompt_ids",
    "collate",
    "encode",
    "load_tokenizer",
    "model_kind",
    "per_example_mean",
    "restrict_labels",
    "scored_logits",
    "scored_rows",
    "teacher_batch_size",
    "teacher_logp",
    "top_k_support",
]
