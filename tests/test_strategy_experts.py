"""Expert parallelism end to end through Lightning: 4 processes against a single-process run.

The GPT example with a mixture-of-experts MLP (4 experts, top-2 routing, dropless) trains for 20
steps at ep2-dp2 (expert 2 x data 2: four distinct data shards) and at tp2-ep2 (tensor 2 x
expert 2: two data shards, each shared by a TENSOR pair); ep2-dp2 also saves a sharded checkpoint
at step 10, resumes from it with a new Trainer, and its consolidated step-10 checkpoint is
re-sharded into ep4. One spawned 4-process job runs all of that, one single-process job the
reference; the tests compare the per-step losses, the full model's gradient norms (which would
show a wrongly scaled expert gradient at the first step) and the final full weights.

Expert gradients: each EXPERT rank's experts receive (through the token all-to-all) the gradient
of every EXPERT rank's local mean loss; grad_sync sums them over 'expert_replica' (DATA x
SEQUENCE) and divides by the data-parallel size, so they are the gradient of the whole-batch
mean loss, as the dense parameters' (averaged over 'dense_replica'). AdamW is nearly invariant to
a constant gradient scale, so the losses alone would hide a wrongly scaled expert gradient; the
full-model gradient norm compared at every step does not (tp2-ep2, where 'expert_replica' is one
rank, once left the expert gradients unscaled: losses matched, norms were 18% off).

The recorded run comes from tests/_reference.py, the trainer and model from test_strategy.py; see
its docstring for the data order (docs/traps.md #17).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the example lives in examples/gpt (importable from the repo root)
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _reference import fit_recorded, max_diff  # the recorded run both sides of a comparison use
from test_strategy import (  # helpers only: an imported test_* name would be collected here too
    STEPS,
    TOL,
    _model_class,
    _trainer,
)

from lightning_parallelctx.testing import spawn

NUM_EXPERTS, TOP_K = 4, 2
# Every test here uses the module fixtures; whichever runs first (alone, with -k, or in any order)
# builds them: reference (300 s) + parallel (600 s) of spawn timeouts, above pytest's global 300 s.
pytestmark = pytest.mark.timeout(1000)
MODEL = {"vocab_size": 32, "seq_len": 16, "d_model": 32, "n_heads": 4, "n_layers": 1, "lr": 3e-3,
         "optimizer": "adamw", "num_experts": NUM_EXPERTS, "moe_top_k": TOP_K}

# 80 samples = 10 batches of 8: 20 steps are two epochs, and the step-10 checkpoint is at an epoch
# end (Lightning restarts a plain DataLoader at its epoch's start when resuming mid-epoch).
DATA = {"vocab_size": 32, "seq_len": 16, "num_samples": 80, "num_val_samples": 32, "global_batch_size": 8}

#: name -> strategy arguments
LAYOUTS: dict[str, dict[str, int]] = {
    "ep2-dp2": {"expert_parallel_size": 2, "data_parallel_size": 2},
    "tp2-ep2": {"tensor_parallel_size": 2, "expert_parallel_size": 2, "data_parallel_size": 1},
}


# ------------------------------------------------------------------------------ run in children
def _data() -> Any:
    from examples.gpt.data import GPTDataModule

    return GPTDataModule(**DATA)


def _routing_recorder(out: dict[str, Any]) -> Any:
    import lightning.pytorch as pl

    class Routing(pl.Callback):
        """The smallest top-k margin of the router (a near tie could route differently per layout)."""

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            def hook(mod: Any, args: tuple) -> None:
                with torch.no_grad():
                    probs = torch.softmax(mod.gate(args[0].reshape(-1, mod.d_model)).float(), -1)
                    top = probs.topk(min(mod.top_k + 1, mod.num_experts), -1).values
                    margin = float((top[:, -2] - top[:, -1]).min()) if top.shape[1] > mod.top_k else 1.0
                out["min_margin"] = min(out.get("min_margin", 1.0), margin)

            self.handles = [m.register_forward_pre_hook(hook) for m in module.modules()
                            if type(m).__name__ == "ExpertParallelMoE"]

        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            for h in self.handles:
                h.remove()

    return Routing()


def _model() -> Any:
    return _model_class()(**MODEL)


def _reference(rank: int, world_size: int) -> bytes:
    from lightning_parallelctx import ParallelCtxStrategy

    routing: dict[str, Any] = {}
    _, _, rec = fit_recorded(_model, lambda cbs: _trainer(ParallelCtxStrategy(), callbacks=cbs, devices=1), _data(),
                             callbacks=[_routing_recorder(routing)])
    return {**rec, **routing}


def _parallel(rank: int, world_size: int, tmp: str) -> bytes:
    import torch.distributed as dist
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_parallelctx import ParallelCtxStrategy
    from lightning_parallelctx.lightning import (
        consolidate_to_file,
        gather_full_state_dict,
    )
    from lightning_parallelctx.nn import gather_state_dict

    res: dict[str, Any] = {}
    for name, sizes in LAYOUTS.items():
        callbacks = []
        if name == "ep2-dp2":
            callbacks.append(ModelCheckpoint(dirpath=f"{tmp}/ckpt", filename="{step}", every_n_train_steps=10,
                                             save_top_k=-1))
        model, trainer, rec = fit_recorded(_model, lambda cbs: _trainer(ParallelCtxStrategy(**sizes), callbacks=cbs),
                                           _data(), callbacks=callbacks)
        ctx = model.parallel_context
        sampler = trainer.train_dataloader.sampler
        rec["sampler"] = (sampler.num_replicas, sampler.rank)
        rec["coords"] = {m: ctx.get_local_rank(m) for m in ("tensor", "expert", "data")}
        rec["final"] = gather_full_state_dict(model, ctx)  # collective: every rank calls it
        rec["final_markers"] = gather_state_dict(model.gpt, ctx)  # the nn-level, marker-driven gather
        rec["local_final"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if name == "ep2-dp2":
            # Resume from the step-10 sharded checkpoint with a new Trainer (and strategy) to step 20.
            _, _, resumed = fit_recorded(_model, lambda cbs: _trainer(ParallelCtxStrategy(**sizes), callbacks=cbs),
                                         _data(), ckpt_path=f"{tmp}/ckpt/step=10.ckpt")
            rec["resumed_losses"] = resumed["losses"]
            rec["resumed_final_local"] = resumed["final"]
            if rank == 0:
                consolidate_to_file(f"{tmp}/ckpt/step=10.ckpt", f"{tmp}/full10.ckpt")
                rec["ckpt_files"] = sorted(p.name for p in Path(f"{tmp}/ckpt/step=10.ckpt").iterdir())
            dist.barrier()
        res[name] = rec

    # The consolidated (full) step-10 checkpoint, re-sharded on load into ep4 (one expert per rank).
    model3 = _model()
    t3 = _trainer(ParallelCtxStrategy(expert_parallel_size=4))
    t3.validate(model3, _data(), ckpt_path=f"{tmp}/full10.ckpt", verbose=False)
    res["ep4_experts_per_rank"] = model3.gpt.blocks[0].moe.w1.shape[0]
    res["resharded_ep4"] = gather_full_state_dict(model3, model3.parallel_context)
    return res


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return spawn(_reference, 1, timeout=300)[0]


@pytest.fixture(scope="module")
def parallel(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("strategy_experts")
    return spawn(_parallel, 4, str(tmp), timeout=600)


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_expert_layout_matches_single_process(layout: str, reference: dict, parallel: list[dict]) -> None:
    ref, runs = reference, [r[layout] for r in parallel]
    assert len(ref["losses"]) == STEPS and all(len(r["losses"]) == STEPS for r in runs)
    for r in runs:  # every rank logs the same synced loss, equal to the reference's
        assert max(abs(a - b) for a, b in zip(r["losses"], ref["losses"])) < TOL, (r["losses"][:4], ref["losses"][:4])
        # One norm per optimizer step, on every rank (zip would silently compare a prefix).
        assert len(r["norms"]) == len(ref["norms"]) == STEPS, (len(r["norms"]), len(ref["norms"]))
        assert max(abs(a - b) / max(b, 1e-3) for a, b in zip(r["norms"], ref["norms"])) < TOL
    assert ref["losses"][-1] < ref["losses"][0] - 0.1  # it learns something
    for r in runs:  # the full weights, from Lightning's consolidation and from the nn markers
        assert max_diff(r["final"], ref["final"]) < TOL
        assert max_diff({f"gpt.{k}": v for k, v in r["final_markers"].items()}, ref["final"]) < TOL
    # The experts really are split: EXPERT ranks hold different halves of the stacked experts.
    w1 = [r["local_final"]["gpt.blocks.0.moe.w1"] for r in runs]
    assert all(w.shape[0] == NUM_EXPERTS // 2 for w in w1)
    assert not torch.equal(w1[0], w1[[r["coords"]["expert"] for r in runs].index(1)])
    # Data sharded over DATA x EXPERT ranks: 4 shards at ep2-dp2, 2 at tp2-ep2 (TENSOR pairs share).
    shards = LAYOUTS[layout].get("data_parallel_size", 1) * LAYOUTS[layout]["expert_parallel_size"]
    assert {r["sampler"][0] for r in runs} == {shards}
    assert len({r["sampler"][1] for r in runs}) == shards


def test_routing_has_no_near_ties(reference: dict) -> None:
    # Equivalence above relies on every layout picking the same experts; a margin far above fp32
    # noise means it is not luck.
    assert reference["min_margin"] > 1e-6, reference["min_margin"]


def test_expert_checkpoint_resume_and_consolidation(reference: dict, parallel: list[dict]) -> None:
    runs = [r["ep2-dp2"] for r in parallel]
    # A torch DCP directory (expert shards as DTensors over EXPERT), complete.
    assert runs[0]["ckpt_files"] == [".metadata", "COMPLETE", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp", "meta.pt"]
    for r in runs:  # step 10 -> 20 after resuming == the last 10 steps of the uninterrupted run
        assert len(r["resumed_losses"]) == STEPS // 2
        assert max(abs(a - b) for a, b in zip(r["resumed_losses"], r["losses"][STEPS // 2:])) < 1e-6
        assert max_diff(r["resumed_final_local"], r["local_final"]) < 1e-6
        assert max_diff(r["state10"], reference["state10"]) < TOL
    # The consolidated step-10 checkpoint, re-sharded into ep4, is the reference at step 10.
    assert parallel[0]["ep4_experts_per_rank"] == 1
    assert max_diff(parallel[0]["resharded_ep4"], reference["state10"]) < TOL
