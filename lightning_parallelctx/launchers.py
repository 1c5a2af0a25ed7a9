"""What each launcher tells a process about its place in the job, read from environment variables.

Pure functions of an environment mapping: no mpi4py, no sockets. Every missing variable is an error
naming the variable and the launcher that should have set it (see docs/launchers.md).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .errors import LauncherError


@dataclass(frozen=True)
class LaunchInfo:
    """One process's view of the launch: who it is, how many there are, where rank 0 listens."""

    launcher: str  # torchrun | slurm | openmpi | mpich | mvapich2 | none
    rank: int
    world_size: int
    local_rank: int | None  # None: unknown (a world made elsewhere, no launcher variables)
    local_world_size: int | None = None
    node_rank: int | None = None
    num_nodes: int | None = None
    host: str | None = None  # rank 0's address, where the rendezvous store listens
    port: int | None = None
    agent_store: bool = False  # torchrun's agent already hosts the store: every rank is a client


Env = Mapping[str, str]


def _require(env: Env, names: "list[str | tuple[str, ...]]", launcher: str, hint: str) -> None:
    """Raise one error listing EVERY required variable that is missing (a tuple: any one of them
    will do), not the first: a user fixing a launch script should not have to rerun it per variable."""
    missing = [f"{n[0]} (or {', '.join(n[1:])})" if isinstance(n, tuple) else n for n in names
               if not any((env.get(v) or "").strip() for v in (n if isinstance(n, tuple) else (n,)))]
    if missing:
        which = "is" if len(missing) == 1 else "are"
        raise LauncherError(
            f"{launcher}: environment variable{'s' if len(missing) > 1 else ''} {', '.join(missing)} {which} not set; "
            f"{launcher} sets {'it' if len(missing) == 1 else 'them'} for every process it starts. "
            f"{hint or f'Start this script with {launcher}, or export them yourself.'}"
        )


def _int(env: Env, name: str, launcher: str, hint: str = "") -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        _require(env, [name], launcher, hint)
    try:
        return int(raw)  # type: ignore[arg-type]
    except ValueError:
        raise LauncherError(f"{name}={raw!r} (set by {launcher}) is not an integer") from None


def _opt_int(env: Env, name: str) -> int | None:
    raw = env.get(name)
    return int(raw) if raw not in (None, "") and raw.strip().lstrip("-").isdigit() else None


def _check_rank(info: LaunchInfo, names: str) -> LaunchInfo:
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise LauncherError(
            f"{info.launcher}: rank {info.rank} is not inside a world of {info.world_size} "
            f"processes ({names}); the launch environment is inconsistent"
        )
    return info


