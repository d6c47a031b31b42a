"""The tap cache: one pass of the frozen backbone writes the taps side methods read; training replays them.

A side method never changes the backbone, so the activations it reads for an image never change either. Build a
cache once (:func:`build`, ``sidetune cache build``), then train any side method that reads those taps from it
(``fit(TrainConfig(..., cache=DIR))``, ``sidetune train --cache DIR``): the backbone never runs again, and
several settings train in one pass over the cache (``sidetune sweep``).

Modules: ``batch`` (:class:`CachedTaps`, what a model takes instead of images), ``store`` (the manifest and the
safetensors shards), ``build`` (writing), ``reader`` (every check before use, the cached splits), ``sweep``.
"""

from .batch import CachedTaps
from .build import build, tap_spec
from .reader import cache_size, check_cache, open_cache
from .store import CachedSplit, CacheError, Manifest

__all__ = [
    "CacheError",
    "CachedSplit",
    "CachedTaps",
    "Manifest",
    "build",
    "cache_size",
    "check_cache",
    "open_cache",
    "tap_spec",
]
