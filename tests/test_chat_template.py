"""``data.chat_template``: inputs wrapped as the user turn of the tokenizer's chat template (causal LMs)."""

from __future__ import annotations

import pytest
import torch

from divmerge_core.config import parse_config
from divmerge_core.errors import ConfigError
from divmerge_core.learned import learn_coefficients
from divmerge_core.learned.data import TaskInputs
from divmerge_core.learned.encoding import ChatFormat, encode
from divmerge_core.learned.reference import CAUSAL, CLASSIFICATION, load_tokenizer
from divmerge_core.learned.teachers import continue_prompts, teacher_logp
from divmerge_core.progress import Reporter
from tests.test_learned import make_plan
from tests.tiny import CHAT_TEMPLATE, make_gpt2, make_tokenizer, perturbed, save

CPU = torch.device("cpu")
TEXTS = ["cat dog up", "red blue", "1 2 3 4", "yes no yes", "x y z"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def chat_tokenizer():
    tok = make_tokenizer("gpt2")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
    """A tiny GPT-2 base whose saved tokenizer has a chat template, and two perturbed experts."""
    root = tmp_path_factory.mktemp("chat")
    base = make_gpt2(seed=0)
    folders = [save(base, root / "base")] + [
        save(perturbed(base, 0.3, seed=s), root / f"expert{s}") for s in (1, 2)
    ]
    for folder in folders:
        chat_tokenizer().save_pretrained(folder)
    data = [{"texts": TEXTS[:3], "chat_template": True}, {"texts": TEXTS[2:], "chat_template": True}]
    return folders[0], folders[1:], data


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_encode_wraps_each_input_in_the_template_with_the_generation_prompt():
    tok = chat_tokenizer()
    config = {"n_positions": 64}
    plain = encode(CAUSAL, tok, TaskInputs(TEXTS, "inline"), 0, 32, 4, config)
    chat = encode(CAUSAL, tok, TaskInputs(TEXTS, "inline"), 0, 32, 4, config, ChatFormat())
    system = encode(CAUSAL, tok, TaskInputs(TEXTS, "inline"), 0, 32, 4, config, ChatFormat("be up"))
    for text, p, c, s in zip(TEXTS, plain, chat, system, strict=True):
        assert p.fields["input_ids"] == ids_of(tok, text)
        assert c.fields["input_ids"] == ids_of(tok, f"u {text} . a")
        assert s.fields["input_ids"] == ids_of(tok, f"s be up . u {text} . a")
        assert (c.start, c.stop) == (0, len(c.fields["input_ids"]))


def test_pairs_are_joined_into_one_user_turn():
    tok = chat_tokenizer()
    (e,) = encode(CAUSAL, tok, TaskInputs([("cat dog", "red")], "inline"), 0, 32, 4, {}, ChatFormat())
    assert e.fields["input_ids"] == ids_of(tok, "u cat dog red . a")


def test_a_long_input_is_cut_but_the_template_and_generation_prompt_are_kept():
    tok = chat_tokenizer()
    text = " ".join(["cat"] * 40)
    (e,) = encode(CAUSAL, tok, TaskInputs([text], "inline"), 0, 12, 4, {}, ChatFormat())
    assert e.fields["input_ids"] == ids_of(tok, "u " + " ".join(["cat"] * 9) + " . a")
    # max_length is capped by the model's positions minus max_new_tokens: 16 - 4 = 12 here too
    (f,) = encode(CAUSAL, tok, TaskInputs([text], "inline"), 0, 100, 4, {"n_positions": 16}, ChatFormat())
    assert f.fields == e.fields
    with pytest.raises(ConfigError, match="chat template alone") as err:
        encode(CAUSAL, tok, TaskInputs([text], "inline"), 0, 3, 4, {}, ChatFormat())
    assert err.value.field == "parameters.max_length"


def test_teacher_continues_the_templated_prompt():
    """The teacher generates after the generation prompt; the student is scored on that same sequence."""
    tok = chat_tokenizer()
    module = make_gpt2(seed=3)
    examples = encode(CAUSAL, tok, TaskInputs(TEXTS, "inline"), 0, 32, 4, {"n_positions": 64}, ChatFormat())
    continue_prompts(module, tok, examples, batch_size=2, max_new_tokens=4, device=CPU)
    for text, e in zip(TEXTS, examples, strict=True):
        prompt = ids_of(tok, f"u {text} . a")
        assert e.fields["input_ids"][: len(prompt)] == prompt and e.start == len(prompt) - 1
        target = teacher_logp(module, CAUSAL, tok, [e], CPU)
        assert target.argmax(-1).tolist() == e.fields["input_ids"][len(prompt) :]


def test_learned_merge_uses_the_template(chat_setup):
    base, experts, data = chat_setup
    kw = dict(granularity="layer", epochs=2, batch_size_per_task=2, lr=0.05, max_new_tokens=3)
    chat = learn_coefficients(make_plan(base, experts, data, **kw), device=CPU, reporter=Reporter())
    plain_data = [{"texts": d["texts"]} for d in data]
    plain = learn_coefficients(make_plan(base, experts, plain_data, **kw), device=CPU, reporter=Reporter())
    system_data = [{**d, "system_prompt": "be up"} for d in data]
    system = learn_coefficients(make_plan(base, experts, system_data, **kw), device=CPU, reporter=Reporter())
    assert chat.losses != plain.losses and system.losses != chat.losses


def test_tokenizer_without_a_template_names_the_field(chat_setup, tmp_path):
    base, experts, data = chat_setup
    bare = save(make_gpt2(seed=0), tmp_path / "bare")  # the plain tiny tokenizer has no chat template
    plan = make_plan(bare, experts, data, epochs=1, max_new_tokens=2)
    with pytest.raises(ConfigError, match="no chat template") as err:
        learn_coefficients(plan, device=CPU, reporter=Reporter())
    assert err.value.field == "models.0.data.chat_template"


def test_chat_template_refused_for_classification():
    tok = chat_tokenizer()
    with pytest.raises(ConfigError, match="causal LMs only") as err:
        encode(
            CLASSIFICATION, tok, TaskInputs(TEXTS, "inline"), 0, 16, 4, {}, ChatFormat(field="models.1.data")
        )
    assert err.value.field == "models.1.data"


def test_system_prompt_needs_chat_template():
    spec = {"merge_method": "divmerge", "base_model": "./b", "models": [{"model": "./m"}]}
    spec["models"][0]["data"] = {"texts": ["x"], "system_prompt": "be brief"}
    with pytest.raises(ConfigError, match="'system_prompt' needs 'chat_template: true'"):
        parse_config(spec)
    spec["models"][0]["data"]["chat_template"] = True
    assert parse_config(spec).models[0].data.system_prompt == "be brief"


def test_saved_tokenizer_keeps_the_template(chat_setup):
    """The expert folders carry the template through save/load, as a real instruct model's do."""
    base, _, _ = chat_setup
    assert load_tokenizer(base).chat_template == CHAT_TEMPLATE
