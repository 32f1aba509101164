"""Which store create_session_store picks, against the real Redis and PostgreSQL, and what it logs.

Settings are built from explicit mappings, so nothing depends on this process's environment.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from servers import SECRET, RedisServer, free_port, pg_sql, unique

from wsgisession import SQLiteStore
from wsgisession.detection import create_session_store
from wsgisession.settings import ConfigError, Settings
from wsgisession.stores.base import SessionStore, StoreError
from wsgisession.stores.failover import FailoverStore
from wsgisession.stores.memory import MemoryStore
from wsgisession.stores.postgres import PostgresStore
from wsgisession.stores.redis import RedisStore

# Three retries after the first attempt, with min(n * 200, 1000) ms of back-off before retry n.
BACKOFF = 0.2 + 0.4 + 0.6


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsgisession")


def settings(**environ: str) -> Settings:
    """Settings from exactly these variables (and the test secret)."""
    return Settings.load(environ=environ, secret=SECRET)


def detect(made: list[SessionStore], **environ: str) -> SessionStore:
    """create_session_store for these variables, without a cleanup thread; the store is closed after the test."""
    store = create_session_store(settings(**environ), cleanup_interval=0)
    made.append(store)
    return store


def closed_redis_url(password: str = "") -> str:
    return f"redis://{':' + password + '@' if password else ''}127.0.0.1:{free_port()}/0"


def closed_postgres_url(password: str = "") -> str:
    return f"postgresql://postgres{':' + password if password else ''}@127.0.0.1:{free_port()}/test"


def with_password(url: str, password: str) -> tuple[str, str]:
    """The URL with a password (the trust-auth test server ignores it), and the password it carries."""
    parts = urlsplit(url)
    if parts.password:
        return url, parts.password
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}:{password}@{host}")), password


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "wsgisession" and r.levelno == level]


def assert_works(store: SessionStore) -> None:
    """The chosen store really stores sessions."""
    key = unique("key")
    store.create(key, {"user": '"alice"'}, 60)
    record = store.load(key)
    assert record is not None and record.data == {"user": "alice"}
    store.delete(key)


def table_exists(url: str, table: str) -> bool:
    return bool(pg_sql(url, "SELECT to_regclass(%s) IS NOT NULL", (table,))[0][0])


# -- automatic detection ----------------------------------------------------------------


def test_answering_redis_is_used(stores, caplog, redis_url: str) -> None:
    prefix = unique("detect") + ":"
    store = detect(stores, REDIS_URL=redis_url, SESSION_REDIS_PREFIX=prefix)
    assert isinstance(store, RedisStore)
    assert store.prefix == prefix
    assert "Using Redis for session storage" in messages(caplog)
    assert messages(caplog, logging.WARNING) == []
    assert_works(store)


def test_redis_and_postgres_together_keep_a_durable_copy(stores, caplog, redis_url: str, database_url: str,
                                                         table: str) -> None:  # fmt: skip
    store = detect(stores, REDIS_URL=redis_url, DATABASE_URL=database_url, SESSION_TABLE=table,
                   SESSION_REDIS_PREFIX=unique("detect") + ":")  # fmt: skip
    assert isinstance(store, FailoverStore)
    assert isinstance(store.cache, RedisStore) and isinstance(store.durable, PostgresStore)
    assert "Using Redis for session storage" in messages(caplog)
    assert any(m.startswith("Keeping a durable copy of every session in PostgreSQL") for m in messages(caplog))
    assert messages(caplog, logging.WARNING) == []
    assert table_exists(database_url, table)
    assert_works(store)


def test_forcing_redis_drops_the_durable_copy(stores, redis_url: str, database_url: str, table: str) -> None:
    store = detect(stores, SESSION_STORE="redis", REDIS_URL=redis_url, DATABASE_URL=database_url, SESSION_TABLE=table)
    assert isinstance(store, RedisStore)
    assert not table_exists(database_url, table)


def test_closed_redis_port_falls_back_to_postgres_after_retries(stores, caplog, database_url: str, table: str) -> None:
    started = time.monotonic()
    store = detect(stores, REDIS_URL=closed_redis_url(), DATABASE_URL=database_url, SESSION_TABLE=table)
    elapsed = time.monotonic() - started
    assert isinstance(store, FailoverStore) and store.serving_from == "PostgreSQL"
    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 1 and warnings[0].startswith("Redis unavailable, falling back to PostgreSQL"), warnings
    assert "Using PostgreSQL for session storage" in messages(caplog)
    # Refused connections fail at once: only the back-off between the retries can take this long.
    assert elapsed >= BACKOFF * 0.95, f"gave up on Redis after {elapsed:.2f} s, expected {BACKOFF} s of back-off"
    assert_works(store)


def test_killed_private_redis_falls_back_to_postgres(
    stores, caplog, private_redis: RedisServer, database_url: str, table: str
) -> None:
    environ = {"REDIS_URL": private_redis.url, "DATABASE_URL": database_url, "SESSION_TABLE": table}
    running = detect(stores, **environ)
    assert isinstance(running, FailoverStore) and running.serving_from == "Redis"  # while it runs, it is chosen
    private_redis.kill()
    caplog.clear()
    store = detect(stores, **environ)
    assert isinstance(store, FailoverStore) and store.serving_from == "PostgreSQL"
    assert any(m.startswith("Redis unavailable, falling back to PostgreSQL") for m in messages(caplog, logging.WARNING))
    assert_works(store)


def test_no_redis_url_uses_postgres(stores, caplog, database_url: str, table: str) -> None:
    store = detect(stores, DATABASE_URL=database_url, SESSION_TABLE=table)
    assert isinstance(store, PostgresStore)
    assert messages(caplog) == [
        "No REDIS_URL provided, using PostgreSQL for sessions",
        "Using PostgreSQL for session storage",
    ]
    assert messages(caplog, logging.WARNING) == []
    assert table_exists(database_url, table)  # created at start-up
    assert_works(store)


def test_neither_url_uses_sqlite_with_a_warning(stores, caplog, tmp_path: Path) -> None:
    path = tmp_path / "sessions.sqlite3"
    store = detect(stores, SESSION_SQLITE_PATH=str(path))
    assert isinstance(store, SQLiteStore)
    assert store.path == str(path)
    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 1 and "SQLite" in warnings[0] and str(path) in warnings[0], warnings
    assert_works(store)
    assert path.exists()


def test_sqlite_choice_does_not_claim_postgresql(stores, caplog, tmp_path: Path) -> None:
    # Without DATABASE_URL nothing uses PostgreSQL: a log line saying so misleads whoever reads it.
    store = detect(stores, SESSION_SQLITE_PATH=str(tmp_path / "sessions.sqlite3"))
    assert isinstance(store, SQLiteStore)
    claims = [m for m in messages(caplog) if "PostgreSQL" in m]
    assert claims == [], f"SQLite was chosen, yet the log says: {claims}"


def test_unreachable_postgres_without_redis_is_a_config_error(caplog) -> None:
    url = closed_postgres_url()
    with pytest.raises(ConfigError) as error:
        create_session_store(settings(DATABASE_URL=url), cleanup_interval=0)
    message = str(error.value)
    assert "REDIS_URL is not set" in message
    assert f"PostgreSQL at {url}" in message


def test_nothing_reachable_names_both_and_never_a_password(caplog) -> None:
    redis_url, pg_url = closed_redis_url("redis-pw-8812"), closed_postgres_url("pg-pw-9923")
    with pytest.raises(ConfigError) as error:
        create_session_store(settings(REDIS_URL=redis_url, DATABASE_URL=pg_url), cleanup_interval=0)
    message = str(error.value)
    assert "Redis at redis://:***@127.0.0.1" in message
    assert "PostgreSQL at postgresql://postgres:***@127.0.0.1" in message
    for secret in ("redis-pw-8812", "pg-pw-9923"):
        assert secret not in message
        assert secret not in caplog.text


def test_down_redis_without_database_url_is_a_config_error(caplog) -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL is not set") as raised:
        create_session_store(settings(REDIS_URL=closed_redis_url()), cleanup_interval=0)
    assert "., " not in str(raised.value) and "." not in str(raised.value).split(";")[0][-1:]
    assert "falling back to PostgreSQL" not in caplog.text, "there is no PostgreSQL to fall back to"


def test_passwords_never_appear_in_the_logs(stores, caplog, database_url: str, table: str) -> None:
    redis_password = "redis-pw-4471"
    pg_url, pg_password = with_password(database_url, "pg-pw-5582")
    store = detect(stores, REDIS_URL=closed_redis_url(redis_password), DATABASE_URL=pg_url, SESSION_TABLE=table)
    assert isinstance(store, FailoverStore)
    assert "redis://:***@127.0.0.1" in caplog.text
    for record in caplog.records:
        text = record.getMessage()
        assert redis_password not in text and pg_password not in text, text


# -- bad values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ",
    [
        {"REDIS_URL": "foo://x"},
        {"REDIS_URL": "redis://127.0.0.1:notaport/0"},
        {"DATABASE_URL": "foo://x"},
        {"DATABASE_URL": "not a url"},
        {"SESSION_STORE": "redis"},
        {"SESSION_STORE": "postgres"},
    ],
    ids=[
        "redis-scheme",
        "redis-port",
        "database-scheme",
        "database-garbage",
        "forced-redis-no-url",
        "forced-pg-no-url",
    ],
)
def test_bad_or_missing_url_is_a_config_error(stores, environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as error:
        detect(stores, **environ)
    assert "REDIS_URL" in str(error.value) or "DATABASE_URL" in str(error.value)


def test_unknown_store_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="SESSION_STORE"):
        settings(SESSION_STORE="cassandra")


def test_bad_database_url_error_hides_its_password(stores) -> None:
    # A URL of the wrong scheme, as pasted from another service's config.
    with pytest.raises(ConfigError) as error:
        detect(stores, DATABASE_URL="mysql://app:db-pw-6631@db.example/app")
    assert "DATABASE_URL" in str(error.value)
    assert "db-pw-6631" not in str(error.value)


# -- SESSION_STORE forces a kind -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("memory", MemoryStore), ("sqlite", SQLiteStore), ("postgres", PostgresStore), ("redis", RedisStore)],
)
def test_session_store_forces_a_kind(
    stores, caplog, tmp_path: Path, redis_url: str, database_url: str, table: str, kind: str, expected: type
) -> None:
    store = detect(stores, SESSION_STORE=kind.upper(), REDIS_URL=redis_url, DATABASE_URL=database_url,
                   SESSION_TABLE=table, SESSION_SQLITE_PATH=str(tmp_path / "s.sqlite3"),
                   SESSION_REDIS_PREFIX=unique("detect") + ":")  # fmt: skip
    assert type(store) is expected
    assert not any("Redis unavailable" in m for m in messages(caplog, logging.WARNING))
    assert table_exists(database_url, table) == (kind == "postgres")
    assert_works(store)


def test_forced_redis_never_falls_back(stores, caplog, database_url: str, table: str) -> None:
    store = detect(stores, SESSION_STORE="redis", REDIS_URL=closed_redis_url(), DATABASE_URL=database_url,
                   SESSION_TABLE=table)  # fmt: skip
    assert isinstance(store, RedisStore)
    assert not table_exists(database_url, table)
    with pytest.raises(StoreError):
        store.ping()


def test_forced_postgres_that_is_unreachable_fails_at_start(stores, redis_url: str) -> None:
    url = closed_postgres_url("pg-pw-7710")
    with pytest.raises((StoreError, ConfigError)) as error:
        detect(stores, SESSION_STORE="postgres", REDIS_URL=redis_url, DATABASE_URL=url)
    assert "pg-pw-7710" not in str(error.value)


def test_session_pg_prepare_false_reaches_the_postgres_store(stores, database_url: str, table: str) -> None:
    """For a pooler that pins a client that prepares (RDS Proxy): the store prepares nothing."""
    store = detect(stores, DATABASE_URL=database_url, SESSION_TABLE=table, SESSION_PG_PREPARE="false")
    assert isinstance(store, PostgresStore)
    assert_works(store)
    with store._cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_prepared_statements")
        assert cur.fetchone()[0] == 0
