"""ParallelCtxStrategy end to end: 4 processes against a single-process run of the same model.

One spawned 4-process job trains the GPT example at tp2-dp2 (accumulate_grad_batches=2, gradient
clipping), dp4, tp4 and tp2-sp2 for 20 steps each, resumes tp2-dp2 from its step-10 sharded
checkpoint, validates/tests, and re-shards a consolidated checkpoint into tp4; one single-process
job trains the reference. The tests then compare what they recorded (CPU is scarce: everything
that needs processes happens in those two jobs).

Data: Lightning's DistributedSampler (shuffle=True, seed PL_GLOBAL_SEED) also runs in the
single-process reference (one replica), so the same permutation applies there (docs/traps.md #17):
step s of every layout reads samples perm[8s:8s+8], split over the data-shard ranks.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the example lives in examples/gpt (importable from the repo root)
    sys.path.insert(0, str(ROOT))

from examples.gpt.model import GPTLightning
from lightning_parallelctx import ParallelContext
from lightning_parallelctx.testing import spawn

STEPS = 20
# Every test here uses the module fixtures; whichever runs first (alone, with -k, or in any order)
# builds them: reference (400 s) + parallel (900 s) of spawn timeouts, above pytest's global 300 s.
pytestmark = pytest.mark.timeout(1500)
TOL = 1e-5
MODEL = {"vocab_size": 32, "seq_len": 16, "d_model": 32, "n_heads": 4, "n_layers": 1, "lr": 3e-3, "optimizer": "adamw"}
# 160 samples = 20 batches of 8: one epoch is 20 steps, or 10 with accumulate_grad_batches=2.
DATA = {"vocab_size": 32, "seq_len": 16, "num_samples": 160, "num_val_samples": 32, "global_batch_size": 8}
CLIP = 0.05

#: name -> (strategy arguments, accumulate_grad_batches, gradient_clip_val)
LAYOUTS: dict[str, tuple[dict[str, int], int, float | None]] = {
    "tp2-dp2": ({"tensor_parallel_size": 2, "data_parallel_size": 2}, 2, CLIP),
    # The gradient handler is a strategy argument: torch's DDP wrapper and the flat all-reduce too.
    "dp4": ({"gradient_handler": "ddp"}, 1, None),
    "tp4": ({"tensor_parallel_size": 4}, 1, None),
    "tp2-sp2": ({"tensor_parallel_size": 2, "sequence_parallel_size": 2, "gradient_handler": "allreduce"}, 1, None),
}


# ------------------------------------------------------------------------------ run in children

def _recorder(out: dict[str, Any]) -> Any:
    import lightning.pytorch as pl

    from lightning_parallelctx.lightning import gather_full_state_dict, grad_norm

    class Recorder(pl.Callback):
        """Per micro-batch: the synced loss; per step: the full model's grad norm before clipping."""

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            out.setdefault("losses", []).append(float(trainer.callback_metrics["train_loss"]))
            if trainer.global_step == 10 and "state10" not in out and batch_idx % trainer.accumulate_grad_batches == trainer.accumulate_grad_batches - 1:
                out["local10"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
                out["state10"] = gather_full_state_dict(module, module.parallel_context)

        def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
            out.setdefault("norms", []).append(float(grad_norm(module.parameters(), module.parallel_context)))

    return Recorder()


class CheckedGPT(GPTLightning):
    def configure_model(self) -> None:
        # The context must be on the module from configure_model on, never the LocalContext fallback.
        assert isinstance(self.parallel_context, ParallelContext), type(getattr(self, "parallel_context", None))
        super().configure_model()


def _model_class() -> type:
    return CheckedGPT


def _trainer(strategy: Any, accumulate: int = 1, clip: float | None = None, callbacks: list | None = None,
             max_steps: int = STEPS, devices: int = 4) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps,
                      accumulate_grad_batches=accumulate, gradient_clip_val=clip, logger=False,
                      enable_checkpointing=any(type(c).__name__ == "ModelCheckpoint" for c in callbacks or []),
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks or [],
                      num_sanity_val_steps=0, limit_val_batches=2, limit_test_batches=2)


