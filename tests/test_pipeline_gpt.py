"""Pipeline stages combined with tensor, sequence and expert parallelism: the GPT example.

One 4-process world trains the GPT example (2 blocks = 6 pipeline layers) at tp2-pp2 (accumulation
2 + clipping), pp2-sp2 (GPipe), pp2-ep2 (mixture of experts) and pp2-dp2 with the token embedding
tied to the LM head across the first and last stage, for 20 steps each, and 8 processes train tp2-pp2-dp2; one process
trains the references. Every rank's loss, the full model's gradient norm at every step and the
final full weights must match within 1e-5 (fp32).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lightning_parallelctx.testing import spawn

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]
STEPS = 20
TOL = 1e-5
CLIP = 0.05
DENSE = {"vocab_size": 32, "seq_len": 16, "d_model": 32, "n_heads": 4, "n_layers": 2, "lr": 1e-3, "optimizer": "adamw"}
MOE = {**DENSE, "num_experts": 4, "moe_top_k": 2}
TIED = {**DENSE, "tie_embeddings": True}
DATA = {"vocab_size": 32, "seq_len": 16, "num_samples": 160, "num_val_samples": 32, "global_batch_size": 8}

#: name -> (strategy arguments, model, accumulate_grad_batches, gradient_clip_val)
LAYOUTS: dict[str, tuple[dict[str, Any], str, int, float | None]] = {
    "tp2-pp2-acc2-clip": ({"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, "dense", 2, CLIP),
    "pp2-sp2-gpipe": ({"sequence_parallel_size": 2, "pipeline_parallel_size": 2, "pipeline_schedule": "gpipe"},
                      "dense", 1, None),
    "pp2-ep2-moe": ({"expert_parallel_size": 2, "pipeline_parallel_size": 2}, "moe", 1, None),
    # Token embedding = LM head, on the first and the last stage: copies start equal, gradients are
    # summed over pipeline_embedding, clipping counts the weight once.
    "pp2-dp2-tied-acc2-clip": ({"pipeline_parallel_size": 2}, "tied", 2, CLIP),
}
REFERENCES = {("dense", 2, CLIP), ("dense", 1, None), ("moe", 1, None), ("tied", 2, CLIP)}


def _fit(strategy: Any, model_kind: str, accumulate: int, clip: float | None, devices: int) -> dict[str, Any]:
    import lightning.pytorch as pl

    from examples.gpt.data import GPTDataModule
    from examples.gpt.model import GPTLightning
    from lightning_parallelctx.lightning import gather_full_state_dict, grad_norm

    rec: dict[str, Any] = {}

    class Recorder(pl.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            rec.setdefault("losses", []).append(float(trainer.callback_metrics["train_loss"]))

        def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
            rec.setdefault("norms", []).append(float(grad_norm(module.parameters(), module.parallel_context)))

    pl.seed_everything(1234)
    model = GPTLightning(**{"moe": MOE, "tied": TIED, "dense": DENSE}[model_kind])
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS,
                         accumulate_grad_batches=accumulate, gradient_clip_val=clip, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Recorder()], num_sanity_val_steps=1, limit_val_batches=1, val_check_interval=10)
    trainer.fit(model, GPTDataModule(**DATA))
    rec["final"] = gather_full_state_dict(model, model.parallel_context)
    rec["val"] = float(trainer.callback_metrics["val_loss"])
    return rec


def _reference(rank: int, world_size: int) -> dict[Any, Any]:
    from lightning_parallelctx import ParallelCtxStrategy

    return {key: _fit(ParallelCtxStrategy(print_layout=False), *key, devices=1) for key in sorted(REFERENCES, key=str)}


def _parallel(rank: int, world_size: int) -> dict[str, Any]:
    from lightning_parallelctx import ParallelCtxStrategy

    return {name: _fit(ParallelCtxStrategy(**sizes, print_layout=False), kind, acc, clip, world_size)
            for name, (sizes, kind, acc, clip) in LAYOUTS.items()}


@pytest.fixture(scope="module")
def reference() -> dict[Any, Any]:
    return spawn(_reference, 1, timeout=400)[0]


@pytest.fixture(scope="module")
def parallel() -> list[dict[str, Any]]:
    return spawn(_parallel, 4, timeout=800)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gpt_layout_matches_single_process(layout: str, reference: dict, parallel: list[dict]) -> None:
    _, kind, accumulate, clip = LAYOUTS[layout]
    ref = reference[(kind, accumulate, clip)]
    assert len(ref["losses"]) == STEPS * accumulate and ref["losses"][-1] < ref["losses"][0] - 0.1
    for r in (p[layout] for p in parallel):
        assert len(r["losses"]) == len(ref["losses"])
        assert max(abs(a - b) for a, b in zip(r["losses"], ref["losses"])) < TOL, (r["losses"][:3], ref["losses"][:3])
        assert len(r["norms"]) == len(ref["norms"]) == STEPS
        assert max(abs(a - b) / max(b, 1e-3) for a, b in zip(r["norms"], ref["norms"])) < TOL
        # Validation (sanity check and mid-epoch) runs the forward-only schedule: same loss everywhere.
        assert abs(r["val"] - ref["val"]) < TOL
        full = r["final"]
        assert set(full) == set(ref["final"])
        assert max(float((full[k] - ref["final"][k]).abs().max()) for k in full) < TOL
    if clip:
        assert max(ref["norms"]) > 2 * clip


def _eight(rank: int, world_size: int) -> dict[str, Any]:
    from lightning_parallelctx import ParallelCtxStrategy

    strategy = ParallelCtxStrategy(tensor_parallel_size=2, pipeline_parallel_size=2, print_layout=False)
    return _fit(strategy, "dense", 2, CLIP, world_size)


def test_tp2_pp2_dp2_on_eight_processes(reference: dict) -> None:
    """Every mode of a 3-D layout at once: 2 tensor x 2 pipeline x 2 data, accumulation 2 + clipping."""
    ref = reference[("dense", 2, CLIP)]
    for r in spawn(_eight, 8, timeout=800):
        assert max(abs(a - b) for a, b in zip(r["losses"], ref["losses"])) < TOL
        assert len(r["norms"]) == STEPS and max(abs(a - b) / max(b, 1e-3) for a, b in zip(r["norms"], ref["norms"])) < TOL
        assert abs(r["val"] - ref["val"]) < TOL
        assert max(float((r["final"][k] - ref["final"][k]).abs().max()) for k in ref["final"]) < TOL
