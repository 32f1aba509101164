"""Encryption at rest (SESSION_ENCRYPTION_KEY, wsgisession/stores/encrypted.py).

- A corpus of known values, written through every front door (raw WSGI, Flask, Django, Pyramid, each
  configured its own way) on every store (Redis, PostgreSQL, SQLite, Redis+PostgreSQL): a dump of Redis,
  of the table and of the SQLite file holds none of them, raw, JSON-escaped or base64-encoded; they read
  back through the app; the names of the values, the expiry and the user binding stay readable.
- A sealed value swapped into another session, moved under another name, truncated, altered, or given
  another key's id reads as absent: no 500, one warning for many.
- Rotating keys, turning encryption on and off log nobody out; a rotation under gunicorn, under load,
  loses no increment.
- The settings refuse what cannot work; nonces never repeat, in a forked child neither; any JSON value
  round-trips (Hypothesis).
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import logging
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

import django_settings  # noqa: F401 - configures Django (process-global) before its imports
import flask
import pytest
import redis
import webtest
from django.core.handlers.wsgi import WSGIHandler
from django.http import HttpRequest, JsonResponse
from django.test import override_settings
from django.urls import path
from gunicorn_runner import gunicorn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pyramid.config import Configurator
from pyramid.interfaces import ISessionFactory
from servers import SECRET, drop_table, pg_sql, require_postgres, require_redis, unique
from test_cli import assert_one_line_error, run_cli
from test_failover import Browser

from wsgisession import ConfigError, MemoryStore, SessionMiddleware, SessionStore, Settings, SQLiteStore
from wsgisession.frameworks import django as engine
from wsgisession.frameworks.flask import init_app
from wsgisession.session import encode
from wsgisession.settings import NAMES
from wsgisession.signing import Signer, store_key
from wsgisession.stores import encrypted
from wsgisession.stores.base import USER_KEY, Changes
from wsgisession.stores.encrypted import MARK, Cipher, EncryptedStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

KEY1 = "encryption-key-one-0123456789-abcdefghijklmnopqrstuvwxyz"
KEY2 = "encryption-key-two-9876543210-ZYXWVUTSRQPONMLKJIHGFEDCBA"
KEY3 = "encryption-key-three-never-configured-qwertyuiopasdfghjkl"
COOKIE = "session"
USER = "user-4711"
CORPUS: dict[str, Any] = {
    "oauth_token": "ya29.a0AfB_byC7Qx9-Lq2mZrT4vWn8KpHs3JdEeYu5",
    "csrf_secret": "csrf-9f8e7d6c5b4a39281706f5e4d3c2b1a0",
    "email": "zoe.angstrom@example.org",
    "profile": {"display_name": "Zoë Ångström-Łukasiewicz 日本語", "address": {"city": "Reykjavík-Höfuðborg"}},
    "balance": 918273645,
    "recent": ["purchase-alpha-7731", "purchase-beta-8842", 31337271],
}

# -- a corpus written through every front door on every store ---------------------------------------


def leaves(value: Any) -> Iterator[Any]:
    """``value`` and every value (and dict key) nested in it."""
    yield value
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from leaves(item)


def forms(value: Any) -> set[bytes]:
    """How ``value`` and what it holds could show in a dump: the text itself, its JSON (escaped and
    not), and the base64 of each, at each of the three alignments a base64 stream may give it."""
    texts = set()
    for item in leaves(value):
        if isinstance(item, str):
            texts.add(item)
        texts |= {json.dumps(item), json.dumps(item, ensure_ascii=False), json.dumps(item, separators=(",", ":"))}
    found = set()
    for text in texts:
        raw = text.encode()
        found.add(raw)
        for shift in range(3):
            part = raw[shift:]
            found.add(base64.b64encode(part)[: len(part) // 3 * 4])
    return {form for form in found if len(form) >= 8}


def snapshot(session: Any) -> dict[str, Any]:
    """What the app reads back: the user the session is bound to, and the corpus."""
    binding = session.get(USER_KEY)
    return {"user": binding and binding["id"], **{name: session.get(name) for name in CORPUS}}


def raw_app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    session = environ["session"]
    if environ["PATH_INFO"] == "/write":
        session.login(USER)
        session.update(CORPUS)
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(snapshot(session)).encode()]


def flask_app(variables: dict[str, str]) -> flask.Flask:
    app = flask.Flask(__name__)
    app.config.update(variables)

    @app.post("/write")
    def write() -> Any:
        flask.session.login(USER)  # type: ignore[attr-defined]
        flask.session.update(CORPUS)
        return snapshot(flask.session)

    @app.get("/read")
    def read() -> Any:
        return snapshot(flask.session)

    init_app(app)
    return app


def django_write(request: HttpRequest) -> JsonResponse:
    request.session.cycle_key()
    request.session.bind(USER)  # type: ignore[attr-defined]
    request.session.update(CORPUS)
    return JsonResponse(snapshot(request.session))


def django_read(request: HttpRequest) -> JsonResponse:
    return JsonResponse(snapshot(request.session))


urlpatterns = [path("write", django_write), path("read", django_read)]


def pyramid_app(variables: dict[str, str]) -> Any:
    def write(request: Any) -> dict[str, Any]:
        request.session.login(USER)
        request.session.update(CORPUS)
        return snapshot(request.session)

    def read(request: Any) -> dict[str, Any]:
        return snapshot(request.session)

    ours = {"wsgisession." + name.lower().removeprefix("session_"): value for name, value in variables.items()}
    with Configurator(settings=ours) as config:
        config.include("wsgisession.frameworks.pyramid")
        for name, view in (("write", write), ("read", read)):
            config.add_route(name, f"/{name}")
            config.add_view(view, route_name=name, renderer="json")
        return config.make_wsgi_app()


@contextmanager
def front_door(door: str, variables: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[webtest.TestApp]:
    """The app of ``door``, configured as its users configure it (the environment, Flask's config,
    Django's settings.WSGISESSION, Pyramid's settings); its store closed afterwards."""
    if door == "raw":
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        middleware = SessionMiddleware(raw_app)
        yield webtest.TestApp(middleware)
        middleware.close()
    elif door == "flask":
        app = flask_app(variables)
        yield webtest.TestApp(app)
        app.session_interface.store.close()  # type: ignore[attr-defined]
    elif door == "django":
        with override_settings(ROOT_URLCONF=__name__, SESSION_COOKIE_NAME=COOKIE, WSGISESSION=variables):
            engine.set_core(None)
            yield webtest.TestApp(WSGIHandler())
            engine.get_core().store.close()
            engine.set_core(None)
    else:
        app = pyramid_app(variables)
        yield webtest.TestApp(app)
        app.registry.getUtility(ISessionFactory).close()


class Deployment:
    """A store of each kind on names of its own, as the environment names it; what a thief would dump of it."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind = kind
        self.variables = {"SESSION_SECRET": SECRET, "SESSION_CLEANUP_INTERVAL": "0"}
        self.prefix, self.table, self.path = unique("enc") + ":", unique("enc"), directory / "sessions.sqlite3"
        if kind in ("redis", "pair"):
            self.redis = redis.Redis.from_url(require_redis())
            self.variables |= {"REDIS_URL": require_redis(), "SESSION_REDIS_PREFIX": self.prefix}
        if kind in ("postgres", "pair"):
            self.variables |= {"DATABASE_URL": require_postgres(), "SESSION_TABLE": self.table}
        if kind == "sqlite":
            self.variables |= {"SESSION_STORE": "sqlite", "SESSION_SQLITE_PATH": str(self.path)}

    def dump(self) -> bytes:
        """Everything the store holds: every Redis key under the prefix (HGETALL, ZRANGE, DUMP), the
        table as text, the SQLite files' bytes."""
        parts = []
        if self.kind in ("redis", "pair"):
            for key in self.redis.scan_iter(match=self.prefix + "*"):
                parts.append(key)
                if self.redis.type(key) == b"hash":
                    parts.extend(itertools.chain.from_iterable(self.redis.hgetall(key).items()))
                else:
                    parts.extend(member for member, _ in self.redis.zrange(key, 0, -1, withscores=True))
                parts.append(self.redis.dump(key))
        if self.kind in ("postgres", "pair"):
            parts.extend(row[0].encode() for row in pg_sql(require_postgres(), f"SELECT t::text FROM {self.table} t"))
        if self.kind == "sqlite":
            parts.extend(p.read_bytes() for p in self.path.parent.glob(self.path.name + "*"))
        return b"\n".join(parts)

    def expires(self, key: str) -> list[float]:
        """The session's expiry as each store keeps it, readable without a key (Unix seconds)."""
        found = []
        if self.kind in ("redis", "pair"):
            found.append(time.time() + self.redis.pttl(self.prefix + key) / 1000)
        if self.kind in ("postgres", "pair"):
            statement = f"SELECT extract(epoch FROM expires_at)::float8 FROM {self.table} WHERE id = %s"
            found.append(pg_sql(require_postgres(), statement, (key,))[0][0])
        if self.kind == "sqlite":
            with sqlite3.connect(self.path) as conn:
                found.append(conn.execute("SELECT expires_at FROM wsgisession WHERE id = ?", (key,)).fetchone()[0])
        return found

    def close(self) -> None:
        if self.kind in ("redis", "pair"):
            keys = list(self.redis.scan_iter(match=self.prefix + "*"))
            if keys:
                self.redis.delete(*keys)
            self.redis.close()
        if self.kind in ("postgres", "pair"):
            drop_table(require_postgres(), self.table)


