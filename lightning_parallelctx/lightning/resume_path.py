"""Finish a checkpoint replacement a killed process left half done, before Lightning picks ``ckpt_path``.

Replacing ``X`` (``last.ckpt`` is saved again every time) ends with two renames (atomic.py):
``X`` -> ``.X.old``, then the marked ``.X.partial`` -> ``X``. A process killed between them leaves no
``X``. Lightning's ``ckpt_path="last"`` lists only ``last*.ckpt`` names: it then finds none and trains
from scratch with a warning, or picks an older ``last-v1.ckpt``: silent loss of the training done.

Lightning turns ``ckpt_path`` into a file in ``Trainer._fit_impl`` (``_validate_impl`` ...), before
the strategy's ``setup_environment``: no process group exists yet, so the ranks cannot agree by a
collective. The one strategy code every process runs before that is the launcher's ``launch``:
Lightning's launcher in the process that starts the others (:class:`RecoveringLauncher`),
:class:`InPlaceLauncher` in every process another launcher started (our children, torchrun, srun,
mpirun). Each rank there calls :func:`atomic.recover`, which is safe to run everywhere at once: the
rename is atomic, one rank's succeeds and the others find ``X`` complete.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies.launchers.launcher import _Launcher

from . import atomic
from .fault_guard import ParallelCtxLauncher

_KEYWORDS = ("last", "best", "hpc")
_LEFTOVER = re.compile(r"\.(.+)\.(partial|old)")


def requested_ckpt_path(function: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """The ``ckpt_path`` the user passed to fit/validate/test/predict (Lightning's launcher gets the
    ``_fit_impl``-style function and its arguments; positions differ between them)."""
    try:
        return inspect.signature(function).bind_partial(*args, **kwargs).arguments.get("ckpt_path")
    except (TypeError, ValueError):  # not a trainer function we know: nothing to recover
        return None


def _local(path: Any) -> Path | None:
    text = str(path)
    return None if "://" in text else Path(text)  # remote storage: DCP directories are local here


def _checkpoint_dirs(trainer: Any, want_last: bool) -> list[Path]:
    """Where Lightning looks for "last": each ModelCheckpoint's directory and OnExceptionCheckpoint's."""
    dirs = []
    for cb in getattr(trainer, "checkpoint_callbacks", []) if trainer is not None else []:
        if isinstance(cb, ModelCheckpoint):
            where = cb.dirpath
            resolve = getattr(cb, "_ModelCheckpoint__resolve_ckpt_dir", None)
            if where is None and want_last and resolve is not None:
                # What Lightning's own "last" lookup calls next (reading the loggers' version), only
                # when it will: earlier, each rank would fix its logger's version on its own.
                where = resolve(trainer)
        else:
            where = Path(cb.ckpt_path).parent if getattr(cb, "ckpt_path", None) else None
        if where is not None and (local := _local(where)) is not None:
            dirs.append(local)
    return dirs


def _leftovers(directory: Path) -> Iterable[Path]:
    try:
        names = sorted(p.name for p in directory.iterdir())
    except OSError:  # no such directory yet
        return []
    return sorted({directory / m[1] for n in names if (m := _LEFTOVER.fullmatch(n))})


def recover_before_resolve(trainer: Any, ckpt_path: Any) -> list[Path]:
    """Every checkpoint Lightning may resolve ``ckpt_path`` to whose replacement was cut short is
    moved back to its name (the newest complete copy); returns those this process moved."""
    finals: list[Path] = []
    if ckpt_path is not None and str(ckpt_path) not in _KEYWORDS and (local := _local(ckpt_path)) is not None:
        finals.append(local)
    for directory in _checkpoint_dirs(trainer, want_last=ckpt_path is not None and str(ckpt_path) == "last"):
        finals.extend(_leftovers(directory))
    return [f for f in dict.fromkeys(finals) if atomic.recover(f)]


class InPlaceLauncher(_Launcher):
    """Runs the trainer function in this process and starts nothing (under torchrun, srun, mpirun or
    our own launcher's children): it exists so that :func:`recover_before_resolve` runs first."""

    @property
    def is_interactive_compatible(self) -> bool:
        return True

    def launch(self, function: Callable[..., Any], *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        recover_before_resolve(trainer, requested_ckpt_path(function, args, kwargs))
        return function(*args, **kwargs)

    def kill(self, signum: Any) -> None:
        pass  # no processes of its own


class RecoveringLauncher(ParallelCtxLauncher):
    """:class:`ParallelCtxLauncher` that recovers before it starts the other local processes."""

    def launch(self, function: Any, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        recover_before_resolve(trainer, requested_ckpt_path(function, args, kwargs))
        return super().launch(function, *args, trainer=trainer, **kwargs)
