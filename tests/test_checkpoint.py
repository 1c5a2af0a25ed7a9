"""Checkpoints: every shard kept, resume mid-epoch exactly, resume at other layouts, atomic saves.

One spawned 4-process job trains the GPT example (AdamW) at tp2-dp2 for 20 steps (16 batches per
epoch: the step-10 checkpoint is mid-epoch), then resumes its step-10 checkpoint at tp2-dp2 (must be
bit-exact), tp4, dp4 and sp2-dp2 (losses and final weights to 1e-5), saves asynchronously with
top-k pruning, and does the same for the MoE model ep2-dp2 -> ep4. A second job kills one rank in
the middle of a save and resumes ``ckpt_path="last"``. One process consolidates the step-16
(epoch-end) checkpoint with its optimizer state and continues with a plain ``Trainer()``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lightning_parallelctx.testing import RankFailure, spawn

pytestmark = pytest.mark.timeout(900)
TOL = 1e-5
STEPS = 20
MODEL = {"vocab_size": 32, "seq_len": 16, "d_model": 32, "n_heads": 4, "n_layers": 1, "lr": 3e-3, "optimizer": "adamw"}
MOE = {**MODEL, "num_experts": 4, "moe_top_k": 2}
# 128 samples = 16 batches of 8: step 10 is inside the first epoch, step 16 its end.
DATA = {"vocab_size": 32, "seq_len": 16, "num_samples": 128, "num_val_samples": 16, "global_batch_size": 8}
RESUME_AT = {"tp2-dp2": {"tensor_parallel_size": 2, "data_parallel_size": 2},
             "tp4": {"tensor_parallel_size": 4},
             "dp4": {"data_parallel_size": 4},
             "sp2-dp2": {"sequence_parallel_size": 2, "data_parallel_size": 2},
             # The same sizes, data-parallel innermost: every rank holds another shard than it saved.
             "tp2-dp2-dp-inner": {"tensor_parallel_size": 2, "data_parallel_size": 2, "order": "dp-tp-sp-ep-pp"}}


# ------------------------------------------------------------------------------ run in children
def _data(**kw: Any) -> Any:
    from examples.gpt.data import GPTDataModule

    return GPTDataModule(**{**DATA, **kw})


def _trainer(strategy: Any, callbacks: list, max_steps: int = STEPS, devices: int = 4, **kw: Any) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, logger=False,
                      enable_checkpointing=any(type(c).__name__ == "ModelCheckpoint" for c in callbacks),
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                      num_sanity_val_steps=0, limit_val_batches=0, **kw)


def _losses(out: list) -> Any:
    import lightning.pytorch as pl

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            out.append(float(trainer.callback_metrics["train_loss"]))

    return Losses()


def _rng_probe(out: dict) -> Any:
    """Per-mode RNG streams in use (drawn from every batch); their state at step 10 and at the start
    of a resumed fit."""
    import lightning.pytorch as pl

    from lightning_parallelctx.random import get_rng_state, model_parallel_rng, model_parallel_seed

    class Probe(pl.Callback):
        def setup(self, trainer: Any, module: Any, stage: str) -> None:
            model_parallel_seed(7, module.parallel_context)

        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            out.setdefault("start", get_rng_state())  # the first batch of the fit, before its draws
            with model_parallel_rng("tensor"):
                torch.rand(3)
            torch.rand(3)

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 10 and "step10" not in out:
                out["step10"] = get_rng_state()

    return Probe()


def _full(model: Any) -> dict[str, torch.Tensor]:
    from lightning_parallelctx.lightning import gather_full_state_dict

    return gather_full_state_dict(model, model.parallel_context)


def _train(sizes: dict, model_kw: dict, callbacks: list, ckpt_path: str | None = None, devices: int = 4,
           max_steps: int = STEPS, weights_only: bool | None = None, **strategy_kw: Any) -> tuple:
    import lightning.pytorch as pl

    from examples.gpt.model import GPTLightning
    from lightning_parallelctx import ParallelCtxStrategy

    pl.seed_everything(1234)
    losses: list[float] = []
    model = GPTLightning(**model_kw)
    trainer = _trainer(ParallelCtxStrategy(**sizes, print_layout=False, **strategy_kw), [_losses(losses), *callbacks],
                       max_steps=max_steps, devices=devices)
    trainer.fit(model, _data(), ckpt_path=ckpt_path, weights_only=weights_only)
    return model, trainer, losses


def _layouts_job(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    res: dict[str, Any] = {}
    # Uninterrupted tp2-dp2, with checkpoints at steps 10 (mid-epoch) and 16 (epoch end).
    every10 = ModelCheckpoint(dirpath=f"{tmp}/ck", filename="{step}", every_n_train_steps=10, save_top_k=-1)
    every16 = ModelCheckpoint(dirpath=f"{tmp}/ck16", filename="{step}", every_n_train_steps=16, save_top_k=-1)
    rng: dict[str, Any] = {}
    model, _, losses = _train(RESUME_AT["tp2-dp2"], MODEL, [every10, every16, _rng_probe(rng)])
    res["losses"], res["final"], res["rng10"] = losses, _full(model), rng["step10"]
    res["files10"] = sorted(os.listdir(f"{tmp}/ck/step=10.ckpt"))
    res["local_final"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # The CLI's case: a fit cut short by max_steps=10, its checkpoint saved in on_train_epoch_end of
    # an unfinished epoch (Lightning then sets the sampler's epoch to 1 on resume), resumed to 20.
    at_end = ModelCheckpoint(dirpath=f"{tmp}/cut", filename="{step}")
    _train(RESUME_AT["tp2-dp2"], MODEL, [at_end], max_steps=10)
    model, _, resumed = _train(RESUME_AT["tp2-dp2"], MODEL, [], ckpt_path=f"{tmp}/cut/step=10.ckpt")
    res["cut_short"] = {"losses": resumed, "local_final": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    # A consolidated (full, single-file) checkpoint with optimizer state, cut to tp4 shards on load.
    import torch.distributed as dist

    from lightning_parallelctx.lightning.checkpoint import consolidate_to_file

    if rank == 0:
        consolidate_to_file(f"{tmp}/ck16/step=16.ckpt", f"{tmp}/full16.ckpt")
    dist.barrier()
    model, _, resumed = _train(RESUME_AT["tp4"], MODEL, [], ckpt_path=f"{tmp}/full16.ckpt")
    res["from_full_tp4"] = {"losses": resumed, "final": _full(model)}
    for name, sizes in RESUME_AT.items():
        rng = {}
        model, trainer, resumed = _train(sizes, MODEL, [_rng_probe(rng)], ckpt_path=f"{tmp}/ck/step=10.ckpt")
        res[f"resumed_{name}"] = {"losses": resumed, "final": _full(model), "step": trainer.global_step,
                                  "rng_start": rng["start"]}
        if name == "tp2-dp2":
            res["resumed_local_final"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Asynchronous saves, pruned to the best two: the same run, the same bytes as a synchronous save.
    top2 = ModelCheckpoint(dirpath=f"{tmp}/async", filename="{step}", every_n_train_steps=5, save_top_k=2,
                           monitor="step", mode="max")
    import lightning.pytorch as pl

    class At15(pl.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            if trainer.global_step == 15:  # before ModelCheckpoint's save of step 15 (callbacks run first)
                res["full15"] = _full(module)

    model, _, losses = _train(RESUME_AT["tp2-dp2"], MODEL, [At15(), top2], async_checkpoint=True)
    res["async_losses"] = losses
    res["async_dirs"] = sorted(os.listdir(f"{tmp}/async"))
    # MoE: experts split over EXPERT, resumed with another expert-parallel size.
    every10 = ModelCheckpoint(dirpath=f"{tmp}/moe", filename="{step}", every_n_train_steps=10, save_top_k=-1)
    model, _, losses = _train({"expert_parallel_size": 2, "data_parallel_size": 2}, MOE, [every10])
    res["moe"] = {"losses": losses, "final": _full(model)}
    model, trainer, resumed = _train({"expert_parallel_size": 4}, MOE, [], ckpt_path=f"{tmp}/moe/step=10.ckpt")
    res["moe_ep4"] = {"losses": resumed, "final": _full(model)}
    trainer.save_checkpoint(f"{tmp}/weights_only.ckpt", weights_only=True)
    return res


PP2_DP2 = {"pipeline_parallel_size": 2, "data_parallel_size": 2}
#: Where the pp2-dp2 (1F1B, one stage per rank) step-10 checkpoint resumes. MODEL is 5 pipeline layers
#: (tok, pos, blocks.0, ln_f, head): pp2 holds 3 + 2, pp4 2 + 1 + 1 + 1, interleaved pp2 x 2 virtual
#: stages 2 + 1 + 1 + 1 placed in a loop (rank 0 holds layers 0-1 and 3).
PIPELINE_RESUME_AT = {"tp2-dp2": RESUME_AT["tp2-dp2"],
                      "pp4": {"pipeline_parallel_size": 4},
                      "pp1-dp4": {"data_parallel_size": 4},
                      "pp2-dp2-interleaved-v2": {**PP2_DP2, "pipeline_schedule": "interleaved_1f1b",
                                                 "virtual_pipeline_size": 2}}


def _pipeline_job(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    res: dict[str, Any] = {}
    every10 = ModelCheckpoint(dirpath=f"{tmp}/pp", filename="{step}", every_n_train_steps=10, save_top_k=-1)
    model, _, losses = _train(PP2_DP2, MODEL, [every10])
    res["losses"], res["final"] = losses, _full(model)
    for name, sizes in PIPELINE_RESUME_AT.items():
        model, trainer, resumed = _train(sizes, MODEL, [], ckpt_path=f"{tmp}/pp/step=10.ckpt")
        res[name] = {"losses": resumed, "final": _full(model), "step": trainer.global_step}
    # The other way: the layouts job's tp2-dp2 step-10 checkpoint resumed with pipeline stages.
    for name, sizes in (("pp2-dp2", PP2_DP2), ("pp2-dp2-interleaved-v2", PIPELINE_RESUME_AT["pp2-dp2-interleaved-v2"])):
        model, trainer, resumed = _train(sizes, MODEL, [], ckpt_path=f"{tmp}/ck/step=10.ckpt")
        res[f"tp2-dp2->{name}"] = {"losses": resumed, "final": _full(model), "step": trainer.global_step}
    return res


def _plain_trainer_job(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    """One process, no strategy of ours: continue from the consolidated step-16 checkpoint."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, DistributedSampler

    from examples.gpt.data import BigramText
    from examples.gpt.model import GPTLightning
    from lightning_parallelctx.lightning.checkpoint import consolidate_to_file

    consolidate_to_file(f"{tmp}/ck16/step=16.ckpt", f"{tmp}/full16.ckpt")
    consolidate_to_file(f"{tmp}/ck16/step=16.ckpt", f"{tmp}/model16.pt", model_only=True)
    full = torch.load(f"{tmp}/full16.ckpt", weights_only=False)
    data = BigramText(DATA["vocab_size"], DATA["seq_len"], DATA["num_samples"])
    # The permutation Lightning's DistributedSampler gave the parallel run (docs/traps.md #17): its seed
    # is PL_GLOBAL_SEED, which seed_everything(1234) set.
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=1234)
    loader = DataLoader(data, batch_size=8, sampler=sampler)
    losses: list[float] = []
    model = GPTLightning(**MODEL)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[_losses(losses)])
    trainer.fit(model, loader, ckpt_path=f"{tmp}/full16.ckpt", weights_only=False)
    inference = GPTLightning(**MODEL)
    inference.configure_model()
    inference.load_state_dict(torch.load(f"{tmp}/model16.pt", weights_only=True))
    return {"losses": losses, "final": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer_keys": sorted(full["optimizer_states"][0]["state"][0]), "step": trainer.global_step,
            "model16": {k: v.clone() for k, v in inference.state_dict().items()}, "state16": full["state_dict"]}


