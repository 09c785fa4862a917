"""One timer per key, earliest first: the clock of the transaction tables (sans-IO, `now` passed in).

A lazy-deletion heap: re-scheduling a key pushes a new entry and leaves the old one to be skipped when it
surfaces, so `set` is O(log n) and nothing is ever searched for.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

__all__ = ["TimerHeap"]


class TimerHeap(Generic[K]):
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._scheduled: dict[K, float] = {}
        self._seq = 0  # ties break in scheduling order, and keys never need to be comparable

    def __len__(self) -> int:
        return len(self._scheduled)

    def set(self, key: K, when: float | None) -> None:
        """Schedule `key` at `when` (replacing its previous time); None unschedules it."""
        if when is None:
            self._scheduled.pop(key, None)
        elif self._scheduled.get(key) != when:
            self._scheduled[key] = when
            self._seq += 1
            heapq.heappush(self._heap, (when, self._seq, key))

    def next(self) -> float | None:
        """The earliest scheduled time, or None."""
        heap = self._heap
        while heap:
            when, _, key = heap[0]
            if self._scheduled.get(key) == when:
                return when
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float) -> K | None:
        """The key of the earliest timer due at `now` (unscheduled as it is returned), or None."""
        when = self.next()
        if when is None or when > now:
            return None
        _, _, key = heapq.heappop(self._heap)
        del self._scheduled[key]
        return key
