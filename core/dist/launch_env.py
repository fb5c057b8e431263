"""Who am I in a data-parallel job? Rank, world size, local rank and the rendezvous address, read
from the environment that torchrun, Slurm (srun) or OpenMPI (mpirun) set, or a single process.

`koifish train CASE --gpus N` gives its children torchrun's variables, so it is read the same way.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from koifish_core.errors import KoifishError

DEFAULT_PORT = 29500  # torchrun's default, so a job started by hand meets where torchrun's would


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    """This process's place in the job, 0 .. world_size-1; rank 0 serves the rendezvous and writes."""
    world_size: int = 1
    """Number of processes (one per GPU) in the job."""
    local_rank: int = 0
    """Place among the processes of this host: which GPU this process uses."""
    master_addr: str = "127.0.0.1"
    """Host of rank 0, where the TCP rendezvous listens."""
    master_port: int = DEFAULT_PORT
    """Port of the TCP rendezvous."""
    launcher: str = "single"
    """Who started us: "single", "torchrun" (also koifish --gpus), "slurm" or "mpirun"."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---- Slurm node lists --------------------------------------------------------------------------

_NODE_GROUP = re.compile(r"([^,\[\]]*)(?:\[([^\]]*)\])?([^,\[\]]*)")


def expand_nodelist(nodelist: str) -> list[str]:
    """Every host of a Slurm node list: 'gpu[01-03,07],cpu1' -> gpu01 gpu02 gpu03 gpu07 cpu1.
    Zero padding follows the range's first bound ('[08-10]' -> 08 09 10)."""
    text, hosts, pos = nodelist.strip(), [], 0
    while pos < len(text):
        m = _NODE_GROUP.match(text, pos)
        prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
        if not prefix and ranges is None:
            raise KoifishError(f"SLURM_NODELIST={nodelist!r}: empty host name at character {pos}")
        if ranges is None:
            hosts.append(prefix + suffix)
        else:
            hosts += [prefix + n + suffix for n in _expand_ranges(ranges, nodelist)]
        pos = m.end()
        if pos < len(text):
            if text[pos] != ",":
                raise KoifishError(f"SLURM_NODELIST={nodelist!r}: unexpected {text[pos]!r} at character {pos}")
            pos += 1
    if not hosts:
        raise KoifishError(f"SLURM_NODELIST={nodelist!r}: expected at least one host")
    return hosts


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise KoifishError(f"SLURM_NODELIST={nodelist!r}: expected numbers or ranges like 01-04 in [{ranges}]")
        if hi and int(hi) < int(lo):
            raise KoifishError(f"SLURM_NODELIST={nodelist!r}: range {part} runs backwards")
        width = len(lo)
        out += [str(i).zfill(width) for i in range(int(lo), int(hi or lo) + 1)]
    return out


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: where rank 0 runs ('gpu[03-05,09],cpu1' -> 'gpu03')."""
    return expand_nodelist(nodelist)[0]


# ---- the environment ---------------------------------------------------------------------------


def _int(env, key: str, launcher: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise KoifishError(f"{launcher}: {key}={env[key]!r}: expected a whole number") from None


def _optional_int(env, key: str, launcher: str, default: int) -> int:
    return _int(env, key, launcher) if env.get(key, "") != "" else default


def from_environ(env=None) -> DistEnv:
    """Read the launcher's variables (torchrun first, then Slurm, then OpenMPI); a single process
    when none is set. Reading the real environment also turns NVLink multicast off for NCCL."""
    if env is None:
        nccl_safe_environment()
        env = os.environ
    if "RANK" in env or "WORLD_SIZE" in env:  # torchrun, or koifish --gpus
        launcher = "torchrun"
        for key in ("RANK", "WORLD_SIZE"):
            if key not in env:
                raise KoifishError(f"{launcher}: RANK and WORLD_SIZE go together; {key} is not set")
        rank, world = _int(env, "RANK", launcher), _int(env, "WORLD_SIZE", launcher)
        local = _optional_int(env, "LOCAL_RANK", launcher, rank)
        addr = env.get("MASTER_ADDR") or None
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        rank, world = _int(env, "SLURM_PROCID", launcher), _int(env, "SLURM_NTASKS", launcher)
        local = _optional_int(env, "SLURM_LOCALID", launcher, 0)
        nodelist = env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST")
        addr = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else None)
    elif "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        launcher = "mpirun"
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK", launcher), _int(env, "OMPI_COMM_WORLD_SIZE", launcher)
        local = _optional_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", launcher, 0)
        # mpirun does not say where rank 0 runs; when every rank is on this host it is here
        one_host = env.get("OMPI_COMM_WORLD_LOCAL_SIZE") == env["OMPI_COMM_WORLD_SIZE"]
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if one_host or world == 1 else None)
    else:
        return DistEnv()
    if world < 1:
        raise KoifishError(f"{launcher}: the world size is {world}; expected 1 or more processes")
    if not 0 <= rank < world:
        raise KoifishError(f"{launcher}: rank {rank} is outside a world of {world} processes (0 .. {world - 1})")
    if local < 0:
        raise KoifishError(f"{launcher}: local rank {local} is negative")
    if world > 1 and not addr:
        raise KoifishError(f"{launcher}: {world} processes but no MASTER_ADDR to meet at; "
                           "set MASTER_ADDR (and MASTER_PORT) to the host of rank 0")
    port = _optional_int(env, "MASTER_PORT", launcher, DEFAULT_PORT)
    if not 0 < port < 65536:
        raise KoifishError(f"{launcher}: MASTER_PORT={port}: expected a port number 1 .. 65535")
    return DistEnv(rank, world, local, addr or "127.0.0.1", port, launcher)


def visible_gpus(env=None) -> list[str]:
    """The GPUs CUDA_VISIBLE_DEVICES lists (empty: not set, every GPU is visible)."""
    env = os.environ if env is None else env
    return [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]


def nccl_safe_environment() -> None:
    """NVLink multicast (NVLS) stays off in every koifish process: on the shared hosts koifish
    runs on, a program that uses it can take the GPUs out of service. Forced, not defaulted: a
    value inherited from the shell must not turn it back on."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"
