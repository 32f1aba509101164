"""A Django project switching SESSION_ENGINE from one of Django's own engines to ours, with
``SESSION_MIGRATE_FROM`` naming the previous one: every cookie of before still names its session, read
there once, then kept in ours; nobody is logged out.

The previous engines run on real servers: db and cached_db on PostgreSQL (a schema of this process's own,
see django_settings.py, which a router sends Django's sessions app to), cache and cached_db on a private
redis-server through Django's own RedisCache. Our engine keeps its sessions in the shared Redis, under a
private prefix.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from importlib import import_module
from typing import Any

import django_settings
import pytest
import redis
from django.conf import settings
from django.contrib.auth import authenticate, login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.contrib.sessions.models import Session
from django.core import signing
from django.core.management import call_command
from django.db import connections
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import path
from django.utils import timezone
from servers import SECRET, RedisServer, pg_sql, require_postgres, require_redis, running, unique

from wsgisession import ConfigError, SessionCore
from wsgisession.frameworks import django as engine

OURS = "wsgisession.frameworks.django"
ENGINES = [f"django.contrib.sessions.backends.{name}" for name in ("db", "cache", "cached_db", "signed_cookies")]
USERS = ("alice", "bob", "carol")
SIGNED = re.compile(r"[\w-]{43}\.\d+\.[\w-]{43}")  # our cookie: id, creation time, signature
SIGNED_COOKIES_SALT = "django.contrib.sessions.backends.signed_cookies"

# -- the application ----------------------------------------------------------------------


@login_required
def whoami(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"user": request.user.get_username(), "cart": request.session.get("cart")})


def api(request: HttpRequest) -> JsonResponse:
    user = request.user.get_username() if request.user.is_authenticated else None
    return JsonResponse({"user": user, "data": dict(request.session.items())})


def set_cart(request: HttpRequest) -> HttpResponse:
    request.session["cart"] = json.loads(request.POST["cart"])
    if "expiry" in request.POST:
        request.session.set_expiry(int(request.POST["expiry"]))
    return HttpResponse("ok")


def login_view(request: HttpRequest) -> HttpResponse:
    user = authenticate(request, username=request.POST["username"], password=request.POST["password"])
    assert user is not None
    login(request, user)
    return HttpResponse("ok")


def untouched(request: HttpRequest) -> HttpResponse:
    return HttpResponse("no session here")


urlpatterns = [
    path("whoami", whoami),
    path("api", api),
    path("cart", set_cart),
    path("login", login_view),
    path("untouched", untouched),
]


class SessionsRouter:
    """Django's sessions app (the db and cached_db engines' table) on the database ``alias``."""

    def __init__(self, alias: str) -> None:
        self.alias = alias

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        return self.alias if model._meta.app_label == "sessions" else None

    db_for_write = db_for_read


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_server() -> Iterator[RedisServer]:
    """The redis-server of Django's cache (for the cache and cached_db engines), this module's own."""
    with running(RedisServer()) as server:
        yield server


@pytest.fixture(scope="module", autouse=True)
def project(cache_server: RedisServer) -> Iterator[None]:
    """The project's URLs, its users, and where Django's engines keep sessions: the sessions table on
    PostgreSQL (in a schema of its own, dropped afterwards), the cache on the private redis-server."""
    url = require_postgres()
    pg_sql(url, f"CREATE SCHEMA {django_settings.SESSIONS_SCHEMA}")
    call_command("migrate", verbosity=0)  # auth's tables, in the default database
    for name in USERS:
        if not User.objects.filter(username=name).exists():
            User.objects.create_user(name, password=f"{name}-password")
    cache = {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": cache_server.url}
    try:
        with connections[django_settings.SESSIONS_DATABASE].schema_editor() as editor:
            editor.create_model(Session)
        with override_settings(
            ROOT_URLCONF=__name__,
            ALLOWED_HOSTS=["testserver"],  # login_required builds an absolute URL
            DATABASE_ROUTERS=[SessionsRouter(django_settings.SESSIONS_DATABASE)],
            CACHES={"default": cache},
        ):
            yield
    finally:
        connections[django_settings.SESSIONS_DATABASE].close()
        pg_sql(url, f"DROP SCHEMA {django_settings.SESSIONS_SCHEMA} CASCADE")


@pytest.fixture(autouse=True)
def fresh(cache_server: RedisServer) -> Iterator[None]:
    """No test sees another's sessions, nor its engine."""
    yield
    engine.set_core(None)
    Session.objects.all().delete()
    with redis.Redis.from_url(cache_server.url) as client:
        client.flushdb()  # the module's own server


@contextlib.contextmanager
def ours(previous: str | None, **more: str) -> Iterator[SessionCore]:
    """The project switched to our engine (its store the shared Redis, on a private prefix), with
    SESSION_MIGRATE_FROM naming ``previous`` (None: not set)."""
    prefix = unique("dj") + ":"
    wanted = {"SESSION_STORE": "redis", "REDIS_URL": require_redis(), "SESSION_REDIS_PREFIX": prefix, **more}
    if previous is not None:
        wanted["SESSION_MIGRATE_FROM"] = previous
    with override_settings(SESSION_ENGINE=OURS, WSGISESSION=wanted):
        engine.set_core(None)
        core = engine.get_core()
        try:
            yield core
        finally:
            engine.set_core(None)
            core.store.close()
            with redis.Redis.from_url(require_redis()) as client:  # its sessions, and users' lists
                for name in client.scan_iter(prefix + "*", count=1000):
                    client.unlink(name)


