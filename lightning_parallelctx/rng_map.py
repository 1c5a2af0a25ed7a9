"""Which saved rank's random stream a rank of another layout continues (rank math, no communication).

A random stream (the default generator, or one of the per-mode streams of ``random.py``) is
identical on some ranks and differs on others: the ``"tensor"`` stream differs across TENSOR ranks
and is identical across DATA ranks; the default generator is usually identical everywhere. Which
axes a stream varies over is read from the saved states themselves (:func:`varying_axes`), not from
how the stream was seeded: draws change it too (pipeline stages draw for different layers).

The rule at load (:func:`source_rank`): a stream that varies over axes ``A`` has a counterpart at
the new layout when every axis in ``A`` has the same size there; the rank at coordinates ``c`` then
continues the stream of the saved rank with the same coordinates on ``A`` (0 on the other axes,
where every saved rank holds the same state). So a stream identical on every rank comes back at any
layout; a stream per tensor rank comes back when the tensor size is unchanged (tp2-dp2 -> tp2-pp2,
another axis order), not at tp4 or tp1, where no saved stream made the new ranks' draws. The
invariants hold either way: ranks that must draw alike (same coordinates on ``A``) get the same
state, ranks that must differ get different ones.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from .layout import RankLayout
from .mode import AXES


def _determined_by(digests: Sequence[Hashable], layout: RankLayout, axes: Sequence[str]) -> bool:
    """Whether equal coordinates on ``axes`` imply equal digests (``digests[r]`` for global rank r)."""
    seen: dict[tuple[int, ...], Hashable] = {}
    for rank, digest in enumerate(digests):
        coords = layout.coords(rank)
        key = tuple(coords[a] for a in axes)
        if seen.setdefault(key, digest) != digest:
            return False
    return True


def varying_axes(digests: Sequence[Hashable], layout: RankLayout) -> tuple[str, ...]:
    """Axes (of size > 1) whose coordinates determine the stream's state, ``digests[r]`` being global
    rank r's: one at a time, an axis is dropped when the rest still determine every state."""
    if len(digests) != layout.world_size:
        raise ValueError(f"{len(digests)} digests for a layout of {layout.world_size} ranks")
    axes = [a for a in AXES if layout.sizes[a] > 1]
    for axis in list(axes):
        rest = [a for a in axes if a != axis]
        if _determined_by(digests, layout, rest):
            axes = rest
    return tuple(axes)


def source_rank(axes: Sequence[str], saved: RankLayout, new: RankLayout, rank: int) -> int | None:
    """The saved global rank whose stream (varying over ``axes``) global ``rank`` of ``new``
    continues; None when an axis in ``axes`` changed size (no saved stream has a counterpart)."""
    if any(saved.sizes[a] != new.sizes[a] for a in axes):
        return None
    coords = new.coords(rank)
    return saved.rank_of(**{a: coords[a] for a in axes})


def sources(axes_by_stream: Mapping[str, Sequence[str]], saved: RankLayout, new: RankLayout,
            rank: int) -> dict[str, int | None]:
    """:func:`source_rank` for every stream."""
    return {name: source_rank(axes, saved, new, rank) for name, axes in axes_by_stream.items()}
