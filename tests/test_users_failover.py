"""A user's sessions on FailoverStore(RedisStore, PostgresStore): PostgreSQL is the authority.

A private redis-server (killed, restored from a snapshot, paused) and a private table on the shared
PostgreSQL; users click through SessionMiddleware and test_users_redis.py's devices app. Whatever
ends while Redis is away stays ended once it is back: the stale marks drop Redis's copies before
reads use it again, and what Redis still indexes is pruned as its sessions are found gone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis
from servers import RedisServer, drop_table, require_postgres, unique
from test_failover import PROBE, TIMEOUT, Browser, wait_until
from test_users_redis import middleware

from wsgisession import SessionMiddleware
from wsgisession.stores.failover import FailoverStore
from wsgisession.stores.postgres import PostgresStore
from wsgisession.stores.redis import INDEX, RedisStore


class Pair:
    """The private Redis and a private table; the FailoverStore on them, and the devices app."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.url = require_postgres()
        self.table = unique("users_fo")
        self.prefix = unique("ufo") + ":"
        cache = RedisStore(server.url, prefix=self.prefix, timeout=TIMEOUT)
        durable = PostgresStore(self.url, table=self.table, cleanup_interval=0, timeout=1.0)
        self.store = FailoverStore(cache, durable, probe_interval=PROBE)
        self.app: SessionMiddleware = middleware(self.store)

    @property
    def cache(self) -> RedisStore:
        assert isinstance(self.store.cache, RedisStore)
        return self.store.cache

    def device(self, user: str | None = None) -> Browser:
        """A browser of its own, logged in as ``user``."""
        browser = Browser(self.app)
        if user is not None:
            browser.request("POST", "/login", {"user": user})
        return browser

    def back_on_redis(self) -> None:
        """Wait until reads use Redis again and no mark is left to drain."""
        wait_until(lambda: self.store.serving_from == "Redis", "reads back on Redis")
        wait_until(lambda: self.store.durable.count_stale() == 0, "every stale mark drained")  # type: ignore[attr-defined]

    def close(self) -> None:
        self.store.close()
        drop_table(self.url, self.table)


@pytest.fixture
def pair(private_redis: RedisServer) -> Iterator[Pair]:
    made = Pair(private_redis)
    yield made
    made.close()


def whoami(browser: Browser) -> str | None:
    user: str | None = json.loads(browser.request("GET", "/whoami").body)
    return user


def devices(browser: Browser) -> int:
    count: int = json.loads(browser.request("GET", "/devices").body)
    return count


def test_the_list_comes_from_postgresql(pair: Pair) -> None:
    """Redis's index is a cache's: with it gone, the list is still whole."""
    phone, laptop = pair.device("ann"), pair.device("ann")
    pair.device("bob")
    assert devices(phone) == 2
    assert {r.key for r in pair.cache.user_sessions("ann")} == {phone.key, laptop.key}
    raw = redis.Redis.from_url(pair.server.url)
    assert raw.delete(f"{pair.prefix}{INDEX}ann") == 1
    raw.close()
    assert pair.cache.user_sessions("ann") == []
    assert {r.key for r in pair.store.user_sessions("ann")} == {phone.key, laptop.key}
    assert devices(laptop) == 2


@pytest.mark.parametrize("outage", ["killed", "paused"])
def test_ending_sessions_while_redis_is_away_holds_after_it_returns(pair: Pair, outage: str) -> None:
    """Ann ends her other sessions while Redis is away; Redis returns still holding their copies (a
    snapshot taken before, or a pause): none of them is read back, nor listed, once it serves again."""
    phone, laptop, tablet = pair.device("ann"), pair.device("ann"), pair.device("ann")
    bob = pair.device("bob")
    ended = [laptop.key, tablet.key]
    time.sleep(2 * PROBE)  # the probe has seen which server Redis is
    if outage == "killed":
        pair.server.save()
        pair.server.kill()
    else:
        pair.server.pause()
    try:
        assert json.loads(phone.request("POST", "/others").body) == 2
        assert devices(phone) == 1
        assert whoami(laptop) is None
    finally:
        if outage == "killed":
            pair.server.start()  # the snapshot: laptop's and tablet's sessions, and Ann's index with them
        else:
            pair.server.resume()
    pair.back_on_redis()
    time.sleep(2 * PROBE)  # one more probe, for good measure
    assert [key for key in ended if pair.cache.load(key) is not None] == []
    assert [whoami(device) for device in (phone, laptop, tablet, bob)] == ["ann", None, None, "bob"]
    assert {r.key for r in pair.cache.user_sessions("ann")} == {phone.key}
    assert devices(phone) == 1


def test_a_login_past_the_limit_while_redis_is_paused(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """SESSION_MAX_PER_USER=2: a login during the outage ends the least recently used session, in
    PostgreSQL; once Redis is back, that session is not read from it, and Redis indexes the new one."""
    monkeypatch.setenv("SESSION_MAX_PER_USER", "2")
    pair.app = middleware(pair.store)
    first = pair.device("ann")
    time.sleep(0.002)
    second = pair.device("ann")
    trimmed = first.key
    time.sleep(2 * PROBE)
    pair.server.pause()
    try:
        third = pair.device("ann")
        assert devices(third) == 2
        assert whoami(first) is None
    finally:
        pair.server.resume()
    pair.back_on_redis()
    assert pair.cache.load(trimmed) is None
    assert [whoami(device) for device in (first, second, third)] == [None, "ann", "ann"]
    assert {r.key for r in pair.cache.user_sessions("ann")} == {second.key, third.key}  # third: refilled, indexed
    assert pair.cache.load(third.key) is not None
