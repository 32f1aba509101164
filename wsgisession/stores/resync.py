"""What each store of a FailoverStore must be told when it returns, and the telling.

- :class:`CacheRepair`: the cache's copies that went out of date while some process could not
  reach it. They are marked in the durable store, where every process of every host reads them,
  before the write is acknowledged; whichever process reaches the cache drops them from it. A
  cache that comes back as another server (restarted, failed over, restored from a snapshot) may
  have lost any write: every copy is marked at once.
- :class:`DurableCatchUp`: the sessions changed in the cache alone while the durable store was
  away, copied to it when it returns.
"""

from __future__ import annotations

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

    def same_server(self, server: str) -> bool:
        """Whether the cache is the server this process saw last; if not, mark every copy.

        The first server a process sees is taken as it is. Raises :class:`StoreError` when the
        durable store cannot take the mark (the server is then still news next time)."""
        if self.server is None or server == self.server:
            self.server = server
            return True
        self.durable.mark_stale(DurableStore.EVERY)
        log.warning("%s changed servers (restarted, failed over or restored): every cached copy is dropped "
                    "before it is used again", self.cache.name)  # fmt: skip
        self.server = server
        return False

    def drain(self, distrust: Callable[[], None]) -> int:
        """Drop every marked copy from the cache, then its mark; return how many marks were drained.

        Before dropping every copy at once, ``distrust()`` is called: reads must not use the
        cache while it is being emptied. Raises :class:`CacheFailed` or :class:`StoreError` when
        the cache or the durable store fails (what is left stays marked).
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
