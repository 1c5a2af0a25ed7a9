"""Random numbers under pipeline parallelism: torch's shape inference draws none.

torch's PipelineStage infers shapes at a schedule's first step by running each stage once more on
real tensors; with dropout that extra forward used to consume the default generator, so the first
step's masks (and every later draw) depended on whether, and how often, stages had been built
(one build per input shape). Here 2 processes run a pipelined MLP with dropout (one dropout inside a
named stream of lightning_parallelctx.random) with a single-stage and a V (two stages per rank)
schedule: from the same generator states, the step that builds the stages (inference) and a step
with the stages already built give bit-identical losses, gradients and generator states after the
step, on every rank. With ``layer_rng_seed`` (one random stream per layer), the pp2 runs draw the
masks of one process: losses and gradients equal a single-process run of the whole model over two
steps, and through Trainer.fit (pp2, accumulation 2, 8 steps) every loss and final weight equals
a one-process fit within 1e-5. What holds with dropout across layouts is in docs/pipeline.md.

Through Trainer.fit (pp2, dropout, accumulation 2): a run resumed from its step-4 checkpoint (new
stages, so a new shape inference) repeats the uninterrupted run's losses and weights exactly, and
Lightning's ``on_before_backward`` gets each micro-batch's loss on the last stage, with its graph,
before its backward; the losses of one batch sum to Lightning's closure loss (loss / accumulation).
"""

from __future__ import annotations

from typing import Any

import sys
from pathlib import Path

import pytest
import torch

