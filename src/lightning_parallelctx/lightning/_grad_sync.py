"""The one seam through which the strategy synchronises gradients.

The strategy only ever calls ``make_gradient_handler(spec)`` and the handler API
(``setup``/``no_sync``/``finish``/``remove``) of :mod:`lightning_parallelctx.grad_sync`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..markers import is_expert, is_sequence_parallel

try:
    from ..grad_sync import GradientHandler, get_gradient_handler
except ImportError:  # TEMPORARY: issue 5 (lightning_parallelctx.grad_sync) has not landed yet
    GradientHandler = None  # type: ignore[assignment,misc]
    get_gradient_handler = None  # type: ignore[assignment]

__all__ = ["GradientHandler", "check_gradient_handler_spec", "make_gradient_handler"]


def check_gradient_handler_spec(spec: Any) -> None:
    """Fail at strategy construction, not at ``fit``, for a handler that cannot be built."""
    if GradientHandler is None:
        if not isinstance(spec, (str, Mapping)):
            raise TypeError(f"gradient_handler={spec!r} must be a handler name or a class_path mapping")
        return
    if not isinstance(spec, (str, Mapping, GradientHandler)) and not (
        isinstance(spec, type) and issubclass(spec, GradientHandler)
    ):
        raise TypeError(
            f"gradient_handler={spec!r} ({type(spec).__name__}) must be a handler name such as 'bucketed', "
            f"'ddp' or 'allreduce', a {{'class_path': ..., 'init_args': {{...}}}} mapping, or a GradientHandler "
            f"class or instance"
        )
    if not isinstance(spec, GradientHandler):
        make_gradient_handler(spec)  # unknown names / bad init_args raise here


def make_gradient_handler(spec: Any) -> Any:
    if get_gradient_handler is None:
        return _InterimAllReduce()
    return get_gradient_handler(spec)


class _InterimAllReduce:
    """TEMPORARY stand-in until grad_sync lands: one all-reduce per gradient after backward.

    Dense gradients are averaged over 'dense_replica', expert ones over 'expert_replica', and
    sequence-parallel-marked ones are also summed over 'tensor' (CONTRACT.md, "Who holds what").
    """

    def __init__(self) -> None:
        self._require_sync = True
        self._dirty = False
        self._hooks: list[Any] = []
        self._params: list[torch.nn.Parameter] = []
        self._ctx: Any = None

    def setup(self, module: torch.nn.Module, ctx: Any) -> torch.nn.Module:
        self._ctx = ctx
        self._params = [p for p in module.parameters() if p.requires_grad]
        for p in self._params:
            self._hooks.append(p.register_post_accumulate_grad_hook(self._mark))
        return module

    def _mark(self, _: torch.Tensor) -> None:
        if self._require_sync:
            self._dirty = True

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        previous, self._require_sync = self._require_sync, False
        try:
            yield
        finally:
            self._require_sync = previous

    def finish(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        ctx = self._ctx
        for p in self._params:
            if p.grad is None:
                continue
            mode = "expert_replica" if is_expert(p) else "dense_replica"
            if ctx.get_world_size(mode) > 1:
                dist.all_reduce(p.grad, group=ctx.get_group(mode))
                p.grad.div_(ctx.get_world_size(mode))
            if is_sequence_parallel(p) and ctx.get_world_size("tensor") > 1:
                dist.all_reduce(p.grad, group=ctx.get_group("tensor"))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
