"""Parallel modes: the names under which a ParallelContext answers rank/size/group questions."""

from __future__ import annotations

from enum import Enum

from .errors import ModeNotFoundError


class ParallelMode(str, Enum):
    """The built-in modes. Any call that takes a mode also takes its string value.

    The five axes (TENSOR, SEQUENCE, EXPERT, DATA, PIPELINE) partition the world into a grid.
    The composite modes are groups over several axes that the library itself needs: who holds a
    replica of a dense or an expert parameter, which ranks see distinct data, which ranks hold
    distinct model shards.
    """

    GLOBAL = "global"
    TENSOR = "tensor"
    SEQUENCE = "sequence"
    EXPERT = "expert"
    DATA = "data"
    PIPELINE = "pipeline"
    # Composite modes (see README, "Who holds what").
    DENSE_REPLICA = "dense_replica"  # DATA x SEQUENCE x EXPERT: dense gradients are averaged here
    EXPERT_REPLICA = "expert_replica"  # DATA x SEQUENCE: expert gradients are averaged here
    DATA_SHARD = "data_shard"  # DATA x EXPERT: ranks that read distinct batches
    MODEL_PARALLEL = "model_parallel"  # TENSOR x PIPELINE x EXPERT: shards of one model replica
    # Sub-modes offered as opt-in initializers (see initializers.py).
    TENSOR_2D_ROW = "tensor_2d_row"
    TENSOR_2D_COL = "tensor_2d_col"
    PIPELINE_EMBEDDING = "pipeline_embedding"

    def __str__(self) -> str:
        return self.value


#: The five axes of the rank grid, in the default order, innermost (stride 1) first.
AXES: tuple[str, ...] = ("tensor", "sequence", "expert", "data", "pipeline")

#: Short names accepted wherever an axis is named (config keys, CLI flags, orders).
AXIS_ALIASES: dict[str, str] = {
    "tp": "tensor",
    "sp": "sequence",
    "cp": "sequence",
    "ep": "expert",
    "dp": "data",
    "pp": "pipeline",
}
SHORT_NAMES: dict[str, str] = {"tensor": "tp", "sequence": "sp", "expert": "ep", "data": "dp", "pipeline": "pp"}


def mode_name(mode: "ParallelMode | str") -> str:
    """The canonical string key of a mode given as an enum member, its value or an axis alias."""
    if isinstance(mode, ParallelMode):
        return mode.value
    if not isinstance(mode, str):
        raise ModeNotFoundError(
            f"mode {mode!r} is a {type(mode).__name__}; a mode is a ParallelMode or its string "
            f"value, e.g. ParallelMode.TENSOR or 'tensor'"
        )
    key = mode.strip().lower()
    return AXIS_ALIASES.get(key, key)


def axis_name(name: str) -> str:
    """Canonical axis name for an alias; raises naming the valid axes for anything else."""
    key = mode_name(name)
    if key not in AXES:
        raise ModeNotFoundError(
            f"{name!r} is not a parallel axis; the axes are {', '.join(AXES)} "
            f"(or their short names {', '.join(AXIS_ALIASES)})"
        )
    return key
