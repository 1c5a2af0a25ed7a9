"""ParallelContext: the process groups of every parallel mode, and answers about them."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .current import LIVE, set_current_context
from .errors import LauncherError, ModeNotFoundError, ParallelConfigError, ParallelCtxError
from .initializers import InitializerSpec, ModeGroups, mode_groups_for
from .launchers import LaunchInfo, read_launch
from .layout import RankLayout
from .mode import SHORT_NAMES, ParallelMode, mode_name
from .process_groups import GroupFactory
from .rendezvous import as_timedelta, init_world
from .topology import warn_if_groups_span_nodes

Mode = "ParallelMode | str"
SizeArg = "int | str | None"

#: Counts builds in this process. SPMD programs build in the same sequence on every rank, so the
#: count names this build's groups identically everywhere (and is checked across ranks anyway).
_BUILD_COUNTER = itertools.count()

DEFAULT_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class _ModeState:
    groups: ModeGroups
    ranks: tuple[int, ...] | None  # this rank's group, None when the mode does not cover it


class ParallelContext:
    """Process groups for data, tensor, pipeline, sequence and expert parallelism (and plug-ins).

    Build one with :meth:`from_env` (detects the launcher), :meth:`from_torch`, :meth:`from_slurm`,
    :meth:`from_openmpi` or :meth:`from_config`. If a default process group already exists (made by
    Lightning or the user) it is reused and only the sub-groups are created.
    """

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_torch(cls, data_parallel_size: SizeArg = None, tensor_parallel_size: int = 1,
                   pipeline_parallel_size: int = 1, sequence_parallel_size: int = 1,
                   expert_parallel_size: int = 1, **options: Any) -> "ParallelContext":
        """Processes started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
        return cls._build("torchrun", None, None, data_parallel_size, tensor_parallel_size,
                          pipeline_parallel_size, sequence_parallel_size, expert_parallel_size, options)

    @classmethod
    def from_slurm(cls, host: str | None = None, port: int | None = None, data_parallel_size: SizeArg = None,
                   tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                   sequence_parallel_size: int = 1, expert_parallel_size: int = 1,
                   **options: Any) -> "ParallelContext":
        """Tasks started by srun. host defaults to the first node of the step, port to
        15000 + the last 4 digits of the job id (Lightning's rule); MASTER_ADDR/PORT override."""
        return cls._build("slurm", host, port, data_parallel_size, tensor_parallel_size,
                          pipeline_parallel_size, sequence_parallel_size, expert_parallel_size, options)

    @classmethod
    def from_openmpi(cls, host: str | None = None, port: int | None = None, data_parallel_size: SizeArg = None,
                     tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                     sequence_parallel_size: int = 1, expert_parallel_size: int = 1,
                     **options: Any) -> "ParallelContext":
        """Processes started by Open MPI's mpirun. MPI sets no rendezvous address: on one node rank 0
        is 127.0.0.1 and the port comes from the job id; across nodes pass host/port or export
        MASTER_ADDR/MASTER_PORT (``mpirun -x MASTER_ADDR -x MASTER_PORT``)."""
        return cls._build("openmpi", host, port, data_parallel_size, tensor_parallel_size,
                          pipeline_parallel_size, sequence_parallel_size, expert_parallel_size, options)

    @classmethod
    def from_env(cls, host: str | None = None, port: int | None = None, data_parallel_size: SizeArg = None,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 sequence_parallel_size: int = 1, expert_parallel_size: int = 1,
                 **options: Any) -> "ParallelContext":
        """Detect the launcher (torchrun, Slurm, Open MPI, MPICH/Intel MPI, MVAPICH2, or a plain
        single process) from the environment and build from it."""
        return cls._build(options.pop("launcher", None), host, port, data_parallel_size, tensor_parallel_size,
                          pipeline_parallel_size, sequence_parallel_size, expert_parallel_size, options)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **options: Any) -> "ParallelContext":
        """From a mapping like ``{"tp": 2, "pp": 1, "dp": 2}``: keys tp/pp/dp/sp/ep (or the long
        ``*_parallel_size`` names), missing ones are 1 (dp: derived); other keys are options."""
        long = {"tp": "tensor_parallel_size", "pp": "pipeline_parallel_size", "dp": "data_parallel_size",
                "sp": "sequence_parallel_size", "ep": "expert_parallel_size"}
        sizes: dict[str, Any] = {}
        rest: dict[str, Any] = {}
        for key, value in dict(config).items():
            name = long.get(key, key)
            (sizes if name in long.values() else rest)[name] = value
        unknown = set(rest) - _OPTIONS - {"host", "port", "launcher"}
        if unknown:
            raise ParallelConfigError(
                f"unknown key(s) {sorted(unknown)} in parallel config; sizes are {sorted(long)} "
                f"(or {sorted(long.values())}), options are {sorted(_OPTIONS | {'host', 'port', 'launcher'})}"
            )
        return cls.from_env(**sizes, **rest, **options)

    @classmethod
    def _build(cls, launcher: str | None, host: str | None, port: int | None, dp: SizeArg, tp: int, pp: int,
               sp: int, ep: int, options: dict[str, Any]) -> "ParallelContext":
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ParallelConfigError(f"unknown option(s) {sorted(unknown)}; options are {sorted(_OPTIONS)}")
        return cls(sizes=dict(data=dp, tensor=tp, pipeline=pp, sequence=sp, expert=ep), launcher=launcher,
                   host=host, port=port, **options)

    # ------------------------------------------------------------------ building
    def __init__(self, sizes: Mapping[str, Any], *, launcher: str | None = None, host: str | None = None,
                 port: int | None = None, order: "str | Sequence[str] | None" = None,
                 modes: Iterable[InitializerSpec] = (), backend: str | None = None,
                 timeout: "float | timedelta" = DEFAULT_TIMEOUT, rendezvous_timeout: "float | timedelta | None" = None,
                 env: Mapping[str, str] | None = None):
        started = time.perf_counter()
        self._timeout = as_timedelta(timeout)
        join = None if rendezvous_timeout is None else as_timedelta(rendezvous_timeout, "rendezvous_timeout")
        self._owns_world = False
        self._destroyed = False
        build_id = next(_BUILD_COUNTER)
        self._namespace = f"pctx{build_id}_"
        env = os.environ if env is None else env

        if dist.is_available() and dist.is_initialized():
            world_size, rank = dist.get_world_size(), dist.get_rank()
            self._launch = _existing_world_launch(env, rank, world_size)
        else:
            self._launch = _launch_with_overrides(read_launch(env, launcher), host, port)
            world_size, rank = self._launch.world_size, self._launch.rank

        # Everything that can be checked without talking is checked first, on every rank.
        self.layout = RankLayout.build(world_size, **sizes, order=order)
        warn_if_groups_span_nodes(self.layout, self._launch.local_world_size, rank)
        self._modes: dict[str, _ModeState] = {}
        computed = mode_groups_for(self.layout, modes)

        if not dist.is_initialized():
            init_world(self._launch, backend, self._timeout, self._namespace, join)
            self._owns_world = True
        try:
            _check_same_everywhere(self.layout, computed, build_id)
            self._factory = GroupFactory(self._namespace, self._timeout, backend)
            for mode in computed:  # one fixed order on every rank
                ranks = mode.group_of(rank)
                self._modes[mode.name] = _ModeState(mode, ranks)
                if ranks is not None and len(ranks) > 1:
                    self._factory.get(ranks)
        except BaseException:
            self._release()
            raise
        self._device_mesh = None
        self.build_id = build_id
        #: Seconds this rank spent building (validation, rendezvous, its own groups).
        self.build_seconds = time.perf_counter() - started
        LIVE.add(self)
        set_current_context(self)

    # ------------------------------------------------------------------ queries
    def get_global_rank(self) -> int:
        self._alive()
        return dist.get_rank()

    def get_world_size(self, mode: Mode = ParallelMode.GLOBAL) -> int:
        return len(self._own(mode))

    def get_local_rank(self, mode: "Mode | None" = None) -> int:
        """Rank inside this rank's group of ``mode``; with no mode, the rank on this node."""
        if mode is None:
            if self._launch.local_rank is None:
                raise ParallelCtxError(
                    f"rank {self.get_global_rank()}: the rank on this node is unknown: the default process "
                    f"group was made outside this context and no launcher variables describe this process "
                    f"(LOCAL_RANK, SLURM_LOCALID, OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID, ...). Fix: export "
                    f"LOCAL_RANK, or pass env={{'LOCAL_RANK': ...}} when building the context"
                )
            return self._launch.local_rank
        return self._own(mode).index(self.get_global_rank())

    def get_ranks_in_group(self, mode: Mode) -> list[int]:
        return list(self._own(mode))

    def get_group(self, mode: Mode) -> dist.ProcessGroup:
        """The process group of ``mode`` this rank belongs to (size-1 groups are made on demand)."""
        return self._factory.get(self._own(mode))

    def get_next_global_rank(self, mode: Mode) -> int:
        ranks = self._own(mode)
        return ranks[(ranks.index(self.get_global_rank()) + 1) % len(ranks)]

    def get_prev_global_rank(self, mode: Mode) -> int:
        ranks = self._own(mode)
        return ranks[(ranks.index(self.get_global_rank()) - 1) % len(ranks)]

    def is_first_rank(self, mode: Mode) -> bool:
        return self.get_local_rank(mode) == 0

    def is_last_rank(self, mode: Mode) -> bool:
        return self.get_local_rank(mode) == self.get_world_size(mode) - 1

    def is_member(self, mode: Mode) -> bool:
        """False for a plug-in mode that does not cover this rank (e.g. a middle pipeline stage)."""
        return self._state(mode).ranks is not None

    def has_mode(self, mode: Mode) -> bool:
        return mode_name(mode) in self._modes

    @property
    def modes(self) -> list[str]:
        return list(self._modes)

    def all_groups(self, mode: Mode) -> list[tuple[int, ...]]:
        """Every group of ``mode`` over the whole world (pure; no process talk)."""
        return list(self._state(mode).groups)

    @property
    def launch(self) -> LaunchInfo:
        return self._launch

    @property
    def new_group_calls(self) -> int:
        """How many times this rank called ``new_group``: constant in the world size."""
        return self._factory.new_group_calls

    # Shortcuts -------------------------------------------------------------------------
    global_rank = property(get_global_rank)
    world_size = property(lambda self: self.get_world_size(ParallelMode.GLOBAL))
    tp_rank = property(lambda self: self.get_local_rank(ParallelMode.TENSOR))
    pp_rank = property(lambda self: self.get_local_rank(ParallelMode.PIPELINE))
    dp_rank = property(lambda self: self.get_local_rank(ParallelMode.DATA))
    sp_rank = property(lambda self: self.get_local_rank(ParallelMode.SEQUENCE))
    ep_rank = property(lambda self: self.get_local_rank(ParallelMode.EXPERT))
    tp_size = property(lambda self: self.layout.sizes["tensor"])
    pp_size = property(lambda self: self.layout.sizes["pipeline"])
    dp_size = property(lambda self: self.layout.sizes["data"])
    sp_size = property(lambda self: self.layout.sizes["sequence"])
    ep_size = property(lambda self: self.layout.sizes["expert"])

    def print_layout(self, console: Any = None, *, max_groups: int = 4) -> None:
        """Print the planner's tables (axes, every mode's groups, every rank's coordinates) for this
        context. Call it on one rank."""
        from rich.console import Console

        from .tables import render

        render(self.layout, [state.groups for state in self._modes.values()], console or Console(),
               max_groups=max_groups, max_ranks=16)

    # ------------------------------------------------------------------ DTensor / FSDP2 view
    @property
    def device_mesh(self) -> "torch.distributed.device_mesh.DeviceMesh":
        """A DeviceMesh over the same ranks, dims outermost first (pipeline ... tensor), named by
        the short names. Built on first use from the groups already made, never with
        ``init_device_mesh`` (which would create O(world) groups)."""
        self._alive()
        if self._device_mesh is None:
            from torch.distributed.device_mesh import DeviceMesh

            dims = list(reversed(self.layout.order))
            mesh = torch.tensor(self.layout.grid(dims), dtype=torch.int)
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            groups = [self.get_group(axis) for axis in dims]
            self._device_mesh = DeviceMesh.from_group(
                groups, device, mesh=mesh, mesh_dim_names=tuple(SHORT_NAMES[a] for a in dims)
            )
        return self._device_mesh

    # ------------------------------------------------------------------ teardown
    def destroy(self) -> None:
        """Free every group this context made (and the default group if it made that too).
        Safe to call twice; a new context can be built afterwards."""
        if self._destroyed:
            return
        self._release()
        LIVE.discard(self)

    def _release(self) -> None:
        self._destroyed = True
        factory = getattr(self, "_factory", None)
        if factory is not None:
            factory.destroy()
        self._device_mesh = None
        if self._owns_world and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_world = False

    @property
    def is_destroyed(self) -> bool:
        return self._destroyed

    # ------------------------------------------------------------------ presentation / copying
    def __repr__(self) -> str:
        if self._destroyed:
            return f"ParallelContext(destroyed, {self.layout.describe()})"
        parts = [f"global_rank={self.global_rank}", f"world_size={self.world_size}"]
        for axis in ("tensor", "pipeline", "data", "sequence", "expert"):
            parts.append(f"{SHORT_NAMES[axis]}={self.layout.sizes[axis]}[rank={self.get_local_rank(axis)}]")
        return f"ParallelContext({', '.join(parts)})"

    def __deepcopy__(self, memo: dict) -> "ParallelContext":
        # Process groups cannot be copied; a copy of a module must keep talking to the same ranks.
        return self

    def __reduce__(self) -> tuple:
        # Pickled with a module (spawn, checkpoints, predict), it comes back as the live context of
        # the unpickling process with the same layout and modes, or None if there is none yet.
        return (_live_context, (dict(self.layout.sizes), self.layout.order, tuple(self._modes)))

    # ------------------------------------------------------------------ internals
    def _alive(self) -> None:
        if self._destroyed:
            raise ParallelCtxError("this ParallelContext was destroyed; build a new one")

    def _state(self, mode: Mode) -> _ModeState:
        self._alive()
        key = mode_name(mode)
        try:
            return self._modes[key]
        except KeyError:
            raise ModeNotFoundError(
                f"mode {mode!r} does not exist in this context; it has {', '.join(self._modes)}. "
                f"Fix: use one of those, or add the mode with modes=[...] / @register_mode"
            ) from None

    def _own(self, mode: Mode) -> tuple[int, ...]:
        state = self._state(mode)
        if state.ranks is None:
            raise ParallelCtxError(
                f"rank {dist.get_rank()} is in no group of mode {mode_name(mode)!r} ({state.groups.description}); "
                f"check ctx.is_member({mode_name(mode)!r}) before asking"
            )
        return state.ranks


