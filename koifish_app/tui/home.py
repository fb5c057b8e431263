"""Home: the runs under --runs (case, status, step, latest loss) and the model folders for chat."""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from koifish_app.tui.model_folders import ModelFolder, find_model_folders
from koifish_app.tui.run import BACKLOG_BYTES
from koifish_app.tui.run_watch import RunWatch
from koifish_app.tui.widgets.format import num
from koifish_app.tui.widgets.run_header import status_text
from koifish_app.tui.widgets.select_tables import ModelsTable, RunsTable

RUN_MARKERS = ("metrics.jsonl", "case.json", "run.pid", "checkpoints")


def find_run_dirs(runs_dir: Path) -> list[Path]:
    """Sub-folders that look like runs (the trainer writes case.json before anything else)."""
    return sorted(p for p in runs_dir.iterdir() if p.is_dir() and any((p / m).exists() for m in RUN_MARKERS))


class HomeScreen(Screen):
    CSS_PATH = "home.tcss"
    HELP = ("Runs found under the runs folder, refreshed every second. Enter opens a run; space marks runs "
            "and c overlays their loss curves (all runs when none is marked). n starts a case file as a new "
            "run. Model folders come from --models-dir and the Hugging Face cache: select one and press "
            "enter (or m) to chat.")
    BINDINGS = [
        Binding("space", "mark", "Mark", id="home.mark"),
        Binding("c", "compare", "Compare", id="home.compare"),
        Binding("n", "new_run", "New run", id="home.new_run"),
        Binding("m", "chat", "Chat", id="home.chat"),
        Binding("r", "rescan", "Rescan", id="home.rescan"),
    ]

    def __init__(self):
        super().__init__()
        self.run_dirs: list[Path] = []
        self.models: list[ModelFolder] = []
        self.marked: set[Path] = set()

    def compose(self) -> ComposeResult:
        yield Static("", id="home-title")
        yield RunsTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="home-message")
        yield Static("models for chat", id="models-title")
        yield ModelsTable(id="models-table", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        runs = self.query_one("#runs-table", DataTable)
        for key, label in (("mark", " "), ("run", "run"), ("case", "case"), ("status", "status"), ("step", "step"),
                           ("loss", "loss"), ("eval", "eval")):
            runs.add_column(label, key=key)
        models = self.query_one("#models-table", DataTable)
        for key in ("model", "type", "source"):
            models.add_column(key, key=key)
        self.scan_models()
        self.refresh_runs()
        self.set_interval(self.app.settings.refresh_s, self.refresh_runs)

    # ---- data ----

    def scan_models(self) -> None:
        settings = self.app.settings
        self.models = find_model_folders(settings.models_dir, settings.hub_roots)
        table = self.query_one("#models-table", DataTable)
        table.clear()
        for m in self.models:
            table.add_row(m.name, m.model_type, m.source, key=str(m.path))
        if not self.models:
            table.add_row(Text("none found: pass --models-dir or download a Qwen3 model", style="dim"), "", "")

    def refresh_runs(self) -> None:
        runs_dir = self.app.settings.runs_dir
        self.query_one("#home-title", Static).update(Text.assemble(("koifish", "bold"), f"  runs in {runs_dir}/"))
        message = self.query_one("#home-message", Static)
        try:
            found = find_run_dirs(runs_dir) if runs_dir.is_dir() else None
        except OSError as e:
            found, why = None, f"{runs_dir}: cannot list ({e.strerror or e})"
        else:
            why = f"{runs_dir}: no such folder; press n to start a case, or pass --runs DIR"
        if found is None:
            message.update(Text(why, style="bold red"))
            found = []
        elif not found:
            message.update(Text(f"no runs in {runs_dir}/ yet; press n to start a case file", style="dim"))
        else:
            message.update("")
        table = self.query_one("#runs-table", DataTable)
        if found != self.run_dirs:
            self._rebuild(table, found)
        now = time.time()
        for run_dir in self.run_dirs:
            watch = self.app.watcher_for(run_dir)
            if watch.loading:
                continue
            if watch.unread_bytes() > BACKLOG_BYTES:  # a long run seen for the first time: off the UI thread
                self.run_worker(watch.poll, thread=True, group="backlog")
                table.update_cell(str(run_dir), "step", "reading…", update_width=True)
                continue
            watch.poll()
            for column, value in self._cells(watch, now).items():
                table.update_cell(str(run_dir), column, value, update_width=True)

    def _rebuild(self, table: DataTable, found: list[Path]) -> None:
        selected = self.selected_run()
        table.clear()
        self.run_dirs = found
        for run_dir in found:
            table.add_row(" ", run_dir.name, "", "", "", "", "", key=str(run_dir))
        if selected in found:
            table.move_cursor(row=found.index(selected))

    def _cells(self, watch: RunWatch, now: float) -> dict:
        step, total = watch.step, watch.total_steps
        step_text = "-" if step is None else f"{step:,}" + (f"/{total:,}" if total else "")
        mark = "●" if watch.run_dir in self.marked else " "
        alerts = Text(f" ⚠{watch.unacked}", style="bold yellow") if watch.unacked else ""
        status = Text.assemble(status_text(watch.status(now)), alerts)
        return {"mark": mark, "case": watch.case_name, "status": status,
                "step": step_text, "loss": num(watch.latest_loss), "eval": num(watch.latest_eval)}

    def selected_run(self) -> Path | None:
        table = self.query_one("#runs-table", DataTable)
        if not self.run_dirs or table.cursor_row is None or table.cursor_row >= len(self.run_dirs):
            return None
        return self.run_dirs[table.cursor_row]

    def selected_model(self) -> ModelFolder | None:
        table = self.query_one("#models-table", DataTable)
        if not self.models or table.cursor_row is None or table.cursor_row >= len(self.models):
            return None
        return self.models[table.cursor_row]

    # ---- actions ----

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.data_table.id == "models-table":
            self.action_chat()
        else:
            self.action_open()

    def action_open(self) -> None:
        if self.focused is not None and self.focused.id == "models-table":
            self.action_chat()
            return
        run_dir = self.selected_run()
        if run_dir is None:
            self.notify("no run selected", severity="warning")
            return
        self.app.open_run(run_dir)

    def action_mark(self) -> None:
        run_dir = self.selected_run()
        if run_dir is None:
            return
        self.marked.symmetric_difference_update({run_dir})
        mark = "●" if run_dir in self.marked else " "
        self.query_one("#runs-table", DataTable).update_cell(str(run_dir), "mark", mark)

    def action_compare(self) -> None:
        chosen = [d for d in self.run_dirs if d in self.marked] or list(self.run_dirs)
        if not chosen:
            self.notify("no runs to compare", severity="warning")
            return
        self.app.open_compare(chosen)

    def action_new_run(self) -> None:
        from koifish_app.tui.new_run import NewRunScreen

        self.app.push_screen(NewRunScreen())

    def action_chat(self) -> None:
        self.app.open_chat(self.selected_model())

    def action_rescan(self) -> None:
        self.scan_models()
        self.refresh_runs()
        self.notify("rescanned runs and model folders")
