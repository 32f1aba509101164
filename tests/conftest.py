from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from servers import (
    DATABASE_URL,
    REDIS_URL,
    RedisServer,
    drop_table,
    require_postgres,
    running,
    shared_redis_url,
    unique,
)

from wsgisession import MemoryStore, SessionStore, SQLiteStore

# The contract's store kinds: PostgreSQL on each of servers.PG_DRIVERS, Redis on each of servers.REDIS_KINDS.
STORE_KINDS = ["memory", "sqlite", "postgres-psycopg", "postgres-psycopg2", "redis", "redis-valkey"]


@pytest.fixture
def redis_kind() -> str:
    """The Redis server kind of ``redis_url``, ``private_redis`` and ``make_store("redis")``: Redis itself,
    unless the test is parametrized with ``redis_kind`` (servers.each_redis_kind, servers.each_pair)."""
    return "redis"


@pytest.fixture
def pg_driver() -> str | None:
    """The driver of ``make_store("postgres")``: the library's default (None), unless the test is
    parametrized with ``pg_driver`` (servers.each_pg_driver, servers.each_pair)."""
    return None


@pytest.fixture
def redis_url(redis_kind: str) -> str:
    return shared_redis_url(redis_kind)


@pytest.fixture
def database_url() -> str:
    return require_postgres()


@pytest.fixture
def table(database_url: str) -> Iterator[str]:
    """A PostgreSQL table name of this test's own, dropped afterwards."""
    name = unique("t")
    yield name
    drop_table(database_url, name)


@pytest.fixture
def stores() -> Iterator[list[SessionStore]]:
    """Stores a test makes; closed after it."""
    made: list[SessionStore] = []
    yield made
    for store in made:
        store.close()


@pytest.fixture
def private_redis(redis_kind: str) -> Iterator[RedisServer]:
    """A server of this test's own (of ``redis_kind``), which it may kill, pause or restart."""
    with running(RedisServer(redis_kind)) as server:
        yield server


@pytest.fixture
def make_store(tmp_path, redis_kind: str, pg_driver: str | None) -> Iterator[Callable[..., SessionStore]]:
    """Build a store of a kind on private names (its own table or key prefix); closed after the test.

    ``postgres-<driver>`` and ``redis-<server kind>`` choose; plain ``postgres`` and ``redis`` take
    the ``pg_driver`` and ``redis_kind`` fixtures'.
    """
    made: list[tuple[SessionStore, Callable[[], None]]] = []

    def make(kind: str, **options) -> SessionStore:
        cleanup = lambda: None  # noqa: E731
        base, _, variant = kind.partition("-")
        if base == "memory":
            store: SessionStore = MemoryStore()
        elif base == "sqlite":
            options.setdefault("cleanup_interval", 0)
            store = SQLiteStore(str(tmp_path / "sessions.sqlite3"), **options)
        elif base == "postgres":
            from wsgisession.stores.postgres import PostgresStore

            url = require_postgres()
            options.setdefault("cleanup_interval", 0)
            options.setdefault("table", unique("sess"))
            if variant or pg_driver:
                options.setdefault("driver", variant or pg_driver)
            store = PostgresStore(url, **options)
            cleanup = lambda: drop_table(url, options["table"])  # noqa: E731
        elif base == "redis":
            from wsgisession.stores.redis import RedisStore

            options.setdefault("prefix", unique("test") + ":")
            store = RedisStore(options.pop("url", None) or shared_redis_url(variant or redis_kind), **options)
        else:
            raise ValueError(kind)
        made.append((store, cleanup))
        return store

    yield make
    for store, cleanup in made:
        store.close()
        cleanup()


@pytest.fixture(params=STORE_KINDS)
def store(request, make_store) -> SessionStore:
    """Each store kind in turn: the contract suite runs against all of them."""
    return make_store(request.param)


__all__ = ["DATABASE_URL", "REDIS_URL"]
