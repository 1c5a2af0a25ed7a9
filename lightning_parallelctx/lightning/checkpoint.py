"""Sharded Lightning checkpoints, and their consolidation into one full state dict.

Layout of a checkpoint (a directory, whatever its name ends with):

    meta.pt                        rank 0: everything but weights and optimizer states
                                   (epoch, global_step, loops, callbacks, hyper-parameters, ...)
    shard-tp00-pp00-ep00.pt        one file per distinct model shard: {"state_dict", "optimizer_states",
    shard-tp01-pp00-ep00.pt         "pctx": {coords, sizes, tp_dims, expert}}
    ...

Each distinct shard is written once, by the rank that is first in its data/sequence replica group,
under its own file name: nothing is de-duplicated by key (torch.distributed.checkpoint keeps only
one tensor per key, TRAPS.md #14). Data parallelism does not change the shards, so a checkpoint can
be resumed with another data-parallel size. The ``pctx`` entry records which dimension each tensor
is split along, so :func:`consolidate_checkpoint` needs neither the model nor any process group.

Consolidation rules (CONTRACT.md, nn layouts): a tensor-parallel tensor is the concatenation of its
shards along its marked dimension in TENSOR rank order; an expert tensor the concatenation of the
EXPERT ranks' tensors along dim 0 (stacked experts); pipeline stages contribute disjoint names;
everything else is replicated and taken from the first shard.

Command line: ``python -m lightning_parallelctx.lightning.checkpoint CHECKPOINT_DIR OUT.ckpt``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..context import ParallelContext
from ..errors import ParallelCtxError
from ..markers import is_expert, tensor_parallel_dim

META_FILE = "meta.pt"
SHARD_RE = re.compile(r"shard-tp(\d+)-pp(\d+)-ep(\d+)\.pt")
FORMAT_VERSION = 1


class CheckpointLayoutError(ParallelCtxError, ValueError):
    """A checkpoint that does not fit the model or context it is loaded into."""


def shard_file(tp: int, pp: int, ep: int) -> str:
    return f"shard-tp{tp:02d}-pp{pp:02d}-ep{ep:02d}.pt"


def is_sharded_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file()


def shard_layout(module: torch.nn.Module, ctx: ParallelContext) -> dict[str, Any]:
    """Which state-dict entries of ``module`` are split, and along which dimension."""
    tp_dims: dict[str, int] = {}
    expert: list[str] = []
    for name, p in module.named_parameters(remove_duplicate=False):
        dim = tensor_parallel_dim(p)
        if dim is not None:
            tp_dims[name] = dim % max(p.dim(), 1)
        if is_expert(p):
            expert.append(name)
    return {
        "version": FORMAT_VERSION,
        "coords": {"tp": ctx.get_local_rank("tensor"), "pp": ctx.get_local_rank("pipeline"),
                   "ep": ctx.get_local_rank("expert")},
        "sizes": {"tp": ctx.get_world_size("tensor"), "pp": ctx.get_world_size("pipeline"),
                  "ep": ctx.get_world_size("expert")},
        "tp_dims": tp_dims,
        "expert": expert,
    }


def _is_shard_writer(ctx: ParallelContext) -> bool:
    # expert_replica = DATA x SEQUENCE: its first rank holds one copy of this (tp, pp, ep) shard.
    return ctx.get_local_rank("expert_replica") == 0


# ---------------------------------------------------------------------------------- save
def save_sharded_checkpoint(checkpoint: dict[str, Any], path: str | Path, module: torch.nn.Module,
                            ctx: ParallelContext) -> None:
    """Collective: every rank calls it with its own Lightning checkpoint dict (local shards)."""
    path = Path(path)
    if ctx.global_rank == 0:
        if path.is_file() or path.is_symlink():
            path.unlink()
        elif path.is_dir():
            if not is_sharded_checkpoint(path) and any(path.iterdir()):
                raise CheckpointLayoutError(f"{path} is a non-empty directory that is not a sharded checkpoint; "
                                            f"refusing to overwrite it")
            shutil.rmtree(path)  # stale shards of another layout must not survive
        path.mkdir(parents=True)
    dist.barrier()
    layout = shard_layout(module, ctx)
    rest = dict(checkpoint)
    state = {"state_dict": rest.pop("state_dict"), "pctx": layout}
    if "optimizer_states" in rest:
        state["optimizer_states"] = rest.pop("optimizer_states")
    if _is_shard_writer(ctx):
        c = layout["coords"]
        torch.save(state, path / shard_file(c["tp"], c["pp"], c["ep"]))
    if ctx.global_rank == 0:
        rest["pctx"] = {"version": FORMAT_VERSION, "sizes": layout["sizes"], "format": "sharded"}
        torch.save(rest, path / META_FILE)
    dist.barrier()


# ---------------------------------------------------------------------------------- load
def load_sharded_checkpoint(path: str | Path, module: torch.nn.Module, ctx: ParallelContext,
                            weights_only: bool | None = None) -> dict[str, Any]:
    """This rank's Lightning checkpoint dict from a sharded directory, or from a full single-file
    checkpoint (e.g. a consolidated one), whose tensors are then cut to this rank's shards."""
    path = Path(path)
    if path.is_dir():
        if not is_sharded_checkpoint(path):
            raise CheckpointLayoutError(f"{path} is a directory without {META_FILE}: not a sharded checkpoint")
        checkpoint = _load(path / META_FILE, weights_only)
        saved = checkpoint.get("pctx", {}).get("sizes", {})
        mine = shard_layout(module, ctx)
        if saved and saved != mine["sizes"]:
            raise CheckpointLayoutError(
                f"checkpoint {path} was saved with model shards {saved}, this run has {mine['sizes']}. Shards "
                f"cannot be re-cut in place; consolidate it first (python -m lightning_parallelctx.lightning."
                f"checkpoint {path} full.ckpt) and resume from the full file, which is re-sharded on load."
            )
        c = mine["coords"]
        shard = _load(path / shard_file(c["tp"], c["pp"], c["ep"]), weights_only)
        checkpoint["state_dict"] = shard["state_dict"]
        if "optimizer_states" in shard:
            checkpoint["optimizer_states"] = shard["optimizer_states"]
        return checkpoint
    checkpoint = _load(path, weights_only)
    if "state_dict" in checkpoint:
        checkpoint["state_dict"] = shard_state_dict(checkpoint["state_dict"], module, ctx)
    return checkpoint


