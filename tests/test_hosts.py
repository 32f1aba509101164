"""Two app hosts on one Redis, each seeing it through its own proxy, under faults only some
processes see: a partition of one host, a frozen server while workers recycle, short blips,
a Redis back with old data, slow and hanging replies.

Each host is a gunicorn master running examples.raw_wsgi:app (2 gthread workers x 4 threads)
whose REDIS_URL is its own :class:`proxy.Proxy` to one private redis-server; both share
DATABASE_URL, SESSION_TABLE and SESSION_REDIS_PREFIX. USERS users log in, then read and
increment their counters on one host, move to the other now and then, and log out and in
again. The fault spans the middle third of DURATION seconds of clicking.

The guarantee under test, with BOUND = 2 probe intervals: a write acknowledged by any process
(an increment, a logout) is what every process of every host reads at most BOUND after it was
acknowledged, or after Redis answered that process again, whichever is later; and it is never
undone afterwards. A user sleeps BOUND + 0.2 s before moving to the other host and before
checking a logout. Within a host its requests go to either worker with no pause, so a read there
may come sooner than BOUND after another worker acknowledged an increment: such a read is counted
as stale too (the table's "> bound" column tells the two kinds apart), because the app increments
what it reads, and an increment based on an old count undoes acknowledged ones. Redis outages
never give a 5xx. ``pytest -s`` prints the table.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from gunicorn_runner import gunicorn, pid_log_config, server_log
from prometheus_client.parser import text_string_to_metric_families
from proxy import Proxy
from servers import RedisServer, drop_table, require_postgres, running, unique
from test_failover import SLOW_LINE
from test_outages import BACK_LINE, DOWN_LINE, LOG_LINE, PROBE, TIMEOUT, User, flush

pytestmark = pytest.mark.slow

USERS = 14
DURATION = 12.0  # seconds of clicking per scenario; the fault spans its middle third
BOUND = 2 * PROBE  # how stale a read may be, after an acknowledgement or Redis answering again
PAUSE = BOUND + 0.2  # a user's wait before moving to the other host, and before checking a logout
LATENCY_BUDGET = 0.1  # SESSION_LATENCY_BUDGET: Redis slower than this on average counts as away
STINT = (3, 5)  # rounds (a read and an increment) on one host before moving to the other
SESSION = (10, 15)  # rounds between logging out and in again
PER_USER_REQUESTS = 400  # a bound on each user's requests besides the time
EXIT_LINE = re.compile(r"^\[([-\d]+ [:\d]+ [+-]\d{4})\] \[\d+\] \[INFO\] Worker exiting", re.MULTILINE)
APP = "examples.raw_wsgi:app"
WORKERS = 2


@dataclass
class Result:
    scenario: str
    requests: int
    errors: int
    stale: int  # reads lower than the acknowledged count (each counted once: see HostUser.read)
    stale_past_bound: int  # of which more than BOUND after the last acknowledged increment
    undone: int  # acknowledged logouts that a later read did not see
    logged_out: int  # reads of a logged-in user's session that found nobody
    lost: int  # acknowledged increments missing at the end (both hosts, then PostgreSQL alone)
    max_latency_ms: int
    slow: int  # requests that took at least the store timeout


RESULTS: list[Result] = []


@pytest.fixture(scope="module", autouse=True)
def table_of_results() -> Iterator[None]:
    yield
    if RESULTS:
        header = ("scenario", "requests", "5xx", "stale reads", "> bound", "undone logouts", "logged out",
                  "lost increments", "max latency ms", "took >= timeout")  # fmt: skip
        print(f"\n\n{USERS} users on 2 hosts of {WORKERS} gthread workers x 4 threads, {DURATION:g} s each, "
              f"timeout {TIMEOUT:g} s, probe {PROBE:g} s")  # fmt: skip
        for r in [header, *((r.scenario, r.requests, r.errors, r.stale, r.stale_past_bound, r.undone, r.logged_out,
                             r.lost, r.max_latency_ms, r.slow) for r in RESULTS)]:  # fmt: skip
            print(f"{r[0]:<36}" + "".join(f"{v:>{len(n) + 2}}" for n, v in zip(header[1:], r[1:], strict=True)))


@pytest.fixture(scope="module")
def log_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """wsgisession's lines at INFO, tagged with the pid of the worker that wrote them."""
    return pid_log_config(tmp_path_factory.mktemp("hosts"))


# -- the users -----------------------------------------------------------------------------------