_OPTIONS = {"order", "modes", "backend", "timeout", "rendezvous_timeout", "env"}


def _live_context(sizes: dict, order: tuple, modes: tuple[str, ...] = ()) -> "ParallelContext | None":
    """The newest live context with this layout and (at least) these modes, if any."""
    for ctx in sorted(LIVE, key=lambda c: -c.build_id):
        if (not ctx.is_destroyed and dict(ctx.layout.sizes) == sizes and ctx.layout.order == tuple(order)
                and all(ctx.has_mode(m) for m in modes)):
            return ctx
    return None


def _launch_with_overrides(info: LaunchInfo, host: str | None, port: int | None) -> LaunchInfo:
    from dataclasses import replace

    if host is not None:
        info = replace(info, host=host)
    if port is not None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise LauncherError(f"port={port!r} is not a port number (an int in 1-65535)")
        info = replace(info, port=port, agent_store=False)
    return info


def _existing_world_launch(env: Mapping[str, str], rank: int, world_size: int) -> LaunchInfo:
    """Describe a world someone else made; only the node-local rank needs the launcher, and it is
    left unknown (None) rather than guessed when the launcher's variables describe another process:
    a wrong guess would put two ranks on one GPU."""
    if world_size == 1:
        return LaunchInfo("existing", rank, 1, 0)
    try:
        local = read_launch(env)
    except LauncherError:
        return LaunchInfo("existing", rank, world_size, None)
    if local.world_size == world_size and local.rank == rank:
        return LaunchInfo(local.launcher, rank, world_size, local.local_rank, local.local_world_size,
                          local.node_rank, local.num_nodes, local.host, local.port)
    return LaunchInfo("existing", rank, world_size, None)  # type: ignore[arg-type]


