"""Errors raised by lightning-parallelctx.

Every message names the offending value, the rule it breaks and how to fix it, so that a user
reading one rank's log among hundreds knows what to change without reading our source.
"""

from __future__ import annotations


class ParallelCtxError(RuntimeError):
    """Base class of every error this library raises on purpose."""


class ParallelConfigError(ParallelCtxError, ValueError):
    """Sizes, orders or modes that cannot describe a valid layout."""


class LauncherError(ParallelCtxError):
    """The launch environment is missing something or contradicts itself."""


class RendezvousError(ParallelCtxError):
    """Processes could not meet: a port in use, an unreachable host, a rank that never arrived."""


class ModeNotFoundError(ParallelConfigError, KeyError):
    """A mode that the context does not have."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""
