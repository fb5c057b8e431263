"""Who am I in a data-parallel job? Rank, world size, local rank and the rendezvous address, read
from the environment that torchrun, Slurm (srun) or OpenMPI (mpirun) set, or a single process."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from koifish_core.errors import KoifishError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[03-05,09],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise KoifishError(f"SLURM_NODELIST: cannot read {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _int(env, key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise KoifishError(f"{key}={env[key]!r}: expected a whole number") from None


def from_environ(env=None) -> DistEnv:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or koifish --gpus
        launcher, rank, world = "torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        addr = env.get("MASTER_ADDR")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher, rank, world = "slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        addr = env.get("MASTER_ADDR") or (first_host(env["SLURM_NODELIST"]) if env.get("SLURM_NODELIST") else None)
    elif "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        launcher, rank, world = "mpirun", _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else 0
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if world == 1 else None)
    else:
        return DistEnv()
    if world < 1 or not 0 <= rank < world:
        raise KoifishError(f"{launcher}: rank {rank} is outside a world of {world} processes")
    if world > 1 and not addr:
        raise KoifishError(f"{launcher}: {world} processes but no MASTER_ADDR to meet at; set MASTER_ADDR (and MASTER_PORT)")
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
    return DistEnv(rank, world, local, addr or "127.0.0.1", port, launcher)


def nccl_safe_environment() -> None:
    """NVLink multicast (NVLS) stays off in every koifish process: on shared hosts a program that
    uses it can take the GPUs out of service. Forced, not defaulted."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"
