"""The examples under a real gunicorn with two worker processes, on each shared store.

Every request goes out on a fresh connection, so the two sync workers take turns; the
access log records which worker (pid) served which request (numbered in the query
string), so that the tests can show a session written by one worker and read by the other.
PostgreSQL's tests run on each driver (SESSION_PG_DRIVER).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import psycopg2
import pytest
import redis
from gunicorn_runner import gunicorn, pid_log_config, server_log
from servers import PG_DRIVERS, drop_table, require_postgres, require_redis, unique

pytestmark = pytest.mark.slow

# The access log says which worker (pid) served which request.
SERVER_ARGS: tuple[str, ...] = ("--access-logfile", "-", "--access-logformat", '%(p)s "%(r)s" %(s)s')
ACCESS_LINE = re.compile(r'<(\d+)> "(\w+) [^ ?]+\?c=(\w+)&n=(\d+) ')
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


class Client:
    """One browser: a cookie, and a new connection (Connection: close) for every request."""

    def __init__(self, base_url: str, name: str) -> None:
        self.port = urlsplit(base_url).port
        self.name = name
        self.cookie: str | None = None
        self.sent = 0  # requests are tagged ?c=NAME&n=1, 2, ... for the access log

    def request(self, method: str, path: str, body: str | None = None) -> tuple[int, bytes]:
        self.sent += 1
        headers = {"Connection": "close", **(FORM if body is not None else {})}
        if self.cookie:
            headers["Cookie"] = self.cookie
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, f"{path}?c={self.name}&n={self.sent}", body, headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        for header in response.headers.get_all("Set-Cookie") or []:
            pair = header.split(";")[0]
            self.cookie = None if "max-age=0" in header.lower() else pair
        assert response.status < 500, (method, path, response.status, data)
        return response.status, data

    def session(self) -> dict[str, object]:
        status, data = self.request("GET", "/api/session")
        assert status == 200
        return json.loads(data)

    def served_by(self, process: subprocess.Popen[bytes], timeout: float = 0.0) -> dict[int, tuple[str, int]]:
        """{request number: (method, worker pid)} from the access log, waiting up to ``timeout``
        for the lines of all requests sent so far."""
        deadline = time.monotonic() + timeout
        while True:
            found = {
                int(n): (method, int(pid))
                for pid, method, name, n in ACCESS_LINE.findall(server_log(process))
                if name == self.name
            }
            if len(found) >= self.sent or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)

    def handovers(self, process: subprocess.Popen[bytes], timeout: float = 0.0) -> list[int]:
        """The increments served by one worker and checked (by the next request, a read) by the other."""
        log = self.served_by(process, timeout)
        handovers = []
        for n in range(1, self.sent):
            write, read = log.get(n), log.get(n + 1)
            if write and read and write[0] == "POST" and read[0] == "GET" and write[1] != read[1]:
                handovers.append(n)
        return handovers


def worker_pids(process: subprocess.Popen[bytes]) -> set[int]:
    return {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", server_log(process))}


def exercise(
    client: Client, process: subprocess.Popen[bytes], user: str, min_requests: int = 40, timeout: float = 15.0
) -> int:
    """Log in, then alternate increments and reads on fresh connections, at least ``min_requests`` and
    until an increment made by one worker was read back by the other (the second worker may still be
    importing the app at first). Every read must show this user and every acknowledged increment.
    Returns the count."""
    status, _ = client.request("POST", "/login", f"username={user}")
    assert status == 303 and client.cookie
    count = client.session()["count"]
    assert isinstance(count, int)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _ = client.request("POST", "/counter")
        assert status == 303
        count += 1
        assert client.session() == {"user": user, "count": count}
        if client.sent >= min_requests and client.sent % 10 == 0 and client.handovers(process):
            break
    return count


def assert_both_workers_served(client: Client, process: subprocess.Popen[bytes]) -> None:
    log = client.served_by(process, timeout=5)
    assert len(log) == client.sent, "every request should be in the access log"
    assert {pid for _, pid in log.values()} == worker_pids(process), "both workers should have served requests"
    assert client.handovers(process), "no increment was read back by the other worker"


@pytest.fixture
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment that points the demo at a store of the given kind (``postgres-<driver>``), on private names."""
    kind, _, driver = request.param.partition("-")
    if kind == "sqlite":
        yield {"SESSION_STORE": "sqlite", "SESSION_SQLITE_PATH": str(tmp_path / "sessions.sqlite3")}
    elif kind == "postgres":
        url, table = require_postgres(), unique("demo")
        yield {"SESSION_STORE": "postgres", "DATABASE_URL": url, "SESSION_TABLE": table, "SESSION_PG_DRIVER": driver}
        drop_table(url, table)
    elif kind == "redis":
        url, prefix = require_redis(), unique("demo") + ":"
        yield {"SESSION_STORE": "redis", "REDIS_URL": url, "SESSION_REDIS_PREFIX": prefix}
        client = redis.Redis.from_url(url)
        for key in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(key)
        client.close()


