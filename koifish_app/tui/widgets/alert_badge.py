"""A badge counting instability alerts not yet acknowledged; it stays until the user acks them."""

from __future__ import annotations

from textual.widgets import Static


class AlertBadge(Static):
    def show(self, unacked: int) -> None:
        self.set_class(unacked > 0, "-alert")
        self.update(f" ⚠ {unacked} alert{'s' if unacked != 1 else ''} " if unacked else " no alerts ")
