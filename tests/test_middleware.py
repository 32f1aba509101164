"""The middleware through a browser's eyes: what is stored, which cookies are set, and when.

Most tests use MemoryStore (a subclass that counts, or on request fails, store calls);
the few where the point is store behaviour seen through the middleware use the real
stores from conftest's ``make_store``.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import json
import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http.cookiejar import CookieJar
from typing import Any
from urllib.parse import parse_qsl

import pytest
import redis
from cookies import parse_set_cookies
from servers import SECRET, RedisServer, pg_sql
from webtest import TestApp

from wsgisession import MemoryStore, Session, SessionMiddleware, SessionStore, SessionValueError, StoreError
from wsgisession.settings import _VARIABLES
from wsgisession.signing import ID_LENGTH, Signer, new_id, store_key
from wsgisession.stores.base import Changes, RateLimitedLog, Record

OLD_SECRET = "retired-secret-9876543210-ZYXWVUTSRQPONMLKJIHGFEDCBA"
Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Any]
Action = Callable[[Session, dict[str, str]], Any]
KEEP: Any = object()

NOW = int(time.time())  # a creation time for hand-made cookies


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The middleware reads os.environ: start every test from none of its variables."""
    for variable, _ in _VARIABLES.values():
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """The WARNING lines of the "wsgisession" logger so far."""
    caplog.set_level(logging.INFO, logger="wsgisession")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "wsgisession" and r.levelno == logging.WARNING]

    return lines


# -- stores ---------------------------------------------------------------------------


class CountingStore(MemoryStore):
    """A MemoryStore that records every call and raises StoreError on the calls named in ``failing``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.updates: list[Changes] = []
        self.failing: set[str] = set()

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.failing:
            raise StoreError(f"injected failure of {name}")

    def load(self, key: str) -> Record | None:
        self._call("load")
        return super().load(key)

    def create(self, key: str, data: Mapping[str, str], ttl: float) -> None:
        self._call("create")
        super().create(key, data, ttl)

    def update(self, key: str, changes: Changes, ttl: float) -> bool:
        self._call("update")
        self.updates.append(changes)
        return super().update(key, changes, ttl)

    def touch(self, key: str, ttl: float) -> bool:
        self._call("touch")
        return super().touch(key, ttl)

    def delete(self, key: str) -> None:
        self._call("delete")
        super().delete(key)

    # inspection, without counting

    def data(self, session_id: str) -> dict[str, Any] | None:
        record = MemoryStore.load(self, store_key(session_id))
        return None if record is None else record.data

    def expires(self, session_id: str) -> float:
        return self._sessions[store_key(session_id)][1]

    def age(self, session_id: str, seconds: float) -> None:
        """Make the session look ``seconds`` older (its expiry that much nearer)."""
        key = store_key(session_id)
        data, expires = self._sessions[key]
        self._sessions[key] = (data, expires - seconds)


# -- the application and a browser ------------------------------------------------------


def _set(session: Session, params: dict[str, str]) -> Any:
    for key, raw in params.items():
        try:
            session[key] = json.loads(raw)
        except ValueError:
            session[key] = raw
    return dict(session)


def _append(session: Session, params: dict[str, str]) -> Any:
    for key, value in params.items():
        items = session.get(key)
        if items is None:
            session[key] = [value]
        else:
            items.append(value)  # in place: the session must notice
    return dict(session)


def _delete(session: Session, params: dict[str, str]) -> Any:
    for key in params:
        del session[key]
    return dict(session)


ACTIONS: dict[str, Action] = {
    "/none": lambda s, p: None,
    "/read": lambda s, p: dict(s),
    "/id": lambda s, p: s.id,
    "/set": _set,
    "/append": _append,
    "/del": _delete,
    "/clear": lambda s, p: s.clear(),
    "/invalidate": lambda s, p: s.invalidate(),
    "/regenerate": lambda s, p: (s.regenerate(), dict(s))[1],
}


def make_app(extra: dict[str, Action] | None = None, headers: list[tuple[str, str]] | None = None) -> WSGIApp:
    """A raw WSGI app: the path picks what it does with the session, the query gives the keys."""
    actions = {**ACTIONS, **(extra or {})}

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        params = dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
        result = actions[environ["PATH_INFO"]](environ["session"], params)
        body = json.dumps(result).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                  *(headers or [])])  # fmt: skip
        return [body]

    return app


class NoCookies(CookieJar):
    """webtest's cookie jar, switched off: the tests send and read cookies themselves."""

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


def cookies(res: Any, name: str = "session") -> list[dict[str, Any]]:
    """The Set-Cookie headers for ``name``, parsed: {"value": ..., attribute (lower case): value or True}."""
    return parse_set_cookies(res.headers.getall("Set-Cookie"), name)


def set_cookie(res: Any) -> dict[str, Any] | None:
    """The one session Set-Cookie of a response, or None."""
    found = cookies(res)
    assert len(found) <= 1, res.headers.getall("Set-Cookie")
    return found[0] if found else None