@pytest.mark.parametrize(
    ("example", "store_env"),
    [
        ("raw_wsgi", "sqlite"),
        *(("raw_wsgi", f"postgres-{driver}") for driver in PG_DRIVERS),
        ("raw_wsgi", "redis"),
        ("bottle_app", "sqlite"),
        ("flask_app", "sqlite"),  # a framework's own session API (Pyramid's and Django's demos need CSRF tokens)
        ("flask_app", "redis"),
    ],
    indirect=["store_env"],
)
def test_a_session_written_by_one_worker_is_read_by_the_other(example: str, store_env: dict[str, str]) -> None:
    with gunicorn(f"examples.{example}:app", store_env, workers=2, args=SERVER_ARGS) as (url, process):
        alice, bob = Client(url, "alice"), Client(url, "bob")
        exercise(alice, process, "alice")
        assert_both_workers_served(alice, process)
        # Another user in between does not disturb the first one's session.
        bob_count = exercise(bob, process, "bob", min_requests=10)
        assert bob.session() == {"user": "bob", "count": bob_count}
        alice_count = alice.session()["count"]
        assert isinstance(alice_count, int) and alice_count > 0

        # Logging out in one worker ends the session for both.
        stolen, thief = alice.cookie, Client(url, "thief")
        status, _ = alice.request("POST", "/logout")
        assert status == 303 and alice.cookie != stolen  # expired (the Flask demo's flash starts a new session)
        assert alice.session() == {"user": None, "count": 0}
        for _ in range(10):  # a copy of the old cookie, replayed on fresh connections
            thief.cookie = stolen
            assert thief.session() == {"user": None, "count": 0}
        assert bob.session() == {"user": "bob", "count": bob_count}


class Preloaded(NamedTuple):
    url: str
    process: subprocess.Popen[bytes]
    database_url: str
    table: str


@pytest.fixture(scope="module", params=PG_DRIVERS)
def preloaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Preloaded]:
    """The demo on Redis with its PostgreSQL copy (on each driver) under ``gunicorn --preload``: the store
    (a FailoverStore) is built in the master, before the fork. The wsgisession log lines carry the
    pid of the process that wrote them."""
    url, table, prefix = require_postgres(), unique("demo"), unique("preload") + ":"
    log_config = pid_log_config(tmp_path_factory.mktemp("preload"))
    env = {"REDIS_URL": require_redis(), "SESSION_REDIS_PREFIX": prefix, "DATABASE_URL": url, "SESSION_TABLE": table,
           "SESSION_CLEANUP_INTERVAL": "0.5", "SESSION_PG_DRIVER": request.param}  # fmt: skip
    args = (*SERVER_ARGS, "--log-config-json", str(log_config))
    try:
        with gunicorn("examples.raw_wsgi:app", env, workers=2, preload=True, args=args) as (base_url, process):
            yield Preloaded(base_url, process, url, table)
    finally:
        drop_table(url, table)
        client = redis.Redis.from_url(require_redis())
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)


def cleaners(process: subprocess.Popen[bytes]) -> set[int]:
    """The pids of the processes that logged removing expired sessions."""
    return {int(pid) for pid in re.findall(r"wsgisession\[(\d+)\] INFO Cleaned up \d+", server_log(process))}


def test_preloaded_app_gives_every_worker_a_pool_and_a_cleanup_thread(preloaded: Preloaded) -> None:
    process, table = preloaded.process, preloaded.table
    carol = Client(preloaded.url, "carol")
    count = exercise(carol, process, "carol")  # both workers answer from their own connections
    assert_both_workers_served(carol, process)
    workers = worker_pids(process)
    assert len(workers) == 2

    # Expired rows written behind the app's back are deleted by the cleanup threads; go on
    # until each worker has been seen cleaning (the one that wakes first takes the batch).
    conn = psycopg2.connect(preloaded.database_url)
    conn.autocommit = True
    deadline = time.monotonic() + 40
    try:
        with conn.cursor() as cur:
            while not workers <= cleaners(process) and time.monotonic() < deadline:
                ids = [uuid.uuid4().hex for _ in range(3)]
                expired = "now() - interval '1 hour'"
                cur.execute(f"INSERT INTO {table} SELECT unnest(%s::text[]), '{{}}', {expired}", (ids,))
                removed_by = time.monotonic() + 5
                while time.monotonic() < removed_by:
                    cur.execute(f"SELECT count(*) FROM {table} WHERE id = ANY(%s)", (ids,))
                    if cur.fetchone()[0] == 0:
                        break
                    time.sleep(0.05)
                else:
                    pytest.fail("expired rows were not cleaned up within 5 s at a 0.5 s cleanup interval")
                time.sleep(0.1)  # let the log line land
            cur.execute(f"SELECT count(*) FROM {table}")
            live = cur.fetchone()[0]
    finally:
        conn.close()
    assert workers <= cleaners(process), f"workers {workers}; seen cleaning: {cleaners(process)}"
    assert live == 1  # carol's session: the cleanup keeps live rows
    assert carol.session() == {"user": "carol", "count": count}
    assert "Session cleanup failed" not in server_log(process)


def test_preloading_master_keeps_no_database_connection_or_cleanup_thread(preloaded: Preloaded) -> None:
    # The master only forks workers: a connection or a thread there is waste, and forking a
    # multi-threaded process can deadlock the child (Python 3.12 warns about it).
    master = preloaded.process.pid
    assert master not in worker_pids(preloaded.process)
    assert connections(master, urlsplit(preloaded.database_url).port or 5432) == 0, (
        "the gunicorn master holds a PostgreSQL connection"
    )
    assert master not in cleaners(preloaded.process), "the gunicorn master runs a session cleanup thread"
    threads = len(list(Path(f"/proc/{master}/task").iterdir()))
    assert threads == 1, f"the gunicorn master runs {threads} threads (a probe or cleanup thread started there)"


def connections(pid: int, remote_port: int) -> int:
    """How many established TCP connections process ``pid`` has to ``remote_port`` (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            established = fields[3] == "01"
            if established and int(fields[2].rsplit(":", 1)[1], 16) == remote_port and fields[9] in inodes:
                count += 1
    return count
