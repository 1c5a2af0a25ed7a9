"""The GPT example (tp2-dp2, configs/cpu-tp2-dp2.yaml) launched for real, every way a user would.

Strategy-launched (plain `python -m lightning_parallelctx fit --config ...`, which is also the
LightningCLI + YAML path), torchrun, Open MPI's mpirun (no mpi4py installed) and sbatch + srun on
the local Slurm cluster of scripts/local_cluster.sh. All must train the same model the same way:
the same final loss to the printed digit, from one world of 4 processes (never N copies).
The trap cases (docs/traps.md #10) run for real too and must end in the clear error.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import sbatch_and_wait

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/cpu-tp2-dp2.yaml"
# 12 steps: enough for the loss to fall clearly below an untrained model's (see test_strategy_launched_cli_yaml).
STEPS = 12
QUICK = [f"--trainer.max_steps={STEPS}", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
         "--data.num_samples=64"]
FIT = ["-m", "lightning_parallelctx", "fit", "--config", CONFIG, *QUICK]
LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_", "MV2_", "TORCHELASTIC_")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
               "MASTER_ADDR", "MASTER_PORT", "PCTX_LAUNCHER")
STARTED_4 = "All distributed processes registered. Starting with 4 processes"
# Inner time limits, and the pytest timeouts derived from them: each test's own limit exceeds the
# sum of the waits it can make, so an inner limit fires first and its cleanup (killing the launch,
# scancel of the Slurm job) runs before pytest-timeout (300 s by default) kills the test.
RUN_TIMEOUT = 240  # one launch of 4 processes (about 10 s when the machine is idle)
SBATCH_TIMEOUT = 240  # polling squeue for one Slurm job
SLURM_START = 180  # conftest's slurm_env: starting the local cluster (once per session)
SLACK = 120  # sbatch submission (<= 60 s), the last squeue (<= 30 s), scancel (<= 30 s)
FIXTURE_TEST_TIMEOUT = RUN_TIMEOUT + SLACK  # the strategy_launched fixture (run once per module)
FIXTURE_RUN_TEST_TIMEOUT = 2 * RUN_TIMEOUT + SLACK  # that fixture, then one more launch
SBATCH_TEST_TIMEOUT = SLURM_START + SBATCH_TIMEOUT + SLACK
SBATCH_FIXTURE_TEST_TIMEOUT = RUN_TIMEOUT + SBATCH_TEST_TIMEOUT


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith(LAUNCH_PREFIXES)}
    if "SLURM_CONF" in os.environ:
        env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, **(extra or {}))
    return env


def run(cmd: list[str], timeout: float = RUN_TIMEOUT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env or clean_env(), capture_output=True, text=True, timeout=timeout,
                          check=False)


def final_loss(text: str) -> str:
    # One world of 4 processes, one training: exactly one line from rank 0, no per-copy repeats.
    found = re.findall(rf"final loss: ([0-9.]+) \(step {STEPS}\)", text)
    assert len(found) == 1, f"expected one 'final loss' line, got {found}:\n{text[-4000:]}"
    assert text.count(STARTED_4) == 1 and "Starting with 1 processes" not in text, text[-4000:]
    return found[0]


@pytest.fixture(scope="module")
def strategy_launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """`python -m lightning_parallelctx fit --config configs/cpu-tp2-dp2.yaml`: the strategy starts
    the other 3 local processes itself (Lightning's subprocess launcher). This run keeps its
    (sharded) end-of-training checkpoint."""
    root = tmp_path_factory.mktemp("strategy-launched")
    cmd = [a for a in FIT if a != "--trainer.enable_checkpointing=false"] + [f"--trainer.default_root_dir={root}"]
    out = run([sys.executable, *cmd])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return final_loss(out.stdout + out.stderr), root


@pytest.fixture(scope="module")
def strategy_launched_loss(strategy_launched: tuple[str, Path]) -> str:
    return strategy_launched[0]


@pytest.mark.timeout(FIXTURE_TEST_TIMEOUT)
def test_strategy_launched_cli_yaml(strategy_launched_loss: str) -> None:
    # vocab_size=64: an untrained model's loss is ln(64) = 4.16 (4.161 at step 1 of this config).
    # This config reaches 3.44 at step 12 (3.84 at step 6); 3.7 is 0.46 below an untrained model.
    assert 1.0 < float(strategy_launched_loss) < 3.7, strategy_launched_loss


@pytest.mark.timeout(FIXTURE_RUN_TEST_TIMEOUT)
def test_strategy_launched_matches_one_process(strategy_launched_loss: str) -> None:
    # The same config, seed and global batch on one process (every size 1): tp2 x dp2 must train the
    # same model, not merely "a model whose loss falls" (6 printed digits; fp32 sums in another order).
    one = ["--trainer.devices=1", "--trainer.strategy.init_args.tensor_parallel_size=1",
           "--trainer.strategy.init_args.data_parallel_size=1"]
    out = run([sys.executable, *FIT, *one])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    found = re.findall(rf"final loss: ([0-9.]+) \(step {STEPS}\)", out.stdout + out.stderr)
    assert len(found) == 1, (out.stdout + out.stderr)[-4000:]
    assert abs(float(found[0]) - float(strategy_launched_loss)) < 2e-5, (found[0], strategy_launched_loss)


@pytest.mark.timeout(FIXTURE_RUN_TEST_TIMEOUT)
def test_consolidate_command(strategy_launched: tuple[str, Path], tmp_path: Path) -> None:
    """The sharded checkpoint of the 4-process run becomes one file a single process loads."""
    import torch

    sys.path.insert(0, str(ROOT))
    from examples.gpt.model import GPTLightning

    (ckpt,) = (strategy_launched[1] / "checkpoints").iterdir()
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "COMPLETE", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp", "meta.pt"]
    out = run([sys.executable, "-m", "lightning_parallelctx.lightning.checkpoint", str(ckpt), str(tmp_path / "full.ckpt")])
    assert out.returncode == 0 and "wrote" in out.stdout, out.stdout + out.stderr
    full = torch.load(tmp_path / "full.ckpt", weights_only=False)
    # The optimizer's state comes along, whole (a plain Trainer can continue from the file).
    assert full["global_step"] == STEPS and len(full["optimizer_states"]) == 1
    # Lightning's own loader, no strategy: one process, every size 1, full weights (strict).
    model = GPTLightning.load_from_checkpoint(tmp_path / "full.ckpt", weights_only=False)
    assert all(torch.equal(v, full["state_dict"][k]) for k, v in model.state_dict().items())
    assert model.gpt.head.weight.shape == (64, 32)  # the whole vocabulary, not a tp shard of it


@pytest.mark.timeout(FIXTURE_RUN_TEST_TIMEOUT)
def test_torchrun(strategy_launched_loss: str) -> None:
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", *FIT])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert final_loss(out.stdout + out.stderr) == strategy_launched_loss


@pytest.mark.timeout(FIXTURE_RUN_TEST_TIMEOUT)
def test_mpirun_without_mpi4py(strategy_launched_loss: str, mpirun: list[str]) -> None:
    import importlib.util

    # The trap needs mpi4py absent: Lightning's MPIEnvironment would then make 4 copies.
    assert importlib.util.find_spec("mpi4py") is None
    # No MASTER_ADDR/MASTER_PORT: one node, so loopback and a port derived from the MPI job id.
    out = run([*mpirun, "-np", "4", sys.executable, *FIT])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert final_loss(out.stdout + out.stderr) == strategy_launched_loss


@pytest.mark.timeout(SBATCH_FIXTURE_TEST_TIMEOUT)
def test_sbatch_example_script(strategy_launched_loss: str, slurm_env: dict[str, str], tmp_path: Path) -> None:
    env = clean_env({"SLURM_CONF": slurm_env["SLURM_CONF"]})
    text = sbatch_and_wait([f"--chdir={ROOT}", "examples/slurm/gpt.sbatch", *QUICK], env, tmp_path / "job.out",
                           SBATCH_TIMEOUT)
    assert "Traceback" not in text, text[-6000:]
    assert final_loss(text) == strategy_launched_loss


# ------------------------------------------------------------------------------------ traps
def test_torchrun_with_fewer_processes_than_devices_is_a_clear_error() -> None:
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *FIT], timeout=200)
    assert out.returncode != 0
    assert "torchrun started 2 process(es) on this node (LOCAL_WORLD_SIZE=2), but the Trainer has devices=4" in out.stderr


def test_mpirun_with_fewer_processes_than_devices_is_a_clear_error(mpirun: list[str]) -> None:
    out = run([*mpirun, "-np", "2", sys.executable, *FIT], timeout=200)
    assert out.returncode != 0
    assert "openmpi started 2 process(es) on this node (OMPI_COMM_WORLD_LOCAL_SIZE=2), but the Trainer has devices=4" \
        in out.stdout + out.stderr


@pytest.mark.timeout(SBATCH_TEST_TIMEOUT)
def test_slurm_traps(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """In one job: the batch script itself is not a task of a distributed run (launches locally);
    an srun step named 'interactive' is a clear error; so is --ntasks-per-node != devices."""
    script = tmp_path / "traps.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --job-name=pctx-traps
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
cd {ROOT}
{sys.executable} -c "from lightning_parallelctx import ParallelCtxEnvironment as E; print('batch script:', E().launcher)"
srun --job-name=interactive {sys.executable} {' '.join(FIT)} --trainer.devices=2 \\
    --trainer.strategy.init_args.data_parallel_size=1 && echo "interactive: ran" || echo "interactive: failed"
srun {sys.executable} {' '.join(FIT)} && echo "mismatch: ran" || echo "mismatch: failed"
""")
    env = clean_env({"SLURM_CONF": slurm_env["SLURM_CONF"]})
    text = sbatch_and_wait([f"--chdir={ROOT}", str(script)], env, tmp_path / "traps.out", SBATCH_TIMEOUT)
    assert "batch script: local" in text, text[-6000:]
    assert "interactive: failed" in text and "srun step of 2 tasks in a Slurm job named 'interactive'" in text, text[-6000:]
    assert "mismatch: failed" in text, text[-6000:]
    assert "slurm started 2 process(es) on this node (tasks per node=2), but the Trainer has devices=4" in text


