"""Exceptions raised for a user's mistakes: each message names the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SidetuneError(ValueError):
    """Base class of sidetune's user-facing errors (a ``ValueError``, so callers may catch either).

    Raised in a DataLoader worker process, it reaches the main process through torch, which makes a new error of the
    same type from ``"Caught DataError in DataLoader worker process 0. Original Traceback ..."``: the message is cut
    back to the worker's own (the worker's traceback stays in :attr:`worker_traceback`), so the user reads what is
    wrong and how to fix it, as with ``--workers 0``.
    """

    worker_traceback: str | None = None

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith(f"Caught {type(self).__name__} in "):
            marker = f"{type(self).__module__}.{type(self).__qualname__}: "
            before, found, message = args[0].rpartition(marker)
            if found:
                self.worker_traceback = before + marker + message
                args = (message.rstrip("\n"),)
        super().__init__(*args)


class ConfigError(SidetuneError):
    """A configuration value is invalid (unknown name, non-positive size, incompatible option)."""


class WeightsError(SidetuneError):
    """A weights file is missing, unreadable, or does not fit the model."""


class FingerprintMismatchError(SidetuneError):
    """An adapter checkpoint was trained on a different backbone than the one it is loaded onto."""


def unknown_choice(kind: str, name: str, choices: Iterable[str], hint: str = "") -> ConfigError:
    """Build the error for an unknown registry name, listing close matches and the valid choices."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    msg = f"unknown {kind} {name!r}."
    if close:
        msg += f" Did you mean {', '.join(map(repr, close))}?"
    shown = choices if len(choices) <= 40 else [*choices[:40], "..."]
    msg += f" Valid choices: {', '.join(shown)}."
    if hint:
        msg += f" {hint}"
    return ConfigError(msg)


def require_positive(name: str, value: int | float, owner: str) -> None:
    """Raise a ConfigError when ``value`` is not a positive number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{owner}: {name} must be a positive number, got {value!r}.")


def require_positive_int(name: str, value: int, owner: str) -> None:
    """Raise a ConfigError when ``value`` is not a positive integer (sizes and ranks)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{owner}: {name} must be a positive integer, got {value!r}.")


def require_non_negative_int(name: str, value: int, owner: str) -> None:
    """Raise a ConfigError when ``value`` is not an integer >= 0 (counts where 0 means off)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{owner}: {name} must be an integer >= 0 (0: off), got {value!r}.")
