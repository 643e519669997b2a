"""The output tokenizer's chat template (mergekit's ``chat_template``), chosen as mergekit chooses it.

``chat_template`` is ``auto`` (the template most of the merged models' tokenizers carry, compared with
surrounding whitespace stripped; the first met wins a tie, the base model first; none: the tokenizer's own
is kept), a name of a template written here (:data:`NAMED`), or a Jinja template string (at least 20
characters, with a ``{``, as mergekit requires). The templates here are our own, written for the formats'
published conventions (mergekit's bundled files are not reused).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

#: ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message.
CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

#: Llama 3: the BOS token, then ``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`` per
#: message (content trimmed).
LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

#: Template names this engine writes itself.
NAMED = {"chatml": CHATML, "llama3": LLAMA3}
#: Names mergekit 0.1.5 also knows, whose templates are not provided here.
MERGEKIT_ONLY = ("alpaca", "mistral", "exaone")


def _is_name(value: str) -> bool:
    """mergekit's test for a template *name* rather than a template."""
    return len(value) < 256 and "\n" not in value and "{" not in value


def check_chat_template(value: str) -> str:
    """``value`` if it is ``auto``, a known name or a Jinja template that parses; ValueError otherwise."""
    if value == "auto" or value in NAMED:
        return value
    if _is_name(value):
        if value in MERGEKIT_ONLY:
            raise ValueError(
                f"chat template {value!r} is one of mergekit's bundled templates, not provided here; "
                f"give the Jinja template itself, or one of: auto, {', '.join(NAMED)}"
            )
        raise ValueError(
            f"unknown chat template name {value!r} (known: auto, {', '.join(NAMED)}; or a Jinja template)"
        )
    if len(value) < 20 or "{" not in value:
        raise ValueError("is not a chat template (a Jinja template has at least 20 characters and a '{')")
    import jinja2

    try:
        jinja2.Environment().parse(value)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"the Jinja template does not parse: {err.message} (line {err.lineno})") from None
    return value


def template_of(tokenizer: object) -> str | None:
    """A tokenizer's chat template (a dict of templates: its ``default``), stripped; None without one."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template.strip() if isinstance(template, str) and template.strip() else None


def choose_chat_template(value: str | None, tokenizers: Iterable[object]) -> str | None:
    """The template to set on the output tokenizer (None: keep its own). ``tokenizers``: the merged
    models' tokenizers in order (base first), read only for ``auto``."""
    if value is None:
        return None
    if value == "auto":
        found = [t for t in (template_of(tok) for tok in tokenizers) if t is not None]
        return Counter(found).most_common(1)[0][0] if found else None
    return NAMED.get(value, value)