from lightning_parallelctx.testing import spawn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.timeout(300)
SCHEDULES = ("1f1b", "zbv_zero_bubble")


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    from lightning_parallelctx import random as prandom
    from lightning_parallelctx.pipeline import PipelineSequential, StagePlan, backward_scope, get_schedule
    from lightning_parallelctx.pipeline.placement import stages_of_rank

    class StreamDropout(nn.Module):
        """Dropout drawn from the library's "tensor" stream: its state must be restored too."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with prandom.model_parallel_rng("tensor"):
                return F.dropout(x, 0.3, training=True)

    dist.init_process_group("gloo")

    def seed() -> None:
        torch.manual_seed(7)
        prandom.get_rng_tracker().add("tensor", 99)

    def make_layers() -> list[nn.Module]:
        torch.manual_seed(0)  # the same full model on both ranks; each keeps its stages
        return [nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5)), nn.Sequential(nn.Linear(16, 16), StreamDropout()),
                nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5)), nn.Linear(16, 4)]

    def plan_for(name: str) -> StagePlan:
        schedule = get_schedule(name)
        stages = 2 * (2 if name == "zbv_zero_bubble" else 1)
        return StagePlan(pp=2, num_stages=stages, placement=schedule.placement,
                         stages=stages_of_rank(rank, 2, stages, schedule.placement), pp_rank=rank,
                         group=dist.group.WORLD, group_ranks=[0, 1], num_microbatches=4, schedule=schedule)

    out: dict[str, Any] = {}
    for name in SCHEDULES:
        pipe = PipelineSequential(make_layers(), plan_for(name))
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)
        runs = []
        for _ in range(2):  # the first step builds the stages (shape inference), the second reuses them
            pipe.zero_grad(set_to_none=True)
            seed()
            before = prandom.get_rng_state()
            with backward_scope(1.0):
                loss = pipe.loss(x, y, F.mse_loss)
            after = prandom.get_rng_state()
            runs.append({"loss": loss.item(), "grads": {k: p.grad.clone() for k, p in pipe.named_parameters()},
                         "after": after, "drew": not torch.equal(before["default"]["cpu"], after["default"]["cpu"])})
        out[name] = runs

    # Opt-in: one random stream per layer (layer_rng_seed): the pp2 run draws the masks of one process.
    def two_steps(pipe: Any, pipelined: bool) -> list[dict[str, Any]]:
        prandom.get_rng_tracker().reset()  # every run starts its layer streams afresh
        steps = []
        for _ in range(2):  # the same batch twice: the streams move on, the masks change
            pipe.zero_grad(set_to_none=True)
            seed()
            if pipelined:
                with backward_scope(1.0):
                    loss = pipe.loss(x, y, F.mse_loss)
            else:
                loss = pipe.loss(x, y, F.mse_loss)
                loss.backward()
            steps.append({"loss": loss.item(), "grads": {k: p.grad.clone() for k, p in pipe.named_parameters()}})
        return steps

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)
    reference = two_steps(PipelineSequential(make_layers(), layer_rng_seed=5), False)
    for name in SCHEDULES:
        out[f"layer_streams/{name}"] = (
            two_steps(PipelineSequential(make_layers(), plan_for(name), layer_rng_seed=5), True), reference)
    dist.destroy_process_group()
    return out


def _fit_dropout(rank: int, world_size: int, tmp: str, only_streams: bool = False) -> dict[str, Any]:
    """pp = world_size: with dropout, fit + resume, and a fit with one random stream per layer
    (``only_streams``: just that one, the single-process reference)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch import nn

    from examples.pipeline.model import PipelinedMLP, init_layer, loader
    from lightning_parallelctx import ParallelCtxStrategy
    from lightning_parallelctx.pipeline import PipelineSequential, stage_plan

    class DropoutMLP(PipelinedMLP):
        def make_layers(self) -> list[nn.Module]:
            return [nn.Sequential(layer, nn.Dropout(0.2)) if i < len(layers) - 1 else layer
                    for layers in [super().make_layers()] for i, layer in enumerate(layers)]

    class StreamMLP(DropoutMLP):
        def configure_model(self) -> None:
            if not hasattr(self, "pipe"):
                with torch.device("meta"):
                    layers = self.make_layers()
                self.pipe = PipelineSequential(layers, stage_plan(self), init=init_layer, layer_rng_seed=7)

    def fit(ckpt_path: str | None = None, streams: bool = False) -> dict[str, Any]:
        rec: dict[str, Any] = {"losses": [], "hook": []}

        class Rec(pl.Callback):
            def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
                rec["hook"].append([])
                rec.setdefault("first_state", torch.get_rng_state())

            def on_before_backward(self, trainer: Any, module: Any, loss: torch.Tensor) -> None:
                # Before this micro-batch's backward: its graph is there, nothing has consumed it.
                rec["hook"][-1].append((float(loss), loss.requires_grad and loss.grad_fn is not None))

            def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
                rec["losses"].append(float(trainer.callback_metrics["train_loss"]))

        pl.seed_everything(1234)
        model = StreamMLP() if streams else DropoutMLP()
        callbacks: list[Any] = [Rec()]
        checkpointing = ckpt_path is None and not streams
        if checkpointing:
            callbacks.append(ModelCheckpoint(dirpath=f"{tmp}/ckpt", filename="{step}", every_n_train_steps=4,
                                             save_top_k=-1))
        trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy=ParallelCtxStrategy(
            pipeline_parallel_size=world_size, print_layout=False), max_steps=8, accumulate_grad_batches=2,
            logger=False, enable_checkpointing=checkpointing, enable_progress_bar=False, enable_model_summary=False,
            callbacks=callbacks, num_sanity_val_steps=0)
        # 32 samples: 4 batches of 8 per epoch, 2 optimizer steps; the step-4 checkpoint ends epoch 2.
        trainer.fit(model, loader(8, 32), ckpt_path=ckpt_path)
        rec["final"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return rec

    if only_streams:
        return {"streams": fit(streams=True)}
    full = fit()
    return {"full": full, "resumed": fit(f"{tmp}/ckpt/step=4.ckpt"), "streams": fit(streams=True)}


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    return spawn(_worker, 2, timeout=240)


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn(_fit_dropout, 2, str(tmp_path_factory.mktemp("rng")), timeout=280)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return spawn(_fit_dropout, 1, str(tmp_path_factory.mktemp("rng1")), True, timeout=200)[0]


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (torch.equal(a["default"]["cpu"], b["default"]["cpu"])
            and a["streams"].keys() == b["streams"].keys()
            and all(torch.equal(a["streams"][k]["cpu"], b["streams"][k]["cpu"]) for k in a["streams"]))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_shape_inference_draws_no_random_numbers(runs: list[dict[str, Any]], schedule: str) -> None:
    for rank, result in enumerate(runs):
        built, reused = result[schedule]
        assert built["drew"] and reused["drew"], f"rank {rank}: the dropout layers drew nothing"
        assert built["loss"] == reused["loss"], (rank, built["loss"], reused["loss"])
        assert built["grads"].keys() == reused["grads"].keys()
        assert all(torch.equal(built["grads"][k], reused["grads"][k]) for k in built["grads"]), rank
        # The generators after the step are those of a step without inference, named streams included.
        assert _same_state(built["after"], reused["after"]), rank


def test_resume_with_dropout_is_exact(fits: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(fits):
        full, resumed = r["full"], r["resumed"]
        assert len(full["losses"]) == 16 and len(resumed["losses"]) == 8
        # The resumed run restores each rank's generators and builds new stages (shape inference again).
        assert resumed["losses"] == full["losses"][8:], (rank, resumed["losses"], full["losses"][8:])
        assert all(torch.equal(resumed["final"][k], full["final"][k]) for k in full["final"]), rank
        assert full["losses"][-1] < full["losses"][0]


def test_on_before_backward_gets_each_micro_batch_loss_on_the_last_stage(fits: list[dict[str, Any]]) -> None:
    first, last = fits[0]["full"], fits[1]["full"]  # pp rank 1 holds the last stage
    assert all(calls == [] for calls in first["hook"]), "the first stage holds no loss"
    assert len(last["hook"]) == len(last["losses"]) == 16
    for calls, loss in zip(last["hook"], last["losses"]):
        assert len(calls) == 2 and all(with_graph for _, with_graph in calls)  # 2 micro-batches
        # scaled by 1 / (micro-batches x accumulation): the sum is Lightning's closure loss, loss / 2
        assert abs(sum(v for v, _ in calls) * 2 - loss) < 1e-6, (calls, loss)


def test_stages_draw_different_numbers(fits: list[dict[str, Any]]) -> None:
    # Seeded alike, the two stages would drop the same units in their equal-shaped dropout layers.
    first, last = fits[0]["full"]["first_state"], fits[1]["full"]["first_state"]
    assert not torch.equal(first, last)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_layer_streams_give_pp2_the_masks_of_one_process(runs: list[dict[str, Any]], schedule: str) -> None:
    for rank, result in enumerate(runs):
        pp2, one = result[f"layer_streams/{schedule}"]
        assert one[0]["loss"] != one[1]["loss"]  # dropout is on: the second step draws other masks
        for a, b in zip(pp2, one):
            assert abs(a["loss"] - b["loss"]) < 1e-6, (rank, a["loss"], b["loss"])
            assert a["grads"].keys() and a["grads"].keys() <= b["grads"].keys()  # this rank's layers only
            assert max(float((a["grads"][k] - b["grads"][k]).abs().max()) for k in a["grads"]) < 1e-5, rank


def test_fit_with_layer_streams_equals_one_process(fits: list[dict[str, Any]], one_process: dict[str, Any]) -> None:
    """Trainer.fit, pp2 1F1B, dropout 0.2 in 7 of 8 layers, accumulation 2, 8 steps: with
    layer_rng_seed every loss (on every rank) and every final weight equal one process's."""
    ref = one_process["streams"]
    assert len(ref["losses"]) == 16 and ref["losses"][-1] < ref["losses"][0]
    for rank, r in enumerate(fits):
        run = r["streams"]
        assert max(abs(a - b) for a, b in zip(run["losses"], ref["losses"])) < 1e-5, (rank, run["losses"][:3], ref["losses"][:3])
        assert len(run["losses"]) == 16 and run["final"].keys() and run["final"].keys() < ref["final"].keys()
        assert max(float((run["final"][k] - ref["final"][k]).abs().max()) for k in run["final"]) < 1e-5, rank
    # The masks matter: the same pp2 fit on the default generator (other masks) ends up elsewhere.
    assert max(abs(a - b) for a, b in zip(fits[0]["full"]["losses"], ref["losses"])) > 1e-3
