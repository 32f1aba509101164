"""Redis in front, PostgreSQL behind: either may go away, or answer late, and nobody is logged out,
no acknowledged change is undone, on any host, after any exit.

Three concerns, each with its own piece:

- where reads and writes go (:class:`FailoverStore`, here): reads from the cache, falling back
  to the durable store when it misses or is not used; every write to both, the durable one first;
- what this process thinks of each store (:class:`~.health.Health`): up or down, and, for the
  cache, whether it answers within the latency budget and has answered long enough to be used again;
- what each store must be told when it returns (:mod:`.resync`): the cache's copies that went out
  of date while some process could not reach it are marked in the durable store before the write
  is acknowledged, and dropped from the cache by whichever process reaches it, every probe
  interval; the sessions changed in the cache alone while the durable store was away are copied to it.

A probe thread in each process runs every ``probe_interval``: it notices an outage (or a slow
cache) without requests, drains the marks, and moves back to a store that answers again.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from .base import (
    CacheStore,
    Changes,
    Copy,
    DurableStore,
    Periodic,
    Record,
    SessionStore,
    StoreError,
    T,
    UserRecord,
    after_fork,
    beyond_limit,
    encode_values,
    json_value,
    log,
    now,
)
from .health import Health, State, metrics
from .resync import CacheFailed, CacheRepair, DurableCatchUp, HostClock

#: how slow the cache may answer, on a moving average, before it counts as away (seconds)
LATENCY_BUDGET = 0.1
#: probe intervals without a copy to drop before reads go back to the cache: time for every other
#: process that was writing around it to find it again
CLEAN_INTERVALS = 2


class FailoverStore(SessionStore):
    """Sessions in ``cache`` (Redis) for speed, with a copy of each in ``durable`` (PostgreSQL).

    ``cache_up`` and ``durable_up`` give the state found at start-up; the probe, every
    ``probe_interval`` seconds, corrects it. A cache whose commands take longer than
    ``latency_budget`` seconds on average is treated as away. The processes of one host that
    pass the same ``host`` name (detection.py names the stores) learn at once when one of them
    wrote around the cache; each of them reads the durable store for two probe intervals then.
    """

    def __init__(
        self,
        cache: CacheStore,
        durable: DurableStore,
        *,
        probe_interval: float = 1.0,
        latency_budget: float = LATENCY_BUDGET,
        cache_up: bool = True,
        durable_up: bool = True,
        host: str | None = None,
    ) -> None:
        self.cache = cache
        self.durable = durable
        self.name = f"{cache.name} with {durable.name}"
        self.probe_interval = probe_interval
        self.cache_health = Health(cache.name, cache_up, probe_interval, latency_budget)
        self.durable_health = Health(durable.name, durable_up, probe_interval)
        self._repair = CacheRepair(cache, durable)
        self._catch_up = DurableCatchUp(cache, durable)
        self._around = HostClock(host)  # when a process of this host last wrote around the cache, or dropped copies
        self._outage = not cache_up  # the cache failed since reads last used it
        self._gate = _Gate()
        self._probe = Periodic("wsgisession-probe", probe_interval, self._check)
        self._used = False  # in this process
        self._first_use_lock = threading.Lock()
        after_fork(self, FailoverStore._after_fork)

    def _after_fork(self) -> None:
        # New locks (a parent's thread may have held them); the child checks for itself.
        self._gate = _Gate()
        self._first_use_lock = threading.Lock()
        self._used = False

    def _first_use(self) -> None:
        """Before a process first reads or writes: one probe, so that it reads no copy that is
        marked out of date (a worker started while others wrote around the cache); then the
        probe's thread."""
        if self._used:
            return
        with self._first_use_lock:
            if not self._used:
                try:
                    self._check()
                except Exception:  # as in the probe's thread: a surprise is logged, not a request's 500
                    log.exception("The first probe of %s failed", self.name)
                finally:
                    self._used = True
                self._probe.start()

    @property
    def serving_from(self) -> str:
        """The name of the store that answers reads now."""
        return self.cache.name if self._reads_cache() else self.durable.name

    def _reads_cache(self) -> bool:
        """Whether reads go to the cache: it is up, and quiet."""
        return self.cache_health.up and self._quiet()

    def _quiet(self) -> bool:
        """No process of this host has written around the cache, dropped copies from it or come
        back to it for two probe intervals: any other process that wrote around it has found it again."""
        return self._around.since() >= CLEAN_INTERVALS * self.probe_interval

    # -- reads ---------------------------------------------------------------------------

    def load(self, key: str) -> Record | None:
        self._first_use()
        trusted = self._reads_cache()
        if trusted or (self.cache_health.writable and not self.durable_health.up):
            started = time.perf_counter()
            try:
                record = self.cache.load(key)
            except StoreError as exc:
                self._cache_failed(exc)
            else:
                self._cache_took(time.perf_counter() - started)
                # Still trusted after the read: the probe may have found meanwhile that the cache is
                # another server (one restored from an older snapshot), which this read then reached.
                if record is not None and (not trusted or self._reads_cache()):
                    return record
        if not self.durable_health.up:
            raise StoreError(f"{self.durable.name} is unavailable and {self.cache.name} cannot answer for it")
        try:
            record = self.durable.load(key)
        except StoreError as exc:
            self._durable_failed(exc)
            raise
        if record is not None and self._reads_cache():
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
        # The cache first: a new session is found (and may be ended) through the durable store's index
        # once it is there, so the cache must not take a copy after an ending came between the two.
        self._write(key, lambda s: s.create(key, data, ttl), written=True, cache_first=True)

    def add(self, key: str, data: Mapping[str, str], expires: float) -> bool:
        """Into the durable store, the authority; if it took the copy, into the cache unless it holds one."""
        # The durable store first, unlike create: it alone can tell whether a live session is there (the
        # cache may have lost its copy), and a copy written first into a cache without it would be served,
        # going back in time, until the durable store refused it. An ending or an update that comes
        # between the two writes finds no copy in the cache to drop, so the cache keeps the copy only
        # while the durable store still holds it (as _refill does); a cache that missed it is marked.
        self._first_use()
        with self._gate.write():
            added = self._copy_in(lambda durable: durable.add(key, data, expires))
            if added and not self._add_to_cache(key, data, expires):
                self._repair.mark(key)  # before the copy is acknowledged: the cache's copy may be out of date
                self._around.touch()
        return added

    def add_many(self, sessions: Sequence[Copy]) -> int:
        """Into the durable store alone, in its batches: the cache takes each copy at its first read, as
        any session it misses (a refill, which drops a copy that changed meanwhile), rather than a
        batch of copies to check one by one against the durable store as :meth:`add` checks its one."""
        self._first_use()
        with self._gate.write():
            return self._copy_in(lambda durable: durable.add_many(sessions))

    def _copy_in(self, operation: Callable[[DurableStore], T]) -> T:
        """``operation``, which copies sessions into the durable store: refused while it is away (only
        it can tell whether a session is there), its failure noted."""
        if not self.durable_health.up:
            raise StoreError(f"{self.durable.name} is unavailable: only it can tell whether a session is there")
        try:
            return operation(self.durable)
        except StoreError as exc:
            self._durable_failed(exc)
            raise

    def _add_to_cache(self, key: str, data: Mapping[str, str], expires: float) -> bool:
        """Give the cache the copy the durable store took, unless it holds a session of its own under
        ``key`` (a newer one, written while the durable store was away); False if the cache failed."""
        cached, stored = self._write_cache(lambda cache: cache.add(key, data, expires))
        if not (cached and stored):
            return cached
        try:
            current = self.durable.load(key)
        except StoreError:
            current = None  # cannot tell: keep no copy that might be out of date
        if current is not None and current.data == {k: json_value(v) for k, v in data.items()}:
            return True
        return self._on_cache(lambda cache: cache.delete(key))

    def scan(self, batch: int = 1000) -> Iterator[list[tuple[str, Record]]]:
        """The durable store's sessions: it holds every one (but those written while it was away,
        until they are copied to it)."""
        return self.durable.scan(batch)

    def count(self) -> int:
        return self.durable.count()

    def update(self, key: str, changes: Changes, ttl: float) -> bool:
        return bool(self._write(key, lambda s: s.update(key, changes, ttl), written=True))

    def touch(self, key: str, ttl: float) -> bool:
        return bool(self._write(key, lambda s: s.touch(key, ttl), written=True))

    def replace(self, key: str, expected: Mapping[str, str], new: Mapping[str, str]) -> bool:
        return bool(self._write(key, lambda s: s.replace(key, expected, new), written=True))

    def delete(self, key: str) -> None:
        self._write(key, lambda s: s.delete(key), written=False)

    def delete_many(self, keys: Sequence[str]) -> None:
        if keys:
            self._write(tuple(keys), lambda s: s.delete_many(keys), written=False)

    def user_sessions(self, user: str) -> list[UserRecord]:
        """From the durable store, the authority (from the cache only while it is away)."""
        self._first_use()
        if self.durable_health.up:
            try:
                return self.durable.user_sessions(user)
            except StoreError as exc:
                self._durable_failed(exc)
        return self.cache.user_sessions(user)

    def trim_user(self, user: str, limit: int, keep: str | None = None) -> list[str]:
        """Chosen and ended by the durable store, the authority (in one round trip where it can), then
        dropped from the cache; while the durable store is away, the cache's choice, ended in both."""
        self._first_use()
        if self.durable_health.up:
            try:
                ended = self.durable.trim_user(user, limit, keep)
            except StoreError as exc:
                self._durable_failed(exc)
            else:
                self._drop_from_cache(ended)
                return ended
        ended = beyond_limit(self.cache.user_sessions(user), limit, keep)
        self.delete_many(ended)
        return ended

    def _drop_from_cache(self, keys: Sequence[str]) -> None:
        """Delete the cache's copies of sessions the durable store ended (marked, if the cache misses it)."""
        if not keys:
            return
        with self._gate.write():
            dropped, _ = self._write_cache(lambda cache: cache.delete_many(keys))
            if not dropped:
                for key in keys:
                    self._repair.mark(key)
                self._around.touch()

    def _write(
        self,
        key: str | tuple[str, ...],
        operation: Callable[[SessionStore], Any],
        written: bool,
        cache_first: bool = False,
    ) -> Any:
        """Apply ``operation`` to both stores (the durable one first, unless ``cache_first``), and note
        what either of them missed (for each of ``key``)."""
        self._first_use()
        with self._gate.write():
            durable_ok = cache_ok = False
            result: Any = None
            cache_result: Any = None
            if cache_first:
                cache_ok, cache_result = self._write_cache(operation)
            if self.durable_health.up:
                try:
                    result = operation(self.durable)
                    durable_ok = True
                except StoreError as exc:
                    self._durable_failed(exc)
            if not cache_first:
                cache_ok, cache_result = self._write_cache(operation)
            if not (durable_ok or cache_ok):
                raise StoreError(f"{self.cache.name} and {self.durable.name} are both unavailable")
            keys = key if isinstance(key, tuple) else (key,)
            if not durable_ok:
                for each in keys:
                    self._catch_up.note(each, written)
                return cache_result
            for each in keys:
                self._catch_up.forget(each)  # the durable store has it now
            if not cache_ok:
                for each in keys:
                    self._repair.mark(each)  # before the write is acknowledged: the cache's copy is out of date
                self._around.touch()
            elif result is False and cache_result is True:
                self._on_cache(lambda c: c.delete_many(keys))  # the durable store says it is gone (a logout)
            return result

    def _write_cache(self, operation: Callable[[SessionStore], Any]) -> tuple[bool, Any]:
        """``operation`` on the cache, if it takes writes now: (whether it did, its result)."""
        if not self.cache_health.writable:
            return False, None
        started = time.perf_counter()
        try:
            result = operation(self.cache)
        except StoreError as exc:
            self._cache_failed(exc)
            return False, None
        self._cache_took(time.perf_counter() - started)
        return True, result

    # -- health --------------------------------------------------------------------------

    def ping(self) -> None:
        """Raise :class:`StoreError` only when neither store answers."""
        try:
            self.cache.ping()
        except StoreError:
            self.durable.ping()

    def cleanup(self) -> int:
        return self.durable.cleanup() if self.durable_health.up else 0

    def setup(self) -> None:
        self.durable.setup()

    def close(self) -> None:
        self._probe.stop()
        self.cache.close()
        self.durable.close()

    def status(self) -> dict[str, Any]:
        """This process's view: which store serves, each store's state and counts, and the backlogs:
        cached copies waiting to be dropped (counted in the durable store: None when it cannot
        answer) and sessions waiting to be copied to the durable store."""
        awaiting_drop: int | None = None
        if self.durable_health.up:  # a durable store that is away would cost a timeout
            with contextlib.suppress(StoreError):
                awaiting_drop = self.durable.count_stale() + self._repair.pending
        serving = self.serving_from if self.cache_health.up or self.durable_health.up else None
        return {
            "ok": serving is not None,
            "pid": os.getpid(),
            "serving": serving,
            "stores": {health.name: health.status() for health in (self.cache_health, self.durable_health)},
            "awaiting_drop": awaiting_drop,
            "awaiting_copy": len(self._catch_up.unsynced),
        }

    def _cache_failed(self, exc: StoreError) -> None:
        if self.cache_health.failed():
            self._outage = True
            log.warning("%s unavailable, falling back to %s (%s)", self.cache.name, self.durable.name, exc)
            self._say_if_both_down()

    def _cache_took(self, seconds: float) -> None:
        if self.cache_health.took(seconds) and self.cache_health.failed():
            self._outage = True
            log.warning("%s too slow (%.0f ms a command on average, budget %.0f ms), falling back to %s",
                        self.cache.name, self.cache_health.latency * 1000, (self.cache_health.budget or 0) * 1000,
                        self.durable.name)  # fmt: skip

    def _durable_failed(self, exc: StoreError) -> None:
        if self.durable_health.failed():
            log.warning("%s unavailable, keeping sessions in %s until it is back (%s)", self.durable.name,
                        self.cache.name, exc)  # fmt: skip
            self._say_if_both_down()

    def _say_if_both_down(self) -> None:
        if not (self.cache_health.writable or self.durable_health.up):
            log.error("%s and %s are both unavailable: sessions can be neither loaded nor saved",
                      self.cache.name, self.durable.name)  # fmt: skip

    def _distrust(self) -> None:
        """Read from the durable store, still writing to the cache, until no process has written
        around the cache for two probe intervals (or until every copy is dropped from it); the
        other processes of this host too."""
        self._around.touch()
        if self.cache_health.returning(State.UP):
            log.info("Reading sessions from %s while copies in %s are dropped", self.durable.name, self.cache.name)

    # -- the probe -----------------------------------------------------------------------

    def _check(self) -> None:
        """Every probe interval: a durable store that is away, then the cache (and drain the marks). In
        this order, a cache back from an outage of both is not read while the durable store it misses
        sessions for is back but not yet known to be."""
        if not self.durable_health.up:
            self._durable_returns()
        self._check_cache()

    def _check_cache(self) -> None:
        health = self.cache_health
        started = time.perf_counter()
        try:
            server = self.cache.server_id()  # the ping, and which server answers it
        except StoreError as exc:
            self._cache_failed(exc)
            self._report_backlog(drained=None)
            return
        seconds = time.perf_counter() - started
        returning = not health.writable  # decided once: a request may mark it down meanwhile
        if not returning:
            self._cache_took(seconds)
            if not health.writable:
                return  # too slow: not to be used again before a later probe finds it fast
        elif not health.answered(seconds):
            self._report_backlog(drained=None)
            return
        if not self.durable_health.up:
            # The marks are in the durable store, out of reach: the cache, the only store left,
            # is used as it is (whichever server answers), and drained once the durable store is back.
            self._repair.use_unmarked(server)
            if not health.up:
                self._cache_back(State.DOWN if returning else State.RETURNING)
            return
        try:
            self._repair.same_server(server, self._distrust)
            if self._catch_up.unsynced and not returning:
                self._copy_to_durable()  # before any copy is dropped: they are the newest
            drained = self._repair.drain(self._distrust)  # most of it while writes go on
            if returning:
                self._cache_returns()
        except CacheFailed as exc:
            self._cache_failed(exc)
        except StoreError as exc:
            self._durable_failed(exc)
        else:
            self._report_backlog(drained)
            if drained:  # some process wrote around the cache: its older copies may have been read
                self._distrust()
            elif health.state is State.RETURNING and self._quiet():
                self._cache_back(State.RETURNING)

    def _cache_returns(self) -> None:
        """Write to the cache again, once what it missed is dropped: writes wait meanwhile, so
        that none of them skips the cache after the last drain. Reads follow after two probe
        intervals without a copy to drop: other processes may still be writing around it."""
        with self._gate.switch():
            if self._catch_up.sync() is None:
                return  # the cache failed while the durable store was brought up to date
            self._repair.drain(self._distrust)
            self._around.touch()
            self.cache_health.returning(State.DOWN)

    def _cache_back(self, expected: State) -> None:
        """Read from the cache again, if it is still ``expected`` (DOWN: only where it is the one store left)."""
        with self._gate.switch():
            if not self.cache_health.back(expected):
                return
        if self._outage:
            self._outage = False
            log.info("%s is back, using %s for session storage", self.cache.name, self.cache.name)
        else:
            log.info("Reading sessions from %s again", self.cache.name)

    def _report_backlog(self, drained: int | None) -> None:
        """Tell Prometheus how many copies await a drop: those this probe drained, or, while this
        process does not drain, those the durable store lists."""
        if drained is None:
            with contextlib.suppress(StoreError):
                drained = self.durable.count_stale() if self.durable_health.up else None
        metrics.backlog(drained, len(self._catch_up.unsynced))

    def _durable_returns(self) -> None:
        try:
            self.durable.setup()  # it may never have been reached before
        except StoreError:
            return
        with self._gate.switch():
            try:
                copied = self._catch_up.sync()
            except StoreError:
                return
            self.durable_health.back(State.DOWN)
        if copied is None:
            log.warning("%s is back; %d sessions changed meanwhile stay newer in %s until it answers",
                        self.durable.name, len(self._catch_up.unsynced), self.cache.name)  # fmt: skip
        else:
            self._say_copied(copied)

    def _copy_to_durable(self) -> None:
        """Copy to the durable store what it still misses of the time it was away (the cache could
        not be read when it returned); raises :class:`StoreError` when the durable store fails."""
        with self._gate.switch():
            copied = self._catch_up.sync()
        if copied is not None:
            self._say_copied(copied)

    def _say_copied(self, copied: int) -> None:
        log.info("%s is back: %d sessions copied to it from %s", self.durable.name, copied, self.cache.name)

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