def _port(value: "int | str | None", source: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise LauncherError(f"{source}={value!r} is not a port number (1-65535)") from None
    if not 0 < port < 65536:
        raise LauncherError(f"{source}={port} is not a port number (1-65535)")
    return port


# ------------------------------------------------------------------------------------ torchrun
def read_torchrun(env: Env) -> LaunchInfo:
    hint = "Run the script with `torchrun --nproc_per_node N script.py`, or build the context with from_env()."
    _require(env, ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"], "torchrun", hint)
    info = LaunchInfo(
        launcher="torchrun",
        rank=_int(env, "RANK", "torchrun", hint),
        world_size=_int(env, "WORLD_SIZE", "torchrun", hint),
        local_rank=_int(env, "LOCAL_RANK", "torchrun", hint),
        local_world_size=_opt_int(env, "LOCAL_WORLD_SIZE"),
        node_rank=_opt_int(env, "GROUP_RANK"),
        num_nodes=None,
        host=env.get("MASTER_ADDR") or _missing("MASTER_ADDR", "torchrun", hint),
        port=_port(env.get("MASTER_PORT") or _missing("MASTER_PORT", "torchrun", hint), "MASTER_PORT"),
        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
    )
    return _check_rank(info, "RANK / WORLD_SIZE")


def _missing(name: str, launcher: str, hint: str) -> str:
    raise LauncherError(f"environment variable {name} is not set; {launcher} sets it. {hint}")


# ------------------------------------------------------------------------------------ Slurm
def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list: 'node[01-03,07],gpu-a[1-2]' -> node01 .. gpu-a2."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        item = item.strip(",")
        if not item:
            continue
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, rest = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                suffixes = [lo]
            else:
                width = len(lo)
                suffixes = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
            for s in suffixes:
                hosts.extend(expand_nodelist(prefix + s + rest) if "[" in rest else [prefix + s + rest])
    return hosts


def tasks_per_node(value: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE: '4(x2),3' -> [4, 4, 3]."""
    out: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise LauncherError(f"SLURM_TASKS_PER_NODE={value!r} is not of the form '4(x2),3'")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def slurm_default_port(job_id: str) -> int:
    """Lightning's rule, so that our processes and Lightning's SLURMEnvironment agree."""
    return 15000 + int(str(job_id)[-4:])


def read_slurm(env: Env) -> LaunchInfo:
    hint = "Start the processes with `srun` inside an allocation (sbatch/salloc)."
    if "SLURM_PROCID" not in env and "SLURM_JOB_ID" in env:
        hint = (
            "This is a Slurm allocation but not an `srun` step: SLURM_PROCID is only set per task. "
            "Start the script with `srun python script.py`."
        )
    _require(env, ["SLURM_PROCID", ("SLURM_NTASKS", "SLURM_NPROCS"), "SLURM_LOCALID"], "Slurm (srun)", hint)
    world = _opt_int(env, "SLURM_NTASKS") or _opt_int(env, "SLURM_NPROCS")
    if world is None:
        _int(env, "SLURM_NTASKS", "Slurm (srun)", hint)
    node_list = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST")
    host = env.get("MASTER_ADDR") or (expand_nodelist(node_list)[0] if node_list else None)
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    port = _port(env.get("MASTER_PORT"), "MASTER_PORT") or (slurm_default_port(job_id) if job_id else None)
    node = _opt_int(env, "SLURM_NODEID")
    per_node = _opt_int(env, "SLURM_NTASKS_PER_NODE")
    if per_node is None and env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE")):
        counts = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env["SLURM_TASKS_PER_NODE"])
        per_node = counts[node] if node is not None and node < len(counts) else None
    info = LaunchInfo(
        launcher="slurm",
        rank=_int(env, "SLURM_PROCID", "Slurm (srun)", hint),
        world_size=int(world),  # type: ignore[arg-type]
        local_rank=_int(env, "SLURM_LOCALID", "Slurm (srun)", hint),
        local_world_size=per_node,
        node_rank=node,
        num_nodes=_opt_int(env, "SLURM_STEP_NUM_NODES") or _opt_int(env, "SLURM_NNODES"),
        host=host,
        port=port,
    )
    return _check_rank(info, "SLURM_PROCID / SLURM_NTASKS")


# ------------------------------------------------------------------------------------ MPIs
def mpi_job_port(env: Env) -> int | None:
    """A port every rank of one MPI job derives alike from the job's id (MPI sets no port)."""
    job = next((env[k] for k in ("OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE", "PMI_KVS_NAME", "PMI_ID",
                                 "MPIRUN_ID", "MV2_MPIRUN_ID") if env.get(k)), None)
    return None if job is None else 20000 + int(hashlib.sha256(job.encode()).hexdigest(), 16) % 20000


def _mpi_reader(launcher: str, rank: str, size: str, local_rank: str, local_size: str) -> Callable[[Env], LaunchInfo]:
    def read(env: Env) -> LaunchInfo:
        hint = f"Start the processes with {launcher}'s mpirun/mpiexec."
        _require(env, [rank, size], launcher, hint)
        local_world = _opt_int(env, local_size)
        world = _int(env, size, launcher, hint)
        # MPI says nothing of a rendezvous. On one node rank 0 is local and the job id gives every
        # rank the same port; across nodes rank 0's host is unknown: MASTER_ADDR/PORT must say.
        single_node = local_world is not None and local_world == world
        info = LaunchInfo(
            launcher=launcher,
            rank=_int(env, rank, launcher, hint),
            world_size=world,
            local_rank=_opt_int(env, local_rank) or 0,
            local_world_size=local_world,
            host=env.get("MASTER_ADDR") or ("127.0.0.1" if single_node else None),
            port=_port(env.get("MASTER_PORT"), "MASTER_PORT") or (mpi_job_port(env) if single_node else None),
        )
        return _check_rank(info, f"{rank} / {size}")

    read.__name__ = f"read_{launcher}"
    return read


read_openmpi = _mpi_reader(
    "openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"
)
read_mpich = _mpi_reader("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
read_mvapich2 = _mpi_reader(
    "mvapich2", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"
)

# Order matters: an srun step of an MPI program sets both Slurm's and PMI's variables (srun
# --mpi=pmi2); torchrun inside Slurm sets RANK, and torchrun's numbering is the one in force.
READERS: dict[str, tuple[str, Callable[[Env], LaunchInfo]]] = {
    "torchrun": ("TORCHELASTIC_RUN_ID", read_torchrun),
    "openmpi": ("OMPI_COMM_WORLD_SIZE", read_openmpi),
    "mvapich2": ("MV2_COMM_WORLD_SIZE", read_mvapich2),
    "slurm": ("SLURM_PROCID", read_slurm),
    "mpich": ("PMI_SIZE", read_mpich),
}


def detect_launcher(env: Env | None = None) -> str:
    """Name of the launcher that started this process, or 'none' (a plain `python script.py`)."""
    env = os.environ if env is None else env
    for name, (marker, _) in READERS.items():
        if marker in env:
            return name
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"  # torch.multiprocessing / hand-exported env:// variables
    return "none"


def read_launch(env: Env | None = None, launcher: str | None = None) -> LaunchInfo:
    """The LaunchInfo of this process, from the named or detected launcher."""
    env = os.environ if env is None else env
    name = launcher or detect_launcher(env)
    if name == "none":
        return LaunchInfo("none", 0, 1, 0, 1, 0, 1, env.get("MASTER_ADDR") or "127.0.0.1", _port(env.get("MASTER_PORT"), "MASTER_PORT"))
    if name not in READERS:
        raise LauncherError(f"unknown launcher {name!r}; known: {', '.join(READERS)} (or 'none')")
    return READERS[name][1](env)


def mpi_variables_present(env: Env | None = None) -> str | None:
    """Which MPI launched us, if any, judged by variables alone (Lightning's check needs mpi4py)."""
    name = detect_launcher(os.environ if env is None else env)
    return name if name in ("openmpi", "mpich", "mvapich2") else None
