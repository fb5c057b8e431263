"""Messages between the dashboard's workers and screens (Textual runs dataclass messages as they are)."""

from __future__ import annotations

from dataclasses import dataclass
from textual.message import Message


@dataclass
class ChatText(Message):
    """A piece of the reply being decoded (posted from the chat worker thread)."""

    text: str


@dataclass
class ChatFinished(Message):
    """The reply ended: `finish` is stop, length or interrupted; `error` is set when it failed."""

    tokens: int
    seconds: float
    finish: str
    error: str | None = None


@dataclass
class ChatReady(Message):
    """The model folder opened (or did not: `error` says why)."""

    name: str
    error: str | None = None

