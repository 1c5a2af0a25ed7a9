"""lightning-parallelctx: data, tensor, pipeline, sequence and expert parallelism for Lightning."""

from .context import ParallelContext
from .errors import LauncherError, ModeNotFoundError, ParallelConfigError, ParallelCtxError, RendezvousError
from .guard import fault_guard
from .initializers import ProcessGroupInitializer, register_mode
from .layout import RankLayout
from .mode import ParallelMode

# Importing the Lightning integration registers the strategy name "parallelctx" (once).
from .lightning import ParallelCtxEnvironment, ParallelCtxStrategy  # noqa: E402

__all__ = [
    "LauncherError",
    "ModeNotFoundError",
    "ParallelConfigError",
    "ParallelContext",
    "ParallelCtxEnvironment",
    "ParallelCtxError",
    "ParallelCtxStrategy",
    "ParallelMode",
    "ProcessGroupInitializer",
    "RankLayout",
    "RendezvousError",
    "fault_guard",
    "register_mode",
]
__version__ = "0.1.0"
