"""The rank grid: sizes and an axis order in, every group of every axis combination out.

Pure arithmetic on a numpy grid. Nothing here talks to other processes, so the whole layout of a
65,536-rank job can be computed and checked on a laptop, by the planner and by every rank before
it creates a single process group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from .errors import ParallelConfigError
from .mode import AXES, SHORT_NAMES, axis_name

def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def check_size(name: str, value: object) -> int:
    """An axis size must be a positive int; bools and floats are refused, not truncated."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ParallelConfigError(
            f"{name}={value!r} ({type(value).__name__}): a parallel size must be a positive "
            f"integer, e.g. {name}=2"
        )
    if value < 1:
        raise ParallelConfigError(
            f"{name}={value}: a parallel size must be at least 1 (1 means the axis is not split)"
        )
    return int(value)


def parse_order(order: "str | Sequence[str] | None") -> tuple[str, ...]:
    """An axis order, innermost first: a sequence of axis names or a string like 'tp-sp-ep-dp-pp'."""
    if order is None:
        return AXES
    if isinstance(order, str):
        parts = [p for p in order.replace(",", "-").replace(" ", "-").split("-") if p]
    else:
        parts = list(order)
    names = tuple(axis_name(p) for p in parts)
    if sorted(names) != sorted(AXES):
        missing = [a for a in AXES if a not in names]
        repeated = sorted({a for a in names if names.count(a) > 1})
        raise ParallelConfigError(
            f"order {order!r} must name each of the five axes exactly once, innermost first "
            f"(default 'tp-sp-ep-dp-pp'); missing: {missing or 'none'}, repeated: {repeated or 'none'}"
        )
    return names


