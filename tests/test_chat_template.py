"""Qwen3's chat template rendered by koifish: hand-written expectations and transformers' apply_chat_template."""

import json

import pytest

from koifish_core.errors import ModelError
from koifish_core.infer.chat_template import ChatTemplate, load_chat_template
from tests.qwen3_fixtures import QWEN3_CHAT_TEMPLATE, QWEN3_TOKENIZER_CONFIG


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(QWEN3_TOKENIZER_CONFIG))
    return tmp_path


@pytest.fixture
def template(folder):
    return load_chat_template(folder)


SYSTEM_USER = [{"role": "system", "content": "You are Koi."}, {"role": "user", "content": "Hi"}]
MULTI_TURN = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
    {"role": "user", "content": "And 3+3?"},
]


def test_system_and_user_with_generation_prompt(template):
    assert template.render(SYSTEM_USER) == ("<|im_start|>system\nYou are Koi.<|im_end|>\n"
                                            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert template.render(SYSTEM_USER, add_generation_prompt=False).endswith("Hi<|im_end|>\n")


def test_thinking_off_opens_the_reply_with_an_empty_think_block(template):
    assert template.render(SYSTEM_USER, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_earlier_turns_lose_their_thinking(template):
    assert template.render(MULTI_TURN) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n")


def test_the_reply_after_the_last_question_keeps_its_thinking(template):
    turns = MULTI_TURN + [{"role": "assistant", "content": "<think>\nsix\n</think>\n\n6"}]
    assert template.render(turns, add_generation_prompt=False).endswith(
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n<think>\nsix\n</think>\n\n6<|im_end|>\n")


def _hf_tokenizer(folder):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"x": 0}, unk_token="x")))
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("case", ["system_user", "multi_turn", "tools", "continued"])
def test_equals_transformers_apply_chat_template(folder, template, case, thinking):
    tools = None
    messages = {"system_user": SYSTEM_USER, "multi_turn": MULTI_TURN, "continued": MULTI_TURN[:2]}.get(case)
    if case == "tools":
        tools = [{"type": "function", "function": {"name": "weather", "description": "Wetter für eine Stadt",
                                                   "parameters": {"type": "object",
                                                                  "properties": {"city": {"type": "string"}}}}}]
        messages = SYSTEM_USER + [
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "weather", "arguments": {"city": "Zürich"}}}]},
            {"role": "tool", "content": "12°C"}, {"role": "tool", "content": "rain"}]
    gen = case != "continued"
    expected = _hf_tokenizer(folder).apply_chat_template(messages, tools=tools, tokenize=False,
                                                         add_generation_prompt=gen, enable_thinking=thinking)
    assert template.render(messages, add_generation_prompt=gen, enable_thinking=thinking, tools=tools) == expected


def test_chat_template_jinja_file_wins_and_errors_name_the_file(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}!")
    assert load_chat_template(tmp_path).render([{"role": "user", "content": "x"}]) == "x!"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no chat template"):
        load_chat_template(empty)
    with pytest.raises(ModelError, match="chat_template line 1"):
        ChatTemplate("{% if %}", "t.json")
    with pytest.raises(ModelError, match="chat_template failed: no system"):
        ChatTemplate("{{ raise_exception('no system') }}", "t.json").render([])
