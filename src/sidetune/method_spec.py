"""``MethodSpec``: how one adaptation method is built, checked and described.

Its own small module so that the method files (``side/*.py``, ``inplace/*.py``) and the registry
(:mod:`sidetune.methods`, which imports every method file) both import it without importing each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import ConfigError


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
