"""The fault report (faults.py) and the watchdog (watchdog.py), in one spawned world of 3 processes.

Rank 2 "fails" (posts its record); rank 1 posts a communication error and must learn that rank 2
failed first; rank 0 stands for a rank that never answers. The watchdogs of ranks that do not
reach their teardown must fire within their grace; a disarmed one must not, and its thread ends.
Then a real hang: a Lightning fit under a launcher that kills nobody (testing.spawn stands in for
srun without --kill-on-bad-exit): the hung rank's watchdog must end it.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta

import pytest

from lightning_parallelctx.faults import FaultRecord, _desync, describe, explain, is_comm_error
from lightning_parallelctx.testing import RankFailure, spawn

pytestmark = pytest.mark.timeout(240)


def test_describe_and_comm_error_classification() -> None:
    assert describe(ValueError("bad\nsecond line")) == "ValueError: bad"
    assert describe(KeyError()) == "KeyError"
    assert is_comm_error(RuntimeError("[gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:1"))
    assert is_comm_error(RuntimeError("Timed out waiting 10000ms for recv operation to complete"))
    assert not is_comm_error(RuntimeError("CUDA out of memory"))
    assert not is_comm_error(ValueError("timeout must be positive"))  # a user's error, even with the word


def test_explain_names_the_first_failure_and_the_silent_ranks() -> None:
    root = FaultRecord(2, 12, "n2", "ValueError: boom", comm=False, order=1)
    me = FaultRecord(0, 10, "n0", "RuntimeError: Connection closed by peer", comm=True, order=2)
    text = explain(me, 4, {0: me, 2: root})
    assert "rank 0 of 4 (pid 10 on n0) stopped because rank 2 (pid 12 on n2) failed first with ValueError: boom" in text
    assert "failed with this error" in explain(root, 4, {2: root})
    # Nobody raised: the ranks that never reported, and where each group stopped.
    a = FaultRecord(0, 10, "n0", "RuntimeError: Timed out", True, 1, positions={"world/data [0, 1, 2, 3]": 7, "tensor [0, 1]": 3})
    b = FaultRecord(1, 11, "n0", "RuntimeError: Timed out", True, 2, positions={"world/data [0, 1, 2, 3]": 6, "tensor [0, 1]": 3})
    text = explain(a, 4, {0: a, 1: b})
    assert "ranks that never reported (hung, killed, or exited without a Python error): [2, 3]" in text
    assert "group world/data [0, 1, 2, 3]: ranks [0] waited in collective #7; never joined: [1, 2, 3] (rank 1 at #6)" in text
    assert "tensor [0, 1]" not in text  # in step: not part of the story
    assert "rank 0's rendezvous store is gone" in explain(a, 4, {0: a}, store_reachable=False)
    assert _desync({}, [1]) == []


def _board_and_watchdogs(rank: int, world_size: int) -> dict:
    import os

    import torch.distributed as dist

    from lightning_parallelctx.faults import FaultBoard, make_record
    from lightning_parallelctx.watchdog import Watchdog

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    fired: list[int] = []
    dog = Watchdog(host, port, "t/", rank, grace_s=1.0, exit_fn=fired.append).start()
    board = FaultBoard(host, port, "t/", world_size)
    dist.barrier()
    out: dict = {}
    if rank == 2:
        out["posted"] = board.post(make_record(2, ValueError("boom"), {})).order
    dist.barrier()
    if rank == 1:
        me = board.post(make_record(1, RuntimeError("Connection closed by peer"), {}))
        out["note"] = explain(me, world_size, {1: me, **board.read(wait_s=1.0)})
    if rank == 0:
        dog.stop()  # rank 0 reaches its teardown in time: its watchdog must stay quiet
    time.sleep(2.5)
    out["fired"] = list(fired)
    out["reason"] = dog.reason
    dog.join(2.0)
    out["thread_ended"] = dog._thread is not None and not dog._thread.is_alive()
    # A disarmed watchdog's thread ends at once (no thread per fit accumulates over many fits).
    again = Watchdog(host, port, "t2/", rank, grace_s=1.0, exit_fn=fired.append).start()
    time.sleep(0.3)
    t0 = time.monotonic()
    again.stop()
    again.join(5.0)
    out["stop_ends_thread"] = (not again._thread.is_alive(), time.monotonic() - t0 < 5.0)
    dist.barrier()
    return out


def test_board_and_watchdog_in_a_real_world() -> None:
    results = spawn(_board_and_watchdogs, 3, timeout=120)
    assert results[2]["posted"] == 1
    assert "rank 1 of 3" in results[1]["note"] and "rank 2" in results[1]["note"] and "ValueError: boom" in results[1]["note"]
    assert results[0]["fired"] == [] and results[0]["reason"] is None
    for r in (1, 2):
        assert results[r]["fired"] == [1] and results[r]["reason"] == "rank 2 reported a failure", results[r]
    assert all(res["thread_ended"] for res in results)
    assert all(res["stop_ends_thread"] == (True, True) for res in results)


def test_a_late_watchdog_names_the_first_failure_not_the_last() -> None:
    """Rank 2 fails, then rank 1 (a consequence) posts too and overwrites the watchdogs' wake keys.
    A watchdog that only wakes after both posts (a busy machine) must still name rank 2: the race
    that made test_board_and_watchdog_in_a_real_world read "rank 1 reported a failure" once in CI."""
    import torch.distributed as dist

    from lightning_parallelctx.faults import FaultBoard, make_record
    from lightning_parallelctx.rendezvous import find_free_port
    from lightning_parallelctx.watchdog import Watchdog

    port = find_free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    board = FaultBoard("127.0.0.1", port, "late/", 3)
    assert board.post(make_record(2, ValueError("boom"), {})).order == 1
    assert board.post(make_record(1, RuntimeError("Connection closed by peer"), {})).order == 2
    fired: list[int] = []
    dog = Watchdog("127.0.0.1", port, "late/", 0, grace_s=0.2, exit_fn=fired.append).start()
    dog.join(10.0)
    assert fired == [1] and dog.reason == "rank 2 reported a failure", (fired, dog.reason)
    del server


def _hung_fit(rank: int, world_size: int) -> None:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_parallelctx.lightning import ParallelCtxStrategy

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            if self.global_rank == 1 and batch_idx == 1:
                time.sleep(600)  # hangs; nothing but its watchdog can end it here
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(accelerator="cpu", devices=world_size, max_steps=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         strategy=ParallelCtxStrategy(timeout=15, rendezvous_timeout=120, print_layout=False))
    trainer.fit(Model(), DataLoader(TensorDataset(torch.randn(32, 4)), batch_size=4))


def test_hung_rank_is_ended_by_its_watchdog() -> None:
    start = time.monotonic()
    with pytest.raises(RankFailure) as err:
        spawn(_hung_fit, 2, timeout=150)
    elapsed = time.monotonic() - start
    # Rank 0 times out (15 s) and reports; rank 1's watchdog ends it 10 s later (exit code 1), long
    # before spawn's own deadline would have killed it.
    assert err.value.errors[1] == "rank 1 exited with code 1 without reporting", err.value.errors
    assert "never joined: [1]" in err.value.errors[0], err.value.errors[0]
    assert elapsed < 120, elapsed


def test_torchrun_store_wait_names_the_silent_ranks() -> None:
    """Under torchrun, gloo's connection of a new group waits for one store key per peer, named by
    the peer's rank; a timed-out wait names the ranks that never came."""
    from lightning_parallelctx.lightning.fault_guard import _rendezvous_note, silent_ranks_in_store_wait

    assert silent_ranks_in_store_wait("wait timeout after 15000ms, keys: /pctx_world1//0//cpu//0/1") == [1]
    assert silent_ranks_in_store_wait("wait timeout after 9ms, keys: /a/2, /a/3") == [2, 3]
    assert silent_ranks_in_store_wait("Connection closed by peer") == []
    note = _rendezvous_note(RuntimeError("wait timeout after 15000ms, keys: /pctx_world1//0//cpu//0/2"))
    assert note is not None and "rank(s) [2] never joined the creation of the process group" in note


