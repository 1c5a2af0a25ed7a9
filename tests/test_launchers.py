"""Launcher detection from environment variables alone (no mpi4py, no processes)."""

import pytest

from lightning_parallelctx import LauncherError
from lightning_parallelctx.launchers import (
    detect_launcher,
    expand_nodelist,
    read_launch,
    read_openmpi,
    read_slurm,
    read_torchrun,
    tasks_per_node,
)

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
            "MASTER_ADDR": "node0", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x",
            "TORCHELASTIC_USE_AGENT_STORE": "True"}
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
         "SLURM_NNODES": "4", "SLURM_NODELIST": "gpu[07-08,10],cpu1", "SLURM_JOB_ID": "1234567",
         "SLURM_TASKS_PER_NODE": "2(x4)"}
OMPI = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
MPICH = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
MV2 = {"MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_SIZE": "2", "MV2_COMM_WORLD_LOCAL_RANK": "0",
       "MV2_COMM_WORLD_LOCAL_SIZE": "2"}


@pytest.mark.parametrize("env, name, rank, world, local", [
    (TORCHRUN, "torchrun", 3, 8, 1), (SLURM, "slurm", 5, 8, 1), (OMPI, "openmpi", 2, 4, 2),
    (MPICH, "mpich", 1, 2, 1), (MV2, "mvapich2", 0, 2, 0), ({}, "none", 0, 1, 0),
])
def test_detect_and_read(env, name, rank, world, local):
    assert detect_launcher(env) == name
    info = read_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == (name, rank, world, local)


def test_torchrun_agent_store_and_address():
    info = read_torchrun(TORCHRUN)
    assert (info.host, info.port, info.agent_store, info.node_rank) == ("node0", 29500, True, 1)


def test_slurm_host_port_and_local_size():
    info = read_slurm(SLURM)
    assert info.host == "gpu07"
    assert info.port == 15000 + 4567  # Lightning's rule, so both agree
    assert info.local_world_size == 2 and info.num_nodes == 4 and info.node_rank == 2
    assert read_slurm({**SLURM, "MASTER_PORT": "1999", "MASTER_ADDR": "x"}).port == 1999


def test_torchrun_inside_slurm_uses_torchrun_numbering():
    assert detect_launcher({**SLURM, **TORCHRUN}) == "torchrun"


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("a[1-2],b3,c[09-10]", ["a1", "a2", "b3", "c09", "c10"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_tasks_per_node():
    assert tasks_per_node("4(x2),3") == [4, 4, 3]
    with pytest.raises(LauncherError, match="SLURM_TASKS_PER_NODE"):
        tasks_per_node("four")


@pytest.mark.parametrize("reader, env, missing, who", [
    (read_torchrun, {k: v for k, v in TORCHRUN.items() if k != "LOCAL_RANK"}, "LOCAL_RANK", "torchrun"),
    (read_torchrun, {k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"}, "MASTER_PORT", "torchrun"),
    (read_slurm, {k: v for k, v in SLURM.items() if k != "SLURM_PROCID"}, "SLURM_PROCID", "srun"),
    (read_openmpi, {k: v for k, v in OMPI.items() if k != "OMPI_COMM_WORLD_RANK"}, "OMPI_COMM_WORLD_RANK", "openmpi"),
])
def test_missing_variable_names_variable_and_launcher(reader, env, missing, who):
    with pytest.raises(LauncherError) as err:
        reader(env)
    assert missing in str(err.value) and who in str(err.value)
    assert not isinstance(err.value, KeyError)


@pytest.mark.parametrize("reader, names", [
    (read_torchrun, ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]),
    (read_slurm, ["SLURM_PROCID", "SLURM_NTASKS (or SLURM_NPROCS)", "SLURM_LOCALID"]),
    (read_openmpi, ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"]),
])
def test_every_missing_variable_is_named_at_once(reader, names):
    # Without the launcher at all: one error lists them all, so one fix of the launch script suffices.
    with pytest.raises(LauncherError, match="not set; .* sets them for every process") as err:
        reader({})
    assert f"environment variables {', '.join(names)} are not set" in str(err.value)
    # Two missing of several: exactly those two.
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    with pytest.raises(LauncherError, match=r"variables WORLD_SIZE, MASTER_PORT are not set"):
        read_torchrun({k: v for k, v in env.items() if k not in ("WORLD_SIZE", "MASTER_PORT")})


def test_inconsistent_and_garbage_values():
    with pytest.raises(LauncherError, match="rank 9 is not inside a world of 8"):
        read_torchrun({**TORCHRUN, "RANK": "9"})
    with pytest.raises(LauncherError, match="not an integer"):
        read_openmpi({**OMPI, "OMPI_COMM_WORLD_SIZE": "four"})
    with pytest.raises(LauncherError, match="not a port number"):
        read_torchrun({**TORCHRUN, "MASTER_PORT": "70000"})
    with pytest.raises(LauncherError, match="unknown launcher 'pbs'"):
        read_launch({}, launcher="pbs")


def test_slurm_allocation_without_srun_says_use_srun():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_PROCID"}
    with pytest.raises(LauncherError, match="srun python"):
        read_slurm(env)


def test_mpi_rendezvous_derived_on_one_node_only():
    one_node = read_openmpi({**OMPI, "OMPI_MCA_ess_base_jobid": "123"})
    assert one_node.host == "127.0.0.1" and 20000 <= one_node.port < 40000
    assert read_openmpi({**OMPI, "OMPI_MCA_ess_base_jobid": "123", "OMPI_COMM_WORLD_RANK": "3"}).port == one_node.port
    assert read_openmpi(OMPI).port is None  # no job id: nothing every rank would agree on
    two_nodes = read_openmpi({**OMPI, "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_MCA_ess_base_jobid": "123"})
    assert two_nodes.host is None and two_nodes.port is None
    given = read_openmpi({**OMPI, "MASTER_ADDR": "n1", "MASTER_PORT": "29500"})
    assert (given.host, given.port) == ("n1", 29500)
