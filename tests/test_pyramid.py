"""Pyramid's ``request.session`` as a wsgisession session, through WebTest, on the real stores.

The app under test is a real Pyramid app: its views use ``request.session`` through Pyramid's
``ISession`` API only (plus ``regenerate()``, ours), as application code would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import webtest
from pyramid.config import Configurator
from pyramid.csrf import SessionCSRFStoragePolicy, get_csrf_token
from pyramid.httpexceptions import HTTPSeeOther
from pyramid.interfaces import ISession, ISessionFactory
from pyramid.response import Response
from servers import SECRET, RedisServer, unique
from zope.interface.verify import verifyObject

from wsgisession import ConfigError, Loaded, SessionMiddleware, SessionStore, SessionValueError
from wsgisession.frameworks.pyramid import PyramidSession, SessionFactory, session_factory
from wsgisession.settings import _VARIABLES
from wsgisession.stores.redis import RedisStore

REAL = ["postgres", "redis"]
ALL = ["memory", "sqlite", "postgres", "redis"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapter reads os.environ under Pyramid's settings: start every test from none of our variables."""
    for variable, _ in _VARIABLES.values():
        monkeypatch.delenv(variable, raising=False)


class Hooks:
    """What a test runs inside a view, between loading the session and changing it."""

    def __init__(self) -> None:
        self.pause: Callable[[], None] = lambda: None


def json_param(request: Any, name: str) -> Any:
    return json.loads(request.params[name])


def add_views(config: Configurator, hooks: Hooks) -> None:
    """The views of the app under test, each a use of ``request.session`` an application makes."""

    def view(path: str, method: str = "GET", renderer: str | None = "json") -> Callable[[Any], Any]:
        def register(func: Callable[[Any], Any]) -> Callable[[Any], Any]:
            config.add_route(func.__name__, path, request_method=method)
            config.add_view(func, route_name=func.__name__, renderer=renderer)
            return func

        return register

    @view("/read")
    def read(request: Any) -> Any:
        session = request.session
        return {"data": dict(session), "new": session.new, "created": session.created}

    @view("/verify")
    def verify(request: Any) -> Any:
        return verifyObject(ISession, request.session)

    @view("/set", "POST")
    def set_(request: Any) -> Any:
        request.session[request.params["key"]] = json_param(request, "value")
        return {"created": request.session.created}

    @view("/set-after-pause", "POST")
    def set_after_pause(request: Any) -> Any:
        session = request.session
        before = dict(session)  # loaded now, as a request that reads first
        hooks.pause()
        session[request.params["key"]] = json_param(request, "value")
        return before

    @view("/login", "POST")
    def login(request: Any) -> Any:
        request.session.regenerate()
        request.session["user"] = request.params["user"]
        return {}

    @view("/relogin", "POST")
    def relogin(request: Any) -> Any:
        request.session.invalidate()  # Pyramid's way: drop the old session, start a new one
        request.session["user"] = request.params["user"]
        return {"new": request.session.new}

    @view("/logout", "POST")
    def logout(request: Any) -> Any:
        request.session.invalidate()
        return {}

    @view("/flash", "POST")
    def flash(request: Any) -> Any:
        request.session.flash(request.params["msg"], request.params.get("queue", ""), "dup" in request.params)
        return {}

    @view("/flash-and-redirect", "POST", renderer=None)
    def flash_and_redirect(request: Any) -> Any:
        request.session.flash("saved")
        raise HTTPSeeOther("/read")  # Pyramid's idiom: the session is saved with the exception view's response

    @view("/peek")
    def peek(request: Any) -> Any:
        return request.session.peek_flash(request.params.get("queue", ""))

    @view("/pop")
    def pop(request: Any) -> Any:
        return request.session.pop_flash(request.params.get("queue", ""))

    @view("/csrf")
    def csrf(request: Any) -> Any:
        return request.session.get_csrf_token()

    @view("/policy-token")
    def policy_token(request: Any) -> Any:
        return get_csrf_token(request)  # through the CSRF storage policy

    @view("/csrf/new", "POST")
    def new_csrf(request: Any) -> Any:
        return request.session.new_csrf_token()

    @view("/mutate", "POST")
    def mutate(request: Any) -> Any:
        """Append to the list under "items" in place, having read it one way or another."""
        session, via = request.session, request.params["via"]
        if via == "getitem":
            items = session["items"]
        elif via == "get":
            items = session.get("items")
        elif via == "items":
            items = dict(session.items())["items"]
        elif via == "values":
            [items] = [v for v in session.values() if isinstance(v, list)]
        elif via == "setdefault":
            items = session.setdefault("items", [])
        else:
            items = session.peek_flash()
        items.append(request.params["item"])
        if "changed" in request.params:
            session.changed()
        return {}

    @view("/untouched")
    def untouched(request: Any) -> Any:
        return {}

    @view("/session-object-only")
    def session_object_only(request: Any) -> Any:
        return {"is_session": isinstance(request.session, PyramidSession)}

    @view("/vary", renderer=None)
    def vary(request: Any) -> Any:
        response = Response(str(request.session.get("user")))
        response.vary = ("Accept-Encoding",)
        return response