# rank 1's join limit, and what it says: first itself naming rank 2 (rank 0 still waits), then
# rank 0's end (rank 0 gave up first and took its store with it).
RANK1_SAYS = {1.5: r"rank 1: not all 3 processes reached the rendezvous at 127.0.0.1:\d+ within 1 s: rank\(s\) \[2\] "
                   r"never connected",
              4.0: r"rank 1: lost the rendezvous store of rank 0 at 127.0.0.1:\d+ while waiting for the other ranks "
                   r".*Rank 0 failed or gave up first"}


@pytest.mark.parametrize("rank1_join", sorted(RANK1_SAYS))
def test_rendezvous_names_the_ranks_that_never_connected(rank1_join: float) -> None:
    """Rank 0 of 3 (here, in this process) with rank 1 connecting (a thread) and rank 2 never coming:
    rank 0 fails within its 3 s naming rank 2; rank 1, which waits for every rank too, fails as well."""
    import threading

    from lightning_parallelctx.errors import RendezvousError
    from lightning_parallelctx.launchers import LaunchInfo
    from lightning_parallelctx.rendezvous import _open_store, find_free_port

    port = find_free_port()

    def info(rank: int) -> LaunchInfo:
        return LaunchInfo("torchrun", rank, 3, rank, 3, 0, 1, "127.0.0.1", port)

    errors: list[str] = []

    def rank1() -> None:
        time.sleep(0.5)  # after rank 0 listens
        try:
            _open_store(info(1), timedelta(seconds=10), timedelta(seconds=rank1_join))
        except RendezvousError as err:
            errors.append(str(err))

    client = threading.Thread(target=rank1, daemon=True)
    client.start()
    start = time.monotonic()
    with pytest.raises(RendezvousError, match=r"not all 3 processes reached the rendezvous at 127.0.0.1:\d+ within 3 s: "
                                              r"rank\(s\) \[2\] never connected"):
        _open_store(info(0), timedelta(seconds=3), timedelta(seconds=3))
    client.join(10)
    assert time.monotonic() - start < 10
    assert len(errors) == 1 and re.search(RANK1_SAYS[rank1_join], errors[0]), errors


