"""mergekit's ``tokenizer_source`` / ``tokenizer:`` and ``chat_template``: models with different vocabularies.

Three tiny Llamas built in code: a base over the test vocabulary, and two 'fine-tunes' whose word-level
tokenizers reorder, drop and add tokens (ordinary and special). Each merge is compared with
``mergekit-yaml`` 0.1.5 on the same YAML (``tests/test_mergekit_compat.py``'s runner): the same output
vocabulary, every tensor equal to fp32 rounding (vocabulary tensors row by row through the tokens),
config.json's ``vocab_size`` and the chosen chat template.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from divmerge_core import parse_config, run_merge
from divmerge_core.errors import ConfigError, IncompatibleModelsError
from divmerge_core.pipeline import prepare

from .test_mergekit_compat import MERGEKIT_YAML, _mergekit, needs_mergekit
from .tiny import WORDS, make_llama, perturbed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECIALS = ["<|endoftext|>", "<unk>"]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
BASE_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
EXPERT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"

#: The experts' tokens: t1 reverses the words and adds two words and two special tokens; t2 drops
#: 'cat' and 'dog', adds 'kiwi' and 'apple' (a word t1 also adds) and one of t1's special tokens.
T1_WORDS = list(reversed(WORDS)) + ["apple", "pear"]
T1_ADDED = ["<|im_start|>", "<|im_end|>"]
T2_WORDS = [w for w in WORDS if w not in ("cat", "dog")] + ["kiwi", "apple"]
T2_ADDED = ["<|im_end|>"]


def word_tokenizer(words: list[str], added: list[str] = (), chat_template: str | None = None):
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    if added:
        tok.add_tokens([AddedToken(t, special=True) for t in added])
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


@torch.no_grad()
def with_vocabulary(model, base_vocab: dict[str, int], tok, seed: int):
    """``model`` with embeddings and head over ``tok``'s vocabulary: a shared token keeps its row (by
    token), a new one gets a random row."""
    vocab = tok.get_vocab()
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(100 + seed)
    emb, head = torch.randn(len(vocab), hidden, generator=gen), torch.randn(len(vocab), hidden, generator=gen)
    old_emb, old_head = model.model.embed_tokens.weight, model.lm_head.weight
    for t, i in vocab.items():
        if t in base_vocab:
            emb[i], head[i] = old_emb[base_vocab[t]], old_head[base_vocab[t]]
    model.model.embed_tokens = torch.nn.Embedding(len(vocab), hidden)
    model.model.embed_tokens.weight.copy_(emb)
    model.lm_head = torch.nn.Linear(hidden, len(vocab), bias=False)
    model.lm_head.weight.copy_(head)
    model.config.vocab_size = len(vocab)
    return model


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    base = make_llama(seed=0)
    base_tok = word_tokenizer(WORDS, chat_template=BASE_TEMPLATE)
    out = {"base": root / "base"}
    base.save_pretrained(out["base"])
    base_tok.save_pretrained(out["base"])
    for i, (words, added) in enumerate(((T1_WORDS, T1_ADDED), (T2_WORDS, T2_ADDED)), start=1):
        tok = word_tokenizer(words, added, chat_template=EXPERT_TEMPLATE)
        model = with_vocabulary(perturbed(base, scale=0.3, seed=i), base_tok.get_vocab(), tok, seed=i)
        out[f"t{i}"] = root / f"t{i}"
        model.save_pretrained(out[f"t{i}"])
        tok.save_pretrained(out[f"t{i}"])
    return out


def merge_config(fam: dict[str, Path], method: str = "task_arithmetic", **extra) -> dict:
    cfg = {
        "merge_method": method,
        "base_model": str(fam["base"]),
        "models": [
            {"model": str(fam["t1"]), "parameters": {"weight": 0.7}},
            {"model": str(fam["t2"]), "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }
    return {**cfg, **copy.deepcopy(extra)}


def _fill(value, fam: dict[str, Path]):
    names = {"BASE": str(fam["base"]), "T1": str(fam["t1"]), "T2": str(fam["t2"])}
    if isinstance(value, dict):
        return {k: _fill(v, fam) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, fam) for v in value]
    return names.get(value, value) if isinstance(value, str) else value


def compare(ours: Path, theirs: Path, same_ids: bool = True) -> float:
    """Our output against mergekit's: the same tokens (and ids when ``same_ids``), every tensor equal to
    fp32 rounding (vocabulary tensors row by row, matched through the tokens). Returns the max abs diff."""
    vo = AutoTokenizer.from_pretrained(ours).get_vocab()
    vt = AutoTokenizer.from_pretrained(theirs).get_vocab()
    assert vo.keys() == vt.keys()
    if same_ids:
        assert vo == vt
    a, b = load_file(ours / "model.safetensors"), {}
    for f in sorted(theirs.glob("*.safetensors")):
        b.update(load_file(f))
    assert set(a) == set(b)
    worst = 0.0
    order = torch.tensor([vt[t] for t, _ in sorted(vo.items(), key=lambda kv: kv[1])])
    for name in a:
        x, y = a[name], b[name]
        if name in VOCAB_TENSORS:
            assert x.shape == y.shape, name
            y = torch.cat([y[order], y[len(order) :]])  # mergekit's rows in our token order, padding as is
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
        worst = max(worst, float((x - y).abs().max()))
    for out in (ours, theirs):
        assert json.loads((out / "config.json").read_text())["vocab_size"] == a[VOCAB_TENSORS[0]].shape[0]
    return worst


def run_both(cfg: dict, tmp_path: Path) -> tuple[Path, Path]:
    run_merge(parse_config(cfg), tmp_path / "ours", device="cpu")
    _mergekit(cfg, tmp_path)
    return tmp_path / "ours", tmp_path / "mergekit-out"


LITERAL_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"

#: name -> (config additions, whether mergekit's token ids are reproducible, our output chat template).
CASES = {
    "base_chatml": ({"tokenizer_source": "base", "chat_template": "chatml"}, True, None),
    # mergekit orders the union's new tokens by hash order: the same tokens, the ids may differ
    "union_auto_template": ({"tokenizer_source": "union", "chat_template": "auto"}, False, EXPERT_TEMPLATE),
    "union_ties": (
        {"tokenizer_source": "union", "merge_method": "ties", "parameters": {"density": 0.5}},
        False,
        BASE_TEMPLATE,
    ),
    "model_t2_linear_no_base": (
        {"tokenizer_source": "T2", "merge_method": "linear", "base_model": None},
        True,
        EXPERT_TEMPLATE,
    ),
    "block_model_tokens_padded_literal_template": (
        {
            "tokenizer": {
                "source": "T1",
                "tokens": {  # in sorted order: the order the YAML written for mergekit has
                    "<|im_end|>": {"source": "T2", "force": True},
                    "<|new|>": {"source": {"kind": "zero"}},
                    "cat": {"source": {"kind": "model_token", "model": "BASE", "token_id": 3}},
                    "kiwi": {"source": {"kind": "model_token", "model": "T2", "token": "apple"}},
                },
                "pad_to_multiple_of": 16,
            },
            "chat_template": LITERAL_TEMPLATE,
        },
        True,
        LITERAL_TEMPLATE,
    ),
}


@needs_mergekit
@pytest.mark.parametrize("case", list(CASES))
def test_tokenizer_sources_give_mergekits_vocabulary_tensors_and_template(vocab_family, tmp_path, case):
    extra, same_ids, template = CASES[case]
    cfg = _fill(merge_config(vocab_family, **extra), vocab_family)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    ours, theirs = run_both(cfg, tmp_path)
    worst = compare(ours, theirs, same_ids)
    print(f"{case}: max abs diff vs mergekit {worst:.3g}")
    tok = AutoTokenizer.from_pretrained(ours)
    vocab = tok.get_vocab()
    if template is not None:  # chosen as mergekit chooses it ('auto': the two experts' against the base's)
        assert tok.chat_template == template == AutoTokenizer.from_pretrained(theirs).chat_template
    if case.startswith("union"):
        # the base's ids first, then the experts' new words in model order, then the added tokens
        new = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])][len(SPECIALS) + len(WORDS) :]
        assert new == ["apple", "pear", "kiwi", "<|im_start|>", "<|im_end|>"]
    elif case.startswith("base"):
        assert vocab == word_tokenizer(WORDS).get_vocab()
        assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
            AutoTokenizer.from_pretrained(theirs).apply_chat_template(
                [{"role": "user", "content": "hi"}], tokenize=False
            )
        )  # our own chatml renders as mergekit's bundled one
    elif case.startswith("model_t2"):
        assert vocab == word_tokenizer(T2_WORDS, T2_ADDED).get_vocab()
    else:
        assert {"<|new|>", "kiwi"} <= vocab.keys()
        assert len(load_file(ours / "model.safetensors")["lm_head.weight"]) == 64  # 59 tokens padded to 16


def test_rows_of_missing_tokens_are_filled_as_mergekit_fills_them(vocab_family, tmp_path):
    """The filled rows, directly: a linear merge weighting only the base (no base_model) outputs the base's
    permuted rows: a token it lacks takes its only owner's row, or the mean of its owners' rows (and the
    merge equals mergekit's, when its venv is there)."""
    fam = vocab_family
    models = [("t1", 0.0), ("t2", 0.0), ("base", 1.0)]
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(fam[k]), "parameters": {"weight": w}} for k, w in models],
        "parameters": {"normalize": False},
        "tokenizer_source": "union",
        "dtype": "float32",
    }
    run_merge(parse_config(cfg), tmp_path / "ours", device="cpu")
    ours = tmp_path / "ours"
    if MERGEKIT_YAML.exists():
        _mergekit(cfg, tmp_path)
        compare(ours, tmp_path / "mergekit-out", same_ids=False)
    vocab = AutoTokenizer.from_pretrained(ours).get_vocab()
    out = load_file(ours / "model.safetensors")["model.embed_tokens.weight"]
    inputs = {
        k: (
            word_tokenizer(*w).get_vocab(),
            load_file(fam[k] / "model.safetensors")["model.embed_tokens.weight"],
        )
        for k, w in (("base", (WORDS,)), ("t1", (T1_WORDS, T1_ADDED)), ("t2", (T2_WORDS, T2_ADDED)))
    }

    def row(model: str, token: str) -> torch.Tensor:
        v, t = inputs[model]
        return t[v[token]]

    assert torch.equal(out[vocab["cat"]], row("base", "cat"))  # its own row
    assert torch.equal(out[vocab["pear"]], row("t1", "pear"))  # only t1 has it
    assert torch.equal(out[vocab["kiwi"]], row("t2", "kiwi"))  # only t2 has it
    for token in ("apple", "<|im_end|>"):  # both experts have it: their mean
        assert torch.equal(out[vocab[token]], (row("t1", token) + row("t2", token)) / 2)