def build(factory: SessionFactory, hooks: Hooks | None = None, csrf: bool = False) -> webtest.TestApp:
    """A browser on the test app, its sessions made by ``factory`` (with Pyramid's CSRF checks, if ``csrf``)."""
    with Configurator() as config:
        config.set_session_factory(factory)
        if csrf:
            config.set_csrf_storage_policy(SessionCSRFStoragePolicy())
            config.set_default_csrf_options(require_csrf=True)
        add_views(config, hooks or Hooks())
        return webtest.TestApp(config.make_wsgi_app())


@pytest.fixture
def factory(request: pytest.FixtureRequest, make_store: Callable[..., SessionStore]) -> SessionFactory:
    """A session factory on the store kind the test is parametrized with."""
    return session_factory(store=make_store(request.param), secret=SECRET)


@pytest.fixture
def browser(factory: SessionFactory) -> webtest.TestApp:
    return build(factory)


def cookie_of(response: webtest.TestResponse) -> str:
    """The value of the one session cookie the response sets."""
    [header] = response.headers.getall("Set-Cookie")
    name, _, rest = header.partition("=")
    assert name == "session"
    return rest.split(";")[0]


def replay(app: webtest.TestApp, value: str, path: str = "/read") -> webtest.TestResponse:
    """A request from another client that presents only this session cookie."""
    return webtest.TestApp(app.app).get(path, headers={"Cookie": f"session={value}"})


def put(browser: webtest.TestApp, key: str, value: Any) -> webtest.TestResponse:
    return browser.post("/set", {"key": key, "value": json.dumps(value)})


def data(browser: webtest.TestApp) -> dict[str, Any]:
    return browser.get("/read").json["data"]  # type: ignore[no-any-return]


# -- the ISession API ----------------------------------------------------------------------


@pytest.mark.parametrize("factory", ALL, indirect=True)
def test_request_session_provides_pyramids_isession(browser: webtest.TestApp) -> None:
    assert browser.get("/verify").json is True  # a new session
    put(browser, "a", 1)
    assert browser.get("/verify").json is True  # a loaded one


@pytest.mark.parametrize("factory", ALL, indirect=True)
def test_created_and_new(browser: webtest.TestApp) -> None:
    first = browser.get("/read").json
    assert first["new"] is True and isinstance(first["created"], int)
    created = put(browser, "a", 1).json["created"]
    assert abs(created - first["created"]) <= 2
    for _ in range(2):
        again = browser.get("/read").json
        assert again == {"data": {"a": 1}, "new": False, "created": created}  # kept as when the session began


@pytest.mark.parametrize("factory", REAL, indirect=True)
def test_login_with_regenerate_keeps_the_data_under_a_new_id(browser: webtest.TestApp) -> None:
    before = cookie_of(put(browser, "count", 3))
    after = cookie_of(browser.post("/login", {"user": "alice"}))
    assert after != before
    assert replay(browser, before).json["data"] == {}
    assert replay(browser, after).json["data"] == {"count": 3, "user": "alice"}


@pytest.mark.parametrize("factory", REAL, indirect=True)
def test_login_with_invalidate_starts_a_new_session(browser: webtest.TestApp) -> None:
    before = cookie_of(put(browser, "count", 3))
    response = browser.post("/relogin", {"user": "bob"})
    assert response.json == {"new": True}
    after = cookie_of(response)
    assert after != before
    assert replay(browser, before).json["data"] == {}
    assert data(browser) == {"user": "bob"}  # nothing of the old session came along


