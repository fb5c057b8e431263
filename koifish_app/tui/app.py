"""The dashboard application: one factory, make_app(...), shared by `koifish tui` and the tests.

The app owns what the screens share: the settings, one RunWatch per run folder (so switching
screens never re-reads a metrics file), the machine-stats reader and the chat-engine opener.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from textual.app import App
from textual.binding import Binding

from koifish_app.tui.run_watch import RunWatch


@dataclass
class TUISettings:
    run_dir: Path | None = None
    """Open this run directly (`koifish tui RUN_DIR`)."""
    runs_dir: Path = Path("runs")
    """The folder whose sub-folders the home screen lists as runs."""
    models_dir: Path | None = None
    """Another place to look for chat models, besides the Hugging Face cache."""
    refresh_s: float = 1.0
    """Seconds between reads of the run files and the GPU (the issue asks for at least 1/s)."""
    hub_roots: list[Path] | None = None
    """Hugging Face cache folders to list models from; None = the standard places."""
    cwd: Path | None = None
    """Working folder for trainers started from the dashboard (None: the dashboard's own)."""


def default_chat_opener(models_dir: Path | None) -> Callable:
    def open_session(folder: Path):
        from koifish_core.infer.chat_open import open_chat  # heavy imports: only when a chat starts

        return open_chat(folder, models_dir=models_dir)

    return open_session


class KoifishApp(App):
    TITLE = "koifish"
    ENABLE_COMMAND_PALETTE = False  # its footer entry costs 12 of 80 columns; every action has a key
    CSS = "Screen { background: $surface; } .error { color: $error; text-style: bold; }"
    BINDINGS = [
        Binding("question_mark", "help", "Help", id="app.help"),
        Binding("f1", "help", "Help", id="app.help_f1", show=False),  # where ? is typed into an input
        Binding("q", "quit", "Quit", id="app.quit"),
    ]

    def __init__(self, settings: TUISettings, system_stats=None, chat_opener: Callable | None = None):
        super().__init__()
        self.settings = settings
        self._system_stats = system_stats
        self.chat_opener = chat_opener or default_chat_opener(settings.models_dir)
        self.watches: dict[Path, RunWatch] = {}

    @property
    def system_stats(self):
        if self._system_stats is None:  # NVML init takes ~0.1 s: only when a screen needs it
            from koifish_app.tui.system_stats import SystemStats

            self._system_stats = SystemStats()
        return self._system_stats

    def watcher_for(self, run_dir: Path) -> RunWatch:
        key = Path(run_dir).absolute()
        if key not in self.watches:
            self.watches[key] = RunWatch(run_dir)
        return self.watches[key]

    def on_mount(self) -> None:
        from koifish_app.tui.home import HomeScreen

        self.push_screen(HomeScreen())
        if self.settings.run_dir is not None:
            self.open_run(self.settings.run_dir)

    def open_run(self, run_dir: Path) -> None:
        from koifish_app.tui.run import RunScreen

        self.push_screen(RunScreen(self.watcher_for(run_dir)))

    def open_compare(self, run_dirs: list[Path]) -> None:
        from koifish_app.tui.compare import CompareScreen

        self.push_screen(CompareScreen([self.watcher_for(d) for d in run_dirs]))

    def open_chat(self, model=None) -> None:
        from koifish_app.tui.chat import ChatScreen

        self.push_screen(ChatScreen(model))

    def action_help(self) -> None:
        from koifish_app.tui.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.screen))


def make_app(run_dir: Path | str | None = None, runs_dir: Path | str = Path("runs"),
             models_dir: Path | str | None = None, *, refresh_s: float = 1.0, system_stats=None, chat_opener: Callable | None = None,
             hub_roots: list[Path] | None = None, cwd: Path | None = None) -> KoifishApp:
    """The dashboard. system_stats (an object with read() -> SystemReading) and chat_opener
    (folder -> a ChatSession-like object) replace the real NVML reader and chat engine in tests."""
    settings = TUISettings(run_dir=Path(run_dir) if run_dir is not None else None, runs_dir=Path(runs_dir),
                           models_dir=Path(models_dir) if models_dir is not None else None, refresh_s=refresh_s,
                           hub_roots=hub_roots, cwd=cwd)
    return KoifishApp(settings, system_stats=system_stats, chat_opener=chat_opener)
