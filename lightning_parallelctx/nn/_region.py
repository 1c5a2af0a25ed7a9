"""Entering a tensor-parallel region once per input, however many column layers read it.

Attention's q, k and v projections (or any column layers side by side) read the same input. Each
layer entering the region on its own costs one collective per layer: a ``copy`` whose backward
all-reduces, or with sequence parallelism an ``all_gather`` (and a reduce-scatter backward). Megatron
avoids this by fusing q, k, v into one weight; we keep separate layers and instead reuse the
entered tensor: when a column layer is handed the very tensor the previous one entered (same
object, not modified in place since, same group and arguments, same grad mode), it reads the
previous layer's result. Autograd then sums the consumers' gradients before the single backward
collective: all-reduce(g_q + g_k + g_v) instead of all-reduce(g_q) + all-reduce(g_k) +
all-reduce(g_v), equal up to fp32 round-off, one collective instead of three.

The entered tensor is never handed to user code (the layer feeds it straight to ``F.linear``,
which does not modify its input). The input is held weakly; an all-gathered tensor too, so it
never outlives its graph; a copy's result, which shares the input's storage, is held until the
next entry. Under ``torch.compile`` the reuse is skipped (the compiled graph decides itself).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch


class _LastEntry:
    """The last (input, key) -> entered tensor, held weakly."""

    def __init__(self) -> None:
        self.key: Any = None
        self.x: "weakref.ref[torch.Tensor] | None" = None
        self.y: "torch.Tensor | weakref.ref[torch.Tensor] | None" = None
        self.version = -1

    def lookup(self, x: torch.Tensor, key: Any) -> torch.Tensor | None:
        if self.x is None or self.x() is not x or x._version != self.version or self.key != key:
            return None
        return self.y if isinstance(self.y, torch.Tensor) else self.y()

    def store(self, x: torch.Tensor, key: Any, y: torch.Tensor, hold: bool) -> None:
        self.key, self.version = key, x._version
        self.x = weakref.ref(x)
        # A weak reference to the entered tensor dies with its Python object, which F.linear does
        # not keep (it saves a reshaped view for 3-d inputs). ``hold`` keeps it: right for a copy,
        # which aliases x's storage (no memory of its own), and is dropped with the next entry.
        self.y = y if hold else weakref.ref(y)


_LAST = _LastEntry()


def enter_region(x: torch.Tensor, key: tuple, enter: Callable[[torch.Tensor], torch.Tensor],
                 aliases_input: bool = False) -> torch.Tensor:
    """``enter(x)``, or the tensor the last call entered if ``x`` and ``key`` are the same.

    ``key`` must name everything ``enter`` depends on besides ``x`` (the collective, the group,
    the dims and sizes); the grad mode and ``x.requires_grad`` are added here. ``aliases_input``:
    ``enter``'s result shares x's storage (copy), so holding it costs no memory.
    """
    if torch.compiler.is_compiling():
        return enter(x)
    key = (*key, torch.is_grad_enabled(), x.requires_grad)
    y = _LAST.lookup(x, key)
    if y is None:
        y = enter(x)
        _LAST.store(x, key, y, hold=aliases_input)
    return y
