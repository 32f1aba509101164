"""Sessions in Redis as connect-redis keeps them, for sharing with an Express application."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import redis

from .base import Changes, Copy, Record, StoreError, UserRecord, merged, now
from .express import ExpressDocument
from .redis import RedisStore, milliseconds, read_reply
from .redis_client import store_errors

CAS_ATTEMPTS = 25  # with a growing, jittered pause between them


class ConnectRedisStore(RedisStore):
    """``<prefix><id>`` holds the session's express-session document as a JSON string, with a TTL.

    The document cannot be merged by Redis itself, so an update is a compare-and-set
    (WATCH, read, merge, MULTI/SET), retried when another request wrote in between.
    (A Lua merge would need cjson, which rounds numbers and turns [] into {}.)

    It keeps no user index: the Express application writes and extends these sessions without
    one, so a user's sessions could only be found by reading every key. A session is still bound
    by a login (the Express side sees the binding), and ended by its own logout.
    """

    session_keys = "*"  # every key of the prefix, as connect-redis's own clear() and all() find them

    def __init__(
        self,
        url: str | None = None,
        *,
        document: ExpressDocument,
        client: redis.Redis | None = None,
        prefix: str = "sess:",
        timeout: float = 1.0,
    ) -> None:
        super().__init__(url, client=client, prefix=prefix, timeout=timeout)
        self.document = document

    def load(self, key: str) -> Record | None:
        pipe = self.client.pipeline(transaction=False)
        self._queue_load(pipe, self.prefix + key)
        return self._loaded(iter(self._run(pipe.execute, raise_on_error=False)))

    def _queue_load(self, pipe: Any, name: Any) -> None:
        """The document, and its TTL."""
        pipe.get(name)
        pipe.pttl(name)

    def _loaded(self, replies: Iterator[Any]) -> Record | None:
        raw, pttl = read_reply(next(replies)), read_reply(next(replies))  # None for a foreign record of another type
        if raw is None:
            return None
        return self.document.load(raw, now() + max(pttl, 0) / 1000, "Redis")

    def create(self, key: str, data: Mapping[str, str], ttl: float) -> None:
        self._run(self._set, self.client, key, data, now() + ttl)

    def add(self, key: str, data: Mapping[str, str], expires: float) -> bool:
        """SET NX: the document as :meth:`create` writes it, unless the key exists."""
        return bool(self._run(self._set, self.client, key, data, expires, nx=True))

    def add_many(self, sessions: Sequence[Copy]) -> int:
        """add's SET NX for every session, in one pipelined round trip (on a cluster, one to each node
        that holds some of them)."""
        pipe = self.client.pipeline(transaction=False)
        for key, data, expires in sessions:
            self._set(pipe, key, data, expires, nx=True)
        return sum(1 for stored in self._run(pipe.execute) if stored)

    def _set(self, client: Any, key: str, data: Mapping[str, str], expires: float, nx: bool = False) -> Any:
        """SET the session's document with its TTL, on ``client`` (or on a pipeline, which queues it)."""
        document = self.document.dump(data, expires)
        return client.set(self.prefix + key, document, px=milliseconds(expires - now()), nx=nx)

    def touch(self, key: str, ttl: float) -> bool:
        return bool(self._run(self.client.pexpire, self.prefix + key, milliseconds(ttl)))

    def update(self, key: str, changes: Changes, ttl: float) -> bool:
        name = self.prefix + key
        with store_errors(), self.client.pipeline(transaction=True) as pipe:
            for attempt in range(CAS_ATTEMPTS):
                try:
                    pipe.watch(name)
                    raw = pipe.get(name)
                    record = None if raw is None else self.document.load(raw, 0, "Redis")
                    if record is None:
                        return False  # gone (a logout, or expiry): not brought back
                    document = self.document.dump(merged(record.data, changes), now() + ttl)
                    pipe.multi()
                    pipe.set(name, document, px=milliseconds(ttl))
                    pipe.execute()
                    return True
                except redis.WatchError:  # another request wrote in between: merge onto what it wrote
                    time.sleep(random.uniform(0, 0.001 * attempt))
        raise StoreError(f"the session changed {CAS_ATTEMPTS} times while one request merged its changes")

    def replace(self, key: str, expected: Mapping[str, str], new: Mapping[str, str]) -> bool:
        raise NotImplementedError("the express format's sessions are not encrypted, so never rewritten")

    def user_sessions(self, user: str) -> list[UserRecord]:
        raise NotImplementedError(_NO_INDEX)

    def trim_user(self, user: str, limit: int, keep: str | None = None) -> list[str]:
        raise NotImplementedError(_NO_INDEX)


_NO_INDEX = (
    "the express format (connect-redis's records) keeps no index of a user's sessions: the Express "
    "application writes and extends them without one, and finding them would mean reading every key. "
    "Listing, ending and limiting a user's sessions need the native format (SESSION_FORMAT=native, the default)"
)
