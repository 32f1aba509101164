"""Moving sessions to another store: the lazy mode (SESSION_MIGRATE_FROM) through the middleware, and
``wsgisession migrate`` as a user runs it, against the real Redis, PostgreSQL and SQLite."""

from __future__ import annotations

import json
import logging
import os
import pty
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import webtest
from servers import SECRET, drop_table, free_port, require_postgres, require_redis, unique
from test_cli import assert_one_line_error, run_cli

from wsgisession import ConfigError, SessionMiddleware, SessionStore, Settings, create_session_store
from wsgisession.stores.base import USER_KEY, encode_values
from wsgisession.stores.migrating import ENDED, MigratingStore

LOG = "wsgisession"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """GET /login?user=NAME logs in; /inc counts; /logout ends the session; every reply is the session."""
    session, path = environ["session"], environ["PATH_INFO"]
    if path == "/login":
        session.login(environ["QUERY_STRING"].removeprefix("user="))
        session["count"] = 0
    elif path == "/inc":
        session["count"] = session.get("count", 0) + 1
    elif path == "/logout":
        session.invalidate()
    body = json.dumps({"user": session.user_id, "count": session.get("count")}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


class Places:
    """Store URLs of this test's own (a Redis prefix, a PostgreSQL table, a SQLite file), and the
    environment that names them; dropped afterwards."""

    def __init__(self, tmp_path: Path) -> None:
        self.prefix, self.table = unique("mig") + ":", unique("mig")
        self.urls = {"redis": require_redis(), "postgres": require_postgres(),
                     "sqlite": f"sqlite:///{tmp_path}/sessions.sqlite3"}  # fmt: skip
        self.env = {"SESSION_REDIS_PREFIX": self.prefix, "SESSION_TABLE": self.table}
        self.made: list[SessionStore] = []

    def settings(self, kind: str, **env: str) -> Settings:
        """The settings of an app on ``kind``, with ``env`` added (SESSION_MIGRATE_FROM, say)."""
        where = {"redis": {"REDIS_URL": self.urls["redis"]}, "postgres": {"DATABASE_URL": self.urls["postgres"]},
                 "sqlite": {"SESSION_SQLITE_PATH": self.urls["sqlite"].removeprefix("sqlite:///")}}[kind]  # fmt: skip
        return Settings.load({"SESSION_SECRET": SECRET, "SESSION_STORE": kind, **self.env, **where, **env})

    def store(self, kind: str, **env: str) -> SessionStore:
        store = create_session_store(self.settings(kind, **env), cleanup_interval=0)
        self.made.append(store)
        return store

    def app(self, kind: str, **env: str) -> tuple[webtest.TestApp, SessionStore]:
        """The app on ``kind`` (with ``env``) and its store."""
        store = self.store(kind, **env)
        return webtest.TestApp(SessionMiddleware(app, store, secret=SECRET)), store

    def close(self) -> None:
        for store in self.made:
            store.close()
        drop_table(self.urls["postgres"], self.table)
        keys = [*self._redis().scan_iter(match=self.prefix + "*")]
        if keys:
            self._redis().delete(*keys)

    def _redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.urls["redis"])


@pytest.fixture
def places(tmp_path: Path) -> Iterator[Places]:
    made = Places(tmp_path)
    yield made
    made.close()


def all_keys(store: SessionStore) -> set[str]:
    return {key for batch in store.scan() for key, _ in batch}


def log_in(client: webtest.TestApp, user: str, increments: int = 0) -> None:
    client.get(f"/login?user={user}")
    for _ in range(increments):
        client.get("/inc")


DIRECTIONS = [("redis", "postgres"), ("postgres", "redis"), ("sqlite", "postgres"), ("postgres", "sqlite")]


# -- the lazy mode -----------------------------------------------------------------------------


@pytest.mark.parametrize(("old", "new"), DIRECTIONS, ids=[f"{a}-to-{b}" for a, b in DIRECTIONS])
def test_a_session_of_the_old_store_is_moved_at_its_next_request(places: Places, old: str, new: str) -> None:
    before, old_store = places.app(old)
    log_in(before, "alice", increments=2)
    (key,) = all_keys(old_store)
    expires = old_store.load(key).expires
    after, new_store = places.app(new, SESSION_MIGRATE_FROM=places.urls[old])
    after.set_cookie("session", before.cookies["session"])
    assert after.get("/inc").json == {"user": "alice", "count": 3}  # still logged in, nothing lost
    assert all_keys(old_store) == set()  # moved, not copied
    moved = new_store.load(key)
    assert moved.data["count"] == 3 and moved.data[USER_KEY]["id"] == "alice"
    assert moved.expires >= expires - 1  # the remaining lifetime is kept (the write then extends it)
    devices = SessionMiddleware(app, new_store, secret=SECRET).users.list("alice")
    assert len(devices) == 1  # the binding moved with it: the user's list shows the session