def is_expired(cookie: dict[str, Any] | None) -> bool:
    return (
        cookie is not None
        and cookie["value"] == ""
        and cookie.get("max-age") == "0"
        and "1970" in cookie.get("expires", "")
    )


class Browser:
    """Sends the session cookie it was last given, as a browser does, but visibly."""

    def __init__(self, mw: SessionMiddleware, **extra_environ: Any) -> None:
        self.mw = mw
        self.app = TestApp(mw, cookiejar=NoCookies(), extra_environ=extra_environ)
        self.cookie: str | None = None

    def get(self, path: str, cookie: Any = KEEP, **kwargs: Any) -> Any:
        value = self.cookie if cookie is KEEP else cookie
        headers = dict(kwargs.pop("headers", {}))
        if value is not None:
            headers["Cookie"] = f"session={value}"
        return self.absorb(self.app.get(path, headers=headers, **kwargs))

    def absorb(self, res: Any) -> Any:
        """Take the session cookie a response sets, as a browser does (also for responses of other clients)."""
        given = set_cookie(res)
        if given is not None:
            self.cookie = None if is_expired(given) else given["value"]
        return res

    @property
    def session_id(self) -> str:
        assert self.cookie is not None
        return self.cookie[:ID_LENGTH]


def middleware(store: SessionStore | None = None, app: WSGIApp | None = None, **options: Any) -> SessionMiddleware:
    options.setdefault("secret", SECRET)
    return SessionMiddleware(app or make_app(), store if store is not None else CountingStore(), **options)


def logged_in(store: CountingStore | None = None, **options: Any) -> tuple[Browser, CountingStore]:
    """A browser holding a stored session {"user": "ann", "cart": [1]}; the store's call log emptied."""
    store = store or CountingStore()
    browser = Browser(middleware(store, **options))
    browser.get("/set?user=ann&cart=[1]")
    assert browser.cookie is not None
    store.calls.clear()
    store.updates.clear()
    return browser, store


# -- laziness and Vary ---------------------------------------------------------------------


def test_untouched_request_makes_no_store_call_no_cookie_no_vary() -> None:
    browser, store = logged_in()
    res = browser.get("/none")
    assert store.calls == []
    assert res.headers.getall("Set-Cookie") == []
    assert "Vary" not in res.headers
    fresh = Browser(middleware(store))
    res = fresh.get("/none")
    assert store.calls == []
    assert res.headers.getall("Set-Cookie") == []
    assert "Vary" not in res.headers


def test_accessed_session_varies_on_cookie() -> None:
    browser, _ = logged_in()
    assert browser.get("/read").headers.getall("Vary") == ["Cookie"]
    assert Browser(browser.mw).get("/read").headers.getall("Vary") == ["Cookie"]


@pytest.mark.parametrize(
    ("existing", "expected"),
    [("Accept-Encoding", "Accept-Encoding, Cookie"), ("Cookie", "Cookie"), ("accept, cookie", "accept, cookie"),
     ("*", "*")],
)  # fmt: skip
def test_vary_is_merged_with_the_application_header(existing: str, expected: str) -> None:
    mw = middleware(app=make_app(headers=[("Vary", existing)]))
    res = Browser(mw).get("/read")
    assert res.headers.getall("Vary") == [expected]


def test_new_session_read_stores_nothing_and_sets_no_cookie() -> None:
    store = CountingStore()
    browser = Browser(middleware(store))
    res = browser.get("/read")
    assert res.json == {}
    res = browser.get("/id")  # even an id handed to the app is not worth a record
    assert len(res.json) == ID_LENGTH
    assert store.calls == []  # no cookie: not even a load
    assert res.headers.getall("Set-Cookie") == []
    assert store._sessions == {}


# -- the first write and the cookie -------------------------------------------------------


def test_setting_a_key_stores_it_and_sets_the_cookie() -> None:
    store = CountingStore()
    mw = middleware(store)
    browser = Browser(mw)
    res = browser.get("/set?user=ann")
    assert store.calls == ["create"]
    cookie = set_cookie(res)
    assert cookie is not None
    session_id, _, current = mw.core.format.signer.unsign(cookie["value"]) or ("", 0, False)
    assert current and len(session_id) == ID_LENGTH
    assert store.data(session_id) == {"user": "ann"}
    assert list(store._sessions) == [store_key(session_id)]  # the store never sees the id itself
    assert browser.get("/read").json == {"user": "ann"}


def test_cookie_attributes() -> None:
    res = Browser(middleware()).get("/set?a=1")
    cookie = set_cookie(res)
    assert cookie is not None
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Lax"
    assert cookie["path"] == "/"
    assert cookie["max-age"] == "86400"
    expires = email.utils.parsedate_to_datetime(cookie["expires"]).timestamp()
    assert abs(expires - (time.time() + 86400)) < 300
    assert "secure" not in cookie  # plain http, automatic mode
    assert "domain" not in cookie


