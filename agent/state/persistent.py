"""`ShardedMap`: an immutable mapping whose updated copies share everything they did not change.

Consecutive snapshots hold the same 50,000 workloads but differ in a handful. Copying a flat dict per
snapshot would cost O(cluster) each time; a `ShardedMap` splits its entries over a fixed number of
small dicts by key hash, so `updated` copies only the shards it touches plus the tuple of shard
references. Readers get plain dict lookups behind one hash, and a published map never changes, so a
data plane can keep using an old snapshot while the next one is built.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Final, TypeVar, overload

_K = TypeVar("_K")
_V = TypeVar("_V")
_D = TypeVar("_D")

_SHARD_BITS: Final = 9
_SHARDS: Final = 1 << _SHARD_BITS
_MASK: Final = _SHARDS - 1
_EMPTY: Final[dict[Any, Any]] = {}
"""Stands for every empty shard; never written to (`updated` copies a shard before changing it)."""


class Removed:
    """Marks a key to delete in `ShardedMap.updated`."""

    def __repr__(self) -> str:
        return "REMOVED"


REMOVED: Final = Removed()


class ShardedMap(Mapping[_K, _V]):
    """An immutable mapping; `updated` returns a changed copy sharing the untouched shards."""

    __slots__ = ("_length", "_shards")

    def __init__(self, items: Mapping[_K, _V] | None = None) -> None:
        shards: list[dict[_K, _V]] = [_EMPTY] * _SHARDS
        for key, value in (items or {}).items():
            index = hash(key) & _MASK
            if shards[index] is _EMPTY:
                shards[index] = {}
            shards[index][key] = value
        self._shards: tuple[dict[_K, _V], ...] = tuple(shards)
        self._length = len(items or {})

    def updated(self, changes: Mapping[_K, _V | Removed]) -> ShardedMap[_K, _V]:
        """A copy with `changes` applied: values set, keys mapped to `REMOVED` deleted."""
        if not changes:
            return self
        shards = list(self._shards)
        copied: set[int] = set()
        length = self._length
        for key, value in changes.items():
            index = hash(key) & _MASK
            if index not in copied:
                shards[index] = dict(shards[index])
                copied.add(index)
            shard = shards[index]
            if isinstance(value, Removed):
                if shard.pop(key, REMOVED) is not REMOVED:
                    length -= 1
            else:
                length += key not in shard
                shard[key] = value
        for index in copied:
            if not shards[index]:
                shards[index] = _EMPTY
        result: ShardedMap[_K, _V] = ShardedMap.__new__(ShardedMap)
        result._shards = tuple(shards)
        result._length = length
        return result

    def __getitem__(self, key: _K) -> _V:
        return self._shards[hash(key) & _MASK][key]

    @overload
    def get(self, key: _K, /) -> _V | None: ...
    @overload
    def get(self, key: _K, default: _V | _D, /) -> _V | _D: ...
    def get(self, key: _K, default: object = None, /) -> object:
        return self._shards[hash(key) & _MASK].get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._shards[hash(key) & _MASK]

    def __iter__(self) -> Iterator[_K]:
        for shard in self._shards:
            yield from shard

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return f"ShardedMap({dict(self)!r})"

    def __reduce__(self) -> tuple[type[ShardedMap[_K, _V]], tuple[dict[_K, _V]]]:
        # String hashes differ between processes: a worker rebuilds the shards with its own.
        return (ShardedMap, (dict(self),))
