"""Shared fixtures: tiny cases on tiny shards, so end-to-end tests take a second or two."""

import json

import numpy as np
import pytest

from koifish_core.data.shards import write_shard

TINY_VOCAB = 97


def tiny_case_dict(data_dir, **overrides) -> dict:
    case = {
        "name": "tiny",
        "seed": 7,
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 16, "n_ctx": 16, "vocab_size": TINY_VOCAB},
        "data": {"train": str(data_dir / "tiny_train_*.bin"), "val": str(data_dir / "tiny_val_*.bin"),
                 "batch_size": 2, "seq_len": 16},
        "optimizer": {"lr": 0.01},
        "schedule": {"warmup_steps": 3},
        "train": {"steps": 12, "log_every": 5},
        "eval": {"every": 5, "batches": 2},
        "checkpoint": {"every": 5, "keep_last": 2},
    }
    for key, value in overrides.items():
        case[key] = {**case.get(key, {}), **value} if isinstance(value, dict) else value
    return case


@pytest.fixture
def tiny_data(tmp_path):
    """Two train shards and one val shard of a learnable sequence (a noisy counter mod 97)."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"

    def stream(n):
        base = np.cumsum(rng.integers(1, 3, n)) % TINY_VOCAB
        return base.astype(np.uint16)

    write_shard(data / "tiny_train_000000.bin", stream(900))
    write_shard(data / "tiny_train_000001.bin", stream(700))
    write_shard(data / "tiny_val_000000.bin", stream(300))
    return data


@pytest.fixture
def tiny_case(tmp_path, tiny_data):
    """Path of a tiny case file; call with overrides to get a variant."""

    def make(**overrides):
        path = tmp_path / f"case_{len(list(tmp_path.glob('case_*.json')))}.json"
        path.write_text(json.dumps(tiny_case_dict(tiny_data, **overrides)))
        return path

    return make


@pytest.fixture
def rollback_spy(monkeypatch):
    """A dict that each rollback fills with the engine's weights and optimizer state right after it,
    and the checkpoint it went back to ("from")."""
    from koifish_core.train import checkpoint, run_hooks

    restored = {}
    original = run_hooks.RunHooks._rollback

    def spy(self, step, event, engine):
        original(self, step, event, engine)
        restored["weights"], restored["optim"] = engine.model_tensors(), engine.optim_tensors()
        restored["from"] = checkpoint.latest(self.run_dir)

    monkeypatch.setattr(run_hooks.RunHooks, "_rollback", spy)
    return restored


def _gpu_present() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001
        return False


# Kernel tests run under Numba's CUDA simulator when no GPU is here; it must be switched on
# before numba.cuda is first imported, so it happens at collection time, once.
import os  # noqa: E402

if "NUMBA_ENABLE_CUDASIM" not in os.environ and not _gpu_present():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"


def pytest_collection_modifyitems(config, items):
    if _gpu_present():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
