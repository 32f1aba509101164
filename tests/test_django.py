"""Django with ``SESSION_ENGINE = "wsgisession.frameworks.django"``: request.session, django.contrib.auth,
the messages framework, expiry, the async methods and clearsessions, on the real stores; what it does better
than Django's own backends (per-key merge, hashed store keys); and the example app, examples/django_app.py.

Django is configured once for the process, in django_settings.py; each test puts the engine on a store of its
own with ``set_core()``.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import django_settings  # noqa: F401 - configures Django before anything of it is used
import pytest
import redis
import webtest
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import authenticate, login, logout
from django.contrib.auth.models import User
from django.contrib.sessions.backends.db import SessionStore as DatabaseSession
from django.core.handlers.wsgi import WSGIHandler
from django.core.management import call_command
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.test import Client, override_settings
from django.urls import path
from servers import SECRET, RedisServer, free_port, pg_sql, require_postgres, require_redis, unique

from wsgisession import ConfigError, SessionCore, SessionMiddleware, SessionStore, SessionValueError, Settings
from wsgisession.frameworks import django as engine
from wsgisession.stores.redis import RedisStore
from wsgisession.stores.sqlite import SQLiteStore

STORE_KINDS = ["memory", "sqlite", "postgres", "redis"]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SIGNED = re.compile(r"[\w-]{43}\.\d+\.[\w-]{43}")  # id, creation time, signature
OTHER_SECRET = "another-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
WEEK = 7 * 86400  # the default absolute timeout

# -- the application under test ---------------------------------------------------------

MEANWHILE: list[Callable[[], None]] = []  # what happens elsewhere while /set runs


def api(request: HttpRequest) -> JsonResponse:
    user = request.user.get_username() if request.user.is_authenticated else None
    return JsonResponse({"user": user, "data": dict(request.session.items())})


def set_value(request: HttpRequest) -> HttpResponse:
    request.session.get("start")  # the request reads its session,
    for event in MEANWHILE:  # something happens elsewhere meanwhile,
        event()
    request.session[request.POST["key"]] = json.loads(request.POST["value"])  # and it writes
    return HttpResponse("ok")


def login_view(request: HttpRequest) -> HttpResponse:
    user = authenticate(request, username=request.POST["username"], password=request.POST["password"])
    if user is None:
        return HttpResponse("no", status=403)
    login(request, user)
    return HttpResponse("ok")


def logout_view(request: HttpRequest) -> HttpResponse:
    logout(request)
    return HttpResponse("ok")


def expiry(request: HttpRequest) -> JsonResponse:
    if "seconds" in request.POST:
        request.session.set_expiry(int(request.POST["seconds"]))
    session = request.session
    return JsonResponse({"age": session.get_expiry_age(), "at_close": session.get_expire_at_browser_close()})


def add_message(request: HttpRequest) -> HttpResponse:
    messages.info(request, request.POST["text"])
    return HttpResponse("ok")


def read_messages(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"messages": [str(message) for message in messages.get_messages(request)]})


def untouched(request: HttpRequest) -> HttpResponse:
    return HttpResponse("no session here")


urlpatterns = [
    path("api", api),
    path("set", set_value),
    path("login", login_view),
    path("logout", logout_view),
    path("expiry", expiry),
    path("message", add_message),
    path("messages", read_messages),
    path("untouched", untouched),
]

# -- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def urls() -> Iterator[None]:
    with override_settings(ROOT_URLCONF=__name__):
        yield


@pytest.fixture(autouse=True)
def fresh_engine() -> Iterator[None]:
    """No test inherits another's core, nor its MEANWHILE events."""
    yield
    engine.set_core(None)
    MEANWHILE.clear()


@pytest.fixture(scope="module")
def users() -> None:
    """Django's tables (for auth, and the db backend's control test), and two users."""
    call_command("migrate", verbosity=0)
    for name in ("alice", "bob"):
        if not User.objects.filter(username=name).exists():
            User.objects.create_user(name, password=f"{name}-password")


