"""ParallelCtxStrategy: Lightning training with a ParallelContext, from any launcher.

Thin glue in the shape of Lightning's ``strategies/model_parallel.py``: Lightning makes the default
process group (or finds the launcher's), the :class:`ParallelContext` adds only its sub-groups, and
the model is trained unwrapped, its gradients synchronised by the library's gradient handler.
Each override below exists because the inherited behaviour is wrong for sharded models; the
docs/traps.md number says which trap it avoids.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments.cluster_environment import ClusterEnvironment
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _set_num_threads_if_needed,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _PATH, ReduceOp
from lightning.pytorch.strategies.ddp import _DDPForwardRedirection
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.strategies.strategy import TBroadcast
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.optim import Optimizer

from ..context import ParallelContext, _live_context
from ..dtensor import fsdp_managed
from ..distributed import set_current_context
from ..errors import ParallelConfigError
from ..initializers import mode_groups_for, resolve_initializer
from ..launchers import LaunchInfo
from ..layout import RankLayout
from ..mode import ParallelMode
from ..rendezvous import as_timedelta, rendezvous_store
from . import atomic
from ..pipeline import DEFAULT_SCHEDULE, Schedule, StagePlan, resolve_pipeline_config
from . import checkpoint as _ckpt
from ._grad_sync import GradientHandler, check_gradient_handler_spec, check_manual_optimization, make_gradient_handler
from .batchnorm import convert_sync_batchnorm, revert_sync_batchnorm
from ._pipeline import PipelineRuntime, is_ddp_handler
from .environment import LAUNCHERS, ParallelCtxEnvironment
from .fault_guard import FitGuard, die_with_launcher, quietly
from .grad_norm import clip_grad_norm_
from .reductions import DEFAULT_REDUCTION_MODE, default_metric_groups, resolve_group
from .replicas import ReplicaBufferSync, sync_replicas_at_fit_start
from .fsdp import check_marks_kept, shard_model
from .mesh import lightning_device_mesh
from .meta import materialize_meta
from .batch_check import BatchCheck
from .resume_data import batches_already_run, make_resumable, restart_epoch_iterator_if_done
from .resume_path import InPlaceLauncher, RecoveringLauncher

_SIZE_NAMES = ("tensor_parallel_size", "pipeline_parallel_size", "sequence_parallel_size", "expert_parallel_size")


def _same_build_everywhere(ctx: ParallelContext | None) -> bool:
    """True when every rank found the same live context (same build), by one small all-reduce."""
    build = -1 if ctx is None else int(ctx.build_id)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    both = torch.tensor([build, -build], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MIN)
    return build >= 0 and int(both[0]) == build == -int(both[1])


def _refuse_consolidating_optimizers(optimizers: list[Optimizer], action: str) -> None:
    """torch's ZeroRedundancyOptimizer (ZeRO-1) trains under this strategy, but Lightning hands only
    global rank 0 its consolidated state and the other ranks an empty dict, which the sharded
    checkpoint cannot store (seen: KeyError 'state' on three ranks, a reset connection on the fourth).
    Same answer on every rank (same optimizer types), before any collective of the save or load."""
    for opt in optimizers:
        inner = getattr(opt, "_optimizer", opt)  # a LightningOptimizer wraps the user's
        if hasattr(inner, "consolidate_state_dict"):
            raise ParallelConfigError(
                f"cannot {action} a checkpoint with {type(inner).__name__} (optimizer state sharded over the data "
                f"ranks, ZeRO-1): ParallelCtxStrategy's sharded checkpoints need every rank's own optimizer state, "
                f"and this optimizer gives it only to rank 0 after gathering. Fix: ParallelCtxStrategy(fsdp=True) "
                f"(parameters, gradients and optimizer state sharded, checkpointed), a plain optimizer, or "
                f"Trainer(enable_checkpointing=False)"
            )


def _check_size(name: str, value: Any, allow_auto: bool = False) -> Any:
    if allow_auto and (value is None or value == "auto"):
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int):
        also = " or 'auto'" if allow_auto else ""
        raise ParallelConfigError(f"{name}={value!r} ({type(value).__name__}) must be an int >= 1{also}")
    if value < 1:
        raise ParallelConfigError(f"{name}={value} must be >= 1")
    return value


class ParallelCtxStrategy(ParallelStrategy):
    """Data, tensor, pipeline, sequence and expert parallelism with a :class:`ParallelContext`.

    ``Trainer(strategy=ParallelCtxStrategy(tensor_parallel_size=2), devices=4)`` starts the other
    local processes itself when launched with plain ``python``, and uses the processes of torchrun,
    srun or mpirun otherwise (:class:`ParallelCtxEnvironment`). Inside the LightningModule,
    ``self.parallel_context`` is the live context from ``configure_model`` on.

    Args:
        data_parallel_size: DATA size; ``"auto"`` = world size / the product of the other sizes.
        tensor_parallel_size, pipeline_parallel_size, sequence_parallel_size, expert_parallel_size:
            sizes of the other axes. With ``pipeline_parallel_size > 1`` the model declares its layers
            as a ``PipelineSequential`` (docs/pipeline.md).
        pipeline_schedule: ``"1f1b"`` (default), ``"gpipe"``, ``"interleaved_1f1b"``, ``"looped_bfs"``,
            ``"interleaved_zero_bubble"``, ``"zbv_zero_bubble"``, ``"dualpipev"``, a name registered with
            ``register_schedule``, a dotted class path, a ``Schedule`` class or instance, or a
            ``torch.distributed.pipelining`` schedule class.
        num_microbatches: micro-batches per batch (default: one per stage); the batch size must be
            divisible by it.
        virtual_pipeline_size: stages per pipeline rank (default: 1, or 2 for the interleaved and V
            schedules); stages are placed in a loop, or in a V for ``zbv_zero_bubble``/``dualpipev``.
        order: rank layout, innermost axis first, e.g. ``"tp-sp-ep-dp-pp"`` (the default).
        modes: extra parallel modes (plug-in process-group initializers): registered names such as
            ``"tensor_2d_row"`` / ``"pipeline_embedding"``, or ``{"class_path": ..., "init_args": {...}}``
            naming a ``ProcessGroupInitializer`` subclass. ``self.parallel_context.get_group(name)``
            then works in the LightningModule. Modes registered with ``@register_mode`` are added anyway.
        print_layout: global rank 0 prints the table of process groups when the context is built.
        gradient_handler: how gradients are synchronised: ``"bucketed"`` (default), ``"ddp"``,
            ``"allreduce"`` (or a dotted class path), or a :class:`GradientHandler`. Typed
            ``str | GradientHandler``, so in LightningCLI YAML ``{class_path: ..., init_args: {...}}``
            names a subclass and jsonargparse checks its ``init_args`` against the subclass's
            signature before building it. From Python, such a mapping is accepted too. A handler
            instance is a template: each ``fit`` trains with a fresh copy of it.
        launcher: ``"auto"`` (detect), ``"local"`` or a launcher name; see :class:`ParallelCtxEnvironment`.
        sync_initial_weights: at the start of ``fit``, copy parameters not marked tensor-parallel from
            the first TENSOR rank, then every parameter and buffer from the first replica to the other
            replicas of the same shard (as DDP does, but never across shards). Buffers are broadcast
            again before training forwards, as with DDP's ``broadcast_buffers=True``, whatever the value here.
        fsdp: shard parameters, gradients and optimizer state over the dense replicas with FSDP2
            (ZeRO-3, as ModelParallelStrategy users do in configure_model): each element of every
            ``nn.ModuleList`` and each child of the LightningModule becomes one ``fully_shard`` unit;
            works with the library's layers. A model already sharded in configure_model is left as is.
        process_group_backend: ``"gloo"``/``"nccl"``; default from the device.
        timeout: seconds before a collective is declared hung.
        rendezvous_timeout: seconds every rank may take to reach the rendezvous at the start of
            ``fit`` (start-up: imports from a shared file system, a container pull); ``None``: ``timeout``.
            A longer one lets slow starts through without making a hung collective wait longer.
        cluster_environment: a Lightning ``ClusterEnvironment`` instead of ``ParallelCtxEnvironment``.
        async_checkpoint: write checkpoints on a background thread (training goes on after an
            in-memory copy); see docs/checkpoints.md.
    """

    strategy_name = "parallelctx"

    def __init__(
        self,
        data_parallel_size: int | Literal["auto"] = "auto",
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        sequence_parallel_size: int = 1,
        expert_parallel_size: int = 1,
        pipeline_schedule: str | Schedule = DEFAULT_SCHEDULE,
        num_microbatches: int | None = None,
        virtual_pipeline_size: int | None = None,
        order: str | None = None,
        modes: list[str | dict[str, Any]] | None = None,
        print_layout: bool = True,
        gradient_handler: str | GradientHandler = "bucketed",
        launcher: Literal["auto", "local", "torchrun", "slurm", "openmpi", "mpich", "mvapich2"] = "auto",
        sync_initial_weights: bool = True,
        fsdp: bool = False,
        process_group_backend: Literal["gloo", "nccl", "mpi"] | None = None,
        timeout: float = 1800.0,
        rendezvous_timeout: float | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        async_checkpoint: bool = False,
    ) -> None:
        # Everything is checked here, so a bad YAML value fails at once and not inside fit.
        sizes = {"data_parallel_size": _check_size("data_parallel_size", data_parallel_size, allow_auto=True)}
        for name, value in zip(_SIZE_NAMES, (tensor_parallel_size, pipeline_parallel_size,
                                             sequence_parallel_size, expert_parallel_size)):
            sizes[name] = _check_size(name, value)
        pipeline = resolve_pipeline_config(sizes["pipeline_parallel_size"], pipeline_schedule, num_microbatches,
                                           virtual_pipeline_size)
        if order is not None:
            if not isinstance(order, str):
                raise ParallelConfigError(f"order={order!r} must be a string like 'tp-sp-ep-dp-pp' or None")
            RankLayout({}, order=order)  # raises naming the axes for a bad order
        modes = list(modes or [])
        for spec in modes:
            resolve_initializer(spec)  # an unknown name or a bad class_path fails here, not in fit
        if not isinstance(print_layout, bool):
            raise ParallelConfigError(f"print_layout={print_layout!r} must be a bool")
        check_gradient_handler_spec(gradient_handler)
        if pipeline.size > 1 and is_ddp_handler(gradient_handler):
            # DDP's reducer fires once per backward and cannot be told about a schedule's micro-batches.
            raise ParallelConfigError(
                f"gradient_handler={gradient_handler!r} (torch's DDP wrapper) cannot run under a pipeline schedule "
                f"(pipeline_parallel_size={pipeline.size}). Fix: gradient_handler='bucketed' (default) or 'allreduce'"
            )
        if launcher not in LAUNCHERS:
            raise ParallelConfigError(f"launcher={launcher!r} must be one of {', '.join(LAUNCHERS)}")
        if not isinstance(sync_initial_weights, bool):
            raise ParallelConfigError(f"sync_initial_weights={sync_initial_weights!r} must be a bool")
        if not isinstance(fsdp, bool):
            raise ParallelConfigError(f"fsdp={fsdp!r} must be a bool")
        if process_group_backend is not None and process_group_backend not in ("gloo", "nccl", "mpi"):
            raise ParallelConfigError(f"process_group_backend={process_group_backend!r} must be 'gloo', 'nccl', 'mpi' or None")
        self._timeout = as_timedelta(timeout)
        self._join_timeout = None if rendezvous_timeout is None else as_timedelta(rendezvous_timeout, "rendezvous_timeout")
        if not isinstance(async_checkpoint, bool):
            raise ParallelConfigError(f"async_checkpoint={async_checkpoint!r} must be a bool")
        if cluster_environment is not None:
            if not isinstance(cluster_environment, ClusterEnvironment):
                raise ParallelConfigError(f"cluster_environment={cluster_environment!r} is not a ClusterEnvironment")
            if launcher != "auto":
                raise ParallelConfigError("give either launcher= or cluster_environment=, not both")
        super().__init__(cluster_environment=cluster_environment or ParallelCtxEnvironment(launcher))
        self._sizes = sizes
        self._order = order
        self._modes = modes
        self._print_layout = print_layout
        self._gradient_handler_spec = gradient_handler
        self._sync_initial_weights = sync_initial_weights
        self._fsdp = fsdp
        self._process_group_backend = process_group_backend
        self._context: ParallelContext | None = None
        self._grad_handler: Any = None
        self._buffer_sync: ReplicaBufferSync | None = None
        self._batch_check: BatchCheck | None = None
        # With gradient_handler="ddp" and manual optimization, DDP's post-forward must not prepare a
        # second backward after training_step (Lightning's DDPStrategy does the same).
        self._forward_redirection = _DDPForwardRedirection()
        self._faults = FitGuard()
        self._init_rng_state: Tensor | None = None
        self._saver = _ckpt.CheckpointSaver(async_save=async_checkpoint)
        self._rng_state: dict[str, Any] | None = None
        self._pipeline = PipelineRuntime(pipeline)
        self.num_nodes = 1

    # ------------------------------------------------------------------ the context
    @property
    def parallel_context(self) -> ParallelContext:
        if self._context is None or self._context.is_destroyed:
            raise RuntimeError(
                "the ParallelContext exists once the processes have started: use it from the "
                "LightningModule's setup()/configure_model() on (self.parallel_context), not earlier"
            )
        return self._context

    @property
    def device_mesh(self) -> DeviceMesh:
        """The context's DeviceMesh; its dims also answer to "data_parallel"/"tensor_parallel"
        (see :mod:`.mesh`)."""
        return lightning_device_mesh(self.parallel_context)

    def _layout_sizes(self) -> dict[str, Any]:
        s = self._sizes
        return {"data": None if s["data_parallel_size"] == "auto" else s["data_parallel_size"],
                "tensor": s["tensor_parallel_size"], "pipeline": s["pipeline_parallel_size"],
                "sequence": s["sequence_parallel_size"], "expert": s["expert_parallel_size"]}

    def _build_context(self) -> ParallelContext:
        """Once per process (docs/traps.md #7): a later fit/validate/test/predict, or a later Trainer
        with the same layout, reuses the live context instead of making new groups."""
        if self._context is not None and not self._context.is_destroyed:
            return self._context
        sizes = self._layout_sizes()
        layout = RankLayout.build(dist.get_world_size(), **sizes, order=self._order)
        ctx = _live_context(dict(layout.sizes), layout.order, tuple(resolve_initializer(m).name for m in self._modes))
        if not _same_build_everywhere(ctx):
            # Live contexts are held weakly, so whether one survives depends on each process's
            # garbage collection: ranks that disagree would enter different collectives (one
            # building groups, the others already training) and hang. Reuse only what all share.
            ctx = None
        if ctx is None:
            # The default group exists (Lightning made it, or the launcher's user did): the context
            # reuses it and creates only the sub-groups. The env tells it this process's node-local
            # rank, which a process we launched ourselves cannot read from any launcher's variables.
            ctx = ParallelContext(sizes=sizes, order=self._order, modes=self._modes, backend=self._process_group_backend,
                                  timeout=self._timeout, env=self._launch_env())
            if self._print_layout and ctx.global_rank == 0:
                ctx.print_layout()
        self._context = ctx
        return ctx

    def _world_store(self) -> Any:
        env = self.cluster_environment
        assert env is not None
        info = LaunchInfo("lightning", self.global_rank, self.world_size, self.local_rank, self.num_processes,
                          self.node_rank, self.num_nodes, env.main_address, env.main_port,
                          agent_store=os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true")
        return rendezvous_store(info, self._timeout, self._join_timeout)

    def _launch_env(self) -> dict[str, str]:
        env = self.cluster_environment
        assert env is not None
        return {"RANK": str(self.global_rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_RANK": str(self.local_rank), "LOCAL_WORLD_SIZE": str(self.num_processes),
                "GROUP_RANK": str(self.node_rank), "MASTER_ADDR": env.main_address, "MASTER_PORT": str(env.main_port)}

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def is_distributed(self) -> bool:
        # Without it Lightning adds no DistributedSampler and ignores sync_dist (docs/traps.md #2).
        return True

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Only DATA x EXPERT ranks read distinct batches; tensor/sequence/pipeline peers share theirs
        # (docs/traps.md #4: the inherited version uses the global world).
        ctx = self.parallel_context
        return {"num_replicas": ctx.get_world_size(ParallelMode.DATA_SHARD),
                "rank": ctx.get_local_rank(ParallelMode.DATA_SHARD)}

    def process_dataloader(self, dataloader: object) -> object:
        # Mid-epoch resume reads the batches the uninterrupted run reads (resume_data.py).
        trainer = getattr(self.lightning_module, "_trainer", None)
        if trainer is None or not trainer.training:
            return dataloader
        return make_resumable(dataloader, lambda: batches_already_run(trainer), lambda: trainer.current_epoch)

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # Shards are loaded into the model configure_model built, not into an unsharded one.
        return True

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    def _configure_launcher(self) -> None:
        # Runs at Trainer construction: bad sizes or a launch that disagrees with devices/num_nodes
        # fail here, on every rank, before any process talks.
        env = self.cluster_environment
        assert env is not None
        layout = RankLayout.build(self.num_processes * self.num_nodes, **self._layout_sizes(), order=self._order)
        mode_groups_for(layout, self._modes)  # plug-in modes are checked (partition, applicability) too
        if env.creates_processes_externally:
            # torchrun/srun/mpirun started us: no launcher (it would start copies), but check what
            # they started, which Lightning never does without a launcher (docs/launchers.md).
            env.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
            die_with_launcher()  # a child of our launcher or of torchrun's agent must not outlive it
            # Starts nothing; runs before Lightning resolves ckpt_path="last" (resume_path.py).
            self._launcher = InPlaceLauncher()
        else:
            # Without a launcher `devices=N` silently runs one process (docs/traps.md #1).
            self._launcher = RecoveringLauncher(env, self.num_processes, self.num_nodes)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            # No-ops for external launchers, which fix ranks themselves.
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    def setup_environment(self) -> None:
        super().setup_environment()
        if self.root_device.type == "cpu":
            # Every process, not only the one that launched the others (Lightning's launcher does
            # it there alone; srun and mpirun nowhere): N processes with all cores each thrash.
            _set_num_threads_if_needed(num_processes=self.num_processes)
        reset_seed()
        self.set_world_ranks()
        if self._process_group_backend is None:
            self._process_group_backend = _get_default_process_group_backend_for_device(self.root_device)
        assert self.cluster_environment is not None
        # Returns at once when the group exists (a second fit/validate, docs/traps.md #7). Our store, not
        # torch's env:// one, which would listen on every interface (rendezvous.py).
        store = None if _distributed_is_initialized() else self._world_store()
        _init_dist_connection(self.cluster_environment, self._process_group_backend, timeout=self._timeout,
                              **({"store": store} if store is not None else {}))
        ctx = self._build_context()
        # Collectives and layers called without context= talk over this one, even when another
        # live context (another layout) was built later in this process.
        set_current_context(ctx)
        assert self.lightning_module is not None
        # Before the setup()/configure_model() hooks; deepcopy/pickle-safe (docs/traps.md #9).
        self.lightning_module.parallel_context = ctx
        self._faults.arm(self.cluster_environment.main_address, self.cluster_environment.main_port)
        # What ModelParallelStrategy sets, over the context's groups (docs/traps.md #28).
        self.lightning_module._device_mesh = lightning_device_mesh(ctx)
        self._pipeline.plan_for(ctx)

    @property
    def stage_plan(self) -> StagePlan | None:
        """This rank's pipeline stages (``pipeline.stage_plan(module)`` reads it in configure_model)."""
        return self._pipeline.plan

    def setup(self, trainer: pl.Trainer) -> None:
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        # A model built on meta (init_module(empty_init=True), or in configure_model) gets its
        # memory now, layer by layer, with the eager model's weights (meta.py).
        materialize_meta(self.model, self.root_device, self._init_rng_state)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        fitting = trainer.state.fn == TrainerFn.FITTING
        ctx = self.parallel_context
        module = self.lightning_module
        assert module is not None
        if fitting:
            if self._layer_sync is not None:  # Trainer(sync_batchnorm=True): over the data ranks, on CPU too
                self.model = convert_sync_batchnorm(self.model, ctx.get_group(DEFAULT_REDUCTION_MODE), self.root_device)
        self._pipeline.check_module(self.lightning_module, fitting, self.precision_plugin)
        if fitting:
            self._pipeline.setup_fit(trainer)
            if self._sync_initial_weights:
                sync_replicas_at_fit_start(module, ctx)
        if self._fsdp:  # after the broadcast: every replica cuts its shard from the same weights
            shard_model(self.model, ctx)
        if fitting:
            check_marks_kept(self.model, fsdp_managed(self.model))
            handler = self._grad_handler = make_gradient_handler(self._gradient_handler_spec)
            check_manual_optimization(handler, module)
            self.model = handler.setup(self.model, ctx)
            if not isinstance(self.model, torch.nn.parallel.DistributedDataParallel):  # DDP broadcasts its own
                self._buffer_sync = ReplicaBufferSync(module, ctx, lambda: handler.require_sync)
            self._batch_check = BatchCheck(ctx, self.root_device)
            self._reset_optimizers_and_schedulers()
            self.setup_optimizers(trainer)
            self._install_sharded_clipping()
        # Nothing else: validate/test/predict never broadcast weights (docs/traps.md #5).
        default_metric_groups(module, ctx)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    @contextlib.contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        if not empty_init:
            with super().tensor_init_context(empty_init):
                yield
            return
        # On meta, as ModelParallelStrategy does; setup() materialises from this random state.
        self._init_rng_state = torch.get_rng_state()
        with torch.device("meta"), self.precision_plugin.tensor_init_context():
            yield

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    def _install_sharded_clipping(self) -> None:
        # The precision plugin clips by the local norm (docs/traps.md #8). Shadowing its method on this
        # instance keeps whatever it does around it (AMP unscaling) and needs no plugin subclass.
        plugin = self.precision_plugin
        strategy = self

        def clip_grad_by_norm(optimizer: Optimizer, clip_val: float) -> None:
            clip_grad_norm_(list(plugin.main_params(optimizer)), float(clip_val), strategy.parallel_context)

        plugin.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]

    # ------------------------------------------------------------------ gradient synchronisation
    @contextlib.contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        # Accumulating micro-batches must not communicate (docs/traps.md #6): the inherited version
        # only knows DDP-wrapped models.
        if self._grad_handler is None:
            yield None
            return
        with self._grad_handler.no_sync():
            yield None

    def pre_backward(self, closure_loss: Tensor) -> None:
        assert self.lightning_module is not None
        if self._grad_handler is not None and not self.lightning_module.automatic_optimization:
            self._grad_handler.before_backward(closure_loss)  # the backward runs inside training_step

    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        # Lightning's Strategy.backward with one line added: the gradients are final (outside
        # no_sync) before on_after_backward runs and before manual_backward returns, as with DDP,
        # so user code that reads, edits or clips them there sees the same numbers on every replica.
        self.pre_backward(closure_loss)
        assert self.lightning_module is not None
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        with self._scaled_backward(closure_loss) as seeded:
            self.precision_plugin.backward(seeded, self.lightning_module, optimizer, *args, **kwargs)
        if self._grad_handler is not None:
            self._grad_handler.finish()
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss

    def _scaled_backward(self, loss: Tensor) -> contextlib.AbstractContextManager[Tensor]:
        # The handler may fold its 1/replicas into the seed (exact by powers of two); fp16 is left
        # alone: a seed made smaller would underflow sooner in a half-precision backward.
        if self._grad_handler is None or str(self.precision_plugin.precision).startswith("16"):
            return contextlib.nullcontext(loss)
        return self._grad_handler.scaled_backward(loss)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._batch_check is not None and self._batch_check.active:  # silent garbage otherwise: batch_check.py
            assert self.lightning_module is not None
            self._batch_check(args[0] if args else kwargs.get("batch"), self.lightning_module.trainer.current_epoch)
        with self._forward_buffers():
            if not self._pipeline.active:
                return super().training_step(*args, **kwargs)
            # The schedule runs backward inside training_step (see _pipeline.py, docs/traps.md #19).
            assert self.lightning_module is not None
            return self._pipeline.training_step(self.lightning_module.trainer, self._grad_handler, self.optimizers,
                                                lambda: super(ParallelCtxStrategy, self).training_step(*args, **kwargs))

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._forward_buffers():
            return super().validation_step(*args, **kwargs)

    def _forward_buffers(self) -> contextlib.AbstractContextManager[None]:
        # DDP's broadcast_buffers=True, during fit only (DDP wraps the model only for fit).
        return self._buffer_sync.around_forward() if self._buffer_sync is not None else contextlib.nullcontext()

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any],
                       model: pl.LightningModule | torch.nn.Module | None = None, **kwargs: Any) -> Any:
        handler = self._grad_handler

        def synced_closure() -> Any:
            # After backward, before on_before_optimizer_step / clipping / step: gradients are whole.
            result = closure()
            if handler is not None:
                handler.finish()
            return result

        return super().optimizer_step(optimizer, synced_closure, model, **kwargs)

    # ------------------------------------------------------------------ collectives
    def _group(self, group: Any) -> Any:
        """Collectives accept a process group, or a ParallelMode / its name ("data", "tensor");
        the default (None, WORLD) is the ranks holding distinct data, so each sample counts once."""
        return resolve_group(group, self.parallel_context)

    def reduce(self, tensor: Tensor | Any, group: Any | None = None,
               reduce_op: ReduceOp | str | None = "mean") -> Tensor:
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, self._group(group), reduce_op=reduce_op)
        return tensor

    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        return super().all_gather(tensor, group=self._group(group), sync_grads=sync_grads)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        # Every rank votes (early stopping, checkpoint decisions), not only the data shards.
        votes = torch.tensor(int(decision), device=self.root_device)
        votes = _sync_ddp_if_available(votes, None, reduce_op=ReduceOp.SUM)
        return bool(votes == self.world_size) if all else bool(votes)

    def broadcast(self, obj: TBroadcast, src: int = 0) -> TBroadcast:
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def barrier(self, name: str | None = None) -> None:
        if _distributed_is_initialized():
            dist.barrier()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """A torch DCP directory, written atomically by every rank (see :mod:`.checkpoint`)."""
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint got storage_options={storage_options!r}, but it writes a "
                f"torch DCP directory of per-rank files and has no storage backend to pass them to. "
                f"Fix: call trainer.save_checkpoint(path) without storage_options (write to a local or mounted "
                f"path and copy the directory afterwards)"
            )
        _refuse_consolidating_optimizers(self.optimizers, "save")
        path = self.broadcast(str(filepath))
        assert self.lightning_module is not None
        self._saver.save(checkpoint, path, self.lightning_module, self.optimizers, self.parallel_context)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        self._saver.wait()
        _refuse_consolidating_optimizers(self.optimizers, "load")
        path = self.broadcast(str(checkpoint_path))
        assert self.lightning_module is not None
        checkpoint = _ckpt.load_sharded_checkpoint(path, self.lightning_module, self.parallel_context, weights_only,
                                                   self.optimizers)
        self._rng_state = checkpoint.pop(_ckpt.RNG_KEY, None)
        return checkpoint

    def on_train_start(self) -> None:
        # A resumed fit draws a DataLoader seed when its epoch's iterator is made, after the restore;
        # the uninterrupted run drew it before the save: set the generators after that draw.
        if self._rng_state is not None:
            _ckpt.rng_state.apply(self._rng_state)
            self._rng_state = None
            # Saved after an epoch's last batch: the next epoch's iterator draws from the restored state.
            restart_epoch_iterator_if_done(self.lightning_module.trainer)

    def remove_checkpoint(self, filepath: _PATH) -> None:
        if self.is_global_zero:
            # Rank 0 alone deletes (ModelCheckpoint's top-k pruning): no collective here.
            self._saver.wait_local()
            atomic.remove(Path(filepath))

    # ------------------------------------------------------------------ failures and teardown
    def on_exception(self, exception: BaseException) -> None:
        # Names the rank that failed first on every rank, ends our children (fault_guard.py).
        ctx = self._context if self._context is not None and not self._context.is_destroyed else None
        self._faults.on_exception(exception, ctx, self._launcher)

    def teardown(self) -> None:
        self._saver.wait()
        if self._grad_handler is not None:
            with quietly(self._faults.failed, "removing the gradient hooks"):
                self._grad_handler.remove()
            self._grad_handler = None
        self._buffer_sync = None
        self._batch_check = None
        if self._layer_sync is not None and self.lightning_module is not None:
            revert_sync_batchnorm(self.lightning_module)  # as DDPStrategy does after fit
        self._faults.disarm()  # after the removal: a removal stuck on a dead peer is still ended
        self._pipeline.teardown(getattr(self.lightning_module, "_trainer", None))
        # The context outlives this fit: the next fit/validate/test/predict reuses it (docs/traps.md #7).
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        register(strategy_registry)


def register(strategy_registry: Mapping[str, Any] | None = None) -> None:
    """Register the name "parallelctx", once (Lightning never calls a third party's
    register_strategies itself, docs/traps.md #3)."""
    if strategy_registry is None:
        from lightning.pytorch.strategies import StrategyRegistry as strategy_registry
    if "parallelctx" not in strategy_registry:
        strategy_registry.register(  # type: ignore[attr-defined]
            "parallelctx", ParallelCtxStrategy,
            description="data/tensor/pipeline/sequence/expert parallelism with lightning_parallelctx",
        )