def logged_in(previous: str, names: tuple[str, ...] = USERS, **posted: Any) -> dict[str, str]:
    """Each user logged in under the ``previous`` engine, with a cart in the session: their cookies.
    The first logs in through a view (authenticate, login), the others with the test client."""
    cookies = {}
    with override_settings(SESSION_ENGINE=previous):
        for name in names:
            browser = Client()
            if name == names[0]:
                browser.post("/login", {"username": name, "password": f"{name}-password"})
            else:
                browser.force_login(User.objects.get(username=name))
            assert browser.post("/cart", {"cart": json.dumps([name]), **posted}).status_code == 200
            assert browser.get("/whoami").json() == {"user": name, "cart": [name]}
            cookies[name] = browser.cookies[settings.SESSION_COOKIE_NAME].value
    return cookies


def client_with(value: str) -> Client:
    """A browser that presents this session cookie."""
    client = Client()
    client.cookies[settings.SESSION_COOKIE_NAME] = value
    return client


def session_cookie(response: HttpResponse) -> str | None:
    cookie = response.cookies.get(settings.SESSION_COOKIE_NAME)
    return None if cookie is None else cookie.value


def held(previous: str, key: str) -> bool:
    """Whether the previous engine still holds a session under ``key`` (a signed cookie holds itself)."""
    return bool(import_module(previous).SessionStore(key).load())


def expires_in(core: SessionCore, value: str) -> float:
    """How long our store keeps the session this cookie value names."""
    identity = core.identify([value])
    assert identity is not None
    record = core.store.load(identity.key)
    assert record is not None
    return record.expires - time.time()


def cache_commands(client: redis.Redis) -> int:
    """How many commands the cache's redis-server has run (but INFO itself)."""
    return sum(stat["calls"] for name, stat in client.info("commandstats").items() if name != "cmdstat_info")


@contextlib.contextmanager
def previous_untouched(cache_server: RedisServer) -> Iterator[None]:
    """Asserts that the block sends the previous engines' database and cache nothing."""
    client = redis.Redis.from_url(cache_server.url)  # one connection: its handshake counted before
    before = cache_commands(client)
    with CaptureQueriesContext(connections[django_settings.SESSIONS_DATABASE]) as queries:
        yield
    assert queries.captured_queries == []
    assert cache_commands(client) == before
    client.close()


# -- every user stays logged in ------------------------------------------------------------------


@pytest.mark.parametrize("previous", ENGINES)
def test_every_user_stays_logged_in(previous: str, cache_server: RedisServer) -> None:
    cookies = logged_in(previous)
    signed = previous.endswith("signed_cookies")
    with ours(previous):
        for name, old in cookies.items():
            browser = client_with(old)
            response = browser.get("/untouched")  # a page that does not read the session
            assert session_cookie(response) is None  # leaves the cookie alone: it still names the session
            assert held(previous, old)

            response = browser.get("/whoami")
            assert response.status_code == 200
            assert response.json() == {"user": name, "cart": [name]}  # still logged in, with the cart
            new = session_cookie(response)
            assert new is not None and SIGNED.fullmatch(new)  # the response gives our cookie
            assert held(previous, old) == signed  # deleted there (a signed cookie cannot be)

            with previous_untouched(cache_server):  # from now on, ours alone
                assert browser.get("/whoami").json() == {"user": name, "cart": [name]}
                assert client_with(new).get("/whoami").json() == {"user": name, "cart": [name]}

            replayed = client_with(old).get("/whoami")  # the old cookie was read once: it names nothing now
            assert replayed.status_code == 302 and replayed["Location"].startswith(settings.LOGIN_URL)
            assert session_cookie(replayed) is None

            user = User.objects.get(username=name)
            [device] = engine.users().list(user.pk)  # in the user's sessions, as a login is
            assert abs(device.login - time.time()) < 5
            assert engine.users().end_all(user.pk) == 1
            assert client_with(new).get("/whoami").status_code == 302  # ended like any other


def age(previous: str, key: str, seconds: int) -> str:
    """The session's cookie once it is ``seconds`` older, where the engine keeps the time of its save:
    the database row's expiry, a signed cookie's timestamp; a cache keeps none."""
    if previous.endswith("signed_cookies"):
        payload = key.rsplit(":", 2)[0]  # signed anew, with a timestamp of then (as TimestampSigner.sign)
        then = signing.b62_encode(int(time.time()) - seconds)
        return signing.Signer.sign(signing.TimestampSigner(salt=SIGNED_COOKIES_SALT), f"{payload}:{then}")
    if previous.endswith("db"):
        Session.objects.filter(pk=key).update(expire_date=timezone.now() + timedelta(seconds=600 - seconds))
    return key