def use(store: SessionStore, secret: str = SECRET) -> SessionCore:
    """Serve the engine's sessions from ``store``."""
    core = SessionCore(Settings.load({}, secret=secret), store)
    engine.set_core(core)
    return core


@pytest.fixture(params=STORE_KINDS)
def core(request: pytest.FixtureRequest, make_store: Callable[..., SessionStore]) -> SessionCore:
    return use(make_store(request.param))


def client_with(value: str) -> Client:
    """A client that presents only this session cookie."""
    client = Client()
    client.cookies[settings.SESSION_COOKIE_NAME] = value
    return client


def session_cookie(response: HttpResponse) -> str:
    return response.cookies[settings.SESSION_COOKIE_NAME].value


def stored(core: SessionCore, value: str) -> dict[str, Any] | None:
    """What the store holds for the session this (genuine) cookie value names."""
    identity = core.identify([value])
    assert identity is not None
    record = core.store.load(identity.key)
    return None if record is None else record.data


def log_in(client: Client, name: str = "alice") -> HttpResponse:
    response = client.post("/login", {"username": name, "password": f"{name}-password"})
    assert response.status_code == 200
    return response


def store_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "wsgisession" and r.levelno >= logging.WARNING]


# -- Django's session API over each store -------------------------------------------------


def test_login_cycles_the_key_and_logout_flushes(core: SessionCore, users: None) -> None:
    session_id, created = core.format.new_id(), int(time.time()) - 1000  # an anonymous session, with a cart
    core.store.create(core.format.store_key(session_id), {"cart": '["apple"]'}, 3600)
    before = core.sign(session_id, created)
    browser = client_with(before)

    after = session_cookie(log_in(browser))
    assert after != before
    assert stored(core, before) is None  # the key a client had before login is dead
    assert client_with(before).get("/api").json() == {"user": None, "data": {}}
    assert browser.get("/api").json()["user"] == "alice"
    assert browser.get("/api").json()["data"]["cart"] == ["apple"]  # the data moved to the new key
    before_id, after_id = core.identify([before]), core.identify([after])
    assert before_id is not None and after_id is not None
    assert after_id.created == before_id.created  # the absolute lifetime runs on, as with regenerate()

    response = browser.post("/logout")
    cookie = response.cookies[settings.SESSION_COOKIE_NAME]
    assert cookie.value == "" and cookie["max-age"] == 0  # the browser drops it
    assert stored(core, after) is None
    assert client_with(after).get("/api").json() == {"user": None, "data": {}}


def test_logging_in_as_someone_else_flushes_the_session(core: SessionCore, users: None) -> None:
    browser = Client()
    alice = session_cookie(log_in(browser, "alice"))
    browser.post("/set", {"key": "cart", "value": '["apple"]'})
    bob = session_cookie(log_in(browser, "bob"))
    assert bob != alice and stored(core, alice) is None
    assert browser.get("/api").json()["data"].get("cart") is None  # alice's cart is not bob's
    assert browser.get("/api").json()["user"] == "bob"


def test_messages_round_trip_through_the_session(core: SessionCore) -> None:
    browser = Client()
    browser.post("/message", {"text": "Saved!"})
    value = browser.cookies[settings.SESSION_COOKIE_NAME].value
    assert "_messages" in (stored(core, value) or {})
    assert browser.get("/messages").json() == {"messages": ["Saved!"]}
    assert browser.get("/messages").json() == {"messages": []}  # shown once
    assert "_messages" not in (stored(core, value) or {})


