"""Real fault jobs for the tests/test_faults*.py modules (one module per launcher, so that pytest-xdist's
workers share them: CI runs ``-n 3 --dist loadscope``, where a module is the unit of work).

Each job runs tests/scripts/fault_fit.py, in which one rank raises, is SIGKILLed, hangs, dies inside
a collective or never reaches the rendezvous. Every process writes its pid to a directory first,
so that a test can check, by pid, that no process of the job outlived it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "fault_fit.py"
#: The strategy's timeout= (collectives), 30 s; PCTX_FAULT_TIMEOUT=15 shortens every hang case.
TIMEOUT = int(os.environ.get("PCTX_FAULT_TIMEOUT", "30"))
#: Importing torch + Lightning in every process at once on a busy 2-core machine: more than 30 s
#: was seen in CI, so each job's rendezvous_timeout= is this, not TIMEOUT (but for the case about
#: the rendezvous itself).
STARTUP = 90
LIMIT = STARTUP + TIMEOUT + 30  # the bound: timeout + 30 s, plus the start
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
               "MASTER_ADDR", "MASTER_PORT", "PCTX_LAUNCHER", "PCTX_LAUNCHER_PID")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


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


def kill_left(pids: Path, wait_s: float = 5.0) -> list[int]:
    """The job's processes still alive ``wait_s`` after the launcher returned (then SIGKILLed, so that
    a failed test leaves none either). The wait: mpirun and srun return once they have seen a rank
    fail, while another rank may still be inside its interpreter's shutdown for a moment."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [int(p.stem) for p in pids.glob("*.pid") if alive(int(p.stem))] if pids.exists() else []
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    for pid in left:
        os.kill(pid, 9)
    return left


def timeout_args(fault: str = "none") -> list[str]:
    # "slowstart" sleeps TIMEOUT + 5 s on top of its start before the rendezvous.
    join = {"norendezvous": TIMEOUT, "slowstart": STARTUP + TIMEOUT}.get(fault, STARTUP)
    return ["--timeout", str(TIMEOUT), "--rendezvous-timeout", str(join)]


def fault_args(fault: str, rank: int, pids: Path, devices: int = 2, step: int = 2) -> list[str]:
    return [str(SCRIPT), "--fault", fault, "--rank", str(rank), "--step", str(step), "--devices", str(devices),
            *timeout_args(fault), "--pids", str(pids)]


def last_lines(out: str, n: int = 6) -> str:
    return "\n".join(out.strip().splitlines()[-n:])


@dataclass
class Job:
    """One fault job, started at once and awaited later, so that a module can start all its jobs
    together: most of a fault job's time is spent waiting for a timeout, not computing."""

    proc: subprocess.Popen
    pids: Path
    start: float = field(default_factory=time.monotonic)
    result: tuple[int, str, float] | None = None

    def finish(self) -> tuple[int, str, float]:
        """(exit code, output, seconds): fails if it ran past LIMIT or left a process behind."""
        if self.result is None:
            remaining = max(1.0, LIMIT - (time.monotonic() - self.start))
            try:
                out, _ = self.proc.communicate(timeout=remaining)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                out, _ = self.proc.communicate()
                left = kill_left(self.pids, 0)
                raise AssertionError(f"the job did not end within {LIMIT} s (left: {left}):\n{out[-5000:]}") from None
            elapsed = time.monotonic() - self.start
            (self.pids.parent / "job.out").write_text(out)  # the whole output, for a failure's post-mortem
            left = kill_left(self.pids)
            assert not left, f"processes of the job outlived it: {left}\n{out[-5000:]}"
            self.result = (self.proc.returncode, out, elapsed)
        return self.result


def start_fault(workdir: Path, fault: str, rank: int, devices: int = 2, step: int = 2,
                prefix: list[str] | None = None) -> Job:
    pids = workdir / "pids"
    cmd = [*(prefix or [sys.executable]), *fault_args(fault, rank, pids, devices, step)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    return Job(proc, pids)


def run_fault(workdir: Path, fault: str, rank: int, devices: int = 2, step: int = 2,
              prefix: list[str] | None = None) -> tuple[int, str, float]:
    return start_fault(workdir, fault, rank, devices, step, prefix).finish()


@dataclass
class SlurmJob:
    """One sbatch job whose single step is ``srun`` of a fault job; submitted at once, awaited later
    (several run side by side on the local cluster, whose node is oversubscribed)."""

    job_id: str
    output: Path
    pids: Path
    env: dict[str, str]
    start: float = field(default_factory=time.monotonic)
    text: str | None = None

    def finish(self, timeout: float = LIMIT + 60) -> str:
        """The job's output: fails if it still runs at ``timeout`` (it is then cancelled) or left a process."""
        if self.text is None:
            deadline = self.start + timeout
            while subprocess.run(["squeue", "-h", "-j", self.job_id], env=self.env, capture_output=True, text=True,
                                 timeout=30).stdout.strip():
                if time.monotonic() > deadline:
                    subprocess.run(["scancel", self.job_id], env=self.env, timeout=30)
                    left = kill_left(self.pids, 0)
                    raise AssertionError(f"Slurm job {self.job_id} still running after {timeout} s (cancelled; left: "
                                         f"{left}):\n" + (self.output.read_text(errors="replace")[-5000:]
                                                          if self.output.exists() else ""))
                time.sleep(0.5)
            self.text = self.output.read_text(errors="replace") if self.output.exists() else ""
            left = kill_left(self.pids)
            assert not left, f"processes of the job outlived it: {left}\n{self.text[-5000:]}"
        return self.text

    def srun_result(self) -> tuple[int, int]:
        """(srun's exit code, seconds srun ran), from the line the batch script prints after it."""
        match = re.search(r"srun exit code (\d+) after (\d+) s", self.finish())
        assert match, self.finish()[-3000:]
        return int(match.group(1)), int(match.group(2))


def submit_srun(workdir: Path, slurm_env: dict[str, str], fault: str, rank: int, srun_flags: str = "",
                nodes: int = 1, extra: str = "") -> SlurmJob:
    workdir.mkdir(parents=True, exist_ok=True)
    pids = workdir / "pids"
    script = workdir / "fault.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --job-name=pctx-fault-{fault}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={2 // nodes if nodes <= 2 else 1}
export PYTHONPATH={ROOT} OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
start=$(date +%s)
srun {srun_flags} {sys.executable} {' '.join(fault_args(fault, rank, pids))} {extra}
echo "srun exit code $? after $(( $(date +%s) - start )) s"
""")
    env = {**clean_env(), "SLURM_CONF": slurm_env["SLURM_CONF"]}
    output = workdir / "job.out"
    out = subprocess.run(["sbatch", "--parsable", f"--output={output}", f"--chdir={ROOT}", str(script)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return SlurmJob(out.stdout.strip().split(";")[0], output, pids, env)


def weights(text: str) -> dict[int, tuple[int, int, list[float]]]:
    """rank -> (local rank, node, first weights) from fault_fit.py's closing lines."""
    found = re.findall(r"rank (\d+): done local_rank=(\d+) node=(\d+) weights=\[([^\]]*)\]", text)
    return {int(r): (int(lr), int(n), [float(x) for x in w.split(",")]) for r, lr, n, w in found}
