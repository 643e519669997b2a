"""The reference model folder as learned methods use it: its kind (sequence classification or causal LM,
from config.json), its tokenizer, and the one module built from its config.json (never remote code)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

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
