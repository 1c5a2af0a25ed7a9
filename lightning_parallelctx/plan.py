"""The planner: the whole layout of a job (and a pipeline schedule's timeline) as readable tables,
without starting a process. A front end: the tables themselves are :mod:`.tables`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from .errors import ParallelCtxError
from .initializers import ModeGroups, mode_groups_for
from .layout import RankLayout
from .tables import render


def plan(world_size: int, *, tp: int = 1, pp: int = 1, sp: int = 1, ep: int = 1, dp: "int | str | None" = None,
         order: "str | Sequence[str] | None" = None, modes: Sequence[Any] = ()) -> tuple[RankLayout, list[ModeGroups]]:
    """Validate the sizes and compute every mode's groups; raises ParallelCtxError when invalid."""
    layout = RankLayout.build(world_size, data=dp, tensor=tp, pipeline=pp, sequence=sp, expert=ep, order=order)
    return layout, mode_groups_for(layout, modes)


def valid_sizes(world_size: int) -> str:
    divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
    return ", ".join(map(str, divisors))


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lightning_parallelctx plan",
                                     description="Show the process groups of a layout without starting any process.")
    parser.add_argument("--world-size", "-n", type=int, required=True)
    for short, axis in (("tp", "tensor"), ("pp", "pipeline"), ("sp", "sequence"), ("ep", "expert")):
        parser.add_argument(f"--{short}", type=int, default=1, help=f"{axis}_parallel_size")
    parser.add_argument("--dp", default="auto", help="data_parallel_size (default: auto = derived)")
    parser.add_argument("--order", default=None, help="axes innermost first, default tp-sp-ep-dp-pp")
    parser.add_argument("--mode", action="append", default=[], dest="modes",
                        help="extra mode: a registered name (tensor_2d_row, pipeline_embedding, ...), a class path, "
                             "or JSON {\"class_path\": ..., \"init_args\": {...}}")
    parser.add_argument("--groups", type=int, default=4, help="groups to show per mode")
    parser.add_argument("--schedule", default="1f1b", help="pipeline schedule (with --pp > 1), as pipeline_schedule")
    parser.add_argument("--microbatches", type=int, default=None, help="num_microbatches (default: one per stage)")
    parser.add_argument("--virtual", type=int, default=None, help="virtual_pipeline_size (stages per rank)")
    parser.add_argument("--layers", type=int, default=None, help="layers of the model: show which layers each stage holds")
    parser.add_argument("--svg", default=None, help="write the schedule's timeline (F/B/I/W slots per rank) to this SVG file")
    args = parser.parse_args(argv)
    console = Console()
    dp = None if str(args.dp).lower() == "auto" else int(args.dp)
    # --mode '{"class_path": ..., "init_args": {...}}' as in a YAML config
    modes = [json.loads(m) if m.lstrip().startswith("{") else m for m in args.modes]
    try:
        layout, modes = plan(args.world_size, tp=args.tp, pp=args.pp, sp=args.sp, ep=args.ep, dp=dp,
                             order=args.order, modes=modes)
    except ParallelCtxError as err:
        console.print(f"[bold red]invalid layout:[/] {err}", highlight=False)
        model = args.tp * args.pp * args.sp * args.ep
        if "world size" not in str(err):
            return 1
        if model > 0 and args.world_size > 0 and args.world_size % model == 0:
            console.print(f"valid data_parallel_size here: {args.world_size // model}")
        elif args.world_size > 0:
            console.print(f"tp x pp x sp x ep must divide {args.world_size}: one of {valid_sizes(args.world_size)}; "
                          f"with these sizes launch a multiple of {model} processes.")
        return 1
    render(layout, modes, console, max_groups=args.groups)
    if args.pp > 1:
        try:
            render_pipeline(console, args.pp, args.schedule, args.microbatches, args.virtual, args.layers, args.svg)
        except ParallelCtxError as err:
            console.print(f"[bold red]invalid pipeline:[/] {err}", highlight=False)
            return 1
    return 0


def render_pipeline(console: Console, pp: int, schedule: str, microbatches: int | None, virtual: int | None,
                    layers: int | None, svg: str | None) -> None:
    """Each pipeline rank's stages (and layers), the schedule's bubble, optionally its timeline as SVG."""
    from .pipeline import layer_ranges, resolve_pipeline_config, stages_of_rank
    from .pipeline.timeline import timeline_for, to_svg

    cfg = resolve_pipeline_config(pp, schedule, microbatches, virtual)
    num_stages = pp * cfg.virtual
    ranges = layer_ranges(layers, num_stages) if layers else None
    table = Table(title=f"Pipeline: {schedule}, {num_stages} stages ({cfg.schedule.placement} placement), "
                        f"{cfg.num_microbatches} micro-batches", title_justify="left")
    table.add_column("pipeline rank", justify="right")
    table.add_column("stages")
    if ranges:
        table.add_column(f"layers (of {layers})")
    for r in range(pp):
        stages = stages_of_rank(r, pp, num_stages, cfg.schedule.placement)
        row = [str(r), ", ".join(map(str, stages))]
        if ranges:
            row.append(", ".join(f"{ranges[s][0]}-{ranges[s][1] - 1}" for s in stages))
        table.add_row(*row)
    console.print(table)
    tl = timeline_for(schedule, pp, cfg.num_microbatches, cfg.virtual)
    m, p = cfg.num_microbatches, pp
    console.print(f"bubble fraction: {tl.bubble_fraction:.3f} of {tl.length} unit-time slots per rank "
                  f"(GPipe/1F1B theory (p-1)/(m+p-1) = {(p - 1) / (m + p - 1):.3f})", highlight=False)
    if svg:
        with open(svg, "w") as f:
            f.write(to_svg(tl))
        console.print(f"timeline written to {svg}")
