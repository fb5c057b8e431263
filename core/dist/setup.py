"""Join the data-parallel job this process belongs to: GPU, rendezvous, collective."""

from __future__ import annotations

import os

from koifish_core.dist.collective import NCCLCollective, TCPCollective
from koifish_core.dist.launch_env import DistEnv, nccl_safe_environment, visible_gpus
from koifish_core.dist.rendezvous import Rendezvous
from koifish_core.errors import KoifishError


def pin_gpu(local_rank: int) -> None:
    """Make this rank's GPU the only one it sees, before CUDA starts: CuPy and Numba then both
    use device 0, and two ranks never share a GPU (NCCL refuses that). koifish --gpus already
    sets CUDA_VISIBLE_DEVICES per rank; torchrun, srun and mpirun usually show every GPU."""
    visible = visible_gpus()
    if len(visible) == 1:
        return  # the launcher (or koifish --gpus) already chose
    if visible and local_rank >= len(visible):
        raise KoifishError(f"local rank {local_rank} has no GPU: CUDA_VISIBLE_DEVICES lists {len(visible)}")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[local_rank] if visible else str(local_rank)


def join(env: DistEnv, device: str):
    """(DistContext, rendezvous) for this rank. Call before anything touches CUDA."""
    from koifish_core.train.trainer import DistContext

    nccl_safe_environment()
    if device == "cuda":
        pin_gpu(env.local_rank)
        import cupy as cp

        if cp.cuda.runtime.getDeviceCount() != 1:  # CUDA had started before the pin took effect
            cp.cuda.Device(env.local_rank).use()
        payload = NCCLCollective.unique_id() if env.rank == 0 else None
        rdv = Rendezvous(env, payload)
        collective = NCCLCollective(rdv)
    else:
        rdv = Rendezvous(env)
        collective = TCPCollective(rdv)
    return DistContext(env.rank, env.world_size, collective), rdv
