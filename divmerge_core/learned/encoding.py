"""Input encoding: a task's inputs tokenized into :class:`Example` s, plain or as the user turn of the
tokenizer's chat template (:class:`ChatFormat`, :func:`chat_prompt_ids`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .data import TaskInputs
from .reference import CAUSAL, CLASSIFICATION


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
