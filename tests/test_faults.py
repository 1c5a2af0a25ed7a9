"""One rank fails, for real, under the strategy's own launcher (Lightning's subprocess launcher):
it raises, is SIGKILLed, hangs, dies inside a collective or never reaches the rendezvous. Every
time, every process of the job must be gone within the timeout + 30 s, the exit code must be
non-zero, and the last lines of the output must name the failing rank (and its exception, when
it had one). tests/scripts/fault_fit.py is the job; it writes each process's pid to a directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sbatch_and_wait

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "fault_fit.py"
TIMEOUT = int(os.environ.get("PCTX_FAULT_TIMEOUT", "30"))  # the strategy's timeout= (rendezvous and collectives); 30 s: a busy 2-core machine needs ~20 s to start the children
STARTUP = 60  # importing torch + Lightning in every process, on a busy 2-core machine
LIMIT = STARTUP + TIMEOUT + 30  # the bound: timeout + 30 s, plus the start
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
               "MASTER_ADDR", "MASTER_PORT", "PCTX_LAUNCHER", "PCTX_LAUNCHER_PID")

pytestmark = pytest.mark.slow


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "MV2_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return env


def alive(pid: int) -> bool:
    """Running, or stopped: a zombie (dead, not yet reaped by init) does not count."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def fault_args(fault: str, rank: int, pids: Path, devices: int = 2, step: int = 2) -> list[str]:
    return [str(SCRIPT), "--fault", fault, "--rank", str(rank), "--step", str(step), "--devices", str(devices),
            "--timeout", str(TIMEOUT), "--pids", str(pids)]


