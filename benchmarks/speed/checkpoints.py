"""Synthetic checkpoints for the speed benchmark: a random base model and K "experts" (base + noise).

Two shapes: BERT sequence classifiers (``25M``/``100M``/``300M``) and GPT-2 causal LMs (``gpt2-124M``, the
shape of openai-community/gpt2, tied LM head not stored, as transformers saves it).

Everything is built in code from a seed (nothing is downloaded) and saved as safetensors with a
config.json and a word-level tokenizer, so both our engine and mergekit/FusionBench can load the folders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "speed"


@dataclass(frozen=True)
class ModelSize:
    """A BERT-for-sequence-classification shape, or (``arch="gpt2"``) a GPT2LMHeadModel shape."""

    name: str
    hidden: int
    layers: int
    heads: int
    vocab: int = 30522
    max_positions: int = 512
    num_labels: int = 2
    arch: str = "bert"

    def config(self) -> dict:
        """The model's ``config.json``."""
        return self.gpt2_config() if self.arch == "gpt2" else self.bert_config()

    def gpt2_config(self) -> dict:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab,
            "n_positions": self.max_positions,
            "n_embd": self.hidden,
            "n_layer": self.layers,
            "n_head": self.heads,
            "n_inner": None,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
        }

    def bert_config(self) -> dict:
        return {
            "architectures": ["BertForSequenceClassification"],
            "model_type": "bert",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "intermediate_size": 4 * self.hidden,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "max_position_embeddings": self.max_positions,
            "type_vocab_size": 2,
            "initializer_range": 0.02,
            "layer_norm_eps": 1e-12,
            "pad_token_id": 0,
            "num_labels": self.num_labels,
            "id2label": {str(i): f"LABEL_{i}" for i in range(self.num_labels)},
            "label2id": {f"LABEL_{i}": i for i in range(self.num_labels)},
            "torch_dtype": "float32",
        }

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, in the order transformers saves the model."""
        if self.arch == "gpt2":
            return self._gpt2_shapes()
        h, f = self.hidden, 4 * self.hidden
        out: dict[str, tuple[int, ...]] = {
            "bert.embeddings.word_embeddings.weight": (self.vocab, h),
            "bert.embeddings.position_embeddings.weight": (self.max_positions, h),
            "bert.embeddings.token_type_embeddings.weight": (2, h),
            "bert.embeddings.LayerNorm.weight": (h,),
            "bert.embeddings.LayerNorm.bias": (h,),
        }
        for i in range(self.layers):
            p = f"bert.encoder.layer.{i}."
            for m in (
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
            ):
                out[p + m + ".weight"] = (h, h)
                out[p + m + ".bias"] = (h,)
            out[p + "attention.output.LayerNorm.weight"] = (h,)
            out[p + "attention.output.LayerNorm.bias"] = (h,)
            out[p + "intermediate.dense.weight"] = (f, h)
            out[p + "intermediate.dense.bias"] = (f,)
            out[p + "output.dense.weight"] = (h, f)
            out[p + "output.dense.bias"] = (h,)
            out[p + "output.LayerNorm.weight"] = (h,)
            out[p + "output.LayerNorm.bias"] = (h,)
        out["bert.pooler.dense.weight"] = (h, h)
        out["bert.pooler.dense.bias"] = (h,)
        out["classifier.weight"] = (self.num_labels, h)
        out["classifier.bias"] = (self.num_labels,)
        return out

    def _gpt2_shapes(self) -> dict[str, tuple[int, ...]]:
        h, f = self.hidden, 4 * self.hidden
        out: dict[str, tuple[int, ...]] = {
            "transformer.wte.weight": (self.vocab, h),
            "transformer.wpe.weight": (self.max_positions, h),
        }
        for i in range(self.layers):
            p = f"transformer.h.{i}."
            out[p + "ln_1.weight"] = (h,)
            out[p + "ln_1.bias"] = (h,)
            out[p + "attn.c_attn.weight"] = (h, 3 * h)  # Conv1D: (in, out)
            out[p + "attn.c_attn.bias"] = (3 * h,)
            out[p + "attn.c_proj.weight"] = (h, h)
            out[p + "attn.c_proj.bias"] = (h,)
            out[p + "ln_2.weight"] = (h,)
            out[p + "ln_2.bias"] = (h,)
            out[p + "mlp.c_fc.weight"] = (h, f)
            out[p + "mlp.c_fc.bias"] = (f,)
            out[p + "mlp.c_proj.weight"] = (f, h)
            out[p + "mlp.c_proj.bias"] = (h,)
        out["transformer.ln_f.weight"] = (h,)
        out["transformer.ln_f.bias"] = (h,)
        return out

    @property
    def n_params(self) -> int:
        total = 0
        for shape in self.shapes().values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize("tiny", hidden=32, layers=2, heads=2, vocab=512, max_positions=64),
    "25M": ModelSize("25M", hidden=384, layers=8, heads=6),
    "100M": ModelSize("100M", hidden=768, layers=12, heads=12),  # BERT-base: 109M
    "300M": ModelSize("300M", hidden=1024, layers=24, heads=16),  # BERT-large: 335M
    # GPT-2 small: 124M
    "gpt2-124M": ModelSize(
        "gpt2-124M", hidden=768, layers=12, heads=12, vocab=50257, max_positions=1024, arch="gpt2"
    ),
}


def vocab_words(n: int) -> list[str]:
    """The tokenizer's vocabulary: BERT specials then ``w5``, ``w6``, ... up to ``n`` entries."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return specials + [f"w{i}" for i in range(len(specials), n)]


def save_tokenizer(folder: Path, vocab_size: int, max_length: int = 512) -> None:
    """A whitespace word-level tokenizer with exactly ``vocab_size`` entries, BERT special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocab_words(vocab_size))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    fast.save_pretrained(folder)


def _init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith(("LayerNorm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=gen) * 0.02


def _write_folder(folder: Path, size: ModelSize, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(size.config(), indent=2), encoding="utf-8")
    save_tokenizer(folder, size.vocab, size.max_positions)  # word-level: classic merges only copy it
    tmp.rename(folder / "model.safetensors")


def _complete(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def make_family(
    size: ModelSize | str, k: int, root: Path = CACHE, noise: float = 0.002, seed: int = 0
) -> tuple[Path, list[Path]]:
    """Create (or reuse) ``root/<size>/base`` and ``root/<size>/expert{0..k-1}``; return their paths.

    Expert ``i`` is base + N(0, noise²) with its own seed, so a family of K experts is a prefix of a
    larger family: the K=2/4/8 runs share checkpoints.
    """
    size = SIZES[size] if isinstance(size, str) else size
    fam = root / size.name
    base_dir = fam / "base"
    shapes = size.shapes()
    base: dict[str, torch.Tensor] | None = None

    def load_base() -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {n: _init_tensor(n, s, gen) for n, s in shapes.items()}

    if not _complete(base_dir):
        base = load_base()
        _write_folder(base_dir, size, base)
    experts = []
    for i in range(k):
        d = fam / f"expert{i}"
        if not _complete(d):
            if base is None:
                base = load_base()
            gen = torch.Generator().manual_seed(seed + 1000 + i)
            tensors = {n: t + torch.randn(t.shape, generator=gen) * noise for n, t in base.items()}
            _write_folder(d, size, tensors)
            del tensors
        experts.append(d)
    return base_dir, experts