def test_chat_template_without_a_tokenizer_source_resaves_the_base_tokenizer(tmp_path):
    from .tiny import save

    base = save(make_llama(seed=0), tmp_path / "base")
    t1 = save(perturbed(make_llama(seed=0), seed=1), tmp_path / "t1")
    cfg = parse_config(
        {
            "merge_method": "linear",
            "models": [{"model": str(base)}, {"model": str(t1)}],
            "chat_template": "chatml",
        }
    )
    run_merge(cfg, tmp_path / "out", device="cpu")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_llama3_template_renders_the_llama3_format():
    """Our own llama3 template: BOS, then header, content (trimmed) and <|eot_id|> per message, with no
    text between turns (mergekit's bundled llama3.jinja also puts a newline after each turn)."""
    from divmerge_core.chat_templates import LLAMA3

    tok = word_tokenizer(WORDS, chat_template=LLAMA3)
    text = tok.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": " hi "}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == (
        "<|endoftext|><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_a_vocabulary_mismatch_without_a_tokenizer_source_is_an_error_naming_the_models(vocab_family):
    cfg = parse_config(merge_config(vocab_family))
    with pytest.raises(IncompatibleModelsError) as err:
        prepare(cfg)
    text = str(err.value)
    assert f"model {str(vocab_family['t1'])!r} has vocab_size {len(T1_WORDS) + 4}" in text
    assert f"base model {str(vocab_family['base'])!r}" in text
    assert "tokenizer_source" in text


