"""Registering plug-in classes by name (gradient handlers, pipeline schedules): one rule for all."""

from __future__ import annotations

from typing import Any


def register_class(registry: dict[str, Any], name: Any, cls: Any, base: type, kind: str, base_path: str,
                   override: bool) -> Any:
    """Put ``cls`` (a ``base`` subclass) in ``registry`` under ``name``; a name another class holds
    is an error unless ``override``. ``kind`` and ``base_path`` name the plug-in point in errors."""
    # The class first: a wrong object must be named as such, not as a missing name.
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{cls!r} is not a {base.__name__} subclass; subclass {base_path}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"a {kind}'s name must be a non-empty string, got {name!r}")
    held = registry.get(name)
    # Same qualified name = the module was re-imported (e.g. a notebook re-run): take the new one.
    if (held is not None and held is not cls and not override
            and (held.__module__, held.__qualname__) != (cls.__module__, cls.__qualname__)):
        raise ValueError(f"{kind} name {name!r} is taken by {held.__module__}.{held.__qualname__}; "
                         f"pick another name or pass override=True")
    registry[name] = cls
    return cls


def default_name(cls: Any) -> str:
    """The name a class registers under when none is given: its ``name`` attribute, else its
    lower-cased class name ("" for an object that is neither, which register_class then refuses)."""
    return getattr(cls, "name", None) or getattr(cls, "__name__", "").lower()
