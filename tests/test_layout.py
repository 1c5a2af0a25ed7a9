"""The pure rank layout: no processes, any scale."""

import itertools

import numpy as np
import pytest

from lightning_parallelctx import ParallelConfigError, RankLayout
from lightning_parallelctx.layout import parse_order
from lightning_parallelctx.mode import AXES


def brute_groups(layout: RankLayout, axes: tuple[str, ...]) -> set[tuple[int, ...]]:
    """Group ranks by their coordinates outside ``axes``: the definition, without any cleverness."""
    buckets: dict[tuple, list[int]] = {}
    for r in range(layout.world_size):
        c = layout.coords(r)
        buckets.setdefault(tuple(c[a] for a in AXES if a not in axes), []).append(r)
    return {tuple(sorted(g)) for g in buckets.values()}


LAYOUTS = [
    dict(world=4, tensor=2),
    dict(world=8, tensor=2, pipeline=2),
    dict(world=8, tensor=2, sequence=2),
    dict(world=8, tensor=2, expert=2),
    dict(world=8),
    dict(world=16, tensor=2, pipeline=2, sequence=2, order="dp-tp-sp-ep-pp"),
    dict(world=48, tensor=2, pipeline=3, sequence=2, expert=2, order="pp-ep-tp-dp-sp"),
]


def test_seed_example():
    layout = RankLayout.build(4, tensor=2, pipeline=1, data=2)
    assert [(layout.coords(r)["tensor"], layout.coords(r)["data"]) for r in range(4)] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert layout.groups("tensor").tolist() == [[0, 1], [2, 3]]
    assert layout.groups("data").tolist() == [[0, 2], [1, 3]]


@pytest.mark.parametrize("spec", LAYOUTS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_groups_match_definition_and_partition(spec):
    spec = dict(spec)
    layout = RankLayout.build(spec.pop("world"), **spec)
    combos = [c for n in range(0, 4) for c in itertools.combinations(AXES, n)]
    for axes in combos:
        groups = layout.groups(axes)
        as_set = {tuple(g) for g in groups.tolist()}
        assert as_set == brute_groups(layout, axes), axes
        flat = groups.reshape(-1)
        assert sorted(flat.tolist()) == list(range(layout.world_size))  # a partition
        for r in range(layout.world_size):
            mine = layout.group_of(r, axes)
            assert mine in as_set
            assert layout.local_rank(r, axes) == mine.index(r)


def test_coords_roundtrip_and_strides_follow_order():
    layout = RankLayout.build(48, tensor=2, pipeline=3, sequence=2, expert=2, order="pp-ep-tp-dp-sp")
    assert layout.strides["pipeline"] == 1 and layout.strides["sequence"] == 24
    for r in range(48):
        assert layout.rank_of(**layout.coords(r)) == r


def test_65536_ranks():
    layout = RankLayout.build(65536, tensor=8, pipeline=8, sequence=2, expert=4)
    assert layout.sizes["data"] == 128
    data = layout.groups("data")
    assert data.shape == (512, 128)
    assert np.array_equal(np.sort(data.reshape(-1)), np.arange(65536))
    # The definition, vectorised: a rank's dense-replica group is every rank with its tp and pp coordinates.
    everyone = np.arange(65536)
    tp_of = (everyone // layout.strides["tensor"]) % 8
    pp_of = (everyone // layout.strides["pipeline"]) % 8
    for r in (0, 1, 12345, 65535):
        assert layout.group_of(r, "data") == tuple(data[np.nonzero((data == r).any(1))[0][0]].tolist())
        c = layout.coords(r)
        expected = everyone[(tp_of == c["tensor"]) & (pp_of == c["pipeline"])]
        assert layout.group_of(r, ("data", "sequence", "expert")) == tuple(expected.tolist())
        assert len(expected) == 128 * 2 * 4


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(world_size=8, tensor=2, data=3), ["= 6", "world size is 8", "dp=4"]),
        (dict(world_size=6, tensor=4), ["not divisible", "[1, 2, 3, 6]"]),
        (dict(world_size=8, tensor=0), ["tp=0", "at least 1"]),
        (dict(world_size=8, tensor=-2), ["tp=-2", "at least 1"]),
        (dict(world_size=8, tensor=2.0), ["tp=2.0", "positive integer"]),
        (dict(world_size=8, tensor=True), ["tp=True", "positive integer"]),
        (dict(world_size=8, pipeline="2"), ["pp='2'", "positive integer"]),
        (dict(world_size=8, order="tp-sp-ep-dp"), ["missing: ['pipeline']"]),
        (dict(world_size=8, order="tp-tp-ep-dp-pp"), ["repeated: ['tensor']"]),
    ],
)
def test_bad_sizes_and_orders_name_value_rule_and_fix(kwargs, words):
    with pytest.raises(ParallelConfigError) as err:
        RankLayout.build(**kwargs)
    for w in words:
        assert w in str(err.value)


def test_unknown_axis_in_order():
    with pytest.raises(Exception, match="'xp' is not a parallel axis"):
        parse_order("tp-xp-ep-dp-pp")