@pytest.mark.parametrize("method", ["divmerge", "adamerging"])
def test_learned_methods_refuse_a_tokenizer_source(method):
    cfg = {
        "merge_method": method,
        "base_model": "/m/base",
        "models": [{"model": "/m/t1", "data": {"texts": ["a b"]}}],
        "tokenizer_source": "union",
    }
    with pytest.raises(
        ConfigError, match=f"'tokenizer_source' is not supported with merge_method '{method}'"
    ) as err:
        parse_config(cfg)
    assert err.value.field == "tokenizer_source"
    block = {k: v for k, v in cfg.items() if k != "tokenizer_source"} | {"tokenizer": {"source": "base"}}
    with pytest.raises(ConfigError, match="'tokenizer' is not supported") as err:
        parse_config(block)
    assert err.value.field == "tokenizer"


@pytest.mark.parametrize(
    ("extra", "message", "field"),
    [
        ({"tokenizer_source": "base", "tokenizer": {"source": "base"}}, "not both", "tokenizer"),
        ({"tokenizer_source": "no such thing!"}, "'base', 'union' or a model reference", "tokenizer_source"),
        (
            {"tokenizer": {"tokens": {"x": {"source": "/m/other"}}}},
            "not a model of the merge",
            "tokenizer.tokens.x.source",
        ),
        (
            {"tokenizer": {"tokens": {"x": {"source": {"kind": "model_token", "model": "/m/t1"}}}}},
            "exactly one of 'token' or 'token_id'",
            "tokenizer.tokens.x.source.model_token",
        ),
        ({"chat_template": "mistral"}, "mergekit's bundled templates", "chat_template"),
        ({"chat_template": "vicuna"}, "unknown chat template name", "chat_template"),
        ({"chat_template": "{% for m in messages %}{{ m }"}, "does not parse", "chat_template"),
        ({"chat_template": "{{ x }}"}, "is not a chat template", "chat_template"),
    ],
)
def test_tokenizer_fields_are_checked(extra, message, field):
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": "/m/base",
        "models": [{"model": "/m/t1"}],
        **extra,
    }
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(cfg)
    assert err.value.field == field


