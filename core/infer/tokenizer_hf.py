"""tokenizer.json (byte-level BPE, as Qwen2/Qwen3 and GPT-2 ship it) -> a fast tiktoken Encoding.

tiktoken merges the pair whose merged token has the lowest rank; Hugging Face merges the pair
listed first in `merges`. The two agree when token ids grow with merge order (true of every
tokenizer converted from tiktoken ranks, Qwen's included), so the ids serve as ranks; load
checks it. Added tokens (special or not, e.g. <think>) are cut out of the text before anything
else, as HF does, and the NFC normalizer applies to the text between them.
"""

from __future__ import annotations

import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import tiktoken

from koifish_core.errors import ModelError

# GPT-2's pattern, what ByteLevel(use_regex=true) splits with
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character of each byte, reversed (the vocab's strings are made of these)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class HFTokenizer(tiktoken.Encoding):
    """A tiktoken Encoding that encodes as Hugging Face `tokenizers` does for this tokenizer.json."""

    def __init__(self, name: str, pattern: str, ranks: dict[bytes, int], added: dict[str, int],
                 special: set[str], nfc: bool):
        super().__init__(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=added)
        self.added_tokens = dict(added)
        """Every added token, content -> id (HF recognizes all of them in text)."""
        self.special_names = frozenset(special)
        """Those marked special (skipped when decoding with skip_special)."""
        self.nfc = nfc
        # longest first, so a token that is a prefix of another cannot win (HF matches leftmost-longest)
        alternatives = sorted(added, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, alternatives))) if added else None

    def encode(self, text: str, *, allowed_special="all", disallowed_special=()) -> list[int]:  # noqa: ARG002
        """Ids as HF's tokenizer.encode(text, add_special_tokens=False) gives them.

        Added tokens in the text become their ids (HF's default); allowed_special=set() keeps
        special ones as plain text, as HF's split_special_tokens=True does.
        """
        keep = None if allowed_special == "all" else set(allowed_special)
        ids: list[int] = []
        start = 0
        for m in self._added_re.finditer(text) if self._added_re else ():
            token = m.group()
            if keep is not None and token in self.special_names and token not in keep:
                continue
            ids += self._encode_plain(text[start:m.start()])
            ids.append(self.added_tokens[token])
            start = m.end()
        return ids + self._encode_plain(text[start:])

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        return self.encode_ordinary(unicodedata.normalize("NFC", text) if self.nfc else text)

    def decode(self, tokens, errors: str = "replace", skip_special: bool = False) -> str:
        if skip_special:
            special_ids = {self.added_tokens[t] for t in self.special_names}
            tokens = [t for t in tokens if t not in special_ids]
        return super().decode(list(tokens), errors=errors)


def _pattern(pre: dict | None, where: str) -> str:
    if pre is None:
        raise ModelError(f"{where}: pre_tokenizer is null; koifish reads byte-level BPE tokenizers only")
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    pattern = None
    for step in steps:
        kind = step.get("type")
        if kind == "Split":
            if step.get("behavior") != "Isolated" or step.get("invert"):
                raise ModelError(f"{where}: pre_tokenizer Split must be behavior Isolated, invert false")
            pattern = step["pattern"].get("Regex") or re.escape(step["pattern"].get("String", ""))
        elif kind == "ByteLevel":
            if step.get("add_prefix_space"):
                raise ModelError(f"{where}: ByteLevel add_prefix_space true is not supported")
            if step.get("use_regex", True):
                pattern = GPT2_PATTERN
        else:
            raise ModelError(f"{where}: pre_tokenizer {kind!r} is not supported (expected Split and ByteLevel)")
    if pattern is None:
        raise ModelError(f"{where}: pre_tokenizer has no split pattern")
    return pattern


def _ranks(model: dict, where: str) -> dict[bytes, int]:
    if model.get("type") != "BPE":
        raise ModelError(f"{where}: model.type {model.get('type')!r} is not supported; expected BPE (byte-level)")
    decode = byte_decoder()
    try:
        ranks = {bytes(decode[c] for c in token): int(i) for token, i in model["vocab"].items()}
    except KeyError:
        raise ModelError(f"{where}: model.vocab has tokens outside the byte-level alphabet; "
                         "not a byte-level BPE tokenizer") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ModelError(f"{where}: model.vocab lacks {len(missing)} of the 256 single bytes (e.g. byte {missing[0]})")
    last = -1
    for n, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = model["vocab"].get(left + right)
        if merged is None:
            raise ModelError(f"{where}: model.merges[{n}] ({left!r} + {right!r}) makes a token not in the vocab")
        if merged < last:
            raise ModelError(f"{where}: model.merges[{n}]: merges are not in id order, so tiktoken ranks cannot "
                             "reproduce them; this tokenizer is not supported")
        last = merged
    return ranks


def load_tokenizer_json(path: str | Path) -> HFTokenizer:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
    normalizer = data.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise ModelError(f"{path}: normalizer {normalizer.get('type')!r} is not supported (null or NFC)")
    ranks = _ranks(data.get("model") or {}, str(path))
    added = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
    special = {t["content"] for t in data.get("added_tokens", []) if t.get("special")}
    # added tokens that are also vocab entries (GPT-2's <|endoftext|>) stay ranks; tiktoken wants them apart
    ranks = {b: i for b, i in ranks.items() if i not in set(added.values())}
    return HFTokenizer(path.parent.name or "tokenizer", _pattern(data.get("pre_tokenizer"), str(path)), ranks,
                       added, special, nfc=normalizer is not None)
