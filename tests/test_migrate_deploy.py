"""Moving sessions to another store while users keep clicking: the design record's migration ("Existing
sessions lost (users must re-login)") done right, under a real gunicorn.

Each redeploy starts gunicorn A (2 workers, tests/migrate_app.py) on the old store behind a Proxy, which
is where the users' browsers connect. USERS users log in and keep incrementing a counter, each from a
thread of its own, one request at a time on fresh connections; IDLE more log in and do nothing until
the end. Then gunicorn B starts on the new store, the proxy sends new connections to it, A answers the
requests it was sent (drained, as by a load balancer) and stops gracefully (SIGTERM). A reply without
the user is a logout, a count that is not the last one + 1 a lost increment; every test wants none, no
5xx, and each user's final count equal to the increments acknowledged. Three ways:

- lazy: B runs with SESSION_MIGRATE_FROM naming A's store, and no command runs;
- planned pause: requests wait while A stops and ``wsgisession migrate`` runs, then B serves them;
- the command while B serves, with SESSION_MIGRATE_FROM: no pause at all.

Each runs from Redis to PostgreSQL (the record's own move), back, and from SQLite to PostgreSQL. The
command is also killed part way through 20,000 sessions and run again; and the two ways of moving race
for one session, at the points where they meet. Figures are printed (pytest -s).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import psycopg2
import pytest
import redis
from gunicorn_runner import ROOT, gunicorn, pid_log_config, server_log
from proxy import Proxy
from servers import drop_table, pg_sql, require_postgres, require_redis, running, unique

from wsgisession import SessionStore, SQLiteStore
from wsgisession.stores.base import USER_KEY, Changes, Record, encode_values
from wsgisession.stores.migrating import MigratingStore, move
from wsgisession.stores.postgres import PostgresStore
from wsgisession.stores.redis import RedisStore

pytestmark = pytest.mark.slow

USERS = 30  # clicking all along
IDLE = 4  # logged in on A, back only at the end
WARM_CLICKS = 3  # increments each user has made on A before the redeploy
CLICKS_AFTER = 5  # requests each user sends after A stopped (B serves them all)
MAX_REQUESTS = 200  # per user: bounds the load whatever the speed of the machine
WAIT = 20.0  # seconds any phase (or a request) may take before the test fails instead of hanging
SERVER_ARGS = ("--pythonpath", "tests", "--keep-alive", "0")
DIRECTIONS = [("redis", "postgres"), ("postgres", "redis"), ("sqlite", "postgres")]
DORMANT = 10_000  # sessions of users away during the move, which the command moves
MANY = 20_000  # sessions the interrupted command moves
SUMMARY = re.compile(r"Moved ([\d,]+) sessions from .+ in ([\d.]+) s \(([\d,]+)/s\): ([\d,]+) copied, "
                     r"([\d,]+) already there")  # fmt: skip


# -- the stores ---------------------------------------------------------------------------


@dataclass
class Place:
    """A store sessions live in: the URL ``--from``/``--to`` and SESSION_MIGRATE_FROM take, the environment
    that points the app at it, and a store object of the test's own on it."""

    kind: str
    url: str
    env: dict[str, str]
    store: SessionStore

    def live(self) -> int:
        """How many live sessions it holds."""
        return sum(len(batch) for batch in self.store.scan())


@pytest.fixture
def places(tmp_path: Path) -> Iterator[Callable[[str], Place]]:
    """Make the store of a kind on this test's private names (one Redis prefix, one table name for
    PostgreSQL and SQLite, a SQLite file in tmp_path); all cleaned up afterwards."""
    names = {"SESSION_REDIS_PREFIX": unique("move") + ":", "SESSION_TABLE": unique("move"),
             "SESSION_CLEANUP_INTERVAL": "0", "SESSION_STORE_TIMEOUT": "5"}  # fmt: skip
    made: list[Place] = []

    def place(kind: str) -> Place:
        if kind == "redis":
            url = require_redis()
            store: SessionStore = RedisStore(url, prefix=names["SESSION_REDIS_PREFIX"], timeout=5)
            env = {"SESSION_STORE": "redis", "REDIS_URL": url}
        elif kind == "postgres":
            url = require_postgres()
            store = PostgresStore(url, table=names["SESSION_TABLE"], cleanup_interval=0)  # creates the table
            env = {"SESSION_STORE": "postgres", "DATABASE_URL": url}
        else:
            path = tmp_path / "sessions.sqlite3"
            url = f"sqlite:///{path}"  # an absolute path: sqlite:////tmp/...
            store = SQLiteStore(str(path), table=names["SESSION_TABLE"], cleanup_interval=0)
            env = {"SESSION_STORE": "sqlite", "SESSION_SQLITE_PATH": str(path)}
        made.append(Place(kind, url, {**names, **env}, store))
        return made[-1]

    yield place
    for done in made:
        done.store.close()
        if done.kind == "postgres":
            drop_table(done.url, names["SESSION_TABLE"])
        elif done.kind == "redis":
            client = redis.Redis.from_url(done.url)
            keys = list(client.scan_iter(match=names["SESSION_REDIS_PREFIX"] + "*", count=1000))
            for start in range(0, len(keys), 1000):
                client.unlink(*keys[start : start + 1000])
            client.close()


