"""Pilot tests of the dashboard: keys pressed, widgets and screen text asserted, headless at 80x24."""

import asyncio
import os
import time

import numpy as np
import pytest

from koifish_app.tui.app import make_app
from koifish_app.tui.chart_data import moving_average
from koifish_app.tui.compare import CompareScreen
from koifish_app.tui.help import HelpScreen
from koifish_app.tui.home import HomeScreen
from koifish_app.tui.run import RunScreen
from koifish_app.tui.widgets.alert_badge import AlertBadge
from koifish_app.tui.widgets.loss_chart import LossChart
from koifish_core.train.metrics import read_metrics
from tests.tui_fixtures import FakeStats, append_records, train_record, write_run

SIZE = (80, 24)


def screen_text(app) -> str:
    """What the terminal shows, as plain text lines."""
    return "\n".join("".join(seg.text for seg in strip) for strip in app.screen._compositor.render_strips())


def flat(text: str) -> str:
    """Screen text with line breaks and runs of spaces collapsed (long messages wrap)."""
    return " ".join(text.split())


def run(coro):
    return asyncio.run(coro)


def app_for(tmp_path, run_dir=None, refresh_s=0.1, **kw):
    return make_app(run_dir=run_dir, runs_dir=tmp_path / "runs", refresh_s=refresh_s, system_stats=FakeStats(),
                    hub_roots=[], **kw)


