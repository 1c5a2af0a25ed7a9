"""Same numbers as ``strategy="ddp"``: every flow a DDP user relies on, compared on EVERY rank.

Each flow trains the same model on the same data from the same seed twice in one spawned world,
once with ParallelCtxStrategy and once with Lightning's DDPStrategy, and records on every rank the
final (full) weights, buffers, logged values and the gradients user code saw. The parent compares
rank by rank, within 1e-6. Pure data parallel runs on 2 processes; tensor parallel (tp2 x dp2)
against DDP on 4 processes, where the same global batch of 8 is split 2 ways (ours) or 4 ways (DDP).

``sync_batchnorm`` has no CPU peer (torch's SyncBatchNorm refuses CPU tensors), so it is compared
against a single-process run on the whole batch, computed here in plain torch.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_parallelctx.grad_sync import BucketedGradientHandler
from lightning_parallelctx.testing import spawn

pytestmark = pytest.mark.timeout(600)
TOL = 1e-6
GLOBAL_BATCH = 8
STEPS = 4
N_SAMPLES = GLOBAL_BATCH * STEPS


def _dataset() -> Any:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N_SAMPLES, 8, generator=g)
    y = (x[:, :1] * 0.7 - x[:, 1:2] + 0.1 * torch.randn(N_SAMPLES, 1, generator=g))
    return torch.utils.data.TensorDataset(x, y)


# ------------------------------------------------------------------------------ the model (children)

def _dense_net(batchnorm: bool) -> torch.nn.Module:
    from torch import nn

    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.LayerNorm(8)]
    if batchnorm:
        layers.insert(1, nn.BatchNorm1d(16))
    layers.append(nn.Linear(8, 1))
    return nn.Sequential(*layers)


def _tp_net(ctx: Any) -> torch.nn.Module:
    """The same network with its first two layers split over TENSOR (column, then row parallel)."""
    from torch import nn

    from lightning_parallelctx.lightning import shard_state_dict
    from lightning_parallelctx.nn import ColumnParallelLinear, RowParallelLinear

    net = nn.Sequential(ColumnParallelLinear(8, 16, context=ctx), nn.GELU(), RowParallelLinear(16, 8, context=ctx),
                        nn.LayerNorm(8), nn.Linear(8, 1))
    net.load_state_dict(shard_state_dict(_dense_net(False).state_dict(), net, ctx))
    return net


def _module_class() -> type:
    import lightning.pytorch as pl
    import torchmetrics

    class Net(pl.LightningModule):
        """``flow`` picks what the step does; everything user code sees is recorded in ``self.seen``."""

        def __init__(self, flow: str, tp: bool = False, batchnorm: bool = False, perturb: bool = False):
            super().__init__()
            self.flow, self.tp, self.batchnorm, self.perturb = flow, tp, batchnorm, perturb
            self.automatic_optimization = flow.startswith("auto")
            self.seen: dict[str, list[float]] = {}
            self.seeds: list[float] = []  # the gradient reaching the loss (not compared with DDP's)
            self.metric = torchmetrics.SumMetric()
            self.net: Any = None

        def configure_model(self) -> None:
            if self.net is not None:
                return
            self.net = _tp_net(self.parallel_context) if self.tp else _dense_net(self.batchnorm)
            if self.perturb:
                # Replicated parameters start different on every rank: only the start-of-fit sync
                # (over TENSOR and over the replicas, as DDP's broadcast) makes them equal again.
                import torch.distributed as dist

                g = torch.Generator().manual_seed(100 + dist.get_rank())
                with torch.no_grad():
                    for name, p in self.net.named_parameters():
                        if name.startswith(("3.", "4.")):  # LayerNorm and the head: never sharded
                            p.add_(0.1 * torch.randn(p.shape, generator=g))

        def _note(self, key: str, value: Any) -> None:
            self.seen.setdefault(key, []).append(float(value))

        def _grad_sums(self, key: str) -> None:
            # A checksum of the full gradient as user code sees it; under tp a shard's part is summed
            # over TENSOR and a replicated parameter counted once.
            from lightning_parallelctx.markers import is_tensor_parallel

            tp = 2 if self.tp else 1
            total = torch.zeros((), dtype=torch.float64)
            for i, p in enumerate(self.net.parameters()):
                if p.grad is not None:
                    share = 1.0 if is_tensor_parallel(p) else 1.0 / tp
                    total += p.grad.double().abs().sum() * (1 + i) * share
            if self.tp:
                import torch.distributed as dist

                dist.all_reduce(total, group=self.parallel_context.get_group("tensor"))
            self._note(key, total)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            loss.register_hook(lambda g: self.seeds.append(float(g)))
            self.log("loss_mean", loss, sync_dist=True)
            self.log("n_sum", float(len(x)), reduce_fx="sum", sync_dist=True)
            self.log("y_max", y.max(), reduce_fx="max", sync_dist=True)
            self.log("y_min", y.min(), reduce_fx="min", sync_dist=True)
            self.metric.update(y.sum())
            gathered = self.all_gather(y.sum())
            self._note("gathered_total", gathered.sum())
            # Samples covered: 8 whether the batch is split over 2 data shards (tp2 x dp2) or 4 DDP ranks.
            self._note("gathered_samples", gathered.numel() * len(x))
            if self.automatic_optimization:
                return loss
            return self._manual_step(loss, batch_idx)

        def _manual_step(self, loss: torch.Tensor, batch_idx: int) -> None:
            opts = self.optimizers()
            opt_a, opt_b = opts if isinstance(opts, list) else (opts, None)
            if self.flow == "manual-acc" or self.flow == "manual-acc-toggle":
                # Lightning's documented accumulation: step every 2nd batch.
                last = batch_idx % 2 == 1
                if self.flow == "manual-acc-toggle":
                    with opt_a.toggle_model(sync_grad=last):
                        self.manual_backward(loss / 2)
                else:
                    self.manual_backward(loss / 2)
                if last:
                    self._grad_sums("grads_at_step")
                    self.clip_gradients(opt_a, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
                    opt_a.step()
                    opt_a.zero_grad()
                return
            # Two optimizers, clip by norm and by value right after manual_backward.
            opt_a.zero_grad()
            opt_b.zero_grad()
            self.manual_backward(loss)
            self._grad_sums("grads_after_manual_backward")
            self.clip_gradients(opt_a, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
            self.clip_gradients(opt_b, gradient_clip_val=0.002, gradient_clip_algorithm="value")
            opt_a.step()
            opt_b.step()

        def on_after_backward(self) -> None:
            if self.automatic_optimization:
                self._grad_sums("grads_on_after_backward")
                # Editing gradients here is only safe when they are final on every replica.
                torch.nn.utils.clip_grad_value_(self.net.parameters(), 0.01)

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            # The whole model's gradient norm: the library's grad_norm under our strategy (Lightning's
            # utility would report this rank's shards only), Lightning's utility under DDP.
            if hasattr(self, "parallel_context"):
                from lightning_parallelctx.lightning import grad_norm

                self._note("grad_norm", grad_norm(self.parameters(), self.parallel_context))
            else:
                from lightning.pytorch.utilities import grad_norm

                self._note("grad_norm", grad_norm(self, norm_type=2)["grad_2.0_norm_total"])

        def on_train_epoch_end(self) -> None:
            self.log("metric_sum", self.metric.compute())
            self.metric.reset()

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)

        def configure_optimizers(self) -> Any:
            params = list(self.net.parameters())
            if self.flow == "manual":
                return [torch.optim.SGD(params[:2], lr=0.1), torch.optim.Adam(params[2:], lr=0.01)]
            return torch.optim.SGD(params, lr=0.1, momentum=0.9)

    return Net


def _fit(strategy: Any, flow: str, devices: int, tp: bool = False, batchnorm: bool = False, perturb: bool = False,
         sync_batchnorm: bool = False, val: bool = False) -> dict[str, Any]:
    import lightning.pytorch as pl

    from lightning_parallelctx.lightning import gather_full_state_dict

    pl.seed_everything(1234, verbose=False)
    sharded = tp and not isinstance(strategy, pl.strategies.DDPStrategy)  # DDP trains the dense twin
    model = _module_class()(flow, tp=sharded, batchnorm=batchnorm, perturb=perturb)
    data_shards = devices // 2 if sharded else devices
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=GLOBAL_BATCH // data_shards)
    auto = flow.startswith("auto")
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=0.05 if auto else None, sync_batchnorm=sync_batchnorm,
                         limit_val_batches=2 if val else 0, num_sanity_val_steps=0, val_check_interval=2 if val else None)
    trainer.fit(model, loader, loader if val else None)
    if sharded:
        state = gather_full_state_dict(model.net, model.parallel_context)
    else:
        state = {k: v.detach().clone() for k, v in model.net.state_dict().items()}
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    layers = sorted({type(m).__name__ for m in model.net.modules()})
    return {"state": state, "logged": logged, "seen": model.seen, "layers_after_fit": layers, "seeds": model.seeds}


def _strategies(tp: bool) -> list[tuple[str, Any]]:
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_parallelctx import ParallelCtxStrategy

    ours = ParallelCtxStrategy(tensor_parallel_size=2 if tp else 1, print_layout=False)
    return [("ours", ours), ("ddp", DDPStrategy())]


class NoManualHandler(BucketedGradientHandler):
    """A handler that declares it cannot synchronise manual optimization."""

    supports_manual_optimization = False


def _attempt(fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    # A flow that raises the same error on every rank fails its own test, not the others'.
    import traceback

    try:
        return fn(*args, **kwargs)
    except Exception:  # noqa: BLE001
        return {"error": traceback.format_exc()}


def _run_dp(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for flow, kw in (("manual", {}), ("manual-acc", {}), ("manual-acc-toggle", {}),
                     ("auto", {"batchnorm": True, "val": True, "perturb": True})):
        for name, strategy in _strategies(tp=False):
            out[f"{flow}/{name}"] = _attempt(_fit, strategy, flow, world, **kw)
    from lightning_parallelctx import ParallelCtxStrategy

    out["syncbn"] = _attempt(_fit, ParallelCtxStrategy(print_layout=False), "auto", world, batchnorm=True,
                             sync_batchnorm=True)
    # torch's DDP as the gradient handler: manual optimization (its reducer is prepared before each
    # manual_backward) and its own buffer broadcast.
    out["manual/ours-ddp-handler"] = _attempt(_fit, ParallelCtxStrategy(gradient_handler="ddp", print_layout=False),
                                              "manual", world)
    out["auto/ours-ddp-handler"] = _attempt(_fit, ParallelCtxStrategy(gradient_handler="ddp", print_layout=False),
                                            "auto", world, batchnorm=True, val=True, perturb=True)
    out["refused"] = _attempt(_fit, ParallelCtxStrategy(gradient_handler=NoManualHandler(), print_layout=False),
                              "manual", world)
    # Every parameter all-reduced in its own .grad (in_place_mb, no bucket): clipping, accumulation.
    for flow, kw in (("manual-acc", {}), ("auto", {"batchnorm": True, "val": True, "perturb": True})):
        out[f"{flow}/ours-in-place"] = _attempt(_fit, _in_place_strategy(), flow, world, **kw)
    return out


def _in_place_strategy(tp: bool = False) -> Any:
    from lightning_parallelctx import ParallelCtxStrategy

    return ParallelCtxStrategy(tensor_parallel_size=2 if tp else 1, print_layout=False,
                               gradient_handler=BucketedGradientHandler(in_place_mb=1e-9))


def _run_tp(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for flow in ("manual", "manual-acc", "manual-acc-toggle", "auto"):
        for name, strategy in _strategies(tp=True):
            out[f"{flow}/{name}"] = _attempt(_fit, strategy, flow, world, tp=True, perturb=flow == "auto")
            if name == "ours":
                # Early stopping / checkpoint votes go over every rank, not the default data group.
                out["votes"] = (strategy.reduce_boolean_decision(rank == 0, all=True),
                                strategy.reduce_boolean_decision(rank == 3, all=False),
                                strategy.reduce_boolean_decision(True, all=True))
                # The default group is the 2 data shards; a mode name picks another (docs/lightning.md).
                out["groups"] = (float(strategy.reduce(torch.tensor(1.0), reduce_op="sum")),  # (reduces in place)
                                 float(strategy.reduce(torch.tensor(1.0), group="global", reduce_op="sum")),
                                 float(strategy.reduce(torch.tensor(1.0), group="tensor", reduce_op="sum")),
                                 tuple(strategy.all_gather(torch.tensor([rank])).flatten().tolist()))
    out["auto/ours-in-place"] = _attempt(_fit, _in_place_strategy(tp=True), "auto", world, tp=True, perturb=True)
    return out


@pytest.fixture(scope="module")
def dp_results() -> list[dict[str, Any]]:
    return spawn(_run_dp, 2, timeout=500)


@pytest.fixture(scope="module")
def tp_results() -> list[dict[str, Any]]:
    return spawn(_run_tp, 4, timeout=500)


def _compare(results: list[dict[str, Any]], flow: str, ours_name: str = "ours") -> None:
    for rank, res in enumerate(results):
        ours, ddp = res[f"{flow}/{ours_name}"], res[f"{flow}/ddp"]
        assert "error" not in ours and "error" not in ddp, ours.get("error") or ddp.get("error")
        assert ours["state"].keys() == ddp["state"].keys()
        for key in ddp["state"]:
            a, b = ours["state"][key].double(), ddp["state"][key].double()
            assert torch.allclose(a, b, atol=TOL, rtol=0), (
                f"{flow} rank {rank} {key}: max diff {(a - b).abs().max():.3g}")
        assert ours["logged"].keys() == ddp["logged"].keys(), (flow, rank)
        for key, value in ddp["logged"].items():
            assert abs(ours["logged"][key] - value) <= TOL * max(1.0, abs(value)), (flow, rank, key, ours["logged"][key], value)
        assert ours["seen"].keys() == ddp["seen"].keys(), (flow, rank)
        for key, values in ddp["seen"].items():
            assert len(ours["seen"][key]) == len(values), (flow, rank, key)
            for i, (x, y) in enumerate(zip(ours["seen"][key], values)):
                assert abs(x - y) <= TOL * max(1.0, abs(y)), (flow, rank, key, i, x, y)


@pytest.mark.parametrize("flow", ["manual", "manual-acc", "manual-acc-toggle", "auto"])
def test_data_parallel_same_as_ddp_on_every_rank(dp_results: list[dict[str, Any]], flow: str) -> None:
    _compare(dp_results, flow)


@pytest.mark.parametrize("flow", ["manual", "manual-acc", "manual-acc-toggle", "auto"])
def test_tp2_dp2_same_as_ddp_on_every_rank(tp_results: list[dict[str, Any]], flow: str) -> None:
    _compare(tp_results, flow)


def _single_process_reference() -> dict[str, torch.Tensor]:
    """The "auto" flow with BatchNorm on one process and the whole batch of 8, in plain torch."""
    net = _dense_net(True)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x_all, y_all = _dataset().tensors
    # Lightning's training DistributedSampler shuffles with the seed of seed_everything (epoch 0):
    # step s of the data-parallel run reads perm[8s:8s+8], split over the ranks.
    perm = torch.randperm(N_SAMPLES, generator=torch.Generator().manual_seed(1234))
    for step in range(STEPS):
        idx = perm[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
        x, y = x_all[idx], y_all[idx]
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        torch.nn.utils.clip_grad_value_(net.parameters(), 0.01)  # on_after_backward
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)  # gradient_clip_val
        opt.step()
    return net.state_dict()


def test_sync_batchnorm_matches_one_process_on_the_whole_batch(dp_results: list[dict[str, Any]]) -> None:
    # torch's SyncBatchNorm refuses CPU, so DDP has no peer here: the statistics of the global batch
    # (and the weights they lead to) are those of one process reading all 8 samples per step.
    reference = _single_process_reference()
    for rank, res in enumerate(dp_results):
        run = res["syncbn"]
        assert "error" not in run, run.get("error")
        assert run["state"].keys() == reference.keys()
        for key, expected in reference.items():
            got = run["state"][key].double()
            assert torch.allclose(got, expected.double(), atol=1e-5, rtol=0), (
                f"rank {rank} {key}: max diff {(got - expected.double()).abs().max():.3g}")
        assert run["state"]["1.num_batches_tracked"].item() == STEPS
        # Converted for fit only, as DDPStrategy does: a plain BatchNorm afterwards.
        assert "GroupSyncBatchNorm" not in run["layers_after_fit"] and "_BatchNormXd" in run["layers_after_fit"]


@pytest.mark.parametrize("flow", ["manual", "auto"])
def test_ddp_gradient_handler_same_as_ddp_on_every_rank(dp_results: list[dict[str, Any]], flow: str) -> None:
    _compare(dp_results, flow, ours_name="ours-ddp-handler")


@pytest.mark.parametrize("flow", ["manual-acc", "auto"])
def test_in_place_reduction_same_as_ddp_on_every_rank(dp_results: list[dict[str, Any]], flow: str) -> None:
    _compare(dp_results, flow, ours_name="ours-in-place")


@pytest.mark.parametrize("flow", ["manual", "auto"])
def test_the_average_rides_in_the_backward_seed(dp_results: list[dict[str, Any]], tp_results: list[dict[str, Any]],
                                                flow: str) -> None:
    # The fits above equal DDP's with the 1/replicas average folded into the seed of each backward
    # (2 replicas: 0.5), not applied by a pass over the gradients; DDP's seed stays 1.
    for results in (dp_results, tp_results):
        for res in results:
            ours, ddp = res[f"{flow}/ours"]["seeds"], res[f"{flow}/ddp"]["seeds"]
            assert ours and set(ours) == {0.5}, ours
            assert ddp and set(ddp) == {1.0}, ddp


def test_in_place_reduction_tp2_dp2_same_as_ddp_on_every_rank(tp_results: list[dict[str, Any]]) -> None:
    _compare(tp_results, "auto", ours_name="ours-in-place")


def test_handler_without_manual_support_is_refused_on_every_rank(dp_results: list[dict[str, Any]]) -> None:
    for res in dp_results:
        error = res["refused"].get("error", "")
        assert "ParallelConfigError" in error and "does not support manual optimization" in error, error
        assert "gradient handler NoManualHandler" in error and "use gradient_handler='bucketed'" in error


def test_boolean_decisions_vote_over_every_rank(tp_results: list[dict[str, Any]]) -> None:
    assert [r["votes"] for r in tp_results] == [(False, True, True)] * 4


def test_default_reduction_group_and_mode_names(tp_results: list[dict[str, Any]]) -> None:
    # tp2 x dp2, rank = 2 * dp + tp: the data group of rank r is {r % 2, r % 2 + 2}.
    assert [r["groups"] for r in tp_results] == [(2.0, 4.0, 2.0, (r % 2, r % 2 + 2)) for r in range(4)]
