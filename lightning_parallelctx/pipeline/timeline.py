"""A schedule's timeline without processes: which stage runs which micro-batch when, and the bubble.

torch's schedule classes compute each rank's ordered actions (``pipeline_order``, built here on mock
stages by ``torch.distributed.pipelining._schedule_visualizer.get_schedule_ops``). Their own spacing
helper stalls on 1F1B and GPipe in torch 2.13, so the timing is simulated here: every compute action
(F = forward, B = full backward, I = input-gradient backward, W = weight-gradient backward) takes one
time slot, and an action starts once its dependencies finished in an earlier slot:
F(s, m) after F(s-1, m); B/I(s, m) after F(s, m) and B/I(s+1, m); W(s, m) after I(s, m).
Idle slots are the bubble. Unit-time slots are a model (a real backward costs about two forwards);
the benchmark measures the real thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ParallelConfigError

__all__ = ["Slot", "Timeline", "simulate", "timeline_for", "to_svg"]

COMPUTE = ("F", "B", "I", "W")
COLORS = {"F": "#4e79a7", "B": "#59a14f", "I": "#f28e2b", "W": "#b07aa1"}
NAMES = {"F": "forward", "B": "backward", "I": "backward (input grads)", "W": "backward (weight grads)"}


@dataclass(frozen=True)
class Slot:
    kind: str  # F, B, I or W
    stage: int
    microbatch: int


@dataclass
class Timeline:
    rows: list[list[Slot | None]]  # rows[pipeline rank][time slot]
    num_stages: int
    num_microbatches: int
    schedule: str

    @property
    def length(self) -> int:
        return max(len(r) for r in self.rows)

    @property
    def bubble_fraction(self) -> float:
        total = len(self.rows) * self.length
        busy = sum(1 for r in self.rows for s in r if s is not None)
        return 1.0 - busy / total


def _as_slots(actions: list[Any]) -> list[Slot]:
    out: list[Slot] = []
    for a in actions:
        if a is None:
            continue
        subs = getattr(a, "sub_actions", None)
        if subs:  # DualPipeV's overlapped forward + backward: drawn as its parts, one after the other
            out.extend(_as_slots(list(subs)))
            continue
        kind = a.computation_type.value  # "F", "B", "I", "W"; communication and REDUCE_GRAD are skipped
        if kind in COMPUTE and a.microbatch_index is not None:
            out.append(Slot(kind, a.stage_index, a.microbatch_index))
    return out


def simulate(orders: list[list[Slot]], num_stages: int, schedule: str = "", num_microbatches: int = 0) -> Timeline:
    """Place each rank's ordered actions on unit time slots as their dependencies allow."""
    done: dict[tuple[str, int, int], int] = {}  # (kind, stage, mb) -> slot it finished in
    rows: list[list[Slot | None]] = [[] for _ in orders]
    nxt = [0] * len(orders)
    t = 0
    last = num_stages - 1

    def ready(s: Slot) -> bool:
        def before(key: tuple[str, int, int]) -> bool:
            return key in done and done[key] < t

        if s.kind == "F":
            return s.stage == 0 or before(("F", s.stage - 1, s.microbatch))
        if s.kind in ("B", "I"):
            later = s.stage == last or before(("B", s.stage + 1, s.microbatch)) or before(("I", s.stage + 1, s.microbatch))
            return before(("F", s.stage, s.microbatch)) and later
        return before(("I", s.stage, s.microbatch)) or before(("B", s.stage, s.microbatch))

    while any(n < len(o) for n, o in zip(nxt, orders)):
        progressed = False
        for r, order in enumerate(orders):
            if nxt[r] < len(order) and ready(order[nxt[r]]):
                s = order[nxt[r]]
                rows[r].append(s)
                done[(s.kind, s.stage, s.microbatch)] = t
                nxt[r] += 1
                progressed = True
            elif nxt[r] < len(order):
                rows[r].append(None)
        if not progressed:
            raise RuntimeError(f"schedule {schedule!r} cannot progress at slot {t} (a dependency never runs)")
        t += 1
    for row in rows:  # trailing idle slots count as bubble too
        row.extend([None] * (t - len(row)))
    return Timeline(rows, num_stages, num_microbatches, schedule)


