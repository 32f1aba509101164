"""Fault injection under a real gunicorn: the demo with Redis in front of PostgreSQL, while
users keep clicking, loses neither users nor increments when one of the two goes away.

Each scenario runs examples.raw_wsgi:app (2 gthread workers of 4 threads) on a private
redis-server and a private PostgreSQL cluster, with USERS users (threads) that log in, then
loop: read /api/session, POST /counter. A third of the way through, a fault is injected; two
thirds of the way, it is repaired. Counted per scenario: requests, 5xx (and broken
connections), users who found themselves logged out, lost increments (per user, the most an
acknowledged count was ever missing from what was read back, at the end too, and again once
Redis is flushed so that PostgreSQL alone answers) and the slowest request. ``pytest -s``
prints the table.

A scenario runs on Redis with the default PostgreSQL driver (psycopg 3); those where a server kind or a
driver matters (a restarted server, PostgreSQL's connections lost) also on each of servers.PAIRS.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
import redis
from gunicorn_runner import gunicorn, pid_log_config, server_log
from pg_server import PostgresServer
from servers import RedisServer, each_pair, running, unique

pytestmark = pytest.mark.slow

USERS = 24
DURATION = 9.0  # seconds of clicking per scenario; the fault spans its middle third
PROBE = 0.5  # SESSION_PROBE_INTERVAL
TIMEOUT = 0.5  # SESSION_STORE_TIMEOUT
MAX_LATENCY = 5.0  # a bound for any request while Redis hangs (timeout plus generous slack)
PER_USER_REQUESTS = 5000  # a bound on each user's loop besides the time
FORM = {"Content-Type": "application/x-www-form-urlencoded"}

DOWN_LINE = "Redis unavailable, falling back to PostgreSQL"
BACK_LINE = "Redis is back, using Redis for session storage"
PG_DOWN_LINE = "PostgreSQL unavailable, keeping sessions in Redis until it is back"
PG_BACK_LINE = "PostgreSQL is back: "
LOG_LINE = re.compile(r"^wsgisession\[(\d+)\] (\w+) (.*)$", re.MULTILINE)


@dataclass
class Result:
    scenario: str
    requests: int
    errors: int
    logged_out: int
    lost: int
    max_latency_ms: int
    slow: int  # requests that took at least the store timeout


RESULTS: list[Result] = []


@pytest.fixture(scope="module", autouse=True)
def table_of_results() -> Iterator[None]:
    yield
    if RESULTS:
        header = ("scenario", "requests", "5xx", "logged out", "lost increments", "max latency ms", "took >= timeout")
        rows = [header] + [
            (r.scenario, r.requests, r.errors, r.logged_out, r.lost, r.max_latency_ms, r.slow) for r in RESULTS
        ]
        print(f"\n\n{USERS} users, 2 gthread workers x 4 threads, {DURATION:g} s each, timeout {TIMEOUT:g} s")
        for row in rows:
            print(
                f"{row[0]:<34}"
                + "".join(f"{value:>{len(name) + 2}}" for name, value in zip(header[1:], row[1:], strict=True))
            )


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with running(PostgresServer()) as server:
        yield server


@pytest.fixture(scope="module")
def log_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """wsgisession's lines at INFO, tagged with the pid of the worker that wrote them."""
    path = pid_log_config(tmp_path_factory.mktemp("outages"))
    return path


# -- the users -----------------------------------------------------------------------------------


