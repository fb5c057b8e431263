"""Chat with a model folder: streaming tokens, tokens/s, thinking folded away.

The engine is koifish_core.infer.chat's ChatSession (what `koifish chat` uses), opened by the
app's chat_opener in a worker thread. The screen needs only this of a session: stream(text)
yielding pieces, last_reply (tokens, seconds, finish), stop(), is_command(line), command(line)
and options.think.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Input, OptionList, Static
from textual.widgets.option_list import Option

from koifish_app.tui.messages import ChatFinished, ChatReady, ChatText
from koifish_app.tui.model_folders import ModelFolder, find_model_folders
from koifish_app.tui.widgets.chat_message import ChatMessage


def _error_text(e: BaseException) -> str:
    from koifish_core.errors import KoifishError

    return str(e) if isinstance(e, KoifishError) else f"{type(e).__name__}: {e}"


class ChatScreen(Screen):
    CSS_PATH = "chat.tcss"
    HELP = ("Talk to a Qwen3 model folder with the same engine as `koifish chat`. The reply streams as it "
            "decodes; a thinking block is folded (click or enter on it to unfold). Commands: /reset, "
            "/system TEXT, /think on|off, /help. Esc stops a reply, or goes back when none is running.")
    BINDINGS = [
        Binding("escape", "stop_or_back", "Stop/back", id="chat.stop_or_back"),
        Binding("ctrl+t", "toggle_think", "Think on/off", id="chat.think"),
        Binding("ctrl+r", "reset", "Reset", id="chat.reset"),
    ]

    def __init__(self, model: ModelFolder | Path | None = None):
        super().__init__()
        self.model = model
        self.session = None
        self.generating = False
        self.reply: ChatMessage | None = None
        self._started = 0.0
        self._pieces = 0
        self.models: list[ModelFolder] = []

    def compose(self) -> ComposeResult:
        yield Static("", id="chat-title")
        yield OptionList(id="model-picker")
        yield VerticalScroll(id="chat-log")
        yield Static("", id="chat-status")
        yield Input(placeholder="pick a model first", id="chat-input", disabled=True)
        yield Footer()

    def on_mount(self) -> None:
        if self.model is None:
            self._show_picker()
        else:
            self._load(self.model)

    # ---- model ----

    def _show_picker(self) -> None:
        settings = self.app.settings
        self.models = find_model_folders(settings.models_dir, settings.hub_roots)
        picker = self.query_one("#model-picker", OptionList)
        picker.clear_options()
        picker.add_options([Option(f"{m.name}  [{m.model_type}, {m.source}]", id=str(i))
                            for i, m in enumerate(self.models)])
        picker.display = True
        if self.models:
            self._title("pick a model folder (enter)")
            picker.highlighted = 0
            picker.focus()
        else:
            self._title("no model folders found: pass --models-dir DIR or download one (`hf download "
                        "Qwen/Qwen3-0.6B`)", error=True)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self._load(self.models[int(event.option.id)])

    def _title(self, text: str, error: bool = False) -> None:
        self.query_one("#chat-title", Static).update(Text(text, style="bold red" if error else "bold"))

    def _model_name(self) -> str:
        return self.model.name if isinstance(self.model, ModelFolder) else Path(self.model).name

    def _load(self, model: ModelFolder | Path) -> None:
        self.model = model
        self.query_one("#model-picker", OptionList).display = False
        self._title(f"loading {self._model_name()}…")
        self._open_worker(model.path if isinstance(model, ModelFolder) else Path(model))

    @work(thread=True, exclusive=True, group="chat-load")
    def _open_worker(self, folder: Path) -> None:
        try:
            session = self.app.chat_opener(folder)
        except Exception as e:  # shown on screen; the dashboard keeps running
            self.post_message(ChatReady(str(folder), error=_error_text(e)))
            return
        self.session = session
        self.post_message(ChatReady(str(folder)))

    def on_chat_ready(self, message: ChatReady) -> None:
        if message.error is not None:
            self._title(message.error, error=True)
            return
        self._title(f"{self._model_name()}")
        self._status()
        box = self.query_one("#chat-input", Input)
        box.disabled = False
        box.placeholder = "message, or /reset /system /think /help"
        box.focus()

    # ---- turns ----

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value.strip()
        if not text or self.session is None or self.generating:
            return
        event.input.value = ""
        log = self.query_one("#chat-log", VerticalScroll)
        if self.session.is_command(text):
            result = self.session.command(text)
            if result.kind == "exit":
                self.app.pop_screen()
                return
            if result.kind == "reset":
                log.remove_children()
            log.mount(Static(Text(result.message, style="dim italic"), classes="chat-note"))
            self._status()
            return
        log.mount(ChatMessage("you", text))
        self.reply = ChatMessage("model")
        log.mount(self.reply)
        log.scroll_end(animate=False)
        self.generating, self._started, self._pieces = True, time.perf_counter(), 0
        self._status()
        self._reply_worker(text)

    @work(thread=True, exclusive=True, group="chat-reply")
    def _reply_worker(self, text: str) -> None:
        session = self.session
        try:
            for piece in session.stream(text):
                self.post_message(ChatText(piece))
        except Exception as e:
            self.post_message(ChatFinished(0, 0.0, "error", error=_error_text(e)))
            return
        reply = session.last_reply
        self.post_message(ChatFinished(reply.tokens, reply.seconds, reply.finish))

    def on_chat_text(self, message: ChatText) -> None:
        if self.reply is not None:
            self.reply.append(message.text)
            self._pieces += 1
            self._status()
            self.query_one("#chat-log", VerticalScroll).scroll_end(animate=False)

    def on_chat_finished(self, message: ChatFinished) -> None:
        self.generating = False
        if message.error is not None:
            self.query_one("#chat-log", VerticalScroll).mount(Static(Text(message.error, style="bold red")))
            self._status()
            return
        rate = message.tokens / message.seconds if message.seconds > 0 else 0.0
        self._status(f"{message.tokens} tokens · {rate:.1f} tok/s · {message.finish}")

    def _status(self, done: str | None = None) -> None:
        think = "on" if self.session is not None and self.session.options.think else "off"
        if self.generating:
            elapsed = time.perf_counter() - self._started
            rate = self._pieces / elapsed if elapsed > 0 else 0.0
            line = f"generating… {self._pieces} pieces · {rate:.1f} tok/s"
        else:
            line = done or "ready"
        self.query_one("#chat-status", Static).update(Text(f"{line} · thinking {think}", style="dim"))

    # ---- actions ----

    def action_stop_or_back(self) -> None:
        if self.generating and self.session is not None:
            self.session.stop()
            self._status()
            return
        self.app.pop_screen()

    def action_toggle_think(self) -> None:
        if self.session is not None:
            self.session.options.think = not self.session.options.think
            self._status()

    def action_reset(self) -> None:
        if self.session is not None and not self.generating:
            self.session.command("/reset")
            self.query_one("#chat-log", VerticalScroll).remove_children()
            self._status("conversation cleared")
