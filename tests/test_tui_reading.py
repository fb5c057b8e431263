"""The TUI's readers: incremental metrics tail, run status, chart data, machine stats, model folders."""

import json
import os
import time

import numpy as np
import pytest

from koifish_app.tui.chart_data import curve, downsample, moving_average
from koifish_app.tui.metrics_tail import MetricsTail
from koifish_app.tui.model_folders import find_model_folders
from koifish_app.tui.run_control import ControlError, free_run_dir, request_stop, resume
from koifish_app.tui.run_watch import RunWatch
from koifish_app.tui.system_stats import SystemStats
from koifish_core.train.metrics import MetricsWriter, read_metrics
from tests.tui_fixtures import append_records, train_record, write_run


def test_tail_reads_only_appended_complete_lines(tmp_path):
    writer = MetricsWriter(tmp_path)
    tail = MetricsTail(tmp_path)
    assert tail.poll().records == []
    writer.write("train", 1, loss=3.0)
    writer.write("train", 2, loss=float("nan"))  # written as "nan": still one JSON line
    first = tail.poll()
    assert [r["step"] for r in first.records] == [1, 2] and not first.restarted
    assert tail.poll().records == []  # nothing new: nothing read again
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "lo')  # the writer mid-line
        f.flush()
        assert tail.poll().records == []
        f.write('ss": 2.5}\nnot json\n')
    third = tail.poll()
    assert third.records == [{"kind": "train", "step": 3, "loss": 2.5}]
    assert tail.bad_lines == 1
    writer.close()
    # Everything the tail saw equals what the trainer-side reader sees.
    assert [r["step"] for r in first.records + third.records] == [r["step"] for r in read_metrics(tmp_path)]


def test_tail_starts_over_when_the_file_is_replaced(tmp_path):
    records = write_run(tmp_path / "r", steps=30)
    tail = MetricsTail(tmp_path / "r")
    assert len(tail.poll().records) == len(records)
    with MetricsWriter(tmp_path / "r") as w:  # resume: the trainer rewrites the file up to its checkpoint
        w.truncate_after(10)
    again = tail.poll()
    assert again.restarted
    assert [r["step"] for r in again.records if r["kind"] == "train"] == list(range(1, 11))


def test_watch_status_from_records_pid_and_freshness(tmp_path):
    done = RunWatch(tmp_path / "done")
    write_run(done.run_dir, steps=5, status="finished")
    done.poll()
    assert done.status() == "finished"

    failed = RunWatch(tmp_path / "failed")
    write_run(failed.run_dir, steps=5, status="failed")
    failed.poll()
    assert failed.status() == "failed"

    live = RunWatch(tmp_path / "live")
    write_run(live.run_dir, steps=5, pid=os.getpid())
    live.poll()
    assert live.status(now=time.time() + 3600) == "running"  # the pid decides, however old the file

    dead = RunWatch(tmp_path / "dead")
    write_run(dead.run_dir, steps=5, pid=2**22 + 12345)  # above pid_max on Linux: never a live process
    dead.poll()
    assert dead.status() == "unknown"

    no_pid = RunWatch(tmp_path / "nopid")
    write_run(no_pid.run_dir, steps=5)
    no_pid.poll()
    assert no_pid.status() == "running"  # just written
    assert no_pid.status(now=time.time() + 3600) == "unknown"  # silent for an hour, nothing to ask

    missing = RunWatch(tmp_path / "nope")
    missing.poll()
    assert missing.status() == "missing" and "no such run folder" in missing.error


def test_watch_series_progress_alerts_and_marks(tmp_path):
    t0 = 1_000_000.0
    events = [
        {"kind": "event", "step": 7, "time": t0 + 7, "signal": "loss_spike", "value": "inf", "action": "skip"},
        {"kind": "event", "step": 9, "time": t0 + 9, "signal": "expert_switch", "expert": 2, "action": "switch"},
    ]
    write_run(tmp_path / "r", steps=40, total=100, events=events, t0=t0)
    w = RunWatch(tmp_path / "r")
    assert w.poll()
    assert w.step == 40 and w.total_steps == 100 and w.case_name == "tiny"
    assert w.latest_loss == pytest.approx(5.0 - 0.4)
    assert w.latest_eval == pytest.approx(4.9 - 0.01 * 40)
    assert w.seconds_per_step() == pytest.approx(1.0)  # records one second apart
    assert w.eta_s() == pytest.approx(60.0)
    assert [a["signal"] for a in w.alerts] == ["loss_spike"] and w.unacked == 1
    assert [m["step"] for m in w.marks] == [9] and w.active_expert == 2
    assert not w.poll()  # nothing changed on disk
    w.acknowledge()
    assert w.unacked == 0
    append_records(w.run_dir, [train_record(41, t0, expert=3)])
    assert w.poll() and w.step == 41 and w.active_expert == 3


