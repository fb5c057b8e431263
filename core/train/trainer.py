"""The training loop: case -> engine -> steps -> metrics.jsonl and checkpoints in RUN_DIR.

The loop is the same on every engine; what a step costs is the engine's business. Everything the
user sees comes from the records written here (the CLI renders them through `on_log`).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from koifish_core.config.load import LoadedCase, case_to_dict
from koifish_core.data.loader import TokenLoader, eval_batches, resolve_paths
from koifish_core.errors import CheckpointError, KoifishError
from koifish_core.train import checkpoint
from koifish_core.train.metrics import MetricsWriter
from koifish_core.train.schedule import lr_at

STOP_FILE = "STOP"
PID_FILE = "run.pid"


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    final_val_loss: float | None
    tokens_per_s: float
    run_dir: Path
    status: str = "finished"


def make_engine(case, device: str):
    if case.model.arch != "gpt2":
        raise KoifishError(f"model.arch {case.model.arch!r}: koifish trains GPT-2 models; "
                           f"{case.model.arch} runs with `koifish chat`, `eval` and `generate`")
    if device == "cpu":
        from koifish_core.engine.cpu import CPUEngine

        return CPUEngine(case)
    try:
        from koifish_core.engine.cuda_gpt2 import CUDAEngine
    except ImportError as e:
        raise KoifishError(f"--device cuda: the GPU engine cannot start here ({e}); install koifish[cuda12] or "
                           "koifish[cuda13] on a machine with an NVIDIA GPU, or use --device cpu") from None
    return CUDAEngine(case)


def _environment(device: str) -> dict:
    import koifish_core

    env = {"koifish": _version(), "python": sys.version.split()[0], "numpy": np.__version__,
           "platform": platform.platform(), "cpus": os.cpu_count(), "device": device,
           "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        import subprocess

        root = Path(koifish_core.__path__[0]).parent
        env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                       timeout=5).stdout.strip() or None
    except (OSError, ValueError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("koifish")
    except PackageNotFoundError:
        return "unknown"


class _StopFlag:
    """SIGINT/SIGTERM or a RUN_DIR/STOP file ask the loop to checkpoint and stop after this step."""

    def __init__(self, run_dir: Path):
        self.stop_file = run_dir / STOP_FILE
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a test runner's worker): files only
                pass
        return self

    def _handler(self, signum, frame):
        if self.requested:  # a second Ctrl-C: the user insists
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def check(self) -> bool:
        if self.stop_file.exists():
            self.requested = True
        return self.requested


def _evaluate(engine, val_paths, case, world: int = 1) -> tuple[float, int]:
    """Mean loss over the first eval.batches global batches, read in per-rank pieces (the same
    tokens whatever the number of ranks)."""
    total, tokens = 0.0, 0
    B = case.data.batch_size // world
    for x, y in eval_batches(val_paths, B, case.data.seq_len, case.eval.batches * world):
        total += engine.eval_loss(x, y) * y.size
        tokens += y.size
    return total / max(tokens, 1), tokens


@dataclass
class DistContext:
    """This process's place in a data-parallel run; only rank 0 writes files."""
    rank: int = 0
    world_size: int = 1
    collective: object = None


def _rows(batches, rank: int, world: int):
    """Rank r trains on rows r*B/W .. (r+1)*B/W of every global batch: the data position, and so
    every checkpoint, is independent of the number of ranks."""
    if world == 1:
        return batches
    b = batches[0][0].shape[0] // world
    return [(x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]) for x, y in batches]


