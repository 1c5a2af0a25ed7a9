"""Sharded Lightning checkpoints: torch DCP directories, written atomically, re-sharded on load.

Layout of a checkpoint (a directory, whatever its name ends with)::

    .metadata, __<rank>_0.distcp   torch.distributed.checkpoint (DCP), written by every rank:
                                   "state_dict"   the model, split tensors as DTensors on the
                                                  context's mesh (dtensor_state.py)
                                   "optimizer_<i>" {"state": {param name: {exp_avg, ...}},
                                                   "param_groups"}: moments split like their params
                                   "rng.rank<r>"  each rank's generators (random.get_rng_state)
    meta.pt                        rank 0: everything else Lightning saves (epoch, global_step,
                                   loops, callbacks, LR schedulers, hyper-parameters) and "pctx":
                                   the layout it was saved with and the optimizer manifest
    COMPLETE                       written last: a directory without it is not a checkpoint

Why DCP: it writes from every rank in parallel, records where each DTensor shard sits in the full
tensor, and on load reads whatever slices the loading ranks' DTensors need, so a checkpoint saved at
tp2-dp2 resumes at tp4, dp4 or sp2-dp2 directly (no consolidation step). The same files are read by
torch's own tools (``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``) and follow the
key layout of Lightning's ``ModelParallelStrategy`` ("state_dict", "optimizer_<i>" keyed by
parameter name). Plain tensors under one key would be de-duplicated to one rank's copy (docs/traps.md
#14); DTensors are not.

Atomicity (atomic.py): files go to ``.<name>.partial``; rank 0 marks and renames it once DCP's
collective finish says every rank's data is written.

Command line: ``python -m lightning_parallelctx.lightning.checkpoint CHECKPOINT_DIR OUT.ckpt``
(``--model-only`` for a plain model state dict for inference).
"""

from __future__ import annotations

import argparse
import io
import pickle
import re
import sys
import threading
import zipfile
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor

from ..context import ParallelContext
from ..errors import ParallelCtxError
from ..markers import is_expert, tensor_parallel_dim
from . import atomic, rng_state
from .dtensor_state import (
    local_like,
    named_to_optimizer,
    optimizer_to_named,
    present,
    splits_by_name,
    to_dtensor,
)

META_FILE = "meta.pt"
DCP_METADATA = ".metadata"
SHARD_RE = re.compile(r"shard-tp(\d+)-pp(\d+)-ep(\d+)\.pt")  # format 1 (per-shard torch.save files)
FORMAT_VERSION = 2
#: Key of the loaded checkpoint dict holding the generators this rank continues (rng_state.py).
RNG_KEY = "pctx_rng_state"


class CheckpointLayoutError(ParallelCtxError, ValueError):
    """A checkpoint that is incomplete, corrupt, foreign, or does not fit the model it is loaded into."""


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


def _layout_info(ctx: ParallelContext) -> dict[str, Any]:
    return {"sizes": dict(ctx.layout.sizes), "order": list(ctx.layout.order), "world_size": ctx.get_world_size()}


# ---------------------------------------------------------------------------------- save
def _state_kind(value: Any, param: torch.Tensor) -> Any:
    """How a load re-creates an optimizer state entry: like its parameter, or as saved."""
    if isinstance(value, DTensor) or (isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == param.shape):
        return "param"
    if isinstance(value, torch.Tensor):
        return ("tensor", list(value.shape), str(value.dtype).removeprefix("torch."))
    return ("object",)


