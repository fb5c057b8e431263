"""`koifish train CASE --gpus N`: start N copies of the same command on this host, one per GPU,
with the environment torchrun would give them; each copy finds its place with launch_env.

If one rank fails the others would wait for it in a collective until their timeout, so the
launcher ends them (SIGTERM: they stop gracefully) and returns the first failure's exit code.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from koifish_core.dist.launch_env import nccl_safe_environment, visible_gpus

GRACE_S = 30.0  # how long ranks get to stop after SIGTERM before they are killed


def free_port() -> int:
    """A TCP port free on this host now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(rank: int, world_size: int, port: int, base=None) -> dict[str, str]:
    """What rank `rank` of a one-host job gets: torchrun's variables, NVLink multicast off and
    its own GPU (the rank-th of CUDA_VISIBLE_DEVICES, or GPU `rank`)."""
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
    visible = visible_gpus(env)
    if not visible or rank < len(visible):  # one GPU per rank, chosen before CUDA starts (CPU runs ignore it)
        env["CUDA_VISIBLE_DEVICES"] = visible[rank] if visible else str(rank)
    return env


def launch_command(cmd: list[str], world_size: int, poll_s: float = 0.2) -> int:
    """Run `cmd` as ranks 0..N-1 of a one-host job; 0 if all succeed, else the first failure's code."""
    nccl_safe_environment()
    port = free_port()
    procs = [subprocess.Popen(cmd, env=rank_environment(r, world_size, port)) for r in range(world_size)]
    failure = None
    try:
        while True:
            codes = [p.poll() for p in procs]  # poll every rank: returncode is only set by poll
            failure = next((c for c in codes if c not in (None, 0)), None)
            if failure is not None or all(c is not None for c in codes):
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:  # Ctrl-C reached us (and the ranks, same process group): let them checkpoint
        failure = 130
    _stop(procs)
    return failure or 0


def _stop(procs: list[subprocess.Popen]) -> None:
    """End the ranks still running: SIGTERM (they checkpoint and stop), then SIGKILL after GRACE_S."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(argv: list[str], world_size: int) -> int:
    """Run `python -m koifish_app.cli *argv` as ranks 0..N-1 (the CLI's --gpus N)."""
    return launch_command([sys.executable, "-m", "koifish_app.cli", *argv], world_size)


def strip_gpus(argv: list[str]) -> list[str]:
    """argv without --gpus N / --gpus=N (the ranks must not spawn again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            out.append(a)
    return out