class HostUser(User):
    """A browser that clicks on one host, then the other, and now and then logs out and in again."""

    def __init__(self, ports: list[int], number: int, stop: threading.Event) -> None:
        super().__init__(ports[number % 2], f"user{number}", stop)
        self.ports = ports
        self.random = random.Random(number)
        self.stale = self.stale_past_bound = self.undone = self.times_logged_out = 0
        self.old_cookies: list[tuple[str, str, float]] = []  # of acknowledged logouts: cookie, host, when
        self.last_ack = (0.0, "")  # when, and on which host, the last increment was acknowledged
        self.excused = 0  # acknowledged increments a stale read already reported missing

    def login(self) -> None:
        """Log in: a new session, whose count starts from zero."""
        super().login()
        self.excused = 0

    def host(self, port: int | None = None) -> str:
        return "AB"[self.ports.index(self.port if port is None else port)]

    def run(self) -> None:
        self.login()
        stint, session = self.random.randint(*STINT), self.random.randint(*SESSION)
        while self.requests < PER_USER_REQUESTS and not self.stop.is_set():
            if stint == 0:
                if self.stop.wait(PAUSE):
                    break
                self.port = self.ports[1 - self.ports.index(self.port)]
                stint = self.random.randint(*STINT)
            if session == 0:
                self.log_out_and_in()
                session = self.random.randint(*SESSION)
            self.read()
            self.increment()
            stint, session = stint - 1, session - 1

    def read(self) -> None:
        """Read the session here: it must hold the user and every acknowledged increment.

        A shortfall once reported is excused from then on, so that one lost increment counts as
        one stale read, not one per read after it (the final check counts it lost if it lasts)."""
        session = self.session_at(self.port)
        if session is None:
            return
        if session["user"] != self.name:
            self.times_logged_out += 1
            self.problems.append(f"logged out on host {self.host()}: {session}")
            self.login()
            return
        count = int(session["count"])
        if count < self.acked - self.excused:
            when, where = self.last_ack
            age = time.monotonic() - when
            self.stale += 1
            self.stale_past_bound += age > BOUND
            self.problems.append(f"stale read on host {self.host()}: count {count}, {self.acked} acknowledged, "
                                 f"the last on host {where} {age:.2f} s before")  # fmt: skip
            self.excused = self.acked - count
        elif count >= self.acked:
            self.excused = 0  # it was an old copy, not a lost increment

    def increment(self) -> None:
        answer = self.request("POST", "/counter", "")
        if answer is not None and answer[0] == 303:
            self.acked += 1
            self.last_ack = (time.monotonic(), self.host())

    def log_out_and_in(self) -> None:
        """Log out, wait BOUND and a little, check the old cookie on both hosts, log in again."""
        old = self.cookie
        answer = self.request("POST", "/logout", "")
        if old and answer is not None and answer[0] == 303:
            self.old_cookies.append((old, self.host(), time.monotonic()))
            time.sleep(PAUSE)
            self.check_logged_out(*self.old_cookies[-1])
        self.cookie = None
        self.login()

    def check_logged_out(self, cookie: str, host: str, when: float) -> None:
        """Every host must see the logout of ``cookie``, acknowledged by ``host`` at ``when``."""
        for port in self.ports:
            session = self.session_at(port, cookie)
            if session is not None and session["user"] is not None:
                self.undone += 1
                later = time.monotonic() - when
                self.problems.append(f"logout on host {host} undone on host {self.host(port)} {later:.2f} s later: "
                                     f"the old cookie reads {session}")  # fmt: skip

    def session_at(self, port: int, cookie: str | None = None) -> dict[str, Any] | None:
        """GET /api/session on ``port`` (with ``cookie`` if given, keeping the user's own); None if it failed."""
        own_port, own_cookie = self.port, self.cookie
        self.port = port
        if cookie is not None:
            self.cookie = cookie
        try:
            answer = self.request("GET", "/api/session")
        finally:
            self.port = own_port
            if cookie is not None:
                self.cookie = own_cookie
        if answer is None or answer[0] != 200:
            return None
        return dict(json.loads(answer[1]))

    def final_check(self, when: str) -> None:
        """Both hosts hold the user and every acknowledged increment; every logout holds too."""
        if self.cookie is None:
            self.times_logged_out += 1
            self.problems.append(f"{when}: not logged in (the last login failed)")
            return
        for port in self.ports:
            session = self.session_at(port)
            if session is None:
                continue
            if session["user"] != self.name:
                self.times_logged_out += 1
                self.problems.append(f"{when}, host {self.host(port)}: logged out: {session}")
            elif self.acked - int(session["count"]) > self.lost:
                self.lost = self.acked - int(session["count"])
                self.problems.append(f"{when}, host {self.host(port)}: count {session['count']}, {self.acked} "
                                     "acknowledged")  # fmt: skip
        for old in self.old_cookies:
            self.check_logged_out(*old)


