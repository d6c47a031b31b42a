"""``MethodSpec``: how one adaptation method is built, checked and described.

Its own small module so that the method files (``side/*.py``, ``inplace/*.py``) and the registry
(:mod:`sidetune.methods`, which imports every method file) both import it without importing each other.
"""

from __future__ import annotations

import dataclasses
import types
import typing
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
        hints = typing.get_type_hints(self.config_cls)
        values = {name: self._checked(name, hints[name], value) for name, value in {**self.defaults, **options}.items()}
        return self.config_cls(**values)

    def _checked(self, name: str, hint: Any, value: Any) -> Any:
        """``value`` for the config field ``name`` of type ``hint``, or a ConfigError naming both.

        The checks every method shares, by the field's type, before the method's own ranges: a bool field takes
        True or False only (a string such as ``"maybe"`` or ``"no"`` is truthy, so it would switch the option
        on); a tuple field takes a list or tuple, and a single value as a one-item tuple (``--opt blocks=1``
        parses to ``1``, ``--opt blocks=1,2`` to ``(1, 2)``); int, float and str fields take those types.
        """
        kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if value is None and type(None) in kinds:
            return value
        sequence = next((k for k in kinds if typing.get_origin(k) is tuple), None)
        if sequence is not None and not (isinstance(value, str) and str in kinds):
            items = tuple(value) if isinstance(value, list | tuple) else (value,)
            kind = typing.get_args(sequence)[0]
            if not all(_is_a(kind, v) for v in items):
                raise ConfigError(
                    f"method {self.name!r}: option {name} must be {_PLURAL_NAMES.get(kind, kind)} (one, or a "
                    f"comma-separated list), got {value!r}."
                )
            return items
        if not any(_is_a(kind, value) for kind in kinds):
            wanted = " or ".join(_KIND_NAMES.get(k, str(k)) for k in kinds)
            raise ConfigError(f"method {self.name!r}: option {name} must be {wanted}, got {value!r}.")
        return value

    def check_family(self, family: str, backbone: str) -> None:
        if family not in self.families:
            reason = self.why_not.get(family, f"it supports the {', '.join(self.families)} families only")
            raise ConfigError(f"method {self.name!r} cannot adapt {backbone!r} ({family} family): {reason}.")


#: How a config field's type is named in messages.
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "none"}
_PLURAL_NAMES = {bool: "true or false values", int: "integers", float: "numbers", str: "strings"}


def _is_a(kind: Any, value: Any) -> bool:
    """Whether ``value`` fits the type ``kind`` of a config field (bools are not numbers; unchecked types fit)."""
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if kind is type(None):
        return value is None
    return True