@pytest.fixture(params=DIRECTIONS, ids=["->".join(pair) for pair in DIRECTIONS])
def direction(request: pytest.FixtureRequest, places: Callable[[str], Place]) -> tuple[Place, Place]:
    """(old, new): the store sessions leave and the one they move to."""
    old, new = request.param
    return places(old), places(new)


class Summary(NamedTuple):
    """What one ``wsgisession migrate`` said it did, and how long it ran (process start to exit)."""

    moved: int
    seconds: float
    rate: int
    copied: int
    already: int
    wall: float


def migrate(old: Place, new: Place) -> Summary:
    """Run ``python -m wsgisession migrate`` with the app's environment; its summary line, parsed."""
    start = time.monotonic()
    done = subprocess.run(command(old, new), env={**os.environ, **old.env}, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return summary(done.stdout, time.monotonic() - start)


def command(old: Place, new: Place) -> list[str]:
    """The command line that moves every session from ``old`` to ``new``."""
    return [sys.executable, "-m", "wsgisession", "migrate", "--from", old.url, "--to", new.url]


def summary(output: str, wall: float) -> Summary:
    """The figures of the command's last line, and ``wall``."""
    found = SUMMARY.search(output)
    assert found is not None, output
    moved, seconds, rate, copied, already = (float(g.replace(",", "")) for g in found.groups())
    return Summary(int(moved), seconds, int(rate), int(copied), int(already), wall)


# -- the users ----------------------------------------------------------------------------


@dataclass(eq=False)
class User:
    """One browser: its cookie, the increments the app acknowledged, and what went wrong."""

    name: str
    cookie: str | None = None
    key: str | None = None  # the store key of its session, as the app says
    count: int = 0  # increments acknowledged
    sent: int = 0
    after: int = 0  # requests sent once A had stopped: B served them
    longest: float = 0.0  # the longest a request of it took (s)
    logouts: int = 0
    lost: list[tuple[int, int]] = field(default_factory=list)  # (count expected, count replied)
    errors: list[str] = field(default_factory=list)  # 5xx and failed connections

    def call(self, port: int, path: str) -> dict[str, Any] | None:
        """GET ``path`` on a fresh connection; the JSON reply, or None (noted in errors) on a 5xx or a failure."""
        self.sent += 1
        start = time.monotonic()
        headers = {"Connection": "close", **({"Cookie": self.cookie} if self.cookie else {})}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            body = response.read()
        except OSError as exc:
            self.errors.append(f"{path}: {exc!r}")
            return None
        finally:
            conn.close()
        self.longest = max(self.longest, time.monotonic() - start)
        if response.status != 200:
            self.errors.append(f"{path}: {response.status} {body[:200]!r}")
            return None
        set_cookie = response.getheader("Set-Cookie")
        if set_cookie is not None:
            self.cookie = None if "max-age=0" in set_cookie.lower() else set_cookie.split(";")[0]
        return dict(json.loads(body))

    def log_in(self, port: int) -> None:
        reply = self.call(port, f"/login?user={self.name}")
        assert reply is not None and reply["user"] == self.name and self.cookie, (reply, self.errors)
        self.key = reply["key"]

    def click(self, port: int) -> bool:
        """One increment; False once this user cannot go on (logged out, or the request failed)."""
        reply = self.call(port, "/inc")
        if reply is None:
            return False
        if reply["user"] != self.name:
            self.logouts += 1
            return False
        if reply["count"] != self.count + 1:
            self.lost.append((self.count + 1, reply["count"]))
        self.count, self.key = reply["count"], reply["key"]
        return True

    def problems(self) -> dict[str, Any]:
        found = {"logouts": self.logouts, "lost": self.lost, "errors": self.errors}
        return {what: value for what, value in found.items() if value}


class Crowd:
    """USERS users clicking through the proxy, each one request at a time, until stopped; IDLE more logged in."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.users = [User(f"user{n}") for n in range(USERS)]
        self.idle = [User(f"idle{n}") for n in range(IDLE)]
        self.stopped = threading.Event()
        self.a_gone = False  # A has stopped: every request sent from now on is B's
        self._threads = [threading.Thread(target=self._clicks, args=(user,), daemon=True) for user in self.users]

    def start(self) -> None:
        for user in self.users + self.idle:
            user.log_in(self.port)
        for thread in self._threads:
            thread.start()

    def _clicks(self, user: User) -> None:
        while not self.stopped.is_set() and user.sent < MAX_REQUESTS:
            after = self.a_gone
            if not user.click(self.port):
                return
            user.after += after

    def wait(self, condition: Callable[[User], bool], what: str) -> None:
        """Wait until every user meets ``condition`` (or cannot go on); fail after WAIT seconds."""
        wait_until(lambda: all(condition(user) or user.problems() or user.sent >= MAX_REQUESTS
                               for user in self.users), f"every user {what}")  # fmt: skip

    def finish(self) -> None:
        """Stop clicking; fail on any logout, lost increment or error, or a user B never served."""
        self.wait(lambda user: user.after >= CLICKS_AFTER, f"sent {CLICKS_AFTER} requests to B")
        self.stopped.set()
        for thread in self._threads:
            thread.join(WAIT)
        problems = {user.name: user.problems() for user in self.users if user.problems()}
        assert problems == {}, f"{len(problems)} of {USERS} users noticed the move: {problems}"
        assert all(user.after >= CLICKS_AFTER for user in self.users), "every user came back, served by B"

    def come_back(self, until: threading.Event | None = None) -> None:
        """The idle users come back: each clicks once, or (``until`` given) on and on until it is set."""

        def clicks(user: User) -> None:
            while user.click(self.port) and until is not None and not until.is_set():
                pass

        threads = [threading.Thread(target=clicks, args=(user,), daemon=True) for user in self.idle]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        problems = {user.name: user.problems() for user in self.idle if user.problems()}
        assert problems == {}, f"idle users noticed the move: {problems}"

    def check_counts(self) -> None:
        """Every user is still logged in, with every increment acknowledged."""
        for user in self.users + self.idle:
            assert user.call(self.port, "/peek") == {"user": user.name, "count": user.count, "key": user.key}

    def longest(self) -> float:
        return max(user.longest for user in self.users)


# -- the deployments ----------------------------------------------------------------------


def port_of(url: str) -> int:
    """The port of a server's base URL."""
    port = urlsplit(url).port
    assert port is not None
    return port


class Redeploy:
    """Gunicorn A on the old store behind the proxy, the crowd on it; then B on the new store."""

    def __init__(self, stack: ExitStack, old: Place, new: Place, log_config: Path) -> None:
        self.stack, self.new = stack, new
        self.args = (*SERVER_ARGS, "--log-config-json", str(log_config))
        url, self.a = stack.enter_context(gunicorn("migrate_app:app", old.env, workers=2, args=self.args))
        self.a_port = port_of(url)
        self.proxy = stack.enter_context(running(Proxy(self.a_port)))
        self.crowd = Crowd(self.proxy.port)
        stack.callback(self.crowd.stopped.set)  # a failing test stops the clicks too
        self.crowd.start()

    def start_b(self, **env: str) -> tuple[int, subprocess.Popen[bytes]]:
        """Start gunicorn B on the new store as users click on A; its port and process, once every user
        has clicked WARM_CLICKS times on A."""
        url, process = self.stack.enter_context(
            gunicorn("migrate_app:app", {**self.new.env, **env}, workers=2, args=self.args)
        )
        self.crowd.wait(lambda user: user.count >= WARM_CLICKS, f"clicked {WARM_CLICKS} times on A")
        return port_of(url), process

    def switch(self, port: int) -> None:
        """Send new connections to ``port``, let A answer every request sent to it (as a load balancer
        drains a server), then stop A gracefully: it takes no more, and exits.

        Gunicorn's graceful stop finishes the requests its workers have begun, not the connections waiting
        in its listen queue (it resets them): without the drain, most users' requests would fail."""
        self.proxy.target_port = port
        wait_until(lambda: drained(self.a_port), "A answered every request it was sent")
        self.a.send_signal(signal.SIGTERM)
        assert self.a.wait(WAIT) == 0, server_log(self.a)[-3000:]
        self.crowd.a_gone = True


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Wait until ``condition()``; fail after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {WAIT} s")
        time.sleep(0.02)


def connections_to(port: int) -> int:
    """How many established TCP connections the local server on ``port`` holds, being answered or
    waiting in its listen queue (from /proc/net/tcp: local address 127.0.0.1:port, state 01)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(row[1] == f"0100007F:{port:04X}" and row[3] == "01" for row in rows)


def drained(port: int) -> bool:
    """Whether the server on ``port`` holds no connection, now and a moment later (a connection the
    proxy was making as it was switched is made by then)."""
    if connections_to(port):
        return False
    time.sleep(0.05)
    return connections_to(port) == 0


def moved_by(port: int) -> int:
    """How many sessions B's two (sync) workers moved from the old store, as each one's /status says: one
    worker waits for the end of a request sent in two parts while the other answers a whole one."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as held:
        held.sendall(b"GET /status HTTP/1.0\r\n")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        try:
            conn.request("GET", "/status")
            other = conn.getresponse()
            statuses = {other.getheader("X-Worker-Pid"): json.loads(other.read())}
        finally:
            conn.close()
        held.sendall(b"\r\n")
        response = http.client.HTTPResponse(held)
        response.begin()
        statuses[response.getheader("X-Worker-Pid")] = json.loads(response.read())
    assert len(statuses) == 2, statuses
    return sum(status["migrating"]["moved"] for status in statuses.values())


Sessions = dict[str, tuple[dict[str, Any], int]]  # key -> (data, expiry to the second)


def snapshot(place: Place) -> Sessions:
    """Every live session of a store."""
    return {key: (record.data, round(record.expires)) for batch in place.store.scan() for key, record in batch}


def fill(place: Place, count: int) -> Sessions:
    """``count`` sessions created in a store directly, as a deployment left them: four for each user,
    each with an expiry of its own; key -> (data, expiry)."""
    now = int(time.time())
    sessions = {f"{n:064x}": ({"n": n, USER_KEY: {"id": f"u{n // 4}", "login": now}}, now + 3600 + n % 997)
                for n in range(count)}  # fmt: skip
    copies = [(key, encode_values(data), expires) for key, (data, expires) in sessions.items()]
    for start in range(0, count, 1000):
        assert place.store.add_many(copies[start : start + 1000]) == len(copies[start : start + 1000])
    return sessions


def assert_kept(new: Place, sessions: Sessions) -> None:
    """Each of ``sessions`` is in the new store, once, with its data, its expiry and its user."""
    moved = snapshot(new)
    assert {key: moved.get(key) for key in sessions} == sessions
    assert sorted(listed.key for listed in new.store.user_sessions("u7")) == sorted(
        key for key, (data, _) in sessions.items() if data[USER_KEY]["id"] == "u7"
    )


def assert_moved(old: Place, new: Place, users: list[User]) -> None:
    """Each user's session is in the new store, with the count acknowledged and bound to the user (its
    devices list shows it), and gone from the old one."""
    for user in users:
        assert user.key is not None
        record = new.store.load(user.key)
        assert record is not None, f"{user.name}'s session is not in the new store"
        assert record.data["count"] == user.count and record.data[USER_KEY]["id"] == user.name
        assert [listed.key for listed in new.store.user_sessions(user.name)] == [user.key]
        assert old.store.load(user.key) is None, f"{user.name}'s session is still in the old store"


# -- the tests ----------------------------------------------------------------------------


@pytest.fixture
def log_config(tmp_path: Path) -> Path:
    return pid_log_config(tmp_path)


def test_lazy_move_logs_nobody_out(direction: tuple[Place, Place], log_config: Path) -> None:
    """B looks each session it lacks up in A's store (SESSION_MIGRATE_FROM) and moves it; no command runs.
    A session whose user has not come back stays where it was until they do."""
    old, new = direction
    with ExitStack() as stack:
        deploy = Redeploy(stack, old, new, log_config)
        b_port, b = deploy.start_b(SESSION_MIGRATE_FROM=old.url)
        deploy.switch(b_port)
        crowd = deploy.crowd
        crowd.finish()
        assert_moved(old, new, crowd.users)
        for user in crowd.idle:
            assert user.key is not None and old.store.load(user.key) is not None
            assert new.store.load(user.key) is None
        crowd.come_back()
        crowd.check_counts()
        assert_moved(old, new, crowd.idle)
        assert old.live() == 0
        # The MigratingStore logs how many it moved every 60 s, too late for a test: its /status says it now.
        moved = moved_by(b_port)
        assert moved == USERS + IDLE
        assert "looked up in" in server_log(b) and "(SESSION_MIGRATE_FROM)" in server_log(b)
    print(f"\nlazy {old.kind}->{new.kind}: {moved} sessions moved by B's workers as their users came back; "
          f"longest request {crowd.longest() * 1000:.0f} ms")  # fmt: skip


def test_planned_pause_with_the_command(direction: tuple[Place, Place], log_config: Path) -> None:
    """Requests wait (held on their way to B) while A stops and ``wsgisession migrate`` moves every session;
    then B, which never looks in the old store, serves them. A second run moves nothing and changes nothing.

    The hold is a frozen proxy in front of B, where the front proxy sends new connections: freezing the
    front one instead would also hold requests already connected to A, which A's stop then drops."""
    old, new = direction
    dormant = fill(old, DORMANT)
    with ExitStack() as stack:
        deploy = Redeploy(stack, old, new, log_config)
        b_port, _ = deploy.start_b()
        hold = stack.enter_context(running(Proxy(b_port)))
        hold.freeze()
        paused = time.monotonic()
        deploy.switch(hold.port)
        first = migrate(old, new)
        hold.heal()
        pause = time.monotonic() - paused
        crowd = deploy.crowd
        crowd.finish()
        total = USERS + IDLE + DORMANT
        assert first.copied == total and first.moved >= total  # SCAN may return a key twice
        assert old.live() == 0
        assert_moved(old, new, crowd.users)
        assert_kept(new, dormant)
        crowd.come_back()
        crowd.check_counts()
        before = snapshot(new)
        again = migrate(old, new)
        assert (again.moved, again.copied, again.already) == (0, 0, 0)
        assert snapshot(new) == before
    print(f"\nplanned {old.kind}->{new.kind}: pause {pause:.2f} s for {first.moved:,} sessions (A drained and "
          f"stopped, then the command: {first.wall:.2f} s, of which {first.seconds:.2f} s moving at "
          f"{first.rate:,}/s); longest request {crowd.longest():.2f} s")  # fmt: skip


def test_command_while_b_serves_lazily(direction: tuple[Place, Place], log_config: Path) -> None:
    """With SESSION_MIGRATE_FROM set, the command runs as B serves, with no pause, as the idle users come
    back: each session moves once, by B or by the command, and the old store ends empty."""
    old, new = direction
    dormant = fill(old, DORMANT)
    with ExitStack() as stack:
        deploy = Redeploy(stack, old, new, log_config)
        b_port, _ = deploy.start_b(SESSION_MIGRATE_FROM=old.url)
        deploy.switch(b_port)
        crowd = deploy.crowd
        ended = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            running_command = pool.submit(migrate, old, new)
            running_command.add_done_callback(lambda _: ended.set())
            wait_until(lambda: new.store.count() > USERS, "the command began moving")
            crowd.come_back(until=ended)
            done = running_command.result()
        crowd.finish()
        assert old.live() == 0
        assert_moved(old, new, crowd.users + crowd.idle)
        assert_kept(new, dormant)
        crowd.check_counts()
        lazily = moved_by(b_port)
        assert done.copied + done.already == done.moved
        assert lazily + done.copied == USERS + IDLE + DORMANT  # each session copied exactly once
    print(f"\nwhile serving {old.kind}->{new.kind}: B moved {lazily}, the command {done.copied:,} "
          f"({done.already} it found moved by B meanwhile) in {done.seconds:.2f} s; longest request "
          f"{crowd.longest() * 1000:.0f} ms")  # fmt: skip


@contextmanager
def writes_held(place: Place) -> Iterator[Callable[[], bool]]:
    """Hold every write to the PostgreSQL table of ``place`` (reads go on) until the block ends; yield
    what says whether a write waits for it. A write still waiting then is ended with its connection:
    the server would run the statement of a client killed meanwhile once it may."""
    table = place.env["SESSION_TABLE"]
    waiting = "FROM pg_locks WHERE relation = %s::regclass AND NOT granted"
    conn = psycopg2.connect(place.url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"LOCK TABLE {table} IN SHARE MODE")
        yield lambda: pg_sql(place.url, f"SELECT count(*) {waiting}", (table,))[0][0] > 0
        pg_sql(place.url, f"SELECT pg_terminate_backend(pid) {waiting}", (table,))
    finally:
        conn.rollback()
        conn.close()


@pytest.mark.parametrize(("source", "target", "step"), [("redis", "postgres", "copy"), ("postgres", "redis", "delete")],
                         ids=["copying", "deleting"])  # fmt: skip
def test_command_killed_part_way_and_run_again_moves_each_session_once(
    places: Callable[[str], Place], source: str, target: str, step: str
) -> None:
    """SIGKILL part way through MANY sessions, then the same command again: every session is in the new
    store once, with its data, expiry and user, and the old one is empty. It is killed as it waits to
    write to PostgreSQL (whose table the test locks), at a step that matters: as it copies a batch, or
    once it has copied one, before deleting it from the old store. Old copies put back are not copied."""
    old, new = places(source), places(target)
    sessions = fill(old, MANY)
    process = subprocess.Popen(command(old, new), env={**os.environ, **old.env}, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    wait_until(lambda: new.store.count() >= MANY // 8 or process.poll() is not None, "the command copied an eighth")
    with writes_held(new if step == "copy" else old) as waiting:
        wait_until(lambda: waiting() or process.poll() is not None, f"the command waited to {step} a batch")
        process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL, "the command ended before it was killed part way"
    left, there = old.live(), new.store.count()
    both = left + there - MANY  # copied, not yet deleted
    assert 0 < left < MANY and 0 < there < MANY
    assert both == 0 if step == "copy" else both > 0

    rerun = migrate(old, new)
    assert rerun.moved >= left and rerun.copied == MANY - there and rerun.already >= both  # SCAN may give a key twice
    assert old.live() == 0
    assert_kept(new, sessions)
    assert new.store.count() == MANY

    stale = list(sessions)[:100]  # older copies back in the old store (a backup restored): the new ones stay
    for key in stale:
        assert new.store.update(key, Changes({"n": "-1"}), 3600)
    assert old.store.add_many([(key, encode_values(sessions[key][0]), time.time() + 60) for key in stale]) == 100
    late = migrate(old, new)
    assert (late.moved, late.copied, late.already) == (len(stale), 0, len(stale))
    assert old.live() == 0
    assert [new.store.load(key).data["n"] for key in stale] == [-1] * len(stale)  # type: ignore[union-attr]
    print(f"\nkilled as it waited to {step} ({source}->{target}): {there:,} of {MANY:,} copied, {MANY - left:,} "
          f"deleted from the old store; run again, it moved {rerun.moved:,} ({rerun.already:,} already there) in "
          f"{rerun.seconds:.2f} s ({rerun.rate:,}/s)")  # fmt: skip


# -- races between the two ways of moving -------------------------------------------------


def test_a_session_the_command_moves_between_the_two_lookups_is_found(places: Callable[[str], Place]) -> None:
    """The command moves a session after a request found it missing in the new store and before it looks
    in the old one: the request finds it all the same (in the new store), and its user stays logged in."""
    old, new = places("redis"), places("postgres")
    [(key, (data, _))] = fill(old, 1).items()

    class CommandFirst(RedisStore):
        """The old store, where the command's move of a session just beats each read of it."""

        def load(self, key: str) -> Record | None:
            found = super().load(key)
            if found is not None:
                move(self, new.store, [(key, found)])
            return super().load(key)

    lazy = MigratingStore(new.store, CommandFirst(old.url, prefix=old.env["SESSION_REDIS_PREFIX"]), until=3600)
    try:
        record = lazy.load(key)
    finally:
        lazy.close()  # its checking thread and its stores (closing the test's own again is harmless)
    assert record is not None and record.data == data


def test_a_session_ended_while_the_command_runs_stays_ended(places: Callable[[str], Place]) -> None:
    """The command has read a session; before it copies it, the user comes back (B moves it) and logs out:
    the command's copy must not bring the session back (nor its user's binding, nor a stolen cookie's use)."""
    old, new = places("redis"), places("postgres")
    [(key, _)] = fill(old, 1).items()
    read = old.store.load(key)  # the command's batch
    assert read is not None
    lazy = MigratingStore(new.store, old.store, until=3600)
    try:
        assert lazy.load(key) is not None  # the user comes back
        lazy.delete(key)  # and logs out
        assert move(old.store, new.store, [(key, read)]) == 0  # the command's copy finds the key taken
        assert lazy.load(key) is None and new.store.user_sessions("u0") == []
    finally:
        lazy.close()  # its checking thread and its stores (closing the test's own again is harmless)