@pytest.mark.parametrize("factory", REAL, indirect=True)
def test_logout_invalidates_every_copy_of_the_cookie(browser: webtest.TestApp) -> None:
    old = cookie_of(browser.post("/login", {"user": "alice"}))
    response = browser.post("/logout")
    [header] = response.headers.getall("Set-Cookie")
    assert header.startswith("session=;") and "Max-Age=0" in header
    assert browser.cookies == {}
    gone = replay(browser, old).json
    assert gone["data"] == {} and gone["new"] is True


@pytest.mark.parametrize("factory", REAL, indirect=True)
def test_flash_queues_and_duplicates(browser: webtest.TestApp) -> None:
    browser.post("/flash", {"msg": "saved", "dup": ""})
    browser.post("/flash", {"msg": "saved", "dup": ""})  # duplicates allowed
    browser.post("/flash", {"msg": "saved"})  # not this time: it is there already
    browser.post("/flash", {"msg": "failed", "queue": "errors"})
    browser.post("/flash", {"msg": "failed", "queue": "errors"})
    assert browser.get("/peek").json == ["saved", "saved"]
    assert browser.get("/peek", {"queue": "errors"}).json == ["failed"]
    assert browser.get("/peek").json == ["saved", "saved"]  # peeking leaves them
    assert browser.get("/pop").json == ["saved", "saved"]
    assert browser.get("/pop").json == []  # popping took them
    assert browser.get("/peek").json == []
    assert browser.get("/pop", {"queue": "errors"}).json == ["failed"]
    assert browser.get("/pop", {"queue": "errors"}).json == []


def test_a_flash_message_json_cannot_hold_fails_where_it_is_flashed() -> None:
    session = PyramidSession(lambda: Loaded(None, {"_f_": ["kept"]}))
    with pytest.raises(SessionValueError, match="_f_"):
        session.flash(object())
    assert session.peek_flash() == ["kept"]


@pytest.mark.parametrize("factory", ["redis"], indirect=True)
def test_a_flash_before_a_raised_redirect_is_saved(browser: webtest.TestApp) -> None:
    response = browser.post("/flash-and-redirect", status=303)
    assert response.headers.getall("Set-Cookie")
    assert browser.get("/peek").json == ["saved"]


@pytest.mark.parametrize("factory", REAL, indirect=True)
def test_csrf_token_is_stable_per_session_and_rotates_on_request(
    browser: webtest.TestApp, factory: SessionFactory
) -> None:
    token = browser.get("/csrf").json
    assert len(token) >= 32
    assert browser.get("/csrf").json == token
    other = build(factory)
    assert other.get("/csrf").json != token  # another session, another token
    assert browser.get("/policy-token").json == token  # Pyramid's default policy asks the session
    new = browser.post("/csrf/new").json
    assert new != token
    assert browser.get("/csrf").json == new


@pytest.mark.parametrize("factory", REAL, indirect=True)
def test_session_csrf_storage_policy_guards_posts(factory: SessionFactory) -> None:
    browser = build(factory, csrf=True)
    token = browser.get("/csrf").json
    assert browser.post("/set", {"key": "a", "value": "1"}, status=400)  # no token
    assert browser.post("/set", {"key": "a", "value": "1", "csrf_token": "0" * 40}, status=400)
    assert data(browser) == {"_csrft_": token}  # the refused posts changed nothing
    browser.post("/set", {"key": "a", "value": "1", "csrf_token": token}, status=200)
    browser.post("/set", {"key": "b", "value": "2"}, headers={"X-CSRF-Token": token}, status=200)
    assert data(browser) == {"_csrft_": token, "a": 1, "b": 2}
    # The policy and the session agree on the token, and a token of another session is worth nothing.
    assert browser.get("/policy-token").json == token
    stranger = build(factory, csrf=True)
    stranger.get("/csrf")
    stranger.post("/set", {"key": "a", "value": "1", "csrf_token": token}, status=400)


# -- values changed in place ----------------------------------------------------------------


