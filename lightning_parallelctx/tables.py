"""A layout as readable tables (axes, every mode's groups, every rank's coordinates).

Pure rendering of the rank math: the context prints it (``print_layout``) and so does the planner.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .initializers import ModeGroups
from .layout import RankLayout
from .mode import AXES, SHORT_NAMES


def _fmt_group(group: tuple[int, ...], limit: int = 8) -> str:
    if len(group) <= limit:
        return "[" + ", ".join(map(str, group)) + "]"
    step = group[1] - group[0]
    if all(b - a == step for a, b in zip(group, group[1:])):
        return f"[{group[0]}, {group[1]}, ..., {group[-1]}] (step {step})"
    return "[" + ", ".join(map(str, group[:limit])) + f", ... +{len(group) - limit}]"


def render(layout: RankLayout, modes: list[ModeGroups], console: Console, *, max_groups: int = 4,
           max_ranks: int = 64) -> None:
    summary = Table(title=f"Layout: {layout.world_size} ranks", title_justify="left")
    summary.add_column("axis (innermost first)")
    summary.add_column("size", justify="right")
    summary.add_column("stride", justify="right")
    for axis in layout.order:
        summary.add_row(f"{axis} ({SHORT_NAMES[axis]})", str(layout.sizes[axis]), str(layout.strides[axis]))
    console.print(summary)

    table = Table(title="Process groups per mode", title_justify="left")
    for col, justify in (("mode", "left"), ("over", "left"), ("groups", "right"), ("size", "right"),
                         ("first groups", "left")):
        table.add_column(col, justify=justify)
    for m in modes:
        sizes = sorted(set(m.sizes()))
        shown = [_fmt_group(m.group(i)) for i in range(min(max_groups, m.num_groups))]
        more = f" ... (+{m.num_groups - max_groups})" if m.num_groups > max_groups else ""
        covered = int((m.owner >= 0).sum())
        note = "" if covered == layout.world_size else f" (covers {covered} ranks)"
        table.add_row(m.name, m.description + note, str(m.num_groups), "/".join(map(str, sizes)),
                      "  ".join(shown) + more)
    console.print(table)

    per_rank_groups = sum(1 for m in modes if max(m.sizes()) > 1 and max(m.sizes()) < layout.world_size)
    console.print(
        f"new_group calls per rank: at most {per_rank_groups} (one per mode with groups of 2..world-1 ranks, "
        f"fewer where modes share a rank set), whatever the world size."
    )

    if layout.world_size <= max_ranks:
        ranks = Table(title="Every rank's coordinates", title_justify="left")
        ranks.add_column("rank", justify="right")
        for axis in AXES:
            ranks.add_column(SHORT_NAMES[axis], justify="right")
        for r in range(layout.world_size):
            c = layout.coords(r)
            ranks.add_row(str(r), *(str(c[a]) for a in AXES))
        console.print(ranks)
