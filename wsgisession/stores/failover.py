"""Redis in front, PostgreSQL behind: either may go away without logging anyone out.

Every write goes to both stores (the durable one first); reads come from the cache and fall
back to the durable store when it misses or is away. A probe thread per process watches
both and moves back when one returns:

- the cache is trusted again only after the copies written while it was away are dropped and
  two probe intervals have passed, so that every other process has dropped its own too;
- the durable store is brought up to date, from the cache, with the sessions changed while it
  was away.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .base import Changes, Periodic, Record, SessionStore, StoreError, after_fork, encode_values, log, now

UP, RETURNING, DOWN = "up", "returning", "down"


class FailoverStore(SessionStore):
    """Sessions in ``cache`` (Redis) for speed, with a copy of each in ``durable`` (PostgreSQL).

    ``cache_up`` and ``durable_up`` give the state found at start-up; the probe, every
    ``probe_interval`` seconds, corrects it.
    """

    def __init__(
        self,
        cache: SessionStore,
        durable: SessionStore,
        *,
        probe_interval: float = 1.0,
        cache_up: bool = True,
        durable_up: bool = True,
    ) -> None:
        self.cache = cache
        self.durable = durable
        self.name = f"{cache.name} with {durable.name}"
        self.probe_interval = probe_interval
        self._cache = UP if cache_up else DOWN
        self._durable_up = durable_up
        self._returning_since = 0.0
        self._stale: set[str] = set()  # changed while the cache was away: its copies are out of date
        self._unsynced: dict[str, bool] = {}  # changed while the durable store was away: True written, False deleted
        self._gate = _Gate()
        self._state_lock = threading.Lock()
        self._probe = Periodic("wsgisession-probe", probe_interval, self._check)
        after_fork(self, FailoverStore._after_fork)

    def _after_fork(self) -> None:
        # Either may have been held by a thread the fork left behind.
        self._gate = _Gate()
        self._state_lock = threading.Lock()

    @property
    def serving_from(self) -> str:
        """The name of the store that answers reads now."""
        return self.cache.name if self._cache == UP else self.durable.name

    # -- reads ---------------------------------------------------------------------------

    def load(self, key: str) -> Record | None:
        self._probe.start()
        if self._cache == UP:
            try:
                record = self.cache.load(key)
            except StoreError as exc:
                self._cache_failed(exc)
            else:
                if record is not None:
                    return record
        if not self._durable_up:
            raise StoreError(f"{self.durable.name} is unavailable and {self.cache.name} cannot answer for it")
        try:
            record = self.durable.load(key)
        except StoreError as exc:
            self._durable_failed(exc)
            raise
        if record is not None and self._cache == UP:
            self._refill(key, record)
        return record

    def _refill(self, key: str, record: Record) -> None:
        """Copy a session found only in the durable store back into the cache."""
        with self._gate.write():
            if not self._on_cache(lambda c: c.create(key, encode_values(record.data), record.expires - now())):
                return
            try:
                current = self.durable.load(key)
            except StoreError:
                current = None  # cannot tell: keep no copy that might be out of date
            if current is None or current.data != record.data:
                # Deleted meanwhile (a logout), or changed by another request: drop the copy,
                # the next read fills it again.
                self._on_cache(lambda c: c.delete(key))

    # -- writes --------------------------------------------------------------------------

    def create(self, key: str, data: Mapping[str, str], ttl: float) -> None:
        self._write(key, lambda s: s.create(key, data, ttl), written=True)

    def update(self, key: str, changes: Changes, ttl: float) -> bool:
        return bool(self._write(key, lambda s: s.update(key, changes, ttl), written=True))

    def touch(self, key: str, ttl: float) -> bool:
        return bool(self._write(key, lambda s: s.touch(key, ttl), written=True))

    def delete(self, key: str) -> None:
        self._write(key, lambda s: s.delete(key), written=False)

    def _write(self, key: str, operation: Callable[[SessionStore], Any], written: bool) -> Any:
        """Apply ``operation`` to both stores, and note what either of them missed."""
        self._probe.start()
        with self._gate.write():
            durable_ok = cache_ok = False
            result: Any = None
            cache_result: Any = None
            if self._durable_up:
                try:
                    result = operation(self.durable)
                    durable_ok = True
                except StoreError as exc:
                    self._durable_failed(exc)
            if self._cache != DOWN:
                try:
                    cache_result = operation(self.cache)
                    cache_ok = True
                except StoreError as exc:
                    self._cache_failed(exc)
            if not (durable_ok or cache_ok):
                raise StoreError(f"{self.cache.name} and {self.durable.name} are both unavailable")
            if not cache_ok:
                self._stale.add(key)
            if not durable_ok:
                self._unsynced[key] = written
                return cache_result
            self._unsynced.pop(key, None)  # the durable store has it now
            if cache_ok and result is False and cache_result is True:
                self._on_cache(lambda c: c.delete(key))  # the durable store says it is gone (a logout)
            return result

    # -- health --------------------------------------------------------------------------

    def ping(self) -> None:
        """Raise :class:`StoreError` only when neither store answers."""
        try:
            self.cache.ping()
        except StoreError:
            self.durable.ping()

    def cleanup(self) -> int:
        return self.durable.cleanup() if self._durable_up else 0

    def setup(self) -> None:
        self.durable.setup()

    def close(self) -> None:
        self._probe.stop()
        self.cache.close()
        self.durable.close()

    def _cache_failed(self, exc: StoreError) -> None:
        with self._state_lock:
            if self._cache == DOWN:
                return
            self._cache = DOWN
        log.warning("%s unavailable, falling back to %s (%s)", self.cache.name, self.durable.name, exc)
        self._say_if_both_down()

    def _durable_failed(self, exc: StoreError) -> None:
        with self._state_lock:
            if not self._durable_up:
                return
            self._durable_up = False
        log.warning("%s unavailable, keeping sessions in %s until it is back (%s)", self.durable.name,
                    self.cache.name, exc)  # fmt: skip
        self._say_if_both_down()

    def _say_if_both_down(self) -> None:
        if self._cache == DOWN and not self._durable_up:
            log.error("%s and %s are both unavailable: sessions can be neither loaded nor saved",
                      self.cache.name, self.durable.name)  # fmt: skip

    def _check(self) -> None:
        """The probe: notice an outage even without requests, and move back when a store returns."""
        if self._cache == UP:
            self._on_cache(lambda c: c.ping())
        else:
            self._cache_returns()
        if not self._durable_up:
            self._durable_returns()

    def _cache_returns(self) -> None:
        # Ping before holding writes back: a hung cache must not stall every write for a timeout.
        if not self._answers(self.cache):
            return
        if self._cache == DOWN:
            with self._gate.switch():
                try:
                    synced = not self._durable_up or self._sync_durable() is not None
                except StoreError as exc:
                    self._durable_failed(exc)
                    synced = True
                if synced and self._drop_stale():
                    # Writes reach the cache again, reads not yet: other processes may still
                    # hold copies they wrote while it was away, and drop them within a probe.
                    self._cache, self._returning_since = RETURNING, time.monotonic()
        elif time.monotonic() - self._returning_since >= 2 * self.probe_interval:
            with self._gate.switch():
                if self._drop_stale():
                    self._cache = UP
                    log.info("%s is back, using %s for session storage", self.cache.name, self.cache.name)

    def _drop_stale(self) -> bool:
        """Delete the cache's out-of-date copies; False if the cache failed meanwhile."""
        for key in list(self._stale):
            try:
                self.cache.delete(key)
            except StoreError as exc:
                self._cache_failed(exc)
                return False
            self._stale.discard(key)
        return True

    def _durable_returns(self) -> None:
        try:
            self.durable.setup()  # it may never have been reached before
        except StoreError:
            return
        with self._gate.switch():
            try:
                copied = self._sync_durable()
            except StoreError:
                return
            self._durable_up = True
        if copied is None:
            log.warning("%s is back; %d sessions changed meanwhile stay newer in %s until it answers",
                        self.durable.name, len(self._unsynced), self.cache.name)  # fmt: skip
        else:
            log.info("%s is back: %d sessions copied to it from %s", self.durable.name, copied, self.cache.name)

    def _sync_durable(self) -> int | None:
        """Copy to the durable store what changed in the cache while it was away; return how many.

        Returns None when the cache cannot be read (what is left stays noted, and is copied
        when the cache returns); a failure of the durable store raises :class:`StoreError`.
        """
        copied = 0
        for key, written in list(self._unsynced.items()):
            try:
                record = self.cache.load(key) if written else None
            except StoreError:
                return None
            if record is not None:
                self.durable.create(key, encode_values(record.data), record.expires - now())
                copied += 1
            elif not written:
                self.durable.delete(key)
            # written, but the cache lost it (restarted empty): the durable copy is all there is
            del self._unsynced[key]
        return copied

    def _answers(self, store: SessionStore) -> bool:
        try:
            store.ping()
            return True
        except StoreError:
            return False

    def _on_cache(self, operation: Callable[[SessionStore], Any]) -> bool:
        """Run ``operation`` on the cache; on failure, mark it down and return False."""
        try:
            operation(self.cache)
            return True
        except StoreError as exc:
            self._cache_failed(exc)
            return False


class _Gate:
    """Many writes at a time, or one switch of state alone: a switch waits for the writes
    in flight and holds new ones back, so no write can straddle it."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._writes = 0
        self._switching = False

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._condition:
            while self._switching:
                self._condition.wait()
            self._writes += 1
        try:
            yield
        finally:
            with self._condition:
                self._writes -= 1
                if not self._writes:
                    self._condition.notify_all()

    @contextlib.contextmanager
    def switch(self) -> Iterator[None]:
        with self._condition:
            self._switching = True
            while self._writes:
                self._condition.wait()
        try:
            yield
        finally:
            with self._condition:
                self._switching = False
                self._condition.notify_all()
