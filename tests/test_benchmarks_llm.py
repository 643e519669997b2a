"""The llm track's pieces on tiny inputs: instruction framing, answer parsing, the answer-only loss, the
engine-identical chat encoding, and the per-granularity merge-input budget of its modes."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.quality.data import Example
from benchmarks.quality.harness import merge_config, run_key
from benchmarks.quality.llm import (
    ANSWERS,
    INSTRUCTIONS,
    LlmRecipe,
    answer_loss,
    correctness,
    instruction,
    parse_answer,
    prompt_ids,
)
from benchmarks.quality.methods import LLM_ROWS, method_specs
from divmerge_core.config import parse_config
from divmerge_core.data import TaskInputs
from divmerge_core.teachers import CAUSAL, ChatFormat, encode
from tests.tiny import CHAT_TEMPLATE, make_tokenizer


def chat_tokenizer():
    tok = make_tokenizer("gpt2")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_every_task_has_an_instruction_and_distinct_answer_words() -> None:
    assert INSTRUCTIONS.keys() == ANSWERS.keys()
    for task, words in ANSWERS.items():
        assert len(set(words)) == len(words) and all(w.isalpha() and w.islower() for w in words)
        for w in words:  # the instruction names every answer word
            assert w in INSTRUCTIONS[task]


def test_instruction_clips_each_text() -> None:
    ex = Example("one two three four", "five six", 0)
    text = instruction("qnli", ex, 3)
    assert text.startswith("Question: one two three ...\nSentence: five six\n")
    assert instruction("sst2", Example("good film", None, 1), 3).startswith("Review: good film\n")


def test_parse_answer_takes_the_first_word_only() -> None:
    assert parse_answer("sst2", "Positive.") == 1
    assert parse_answer("sst2", " negative, clearly") == 0
    assert parse_answer("cola", "unacceptable") == 0 and parse_answer("cola", "acceptable") == 1
    assert parse_answer("mnli", "contradiction") == 2
    assert parse_answer("qnli", "No") == 1 and parse_answer("mrpc", "No") == 0
    for bad in ("", "The review is positive", "entail", "maybe yes"):
        assert parse_answer("mnli" if bad == "entail" else "sst2", bad) is None
    examples = [Example("x", None, 1), Example("y", None, 0), Example("z", None, 0)]
    assert correctness(["positive", "The answer is negative", "negative"], "sst2", examples) == [
        True,
        False,
        True,
    ]


def test_prompts_match_the_engine_encoding_of_the_merge_inputs() -> None:
    """Experts are trained and evaluated on exactly what the engine feeds teachers and merged model."""
    tok = chat_tokenizer()
    recipe = LlmRecipe(system_prompt="be up")
    texts = ["cat dog", "red blue up"]
    spec = parse_config(
        {
            "merge_method": "divmerge",
            "base_model": "./b",
            "models": [
                {"model": "./m", "data": {"texts": texts, "chat_template": True, "system_prompt": "be up"}}
            ],
        }
    ).models[0]
    chat = ChatFormat(spec.data.system_prompt)
    engine = encode(CAUSAL, tok, TaskInputs(texts, "inline"), 0, 256, 4, {}, chat)
    assert [e.fields["input_ids"] for e in engine] == [prompt_ids(tok, t, recipe) for t in texts]


def test_answer_loss_scores_only_the_answer_tokens() -> None:
    tok = make_tokenizer("gpt2")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    seqs = [([5, 6, 7, 8, 9], 3), ([10, 11, 12], 1)]  # (ids, prompt length)
    got = answer_loss(model, seqs, tok.pad_token_id, torch.device("cpu"))
    # reference: the model's own loss with the prompt (and the padding) masked out
    n = 5
    ids = torch.tensor([seqs[0][0], seqs[1][0] + [tok.pad_token_id] * 2])
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, :1] = -100
    labels[1, 3:] = -100
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert ids.shape[1] == n and torch.allclose(got, ref, atol=1e-5)


def test_llm_modes_give_layer_level_rows_their_own_budget() -> None:
    from benchmarks.quality.run import LLM_MODES, report_stem

    paper = LLM_MODES["paper"]
    rows = {s.name: s for s in method_specs(paper.learned) if s.name in LLM_ROWS}
    assert set(rows) == set(LLM_ROWS)
    assert paper.samples_for(rows["divmerge_task_js"]) == 200
    assert paper.samples_for(rows["divmerge_layer_js"]) == paper.samples_for(rows["adamerging_layer"]) == 400
    assert paper.learned["epochs"] == 4

    class Track:
        name, base = "t", "/base"
        experts = {"sst2": "/e/sst2", "qqp": "/e/qqp"}

        def data_spec(self, task, num_samples, own_labels=False):
            return {"texts": ["x"], "num_samples": num_samples, "chat_template": True}

        def fingerprint(self):
            return "t"

    cfg = merge_config(Track(), rows["divmerge_layer_js"], ("sst2", "qqp"), paper)
    assert [m["data"]["num_samples"] for m in cfg["models"]] == [400, 400]
    cpu = LLM_MODES["cpu"]
    assert run_key(Track(), cpu) != run_key(Track(), paper)
    assert report_stem("llm", "cpu") == "quality_llm" and report_stem("llm", "paper") == "quality_llm_paper"