def train(loaded: LoadedCase, run_dir: str | Path, steps: int | None = None, device: str = "cpu",
          resume: bool = False, on_log=None, inject=None, dist: DistContext | None = None) -> TrainResult:
    case = loaded.case
    run_dir = Path(run_dir)
    dist = dist or DistContext()
    main, world = dist.rank == 0, dist.world_size
    if case.data.batch_size % world:
        raise KoifishError(f"data.batch_size {case.data.batch_size} does not split evenly over {world} ranks")
    total_steps = steps or case.train.steps
    metrics_path = run_dir / "metrics.jsonl"
    if main and not resume and metrics_path.exists():
        raise KoifishError(f"{run_dir} already holds a run; use --resume to continue it or choose another --out")
    ckpt = None
    if resume:
        ckpt = checkpoint.latest(run_dir)
        if ckpt is None:
            why = "it has metrics but no complete checkpoint" if metrics_path.exists() else "it holds no run"
            raise CheckpointError(f"{run_dir}: nothing to resume: {why} (looked in {run_dir / checkpoint.CHECKPOINTS})")

    # Open the data before touching the run folder: a bad glob must not leave a half-made run.
    train_loader = TokenLoader(case.data.train, case.data.batch_size, case.data.seq_len, max_shards=case.data.max_shards)
    val_paths = resolve_paths(case.data.val) if case.data.val else None
    if world > 1:  # the engine holds one rank's rows
        import copy

        rank_case = copy.deepcopy(case)
        rank_case.data.batch_size //= world
        engine = make_engine(rank_case, device)
        engine.attach_collective(dist.collective, case.dist)
    else:
        engine = make_engine(case, device)
    from koifish_core.train.run_hooks import RunHooks

    hooks = RunHooks(case, inject or [], run_dir, log=lambda *a, **k: log(*a, **k))
    engine.watch_weights(hooks.cfg.enabled)  # after_step asks nonfinite_tensor every step
    if case.checkpoint.init_from and not resume:
        _init_from(engine, case.checkpoint.init_from)

    start_step, tokens_seen, best_val = 0, 0, None
    rng = np.random.default_rng(case.seed)  # for whatever in training draws random numbers
    if ckpt is not None:
        model_t, optim_t, state = checkpoint.load(ckpt)
        engine.load_tensors(model_t, optim_t, ckpt)
        train_loader.load_state(state["loader"])
        rng.bit_generator.state = state["rng"]
        start_step, tokens_seen, best_val = state["step"], state["tokens"], state.get("best_val_loss")
        if start_step >= total_steps:
            raise KoifishError(f"{run_dir}: the newest checkpoint is at step {start_step}; "
                               f"ask for more steps (--steps > {start_step}) to continue")

    writer = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / STOP_FILE).unlink(missing_ok=True)
        (run_dir / PID_FILE).write_text(str(os.getpid()))
        resolved = case_to_dict(case)
        resolved["train"]["steps"] = total_steps
        resolved["train"]["device"] = device
        (run_dir / "case.json").write_text(json.dumps(resolved, indent=2) + "\n")
        if ckpt is None:
            env = dict(_environment(device), case_source=loaded.source, case_format=loaded.format, ranks=world)
            attn = getattr(engine, "attn", None)  # the CUDA engine: which attention runs, and why not cuDNN's
            if attn is not None:
                env["attention"] = {"path": attn.name, "note": engine.attn_note}
            (run_dir / "env.json").write_text(json.dumps(env, indent=2) + "\n")
        writer = MetricsWriter(run_dir)
        if ckpt is not None:
            writer.truncate_after(start_step)

    def log(kind, step, **fields):
        if writer is None:  # ranks other than 0 write nothing
            return {"kind": kind, "step": step, **fields}
        rec = writer.write(kind, step, **fields)
        if on_log is not None:
            on_log(rec)
        return rec

    def save(step):
        # A sharded optimizer (ZeRO-1) gathers its state from every rank; only rank 0 writes.
        optim = engine.optim_tensors() if engine.shards_optimizer else None
        if not main:
            return
        state = {"loader": train_loader.state(), "rng": rng.bit_generator.state, "tokens": tokens_seen,
                 "best_val_loss": best_val, "case_name": case.name, "koifish": _version()}
        checkpoint.save(run_dir, step, engine.model_tensors(), optim if optim is not None else engine.optim_tensors(),
                        state, case.checkpoint.keep_last)

    def stop_agreed(stop) -> bool:
        if world == 1:
            return stop.check()
        flag = np.array([1.0 if stop.check() else 0.0])  # every rank must stop at the same step
        dist.collective.all_reduce_mean(flag)
        return flag[0] > 0

    log("run", start_step, status="resumed" if ckpt else "started", case=case.name, device=device,
        parameters=engine.n_params, total_steps=total_steps)
    if ckpt is None and hooks.cfg.enabled:
        save(0)  # the initial weights: a rollback before the first periodic checkpoint has somewhere to go
    accum = case.optimizer.grad_accum
    tokens_per_step = case.data.batch_size * case.data.seq_len * accum
    loss = val_loss = None
    train_time, status, step = 0.0, "finished", start_step
    try:
        with _StopFlag(run_dir) as stop:
            for step in range(start_step + 1, total_steps + 1):
                lr = lr_at(step - 1, total_steps, case.optimizer.lr, case.schedule) * hooks.lr_factor(step)
                batches = hooks.before_step(step, [train_loader.next_batch() for _ in range(accum)])
                batches = _rows(batches, dist.rank, world)
                t0 = time.perf_counter()
                result = engine.train_step(batches, lr, gate=hooks.gate(step), poison_grads=hooks.poison_grads(step))
                dt = time.perf_counter() - t0
                train_time += dt
                tokens_seen += tokens_per_step
                loss = result.loss
                extra = hooks.train_fields() if result.applied else {"skipped": True}
                log("train", step, loss=loss, lr=lr, grad_norm=result.grad_norm, tokens=tokens_seen,
                    tokens_per_s=tokens_per_step / dt, step_ms=dt * 1000.0, **extra)
                hooks.after_step(step, result, engine, train_loader)
                last = step == total_steps
                if main and val_paths and ((case.eval.every and step % case.eval.every == 0) or last):
                    val_loss, n = _evaluate(engine, val_paths, case, world)
                    best_val = val_loss if best_val is None else min(best_val, val_loss)
                    log("eval", step, loss=val_loss, tokens=n)
                if stop_agreed(stop):
                    save(step)
                    status = "stopped"
                    log("run", step, status="stopped", message="stop requested; checkpoint written")
                    break
                if last or (case.checkpoint.every and step % case.checkpoint.every == 0):
                    save(step)
    except KoifishError as e:
        log("run", step, status="failed", message=str(e))
        raise
    except Exception as e:
        log("run", step, status="failed", message=f"{type(e).__name__}: {e}")
        raise
    finally:
        if writer is not None:
            writer.close()
            (run_dir / PID_FILE).unlink(missing_ok=True)
    if status == "finished" and main:
        with MetricsWriter(run_dir) as w:
            rec = w.write("run", step, status="finished", tokens=tokens_seen)
        if on_log is not None:
            on_log(rec)
    done = step - start_step
    return TrainResult(steps=step, final_loss=loss, final_val_loss=val_loss,
                       tokens_per_s=done * tokens_per_step / train_time if train_time else 0.0,
                       run_dir=run_dir, status=status)


def _init_from(engine, source: str) -> None:
    from koifish_core.models.from_path import open_model

    opened = open_model(source)
    engine.load_tensors({k: v.astype(np.float32) for k, v in opened.model.param_views().items()}, None, source)