def test_a_logout_ends_the_session_in_both_stores(places: Places) -> None:
    before, old_store = places.app("sqlite")
    log_in(before, "bob")
    (key,) = all_keys(old_store)
    after, new_store = places.app("postgres", SESSION_MIGRATE_FROM=places.urls["sqlite"])
    after.set_cookie("session", before.cookies["session"])
    record = old_store.load(key)
    new_store.add(key, encode_values(record.data), record.expires)  # a copy left behind in the old store
    after.get("/logout")
    assert all_keys(old_store) == set() and new_store.load(key) is None
    assert [record.data for _, record in next(iter(new_store.scan()))] == [{ENDED: True}]  # a marker, no values
    assert after.get("/inc").json["user"] is None  # the copy left behind did not come back
    assert not new_store.add(key, encode_values(record.data), record.expires)  # nor can a copy read before


def test_unknown_sessions_and_new_ones_cost_nothing_in_the_old_store(places: Places) -> None:
    old_store = places.store("redis")
    after, _ = places.app("postgres", SESSION_MIGRATE_FROM=places.urls["redis"])
    assert after.get("/inc").json == {"user": None, "count": 1}
    log_in(after, "carol")
    assert all_keys(old_store) == set()


def test_concurrent_requests_move_a_session_once(places: Places) -> None:
    old_store = places.store("redis")
    key = secrets.token_hex(32)
    old_store.create(key, {"count": "7"}, 600)
    store = places.store("postgres", SESSION_MIGRATE_FROM=places.urls["redis"])
    found: list[Any] = []
    threads = [threading.Thread(target=lambda: found.append(store.load(key))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [record.data for record in found] == [{"count": 7}] * 8
    assert store.status()["migrating"]["moved"] == 1


def test_an_unreachable_old_store_reads_as_a_miss(places: Places, caplog: pytest.LogCaptureFixture) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    after, _ = places.app("postgres", SESSION_MIGRATE_FROM=dead)
    after.set_cookie(
        "session", places.app("sqlite")[0].get("/login?user=dan").headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    )  # fmt: skip - a session the new store lacks
    with caplog.at_level(logging.WARNING, logger=LOG):
        assert after.get("/inc").json == {"user": None, "count": 1}  # a new session, no 500
    assert "which sessions move from" in caplog.text


def test_the_old_store_is_left_once_it_holds_no_session(places: Places, caplog: pytest.LogCaptureFixture) -> None:
    old_store = places.store("sqlite")
    store = places.store("postgres", SESSION_MIGRATE_FROM=places.urls["sqlite"])
    assert isinstance(store, MigratingStore)
    kept = secrets.token_hex(32)
    old_store.create(kept, {"n": "1"}, 600)
    store.check()
    assert store.consulting  # one session is still there
    assert store.load(kept) is not None
    with caplog.at_level(logging.INFO, logger=LOG):
        store.check()
    assert not store.consulting
    assert "Moved 1 sessions from SQLite; it is no longer consulted: it holds no live session" in caplog.text
    late = secrets.token_hex(32)
    old_store.create(late, {"n": "1"}, 600)
    assert store.load(late) is None  # no longer looked up


def test_the_old_store_is_left_after_the_idle_timeout(places: Places) -> None:
    old_store = places.store("sqlite")
    key = secrets.token_hex(32)
    old_store.create(key, {"n": "1"}, 600)
    store = MigratingStore(places.store("postgres"), old_store, until=0)
    assert store.load(key) is None and not store.consulting


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("memcached://127.0.0.1:11211", "is not a session store URL"),
        ("sqlite:///", "is not a SQLite URL"),
        ("redis://127.0.0.1:6379/0", "names the store sessions are kept in"),
    ],
)
def test_a_bad_migrate_from_stops_start_up_with_a_clear_message(places: Places, value: str, message: str) -> None:
    settings = Settings.load({"SESSION_SECRET": SECRET, "SESSION_STORE": "redis", "REDIS_URL": value,
                              "SESSION_MIGRATE_FROM": value})  # fmt: skip
    if "names the store" not in message:
        settings = places.settings("postgres", SESSION_MIGRATE_FROM=value)
    with pytest.raises(ConfigError, match=message):
        create_session_store(settings)


# -- the command ---------------------------------------------------------------------------------


def fill(store: SessionStore, count: int, ttl: float = 600) -> dict[str, float]:
    """``count`` sessions in ``store``; their keys and expiry."""
    keys = {}
    for n in range(count):
        key = secrets.token_hex(32)
        store.create(key, {"n": str(n), USER_KEY: json.dumps({"id": f"u{n % 50}", "login": 1, "seen": 1})}, ttl)
        keys[key] = time.time() + ttl
    return keys