@pytest.mark.parametrize("previous", ENGINES)
def test_the_remaining_lifetime_is_kept(previous: str) -> None:
    """A session that had 300 s left has 300 s left (a cache says no time: its expiry age counts from now)."""
    [old] = logged_in(previous, ("alice",), expiry=600).values()
    aged = age(previous, old, 300)
    with ours(previous) as core:
        response = client_with(aged).get("/whoami")
        assert response.status_code == 200
        new = session_cookie(response)
        assert new is not None
        expected = 600 if previous.endswith(".cache") else 300
        assert abs(expires_in(core, new) - expected) < 5  # moved, and the response did not extend it
        assert client_with(new).post("/cart", {"cart": "[]"}).status_code == 200  # a later save extends it,
        assert abs(expires_in(core, new) - 600) < 5  # by the expiry age set under the previous engine


def test_the_absolute_timeout_caps_the_remaining_lifetime() -> None:
    [old] = logged_in(ENGINES[0], ("alice",)).values()  # two weeks left under Django's engine
    with ours(ENGINES[0], SESSION_ABSOLUTE_TIMEOUT="3600000") as core:  # an hour, in ms
        new = session_cookie(client_with(old).get("/whoami"))
        assert new is not None and abs(expires_in(core, new) - 3600) < 5


# -- what is not a session of before -----------------------------------------------------------------


@pytest.mark.parametrize("previous", ENGINES)
def test_without_the_setting_nothing_is_looked_up(previous: str, cache_server: RedisServer) -> None:
    cookies = logged_in(previous, ("alice",))
    with ours(None), previous_untouched(cache_server):
        response = client_with(cookies["alice"]).get("/whoami")
    assert response.status_code == 302  # logged out: the cost of switching without SESSION_MIGRATE_FROM
    assert held(previous, cookies["alice"])


@pytest.mark.parametrize("previous", ENGINES)
def test_an_unknown_key_gives_an_empty_session(previous: str) -> None:
    with ours(previous):
        for value in ("a-key-of-the-clients-own-choosing", "short", "x" * 200):
            browser = client_with(value)
            assert browser.get("/api").json() == {"user": None, "data": {}}
            response = browser.post("/cart", {"cart": "[1]"})  # a write starts a session of ours
            new = session_cookie(response)
            assert new is not None and SIGNED.fullmatch(new)
            assert browser.get("/api").json() == {"user": None, "data": {"cart": [1]}}


# -- the previous engine down -------------------------------------------------------------------------


def test_a_database_down_reads_as_empty_then_moves_once_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="wsgisession")
    [old] = logged_in(ENGINES[0], ("alice",)).values()
    with ours(ENGINES[0]):
        browser = client_with(old)
        with override_settings(DATABASE_ROUTERS=[SessionsRouter(django_settings.DOWN_DATABASE)]):
            response = browser.get("/api")
        assert response.status_code == 200 and response.json() == {"user": None, "data": {}}
        assert session_cookie(response) is None  # the cookie kept, for when the database is back
        warnings = [r.getMessage() for r in caplog.records if r.name == "wsgisession"]
        assert any("moving" in message and "backends.db failed" in message for message in warnings), warnings
        assert browser.get("/whoami").json() == {"user": "alice", "cart": ["alice"]}


def test_a_cache_down_reads_as_empty_then_moves_once_back(cache_server: RedisServer) -> None:
    """Django's cache engine reads a cache that fails as holding nothing: the cookie is kept all the same."""
    [old] = logged_in(ENGINES[1], ("alice",)).values()
    with ours(ENGINES[1]):
        browser = client_with(old)
        cache_server.save()
        cache_server.kill()
        try:
            response = browser.get("/api")
        finally:
            cache_server.start()
        assert response.status_code == 200 and response.json() == {"user": None, "data": {}}
        assert session_cookie(response) is None
        assert browser.get("/whoami").json() == {"user": "alice", "cart": ["alice"]}


# -- the setting ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["django.contrib.sessions.backends.nope", "json", OURS, "django.contrib.sessions.backends.base"]
)
def test_a_wrong_engine_name_stops_start_up(name: str) -> None:
    with override_settings(SESSION_ENGINE=OURS, WSGISESSION={"SESSION_STORE": "memory", "SESSION_MIGRATE_FROM": name}):
        engine.set_core(None)
        with pytest.raises(ConfigError, match=rf"SESSION_MIGRATE_FROM: '{re.escape(name)}' is not"):
            engine.get_core()


def test_a_store_url_is_left_to_the_core() -> None:
    url = "redis://127.0.0.1:6379/0"
    with override_settings(WSGISESSION={"SESSION_MIGRATE_FROM": url, "SESSION_SECRET": SECRET}):
        assert engine.previous_engine() is None
        assert getattr(engine.load_settings(), "migrate_from", url) == url
    with override_settings(WSGISESSION={"SESSION_MIGRATE_FROM": ENGINES[0], "SESSION_SECRET": SECRET}):
        assert getattr(engine.load_settings(), "migrate_from", None) is None  # the core never sees an engine
