"""Data-parallel gradient synchronisation: the library's bucketed hook and the handler registry.

>>> from lightning_parallelctx.grad_sync import get_gradient_handler
>>> handler = get_gradient_handler("bucketed", bucket_cap_mb=25)   # or "ddp", "allreduce", a class...
>>> model = handler.setup(model, ctx)       # doctest: +SKIP
>>> loss.backward(); handler.finish(); optimizer.step()   # doctest: +SKIP
"""

from .base import (
    DEFAULT_GRADIENT_HANDLER,
    GradientHandler,
    GradientHandlerSpec,
    available_gradient_handlers,
    get_gradient_handler,
    register_gradient_handler,
)
from .handlers import BucketedGradientHandler, DDPGradientHandler, FlatAllReduceGradientHandler
from .hook import DataParallelGradientHook

__all__ = [
    "DEFAULT_GRADIENT_HANDLER",
    "BucketedGradientHandler",
    "DDPGradientHandler",
    "DataParallelGradientHook",
    "FlatAllReduceGradientHandler",
    "GradientHandler",
    "GradientHandlerSpec",
    "available_gradient_handlers",
    "get_gradient_handler",
    "register_gradient_handler",
]
