from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from servers import DATABASE_URL, REDIS_URL, RedisServer, drop_table, require_postgres, require_redis, running, unique

from wsgisession import MemoryStore, SessionStore, SQLiteStore

STORE_KINDS = ["memory", "sqlite", "postgres", "redis"]


@pytest.fixture
def redis_url() -> str:
    return require_redis()


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
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may kill, pause or restart."""
    with running(RedisServer()) as server:
        yield server


@pytest.fixture
def make_store(tmp_path) -> Iterator[Callable[..., SessionStore]]:
    """Build a store of a kind on private names (its own table or key prefix); closed after the test."""
    made: list[tuple[SessionStore, Callable[[], None]]] = []

    def make(kind: str, **options) -> SessionStore:
        cleanup = lambda: None  # noqa: E731
        if kind == "memory":
            store: SessionStore = MemoryStore()
        elif kind == "sqlite":
            options.setdefault("cleanup_interval", 0)
            store = SQLiteStore(str(tmp_path / "sessions.sqlite3"), **options)
        elif kind == "postgres":
            from wsgisession.stores.postgres import PostgresStore

            url = require_postgres()
            options.setdefault("cleanup_interval", 0)
            options.setdefault("table", unique("sess"))
            store = PostgresStore(url, **options)
            cleanup = lambda: drop_table(url, options["table"])  # noqa: E731
        elif kind == "redis":
            from wsgisession.stores.redis import RedisStore

            options.setdefault("prefix", unique("test") + ":")
            store = RedisStore(options.pop("url", None) or require_redis(), **options)
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
