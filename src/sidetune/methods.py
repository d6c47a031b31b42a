"""The method registry: every adaptation method sidetune offers, with its kind and description.

Methods are registered by one explicit call per method module (see ``_builtin_specs``), PEFT-style, and
discovered with :func:`list_methods`. The spec type lives in :mod:`sidetune.method_spec` (re-exported here),
so that method files never import this registry. A method is built from a backbone and a typed config dataclass and
is an ``nn.Module`` mapping images to :class:`~sidetune.features.Features`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from .errors import unknown_choice
from .method_spec import MethodSpec

__all__ = ["MethodSpec", "get_method", "list_methods", "register_method"]

_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (a name can be registered once)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _builtin_specs() -> list[MethodSpec]:
    from .inplace import adapter, adaptformer, lora, selective, vpt
    from .side import e3va, linear, losa, lst, probe

    return [
        *linear.SPECS,
        *probe.SPECS,
        *losa.SPECS,
        *e3va.SPECS,
        *lst.SPECS,
        *selective.SPECS,
        *lora.SPECS,
        *adapter.SPECS,
        *adaptformer.SPECS,
        *vpt.SPECS,
    ]


def _ensure_builtins() -> None:
    if not _REGISTRY:
        for spec in _builtin_specs():
            register_method(spec)


def get_method(name: str) -> MethodSpec:
    """Look a method up by name; an unknown name lists the valid ones. ``partial-k`` works for any k."""
    _ensure_builtins()
    if name not in _REGISTRY:
        # partial-k for any k: the registered partial-1 with k set (see sidetune.inplace.selective).
        match = re.fullmatch(r"partial-(\d+)", name)
        if match:
            return dataclasses.replace(_REGISTRY["partial-1"], name=name, defaults={"k": int(match.group(1))})
        raise unknown_choice("method", name, _REGISTRY, hint="See sidetune.list_methods().")
    return _REGISTRY[name]


def list_methods() -> list[dict[str, Any]]:
    """All methods with a one-line description, their kind and whether they back-propagate through the backbone.

    Returns:
        Records ``{"name", "kind", "backprop_through_backbone", "families", "description"}``.
    """
    _ensure_builtins()
    return [
        {
            "name": s.name,
            "kind": s.kind,
            "backprop_through_backbone": s.backprop_through_backbone,
            "families": list(s.families),
            "description": s.description,
        }
        for s in _REGISTRY.values()
    ]
