"""Data parallelism on CPUs: launcher environments, rendezvous, collectives, rank-independent data
and checkpoints. The NCCL collective itself needs several GPUs (none lent here)."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from koifish_core.config import load_case
from koifish_core.dist.collective import ThreadCollective
from koifish_core.dist.launch_env import DistEnv, first_host, from_environ
from koifish_core.errors import KoifishError
from koifish_core.train.metrics import read_metrics
from koifish_core.train.trainer import DistContext, train


def test_launcher_environments():
    tr = from_environ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "node7", "MASTER_PORT": "1234"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port, tr.launcher) == (2, 4, 0, "node7", 1234, "torchrun")
    sl = from_environ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu[03-04,09]"})
    assert (sl.rank, sl.world_size, sl.local_rank, sl.master_addr, sl.launcher) == (5, 8, 1, "gpu03", "slurm")
    mp = from_environ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                       "MASTER_ADDR": "10.0.0.1"})
    assert (mp.rank, mp.world_size, mp.local_rank, mp.launcher) == (1, 2, 1, "mpirun")
    assert from_environ({}) == DistEnv()
    assert first_host("a1,b2") == "a1" and first_host("n[7]") == "n7"


@pytest.mark.parametrize("env, words", [
    ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "x"}, "outside a world of 4"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "expected a whole number"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, "no MASTER_ADDR"),
])
def test_bad_environments(env, words):
    with pytest.raises(KoifishError, match=words):
        from_environ(env)


def test_rendezvous_hands_the_payload_to_every_rank():
    from koifish_core.dist.collective import TCPCollective
    from koifish_core.dist.rendezvous import Rendezvous
    from koifish_core.dist.spawn import free_port

    port, got, sums = free_port(), {}, {}

    def rank(r):
        rdv = Rendezvous(DistEnv(r, 3, r, "127.0.0.1", port, "test"), b"nccl-id" if r == 0 else None, timeout=20)
        got[r] = rdv.payload
        x = np.full(4, float(r), np.float32)
        TCPCollective(rdv).all_reduce_mean(x)
        sums[r] = x
        rdv.close()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert got == {0: b"nccl-id", 1: b"nccl-id", 2: b"nccl-id"}
    assert all(np.array_equal(sums[r], np.full(4, 1.0, np.float32)) for r in range(3))


def _train_ranks(case, run_dir, world, **kw):
    shared = ThreadCollective(world)
    results, errors = {}, []

    def rank(r):
        try:
            results[r] = train(case, run_dir, dist=DistContext(r, world, shared.for_rank(r)), **kw)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not errors, errors
    return results


def _losses(run):
    return np.array([r["loss"] for r in read_metrics(run, kinds=("train",))])


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_follow_the_single_process_curve(tmp_path, tiny_case, world):
    path = tiny_case(data={"batch_size": 4}, train={"steps": 15})
    train(load_case(path), tmp_path / "one")
    _train_ranks(load_case(path), tmp_path / "many", world)
    assert np.allclose(_losses(tmp_path / "many"), _losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)
    evals = [[r["loss"] for r in read_metrics(tmp_path / d, kinds=("eval",))] for d in ("one", "many")]
    assert np.allclose(evals[0], evals[1], rtol=1e-5)


def test_checkpoints_do_not_depend_on_the_number_of_ranks(tmp_path, tiny_case):
    path = tiny_case(data={"batch_size": 4}, train={"steps": 20}, checkpoint={"every": 10})
    train(load_case(path), tmp_path / "one")
    from koifish_core.train.trainer import STOP_FILE

    def stop_at_10(rec):
        if rec["kind"] == "train" and rec["step"] == 10:
            (tmp_path / "two" / STOP_FILE).write_text("")

    _train_ranks(load_case(path), tmp_path / "two", 2, on_log=stop_at_10)  # 2 ranks up to step 10 ...
    train(load_case(path), tmp_path / "two", resume=True)  # ... 1 rank from there
    assert np.allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)


def test_uneven_split_is_refused(tmp_path, tiny_case):
    with pytest.raises(KoifishError, match="does not split evenly over 3 ranks"):
        train(load_case(tiny_case(data={"batch_size": 4})), tmp_path / "r", dist=DistContext(0, 3, None))


def test_gpus_option_spawns_ranks_that_meet_over_tcp(tmp_path, tiny_case):
    path = tiny_case(data={"batch_size": 4}, train={"steps": 6})
    env = dict(os.environ, COLUMNS="200")
    res = subprocess.run([sys.executable, "-m", "koifish_app.cli", "train", str(path), "--out", str(tmp_path / "run"),
                          "--gpus", "2", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    train(load_case(path), tmp_path / "one")
    assert np.allclose(_losses(tmp_path / "run"), _losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)
