"""Values the data plane derives from a snapshot, kept while that snapshot is the one in use.

A node's connections mostly repeat a few routes (the same client pod to the same server pod), and
what is built for each (the routing decision, its pool key, its metric labels) is a pure function
of the snapshot and a few addresses or snapshot objects. Building it again for every connection cost
more than looking it up: the objects made per connection showed in each agent's CPU per new
connection (docs/benchmarks.md, session 8). `SnapshotMemo` keeps such values per key for one
snapshot. It starts over when asked about another snapshot, so a key may name the snapshot's
objects by identity (`id()`), which holds while the snapshot lives (the memo keeps it alive); and it
starts over when full, so a node with many routes keeps a bounded number of values.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

from agent.state import Snapshot

MAX_ENTRIES = 4096
"""Values a memo keeps for one snapshot before it starts over."""

_Key = TypeVar("_Key", bound=Hashable)
_Value = TypeVar("_Value")


class SnapshotMemo(Generic[_Key, _Value]):
    """Values by key, for one snapshot at a time (see the module docstring)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._max_entries = max_entries
        self._snapshot: Snapshot | None = None
        self._values: dict[_Key, _Value] = {}

    def __len__(self) -> int:
        return len(self._values)

    def get(self, snapshot: Snapshot, key: _Key) -> _Value | None:
        """The value kept for `key` from `snapshot`; None if there is none (and, for another snapshot
        than the last one asked about, drops every value kept)."""
        if snapshot is not self._snapshot:
            self._snapshot = snapshot
            self._values.clear()
            return None
        return self._values.get(key)

    def put(self, key: _Key, value: _Value) -> _Value:
        """Keeps `value` for `key`, from the snapshot `get` was last asked about; returns it."""
        if len(self._values) >= self._max_entries:
            self._values.clear()
        self._values[key] = value
        return value