@pytest.mark.timeout(FIXTURE_RUN_TEST_TIMEOUT)
def test_config_runs_from_any_directory(strategy_launched_loss: str, tmp_path: Path) -> None:
    """The examples' configs name `examples.gpt...`: the CLI finds them from the clone it was
    installed from, whatever the working directory, and trains the same model the same way."""
    cmd = [a if a != CONFIG else str(ROOT / CONFIG) for a in FIT]
    out = subprocess.run([sys.executable, *cmd], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                         timeout=RUN_TIMEOUT, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert final_loss(out.stdout + out.stderr) == strategy_launched_loss


def test_missing_examples_package_says_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Installed without a clone, the examples cannot be imported: the last line says what to do."""
    from lightning_parallelctx.lightning import cli

    monkeypatch.setitem(sys.modules, "examples", None)  # `import examples` now raises ImportError
    cli._explain_missing_examples(["fit", "--config", str(ROOT / CONFIG)])
    err = capsys.readouterr().err
    assert "'examples' package" in err and "export PYTHONPATH=/path/to/clone" in err
    other = tmp_path / "own.yaml"
    other.write_text("model:\n  class_path: mypkg.Model\n")
    cli._explain_missing_examples(["fit", "--config", str(other)])
    assert capsys.readouterr().err == ""  # a config that does not name the examples: no advice


@pytest.mark.parametrize("arg, reason", [
    ("--trainer.strategy.init_args.rendezvous_timeout=-5",
     "rendezvous_timeout=-5.0 must be a positive number of seconds or a timedelta"),
    ("--trainer.strategy.init_args.tensor_parallel_size=0", "tensor_parallel_size=0 must be >= 1"),
])
def test_a_refused_strategy_argument_is_the_cli_last_line(capsys: pytest.CaptureFixture[str], arg: str,
                                                          reason: str) -> None:
    """jsonargparse's report ends with the whole parsed Namespace; the strategy's own message, which
    says what is wrong, must be what the user reads last."""
    from lightning_parallelctx.lightning.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / CONFIG), arg])
    assert exit_.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"lightning-parallelctx: the config was refused: {reason}", last


# ------------------------------------------------------------------------------------ pipeline
PP_CONFIG = "configs/cpu-pp2-dp2.yaml"
PP_FIT = ["-m", "lightning_parallelctx", "fit", "--config", PP_CONFIG, *QUICK]


@pytest.fixture(scope="module")
def pipeline_loss() -> str:
    """pp2-dp2 (two 1F1B stages x two replicas), strategy-launched."""
    out = run([sys.executable, *PP_FIT])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return final_loss(out.stdout + out.stderr)


@pytest.mark.timeout(FIXTURE_RUN_TEST_TIMEOUT)
def test_pipeline_torchrun(pipeline_loss: str) -> None:
    assert 1.0 < float(pipeline_loss) < 4.0, pipeline_loss
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", *PP_FIT])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert final_loss(out.stdout + out.stderr) == pipeline_loss


@pytest.mark.timeout(SBATCH_FIXTURE_TEST_TIMEOUT)
def test_pipeline_sbatch_srun(pipeline_loss: str, slurm_env: dict[str, str], tmp_path: Path) -> None:
    env = clean_env({"SLURM_CONF": slurm_env["SLURM_CONF"], "CONFIG": PP_CONFIG})
    text = sbatch_and_wait([f"--chdir={ROOT}", "--export=ALL", "examples/slurm/gpt.sbatch", *QUICK], env,
                           tmp_path / "job.out", SBATCH_TIMEOUT)
    assert "Traceback" not in text, text[-6000:]
    assert final_loss(text) == pipeline_loss
