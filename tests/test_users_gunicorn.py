"""A user's sessions under a real gunicorn: 2 worker processes of 4 threads, on PostgreSQL and on Redis in front
of PostgreSQL, running tests/users_app.py. Every request goes out on a fresh connection; the workers name
themselves in an X-Worker-Pid header, so that the tests can show each check was made by both.

- ending sessions (one by its handle, all but one) is seen by every worker at the next request;
- "end all" while the user logs in elsewhere at the same moment ends every session whose login had answered
  before it began, and nothing answers 5xx;
- a request in flight when its session ends, writing a value or recording when it was seen, cannot bring it
  back: nor its record, nor its place in the user's list;
- with Redis in front of PostgreSQL, an end-all that runs between a login's two writes ends the session in both.

Bounded by time and request counts: the whole file runs in about 25 s.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

import pytest
import redis
from gunicorn_runner import gunicorn
from servers import drop_table, require_postgres, require_redis, unique

pytestmark = pytest.mark.slow

SERVER_ARGS = ("--pythonpath", "tests", "--worker-connections", "4", "--keep-alive", "0")
MAX_AGE_MS = 10_000  # the refresh of an unchanged session is due after a tenth of it: 1 s
READ_DELAY = 1.3  # a slow read outlives the refresh interval: its save records when the session was seen
WRITE_DELAY = 0.5
RACE_SECONDS = 2.5
LOGIN_THREADS = 4
BATCH = 10  # requests at once: more than one worker takes (--worker-connections 4)
LOGINS_PER_THREAD = 150


class Reply(NamedTuple):
    status: int
    data: Any
    worker: int
    cookie: str | None  # the "name=value" a Set-Cookie gave ("" when it expired the cookie), None without one


def call(url: str, method: str, path: str, cookie: str | None = None) -> Reply:
    """One request on a fresh connection; a 5xx fails the test."""
    conn = http.client.HTTPConnection("127.0.0.1", urlsplit(url).port, timeout=15)
    try:
        conn.request(method, path, headers={"Connection": "close", **({"Cookie": cookie} if cookie else {})})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status < 500, (method, path, response.status, body)
    header = response.getheader("Set-Cookie")
    given = None if header is None else ("" if "max-age=0" in header.lower() else header.split(";")[0])
    return Reply(response.status, json.loads(body), int(response.getheader("X-Worker-Pid", "0")), given)


def log_in(url: str, user: str, cookie: str | None = None) -> str:
    reply = call(url, "POST", f"/login?user={quote(user)}", cookie)
    assert reply.cookie, reply
    return reply.cookie


def handle_of(url: str, user: str, cookie: str) -> str:
    """The handle of the session behind ``cookie``, as its own devices list shows it."""
    [mine] = [device["handle"] for device in call(url, "GET", f"/list?user={user}", cookie).data if device["current"]]
    return str(mine)


def listed(url: str, user: str) -> int:
    return len(call(url, "GET", f"/list?user={user}").data)


def at_once(url: str, cookie: str | None, count: int = BATCH) -> list[Reply]:
    """``count`` /whoami requests with ``cookie``, sent all at once: more than one worker's connections, so
    that both workers serve (one after the other, a worker's threads may win every accept)."""
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: call(url, "GET", "/whoami", cookie), range(count)))


def seen_by_both(url: str, cookie: str, workers: set[int]) -> set[object]:
    """Who /whoami says ``cookie`` is (the cookie replayed as it was), asked in batches until both workers
    answered; the set of answers."""
    users, served = set(), set()
    for _ in range(20):
        for reply in at_once(url, cookie):
            users.add(reply.data["user"])
            served.add(reply.worker)
        if served == workers:
            return users
    pytest.fail(f"{20 * BATCH} requests were all served by worker(s) {served} of {workers}")


class Server(NamedTuple):
    url: str
    workers: set[int]
    kind: str  # postgres or failover


