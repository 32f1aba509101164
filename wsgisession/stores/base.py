"""The contract every session store keeps, and the few helpers stores share.

Stores see only opaque keys (one-way hashes of session ids) and JSON text: ids,
cookies and Python values stay in the middleware.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from json.encoder import encode_basestring_ascii
from typing import Any, NamedTuple, TypeVar

log = logging.getLogger("wsgisession")
T = TypeVar("T")


class StoreError(Exception):
    """The store could not be reached or did not answer: the caller may degrade."""


class Record(NamedTuple):
    """A session as loaded: its values and when it expires (Unix seconds)."""

    data: dict[str, Any]
    expires: float


class Changes(NamedTuple):
    """What one request changed: keys set (to JSON text) and keys deleted."""

    set: Mapping[str, str]
    deleted: tuple[str, ...] = ()


#: The session key that binds a session to a user: a JSON object whose "id" (a str) names the user,
#: with "login" and "seen" (Unix seconds) and, when asked for, "agent" and "ip". Stores index it.
USER_KEY = "wsgisession.user"


#: A session copied from another store, as :meth:`SessionStore.add_many` takes it: its key, the JSON text of
#: each value, its expiry (Unix seconds).
Copy = tuple[str, Mapping[str, str], float]


class UserRecord(NamedTuple):
    """One live session of a user, as a store lists it: its key, its binding (USER_KEY's value), its expiry."""

    key: str
    binding: dict[str, Any]
    expires: float


def recency(record: UserRecord) -> tuple[int, int, float]:
    """How recently a session was used, to rank a user's sessions: last seen, then login, then expiry."""
    binding = record.binding
    return int(binding.get("seen") or 0), int(binding.get("login") or 0), record.expires


def beyond_limit(records: Sequence[UserRecord], limit: int, keep: str | None = None) -> list[str]:
    """The keys of the least recently used sessions beyond the ``limit`` most recent (``keep`` first of all)."""
    ranked = sorted(records, key=lambda record: (record.key == keep, recency(record)), reverse=True)
    return [record.key for record in ranked[limit:]]


def bound_user(data: Mapping[str, Any]) -> str | None:
    """The user a decoded session is bound to, or None."""
    binding = data.get(USER_KEY)
    user = binding.get("id") if isinstance(binding, dict) else None
    return user if isinstance(user, str) else None


class SessionStore(ABC):
    """Where sessions live. Every method is safe to call from many threads.

    ``load`` ignores expired and malformed records. ``create`` writes a whole record;
    ``update`` and ``touch`` only change a record that still exists (so a session
    deleted meanwhile, by a logout or by expiry, is never brought back) and say
    whether it did. Failures to reach the backend raise :class:`StoreError`.
    """

    #: what log lines call the backend
    name = "store"

    @abstractmethod
    def load(self, key: str) -> Record | None:
        """Return the live session stored under ``key``, or None."""

    @abstractmethod
    def create(self, key: str, data: Mapping[str, str], ttl: float) -> None:
        """Store a session of JSON-encoded values that lives ``ttl`` seconds, replacing any under ``key``."""

    @abstractmethod
    def update(self, key: str, changes: Changes, ttl: float) -> bool:
        """Apply ``changes`` atomically to the stored session and extend its life.

        Keys that this request did not change keep what concurrent requests wrote.
        Returns False, writing nothing, when the session no longer exists.
        """

    @abstractmethod
    def touch(self, key: str, ttl: float) -> bool:
        """Extend the session's life to ``ttl`` seconds from now; False if it is gone."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the session; removing a missing one is not an error."""

    @abstractmethod
    def ping(self) -> None:
        """Raise :class:`StoreError` unless the backend answers."""

    def user_sessions(self, user: str) -> list[UserRecord]:
        """The live sessions bound to ``user`` (see :data:`USER_KEY`), in one query where the backend allows."""
        raise NotImplementedError(f"the {self.name} store cannot list a user's sessions")

    def trim_user(self, user: str, limit: int, keep: str | None = None) -> list[str]:
        """End ``user``'s least recently used sessions (by :func:`recency`) beyond the ``limit`` most
        recent, never ``keep`` (the login that asks); return the keys ended."""
        raise NotImplementedError(f"the {self.name} store cannot limit a user's sessions")

    def add(self, key: str, data: Mapping[str, str], expires: float) -> bool:
        """Store a session copied from another store, expiring at ``expires`` (Unix seconds), unless a
        live session is stored under ``key`` already; True if it stored it. A copy never replaces a live
        session, so copying again never goes back in time; an expired record under key is replaced."""
        raise NotImplementedError(f"the {self.name} store cannot take copies of sessions")

    def add_many(self, sessions: Sequence[Copy]) -> int:
        """:meth:`add` each of these sessions (key, JSON texts, expiry), in as few round trips as the
        backend allows (a migration's batch); return how many it stored."""
        return sum(self.add(key, data, expires) for key, data, expires in sessions)

    def scan(self, batch: int = 1000) -> Iterator[list[tuple[str, Record]]]:
        """Every live session as (key, record), ``batch`` or so at a time, in flat memory whatever the
        number of sessions (for copying them to another store). Sessions written during the scan may or
        may not be seen; on Redis one may be seen twice (SCAN's guarantee)."""
        raise NotImplementedError(f"the {self.name} store cannot list its sessions")

    def replace(self, key: str, expected: Mapping[str, str], new: Mapping[str, str]) -> bool:
        """Set the values ``new`` (JSON texts) if each of ``expected`` (the same names, JSON texts) still
        holds, compared as JSON values, in one atomic step; the expiry stays. False, writing nothing,
        when the session is gone or a value changed (for rewriting values without undoing a request's write)."""
        raise NotImplementedError(f"the {self.name} store cannot swap values")

    def count(self) -> int:
        """How many live sessions :meth:`scan` would give (an estimate where sessions come and go)."""
        return sum(len(batch) for batch in self.scan())

    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove these sessions (in as few round trips as the backend allows)."""
        for key in keys:
            self.delete(key)

    def setup(self) -> None:  # noqa: B027 - most stores have nothing to prepare
        """Prepare the backend (create its table); safe to call again, from any process."""

    def cleanup(self) -> int:
        """Delete expired sessions now and return how many; stores with native TTL have none."""
        return 0

    def close(self) -> None:  # noqa: B027 - most stores have nothing to release
        """Release connections and stop background threads."""

    def status(self) -> dict[str, Any]:
        """What this process sees of the store, as JSON-ready values (for a health check)."""
        try:
            self.ping()
        except StoreError:
            return {"ok": False, "serving": None, "stores": {self.name: {"state": "down"}}}
        return {"ok": True, "serving": self.name, "stores": {self.name: {"state": "up"}}}


class CacheStore(SessionStore):
    """A store fast enough to serve reads in front of a :class:`DurableStore` (see FailoverStore)."""

    @abstractmethod
    def server_id(self) -> str:
        """Which server holds the sessions now: a name that changes when it restarts or another server
        takes over (a failover), after which it may hold less than was written to it. Raises
        :class:`StoreError` as :meth:`ping` does."""

    def expect(self, server: str) -> None:
        """From now on, fail (:class:`StoreError`) rather than answer from another server than
        ``server`` (one that took over unseen, through a new connection)."""

    @abstractmethod
    def clear(self) -> None:
        """Delete every session this store holds."""


class DurableStore(SessionStore):
    """A store that keeps every session behind a :class:`CacheStore`, and a list that every process
    of every host can read: the sessions whose cached copies are out of date (written while some
    process could not reach the cache), which whichever process reaches the cache drops from it."""

    #: the mark for every cached copy at once (the cache may have lost writes: a restart, a failover)
    EVERY = "*"

    @abstractmethod
    def mark_stale(self, key: str) -> None:
        """Note that the cache's copy of ``key`` (of every session, for :attr:`EVERY`) is out of date."""

    @abstractmethod
    def stale(self, limit: int) -> list[tuple[int, str]]:
        """Up to ``limit`` marks, oldest first, as (mark, key)."""

    @abstractmethod
    def unmark_stale(self, marks: Sequence[int]) -> None:
        """Remove these marks, once their copies are dropped; marks made since stay."""

    @abstractmethod
    def count_stale(self) -> int:
        """How many marks wait to be drained."""


def json_object(items: Mapping[str, str]) -> str:
    """Join already-encoded values into the text of one JSON object (keys as ``json.dumps`` writes them)."""
    return "{" + ",".join(f"{encode_basestring_ascii(k)}:{v}" for k, v in items.items()) + "}"


_raw_decode = json.JSONDecoder().raw_decode
_ascii_json = json.JSONEncoder(separators=(",", ":")).encode


def json_value(text: str) -> Any:
    """``json.loads(text)``, in half the time for the short texts sessions hold."""
    try:
        value, end = _raw_decode(text)
        if end == len(text):
            return value
    except ValueError:
        pass
    return json.loads(text)  # surrounding whitespace, or the error


def decode_record(raw: Any, expires: float, source: str) -> Record | None:
    """Decode a stored JSON object (or take one a driver decoded), or log and return None."""
    try:
        if isinstance(raw, bytes):
            raw = raw.decode()
        data = json_value(raw) if isinstance(raw, str) else raw
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        log.warning("Ignoring a malformed session record in %s", source)
        return None
    return Record(data, expires)


def now() -> float:
    """The clock all stores use for expiry (the application's, in Unix seconds)."""
    return time.time()


def encode_values(data: Mapping[str, Any]) -> dict[str, str]:
    """The JSON text of each value, as ``create`` takes them (for copying between stores).

    ASCII only: a value another application stored (a lone surrogate, say) still encodes.
    """
    return {k: _ascii_json(v) for k, v in data.items()}


def holds(data: Mapping[str, Any], expected: Mapping[str, str]) -> bool:
    """Whether a stored session (``data``, decoded) holds each of ``expected``'s values (JSON texts)."""
    return all(name in data and data[name] == json_value(text) for name, text in expected.items())


def merged(data: Mapping[str, Any], changes: Changes) -> dict[str, str]:
    """The JSON text of each value of a stored session (``data``, decoded) once ``changes`` are
    applied, for a store that merges in Python: changed values as the request encoded them."""
    deleted = set(changes.deleted)
    texts = {k: changes.set.get(k) or _ascii_json(v) for k, v in data.items() if k not in deleted}
    texts.update(changes.set)
    return texts


def after_fork(owner: T, reset: Callable[[T], None]) -> None:
    """Call ``reset(owner)`` in a child process just after a fork, for as long as ``owner`` lives:
    to replace locks a parent's thread may have held, and drop what belongs to the parent."""
    ref = weakref.ref(owner)

    def after() -> None:
        alive = ref()
        if alive is not None:
            reset(alive)

    os.register_at_fork(after_in_child=after)


class Periodic:
    """Runs ``task`` every ``interval`` seconds (give or take a fifth) on a daemon thread.

    The thread belongs to the process that called :meth:`start`: a forked child has none
    until it calls :meth:`start` itself, so a store built before gunicorn forks still gets
    one thread per worker, started on first use.
    """

    def __init__(self, name: str, interval: float, task: Callable[[], None]) -> None:
        self.name = name
        self.interval = interval
        self._task = task
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        after_fork(self, Periodic._forget)

    def start(self) -> None:
        """Start the thread in this process unless it runs already, the interval is 0 or it was stopped."""
        if self._thread is not None or self.interval <= 0:
            return
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Stop the thread for good and wait (briefly) for it to end."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval * random.uniform(0.8, 1.2)):
            try:
                self._task()
            except Exception:  # a bug or a driver's surprise must not end the thread for good
                log.exception("%s: the periodic task failed; it runs again in %s s", self.name, self.interval)

    def _forget(self) -> None:
        stopped = self._stop.is_set()
        self._lock, self._stop, self._thread = threading.Lock(), threading.Event(), None
        if stopped:
            self._stop.set()


class RateLimitedLog:
    """A WARNING that may repeat often (a store outage, an attack) logged at most once a
    minute, with a count of the repeats it held back."""

    def __init__(self, interval: float = 60.0) -> None:
        self._interval = interval
        self._next = 0.0
        self._suppressed = 0
        self._lock = threading.Lock()

    def report(self, message: str, *args: object) -> None:
        with self._lock:
            t = time.monotonic()
            if t < self._next:
                self._suppressed += 1
                return
            more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
            self._next, self._suppressed = t + self._interval, 0
        log.warning(message + more, *args)