def _load(file: Path, weights_only: bool | None) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointLayoutError(f"checkpoint file {file} does not exist (a shard of another layout?)")
    # Lightning's own checkpoints hold plain Python objects (loop states, hparams): like Lightning,
    # load them fully unless asked for weights only.
    return torch.load(file, map_location="cpu", weights_only=bool(weights_only))


def shard_state_dict(full: Mapping[str, torch.Tensor], module: torch.nn.Module,
                     ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """Cut a full (single-process) state dict to the shards this rank's ``module`` holds."""
    from ..nn import (
        shard_state_dict as _cut,  # the layers' own rules (tensor and expert splits)
    )

    out = _cut(full, module, ctx)
    if ctx.get_world_size("pipeline") > 1:
        # Pipeline stages hold disjoint names: the entries of other stages' layers are not loaded here.
        mine = set(module.state_dict())
        out = {k: v for k, v in out.items() if k in mine}
    return out


# ---------------------------------------------------------------------------------- consolidate
def consolidate_shards(shards: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """One full state dict from ``{"state_dict", "pctx"}`` entries of every distinct shard."""
    if not shards:
        raise CheckpointLayoutError("no shards to consolidate")
    sizes = shards[0]["pctx"]["sizes"]
    by_coord = {(s["pctx"]["coords"]["tp"], s["pctx"]["coords"]["pp"], s["pctx"]["coords"]["ep"]): s for s in shards}
    expected = {(t, p, e) for t in range(sizes["tp"]) for p in range(sizes["pp"]) for e in range(sizes["ep"])}
    if set(by_coord) != expected:
        missing = sorted(expected - set(by_coord))
        raise CheckpointLayoutError(f"shards missing for (tp, pp, ep) = {missing}; the checkpoint is incomplete")
    full: dict[str, torch.Tensor] = {}
    for pp in range(sizes["pp"]):
        first = by_coord[(0, pp, 0)]
        tp_dims, expert = first["pctx"]["tp_dims"], set(first["pctx"]["expert"])
        for name in first["state_dict"]:
            dim = tp_dims.get(name)
            per_ep = [_along_tp([by_coord[(t, pp, e)]["state_dict"][name] for t in range(sizes["tp"])], dim)
                      for e in (range(sizes["ep"]) if name in expert else (0,))]
            value = torch.cat(per_ep, 0) if name in expert else per_ep[0]
            if name in full and not torch.equal(full[name], value):
                raise CheckpointLayoutError(f"{name!r} differs between pipeline stages; names must be unique per stage")
            full[name] = value
    return full


def _along_tp(parts: list[torch.Tensor], dim: int | None) -> torch.Tensor:
    return torch.cat(parts, dim) if dim is not None else parts[0]


def consolidate_checkpoint(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint directory -> one Lightning checkpoint dict with the full ``state_dict``
    (no optimizer states: they are per shard), loadable by a single process with
    ``torch.load(f)["state_dict"]`` or ``LightningModule.load_from_checkpoint``."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise CheckpointLayoutError(f"{path} is not a sharded checkpoint directory (no {META_FILE})")
    meta = torch.load(path / META_FILE, map_location="cpu", weights_only=False)
    files = sorted(f for f in path.iterdir() if SHARD_RE.fullmatch(f.name))
    shards = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    meta["state_dict"] = consolidate_shards(shards)
    meta.pop("optimizer_states", None)
    meta["pctx"] = {**meta.get("pctx", {}), "format": "consolidated"}
    return meta


def consolidate_to_file(path: str | Path, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(consolidate_checkpoint(path), out)
    return out


def gather_full_state_dict(module: torch.nn.Module, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """Collective over the model's shards: the full (unsharded) state dict of ``module`` on every
    rank, by the same rules as :func:`consolidate_checkpoint`."""
    # A copy: on CPU .cpu() is the live tensor, which training would keep changing.
    mine = {"state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
            "pctx": shard_layout(module, ctx)}
    if ctx.get_world_size("model_parallel") == 1:
        return consolidate_shards([mine])
    everyone: list[Any] = [None] * ctx.get_world_size("model_parallel")
    dist.all_gather_object(everyone, mine, group=ctx.get_group("model_parallel"))
    return consolidate_shards(everyone)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_parallelctx.lightning.checkpoint",
        description="Consolidate a sharded ParallelCtxStrategy checkpoint into one full single-file checkpoint.",
    )
    parser.add_argument("checkpoint", help="the sharded checkpoint directory (holds meta.pt and shard-*.pt)")
    parser.add_argument("output", help="the single file to write")
    args = parser.parse_args(argv)
    try:
        out = consolidate_to_file(args.checkpoint, args.output)
    except CheckpointLayoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    n = len(torch.load(out, map_location="cpu", weights_only=False)["state_dict"])
    print(f"wrote {out} ({n} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