def test_set_expiry_sets_the_cookie_and_the_stored_lifetime(core: SessionCore) -> None:
    browser = Client()
    response = browser.post("/expiry", {"seconds": 600})
    assert response.json() == {"age": 600, "at_close": False}
    value = session_cookie(response)
    assert response.cookies[settings.SESSION_COOKIE_NAME]["max-age"] == 600
    identity = core.identify([value])
    assert identity is not None
    record = core.store.load(identity.key)
    assert record is not None and abs(record.expires - (time.time() + 600)) < 5

    response = browser.post("/expiry", {"seconds": 0})  # until the browser closes
    assert response.json() == {"age": settings.SESSION_COOKIE_AGE, "at_close": True}
    cookie = response.cookies[settings.SESSION_COOKIE_NAME]
    assert cookie.value == value and cookie["max-age"] == "" and cookie["expires"] == ""  # a browser-session cookie
    record = core.store.load(identity.key)
    # The store keeps it SESSION_COOKIE_AGE (two weeks), capped by the absolute timeout (a week).
    assert record is not None and abs(record.expires - (identity.created + WEEK)) < 5


def test_expire_at_browser_close_gives_browser_session_cookies(core: SessionCore) -> None:
    with override_settings(SESSION_EXPIRE_AT_BROWSER_CLOSE=True):
        response = Client().post("/set", {"key": "a", "value": "1"})
    cookie = response.cookies[settings.SESSION_COOKIE_NAME]
    assert SIGNED.fullmatch(cookie.value) and cookie["max-age"] == "" and cookie["expires"] == ""
    assert stored(core, cookie.value) == {"a": 1}


def test_the_absolute_timeout_caps_djangos_expiry(make_store: Callable[..., SessionStore]) -> None:
    core = use(make_store("memory"))
    session_id, created = core.format.new_id(), int(time.time()) - WEEK + 100  # 100 s of its lifetime left
    core.store.create(core.format.store_key(session_id), {"a": "1"}, 100)
    browser = client_with(core.sign(session_id, created))
    response = browser.post("/expiry", {"seconds": 3600})
    assert response.json()["age"] == 3600  # what Django asked for, and put in its cookie
    record = core.store.load(core.format.store_key(session_id))
    assert record is not None and record.expires - time.time() < 101  # what the store keeps

    past = client_with(core.sign(session_id, created - 101))  # past its absolute lifetime: no session
    assert past.get("/api").json() == {"user": None, "data": {}}


def test_saving_every_request_extends_an_unchanged_session(core: SessionCore) -> None:
    browser = Client()
    value = session_cookie(browser.post("/set", {"key": "a", "value": "1"}))
    identity = core.identify([value])
    assert identity is not None
    core.store.touch(identity.key, 30)  # as if it had been idle for most of its life
    browser.get("/api")  # Django saves only a modified session,
    record = core.store.load(identity.key)
    assert record is not None and record.expires - time.time() < 31
    with override_settings(SESSION_SAVE_EVERY_REQUEST=True):  # unless told to save them all:
        response = browser.get("/api")  # an unchanged save touches it
    assert session_cookie(response) == value
    record = core.store.load(identity.key)
    assert record is not None and record.expires - time.time() > WEEK - 60
    assert record.data == {"a": 1}


def test_the_async_methods(core: SessionCore) -> None:
    async def scenario() -> None:
        session = engine.SessionStore()
        await session.aset("a", 1)
        await session.asave()
        first = session.session_key
        assert await session.aexists(first)

        other = engine.SessionStore(first)
        assert await other.aload() == {"a": 1}
        assert await other.aget("a") == 1
        await other.acycle_key()
        second = other.session_key
        assert second != first and not await other.aexists(first) and await other.aexists(second)
        await other.aset("b", 2)
        await other.aset_expiry(600)
        assert await other.aget_expiry_age() == 600
        await other.asave()
        assert await engine.SessionStore(second).aitems() == {"a": 1, "b": 2, "_session_expiry": 600}.items()

        await other.adelete()
        assert not await other.aexists(second)
        fresh = engine.SessionStore()
        await fresh.aset("c", 3)
        await fresh.acreate()
        assert await fresh.aexists(fresh.session_key)
        await fresh.aflush()
        assert fresh.session_key is None

    asyncio.run(scenario())