SMALL = {**MODEL, "d_model": 16, "n_heads": 2}


def _killed_mid_save_job(rank: int, world_size: int, tmp: str) -> None:
    """Checkpoints every 2 steps (and last.ckpt); rank 1 dies inside the step-4 save, after its own
    data is written (a slow storage), before the save completes."""
    import signal
    import time

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.distributed.checkpoint import FileSystemWriter

    class DieInNextSave(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if rank == 1 and trainer.global_step == 4:  # runs before ModelCheckpoint's save
                real = FileSystemWriter.write_data

                def write_then_die(self: Any, plan: Any, planner: Any) -> Any:
                    real(self, plan, planner).wait()
                    time.sleep(0.5)
                    os.kill(os.getpid(), signal.SIGKILL)

                FileSystemWriter.write_data = write_then_die

    ck = ModelCheckpoint(dirpath=f"{tmp}/kill", filename="{step}", every_n_train_steps=2, save_top_k=-1, save_last=True)
    _train({"data_parallel_size": 2}, SMALL, [DieInNextSave(), ck], devices=2, max_steps=6, timeout=30)


def _resume_last_job(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    seen: dict[str, Any] = {}

    class AtStart(pl.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            seen["step"] = trainer.global_step
            seen["weights"] = {k: v.detach().clone() for k, v in module.state_dict().items()}

    ck = ModelCheckpoint(dirpath=f"{tmp}/kill", filename="{step}", every_n_train_steps=2, save_top_k=-1, save_last=True)
    # weights_only=True: torch's safe unpickler reads every file of the checkpoint.
    _, trainer, _ = _train({"data_parallel_size": 2}, SMALL, [AtStart(), ck], ckpt_path="last", devices=2, max_steps=6,
                           weights_only=True)
    seen["end"] = trainer.global_step
    return seen


def _load_bad_job(rank: int, world_size: int, path: str) -> None:
    _train({"data_parallel_size": 2}, SMALL, [], ckpt_path=path, devices=2, max_steps=6, timeout=60)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    tmp = tmp_path_factory.mktemp("ckpt")
    return spawn(_layouts_job, 4, str(tmp), timeout=800), tmp


@pytest.fixture(scope="module")
def pipeline_resumes(layouts: tuple) -> list[dict[str, Any]]:
    _, tmp = layouts  # its tp2-dp2 step-10 checkpoint is resumed with stages too
    return spawn(_pipeline_job, 4, str(tmp), timeout=600)


def _plain_dcp_job(rank: int, world_size: int, path: str) -> dict[str, torch.Tensor]:
    """No library code: torch's process group, a 4-way DeviceMesh, and ``dcp.load`` into DTensors
    sharded by rows (a layout the library never used), as a torchtitan-style loader does."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (world_size,))
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    wanted = [k for k, m in saved.items() if getattr(m, "size", None) and len(m.size) > 0
              and (k.startswith("state_dict.") or k.endswith((".exp_avg", ".exp_avg_sq")))]
    state = {k: distribute_tensor(torch.zeros(saved[k].size, dtype=saved[k].properties.dtype), mesh, [Shard(0)])
             for k in wanted}
    dcp.load(state, checkpoint_id=path)
    full = {k: v.full_tensor() for k, v in state.items()}
    dist.destroy_process_group()
    return full


def _model_parallel_strategy_job(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """Lightning's ModelParallelStrategy (no library strategy): the GPT example with FSDP2 over 4 data
    ranks resumes the library's tp2-dp2 checkpoint with Lightning's own loader; what it restored, as
    full tensors, at the start of training."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    from examples.gpt.model import GPTLightning

    class FSDPGPT(GPTLightning):
        def configure_model(self) -> None:
            super().configure_model()
            for name in self.gpt.layer_names:  # each layer: the model calls them one by one
                fully_shard(self.gpt.get_submodule(name), mesh=self.device_mesh["data_parallel"])

    seen: dict[str, Any] = {}

    class AtStart(pl.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            seen["step"] = trainer.global_step
            seen["state_dict"] = {k: v.full_tensor() for k, v in module.state_dict().items()}
            osd = get_optimizer_state_dict(module, trainer.optimizers[0])
            seen["moments"] = {f"{n}.{m}": e[m].full_tensor() for n, e in osd["state"].items() for m in ("exp_avg", "exp_avg_sq")}

    pl.seed_everything(1234)
    trainer = pl.Trainer(accelerator="cpu", devices=world_size, max_steps=11, logger=False,
                         strategy=ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[AtStart()], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(FSDPGPT(**MODEL), _data(), ckpt_path=path, weights_only=False)
    return seen


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ------------------------------------------------------------------------------ tests
def test_every_shard_saved_once_by_dcp(layouts: tuple) -> None:
    runs, tmp = layouts
    # Every rank writes its own DCP file; the marker is the last thing a save writes.
    assert runs[0]["files10"] == [".metadata", "COMPLETE", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp",
                                  "__3_0.distcp", "meta.pt"]
    # Nothing a save leaves behind (no .partial / .old directories).
    assert sorted(os.listdir(tmp / "ck")) == ["step=10.ckpt", "step=20.ckpt"]


def test_same_layout_mid_epoch_resume_is_bit_exact(layouts: tuple) -> None:
    runs, _ = layouts
    for r in runs:
        resumed = r["resumed_tp2-dp2"]
        assert resumed["step"] == STEPS
        assert resumed["losses"] == r["losses"][10:], (resumed["losses"][:3], r["losses"][10:13])
        assert all(torch.equal(v, r["resumed_local_final"][k]) for k, v in r["local_final"].items())
        # Each rank's generators (default and per-mode streams) are back as they were at step 10.
        saved, restored = r["rng10"], resumed["rng_start"]
        assert torch.equal(saved["default"]["cpu"], restored["default"]["cpu"])
        assert set(saved["streams"]) == set(restored["streams"]) == {"tensor", "sequence", "expert"}
        assert all(torch.equal(saved["streams"][n]["cpu"], restored["streams"][n]["cpu"]) for n in saved["streams"])
    # ... and they are per rank: the tensor stream differs across TENSOR ranks (0 and 1).
    assert not torch.equal(runs[0]["rng10"]["streams"]["tensor"]["cpu"], runs[1]["rng10"]["streams"]["tensor"]["cpu"])


def _seeded_tensor_stream(tp_rank: int) -> torch.Tensor:
    from lightning_parallelctx.random import RNGStreams, derive_seed

    streams = RNGStreams()
    streams.add("tensor", derive_seed(7, "tensor", (tp_rank,)))  # what _rng_probe's model_parallel_seed(7) makes
    return streams.get_state()["tensor"]["cpu"]


def test_rng_streams_at_another_layout(layouts: tuple) -> None:
    runs, _ = layouts
    saved = [r["rng10"] for r in runs]  # tp2-dp2, tensor innermost: saved rank r has tensor rank r % 2
    # The default generator was the same on every saved rank: every rank continues it at any layout.
    assert all(torch.equal(s["default"]["cpu"], saved[0]["default"]["cpu"]) for s in saved)
    for name in ("tp4", "dp4", "sp2-dp2", "tp2-dp2-dp-inner"):
        for r in runs:
            assert torch.equal(r[f"resumed_{name}"]["rng_start"]["default"]["cpu"], saved[0]["default"]["cpu"]), name
    # The per-tensor-rank streams come back where the tensor size is unchanged: with data innermost,
    # new rank n has tensor rank n // 2 and continues the saved stream of tensor rank n // 2.
    for n, r in enumerate(runs):
        got = r["resumed_tp2-dp2-dp-inner"]["rng_start"]["streams"]
        assert all(torch.equal(got[s]["cpu"], saved[n // 2]["streams"][s]["cpu"]) for s in ("tensor", "sequence", "expert"))
    # At tp4 (tensor size changed) no saved stream made these ranks' draws: each keeps the stream the
    # resumed run seeded, distinct per tensor rank.
    for n, r in enumerate(runs):
        assert torch.equal(r["resumed_tp4"]["rng_start"]["streams"]["tensor"]["cpu"], _seeded_tensor_stream(n))
        assert torch.equal(r["resumed_dp4"]["rng_start"]["streams"]["tensor"]["cpu"], _seeded_tensor_stream(0))


def test_rng_map_rule() -> None:
    from lightning_parallelctx.layout import RankLayout
    from lightning_parallelctx.rng_map import source_rank, varying_axes

    tp2_dp2 = RankLayout.build(4, tensor=2)
    assert varying_axes(["a"] * 4, tp2_dp2) == ()
    assert varying_axes(["a", "b", "a", "b"], tp2_dp2) == ("tensor",)
    assert varying_axes(["a", "b", "c", "d"], tp2_dp2) == ("tensor", "data")
    # tp2-pp2: a stream per tensor rank that pipeline stages advanced differently varies over both.
    tp2_pp2 = RankLayout.build(4, tensor=2, pipeline=2)
    assert varying_axes(["a", "b", "c", "d"], tp2_pp2) == ("tensor", "pipeline")
    # Counterparts: same sizes on the varying axes, any order or other axes.
    dp_inner = RankLayout.build(4, tensor=2, order="dp-tp-sp-ep-pp")
    assert [source_rank(("tensor",), tp2_dp2, dp_inner, n) for n in range(4)] == [0, 0, 1, 1]
    tp2_dp4 = RankLayout.build(8, tensor=2)
    assert [source_rank(("tensor",), tp2_dp2, tp2_dp4, n) for n in range(8)] == [0, 1] * 4
    assert source_rank(("tensor",), tp2_dp2, RankLayout.build(4, tensor=4), 3) is None
    assert source_rank((), tp2_dp2, RankLayout.build(8, tensor=8), 5) == 0
    with pytest.raises(ValueError, match="3 digests for a layout of 4 ranks"):
        varying_axes(["a"] * 3, tp2_dp2)


def test_resume_of_a_fit_cut_short_by_max_steps_is_bit_exact(layouts: tuple) -> None:
    runs, _ = layouts
    for r in runs:
        assert r["cut_short"]["losses"] == r["losses"][10:], (r["cut_short"]["losses"][:3], r["losses"][10:13])
        assert all(torch.equal(v, r["cut_short"]["local_final"][k]) for k, v in r["local_final"].items())


@pytest.mark.parametrize("layout", ["tp4", "dp4", "sp2-dp2", "tp2-dp2-dp-inner"])
def test_resume_at_another_layout(layout: str, layouts: tuple) -> None:
    runs, _ = layouts
    for r in runs:
        resumed = r[f"resumed_{layout}"]
        assert len(resumed["losses"]) == STEPS - 10
        assert max(abs(a - b) for a, b in zip(resumed["losses"], r["losses"][10:])) < TOL
    # The optimizer's moments came back too: without them the losses after step 10 drift by ~1e-2.
    assert _max_diff(runs[0][f"resumed_{layout}"]["final"], runs[0]["final"]) < TOL


@pytest.mark.parametrize("layout", list(PIPELINE_RESUME_AT))
def test_pipeline_checkpoint_resumes_at_another_layout(layout: str, pipeline_resumes: list) -> None:
    # pp2-dp2 saved at step 10 (mid-epoch), resumed at tp2-dp2, pp4, pp1 and with interleaved virtual
    # stages: every rank's losses after the resume and the final full weights = the uninterrupted run.
    for r in pipeline_resumes:
        resumed = r[layout]
        assert resumed["step"] == STEPS and len(resumed["losses"]) == STEPS - 10
        assert max(abs(a - b) for a, b in zip(resumed["losses"], r["losses"][10:])) < TOL, \
            (resumed["losses"][:3], r["losses"][10:13])
        assert _max_diff(resumed["final"], r["final"]) < TOL


@pytest.mark.parametrize("layout", ["pp2-dp2", "pp2-dp2-interleaved-v2"])
def test_tensor_parallel_checkpoint_resumes_with_pipeline_stages(layout: str, layouts: tuple,
                                                                 pipeline_resumes: list) -> None:
    runs, _ = layouts
    for r, ref in zip(pipeline_resumes, runs):
        resumed = r[f"tp2-dp2->{layout}"]
        assert resumed["step"] == STEPS and len(resumed["losses"]) == STEPS - 10
        assert max(abs(a - b) for a, b in zip(resumed["losses"], ref["losses"][10:])) < TOL
    assert _max_diff(pipeline_resumes[0][f"tp2-dp2->{layout}"]["final"], runs[0]["final"]) < TOL


def test_plain_torch_dcp_loads_model_and_moments_into_its_own_dtensors(layouts: tuple) -> None:
    _, tmp = layouts
    path = tmp / "ck/step=10.ckpt"
    loaded = spawn(_plain_dcp_job, 4, str(path), timeout=180)
    model, moments = _consolidated_named(path)
    expected = {**{f"state_dict.{k}": v for k, v in model.items()},
                **{f"optimizer_0.state.{k}": v for k, v in moments.items()}}
    for got in loaded:
        assert set(got) == set(expected)
        assert all(torch.equal(got[k], v) for k, v in expected.items())


def _consolidated_named(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(full model state dict, full AdamW moments keyed "<param name>.<exp_avg|exp_avg_sq>")."""
    from lightning_parallelctx.lightning.checkpoint import consolidate_checkpoint

    full = consolidate_checkpoint(path)
    names = list(dict.fromkeys(n for g in full["pctx"]["optimizers"][0]["param_groups"] for n in g["params"]))
    moments = {f"{names[i]}.{m}": e[m] for i, e in full["optimizer_states"][0]["state"].items()
               for m in ("exp_avg", "exp_avg_sq")}
    return full["state_dict"], moments


def test_model_parallel_strategy_resumes_our_checkpoint(layouts: tuple) -> None:
    _, tmp = layouts
    path = tmp / "ck/step=10.ckpt"
    model, moments = _consolidated_named(path)
    for seen in spawn(_model_parallel_strategy_job, 4, str(path), timeout=300):
        # tp2-dp2 shards, read by Lightning's loader into FSDP2 DTensors over 4 data ranks: exact.
        assert seen["step"] == 10
        assert set(seen["state_dict"]) == set(model) and set(seen["moments"]) == set(moments)
        assert all(torch.equal(seen["state_dict"][k], v) for k, v in model.items())
        assert all(torch.equal(seen["moments"][k], v) for k, v in moments.items())


def test_consolidated_file_resumes_at_another_layout(layouts: tuple) -> None:
    runs, _ = layouts
    for r in runs:
        assert len(r["from_full_tp4"]["losses"]) == STEPS - 16
        assert max(abs(a - b) for a, b in zip(r["from_full_tp4"]["losses"], r["losses"][16:])) < TOL
    assert _max_diff(runs[0]["from_full_tp4"]["final"], runs[0]["final"]) < TOL


def test_moe_resume_at_another_expert_size(layouts: tuple) -> None:
    runs, _ = layouts
    for r in runs:
        assert len(r["moe_ep4"]["losses"]) == STEPS - 10
        assert max(abs(a - b) for a, b in zip(r["moe_ep4"]["losses"], r["moe"]["losses"][10:])) < TOL
    assert _max_diff(runs[0]["moe_ep4"]["final"], runs[0]["moe"]["final"]) < TOL
    # save_checkpoint(weights_only=True): the model alone, every expert shard.
    from lightning_parallelctx.lightning.checkpoint import consolidate_checkpoint

    _, tmp = layouts
    full = consolidate_checkpoint(tmp / "weights_only.ckpt")
    assert full["optimizer_states"] == [] and _max_diff(full["state_dict"], runs[0]["moe_ep4"]["final"]) == 0.0


def test_async_save_trains_the_same_and_prunes(layouts: tuple) -> None:
    runs, tmp = layouts
    assert all(r["async_losses"] == r["losses"] for r in runs)
    # save_top_k=2 by step: 15 and 20 remain, complete; 5 and 10 were removed; no leftovers.
    assert runs[0]["async_dirs"] == ["step=15.ckpt", "step=20.ckpt"]
    from lightning_parallelctx.lightning.checkpoint import consolidate_checkpoint

    sync, asyn = consolidate_checkpoint(tmp / "ck/step=20.ckpt"), consolidate_checkpoint(tmp / "async/step=20.ckpt")
    assert all(torch.equal(v, asyn["state_dict"][k]) for k, v in sync["state_dict"].items())
    for k, entry in sync["optimizer_states"][0]["state"].items():
        assert all(torch.equal(v, asyn["optimizer_states"][0]["state"][k][n]) for n, v in entry.items())
    # Steps 16-19 trained while step 15 was written: the file holds step 15's weights, not later ones.
    at15 = consolidate_checkpoint(tmp / "async/step=15.ckpt")
    assert at15["global_step"] == 15
    assert all(torch.equal(v, at15["state_dict"][k]) for k, v in runs[0]["full15"].items())


def test_consolidated_checkpoint_continues_in_a_plain_trainer(layouts: tuple) -> None:
    runs, tmp = layouts
    (plain,) = spawn(_plain_trainer_job, 1, str(tmp), timeout=300)
    assert plain["optimizer_keys"] == ["exp_avg", "exp_avg_sq", "step"]
    assert plain["step"] == STEPS
    assert max(abs(a - b) for a, b in zip(plain["losses"], runs[0]["losses"][16:])) < TOL
    assert len(plain["losses"]) == STEPS - 16
    assert _max_diff(plain["final"], runs[0]["final"]) < TOL
    # The model-only export is the consolidated model, loadable with weights_only=True.
    assert _max_diff(plain["model16"], plain["state16"]) == 0.0


def _killed_run(tmp_path_factory: pytest.TempPathFactory, name: str, job: Any, killed_rank: int) -> Path:
    """Run ``job`` on 2 ranks in a fresh directory; it must end with ``killed_rank`` SIGKILLed."""
    tmp = tmp_path_factory.mktemp(name)
    with pytest.raises(RankFailure) as failure:
        spawn(job, 2, str(tmp), timeout=180)
    assert f"rank {killed_rank} exited with code -9" in str(failure.value), str(failure.value)[-2000:]
    return tmp


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _killed_run(tmp_path_factory, "kill", _killed_mid_save_job, killed_rank=1)


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint(killed: Path) -> None:
    from lightning_parallelctx.lightning.checkpoint import consolidate_checkpoint

    names = sorted(os.listdir(killed / "kill"))
    # step=4's save never completed: only its hidden .partial directory exists, unmarked.
    assert names == [".step=4.ckpt.partial", "last.ckpt", "step=2.ckpt"], names
    assert not (killed / "kill/.step=4.ckpt.partial/COMPLETE").exists()
    assert any(f.suffix == ".distcp" for f in (killed / "kill/.step=4.ckpt.partial").iterdir())  # it was mid-write
    assert consolidate_checkpoint(killed / "kill/last.ckpt")["global_step"] == 2
    # ckpt_path="last" resumes from the step-2 checkpoint, exactly, and trains on.
    step2 = consolidate_checkpoint(killed / "kill/step=2.ckpt")["state_dict"]
    runs = spawn(_resume_last_job, 2, str(killed), timeout=180)
    for r in runs:
        assert r["step"] == 2 and r["end"] == 6
        assert all(torch.equal(v, step2[k]) for k, v in r["weights"].items())
    # The next save of step 4 replaced the leftover.
    assert sorted(os.listdir(killed / "kill")) == ["last.ckpt", "step=2.ckpt", "step=4.ckpt", "step=6.ckpt"]


def _killed_between_renames_job(rank: int, world_size: int, tmp: str) -> None:
    """Checkpoints every 2 steps with last.ckpt; rank 0 (which commits) dies in the step-4 save of
    last.ckpt between its two renames: last.ckpt moved to .last.ckpt.old, the complete new copy
    still .last.ckpt.partial, no last.ckpt."""
    import signal

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    class DieBetweenRenames(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if rank == 0 and trainer.global_step == 4:
                real = os.rename

                def rename_then_die(src: Any, dst: Any) -> None:
                    real(src, dst)
                    if Path(src).name == "last.ckpt" and Path(dst).name == ".last.ckpt.old":
                        os.kill(os.getpid(), signal.SIGKILL)

                os.rename = rename_then_die

    ck = ModelCheckpoint(dirpath=f"{tmp}/kill", filename="{step}", every_n_train_steps=2, save_top_k=-1, save_last=True)
    _train({"data_parallel_size": 2}, SMALL, [DieBetweenRenames(), ck], devices=2, max_steps=6, timeout=30)


@pytest.fixture(scope="module")
def killed_between_renames(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _killed_run(tmp_path_factory, "renames", _killed_between_renames_job, killed_rank=0)


def test_last_resumes_from_a_replacement_cut_between_its_renames(killed_between_renames: Path) -> None:
    from lightning_parallelctx.lightning import atomic
    from lightning_parallelctx.lightning.checkpoint import consolidate_checkpoint

    d = killed_between_renames / "kill"
    names = sorted(os.listdir(d))
    # No last.ckpt: Lightning's "last" lookup alone finds nothing and would train from step 0.
    assert names == [".last.ckpt.old", ".last.ckpt.partial", "step=2.ckpt", "step=4.ckpt"], names
    assert atomic.is_complete(d / ".last.ckpt.partial") and atomic.is_complete(d / ".last.ckpt.old")
    # The one-process reader picks the newest complete copy as well.
    assert consolidate_checkpoint(d / "last.ckpt")["global_step"] == 4
    step4 = consolidate_checkpoint(d / "step=4.ckpt")["state_dict"]
    runs = spawn(_resume_last_job, 2, str(killed_between_renames), timeout=180)
    for r in runs:
        assert r["step"] == 4 and r["end"] == 6
        assert all(torch.equal(v, step4[k]) for k, v in r["weights"].items())
    # Recovered before the fit (rolled forward, the stale .old dropped), then saved again as usual.
    assert sorted(os.listdir(d)) == ["last.ckpt", "step=2.ckpt", "step=4.ckpt", "step=6.ckpt"]
    assert consolidate_checkpoint(d / "last.ckpt")["global_step"] == 6


def test_recover_is_safe_from_every_rank_at_once(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from lightning_parallelctx.lightning import atomic
    from lightning_parallelctx.lightning.resume_path import recover_before_resolve

    final = tmp_path / "last.ckpt"

    def left(partial_marked: bool) -> None:
        for d, text in ((atomic.old_dir(final), "old"), (atomic.partial_dir(final), "new")):
            d.mkdir()
            (d / "data").write_text(text)
        (atomic.old_dir(final) / atomic.MARKER).write_text("")
        if partial_marked:
            (atomic.partial_dir(final) / atomic.MARKER).write_text("")

    # The marked .partial is the newest complete copy: rolled forward by exactly one of 8 callers.
    left(partial_marked=True)
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda _: atomic.recover(final), range(8)))
    assert won.count(True) == 1 and (final / "data").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # An unmarked .partial (killed before the marker) is never used: the complete .old comes back.
    atomic.remove(final)
    left(partial_marked=False)
    assert atomic.resolve_complete(final) == atomic.old_dir(final)
    assert recover_before_resolve(None, str(final)) == [final] and (final / "data").read_text() == "old"
    assert recover_before_resolve(None, str(final)) == []  # nothing left to do


def _damage(src: Path, dst: Path, how: str) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if how == "truncated meta":
        (dst / "meta.pt").write_bytes((dst / "meta.pt").read_bytes()[:100])
    elif how == "truncated shard":
        f = dst / "__1_0.distcp"
        f.write_bytes(f.read_bytes()[:64])
    elif how == "no marker":
        (dst / "COMPLETE").unlink()
    elif how == "foreign":
        shutil.rmtree(dst)
        dst.mkdir()
        (dst / "weights.bin").write_bytes(b"x" * 10)
    elif how == "corrupt metadata":
        (dst / ".metadata").write_bytes(b"not a pickle")
    return dst


@pytest.mark.parametrize("how, message", [
    ("truncated meta", r"meta\.pt is truncated or corrupt"),
    ("truncated shard", r"reading the DCP shards failed"),
    ("no marker", r"has no COMPLETE marker: its save did not finish"),
    ("foreign", r"is a directory but not a checkpoint of this library"),
    ("corrupt metadata", r"\.metadata cannot be read"),
])
def test_a_damaged_checkpoint_is_a_clear_error_on_every_rank(killed: Path, tmp_path: Path, how: str, message: str) -> None:
    import re

    bad = _damage(killed / "kill/step=2.ckpt", tmp_path / "bad.ckpt", how)
    with pytest.raises(RankFailure) as failure:
        spawn(_load_bad_job, 2, str(bad), timeout=120)
    assert sorted(failure.value.errors) == [0, 1]
    for tb in failure.value.errors.values():
        assert "CheckpointLayoutError" in tb and str(bad) in tb and re.search(message, tb), tb[-1500:]


def test_weights_only_load(killed: Path) -> None:
    from lightning_parallelctx.lightning.checkpoint import _load

    # Lightning's metadata is plain containers and tensors: torch's safe loader reads it.
    meta = _load(killed / "kill/step=2.ckpt/meta.pt", weights_only=True)
    assert meta["global_step"] == 2 and meta["pctx"]["format"] == "dcp"


# ------------------------------------------------------------------------------ FSDP2 parameters
def _fsdp2_job(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    """A model sharded by torch's fully_shard over the context's DATA mesh dimension: its DTensor
    parameters and AdamW moments are saved from every rank and re-sharded on load (4 -> 2 ways)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_parallelctx import ParallelCtxStrategy
    from lightning_parallelctx.grad_sync import GradientHandler

    class FSDPSyncsItself(GradientHandler):
        """FSDP2 reduce-scatters its gradients itself: the strategy's handler must not add a sync."""

        def setup(self, module: Any, ctx: Any) -> Any:
            return module

        def finish(self) -> None:
            pass

    class Net(pl.LightningModule):
        def configure_model(self) -> None:
            if hasattr(self, "net"):
                return
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
            # The mesh from the context (this branch's strategy has no self.device_mesh yet).
            fully_shard(self.net, mesh=self.parallel_context.device_mesh["dp"])

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
            self.log("train_loss", loss, sync_dist=True)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    class Data(pl.LightningDataModule):
        def train_dataloader(self) -> Any:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(64, 8, generator=g)
            per_rank = 8 // self.trainer.strategy.distributed_sampler_kwargs["num_replicas"]
            return DataLoader(TensorDataset(x, torch.sin(x)), batch_size=per_rank)

    def train(sizes: dict, callbacks: list, ckpt_path: str | None = None) -> tuple:
        pl.seed_everything(1234)
        losses: list[float] = []
        model = Net()
        strategy = ParallelCtxStrategy(**sizes, gradient_handler=FSDPSyncsItself(), sync_initial_weights=False,
                                       print_layout=False)
        trainer = _trainer(strategy, [_losses(losses), *callbacks], max_steps=12)
        trainer.fit(model, Data(), ckpt_path=ckpt_path)
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
        return losses, full, model

    ck = ModelCheckpoint(dirpath=f"{tmp}/fsdp", filename="{step}", every_n_train_steps=5, save_top_k=-1)
    losses, full, model = train({"data_parallel_size": 4}, [ck])
    res = {"losses": losses, "full": full, "is_dtensor": all(isinstance(p, DTensor) for p in model.parameters())}
    # Step 5 of 8 per epoch (mid-epoch), resumed with FSDP2 over 2 DATA ranks (tp2-dp2).
    resumed, full2, _ = train({"data_parallel_size": 2, "tensor_parallel_size": 2}, [], f"{tmp}/fsdp/step=5.ckpt")
    res["resumed"], res["resumed_full"] = resumed, full2
    return res


def test_fsdp2_parameters_every_shard_saved_and_resharded(tmp_path: Path) -> None:
    runs = spawn(_fsdp2_job, 4, str(tmp_path), timeout=300)
    for r in runs:
        assert r["is_dtensor"]
        assert len(r["losses"]) == 12 and len(r["resumed"]) == 7
        assert max(abs(a - b) for a, b in zip(r["resumed"], r["losses"][5:])) < TOL, (r["resumed"], r["losses"][5:])
        assert _max_diff(r["resumed_full"], r["full"]) < TOL
    # The consolidated checkpoint holds the whole tensors (no shard lost to key de-duplication).
    from lightning_parallelctx.lightning.checkpoint import consolidate_checkpoint

    full = consolidate_checkpoint(tmp_path / "fsdp/step=5.ckpt")
    assert full["state_dict"]["net.0.weight"].shape == (32, 8)
    assert len(full["optimizer_states"][0]["state"]) == 4


# ------------------------------------------------------------------------------ atomic replacement
def test_replacing_a_checkpoint_never_leaves_none(tmp_path: Path) -> None:
    from lightning_parallelctx.lightning import atomic

    final = tmp_path / "last.ckpt"
    for step in (1, 2):
        atomic.begin(final)
        (atomic.partial_dir(final) / "data").write_text(str(step))
        atomic.commit(final)
        assert (final / "data").read_text() == str(step) and atomic.is_complete(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # Killed between "old out of the way" and "new in place": the complete old copy is found.
    atomic.begin(final)
    (atomic.partial_dir(final) / "data").write_text("3")
    final.rename(atomic.old_dir(final))
    assert atomic.resolve_complete(final) == atomic.old_dir(final)
    # Killed before the marker: never complete.
    assert not atomic.is_complete(atomic.partial_dir(final))
    atomic.remove(final)
    assert list(tmp_path.iterdir()) == []
