"""Help: what the screen below does and every key binding it answers to (with its id)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Static

KEY_NAMES = {"question_mark": "?", "escape": "esc", "space": "space", "enter": "enter"}


def bindings_table(screen: Screen, app) -> Table:
    table = Table(box=None, padding=(0, 1), show_header=True, header_style="bold")
    table.add_column("key")
    table.add_column("does")
    table.add_column("id", style="dim")
    # Widgets' own bindings count when they carry an id (ours do; Textual's built-in ones do not).
    widget_bindings = [b for w in screen.query("*") for b in type(w).BINDINGS if isinstance(b, Binding) and b.id]
    seen = set()
    for binding in [*screen.BINDINGS, *widget_bindings, *app.BINDINGS]:
        if isinstance(binding, Binding) and (binding.id or binding.action) not in seen:
            seen.add(binding.id or binding.action)
            table.add_row(KEY_NAMES.get(binding.key, binding.key), binding.description or binding.action,
                          binding.id or "")
    return table


class HelpScreen(ModalScreen):
    CSS_PATH = "help.tcss"
    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "Close", id="help.close")]

    def __init__(self, about: Screen):
        super().__init__()
        self.about = about

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Static(Text(type(self.about).__name__.removesuffix("Screen") or "koifish", style="bold"),
                         id="help-title")
            yield Static(getattr(self.about, "HELP", ""), id="help-text")
            yield Static(bindings_table(self.about, self.app), id="help-keys")
            yield Static(Text("esc closes · keys can be remapped by their ids", style="dim"))