def test_clearsessions_deletes_the_expired_sessions(core: SessionCore) -> None:
    live = engine.SessionStore()
    live["a"] = 1
    live.save()
    expired = engine.SessionStore()
    expired["b"] = 2
    expired.save()
    identity = core.identify([expired.session_key])
    assert identity is not None
    core.store.touch(identity.key, 0.05)
    time.sleep(0.1)
    call_command("clearsessions")
    assert core.store.cleanup() == 0  # nothing expired was left for it
    assert stored(core, live.session_key) == {"a": 1}


def test_an_expiry_in_the_past_ends_the_session(core: SessionCore) -> None:
    session = engine.SessionStore()
    session["a"] = 1
    session.save()
    again = engine.SessionStore(session.session_key)
    again.set_expiry(timedelta(seconds=-10))
    again.save()
    assert stored(core, session.session_key) is None


def test_clear_empties_the_stored_session_unread(core: SessionCore) -> None:
    session = engine.SessionStore()
    session.update({"a": 1, "b": 2})
    session.save()
    cleared = engine.SessionStore(session.session_key)
    cleared.clear()  # Django's clear() does not read the session first
    cleared["c"] = 3
    cleared.save()
    assert dict(engine.SessionStore(session.session_key).items()) == {"c": 3}


def test_djangos_test_client_logs_in_and_edits_the_session(core: SessionCore, users: None) -> None:
    """What a project's own tests do: Client.login(), force_login(), .session, logout()."""
    browser = Client()
    assert browser.login(username="alice", password="alice-password")
    assert browser.get("/api").json()["user"] == "alice"
    session = browser.session
    session["theme"] = "dark"
    session.save()
    assert browser.get("/api").json()["data"]["theme"] == "dark"
    value = browser.cookies[settings.SESSION_COOKIE_NAME].value
    browser.logout()
    assert stored(core, value) is None
    browser.force_login(User.objects.get(username="bob"))
    assert browser.get("/api").json()["user"] == "bob"


def test_the_express_cookie_format_works_too(make_store: Callable[..., SessionStore]) -> None:
    store = make_store("redis")
    core = SessionCore(Settings.load({}, secret=SECRET, format="express"), store)
    engine.set_core(core)
    response = Client().post("/set", {"key": "a", "value": "1"})
    value = session_cookie(response)
    identity = core.identify([value])
    assert value.startswith("s%3A") and identity is not None and identity.key == identity.id  # keyed by the id
    assert client_with(value).get("/api").json() == {"user": None, "data": {"a": 1}}


# -- unlike Django's backends ------------------------------------------------------------


def test_concurrent_requests_keep_each_others_changes(core: SessionCore) -> None:
    assert one_session_two_requests(engine.SessionStore) == {"start": 1, "a": "from a", "b": "from b"}


def test_djangos_db_backend_loses_one_of_them(users: None) -> None:
    """The control: the same two requests on Django's own db backend lose the first one's change."""
    assert one_session_two_requests(DatabaseSession) == {"start": 1, "b": "from b"}


def one_session_two_requests(backend: Any) -> dict[str, Any]:
    """Two requests load one session, each changes a key of its own, and each saves: what is left."""
    session = backend()
    session["start"] = 1
    session.save()
    first, second = backend(session.session_key), backend(session.session_key)
    assert first["start"] == second["start"] == 1
    first["a"] = "from a"
    second["b"] = "from b"
    first.save()
    second.save()
    left = dict(backend(session.session_key).items())
    session.delete()
    return left


def test_a_deletion_merges_too(core: SessionCore) -> None:
    session = engine.SessionStore()
    session.update({"a": 1, "b": 2})
    session.save()
    first, second = engine.SessionStore(session.session_key), engine.SessionStore(session.session_key)
    del first["a"]
    second["c"] = 3
    first.save()
    second.save()
    assert dict(engine.SessionStore(session.session_key).items()) == {"b": 2, "c": 3}