def test_moving_average_and_downsample_against_loops():
    rng = np.random.default_rng(0)
    y = rng.normal(size=503)
    y[17] = np.nan
    for window in (1, 10, 50):
        ref = []
        for i in range(len(y)):
            part = y[max(0, i - window + 1): i + 1]
            part = part[np.isfinite(part)]
            ref.append(part.mean() if len(part) else np.nan)
        np.testing.assert_allclose(moving_average(y, window), ref, rtol=1e-12, atol=1e-12)
    x = np.arange(1000, dtype=np.float64)
    v = rng.normal(size=1000)
    xs, ys = downsample(x, v, 100)
    assert len(xs) <= 100 and xs[-1] == 999 and ys[-1] == v[-1]
    # x is 0..999, so a bucket [a, b) has mean x (a + b - 1) / 2: the buckets must tile [0, 999).
    start = 0
    for xi, yi in zip(xs[:-1], ys[:-1]):
        end = round(2 * xi + 1 - start)
        assert end > start and abs(x[start:end].mean() - xi) < 1e-9
        assert abs(v[start:end].mean() - yi) < 1e-12
        start = end
    assert start == 999
    cx, cy = curve(x, np.linspace(-1, 1, 1000), 0, 2000, log_y=True)
    assert min(cy) > 0 and len(cx) == 500  # a log axis drops values <= 0


def test_system_stats_fall_back_to_proc(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # as on a machine without nvidia-ml-py
    (tmp_path / "meminfo").write_text("MemTotal:       16000000 kB\nMemFree: 1 kB\nMemAvailable:    4000000 kB\n")
    (tmp_path / "stat").write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 1 1 1\n")
    stats = SystemStats(proc=str(tmp_path))
    first = stats.read()
    assert first.gpus == [] and first.note.startswith("no GPU")
    assert first.cpu_percent is None  # needs two readings
    assert first.ram_used == 12_000_000 * 1024 and first.ram_total == 16_000_000 * 1024
    (tmp_path / "stat").write_text("cpu  160 0 120 820 0 0 0 0 0 0\n")  # +80 busy, +20 idle
    assert stats.read().cpu_percent == pytest.approx(80.0)


def test_model_folders_from_models_dir_and_hub_cache(tmp_path):
    models = tmp_path / "models"
    (models / "my-qwen").mkdir(parents=True)
    (models / "my-qwen" / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (models / "not-a-model").mkdir()
    hub = tmp_path / "hub"
    repo = hub / "models--Qwen--Qwen3-0.6B"
    for commit in ("aaa", "bbb"):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaa")
    found = find_model_folders(models, hub_roots=[hub, tmp_path / "absent"])
    assert [(m.name, m.source, m.model_type) for m in found] == [("my-qwen", "models-dir", "qwen3"),
                                                                 ("Qwen/Qwen3-0.6B", "hf-cache", "qwen3")]
    assert found[1].path == repo / "snapshots" / "aaa"  # refs/main wins


def test_control_refuses_what_cannot_be_done(tmp_path):
    finished = RunWatch(tmp_path / "done")
    write_run(finished.run_dir, steps=5, status="finished")
    finished.poll()
    with pytest.raises(ControlError, match="finished"):
        request_stop(finished)
    with pytest.raises(ControlError, match="nothing to resume"):
        resume(finished)
    assert not (finished.run_dir / "STOP").exists()
    stopped = RunWatch(tmp_path / "stopped")
    write_run(stopped.run_dir, steps=5, status="stopped")
    stopped.poll()
    with pytest.raises(ControlError, match="no complete checkpoint"):
        resume(stopped)
    live = RunWatch(tmp_path / "live")
    write_run(live.run_dir, steps=5, pid=os.getpid())
    live.poll()
    assert "stop requested" in request_stop(live) and (live.run_dir / "STOP").exists()
    assert "already requested" in request_stop(live)
    with pytest.raises(ControlError, match="stop it before resuming"):
        resume(live)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    assert free_run_dir(tmp_path / "runs", "tiny") == tmp_path / "runs" / "tiny-2"
