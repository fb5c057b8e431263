"""`koifish train`: load the case, print the plan or run the trainer, and render its records."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from koifish_core.errors import KoifishError


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def print_plan(loaded, plan: dict, out: Console) -> None:
    case = loaded.case
    table = Table(title=f"plan for {escape(str(loaded.source))} ({loaded.format} layout)", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    m = case.model
    table.add_row("model", f"{m.arch}: {m.n_layer} layers, {m.n_head} heads, width {m.n_embd}, context {m.n_ctx}")
    table.add_row("parameters", f"{plan['parameters']:,}")
    table.add_row("tokens per step", f"{plan['tokens_per_step']:,}")
    table.add_row("steps", f"{case.train.steps:,} on {case.train.device}")
    for key, value in plan.items():
        if key.startswith("memory_") and isinstance(value, (int, float)):
            table.add_row(key.replace("_", " "), _fmt_bytes(value))
    if "flops_per_token" in plan:
        table.add_row("FLOPs per token", f"{plan['flops_per_token']:.3g}")
    table.add_row("data", f"train {escape(str(case.data.train))}, val {escape(str(case.data.val))}")
    out.print(table)


class _TrainRenderer:
    """Turns the trainer's records into a progress bar and a compact line every log_every steps."""

    def __init__(self, total_steps: int, log_every: int, out: Console):
        self.total = total_steps
        self.log_every = max(1, log_every)
        self.out = out
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=out, transient=True,
        )
        self.task = self.progress.add_task("train", total=total_steps, info="")

    def __call__(self, rec: dict) -> None:
        kind, step = rec.get("kind"), rec.get("step", 0)
        if kind == "train":
            info = f"loss {_num(rec.get('loss'))}  {_rate(rec.get('tokens_per_s'))}"
            self.progress.update(self.task, completed=step, info=info)
            if step % self.log_every == 0 or step == self.total or step == 1:
                self.out.print(
                    f"step {step:>6}/{self.total} | loss {_num(rec.get('loss'))} | lr {_sci(rec.get('lr'))} | "
                    f"grad norm {_num(rec.get('grad_norm'), 3)} | {_rate(rec.get('tokens_per_s'))}"
                )
        elif kind == "eval":
            self.out.print(f"[cyan]eval  step {step:>6} | val loss {_num(rec.get('loss'))} over {rec.get('tokens', 0):,} tokens[/]")
        elif kind == "event":
            what = ", ".join(f"{k} {v}" for k, v in rec.items() if k not in ("kind", "step", "time"))
            self.out.print(f"[bold black on yellow] instability [/] [yellow]step {step}: {escape(what)}[/]")
        elif kind == "run" and rec.get("status") in ("stopped", "failed"):
            style = "yellow" if rec["status"] == "stopped" else "bold red"
            self.out.print(f"[{style}]run {rec['status']} at step {step}: {escape(str(rec.get('message', '')))}[/]")


def _num(v, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else str(v)


def _sci(v) -> str:
    return f"{v:.2e}" if isinstance(v, (int, float)) else str(v)


def _rate(v) -> str:
    return f"{v:,.0f} tok/s" if isinstance(v, (int, float)) else ""


def run_train(case_path, *, steps, out_dir, device, resume, dry_run, as_json, inject, out, err, json_line) -> None:
    from koifish_core.config import load_case
    from koifish_core.config.plan import make_plan

    if case_path is None and resume and out_dir is not None and (Path(out_dir) / "case.json").exists():
        case_path = Path(out_dir) / "case.json"  # resuming a run: its resolved case is the source of truth
    loaded = load_case(case_path)
    for w in loaded.warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}")
    if steps is not None and steps <= 0:
        raise KoifishError(f"--steps: expected a positive number of steps, got {steps}")
    if device is not None and device not in ("cpu", "cuda"):
        raise KoifishError(f"--device: expected cpu or cuda, got {device!r}")

    case = loaded.case
    if steps is not None:
        case.train.steps = steps
    if device is not None:
        case.train.device = device
    plan = make_plan(case).to_dict()
    if dry_run:
        print_plan(loaded, plan, out)
        if as_json:
            json_line(plan)
        return

    faults = []
    if inject:
        from koifish_core.train.faults import parse_inject

        faults = parse_inject(inject)

    from koifish_core.dist.launch_env import from_environ
    from koifish_core.train.trainer import train

    env = from_environ()
    dist, rdv = None, None
    if env.world_size > 1:
        from koifish_core.dist.setup import join

        dist, rdv = join(env, case.train.device)
        if not env.is_main:  # rank 0 speaks for the job
            out = Console(quiet=True)
    run_dir = Path(out_dir) if out_dir is not None else Path("runs") / case.name
    out.print(f"[bold]koifish[/] training {escape(case.name)}: {plan['parameters']:,} parameters, "
              f"{plan['tokens_per_step']:,} tokens/step, {case.train.steps} steps on {case.train.device} -> {escape(str(run_dir))}",
              soft_wrap=True)
    renderer = _TrainRenderer(case.train.steps, case.train.log_every, out)
    try:
        with renderer.progress:
            result = train(loaded, run_dir, steps=case.train.steps, device=case.train.device, resume=resume,
                           on_log=renderer, inject=faults, dist=dist)
    finally:
        if rdv is not None:
            rdv.close()
    if env.world_size > 1 and not env.is_main:
        return
    val = f", val loss {result.final_val_loss:.4f}" if result.final_val_loss is not None else ""
    out.print(f"[green]done[/]: {result.steps} steps, loss {_num(result.final_loss)}{val}, "
              f"{_rate(result.tokens_per_s)} -> {escape(str(run_dir))}")
    try:
        from koifish_app.plot import plot_run

        out.print(f"loss curve: {plot_run(run_dir, None)}")
    except KoifishError as e:  # a plot is a convenience; the run itself succeeded
        err.print(f"[yellow]warning:[/] no loss plot: {escape(str(e))}")
