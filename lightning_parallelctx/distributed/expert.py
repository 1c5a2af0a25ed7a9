"""Expert parallelism: route tokens to the ranks that hold their experts, and bring them back.

Experts are numbered globally and held in contiguous blocks: with ``E`` experts over an EXPERT
group of ``n`` ranks, rank ``r`` holds experts ``r * E/n ... (r + 1) * E/n - 1`` (the same rule as
``full.chunk(n, 0)[r]`` on a stacked expert weight).

``dispatch`` sorts tokens by expert, exchanges the per-expert counts (one small all-to-all, from
which every receiver also knows which expert each arriving token is for), then sends the tokens
with one ``all_to_all_single``; ``combine`` is the exact inverse. Both are
differentiable: the backward of each all-to-all is the all-to-all with the counts swapped, so
expert weights get the gradient of every rank's tokens and token gradients return home.

Bad input on one rank (an ``expert_index`` outside ``[0, num_experts)``, of the wrong length or
dtype) is found locally, before any token moves. Raising there alone would leave the other ranks
blocked in the counts all-to-all until the backend's timeout; instead the rank sends the count -1
to every peer in that exchange, which it makes anyway (no extra collective), and then raises its
own error; every peer sees the -1 and raises naming that rank. No token is exchanged, and the group
stays usable.
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
    # One non-tensor argument, (send, recv, g): each extra argument to apply() costs ~0.3-0.5 us.
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, spec: tuple) -> torch.Tensor:
        ctx.spec = spec
        return _exchange(x, *spec)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        send, recv, g = ctx.spec
        return _exchange(grad, recv, send, g), None


def experts_per_rank(num_experts: int, g: GroupInfo) -> int:
    if num_experts % g.size:
        raise ParallelCtxError(
            f"num_experts={num_experts} is not divisible by the {g.mode!r} group size {g.size}; every "
            f"rank must hold the same number of experts. Fix: use a multiple of {g.size} experts "
            f"(e.g. {(num_experts // g.size + 1) * g.size}) or an expert_parallel_size that divides {num_experts}"
        )
    return num_experts // g.size


_BAD_INPUT = -1  # the count a rank with bad input sends to every peer instead of its token counts


def _input_error(tokens: torch.Tensor, expert_index: torch.Tensor, num_experts: int,
                 check_range: bool = True) -> str | None:
    """What is wrong with this rank's dispatch arguments, or None. Local: no communication.
    ``check_range=False`` leaves the id range to the caller (see :func:`_counts`)."""
    if expert_index.dtype.is_floating_point or expert_index.dtype.is_complex or expert_index.dtype == torch.bool:
        return (f"expert_index has dtype {expert_index.dtype}, but it must hold integer expert ids. Fix: pass "
                f"the router's indices (e.g. logits.topk(k).indices), or convert with .long()")
    if expert_index.numel() != tokens.shape[0]:
        return (f"expert_index has {expert_index.numel()} entries for {tokens.shape[0]} tokens, but every token "
                f"(row of tokens) needs exactly one expert id. Fix: for top-k routing repeat each token k times "
                f"(tokens.repeat_interleave(k, 0)) and flatten the k indices per token in the same order")
    if expert_index.numel() == 0 or not check_range:
        return None
    # One reduction (the single-rank path); the full mask is built only to describe an error.
    low, high = torch.aminmax(expert_index)
    if int(low) < 0 or int(high) >= num_experts:
        return _range_error(expert_index, num_experts)
    return None


def _counts(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor | None:
    """Tokens per expert, or None when an id is outside [0, num_experts). bincount already finds
    the ids' minimum and maximum: it refuses a negative id and grows its output past
    ``num_experts`` for a too-large one, so the range check costs nothing extra (a separate
    aminmax and its two reads were ~3 us of every dispatch)."""
    try:
        counts = torch.bincount(expert_index, minlength=num_experts)
    except RuntimeError:  # a negative id
        return None
    return counts if counts.shape[0] == num_experts else None


def _range_error(expert_index: torch.Tensor, num_experts: int) -> str:
    bad = (expert_index < 0) | (expert_index >= num_experts)
    values = torch.unique(expert_index[bad]).tolist()
    shown = ", ".join(map(str, values[:8])) + (f", ... ({len(values)} distinct)" if len(values) > 8 else "")
    return (f"expert_index holds {int(bad.sum())} id(s) outside [0, {num_experts}) with num_experts={num_experts}: "
            f"{shown}. Every expert id must be in 0..{num_experts - 1}. Fix: make the router score exactly "
            f"num_experts={num_experts} experts, or pass the num_experts it was built for")


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
    per_rank = experts_per_rank(num_experts, g)  # same arguments on every rank: raising alone is safe
    expert_index = expert_index.reshape(-1)
    error = _input_error(tokens, expert_index, num_experts, check_range=g.size == 1)
    if error is None and g.size > 1:
        # Counts per expert, not per rank: the receiver rebuilds each token's expert from them, so
        # the expert ids need no all-to-all of their own (two collectives per dispatch, not three).
        send = _counts(expert_index, num_experts)
        if send is None:
            error = _range_error(expert_index, num_experts)
    if error is not None:
        error = f"dispatch on rank {g.rank} of the {g.mode!r} group: {error}"
        if g.size == 1:
            raise ParallelCtxError(error)
        # Still take part in the counts exchange, so the peers fail with us instead of hanging.
        send = torch.full((num_experts,), _BAD_INPUT, dtype=torch.long, device=expert_index.device)
    else:
        order = torch.argsort(expert_index, stable=True)
        ordered = tokens.index_select(0, order)  # differentiable gather; never touches tokens
        if g.size == 1:
            counts = [int(expert_index.numel())]
            return ordered, expert_index.index_select(0, order), DispatchHandle(order, counts, counts, g, per_rank)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=g.group)  # counts first: receivers size their buffers
    if error is not None:
        raise ParallelCtxError(error)
    recv_by_src = recv.view(g.size, per_rank)  # [source rank, local expert]
    rows = recv_by_src.tolist()  # one read: the bad-input check and the per-rank totals
    bad_ranks = [src for src, row in enumerate(rows) if _BAD_INPUT in row]
    if bad_ranks:
        raise ParallelCtxError(
            f"dispatch: rank(s) {bad_ranks} of the {g.mode!r} group passed invalid expert_index/tokens (their own "
            f"error says what and how to fix it); no tokens were exchanged. Fix the input on those rank(s)"
        )
    send_l = send.view(g.size, per_rank).sum(1).tolist()
    recv_l = [sum(row) for row in rows]
    received = _TokenAllToAll.apply(ordered, (send_l, recv_l, g))
    # What arrives is grouped by source rank and, within a source, sorted by expert: token i lies in
    # segment s of the flat [source, local expert] counts, and its local expert is s % per_rank.
    # (A third of the cost of arange().repeat().repeat_interleave(); the known output size spares
    # repeat_interleave a read of its own.)
    local_ids = torch.repeat_interleave(recv, output_size=sum(recv_l)).remainder_(per_rank)
    return received, local_ids, DispatchHandle(order, send_l, recv_l, g, per_rank)


def combine(expert_output: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """Return processed tokens (rows in the order :func:`dispatch` delivered them) to their
    source ranks and restore the original token order."""
    out = expert_output
    if handle.group.size > 1:
        out = _TokenAllToAll.apply(expert_output, (handle.recv_counts, handle.send_counts, handle.group))
    inverse = torch.empty_like(handle.order)
    inverse[handle.order] = torch.arange(handle.order.numel(), device=handle.order.device)
    return out.index_select(0, inverse)
