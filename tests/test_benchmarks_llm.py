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
    LLM_RECIPES,
    LlmRecipe,
    answer_loss,
    eval_set,
    for_device,
    instruction,
    prompt_ids,
)
from benchmarks.quality.methods import LLM_ROWS, method_specs
from divmerge_core.config import parse_config
from divmerge_core.evaluation.scoring import match_answer
from divmerge_core.learned.data import TaskInputs
from divmerge_core.learned.encoding import ChatFormat, encode
from divmerge_core.learned.reference import CAUSAL
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


def test_answers_are_matched_by_the_engine_rule() -> None:
    """The track scores through the engine: each label's answer word, the earliest whole word wins."""
    tok = chat_tokenizer()
    examples = [Example("x", None, 1), Example("y", None, 0)]
    es = eval_set("sst2", 0, examples, LlmRecipe(), tok)
    assert es.answers == {"0": ["negative"], "1": ["positive"]} and es.gold == ["1", "0"]
    assert es.spec.chat_template and es.spec.system_prompt == LlmRecipe().system_prompt
    assert match_answer("Positive.", es.answers) == "1"
    assert match_answer("The review is negative, not positive", es.answers) == "0"
    cola = eval_set("cola", 0, examples, LlmRecipe(), tok).answers
    assert match_answer("unacceptable", cola) == "0" and match_answer("acceptable", cola) == "1"
    assert match_answer("maybe", cola) is None


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


def test_jobs_splits_the_experts_and_the_items_of_one_command(tmp_path) -> None:
    """``--jobs N``: every mode has its expert recipe, the experts are split into N groups of tasks, and the
    shard commands drop ``--jobs`` (in both spellings) but keep every other argument."""
    import argparse

    from benchmarks.quality.llm import LLM_RECIPES
    from benchmarks.quality.run import LLM_MODES, _is_jobs_arg, _zoo_commands

    assert set(LLM_MODES) <= set(LLM_RECIPES)
    argv = ["--track", "llm", "--jobs", "2", "--mode", "cpu", "--jobs=3", "--note", "n"]
    assert [a for i, a in enumerate(argv) if not _is_jobs_arg(argv, i)] == [
        "--track", "llm", "--mode", "cpu", "--note", "n"
    ]  # fmt: skip
    args = argparse.Namespace(
        track="llm", mode="cpu", tasks=None, jobs=2, data=tmp_path, cache=tmp_path, device="cpu", threads=1,
        gguf=None,
    )  # fmt: skip
    groups = [c[c.index("--tasks") + 1 :] for c in _zoo_commands(args)]
    assert sorted(t for g in groups for t in g) == sorted(LLM_MODES["cpu"].tasks) and len(groups) == 2
    assert _zoo_commands(argparse.Namespace(**{**vars(args), "track": "cls"})) == []


def test_the_track_scores_a_folder_through_the_engine(tmp_path) -> None:
    """eval_set + Scorer.for_folder, as LlmTrack.evaluate runs them, on a tiny chat model."""
    import torch

    from divmerge_core.evaluation.scoring import Scorer
    from tests.tiny import make_gpt2, save

    folder = save(make_gpt2(seed=3), tmp_path / "m")
    chat_tokenizer().save_pretrained(folder)
    scorer = Scorer.for_folder(folder, torch.device("cpu"), max_length=1024)
    examples = [Example("good film", None, 1), Example("bad film", None, 0), Example("dog", None, 1)]
    es = eval_set("sst2", 0, examples, LlmRecipe(system_prompt="yes"), scorer.tokenizer)
    scores = scorer.score(es, lambda: None)
    assert scores.n == 3 and len(scores.correct) == len(scores.unparsed) == 3
    # the tiny vocabulary has neither answer word: every answer is unparsed, hence wrong
    assert scores.unparsed == [True] * 3 and scores.correct == [False] * 3


def test_bf16_autocast_only_where_the_cpu_runs_it_natively(monkeypatch) -> None:
    """Emulated CPU bf16 is 13-17x slower than fp32: the recipe falls back to fp32, under its own cache key."""
    recipe = LLM_RECIPES["cpu"]
    assert recipe.bf16
    cpu = torch.device("cpu")
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False)  # a CPU without native bf16 (hardware probe)
    plain = for_device(recipe, cpu, log=lambda _: None)
    assert not plain.bf16 and plain.key("base") != recipe.key("base")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert for_device(recipe, cpu, log=lambda _: None) == recipe
    assert for_device(LLM_RECIPES["quick"], cpu, log=lambda _: None) == LLM_RECIPES["quick"]
