"""Creating this rank's process groups, and only those.

Every rank walks the modes in one fixed order and calls ``new_group(..., use_local_synchronization=
True)`` only for the group it belongs to, so a rank makes a constant number of calls whatever the
world size (Megatron-core and OSLO make every rank create every group: O(world) calls). The
deadlock docs/traps.md #15 warns about cannot happen: every member of a group reaches it after
finishing the same earlier modes, whose groups it also belongs to.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from datetime import timedelta

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


#: The longest group name that costs no memory per collective. torch's flight recorder (on for gloo
#: in torch 2.13) copies the group's name into its entry for every collective and keeps the entries;
#: a name longer than libstdc++'s 15-character inline string is a heap allocation per entry, left
#: between the tensors' buffers, and the heap then grows step after step without bound. Measured with
#: an FSDP2 + tensor-parallel model (benchmarks/bench_dtensor.py): torch's 40-character hashed names
#: (plus our prefix) grew the main heap by about 2.3 MB per step, 15-character names not at all, nor
#: did the long names with TORCH_FR_BUFFER_SIZE=0 (docs/traps.md #30).
MAX_GROUP_NAME_LEN = 15


def short_group_name(namespace: str, ranks: Sequence[int]) -> str:
    """The name of this build's group over ``ranks``: the same on every member (it prefixes the
    group's rendezvous keys in the store), different for another rank set or another build
    (``namespace``), and at most :data:`MAX_GROUP_NAME_LEN` characters. 84 bits of SHA-1: distinct
    for any number of groups a world can have; "p" keeps it apart from torch's own names (digits
    or 40 hex digits)."""
    digest = hashlib.sha1(f"{namespace}|{','.join(str(int(r)) for r in ranks)}".encode()).digest()
    return "p" + base64.urlsafe_b64encode(digest).decode()[: MAX_GROUP_NAME_LEN - 1]


@contextlib.contextmanager
def _group_namespace(prefix: str) -> Iterator[None]:
    """Name the locally-synchronised groups created inside by :func:`short_group_name`.

    torch names such a group by a hash of its ranks alone, and its rendezvous keys live under that
    name in the default store. After destroy(), a rebuilt group of the same ranks would meet the
    previous build's stale keys and hang (docs/traps.md #18); a per-build namespace keeps them apart.
    """
    original = getattr(c10d, "_process_group_name", None)
    if original is None:  # a torch without the hook: names are then torch's own
        yield
        return

    def named(ranks, use_hashed_name):  # noqa: ANN001 - torch's private signature
        name = original(ranks, use_hashed_name=use_hashed_name)
        return type(name)(short_group_name(prefix, ranks)) if use_hashed_name else name

    c10d._process_group_name = named
    try:
        yield
    finally:
        c10d._process_group_name = original


class GroupFactory:
    """Hands out process groups by rank set, creating each distinct set at most once.

    The whole world reuses the default group; a size-1 set shares one lazily made singleton
    group; identical rank sets of different modes (dense_replica == data when sp = ep = 1) share
    one group object.
    """

    def __init__(self, namespace: str, timeout: timedelta, backend: str | None = None):
        self.namespace = namespace
        self.timeout = timeout
        self.backend = backend
        self.new_group_calls = 0
        self._groups: dict[tuple[int, ...], dist.ProcessGroup] = {}

    def get(self, ranks: Sequence[int], *, create: bool = True) -> dist.ProcessGroup | None:
        key = tuple(ranks)
        if len(key) == dist.get_world_size():
            return dist.group.WORLD
        if key not in self._groups:
            if not create:
                return None
            with _group_namespace(self.namespace):
                group = dist.new_group(
                    list(key), timeout=self.timeout, backend=self.backend, use_local_synchronization=True
                )
            self.new_group_calls += 1
            self._groups[key] = group
        return self._groups[key]

    def destroy(self) -> None:
        for group in self._groups.values():
            if group is not None and group is not dist.group.WORLD:
                with contextlib.suppress(Exception):  # already gone if WORLD was destroyed first
                    dist.destroy_process_group(group)
        self._groups.clear()
