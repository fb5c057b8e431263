"""Start a case file as a new run: `koifish train CASE --out RUNS/<name>` as a child process."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from koifish_app.tui.run_control import ControlError, start_case


class NewRunScreen(ModalScreen):
    CSS_PATH = "new_run.tcss"
    HELP = "Type the path of a case file; the run folder is RUNS/<case file name> (-2, -3, ... when taken)."
    BINDINGS = [Binding("escape", "app.pop_screen", "Cancel", id="new_run.cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(id="new-run-box"):
            yield Static(Text("start a run from a case file", style="bold"))
            yield Input(placeholder="cases/gpt2_124M.json", id="case-path")
            yield Static("", id="new-run-message")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        settings = self.app.settings
        path = Path(event.value.strip()).expanduser()
        if not event.value.strip():
            self.query_one("#new-run-message", Static).update(Text("type a case file path", style="yellow"))
            return
        if settings.cwd is not None and not path.is_absolute():
            path = settings.cwd / path
        try:
            run_dir, child = start_case(path, settings.runs_dir, cwd=settings.cwd)
        except ControlError as e:
            self.query_one("#new-run-message", Static).update(Text(str(e), style="bold red"))
            return
        watch = self.app.watcher_for(run_dir)
        watch.child = child
        self.app.pop_screen()
        self.app.notify(f"started {run_dir} (pid {child.pid})")
        self.app.open_run(run_dir)
