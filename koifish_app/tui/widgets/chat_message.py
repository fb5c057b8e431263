"""One chat turn: who spoke, the thinking folded away, the answer as it streams."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Collapsible, Static


def split_thinking(text: str) -> tuple[str | None, str, bool]:
    """(thinking, answer, still_thinking) of a reply so far; Qwen3 opens with <think>...</think>."""
    body = text.lstrip()
    if not body.startswith("<think>"):
        return None, text, False
    body = body[len("<think>"):]
    if "</think>" not in body:
        return body.strip("\n"), "", True
    thinking, answer = body.split("</think>", 1)
    return thinking.strip("\n"), answer.lstrip("\n"), False


class ChatMessage(Vertical):
    def __init__(self, role: str, text: str = ""):
        super().__init__(classes=f"chat-message -{role}")
        self.role = role
        self.text = text

    def compose(self) -> ComposeResult:
        yield Static(self.role, classes="chat-role")
        with Collapsible(title="thinking", collapsed=True, classes="chat-thinking"):
            yield Static("", classes="chat-thinking-text", markup=False)
        yield Static("", classes="chat-answer", markup=False)

    def on_mount(self) -> None:
        self.set_text(self.text)

    def append(self, piece: str) -> None:
        self.set_text(self.text + piece)

    def set_text(self, text: str) -> None:
        self.text = text
        thinking, answer, still = split_thinking(text)
        folded = self.query_one(".chat-thinking", Collapsible)
        folded.display = thinking is not None
        if thinking is not None:
            folded.title = "thinking…" if still else f"thought ({len(thinking.split())} words)"
            self.query_one(".chat-thinking-text", Static).update(thinking)
        self.query_one(".chat-answer", Static).update(answer)

    @property
    def answer(self) -> str:
        return split_thinking(self.text)[1]