@dataclass(frozen=True)
class RankLayout:
    """Where every global rank sits on the (tensor, sequence, expert, data, pipeline) grid.

    ``order`` lists the axes innermost first: the first axis has stride 1, so consecutive global
    ranks differ in that coordinate (tensor by default, keeping tensor-parallel peers on one node).
    """

    sizes: Mapping[str, int]
    order: tuple[str, ...] = AXES
    strides: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sizes = {axis_name(k): check_size(f"{SHORT_NAMES[axis_name(k)]}", v) for k, v in self.sizes.items()}
        full = {a: sizes.get(a, 1) for a in AXES}
        object.__setattr__(self, "sizes", full)
        object.__setattr__(self, "order", parse_order(self.order))
        strides, stride = {}, 1
        for axis in self.order:
            strides[axis] = stride
            stride *= full[axis]
        object.__setattr__(self, "strides", strides)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        world_size: int,
        *,
        data: "int | str | None" = None,
        tensor: int = 1,
        pipeline: int = 1,
        sequence: int = 1,
        expert: int = 1,
        order: "str | Sequence[str] | None" = None,
    ) -> "RankLayout":
        """Validate sizes against ``world_size``; ``data`` of None/'auto' is derived from the rest."""
        world_size = check_size("world_size", world_size)
        fixed = {
            "tensor": check_size("tp", tensor),
            "sequence": check_size("sp", sequence),
            "expert": check_size("ep", expert),
            "pipeline": check_size("pp", pipeline),
        }
        model = math.prod(fixed.values())
        shown = " x ".join(f"{SHORT_NAMES[a]}({v})" for a, v in fixed.items())
        if data is None or (isinstance(data, str) and data.lower() == "auto"):
            if world_size % model:
                raise ParallelConfigError(
                    f"world size {world_size} is not divisible by {shown} = {model}, so no "
                    f"data_parallel_size fits. Rule: tp x sp x ep x pp must divide the world size. "
                    f"Fix: choose sizes whose product is one of {_divisors(world_size)}, or launch "
                    f"a multiple of {model} processes."
                )
            dp = world_size // model
        else:
            dp = check_size("dp", data)
            if model * dp != world_size:
                hint = (
                    f"data_parallel_size='auto' would give dp={world_size // model}"
                    if world_size % model == 0
                    else f"tp x sp x ep x pp must divide {world_size}: valid products are {_divisors(world_size)}"
                )
                raise ParallelConfigError(
                    f"{shown} x dp({dp}) = {model * dp}, but the world size is {world_size}. "
                    f"Rule: the product of all parallel sizes must equal the number of processes. "
                    f"Fix: {hint}."
                )
        return cls({**fixed, "data": dp}, order=order)

    # ------------------------------------------------------------------ scalar questions
    @property
    def world_size(self) -> int:
        return math.prod(self.sizes.values())

    def size(self, axes: "str | Iterable[str]") -> int:
        return math.prod(self.sizes[a] for a in _axes(axes))

    def coords(self, rank: int) -> dict[str, int]:
        """The coordinate of ``rank`` along each axis."""
        self._check_rank(rank)
        return {a: (rank // self.strides[a]) % self.sizes[a] for a in AXES}

    def rank_of(self, **coords: int) -> int:
        """Global rank at the given coordinates (missing axes are 0); inverse of :meth:`coords`."""
        rank = 0
        for key, value in coords.items():
            axis = axis_name(key)
            if not 0 <= value < self.sizes[axis]:
                raise ParallelConfigError(
                    f"{axis} coordinate {value} is outside 0..{self.sizes[axis] - 1} (size {self.sizes[axis]})"
                )
            rank += value * self.strides[axis]
        return rank

    def local_rank(self, rank: int, axes: "str | Iterable[str]") -> int:
        """Index of ``rank`` inside its group over ``axes`` (groups are sorted by global rank)."""
        c = self.coords(rank)
        index = 0
        for axis in self._outer_first(_axes(axes)):
            index = index * self.sizes[axis] + c[axis]
        return index

    # ------------------------------------------------------------------ groups
    def group_of(self, rank: int, axes: "str | Iterable[str]") -> tuple[int, ...]:
        """The sorted ranks that differ from ``rank`` only along ``axes``. O(group size)."""
        axes = self._outer_first(_axes(axes))
        c = self.coords(rank)
        base = rank - sum(c[a] * self.strides[a] for a in axes)
        members = np.array([base], dtype=np.int64)
        for axis in axes:  # outermost first, so the row-major expansion comes out sorted
            offsets = np.arange(self.sizes[axis], dtype=np.int64) * self.strides[axis]
            members = (members[:, None] + offsets[None, :]).reshape(-1)
        return tuple(members.tolist())

    def groups(self, axes: "str | Iterable[str]") -> np.ndarray:
        """Every group over ``axes`` as a (num_groups, group_size) array, rows sorted.

        Rows are ordered by the lowest rank they hold, so that every process enumerates them in
        the same order.
        """
        axes = set(_axes(axes))
        grid = np.arange(self.world_size, dtype=np.int64).reshape(
            [self.sizes[a] for a in reversed(self.order)]
        )
        dims = list(reversed(self.order))  # numpy axis i holds dims[i]; outermost first
        others = [i for i, a in enumerate(dims) if a not in axes]
        inside = [i for i, a in enumerate(dims) if a in axes]
        rows = grid.transpose(others + inside).reshape(-1, self.size(axes) if axes else 1)
        return rows[np.argsort(rows[:, 0], kind="stable")]

    def grid(self, dims_outer_first: Sequence[str] | None = None) -> np.ndarray:
        """The rank grid with one numpy axis per parallel axis, outermost first by default."""
        dims = list(dims_outer_first) if dims_outer_first else list(reversed(self.order))
        base = np.arange(self.world_size, dtype=np.int64).reshape([self.sizes[a] for a in reversed(self.order)])
        src = list(reversed(self.order))
        return base.transpose([src.index(axis_name(d)) for d in dims])

    # ------------------------------------------------------------------ helpers
    def describe(self) -> str:
        return ", ".join(f"{SHORT_NAMES[a]}={self.sizes[a]}" for a in self.order)

    def _outer_first(self, axes: Iterable[str]) -> list[str]:
        return sorted(set(axes), key=lambda a: -self.order.index(a))

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ParallelConfigError(f"rank {rank} is outside 0..{self.world_size - 1} (world size {self.world_size})")


def _axes(axes: "str | Iterable[str]") -> tuple[str, ...]:
    if isinstance(axes, str):
        return (axis_name(axes),)
    return tuple(axis_name(a) for a in axes)
