"""Sessions in Redis: one hash per session, its TTL the session's idle timeout."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .base import Changes, Record, SessionStore, StoreError, log, now

# Apply per-key changes only if the session still exists, then extend its life:
# one round trip, atomic, so a concurrent logout is never undone.
# ARGV: ttl in ms, the number n of deleted fields, those n fields, then field/value pairs.
_UPDATE = """
if redis.call('exists', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[2])
for i = 3, 2 + n do redis.call('hdel', KEYS[1], ARGV[i]) end
for i = 3 + n, #ARGV, 2 do redis.call('hset', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('pexpire', KEYS[1], ARGV[1])
return 1
"""


class RedisStore(SessionStore):
    """Sessions as Redis hashes ``<prefix><key>`` of JSON values, expired by Redis itself."""

    name = "Redis"

    def __init__(
        self,
        url: str | None = None,
        *,
        client: redis.Redis | None = None,
        prefix: str = "sess:",
        timeout: float = 1.0,
    ) -> None:
        self._owns_client = client is None
        if client is None:
            if url is None:
                raise ValueError("RedisStore needs a url or a client")
            # Short timeouts, and one immediate reconnect for a connection that went stale
            # (a restarted server) but no retry of a timeout: a hung server costs one timeout.
            client = redis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            )
        self.client = client
        self.prefix = prefix
        self._update = client.register_script(_UPDATE)

    def load(self, key: str) -> Record | None:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.prefix + key)
        pipe.pttl(self.prefix + key)
        try:
            fields, pttl = pipe.execute()
            data = {k.decode(): json.loads(v) for k, v in fields.items()}
        except (redis.ResponseError, ValueError, RecursionError):
            log.warning("Ignoring a malformed session record in Redis")
            return None
        except redis.RedisError as exc:
            raise StoreError(f"Redis: {exc}") from exc
        if not data:
            return None
        return Record(data, now() + max(pttl, 0) / 1000)

    def create(self, key: str, data: Mapping[str, str], ttl: float) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.prefix + key)
        pipe.hset(self.prefix + key, mapping=dict(data))  # type: ignore[arg-type]
        pipe.pexpire(self.prefix + key, milliseconds(ttl))
        self._run(pipe.execute)

    def update(self, key: str, changes: Changes, ttl: float) -> bool:
        args: list[Any] = [milliseconds(ttl), len(changes.deleted), *changes.deleted]
        for field, value in changes.set.items():
            args += (field, value)
        return bool(self._run(self._update, keys=[self.prefix + key], args=args))

    def touch(self, key: str, ttl: float) -> bool:
        return bool(self._run(self.client.pexpire, self.prefix + key, milliseconds(ttl)))

    def delete(self, key: str) -> None:
        self._run(self.client.delete, self.prefix + key)

    def ping(self) -> None:
        self._run(self.client.ping)

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    @staticmethod
    def _run(command: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except redis.RedisError as exc:
            raise StoreError(f"Redis: {exc}") from exc


def milliseconds(seconds: float) -> int:
    """A TTL in whole milliseconds, at least 1 (Redis refuses 0)."""
    return max(1, round(seconds * 1000))
