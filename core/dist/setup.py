"""Join the data-parallel job this process belongs to: rendezvous, collective, device."""

from __future__ import annotations

from koifish_core.dist.collective import NCCLCollective, TCPCollective
from koifish_core.dist.launch_env import DistEnv, nccl_safe_environment
from koifish_core.dist.rendezvous import Rendezvous


def join(env: DistEnv, device: str):
    """(DistContext, rendezvous) for this rank; GPUs pick their device by local rank."""
    from koifish_core.train.trainer import DistContext

    nccl_safe_environment()
    if device == "cuda":
        import cupy as cp

        cp.cuda.Device(env.local_rank).use()
        payload = NCCLCollective.unique_id() if env.rank == 0 else None
        rdv = Rendezvous(env, payload)
        collective = NCCLCollective(rdv)
    else:
        rdv = Rendezvous(env)
        collective = TCPCollective(rdv)
    return DistContext(env.rank, env.world_size, collective), rdv
