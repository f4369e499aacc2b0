"""Values kept per snapshot: found again for the same snapshot, dropped for another, bounded."""

from __future__ import annotations

from agent.proxy.memo import SnapshotMemo
from agent.state import Snapshot, build_snapshot


def snapshot(version: int) -> Snapshot:
    return build_snapshot(version=version, created_at=float(version))


def test_a_value_is_found_again_for_the_same_snapshot_only() -> None:
    memo: SnapshotMemo[str, int] = SnapshotMemo()
    first, second = snapshot(1), snapshot(2)
    assert memo.get(first, "route") is None
    assert memo.put("route", 7) == 7
    assert memo.get(first, "route") == 7
    assert memo.get(first, "other") is None
    assert memo.get(second, "route") is None
    assert len(memo) == 0  # another snapshot: everything kept for the first is gone
    memo.put("route", 8)
    assert memo.get(second, "route") == 8
    assert memo.get(first, "route") is None  # and back: the first's values are not kept either


def test_a_full_memo_starts_over() -> None:
    memo: SnapshotMemo[str, int] = SnapshotMemo(max_entries=2)
    current = snapshot(1)
    memo.get(current, "a")
    memo.put("a", 1)
    memo.put("b", 2)
    assert (memo.get(current, "a"), memo.get(current, "b"), len(memo)) == (1, 2, 2)
    memo.put("c", 3)
    assert (memo.get(current, "a"), memo.get(current, "c"), len(memo)) == (None, 3, 1)