@pytest.mark.parametrize(
    ("scheme", "option", "secure"),
    [("https", None, True), ("http", None, False), ("http", True, True), ("https", False, False)],
)
def test_secure_flag(scheme: str, option: bool | None, secure: bool) -> None:
    browser = Browser(middleware(cookie_secure=option), **{"wsgi.url_scheme": scheme})
    cookie = set_cookie(browser.get("/set?a=1"))
    assert cookie is not None
    assert ("secure" in cookie) is secure
    expired = set_cookie(browser.get("/invalidate"))
    assert is_expired(expired)
    assert expired is not None
    assert ("secure" in expired) is secure


def test_cookie_path_domain_and_name_options() -> None:
    mw = middleware(cookie_path="/app", cookie_domain="example.com", cookie_name="sid", cookie_samesite="Strict")
    res = TestApp(mw, cookiejar=NoCookies()).get("/set?a=1")
    cookie = cookies(res, "sid")[0]
    assert (cookie["path"], cookie["domain"], cookie["samesite"]) == ("/app", "example.com", "Strict")
    value = cookie["value"]
    again = TestApp(mw, cookiejar=NoCookies()).get("/read", headers={"Cookie": f"other=1; sid={value}"})
    assert again.json == {"a": 1}
    ignored = TestApp(mw, cookiejar=NoCookies()).get("/read", headers={"Cookie": f"session={value}"})
    assert ignored.json == {}


# -- what is written, and how often --------------------------------------------------------


def test_reading_does_not_write() -> None:
    browser, store = logged_in()
    for _ in range(3):
        res = browser.get("/read")
        assert res.json == {"user": "ann", "cart": [1]}
        assert res.headers.getall("Set-Cookie") == []
    assert store.calls == ["load"] * 3


def test_only_changed_keys_are_written_once() -> None:
    browser, store = logged_in()
    res = browser.get("/set?user=bob")
    assert store.calls == ["load", "update"]
    assert dict(store.updates[0].set) == {"user": '"bob"'}
    assert store.updates[0].deleted == ()
    assert set_cookie(res) is not None  # the write extends the session: the cookie is refreshed
    store.calls.clear()
    browser.get("/set?user=bob")  # the same value again: nothing to write
    assert store.calls == ["load"]


def test_nested_change_is_saved() -> None:
    browser, store = logged_in()
    browser.get("/append?cart=2")
    assert store.calls == ["load", "update"]
    assert json.loads(store.updates[0].set["cart"]) == [1, "2"]
    assert browser.get("/read").json == {"user": "ann", "cart": [1, "2"]}


def test_deleted_key_is_written_as_a_deletion() -> None:
    browser, store = logged_in()
    browser.get("/del?cart")
    assert store.updates[0].deleted == ("cart",)
    assert dict(store.updates[0].set) == {}
    assert browser.get("/read").json == {"user": "ann"}


def test_saved_once_even_if_start_response_is_called_again() -> None:
    store = CountingStore()

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        environ["session"]["a"] = 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise RuntimeError("late failure")
        except RuntimeError:
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"error"]

    mw = middleware(store, app)
    seen: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], Any]:
        seen.append((status, list(headers)))
        return lambda data: None

    b"".join(mw({"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.url_scheme": "http"}, start_response))
    assert store.calls == ["create"]
    assert len(seen) == 2
    set_cookies = [h for _, headers in seen for h in headers if h[0] == "Set-Cookie"]
    assert len(set_cookies) == 1


