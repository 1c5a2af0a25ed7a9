"""Declaring a pipelined model: an ordered list of layers, of which each rank builds only its stages.

    from lightning_parallelctx.pipeline import PipelineSequential, stage_plan

    def configure_model(self):
        with torch.device("meta"):                 # nothing is allocated for the whole model
            layers = [Embed(...), *[Block(...) for _ in range(n)], Head(...)]
        self.pipe = PipelineSequential(layers, stage_plan(self), init=self.init_layer)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.pipe.loss(x, y, F.cross_entropy)   # pp > 1: the schedule runs forward + backward
        self.log("train_loss", loss, sync_dist=True)    # the true loss, on every rank
        return loss

Each layer takes the previous layer's output (a tensor, or a tuple spread as arguments). The layers
are split into contiguous stages; a rank keeps (and materialises from the meta device, through
``init``) only the layers of its own stages, registered under ``layers.<index in the full model>``,
so state-dict names are the full model's at every pipeline size and a pp=2 checkpoint is the union
of the stages' state dicts. The same class runs unchanged at pp=1 (all layers local, a plain forward
whose loss Lightning back-propagates) and at pp>1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .layer_rng import LayerStreams
from .placement import Placement, last_stage_rank, layer_ranges, stage_rank, stages_of_rank
from .schedule import LossFn, NonPipelineSchedule, Schedule
from .scope import backward_scale, backward_scope

if TYPE_CHECKING:
    import torch.distributed as dist

__all__ = ["PipelineSequential", "StagePlan", "backward_scope", "stage_plan"]


@dataclass
class StagePlan:
    """Which stages this rank holds and how they are scheduled (made by the strategy)."""

    pp: int = 1
    num_stages: int = 1
    placement: Placement = "loop"
    stages: list[int] = field(default_factory=lambda: [0])
    pp_rank: int = 0
    group: dist.ProcessGroup | None = None
    group_ranks: list[int] = field(default_factory=lambda: [0])
    num_microbatches: int = 1
    schedule: Schedule = field(default_factory=NonPipelineSchedule)

    @property
    def last_stage_group_rank(self) -> int:
        return last_stage_rank(self.pp, self.num_stages, self.placement)

    @classmethod
    def build(cls, ctx: Any, schedule: Schedule, num_microbatches: int, virtual: int) -> StagePlan:
        pp = ctx.get_world_size("pipeline")
        num_stages = pp * virtual
        rank = ctx.get_local_rank("pipeline")
        return cls(pp=pp, num_stages=num_stages, placement=schedule.placement,
                   stages=stages_of_rank(rank, pp, num_stages, schedule.placement), pp_rank=rank,
                   group=ctx.get_group("pipeline"), group_ranks=ctx.get_ranks_in_group("pipeline"),
                   num_microbatches=num_microbatches, schedule=schedule)

    def __getstate__(self) -> dict[str, Any]:  # process groups do not pickle (docs/traps.md #9)
        return {**self.__dict__, "group": None}


def stage_plan(module: Any) -> StagePlan:
    """The plan for a LightningModule: from its ``ParallelCtxStrategy`` (in ``configure_model``), or
    one stage holding every layer when there is none (a plain Trainer, or pp=1)."""
    trainer = getattr(module, "_trainer", None)
    plan = getattr(getattr(trainer, "strategy", None), "stage_plan", None)
    return plan if isinstance(plan, StagePlan) else StagePlan()


# ---------------------------------------------------------------------------------- the module
def _run_chain(indices: Sequence[int], layers: Sequence[nn.Module], args: tuple[Any, ...],
               streams: LayerStreams | None) -> Any:
    """Each layer takes the previous one's output (a tuple is spread); with ``streams``, each runs
    on its own random stream (layer_rng.py)."""
    x: Any = args
    for i, layer in zip(indices, layers):
        with streams.around(i) if streams is not None else nullcontext():
            x = layer(*x) if isinstance(x, tuple) else layer(x)
    return x


class _Stage(nn.Module):
    """Consecutive layers that one ``PipelineStage`` runs."""

    def __init__(self, layers: Sequence[nn.Module], indices: Sequence[int], streams: LayerStreams | None) -> None:
        super().__init__()
        self.chain = nn.ModuleList(layers)
        self.indices = list(indices)
        self.streams = streams

    def forward(self, *args: Any) -> Any:
        return _run_chain(self.indices, self.chain, args, self.streams)


def _materialize(layer: nn.Module, device: torch.device) -> nn.Module:
    """``to_empty`` makes new Parameter objects: carry their Python attributes over (the library's
    tensor-parallel / expert markers live there; losing them would silently unshard the model)."""
    attrs = {name: dict(p.__dict__) for name, p in layer.named_parameters(remove_duplicate=False)}
    layer = layer.to_empty(device=device)
    for name, p in layer.named_parameters(remove_duplicate=False):
        p.__dict__.update(attrs[name])
    return layer


def _layer_of(name: str, names: list[str]) -> int:
    for i, layer in enumerate(names):
        if name.startswith(layer + "."):
            return i
    raise ValueError(f"tied parameter {name!r} is in none of the declared layers {names}")


def _stage_of(layer: int, ranges: list[tuple[int, int]]) -> int:
    return next(s for s, (a, b) in enumerate(ranges) if a <= layer < b)


def _param_spec(full: list[nn.Module], names: list[str], name: str) -> tuple[torch.Size, torch.dtype, int]:
    i = _layer_of(name, names)
    p = full[i].get_parameter(name[len(names[i]) + 1:])
    return p.shape, p.dtype, i


def _has_param(module: nn.Module, name: str) -> bool:
    try:
        module.get_parameter(name)
    except AttributeError:
        return False
    return True


class _Container(nn.ModuleDict):
    """A parent of dotted layer names; ``blocks[0]`` works like a ModuleList's (on the ranks holding it)."""

    def __getitem__(self, key: str | int) -> nn.Module:
        return super().__getitem__(str(key))


