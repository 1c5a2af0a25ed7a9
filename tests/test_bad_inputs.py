"""Bad inputs: each one a specific error that names the value, the rule and the fix.

One table, run twice: in this process (a world of 1) and on every rank of a spawned world of 2
processes with a tp=2 context, where each rank must raise the same error by itself (no
collective is involved, so no rank waits for another). Cases that only exist with tp=2 (a shard
that does not divide) run in the spawned world only. Areas: the Python API (layout, context,
modes, collectives), strategy arguments, the YAML mapping of ``ParallelContext.from_config``, the
planner, launcher variables, the rendezvous, checkpoint paths, shapes.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lightning_parallelctx.testing import spawn

pytestmark = pytest.mark.timeout(240)

TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
OMPI = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}


# ------------------------------------------------------------------------------ the cases
# Each: (id, call, exception type, pattern the message must match: the value, the rule, the fix)
def _cases(tmp: Path, multi: bool) -> list[tuple[str, Callable[[], Any], type, str]]:
    import torch

    from lightning_parallelctx import ParallelContext
    from lightning_parallelctx.distributed import all_to_all, current_context, gather, scatter
    from lightning_parallelctx.errors import LauncherError, ModeNotFoundError, ParallelConfigError, ParallelCtxError
    from lightning_parallelctx.errors import RendezvousError
    from lightning_parallelctx.initializers import resolve_initializer
    from lightning_parallelctx.launchers import LaunchInfo, read_launch, read_openmpi, read_slurm, read_torchrun
    from lightning_parallelctx.launchers import tasks_per_node
    from lightning_parallelctx.layout import RankLayout
    from lightning_parallelctx.lightning import ParallelCtxStrategy
    from lightning_parallelctx.lightning.environment import LaunchMismatchError, resolve_launcher
    from lightning_parallelctx.nn import ColumnParallelLinear, VocabParallelEmbedding
    from lightning_parallelctx.nn.cross_entropy import vocab_parallel_cross_entropy
    from lightning_parallelctx.nn.moe import ExpertParallelMoE as MoE
    from lightning_parallelctx.rendezvous import _open_store, as_timedelta, listen_address

    strategy_cases = [
        ("strategy tensor_parallel_size=0", dict(tensor_parallel_size=0), r"tensor_parallel_size=0 must be >= 1"),
        ("strategy tensor_parallel_size='2'", dict(tensor_parallel_size="2"), r"tensor_parallel_size='2' \(str\) must be an int >= 1"),
        ("strategy expert_parallel_size=True", dict(expert_parallel_size=True), r"expert_parallel_size=True \(bool\) must be an int"),
        ("strategy data_parallel_size='many'", dict(data_parallel_size="many"), r"data_parallel_size='many' \(str\) must be an int >= 1 or 'auto'"),
        ("strategy pipeline_schedule='nope'", dict(pipeline_parallel_size=2, pipeline_schedule="nope"),
         r"pipeline_schedule='nope' is not a registered schedule. The names are 1f1b, .*register_schedule first"),
        ("strategy num_microbatches=0", dict(pipeline_parallel_size=2, num_microbatches=0),
         r"num_microbatches=0 must be an int >= 1"),
        ("strategy num_microbatches without stages", dict(num_microbatches=4),
         r"num_microbatches=4 / virtual_pipeline_size=None need pipeline stages.*Fix: pipeline_parallel_size > 1"),
        ("strategy order='tp-dp'", dict(order="tp-dp"), r"order 'tp-dp' must name each of the five axes exactly once.*missing: "),
        ("strategy launcher='pbs'", dict(launcher="pbs"), r"launcher='pbs' must be one of auto, local, torchrun"),
        ("strategy timeout=0", dict(timeout=0), r"timeout=0 must be a positive number of seconds"),
        ("strategy rendezvous_timeout='60'", dict(rendezvous_timeout="60"), r"rendezvous_timeout='60' must be a positive number of seconds"),
        ("strategy sync_initial_weights='yes'", dict(sync_initial_weights="yes"), r"sync_initial_weights='yes' must be a bool"),
        ("strategy print_layout=1", dict(print_layout=1), r"print_layout=1 must be a bool"),
        ("strategy process_group_backend='tcp'", dict(process_group_backend="tcp"), r"process_group_backend='tcp' must be 'gloo', 'nccl', 'mpi' or None"),
        ("strategy cluster_environment='slurm'", dict(cluster_environment="slurm"), r"cluster_environment='slurm' is not a ClusterEnvironment"),
        ("strategy gradient_handler='nope'", dict(gradient_handler="nope"), r"unknown gradient handler 'nope'; registered names are \[.*'bucketed'"),
        ("strategy modes=['nope']", dict(modes=["nope"]), r"'nope'.*(registered|known)"),
    ]
    cases: list[tuple[str, Callable[[], Any], type, str]] = [
        (name, (lambda kw=kw: ParallelCtxStrategy(**kw)), Exception, pattern) for name, kw, pattern in strategy_cases
    ]
    cases += [
        # ---------------------------------------------------------------- layout / Python API
        ("layout tp=3 of 8", lambda: RankLayout.build(8, tensor=3), ParallelConfigError,
         r"world size 8 is not divisible by tp\(3\) x sp\(1\) x ep\(1\) x pp\(1\) = 3.*Rule: .*must divide the world size. Fix: choose sizes whose product is one of \[1, 2, 4, 8\]"),
        ("layout tp=2 dp=3 of 8", lambda: RankLayout.build(8, tensor=2, data=3), ParallelConfigError,
         r"tp\(2\) x .* x dp\(3\) = 6, but the world size is 8. Rule: .*Fix: data_parallel_size='auto' would give dp=4"),
        ("layout tp=0", lambda: RankLayout.build(8, tensor=0), ParallelConfigError, r"=0: a parallel size must be at least 1"),
        ("layout tp='2'", lambda: RankLayout.build(8, tensor="2"), ParallelConfigError,
         r"='2' \(str\): a parallel size must be a positive integer, e.g. \w+=2"),
        ("layout repeated axis", lambda: RankLayout({}, order="tp-tp-sp-ep-dp-pp"), ParallelConfigError,
         r"order .* must name each of the five axes exactly once.*repeated: "),
        ("layout rank outside world", lambda: RankLayout.build(4, tensor=2).coords(9), ParallelConfigError,
         r"rank 9 is outside 0..3 \(world size 4\)"),
        ("context timeout=-1", lambda: as_timedelta(-1), ParallelConfigError, r"timeout=-1 must be a positive number of seconds"),
        ("context rendezvous_timeout=True", lambda: ParallelContext(dict(tensor=1), rendezvous_timeout=True, env={}),
         ParallelConfigError, r"rendezvous_timeout=True must be a positive number of seconds or a timedelta"),
        ("context unknown option", lambda: ParallelContext.from_torch(tensor_parallel_size=1, timout=5), ParallelConfigError,
         r"unknown option\(s\) \['timout'\]; options are \[.*'timeout'"),
        ("mode unknown name", lambda: resolve_initializer("nope"), Exception, r"'nope'"),
        ("mode not in this context", lambda: current_context().get_group("nope"), ModeNotFoundError,
         r"mode 'nope' does not exist in this context; it has .*Fix: use one of those"),
        ("mode bad class_path", lambda: resolve_initializer({"class_path": "no.such.Init"}), Exception, r"no\.such\.Init"),
        # ---------------------------------------------------------------- YAML mapping
        ("yaml unknown key", lambda: ParallelContext.from_config({"tp": 1, "tensr": 2}), ParallelConfigError,
         r"unknown key\(s\) \['tensr'\] in parallel config; sizes are \['dp', 'ep', 'pp', 'sp', 'tp'\]"),
        ("yaml tp='two'", lambda: ParallelContext.from_config({"tp": "two"}), ParallelConfigError,
         r"='two' \(str\): a parallel size must be a positive integer"),
        # ---------------------------------------------------------------- launcher variables
        ("torchrun: none of its variables", lambda: read_torchrun({}), LauncherError,
         r"variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not set.*torchrun --nproc_per_node"),
        ("slurm: none of its variables", lambda: read_slurm({}), LauncherError,
         r"variables SLURM_PROCID, SLURM_NTASKS \(or SLURM_NPROCS\), SLURM_LOCALID are not set.*srun"),
        ("openmpi: none of its variables", lambda: read_openmpi({}), LauncherError,
         r"variables OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE are not set.*mpirun"),
        ("torchrun RANK=9 of 2", lambda: read_torchrun({**TORCHRUN, "RANK": "9"}), LauncherError,
         r"rank 9 is not inside a world of 2 processes \(RANK / WORLD_SIZE\)"),
        ("openmpi size 'four'", lambda: read_openmpi({**OMPI, "OMPI_COMM_WORLD_SIZE": "four"}), LauncherError,
         r"OMPI_COMM_WORLD_SIZE='four' \(set by openmpi\) is not an integer"),
        ("MASTER_PORT=70000", lambda: read_torchrun({**TORCHRUN, "MASTER_PORT": "70000"}), LauncherError,
         r"MASTER_PORT=70000 is not a port number \(1-65535\)"),
        ("unknown launcher", lambda: read_launch({}, launcher="pbs"), LauncherError,
         r"unknown launcher 'pbs'; known: torchrun, openmpi"),
        ("SLURM_TASKS_PER_NODE garbage", lambda: tasks_per_node("four"), LauncherError,
         r"SLURM_TASKS_PER_NODE='four' is not of the form '4\(x2\),3'"),
        ("PCTX_LAUNCHER='pbs'", lambda: resolve_launcher({"PCTX_LAUNCHER": "pbs"}), LaunchMismatchError, r"PCTX_LAUNCHER='pbs'"),
        # ---------------------------------------------------------------- rendezvous
        ("rendezvous host unresolvable", lambda: listen_address("no-such-host.invalid", True), RendezvousError,
         r"rendezvous host 'no-such-host.invalid' does not resolve.*Fix: set MASTER_ADDR"),
        ("rendezvous without host/port (MPI on 2 nodes)",
         lambda: _open_store(LaunchInfo("openmpi", 1, 4, 0, 2), as_timedelta(5), as_timedelta(5)), RendezvousError,
         r"rank 1: no rendezvous host and port for 4 openmpi processes.*pass host=/port=.*MASTER_ADDR"),
        # ---------------------------------------------------------------- checkpoint paths
        ("checkpoint: a directory that is not one", lambda: _load_from(tmp / "not-a-checkpoint"), Exception,
         r"not-a-checkpoint is a directory but not a checkpoint of this library: it has no .metadata"),
        ("checkpoint: overwrite a foreign directory", lambda: _save_into(tmp / "foreign"), Exception,
         r"foreign is a non-empty directory that is not a checkpoint; refusing to overwrite it. Fix: save to another"),
        # ---------------------------------------------------------------- shapes
        ("all_to_all scatter_dim == gather_dim", lambda: all_to_all(torch.zeros(4, 4), 0, 0, mode="tensor"),
         ParallelCtxError, r"all_to_all needs scatter_dim != gather_dim \(both are 0\).*Fix: pass two different"),
        ("scatter of a 0-d tensor", lambda: scatter(torch.tensor(1.0), dim=0, mode="tensor"), ParallelCtxError,
         r"dim=0: cannot split or gather a 0-dimensional tensor.*Fix: reshape it"),
        ("gather dim out of range", lambda: gather(torch.zeros(2, 2), dim=5, mode="tensor"), IndexError,
         r"dim=5 is out of range for a tensor with 2 dimensions; use a dim in \[-2, 1\]"),
        ("cross entropy: target shape", lambda: vocab_parallel_cross_entropy(torch.zeros(4, 8), torch.zeros(3, dtype=torch.long)),
         ParallelCtxError, r"target has 3 entries for 4 rows of logits.*Fix: pass the target of the same"),
        ("cross entropy: label_smoothing=2", lambda: vocab_parallel_cross_entropy(torch.zeros(4, 8), torch.zeros(4, dtype=torch.long), label_smoothing=2.0),
         ValueError, r"label_smoothing=2.0 must be in \[0, 1\].*use e.g. 0.0"),
        ("cross entropy: reduction", lambda: vocab_parallel_cross_entropy(torch.zeros(4, 8), torch.zeros(4, dtype=torch.long), reduction="avg"),
         ValueError, r"reduction='avg' is not a reduction; use 'mean', 'sum' or 'none'"),
        ("moe top_k=0", lambda: MoE(8, 16, num_experts=2, top_k=0), ValueError, r"top_k=0 must be in \[1, num_experts=2\]"),
        ("embedding padding_idx", lambda: VocabParallelEmbedding(8, 4, padding_idx=9), ValueError,
         r"padding_idx=9 must be within num_embeddings=8"),
    ]
    if multi:  # with tp=2 only: a size that does not split into equal shards
        cases += [
            ("column linear out_features=3 over tp=2", lambda: ColumnParallelLinear(4, 3), Exception,
             r"=3 is not divisible by the 'tensor' group size 2.*Fix: pick a size divisible by 2 \(e.g. 4"),
            ("embedding vocab 7 over tp=2", lambda: VocabParallelEmbedding(7, 4), Exception,
             r"=7 is not divisible by the 'tensor' group size 2.*Fix: pick a size divisible by 2 \(e.g. 8, padding"),
        ]
    return cases


def _module_and_context() -> tuple[Any, Any]:
    import torch

    from lightning_parallelctx.distributed import current_context

    return torch.nn.Linear(2, 2), current_context()


def _load_from(path: Path) -> None:
    from lightning_parallelctx.lightning.checkpoint import load_sharded_checkpoint

    path.mkdir(exist_ok=True)
    module, ctx = _module_and_context()
    load_sharded_checkpoint(path, module, ctx)


def _save_into(path: Path) -> None:
    from lightning_parallelctx.lightning.checkpoint import save_sharded_checkpoint

    path.mkdir(exist_ok=True)
    (path / "notes.txt").write_text("mine")
    module, ctx = _module_and_context()
    save_sharded_checkpoint({"state_dict": module.state_dict()}, path, module, ctx)


def check_all(multi: bool) -> dict[str, str]:
    """Run every case; return id -> what went wrong ('' when the right error with the right words came)."""
    problems: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, call, kind, pattern in _cases(Path(tmp), multi):
            try:
                call()
            except kind as err:  # noqa: PERF203
                text = str(err)
                problems[name] = "" if re.search(pattern, text, re.S) else f"message does not match {pattern!r}: {text}"
            except Exception as err:  # noqa: BLE001
                problems[name] = f"wrong type {type(err).__name__}: {err}"
            else:
                problems[name] = "no error"
    return problems


def _in_world(rank: int, world_size: int) -> dict[str, str]:
    from lightning_parallelctx import ParallelContext

    ctx = ParallelContext.from_env(tensor_parallel_size=world_size, timeout=60)
    try:
        return check_all(multi=world_size > 1)
    finally:
        ctx.destroy()


def test_at_least_40_bad_inputs_on_one_process() -> None:
    problems = spawn(_in_world, 1, timeout=120)[0]
    assert len(problems) >= 40, len(problems)
    assert not {k: v for k, v in problems.items() if v}, {k: v for k, v in problems.items() if v}


def test_bad_inputs_on_every_rank_of_two_processes() -> None:
    for rank, problems in enumerate(spawn(_in_world, 2, timeout=180)):
        assert len(problems) >= 42, (rank, len(problems))
        assert not {k: v for k, v in problems.items() if v}, (rank, {k: v for k, v in problems.items() if v})
