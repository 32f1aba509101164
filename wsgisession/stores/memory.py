"""A store in this process's memory: for tests and single-process experiments."""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence

from .base import (
    USER_KEY,
    CacheStore,
    Changes,
    Copy,
    DurableStore,
    Record,
    UserRecord,
    beyond_limit,
    bound_user,
    holds,
    json_value,
    log,
    now,
)


class MemoryStore(CacheStore, DurableStore):
    """Sessions in a dict guarded by a lock. Lost on restart, not shared by workers."""

    name = "memory"

    def __init__(self) -> None:
        self._sessions: dict[str, tuple[dict[str, str], float]] = {}
        self._stale: dict[int, str] = {}
        self._marks = itertools.count(1)
        self._server = uuid.uuid4().hex  # this store is its own server, for as long as it lives
        self._lock = threading.Lock()

    def load(self, key: str) -> Record | None:
        with self._lock:
            entry = self._live(key)
            if entry is None:
                return None
        return _record(*entry)

    def create(self, key: str, data: Mapping[str, str], ttl: float) -> None:
        with self._lock:
            self._sessions[key] = (dict(data), now() + ttl)

    def add(self, key: str, data: Mapping[str, str], expires: float) -> bool:
        with self._lock:
            return self._add(key, data, expires)

    def add_many(self, sessions: Sequence[Copy]) -> int:
        """Under the lock once for the whole batch."""
        with self._lock:
            return sum(self._add(key, data, expires) for key, data, expires in sessions)

    def _add(self, key: str, data: Mapping[str, str], expires: float) -> bool:
        if self._live(key) is not None:
            return False
        self._sessions[key] = (dict(data), expires)
        return True

    def scan(self, batch: int = 1000) -> Iterator[list[tuple[str, Record]]]:
        """The keys first, then each batch's sessions as they are then (copied under the lock)."""
        with self._lock:
            keys = list(self._sessions)
        for start in range(0, len(keys), batch):
            with self._lock:
                entries = [(key, dict(entry[0]), entry[1]) for key in keys[start : start + batch]
                           if (entry := self._live(key)) is not None]  # fmt: skip
            found = [(key, record) for key, data, expires in entries if (record := _record(data, expires)) is not None]
            if found:
                yield found

    def update(self, key: str, changes: Changes, ttl: float) -> bool:
        with self._lock:
            entry = self._live(key)
            if entry is None:
                return False
            data = entry[0]
            for k in changes.deleted:
                data.pop(k, None)
            data.update(changes.set)
            self._sessions[key] = (data, now() + ttl)
            return True

    def replace(self, key: str, expected: Mapping[str, str], new: Mapping[str, str]) -> bool:
        with self._lock:
            entry = self._live(key)
            if entry is None or not holds({k: json_value(v) for k, v in entry[0].items() if k in expected}, expected):
                return False
            entry[0].update(new)
            return True

    def touch(self, key: str, ttl: float) -> bool:
        with self._lock:
            entry = self._live(key)
            if entry is None:
                return False
            self._sessions[key] = (entry[0], now() + ttl)
            return True

    def delete(self, key: str) -> None:
        with self._lock:
            self._sessions.pop(key, None)

    def user_sessions(self, user: str) -> list[UserRecord]:
        """A scan of every session: this store is for tests and experiments, not for many users."""
        with self._lock:
            t = now()
            bound = [(key, data[USER_KEY], expires) for key, (data, expires) in self._sessions.items()
                     if expires > t and USER_KEY in data]  # fmt: skip
        found = []
        for key, text, expires in bound:
            binding = json_value(text)
            if bound_user({USER_KEY: binding}) == user:
                found.append(UserRecord(key, binding, expires))
        return found

    def trim_user(self, user: str, limit: int, keep: str | None = None) -> list[str]:
        ended = beyond_limit(self.user_sessions(user), limit, keep)
        self.delete_many(ended)
        return ended

    def ping(self) -> None:
        pass

    def server_id(self) -> str:
        return self._server

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()

    def mark_stale(self, key: str) -> None:
        with self._lock:
            self._stale[next(self._marks)] = key

    def stale(self, limit: int) -> list[tuple[int, str]]:
        with self._lock:
            return sorted(self._stale.items())[:limit]

    def unmark_stale(self, marks: Sequence[int]) -> None:
        with self._lock:
            for mark in marks:
                self._stale.pop(mark, None)

    def count_stale(self) -> int:
        return len(self._stale)

    def cleanup(self) -> int:
        with self._lock:
            t = now()
            expired = [k for k, (_, expires) in self._sessions.items() if expires <= t]
            for k in expired:
                del self._sessions[k]
            return len(expired)

    def _live(self, key: str) -> tuple[dict[str, str], float] | None:
        entry = self._sessions.get(key)
        if entry is not None and entry[1] <= now():
            del self._sessions[key]
            return None
        return entry


def _record(data: Mapping[str, str], expires: float) -> Record | None:
    """A stored session decoded, or None (logged) when a value is not JSON."""
    try:
        return Record({k: json_value(v) for k, v in data.items()}, expires)
    except (ValueError, RecursionError):
        log.warning("Ignoring a malformed session record in memory")
        return None
