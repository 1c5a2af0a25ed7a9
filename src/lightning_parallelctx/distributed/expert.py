"""Expert parallelism: route tokens to the ranks that hold their experts, and bring them back.

Experts are numbered globally and held in contiguous blocks: with ``E`` experts over an EXPERT
group of ``n`` ranks, rank ``r`` holds experts ``r * E/n ... (r + 1) * E/n - 1`` (the same rule as
``full.chunk(n, 0)[r]`` on a stacked expert weight).

``dispatch`` sorts tokens by expert, exchanges the per-rank counts (one small all-to-all), then
sends the tokens with one ``all_to_all_single``; ``combine`` is the exact inverse. Both are
differentiable: the backward of each all-to-all is the all-to-all with the counts swapped, so
expert weights get the gradient of every rank's tokens and token gradients return home.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ParallelCtxError
from ..mode import ParallelMode
from ._state import ContextLike, GroupInfo, group_info


@dataclass
class DispatchHandle:
    """What :func:`combine` needs to undo a :func:`dispatch`."""

    order: torch.Tensor  # the permutation that sorted the tokens by expert
    send_counts: list[int]  # tokens this rank sent to each rank
    recv_counts: list[int]  # tokens this rank received from each rank
    group: GroupInfo
    experts_per_rank: int


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], g: GroupInfo) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x, recv, send, group=g.group)
    return out


class _TokenAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, send: list[int], recv: list[int], g: GroupInfo) -> torch.Tensor:
        ctx.args = (send, recv, g)
        return _exchange(x, send, recv, g)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        send, recv, g = ctx.args
        return _exchange(grad, recv, send, g), None, None, None


def experts_per_rank(num_experts: int, g: GroupInfo) -> int:
    if num_experts % g.size:
        raise ParallelCtxError(
            f"num_experts={num_experts} is not divisible by the {g.mode!r} group size {g.size}; every "
            f"rank must hold the same number of experts"
        )
    return num_experts // g.size


def dispatch(tokens: torch.Tensor, expert_index: torch.Tensor, num_experts: int,
             mode: "ParallelMode | str" = ParallelMode.EXPERT, *,
             context: ContextLike | None = None) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
    """Send each token (a row of ``tokens``) to the rank holding expert ``expert_index[i]``.

    Returns ``(received_tokens, local_expert_index, handle)``: the tokens this rank must process,
    grouped by source rank (rank order) and, within a source, sorted by expert; the index of the
    expert each one is for among this rank's experts (0 .. experts_per_rank - 1); and the handle
    for :func:`combine`. For top-k routing, repeat each token k times first.
    """
    g = group_info(mode, context)
    per_rank = experts_per_rank(num_experts, g)
    expert_index = expert_index.reshape(-1)
    if expert_index.numel() != tokens.shape[0]:
        raise ParallelCtxError(f"expert_index has {expert_index.numel()} entries for {tokens.shape[0]} tokens")
    order = torch.argsort(expert_index, stable=True)
    ordered = tokens.index_select(0, order)  # differentiable gather; never touches tokens
    experts = expert_index.index_select(0, order)
    send = torch.bincount(torch.div(experts, per_rank, rounding_mode="floor"), minlength=g.size)
    if g.size == 1:
        return ordered, experts, DispatchHandle(order, send.tolist(), send.tolist(), g, per_rank)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=g.group)  # counts first: receivers size their buffers
    send_l, recv_l = send.tolist(), recv.tolist()
    received = _TokenAllToAll.apply(ordered, send_l, recv_l, g)
    local_ids = _exchange(experts, send_l, recv_l, g) - g.rank * per_rank
    return received, local_ids, DispatchHandle(order, send_l, recv_l, g, per_rank)


def combine(expert_output: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """Return processed tokens (rows in the order :func:`dispatch` delivered them) to their
    source ranks and restore the original token order."""
    out = expert_output
    if handle.group.size > 1:
        out = _TokenAllToAll.apply(expert_output, handle.recv_counts, handle.send_counts, handle.group)
    inverse = torch.empty_like(handle.order)
    inverse[handle.order] = torch.arange(handle.order.numel(), device=handle.order.device)
    return out.index_select(0, inverse)
