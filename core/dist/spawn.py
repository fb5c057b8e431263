"""`koifish train CASE --gpus N`: start N copies of the same command on this host, one per GPU,
with the environment torchrun would give them; each copy finds its place with launch_env."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from koifish_core.dist.launch_env import nccl_safe_environment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], world_size: int) -> int:
    """Run `python -m koifish_app.cli *argv` as ranks 0..N-1; the exit code is the first failure's."""
    nccl_safe_environment()
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
        procs.append(subprocess.Popen([sys.executable, "-m", "koifish_app.cli", *argv], env=env))
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c != 0), 0)


def strip_gpus(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--gpus":
            skip = True
            continue
        if a.startswith("--gpus="):
            continue
        out.append(a)
    return out