@pytest.mark.parametrize("factory", ["redis"], indirect=True)
@pytest.mark.parametrize("via", ["getitem", "get", "items", "values", "setdefault", "peek_flash"])
@pytest.mark.parametrize("changed", [False, True])
def test_a_value_changed_in_place_is_saved(browser: webtest.TestApp, via: str, changed: bool) -> None:
    key = "_f_" if via == "peek_flash" else "items"
    put(browser, key, ["a"])
    params = {"via": via, "item": "b", **({"changed": ""} if changed else {})}
    browser.post("/mutate", params)
    assert data(browser) == {key: ["a", "b"]}


@pytest.mark.parametrize("factory", ["postgres"], indirect=True)
def test_changed_after_setdefault_on_a_new_session(browser: webtest.TestApp) -> None:
    browser.post("/mutate", {"via": "setdefault", "item": "first", "changed": ""})
    assert data(browser) == {"items": ["first"]}


# -- concurrent requests ------------------------------------------------------------------


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``call`` on a thread of its own; its result (or exception) lands in the list."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(call())
        except Exception as exc:
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


@pytest.mark.parametrize("factory", REAL, indirect=True)
def test_two_concurrent_requests_keep_each_others_keys(factory: SessionFactory) -> None:
    hooks = Hooks()
    both_loaded = threading.Barrier(2, timeout=10)
    hooks.pause = lambda: both_loaded.wait()
    browser = build(factory, hooks)
    value = cookie_of(put(browser, "start", 0))
    calls = [in_thread(set_after_pause(browser, value, key)) for key in ("left", "right")]
    for thread, result in calls:
        thread.join(10)
        assert [response.json for response in result] == [{"start": 0}]  # each read before the other wrote
    assert replay(browser, value).json["data"] == {"start": 0, "left": 1, "right": 1}


def set_after_pause(browser: webtest.TestApp, value: str, key: str) -> Callable[[], webtest.TestResponse]:
    """A request of another client with this session cookie that reads the session, pauses, then sets ``key``."""

    def post() -> webtest.TestResponse:
        client = webtest.TestApp(browser.app)
        return client.post("/set-after-pause", {"key": key, "value": "1"}, headers={"Cookie": f"session={value}"})

    return post


@pytest.mark.parametrize("factory", REAL, indirect=True)
def test_a_session_logged_out_meanwhile_is_not_brought_back(factory: SessionFactory) -> None:
    hooks = Hooks()
    loaded, logged_out = threading.Event(), threading.Event()

    def pause() -> None:
        loaded.set()
        assert logged_out.wait(10)

    hooks.pause = pause
    browser = build(factory, hooks)
    value = cookie_of(browser.post("/login", {"user": "alice"}))
    thread, result = in_thread(set_after_pause(browser, value, "k"))
    assert loaded.wait(10)
    browser.post("/logout")
    logged_out.set()
    thread.join(10)
    [response] = result
    assert response.json == {"user": "alice"}  # it read the session before the logout
    assert response.headers.getall("Set-Cookie") == []  # and its write did not revive it
    assert replay(browser, value).json["data"] == {}


# -- laziness, Vary, outages ------------------------------------------------------------------


@pytest.fixture
def redis_server(private_redis: RedisServer, stores: list[SessionStore]) -> tuple[RedisServer, SessionFactory]:
    store = RedisStore(private_redis.url, prefix="t:", timeout=0.5)
    stores.append(store)
    return private_redis, session_factory(store=store, secret=SECRET)


def test_a_request_that_does_not_use_the_session_costs_no_round_trip(
    redis_server: tuple[RedisServer, SessionFactory],
) -> None:
    server, factory = redis_server
    browser = build(factory)
    cookie_of(put(browser, "user", "alice"))
    counter = redis.Redis(port=server.port)  # one connection: its handshake is counted once, here

    def round_trips(path: str) -> int:
        before = int(counter.info("stats")["total_commands_processed"])
        assert browser.get(path).status_int == 200
        return int(counter.info("stats")["total_commands_processed"]) - before - 1  # less the first INFO

    try:
        assert round_trips("/untouched") == 0
        assert round_trips("/session-object-only") == 0  # request.session made, never used
        assert round_trips("/read") == 1  # the count is not blind
    finally:
        counter.close()


@pytest.mark.parametrize("factory", ["sqlite"], indirect=True)
def test_vary_cookie_on_responses_that_used_the_session(browser: webtest.TestApp) -> None:
    assert "Vary" not in browser.get("/untouched").headers
    assert "Vary" not in browser.get("/session-object-only").headers
    assert browser.get("/read").headers["Vary"] == "Cookie"
    assert browser.get("/vary").headers.getall("Vary") == ["Accept-Encoding, Cookie"]