class User(threading.Thread):
    """One browser clicking in a loop; a new connection per request (Connection: close)."""

    def __init__(self, port: int, name: str, stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self.port = port
        self.stop = stop
        self.cookie: str | None = None
        self.acked = 0  # increments the server acknowledged (303) since login
        self.requests = self.errors = 0
        self.logged_out = False
        self.lost = 0  # the most acknowledged increments ever missing from a read
        self.max_latency = 0.0
        self.slow = 0  # requests that took at least the store timeout
        self.problems: list[str] = []

    def request(self, method: str, path: str, body: str | None = None) -> tuple[int, bytes] | None:
        headers = {"Connection": "close", **(FORM if body is not None else {})}
        if self.cookie:
            headers["Cookie"] = self.cookie
        started = time.monotonic()
        self.requests += 1
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body, headers)
            response = conn.getresponse()
            data = response.read()
        except OSError as exc:
            self.errors += 1
            self.problems.append(f"{method} {path}: {exc!r}")
            return None
        finally:
            conn.close()
            seconds = time.monotonic() - started
            self.max_latency = max(self.max_latency, seconds)
            self.slow += seconds >= TIMEOUT
        for header in response.headers.get_all("Set-Cookie") or []:
            pair = header.split(";")[0]
            self.cookie = None if "max-age=0" in header.lower() or pair.endswith("=") else pair
        if response.status >= 500:
            self.errors += 1
            self.problems.append(f"{method} {path}: {response.status} {data[:200]!r}")
        return response.status, data

    def login(self) -> None:
        for _ in range(50):
            if self.request("POST", "/login", f"username={self.name}") is not None and self.cookie:
                self.acked = 0
                return
            time.sleep(0.1)
        self.problems.append("could not log in")

    def check(self) -> None:
        """Read the session back: the user must be logged in, with every acknowledged increment."""
        answer = self.request("GET", "/api/session")
        if answer is None or answer[0] != 200:
            return
        session = json.loads(answer[1])
        if session["user"] != self.name:
            self.logged_out = True
            self.problems.append(f"logged out: {session}")
            self.login()  # and go on measuring
            return
        missing = self.acked - int(session["count"])
        if missing > self.lost:
            self.lost = missing
            self.problems.append(f"read count {session['count']} after {self.acked} acknowledged increments")

    def run(self) -> None:
        self.login()
        for _ in range(PER_USER_REQUESTS):
            if self.stop.is_set():
                break
            self.check()
            answer = self.request("POST", "/counter", "")
            if answer is not None and answer[0] == 303:
                self.acked += 1


# -- one scenario --------------------------------------------------------------------------------


@dataclass
class Run:
    result: Result
    users: list[User]
    log: str  # the wsgisession lines the workers wrote
    cached: int  # sessions in Redis at the end

    def lines(self, start: str) -> Counter[int]:
        """How many lines starting with ``start`` each worker (pid) wrote."""
        return Counter(int(pid) for pid, _, message in LOG_LINE.findall(self.log) if message.startswith(start))


def run_scenario(
    scenario: str,
    redis_server: RedisServer,
    postgres: PostgresServer,
    log_config: Path,
    fault: Callable[[], None],
    repair: Callable[[], None],
    driver: str | None = None,
) -> Run:
    env = {
        "REDIS_URL": redis_server.url,
        "DATABASE_URL": postgres.url,
        "SESSION_TABLE": unique("outage"),
        "SESSION_REDIS_PREFIX": unique("outage") + ":",
        "SESSION_PROBE_INTERVAL": str(PROBE),
        "SESSION_STORE_TIMEOUT": str(TIMEOUT),
        **({"SESSION_PG_DRIVER": driver} if driver else {}),
    }
    args = ("--worker-class", "gthread", "--log-config-json", str(log_config))
    with gunicorn("examples.raw_wsgi:app", env, workers=2, threads=4, args=args) as (url, process):
        port = int(url.rsplit(":", 1)[1])
        stop = threading.Event()
        users = [User(port, f"user{n}", stop) for n in range(USERS)]
        for user in users:
            user.start()
        try:
            time.sleep(DURATION / 3)
            fault()
            time.sleep(DURATION / 3)
        finally:
            repair()
        time.sleep(DURATION / 3)
        stop.set()
        for user in users:
            user.join(60)
        assert not any(user.is_alive() for user in users), "a user thread hangs"
        for user in users:
            user.check()  # the final count
        client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
        cached = sum(1 for key in client.scan_iter(count=1000) if b":user:" not in key)  # sessions, not user indexes
        client.close()
        flush(redis_server)  # and once more from PostgreSQL alone: it holds every acknowledged increment
        for user in users:
            user.check()
        log = "\n".join(f"wsgisession[{pid}] {level} {message}" for pid, level, message in
                        LOG_LINE.findall(server_log(process)))  # fmt: skip
    result = Result(
        scenario if driver is None else f"{scenario} ({redis_server.kind}, {driver})",
        requests=sum(u.requests for u in users),
        errors=sum(u.errors for u in users),
        logged_out=sum(u.logged_out for u in users),
        lost=sum(u.lost for u in users),
        max_latency_ms=round(1000 * max(u.max_latency for u in users)),
        slow=sum(u.slow for u in users),
    )
    RESULTS.append(result)
    return Run(result, users, log, cached)


