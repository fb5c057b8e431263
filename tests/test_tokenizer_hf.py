"""tokenizer.json -> tiktoken equals Hugging Face `tokenizers` on a Qwen3-like tokenizer built from Qwen's ranks.

The fixture rebuilds Qwen2/Qwen3's tokenizer.json the way it is made: dashscope's qwen.tiktoken
(151,643 ranks) as a byte-level BPE with one merge per token recovered by running BPE on the
token's own bytes, the NFC normalizer, Qwen's Split regex + ByteLevel, and Qwen3's added tokens.
"""

import json
import os
import random

import pytest

from koifish_core.errors import ModelError
from koifish_core.infer.tokenizer_hf import load_tokenizer_json

tokenizers = pytest.importorskip("tokenizers")
dashscope = pytest.importorskip("dashscope")

# Qwen3's added tokens (tokenizer_config.json's added_tokens_decoder): id, content, special
QWEN3_ADDED = [
    (151643, "<|endoftext|>", True), (151644, "<|im_start|>", True), (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True), (151647, "<|object_ref_end|>", True), (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True), (151650, "<|quad_start|>", True), (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True), (151653, "<|vision_end|>", True), (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True), (151656, "<|video_pad|>", True), (151657, "<tool_call>", False),
    (151658, "</tool_call>", False), (151659, "<|fim_prefix|>", False), (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False), (151662, "<|fim_pad|>", False), (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False), (151665, "<tool_response>", False), (151666, "</tool_response>", False),
    (151667, "<think>", False), (151668, "</think>", False),
]

TEXTS = [
    "Hello, world! This is a test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog. I'm sure you'll see it's fine; we'd've known.",
    "DON'T SHOUT, it'S rude. They'RE here.",
    "def f(x):\n    return x**2  # square\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }\r\n",
    "你好，世界！今天天气很好。我们一起去公园散步吧。",
    "日本語のテキストと한국어 텍스트, Ελληνικά και русский текст.",
    "emoji: 😀🎉👩‍👩‍👧‍👦 🇯🇵 ❤️ and flags 🏳️‍🌈",
    "   leading spaces, trailing spaces   ",
    "tabs\t\t\tand\n\n\n\nnewlines \n \n   \n",
    "numbers 1234567890 3.14159 -42 1e10 0x1F 2024-11-25",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nreasoning here\n</think>\n\nThe answer is 42.<|endoftext|>",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call><|im_end|><|im_end|>x<|fim_prefix|>",
    "Cafe\u0301 vs Café (NFC composes the first)",  # combining accent
    "",
    " ",
    "\n",
    "a" * 300,
    "!!!???...,,,;;;:::",
    "https://example.com/path?q=1&r=two#frag",
    "$$\\int_0^1 x^2\\,dx = \\frac{1}{3}$$",
]


def _recover_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The last merge BPE makes when it meets `token`, using only tokens ranked below it."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < limit and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    assert len(parts) == 2, token
    return parts[0], parts[1]


def _qwen_ranks() -> tuple[dict[bytes, int], str]:
    from dashscope.tokenizers.qwen_tokenizer import PAT_STR
    from tiktoken.load import load_tiktoken_bpe

    path = os.path.join(os.path.dirname(dashscope.__file__), "resources", "qwen.tiktoken")
    return load_tiktoken_bpe(path), PAT_STR


@pytest.fixture(scope="session")
def qwen_tokenizer_json(tmp_path_factory):
    """Path of a Qwen3-like tokenizer.json built with HF `tokenizers`, and the HF Tokenizer itself."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks, pattern = _qwen_ranks()
    assert len(ranks) == 151643
    to_unicode = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_unicode[x] for x in b)

    vocab = {text(t): r for t, r in ranks.items()}
    merges = [tuple(map(text, _recover_merge(t, ranks))) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])
              if len(t) > 1]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    for token_id, content, special in QWEN3_ADDED:
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
        assert tok.token_to_id(content) == token_id
    path = tmp_path_factory.mktemp("qwen_tok") / "tokenizer.json"
    tok.save(str(path))
    return path, tok


@pytest.fixture(scope="session")
def ours(qwen_tokenizer_json):
    return load_tokenizer_json(qwen_tokenizer_json[0])


def test_suite_equals_hf_tokenizers(qwen_tokenizer_json, ours):
    _, hf = qwen_tokenizer_json
    for text in TEXTS:
        expected = hf.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == hf.decode(expected, skip_special_tokens=False), text


def test_random_mixed_text_equals_hf_tokenizers(qwen_tokenizer_json, ours):
    _, hf = qwen_tokenizer_json
    rng = random.Random(0)
    alphabet = (list("abcXYZ019 '\n\t\r.,!?-_()[]{}<>|/\\\"") + list("中文字日本語한국")
                + ["😀", "👍🏽", "\u0301", "é", "ß"] + ["<think>", "</think>", "<|im_end|>", "'s", "'LL", "  ", "\n\n"])
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, repr(text)


def test_plain_text_equals_qwens_own_tiktoken_ranks(ours):
    import tiktoken

    ranks, pattern = _qwen_ranks()
    qwen = tiktoken.Encoding("qwen", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    for text in TEXTS:
        if "<" not in text and "\u0301" not in text:
            assert ours.encode(text) == qwen.encode_ordinary(text)


def test_special_token_ids_and_switching_specials_off(ours):
    assert ours.encode("<|im_start|><|im_end|><think></think>") == [151644, 151645, 151667, 151668]
    assert ours.n_vocab == 151669
    plain = ours.encode("<|im_end|><think>", allowed_special=set())
    assert plain[-1] == 151667 and 151645 not in plain  # <think> is not special: HF always splits it out
    assert ours.decode([151644, 9707, 151645], skip_special=True) == "Hello"


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_unsupported_tokenizers_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ModelError, match="model.type 'Unigram' is not supported"):
        load_tokenizer_json(_write(tmp_path / "a.json", {"model": {"type": "Unigram"}}))
    vocab = {"a": 0}
    with pytest.raises(ModelError, match="lacks 255 of the 256 single bytes"):
        load_tokenizer_json(_write(tmp_path / "b.json", {"model": {"type": "BPE", "vocab": vocab, "merges": []}}))
    with pytest.raises(ModelError, match="normalizer 'NFKC' is not supported"):
        load_tokenizer_json(_write(tmp_path / "c.json", {"normalizer": {"type": "NFKC"}, "model": {}}))
    with pytest.raises(ModelError, match="not valid JSON"):
        (tmp_path / "d.json").write_text("{")
        load_tokenizer_json(tmp_path / "d.json")
