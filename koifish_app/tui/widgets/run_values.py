"""The latest numbers of a run: losses, lr, grad norm, throughput, MFU, expert, checkpoints."""

from __future__ import annotations

from rich.table import Table
from textual.widgets import Static

from koifish_app.tui.run_watch import RunWatch
from koifish_app.tui.widgets.format import count, num


class RunValues(Static):
    def show(self, watch: RunWatch) -> None:
        last = watch.last_train
        rows = [("loss", num(watch.latest_loss)), ("eval", num(watch.latest_eval)), ("lr", num(last.get("lr"), 3)),
                ("grad norm", num(last.get("grad_norm"), 3)), ("tok/s", count(last.get("tokens_per_s"))),
                ("tokens", count(last.get("tokens")))]
        if "mfu" in last:  # only engines that know their peak FLOP/s log it
            mfu = last["mfu"]
            rows.append(("MFU", f"{100 * mfu:.1f}%" if isinstance(mfu, (int, float)) else num(mfu)))
        if watch.active_expert is not None:
            rows.append(("expert", str(watch.active_expert)))
        ckpts = watch.checkpoints()
        rows.append(("ckpt", ckpts[-1].removeprefix("step_").lstrip("0") or "0" if ckpts else "-"))
        table = Table.grid(padding=(0, 1))
        table.add_column(style="dim")
        table.add_column(justify="right")
        for name, value in rows:
            table.add_row(name, value)
        self.update(table)
