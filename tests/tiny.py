"""Tiny Hugging Face models and tokenizers built in code, for tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

#: A small closed vocabulary: special tokens, letters, digits and a few words.
WORDS = (
    [chr(c) for c in range(ord("a"), ord("z") + 1)]
    + [str(d) for d in range(10)]
    + [
        "yes",
        "no",
        "good",
        "bad",
        "red",
        "blue",
        "cat",
        "dog",
        "up",
        "down",
        "left",
        "right",
        ".",
        ",",
        "?",
    ]
)


#: A chat template over :data:`WORDS` only: each turn is "<role initial> <content> ." and the generation
#: prompt is "a" (assistant), so every rendered prompt tokenizes without unknown tokens.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }} {{ m['content'] }} . {% endfor %}"
    "{% if add_generation_prompt %}a {% endif %}"
)


def make_tokenizer(kind: str = "bert") -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over :data:`WORDS` (BERT-style or GPT-2-style specials)."""
    specials = (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if kind == "bert" else ["<|endoftext|>", "<unk>"]
    )
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    unk = "[UNK]" if kind == "bert" else "<unk>"
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "bert":
        from tokenizers.processors import TemplateProcessing

        tok.post_processor = TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def tiny_bert_config(num_labels: int = 2, **overrides) -> BertConfig:
    kw = dict(
        vocab_size=len(make_tokenizer("bert")),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    kw.update(overrides)
    return BertConfig(**kw)


def tiny_gpt2_config(**overrides) -> GPT2Config:
    tok = make_tokenizer("gpt2")
    kw = dict(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    kw.update(overrides)
    return GPT2Config(**kw)


def make_bert_classifier(seed: int = 0, num_labels: int = 2, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_labels, **overrides)).eval()


def make_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config(**overrides)).eval()


def make_llama(seed: int = 0, num_hidden_layers: int = 4) -> LlamaForCausalLM:
    """A tiny Llama (``model.layers.N.self_attn`` / ``.mlp`` names, as mergekit's filters expect)."""
    torch.manual_seed(seed)
    tok = make_tokenizer("gpt2")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def save(model, folder: Path, kind: str | None = None) -> Path:
    """Save model + matching tokenizer as safetensors in ``folder``; return the folder."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    kind = kind or ("bert" if model.config.model_type == "bert" else "gpt2")
    make_tokenizer(kind).save_pretrained(folder)
    return folder


@torch.no_grad()
def perturbed(model, scale: float = 0.05, seed: int = 1):
    """A copy of ``model`` with Gaussian noise added to every float parameter (a stand-in 'fine-tune')."""
    import copy

    clone = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for p in clone.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * scale)
    return clone
