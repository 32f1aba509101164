"""What each store of a FailoverStore must be told when it returns, and the telling.

- :class:`CacheRepair`: the cache's copies that went out of date while some process could not
  reach it. They are marked in the durable store, where every process of every host reads them,
  before the write is acknowledged; whichever process reaches the cache drops them from it. A
  cache that comes back as another server (restarted, failed over, restored from a snapshot) may
  have lost any write: every copy is marked at once.
- :class:`HostClock`: when a process of this host last wrote around the cache, dropped copies
  from it or came back to it, so that its sibling processes (a user's next request lands on any
  of them) read the durable store meanwhile, without waiting for their own probe.
- :class:`DurableCatchUp`: the sessions changed in the cache alone while the durable store was
  away, copied to it when it returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Callable

from .base import CacheStore, DurableStore, StoreError, encode_values, log, now

#: marks drained per round trip
BATCH = 1000


class CacheFailed(StoreError):
    """The cache failed while copies were dropped from it (the durable store raises plain StoreError)."""


class CacheRepair:
    """Marks the cache's out-of-date copies in the durable store and drops them from the cache."""

    def __init__(self, cache: CacheStore, durable: DurableStore) -> None:
        self.cache = cache
        self.durable = durable
        self.server: str | None = None  # the cache's server when this process last reached it
        self._unmarked: set[str] = set()  # marks the durable store failed to take, to try again

    def mark(self, key: str) -> None:
        """The cache missed a write of ``key`` that the durable store took: mark its copy."""
        try:
            self.durable.mark_stale(key)
        except StoreError:
            self._unmarked.add(key)

    def same_server(self, server: str, distrust: Callable[[], None]) -> bool:
        """Whether the cache is the server this process saw last; if not, call ``distrust()`` and mark
        every copy. From then on, the cache refuses to answer from any other server until the next call.

        The first server a process sees is taken as it is. Raises :class:`StoreError` when the
        durable store cannot take the mark (the server is then still news next time). ``distrust()``
        comes first: once the new server is expected a read may reach it, and must by then find the
        cache distrusted (FailoverStore.load checks again after its read)."""
        same = self.server is None or server == self.server
        if not same:
            distrust()
            self.durable.mark_stale(DurableStore.EVERY)
            log.warning("%s changed servers (restarted, failed over or restored): every cached copy is dropped "
                        "before it is used again", self.cache.name)  # fmt: skip
        self.server = server
        self.cache.expect(server)
        return same

    def use_unmarked(self, server: str) -> None:
        """Let the cache answer from ``server`` while the durable store, where a change of server
        is marked, is away: :meth:`same_server` marks the change once it is back."""
        self.cache.expect(server)

    def drain(self, distrust: Callable[[], None]) -> int:
        """Drop the marked copies from the cache, then their marks; return how many marks were drained.

        It stops after a round that found fewer than :data:`BATCH` marks: while other processes
        keep writing around the cache, what they mark meanwhile waits for the next probe. Before
        dropping every copy at once, ``distrust()`` is called: reads must not use the cache while
        it is being emptied. Raises :class:`CacheFailed` or :class:`StoreError` when the cache or
        the durable store fails (what is left stays marked).
        """
        for key in list(self._unmarked):
            self.durable.mark_stale(key)
            self._unmarked.discard(key)
        drained = 0
        while True:
            marks = self.durable.stale(BATCH)
            if not marks:
                return drained
            keys = [key for _, key in marks]
            try:
                if DurableStore.EVERY in keys:
                    distrust()
                    self.cache.clear()
                else:
                    self.cache.delete_many(keys)
            except StoreError as exc:
                raise CacheFailed(str(exc)) from exc
            self.durable.unmark_stale([mark for mark, _ in marks])
            drained += len(marks)
            if len(marks) < BATCH:
                return drained

    @property
    def pending(self) -> int:
        """Marks this process still owes the durable store."""
        return len(self._unmarked)


class DurableCatchUp:
    """The sessions changed (True) or deleted (False) in the cache alone while the durable store was away."""

    def __init__(self, cache: CacheStore, durable: DurableStore) -> None:
        self.cache = cache
        self.durable = durable
        self.unsynced: dict[str, bool] = {}

    def note(self, key: str, written: bool) -> None:
        self.unsynced[key] = written

    def forget(self, key: str) -> None:
        """The durable store has ``key`` as it is now."""
        self.unsynced.pop(key, None)

    def sync(self) -> int | None:
        """Copy to the durable store what changed in the cache while it was away; return how many.

        Returns None when the cache cannot be read (what is left stays noted, and is copied
        when the cache returns); a failure of the durable store raises :class:`StoreError`.
        """
        copied = 0
        for key, written in list(self.unsynced.items()):
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
            del self.unsynced[key]
        return copied


class HostClock:
    """A time the processes of one host share: 8 bytes of a memory-mapped file in the temporary
    directory, named after ``name`` (the stores it is about). Without a name, or where the file
    cannot be had, it belongs to this process alone."""

    def __init__(self, name: str | None) -> None:
        self._memory: mmap.mmap | bytearray = bytearray(8)
        if name is not None:
            digest = hashlib.sha256(name.encode()).hexdigest()[:24]
            path = os.path.join(tempfile.gettempdir(), f"wsgisession-{digest}.clock")
            try:
                self._memory = _mapped(path)
            except OSError as exc:
                log.warning("Cannot share the write-around clock through %s (%s): this process keeps its own",
                            path, exc)  # fmt: skip

    def touch(self) -> None:
        """Now is the latest time."""
        struct.pack_into("d", self._memory, 0, time.time())

    def since(self) -> float:
        """Seconds since the latest time (a great many when there is none)."""
        latest: float = struct.unpack_from("d", self._memory, 0)[0]
        return time.time() - latest


def _mapped(path: str) -> mmap.mmap:
    """The first 8 bytes of ``path``, created if missing, mapped shared (a fork keeps them shared)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < 8:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 8)
        return mmap.mmap(fd, 8)
    finally:
        os.close(fd)
