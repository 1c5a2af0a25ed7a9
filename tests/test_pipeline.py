"""Pipeline parallelism: every schedule and layout trains exactly what one process trains.

One 4-process world trains the pipelined MLP of examples/pipeline (8 layers) with several schedules
and layouts for 20 steps each, resumes one from its step-10 checkpoint, validates and predicts;
one single-process world trains the reference. Losses (on every rank), gradient norms (before
clipping) and final weights must agree within 1e-5 in fp32. Data: Lightning's DistributedSampler
(shuffle, seed 0) in both, over the data-shard ranks only (docs/traps.md #17): a global batch of 8.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _reference import fit_recorded, max_diff  # the recorded run both sides of a comparison use

from lightning_parallelctx.errors import ParallelConfigError
from lightning_parallelctx.pipeline import (
    PipelineSequential,
    Schedule,
    StagePlan,
    available_schedules,
    get_schedule,
    layer_ranges,
    resolve_pipeline_config,
    stage_rank,
    stages_of_rank,
)
from lightning_parallelctx.testing import spawn

pytestmark = pytest.mark.timeout(900)
STEPS = 20
TOL = 1e-5
CLIP = 0.3
GLOBAL_BATCH = 8

#: name -> (strategy arguments, accumulate_grad_batches, gradient_clip_val)
LAYOUTS: dict[str, tuple[dict[str, Any], int, float | None]] = {
    "pp4-1f1b": ({"pipeline_parallel_size": 4}, 1, None),
    "pp2-dp2-gpipe-acc2-clip": ({"pipeline_parallel_size": 2, "pipeline_schedule": "gpipe"}, 2, CLIP),
    "pp2-dp2-1f1b-acc2-clip": ({"pipeline_parallel_size": 2}, 2, CLIP),
    "pp2-dp2-interleaved-v2": ({"pipeline_parallel_size": 2, "pipeline_schedule": "interleaved_1f1b",
                                "virtual_pipeline_size": 2}, 1, None),
    # Zero bubble writes weight gradients outside autograd's accumulation (docs/traps.md #22): with dp2 a
    # replica that missed the sync would diverge from the reference.
    "pp2-dp2-zbv-acc2-clip": ({"pipeline_parallel_size": 2, "pipeline_schedule": "zbv_zero_bubble"}, 2, CLIP),
    # The same with every parameter all-reduced in its own .grad (no bucket copy): the replayed zero
    # accumulation must reach those hooks too.
    "pp2-dp2-zbv-acc2-clip-in-place": ({"pipeline_parallel_size": 2, "pipeline_schedule": "zbv_zero_bubble",
                                        "gradient_handler": {"class_path": "bucketed",
                                                             "init_args": {"in_place_mb": 1e-9}}}, 2, CLIP),
    "pp4-looped-bfs-v2": ({"pipeline_parallel_size": 4, "pipeline_schedule": "looped_bfs",
                           "virtual_pipeline_size": 2, "num_microbatches": 8}, 1, None),
}
RESUMED = "pp2-dp2-1f1b-acc2-clip"


# ------------------------------------------------------------------------------ run in children
def _trainer(strategy: Any, accumulate: int = 1, clip: float | None = None, callbacks: list | None = None,
             devices: int = 4, max_steps: int = STEPS) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps,
                      accumulate_grad_batches=accumulate, gradient_clip_val=clip, logger=False,
                      enable_checkpointing=any(type(c).__name__ == "ModelCheckpoint" for c in callbacks or []),
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks or [],
                      num_sanity_val_steps=0, limit_val_batches=2)


def _loader(replicas: int, n: int = 160) -> Any:
    from examples.pipeline.model import loader

    return loader(GLOBAL_BATCH // replicas, n)


def _fit(strategy: Any, accumulate: int, clip: float | None, replicas: int, devices: int,
         callbacks: list | None = None, ckpt_path: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    from examples.pipeline.model import PipelinedMLP

    return fit_recorded(PipelinedMLP, lambda cbs: _trainer(strategy, accumulate, clip, cbs, devices), _loader(replicas),
                        callbacks=callbacks or (), ckpt_path=ckpt_path)


def _reference(rank: int, world_size: int) -> dict[str, Any]:
    from lightning_parallelctx import ParallelCtxStrategy

    results = {}
    for name, accumulate, clip in (("plain", 1, None), ("acc2-clip", 2, CLIP)):
        model, trainer, rec = _fit(ParallelCtxStrategy(print_layout=False), accumulate, clip, 1, 1)
        rec["val"] = trainer.validate(model, _loader(1, 32), verbose=False)[0]["val_loss"]
        rec["predictions"] = torch.cat(trainer.predict(model, dataloaders=_loader(1, 32)))
        results[name] = rec
    return results


def _parallel(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    import torch.distributed as dist
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_parallelctx import ParallelCtxStrategy
    from lightning_parallelctx.lightning import consolidate_to_file, gather_full_state_dict

    res: dict[str, Any] = {}
    for name, (sizes, accumulate, clip) in LAYOUTS.items():
        replicas = world_size // sizes["pipeline_parallel_size"]
        callbacks = []
        if name == RESUMED:
            callbacks = [ModelCheckpoint(dirpath=f"{tmp}/ckpt", filename="{step}", every_n_train_steps=10, save_top_k=-1)]
        model, trainer, rec = _fit(ParallelCtxStrategy(**sizes, print_layout=False), accumulate, clip, replicas,
                                   world_size, callbacks)
        ctx = model.parallel_context
        rec["local_names"] = sorted(model.state_dict())
        rec["final"] = gather_full_state_dict(model, ctx)
        if name == RESUMED:
            rec["local_final"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            rec["val"] = trainer.validate(model, _loader(replicas, 32), verbose=False)[0]["val_loss"]
            rec["predictions"] = torch.cat(trainer.predict(model, dataloaders=_loader(replicas, 32)))
            # Resume from step 10 with a new Trainer and strategy: the last 10 steps must repeat exactly.
            m2, _, resumed = _fit(ParallelCtxStrategy(**sizes, print_layout=False), accumulate, clip, replicas,
                                  world_size, ckpt_path=f"{tmp}/ckpt/step=10.ckpt")
            rec["resumed_losses"] = resumed["losses"]
            rec["resumed_final_local"] = {k: v.detach().clone() for k, v in m2.state_dict().items()}
            if rank == 0:
                consolidate_to_file(f"{tmp}/ckpt/step=10.ckpt", f"{tmp}/full10.ckpt")
                rec["ckpt_files"] = sorted(p.name for p in Path(f"{tmp}/ckpt/step=10.ckpt").iterdir())
                rec["consolidated10"] = torch.load(f"{tmp}/full10.ckpt", weights_only=False)["state_dict"]
            dist.barrier()
            # The consolidated (single-file) checkpoint loads back into the pp2 stages.
            from examples.pipeline.model import PipelinedMLP

            m3 = PipelinedMLP()
            _trainer(ParallelCtxStrategy(**sizes, print_layout=False), devices=world_size).validate(
                m3, _loader(replicas, 32), ckpt_path=f"{tmp}/full10.ckpt", verbose=False)
            rec["reloaded10"] = gather_full_state_dict(m3, m3.parallel_context)
        res[name] = rec
    return res


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return spawn(_reference, 1, timeout=300)[0]


@pytest.fixture(scope="module")
def parallel(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("pipeline")
    return spawn(_parallel, 4, str(tmp), timeout=600)


# ------------------------------------------------------------------------------ multi-process tests
@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout: str, reference: dict, parallel: list[dict]) -> None:
    sizes, accumulate, clip = LAYOUTS[layout]
    ref = reference["acc2-clip" if accumulate == 2 else "plain"]
    runs = [r[layout] for r in parallel]
    n_micro = STEPS * accumulate
    assert len(ref["losses"]) == n_micro
    for r in runs:  # every rank (not only the last stage) logs the true loss
        assert len(r["losses"]) == n_micro
        assert max(abs(a - b) for a, b in zip(r["losses"], ref["losses"])) < TOL, (r["losses"][:4], ref["losses"][:4])
        assert len(r["norms"]) == len(ref["norms"]) == STEPS
        assert max(abs(a - b) / max(b, 1e-3) for a, b in zip(r["norms"], ref["norms"])) < TOL
        # Lightning's hooks still fire: zero_grad once per window, after_backward once per batch.
        assert r["zero_grads"] == ref["zero_grads"] == STEPS and r["after_backward"] == n_micro
        assert max_diff(r["final"], ref["final"]) < TOL
    if clip:
        assert max(ref["norms"]) > 2 * clip  # clipping was active
    assert ref["losses"][-1] < ref["losses"][0]
    # No rank holds another stage's layers; together the stages are the whole model, names unchanged.
    pp = sizes["pipeline_parallel_size"]
    held = [set(r["local_names"]) for r in runs[:pp]] if layout.startswith("pp4") else [set(runs[0]["local_names"]), set(runs[2]["local_names"])]
    assert all(not (a & b) for i, a in enumerate(held) for b in held[i + 1:])
    assert set().union(*held) == set(ref["final"])


@pytest.mark.slow
def test_resume_validate_predict_and_consolidate(reference: dict, parallel: list[dict]) -> None:
    ref = reference["acc2-clip"]
    runs = [r[RESUMED] for r in parallel]
    for r in runs:
        half = len(r["losses"]) // 2
        assert len(r["resumed_losses"]) == half
        assert max(abs(a - b) for a, b in zip(r["resumed_losses"], r["losses"][half:])) < 1e-6
        assert max_diff(r["resumed_final_local"], r["local_final"]) < 1e-6
        assert abs(r["val"] - ref["val"]) < TOL  # forward-only schedule, loss on every rank
    # predict: each data shard predicts its rows (unshuffled sampler: rows dp::2), on every pipeline rank
    # (order "tp-sp-ep-dp-pp": rank = dp + 2 pp).
    for rank, r in enumerate(runs):
        assert torch.allclose(r["predictions"], ref["predictions"][rank % 2::2], atol=TOL)
    # A torch DCP directory (every rank writes its own file, docs/checkpoints.md), complete; consolidated,
    # the step-10 checkpoint is the single-process model at step 10.
    files = runs[0]["ckpt_files"]
    assert {".metadata", "meta.pt", "COMPLETE"} <= set(files), files
    assert sum(f.endswith(".distcp") for f in files) == len(runs), files
    assert max_diff(runs[0]["consolidated10"], ref["state10"]) < TOL
    assert all(max_diff(r["reloaded10"], ref["state10"]) < TOL for r in runs)


# ------------------------------------------------------------------------------ no processes
def test_placement_math() -> None:
    assert layer_ranges(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert layer_ranges(5, 2) == [(0, 3), (3, 5)]
    assert stages_of_rank(1, 2, 4, "loop") == [1, 3]
    assert stages_of_rank(0, 2, 4, "v") == [0, 3] and stages_of_rank(1, 2, 4, "v") == [1, 2]
    assert stage_rank(3, 2, 4, "v") == 0
    with pytest.raises(ParallelConfigError, match="declares only 3 layers"):
        layer_ranges(3, 4)


def test_every_torch_schedule_is_registered() -> None:
    names = {"gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble", "zbv_zero_bubble",
             "dualpipev", "none"}
    assert names <= set(available_schedules())
    from torch.distributed.pipelining import ScheduleGPipe

    assert get_schedule(ScheduleGPipe).name == "gpipe"
    assert get_schedule("lightning_parallelctx.pipeline.schedule.GPipeSchedule").name == "gpipe"
    assert isinstance(get_schedule({"class_path": "lightning_parallelctx.pipeline.schedule.OneFOneBSchedule"}), Schedule)


def test_register_schedule_refuses_what_is_not_a_schedule() -> None:
    from lightning_parallelctx.pipeline import register_schedule

    class NoName:  # no ``name`` attribute, not a Schedule: a clear TypeError (was AttributeError)
        pass

    for call in (lambda: register_schedule("", NoName), lambda: register_schedule(None, NoName),
                 lambda: register_schedule(NoName), lambda: register_schedule("x")(NoName),
                 lambda: register_schedule("", NoName())):
        with pytest.raises(TypeError, match="is not a Schedule subclass; subclass lightning_parallelctx.pipeline.Schedule"):
            call()

    class Unnamed(Schedule):  # a Schedule without a name registers under its lower-cased class name
        def forward_backward_step(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

    assert register_schedule("", Unnamed) is Unnamed and "unnamed" in available_schedules()
    assert type(get_schedule("unnamed")) is Unnamed
    with pytest.raises(TypeError, match="name must be a non-empty string, got 3"):
        register_schedule(3, Unnamed)


@pytest.mark.parametrize("args, match", [
    ((2, "1f1b", 1, None), "num_microbatches=1 is below"),
    ((2, "dualpipev", 3, None), "num_microbatches=3 is below"),
    ((2, "zbv_zero_bubble", None, 3), "exactly 2 stages"),
    ((2, "gpipe", None, 2), "one stage per rank"),
    ((2, "interleaved_1f1b", 5, 2), "multiple of 2 rounds"),
    ((2, "nope", None, None), "not a registered schedule"),
    ((2, "none", None, None), "whole model on one rank"),
    ((1, "1f1b", 4, None), "need pipeline stages"),
    ((2, "1f1b", 0, None), "num_microbatches=0"),
])
def test_bad_pipeline_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ParallelConfigError, match=match):
        resolve_pipeline_config(*args)


def test_strategy_checks_pipeline_arguments_at_construction() -> None:
    from lightning_parallelctx import ParallelCtxStrategy

    with pytest.raises(ParallelConfigError, match="DDP wrapper"):
        ParallelCtxStrategy(pipeline_parallel_size=2, gradient_handler="ddp")
    with pytest.raises(ParallelConfigError, match="num_microbatches=1 is below"):
        ParallelCtxStrategy(pipeline_parallel_size=4, num_microbatches=1)
    ParallelCtxStrategy(pipeline_parallel_size=2, pipeline_schedule="interleaved_zero_bubble")


def test_batch_not_divisible_by_microbatches() -> None:
    from torch import nn

    pipe = PipelineSequential([nn.Linear(2, 2), nn.Linear(2, 2)], StagePlan(num_microbatches=4))
    with pytest.raises(ValueError, match="batch size 6 is not divisible by num_microbatches=4"):
        pipe.check_batch((torch.zeros(6, 2),), torch.zeros(6, 2))
    with pytest.raises(ValueError, match="share their first"):
        pipe.check_batch((torch.zeros(8, 2),), torch.zeros(4, 2))


def test_meta_layers_need_init() -> None:
    from torch import nn

    with torch.device("meta"):
        layers = [nn.Linear(2, 2)]
    with pytest.raises(ValueError, match="no init="):
        PipelineSequential(layers)


def test_planner_timeline_and_bubble(tmp_path: Path) -> None:
    from lightning_parallelctx.pipeline.timeline import timeline_for, to_svg
    from lightning_parallelctx.plan import main as plan_main

    # Unit-time slots: GPipe and 1F1B leave (p-1)/(m+p-1) idle, interleaving v stages (p-1)/(v m+p-1).
    for name in ("gpipe", "1f1b"):
        assert abs(timeline_for(name, 4, 8).bubble_fraction - 3 / 11) < 1e-9
    assert abs(timeline_for("interleaved_1f1b", 4, 8).bubble_fraction - 3 / 19) < 1e-9
    for name in ("looped_bfs", "interleaved_zero_bubble", "zbv_zero_bubble", "dualpipev"):
        tl = timeline_for(name, 4, 8)
        slots = [s for row in tl.rows for s in row if s is not None]
        # Every micro-batch passes every stage forward and backward exactly once.
        assert sorted((s.stage, s.microbatch) for s in slots if s.kind == "F") == [(st, mb) for st in range(8) for mb in range(8)]
        assert sum(s.kind in ("B", "I") for s in slots) == 64
    tl = timeline_for("zbv_zero_bubble", 2, 4)
    assert tl.bubble_fraction < timeline_for("1f1b", 2, 4).bubble_fraction
    assert to_svg(tl).startswith("<svg") and "bubble" in to_svg(tl)
    out = tmp_path / "t.svg"
    assert plan_main(["-n", "8", "--pp", "4", "--schedule", "1f1b", "--microbatches", "8", "--svg", str(out)]) == 0
    assert out.read_text().count("<rect") > 4 * 22


def test_loss_scaler_is_refused_with_stages() -> None:
    """16-mixed on GPU scales the loss in Lightning's backward, which the schedule replaces: refused
    (on CPU Lightning's 16-mixed has no scaler, and nothing needs refusing)."""
    from types import SimpleNamespace

    from examples.pipeline.model import PipelinedMLP
    from lightning_parallelctx.lightning._pipeline import PipelineRuntime

    model = PipelinedMLP()
    model.configure_model()
    runtime = PipelineRuntime(resolve_pipeline_config(2, "1f1b", None, None))
    with pytest.raises(ParallelConfigError, match="gradient scaler"):
        runtime.check_module(model, True, SimpleNamespace(scaler=object()))
    runtime.check_module(model, True, SimpleNamespace(scaler=None))
