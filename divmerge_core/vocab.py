"""Merging models with different vocabularies: mergekit's ``tokenizer_source`` and ``tokenizer:`` block.

:func:`build_vocabulary` builds the output tokenizer as mergekit 0.1.5 builds it:

* ``base``: the base model's tokenizer (the first model's without a base), without tokens whose id is at
  or beyond its config's ``vocab_size``;
* ``union``: that tokenizer, plus every other model's tokens it lacks (ordinary tokens first, in model
  order, then the added tokens, keeping their special flags);
* a model reference: that model's tokenizer;

then adds the tokens ``tokenizer.tokens`` names that it lacks. Each model gets a permutation: for each
output token id, the row of that token in the model's embeddings (-1 when the model lacks the token).

The vocabulary tensors (the architecture's input and output embeddings, weights and biases, found on a
model built from config.json on the meta device) are permuted when read (:meth:`Vocabulary.permute`), then
merged as any tensor. A model keeps its own row of each token it has; the row of a token it lacks is, as
in mergekit: the row ``tokens`` gives for it; else the token's only owner's row; else the base model's
row when the base has it; else the mean of the rows of the models that have it; zeros when none has it.
``force`` gives the configured row to every model. Rows past the vocabulary (``pad_to_multiple_of``) are
each model's mean row.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ModelTokenEmbedding, TokenizerSpec, ZeroEmbedding
from .errors import ConfigError, IncompatibleModelsError


def vocab_size_of(config: dict[str, Any]) -> int | None:
    """config.json's ``vocab_size`` (or its ``text_config``'s)."""
    if config.get("vocab_size") is not None:
        return int(config["vocab_size"])
    text = config.get("text_config")
    return int(text["vocab_size"]) if isinstance(text, dict) and text.get("vocab_size") else None


def vocab_tensor_names(folder: Path, label: str, tensor_names: list[str]) -> list[str]:
    """The checkpoint tensors indexed by token id along dim 0: the weights (and biases) of the model's
    input and output embeddings, by parameter name (tied aliases included), on a model built from
    ``folder``'s config.json on the meta device (never remote code)."""
    import transformers

    from .learned.reference import _no_init_weights

    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"), _no_init_weights():
            model = (
                cls._from_config(config)
                if cls is not None
                else transformers.AutoModel.from_config(config, trust_remote_code=False)
            )
        model.tie_weights()
        modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    except Exception as err:  # noqa: BLE001 - transformers raises many types for an unknown architecture
        raise ConfigError(
            f"cannot find the embedding tensors of {label} from its config.json ({err}); "
            "a tokenizer source needs a transformers architecture",
            field="tokenizer",
        ) from None
    ids = {
        id(p)
        for m in modules
        if m is not None
        for p in (getattr(m, "weight", None), getattr(m, "bias", None))
        if p is not None
    }
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids}
    found = [n for n in tensor_names if n in names]
    if not found:
        raise ConfigError(
            f"{label}: none of its tensors is an embedding of its architecture ({sorted(names)}); "
            "cannot apply a tokenizer source",
            field="tokenizer",
        )
    return found


def load_tokenizer(folder: Path, label: str) -> Any:
    """A model's fast tokenizer (never remote code); ConfigError naming the model when it has none."""
    from transformers import AutoTokenizer

    from .learned.reference import require_tokenizer

    require_tokenizer(folder, label)
    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - tokenizers fail with many types
        raise ConfigError(f"cannot load the tokenizer of {label}: {err}", field="tokenizer") from None


def _stripped(tok: Any, vocab_size: int | None, label: str) -> Any:
    """``tok`` without the tokens whose id is ``vocab_size`` or more (they have no embedding row)."""
    vocab = tok.get_vocab()
    if vocab_size is None or all(i < vocab_size for i in vocab.values()):
        return tok
    unused = {t for t, i in vocab.items() if i >= vocab_size}
    data = json.loads(tok.backend_tokenizer.to_str())
    kind = data["model"]["type"]
    if kind not in ("BPE", "WordLevel"):
        raise ConfigError(
            f"the tokenizer of {label} has {len(unused)} token(s) beyond its vocab_size {vocab_size} and is "
            f"of type {kind}: only BPE and WordLevel tokenizers can be stripped of them",
            field="tokenizer",
        )
    from tokenizers import Tokenizer

    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < vocab_size]
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if t not in unused}
    if kind == "BPE":
        data["model"]["merges"] = [
            m
            for m in data["model"]["merges"]
            if not (set(m.split(" ") if isinstance(m, str) else m) & unused)
        ]
    tok._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tok


