"""The offline GPT-2 encoding against Hugging Face's GPT-2 tokenizer and tiktoken's own loader."""

import lzma
import shutil
import socket

import numpy as np
import pytest

from koifish_core.data import tokenizer
from koifish_core.data.tokenizer import EOT, gpt2_encoding, gpt2_files
from koifish_core.errors import KoifishError

TEXTS = [
    "Hello world",
    "",
    " ",
    "  leading  and   trailing   ",
    "tabs\tand\t\tmixed \t \n whitespace\r\n\r\nruns\n\n\n\n   \n",
    "Ünïcödé naïve café, 東京タワー, Ελληνικά, русский, عربى, हिन्दी",
    "emoji 🐟🐠🐡 👩‍👩‍👧‍👦 🏳️‍🌈 and flags 🇯🇵",
    "numbers 0 1 12 123 1234 12345 3.14159 -42 1e-5 2024-05-20 $1,000,000.00",
    "I'm can't we'll they've she'd you're IT'S 'quoted' O'Neil",
    "def f(x):\n\treturn x**2  # comment\n\n\nclass A:    pass\n",
    "a" * 300 + " " + "ab" * 150,
    "<|endoftext|> is plain text here",
    "mixed\u00a0nbsp\u2003em-space\u200bzero-width",
    "\x00\x01\x7f control bytes",
]


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """transformers' GPT2TokenizerFast from the very same two files (copied under the names it expects)."""
    from transformers import GPT2TokenizerFast

    folder = tmp_path_factory.mktemp("gpt2_tokenizer")
    vocab_bpe, encoder_json = gpt2_files()
    shutil.copy(encoder_json, folder / "vocab.json")
    shutil.copy(vocab_bpe, folder / "merges.txt")
    return GPT2TokenizerFast.from_pretrained(str(folder))


def _random_texts(n, seed=0):
    rng = np.random.default_rng(seed)
    pool = list("abcXYZ019 \n\t'.,!?-_") + ["  ", "\n\n", "é", "東", "🐟", "\u0301", "'s", "'ll", " 12"]
    return ["".join(rng.choice(pool, size=rng.integers(1, 60))) for _ in range(n)]


def test_matches_transformers_gpt2_tokenizer(hf_gpt2):
    enc = gpt2_encoding()
    for text in TEXTS + _random_texts(300):
        # HF always reads <|endoftext|> as the special token, so compare with tiktoken allowing it
        hf_ids = hf_gpt2(text, add_special_tokens=False)["input_ids"]
        assert enc.encode(text, allowed_special="all") == hf_ids, repr(text)
        assert enc.decode(enc.encode_ordinary(text)) == text, repr(text)


def test_plain_text_matches_on_a_long_passage(hf_gpt2):
    from koifish_core.data.corpus import BUILTIN

    text = lzma.decompress(BUILTIN["kjv"].read_bytes()).decode("utf-8")[:60_000]
    assert gpt2_encoding().encode_ordinary(text) == hf_gpt2(text)["input_ids"]


def test_special_token_and_vocabulary():
    enc = gpt2_encoding()
    assert enc.n_vocab == 50257 and enc.eot_token == EOT == 50256 and enc.max_token_value == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    # as ordinary text the marker is split into pieces, never the special id
    assert EOT not in enc.encode_ordinary("<|endoftext|>")
    assert enc.decode([EOT]) == "<|endoftext|>"
    assert gpt2_encoding() is enc  # cached


def test_ranks_equal_tiktokens_own_loader_and_no_network(monkeypatch):
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer must be built offline")

    vocab_bpe, encoder_json = gpt2_files()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's loader: read the local files, cache nothing
    expected = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
    monkeypatch.setattr(socket, "socket", no_network)
    gpt2_encoding.cache_clear()
    try:
        enc = gpt2_encoding()
        assert enc._mergeable_ranks == expected and len(expected) == 50256
        assert enc._pat_str == r50k_pat_str
    finally:
        gpt2_encoding.cache_clear()


def test_changed_files_are_refused(tmp_path, monkeypatch):
    vocab_bpe, encoder_json = gpt2_files()
    bad_vocab = tmp_path / "vocab.bpe"
    bad_vocab.write_bytes(vocab_bpe.read_bytes().replace(b"\xc4\xa0t", b"\xc4\xa0T", 1))
    monkeypatch.setattr(tokenizer, "gpt2_files", lambda: (bad_vocab, encoder_json))
    gpt2_encoding.cache_clear()
    try:
        with pytest.raises(KoifishError, match="sha256 .* differs from GPT-2's vocab.bpe") as e:
            gpt2_encoding()
        assert str(bad_vocab) in str(e.value)
        monkeypatch.setattr(tokenizer, "gpt2_files", lambda: (tmp_path / "gone.bpe", encoder_json))
        with pytest.raises(KoifishError, match="gone.bpe: missing"):
            gpt2_encoding()
    finally:
        gpt2_encoding.cache_clear()


def test_mergeable_ranks_checks_the_two_files_agree():
    vocab_bpe, encoder_json = gpt2_files()
    merges = vocab_bpe.read_bytes().split(b"\n")
    swapped = b"\n".join(merges[:1] + [merges[2], merges[1]] + merges[3:])  # two merges in the wrong order
    with pytest.raises(KoifishError, match="disagree"):
        tokenizer.mergeable_ranks(swapped, encoder_json.read_bytes())
