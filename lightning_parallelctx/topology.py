"""Node boundaries of a layout: which groups span several nodes.

Tensor- and expert-parallel groups talk on every layer, several times per step; across nodes they
run at the network's speed instead of the node's (NVLink, shared memory), typically 10x slower.
Launchers number ranks node by node (node n holds ranks n*L .. n*L+L-1 for L processes per node),
so with the default order (tp innermost) a tensor group fits in a node whenever tp divides L.
Pure functions of the layout; the context warns once, on global rank 0.
"""

from __future__ import annotations

import warnings

from .layout import RankLayout

#: Axes whose groups should stay inside a node (talk per layer, not per step).
NODE_LOCAL_AXES = ("tensor", "expert", "sequence")


def node_of(rank: int, ranks_per_node: int) -> int:
    return rank // ranks_per_node


def groups_spanning_nodes(layout: RankLayout, ranks_per_node: int,
                          axes: tuple[str, ...] = NODE_LOCAL_AXES) -> dict[str, list[tuple[int, ...]]]:
    """For each axis of size > 1: its groups whose ranks are on more than one node."""
    out: dict[str, list[tuple[int, ...]]] = {}
    if ranks_per_node <= 0 or ranks_per_node >= layout.world_size:
        return out
    for axis in axes:
        if layout.sizes[axis] <= 1:
            continue
        spanning = [tuple(int(r) for r in g) for g in layout.groups(axis)
                    if len({node_of(int(r), ranks_per_node) for r in g}) > 1]
        if spanning:
            out[axis] = spanning
    return out


def warn_if_groups_span_nodes(layout: RankLayout, ranks_per_node: "int | None", rank: int) -> str | None:
    """Warn (on global rank 0) when a tensor/expert/sequence group crosses a node boundary; returns the text."""
    if ranks_per_node is None:
        return None
    spanning = groups_spanning_nodes(layout, ranks_per_node)
    if not spanning:
        return None
    parts = [f"{axis} groups {groups[0]}{f' and {len(groups) - 1} more' if len(groups) > 1 else ''}"
             for axis, groups in spanning.items()]
    text = (f"{'; '.join(parts)} span several nodes ({ranks_per_node} processes per node): these groups talk on "
            f"every layer and will run at the network's speed, not the node's. Fix: make each of these sizes "
            f"divide the processes per node (or run more processes per node), and keep them innermost in order=")
    if rank == 0:
        warnings.warn(text, stacklevel=3)
    return text