def test_save_lands_before_the_headers_go_out() -> None:
    store = CountingStore()
    mw = middleware(store)
    held_then: list[Any] = []

    def server(environ: Environ, start_response: StartResponse) -> Any:
        def checking(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            value = next(v for k, v in headers if k == "Set-Cookie").split(";")[0].split("=", 1)[1]
            held_then.append(store.data(value[:ID_LENGTH]))  # what a second request would see now
            return start_response(status, headers, exc_info)

        return mw(environ, checking)

    TestApp(server, cookiejar=NoCookies()).get("/set?user=ann")
    assert held_then == [{"user": "ann"}]


def test_streaming_response_works_and_saves_before_the_first_chunk() -> None:
    store = CountingStore()
    chunks_seen_store: list[Any] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        session = environ["session"]
        session["n"] = session.get("n", 0) + 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        for i in range(3):
            chunks_seen_store.append(dict(store._sessions))
            yield f"chunk{i} ".encode()

    browser = Browser(middleware(store, app))
    res = browser.get("/")
    assert res.body == b"chunk0 chunk1 chunk2 "
    assert chunks_seen_store[0] != {}  # written before the body was produced
    res = browser.get("/")
    assert store.data(browser.session_id) == {"n": 2}


class ClosingBody:
    """A response body that records whether the server closed it."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        self.closed = True


def test_body_close_is_passed_through() -> None:
    bodies: list[ClosingBody] = []

    def app(environ: Environ, start_response: StartResponse) -> ClosingBody:
        environ["session"]["a"] = 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        bodies.append(ClosingBody([b"a", b"b"]))
        return bodies[0]

    res = Browser(middleware(app=app)).get("/")
    assert res.body == b"ab"
    assert bodies[0].closed


@pytest.mark.parametrize("touch_before_start", [True, False], ids=["loaded-before", "first-use-in-body"])
def test_change_during_body_iteration_is_not_saved_and_warned(
    touch_before_start: bool, warnings: Callable[[], list[str]]
) -> None:
    browser, store = logged_in()

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        session = environ["session"]
        if touch_before_start:
            session.get("user")
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"first"
        session["late"] = True
        yield b"second"

    browser.mw.app = app
    res = browser.get("/")
    assert res.body == b"firstsecond"
    assert "late" not in (store.data(browser.session_id) or {})
    assert "update" not in store.calls
    assert any("after the response started" in line for line in warnings()), warnings()


def test_application_error_saves_nothing() -> None:
    browser, store = logged_in()

    def failing(session: Session, params: dict[str, str]) -> Any:
        session["user"] = "mallory"
        session["new"] = 1
        raise RuntimeError("boom")

    browser.mw.app = make_app({"/fail": failing})
    with pytest.raises(RuntimeError, match="boom"):
        browser.get("/fail")
    assert store.calls == ["load"]
    assert store.data(browser.session_id) == {"user": "ann", "cart": [1]}
    fresh_store = CountingStore()
    with pytest.raises(RuntimeError):
        Browser(middleware(fresh_store, make_app({"/fail": failing}))).get("/fail")
    assert fresh_store.calls == []
    assert fresh_store._sessions == {}


# -- rolling expiry ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_age", "elapsed", "touched"),
    [
        (100, 0, False),
        (100, 9, False),  # refresh after max_age / 10 = 10 s
        (100, 11, True),
        (3600, 59, False),  # refresh after min(60, 360) = 60 s
        (3600, 61, True),
        (86400, 61, True),
    ],
)
def test_rolling_expiry_is_throttled(max_age: float, elapsed: float, touched: bool) -> None:
    browser, store = logged_in(max_age=max_age)
    session_id, value = browser.session_id, browser.cookie
    store.age(session_id, elapsed)
    before = store.expires(session_id)
    res = browser.get("/read")
    cookie = set_cookie(res)
    if touched:
        assert store.calls == ["load", "touch"]
        assert cookie is not None
        assert cookie["value"] == value  # same id, same signature
        assert cookie["max-age"] == str(max_age)
        assert store.expires(session_id) == pytest.approx(time.time() + max_age, abs=30)
        assert store.expires(session_id) > before
    else:
        assert store.calls == ["load"]
        assert cookie is None
        assert store.expires(session_id) == before


def test_expired_session_is_gone() -> None:
    browser, store = logged_in(max_age=100)
    old_id = browser.session_id
    store.age(old_id, 101)
    res = browser.get("/set?x=1")
    assert res.json == {"x": 1}
    assert browser.session_id != old_id


@pytest.mark.parametrize("kind", ["sqlite", "postgres", "redis"])
def test_rolling_expiry_extends_the_stored_session(kind: str, make_store: Callable[..., SessionStore]) -> None:
    store = make_store(kind)
    browser = Browser(middleware(store, max_age=2))  # refresh after 0.2 s
    browser.get("/set?user=ann")
    key = store_key(browser.session_id)
    first = store.load(key)
    assert first is not None
    time.sleep(0.35)
    res = browser.get("/read")
    assert res.json == {"user": "ann"}
    cookie = set_cookie(res)
    assert cookie is not None and cookie["max-age"] == "2"
    second = store.load(key)
    assert second is not None
    assert second.expires - first.expires >= 0.3


# -- ending sessions ------------------------------------------------------------------------


def test_emptied_session_is_deleted_and_its_cookie_expired() -> None:
    browser, store = logged_in()
    old = browser.cookie
    res = browser.get("/del?user&cart")
    assert store.calls == ["load", "delete"]
    assert is_expired(set_cookie(res))
    assert store._sessions == {}
    assert browser.get("/read", cookie=old).json == {}


def test_clear_is_an_emptied_session() -> None:
    browser, store = logged_in()
    res = browser.get("/clear")
    assert is_expired(set_cookie(res))
    assert store._sessions == {}


def test_invalidate_deletes_and_old_cookie_no_longer_works() -> None:
    browser, store = logged_in()
    old = browser.cookie
    res = browser.get("/invalidate")
    assert "delete" in store.calls
    assert is_expired(set_cookie(res))
    assert store._sessions == {}
    res = browser.get("/set?x=1", cookie=old)
    assert res.json == {"x": 1}  # nothing of the old session
    assert browser.cookie is not None and browser.cookie != old
    assert len(store._sessions) == 1


def test_data_set_after_invalidate_goes_to_a_new_session() -> None:
    def logout(session: Session, params: dict[str, str]) -> Any:
        session.invalidate()
        session["flash"] = "bye"
        return dict(session)

    browser, store = logged_in()
    browser.mw.app = make_app({"/logout": logout})
    old = browser.cookie
    res = browser.get("/logout")
    assert res.json == {"flash": "bye"}
    assert browser.cookie is not None and browser.cookie != old
    assert store.data(browser.session_id) == {"flash": "bye"}
    assert len(store._sessions) == 1  # the old record is gone
    assert browser.get("/read", cookie=old).json == {}


def test_regenerate_keeps_data_under_a_new_id() -> None:
    browser, store = logged_in()
    old, old_id = browser.cookie, browser.session_id
    res = browser.get("/regenerate")
    assert res.json == {"user": "ann", "cart": [1]}
    assert browser.cookie is not None and browser.session_id != old_id
    assert store.data(browser.session_id) == {"user": "ann", "cart": [1]}
    assert store.data(old_id) is None
    assert browser.get("/read").json == {"user": "ann", "cart": [1]}
    assert browser.get("/read", cookie=old).json == {}


def test_regenerate_of_a_new_session_at_login() -> None:
    store = CountingStore()
    browser = Browser(middleware(store))

    def login(session: Session, params: dict[str, str]) -> Any:
        session.regenerate()
        session["user"] = "ann"
        return session.id

    browser.mw.app = make_app({"/login": login})
    res = browser.get("/login")
    assert browser.session_id == res.json
    assert store.data(res.json) == {"user": "ann"}


class Paused:
    """A request that loads the session, then waits in the application until released."""

    def __init__(self, mw: SessionMiddleware, cookie: str, then: Callable[[Session], None]) -> None:
        self.loaded, self.release = threading.Event(), threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

        def slow(session: Session, params: dict[str, str]) -> Any:
            data = dict(session)
            self.loaded.set()
            assert self.release.wait(10)
            then(session)
            return data

        client = TestApp(middleware(mw.store, make_app({"/slow": slow})), cookiejar=NoCookies())

        def run() -> None:
            try:
                self.result = client.get("/slow", headers={"Cookie": f"session={cookie}"})
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.loaded.wait(10)

    def finish(self) -> Any:
        self.release.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        return self.result


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgres", "redis"])
def test_slow_request_does_not_undo_a_concurrent_logout(kind: str, make_store: Callable[..., SessionStore]) -> None:
    store = make_store(kind)
    browser = Browser(middleware(store))
    browser.get("/set?user=ann")
    cookie = browser.cookie
    assert cookie is not None
    slow = Paused(browser.mw, cookie, lambda s: s.__setitem__("cart", [1, 2]))
    assert is_expired(set_cookie(browser.get("/invalidate")))
    res = slow.finish()
    assert res.json == {"user": "ann"}
    given = set_cookie(res)
    assert given is None or is_expired(given)  # the dead session's cookie is not handed out again
    assert store.load(store_key(cookie[:ID_LENGTH])) is None
    assert browser.get("/read", cookie=cookie).json == {}


def test_slow_reader_whose_touch_is_due_does_not_undo_a_concurrent_logout() -> None:
    browser, store = logged_in(max_age=100)
    cookie = browser.cookie
    assert cookie is not None
    store.age(browser.session_id, 50)
    slow = Paused(browser.mw, cookie, lambda s: None)
    browser.get("/invalidate")
    res = slow.finish()
    assert res.json == {"user": "ann", "cart": [1]}
    assert "touch" in store.calls
    given = set_cookie(res)
    assert given is None or is_expired(given)
    assert store._sessions == {}


@pytest.mark.parametrize("then", ["change", "read"])
def test_slow_request_does_not_undo_a_concurrent_login(then: str) -> None:
    # Another tab logs in (regenerate) while a slow request of the old session is running:
    # the slow response arrives last and must not take the new session's cookie away.
    browser, store = logged_in(max_age=100)
    cookie = browser.cookie
    assert cookie is not None
    store.age(browser.session_id, 50)  # a touch is due: the slow reader writes too
    slow = Paused(browser.mw, cookie, (lambda s: s.__setitem__("seen", 1)) if then == "change" else (lambda s: None))
    browser.get("/regenerate")
    new_cookie = browser.cookie
    assert new_cookie is not None and new_cookie != cookie
    browser.absorb(slow.finish())
    assert browser.cookie == new_cookie
    assert browser.get("/read").json == {"user": "ann", "cart": [1]}
    assert store.data(cookie[:ID_LENGTH]) is None  # the old id stays dead


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgres", "redis"])
def test_concurrent_requests_changing_different_keys_both_land(
    kind: str, make_store: Callable[..., SessionStore]
) -> None:
    store = make_store(kind)
    browser = Browser(middleware(store))
    browser.get("/set?user=ann")
    cookie = browser.cookie
    assert cookie is not None
    slow = Paused(browser.mw, cookie, lambda s: s.__setitem__("theme", "dark"))
    browser.get("/set?cart=[1]")
    slow.finish()
    assert browser.get("/read").json == {"user": "ann", "cart": [1], "theme": "dark"}


# -- cookies that must not work -------------------------------------------------------------


def _bad_cookies(cookie: str) -> dict[str, str]:
    session_id = cookie[:ID_LENGTH]
    return {
        "tampered": cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB"),
        "truncated": cookie[:-1],
        "unknown-key": Signer(["unknown-secret-abcdefghijklmnopqrstuvwxyz0123"]).sign(session_id, NOW),
        "garbage": "not a session cookie at all",
        "empty": "",
        "quoted-garbage": '"' + "x" * 85 + '"',
        "id-only": session_id,
        "unstored-id": Signer([SECRET]).sign(new_id(), NOW),
    }


@pytest.mark.parametrize("kind", list(_bad_cookies(Signer([SECRET]).sign(new_id(), NOW))))
def test_bad_cookie_gives_a_fresh_session_with_a_fresh_id(kind: str) -> None:
    browser, store = logged_in()
    real = browser.cookie
    assert real is not None
    bad = _bad_cookies(real)[kind]
    res = browser.get("/set?x=1", cookie=bad)
    assert res.json == {"x": 1}  # none of the stored session's data
    fresh = browser.cookie
    assert fresh is not None
    assert fresh[:ID_LENGTH] not in (bad[:ID_LENGTH], real[:ID_LENGTH])  # never the client's id
    assert browser.mw.core.format.signer.unsign(fresh) == (fresh[:ID_LENGTH], int(fresh.split(".")[1]), True)
    assert store.data(real[:ID_LENGTH]) == {"user": "ann", "cart": [1]}  # the real session is untouched


def test_bad_cookie_without_writes_is_not_stored() -> None:
    browser, store = logged_in()
    real = browser.cookie
    assert real is not None
    res = browser.get("/read", cookie=real[:-1])
    assert res.json == {}
    cookie = set_cookie(res)
    assert cookie is None or is_expired(cookie)  # no session handed out
    assert len(store._sessions) == 1


def test_oversize_cookie_header_is_ignored() -> None:
    browser, _ = logged_in()
    real = browser.cookie
    assert real is not None
    big = {"Cookie": f"session={real}; padding={'x' * 8200}"}
    res = browser.app.get("/set?x=1", headers=big)
    assert res.json == {"x": 1}
    fresh = set_cookie(res)
    assert fresh is not None and fresh["value"][:ID_LENGTH] != real[:ID_LENGTH]
    # A large header below the limit still works: the limit is what is refused, not size in general.
    near = {"Cookie": f"padding={'x' * 7000}; session={real}"}
    assert browser.app.get("/read", headers=near).json == {"user": "ann", "cart": [1]}


def test_session_cookie_is_found_among_others() -> None:
    browser, _ = logged_in()
    real = browser.cookie
    headers = {"Cookie": f'theme=dark; session_old=xyz; session="{real}"; lang=en'}
    assert browser.app.get("/read", headers=headers).json == {"user": "ann", "cart": [1]}
    # Two cookies of the name (another path's, or a planted one): the genuine one wins.
    headers = {"Cookie": f"session={Signer([SECRET]).sign(new_id(), NOW)[:-1]}; session={real}"}
    assert browser.app.get("/read", headers=headers).json == {"user": "ann", "cart": [1]}


def test_a_write_sends_back_the_cookie_it_came_with_and_a_fresh_expiry() -> None:
    """The signed value names the session and its creation time, so a write renews only its expiry."""
    browser, store = logged_in()
    before = browser.cookie
    res = browser.get("/set?n=1")
    cookie = set_cookie(res)
    assert cookie is not None and cookie["value"] == before
    assert cookie["max-age"] == str(24 * 3600)
    assert store.calls == ["load", "update"]


def test_a_quoted_cookie_comes_back_unquoted() -> None:
    browser, _ = logged_in()
    value = browser.cookie
    res = browser.get("/set?n=1", cookie=f'"{value}"')
    cookie = set_cookie(res)
    assert cookie is not None and cookie["value"] == value


def test_a_write_with_an_older_key_re_signs_the_cookie() -> None:
    store = CountingStore()
    old = Browser(middleware(store, secret=OLD_SECRET))
    old.get("/set?user=ann")
    assert old.cookie is not None
    rotated = Browser(middleware(store, secret=[SECRET, OLD_SECRET]))
    res = rotated.get("/set?n=1", cookie=old.cookie)
    cookie = set_cookie(res)
    assert cookie is not None and cookie["value"] != old.cookie
    assert Signer([SECRET]).unsign(cookie["value"]) == (old.session_id, int(old.cookie.split(".")[1]), True)


def test_older_rotation_key_is_accepted_and_resigned() -> None:
    store = CountingStore()
    old_browser = Browser(middleware(store, secret=OLD_SECRET))
    old_browser.get("/set?user=ann")
    old_cookie = old_browser.cookie
    assert old_cookie is not None

    rotated = Browser(middleware(store, secret=[SECRET, OLD_SECRET]))
    store.calls.clear()
    res = rotated.get("/read", cookie=old_cookie)
    assert res.json == {"user": "ann"}
    assert "touch" in store.calls  # re-signing extends the same record; nothing else is written
    cookie = set_cookie(res)
    assert cookie is not None
    new_value = cookie["value"]
    assert new_value != old_cookie
    assert new_value[:ID_LENGTH] == old_cookie[:ID_LENGTH]  # the same session
    assert Signer([SECRET]).unsign(new_value) == (old_cookie[:ID_LENGTH], int(old_cookie.split(".")[1]), True)
    assert Signer([OLD_SECRET]).unsign(new_value) is None
    # Once re-signed, reads are quiet again.
    store.calls.clear()
    assert set_cookie(rotated.get("/read", cookie=new_value)) is None
    assert store.calls == ["load"]

    # With the old secret removed, a cookie it signed is worth nothing.
    retired = Browser(middleware(store, secret=SECRET))
    res = retired.get("/set?x=1", cookie=old_cookie)
    assert res.json == {"x": 1}
    assert retired.session_id != old_cookie[:ID_LENGTH]
    assert retired.get("/read", cookie=new_value).json == {"user": "ann"}


# -- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "error"),
    [(datetime.date(2024, 1, 1), SessionValueError), (float("nan"), SessionValueError), ({1j}, SessionValueError)],
    ids=["date", "nan", "set"],
)
def test_value_json_cannot_hold_fails_at_the_assignment(value: Any, error: type[Exception]) -> None:
    store = CountingStore()
    line: list[int] = []

    def bad(session: Session, params: dict[str, str]) -> Any:
        session["ok"] = 1
        line.append(bad.__code__.co_firstlineno + 3)
        session["when"] = value
        return None

    with pytest.raises(error) as info:
        Browser(middleware(store, make_app({"/bad": bad}))).get("/bad")
    assert "'when'" in str(info.value)
    # Raised at the assignment (that line is in the traceback), not later when the session is saved.
    assert any(entry.lineno + 1 == line[0] for entry in info.traceback)
    assert store._sessions == {}


def test_non_str_key_is_a_type_error() -> None:
    def bad(session: Session, params: dict[str, str]) -> Any:
        session[1] = "x"  # type: ignore[index]
        return None

    with pytest.raises(TypeError, match="str"):
        Browser(middleware(app=make_app({"/bad": bad}))).get("/bad")


def test_app_that_catches_the_value_error_keeps_its_other_changes() -> None:
    def careful(session: Session, params: dict[str, str]) -> Any:
        session["ok"] = 1
        with contextlib.suppress(SessionValueError):
            session["bad"] = object()
        return dict(session)

    store = CountingStore()
    browser = Browser(middleware(store, make_app({"/careful": careful})))
    assert browser.get("/careful").json == {"ok": 1}
    assert store.data(browser.session_id) == {"ok": 1}


# -- store failures ------------------------------------------------------------------------------


def test_load_failure_degrades_to_an_empty_session(warnings: Callable[[], list[str]]) -> None:
    browser, store = logged_in()
    store.failing = {"load"}
    for _ in range(5):
        res = browser.get("/set?x=1")
        assert res.status_int == 200
        assert res.json == {"x": 1}  # the app ran with an empty session
        assert res.headers.getall("Set-Cookie") == []  # the browser keeps its cookie
        assert res.headers.getall("Vary") == ["Cookie"]
    assert store.calls == ["load"] * 5  # nothing saved
    lines = warnings()
    assert len(lines) == 1, lines  # one line per burst, not one per request
    assert "loading" in lines[0] and "injected failure of load" in lines[0]
    store.failing = set()
    assert browser.get("/read").json == {"user": "ann", "cart": [1]}  # the session survived the outage


def test_failure_log_reports_the_count_of_suppressed_failures(warnings: Callable[[], list[str]]) -> None:
    browser, store = logged_in()
    browser.mw.core._failures = RateLimitedLog(interval=0.2)
    store.failing = {"load"}
    for _ in range(4):
        browser.get("/read")
    assert len(warnings()) == 1
    time.sleep(0.25)
    browser.get("/read")
    lines = warnings()
    assert len(lines) == 2
    assert "3 more since the last report" in lines[1]


@pytest.mark.parametrize(
    ("failing", "path", "prepare"),
    [("update", "/set?x=1", None), ("delete", "/invalidate", None), ("touch", "/read", 100.0)],
)
def test_save_failure_still_sends_the_response(
    failing: str, path: str, prepare: float | None, warnings: Callable[[], list[str]]
) -> None:
    browser, store = logged_in(max_age=100)
    if prepare is not None:
        store.age(browser.session_id, 50)
    store.failing = {failing}
    res = browser.get(path)
    assert res.status_int == 200
    assert failing in store.calls
    assert res.headers.getall("Set-Cookie") == []
    lines = warnings()
    assert len(lines) == 1 and "saving" in lines[0], lines


def test_create_failure_still_sends_the_response(warnings: Callable[[], list[str]]) -> None:
    store = CountingStore()
    store.failing = {"create"}
    res = Browser(middleware(store)).get("/set?x=1")
    assert res.status_int == 200
    assert res.json == {"x": 1}
    assert res.headers.getall("Set-Cookie") == []
    assert len(warnings()) == 1


@pytest.mark.parametrize("failing", ["load", "update"])
def test_fail_on_store_error_answers_503(failing: str) -> None:
    bodies: list[ClosingBody] = []

    def app(environ: Environ, start_response: StartResponse) -> ClosingBody:
        environ["session"]["x"] = 1
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-App", "yes")])
        bodies.append(ClosingBody([b"app body"]))
        return bodies[-1]

    browser, store = logged_in(fail_on_store_error=True)
    browser.mw.app = app
    store.failing = {failing}
    res = browser.get("/", status=503)
    assert res.body == b"Session store unavailable\n"
    assert "X-App" not in res.headers
    assert res.headers.getall("Set-Cookie") == []
    assert bodies[0].closed  # the application's response was closed, not leaked


def test_fail_on_store_error_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_FAIL_ON_STORE_ERROR", "true")
    browser, store = logged_in()
    store.failing = {"load"}
    browser.get("/read", status=503)
    store.failing = set()
    assert browser.get("/read").json == {"user": "ann", "cart": [1]}


def test_fail_on_store_error_with_a_streaming_application() -> None:
    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        environ["session"].get("user")
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"streamed"

    browser, store = logged_in(fail_on_store_error=True)
    browser.mw.app = app
    store.failing = {"load"}
    res = browser.get("/", status=503)
    assert res.body == b"Session store unavailable\n"


def test_fail_on_store_error_does_not_affect_healthy_requests() -> None:
    browser, _ = logged_in(fail_on_store_error=True)
    assert browser.get("/read").json == {"user": "ann", "cart": [1]}
    assert Browser(browser.mw).get("/none").status_int == 200


def _corrupt_sqlite(store: Any, key: str) -> None:
    conn = sqlite3.connect(store.path)
    with conn:
        conn.execute(f"UPDATE {store.table} SET data = ? WHERE id = ?", ("{not json", key))
    conn.close()


def _corrupt_postgres(store: Any, key: str) -> None:
    pg_sql(store.dsn, f"UPDATE {store.table} SET data = '[1, 2]'::jsonb WHERE id = %s", (key,))


def _corrupt_redis(store: Any, key: str) -> None:
    store.client.hset(store.prefix + key, "user", "{not json")


@pytest.mark.parametrize(
    ("kind", "corrupt"), [("sqlite", _corrupt_sqlite), ("postgres", _corrupt_postgres), ("redis", _corrupt_redis)]
)
def test_malformed_record_gives_a_new_session(
    kind: str,
    corrupt: Callable[[Any, str], None],
    make_store: Callable[..., SessionStore],
    warnings: Callable[[], list[str]],
) -> None:
    store = make_store(kind)
    browser = Browser(middleware(store))
    browser.get("/set?user=ann")
    old_id = browser.session_id
    corrupt(store, store_key(old_id))
    res = browser.get("/set?x=1")
    assert res.status_int == 200
    assert res.json == {"x": 1}
    assert browser.session_id != old_id
    assert any("malformed session record" in line for line in warnings()), warnings()
    assert browser.get("/read").json == {"x": 1}


def test_redis_killed_mid_request(
    private_redis: RedisServer, make_store: Callable[..., SessionStore], warnings: Callable[[], list[str]]
) -> None:
    store = make_store("redis", url=private_redis.url, timeout=0.5)
    browser = Browser(middleware(store))
    browser.get("/set?user=ann")

    def outage(session: Session, params: dict[str, str]) -> Any:
        data = dict(session)  # loaded while Redis was up
        private_redis.kill()
        session["visits"] = 1  # the save will fail
        return {**data, "still": session["user"]}

    browser.mw.app = make_app({"/outage": outage})
    res = browser.get("/outage")
    assert res.status_int == 200
    assert res.json == {"user": "ann", "still": "ann"}
    assert res.headers.getall("Set-Cookie") == []
    lines = warnings()
    assert len(lines) == 1 and "saving" in lines[0], lines
    # Redis stays down: later requests degrade to an empty session, without a warning each.
    for _ in range(3):
        res = browser.get("/read")
        assert (res.status_int, res.json) == (200, {})
    assert len(warnings()) == 1
    with pytest.raises(redis.RedisError):
        redis.Redis.from_url(private_redis.url, socket_connect_timeout=0.5).ping()
