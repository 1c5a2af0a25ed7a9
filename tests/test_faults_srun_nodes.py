"""srun -N 2 on one machine: two slurmd (Debian's slurmd is built with --enable-multiple-slurmd:
``slurmd -N NODENAME``), each its own node on 127.0.0.1 with its own port. Node-local ranks, the
warning for a tensor group across the nodes, the same training as one node, and a rank killed on
one node ends every task of both. Its own module: its job takes minutes, and CI's workers share
modules (pytest -n 3 --dist loadscope)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import sbatch_and_wait
from fault_jobs import LIMIT, ROOT, SCRIPT, clean_env, kill_left, timeout_args, weights

pytestmark = [pytest.mark.slow, pytest.mark.launcher]

# Its own directory and ports, so that it never disturbs the one-node cluster of the other tests.
TWO_NODE_DIR = Path(os.environ.get("PCTX_SLURM2_DIR", "/tmp/pctx-slurm-2n"))
TWO_NODE_CONF = """ClusterName=pctx2n
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort=6927
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
SlurmdParameters=config_overrides
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=60
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd-%n.log
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port=6931 CPUs=4 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port=6932 CPUs=4 State=UNKNOWN
PartitionName=two Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _nodes_idle(env: dict[str, str]) -> bool:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True, timeout=30)
    states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    return out.returncode == 0 and all(states.get(n, "").startswith(("idle", "mix", "alloc")) for n in ("n1", "n2"))


@pytest.fixture(scope="module")
def two_node_slurm(slurm_env: dict[str, str]) -> Iterator[dict[str, str]]:  # slurm_env: munge and Slurm are installed and up
    env = {**clean_env(), "SLURM_CONF": str(TWO_NODE_DIR / "slurm.conf")}
    started: list[Path] = []
    if not (TWO_NODE_DIR / "slurm.conf").exists() or not _nodes_idle(env):
        for sub in ("state", "log", "spool/n1", "spool/n2"):
            (TWO_NODE_DIR / sub).mkdir(parents=True, exist_ok=True)
        (TWO_NODE_DIR / "slurm.conf").write_text(TWO_NODE_CONF.format(host=socket.gethostname().split(".")[0],
                                                                      dir=TWO_NODE_DIR))
        conf = str(TWO_NODE_DIR / "slurm.conf")
        for cmd, pidfile in ((["slurmctld", "-f", conf], "slurmctld.pid"), (["slurmd", "-f", conf, "-N", "n1"],
                             "slurmd-n1.pid"), (["slurmd", "-f", conf, "-N", "n2"], "slurmd-n2.pid")):
            assert subprocess.run(cmd, env=env, timeout=60).returncode == 0, cmd
            started.append(TWO_NODE_DIR / pidfile)
            time.sleep(1)
        deadline = time.monotonic() + 60
        while not _nodes_idle(env):
            assert time.monotonic() < deadline, (TWO_NODE_DIR / "log" / "slurmctld.log").read_text()[-3000:]
            time.sleep(1)
    yield env
    for pidfile in started:  # only the daemons this module started, by pid
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text().strip()), 15)


@pytest.mark.timeout(6 * LIMIT)
def test_srun_two_nodes(tmp_path: Path, two_node_slurm: dict[str, str]) -> None:
    """srun -N 2 (2 tasks per node) on two slurmd: node-local ranks, the warning for a tensor group
    across the nodes, the same training as 4 tasks on one node; then rank 2 (on node n2) is
    SIGKILLed inside a data-parallel fit (tp=4 alone issues no collective in this model's steps, so
    the others would finish without noticing) and every task of both nodes ends."""
    pids = tmp_path / "pids"
    fit = " ".join([sys.executable, str(SCRIPT), *timeout_args()])
    script = tmp_path / "two.sbatch"
    # 4 task slots per node, so that the one-node step fits; the two-node steps ask for 2 per node.
    script.write_text(f"""#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
export PYTHONPATH={ROOT} OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 MASTER_ADDR=127.0.0.1
echo "== two nodes"
srun -N 2 -n 4 --ntasks-per-node=2 {fit} --tp 4 --devices 2 --nodes 2
echo "== one node"
srun -N 1 -n 4 {fit} --tp 4 --devices 4 --nodes 1
echo "== kill rank 2"
start=$(date +%s)
srun -N 2 -n 4 --ntasks-per-node=2 {fit} --devices 2 --nodes 2 --fault kill --rank 2 --pids {pids}
echo "srun exit code $? after $(( $(date +%s) - start )) s"
""")
    text = sbatch_and_wait([f"--chdir={ROOT}", str(script)], two_node_slurm, tmp_path / "job.out", 5 * LIMIT)
    two, one, kill = (text.split("== two nodes")[1].split("== one node")[0], text.split("== one node")[1].split(
        "== kill rank 2")[0], text.split("== kill rank 2")[1])
    two_nodes, one_node = weights(two), weights(one)
    assert sorted(two_nodes) == [0, 1, 2, 3] and sorted(one_node) == [0, 1, 2, 3], text[-4000:]
    assert {r: v[:2] for r, v in two_nodes.items()} == {0: (0, 0), 1: (1, 0), 2: (0, 1), 3: (1, 1)}, two_nodes
    assert two.count("tensor groups (0, 1, 2, 3) span several nodes (2 processes per node)") == 1, two[-3000:]
    assert "span several nodes" not in one
    for rank in range(4):
        assert max(abs(a - b) for a, b in zip(two_nodes[rank][2], one_node[rank][2])) < 1e-5, (two_nodes, one_node)
    code, seconds = map(int, re.search(r"srun exit code (\d+) after (\d+) s", kill).groups())  # type: ignore[union-attr]
    assert code != 0 and seconds <= LIMIT, kill[-3000:]
    assert re.search(r"ranks that never reported \(hung, killed, or exited without a Python error\): \[2\]", kill), kill[-3000:]
    assert not kill_left(pids), kill[-3000:]