@pytest.fixture(autouse=True)
def no_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: none of this library's variables from the environment of the run."""
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(params=["redis", "postgres", "sqlite", "pair"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    made = Deployment(request.param, tmp_path)
    yield made
    made.close()


def cookie_and_key(response: webtest.TestResponse) -> tuple[str, str]:
    """The session cookie a response set (as the browser sends it back), and the session's store key."""
    for header in response.headers.getall("Set-Cookie"):
        name, _, value = header.strip().split(";", 1)[0].partition("=")
        found = Signer([SECRET]).unsign(value.strip('"')) if name == COOKIE else None
        if found is not None:
            return f"{COOKIE}={value}", store_key(found[0])
    raise AssertionError(f"no session cookie in {response.headers}")


@pytest.mark.parametrize("door", ["raw", "flask", "django", "pyramid"])
def test_a_dump_of_the_store_holds_none_of_the_values(
    deployment: Deployment, door: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with front_door(door, {**deployment.variables, "SESSION_ENCRYPTION_KEY": KEY1}, monkeypatch) as app:
        cookie, key = cookie_and_key(app.post("/write"))
        assert app.get("/read", headers={"Cookie": cookie}).json == {"user": USER, **CORPUS}
    dump = deployment.dump()
    for name, value in CORPUS.items():
        assert not [form for form in forms(value) if form in dump], name
        assert name.encode() in dump  # the names of the values stay readable
    assert USER_KEY.encode() in dump and USER.encode() in dump  # and the user binding
    for expires in deployment.expires(key):
        assert time.time() + 3600 < expires <= time.time() + 7 * 86400 + 5  # Flask: its 31 days, capped


def test_without_a_key_the_same_dumps_show_every_value(deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: what the dumps above look for is what they would find, were the values in the clear."""
    with front_door("raw", deployment.variables, monkeypatch) as app:
        app.post("/write")
    dump = deployment.dump()
    for name, value in CORPUS.items():
        assert [form for form in forms(value) if form in dump], name


# -- sealed values tampered with in the store -------------------------------------------------------


def values_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """POST /login (user), POST /set (k, v); GET /session: the session's user and values."""
    session = environ["session"]
    form = dict(pair.split("=", 1) for pair in environ["wsgi.input"].read().decode().split("&") if pair)
    route = environ["REQUEST_METHOD"], environ["PATH_INFO"]
    if route == ("POST", "/login"):
        session.login(form["user"])
    elif route == ("POST", "/set"):
        session[form["k"]] = form["v"]
    body = json.dumps({"user": session.user_id, **{k: v for k, v in session.items() if k != USER_KEY}}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


def middleware(store: SessionStore, keys: str | None, monkeypatch: pytest.MonkeyPatch) -> SessionMiddleware:
    """The app on ``store``, with SESSION_ENCRYPTION_KEY set to ``keys`` in the environment (None: unset)."""
    if keys is None:
        monkeypatch.delenv("SESSION_ENCRYPTION_KEY", raising=False)
    else:
        monkeypatch.setenv("SESSION_ENCRYPTION_KEY", keys)
    return SessionMiddleware(values_app, store, secret=SECRET)


def session(browser: Browser) -> dict[str, Any]:
    return dict(json.loads(browser.request("GET", "/session").body))


def user(app: SessionMiddleware, name: str, values: dict[str, str]) -> Browser:
    """A browser logged in as ``name`` that set ``values``."""
    browser = Browser(app)
    browser.request("POST", "/login", {"user": name})
    for k, v in values.items():
        browser.request("POST", "/set", {"k": k, "v": v})
    return browser


def stored(store: SessionStore, browser: Browser, name: str) -> Any:
    """The value ``name`` as the store holds it (a sealed value: its marked string)."""
    record = store.load(browser.key)
    assert record is not None
    return record.data.get(name)


def put(store: SessionStore, browser: Browser, name: str, value: Any) -> None:
    """Write ``value`` as the store's value ``name`` of the browser's session, behind the app's back."""
    assert store.update(browser.key, Changes({name: json.dumps(value)}), 3600)


def payload(value: str) -> bytes:
    return base64.b64decode(value[len(MARK) :])


def sealed(raw: bytes) -> str:
    return MARK + base64.b64encode(raw).decode()


def flipped(raw: bytes, position: int) -> bytes:
    return raw[:position] + bytes([raw[position] ^ 1]) + raw[position + 1 :]


def key_id(key: str) -> bytes:
    """The id a key writes in what it seals (read back from a value it sealed)."""
    return payload(json.loads(Cipher([key]).seal("k", "n", "1")))[:4]


TAMPERINGS: dict[str, Callable[[str], str]] = {
    "truncated by a base64 group": lambda v: v[:-4],
    "truncated by a character": lambda v: v[:-1],
    "truncated to its key id": lambda v: v[: len(MARK) + 8],
    "truncated to its mark": lambda v: v[: len(MARK)],
    "a base64 character changed": lambda v: v[:30] + ("A" if v[30] != "A" else "B") + v[31:],
    "a bit of the nonce flipped": lambda v: sealed(flipped(payload(v), 10)),
    "a bit of the ciphertext flipped": lambda v: sealed(flipped(payload(v), 20)),
    "a bit of the tag flipped": lambda v: sealed(flipped(payload(v), len(payload(v)) - 1)),
    "another configured key's id": lambda v: sealed(key_id(KEY2) + payload(v)[4:]),
    "an unknown key's id": lambda v: sealed(key_id(KEY3) + payload(v)[4:]),
    "not base64": lambda v: v[:20] + "*" + v[21:],
}


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_a_tampered_value_reads_as_absent(
    kind: str,
    make_store: Callable[..., SessionStore],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = make_store(kind)
    web = middleware(store, f"{KEY1},{KEY2}", monkeypatch)
    values = {name: f"value-of-{name}" for name in ["kept", "swapped", "moved", *TAMPERINGS]}
    ann, bob = user(web, "ann", values), user(web, "bob", {"swapped": "bob's own"})
    put(store, bob, "swapped", stored(store, ann, "swapped"))  # (a) into another session, same name
    put(store, ann, "moved", stored(store, ann, "kept"))  # (b) under another name, same session
    for name, tamper in TAMPERINGS.items():  # (c) truncated, (d) altered, (e) another key's id
        put(store, ann, name, tamper(stored(store, ann, name)))
    caplog.set_level(logging.WARNING, "wsgisession")
    for _ in range(10):
        assert session(ann) == {"user": "ann", "kept": "value-of-kept", "swapped": "value-of-swapped"}
        assert session(bob) == {"user": "bob"}
    refused = [r.getMessage() for r in caplog.records if "Ignoring the value" in r.getMessage()]
    assert len(refused) == 1, refused  # rate-limited: once for the 140 refusals
    assert "value-of" not in refused[0] and MARK not in refused[0]  # nor the value, nor its ciphertext
    ann.request("POST", "/set", {"k": "moved", "v": "written again"})  # the app's own write heals it
    assert session(ann)["moved"] == "written again"


# -- rotating keys, turning encryption on and off ----------------------------------------------------


def test_rotating_keys(make_store: Callable[..., SessionStore], monkeypatch: pytest.MonkeyPatch) -> None:
    store = make_store("postgres")
    ann = user(middleware(store, KEY1, monkeypatch), "ann", {"old": "1", "rewritten": "1"})
    assert Cipher([KEY1]).is_current(stored(store, ann, "old"))
    ann.app = middleware(store, f"{KEY2},{KEY1}", monkeypatch)  # KEY2 seals, KEY1 still opens
    assert session(ann) == {"user": "ann", "old": "1", "rewritten": "1"}
    ann.request("POST", "/set", {"k": "rewritten", "v": "2"})
    ann.request("POST", "/set", {"k": "new", "v": "2"})
    current = Cipher([KEY2])
    assert current.is_current(stored(store, ann, "rewritten")) and current.is_current(stored(store, ann, "new"))
    assert not current.is_current(stored(store, ann, "old"))  # unchanged: sealed as it was until written
    ann.app = middleware(store, KEY2, monkeypatch)  # KEY1 retired: what only it opens reads as absent
    assert session(ann) == {"user": "ann", "rewritten": "2", "new": "2"}


def test_a_rolling_rotation_adds_the_new_key_before_it_seals(
    make_store: Callable[..., SessionStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Processes of "KEY1,KEY2" (the first step) and of "KEY2,KEY1" (the second) read each other's writes."""
    store = make_store("redis")
    first, second = middleware(store, f"{KEY1},{KEY2}", monkeypatch), middleware(store, f"{KEY2},{KEY1}", monkeypatch)
    ann = user(first, "ann", {"a": "by the first"})
    ann.app = second
    ann.request("POST", "/set", {"k": "b", "v": "by the second"})
    ann.app = first
    assert session(ann) == {"user": "ann", "a": "by the first", "b": "by the second"}


def test_turning_encryption_on_and_off(
    make_store: Callable[..., SessionStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store("sqlite")
    ann = user(middleware(store, None, monkeypatch), "ann", {"clear": "before"})
    assert stored(store, ann, "clear") == "before"
    ann.app = middleware(store, KEY1, monkeypatch)  # on: what was stored in the clear still reads
    assert session(ann) == {"user": "ann", "clear": "before"}
    ann.request("POST", "/set", {"k": "sealed", "v": "after"})
    assert stored(store, ann, "sealed").startswith(MARK) and stored(store, ann, "clear") == "before"
    ann.app = middleware(store, f"none,{KEY1}", monkeypatch)  # off: KEY1 still opens, new writes are clear
    assert session(ann) == {"user": "ann", "clear": "before", "sealed": "after"}
    ann.request("POST", "/set", {"k": "sealed", "v": "clear again"})
    ann.request("POST", "/set", {"k": "new", "v": "clear too"})
    assert stored(store, ann, "sealed") == "clear again" and stored(store, ann, "new") == "clear too"
    assert session(ann) == {"user": "ann", "clear": "before", "sealed": "clear again", "new": "clear too"}


def test_the_client_details_of_a_login_are_sealed_and_listed_in_the_clear(
    make_store: Callable[..., SessionStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store("sqlite")
    monkeypatch.setenv("SESSION_CLIENT_DETAILS", "true")
    app = middleware(store, KEY1, monkeypatch)
    client = webtest.TestApp(
        app, extra_environ={"HTTP_USER_AGENT": "Phone/1.0 (private)", "REMOTE_ADDR": "203.0.113.9"}
    )
    client.post("/login", {"user": "ann"})
    (listed,) = store.user_sessions("ann")
    binding = store.load(listed.key).data[USER_KEY]
    assert binding["id"] == "ann" and binding["seen"] > 0  # what the stores index stays readable
    assert binding["agent"].startswith(MARK) and binding["ip"].startswith(MARK)  # personal data is sealed
    assert "Phone/1.0" not in json.dumps(listed.binding) and "203.0.113.9" not in json.dumps(listed.binding)
    (device,) = app.users.list("ann")
    assert (device.agent, device.ip) == ("Phone/1.0 (private)", "203.0.113.9")  # the user's own list shows them
    assert client.get("/session").json["user"] == "ann"


# -- a rotation under load, under gunicorn -----------------------------------------------------------

LOAD_USERS = 20
LOAD_MIN_REQUESTS = 20  # per user, before and after the restart each
LOAD_SECONDS = 25.0


class Reply(NamedTuple):
    user: str | None
    n: int
    keys: int  # how many keys the worker that answered has


def call(url: str, path: str, cookie: str | None = None) -> tuple[Reply, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", urlsplit(url).port, timeout=15)
    try:
        conn.request("POST", path, headers={"Connection": "close", **({"Cookie": cookie} if cookie else {})})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 200, (path, response.status, body)
    data, header = json.loads(body), response.getheader("Set-Cookie")
    return Reply(data["user"], data["n"], int(response.getheader("X-Keys", "0"))), header and header.split(";")[0]


def clicks(url: str, name: str, seen: list[int], deadline: float) -> None:
    """User ``name`` logs in, then increments the counter one request after another until
    LOAD_MIN_REQUESTS replies came from workers of two keys; ``seen`` gets each reply's key count."""
    reply, cookie = call(url, f"/login?user={name}")
    assert (reply.user, reply.n) == (name, 0) and cookie
    while time.monotonic() < deadline and seen.count(2) < LOAD_MIN_REQUESTS:
        reply, _ = call(url, "/inc", cookie)
        assert (reply.user, reply.n) == (name, len(seen) + 1), "logged out or an increment lost"
        seen.append(reply.keys)


@pytest.mark.slow
def test_a_rotation_under_load_loses_nobody_and_no_increment(tmp_path: Path) -> None:
    url, prefix, key_file = require_redis(), unique("encload") + ":", tmp_path / "keys"
    key_file.write_text(KEY1)
    env = {"REDIS_URL": url, "SESSION_REDIS_PREFIX": prefix, "ENCRYPTION_KEY_FILE": str(key_file)}
    deadline = time.monotonic() + LOAD_SECONDS
    seen: dict[str, list[int]] = {f"user{i}": [] for i in range(LOAD_USERS)}  # the key count of each reply
    failures: list[BaseException] = []

    def run(base: str, name: str) -> None:
        try:
            clicks(base, name, seen[name], deadline)
        except BaseException as exc:  # the main thread reports it
            failures.append(exc)

    with gunicorn("encryption_app:app", env, args=("--pythonpath", "tests", "--keep-alive", "0")) as (base, process):
        threads = [threading.Thread(target=run, args=(base, name)) for name in seen]
        for thread in threads:
            thread.start()
        while sum(map(len, seen.values())) < LOAD_USERS * LOAD_MIN_REQUESTS // 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        key_file.write_text(f"{KEY2},{KEY1}")
        process.send_signal(signal.SIGHUP)  # a graceful restart: new workers, the old ones finish their requests
        for thread in threads:
            thread.join()
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*"))
        stored_n = [client.hget(key, "n") for key in keys if client.type(key) == b"hash"]
        client.delete(*keys)
    finally:
        client.close()
    assert not failures, failures[0]
    assert all(replies.count(2) >= LOAD_MIN_REQUESTS for replies in seen.values()), "not restarted in time"
    assert all(replies[0] == 1 and replies == sorted(replies) for replies in seen.values())  # before, then after
    assert len(stored_n) == LOAD_USERS and all(Cipher([KEY2]).is_current(json.loads(n)) for n in stored_n)


# -- settings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"SESSION_ENCRYPTION_KEY": "changeme"}, "SESSION_ENCRYPTION_KEY is a well-known or trivial value"),
        ({"SESSION_ENCRYPTION_KEY": "short-but-varied-key"}, "SESSION_ENCRYPTION_KEY is too short"),
        ({"SESSION_ENCRYPTION_KEY": f"{KEY1},changeme"}, r"SESSION_ENCRYPTION_KEY \(key 2 of the list\)"),
        ({"SESSION_ENCRYPTION_KEY": SECRET}, "SESSION_ENCRYPTION_KEY must differ from SESSION_SECRET"),
        ({"SESSION_SECRET": f"{KEY2},{SECRET}", "SESSION_ENCRYPTION_KEY": SECRET}, "must differ from SESSION_SECRET"),
        ({"SESSION_ENCRYPTION_KEY": KEY1, "SESSION_FORMAT": "express"}, "cannot be used with SESSION_FORMAT=express"),
        ({"SESSION_ENCRYPTION_KEY": "none"}, "SESSION_ENCRYPTION_KEY=none: remove it instead"),
    ],
)
def test_settings_that_cannot_work_stop_start_up(variables: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.load({"SESSION_SECRET": SECRET, **variables})


def test_the_key_list_is_read_from_the_environment_and_never_shown() -> None:
    loaded = Settings.load({"SESSION_SECRET": SECRET, "SESSION_ENCRYPTION_KEY": f" {KEY2} , {KEY1} "})
    assert loaded.encryption_keys == (KEY2, KEY1) and KEY1 not in repr(loaded)


# -- nonces ------------------------------------------------------------------------------------------


def nonce(value: str) -> bytes:
    """The nonce of a sealed value (the JSON text Cipher.seal gives)."""
    return payload(json.loads(value))[4:16]


def test_nonces_never_repeat_under_a_key() -> None:
    cipher = Cipher([KEY1])
    assert len({nonce(cipher.seal("k", "n", "1")) for _ in range(100_000)}) == 100_000


def test_nonces_never_repeat_when_the_counter_wraps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encrypted, "_COUNTER_LIMIT", 1000)
    cipher = Cipher([KEY1])
    nonces = [nonce(cipher.seal("k", "n", "1")) for _ in range(3500)]
    assert len(set(nonces)) == 3500 and len({n[:8] for n in nonces}) == 4


def test_a_forked_child_draws_another_nonce_prefix() -> None:
    cipher = Cipher([KEY1])
    cipher.seal("k", "n", "1")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: seal, tell, and leave at once (no pytest teardown in it)
        try:
            os.write(write, nonce(cipher.seal("k", "n", "1")))
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 12)
    os.close(read)
    os.waitpid(pid, 0)
    parent = nonce(cipher.seal("k", "n", "1"))
    assert len(child) == 12 and child[:8] != parent[:8] and child != parent


# -- any JSON value round-trips ----------------------------------------------------------------------

JSON_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=50)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=20,
)


def same(a: Any, b: Any) -> bool:
    """Equal type for type (1 is not 1.0 nor True), order of keys too."""
    return json.dumps(a) == json.dumps(b)


@JSON_SETTINGS
@given(key=text, name=text, value=json_values)
def test_any_json_value_round_trips_through_the_cipher(key: str, name: str, value: Any) -> None:
    cipher = Cipher([KEY1])
    value_text = encode(name, value)
    sealed_text = cipher.seal(key, name, value_text)
    assert same(cipher.open(key, name, json.loads(sealed_text)), value)
    assert value_text not in sealed_text or len(value_text) < 8


@pytest.fixture(scope="module")
def plain_stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[SessionStore]]:
    stores = [MemoryStore(), SQLiteStore(str(tmp_path_factory.mktemp("enc") / "s.sqlite3"), cleanup_interval=0)]
    yield stores
    for store in stores:
        store.close()


def test_copies_are_sealed_and_scans_open_them(plain_stores: list[SessionStore]) -> None:
    """What a migration uses: a session copied in (add, add_many) is sealed; a scan gives it opened."""
    for plain in plain_stores:
        store, keys = EncryptedStore(plain, Cipher([KEY1])), [os.urandom(16).hex() for _ in range(3)]
        assert store.add(keys[0], {"token": '"copied"'}, time.time() + 60)
        assert store.add_many([(key, {"token": '"copied"'}, time.time() + 60) for key in keys[1:]]) == 2
        scanned = {key: record.data for batch in store.scan() for key, record in batch if key in keys}
        assert scanned == {key: {"token": "copied"} for key in keys}, plain.name
        assert all(plain.load(key).data["token"].startswith(MARK) for key in keys)  # type: ignore[union-attr]
        store.delete_many(keys)


@JSON_SETTINGS
@given(name=text, value=json_values, other=json_values)
def test_any_json_value_round_trips_through_the_encrypted_stores(
    plain_stores: list[SessionStore], name: str, value: Any, other: Any
) -> None:
    assume(name != USER_KEY and name != "other")
    key = os.urandom(16).hex()
    for plain in plain_stores:
        store = EncryptedStore(plain, Cipher([KEY1]))
        store.create(key, {name: encode(name, value)}, 60)
        assert store.update(key, Changes({"other": encode("other", other)}), 60)
        record = store.load(key)
        assert record is not None and sorted(record.data) == sorted([name, "other"]), plain.name
        assert same(record.data[name], value) and same(record.data["other"], other), plain.name
        assert all(str(v).startswith(MARK) for v in plain.load(key).data.values())  # type: ignore[union-attr]
        store.delete(key)


# -- wsgisession reencrypt ---------------------------------------------------------------------------


def reencrypt_cli(tmp_path: Path, keys: str) -> subprocess.CompletedProcess[str]:
    """``wsgisession reencrypt`` on the SQLite file in ``tmp_path``, with SESSION_ENCRYPTION_KEY=keys."""
    env = {"SESSION_STORE": "sqlite", "SESSION_SQLITE_PATH": str(tmp_path / "s.sqlite3")}
    return run_cli(tmp_path, "reencrypt", env={**env, "SESSION_ENCRYPTION_KEY": keys} if keys else env)


def sqlite_app(tmp_path: Path, keys: str | None, monkeypatch: pytest.MonkeyPatch) -> SessionMiddleware:
    return middleware(SQLiteStore(str(tmp_path / "s.sqlite3"), cleanup_interval=0), keys, monkeypatch)


@pytest.mark.parametrize(
    ("before", "after", "sealed_by"),
    [(KEY1, f"{KEY2},{KEY1}", KEY2), (None, KEY1, KEY1), (KEY1, f"none,{KEY1}", None)],
    ids=["rotation", "turning-on", "turning-off"],
)
def test_reencrypt_rewrites_every_stored_value_as_the_first_key_seals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: str | None, after: str, sealed_by: str | None
) -> None:
    users = [
        user(sqlite_app(tmp_path, before, monkeypatch), f"u{n}", {"token": f"t{n}", "n": str(n)}) for n in range(30)
    ]
    result = reencrypt_cli(tmp_path, after)
    assert result.returncode == 0, result.stderr
    assert "Checked 30 sessions" in result.stdout and "30 rewritten, 0 values no key opens" in result.stdout
    raw = SQLiteStore(str(tmp_path / "s.sqlite3"), cleanup_interval=0)
    current = Cipher([sealed_by or "none", KEY1] if sealed_by is None else [sealed_by])
    for browser in users:
        values = {k: v for k, v in raw.load(browser.key).data.items() if k != USER_KEY}
        assert values and all(current.is_current(v) for v in values.values())
    final = sqlite_app(tmp_path, sealed_by, monkeypatch)  # only the key that sealed (or none at all)
    for n, browser in enumerate(users):
        browser.app = final
        assert session(browser) == {"user": f"u{n}", "token": f"t{n}", "n": str(n)}
    assert "0 rewritten" in reencrypt_cli(tmp_path, after).stdout  # a second run has nothing to do


def test_reencrypt_never_undoes_a_write_made_after_it_read(make_store: Callable[..., SessionStore]) -> None:
    store = make_store("redis")
    old, new = EncryptedStore(store, Cipher([KEY1])), Cipher([KEY2, KEY1])
    key = "ab" * 32
    old.create(key, {"a": '"first"', "b": '"kept"'}, 600)
    read = [(key, store.load(key))]  # what the command read
    EncryptedStore(store, new).update(key, Changes({"a": '"written since"'}), 600)  # a request's write
    done = encrypted.reencrypt(store, new, read)
    assert done.rewritten == 1 and done.busy == 0
    assert EncryptedStore(store, Cipher([KEY2])).load(key).data == {"a": "written since", "b": "kept"}


def test_reencrypt_without_a_key_says_what_to_set(tmp_path: Path) -> None:
    assert "SESSION_ENCRYPTION_KEY is not set" in assert_one_line_error(reencrypt_cli(tmp_path, ""), 2)
