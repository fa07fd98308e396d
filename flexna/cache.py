"""flexna's one cache: BlockMasks, their tables and block maps, keyed by spec (and device).

Bounded by bytes (default 1 GiB; :func:`set_cache_limit`): least recently used entries go
first, and a mask larger than the whole budget is built for its call and not kept (with a
:class:`~flexna.errors.CacheWarning`). Safe under threads (one lock around the bookkeeping;
builds run outside it). :func:`clear_cache` frees everything.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from flexna.errors import CacheWarning, warn_user

T = TypeVar("T")


@dataclass(frozen=True)
class CacheInfo:
    """What flexna's cache holds: entries, their bytes (device and host), and the budget."""

    entries: int
    bytes: int
    max_bytes: int


class _ByteCache:
    """LRU of values with a known size, bounded by their total bytes; thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self.max_bytes = max_bytes

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes
            self._shrink(self.max_bytes)

    def _shrink(self, limit: int) -> None:
        while self._bytes > limit and self._entries:
            _, (_, nbytes) = self._entries.popitem(last=False)
            self._bytes -= nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def set_limit(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = max_bytes
            self._shrink(max_bytes)

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(len(self._entries), self._bytes, self.max_bytes)


_CACHE = _ByteCache(1 << 30)


def cached(key: Hashable, build: Callable[[], T], nbytes: Callable[[T], int]) -> T:
    """The value cached under ``key``, built by ``build()`` on a miss and kept if it fits."""
    value = _CACHE.get(key)
    if value is None:
        value = build()
        if torch.compiler.is_exporting():  # built under export's fake tensors: never keep
            return value
        size = nbytes(value)
        if size > _CACHE.max_bytes:
            warn_user(f"flexna: a mask of {size / 2**20:.0f} MiB exceeds the cache budget of "
                      f"{_CACHE.max_bytes / 2**20:.0f} MiB: it is built for this call and not kept "
                      "(raise the budget with flexna.set_cache_limit)", CacheWarning)
        else:
            _CACHE.put(key, value, size)
    return value


def clear_cache() -> None:
    """Drop every BlockMask, table and block map flexna has cached (frees their memory), and the
    plans of traced calls (graphs that read them recompile on their next call)."""
    from flexna.plan import clear_traced_plans

    _CACHE.clear()
    clear_traced_plans()


def cache_info() -> CacheInfo:
    """Entries and bytes flexna's cache holds now, and its budget."""
    return _CACHE.info()


def set_cache_limit(max_bytes: int) -> None:
    """Set the cache budget in bytes (default 1 GiB); entries beyond it are dropped, oldest first."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
    _CACHE.set_limit(max_bytes)
