"""GPU memory, utilisation, temperature and power; CPU and RAM when there is no GPU."""

from __future__ import annotations

from rich.table import Table
from textual.widgets import Static

from koifish_app.tui.system_stats import SystemReading
from koifish_app.tui.widgets.format import size_bytes


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


class SystemPanel(Static):
    def show(self, reading: SystemReading) -> None:
        table = Table.grid(padding=(0, 1))
        table.add_column(style="dim")
        table.add_column(justify="right")
        for i, gpu in enumerate(reading.gpus):
            prefix = f"{i} " if len(reading.gpus) > 1 else ""
            if not prefix:
                table.add_row("gpu", gpu.name.removeprefix("NVIDIA ")[:16])
            table.add_row(prefix + "mem", f"{size_bytes(gpu.mem_used)}/{size_bytes(gpu.mem_total)}")
            table.add_row(prefix + "util", _pct(gpu.util))
            table.add_row(prefix + "temp", "-" if gpu.temp_c is None else f"{gpu.temp_c:.0f}°C")
            power = "-" if gpu.power_w is None else f"{gpu.power_w:.0f}"
            table.add_row(prefix + "power", power + (f"/{gpu.power_limit_w:.0f}W" if gpu.power_limit_w else "W"))
        if not reading.gpus:
            table.add_row("cpu", _pct(reading.cpu_percent))
            table.add_row("ram", f"{size_bytes(reading.ram_used)}/{size_bytes(reading.ram_total)}")
        self.update(table)