def test_a_slow_start_is_let_through_by_the_rendezvous_timeout_alone() -> None:
    """rendezvous_timeout (join) and timeout (the store's operations) are separate: rank 1 arrives
    after 3 s, later than the 1 s timeout but within the 30 s join limit, and the world forms; a
    key that never comes still fails after about 1 s on both ranks, not 30."""
    import threading

    from lightning_parallelctx.launchers import LaunchInfo
    from lightning_parallelctx.rendezvous import _open_store, find_free_port

    port = find_free_port()
    ops, join = timedelta(seconds=1), timedelta(seconds=30)
    stores: dict[int, object] = {}

    def rank1() -> None:
        time.sleep(3.0)
        stores[1] = _open_store(LaunchInfo("torchrun", 1, 2, 1, 2, 0, 1, "127.0.0.1", port), ops, join)

    client = threading.Thread(target=rank1, daemon=True)
    client.start()
    start = time.monotonic()
    stores[0] = _open_store(LaunchInfo("torchrun", 0, 2, 0, 2, 0, 1, "127.0.0.1", port), ops, join)
    assert time.monotonic() - start >= 2.5  # rank 0 did wait for the late rank
    client.join(30)
    assert set(stores) == {0, 1}
    for rank, store in stores.items():
        store.set(f"hello{rank}", "1")
    for rank, store in stores.items():
        assert store.get(f"hello{1 - rank}") == b"1"
        begin = time.monotonic()
        with pytest.raises(RuntimeError, match="(?i)time"):
            store.get("never-set")
        assert time.monotonic() - begin < 10, f"rank {rank}: the store's operations kept the join limit"