def test_model_prefix_and_dump_round_trip():
    cfg = parse_config(
        {
            "merge_method": "task_arithmetic",
            "base_model": "/m/base",
            "models": [{"model": "/m/t1"}],
            "tokenizer": {
                "source": "model:/m/t1",
                "tokens": {"<x>": {"source": {"kind": "zero"}, "force": True}},
            },
            "chat_template": "auto",
        }
    )
    assert cfg.tokenizer_spec.source == "/m/t1"
    import yaml

    assert parse_config(yaml.safe_load(cfg.to_yaml())) == cfg


def test_vocabulary_tensors_come_from_the_architecture(vocab_family, tmp_path):
    """Input and output embeddings, by the model's parameter names: Llama's untied pair; GPT-2's one tied
    tensor (its head is not in the checkpoint); never the position embeddings."""
    from divmerge_core.vocab import vocab_tensor_names

    from .tiny import make_gpt2, save

    names = list(load_file(vocab_family["base"] / "model.safetensors"))
    assert set(vocab_tensor_names(vocab_family["base"], "base", names)) == set(VOCAB_TENSORS)
    gpt2 = save(make_gpt2(seed=0), tmp_path / "gpt2")
    names = list(load_file(gpt2 / "model.safetensors"))
    assert vocab_tensor_names(gpt2, "gpt2", names) == ["transformer.wte.weight"]