def test_a_session_logged_out_meanwhile_is_not_brought_back(core: SessionCore, users: None) -> None:
    browser = Client(raise_request_exception=False)
    value = session_cookie(log_in(browser))
    MEANWHILE.append(lambda: client_with(value).post("/logout"))  # another tab logs out
    response = browser.post("/set", {"key": "a", "value": "1"})
    assert response.status_code == 400  # Django's SessionInterrupted
    assert stored(core, value) is None
    assert client_with(value).get("/api").json() == {"user": None, "data": {}}


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_store_keys_are_hashes_not_the_cookies_key(kind: str, make_store: Callable[..., SessionStore]) -> None:
    table, prefix = unique("sess"), unique("test") + ":"
    core = use(make_store(kind, table=table) if kind == "postgres" else make_store(kind, prefix=prefix))
    value = session_cookie(Client().post("/set", {"key": "a", "value": '"hello"'}))
    session_id = value.split(".")[0]
    if kind == "redis":
        client = redis.Redis.from_url(require_redis())
        names = [name.decode() for name in client.keys(prefix + "*")]
        contents = str(names) + str(client.hgetall(names[0]))
        client.close()
        assert names == [prefix + hashlib.sha256(session_id.encode()).hexdigest()]
    else:
        contents = str(pg_sql(require_postgres(), f"SELECT * FROM {table}"))
        assert hashlib.sha256(session_id.encode()).hexdigest() in contents
    assert "hello" in contents
    assert session_id not in contents and value not in contents
    assert stored(core, value) == {"a": "hello"}


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_forged_or_tampered_cookie_is_never_adopted(kind: str, make_store: Callable[..., SessionStore]) -> None:
    core = use(make_store(kind))
    genuine = session_cookie(Client().post("/set", {"key": "owner", "value": '"alice"'}))
    session_id, created, signature = genuine.split(".")
    forged = [
        f"{session_id}.{created}.{signature[:-1]}{'A' if signature[-1] != 'A' else 'B'}",  # signature altered
        f"{session_id}.{int(created) + 86400}.{signature}",  # lifetime extended
        SessionCore(Settings.load({}, secret=OTHER_SECRET), core.store).sign(session_id, int(created)),  # other key
        "a-key-the-client-chose-itself",
    ]
    for value in forged:
        client = client_with(value)
        assert client.get("/api").json() == {"user": None, "data": {}}, value
        fresh = session_cookie(client.post("/set", {"key": "a", "value": "1"}))
        assert fresh != value and not fresh.startswith(session_id)  # a new session, its own id
        assert stored(core, fresh) == {"a": 1}
    assert stored(core, genuine) == {"owner": "alice"}  # the genuine session untouched


def test_values_must_be_json(make_store: Callable[..., SessionStore]) -> None:
    use(make_store("memory"))
    session = engine.SessionStore()
    with pytest.raises(SessionValueError, match="'when'"):
        session["when"] = datetime.now()  # at the line that stored it
    with pytest.raises(SessionValueError, match="str"):
        session[1] = "one"  # type: ignore[index]
    session["pair"] = (1, 2)  # as with Django's JSONSerializer, a tuple comes back a list
    session.save()
    assert engine.SessionStore(session.session_key)["pair"] == [1, 2]
    session.update({"later": datetime.now()})  # update() skips __setitem__: the save refuses it
    with pytest.raises(SessionValueError, match="'later'"):
        session.save()


# -- a store outage degrades --------------------------------------------------------------


@pytest.fixture
def outage(private_redis: RedisServer, make_store: Callable[..., SessionStore], users: None) -> SimpleNamespace:
    """A browser logged in on a Redis of the test's own; ``begin()`` kills the server (its data snapshotted
    first), ``end()`` restarts it with that data."""
    core = use(make_store("redis", url=private_redis.url))
    browser = Client()
    value = session_cookie(log_in(browser))

    def begin() -> None:
        private_redis.save()
        private_redis.kill()

    return SimpleNamespace(core=core, browser=browser, value=value, begin=begin, end=private_redis.start)