def _layer_order(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Each parameter's place in the full (pp=1) model's order: (global layer index, order within
    the rank), the layer index read from the ``PipelineSequential`` holding it (its ``layer_names``
    are the full model's, on every rank). Parameters outside any get layer -1."""
    seqs = [(f"{n}." if n else "", m) for n, m in module.named_modules() if hasattr(m, "layer_names") and hasattr(m, "plan")]
    order: dict[str, tuple[int, int]] = {}
    for pos, (name, _) in enumerate(module.named_parameters()):
        layer = -1
        for prefix, seq in seqs:
            if name.startswith(prefix):
                rest = name[len(prefix):]
                hits = [i for i, ln in enumerate(seq.layer_names) if rest.startswith(ln + ".")]
                if hits:
                    layer = max(hits, key=lambda i: len(seq.layer_names[i]))
                    break
        order[name] = (layer, pos)
    return order


def _manifest_of_every_stage(manifest: list[dict[str, Any]], module: torch.nn.Module,
                             ctx: ParallelContext) -> list[dict[str, Any]]:
    """With pipeline stages each rank's optimizer knows only its stages' parameters, while rank 0
    writes the manifest for all: gather it over PIPELINE and merge, parameters in the full model's
    order (a consolidated checkpoint numbers them for a pp=1 optimizer). Collective over PIPELINE."""
    if ctx.get_world_size("pipeline") == 1:
        return manifest
    order = _layer_order(module)
    gathered: list[Any] = [None] * ctx.get_world_size("pipeline")
    dist.all_gather_object(gathered, (manifest, order), group=ctx.get_group("pipeline"))
    merged = []
    for i in range(max(len(m) for m, _ in gathered)):
        parts = [(m[i], o) for m, o in gathered if i < len(m)]
        keys: dict[str, tuple[int, int, int]] = {}
        state: dict[str, Any] = {}
        for stage, (m, o) in enumerate(parts):
            for name, kinds in m["state"].items():
                state.setdefault(name, kinds)  # a tied copy on two stages: one entry
            for g in m["param_groups"]:
                for name in g["params"]:
                    layer, pos = o.get(name, (-1, 0))
                    keys.setdefault(name, (layer, stage, pos))
        groups = []
        for gi, g in enumerate(parts[0][0]["param_groups"]):
            names = {n for m, _ in parts if gi < len(m["param_groups"]) for n in m["param_groups"][gi]["params"]}
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": sorted(names, key=keys.__getitem__)})
        merged.append({"param_groups": groups, "state": state})
    return merged


def build_state(checkpoint: Mapping[str, Any], module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                ctx: ParallelContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what DCP writes, what rank 0 writes to meta.pt) from this rank's Lightning checkpoint dict."""
    rest = dict(checkpoint)
    state: dict[str, Any] = {"state_dict": present(rest.pop("state_dict"), splits_by_name(module), ctx)}
    osds = rest.pop("optimizer_states", [])  # none for save_checkpoint(weights_only=True)
    if osds and len(osds) != len(optimizers):
        raise CheckpointLayoutError(f"the checkpoint holds {len(osds)} optimizer states but the strategy has "
                                    f"{len(optimizers)} optimizers")
    params = dict(module.named_parameters())
    manifest = []
    for i, (osd, opt) in enumerate(zip(osds, optimizers)):
        named = optimizer_to_named(osd, opt, module, ctx)
        state[f"optimizer_{i}"] = named
        manifest.append({"param_groups": named["param_groups"],
                         "state": {n: {k: _state_kind(v, params[n]) for k, v in e.items()}
                                   for n, e in named["state"].items()}})
    manifest = _manifest_of_every_stage(manifest, module, ctx)
    state[rng_state.entry_key(ctx.get_global_rank())], rng_axes = rng_state.save(ctx)
    rest["pctx"] = {"version": FORMAT_VERSION, "format": "dcp", **_layout_info(ctx), "optimizers": manifest,
                    "rng_axes": rng_axes}
    return state, rest


def _check_target(path: Path) -> None:
    # Every rank checks (a shared file system), so a refusal is raised everywhere, not on rank 0 alone.
    if path.is_dir() and not path.is_symlink() and not atomic.is_complete(path) and \
            not is_sharded_checkpoint(path) and any(path.iterdir()):
        raise CheckpointLayoutError(f"{path} is a non-empty directory that is not a checkpoint; refusing to "
                                    f"overwrite it. Fix: save to another path or remove it")


def _write_meta(rest: Mapping[str, Any], path: Path) -> None:
    meta = atomic.partial_dir(path) / META_FILE
    torch.save(dict(rest), meta)
    # DCP's writer fsynced its own files (sync_files=True); meta.pt and the marker are synced here.
    atomic.commit(path, [meta], marker_text=f"format {FORMAT_VERSION}\n")


def _copy(state: Any) -> Any:
    if isinstance(state, DTensor):
        return DTensor.from_local(state.to_local().detach().clone(), state.device_mesh, state.placements,
                                  run_check=False, shape=state.shape, stride=state.stride())
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _copy(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_copy(v) for v in state]
    return state


class _LocalCopy(AsyncStager):
    """Stages by cloning the local tensors. DCP's default stager deep-copies every DTensor, its mesh
    included: 0.4 s of the training loop's time for the GPT benchmark's 114 tensors, longer than
    the whole synchronous save there."""

    _synchronize_after_execute = False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return _copy(state_dict)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


class CheckpointSaver:
    """Writes checkpoints for one strategy; at most one asynchronous save in flight at a time.

    ``async_save=True``: the state is copied in memory (the stall), then written by DCP on a
    background thread over a separate gloo group (the training's collectives keep theirs); rank 0
    marks and renames the directory when every rank's data is written. A later save, a load, a
    removal and teardown wait for it first, and re-raise its error.
    """

    def __init__(self, async_save: bool = False) -> None:
        self.async_save = async_save
        self._pending: Future | None = None
        self._error: BaseException | None = None
        self._group: Any = None
        self._lock = threading.Lock()
        self._committed = threading.Event()

    def save(self, checkpoint: Mapping[str, Any], path: str | Path, module: torch.nn.Module,
             optimizers: Sequence[torch.optim.Optimizer], ctx: ParallelContext) -> None:
        """Collective: every rank calls it with its own Lightning checkpoint dict (local shards)."""
        self.wait()
        path = Path(path)
        _check_target(path)
        state, rest = build_state(checkpoint, module, optimizers, ctx)
        if ctx.get_global_rank() == 0:
            atomic.begin(path)
        dist.barrier()
        writer = dcp.FileSystemWriter(atomic.partial_dir(path), sync_files=True)
        if not self.async_save:
            dcp.save(state, storage_writer=writer)
            # DCP's finish is collective: on return rank 0 knows every rank's files are written.
            if ctx.get_global_rank() == 0:
                _write_meta(rest, path)
            dist.barrier()
            return
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        # Training goes on changing the parameters while the copy is written (the async test checks
        # the file holds the step it was saved at).
        future = dcp.async_save(state, storage_writer=writer, process_group=self._group, async_stager=_LocalCopy())
        self._committed.clear()
        if ctx.get_global_rank() == 0:
            future.add_done_callback(lambda f: self._finish(f, rest, path))
        else:
            self._committed.set()
        self._pending = future

    def _finish(self, future: Future, rest: Mapping[str, Any], path: Path) -> None:
        try:
            future.result()
            _write_meta(rest, path)
        except BaseException as err:  # noqa: BLE001 - re-raised in the training thread by wait()
            with self._lock:
                self._error = err
        finally:
            self._committed.set()

    def wait_local(self) -> None:
        """This rank only (no collective): the save in flight is written, and renamed on rank 0."""
        if self._pending is not None:
            self._pending.exception()
            self._committed.wait()

    def wait(self) -> None:
        """Block until the asynchronous save in flight (if any) is complete and visible."""
        if self._pending is not None:
            self.wait_local()
            pending, self._pending = self._pending, None
            pending.result()
            # Every rank sees rank 0's rename before it goes on (e.g. to load that checkpoint).
            if dist.is_initialized():
                dist.barrier(group=self._group)
        with self._lock:
            err, self._error = self._error, None
        if err is not None:
            raise CheckpointLayoutError(f"the asynchronous checkpoint save failed: {err}") from err


def save_sharded_checkpoint(checkpoint: dict[str, Any], path: str | Path, module: torch.nn.Module,
                            ctx: ParallelContext, optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
    """Collective, synchronous: see :class:`CheckpointSaver`."""
    CheckpointSaver().save(checkpoint, path, module, optimizers, ctx)


# ---------------------------------------------------------------------------------- load
def load_sharded_checkpoint(path: str | Path, module: torch.nn.Module, ctx: ParallelContext,
                            weights_only: bool | None = None,
                            optimizers: Sequence[torch.optim.Optimizer] = ()) -> dict[str, Any]:
    """This rank's Lightning checkpoint dict (local shards, index-keyed optimizer states) from a
    checkpoint directory of any layout, or from a full single-file checkpoint (e.g. a consolidated
    one), whose model and optimizer tensors are then cut to this rank's shards."""
    path = atomic.resolve_complete(Path(path))
    if path.is_dir():
        if (path / DCP_METADATA).is_file():
            return _load_dcp(path, module, ctx, weights_only, optimizers)
        if is_sharded_checkpoint(path) and any(SHARD_RE.fullmatch(f.name) for f in path.iterdir()):
            return _load_v1(path, module, ctx, weights_only)
        raise CheckpointLayoutError(
            f"{path} is a directory but not a checkpoint of this library: it has no {DCP_METADATA} (torch DCP) "
            f"and no {META_FILE} with shard files. If a save was interrupted, load the previous checkpoint")
    checkpoint = _load(path, weights_only)
    if "state_dict" not in checkpoint:
        raise CheckpointLayoutError(f"{path} holds no 'state_dict': not a Lightning checkpoint (keys: "
                                    f"{sorted(checkpoint)[:8]})")
    checkpoint["state_dict"] = shard_state_dict(checkpoint["state_dict"], module, ctx)
    if optimizers and "optimizer_states" in checkpoint:
        checkpoint["optimizer_states"] = [shard_optimizer_state(osd, opt, module, ctx)
                                          for osd, opt in zip(checkpoint["optimizer_states"], optimizers)]
    return checkpoint


def _load_dcp(path: Path, module: torch.nn.Module, ctx: ParallelContext, weights_only: bool | None,
              optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    if not atomic.is_complete(path):
        raise CheckpointLayoutError(f"{path} has no {atomic.MARKER} marker: its save did not finish (a killed "
                                    f"process?). Fix: resume from the previous checkpoint")
    meta = _load(path / META_FILE, weights_only)
    info = meta.get("pctx", {})
    if info.get("format") != "dcp" or info.get("version") != FORMAT_VERSION:
        raise CheckpointLayoutError(f"{path / META_FILE}: pctx format {info.get('format')!r} version "
                                    f"{info.get('version')!r}, this library reads format 'dcp' version {FORMAT_VERSION}")
    try:
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - re-raised naming the file
        raise CheckpointLayoutError(f"{path / DCP_METADATA} cannot be read ({type(err).__name__}: {err}): the "
                                    f"checkpoint is corrupt or truncated") from err
    live = module.state_dict()
    local = {k: torch.zeros_like(v) for k, v in live.items() if f"state_dict.{k}" in saved}
    target: dict[str, Any] = {"state_dict": present(local, splits_by_name(module), ctx)}
    manifest = info.get("optimizers", [])
    if optimizers and manifest:
        if len(manifest) != len(optimizers):
            raise CheckpointLayoutError(f"{path} holds {len(manifest)} optimizers' states, the model configures "
                                        f"{len(optimizers)}")
        for i, m in enumerate(manifest):
            target[f"optimizer_{i}"] = {"state": _optimizer_target(m, module, ctx)}
    same_layout = {k: info.get(k) for k in ("sizes", "order", "world_size")} == _layout_info(ctx)
    rng_sources = rng_state.plan(info, ctx, same_layout)
    for src in set(rng_sources.values()):
        target[rng_state.entry_key(src)] = io.BytesIO()
    try:
        dcp.load(target, storage_reader=dcp.FileSystemReader(path))
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - re-raised naming the file
        raise CheckpointLayoutError(f"{path}: reading the DCP shards failed ({_describe(err)}); the "
                                    f"checkpoint is corrupt, truncated or not saved from this model") from err
    meta["state_dict"] = {k: local_like(v, live[k]) for k, v in target["state_dict"].items()}
    if optimizers and manifest:
        meta["optimizer_states"] = [
            named_to_optimizer({"state": target[f"optimizer_{i}"]["state"],
                                "param_groups": _own_groups(m["param_groups"], module, ctx)}, opt, module)
            for i, (m, opt) in enumerate(zip(manifest, optimizers))]
    if rng_sources:
        # Each rank's own generators, or at another layout those with a counterpart (rng_state.py).
        # The caller applies them (the strategy: at train start, after the resumed epoch's DataLoader
        # iterator has drawn its seed, which the uninterrupted run drew before the save).
        loaded = {}
        for src in set(rng_sources.values()):
            target[rng_state.entry_key(src)].seek(0)
            loaded[src] = torch.load(target[rng_state.entry_key(src)], weights_only=True)
        meta[RNG_KEY] = rng_state.assemble(rng_sources, loaded)
    return meta


def _own_groups(groups: Sequence[Mapping[str, Any]], module: torch.nn.Module,
                ctx: ParallelContext) -> list[dict[str, Any]]:
    """The saved param_groups cut to this rank's parameters when pipeline stages split the model
    (each stage's optimizer holds its own); unchanged otherwise, so a mismatch stays an error."""
    if ctx.get_world_size("pipeline") == 1:
        return [dict(g) for g in groups]
    own = dict(module.named_parameters())
    return [{**g, "params": [n for n in g["params"] if n in own]} for g in groups]


def _describe(err: BaseException) -> str:
    """One line per failing rank (DCP's exception carries every rank's traceback)."""
    if isinstance(err, CheckpointException):
        excs = {r: (f[0] if isinstance(f, tuple) else f) for r, f in err.failures.items()}
        return "; ".join(f"rank {r}: {type(e).__name__}{': ' + str(e).splitlines()[0] if str(e) else ''}"
                         for r, e in sorted(excs.items()))
    return f"{type(err).__name__}: {err}"


def _optimizer_target(manifest: Mapping[str, Any], module: torch.nn.Module, ctx: ParallelContext) -> dict[str, Any]:
    """Tensors for DCP to fill: moments shaped (and split) like this layout's parameters."""
    params = dict(module.named_parameters())
    splits = splits_by_name(module)
    out: dict[str, Any] = {}
    staged = ctx.get_world_size("pipeline") > 1
    for name, kinds in manifest["state"].items():
        if name not in params:
            if staged:  # another pipeline stage's parameter: that rank loads it
                continue
            raise CheckpointLayoutError(f"the checkpoint's optimizer has state for {name!r}, which this model lacks")
        entry = {}
        for key, kind in kinds.items():
            if kind == "param":
                entry[key] = to_dtensor(torch.zeros_like(params[name].detach()), splits.get(name, []), ctx)
            elif kind[0] == "tensor":
                entry[key] = torch.zeros(kind[1], dtype=getattr(torch, kind[2]))
            else:
                entry[key] = io.BytesIO()
        out[name] = entry
    return out


def shard_optimizer_state(osd: Mapping[str, Any], optimizer: torch.optim.Optimizer, module: torch.nn.Module,
                          ctx: ParallelContext) -> dict[str, Any]:
    """A full (single-process) optimizer state dict cut like the parameters: each state tensor shaped
    like its full parameter becomes this rank's shard of it."""
    from .dtensor_state import _full_shape, _index_to_name

    names = _index_to_name(optimizer, module)
    params = dict(module.named_parameters())
    splits = splits_by_name(module)
    state = {}
    for idx, entry in osd["state"].items():
        name = names[int(idx)]
        full_shape = _full_shape(params[name].shape, splits.get(name, []), ctx)
        state[idx] = {k: (shard_state_dict({name: v}, module, ctx)[name]
                          if isinstance(v, torch.Tensor) and v.dim() > 0 and list(v.shape) == full_shape else v)
                      for k, v in entry.items()}
    return {**osd, "state": state}


def _load(file: Path, weights_only: bool | None) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointLayoutError(f"checkpoint file {file} does not exist")
    # Lightning's own checkpoints hold plain Python objects (loop states, hparams): like Lightning,
    # load them fully unless asked for weights only.
    try:
        out = torch.load(file, map_location="cpu", weights_only=bool(weights_only))
    except pickle.UnpicklingError as err:
        if weights_only:
            raise CheckpointLayoutError(
                f"{file} cannot be loaded with weights_only=True: it holds objects torch's safe loader refuses "
                f"({str(err).splitlines()[0]}). Fix: load with weights_only=False if you trust the file") from err
        raise CheckpointLayoutError(f"{file} is corrupt: {err}") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointLayoutError(f"{file} is truncated or corrupt ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(out, dict):
        raise CheckpointLayoutError(f"{file} holds a {type(out).__name__}, not a checkpoint dict")
    return out


def _load_v1(path: Path, module: torch.nn.Module, ctx: ParallelContext, weights_only: bool | None) -> dict[str, Any]:
    """Format 1 (one torch.save file per (tp, pp, ep) shard): the same shard sizes only."""
    checkpoint = _load(path / META_FILE, weights_only)
    saved = checkpoint.get("pctx", {}).get("sizes", {})
    mine = shard_layout(module, ctx)
    if saved and saved != mine["sizes"]:
        raise CheckpointLayoutError(
            f"checkpoint {path} (format 1) was saved with model shards {saved}, this run has {mine['sizes']}. "
            f"Consolidate it (python -m lightning_parallelctx.lightning.checkpoint {path} full.ckpt) and resume "
            f"from the full file, which is re-sharded on load.")
    c = mine["coords"]
    shard = _load(path / shard_file(c["tp"], c["pp"], c["ep"]), weights_only)
    checkpoint["state_dict"] = shard["state_dict"]
    if "optimizer_states" in shard:
        checkpoint["optimizer_states"] = shard["optimizer_states"]
    return checkpoint


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
    """A checkpoint directory -> one Lightning checkpoint dict with the full ``state_dict`` and full,
    index-keyed ``optimizer_states``: a plain single-process ``Trainer`` resumes from it
    (``trainer.fit(model, ckpt_path=file)``), ``LightningModule.load_from_checkpoint`` loads it.
    One process, no process group."""
    path = atomic.resolve_complete(Path(path))
    if not (path / DCP_METADATA).is_file():
        if is_sharded_checkpoint(path):
            return _consolidate_v1(path)
        raise CheckpointLayoutError(f"{path} is not a checkpoint directory (no {DCP_METADATA})")
    if not atomic.is_complete(path):
        raise CheckpointLayoutError(f"{path} has no {atomic.MARKER} marker: its save did not finish")
    # What torch's dcp_to_torch_save does, in memory (the public dcp.load fills only given keys).
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner, _load_state_dict

    meta = _load(path / META_FILE, False)
    full: dict[str, Any] = {}
    try:
        _load_state_dict(full, storage_reader=dcp.FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - re-raised naming the file
        raise CheckpointLayoutError(f"{path}: reading the DCP shards failed ({_describe(err)})") from err
    meta["state_dict"] = full["state_dict"]
    meta["optimizer_states"] = [_index_keyed(full[f"optimizer_{i}"]["state"], m["param_groups"])
                                for i, m in enumerate(meta["pctx"].get("optimizers", []))]
    meta["pctx"] = {**meta["pctx"], "format": "consolidated"}
    return meta


def _index_keyed(state: Mapping[str, Any], param_groups: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Name-keyed optimizer state -> torch's layout (parameters numbered in param_groups order)."""
    index: dict[str, int] = {}
    groups = []
    for g in param_groups:
        ids = [index.setdefault(n, len(index)) for n in g["params"]]
        groups.append({**g, "params": ids})
    return {"state": {index[n]: dict(e) for n, e in state.items()}, "param_groups": groups}


def _consolidate_v1(path: Path) -> dict[str, Any]:
    meta = torch.load(path / META_FILE, map_location="cpu", weights_only=False)
    files = sorted(f for f in path.iterdir() if SHARD_RE.fullmatch(f.name))
    shards = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    meta["state_dict"] = consolidate_shards(shards)
    meta.pop("optimizer_states", None)
    meta["pctx"] = {**meta.get("pctx", {}), "format": "consolidated"}
    return meta


def consolidate_to_file(path: str | Path, out: str | Path, model_only: bool = False) -> Path:
    """Write :func:`consolidate_checkpoint` (or, ``model_only``, just its model state dict, for
    inference: ``model.load_state_dict(torch.load(out))``) to one file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    full = consolidate_checkpoint(path)
    torch.save(full["state_dict"] if model_only else full, out)
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
        description="Consolidate a ParallelCtxStrategy checkpoint directory into one full single-file checkpoint "
                    "(model and optimizer states, loadable by a plain Trainer).",
    )
    parser.add_argument("checkpoint", help="the checkpoint directory")
    parser.add_argument("output", help="the single file to write")
    parser.add_argument("--model-only", action="store_true", help="write only the model's full state dict")
    args = parser.parse_args(argv)
    try:
        out = consolidate_to_file(args.checkpoint, args.output, model_only=args.model_only)
    except CheckpointLayoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    full = torch.load(out, map_location="cpu", weights_only=False)
    n = len(full if args.model_only else full["state_dict"])
    print(f"wrote {out} ({n} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
