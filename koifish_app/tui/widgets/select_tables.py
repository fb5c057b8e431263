"""Row-cursor tables whose enter key says in the footer what it does (DataTable's own is hidden)."""

from __future__ import annotations

from textual.binding import Binding
from textual.widgets import DataTable


class RunsTable(DataTable):
    BINDINGS = [Binding("enter", "select_cursor", "Open", id="home.open")]


class ModelsTable(DataTable):
    BINDINGS = [Binding("enter", "select_cursor", "Chat", id="home.open_model")]