def test_an_outage_gives_an_empty_session_and_no_500(outage: SimpleNamespace, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="wsgisession")
    outage.browser.post("/set", {"key": "a", "value": "1"})
    outage.begin()
    response = outage.browser.get("/api")
    assert response.status_code == 200 and response.json() == {"user": None, "data": {}}
    assert any("failed while loading" in message for message in store_warnings(caplog))
    response = outage.browser.post("/set", {"key": "a", "value": "2"})
    assert response.status_code == 200  # not a 500; the change is lost, as said in the log
    assert session_cookie(response) == outage.value  # the user keeps the cookie of the session
    outage.end()
    assert outage.browser.get("/api").json() == {"user": "alice", "data": stored(outage.core, outage.value)}
    assert stored(outage.core, outage.value)["a"] == 1  # nothing was overwritten


def test_a_failing_save_is_logged_not_a_500(outage: SimpleNamespace, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="wsgisession")
    MEANWHILE.append(outage.begin)  # the store goes down between the read and the save
    response = outage.browser.post("/set", {"key": "a", "value": "1"})
    assert response.status_code == 200
    assert any("failed while saving" in message for message in store_warnings(caplog))
    outage.end()
    assert "a" not in (stored(outage.core, outage.value) or {})
    assert outage.browser.get("/api").json()["user"] == "alice"


def test_a_session_that_failed_to_load_is_not_saved(outage: SimpleNamespace) -> None:
    """Read as empty during a blip, then saved once the store is back, it would erase the stored session."""
    outage.begin()
    MEANWHILE.append(outage.end)  # the store is back before the save
    assert outage.browser.post("/set", {"key": "a", "value": "1"}).status_code == 200
    data = stored(outage.core, outage.value)
    assert data is not None and "a" not in data and "_auth_user_id" in data
    assert outage.browser.get("/api").json()["user"] == "alice"


def test_a_request_that_does_not_touch_the_session_makes_no_store_round_trip(
    outage: SimpleNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="wsgisession")
    outage.begin()  # any round trip would fail, and be logged
    response = outage.browser.get("/untouched")
    assert response.status_code == 200 and response.cookies == {}
    assert "Vary" not in response
    assert store_warnings(caplog) == []
    outage.browser.get("/api")  # the control: this one reads the session
    assert store_warnings(caplog) != []


# -- settings ------------------------------------------------------------------------------


@pytest.fixture
def from_settings() -> Iterator[Callable[[], SessionCore]]:
    """The engine's core built from the settings (as in production), closed afterwards."""
    built: list[SessionCore] = []

    def build() -> SessionCore:
        engine.set_core(None)
        built.append(engine.get_core())
        return built[-1]

    yield build
    for core in built:
        core.store.close()


def test_the_secret_is_djangos_with_its_fallbacks(from_settings: Callable[[], SessionCore]) -> None:
    rotated = {"SECRET_KEY": SECRET, "SECRET_KEY_FALLBACKS": [OTHER_SECRET], "WSGISESSION": {"SESSION_STORE": "memory"}}
    with override_settings(**rotated):
        core = from_settings()
        assert core.settings.secrets == (SECRET, OTHER_SECRET)
        old = SessionCore(Settings.load({}, secret=OTHER_SECRET), core.store)  # before the rotation
        engine.set_core(old)
        session = engine.SessionStore()
        session["a"] = 1
        session.save()
        engine.set_core(core)

        response = client_with(session.session_key).get("/api")  # signed with the old key: still valid,
        assert response.json() == {"user": None, "data": {"a": 1}}
        renewed = session_cookie(response)  # and signed anew with the current one
        current = SessionCore(Settings.load({}, secret=SECRET), core.store).identify([renewed])
        assert current is not None and current.id == session.session_key.split(".")[0]


def test_session_secret_comes_before_djangos(from_settings: Callable[[], SessionCore]) -> None:
    with override_settings(WSGISESSION={"SESSION_SECRET": OTHER_SECRET, "SESSION_STORE": "memory"}):
        assert from_settings().settings.secrets == (OTHER_SECRET,)


def test_a_weak_secret_key_is_refused_by_name(from_settings: Callable[[], SessionCore]) -> None:
    weak = override_settings(SECRET_KEY="django-insecure-short", WSGISESSION={"SESSION_STORE": "memory"})
    with weak, pytest.raises(ConfigError, match=r"SECRET_KEY.*too short"):
        from_settings()


