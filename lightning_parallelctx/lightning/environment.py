"""ParallelCtxEnvironment: Lightning's view of whoever started this process, read from env vars.

Lightning's own environments each know one launcher, need mpi4py for MPI and fall back to
launching local copies when they do not recognise one: `mpirun -np 4` without mpi4py, or an srun
step named "interactive", silently becomes N independent trainings (docs/traps.md #10). This one reads
every launcher the library knows (:mod:`lightning_parallelctx.launchers`) and turns the ambiguous
cases into errors that say what to change.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from lightning.fabric.plugins.environments.cluster_environment import ClusterEnvironment
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from lightning.fabric.utilities.rank_zero import rank_zero_only

from ..errors import LauncherError
from ..launchers import LaunchInfo, detect_launcher, read_launch

#: Accepted values of ``launcher=`` (and of the ``PCTX_LAUNCHER`` environment variable).
LAUNCHERS = ("auto", "local", "torchrun", "slurm", "openmpi", "mpich", "mvapich2")
MPI_LAUNCHERS = ("openmpi", "mpich", "mvapich2")
#: Job names Lightning treats as an interactive allocation (SLURMEnvironment._is_slurm_interactive_mode).
INTERACTIVE_JOB_NAMES = ("bash", "interactive")


class LaunchMismatchError(LauncherError, ValueError):
    """What the launcher started contradicts the Trainer's ``devices`` / ``num_nodes``, or it is
    ambiguous who should start the processes."""


class ParallelCtxEnvironment(ClusterEnvironment):
    """A Lightning ``ClusterEnvironment`` for torchrun, Slurm (srun), Open MPI, MPICH/Intel MPI and
    MVAPICH2, detected from environment variables alone (no mpi4py), with local launching (the
    strategy starts ``devices`` processes itself) when none of them started this process.

    Args:
        launcher: ``"auto"`` (detect; the ``PCTX_LAUNCHER`` environment variable overrides it),
            ``"local"`` (this process is alone, the strategy starts the others), or a launcher name
            to trust even where detection would refuse (``"slurm"`` for an srun step whose job name
            is "interactive").
    """

    def __init__(self, launcher: str = "auto") -> None:
        super().__init__()
        if not isinstance(launcher, str) or launcher not in LAUNCHERS:
            raise LaunchMismatchError(f"launcher={launcher!r} is not one of {', '.join(LAUNCHERS)}")
        self._requested = launcher
        self._main_port = -1
        # Only used when we launch locally: Lightning's strategy tells us (set_world_ranks).
        self._global_rank = 0
        self._world_size = 1

    # ------------------------------------------------------------------ what launched us
    @property
    def launcher(self) -> str:
        """``"local"`` or the external launcher's name. Read live: a child process we started
        finds Lightning's LOCAL_RANK/WORLD_SIZE variables and is still "local"."""
        return resolve_launcher(os.environ, self._requested)

    @property
    def launch(self) -> LaunchInfo | None:
        """The external launcher's account of this process; None when launching locally."""
        name = self.launcher
        return None if name == "local" else read_launch(os.environ, name)

    @property
    def creates_processes_externally(self) -> bool:
        # A child of our own local launch has LOCAL_RANK (set by Lightning's launcher).
        return self.launcher != "local" or "LOCAL_RANK" in os.environ

    @property
    def main_address(self) -> str:
        info = self.launch
        if info is None:
            return os.environ.get("MASTER_ADDR", "127.0.0.1")
        if info.host:
            return info.host
        raise _no_rendezvous(info)

    @property
    def main_port(self) -> int:
        info = self.launch
        if info is not None:
            if info.port:
                return info.port
            raise _no_rendezvous(info)
        if self._main_port == -1:
            self._main_port = int(os.environ["MASTER_PORT"]) if "MASTER_PORT" in os.environ else find_free_network_port()
        return self._main_port

    @staticmethod
    def detect() -> bool:
        # Every process is either externally launched (detected) or launched by us.
        return True

    def world_size(self) -> int:
        info = self.launch
        return info.world_size if info is not None else self._world_size

    def set_world_size(self, size: int) -> None:
        if self.launch is None:
            self._world_size = size
        # External launchers fix the world size; validate_settings checks Lightning agrees.

    def global_rank(self) -> int:
        info = self.launch
        return info.rank if info is not None else self._global_rank

    def set_global_rank(self, rank: int) -> None:
        if self.launch is None:
            self._global_rank = rank
        rank_zero_only.rank = self.global_rank()

    def local_rank(self) -> int:
        info = self.launch
        return info.local_rank if info is not None else int(os.environ.get("LOCAL_RANK", "0"))

    def node_rank(self) -> int:
        info = self.launch
        if info is None:
            return int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")))
        if info.node_rank is not None:
            return info.node_rank
        # MPI sets no node index; with block mapping (the default) it follows from the local size.
        local = info.local_world_size or info.world_size
        return (info.rank - info.local_rank) // max(local, 1)

    def num_nodes(self) -> int | None:
        info = self.launch
        if info is None:
            return None
        if info.num_nodes is not None:
            return info.num_nodes
        if info.local_world_size:
            return max(1, info.world_size // info.local_world_size)
        return None

    # ------------------------------------------------------------------ validation
    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        """Raise if the launcher started something else than ``devices`` x ``num_nodes`` processes.

        Lightning only calls this from its own launcher; the strategy calls it itself for external
        launches (under srun Lightning never would, docs/launchers.md), at Trainer construction.
        """
        name = self.launcher  # raises for the ambiguous cases
        info = self.launch
        if info is None:
            if num_nodes > 1 and "LOCAL_RANK" not in os.environ:
                raise LaunchMismatchError(
                    f"num_nodes={num_nodes}, but no launcher started this process (plain `python`), and the "
                    f"strategy can only start processes on this node. Fix: start one process per device on "
                    f"every node with torchrun, srun or mpirun, or set num_nodes=1."
                )
            return
        per_node = info.local_world_size
        nodes = self.num_nodes()
        hint = _how_to_match(name)
        if per_node is not None and per_node != num_devices:
            raise LaunchMismatchError(
                f"{name} started {per_node} process(es) on this node ({_per_node_var(name)}={per_node}), but the "
                f"Trainer has devices={num_devices}. Every process drives one device, so they must agree. "
                f"Fix: Trainer(devices={per_node}) or {hint}."
            )
        if nodes is not None and nodes != num_nodes:
            raise LaunchMismatchError(
                f"{name} started processes on {nodes} node(s), but the Trainer has num_nodes={num_nodes}. "
                f"Fix: Trainer(num_nodes={nodes}) or change the launch to {num_nodes} node(s)."
            )
        if info.world_size != num_devices * num_nodes:
            raise LaunchMismatchError(
                f"{name} started {info.world_size} processes in all, but the Trainer expects devices x "
                f"num_nodes = {num_devices} x {num_nodes} = {num_devices * num_nodes}. Fix: Trainer(devices="
                f"<processes per node>, num_nodes=<nodes>) matching the launch, or {hint}."
            )

    def teardown(self) -> None:
        if self.launch is None and "WORLD_SIZE" in os.environ:
            # As LightningEnvironment: a later Trainer in this process must not see a stale world.
            del os.environ["WORLD_SIZE"]

    def __repr__(self) -> str:
        try:
            name = self.launcher
        except LauncherError as err:
            name = f"invalid: {err}"
        return f"ParallelCtxEnvironment(launcher={self._requested!r}, detected={name!r})"


# ---------------------------------------------------------------------- pure helpers
def resolve_launcher(env: Mapping[str, str], requested: str = "auto") -> str:
    """Which launcher started this process: "local" or an external launcher's name.

    Slurm needs care, because its variables are present in places where Slurm did not start
    one process per task: the batch script itself (SLURM_PROCID=0, no SLURM_STEP_ID), a shell
    from salloc, a one-task step. There Lightning's launcher must start the processes. An
    srun step of several tasks named "interactive"/"bash" is ambiguous: Lightning would treat it as
    an interactive shell and every task would start its own copy of the job.
    """
    requested = env.get("PCTX_LAUNCHER", requested) if requested == "auto" else requested
    if requested not in LAUNCHERS:
        raise LaunchMismatchError(f"PCTX_LAUNCHER={requested!r} is not one of {', '.join(LAUNCHERS)}")
    if requested != "auto":
        return requested
    name = detect_launcher(env)
    if name == "none":
        return "local"
    if name != "slurm":
        return name
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        return "local"  # the batch script or an salloc shell: one process, not one per task
    tasks = _int_or_none(env, "SLURM_STEP_NUM_TASKS", "slurm") or _int_or_none(env, "SLURM_NTASKS", "slurm") or 1
    if tasks == 1:
        return "local"
    job_name = env.get("SLURM_JOB_NAME", "")
    if job_name in INTERACTIVE_JOB_NAMES:
        raise LaunchMismatchError(
            f"this process is task {env.get('SLURM_PROCID')} of an srun step of {tasks} tasks in a Slurm job named "
            f"{job_name!r}. Lightning treats jobs named {' or '.join(map(repr, INTERACTIVE_JOB_NAMES))} as an "
            f"interactive shell, so each of the {tasks} tasks would start its own copy of the training. "
            f"Fix: give the job another name (sbatch/srun --job-name=train), or say who starts the processes: "
            f"ParallelCtxEnvironment(launcher='slurm') / PCTX_LAUNCHER=slurm to use the {tasks} tasks as the "
            f"processes, or launcher='local' with `srun --ntasks=1` to let the strategy start them."
        )
    return "slurm"


def _no_rendezvous(info: LaunchInfo) -> LaunchMismatchError:
    """MPI sets no rendezvous address; launchers.py derives one on a single node (127.0.0.1, a port
    from the job id) and leaves it unset otherwise."""
    where = ("on several nodes" if info.local_world_size != info.world_size
             else "and no MPI job id was found to derive a port from")
    return LaunchMismatchError(
        f"{info.launcher} started {info.world_size} processes {where}, and says nothing of where rank 0 "
        f"listens. Fix: export MASTER_ADDR=<rank 0's host> and MASTER_PORT=<free port> to every rank "
        f"(mpirun -x MASTER_ADDR -x MASTER_PORT ...)."
    )


def _per_node_var(name: str) -> str:
    return {
        "torchrun": "LOCAL_WORLD_SIZE", "slurm": "tasks per node", "openmpi": "OMPI_COMM_WORLD_LOCAL_SIZE",
        "mpich": "MPI_LOCALNRANKS", "mvapich2": "MV2_COMM_WORLD_LOCAL_SIZE",
    }.get(name, "processes per node")


def _how_to_match(name: str) -> str:
    return {
        "torchrun": "start torchrun with --nproc_per_node=<devices> --nnodes=<num_nodes>",
        "slurm": "submit with --ntasks-per-node=<devices> --nodes=<num_nodes>",
    }.get(name, "start mpirun with -np <devices x num_nodes> (-npernode <devices>)")


def _int_or_none(env: Mapping[str, str], name: str, launcher: str) -> int | None:
    """``env[name]`` as an int; None when the variable is absent or empty. A value that is set but
    not an integer is an error: guessing would pick the wrong launch mode."""
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchMismatchError(
            f"{name}={value!r} is not an integer, but {launcher} sets it to a number of processes; this "
            f"environment was changed or copied from another job. Fix: unset {name} or set it to an integer "
            f"(or pass ParallelCtxEnvironment(launcher=...) / PCTX_LAUNCHER to say who starts the processes)."
        ) from None