def run_fault(tmp_path: Path, fault: str, rank: int, devices: int = 2, step: int = 2,
              prefix: list[str] | None = None) -> tuple[int, str, float]:
    pids = tmp_path / "pids"
    cmd = [*(prefix or [sys.executable]), *fault_args(fault, rank, pids, devices, step)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        left = _kill_left(pids)
        raise AssertionError(f"the job did not end within {LIMIT} s (left: {left}):\n{out[-5000:]}") from None
    elapsed = time.monotonic() - start
    time.sleep(0.5)  # a SIGKILLed process needs a moment to be gone from /proc
    left = _kill_left(pids)
    assert not left, f"processes of the job outlived it: {left}\n{out[-5000:]}"
    return proc.returncode, out, elapsed


def _kill_left(pids: Path) -> list[int]:
    left = [int(p.stem) for p in pids.glob("*.pid") if alive(int(p.stem))] if pids.exists() else []
    for pid in left:
        os.kill(pid, 9)
    return left


def last_lines(out: str, n: int = 6) -> str:
    return "\n".join(out.strip().splitlines()[-n:])


@pytest.mark.timeout(LIMIT + 30)
def test_child_raises_in_training_step(tmp_path: Path) -> None:
    code, out, _ = run_fault(tmp_path, "raise", rank=1)
    assert code != 0
    tail = last_lines(out)
    assert re.search(r"rank 1 .*failed first with ValueError: injected failure at step 2", tail), tail
    # The teardown (gradient hook removal) must not add a later error over the first one.
    assert "remove" not in tail, tail


@pytest.mark.timeout(LIMIT + 30)
def test_main_process_raises_and_children_end(tmp_path: Path) -> None:
    code, out, _ = run_fault(tmp_path, "raise", rank=0)
    assert code != 0
    tail = last_lines(out, 4)
    assert "ValueError: injected failure at step 2" in tail and "rank 0 of 2" in tail, tail


@pytest.mark.timeout(LIMIT + 30)
def test_child_sigkilled(tmp_path: Path) -> None:
    code, out, _ = run_fault(tmp_path, "kill", rank=1)
    assert code != 0
    tail = last_lines(out, 8)
    assert re.search(r"never reported .*: \[1\]|rank 1 \(pid \d+\) exited with signal SIGKILL", tail), tail


@pytest.mark.timeout(LIMIT + 30)
def test_child_hangs_in_training_step(tmp_path: Path) -> None:
    code, out, _ = run_fault(tmp_path, "hang", rank=1)
    assert code != 0
    tail = last_lines(out, 4)
    assert re.search(r"group world\S* \[0, 1\]: ranks \[0\] waited in collective #\d+; never joined: \[1\]", tail), tail


@pytest.mark.timeout(LIMIT + 30)
def test_main_process_hangs(tmp_path: Path) -> None:
    code, out, _ = run_fault(tmp_path, "hang", rank=0)
    assert code != 0
    tail = last_lines(out, 8)
    assert re.search(r"rank 1 of 2 .*no rank raised|never joined: \[0\]|rank 1 \(pid \d+\) exited", tail), tail


@pytest.mark.timeout(LIMIT + 30)
def test_child_dies_inside_the_gradient_all_reduce(tmp_path: Path) -> None:
    code, out, _ = run_fault(tmp_path, "exit", rank=1)
    assert code != 0
    tail = last_lines(out, 8)
    assert re.search(r"never reported .*: \[1\]|rank 1 \(pid \d+\) exited with exit code 3", tail), tail


@pytest.mark.timeout(LIMIT + 30)
def test_child_never_reaches_the_rendezvous(tmp_path: Path) -> None:
    code, out, _ = run_fault(tmp_path, "norendezvous", rank=1)
    assert code != 0
    tail = last_lines(out, 4)
    assert re.search(rf"RendezvousError: rank 0: not all 2 processes reached the rendezvous at 127.0.0.1:\d+ within "
                     rf"{TIMEOUT} s \(.*1/2 clients joined.*Some ranks never started or crashed", tail), tail


# ------------------------------------------------------------------------ external launchers
# torchrun's and mpirun's own summaries come last; the last lines before them must be ours.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.mark.launcher
@pytest.mark.timeout(LIMIT + 30)
@pytest.mark.parametrize("fault, expected", [
    ("raise", r"ValueError: injected failure at step 2\n\s*\[lightning_parallelctx\] rank 1 of 2 .*failed with this error"),
    ("hang", r"\[lightning_parallelctx\] group world\S* \[0, 1\]: ranks \[0\] waited in collective #\d+; never joined: \[1\]"),
    ("kill", r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: -9 .*\(SIGKILL\)"),
], ids=["raise", "hang", "kill"])
def test_torchrun(tmp_path: Path, fault: str, expected: str) -> None:
    code, out, _ = run_fault(tmp_path, fault, rank=1, prefix=TORCHRUN)
    assert code != 0
    # torchrun's "Root Cause (first observed failure)" shows rank 1's traceback, with our note
    # (we write the error file torchrun reads), not "error_file: <N/A>".
    root_cause = out[out.rindex("Root Cause (first observed failure)"):]
    assert re.search(expected, root_cause), root_cause


def _before_mpirun_trailer(out: str, n: int = 3) -> str:
    """The ranks' last lines, without mpirun's closing blocks and Lightning's "Received SIGTERM" (mpirun
    terminating the others once one exited)."""
    lines = [line for line in out.strip().splitlines() if line.startswith("[rank") and "Received SIGTERM" not in line]
    return "\n".join(lines[-n:])


@pytest.mark.launcher
@pytest.mark.timeout(LIMIT + 30)
@pytest.mark.parametrize("fault, expected", [
    ("raise", r"rank 0 of 2 .* stopped because rank 1 .*failed first with ValueError: injected failure at step 2"),
    ("hang", r"group world\S* \[0, 1\]: ranks \[0\] waited in collective #\d+; never joined: \[1\]"),
    ("kill", r"ranks that never reported \(hung, killed, or exited without a Python error\): \[1\]"),
], ids=["raise", "hang", "kill"])
def test_mpirun(tmp_path: Path, mpirun: list[str], fault: str, expected: str) -> None:
    code, out, _ = run_fault(tmp_path, fault, rank=1, prefix=[*mpirun, "-x", "PYTHONPATH", "-np", "2", sys.executable])
    assert code != 0
    assert re.search(expected, _before_mpirun_trailer(out)), out[-4000:]


@pytest.mark.launcher
@pytest.mark.timeout(LIMIT + 240)
def test_srun_hang_without_kill_on_bad_exit(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    """srun does not end the other tasks when one fails (--kill-on-bad-exit=0, Slurm's default):
    rank 0 times out and reports, and the hung rank 1's watchdog ends it."""
    pids = tmp_path / "pids"
    script = tmp_path / "hang.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --job-name=pctx-fault
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
export PYTHONPATH={ROOT} OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
start=$(date +%s)
srun --kill-on-bad-exit=0 {sys.executable} {' '.join(fault_args("hang", 1, pids))}
echo "srun exit code $? after $(( $(date +%s) - start )) s"
""")
    env = {**clean_env(), "SLURM_CONF": slurm_env["SLURM_CONF"]}
    text = sbatch_and_wait([f"--chdir={ROOT}", str(script)], env, tmp_path / "job.out", LIMIT + 60)
    seconds = int(re.search(r"srun exit code [1-9]\d* after (\d+) s", text).group(1))  # type: ignore[union-attr]
    assert seconds <= LIMIT, text[-3000:]
    assert re.search(r"never joined: \[1\]", text), text[-3000:]
    assert re.search(r"rank 1 \(pid \d+\): rank 0 reported a failure, .* the watchdog ends it", text), text[-3000:]
    assert not _kill_left(pids)


# ------------------------------------------------------------------------ two nodes on one machine
def _agent(node: int, port: int, pids: Path, extra: list[str], nodes: int = 2, nproc: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(node),
           "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(SCRIPT), "--devices", str(nproc), "--nodes", str(nodes), "--timeout", str(TIMEOUT),
           "--pids", str(pids), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _finish(procs: list[subprocess.Popen], limit: float) -> list[str]:
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=limit)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(q.pid, 9)
            raise AssertionError(f"agent {p.args[6]} still running after {limit} s") from None
    return outs


def _weights(text: str) -> dict[int, tuple[int, int, list[float]]]:
    found = re.findall(r"rank (\d+): done local_rank=(\d+) node=(\d+) weights=\[([^\]]*)\]", text)
    return {int(r): (int(lr), int(n), [float(x) for x in w.split(",")]) for r, lr, n, w in found}


@pytest.mark.launcher
@pytest.mark.timeout(5 * LIMIT)
def test_two_torchrun_agents_as_two_nodes(tmp_path: Path) -> None:
    """--nnodes 2 on loopback: node-local ranks, the warning for a tensor group across the two
    nodes, and the same training as 4 processes on one node."""
    from lightning_parallelctx.rendezvous import find_free_port

    port = find_free_port()
    outs = _finish([_agent(n, port, tmp_path / "pids", ["--tp", "4"]) for n in (0, 1)], 2 * LIMIT)
    two_nodes = _weights("\n".join(outs))
    assert sorted(two_nodes) == [0, 1, 2, 3], outs
    assert {r: v[:2] for r, v in two_nodes.items()} == {0: (0, 0), 1: (1, 0), 2: (0, 1), 3: (1, 1)}
    text = "\n".join(outs)
    assert text.count("tensor groups (0, 1, 2, 3) span several nodes (2 processes per node)") == 1, text[-3000:]
    one = _finish([_agent(0, find_free_port(), tmp_path / "pids1", ["--tp", "4"], nodes=1, nproc=4)], 2 * LIMIT)[0]
    one_node = _weights(one)
    assert "span several nodes" not in one
    for rank in range(4):
        assert max(abs(a - b) for a, b in zip(two_nodes[rank][2], one_node[rank][2])) < 1e-5, (two_nodes, one_node)


@pytest.mark.launcher
@pytest.mark.timeout(3 * LIMIT)
def test_killing_one_nodes_agent_ends_the_other_node(tmp_path: Path) -> None:
    from lightning_parallelctx.rendezvous import find_free_port

    pids = tmp_path / "pids"
    port = find_free_port()
    agents = [_agent(n, port, pids, ["--steps", "100000", "--step-sleep", "0.05"]) for n in (0, 1)]
    deadline = time.monotonic() + STARTUP + TIMEOUT
    while len(list(pids.glob("*.training"))) < 4:
        assert time.monotonic() < deadline and all(a.poll() is None for a in agents), "training never started"
        time.sleep(0.5)
    killed_at = time.monotonic()
    os.kill(agents[1].pid, 9)  # node 1's agent only; its workers die with it (parent-death signal)
    out = _finish([agents[0]], TIMEOUT + 30)[0]
    took = time.monotonic() - killed_at
    agents[1].communicate()
    assert agents[0].returncode != 0 and took <= TIMEOUT + 30, (took, out[-3000:])
    time.sleep(0.5)
    assert not _kill_left(pids), out[-3000:]
    assert re.search(r"rank [01] of 4 .*stopped because", out), out[-3000:]
