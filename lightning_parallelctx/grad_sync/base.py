"""The gradient-handler extension point: the base class and the registry of handler classes."""

from __future__ import annotations

import contextlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

import torch

from ..registry import default_name, register_class

if TYPE_CHECKING:
    from ..context import ParallelContext

__all__ = [
    "DEFAULT_GRADIENT_HANDLER",
    "GradientHandler",
    "GradientHandlerSpec",
    "available_gradient_handlers",
    "get_gradient_handler",
    "register_gradient_handler",
]

DEFAULT_GRADIENT_HANDLER = "bucketed"


class SyncSwitch:
    """The ``no_sync()`` switch that the handlers and the hook share."""

    _require_sync = True  # a class default: subclasses need not call an __init__ for it

    @property
    def require_sync(self) -> bool:
        """False inside :meth:`no_sync`."""
        return self._require_sync

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """No communication for backward passes run inside; gradients accumulate locally."""
        previous = self._require_sync
        self._require_sync = False
        try:
            yield
        finally:
            self._require_sync = previous


class GradientHandler(SyncSwitch, ABC):
    """How a module's gradients are synchronised across the ranks that hold replicas of it.

    Subclass it, implement :meth:`setup` and :meth:`finish`, and register the class with
    :func:`register_gradient_handler` (or name it by ``class_path``). The strategy calls:

    - ``module = handler.setup(module, ctx)`` once, before training; the returned module is the one
      to train (a wrapper, or ``module`` itself).
    - ``with handler.no_sync(): ...`` around micro-batches that must not communicate
      (gradient accumulation).
    - ``handler.finish()`` after the backward pass and before gradient clipping / the optimizer
      step: on return every gradient is synchronised. Idempotent, and safe when no backward ran.
    - ``handler.remove()`` to detach from the module.

    The strategy calls ``finish()`` after every backward pass (before ``on_after_backward`` and
    before ``manual_backward`` returns), so a handler whose ``finish`` does the reduction works
    with manual optimization as it is. With manual optimization the backward runs inside the
    training step (inside a wrapper's forward): the strategy calls ``before_backward(loss)`` first.
    A handler that cannot work that way sets ``supports_manual_optimization = False``, and the
    strategy refuses ``automatic_optimization=False`` at the start of fit.
    """

    #: False: refused with ``automatic_optimization=False`` (see above).
    supports_manual_optimization: bool = True

    @abstractmethod
    def setup(self, module: torch.nn.Module, ctx: ParallelContext | None) -> torch.nn.Module:
        """Attach to ``module``; return the module to train."""

    @abstractmethod
    def finish(self) -> None:
        """Wait until every gradient of the last synchronising backward is reduced."""


    def before_backward(self, loss: torch.Tensor) -> None:
        """Called before a backward pass that runs inside the training step (manual optimization)."""

    def scaled_backward(self, loss: torch.Tensor) -> contextlib.AbstractContextManager[torch.Tensor]:
        """``with handler.scaled_backward(loss) as seeded: seeded.backward()``: a handler that can
        fold its averaging into the backward's seed returns a tensor with ``loss``'s value and a
        scaled seed (and must then give the same gradients as ``loss.backward()`` + ``finish()``);
        by default ``loss`` itself."""
        return contextlib.nullcontext(loss)

    def remove(self) -> None:
        """Detach from the module (remove hooks). Safe to call twice."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ---------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[GradientHandler]] = {}

H = TypeVar("H", bound=type[GradientHandler])
GradientHandlerSpec = str | type[GradientHandler] | GradientHandler | Mapping[str, Any] | None


@overload
def register_gradient_handler(name: H) -> H: ...
@overload
def register_gradient_handler(name: str | None = None, cls: None = None, *,
                              override: bool = False) -> Callable[[H], H]: ...
@overload
def register_gradient_handler(name: str, cls: H, *, override: bool = False) -> H: ...


def register_gradient_handler(name: Any = None, cls: Any = None, *, override: bool = False) -> Any:
    """Register a :class:`GradientHandler` subclass under a name.

    Usable as ``@register_gradient_handler`` (the name is the class's ``name`` attribute or its
    lower-cased class name), ``@register_gradient_handler("mine")`` or
    ``register_gradient_handler("mine", MyHandler)``. Re-registering the same class is a no-op;
    taking a name held by another class needs ``override=True``.
    """
    if isinstance(name, type):  # bare decorator
        return _register(default_name(name), name, override)
    if cls is not None:
        return _register(name, cls, override)

    def decorator(klass: H) -> H:
        return _register(name if name is not None else default_name(klass), klass, override)

    return decorator


def _register(name: str, cls: Any, override: bool) -> Any:
    return register_class(_REGISTRY, name, cls, GradientHandler, "gradient handler",
                          "lightning_parallelctx.grad_sync.GradientHandler", override)


def available_gradient_handlers() -> list[str]:
    """The registered names."""
    return sorted(_REGISTRY)


def _import_class(path: str) -> type:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(
            f"unknown gradient handler {path!r}; registered names are {available_gradient_handlers()}, "
            f"or give a class path like 'my_package.module.MyHandler'"
        )
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import gradient handler class {path!r}: {err}. Registered names are "
                         f"{available_gradient_handlers()}") from err


def _as_class(spec: Any) -> type[GradientHandler]:
    cls = _REGISTRY.get(spec) if isinstance(spec, str) else spec
    if cls is None:
        cls = _import_class(spec)
    if not (isinstance(cls, type) and issubclass(cls, GradientHandler)):
        raise TypeError(f"gradient handler {spec!r} resolves to {cls!r}, which is not a GradientHandler subclass")
    return cls


def get_gradient_handler(spec: GradientHandlerSpec = None, **kwargs: Any) -> GradientHandler:
    """A handler instance from a name, a class, an instance, or ``{"class_path", "init_args"}``.

    - ``None``: the default (``"bucketed"``).
    - a registered name (``"bucketed"``, ``"ddp"``, ``"allreduce"``, user names) or a dotted class path.
    - a :class:`GradientHandler` subclass: instantiated with ``kwargs``.
    - an instance: returned as is (``kwargs`` must then be empty).
    - a mapping as LightningCLI writes it: ``{"class_path": ..., "init_args": {...}}``; ``kwargs``
      override ``init_args``.
    """
    if spec is None:
        spec = DEFAULT_GRADIENT_HANDLER
    if isinstance(spec, GradientHandler):
        if kwargs:
            raise TypeError(f"options {sorted(kwargs)} were given with an already built {spec!r}; "
                            f"pass a name or class to build it with options")
        return spec
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"class_path", "init_args"}
        if "class_path" not in spec or unknown:
            raise ValueError(f"a gradient handler mapping needs 'class_path' (and optionally 'init_args'), "
                             f"got keys {sorted(spec)}")
        init_args = dict(spec.get("init_args") or {})
        init_args.update(kwargs)
        return _as_class(spec["class_path"])(**init_args)
    if isinstance(spec, str | type):
        cls = _as_class(spec)
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise TypeError(f"cannot build gradient handler {cls.__name__} with {kwargs}: {err}") from err
    raise TypeError(f"cannot make a gradient handler from {spec!r} ({type(spec).__name__}); give a name, "
                    f"a GradientHandler class or instance, or a {{'class_path', 'init_args'}} mapping")


_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64, "64": torch.float64,
}


def as_dtype(value: str | torch.dtype | None, what: str) -> torch.dtype | None:
    """``"bf16"``/``"float16"``/``torch.float32``... -> a floating torch dtype (None stays None)."""
    if value is None or isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str):
        dtype = _DTYPES.get(value.strip().lower().removeprefix("torch."))
        if dtype is None:
            raise ValueError(f"{what}={value!r} is not a dtype name; use one of {sorted(_DTYPES)}")
    else:
        raise TypeError(f"{what} must be a dtype name or torch.dtype, got {value!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"{what}={value!r} is not a floating-point dtype")
    return dtype
