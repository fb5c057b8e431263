"""Starting, stopping and resuming real `koifish train` children from the dashboard (tiny case)."""

import asyncio

from koifish_app.tui.app import make_app
from koifish_app.tui.new_run import NewRunScreen
from koifish_app.tui.run import RunScreen
from koifish_core.train.metrics import read_metrics
from tests.test_tui_screens import flat, screen_text, wait_until
from tests.tui_fixtures import FakeStats

SIZE = (80, 24)


def test_start_stop_resume_a_real_run(tmp_path, tiny_case):
    case = tiny_case(train={"steps": 100000, "log_every": 5}, eval={"every": 0, "batches": 2},
                     checkpoint={"every": 0, "keep_last": 2})
    runs = tmp_path / "runs"

    async def body():
        app = make_app(runs_dir=runs, refresh_s=0.1, system_stats=FakeStats(), hub_roots=[], cwd=tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            await pilot.press("n")
            assert isinstance(app.screen, NewRunScreen)
            await pilot.press(*case.name, "enter")
            screen = app.screen
            assert isinstance(screen, RunScreen) and screen.watch_.run_dir == runs / case.stem
            watch = screen.watch_
            assert await wait_until(pilot, lambda: (watch.step or 0) >= 5, timeout=30), watch.child_log_tail()
            assert watch.status() == "running"
            await pilot.press("s")
            assert await wait_until(pilot, lambda: watch.status() == "stopped", timeout=30)
            stopped_at = watch.step
            assert watch.checkpoints()[-1] == f"step_{stopped_at:08d}"  # written on the way out
            assert watch.child.wait(10) == 0
            assert await wait_until(pilot, lambda: "stopped" in screen_text(app))  # the next refresh

            await pilot.press("r")
            assert watch.status() == "running"  # our child, before it writes its "resumed" record
            resumed_child = watch.child
            await pilot.press("r")  # refused: never two trainers on one folder
            assert watch.child is resumed_child
            assert await wait_until(pilot, lambda: (watch.step or 0) >= stopped_at + 5, timeout=30)
            steps = [r["step"] for r in read_metrics(watch.run_dir) if r["kind"] == "train"]
            assert steps == list(range(1, len(steps) + 1))  # one continuous run across the resume
            statuses = [r["status"] for r in read_metrics(watch.run_dir) if r["kind"] == "run"]
            assert statuses[:3] == ["started", "stopped", "resumed"]
            await pilot.press("s")
            assert await wait_until(pilot, lambda: watch.status() == "stopped", timeout=30)
            assert watch.child.wait(10) == 0

    asyncio.run(body())


def test_a_case_that_fails_shows_why(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"name": "broken", "optimizer": {"lr": -1}}')

    async def body():
        app = make_app(runs_dir=tmp_path / "runs", refresh_s=0.1, system_stats=FakeStats(), hub_roots=[],
                       cwd=tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("n", *"missing.json", "enter")
            assert "no such case file" in flat(screen_text(app))
            app.screen.query_one("Input").value = ""
            await pilot.press(*bad.name, "enter")
            watch = app.screen.watch_
            assert await wait_until(pilot, lambda: watch.status() == "failed", timeout=30)
            await pilot.pause(0.3)
            assert "optimizer.lr" in flat(screen_text(app))

    asyncio.run(body())
