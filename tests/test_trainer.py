"""The trainer: exact resume, stop requests, accumulation, checkpoints, AdamW, schedules."""

import json
import shutil

import numpy as np
import pytest

from koifish_core.config import load_case
from koifish_core.config.schema import ScheduleConfig
from koifish_core.errors import CheckpointError, KoifishError
from koifish_core.train import checkpoint
from koifish_core.train.metrics import read_metrics
from koifish_core.train.schedule import lr_at
from koifish_core.train.trainer import STOP_FILE, train


def _losses(run_dir, kind="train"):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["kind"] == kind]


def test_learns_and_writes_the_run_folder(tmp_path, tiny_case):
    res = train(load_case(tiny_case(train={"steps": 40})), tmp_path / "run")
    losses = _losses(tmp_path / "run")
    assert len(losses) == 40 and losses[-1][1] < losses[0][1] - 0.5
    assert res.final_val_loss is not None and res.tokens_per_s > 0
    kinds = [r["kind"] for r in read_metrics(tmp_path / "run")]
    assert kinds[0] == "run" and kinds[-1] == "run" and "eval" in kinds
    for f in ("case.json", "env.json"):
        json.loads((tmp_path / "run" / f).read_text())
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "run")] == ["step_00000035", "step_00000040"]
    rec = read_metrics(tmp_path / "run", kinds=("train",))[-1]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "time", "tokens"} <= set(rec)


def _stop_at(run, step):
    def on_log(rec):
        if rec["kind"] == "train" and rec["step"] == step:
            (run / STOP_FILE).write_text("")
    return on_log


def test_resume_is_bit_identical(tmp_path, tiny_case):
    case = tiny_case(train={"steps": 40}, checkpoint={"every": 15})
    train(load_case(case), tmp_path / "unbroken")
    stopped = train(load_case(case), tmp_path / "broken", on_log=_stop_at(tmp_path / "broken", 20))
    assert stopped.status == "stopped" and stopped.steps == 20
    train(load_case(case), tmp_path / "broken", resume=True)
    assert _losses(tmp_path / "broken") == _losses(tmp_path / "unbroken")
    assert _losses(tmp_path / "broken", "eval") == _losses(tmp_path / "unbroken", "eval")
    a, _, _ = checkpoint.load(checkpoint.latest(tmp_path / "broken"))
    b, _, _ = checkpoint.load(checkpoint.latest(tmp_path / "unbroken"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_stop_file_checkpoints_and_stops(tmp_path, tiny_case):
    run = tmp_path / "run"
    seen = []
    stop = _stop_at(run, 7)

    def on_log(rec):
        seen.append(rec)
        stop(rec)

    res = train(load_case(tiny_case()), run, on_log=on_log)
    assert res.status == "stopped" and res.steps == 7
    assert checkpoint.latest(run).name == "step_00000007"
    assert seen[-1]["kind"] == "run" and seen[-1]["status"] == "stopped"
    res = train(load_case(tiny_case()), run, resume=True)
    assert res.status == "finished" and res.steps == 12


def test_refuses_to_overwrite_a_run(tmp_path, tiny_case):
    train(load_case(tiny_case(train={"steps": 3})), tmp_path / "run")
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(KoifishError, match="already holds a run"):
        train(load_case(tiny_case(train={"steps": 3})), tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before


def test_resume_without_checkpoint(tmp_path, tiny_case):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(load_case(tiny_case()), tmp_path / "empty", resume=True)


def test_accumulation_equals_a_bigger_batch(tmp_path, tiny_case):
    from koifish_core.engine.cpu import CPUEngine
    from koifish_core.data.loader import TokenLoader

    big = load_case(tiny_case(data={"batch_size": 4})).case
    acc = load_case(tiny_case(optimizer={"grad_accum": 2})).case
    e1, e2 = CPUEngine(big), CPUEngine(acc)
    x, y = TokenLoader(big.data.train, 4, 16).next_batch()
    r1 = e1.train_step([(x, y)], 1e-2)
    r2 = e2.train_step([(x[:2], y[:2]), (x[2:], y[2:])], 1e-2)
    assert abs(r1.loss - r2.loss) < 1e-6 and abs(r1.grad_norm - r2.grad_norm) < 1e-5
    assert np.allclose(e1.model.params, e2.model.params, atol=1e-6)


def test_half_written_checkpoint_is_ignored(tmp_path, tiny_case):
    run = tmp_path / "run"
    train(load_case(tiny_case(train={"steps": 5})), run)
    good = checkpoint.latest(run)
    crashed = run / "checkpoints" / ".tmp-step_00000010-999"
    shutil.copytree(good, crashed)
    (crashed / "state.json").unlink()
    partial = run / "checkpoints" / "step_00000011"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"x")
    assert checkpoint.latest(run) == good


def test_damaged_checkpoints_give_clear_errors(tmp_path, tiny_case):
    from koifish_core.engine.cpu import CPUEngine

    run = tmp_path / "run"
    train(load_case(tiny_case(train={"steps": 5})), run)
    ck = checkpoint.latest(run)
    st = ck / "model.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        checkpoint.load(ck)
    other = CPUEngine(load_case(tiny_case(model={"n_embd": 32})).case)
    tensors = {k: v for k, v in other.model_tensors().items()}
    with pytest.raises(CheckpointError, match="has shape"):
        CPUEngine(load_case(tiny_case()).case).load_tensors(tensors, None, "x")


def test_adamw_matches_torch():
    torch = pytest.importorskip("torch")
    from koifish_cuda.adamw import adamw_update_ref

    rng = np.random.default_rng(0)
    p = rng.standard_normal(50)
    mask = rng.random(50) < 0.5
    m, v = np.zeros(50), np.zeros(50)
    tp = [torch.tensor(p[mask], requires_grad=True), torch.tensor(p[~mask], requires_grad=True)]
    opt = torch.optim.AdamW([{"params": [tp[0]], "weight_decay": 0.1}, {"params": [tp[1]], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for step in range(1, 6):
        g = rng.standard_normal(50)
        adamw_update_ref(p, g, m, v, mask, step, 1e-2, 0.9, 0.95, 1e-8, 0.1)
        tp[0].grad, tp[1].grad = torch.tensor(g[mask]), torch.tensor(g[~mask])
        opt.step()
    assert np.allclose(p[mask], tp[0].detach().numpy(), atol=1e-12)
    assert np.allclose(p[~mask], tp[1].detach().numpy(), atol=1e-12)


def test_schedules():
    cos = ScheduleConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert lr_at(0, 100, 1.0, cos) == pytest.approx(0.1) and lr_at(9, 100, 1.0, cos) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0, cos) == pytest.approx(0.1)
    assert lr_at(10 + 89 // 2, 100, 1.0, cos) == pytest.approx(0.55, abs=0.02)
    lin = ScheduleConfig(warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    assert lr_at(0, 11, 2.0, lin) == 2.0 and lr_at(5, 11, 2.0, lin) == pytest.approx(1.0) and lr_at(10, 11, 2.0, lin) == 0.0
    const = ScheduleConfig(warmup_steps=2, decay="constant")
    assert lr_at(50, 100, 3.0, const) == 3.0
