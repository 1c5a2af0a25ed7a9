"""Node boundaries: which tensor/expert/sequence groups span nodes, and the warning (pure, no processes)."""

from __future__ import annotations

import warnings

from lightning_parallelctx.layout import RankLayout
from lightning_parallelctx.topology import groups_spanning_nodes, warn_if_groups_span_nodes


def test_groups_that_fit_in_a_node_do_not_warn() -> None:
    layout = RankLayout.build(8, tensor=2, expert=2)  # tp innermost: tp pairs and ep pairs stay in 4-rank nodes
    assert groups_spanning_nodes(layout, ranks_per_node=4) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_groups_span_nodes(layout, 4, rank=0) is None
        assert warn_if_groups_span_nodes(layout, None, rank=0) is None  # unknown: nothing to say
        assert warn_if_groups_span_nodes(layout, 8, rank=0) is None  # one node


def test_tensor_group_across_two_nodes_warns_on_rank_0_only() -> None:
    layout = RankLayout.build(4, tensor=4)  # two nodes of 2: the tp group {0,1,2,3} crosses them
    assert groups_spanning_nodes(layout, ranks_per_node=2) == {"tensor": [(0, 1, 2, 3)]}
    import pytest

    with pytest.warns(UserWarning, match=r"tensor groups \(0, 1, 2, 3\) span several nodes \(2 processes per node\).*Fix: "):
        warn_if_groups_span_nodes(layout, 2, rank=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_groups_span_nodes(layout, 2, rank=1) is not None  # same text, not printed twice


def test_order_decides_what_spans_nodes() -> None:
    # dp innermost puts the tensor pairs 4 apart: every one of them crosses the 4-rank nodes.
    layout = RankLayout.build(8, tensor=2, order="dp-tp-sp-ep-pp")
    assert groups_spanning_nodes(layout, 4)["tensor"] == [(0, 4), (1, 5), (2, 6), (3, 7)]
