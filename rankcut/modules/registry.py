"""The registry of module types (see :mod:`rankcut.modules`)."""

from __future__ import annotations

from torch import nn

_TYPES: dict[str, type] = {}


def register_module_type(cls: type) -> type:
    """Class decorator: register ``cls`` under ``cls.record_type``.

    Raises:
        ValueError: the name is taken by another class, or the class lacks the interface.
    """
    name = getattr(cls, "record_type", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a record_type string to be a module type")
    for attr in ("record_entry", "from_record"):
        if not callable(getattr(cls, attr, None)):
            raise ValueError(f"module type {name!r} ({cls.__name__}) lacks {attr}()")
    if _TYPES.get(name, cls) is not cls:
        raise ValueError(f"module type {name!r} is already registered by {_TYPES[name].__name__}")
    _TYPES[name] = cls
    return cls


def module_type(name: str) -> type:
    """The class registered under ``name``.

    Raises:
        KeyError: no such module type (the message lists the known ones).
    """
    try:
        return _TYPES[name]
    except KeyError:
        raise KeyError(f"unknown module type {name!r}; this rankcut knows {', '.join(sorted(_TYPES))}") from None


def module_types() -> list[str]:
    return sorted(_TYPES)


def is_rankcut_module(module: nn.Module) -> bool:
    return any(isinstance(module, cls) for cls in _TYPES.values())


def rankcut_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every decomposed target of ``model`` (any registered module type), by qualified name, in module order.
    Modules inside another rankcut module are not listed separately."""
    found: dict[str, nn.Module] = {}
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if is_rankcut_module(module):
            found[name] = module
            inside = (*inside, name + ".")
    return found


def record_entry(module: nn.Module) -> dict:
    """The record entry of a built rankcut module: ``{"type": ..., **module.record_entry()}``."""
    return {"type": module.record_type, **module.record_entry()}