@pytest.mark.parametrize("factory", ["memory"], indirect=True)
def test_the_cookie_is_secure_over_https(browser: webtest.TestApp) -> None:
    header = browser.post("/set", {"key": "a", "value": "1"}, extra_environ={"wsgi.url_scheme": "https"}).headers[
        "Set-Cookie"
    ]
    assert "; Secure" in header
    assert "; Secure" not in webtest.TestApp(browser.app).post("/set", {"key": "a", "value": "1"}).headers["Set-Cookie"]


def test_a_store_outage_gives_an_empty_session_not_an_error(
    redis_server: tuple[RedisServer, SessionFactory], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="wsgisession")
    server, factory = redis_server
    browser = build(factory)
    value = cookie_of(browser.post("/login", {"user": "alice"}))
    server.kill()
    response = browser.get("/read")
    assert response.status_int == 200 and response.json["data"] == {}
    assert response.headers.getall("Set-Cookie") == []  # the browser keeps its cookie for when it is back
    written = put(browser, "a", 1)
    assert written.status_int == 200 and written.headers.getall("Set-Cookie") == []
    assert browser.cookies["session"] == value
    assert any("Session store failed" in r.getMessage() for r in caplog.records)


# -- one store, several front doors -------------------------------------------------------------


@pytest.mark.parametrize("factory", ["redis"], indirect=True)
def test_a_login_through_the_middleware_is_seen_by_pyramid(factory: SessionFactory) -> None:
    def raw(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["session"]["user"] = "alice"
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = SessionMiddleware(raw, factory.core.store, secret=SECRET)
    value = cookie_of(webtest.TestApp(middleware).get("/"))
    assert replay(build(factory), value).json["data"] == {"user": "alice"}


# -- settings -------------------------------------------------------------------------------


@contextlib.contextmanager
def included(settings: dict[str, Any]) -> Iterator[webtest.TestApp]:
    """A browser on the test app configured by ``config.include`` with these Pyramid settings."""
    with Configurator(settings=settings) as config:
        config.include("wsgisession.frameworks.pyramid")
        add_views(config, Hooks())
        app = config.make_wsgi_app()
    factory = app.registry.getUtility(ISessionFactory)
    try:
        yield webtest.TestApp(app)
    finally:
        factory.close()


def test_settings_from_pyramids_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_COOKIE_NAME", "from_env")  # Pyramid's settings come first
    settings = {"wsgisession.secret": SECRET, "wsgisession.store": "memory", "wsgisession.cookie_name": "sid",
                "wsgisession.max_age": "3600000", "wsgisession.cookie_samesite": "strict"}  # fmt: skip
    with included(settings) as browser:
        header = put(browser, "a", 1).headers["Set-Cookie"]
        assert header.startswith("sid=") and "; Max-Age=3600;" in header and "SameSite=Strict" in header
        assert data(browser) == {"a": 1}


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_SECRET", SECRET)
    monkeypatch.setenv("SESSION_STORE", "memory")
    monkeypatch.setenv("SESSION_COOKIE_NAME", "from_env")
    monkeypatch.setenv("SESSION_MAX_AGE", "7200000")
    with included({}) as browser:
        header = put(browser, "a", 1).headers["Set-Cookie"]
        assert header.startswith("from_env=") and "; Max-Age=7200;" in header


def test_the_store_is_detected_from_the_settings_and_logged(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsgisession")
    prefix = unique("pyr") + ":"
    settings = {"wsgisession.secret": SECRET, "wsgisession.redis_url": redis_url, "wsgisession.redis_prefix": prefix}
    with included(settings) as browser:
        assert "Using Redis for session storage" in [r.getMessage() for r in caplog.records]
        put(browser, "a", 1)
        client = redis.Redis.from_url(redis_url)
        try:
            keys = client.keys(prefix + "*")
            assert len(keys) == 1
            client.delete(*keys)
        finally:
            client.close()


def test_a_weak_secret_stops_the_configuration() -> None:
    settings = {"wsgisession.secret": "changeme", "wsgisession.store": "memory"}
    with pytest.raises(ConfigError, match="SESSION_SECRET"), included(settings):
        pass
