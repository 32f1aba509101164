"""Moving sessions from one store to another without logging anyone out.

:func:`move` is the one step both ways of moving share: copy a session into the new store unless it
holds one under that key already (a copy never goes back in time), then delete it from the old one.
:class:`MigratingStore` makes a running application move each session it misses from the old store
(``SESSION_MIGRATE_FROM``); ``wsgisession migrate`` moves them all at once, batch by batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .base import Changes, Copy, Periodic, Record, SessionStore, StoreError, UserRecord, encode_values, log

#: how often (seconds) each process checks whether the old store still holds a live session
CHECK_INTERVAL = 60.0
#: What a session ended while sessions move is replaced with in the new store, rather than deleted:
#: a copy of it read from the old store before (by the command, say) then finds the key taken.
ENDED = "wsgisession.ended"


def move(old: SessionStore, new: SessionStore, sessions: Sequence[tuple[str, Record]]) -> int:
    """Copy ``sessions`` (read from ``old``) into ``new`` where it has none of them yet, keeping their
    expiry, in one batch (:meth:`~.base.SessionStore.add_many`), then delete them from ``old``; return
    how many were copied.

    A session ``new`` holds already stays as it is: it was moved before and may have changed since.
    Deleting only after copying means an interrupted move loses nothing: moving again finishes it.
    """
    copied = new.add_many([(key, encode_values(record.data), record.expires) for key, record in sessions])
    old.delete_many([key for key, _ in sessions])
    return copied


class MigratingStore(SessionStore):
    """The ``new`` store, which on a miss looks the session up in the ``old`` one and moves it across.

    Everything is written to ``new``. A delete (a logout, a user's sessions ended) reaches ``old`` too,
    and leaves a marker (:data:`ENDED`) in ``new`` for the rest of the move, so that no copy of the
    session, left in ``old`` or read from it earlier by ``wsgisession migrate``, can bring it back.
    ``old`` is no longer consulted once it holds no live session (checked every :data:`CHECK_INTERVAL`
    seconds) or ``until`` seconds have passed (no session written before the move outlives the idle
    timeout). Failures of ``old`` read as a miss, logged.
    """

    def __init__(self, new: SessionStore, old: SessionStore, until: float) -> None:
        self.new = new
        self.old = old
        self.name = new.name
        self._until = until
        self._deadline = time.monotonic() + until
        self._consulting = True
        self._moved = 0
        self._reported = 0
        self._lock = threading.Lock()
        self._checker = Periodic("wsgisession-migrate", CHECK_INTERVAL, self.check)

    @property
    def consulting(self) -> bool:
        """Whether a miss is still looked up in the old store."""
        if self._consulting and time.monotonic() >= self._deadline:
            self._stop("the idle timeout has passed since the move began, so it holds no session of before")
        return self._consulting

    def load(self, key: str) -> Record | None:
        record = self.new.load(key)
        if record is not None or not self.consulting:
            return _live(record)
        self._checker.start()
        try:
            found = self.old.load(key)
        except StoreError as exc:
            log.warning("Could not look the session up in %s, which sessions move from: %s", self.old.name, exc)
            return None
        if found is None:  # never there, or another request moved it between the two reads
            return _live(self.new.load(key))
        if move(self.old, self.new, [(key, found)]):
            with self._lock:
                self._moved += 1
            return found
        return _live(self.new.load(key))  # another request (or the command) moved it first: theirs is the one

    def create(self, key: str, data: Mapping[str, str], ttl: float) -> None:
        self.new.create(key, data, ttl)

    def update(self, key: str, changes: Changes, ttl: float) -> bool:
        return self.new.update(key, changes, ttl)

    def touch(self, key: str, ttl: float) -> bool:
        return self.new.touch(key, ttl)

    def replace(self, key: str, expected: Mapping[str, str], new: Mapping[str, str]) -> bool:
        return self.new.replace(key, expected, new)

    def delete(self, key: str) -> None:
        self.delete_many([key])

    def delete_many(self, keys: Sequence[str]) -> None:
        if not self.consulting:
            self.new.delete_many(keys)
            return
        for key in keys:
            self.new.create(key, {ENDED: "true"}, self._until)
        try:
            self.old.delete_many(keys)
        except StoreError as exc:
            log.warning("Could not delete %d sessions from %s too, which sessions move from: %s",
                        len(keys), self.old.name, exc)  # fmt: skip

    def user_sessions(self, user: str) -> list[UserRecord]:
        """The user's sessions in both stores while the old one is consulted (those it cannot list, or
        could not reach, are missing from the list)."""
        records = self.new.user_sessions(user)
        if self.consulting:
            try:
                listed = {record.key for record in records}
                records += [record for record in self.old.user_sessions(user) if record.key not in listed]
            except (NotImplementedError, StoreError):
                pass
        return records

    def trim_user(self, user: str, limit: int, keep: str | None = None) -> list[str]:
        return self.new.trim_user(user, limit, keep)

    def add(self, key: str, data: Mapping[str, str], expires: float) -> bool:
        return self.new.add(key, data, expires)

    def add_many(self, sessions: Sequence[Copy]) -> int:
        return self.new.add_many(sessions)

    def scan(self, batch: int = 1000) -> Iterator[list[tuple[str, Record]]]:
        return self.new.scan(batch)

    def count(self) -> int:
        return self.new.count()

    def ping(self) -> None:
        self.new.ping()

    def setup(self) -> None:
        self.new.setup()

    def cleanup(self) -> int:
        return self.new.cleanup()

    def close(self) -> None:
        if self._moved > self._reported:
            log.info("Moved %d sessions from %s", self._moved, self.old.name)
        self._checker.stop()
        self.new.close()
        self.old.close()

    def status(self) -> dict[str, Any]:
        status = self.new.status()
        status["migrating"] = {"from": self.old.name, "consulted": self.consulting, "moved": self._moved}
        return status

    def check(self) -> None:
        """Stop consulting the old store once it holds no live session; say how many moved so far."""
        if not self.consulting:
            return
        try:
            empty = next(iter(self.old.scan()), None) is None
        except StoreError as exc:
            log.warning("Could not check %s, which sessions move from: %s", self.old.name, exc)
            return
        if empty:
            self._stop("it holds no live session")
        elif self._moved > self._reported:
            self._reported = self._moved
            log.info("Moved %d sessions from %s so far", self._moved, self.old.name)

    def _stop(self, why: str) -> None:
        with self._lock:
            if not self._consulting:
                return
            self._consulting = False
        log.info("Moved %d sessions from %s; it is no longer consulted: %s", self._moved, self.old.name, why)
        self._checker.stop()


def _live(record: Record | None) -> Record | None:
    """The record, unless it is the marker of a session ended while sessions move."""
    return None if record is None or ENDED in record.data else record