def _data() -> Any:
    from examples.gpt.data import GPTDataModule

    return GPTDataModule(**DATA)


def _data_loader(split: str) -> Any:
    data = _data()
    data.setup(split)
    # A plain loader: Lightning adds the (unshuffled) DistributedSampler over the data shards.
    return torch.utils.data.DataLoader(data.val_set, batch_size=8)


def _reference(rank: int, world_size: int) -> dict[str, Any]:
    """The same model, data and optimizer in one process (world of 1)."""
    import lightning.pytorch as pl

    from lightning_parallelctx import ParallelCtxStrategy

    results = {}
    for name, accumulate, clip in (("plain", 1, None), ("acc2-clip", 2, CLIP)):
        pl.seed_everything(1234)
        rec: dict[str, Any] = {}
        model = _model_class()(**MODEL)
        trainer = _trainer(ParallelCtxStrategy(), accumulate, clip, [_recorder(rec)], devices=1)
        trainer.fit(model, _data())
        rec["final"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        rec["val"] = trainer.validate(model, _data(), verbose=False)[0]["val_loss"]
        rec["predictions"] = torch.cat(trainer.predict(model, dataloaders=_data_loader("val")))
        results[name] = rec
    return results


def _parallel(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch.distributed as dist
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_parallelctx import ParallelCtxStrategy
    from lightning_parallelctx.lightning import (
        consolidate_to_file,
        gather_full_state_dict,
    )

    res: dict[str, Any] = {}

    # Count the gradient all-reduces (the hook's bucket buffers) over the data-parallel group during
    # each micro-batch (docs/traps.md #6); sync_dist logging also talks over that group, and is not counted.
    real_all_reduce = dist.all_reduce
    counter: dict[str, Any] = {"group": None, "buffers": (), "n": 0}

    def counting_all_reduce(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        group = kwargs.get("group", args[1] if len(args) > 1 else None)
        if counter["group"] is not None and group is counter["group"] and any(tensor is b for b in counter["buffers"]):
            counter["n"] += 1
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce

    class MicroBatchComm(pl.Callback):
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            counter["group"] = module.parallel_context.get_group("dense_replica")
            counter["buffers"] = trainer.strategy._grad_handler.hook.communication_buffers()
            counter["n"] = 0

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            res.setdefault("dp_allreduces_per_microbatch", []).append(counter["n"])

    for name, (sizes, accumulate, clip) in LAYOUTS.items():
        pl.seed_everything(1234)
        rec: dict[str, Any] = {}
        model = _model_class()(**MODEL)
        strategy = ParallelCtxStrategy(**sizes)
        callbacks = [_recorder(rec)]
        if name == "tp2-dp2":
            callbacks += [MicroBatchComm(), ModelCheckpoint(dirpath=f"{tmp}/ckpt", filename="{step}",
                                                            every_n_train_steps=10, save_top_k=-1)]
        trainer = _trainer(strategy, accumulate, clip, callbacks)
        trainer.fit(model, _data())
        ctx = model.parallel_context
        sampler = trainer.train_dataloader.sampler
        rec["sampler"] = (sampler.num_replicas, sampler.rank, ctx.get_world_size("data_shard"),
                          ctx.get_local_rank("data_shard"))
        # On every rank (each rank's own shard is part of what it gathers): a drifting replica shows.
        rec["final"] = gather_full_state_dict(model, ctx)
        if name == "tp2-dp2":
            # validate/test reuse the context and never overwrite shards (docs/traps.md #5, #7).
            local = {k: v.detach().clone() for k, v in model.state_dict().items()}
            calls = ctx.new_group_calls
            rec["val"] = trainer.validate(model, _data(), verbose=False)[0]["val_loss"]
            trainer.test(model, _data(), verbose=False)
            preds = trainer.predict(model, dataloaders=_data_loader("val"))
            rec["predictions"] = torch.cat(preds)
            # The module holds the context, yet copies and pickles (docs/traps.md #9) keep the live one.
            import pickle

            rec["copy_keeps_ctx"] = copy.deepcopy(model).parallel_context is ctx and \
                pickle.loads(pickle.dumps(model)).parallel_context is ctx
            # Collectives over any mode's group, by name.
            s = trainer.strategy
            rec["reduce_tensor"] = float(s.reduce(torch.tensor(float(rank)), group="tensor", reduce_op="sum"))
            rec["gather_data"] = s.all_gather(torch.tensor([rank]), group="data").flatten().tolist()
            rec["broadcast"] = s.broadcast(f"from {rank}", src=3)
            s.barrier()
            rec["same_ctx"] = model.parallel_context is ctx and ctx.new_group_calls == calls
            rec["weights_kept"] = all(torch.equal(local[k], v) for k, v in model.state_dict().items())
            rec["local_final"] = local
            rec["tp_shard_of_head"] = local["gpt.head.weight"].clone()
            # Resume from the step-10 checkpoint with a new Trainer (and strategy) to step 20.
            pl.seed_everything(1234)
            resumed: dict[str, Any] = {}
            model2 = _model_class()(**MODEL)
            loaded: dict[str, Any] = {}

            class Snapshot(pl.Callback):
                def on_train_start(self, trainer: Any, module: Any, loaded: dict = loaded) -> None:
                    loaded.update({k: v.detach().clone() for k, v in module.state_dict().items()})

            t2 = _trainer(ParallelCtxStrategy(**sizes), accumulate, clip, [_recorder(resumed), Snapshot()])
            t2.fit(model2, _data(), ckpt_path=f"{tmp}/ckpt/step=10.ckpt")
            rec["resumed_losses"] = resumed["losses"]
            rec["restored_exactly"] = all(torch.equal(rec["local10"][k], v) for k, v in loaded.items()) and \
                set(loaded) == set(rec["local10"])
            rec["resumed_final_local"] = {k: v.detach().clone() for k, v in model2.state_dict().items()}
            rec["resumed_same_ctx"] = model2.parallel_context is ctx
            if rank == 0:
                consolidate_to_file(f"{tmp}/ckpt/step=10.ckpt", f"{tmp}/full10.ckpt")
                rec["ckpt_files"] = sorted(p.name for p in Path(f"{tmp}/ckpt/step=10.ckpt").iterdir())
            dist.barrier()
        res[name] = rec
    counter["group"] = None
    dist.all_reduce = real_all_reduce

    # A consolidated (full, single-file) checkpoint is re-sharded on load into another layout.
    model3 = _model_class()(**MODEL)
    t3 = _trainer(ParallelCtxStrategy(tensor_parallel_size=4))
    t3.validate(model3, _data(), ckpt_path=f"{tmp}/full10.ckpt", verbose=False)
    full3 = gather_full_state_dict(model3, model3.parallel_context)
    res["resharded_tp4"] = full3 if rank == 0 else None
    return res


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return spawn(_reference, 1, timeout=400)[0]


@pytest.fixture(scope="module")
def parallel(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("strategy")
    return spawn(_parallel, 4, str(tmp), timeout=900)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout: str, reference: dict, parallel: list[dict]) -> None:
    ref = reference["acc2-clip" if LAYOUTS[layout][1] == 2 else "plain"]
    runs = [r[layout] for r in parallel]
    n_micro = STEPS * LAYOUTS[layout][1]
    assert len(ref["losses"]) == n_micro and all(len(r["losses"]) == n_micro for r in runs)
    for r in runs:  # every rank logs the same synced loss, equal to the reference's
        assert max(abs(a - b) for a, b in zip(r["losses"], ref["losses"])) < TOL, (r["losses"][:4], ref["losses"][:4])
        # One norm per optimizer step, on every rank (zip would silently compare a prefix).
        assert len(r["norms"]) == len(ref["norms"]) == STEPS, (len(r["norms"]), len(ref["norms"]))
        assert max(abs(a - b) / max(b, 1e-3) for a, b in zip(r["norms"], ref["norms"])) < TOL
    assert ref["losses"][-1] < ref["losses"][0] - 0.1  # it learns something
    for rank, r in enumerate(runs):
        assert _max_diff(r["final"], ref["final"]) < TOL, rank
    # Data sharded over data_shard (DATA x EXPERT) ranks only (docs/traps.md #4).
    sizes = LAYOUTS[layout][0]
    replicas = 4 // (sizes.get("tensor_parallel_size", 1) * sizes.get("sequence_parallel_size", 1))
    assert [r["sampler"][:2] for r in runs] == [(replicas, r["sampler"][3]) for r in runs]
    assert {r["sampler"][2] for r in runs} == {replicas}


def test_clipping_and_accumulation(reference: dict, parallel: list[dict]) -> None:
    ref = reference["acc2-clip"]
    # Clipping was active (norms above the threshold), and the sharded norm equals the full one.
    assert max(ref["norms"]) > 2 * CLIP
    # Accumulation: no data-parallel traffic on the first micro-batch of each step, some on the last.
    counts = [r["dp_allreduces_per_microbatch"] for r in parallel]
    for c in counts:
        assert len(c) == 2 * STEPS
        assert all(n == 0 for n in c[0::2]), c
        assert all(n > 0 for n in c[1::2]), c


def test_validate_test_keep_shards_and_context(reference: dict, parallel: list[dict]) -> None:
    runs = [r["tp2-dp2"] for r in parallel]
    assert all(r["same_ctx"] and r["weights_kept"] and r["resumed_same_ctx"] for r in runs)
    # TP ranks really hold different shards (so a rank-0 broadcast would have been visible).
    assert not torch.equal(runs[0]["tp_shard_of_head"], runs[1]["tp_shard_of_head"])
    assert torch.equal(runs[0]["tp_shard_of_head"], runs[2]["tp_shard_of_head"])  # dp replica
    # sync_dist=True: every rank reports the global validation loss, equal to the reference's.
    assert all(abs(r["val"] - reference["acc2-clip"]["val"]) < TOL for r in runs)
    # predict: each data shard predicts its rows (Lightning's unshuffled DistributedSampler: rows
    # dp::2), over the full vocabulary and sequence, exactly as the single process does.
    for rank, r in enumerate(runs):
        assert torch.equal(r["predictions"], reference["acc2-clip"]["predictions"][rank // 2::2])
    assert all(r["copy_keeps_ctx"] for r in runs)
    # rank = 2 * dp + tp: the tensor group of rank r is {r - r % 2, r - r % 2 + 1}, the data group {r % 2, r % 2 + 2}.
    assert [r["reduce_tensor"] for r in runs] == [1.0, 1.0, 5.0, 5.0]
    assert [r["gather_data"] for r in runs] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(r["broadcast"] == "from 3" for r in runs)


def test_checkpoint_resume_restores_every_shard(reference: dict, parallel: list[dict]) -> None:
    runs = [r["tp2-dp2"] for r in parallel]
    # docs/traps.md #14: a torch DCP directory (every rank writes its file, shards as DTensors), complete,
    # and every rank gets its own shard back exactly.
    assert runs[0]["ckpt_files"] == [".metadata", "COMPLETE", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp", "meta.pt"]
    assert all(r["restored_exactly"] for r in runs)
    # Step 10 -> 20 after resuming == the last 10 steps of the uninterrupted run, on every rank.
    for r in runs:
        assert len(r["resumed_losses"]) == len(r["losses"]) // 2
        assert max(abs(a - b) for a, b in zip(r["resumed_losses"], r["losses"][len(r["losses"]) // 2:])) < 1e-6
        assert _max_diff(r["resumed_final_local"], r["local_final"]) < 1e-6


def test_consolidated_checkpoint_is_the_full_model(reference: dict, parallel: list[dict]) -> None:
    ref10 = reference["acc2-clip"]["state10"]
    # The consolidated step-10 checkpoint, re-sharded into tp4 on load, is the reference at step 10.
    assert _max_diff(parallel[0]["resharded_tp4"], ref10) < TOL
    assert _max_diff(parallel[0]["tp2-dp2"]["state10"], ref10) < TOL
