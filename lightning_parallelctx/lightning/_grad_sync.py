"""The one seam through which the strategy synchronises gradients.

The strategy only ever calls :func:`make_gradient_handler` and the handler API of
:mod:`lightning_parallelctx.grad_sync` (``setup`` / ``no_sync`` / ``finish`` / ``remove``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ..errors import ParallelConfigError
from ..grad_sync import GradientHandler, get_gradient_handler

__all__ = ["GradientHandler", "check_gradient_handler_spec", "check_manual_optimization", "make_gradient_handler"]


def check_gradient_handler_spec(spec: Any) -> None:
    """Fail at strategy construction, not at ``fit``, for a handler that cannot be built."""
    if not isinstance(spec, (str, Mapping, GradientHandler)) and not (
        isinstance(spec, type) and issubclass(spec, GradientHandler)
    ):
        raise TypeError(
            f"gradient_handler={spec!r} ({type(spec).__name__}) must be a handler name such as 'bucketed', "
            f"'ddp' or 'allreduce', a {{'class_path': ..., 'init_args': {{...}}}} mapping, or a GradientHandler "
            f"class or instance"
        )
    if not isinstance(spec, GradientHandler):
        make_gradient_handler(spec)  # unknown names and bad init_args raise here


def make_gradient_handler(spec: Any) -> GradientHandler:
    """A fresh handler per ``fit`` (a handler holds hooks on one module). An instance (what
    LightningCLI builds from ``class_path``/``init_args``) is a template: each call copies it, so a
    second ``fit`` never reuses a handler still attached to the previous one's module."""
    if isinstance(spec, GradientHandler):
        return copy.deepcopy(spec)
    return get_gradient_handler(spec)


def check_manual_optimization(handler: GradientHandler, module: Any) -> None:
    """At the start of fit, on every rank alike (no collective, so no rank waits for another):
    refuse manual optimization with a handler that cannot synchronise it."""
    if getattr(module, "automatic_optimization", True) or handler.supports_manual_optimization:
        return
    raise ParallelConfigError(
        f"gradient handler {type(handler).__name__} ({handler!r}) does not support manual optimization "
        f"({type(module).__name__}.automatic_optimization=False): it declares supports_manual_optimization="
        f"False. Fix: use gradient_handler='bucketed' (the default), 'allreduce' or 'ddp', which synchronise "
        f"after every manual_backward outside no_sync, or set automatic_optimization=True"
    )
