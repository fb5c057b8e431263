"""`koifish data prepare`: plain text files to llm.c shards with GPT-2's BPE.

Each file is one document (with split_docs, each blank-line separated block of a file is one).
`<|endoftext|>` (50256) goes BEFORE every document, as in llm.c's fineweb.py, so the stream starts
with EOT. The last `val_fraction` of the whole token stream becomes `{name}_val_000000.bin`, ...;
the rest `{name}_train_000000.bin`, `..._000001.bin`, ... of at most `shard_tokens` tokens each.
Tokens stream through a temporary file in the output folder, so memory holds one input file's
text at a time, never the whole token stream; older shards of the same name beyond the new count are removed so
that a glob over the folder sees only this run's shards.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from koifish_core.errors import DataError

PIECE_CHARS = 1 << 20  # text goes to the tokenizer in pieces of about this size...
BATCH_PIECES = 8  # ...several at once, over two threads (2 cores)
_BLOCK_SPLIT = re.compile(r"\n[ \t\r\f\v]*\n\s*")  # one or more blank lines


@dataclass
class PrepareResult:
    train_paths: list[Path] = field(default_factory=list)
    """Train shards written, in order."""
    val_paths: list[Path] = field(default_factory=list)
    """Validation shards written (none when val_fraction is 0)."""
    num_train_tokens: int = 0
    """Tokens in the train shards, EOTs included."""
    num_val_tokens: int = 0
    """Tokens in the validation shards."""
    skipped: list[Path] = field(default_factory=list)
    """Input files skipped because they hold no text."""


def prepare_texts(files, out_dir, val_fraction: float = 0.05, shard_tokens: int = 100_000_000,
                  progress=None, name: str | None = None, split_docs: bool = False) -> PrepareResult:
    """Tokenize text files into shards in out_dir. progress: a rich.progress.Progress (a task
    driven by bytes read is added to it), a callable(done_bytes, total_bytes), or None."""
    files = [Path(f) for f in files]
    out_dir = Path(out_dir)
    _check_arguments(files, val_fraction, shard_tokens)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out_dir}: cannot create the output folder: {e.strerror}") from None
    name = name or out_dir.resolve().name or "data"
    report = _progress_reporter(progress, sum(f.stat().st_size for f in files))

    raw = out_dir / f".{name}.tokens.tmp-{os.getpid()}"
    try:
        skipped = _tokenize_to_file(files, raw, split_docs, report)
        if len(skipped) == len(files):
            raise DataError(f"{', '.join(map(str, files))}: no text to tokenize (the input is empty)")
        tokens = np.memmap(raw, dtype=np.uint16, mode="r")
        n_val = int(round(tokens.size * val_fraction))
        if val_fraction > 0 and n_val == 0:
            n_val = 1
        n_train = tokens.size - n_val
        result = PrepareResult(num_train_tokens=n_train, num_val_tokens=n_val, skipped=skipped)
        result.train_paths = _write_split(out_dir, name, "train", tokens[:n_train], shard_tokens)
        result.val_paths = _write_split(out_dir, name, "val", tokens[n_train:], shard_tokens)
        del tokens  # close the map before the file goes
    except OSError as e:
        raise DataError(f"{out_dir}: cannot write there: {e.strerror or e}") from None
    finally:
        raw.unlink(missing_ok=True)
    return result


def _check_arguments(files: list[Path], val_fraction: float, shard_tokens: int) -> None:
    if not files:
        raise DataError("no input files given")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens <= 0:
        raise DataError(f"shard tokens must be positive, got {shard_tokens}")
    for f in files:
        if not f.exists():
            raise DataError(f"{f}: no such text file")
        if f.is_dir():
            raise DataError(f"{f}: is a folder; give the text files inside it")


def _progress_reporter(progress, total_bytes: int) -> Callable[[int], None]:
    """A function taking bytes just processed, whatever kind of progress the caller gave."""
    if progress is None:
        return lambda n: None
    if hasattr(progress, "add_task"):
        task = progress.add_task("tokenizing", total=total_bytes)
        return lambda n: progress.advance(task, n)
    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total_bytes)

    return report


def _tokenize_to_file(files: list[Path], raw: Path, split_docs: bool, report) -> list[Path]:
    """Append EOT + tokens of each document to `raw` (uint16: GPT-2's ids fit); returns skipped files."""
    from koifish_core.data.tokenizer import EOT, gpt2_encoding

    enc = gpt2_encoding()
    skipped = []
    with open(raw, "wb") as out:
        for path in files:
            text = _read_text(path)
            docs = [d for d in _BLOCK_SPLIT.split(text) if d.strip()] if split_docs else [text]
            if not any(d.strip() for d in docs):
                skipped.append(path)
                report(path.stat().st_size)
                continue
            for doc in docs:
                out.write(np.array([EOT], dtype="<u2").tobytes())
                pieces = list(_pieces(doc))
                for i in range(0, len(pieces), BATCH_PIECES):
                    batch = pieces[i:i + BATCH_PIECES]
                    for ids in enc.encode_ordinary_batch(batch, num_threads=2):
                        out.write(np.asarray(ids, dtype="<u2").tobytes())
                    report(sum(len(p.encode("utf-8")) for p in batch))
            if split_docs:
                report(max(0, path.stat().st_size - len("".join(docs).encode("utf-8"))))  # the blank lines
    return skipped


def _read_text(path: Path) -> str:
    try:
        # Bytes, not read_text: universal newlines would turn \r\n into \n and change the text.
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the text file: {e.strerror}") from None


def _pieces(text: str, size: int | None = None) -> Iterator[str]:
    """Cut text into pieces of about `size` characters that tokenize exactly as the whole would.

    A safe cut is just after a newline that sits between two non-space characters ("x\\nY"):
    GPT-2's pre-tokenizer then makes that newline a token of its own and never joins across it.
    Text with no such point in a window goes whole.
    """
    size = size or PIECE_CHARS
    start = 0
    while start < len(text):
        end = start + size
        if end >= len(text):
            yield text[start:]
            return
        cut = _safe_cut(text, start, end)
        if cut is None:
            cut = _safe_cut(text, start, len(text), forward_from=end)
        if cut is None:
            yield text[start:]
            return
        yield text[start:cut]
        start = cut


def _safe_cut(text: str, start: int, end: int, forward_from: int | None = None) -> int | None:
    if forward_from is None:  # search backwards from end
        nl = text.rfind("\n", start + 1, end)
        while nl > start:
            if _is_safe(text, nl):
                return nl + 1
            nl = text.rfind("\n", start + 1, nl)
        return None
    nl = text.find("\n", forward_from, end)
    while nl != -1:
        if _is_safe(text, nl):
            return nl + 1
        nl = text.find("\n", nl + 1, end)
    return None


def _is_safe(text: str, nl: int) -> bool:
    return 0 < nl < len(text) - 1 and not text[nl - 1].isspace() and not text[nl + 1].isspace()


def _write_split(out_dir: Path, name: str, split: str, tokens: np.ndarray, shard_tokens: int) -> list[Path]:
    from koifish_core.data.shards import write_shard

    paths = [write_shard(out_dir / f"{name}_{split}_{i:06d}.bin", tokens[start:start + shard_tokens],
                         dtype=np.uint16)
             for i, start in enumerate(range(0, len(tokens), shard_tokens))]
    stale = re.compile(rf"{re.escape(name)}_{split}_(\d{{6}})\.bin")
    for old in out_dir.glob(f"{name}_{split}_*.bin"):
        m = stale.fullmatch(old.name)
        if m and int(m.group(1)) >= len(paths):
            old.unlink()
    return paths