# -- the hosts -----------------------------------------------------------------------------------


@dataclass
class Host:
    name: str
    proxy: Proxy
    port: int
    process: Any  # the gunicorn master's Popen

    def get(self, path: str) -> tuple[int, str]:
        """GET ``path`` on a new connection: the status and the body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            response = conn.getresponse()
            return response.status, response.read().decode(errors="replace")
        finally:
            conn.close()

    def statuses(self, n: int = 6) -> list[tuple[int, str]]:
        """GET /status ``n`` times (on new connections, so from either worker)."""
        return [self.get("/status") for _ in range(n)]


Action = Callable[[list[Host]], None]  # a fault or its repair, given hosts A and B


@contextmanager
def host(name: str, redis_server: RedisServer, env: dict[str, str], args: tuple[str, ...]) -> Iterator[Host]:
    """A gunicorn master seeing Redis through a proxy of its own, with a fresh metrics directory."""
    with running(Proxy(redis_server.port)) as proxy, tempfile.TemporaryDirectory(prefix="metrics-") as metrics:
        env = {**env, "REDIS_URL": proxy.url, "PROMETHEUS_MULTIPROC_DIR": metrics}
        with gunicorn(APP, env, workers=WORKERS, threads=4, args=args) as (url, process):
            yield Host(name, proxy, int(url.rsplit(":", 1)[1]), process)


# -- one scenario --------------------------------------------------------------------------------


@dataclass
class Run:
    result: Result
    users: list[HostUser]
    logs: dict[str, str]  # host name: its gunicorn log, with the wsgisession lines its workers wrote
    statuses: dict[str, list[tuple[int, str]]]  # host name: GET /status answers at the end
    metrics: dict[str, tuple[int, str]]  # host name: GET /metrics at the end
    problems: list[str] = field(default_factory=list)

    def lines(self, host: str, start: str) -> Counter[int]:
        """How many lines starting with ``start`` each worker (pid) of ``host`` wrote."""
        return Counter(int(pid) for pid, _, message in LOG_LINE.findall(self.logs[host]) if message.startswith(start))

    def pids(self) -> set[int]:
        """The workers that logged a wsgisession line, on either host."""
        return {int(pid) for log in self.logs.values() for pid, _, _ in LOG_LINE.findall(log)}

    def exits(self) -> list[float]:
        """When workers of either host exited (gunicorn's log, to the second: Unix time)."""
        return [datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S %z").timestamp()
                for log in self.logs.values() for stamp in EXIT_LINE.findall(log)]  # fmt: skip


def run_scenario(
    scenario: str,
    redis_server: RedisServer,
    log_config: Path,
    fault: Action,
    repair: Action,
    args: tuple[str, ...] = (),
) -> Run:
    """Two hosts, USERS users for DURATION seconds; ``fault`` at a third (it may take time itself),
    ``repair`` at two thirds; then the final counts from both hosts, and from PostgreSQL alone."""
    database_url = require_postgres()
    env = {
        "DATABASE_URL": database_url,
        "SESSION_TABLE": unique("hosts"),
        "SESSION_REDIS_PREFIX": unique("hosts") + ":",
        "SESSION_PROBE_INTERVAL": str(PROBE),
        "SESSION_STORE_TIMEOUT": str(TIMEOUT),
        "SESSION_LATENCY_BUDGET": str(LATENCY_BUDGET),
    }
    args = ("--worker-class", "gthread", "--log-config-json", str(log_config), *args)
    with ExitStack() as stack:
        stack.callback(drop_table, database_url, env["SESSION_TABLE"])
        hosts = [stack.enter_context(host(name, redis_server, env, args)) for name in "AB"]
        users = click(hosts, fault, repair)
        time.sleep(BOUND)
        for user in users:
            user.final_check("at the end")
        flush(redis_server)  # and once more from PostgreSQL alone: it holds every acknowledged write
        for user in users:
            user.final_check("from PostgreSQL alone")
        statuses = {h.name: h.statuses() for h in hosts}
        metrics = {h.name: h.get("/metrics") for h in hosts}
        logs = {h.name: server_log(h.process) for h in hosts}
    result = Result(
        scenario,
        requests=sum(u.requests for u in users),
        errors=sum(u.errors for u in users),
        stale=sum(u.stale for u in users),
        stale_past_bound=sum(u.stale_past_bound for u in users),
        undone=sum(u.undone for u in users),
        logged_out=sum(u.times_logged_out for u in users),
        lost=sum(u.lost for u in users),
        max_latency_ms=round(1000 * max(u.max_latency for u in users)),
        slow=sum(u.slow for u in users),
    )
    RESULTS.append(result)
    return Run(result, users, logs, statuses, metrics, [f"{u.name}: {p}" for u in users for p in u.problems])


def click(hosts: list[Host], fault: Action, repair: Action) -> list[HostUser]:
    """USERS users clicking for DURATION seconds, with the fault in the middle third; stopped."""
    stop = threading.Event()
    users = [HostUser([h.port for h in hosts], n, stop) for n in range(USERS)]
    for user in users:
        user.start()
    started = time.monotonic()
    try:
        try:
            time.sleep(DURATION / 3)
            fault(hosts)
            time.sleep(max(0.0, started + 2 * DURATION / 3 - time.monotonic()))
        finally:
            repair(hosts)
        time.sleep(max(0.0, started + DURATION - time.monotonic()))
    finally:
        stop.set()
        for user in users:
            user.join(60)
    assert not any(user.is_alive() for user in users), "a user thread hangs"
    return users


# -- what the scenarios check --------------------------------------------------------------------


def assert_unharmed(run: Run) -> None:
    r, problems = run.result, run.problems[:20]
    assert (r.errors, r.stale, r.undone, r.logged_out, r.lost) == (0, 0, 0, 0, 0), (
        f"5xx {r.errors}, stale reads {r.stale} ({r.stale_past_bound} past the bound), undone logouts {r.undone}, "
        f"logged out {r.logged_out}, lost increments {r.lost}: {problems}"
    )
    assert all(u.acked > 0 for u in run.users), "a user never got an increment through"


def assert_went_and_came_back(run: Run, went: str, host: str = "A", other: str = "B") -> None:
    """``host`` logged a line starting ``went``, then later the way back; ``other`` logged neither."""
    messages = [message for _, _, message in LOG_LINE.findall(run.logs[host])]
    first = next((i for i, m in enumerate(messages) if m.startswith(went)), None)
    assert first is not None, f"host {host} logged no line starting {went!r}:\n{run.logs[host]}"
    assert any(m.startswith(BACK_LINE) for m in messages[first:]), (
        f"host {host} logged {went!r} and not {BACK_LINE!r} after it:\n{run.logs[host]}"
    )
    for line in (went, BACK_LINE):
        assert not run.lines(other, line), f"host {other}, which kept Redis, logged {line!r}:\n{run.logs[other]}"


def status_of(answer: tuple[int, str]) -> dict[str, Any]:
    """The JSON of a GET /status answer, failing clearly when there is none."""
    code, body = answer
    try:
        status = json.loads(body)
    except ValueError:
        pytest.fail(f"GET /status answered {code} without JSON (not implemented?): {body[:200]!r}")
    assert isinstance(status, dict) and "serving" in status, f"GET /status answered {code}: {body[:300]}"
    return status


def counter(metrics: tuple[int, str], name: str, **labels: str) -> float:
    """The value of counter ``name`` with ``labels`` in a GET /metrics answer, summed over its samples."""
    code, text = metrics
    assert code == 200, f"GET /metrics answered {code} (not implemented?): {text[:200]!r}"
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


# -- the scenarios -------------------------------------------------------------------------------


@dataclass
class Partition:
    run: Run
    during: list[tuple[int, str]]  # GET /status on host A, two seconds into the cut


@pytest.fixture(scope="module")
def partition(log_config: Path) -> Iterator[Partition]:
    """Host A's proxy cut for a third of the run while host B keeps Redis; then healed."""
    during: list[tuple[int, str]] = []

    def cut(hosts: list[Host]) -> None:
        hosts[0].proxy.cut()
        time.sleep(2)
        during.extend(hosts[0].statuses())

    with running(RedisServer()) as redis_server:
        run = run_scenario("partition of host A", redis_server, log_config, cut, lambda h: h[0].proxy.heal())
        yield Partition(run, during)


def test_partition_of_one_host(partition: Partition) -> None:
    assert_went_and_came_back(partition.run, DOWN_LINE)
    assert_unharmed(partition.run)


def test_status_and_metrics_show_the_partition(partition: Partition) -> None:
    during = [status_of(answer) for answer in partition.during]
    assert any(s["serving"] == "PostgreSQL" and s["stores"]["Redis"]["state"] == "down" for s in during), (
        f"no worker of host A reported serving PostgreSQL, Redis down, during the cut: {during}"
    )
    after = [status_of(answer) for answer in partition.run.statuses["A"]]
    assert all(s["serving"] == "Redis" and s["stores"]["Redis"]["state"] == "up" for s in after), (
        f"a worker of host A is not back on Redis {DURATION / 3:g} s after the heal: {after}"
    )
    assert all(code == 200 for code, _ in partition.run.statuses["A"])
    downs = sum(partition.run.lines("A", DOWN_LINE).values())
    assert downs > 0, f"no worker of host A logged {DOWN_LINE!r}"
    switches = counter(partition.run.metrics["A"], "wsgisession_switches_total", store="Redis", to="down")
    assert switches == downs, f"{switches:g} switches down counted, {downs} {DOWN_LINE!r} lines logged"
    assert counter(partition.run.metrics["A"], "wsgisession_store_failures_total", store="Redis") > 0
    assert counter(partition.run.metrics["B"], "wsgisession_switches_total", store="Redis", to="down") == 0


def test_redis_frozen_while_workers_recycle(private_redis: RedisServer, log_config: Path) -> None:
    frozen: list[float] = []  # Unix times

    def freeze(hosts: list[Host]) -> None:
        private_redis.pause()
        frozen.append(time.time())
        time.sleep(3)
        private_redis.resume()
        frozen.append(time.time())

    run = run_scenario("Redis frozen 3 s, workers recycle", private_redis, log_config, freeze,
                       lambda hosts: private_redis.resume(),
                       args=("--max-requests", "40", "--max-requests-jitter", "10"))  # fmt: skip
    assert len(run.pids()) > 2 * WORKERS, f"no worker was recycled: pids {sorted(run.pids())}"
    start, end = frozen
    assert any(start - 1 < stamp < end for stamp in run.exits()), (  # stamps are whole seconds
        f"no worker exited while Redis was frozen:\n{run.logs['A']}\n{run.logs['B']}"
    )
    assert_unharmed(run)


def test_blips_shorter_than_a_probe_on_one_host(private_redis: RedisServer, log_config: Path) -> None:
    def blips(hosts: list[Host]) -> None:
        for n in range(5):
            time.sleep(0.7 if n else 0)
            hosts[0].proxy.freeze()
            time.sleep(0.3)
            hosts[0].proxy.heal()

    run = run_scenario("host A frozen 0.3 s, five times", private_redis, log_config, blips,
                       lambda hosts: hosts[0].proxy.heal())  # fmt: skip
    noticed = run.lines("A", SLOW_LINE) + run.lines("A", DOWN_LINE)
    assert noticed, f"no worker of host A noticed the blips (too slow or unavailable):\n{run.logs['A']}"
    assert not run.lines("B", SLOW_LINE) + run.lines("B", DOWN_LINE), "host B saw no blip"
    assert_unharmed(run)


def test_redis_back_with_old_data(private_redis: RedisServer, log_config: Path) -> None:
    loaded: list[int] = []

    def restart_from_old_dump(hosts: list[Host]) -> None:
        client = redis.Redis.from_url(private_redis.url, socket_timeout=5)
        client.set("dump-marker", "1")  # outside the sessions' prefix: the app may drop every session copy
        client.save()
        client.set("after-dump", "1")
        time.sleep(2)
        private_redis.kill()
        private_redis.start()
        loaded.extend((client.exists("dump-marker"), client.exists("after-dump")))
        client.close()

    def repair(hosts: list[Host]) -> None:
        if private_redis.process is None:
            private_redis.start()

    run = run_scenario("Redis restarted from an old dump", private_redis, log_config, restart_from_old_dump, repair)
    assert loaded == [1, 0], "Redis did not come back with the older dump"
    assert_unharmed(run)


def test_slow_redis_on_one_host(private_redis: RedisServer, log_config: Path) -> None:
    run = run_scenario("host A: every reply 300 ms late", private_redis, log_config,
                       lambda hosts: hosts[0].proxy.delay(0.3), lambda hosts: hosts[0].proxy.heal())  # fmt: skip
    assert_went_and_came_back(run, SLOW_LINE)
    assert_unharmed(run)
    assert run.result.slow <= USERS, f"{run.result.slow} requests took {TIMEOUT:g} s or more"


def test_hung_commands_on_one_host(private_redis: RedisServer, log_config: Path) -> None:
    run = run_scenario("host A: one reply in 10 hangs", private_redis, log_config,
                       lambda hosts: hosts[0].proxy.hang_one_in(10), lambda hosts: hosts[0].proxy.heal())  # fmt: skip
    assert_went_and_came_back(run, DOWN_LINE)
    assert_unharmed(run)
    assert run.result.slow <= 2 * USERS, f"{run.result.slow} requests took {TIMEOUT:g} s or more"
