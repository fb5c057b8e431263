"""Data-parallel training: one process per GPU, launched by koifish (--gpus N) or by torchrun,
Slurm or mpirun; gradients averaged by a collective (NCCL on GPUs, TCP on CPUs, threads in tests)."""