@pytest.fixture(scope="module", params=["postgres", "failover"], ids=["postgres", "redis+postgres"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """tests/users_app.py under gunicorn on the store, on private names (dropped afterwards)."""
    database, table = require_postgres(), unique("users")
    env = {"DATABASE_URL": database, "SESSION_TABLE": table, "SESSION_MAX_AGE": str(MAX_AGE_MS),
           "SESSION_CLEANUP_INTERVAL": "0", "SESSION_STORE_TIMEOUT": "5"}  # fmt: skip
    prefix = unique("users") + ":"
    if request.param == "postgres":
        env["SESSION_STORE"] = "postgres"
    else:  # both URLs and no SESSION_STORE: Redis in front, PostgreSQL the authority
        env.update(REDIS_URL=require_redis(), SESSION_REDIS_PREFIX=prefix)
    try:
        with gunicorn("users_app:app", env, workers=2, threads=4, args=SERVER_ARGS) as (url, _):
            workers: set[int] = set()
            booted = time.monotonic() + 15  # the second worker may still be importing the app
            while len(workers) < 2 and time.monotonic() < booted:
                workers.update(reply.worker for reply in at_once(url, None))
            assert len(workers) == 2, f"only worker(s) {workers} answered within 15 s"
            yield Server(url, workers, request.param)
    finally:
        drop_table(database, table)
        if request.param == "failover":
            client = redis.Redis.from_url(require_redis())
            for key in client.scan_iter(match=prefix + "*", count=1000):
                client.delete(key)
            client.close()


def test_ended_sessions_are_over_for_every_worker_at_the_next_request(server: Server) -> None:
    url, user = server.url, unique("user")
    devices = [log_in(url, user) for _ in range(6)]
    for cookie in devices:  # each session known to both workers first
        assert seen_by_both(url, cookie, server.workers) == {user}
    assert listed(url, user) == 6
    keeper, one, rest = devices[0], devices[1], devices[2:]

    assert call(url, "POST", f"/end?user={user}&handle={handle_of(url, user, one)}", keeper).data["ended"] == 1
    assert seen_by_both(url, one, server.workers) == {None}
    assert call(url, "POST", f"/end-all?user={user}&keep=1", keeper).data["ended"] == 4
    for cookie in rest:
        assert seen_by_both(url, cookie, server.workers) == {None}
    # A write with an ended cookie starts nothing under it: the session stays over, and out of the list.
    for cookie in (one, *rest):
        written = call(url, "POST", "/slow?delay=0&k=late", cookie)
        assert written.cookie != cookie
        assert seen_by_both(url, cookie, server.workers) == {None}
    assert seen_by_both(url, keeper, server.workers) == {user}
    assert call(url, "GET", "/whoami", keeper).data["keys"] == []
    assert listed(url, user) == 1


def test_end_all_ends_every_earlier_session_while_the_user_logs_in_elsewhere(server: Server) -> None:
    """Threads log the user in again and again (half from new browsers, half again on their own session)
    while another ends all the user's sessions again and again; after each end-all, every session whose
    login had answered before the end-all was sent is checked to be over."""
    url, user = server.url, unique("user")
    logins: list[tuple[float, str]] = []  # (a time after the login answered, its cookie)
    ends: list[tuple[float, int]] = []  # (when the end-all was sent, how many it ended)
    served: set[tuple[str, int]] = set()  # (what, by which worker)
    deadline, lock, logging_in = time.monotonic() + RACE_SECONDS, threading.Lock(), threading.Event()
    logging_in.set()

    def log_in_again_and_again(again: bool) -> None:
        cookie = None
        for _ in range(LOGINS_PER_THREAD):
            reply = call(url, "POST", f"/login?user={user}", cookie if again else None)
            assert reply.cookie, reply
            cookie = reply.cookie
            with lock:
                logins.append((time.time(), cookie))
                served.add(("login", reply.worker))
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)

    def end_all_again_and_again() -> int:
        survivors, checked = 0, 0
        while logging_in.is_set():
            sent = time.time()
            reply = call(url, "POST", f"/end-all?user={user}")
            with lock:
                ends.append((sent, reply.data["ended"]))
                served.add(("end-all", reply.worker))
                due = [cookie for answered, cookie in logins[checked:] if answered < sent]
                checked += len(due)  # the list is in time order: each time is taken under the lock
            survivors += sum(call(url, "GET", "/whoami", cookie).data["user"] is not None for cookie in due)
            time.sleep(0.02)
        return survivors

    with ThreadPoolExecutor(LOGIN_THREADS + 1) as pool:
        ending = pool.submit(end_all_again_and_again)
        try:
            for future in [pool.submit(log_in_again_and_again, i % 2 == 1) for i in range(LOGIN_THREADS)]:
                future.result()  # a 5xx or a login without a cookie fails here
        finally:
            logging_in.clear()
        survivors = ending.result()

    last = max(sent for sent, _ in ends)
    earlier = [cookie for answered, cookie in logins if answered < last]
    later = [cookie for answered, cookie in logins if answered >= last]
    live_later = sum(call(url, "GET", "/whoami", cookie).data["user"] is not None for cookie in later)
    print(f"{len(logins)} logins, {len(ends)} end-alls ending {sum(n for _, n in ends)} sessions; "
          f"{live_later} of the {len(later)} logins answered after the last end-all began still live")  # fmt: skip
    assert len(ends) >= 5 and len(earlier) >= 50, "too little happened to call it a race"
    assert served == {(what, pid) for what in ("login", "end-all") for pid in server.workers}, served
    assert survivors == 0, f"{survivors} session(s) outlived an end-all that began after their login answered"
    assert not [cookie for cookie in earlier if call(url, "GET", "/whoami", cookie).data["user"] is not None]
    assert listed(url, user) == live_later  # the list holds exactly the sessions still live
    call(url, "POST", f"/end-all?user={user}")  # with nobody logging in: nothing is left
    assert listed(url, user) == 0
    assert not [cookie for cookie in later if call(url, "GET", "/whoami", cookie).data["user"] is not None]


@pytest.mark.parametrize("write", [True, False], ids=["writing", "refreshing"])
def test_a_request_in_flight_cannot_bring_its_ended_session_back(server: Server, write: bool) -> None:
    """Two devices' requests load their sessions and take their time; meanwhile a third device ends the first.
    The first's save (a value written, or the refresh that records when it was seen) finds it gone: it stays
    over and out of the list, while the second's save, the same but of a live session, goes through."""
    url, user = server.url, unique("user")
    ended_one, live_one, ender = log_in(url, user), log_in(url, user), log_in(url, user)
    handle = handle_of(url, user, ended_one)
    slow = f"/slow?delay={WRITE_DELAY}&k=late" if write else f"/slow?delay={READ_DELAY}"
    with ThreadPoolExecutor(2) as pool:
        in_flight = [pool.submit(call, url, "POST", slow, cookie) for cookie in (ended_one, live_one)]
        time.sleep(0.2)  # both have loaded their sessions (their answers say when)
        end = call(url, "POST", f"/end?user={user}&handle={handle}", ender)
        ending, living = (future.result() for future in in_flight)
    assert end.data["ended"] == 1
    assert ending.data["loaded"] < end.data["done"] < ending.data["saving"], "the end did not fall inside the request"

    assert ending.cookie is None  # nothing renewed, nothing expired: the other's logout stands
    assert seen_by_both(url, ended_one, server.workers) == {None}
    assert listed(url, user) == 2
    # The live session's save, the same, did go through (so the ended one's was really attempted).
    if write:
        assert call(url, "GET", "/whoami", live_one).data["keys"] == ["late"]
    else:
        assert living.cookie == live_one, "the refresh was not due: the test did not exercise it"
    assert seen_by_both(url, live_one, server.workers) == {user}


@pytest.mark.parametrize("server", ["failover"], indirect=True, ids=["redis+postgres"])
def test_an_end_all_between_a_logins_two_writes_ends_it_in_both_stores(server: Server) -> None:
    """Redis in front of PostgreSQL: a login writes both, and pauses between its two writes while an end-all
    runs. Whichever store it wrote first, the session is over exactly when the end-all counted it: never
    counted as ended and then alive in Redis. (The race of the test above, made certain.)"""
    url, user = server.url, unique("user")
    with ThreadPoolExecutor(1) as pool:
        login = pool.submit(call, url, "POST", f"/login?user={user}&pause=0.5")
        time.sleep(0.25)  # the login waits to write Redis until 0.5 s
        ended = call(url, "POST", f"/end-all?user={user}").data["ended"]
        cookie = login.result().cookie
    assert cookie
    seen = seen_by_both(url, cookie, server.workers)
    assert seen == ({None} if ended else {user}), f"end-all ended {ended}; the session's requests saw {seen}"
    assert listed(url, user) == 1 - ended
