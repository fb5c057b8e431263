"""Starting ranks: `--gpus N` gives each process torchrun's variables; a failed rank ends the job;
a plain `koifish train` started by srun joins the job through launch_env."""

import json
import os
import subprocess
import sys
import time

import numpy as np

from koifish_core.config import load_case
from koifish_core.dist import spawn
from koifish_core.dist.spawn import free_port, launch_command, rank_environment, strip_gpus
from koifish_core.train.metrics import read_metrics
from koifish_core.train.trainer import train


def test_each_rank_gets_torchrun_s_variables_and_nvlink_multicast_off(tmp_path, monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    script = tmp_path / "rank.py"
    script.write_text(
        "import json, os, sys\n"
        "from koifish_core.dist.launch_env import from_environ\n"
        "e = from_environ()\n"
        f"open(os.path.join({str(tmp_path)!r}, 'rank%d.json' % e.rank), 'w').write(json.dumps(\n"
        "    [e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher,"
        " os.environ['NCCL_NVLS_ENABLE']]))\n")
    assert launch_command([sys.executable, str(script)], 3) == 0
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    port = got[0][4]
    assert got == [[r, 3, r, "127.0.0.1", port, "torchrun", "0"] for r in range(3)]
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"  # the launcher itself too


def test_a_failed_rank_ends_the_others_and_its_code_is_returned(tmp_path, monkeypatch):
    monkeypatch.setattr(spawn, "GRACE_S", 5.0)
    script = tmp_path / "rank.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['RANK'] == '1': sys.exit(3)\n"
                      "time.sleep(60)  # a rank waiting forever for the failed one\n")
    t0 = time.monotonic()
    assert launch_command([sys.executable, str(script)], 3) == 3
    assert time.monotonic() - t0 < 20


def test_rank_environment_pins_a_gpu_per_rank_and_strip_gpus():
    env = rank_environment(2, 4, 1234, base={"PATH": "/bin", "NCCL_NVLS_ENABLE": "1"})
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                "NCCL_NVLS_ENABLE")} == {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2",
                                                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234",
                                                         "NCCL_NVLS_ENABLE": "0"}
    assert env["CUDA_VISIBLE_DEVICES"] == "2"
    picked = [rank_environment(r, 2, 1, base={"CUDA_VISIBLE_DEVICES": "5,7"})["CUDA_VISIBLE_DEVICES"] for r in range(2)]
    assert picked == ["5", "7"]
    assert strip_gpus(["train", "c.json", "--gpus", "4", "--out", "r", "--gpus=2"]) == ["train", "c.json", "--out", "r"]


def test_koifish_train_under_srun_joins_the_job(tmp_path, tiny_case):
    """Two `koifish train` processes with Slurm's variables (as srun would start them) train one run."""
    path = tiny_case(data={"batch_size": 4}, train={"steps": 6})
    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_NODELIST="localhost",
                   MASTER_PORT=str(port), COLUMNS="200")
        procs.append(subprocess.Popen([sys.executable, "-m", "koifish_app.cli", "train", str(path), "--out",
                                       str(tmp_path / "run"), "--device", "cpu"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "done" in outs[0][0] and outs[1][0].strip() == ""  # rank 0 speaks for the job
    train(load_case(path), tmp_path / "one")
    got = [r["loss"] for r in read_metrics(tmp_path / "run", kinds=("train",))]
    want = [r["loss"] for r in read_metrics(tmp_path / "one", kinds=("train",))]
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_pin_gpu_under_launchers_that_show_every_gpu(monkeypatch):
    import pytest

    from koifish_core.dist.setup import pin_gpu
    from koifish_core.errors import KoifishError

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,6")
    pin_gpu(2)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"
    pin_gpu(0)  # already one GPU: left alone
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    pin_gpu(1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(KoifishError, match="local rank 4 has no GPU: CUDA_VISIBLE_DEVICES lists 2"):
        pin_gpu(4)
