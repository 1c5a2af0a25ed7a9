"""Data-parallel gradient synchronisation: the library's bucketed hook and the handler registry.

Example::

    from lightning_parallelctx.grad_sync import get_gradient_handler
    handler = get_gradient_handler("bucketed", bucket_cap_mb=25)   # or "ddp", "allreduce", a class...
    model = handler.setup(model, ctx)      # registers the hooks; DDP would return its wrapper
    loss.backward()
    handler.finish()                       # all buckets reduced: clip, then optimizer.step()

See docs/grad_sync.md.
"""

from .base import (
    DEFAULT_GRADIENT_HANDLER,
    GradientHandler,
    GradientHandlerSpec,
    available_gradient_handlers,
    get_gradient_handler,
    register_gradient_handler,
)
from .handlers import (
    BucketedGradientHandler,
    DDPGradientHandler,
    FlatAllReduceGradientHandler,
)
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
