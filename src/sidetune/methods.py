"""The method registry: every adaptation method sidetune offers, with its kind and description.

Methods are registered by one explicit call per method module (see ``_builtin_specs``), PEFT-style, and
discovered with :func:`list_methods`. A method is built from a backbone and a typed config dataclass and
is an ``nn.Module`` mapping images to :class:`~sidetune.features.Features`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import ConfigError, unknown_choice


@dataclass(frozen=True)
class MethodSpec:
    """How to build one method.

    Attributes:
        name: registry name (``losa``, ``e3va+``, ...).
        description: one line for ``list_methods()``.
        kind: ``side`` (backprop-free: the backbone runs without autograd) or ``inplace`` (gradients
            flow through the backbone).
        config_cls: the method's config dataclass.
        build: ``build(backbone, config, task) -> nn.Module`` returning Features from images.
        families: backbone families the method supports; others fail at construction with ``why_not``.
        defaults: preset values applied before the user's options (``e3va+`` is ``e3va`` with alpha=16).
        why_not: family -> reason, for the error message when the family is unsupported.
    """

    name: str
    description: str
    kind: str
    config_cls: type
    build: Callable[..., nn.Module]
    families: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    why_not: dict[str, str] = field(default_factory=dict)

    @property
    def backprop_through_backbone(self) -> bool:
        return self.kind == "inplace"

    def make_config(self, **options: Any) -> Any:
        """Build the config from the preset defaults and the user's options, naming unknown options."""
        known = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"method {self.name!r} has no option(s) {', '.join(unknown)}. Its options: {', '.join(sorted(known))}."
            )
        return self.config_cls(**{**self.defaults, **options})

    def check_family(self, family: str, backbone: str) -> None:
        if family not in self.families:
            reason = self.why_not.get(family, f"it supports the {', '.join(self.families)} families only")
            raise ConfigError(f"method {self.name!r} cannot adapt {backbone!r} ({family} family): {reason}.")


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (a name can be registered once)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _builtin_specs() -> list[MethodSpec]:
    from .inplace import adapter, adaptformer, lora, selective, vpt
    from .side import e3va, linear, losa, lst

    return [
        *linear.SPECS,
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
