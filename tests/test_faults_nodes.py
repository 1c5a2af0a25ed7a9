"""Two nodes simulated on this machine: two torchrun agents (--nnodes 2 on loopback). Node-local
ranks, the warning for a tensor group across the two nodes, the same training as one node, and
killing one node's agent ends the other node's ranks within the timeout + 30 s. The same under
srun -N 2 (two slurmd): test_faults_srun_nodes.py."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_jobs import LIMIT, ROOT, SCRIPT, STARTUP, TIMEOUT, clean_env, kill_left, timeout_args, weights

pytestmark = [pytest.mark.slow, pytest.mark.launcher]


# ------------------------------------------------------------------------ two nodes on one machine
def _agent(node: int, port: int, pids: Path, extra: list[str], nodes: int = 2, nproc: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(node),
           "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(SCRIPT), "--devices", str(nproc), "--nodes", str(nodes), *timeout_args(),
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


@pytest.mark.timeout(5 * LIMIT)
def test_two_torchrun_agents_as_two_nodes(tmp_path: Path) -> None:
    """--nnodes 2 on loopback: node-local ranks, the warning for a tensor group across the two
    nodes, and the same training as 4 processes on one node."""
    from lightning_parallelctx.rendezvous import find_free_port

    port = find_free_port()
    outs = _finish([_agent(n, port, tmp_path / "pids", ["--tp", "4"]) for n in (0, 1)], 2 * LIMIT)
    two_nodes = weights("\n".join(outs))
    assert sorted(two_nodes) == [0, 1, 2, 3], outs
    assert {r: v[:2] for r, v in two_nodes.items()} == {0: (0, 0), 1: (1, 0), 2: (0, 1), 3: (1, 1)}
    text = "\n".join(outs)
    assert text.count("tensor groups (0, 1, 2, 3) span several nodes (2 processes per node)") == 1, text[-3000:]
    one = _finish([_agent(0, find_free_port(), tmp_path / "pids1", ["--tp", "4"], nodes=1, nproc=4)], 2 * LIMIT)[0]
    one_node = weights(one)
    assert "span several nodes" not in one
    for rank in range(4):
        assert max(abs(a - b) for a, b in zip(two_nodes[rank][2], one_node[rank][2])) < 1e-5, (two_nodes, one_node)


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
    assert not kill_left(pids), out[-3000:]
    assert re.search(r"rank [01] of 4 .*stopped because", out), out[-3000:]
