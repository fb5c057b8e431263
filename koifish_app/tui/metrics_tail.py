"""Incremental reading of RUN_DIR/metrics.jsonl: only the bytes appended since the last poll.

A run that logs 100,000 steps writes ~20 MB; re-parsing that every second would cost the
dashboard most of a core, so the tail remembers its byte offset. The trainer rewrites the file
(os.replace) when a run resumes, so a new inode or a shorter file starts the reading over.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from koifish_core.train.metrics import METRICS_FILE


@dataclass
class TailRead:
    records: list[dict] = field(default_factory=list)
    """Complete records appended since the previous poll, in file order."""
    restarted: bool = False
    """The file was replaced or truncated: drop what was read before, these records start over."""


class MetricsTail:
    """Follows one metrics.jsonl; poll() returns what was appended, never a half-written line."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / METRICS_FILE
        self._offset = 0
        self._inode: int | None = None
        self._partial = b""
        self.size = 0
        """Bytes of the file read so far (for 'is it growing')."""
        self.mtime: float | None = None
        """Modification time at the last poll; None while the file does not exist."""
        self.bad_lines = 0
        """Lines that were not JSON objects (skipped, counted so the screen can say so)."""

    def poll(self) -> TailRead:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            restarted = self._inode is not None
            self._reset(None)
            self.mtime = None
            return TailRead(restarted=restarted)
        out = TailRead()
        if st.st_ino != self._inode or st.st_size < self._offset:
            out.restarted = self._inode is not None
            self._reset(st.st_ino)
        self.mtime = st.st_mtime
        if st.st_size == self._offset:
            return out  # the idle case: one stat() per poll, nothing read
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(st.st_size - self._offset)
        self._offset += len(chunk)
        self.size = self._offset
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # b"" when the chunk ended on a newline; else the writer is mid-line
        for line in lines:
            rec = self._parse(line)
            if rec is not None:
                out.records.append(rec)
        return out

    def _parse(self, line: bytes) -> dict | None:
        if not line.strip():
            return None
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.bad_lines += 1
            return None
        if not isinstance(rec, dict):
            self.bad_lines += 1
            return None
        return rec

    def _reset(self, inode: int | None) -> None:
        self._offset, self._inode, self._partial, self.size, self.bad_lines = 0, inode, b"", 0, 0
