"""The chat engine on a tiny Qwen3 chat folder: replies equal transformers' generate on the same conversation."""

import json

import numpy as np
import pytest

from koifish_core.errors import KoifishError, ModelError
from koifish_core.infer.chat_open import open_chat
from koifish_core.infer.sampling import SamplingParams
from tests.cuda_harness import ON_GPU
from tests.qwen3_fixtures import QWEN3_CHAT_TEMPLATE, tiny_chat_folder

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    return tiny_chat_folder(tmp_path_factory.mktemp("chat") / "Qwen3-Tiny")


def _greedy_session(folder, **kw):
    session = open_chat(folder, temperature=0.0, max_new_tokens=kw.pop("max_new_tokens", 16), **kw)
    assert session.options.sampling.temperature == 0.0
    return session


def _hf_reply(model, hf_tok, messages, think=True, n=16):
    """transformers end to end: its chat template rendering, its tokenizer, its greedy generate."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=hf_tok)
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=think)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stop = [hf_tok.token_to_id("<|im_end|>"), hf_tok.token_to_id("<|endoftext|>")]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=stop,
                             pad_token_id=stop[1])
    new = out[0, len(ids):].tolist()
    new = new[:next((i for i, t in enumerate(new) if t in stop), len(new))]
    return tok.decode(new), len(ids)


def test_two_turns_equal_transformers_and_reuse_the_cache(chat_folder):
    folder, model, hf_tok = chat_folder
    session = _greedy_session(folder)
    pieces = []
    first = session.ask("Hello there!", on_text=pieces.append)
    expected, prompt_len = _hf_reply(model, hf_tok, [{"role": "user", "content": "Hello there!"}])
    assert first.text == expected and "".join(pieces) == expected
    assert first.prompt_tokens == prompt_len and first.tokens > 0 and first.tokens_per_s > 0

    second = session.ask("How are you today?")
    history = [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": first.text},
               {"role": "user", "content": "How are you today?"}]
    expected2, prompt_len2 = _hf_reply(model, hf_tok, history)
    assert second.text == expected2
    assert 0 < second.prompt_tokens < prompt_len2  # the first turn's prefix came from the KV cache
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]


def test_think_off_and_system_prompt_reach_the_template(chat_folder):
    folder, model, hf_tok = chat_folder
    session = _greedy_session(folder)
    assert session.command("/think off").message == "thinking off"
    assert session.command("/system You are Koi.").kind == "system"
    reply = session.ask("2 + 2 = ?")
    messages = [{"role": "system", "content": "You are Koi."}, {"role": "user", "content": "2 + 2 = ?"}]
    assert reply.text == _hf_reply(model, hf_tok, messages, think=False)[0]
    assert session.tokenizer.decode(session.prompt_ids()).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_commands(chat_folder):
    session = _greedy_session(chat_folder[0])
    session.ask("hi")
    assert session.command("/reset").kind == "reset" and session.messages == []
    assert session.command("/think").message == "thinking on"
    assert session.command("/think maybe").kind == "unknown"
    assert session.command("/system").message == "system prompt removed" and session.options.system is None
    assert session.command("/exit").kind == "exit" and session.command("/quit").kind == "exit"
    unknown = session.command("/frobnicate")
    assert unknown.kind == "unknown" and "/reset" in unknown.message
    assert session.is_command("/help") and not session.is_command("hello /reset")


def test_stop_and_ctrl_c_end_the_reply_not_the_chat(chat_folder):
    session = _greedy_session(chat_folder[0], max_new_tokens=40)
    seen = []

    def stop_after_two(piece):
        seen.append(piece)
        if len(seen) == 2:
            session.stop()

    reply = session.ask("Hello there!", on_text=stop_after_two)
    if reply.finish != "stop":  # the tiny model may end its turn within two pieces; usually it does not
        assert reply.finish == "interrupted" and len(seen) == 2
    assert session.messages[-1] == {"role": "assistant", "content": reply.text}

    def ctrl_c(piece):
        raise KeyboardInterrupt

    reply = session.ask("again", on_text=ctrl_c)
    assert reply.finish == "interrupted" and reply.tokens == 1
    assert session.messages[-1]["role"] == "assistant"
    after = session.ask("and once more")  # the session still works, cache and all
    assert after.finish in ("stop", "length")


def test_cached_decoding_equals_recomputing_every_turn(chat_folder):
    folder = chat_folder[0]
    a = _greedy_session(folder)
    for text in ("Hello there!", "I think so", "def add(a, b)"):
        a.ask(text)
    b = _greedy_session(folder)
    b.messages = [dict(m) for m in a.messages[:-1]]  # same history, a cold cache
    b_reply = b.stream(b.messages.pop()["content"])
    assert "".join(b_reply) == a.messages[-1]["content"]


def test_seeded_sampling_repeats_and_generation_config_is_read(chat_folder):
    folder = chat_folder[0]
    s1 = open_chat(folder, seed=3, max_new_tokens=12)
    assert s1.options.sampling == SamplingParams(temperature=0.6, top_k=20, top_p=0.95, seed=3)
    s2 = open_chat(folder, seed=3, max_new_tokens=12)
    assert s1.ask("Hello").text == s2.ask("Hello").text


def test_context_and_request_errors(chat_folder, tmp_path):
    folder = chat_folder[0]
    small = open_chat(folder, temperature=0.0, max_context=8)
    with pytest.raises(KoifishError, match="context holds 8; /reset to start over"):
        small.ask("Hello there! How are you today?")
    if not ON_GPU:
        with pytest.raises(KoifishError, match="--device cuda"):
            open_chat(folder, device="cuda")
    with pytest.raises(KoifishError, match="--bits: expected 8, 4 or 3, got 5"):
        open_chat(folder, bits=5)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelError, match="chat needs a Qwen3 model"):
        open_chat(gpt2)
    with pytest.raises(ModelError, match="not found"):
        open_chat("qwen3-nonexistent-9b", models_dir=tmp_path)


def test_quantized_chat_runs(chat_folder):
    session = open_chat(chat_folder[0], bits=4, temperature=0.0, max_new_tokens=6)
    reply = session.ask("Hello there!")
    assert reply.tokens + (reply.finish == "stop") >= 1 and isinstance(reply.text, str)
    assert np.isfinite(reply.tokens_per_s)