class PipelineSequential(nn.Module):
    """An ordered list of layers split into pipeline stages; this rank holds only its stages' layers.

    Args:
        layers: the full model's layers in order: a sequence (registered as ``layers.<i>``), or a
            mapping from dotted names (``"tok"``, ``"blocks.0"``, ``"head"``) to layers, registered
            under those names, so a model keeps the parameter names it had before it was pipelined.
            Build them under ``torch.device("meta")`` so no rank allocates others' layers.
        plan: :func:`stage_plan` of the LightningModule (default: one stage, every layer local).
        init: ``init(index, layer)`` fills a local layer's parameters after it left the meta device
            (its index in the full model: draw from a generator seeded by it to get the same weights
            at every pipeline size). Needed when layers are on the meta device.
        device: where local layers are materialised (default: CPU; the strategy moves the module).
        tied: groups of parameter names that are one weight (see :meth:`_tie`).
        layer_rng_seed: run each layer on its own random stream seeded by (this, layer index), so
            dropout masks are the same at every pipeline size on CPU (layer_rng.py); default: the
            default generator, as a plain ``nn.Sequential``.
    """

    def __init__(self, layers: Sequence[nn.Module] | Mapping[str, nn.Module], plan: StagePlan | None = None,
                 init: Callable[[int, nn.Module], None] | None = None, device: torch.device | str | None = None,
                 tied: Sequence[Sequence[str]] = (), layer_rng_seed: int | None = None) -> None:
        super().__init__()
        if isinstance(layers, Mapping):
            names, full = list(layers.keys()), list(layers.values())
        else:
            full = list(layers)
            names = [f"layers.{i}" for i in range(len(full))]
        if not full or not all(isinstance(m, nn.Module) for m in full):
            raise TypeError(f"PipelineSequential needs a non-empty list of nn.Module layers, got {layers!r}")
        plan = plan or StagePlan()
        self.plan = plan
        self.layer_names = names
        ranges = layer_ranges(len(full), plan.num_stages)
        self.stage_layers = {s: ranges[s] for s in plan.stages}
        device = torch.device(device) if device is not None else torch.device("cpu")
        local: list[tuple[int, nn.Module]] = []
        for s in plan.stages:
            for i in range(*ranges[s]):
                layer = full[i]
                if any(t.is_meta for t in (*layer.parameters(), *layer.buffers())):
                    if init is None:
                        raise ValueError(
                            f"layer {i} ({names[i]}: {type(layer).__name__}) is on the meta device and PipelineSequential "
                            f"got no init=: its weights would be uninitialised. Fix: pass init=lambda index, layer: ... "
                            f"that fills the layer's parameters"
                        )
                    layer = _materialize(layer, device)
                if init is not None:
                    with torch.no_grad():
                        init(i, layer)
                self._register_at(names[i], layer)
                local.append((i, layer))
        tied_specs = {n: _param_spec(full, names, n) for g in tied for n in g}
        del full  # other stages' (meta) layers are dropped here
        self._local_indices = [i for i, _ in local]
        # Stage wrappers share the layers but are not registered: names stay the declared ones.
        by_index = dict(local)
        self.layer_streams = LayerStreams(layer_rng_seed) if layer_rng_seed is not None else None
        object.__setattr__(self, "_stages", [(s, _Stage([by_index[i] for i in range(*ranges[s])], range(*ranges[s]),
                                                        self.layer_streams)) for s in plan.stages])
        object.__setattr__(self, "_chain", [m for _, m in local])
        self._tie(tied, names, tied_specs, ranges)

    def _tie(self, tied: Sequence[Sequence[str]], names: list[str], specs: dict[str, tuple], ranges: list) -> None:
        """Tied parameters (e.g. ``[["tok.weight", "head.weight"]]``): one Parameter where the names
        are on the same rank; on different ranks copies, kept equal by :meth:`sync_tied_weights`
        (values) and :meth:`reduce_tied_grads` (gradients summed). Both talk over the PIPELINE group,
        which every pipeline rank joins (ranks without a copy send zeros): no extra process group,
        whose creation on some ranks only would desynchronise later group names (docs/traps.md #18)."""
        self.tied = [list(g) for g in tied]
        self._tied: list[tuple[torch.Size, torch.dtype, nn.Parameter | None, int, bool]] = []
        plan = self.plan
        for group in self.tied:
            if len(group) < 2:
                raise ValueError(f"tied={tied!r}: each group needs at least two parameter names")
            local = [n for n in group if _has_param(self, n)]
            first = self.get_parameter(local[0]) if local else None
            for n in local[1:]:
                owner, _, attr = n.rpartition(".")
                setattr(self.get_submodule(owner), attr, first)
            if first is not None and local[0] != group[0]:
                # The copy of a rank without the group's first name: clipping counts the parameter once.
                first._pctx_tied_copy = True  # type: ignore[attr-defined]
            holders = {stage_rank(_stage_of(_layer_of(n, names), ranges), plan.pp, plan.num_stages, plan.placement)
                       for n in group}
            shape, dtype, first_layer = specs[group[0]]
            src = stage_rank(_stage_of(first_layer, ranges), plan.pp, plan.num_stages, plan.placement)
            self._tied.append((shape, dtype, first, src, len(holders) > 1))

    @property
    def tied_parameters(self) -> list[nn.Parameter]:
        """This rank's copies of tied parameters (one per group it holds)."""
        return [t[2] for t in self._tied if t[2] is not None]

    @torch.no_grad()
    def sync_tied_weights(self) -> None:
        """Copy the first name's values to the other ranks' copies (collective over PIPELINE)."""
        import torch.distributed as dist

        for shape, dtype, p, src, spread in self._tied:
            if spread:
                buf = p.data if p is not None else torch.empty(shape, dtype=dtype, device=self.device)
                dist.broadcast(buf, src=self.plan.group_ranks[src], group=self.plan.group)

    @torch.no_grad()
    def reduce_tied_grads(self) -> None:
        """Sum the copies' gradients (each stage saw only its own use of the parameter)."""
        import torch.distributed as dist

        for shape, dtype, p, _, spread in self._tied:
            if not spread:
                continue
            if p is not None and p.grad is None:
                p.grad = torch.zeros_like(p)
            buf = p.grad if p is not None else torch.zeros(shape, dtype=dtype, device=self.device)
            dist.all_reduce(buf, group=self.plan.group)

    def _register_at(self, path: str, layer: nn.Module) -> None:
        """``"blocks.3"`` -> ``self.blocks["3"]``: state-dict names are the declared dotted paths."""
        *parents, leaf = path.split(".")
        owner: nn.Module = self
        for part in parents:
            child = owner._modules.get(part)
            if child is None:
                if hasattr(owner, part):
                    raise ValueError(f"layer name {path!r}: {part!r} clashes with an attribute of {type(owner).__name__}")
                child = _Container()
                owner.add_module(part, child)
            owner = child
        if leaf in owner._modules or (owner is self and hasattr(self, leaf)):
            raise ValueError(f"layer name {path!r} is used twice or clashes with an attribute of PipelineSequential")
        owner.add_module(leaf, layer)

    # -- introspection
    @property
    def is_pipelined(self) -> bool:
        return self.plan.pp > 1

    @property
    def device(self) -> torch.device:
        p = next(iter(self.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    def local_stages(self) -> list[tuple[int, nn.Module]]:
        """``(stage id, module)`` of this rank's stages, in increasing stage order."""
        return list(self._stages)

    def layer_indices(self) -> list[int]:
        """Indices (in the full model) of the layers this rank holds."""
        return list(self._local_indices)

    # -- running
    def run_layers(self, *args: Any) -> Any:
        """Every local layer in order (the whole model when pp = 1)."""
        if self.is_pipelined:
            raise RuntimeError("run_layers() needs every layer on this rank; at pp > 1 call pipe(inputs) "
                               "or pipe.loss(inputs, target, loss_fn), which run the schedule")
        return _run_chain(self._local_indices, self._chain, args, self.layer_streams)

    def forward(self, *args: Any) -> Any:
        """The model's output. At pp > 1 a forward-only pass of the schedule, whose output (on the last
        stage) is sent to every pipeline rank."""
        if not self.is_pipelined:
            return self.run_layers(*args)
        return self.plan.schedule.forward_backward_step(self, args, None, None, backward=False).output

    def loss(self, *args: Any, target: torch.Tensor | None = None, loss_fn: LossFn | None = None) -> torch.Tensor:
        """``loss_fn(model(*args), target)`` for the whole batch, the same value on every rank.

        Positional form: ``pipe.loss(x, y, loss_fn)`` (the last two arguments are the target and the
        loss function). In a pipelined ``training_step`` the schedule also runs the backward pass
        (the strategy then skips Lightning's); elsewhere, or at pp = 1, it is a forward pass.
        """
        if target is None and loss_fn is None and len(args) >= 3 and callable(args[-1]):
            *inputs, target, loss_fn = args
            args = tuple(inputs)
        if target is None or loss_fn is None:
            raise TypeError("pipe.loss(*inputs, target, loss_fn): a target tensor and a loss function are needed")
        scale = backward_scale()
        result = self.plan.schedule.forward_backward_step(
            self, tuple(args), target, loss_fn, backward=scale is not None and self.is_pipelined,
            loss_scale=1.0 if scale is None else scale)
        assert result.loss is not None
        return result.loss

    def check_batch(self, args: tuple[Any, ...], target: torch.Tensor | None) -> None:
        """The rules torch's pipelining needs, checked before any message is sent (every pipeline
        rank sees the same batch, so all of them raise together instead of hanging)."""
        m = self.plan.num_microbatches
        tensors = [a for a in args if isinstance(a, torch.Tensor)] + ([target] if target is not None else [])
        if not tensors:
            raise TypeError("a pipeline step needs at least one input tensor (split along dim 0 into micro-batches)")
        sizes = {int(t.shape[0]) if t.dim() else -1 for t in tensors}
        if len(sizes) != 1 or -1 in sizes:
            raise ValueError(f"pipeline inputs and target must share their first (batch) dimension, got sizes "
                             f"{[tuple(t.shape) for t in tensors]}")
        size = sizes.pop()
        if size % m:
            raise ValueError(
                f"batch size {size} is not divisible by num_microbatches={m}: the pipeline splits every batch into "
                f"{m} equal micro-batches. Fix: a batch size that is a multiple of {m} (e.g. {max(m, size - size % m)}), "
                f"drop_last=True in the DataLoader, or num_microbatches dividing {size}"
            )
