"""Qwen2-shaped checkpoint families built in code: a random base and K experts (base + small noise).

Each model folder holds config.json, a word-level tokenizer with the model's full vocabulary
(``<|endoftext|>``, ``<unk>``, then ``w2`` ... ``w{V-1}``) and ``model.safetensors`` in bf16.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Shape:
    """A Qwen2ForCausalLM shape."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    #: what it stands for (and which part of it is built), for the report
    label: str

    def config(self):
        from transformers import Qwen2Config

        cfg = Qwen2Config(
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            intermediate_size=self.intermediate,
            vocab_size=self.vocab,
            tie_word_embeddings=self.tied,
            max_position_embeddings=4096,
            rope_theta=1_000_000.0,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        cfg.architectures = ["Qwen2ForCausalLM"]
        return cfg


SHAPES = {
    "qwen0.5b": Shape("qwen0.5b", 896, 24, 14, 2, 4864, 151936, True, "Qwen2.5-0.5B shape (all 24 layers)"),
    # the full 28 layers would need 8 x 15 GB of checkpoints on disk; the width, vocabulary and untied head
    # (what dominates per-tensor memory) are the 7B model's
    "qwen7b-4l": Shape(
        "qwen7b-4l", 3584, 4, 28, 4, 18944, 152064, False, "Qwen2.5-7B width/vocab, 4 of 28 layers"
    ),
    # a 110M-parameter causal LM (GPT-2-small sized: 768 wide, 12 layers, 32k vocabulary) for the CPU figures
    "causal-110m": Shape("causal-110m", 768, 12, 12, 12, 2048, 32000, True, "110M causal (Qwen2 layout)"),
    "tiny": Shape("tiny", 32, 2, 4, 2, 64, 600, True, "tiny Qwen2 (CPU smoke test)"),
}


def tensor_shapes(shape: Shape) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes, from a model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape.config())
    out = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if shape.tied:
        out.pop("lm_head.weight", None)
    return out


def save_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "<unk>"] + [f"w{i}" for i in range(2, vocab)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
    )
    fast.save_pretrained(folder)


def ensure_family(
    shape: Shape, k: int, root: Path, device: torch.device, noise: float = 2e-3, dtype: str = "bfloat16"
) -> dict:
    """Build what is missing of ``root/<shape>-<dtype>/{base,expert1..k}``; {base, experts, build_s, bytes}.

    Expert ``i`` has its own seed, so a family of K experts is a prefix of a larger one (K=2/4/8 share files).
    """
    from safetensors.torch import load_file, save_file

    t0 = time.perf_counter()
    store = getattr(torch, dtype)
    folder = root.resolve() / f"{shape.name}-{dtype}"
    dirs = [folder / "base"] + [folder / f"expert{t}" for t in range(1, k + 1)]
    base: dict[str, torch.Tensor] | None = None
    for i, d in enumerate(dirs):
        if (d / "model.safetensors").is_file():
            continue
        if base is None and i > 0 and (dirs[0] / "model.safetensors").is_file():
            base = load_file(str(dirs[0] / "model.safetensors"), device=str(device))
        if base is None:
            gen = torch.Generator(device=device).manual_seed(0)
            base = {
                n: torch.ones(s, dtype=store, device=device)
                if n.endswith("norm.weight")
                else (torch.randn(s, generator=gen, device=device) * 0.02).to(store)
                for n, s in tensor_shapes(shape).items()
            }
        if i == 0:
            tensors = base
        else:
            gen = torch.Generator(device=device).manual_seed(1000 + i)
            tensors = {
                n: (w.float() + torch.randn(w.shape, generator=gen, device=device) * noise).to(store)
                for n, w in base.items()
            }
        d.mkdir(parents=True, exist_ok=True)
        shape.config().save_pretrained(d)
        save_tokenizer(d, shape.vocab)
        save_file({n: w.cpu().contiguous() for n, w in tensors.items()}, str(d / "model.safetensors.tmp"))
        (d / "model.safetensors.tmp").rename(d / "model.safetensors")
        del tensors
        print(f"    built {folder.name}/{d.name}", flush=True)
    del base
    return {
        "base": str(dirs[0]),
        "experts": [str(d) for d in dirs[1:]],
        "build_s": round(time.perf_counter() - t0, 1),
        "bytes": sum((d / "model.safetensors").stat().st_size for d in dirs),
        "shape": asdict(shape),
    }


def task_texts(vocab: int, n: int, words: int, task: int) -> list[str]:
    """``n`` prompts of ``words`` random vocabulary words (each task draws from its own band of the vocabulary)."""
    rng = random.Random(f"gpu-bench/{task}")
    lo = 2 + (task * 997) % max(1, vocab - 1000)
    hi = min(vocab - 1, lo + 5000)
    return [" ".join(f"w{rng.randint(lo, hi)}" for _ in range(words)) for _ in range(n)]
