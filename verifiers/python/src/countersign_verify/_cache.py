"""Thread-safe in-memory sets of seen ids, each kept until its own expiry."""

from __future__ import annotations

import heapq
import threading
import time


class SeenCache:
    """Remembers ids until their expiry; ``add`` is an atomic check-and-insert."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def _purge(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            at, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == at:
                del self._expiry[key]

    def add(self, key: str, until: float, now: float | None = None) -> bool:
        """Record ``key`` until ``until`` (epoch seconds). False if it is already held."""
        now = time.time() if now is None else now
        with self._lock:
            self._purge(now)
            if key in self._expiry:
                return False
            until = max(until, now + 1.0)
            self._expiry[key] = until
            heapq.heappush(self._heap, (until, key))
            return True

    def __contains__(self, key: str) -> bool:
        with self._lock:
            self._purge(time.time())
            return key in self._expiry

    def __len__(self) -> int:
        with self._lock:
            self._purge(time.time())
            return len(self._expiry)
