"""ParallelCtxEnvironment and the strategy's constructor: pure, no processes started.

Every launcher is simulated by its environment variables (docs/launchers.md); the trap cases of
docs/traps.md #10 (interactive Slurm job names, mpirun without mpi4py, tasks vs devices) must end in a
clear error, or, for MPI, in a correct world instead of N copies.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
from lightning.pytorch.strategies import StrategyRegistry

import lightning_parallelctx
from lightning_parallelctx import ParallelCtxEnvironment, ParallelCtxStrategy
from lightning_parallelctx.errors import LauncherError, ParallelConfigError
from lightning_parallelctx.launchers import mpi_job_port
from lightning_parallelctx.lightning.environment import LaunchMismatchError, resolve_launcher

LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_", "MV2_", "TORCHELASTIC_")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
               "MASTER_ADDR", "MASTER_PORT", "PCTX_LAUNCHER")


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key in LAUNCH_VARS or key.startswith(LAUNCH_PREFIXES):
            monkeypatch.delenv(key)
    return monkeypatch


def setenv(mp: pytest.MonkeyPatch, **values: object) -> None:
    for k, v in values.items():
        mp.setenv(k, str(v))


def torchrun(mp: pytest.MonkeyPatch, rank: int = 1, world: int = 4, local_world: int = 4) -> None:
    setenv(mp, TORCHELASTIC_RUN_ID="x", RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank % local_world,
           LOCAL_WORLD_SIZE=local_world, GROUP_RANK=rank // local_world, MASTER_ADDR="127.0.0.1", MASTER_PORT=29555)


def srun(mp: pytest.MonkeyPatch, rank: int = 2, tasks: int = 4, per_node: int = 4, nodes: int = 1,
         name: str = "train") -> None:
    setenv(mp, SLURM_JOB_ID=123456, SLURM_JOB_NAME=name, SLURM_PROCID=rank, SLURM_LOCALID=rank % per_node,
           SLURM_NODEID=rank // per_node, SLURM_NTASKS=tasks, SLURM_NNODES=nodes, SLURM_STEP_ID=0,
           SLURM_STEP_NUM_TASKS=tasks, SLURM_STEP_NUM_NODES=nodes, SLURM_STEP_TASKS_PER_NODE=f"{per_node}(x{nodes})",
           SLURM_NODELIST="node[01-02]" if nodes > 1 else "node01", SLURM_NTASKS_PER_NODE=per_node)


def openmpi(mp: pytest.MonkeyPatch, rank: int = 3, world: int = 4, local: int = 4) -> None:
    setenv(mp, OMPI_COMM_WORLD_RANK=rank, OMPI_COMM_WORLD_SIZE=world, OMPI_COMM_WORLD_LOCAL_RANK=rank % local,
           OMPI_COMM_WORLD_LOCAL_SIZE=local, OMPI_MCA_ess_base_jobid=1583087617)


# ---------------------------------------------------------------------------- detection
def test_plain_python_launches_locally(clean_env: pytest.MonkeyPatch) -> None:
    env = ParallelCtxEnvironment()
    assert env.launcher == "local" and not env.creates_processes_externally
    env.set_world_size(4)
    env.set_global_rank(0)
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (4, 0, 0, 0)
    assert env.main_address == "127.0.0.1" and 0 < env.main_port < 65536
    env.validate_settings(num_devices=4, num_nodes=1)
    with pytest.raises(LaunchMismatchError, match="num_nodes=2.*only start processes on this node"):
        env.validate_settings(num_devices=4, num_nodes=2)
    # A child of our own launch (Lightning's launcher exported LOCAL_RANK): not launching again.
    setenv(clean_env, LOCAL_RANK=2, WORLD_SIZE=4, NODE_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=29511)
    child = ParallelCtxEnvironment()
    assert child.launcher == "local" and child.creates_processes_externally
    assert child.local_rank() == 2 and child.main_port == 29511


def test_torchrun(clean_env: pytest.MonkeyPatch) -> None:
    torchrun(clean_env, rank=5, world=8, local_world=4)
    env = ParallelCtxEnvironment()
    assert env.launcher == "torchrun" and env.creates_processes_externally
    assert (env.global_rank(), env.world_size(), env.local_rank(), env.node_rank()) == (5, 8, 1, 1)
    env.set_global_rank(0)  # Lightning's guess never overrides the launcher's ranks
    env.set_world_size(1)
    assert (env.global_rank(), env.world_size()) == (5, 8)
    assert (env.main_address, env.main_port) == ("127.0.0.1", 29555)
    env.validate_settings(num_devices=4, num_nodes=2)
    with pytest.raises(LaunchMismatchError, match=r"torchrun started 4 process\(es\) on this node.*devices=2.*Trainer\(devices=4\)"):
        env.validate_settings(num_devices=2, num_nodes=2)
    with pytest.raises(LaunchMismatchError, match=r"on 2 node\(s\).*num_nodes=1.*Trainer\(num_nodes=2\)"):
        env.validate_settings(num_devices=4, num_nodes=1)
    torchrun(clean_env, rank=5, world=6, local_world=4)  # uneven nodes: only the total can tell
    with pytest.raises(LaunchMismatchError, match="6 processes in all.*4 x 1 = 4"):
        env.validate_settings(num_devices=4, num_nodes=1)


def test_slurm_srun_step(clean_env: pytest.MonkeyPatch) -> None:
    srun(clean_env, rank=6, tasks=8, per_node=4, nodes=2)
    env = ParallelCtxEnvironment()
    assert env.launcher == "slurm" and env.creates_processes_externally
    assert (env.global_rank(), env.world_size(), env.local_rank(), env.node_rank()) == (6, 8, 2, 1)
    assert env.main_address == "node01" and env.main_port == 15000 + 3456
    env.validate_settings(num_devices=4, num_nodes=2)
    with pytest.raises(LaunchMismatchError, match=r"slurm started 4 process\(es\) on this node.*devices=8.*--ntasks-per-node"):
        env.validate_settings(num_devices=8, num_nodes=1)
    with pytest.raises(LaunchMismatchError, match="2 node.*num_nodes=1"):
        env.validate_settings(num_devices=4, num_nodes=1)


def test_slurm_batch_script_and_one_task_steps_launch_locally(clean_env: pytest.MonkeyPatch) -> None:
    # The batch script itself has SLURM_PROCID=0 and SLURM_NTASKS=4 but no step: Lightning's
    # SLURMEnvironment would take it for rank 0 of 4 and wait forever for the other three.
    setenv(clean_env, SLURM_JOB_ID=77, SLURM_JOB_NAME="job.sh", SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_NODEID=0,
           SLURM_NTASKS=4, SLURM_NTASKS_PER_NODE=4, SLURM_NNODES=1, SLURM_NODELIST="vm")
    env = ParallelCtxEnvironment()
    assert env.launcher == "local" and not env.creates_processes_externally
    env.validate_settings(num_devices=4, num_nodes=1)
    # `srun --ntasks=1 python train.py` (or `srun --pty bash`): one task, we launch the devices.
    setenv(clean_env, SLURM_STEP_ID=0, SLURM_STEP_NUM_TASKS=1, SLURM_NTASKS=1)
    assert ParallelCtxEnvironment().launcher == "local"


@pytest.mark.parametrize("var", ["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"])
def test_malformed_slurm_task_count_is_a_clear_error(clean_env: pytest.MonkeyPatch, var: str) -> None:
    # A task count that is set but not a number must not silently count as "absent" (one task).
    srun(clean_env, rank=1, tasks=4)
    if var == "SLURM_NTASKS":
        clean_env.delenv("SLURM_STEP_NUM_TASKS")
    clean_env.setenv(var, "4x")
    with pytest.raises(LauncherError, match=rf"{var}='4x' is not an integer, but slurm sets it.*Fix: unset {var}"):
        _ = ParallelCtxEnvironment().launcher
    clean_env.setenv(var, "")  # empty = absent: falls back (to SLURM_NTASKS, then one task)
    assert ParallelCtxEnvironment().launcher == ("slurm" if var == "SLURM_STEP_NUM_TASKS" else "local")


@pytest.mark.parametrize("name", ["interactive", "bash"])
def test_slurm_interactive_job_name_with_several_tasks_is_a_clear_error(clean_env: pytest.MonkeyPatch, name: str) -> None:
    srun(clean_env, rank=1, tasks=4, name=name)
    env = ParallelCtxEnvironment()
    with pytest.raises(LaunchMismatchError, match=rf"srun step of 4 tasks in a Slurm job named '{name}'.*own copy.*--job-name"):
        env.validate_settings(num_devices=4, num_nodes=1)
    with pytest.raises(LaunchMismatchError):
        _ = env.creates_processes_externally  # never silently decide who launches
    # The user says which reading is right: the tasks are the processes.
    forced = ParallelCtxEnvironment(launcher="slurm")
    assert forced.launcher == "slurm" and forced.global_rank() == 1
    clean_env.setenv("PCTX_LAUNCHER", "slurm")
    assert ParallelCtxEnvironment().launcher == "slurm"


@pytest.mark.parametrize("kind", ["openmpi", "mpich", "mvapich2"])
def test_mpi_without_mpi4py_is_one_world_not_copies(clean_env: pytest.MonkeyPatch, kind: str) -> None:
    # Lightning's MPIEnvironment needs mpi4py: without it every rank launches its own workers.
    if kind == "openmpi":
        openmpi(clean_env, rank=3)
    elif kind == "mpich":
        setenv(clean_env, PMI_RANK=3, PMI_SIZE=4, MPI_LOCALRANKID=3, MPI_LOCALNRANKS=4, PMI_KVS_NAME="kvs_42")
    else:
        setenv(clean_env, MV2_COMM_WORLD_RANK=3, MV2_COMM_WORLD_SIZE=4, MV2_COMM_WORLD_LOCAL_RANK=3,
               MV2_COMM_WORLD_LOCAL_SIZE=4, MPIRUN_ID=99)
    env = ParallelCtxEnvironment()
    assert env.launcher == kind and env.creates_processes_externally
    assert (env.global_rank(), env.world_size(), env.local_rank()) == (3, 4, 3)
    # No MPI sets an address: one node -> loopback, a port every rank derives from the job id.
    assert env.main_address == "127.0.0.1"
    assert env.main_port == mpi_job_port(os.environ) and 20000 <= env.main_port < 40000
    env.validate_settings(num_devices=4, num_nodes=1)
    with pytest.raises(LaunchMismatchError, match="started 4 process.*devices=2"):
        env.validate_settings(num_devices=2, num_nodes=1)
    clean_env.setenv("MASTER_PORT", "29777")
    assert env.main_port == 29777


def test_multinode_mpi_needs_master_addr(clean_env: pytest.MonkeyPatch) -> None:
    openmpi(clean_env, rank=5, world=8, local=4)
    env = ParallelCtxEnvironment()
    assert env.node_rank() == 1 and env.num_nodes() == 2
    with pytest.raises(LaunchMismatchError, match="several nodes.*MASTER_ADDR"):
        _ = env.main_address
    setenv(clean_env, MASTER_ADDR="10.0.0.1", MASTER_PORT=29600)
    assert (env.main_address, env.main_port) == ("10.0.0.1", 29600)


def test_bad_launcher_names(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(LaunchMismatchError, match="launcher='pbs'"):
        ParallelCtxEnvironment(launcher="pbs")
    with pytest.raises(LaunchMismatchError, match="PCTX_LAUNCHER='pbs'"):
        resolve_launcher({"PCTX_LAUNCHER": "pbs"})


# ---------------------------------------------------------------------------- strategy arguments
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tensor_parallel_size": 0}, "tensor_parallel_size=0 must be >= 1"),
        ({"tensor_parallel_size": "2"}, r"tensor_parallel_size='2' \(str\) must be an int"),
        ({"pipeline_parallel_size": 1.5}, "pipeline_parallel_size=1.5"),
        ({"expert_parallel_size": True}, "expert_parallel_size=True"),
        ({"sequence_parallel_size": -1}, "sequence_parallel_size=-1 must be >= 1"),
        ({"data_parallel_size": "many"}, "data_parallel_size='many'.*or 'auto'"),
        ({"data_parallel_size": 0}, "data_parallel_size=0 must be >= 1"),
        ({"order": "tp-dp"}, "order"),
        ({"launcher": "pbs"}, "launcher='pbs'"),
        ({"timeout": 0}, "timeout=0"),
        ({"sync_initial_weights": "yes"}, "sync_initial_weights"),
        ({"process_group_backend": "tcp"}, "process_group_backend='tcp'"),
        ({"cluster_environment": "slurm"}, "is not a ClusterEnvironment"),
    ],
)
def test_strategy_arguments_are_checked_at_once(kwargs: dict, message: str) -> None:
    with pytest.raises((ParallelConfigError, ValueError, TypeError), match=message):
        ParallelCtxStrategy(**kwargs)


@pytest.mark.parametrize("pp", [2, 4])
def test_pipeline_parallel_is_accepted_and_its_arguments_checked_at_once(pp: int) -> None:
    # pp > 1 trains with a schedule (tests/test_pipeline.py proves the numbers); its arguments are
    # checked at construction, naming the value, the rule and the fix.
    ParallelCtxStrategy(tensor_parallel_size=2, pipeline_parallel_size=pp, pipeline_schedule="gpipe")
    with pytest.raises(ParallelConfigError, match=r"pipeline_schedule='nope' is not a registered schedule"):
        ParallelCtxStrategy(pipeline_parallel_size=pp, pipeline_schedule="nope")
    with pytest.raises(ParallelConfigError, match=rf"num_microbatches=-{pp} must be an int >= 1"):
        ParallelCtxStrategy(pipeline_parallel_size=pp, num_microbatches=-pp)


def test_save_checkpoint_refuses_storage_options_saying_what_to_do(tmp_path) -> None:
    with pytest.raises(TypeError, match=r"storage_options=\{'acl': 'private'\}, but it writes a torch DCP "
                                        r"directory of per-rank files.*Fix: call trainer\.save_checkpoint\(path\) without"):
        ParallelCtxStrategy().save_checkpoint({}, tmp_path / "ckpt", storage_options={"acl": "private"})
    assert not (tmp_path / "ckpt").exists()


def test_gradient_handler_argument_is_checked_at_once() -> None:
    with pytest.raises(ValueError, match=r"unknown gradient handler 'nope'; registered names are \[.*'bucketed'"):
        ParallelCtxStrategy(gradient_handler="nope")
    with pytest.raises(TypeError, match="gradient_handler=3"):
        ParallelCtxStrategy(gradient_handler=3)  # type: ignore[arg-type]
    for ok in ("bucketed", "ddp", "allreduce",
               {"class_path": "lightning_parallelctx.grad_sync.BucketedGradientHandler", "init_args": {}}):
        ParallelCtxStrategy(gradient_handler=ok)


def test_every_argument_is_type_hinted_for_lightning_cli() -> None:
    import inspect
    from typing import get_type_hints

    hints = get_type_hints(ParallelCtxStrategy.__init__)
    params = [p for p in inspect.signature(ParallelCtxStrategy.__init__).parameters if p != "self"]
    assert params and all(p in hints for p in params), set(params) - set(hints)
    assert {"data_parallel_size", "tensor_parallel_size", "pipeline_parallel_size", "sequence_parallel_size",
            "expert_parallel_size", "gradient_handler"} <= set(params)


def test_registered_once_and_usable_by_name(clean_env: pytest.MonkeyPatch) -> None:
    import importlib

    from lightning_parallelctx.lightning import register

    assert "parallelctx" in StrategyRegistry
    register()  # a second registration (re-import) is a no-op, not Lightning's "already registered" error
    importlib.reload(importlib.import_module("lightning_parallelctx.lightning"))
    assert lightning_parallelctx.ParallelCtxStrategy is ParallelCtxStrategy
    trainer = pl.Trainer(strategy="parallelctx", accelerator="cpu", devices=2, logger=False)
    assert type(trainer.strategy).__name__ == "ParallelCtxStrategy"
    assert trainer.strategy.launcher is not None  # docs/traps.md #1: devices=2 must start 2 processes
    assert trainer._accelerator_connector.is_distributed  # docs/traps.md #2


def test_trainer_construction_fails_fast_on_mismatches(clean_env: pytest.MonkeyPatch) -> None:
    # Sizes that do not fit devices x num_nodes: at Trainer(), on every rank, before any talk.
    with pytest.raises(ParallelConfigError):
        pl.Trainer(strategy=ParallelCtxStrategy(tensor_parallel_size=3), accelerator="cpu", devices=4, logger=False)
    # torchrun started 2 processes per node; the Trainer asks for 4 devices.
    torchrun(clean_env, rank=0, world=2, local_world=2)
    with pytest.raises(LaunchMismatchError, match=r"torchrun started 2 process\(es\).*devices=4"):
        pl.Trainer(strategy=ParallelCtxStrategy(), accelerator="cpu", devices=4, logger=False)
    trainer = pl.Trainer(strategy=ParallelCtxStrategy(), accelerator="cpu", devices=2, logger=False)
    # docs/traps.md #1's other half: nothing started under torchrun; the in-place launcher only runs
    # the checkpoint recovery before Lightning resolves ckpt_path (resume_path.py).
    from lightning_parallelctx.lightning.resume_path import InPlaceLauncher

    assert type(trainer.strategy.launcher) is InPlaceLauncher
    assert (trainer.global_rank, trainer.world_size) == (0, 2)
