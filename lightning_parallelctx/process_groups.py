"""Creating this rank's process groups, and only those.

Every rank walks the modes in one fixed order and calls ``new_group(..., use_local_synchronization=
True)`` only for the group it belongs to, so a rank makes a constant number of calls whatever the
world size (Megatron-core and OSLO make every rank create every group: O(world) calls). The
deadlock docs/traps.md #15 warns about cannot happen: every member of a group reaches it after
finishing the same earlier modes, whose groups it also belongs to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import timedelta

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


@contextlib.contextmanager
def _group_namespace(prefix: str) -> Iterator[None]:
    """Prefix the names torch gives locally-synchronised groups.

    torch names such a group by a hash of its ranks alone, and its rendezvous keys live under that
    name in the default store. After destroy(), a rebuilt group of the same ranks would meet the
    previous build's stale keys and hang (docs/traps.md #18); a per-build prefix keeps them apart.
    """
    original = getattr(c10d, "_process_group_name", None)
    if original is None:  # a torch without the hook: names are then torch's own
        yield
        return

    def named(ranks, use_hashed_name):  # noqa: ANN001 - torch's private signature
        name = original(ranks, use_hashed_name=use_hashed_name)
        return type(name)(prefix + name) if use_hashed_name else name

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