def _union(base: Any, tokenizers: list[tuple[Any, int | None]]) -> Any:
    """The base tokenizer plus every other tokenizer's tokens it lacks (mergekit's union)."""
    from transformers import AutoTokenizer

    vocab: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, size in tokenizers:
        size = size if size is not None else tok.vocab_size
        decoder = tok.added_tokens_decoder
        contents = {info.content for info in decoder.values()}
        # in id order (mergekit takes get_vocab()'s order, a hash map's: not reproducible)
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < size and t not in contents:
                vocab.setdefault(t)
        for i, info in sorted(decoder.items()):
            if i < size:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as tmp:  # a copy, so that the base's tokenizer stays as it is
        base.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, use_fast=True, trust_remote_code=False)
    known = base.get_vocab()
    for t in vocab:
        if t not in added and t not in known:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass
class Vocabulary:
    """The output vocabulary and, per model, where each output token's row is."""

    #: The output tokenizer (saved with the merge).
    tokenizer: Any
    #: Checkpoint tensors indexed by token id along dim 0.
    names: list[str]
    #: Output tokens (ids 0 .. n_tokens-1) and the number of rows written (>= n_tokens with padding).
    n_tokens: int
    size: int
    #: model reference -> for each output token id, its row in that model (-1: the model lacks it).
    rows: dict[str, torch.Tensor]
    #: model reference -> its own tokenizer's vocabulary (token -> id), for ``model_token`` sources.
    vocabs: dict[str, dict[str, int]]
    #: output token id -> its ``tokenizer.tokens`` entry.
    tokens: dict[int, Any] = field(default_factory=dict)
    #: The base model's reference (its row is preferred for a token other models lack).
    base: str | None = None

    def permute(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each model's vocabulary tensor with rows in output token order (see the module's docstring).

        ``tensors``: model reference -> its tensor, for the models read for this tensor."""
        models = list(tensors)
        first = tensors[models[0]]
        shape, device = first.shape[1:], first.device
        dtype = first.dtype
        for t in tensors.values():
            dtype = torch.promote_types(dtype, t.dtype)
        if any(t.shape[1:] != shape for t in tensors.values()):
            raise IncompatibleModelsError(
                [
                    f"vocabulary tensor of shapes {[list(t.shape) for t in tensors.values()]}: only the first "
                    "dimension may differ"
                ]
            )
        n = self.n_tokens
        rows = torch.stack([self.rows[m] for m in models]).to(device)
        for m, r, t in zip(models, rows, tensors.values(), strict=True):
            if int(r.max()) >= t.shape[0]:
                raise IncompatibleModelsError(
                    [
                        f"model {m!r}: its tokenizer has token ids up to {int(r.max())} but its tensor has "
                        f"{t.shape[0]} rows"
                    ]
                )
        present = rows >= 0
        count = present.sum(0)
        forced = torch.zeros(n, dtype=torch.bool, device=device)
        configured = torch.zeros(n, dtype=torch.bool, device=device)
        for i, spec in self.tokens.items():
            configured[i] = True
            forced[i] = spec.force
        need = forced | ~present.all(0)  # tokens some model takes a default row for
        default = torch.zeros((n, *shape), dtype=dtype, device=device)
        auto = need & ~configured
        average = auto & (count >= 2)
        if self.base in tensors:
            b = models.index(self.base)
            from_base = average & present[b]
            average &= ~from_base
            ids = from_base.nonzero().squeeze(1)
            default[ids] = tensors[self.base][rows[b, ids]].to(dtype)
        for j, m in enumerate(models):
            only = (auto & (count == 1) & present[j]).nonzero().squeeze(1)
            default[only] = tensors[m][rows[j, only]].to(dtype)
            summed = (average & present[j]).nonzero().squeeze(1)
            default[summed] += tensors[m][rows[j, summed]].to(dtype)  # in model order, as mergekit
        ids = average.nonzero().squeeze(1)
        default[ids] /= count[ids].view(-1, *[1] * len(shape)).to(dtype)
        for i, spec in self.tokens.items():
            if bool(need[i]):
                default[i] = self._configured_row(i, spec, models, rows, tensors).to(dtype)
        out: dict[str, torch.Tensor] = {}
        for j, m in enumerate(models):
            own = present[j] & ~forced
            new = torch.zeros((self.size, *shape), dtype=dtype, device=device)
            new[:n] = default
            ids = own.nonzero().squeeze(1)
            new[ids] = tensors[m][rows[j, ids]].to(dtype)
            if self.size > n:  # padding rows: the model's mean row (mergekit, after Hewitt's vocab expansion)
                new[n:] = torch.mean(new[:n], dim=0)
            out[m] = new
        return out

    def _configured_row(
        self, i: int, spec: Any, models: list[str], rows: torch.Tensor, tensors: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        token = self.token_of(i)
        source = spec.source
        shape = next(iter(tensors.values())).shape[1:]
        if isinstance(source, ZeroEmbedding):
            return torch.zeros(shape)
        if source is None:
            raise ConfigError(
                f"token {token!r} is missing from some model and 'tokenizer.tokens' gives it no 'source'",
                field="tokenizer.tokens",
            )
        model = source.model if isinstance(source, ModelTokenEmbedding) else source
        if model not in tensors:
            raise ConfigError(
                f"token {token!r} takes its row from {model!r}, which is not read for this tensor",
                field="tokenizer.tokens",
            )
        t = tensors[model]
        if isinstance(source, ModelTokenEmbedding):
            row = source.token_id
            if row is None:
                if source.token not in self.vocabs[model]:
                    raise ConfigError(
                        f"token {token!r}: {model!r} has no token {source.token!r}", field="tokenizer.tokens"
                    )
                row = self.vocabs[model][source.token]
            if row >= t.shape[0]:
                raise ConfigError(
                    f"token {token!r}: token id {row} is out of range for {model!r} ({t.shape[0]} rows)",
                    field="tokenizer.tokens",
                )
            return t[row]
        row = int(rows[models.index(model), i])
        if row < 0:
            raise ConfigError(
                f"token {token!r} takes its row from {model!r}, which lacks that token",
                field="tokenizer.tokens",
            )
        return t[row]

    def token_of(self, i: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(i)


def build_vocabulary(
    spec: TokenizerSpec,
    models: list[tuple[str, Path, dict[str, Any]]],
    base: str | None,
    source: Path | None,
    names: list[str],
) -> Vocabulary:
    """The output tokenizer and each model's rows (see the module's docstring).

    ``models``: (reference, folder, config.json) of every model of the merge, the base (or the reference
    model) first; ``base``: the config's base model; ``source``: the folder of the tokenizer source when it is
    a model reference."""
    first_ref, first_folder, first_config = models[0]
    first_label = f"model {first_ref!r}"
    loaded: dict[str, Any] = {}
    for ref, folder, _ in models:
        if ref not in loaded:
            loaded[ref] = load_tokenizer(folder, f"model {ref!r}")
    loaded[first_ref] = _stripped(loaded[first_ref], vocab_size_of(first_config), first_label)
    sizes = {ref: vocab_size_of(cfg) for ref, _, cfg in models}
    if spec.source == "base":
        out = loaded[first_ref]
    elif spec.source == "union":
        out = _union(loaded[first_ref], [(loaded[r], sizes[r]) for r in loaded])
    else:
        assert source is not None
        out = load_tokenizer(source, f"tokenizer source {spec.source!r}")
    for token in spec.tokens or {}:
        if token not in out.get_vocab():
            out.add_tokens(token)
    vocab = out.get_vocab()
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise ConfigError(
            f"the output tokenizer's token ids are not 0..{n - 1} (gaps in its vocabulary)", field="tokenizer"
        )
    size = n
    if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
        size += spec.pad_to_multiple_of - size % spec.pad_to_multiple_of
    rows: dict[str, torch.Tensor] = {}
    for ref, _, _cfg in models:
        own = loaded[ref].get_vocab()
        limit = sizes[ref] if sizes[ref] is not None else len(own)
        r = torch.full((n,), -1, dtype=torch.long)
        for token, i in vocab.items():
            j = own.get(token)
            if j is not None and j < limit:
                r[i] = j
        rows[ref] = r
    tokens = {vocab[t]: s for t, s in (spec.tokens or {}).items()}
    return Vocabulary(
        tokenizer=out,
        names=names,
        n_tokens=n,
        size=size,
        rows=rows,
        vocabs={ref: tok.get_vocab() for ref, tok in loaded.items()},
        tokens=tokens,
        base=base,
    )