def migrate(places: Places, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(cwd, "migrate", *args, env=places.env)


@pytest.mark.parametrize(("old", "new"), DIRECTIONS, ids=[f"{a}-to-{b}" for a, b in DIRECTIONS])
def test_migrate_moves_every_session_with_its_data_expiry_and_user(
    places: Places, tmp_path: Path, old: str, new: str
) -> None:
    source, target = places.store(old), places.store(new)
    keys = fill(source, 1500)
    source.create(secrets.token_hex(32), {"gone": "1"}, 0.01)  # expired: not moved
    time.sleep(0.05)
    result = migrate(places, tmp_path, "--from", places.urls[old], "--to", places.urls[new])
    assert result.returncode == 0, result.stderr
    assert "Moved 1,500 sessions from" in result.stdout and "1,500 copied, 0 already there" in result.stdout
    assert all_keys(source) == set()
    assert all_keys(target) == set(keys)
    for key, expires in list(keys.items())[:50]:
        record = target.load(key)
        assert abs(record.expires - expires) < 2 and record.data[USER_KEY]["id"].startswith("u")
    assert len(target.user_sessions("u7")) == 30


def test_migrate_again_moves_nothing_and_keeps_newer_sessions(places: Places, tmp_path: Path) -> None:
    source, target = places.store("redis"), places.store("postgres")
    keys = list(fill(source, 10))
    target.create(keys[0], {"n": '"newer"'}, 600)  # moved before, and changed since
    urls = ("--from", places.urls["redis"], "--to", places.urls["postgres"])
    first = migrate(places, tmp_path, *urls)
    assert "9 copied, 1 already there" in first.stdout, first.stderr
    assert target.load(keys[0]).data == {"n": "newer"}  # never goes back in time
    second = migrate(places, tmp_path, *urls)
    assert "Moved 0 sessions" in second.stdout
    assert len(all_keys(target)) == 10


def test_dry_run_only_counts(places: Places, tmp_path: Path) -> None:
    source = places.store("sqlite")
    fill(source, 25)
    result = migrate(places, tmp_path, "--dry-run", "--from", places.urls["sqlite"], "--to", places.urls["redis"])
    assert result.returncode == 0 and result.stdout.startswith("25 live sessions in sqlite:///"), result.stderr
    assert len(all_keys(source)) == 25 and all_keys(places.store("redis")) == set()


def test_migrate_refuses_bad_urls_in_one_line(places: Places, tmp_path: Path) -> None:
    same = migrate(places, tmp_path, "--from", places.urls["redis"], "--to", places.urls["redis"])
    assert "name the same store" in assert_one_line_error(same, 2)
    bad = migrate(places, tmp_path, "--from", "mysql://x", "--to", places.urls["redis"])
    assert "is not a session store URL" in assert_one_line_error(bad, 2)
    down = migrate(places, tmp_path, "--from", f"redis://127.0.0.1:{free_port()}/0", "--to", places.urls["sqlite"])
    assert assert_one_line_error(down, 1)


def test_an_interrupted_migration_goes_on_when_run_again(places: Places, tmp_path: Path) -> None:
    source, target = places.store("postgres"), places.store("sqlite")
    keys = {secrets.token_hex(32) for _ in range(200_000)}  # enough for the progress line to be drawn
    batch = list(keys)
    for start in range(0, len(batch), 1000):
        source.add_many([(key, {"n": "1"}, time.time() + 600) for key in batch[start : start + 1000]])
    primary, replica = pty.openpty()  # stderr a terminal: the progress line is drawn
    env = {**os.environ, "SESSION_SECRET": SECRET, **places.env}
    command = [sys.executable, "-m", "wsgisession", "migrate", "--from", places.urls["postgres"],
               "--to", places.urls["sqlite"]]  # fmt: skip
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=replica, text=True)
    os.close(replica)
    deadline, drawn = time.monotonic() + 30, b""
    while b"left)" not in drawn and time.monotonic() < deadline:
        drawn += os.read(primary, 4096)
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=30)
    os.close(primary)
    assert b"sessions (" in drawn and b"/s, " in drawn  # copied so far, the rate, the time left
    assert process.returncode == 130, out
    moved = len(all_keys(target))
    assert 0 < moved < len(keys)
    again = migrate(places, tmp_path, "--from", places.urls["postgres"], "--to", places.urls["sqlite"])
    assert again.returncode == 0, again.stderr
    assert all_keys(target) == set(keys) and all_keys(source) == set()


def test_check_says_where_sessions_move_from(places: Places, tmp_path: Path) -> None:
    env = {**places.env, "SESSION_STORE": "sqlite", "SESSION_SQLITE_PATH": str(tmp_path / "s.sqlite3"),
           "SESSION_MIGRATE_FROM": places.urls["redis"]}  # fmt: skip
    result = run_cli(tmp_path, "check", env=env)
    assert result.returncode == 0, result.stderr
    assert f"moving the sessions it misses from {places.urls['redis']}" in result.stdout