def _check_same_everywhere(layout: RankLayout, modes: list[ModeGroups], build_id: int) -> None:
    """One all-reduce proves every rank has the same sizes, order, modes and build count.

    A mismatch would otherwise surface as a hang inside new_group; here every rank learns it at
    once and the error shows what differs.
    """
    if dist.get_world_size() == 1:
        return
    summary = {
        "sizes": layout.describe(),
        "build": build_id,
        "modes": {m.name: m.fingerprint[:12] for m in modes},
    }
    digest = int.from_bytes(hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).digest()[:7], "big")
    probe = torch.tensor([digest, -digest], dtype=torch.int64)
    dist.all_reduce(probe, op=dist.ReduceOp.MAX)
    if int(probe[0]) == digest and -int(probe[1]) == digest:
        return
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, summary)
    mine = everyone[dist.get_rank()]
    differing = [(r, s) for r, s in enumerate(everyone) if s != mine][:4]
    lines = "; ".join(f"rank {r}: {_diff(mine, s)}" for r, s in differing)
    raise ParallelConfigError(
        f"rank {dist.get_rank()}: ranks were given different parallel configurations ({lines}; this "
        f"rank has {mine['sizes']}). Rule: every rank must pass the same sizes, order and modes, and "
        f"build the same number of contexts. Fix: pass identical arguments everywhere."
    )


def _diff(mine: dict, other: dict) -> str:
    out = []
    if mine["sizes"] != other["sizes"]:
        out.append(f"sizes {other['sizes']}")
    if mine["build"] != other["build"]:
        out.append(f"build #{other['build']} vs #{mine['build']} here")
    for name in sorted(set(mine["modes"]) | set(other["modes"])):
        if mine["modes"].get(name) != other["modes"].get(name):
            out.append(f"mode {name!r} groups differ" if name in other["modes"] and name in mine["modes"]
                       else f"mode {name!r} only on {'that rank' if name in other['modes'] else 'this rank'}")
    return ", ".join(out) or "different"
