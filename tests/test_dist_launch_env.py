"""Rank, world size, local rank and rendezvous address from each launcher's environment."""

import os

import pytest

from koifish_core.dist.launch_env import DEFAULT_PORT, DistEnv, expand_nodelist, first_host, from_environ
from koifish_core.errors import KoifishError


def _fields(e: DistEnv):
    return e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher


def test_torchrun():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}
    assert _fields(from_environ(env)) == (5, 8, 1, "node7", 1234, "torchrun")


def test_torchrun_defaults_local_rank_to_rank_and_port_to_29500():
    e = from_environ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.1.2.3"})
    assert _fields(e) == (1, 2, 1, "10.1.2.3", DEFAULT_PORT, "torchrun") and DEFAULT_PORT == 29500


def test_slurm_takes_the_first_host_of_the_node_list():
    env = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NODELIST": "gpu[03-04,09],cpu1",
           "MASTER_PORT": "4000"}
    assert _fields(from_environ(env)) == (6, 8, 2, "gpu03", 4000, "slurm")


def test_slurm_prefers_an_explicit_master_addr_and_reads_the_job_node_list():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a[7-8]"}
    assert from_environ(env).master_addr == "a7"
    assert from_environ({**env, "MASTER_ADDR": "head"}).master_addr == "head"


def test_mpirun_on_one_host_meets_on_loopback():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    assert _fields(from_environ(env)) == (3, 4, 3, "127.0.0.1", DEFAULT_PORT, "mpirun")
    assert from_environ({**env, "MASTER_ADDR": "h1"}).master_addr == "h1"


def test_no_launcher_is_a_single_process():
    assert from_environ({"PATH": "/bin"}) == DistEnv()
    assert DistEnv().is_main and not DistEnv(rank=1, world_size=2).is_main


def test_torchrun_wins_over_slurm_variables():
    # torchrun inside an srun allocation: torchrun's own variables describe the job
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert from_environ(env).launcher == "torchrun"


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("rack[1-2]-ib", ["rack1-ib", "rack2-ib"]),
    ("solo", ["solo"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("nodelist", ["node[3-1]", "node[a-b]", "node[1-2", "", ",x"])
def test_bad_nodelists_name_the_variable(nodelist):
    with pytest.raises(KoifishError, match="SLURM_NODELIST"):
        expand_nodelist(nodelist)


@pytest.mark.parametrize("env, words", [
    ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "x"}, "rank 4 is outside a world of 4"),
    ({"RANK": "-1", "WORLD_SIZE": "4", "MASTER_ADDR": "x"}, "rank -1 is outside"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "world size is 0"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, r"RANK='one': expected a whole number"),
    ({"RANK": "0", "WORLD_SIZE": "2.5"}, r"WORLD_SIZE='2.5': expected a whole number"),
    ({"RANK": "0"}, "WORLD_SIZE is not set"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "no MASTER_ADDR"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "99999"}, "MASTER_PORT=99999"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "http"}, "MASTER_PORT='http'"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "LOCAL_RANK": "-2"}, "local rank -2"),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "2", "SLURM_NODELIST": "n1"}, "slurm: rank 2 is outside"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "slurm: 2 processes but no MASTER_ADDR"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
     "mpirun: 4 processes but no MASTER_ADDR"),
    ({"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "4"}, "OMPI_COMM_WORLD_RANK='x'"),
])
def test_inconsistent_environments_are_explained(env, words):
    with pytest.raises(KoifishError, match=words):
        from_environ(env)


def test_reading_the_real_environment_forces_nvlink_multicast_off(monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")  # inherited from the shell: must not survive
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert from_environ() == DistEnv()
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"