async def wait_until(pilot, condition, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await pilot.pause(0.05)
    return True


def test_home_lists_runs_with_status_step_and_loss(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "alpha", steps=30, total=50, status="finished")
    write_run(runs / "beta", steps=12, total=100, status="failed", case="other")
    write_run(runs / "gamma", steps=7, total=100, pid=os.getpid())
    (runs / "not-a-run").mkdir()

    async def body():
        app = app_for(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert isinstance(app.screen, HomeScreen)
            assert app.screen.run_dirs == [runs / "alpha", runs / "beta", runs / "gamma"]
            text = screen_text(app)
            lines = {name: next(line for line in text.splitlines() if f" {name} " in line)
                     for name in ("alpha", "beta", "gamma")}
            assert "finished" in lines["alpha"] and "30/50" in lines["alpha"]
            assert f"{5.0 - 0.3:.4g}" in lines["alpha"]
            assert "failed" in lines["beta"] and "other" in lines["beta"]
            assert "running" in lines["gamma"] and "7/100" in lines["gamma"]
            assert "not-a-run" not in text
            assert "models for chat" in text and "none found" in text
            await pilot.press("down", "enter")  # opens beta
            assert isinstance(app.screen, RunScreen) and app.screen.watch_.name == "beta"
            assert "boom: out of memory" in flat(screen_text(app))

    run(body())


def test_run_screen_shows_loss_and_follows_appended_lines_within_a_second(tmp_path):
    run_dir = tmp_path / "runs" / "live"
    records = write_run(run_dir, steps=40, total=100, pid=os.getpid())
    t0 = records[0]["time"]

    async def body():
        app = app_for(tmp_path, run_dir=run_dir, refresh_s=1.0)  # the real refresh period
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            screen = app.screen
            chart = screen.query_one(LossChart)
            train = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
            assert chart.drawn[0].label == "train"
            assert chart.drawn[0].x[-1] == 40 and chart.drawn[0].y[-1] == pytest.approx(train[-1]["loss"])
            text = screen_text(app)
            assert "step 40/100" in text and f"{train[-1]['loss']:.4g}" in text
            append_records(run_dir, [train_record(s, t0, loss=2.0 + 0.001 * s) for s in range(41, 51)])
            appended = time.monotonic()
            assert await wait_until(pilot, lambda: chart.drawn and chart.drawn[0].x[-1] == 50, timeout=2.0)
            assert time.monotonic() - appended < 1.5
            assert chart.drawn[0].y[-1] == pytest.approx(2.05)
            text = screen_text(app)
            assert "step 50/100" in text and "2.05" in text
            assert screen.refresh_ms is not None and screen.refresh_ms < 100

    run(body())


def test_alert_badge_stays_until_acknowledged(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    records = write_run(run_dir, steps=20, pid=os.getpid())
    t0 = records[0]["time"]

    async def body():
        app = app_for(tmp_path, run_dir=run_dir)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            badge = app.screen.query_one(AlertBadge)
            assert not badge.has_class("-alert") and "no alerts" in screen_text(app)
            append_records(run_dir, [{"kind": "event", "step": 21, "time": t0 + 21, "signal": "grad_spike",
                                      "value": 812.5, "action": "clip"}, train_record(21, t0)])
            assert await wait_until(pilot, lambda: badge.has_class("-alert"))
            await pilot.pause(0.5)  # several refreshes later, still there
            text = screen_text(app)
            assert badge.has_class("-alert") and "1 alert" in text
            assert "grad_spike" in text and "812.5" in text and "clip" in text
            await pilot.press("a")
            assert not badge.has_class("-alert") and "no alerts" in screen_text(app)
            assert "grad_spike" in screen_text(app)  # the list keeps the event, unhighlighted
            append_records(run_dir, [{"kind": "event", "step": 22, "time": t0 + 22, "signal": "loss_spike",
                                      "value": "nan", "action": "skip"}])
            assert await wait_until(pilot, lambda: badge.has_class("-alert"))
            assert "1 alert" in screen_text(app)

    run(body())


def test_stop_key_creates_the_stop_file_only_for_a_live_run(tmp_path):
    live, done = tmp_path / "runs" / "live", tmp_path / "runs" / "done"
    write_run(live, steps=5, pid=os.getpid())
    write_run(done, steps=5, status="finished")

    async def body():
        app = app_for(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            await pilot.press("enter")  # done (sorted first)
            await pilot.press("s")
            assert not (done / "STOP").exists()
            await pilot.press("escape", "down", "enter")
            assert app.screen.watch_.name == "live"
            await pilot.press("s")
            assert (live / "STOP").exists()

    run(body())


def test_bad_run_folders_give_a_message_not_a_traceback(tmp_path):
    garbage = tmp_path / "runs" / "garbage"
    write_run(garbage, steps=3)
    with open(garbage / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    (tmp_path / "afile").write_text("x")

    async def body():
        for target, expected in ((tmp_path / "nope", "no such run folder"), (tmp_path / "afile", "not a folder"),
                                 (tmp_path / "runs", "no metrics.jsonl yet"), (garbage, "1 unreadable line")):
            app = app_for(tmp_path, run_dir=target)
            async with app.run_test(size=SIZE) as pilot:
                await pilot.pause()
                assert isinstance(app.screen, RunScreen)
                assert expected in flat(screen_text(app))
        app = make_app(runs_dir=tmp_path / "absent", system_stats=FakeStats(), hub_roots=[])
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert "no such folder" in flat(screen_text(app))

    run(body())


def test_80x24_layout_shows_chart_values_gpu_and_footer(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    write_run(run_dir, steps=40, total=100, status="finished")

    async def body():
        app = app_for(tmp_path, run_dir=run_dir)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            text = screen_text(app)
            assert len(text.splitlines()) == 24 and all(len(line) <= 80 for line in text.splitlines())
            for expected in ("finished", "step 40/100", "40.0G/80.0G", "97%", "71°C", "512/700W", "Stop", "Ack",
                             "Resume", "Help", "Quit", "x: step"):
                assert expected in text, expected
            svg = app.export_screenshot()
            assert svg.startswith("<svg") and "Fake&#160;H100" in svg and "finished" in svg

    run(body())


def test_chart_toggles_log_scale_smoothing_and_token_axis(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    write_run(run_dir, steps=60, status="finished")
    loss = np.array([r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"])

    async def body():
        app = app_for(tmp_path, run_dir=run_dir)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            chart = app.screen.query_one(LossChart)
            await pilot.press("m")  # smoothing 10
            np.testing.assert_allclose(chart.drawn[0].y, moving_average(loss, 10), rtol=1e-12)
            assert "smooth 10" in screen_text(app)
            await pilot.press("l")
            assert app.screen.options.log_y and "log" in screen_text(app)
            await pilot.press("x")
            assert chart.drawn[0].x[-1] == 60 * 1024  # tokens seen at step 60
            assert chart.drawn[1].label == "eval" and chart.drawn[1].x == [20 * 1024, 40 * 1024, 60 * 1024]

    run(body())


def test_eoe_events_mark_the_chart_and_show_the_expert(tmp_path):
    run_dir = tmp_path / "runs" / "eoe"
    records = write_run(run_dir, steps=30, status="finished")
    t0 = records[0]["time"]
    append_records(run_dir, [{"kind": "event", "step": 12, "time": t0 + 12, "signal": "expert_switch", "expert": 1,
                              "action": "switch"},
                             {"kind": "event", "step": 25, "time": t0 + 25, "signal": "evolution", "expert": 3,
                              "action": "evolve"}])

    async def body():
        app = app_for(tmp_path, run_dir=run_dir)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert app.screen.query_one(LossChart).marks == [12.0, 25.0]
            assert not app.screen.query_one(AlertBadge).has_class("-alert")  # marks are not alerts
            assert "expert" in screen_text(app)

    run(body())


def test_help_lists_bindings_with_ids_and_compare_overlays_runs(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "a", steps=20, status="finished")
    write_run(runs / "b", steps=30, status="finished")
    write_run(runs / "c", steps=10, status="finished")

    async def body():
        app = app_for(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            text = screen_text(app)
            assert "home.compare" in text and "app.quit" in text and "home.open" in text
            await pilot.press("escape")
            assert isinstance(app.screen, HomeScreen)
            await pilot.press("space", "down", "space", "c")  # mark a and b
            assert isinstance(app.screen, CompareScreen)
            chart = app.screen.query_one(LossChart)
            assert [d.label for d in chart.drawn] == ["a train", "b train"]
            assert chart.drawn[1].x[-1] == 30
            text = screen_text(app)
            assert "loss 4.8" in text and "loss 4.7" in text

    run(body())


def test_a_long_backlog_is_read_off_the_ui_thread(tmp_path, monkeypatch):
    import koifish_app.tui.home as home
    import koifish_app.tui.run as run_screen

    monkeypatch.setattr(run_screen, "BACKLOG_BYTES", 1000)
    monkeypatch.setattr(home, "BACKLOG_BYTES", 1000)
    runs = tmp_path / "runs"
    write_run(runs / "long", steps=300, total=300, status="finished")
    write_run(runs / "long2", steps=200, total=300, status="finished")

    async def body():
        app = app_for(tmp_path, run_dir=runs / "long")
        async with app.run_test(size=SIZE) as pilot:
            chart = app.screen.query_one(LossChart)
            assert await wait_until(pilot, lambda: chart.drawn and chart.drawn[0].x[-1] == 300)
            assert "step 300/300" in screen_text(app)
            await pilot.press("escape")
            assert await wait_until(pilot, lambda: "200/300" in screen_text(app))

    run(body())


def test_following_100k_steps_refreshes_under_100ms(tmp_path):
    run_dir = tmp_path / "runs" / "long"
    records = write_run(run_dir, steps=100_000, total=200_000, pid=os.getpid())
    t0 = records[0]["time"]

    async def body():
        app = app_for(tmp_path, run_dir=run_dir, refresh_s=0.2)
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            chart = screen.query_one(LossChart)
            assert await wait_until(pilot, lambda: chart.drawn and chart.drawn[0].x[-1] == 100_000, timeout=20)
            append_records(run_dir, [train_record(s, t0) for s in range(100_001, 100_011)])
            assert await wait_until(pilot, lambda: chart.drawn[0].x[-1] == 100_010)
            start = time.perf_counter()
            screen.refresh_data()  # a refresh with new data: read, recompute the curves, redraw
            chart._key = None
            chart.show_runs([screen.watch_], screen.options)
            chart.render()
            assert 1000 * (time.perf_counter() - start) < 100

    run(body())
