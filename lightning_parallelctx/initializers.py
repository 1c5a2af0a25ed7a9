"""Process-group initializers: one per mode, each a pure function from the layout to its groups.

The built-in modes use the same mechanism a user does to add a parallel algorithm: subclass
:class:`ProcessGroupInitializer`, give it a ``name``, and register it (``@register_mode``) or name
its ``class_path`` in the strategy's arguments. An initializer only *computes* groups; the context
checks them (a partition of the ranks they cover, identical on every rank) and creates only the
calling rank's own groups.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from .errors import ModeNotFoundError, ParallelConfigError
from .layout import RankLayout
from .mode import AXES, ParallelMode, mode_name


class ProcessGroupInitializer(ABC):
    """Computes every group of one mode from the rank layout. Must be pure and deterministic.

    Subclasses set ``name`` (the mode's key) and implement :meth:`groups`. A mode may cover only
    some ranks (the pipeline embedding group holds only the first and last stages); its groups must
    be disjoint. Override :meth:`applies` to skip the mode for layouts it makes no sense for.
    """

    name: str = ""

    def applies(self, layout: RankLayout) -> bool:
        return True

    @abstractmethod
    def groups(self, layout: RankLayout) -> "np.ndarray | Sequence[Sequence[int]]":
        """All groups of this mode, each a sequence of global ranks."""

    def describe(self) -> str:
        """One line for the planner table."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class AxesInitializer(ProcessGroupInitializer):
    """Groups of ranks that differ only along the given axes: one axis, or a product of several."""

    def __init__(self, name: str, axes: Sequence[str]):
        self.name = mode_name(name)
        self.axes = tuple(mode_name(a) for a in axes)

    def groups(self, layout: RankLayout) -> np.ndarray:
        return layout.groups(self.axes) if self.axes else np.arange(layout.world_size)[None, :]

    def describe(self) -> str:
        return " x ".join(a.upper() for a in self.axes) if self.axes else "all ranks"


class Tensor2DInitializer(ProcessGroupInitializer):
    """2-D tensor parallelism (Optimus/SUMMA): each TENSOR group of q*q ranks as a q x q grid.

    The tensor-local rank i sits at row i // q, column i % q. ``row`` groups share a row, ``col``
    groups share a column, as in Colossal-AI's PARALLEL_2D_ROW / PARALLEL_2D_COL.
    """

    def __init__(self, name: str = "tensor_2d_row", along: str = "row"):
        if along not in ("row", "col"):
            raise ParallelConfigError(f"along={along!r}: a 2-D tensor group runs along 'row' or 'col'")
        self.name, self.along = mode_name(name), along

    def applies(self, layout: RankLayout) -> bool:
        tp = layout.sizes["tensor"]
        return tp > 1 and math.isqrt(tp) ** 2 == tp

    def groups(self, layout: RankLayout) -> np.ndarray:
        tp = layout.sizes["tensor"]
        q = math.isqrt(tp)
        if q * q != tp:
            raise ParallelConfigError(
                f"2-D tensor parallelism needs tensor_parallel_size = q x q; got tp={tp}. "
                f"Fix: use tp in (4, 9, 16, ...)"
            )
        squares = layout.groups("tensor").reshape(-1, q, q)
        per = squares if self.along == "row" else squares.transpose(0, 2, 1)
        out = per.reshape(-1, q)
        return out[np.argsort(out[:, 0], kind="stable")]

    def describe(self) -> str:
        return f"TENSOR as q x q, same {self.along}"


class PipelineEmbeddingInitializer(ProcessGroupInitializer):
    """First and last pipeline stage of each pipeline group: they share tied embeddings."""

    name = ParallelMode.PIPELINE_EMBEDDING.value

    def groups(self, layout: RankLayout) -> list[tuple[int, ...]]:
        return [tuple(sorted({int(g[0]), int(g[-1])})) for g in layout.groups("pipeline")]

    def describe(self) -> str:
        return "first + last PIPELINE stage"


class BlockInitializer(ProcessGroupInitializer):
    """Splits every group of a ``parent`` mode into consecutive blocks of ``block_size`` ranks.

    For hierarchical schemes: node-local data groups, a custom context-parallel sub-group, ...
    """

    def __init__(self, name: str, parent: str, block_size: int):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ParallelConfigError(f"block_size={block_size!r} must be a positive integer")
        self.name, self.parent, self.block_size = mode_name(name), mode_name(parent), block_size

    def groups(self, layout: RankLayout) -> np.ndarray:
        parent = builtin_axes_initializer(self.parent).groups(layout)
        if parent.shape[1] % self.block_size:
            raise ParallelConfigError(
                f"mode {self.name!r}: block_size={self.block_size} does not divide the "
                f"{self.parent!r} group size {parent.shape[1]}. Fix: choose a divisor of {parent.shape[1]}"
            )
        return parent.reshape(-1, self.block_size)

    def describe(self) -> str:
        return f"{self.parent.upper()} in blocks of {self.block_size}"


# ---------------------------------------------------------------------------------- registry
_COMPOSITES: dict[str, tuple[str, ...]] = {
    ParallelMode.GLOBAL.value: (),
    **{axis: (axis,) for axis in AXES},
    ParallelMode.DENSE_REPLICA.value: ("data", "sequence", "expert"),
    ParallelMode.EXPERT_REPLICA.value: ("data", "sequence"),
    ParallelMode.DATA_SHARD.value: ("data", "expert"),
    ParallelMode.MODEL_PARALLEL.value: ("tensor", "pipeline", "expert"),
}
#: Modes every context has, in the fixed order in which every rank creates their groups.
CORE_MODES: tuple[str, ...] = tuple(_COMPOSITES)


def builtin_axes_initializer(name: str) -> AxesInitializer:
    key = mode_name(name)
    if key not in _COMPOSITES:
        raise ModeNotFoundError(f"{name!r} is not a built-in axis mode; those are {', '.join(_COMPOSITES)}")
    return AxesInitializer(key, _COMPOSITES[key])


@dataclass
class _Entry:
    factory: Callable[[], ProcessGroupInitializer]
    auto: bool  # added to every context built after registration
    origin: Any


_REGISTRY: dict[str, _Entry] = {}

InitializerSpec = Union[str, ProcessGroupInitializer, type, Mapping[str, Any]]


def register_mode(
    target: "type[ProcessGroupInitializer] | ProcessGroupInitializer | None" = None,
    *,
    name: str | None = None,
    auto: bool = True,
    replace: bool = False,
) -> Any:
    """Register an initializer class or instance under its mode name. Usable as a decorator.

    ``auto=True`` adds the mode to every context built afterwards; ``auto=False`` makes it
    available by name through the ``modes=`` option. Registering a different initializer under a
    taken name is an error unless ``replace=True``; re-registering the same one is a no-op.
    """

    def _register(obj: Any) -> Any:
        key = mode_name(name or getattr(obj, "name", "") or "")
        if not key:
            raise ParallelConfigError(
                f"{obj!r} has no mode name: set a class attribute `name = 'my_mode'` or pass "
                f"register_mode(name='my_mode')"
            )
        if key in CORE_MODES:
            raise ParallelConfigError(
                f"mode name {key!r} is built in ({', '.join(CORE_MODES)}); pick another name for {obj!r}"
            )
        old = _REGISTRY.get(key)
        if old is not None and not replace and old.origin is not obj:
            raise ParallelConfigError(
                f"mode name {key!r} is already registered by {old.origin!r}; registering {obj!r} "
                f"would clash. Fix: choose another name, or pass replace=True to override it"
            )
        if isinstance(obj, ProcessGroupInitializer):
            factory = lambda: obj  # noqa: E731
        elif isinstance(obj, type) and issubclass(obj, ProcessGroupInitializer):
            factory = _named_factory(obj, key)
        else:
            raise ParallelConfigError(
                f"{obj!r} is not a ProcessGroupInitializer subclass or instance; subclass "
                f"lightning_parallelctx.initializers.ProcessGroupInitializer"
            )
        _REGISTRY[key] = _Entry(factory, auto, obj)
        return obj

    return _register if target is None else _register(target)


def _named_factory(cls: type, key: str) -> Callable[[], ProcessGroupInitializer]:
    def make() -> ProcessGroupInitializer:
        init = cls()
        init.name = key
        return init

    return make


def unregister_mode(name: str) -> None:
    _REGISTRY.pop(mode_name(name), None)


def registered_modes() -> dict[str, bool]:
    """Registered (non-core) mode names and whether each is added to every context."""
    return {k: e.auto for k, e in _REGISTRY.items()}


def resolve_initializer(spec: InitializerSpec) -> ProcessGroupInitializer:
    """An initializer from a registered name, a class, an instance, a dotted path or a
    LightningCLI-style ``{"class_path": ..., "init_args": {...}}`` mapping."""
    if isinstance(spec, ProcessGroupInitializer):
        return spec
    if isinstance(spec, type) and issubclass(spec, ProcessGroupInitializer):
        return spec()
    if isinstance(spec, Mapping):
        if "class_path" not in spec:
            raise ParallelConfigError(f"mode spec {dict(spec)!r} needs a 'class_path' (and optional 'init_args')")
        cls = _import(spec["class_path"])
        return _instantiate(cls, dict(spec.get("init_args") or {}), spec["class_path"])
    if isinstance(spec, str):
        key = mode_name(spec)
        if key in _REGISTRY:
            return _REGISTRY[key].factory()
        if "." in spec:
            return _instantiate(_import(spec), {}, spec)
        raise ModeNotFoundError(
            f"no mode named {spec!r}; registered: {sorted(_REGISTRY) or 'none'}, built in: "
            f"{', '.join(CORE_MODES)}. Fix: register it with @register_mode or pass a class_path"
        )
    raise ParallelConfigError(f"cannot make a process-group initializer out of {spec!r}")


def _import(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ParallelConfigError(f"class_path {path!r} cannot be imported: {err}") from err


def _instantiate(cls: Any, kwargs: dict, path: str) -> ProcessGroupInitializer:
    if not (isinstance(cls, type) and issubclass(cls, ProcessGroupInitializer)):
        raise ParallelConfigError(f"class_path {path!r} is not a ProcessGroupInitializer subclass")
    return cls(**kwargs)


def initializers_for(extra: Iterable[InitializerSpec] = ()) -> list[ProcessGroupInitializer]:
    """Core modes, then auto-registered modes, then ``extra``: the order every rank creates in."""
    out = [builtin_axes_initializer(m) for m in CORE_MODES]
    out += [e.factory() for e in _REGISTRY.values() if e.auto]
    for spec in extra:
        init = resolve_initializer(spec)
        if any(i.name == init.name for i in out):
            if any(i is init or type(i) is type(init) and i.name == init.name for i in out):
                continue  # asked for twice (auto-registered and named again): same mode
        out.append(init)
    names = [i.name for i in out]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ParallelConfigError(
            f"two different initializers claim the mode name(s) {clash}; each mode needs a unique name"
        )
    return out


def mode_groups_for(layout: RankLayout, extra: Iterable[InitializerSpec] = ()) -> list["ModeGroups"]:
    """Every mode's checked groups for ``layout``: the core modes, the auto-registered modes that
    apply to it, and the ``extra`` ones, which must apply (asking for 2-D tensor parallelism with
    tp=2 is an error, not a silent no-op)."""
    requested = {resolve_initializer(spec).name for spec in extra}
    out = []
    for init in initializers_for(extra):
        if init.applies(layout):
            out.append(compute_mode_groups(init, layout))
        elif init.name in requested:
            init.groups(layout)  # initializers explain their own rule best: most raise here
            raise ParallelConfigError(f"mode {init.name!r} ({init.describe()}) does not apply to {layout.describe()}")
    return out


# ---------------------------------------------------------------------------------- checked groups
@dataclass(frozen=True, eq=False)
class ModeGroups:
    """The validated groups of one mode in CSR form (vectorised: 65,536 ranks stay cheap)."""

    name: str
    description: str
    flat: np.ndarray  # all groups' ranks, group after group
    offsets: np.ndarray  # group i is flat[offsets[i]:offsets[i + 1]]
    owner: np.ndarray  # global rank -> index of its group, -1 where the mode does not cover it

    @property
    def num_groups(self) -> int:
        return len(self.offsets) - 1

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.name.encode() + self.flat.tobytes() + self.offsets.tobytes()).hexdigest()

    def group(self, index: int) -> tuple[int, ...]:
        return tuple(self.flat[self.offsets[index] : self.offsets[index + 1]].tolist())

    def group_of(self, rank: int) -> tuple[int, ...] | None:
        index = int(self.owner[rank])
        return None if index < 0 else self.group(index)

    def sizes(self) -> list[int]:
        return np.diff(self.offsets).tolist()

    def __iter__(self):
        return (self.group(i) for i in range(self.num_groups))


def compute_mode_groups(init: ProcessGroupInitializer, layout: RankLayout) -> ModeGroups:
    """Run one initializer and check that its groups are a partition of the ranks they cover."""
    raw = init.groups(layout)
    if isinstance(raw, np.ndarray) and raw.ndim == 2:
        flat = raw.astype(np.int64).reshape(-1)
        offsets = np.arange(raw.shape[0] + 1, dtype=np.int64) * raw.shape[1]
    else:
        rows = [np.asarray(g, dtype=np.int64).reshape(-1) for g in raw]
        flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    sizes = np.diff(offsets)
    world = layout.world_size
    where = f"mode {init.name!r} ({init!r})"
    if (sizes == 0).any():
        raise ParallelConfigError(f"{where} produced an empty group (#{int(np.argmax(sizes == 0))})")
    bad = (flat < 0) | (flat >= world)
    if bad.any():
        raise ParallelConfigError(f"{where} names rank(s) {flat[bad][:8].tolist()} outside 0..{world - 1}")
    index = np.repeat(np.arange(len(sizes)), sizes)
    steps = np.diff(flat)
    unsorted = (steps <= 0) & (index[1:] == index[:-1])
    if unsorted.any():
        g = int(index[1:][unsorted][0])
        raise ParallelConfigError(
            f"{where}: group #{g} {flat[offsets[g]:offsets[g + 1]][:16].tolist()} must list distinct "
            f"ranks in ascending order (a rank's local rank is its position in the sorted group)"
        )
    counts = np.bincount(flat, minlength=world)
    if (counts > 1).any():
        r = int(np.argmax(counts > 1))
        a, b = np.flatnonzero(flat == r)[:2]
        ga, gb = int(index[a]), int(index[b])
        raise ParallelConfigError(
            f"{where} does not partition its ranks: rank {r} is in group #{ga} "
            f"{flat[offsets[ga]:offsets[ga + 1]][:16].tolist()} and in group #{gb} "
            f"{flat[offsets[gb]:offsets[gb + 1]][:16].tolist()}. Rule: a rank is in at most one group of a mode"
        )
    owner = np.full(world, -1, dtype=np.int64)
    owner[flat] = index
    return ModeGroups(init.name, init.describe(), flat, offsets, owner)


# Built-in opt-in sub-modes, available by name (modes=["tensor_2d_row", ...]).
register_mode(Tensor2DInitializer("tensor_2d_row", "row"), auto=False)
register_mode(Tensor2DInitializer("tensor_2d_col", "col"), auto=False)
register_mode(PipelineEmbeddingInitializer(), auto=False)