def test_wsgisession_settings_come_before_the_environment(
    from_settings: Callable[[], SessionCore], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SESSION_STORE", "memory")
    monkeypatch.setenv("SESSION_ABSOLUTE_TIMEOUT", "3600000")
    with override_settings(WSGISESSION={"SESSION_STORE": "sqlite", "SESSION_SQLITE_PATH": str(tmp_path / "s.db")}):
        core = from_settings()
    assert isinstance(core.store, SQLiteStore) and core.settings.absolute_timeout == 3600


# -- one session, several front doors ----------------------------------------------------------


def raw_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """A plain WSGI app behind SessionMiddleware: POST logs in as the body, GET shows the session."""
    session = environ["session"]
    if environ["REQUEST_METHOD"] == "POST":
        session.regenerate()
        session["user"] = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"])).decode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(dict(session)).encode()]


def test_one_login_serves_a_raw_wsgi_app_and_django(make_store: Callable[..., SessionStore]) -> None:
    store = make_store("redis")
    core = use(store)
    raw = webtest.TestApp(SessionMiddleware(raw_app, store, secret=SECRET))
    value = raw.post("/", "alice").headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    with override_settings(SESSION_COOKIE_NAME=core.settings.cookie_name):  # one cookie name for both
        django = client_with(value)
        assert django.get("/api").json() == {"user": None, "data": {"user": "alice"}}
        django.post("/set", {"key": "theme", "value": '"dark"'})
    assert raw.get("/").json == {"user": "alice", "theme": "dark"}


# -- the example app: examples/django_app.py --------------------------------------------------


def is_session_setting(variable: str) -> bool:
    return variable.startswith("SESSION_") or variable in ("REDIS_URL", "DATABASE_URL")


def load_example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import examples/django_app.py as a new module: it builds its store from the current environment."""
    spec = importlib.util.spec_from_file_location("example_django_app", EXAMPLES / "django_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its ROOT_URLCONF is its own name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["sqlite", "redis"])
def example(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """The example's settings, URLs and views, on the default store (an SQLite file) or Redis."""
    for variable in filter(is_session_setting, list(os.environ)):
        monkeypatch.delenv(variable)
    monkeypatch.setenv("SESSION_SECRET", SECRET)
    monkeypatch.setenv("SESSION_SQLITE_PATH", str(tmp_path / "sessions.sqlite3"))
    monkeypatch.setenv("SESSION_CLEANUP_INTERVAL", "0")
    if request.param == "redis":
        monkeypatch.setenv("REDIS_URL", require_redis())
        monkeypatch.setenv("SESSION_REDIS_PREFIX", unique("example") + ":")
    engine.set_core(None)
    module = load_example(monkeypatch)
    store = engine.get_core().store
    try:
        # Django is configured already in this process: the example's settings go over the tests'.
        with override_settings(**module.SETTINGS):
            yield webtest.TestApp(WSGIHandler())
    finally:
        if isinstance(store, RedisStore):
            store.clear()
        store.close()


def example_login(browser: webtest.TestApp, name: str) -> webtest.TestResponse:
    form = next(form for form in browser.get("/").forms.values() if form.action == "/login")
    form["username"] = name
    response = form.submit()
    assert response.status_int == 303 and response.headers["Location"] == "/"
    return response


def example_post(browser: webtest.TestApp, action: str) -> webtest.TestResponse:
    form = next(form for form in browser.get("/").forms.values() if form.action == action)
    return form.submit()


def session_headers(response: webtest.TestResponse) -> list[str]:
    """The response's Set-Cookie headers for the session cookie."""
    return [h.strip() for h in response.headers.getall("Set-Cookie") if h.strip().startswith("session=")]


def example_cookie(response: webtest.TestResponse) -> str:
    [header] = session_headers(response)
    return header.split(";")[0].split("=", 1)[1]


def example_with(browser: webtest.TestApp, value: str) -> Any:
    return webtest.TestApp(browser.app).get("/api/session", headers={"Cookie": f"session={value}"}).json


def test_example_store_is_the_one_configured(example: webtest.TestApp, tmp_path: Path) -> None:
    store = engine.get_core().store
    if isinstance(store, SQLiteStore):
        assert Path(store.path) == tmp_path / "sessions.sqlite3"
    else:
        assert isinstance(store, RedisStore)


def test_example_pages_that_create_no_session_set_no_session_cookie(example: webtest.TestApp) -> None:
    home = example.get("/")
    assert 'action="/login"' in home.text and "Count: 0" in home.text
    assert not session_headers(home)
    assert "Cookie" in home.headers["Vary"]
    assert example.get("/api/session").json == {"user": None, "count": 0}
    assert "session" not in example.cookies
    assert webtest.TestApp(example.app).get("/api/session", headers={"Cookie": "session=forged"}).json == {
        "user": None,
        "count": 0,
    }


def test_example_login_sets_a_hardened_cookie_and_a_message(example: webtest.TestApp) -> None:
    response = example_login(example, "alice")
    [header] = session_headers(response)
    assert SIGNED.fullmatch(example_cookie(response))
    attributes = header.lower()
    assert "httponly" in attributes and "samesite=lax" in attributes and "max-age=86400" in attributes
    home = example.get("/")
    assert "Welcome, alice!" in home.text and "Logged in as <b>alice</b>" in home.text
    assert "Welcome" not in example.get("/").text  # a message is shown once
    assert example.get("/api/session").json == {"user": "alice", "count": 0}


def test_example_counter_and_login_regenerating_the_key(example: webtest.TestApp) -> None:
    before = example_cookie(example_post(example, "/counter"))
    assert example.get("/api/session").json == {"user": None, "count": 1}
    after = example_cookie(example_login(example, "alice"))
    assert after != before
    assert example_with(example, before) == {"user": None, "count": 0}
    assert example_with(example, after) == {"user": "alice", "count": 1}
    example_post(example, "/counter")
    assert "Count: 2" in example.get("/").text


def test_example_logout_ends_the_session_for_every_copy(example: webtest.TestApp) -> None:
    value = example_cookie(example_login(example, "alice"))
    response = example_post(example, "/logout")
    assert response.status_int == 303
    [header] = session_headers(response)
    assert 'session=""' in header and "Max-Age=0" in header
    assert example.get("/api/session").json == {"user": None, "count": 0}
    assert example_with(example, value) == {"user": None, "count": 0}


def test_example_runs_as_a_script_and_says_which_store(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not is_session_setting(k)}
    env.update(SESSION_SECRET=SECRET, SESSION_CLEANUP_INTERVAL="0", PORT=str(port))
    process = subprocess.Popen([sys.executable, str(EXAMPLES / "django_app.py")], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == f"Serving on http://127.0.0.1:{port}"
        home, page = request(port, "GET", "/")
        csrf_cookie = home.getheader("Set-Cookie", "").split(";")[0]
        found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
        assert found is not None
        body = f"username=carol&csrfmiddlewaretoken={found.group(1)}"
        response, _ = request(port, "POST", "/login", body, {"Cookie": csrf_cookie})
        assert response.status == 303
        cookie = next(v for k, v in response.getheaders() if k == "Set-Cookie" and v.startswith("session="))
        _, api = request(port, "GET", "/api/session", headers={"Cookie": cookie.split(";")[0]})
        assert json.loads(api) == {"user": "carol", "count": 0}
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=10)
    assert "Using the embedded SQLite session store" in errors
    assert (tmp_path / "wsgisession.sqlite3").exists()


def request(
    port: int, method: str, url: str, body: str | None = None, headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPResponse, str]:
    """One request to the example's server, on a connection of its own: the response and its body."""
    headers = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, url, body, headers)
        response = connection.getresponse()
        return response, response.read().decode()
    finally:
        connection.close()