def flush(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    client.flushall()
    client.close()


def assert_unharmed(run: Run) -> None:
    problems = [f"{u.name}: {p}" for u in run.users for p in u.problems][:20]
    assert run.result.errors == 0, problems
    assert run.result.logged_out == 0, problems
    assert run.result.lost == 0, problems
    assert all(u.acked > 0 for u in run.users), "a user never got an increment through"
    assert run.cached == USERS, f"{run.cached} sessions in Redis at the end, for {USERS} users"


def assert_one_line_per_switch(run: Run, down: str, back: str) -> None:
    """Each worker that noticed the outage said so once, and once that it was over."""
    downs, backs = run.lines(down), run.lines(back)
    assert downs, f"no worker logged {down!r}:\n{run.log}"
    assert all(n == 1 for n in downs.values()), f"{down!r} per worker: {dict(downs)}\n{run.log}"
    assert backs == downs, f"{back!r} per worker: {dict(backs)}, {down!r}: {dict(downs)}\n{run.log}"


# -- the scenarios -------------------------------------------------------------------------------


@each_pair
def test_redis_killed_and_restarted(
    private_redis: RedisServer, postgres: PostgresServer, log_config: Path, pg_driver: str
) -> None:
    run = run_scenario("Redis killed, restarted", private_redis, postgres, log_config,
                       private_redis.kill, private_redis.start, pg_driver)  # fmt: skip
    assert_unharmed(run)
    assert_one_line_per_switch(run, DOWN_LINE, BACK_LINE)


def test_redis_hangs_for_three_seconds(private_redis: RedisServer, postgres: PostgresServer, log_config: Path) -> None:
    def fault() -> None:
        private_redis.pause()
        time.sleep(3)
        private_redis.resume()

    run = run_scenario("Redis paused 3 s (SIGSTOP)", private_redis, postgres, log_config,
                       fault, private_redis.resume)  # fmt: skip
    assert_unharmed(run)
    assert run.result.max_latency_ms < MAX_LATENCY * 1000
    assert_one_line_per_switch(run, DOWN_LINE, BACK_LINE)


def test_redis_flushed(private_redis: RedisServer, postgres: PostgresServer, log_config: Path) -> None:
    run = run_scenario("Redis flushed (FLUSHALL)", private_redis, postgres, log_config,
                       lambda: flush(private_redis), lambda: None)  # fmt: skip
    assert_unharmed(run)
    assert not run.lines(DOWN_LINE), "a flushed Redis is not an outage"


@each_pair
def test_postgres_connections_terminated(
    private_redis: RedisServer, postgres: PostgresServer, log_config: Path, pg_driver: str
) -> None:
    terminated: list[int] = []

    def terminate() -> None:
        conn = psycopg2.connect(postgres.url)
        conn.autocommit = True
        with conn.cursor() as cur:  # a private cluster: every 'wsgisession' connection is the app's
            cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = 'wsgisession' AND pid <> pg_backend_pid()")  # fmt: skip
            terminated.append(cur.fetchone()[0])
        conn.close()

    run = run_scenario("PostgreSQL connections terminated", private_redis, postgres, log_config,
                       terminate, terminate, pg_driver)  # fmt: skip
    assert terminated[0] > 0, "the app held no PostgreSQL connection to terminate"
    assert_unharmed(run)
    # Any worker that lost PostgreSQL got it back (and said so) before the end.
    assert run.lines(PG_BACK_LINE) == run.lines(PG_DOWN_LINE), run.log


@each_pair
def test_postgres_stopped_and_started(
    private_redis: RedisServer, postgres: PostgresServer, log_config: Path, pg_driver: str
) -> None:
    run = run_scenario("PostgreSQL stopped, started", private_redis, postgres, log_config,
                       postgres.stop, postgres.start, pg_driver)  # fmt: skip
    assert_unharmed(run)
    assert_one_line_per_switch(run, PG_DOWN_LINE, PG_BACK_LINE)
    copied = [int(n) for n in re.findall(r"PostgreSQL is back: (\d+) sessions copied", run.log)]
    assert sum(copied) > 0, run.log
