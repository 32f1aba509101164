"""The design record's load test: the demo under gunicorn (2 workers x 8 threads), 100 concurrent
users on keep-alive connections, 10,000 requests, once on Redis and once on PostgreSQL.

Each user logs in under its own name, then alternates reading /api/session and incrementing the
counter. Every read must show that user and exactly the increments the server acknowledged: a
session that crossed users or a lost increment fails the test, as does any 5xx or exception.
Throughput and latency are printed (``pytest -s`` or ``-rA``), never asserted.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from gunicorn_runner import gunicorn, server_log
from servers import drop_table, require_postgres, require_redis, unique

pytestmark = pytest.mark.slow

USERS = 100
REQUESTS_PER_USER = 100  # a login, then reads and increments in turn: 10,000 requests in all
WORKERS, THREADS = 2, 8
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
READY = "worker ready for the load test"
RESULTS: dict[str, tuple[float, float, float]] = {}  # mode: (requests/s, p50 ms, p99 ms)


class User(threading.Thread):
    """One browser: a keep-alive connection and a cookie jar of one cookie."""

    def __init__(self, port: int, name: str, start: threading.Barrier) -> None:
        super().__init__(name=name, daemon=True)
        self.port, self.username, self.start_line = port, name, start
        self.cookie: str | None = None
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def call(self, method: str, path: str, body: str | None = None) -> tuple[int, bytes]:
        headers = dict(FORM) if body is not None else {}
        if self.cookie:
            headers["Cookie"] = self.cookie
        began = time.perf_counter()
        self.conn.request(method, path, body, headers)
        response = self.conn.getresponse()
        data = response.read()
        self.latencies.append(time.perf_counter() - began)
        for header in response.headers.get_all("Set-Cookie") or []:
            pair = header.split(";")[0]
            if "max-age=0" in header.lower():
                self.cookie = None
            elif self.cookie not in (None, pair):
                raise AssertionError(f"the session id changed after login: {self.cookie} -> {pair}")
            else:
                self.cookie = pair
        if response.status >= 500:
            raise AssertionError(f"{method} {path}: {response.status} {data[:200]!r}")
        return response.status, data

    def run(self) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            self.start_line.wait()
            status, _ = self.call("POST", "/login", f"username={self.username}")
            assert status == 303 and self.cookie, f"login answered {status}, cookie {self.cookie}"
            acknowledged = 0
            for turn in range(1, REQUESTS_PER_USER):
                if turn % 2:
                    status, data = self.call("GET", "/api/session")
                    seen = json.loads(data)
                    expected = {"user": self.username, "count": acknowledged}
                    assert status == 200 and seen == expected, f"read {seen} ({status}), expected {expected}"
                else:
                    status, _ = self.call("POST", "/counter")
                    assert status == 303, f"POST /counter answered {status}"
                    acknowledged += 1
        except Exception as exc:  # reported by the test, with the user's name
            self.errors.append(f"{self.username}: {type(exc).__name__}: {exc}")
        finally:
            self.conn.close()


@pytest.fixture(params=["redis", "postgres"])
def mode(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, str]]]:
    """The store to load, forced by SESSION_STORE, on private names removed afterwards."""
    env = {"SESSION_MAX_AGE": "3600000"}  # anything left behind expires within the hour
    if request.param == "redis":
        url, prefix = require_redis(), unique("load") + ":"
        yield "redis", {**env, "SESSION_STORE": "redis", "REDIS_URL": url, "SESSION_REDIS_PREFIX": prefix}
        client = redis.Redis.from_url(url)
        for key in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(key)
        client.close()
    else:
        url, table = require_postgres(), unique("load")
        yield "postgres", {**env, "SESSION_STORE": "postgres", "DATABASE_URL": url, "SESSION_TABLE": table}
        drop_table(url, table)


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def print_table() -> None:
    total = USERS * REQUESTS_PER_USER
    print(f"\nload test: {USERS} users, {total} requests, gunicorn {WORKERS} workers x {THREADS} threads")
    print(f"{'mode':<10}{'requests/s':>12}{'p50 ms':>10}{'p99 ms':>10}")
    for name, (rate, p50, p99) in RESULTS.items():
        print(f"{name:<10}{rate:>12.0f}{p50:>10.1f}{p99:>10.1f}")


def wait_for_workers(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Wait until every worker has loaded the app (gunicorn answers as soon as the first one has)."""
    deadline = time.monotonic() + timeout
    while server_log(process).count(READY) < WORKERS:
        assert time.monotonic() < deadline, f"{WORKERS} workers were not ready within {timeout} s"
        time.sleep(0.05)


def test_100_users_each_see_only_their_own_session(mode: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    name, env = mode
    config = tmp_path / "gunicorn_conf.py"
    config.write_text(f"def post_worker_init(worker):\n    worker.log.info({READY!r})\n")
    # Idle keep-alive connections stay open, so that any exception is a failure.
    args = ("--keep-alive", "60", "--config", str(config))
    with gunicorn("examples.raw_wsgi:app", env, workers=WORKERS, threads=THREADS, args=args) as (url, process):
        wait_for_workers(process)  # else the first one may take every connection
        port = int(url.rsplit(":", 1)[1])
        start = threading.Barrier(USERS + 1)
        users = [User(port, f"user{i:03d}", start) for i in range(USERS)]
        for user in users:
            user.start()
        start.wait(timeout=30)
        began = time.perf_counter()
        for user in users:
            user.join(timeout=max(1.0, 120 - (time.perf_counter() - began)))
        elapsed = time.perf_counter() - began
        assert process.poll() is None, "gunicorn died under load"

    stuck = [user.username for user in users if user.is_alive()]
    assert not stuck, f"{len(stuck)} users did not finish within 120 s"
    errors = [error for user in users for error in user.errors]
    assert not errors, f"{len(errors)} users failed, for example:\n" + "\n".join(errors[:10])
    latencies = sorted(latency for user in users for latency in user.latencies)
    assert len(latencies) == USERS * REQUESTS_PER_USER

    RESULTS[name] = (len(latencies) / elapsed, percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000)
    print_table()
