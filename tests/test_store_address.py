"""The rendezvous store listens on the rendezvous host's address only (127.0.0.1 for a local run),
never on every interface as torch's own TCPStore does: checked in the kernel's socket table."""

from __future__ import annotations

import socket

import pytest

from lightning_parallelctx.errors import RendezvousError
from lightning_parallelctx.rendezvous import listen_address
from lightning_parallelctx.testing import spawn

pytestmark = pytest.mark.timeout(240)


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on ``port`` (from /proc/net/tcp, IPv4 and IPv6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A = LISTEN
                continue
            if width == 8:
                found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
            else:
                found.add("::" if int(address, 16) == 0 else address)
    return found


def test_listen_address_rules() -> None:
    assert listen_address("127.0.0.1", single_node=True) == "127.0.0.1"
    assert listen_address("localhost", single_node=True) == "127.0.0.1"
    # A name that resolves to loopback here, for a job on several nodes: the other nodes reach this
    # host by its network address, so only then every interface (torch's behaviour).
    assert listen_address("localhost", single_node=False) == "0.0.0.0"
    with pytest.raises(RendezvousError, match=r"rendezvous host 'no-such-host\.invalid' does not resolve.*Fix: set MASTER_ADDR"):
        listen_address("no-such-host.invalid", single_node=True)


def _context_store(rank: int, world_size: int) -> set[str] | None:
    import os

    from lightning_parallelctx import ParallelContext

    ctx = ParallelContext.from_env(timeout=60)
    found = listening_addresses(int(os.environ["MASTER_PORT"])) if rank == 0 else None
    ctx.destroy()
    return found


def _lightning_store(rank: int, world_size: int) -> set[str] | None:
    import os

    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_parallelctx.lightning import ParallelCtxStrategy

    found: list = []

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            if self.global_rank == 0:
                found.append(listening_addresses(int(os.environ["MASTER_PORT"])))
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(accelerator="cpu", devices=world_size, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         strategy=ParallelCtxStrategy(print_layout=False, timeout=60))
    trainer.fit(Model(), DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4))
    return found[0] if found else None


@pytest.mark.parametrize("fn", [_context_store, _lightning_store], ids=["ParallelContext", "strategy"])
def test_store_listens_on_loopback_only_for_a_local_run(fn) -> None:
    assert spawn(fn, 2, timeout=180)[0] == {"127.0.0.1"}