def timeline_for(schedule: Any, pp: int, num_microbatches: int, virtual: int | None = None) -> Timeline:
    """The timeline of a schedule (name or :class:`Schedule`) at ``pp`` ranks and ``num_microbatches``."""
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

    from .config import resolve_pipeline_config
    from .schedule import TorchSchedule

    cfg = resolve_pipeline_config(pp, schedule, num_microbatches, virtual)
    sched = cfg.schedule
    if not isinstance(sched, TorchSchedule):
        raise ParallelConfigError(f"pipeline_schedule={schedule!r} is not backed by a torch schedule class: the "
                                  f"planner can only draw torch's schedules")
    name = sched.name or sched.torch_class.__name__
    m = cfg.num_microbatches
    if sched.is_single_stage:
        # torch runs GPipe / 1F1B from code, not from pipeline_order (whose mock version drops the
        # last rank's first forward in torch 2.13): their orders are written out here.
        orders = [_single_stage_order(name == "gpipe" or sched.torch_class.__name__ == "ScheduleGPipe", r, pp, m)
                  for r in range(pp)]
    else:
        orders = [_as_slots(r) for r in get_schedule_ops(sched.torch_class, pp, m, cfg.virtual)]
    return simulate(orders, pp * cfg.virtual, name, m)


def _single_stage_order(gpipe: bool, rank: int, pp: int, m: int) -> list[Slot]:
    """GPipe: every forward, then every backward. 1F1B (torch's): ``pp - rank`` warm-up forwards,
    then one backward / one forward alternately, then the remaining backwards."""
    if gpipe:
        return [Slot("F", rank, i) for i in range(m)] + [Slot("B", rank, i) for i in range(m)]
    warm = min(pp - rank, m)
    order = [Slot("F", rank, i) for i in range(warm)]
    f, b = warm, 0
    while b < m:
        order.append(Slot("B", rank, b))
        b += 1
        if f < m:
            order.append(Slot("F", rank, f))
            f += 1
    return order


def to_svg(tl: Timeline, cell: int = 22) -> str:
    """One row per pipeline rank, one column per time slot; each box is "stage:micro-batch"."""
    left, top, legend = 70, 40, 30
    width = max(left + tl.length * cell + 20, 820)  # room for the title and the legend
    height = top + len(tl.rows) * (cell + 6) + legend + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="20" font-size="14">{tl.schedule}: {len(tl.rows)} ranks, {tl.num_stages} stages, '
           f'{tl.num_microbatches} micro-batches, bubble {tl.bubble_fraction:.1%} (unit-time slots)</text>']
    for r, row in enumerate(tl.rows):
        y = top + r * (cell + 6)
        out.append(f'<text x="8" y="{y + cell * 0.7:.0f}" font-size="12">rank {r}</text>')
        for t, s in enumerate(row):
            x = left + t * cell
            if s is None:
                out.append(f'<rect x="{x}" y="{y}" width="{cell - 1}" height="{cell}" fill="#eeeeee"/>')
                continue
            out.append(f'<rect x="{x}" y="{y}" width="{cell - 1}" height="{cell}" fill="{COLORS[s.kind]}"/>')
            label = f"{s.stage}:{s.microbatch}" if tl.num_stages > len(tl.rows) else str(s.microbatch)
            out.append(f'<text x="{x + (cell - 1) / 2:.1f}" y="{y + cell * 0.68:.1f}" font-size="9" fill="white" '
                       f'text-anchor="middle">{label}</text>')
    y = top + len(tl.rows) * (cell + 6) + 14
    x = left
    for kind in COMPUTE:
        out.append(f'<rect x="{x}" y="{y - 10}" width="12" height="12" fill="{COLORS[kind]}"/>')
        out.append(f'<text x="{x + 16}" y="{y}" font-size="11">{kind} = {NAMES[kind]}</text>')
        x += 40 + 7 * len(NAMES[kind])
    note = "label = stage:micro-batch" if tl.num_stages > len(tl.rows) else "label = micro-batch"
    out.append(f'<text x="{left}" y="{y + 18}" font-size="11">{note}; grey = idle</text>')
    out.append("</svg>")
    return "\n".join(out)
