"""A user's sessions through the WSGI middleware (on memory), and the store contract on memory and
on a failover pair of memory stores. The SQL and Redis stores run the contract in their own modules.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import webtest
from cookies import parse_set_cookies
from servers import SECRET
from users_contract import *  # noqa: F403 - the contract's tests, run here on memory stores

from wsgisession import MemoryStore, SessionMiddleware, SessionStore
from wsgisession.stores.base import USER_KEY
from wsgisession.stores.failover import FailoverStore


@pytest.fixture(params=["memory", "failover"])
def store(request: pytest.FixtureRequest) -> Iterator[SessionStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    pair = FailoverStore(MemoryStore(), MemoryStore(), probe_interval=60)
    yield pair
    pair.close()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """/login?user=U logs U in; /whoami reads; /devices lists; /end?handle=H ends one; /others ends the rest."""
    session, route, mw = environ["session"], environ["PATH_INFO"], environ["test.mw"]
    query = dict(part.split("=", 1) for part in environ.get("QUERY_STRING", "").split("&") if "=" in part)
    body: Any = None
    if route == "/login":
        session.login(query["user"])
    elif route == "/whoami":
        body = session.user_id
    elif route == "/devices":
        body = [device._asdict() for device in mw.users.list(session.user_id, current=session)]
    elif route == "/end":
        body = mw.users.end(session.user_id, query["handle"])
    elif route == "/others":
        body = mw.users.end_all(session.user_id, keep=session)
    start_response("200 OK", [("Content-Type", "application/json")])
    return [__import__("json").dumps(body).encode()]


class Device:
    """One browser: its own cookie, the same app."""

    def __init__(self, mw: SessionMiddleware, agent: str = "test-agent") -> None:
        self.mw, self.cookie, self.agent = mw, "", agent

    def get(self, path: str) -> Any:
        headers = {"User-Agent": self.agent, **({"Cookie": self.cookie} if self.cookie else {})}
        response = webtest.TestApp(self.mw, extra_environ={"test.mw": self.mw, "REMOTE_ADDR": "10.0.0.7"}).get(
            path, headers=headers
        )
        for cookie in parse_set_cookies(response.headers.getall("Set-Cookie")):
            self.cookie = f"session={cookie['value']}" if cookie["value"] else ""
        return response.json


def middleware(store: SessionStore | None = None, **options: Any) -> SessionMiddleware:
    return SessionMiddleware(app, store if store is not None else MemoryStore(), secret=SECRET, **options)


def test_login_binds_a_fresh_session_to_the_user() -> None:
    mw = middleware()
    phone = Device(mw)
    phone.get("/login?user=u0")
    anonymous = phone.cookie
    phone.get("/login?user=ann")
    assert phone.cookie != anonymous  # a fresh id at login, as regenerate()
    assert phone.get("/whoami") == "ann"
    assert Device(mw).get("/whoami") is None


def test_the_list_shows_each_device_without_its_id_and_marks_the_current_one() -> None:
    mw = middleware()
    phone, laptop = Device(mw, "phone"), Device(mw, "laptop")
    phone.get("/login?user=ann")
    laptop.get("/login?user=ann")
    Device(mw).get("/login?user=bob")
    devices = laptop.get("/devices")
    assert len(devices) == 2
    assert [d["current"] for d in devices].count(True) == 1
    for device in devices:
        assert device["handle"] not in phone.cookie + laptop.cookie
        assert device["login"] <= device["seen"] <= time.time() < device["expires"]
        assert (device["agent"], device["ip"]) == ("", "")  # not kept unless asked for


def test_client_details_are_kept_when_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_CLIENT_DETAILS", "true")
    phone = Device(middleware(), "Mozilla/5.0 (phone)")
    phone.get("/login?user=ann")
    assert [(d["agent"], d["ip"]) for d in phone.get("/devices")] == [("Mozilla/5.0 (phone)", "10.0.0.7")]


def test_ending_one_device_logs_it_out_at_its_next_request() -> None:
    mw = middleware()
    phone, laptop = Device(mw), Device(mw)
    phone.get("/login?user=ann")
    laptop.get("/login?user=ann")
    other = next(d for d in laptop.get("/devices") if not d["current"])
    assert laptop.get(f"/end?handle={other['handle']}") is True
    assert phone.get("/whoami") is None
    assert laptop.get("/whoami") == "ann"
    assert laptop.get(f"/end?handle={other['handle']}") is False  # gone already


def test_a_handle_of_another_user_ends_nothing() -> None:
    mw = middleware()
    ann, bob = Device(mw), Device(mw)
    ann.get("/login?user=ann")
    bob.get("/login?user=bob")
    bobs = bob.get("/devices")[0]["handle"]
    assert ann.get(f"/end?handle={bobs}") is False
    assert bob.get("/whoami") == "bob"


def test_log_out_everywhere_else_keeps_this_device() -> None:
    mw = middleware()
    devices = [Device(mw) for _ in range(4)]
    for device in devices:
        device.get("/login?user=ann")
    assert devices[0].get("/others") == 3
    assert [device.get("/whoami") for device in devices] == ["ann", None, None, None]
    assert mw.users.end_all("ann") == 1  # everywhere, this one too
    assert devices[0].get("/whoami") is None


def test_max_per_user_ends_the_least_recently_used_at_a_login(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_MAX_PER_USER", "2")
    mw = middleware()
    first, second, third = Device(mw), Device(mw), Device(mw)
    first.get("/login?user=ann")
    second.get("/login?user=ann")
    time.sleep(0.01)
    first.get("/whoami")
    third.get("/login?user=ann")  # the third login: one must go
    alive = [device.get("/whoami") for device in (first, second, third)]
    assert alive.count("ann") == 2 and alive[2] == "ann"


def test_a_refresh_of_a_bound_session_records_when_it_was_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    mw = middleware()
    phone = Device(mw)
    phone.get("/login?user=ann")
    seen = phone.get("/devices")[0]["seen"]
    later = time.time() + 600  # past the once-a-minute refresh
    monkeypatch.setattr(time, "time", lambda: later)
    phone.get("/whoami")
    assert phone.get("/devices")[0]["seen"] >= seen + 599


def test_an_ended_session_is_not_brought_back_by_a_request_in_flight() -> None:
    store = MemoryStore()
    mw = middleware(store)
    phone = Device(mw)
    phone.get("/login?user=ann")
    handle = phone.get("/devices")[0]["handle"]

    def slow_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        session = environ["session"]
        session.get("cart")  # loaded before the other device ends it
        assert mw.users.end("ann", handle)
        session["cart"] = ["tea"]  # this save must not bring it back
        start_response("200 OK", [])
        return [b""]

    flight = SessionMiddleware(slow_app, store, secret=SECRET)
    webtest.TestApp(flight).get("/", headers={"Cookie": phone.cookie})
    assert phone.get("/whoami") is None
    assert mw.users.list("ann") == []


def test_the_binding_is_a_session_key_other_front_doors_see() -> None:
    store = MemoryStore()
    phone = Device(middleware(store))
    phone.get("/login?user=ann")
    (record,) = store.user_sessions("ann")
    assert set(record.binding) >= {"id", "login", "seen"} and USER_KEY in store.load(record.key).data
