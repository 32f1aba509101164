"""An attacker's view of the middleware: forged, mangled and tossed cookies, hostile session keys
and values, leaked stores, fixation, timeouts, cookie hardening, the size limit and secrets.

Requests are direct WSGI calls (full control of the raw ``Cookie`` header, non-ASCII and NUL
included) against MemoryStore and, wherever storage matters, the real SQLite, PostgreSQL and
Redis stores and the Redis + PostgreSQL FailoverStore (the store chosen when both URLs are set).

What every test holds to: no 5xx (developer errors raised at the assignment excepted, as
SessionValueError/TypeError), no session adopted or leaked (a response never carries another
session's data, a client-chosen id never becomes a stored id), and the store left consistent.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import io
import json
import logging
import math
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

import pytest
import redis
from cookies import parse_set_cookies
from servers import SECRET, RedisServer, drop_table, free_port, pg_sql, require_postgres, unique

from wsgisession import (
    ConfigError,
    MemoryStore,
    Session,
    SessionMiddleware,
    SessionStore,
    SessionTooLarge,
    SessionValueError,
    SQLiteStore,
)
from wsgisession.session import MAX_DEPTH, Loaded
from wsgisession.settings import _VARIABLES
from wsgisession.signing import ID_LENGTH, Signer, new_id, store_key
from wsgisession.stores.base import RateLimitedLog, json_object
from wsgisession.stores.failover import FailoverStore
from wsgisession.stores.postgres import PostgresStore
from wsgisession.stores.redis import RedisStore

OLD_SECRET = "retired-secret-9876543210-ZYXWVUTSRQPONMLKJIHGFEDCBA"
UNKNOWN_SECRET = "unknown-secret-abcdefghijklmnopqrstuvwxyz-0123456789"
REAL = ["sqlite", "postgres", "redis", "failover"]
EVERY = ["memory", *REAL]
Environ = dict[str, Any]
StartResponse = Callable[..., Any]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The middleware reads os.environ: start every test from none of its variables."""
    for variable, _ in _VARIABLES.values():
        monkeypatch.delenv(variable, raising=False)


# -- stores, and what an attacker who stole their contents would see -----------------------


@pytest.fixture
def open_store(make_store: Callable[..., SessionStore]) -> Iterator[Callable[..., SessionStore]]:
    """A store of a kind (``failover``: private Redis + PostgreSQL), on private names; closed after the test."""
    failovers: list[FailoverStore] = []

    def open_(kind: str, redis_url: str | None = None) -> SessionStore:
        redis_options = {"url": redis_url} if redis_url else {}
        if kind == "failover":
            store = FailoverStore(make_store("redis", **redis_options), make_store("postgres"), probe_interval=0.5)
            failovers.append(store)
            return store
        return make_store(kind, **redis_options) if kind == "redis" else make_store(kind)

    yield open_
    for store in failovers:
        store.close()


@dataclasses.dataclass(frozen=True)
class Row:
    """One stored session as a thief who dumped the backend sees it."""

    key: str  # what the session is filed under (a Redis key without its prefix)
    text: str  # every stored byte of it (names and values), as text
    expires: float


def dump(store: SessionStore) -> list[Row]:
    """Every record of the store, read straight from the backend (expired rows not yet cleaned up included)."""
    if isinstance(store, FailoverStore):
        return dump(store.cache) + dump(store.durable)
    if isinstance(store, MemoryStore):
        return [Row(k, json_object(data), expires) for k, (data, expires) in store._sessions.items()]
    if isinstance(store, SQLiteStore):
        conn = sqlite3.connect(store.path)
        try:
            rows = conn.execute(f"SELECT id, data, expires_at FROM {store.table}").fetchall()
        finally:
            conn.close()
        return [Row(k, text, float(expires)) for k, text, expires in rows]
    if isinstance(store, PostgresStore):
        rows = pg_sql(store.dsn, f"SELECT id, data::text, extract(epoch from expires_at)::float8 FROM {store.table}")
        return [Row(k, text, float(expires)) for k, text, expires in rows]
    if isinstance(store, RedisStore):
        found = []
        for raw in store.client.scan_iter(match=store.prefix + "*"):
            fields = store.client.hgetall(raw)
            text = "\n".join(f"{k.decode()}\t{v.decode()}" for k, v in fields.items())
            found.append(Row(raw.decode()[len(store.prefix) :], text, time.time() + store.client.pttl(raw) / 1000))
        return found
    raise TypeError(store)


def assert_unchanged(before: list[Row], after: list[Row]) -> None:
    """The same records, holding the same bytes, expiring when they did (Redis's is read to the millisecond)."""
    old, new = sorted(before, key=lambda r: (r.key, r.text)), sorted(after, key=lambda r: (r.key, r.text))
    assert [(r.key, r.text) for r in new] == [(r.key, r.text) for r in old]
    for a, b in zip(old, new, strict=True):
        assert b.expires == pytest.approx(a.expires, abs=0.05), (a, b)


def stored(store: SessionStore, session_id: str) -> dict[str, Any] | None:
    """The data the store holds for the session, or None."""
    record = store.load(store_key(session_id))
    return None if record is None else record.data


# -- the application, and raw WSGI requests ----------------------------------------------------


def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
    """Path picks the action; /set takes a JSON object body (any keys) or the query string."""
    session: Session = environ["session"]
    path = environ["PATH_INFO"]
    params = dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    if path == "/login":
        session.regenerate()
        session["user"] = params.get("user", "ann")
    elif path == "/set":
        items = json.loads(body) if environ.get("CONTENT_TYPE") == "application/json" else params
        for key, value in items.items():
            session[key] = value
    elif path == "/del":
        for key in json.loads(body):
            del session[key]
    elif path == "/logout":
        session.invalidate()
    elif path == "/pow":
        session[params["key"]] = 10 ** int(params["exp"])
    data = None if path == "/none" else dict(session)
    payload = json.dumps({"data": data}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
    return [payload]


@dataclasses.dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def data(self) -> Any:
        return json.loads(self.body)["data"]

    def cookies(self, name: str = "session") -> list[dict[str, Any]]:
        """The Set-Cookie headers for ``name``: {"value": ..., attribute (lower case): value or True}."""
        return parse_set_cookies((text for header, text in self.headers if header.lower() == "set-cookie"), name)

    def cookie(self, name: str = "session") -> dict[str, Any] | None:
        found = self.cookies(name)
        assert len(found) <= 1, self.headers
        return found[0] if found else None

    @property
    def issued(self) -> str | None:
        """The session cookie value this response hands out (None: none, or an expired one)."""
        cookie = self.cookie()
        return (cookie["value"] or None) if cookie is not None else None

    @property
    def expired(self) -> bool:
        cookie = self.cookie()
        return cookie is not None and cookie["value"] == "" and cookie.get("max-age") == "0"


def call(
    mw: Any,
    path: str = "/read",
    cookie: str | None = None,
    *,
    header: str | None = None,
    query: str = "",
    body: bytes | None = None,
    content_type: str = "application/json",
    scheme: str = "http",
    extra: Environ | None = None,
) -> Response:
    """One request straight through WSGI: ``cookie`` is the session cookie's value, ``header`` a whole Cookie header."""
    environ: Environ = {
        "REQUEST_METHOD": "GET" if body is None else "POST",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "example.com",
        "SERVER_PORT": "443" if scheme == "https" else "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "example.com",
        "wsgi.url_scheme": scheme,
        "wsgi.input": io.BytesIO(body or b""),
        "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if body is not None:
        environ["CONTENT_LENGTH"], environ["CONTENT_TYPE"] = str(len(body)), content_type
    if cookie is not None:
        environ["HTTP_COOKIE"] = f"session={cookie}"
    if header is not None:
        environ["HTTP_COOKIE"] = header
    environ.update(extra or {})
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        started[:] = [status, headers]
        return lambda data: None

    chunks = mw(environ, start_response)
    try:
        payload = b"".join(chunks)
    finally:
        if hasattr(chunks, "close"):
            chunks.close()
    return Response(int(started[0].split()[0]), list(started[1]), payload)


class Client:
    """Keeps the session cookie it was last given, as a browser does."""

    def __init__(self, mw: SessionMiddleware, scheme: str = "http") -> None:
        self.mw, self.scheme = mw, scheme
        self.cookie: str | None = None

    def request(self, path: str = "/read", **kwargs: Any) -> Response:
        res = call(self.mw, path, self.cookie, scheme=self.scheme, **kwargs)
        assert res.status < 500, res
        if res.cookie() is not None:
            self.cookie = res.issued
        return res

    def set(self, items: dict[str, Any]) -> Response:
        return self.request("/set", body=json.dumps(items).encode())

    @property
    def id(self) -> str:
        assert self.cookie is not None
        return self.cookie[:ID_LENGTH]


def middleware(store: SessionStore | None = None, **options: Any) -> SessionMiddleware:
    options.setdefault("secret", SECRET)
    return SessionMiddleware(app, store if store is not None else MemoryStore(), **options)


def logged_in(mw: SessionMiddleware, user: str = "victim") -> Client:
    client = Client(mw)
    client.request("/login", query=f"user={user}")
    assert client.cookie is not None
    return client


def created_of(cookie: str) -> int:
    return int(cookie.split(".")[1])


# -- cookies that must name no session -----------------------------------------------------------


def percent_encoded(text: str) -> str:
    return "".join(f"%{ord(c):02X}" for c in text)


def adversarial_values(genuine: str, other: str) -> dict[str, str]:
    """Session cookie values derived from a genuine cookie (and ``other``, another user's), none of which may work."""
    session_id, created, signature = genuine.split(".")
    flip = {"A": "B"}
    swap = lambda c: flip.get(c, "A")  # noqa: E731
    now = str(int(time.time()))
    return {
        "tampered-id": swap(session_id[0]) + genuine[1:],
        "tampered-created": f"{session_id}.{int(created) + 1}.{signature}",
        "extended-lifetime": f"{session_id}.{int(created) + 86400 * 365}.{signature}",
        "created-leading-zero": f"{session_id}.0{created}.{signature}",
        "tampered-signature-first": f"{session_id}.{created}.{swap(signature[0])}{signature[1:]}",
        "tampered-signature-last": f"{session_id}.{created}.{signature[:-1]}{swap(signature[-1])}",
        "spliced-signature": f"{session_id}.{created}.{other.split('.')[2]}",
        "spliced-id": f"{other[:ID_LENGTH]}.{created}.{signature}",
        "truncated-by-one": genuine[:-1],
        "truncated-half": genuine[: len(genuine) // 2],
        "extended-by-one": genuine + "A",
        "doubled": genuine + genuine,
        "percent-encoded": percent_encoded(genuine),
        "dots-percent-encoded": genuine.replace(".", "%2E"),
        "base64-padded": genuine + "=",
        "base64-padded-twice": genuine + "==",
        "standard-base64": genuine.replace("-", "+").replace("_", "/") + ("+" if "-" not in genuine else ""),
        "case-swapped": genuine.swapcase(),
        "id-only": session_id,
        "id-and-created": f"{session_id}.{created}",
        "store-key": store_key(session_id),
        "store-key-shaped": f"{store_key(session_id)[:ID_LENGTH]}.{created}.{signature}",
        "other-secret": Signer([UNKNOWN_SECRET]).sign(session_id, int(created)),
        "client-chosen-id": f"{'A' * ID_LENGTH}.{now}.{'A' * 43}",
        "client-chosen-id-with-genuine-signature": f"{'A' * ID_LENGTH}.{created}.{signature}",
        "empty": "",
        "blank": "   ",
        "lone-quote": '"',
        "huge-under-the-header-limit": "A" * 8000,
        "huge-over-the-header-limit": genuine + "A" * 9000,
        "non-ascii-latin1": "\xe9" * len(genuine),
        "non-ascii-utf8-as-latin1": "\u0441\u0435\u0441\u0441\u0438\u044f".encode().decode("latin-1"),
        "non-ascii-suffix": genuine[:-1] + "\xe9",
        "nul-inside": genuine[:50] + "\x00" + genuine[51:],
        "nul-only": "\x00" * len(genuine),
        "sql-or": "' OR 1=1 --",
        "sql-or-quoted": "1' OR '1'='1",
        "sql-drop": "x'; DROP TABLE wsgisession; --",
        "redis-crlf": "\r\nFLUSHALL\r\n",
        "redis-resp": "*1\r\n$8\r\nFLUSHALL\r\n",
        "path-traversal": "../../etc/passwd",
        "path-traversal-encoded": "..%2F..%2Fetc%2Fpasswd",
        "glob": "*",
        "prefix-glob": "sess:*",
        "json": '{"user":"victim"}',
        "header-injection": genuine + "\r\nSet-Cookie: session=evil",
        "format-string": "%s%s%s%n{0}${jndi:ldap://127.0.0.1/x}",
    }


@pytest.mark.parametrize("kind", EVERY)
def test_adversarial_cookie_values_name_no_session(kind: str, open_store: Callable[..., SessionStore]) -> None:
    store = open_store(kind)
    mw = middleware(store)
    victim, other = logged_in(mw, "victim"), logged_in(mw, "other")
    assert victim.cookie is not None and other.cookie is not None
    issued = {victim.id, other.id}
    before = dump(store)
    for name, value in adversarial_values(victim.cookie, other.cookie).items():
        for path in ("/read", "/set"):
            res = call(mw, path, value, query="x=1")
            assert res.status == 200, (name, path)
            assert res.data in ({}, {"x": "1"}), (name, path, res.data)  # nobody's data
            fresh = res.issued
            if fresh is not None:
                assert path == "/set", name
                assert fresh[:ID_LENGTH] not in (*issued, value[:ID_LENGTH]), name  # a fresh, server-made id
                assert mw.core.format.signer.unsign(fresh) is not None
                issued.add(fresh[:ID_LENGTH])
            else:
                assert path == "/read", name
    # The victims' sessions are untouched, and every record is filed under a server-made id.
    assert stored(store, victim.id) == {"user": "victim"}
    assert stored(store, other.id) == {"user": "other"}
    rows = dump(store)
    assert {r.key for r in before} <= {r.key for r in rows}
    assert {r.key for r in rows} <= {store_key(i) for i in issued}


@pytest.mark.parametrize(
    "header",
    [
        "Session={genuine}",  # cookie names are case-sensitive
        "session_={genuine}",
        "xsession={genuine}",
        "session\x00={genuine}",
        "session.={genuine}",
        "other={genuine}",
        "session",  # no value at all
        "=",
        "session=;session=",
        ";;;;",
        "session=" + "A" * 8200,
        "a=" + "b" * 8190 + "; session={genuine}",  # over the header limit: ignored whole
    ],
    ids=[
        "name-case",
        "name-suffix",
        "name-prefix",
        "name-nul",
        "name-dot",
        "other-name",
        "no-value",
        "bare-equals",
        "empty-twice",
        "semicolons",
        "huge-value",
        "over-the-limit",
    ],
)
def test_cookie_headers_that_do_not_carry_the_session(header: str) -> None:
    mw = middleware()
    victim = logged_in(mw)
    assert victim.cookie is not None
    for path in ("/read", "/set"):
        res = call(mw, path, header=header.replace("{genuine}", victim.cookie), query="x=1")
        assert res.status == 200
        assert res.data in ({}, {"x": "1"}), res.data
        assert res.issued is None or res.issued[:ID_LENGTH] != victim.id


def test_only_the_minted_value_or_its_quoted_form_is_accepted() -> None:
    mw = middleware()
    victim = logged_in(mw)
    value = victim.cookie
    assert value is not None
    accepted = [f"session={value}", f'session="{value}"', f"  session = {value} ", f"a=1;session={value};b=2"]
    for header in accepted:
        assert call(mw, header=header).data == {"user": "victim"}, header
    assert quote(value, safe="") == value  # URL encoding leaves a minted value as it is: nothing to decode


# -- several session cookies: cookie tossing from a sibling domain -------------------------------


@pytest.mark.parametrize("order", ["victim-first", "attacker-first"])
def test_two_genuine_cookies_of_different_sessions_name_none(order: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="wsgisession")
    store = MemoryStore()
    mw = middleware(store)
    victim, attacker = logged_in(mw, "victim"), logged_in(mw, "attacker")
    assert victim.cookie is not None and attacker.cookie is not None
    pair = [victim.cookie, attacker.cookie]
    if order == "attacker-first":
        pair.reverse()
    header = f"session={pair[0]}; theme=dark; session={pair[1]}"
    for _ in range(5):
        res = call(mw, "/read", header=header)
        assert res.data == {}  # neither session
        assert res.expired  # and the browser is told to drop the cookie it can reach
    res = call(mw, "/set", header=header, query="x=1")
    assert res.data == {"x": "1"}
    assert res.issued is not None and res.issued[:ID_LENGTH] not in (victim.id, attacker.id)
    assert stored(store, victim.id) == {"user": "victim"}  # the attacker planted nothing in either
    assert stored(store, attacker.id) == {"user": "attacker"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # rate-limited: one line for the burst
    assert "name different sessions" in warnings[0]
    assert victim.cookie not in warnings[0] and victim.id not in warnings[0]


def test_the_same_genuine_session_twice_is_fine() -> None:
    store = MemoryStore()
    old = middleware(store, secret=OLD_SECRET)
    victim = logged_in(old)
    assert victim.cookie is not None
    rotated = middleware(store, secret=[SECRET, OLD_SECRET])
    resigned = rotated.core.format.signer.sign(victim.id, created_of(victim.cookie))
    assert resigned != victim.cookie
    for header in (
        f"session={victim.cookie}; session={victim.cookie}",
        f'session={victim.cookie}; session="{victim.cookie}"',
        f"session={victim.cookie}; session={resigned}",  # one session, signed with two current keys
        f"session={resigned}; session={victim.cookie}",
    ):
        res = call(rotated, "/read", header=header)
        assert res.data == {"user": "victim"}, header


@pytest.mark.parametrize("forged", ["truncated", "other-secret", "client-chosen-id", "tampered-signature-last"])
@pytest.mark.parametrize("order", ["genuine-first", "forged-first"])
def test_forged_cookies_beside_the_genuine_one_are_ignored(forged: str, order: str) -> None:
    mw = middleware()
    victim, other = logged_in(mw), logged_in(mw, "other")
    assert victim.cookie is not None and other.cookie is not None
    values = adversarial_values(other.cookie, victim.cookie)
    bad = values["truncated-by-one" if forged == "truncated" else forged]
    pair = [victim.cookie, bad] if order == "genuine-first" else [bad, victim.cookie]
    res = call(mw, "/read", header=f"session={pair[0]}; session={pair[1]}")
    assert res.data == {"user": "victim"}


# -- fixation: ids come from the server, change at login, die at logout --------------------------


@pytest.mark.parametrize("kind", EVERY)
def test_a_planted_cookie_sees_nothing_after_the_login(kind: str, open_store: Callable[..., SessionStore]) -> None:
    store = open_store(kind)
    mw = middleware(store)
    attacker = Client(mw)
    attacker.request("/set", query="cart=1")  # a genuine anonymous session, then planted in the victim's browser
    planted = attacker.cookie
    assert planted is not None
    victim = Client(mw)
    victim.cookie = planted
    assert victim.request("/login", query="user=victim").data == {"cart": "1", "user": "victim"}
    assert victim.id != planted[:ID_LENGTH]  # regenerate(): a fresh id at login
    assert attacker.request("/read").data == {}  # the attacker's copy of the cookie is worthless
    assert stored(store, planted[:ID_LENGTH]) is None
    assert victim.request("/read").data == {"cart": "1", "user": "victim"}


@pytest.mark.parametrize("kind", EVERY)
def test_logout_makes_the_old_cookie_useless_at_once(kind: str, open_store: Callable[..., SessionStore]) -> None:
    store = open_store(kind)
    mw = middleware(store)
    victim = logged_in(mw)
    copy = victim.cookie
    assert copy is not None
    res = victim.request("/logout")
    assert res.expired and res.data == {}
    assert stored(store, copy[:ID_LENGTH]) is None
    assert all(r.key != store_key(copy[:ID_LENGTH]) for r in dump(store))  # deleted, not only expired
    replay = call(mw, "/read", copy)
    assert replay.data == {}
    replay = call(mw, "/set", copy, query="x=1")
    assert replay.data == {"x": "1"}
    assert replay.issued is not None and replay.issued[:ID_LENGTH] != copy[:ID_LENGTH]  # a dead id is never revived


@pytest.mark.parametrize(
    "where",
    ["query", "form", "json-body", "header", "authorization", "path-parameter"],
)
def test_the_session_id_is_read_from_the_cookie_only(where: str) -> None:
    mw = middleware()
    victim = logged_in(mw)
    value = victim.cookie
    assert value is not None
    request: dict[str, Any] = {
        "query": {"query": f"session={value}"},
        "form": {"body": f"session={value}".encode(), "content_type": "application/x-www-form-urlencoded"},
        "json-body": {"body": json.dumps({"session": value}).encode(), "content_type": "text/plain"},
        "header": {"extra": {"HTTP_X_SESSION": value, "HTTP_X_SESSION_ID": value}},
        "authorization": {"extra": {"HTTP_AUTHORIZATION": f"Bearer {value}"}},
        "path-parameter": {"extra": {"PATH_INFO": f"/read;session={value}"}},
    }[where]
    res = call(mw, "/read", **request)
    assert res.data == {}
    assert res.issued is None


# -- hostile keys and values on every store ------------------------------------------------------


HOSTILE = [
    "it's",
    'say "hi"',
    "back\\slash",
    "a.b.c",
    "$where",
    "{}",
    "[0]",
    "",
    " ",
    "' OR 1=1 --",
    "'); DROP TABLE wsgisession; --",
    "\r\nFLUSHALL\r\n",
    "*1\r\n$8\r\nFLUSHALL\r\n",
    "../../etc/passwd",
    "C:\\u0000 is not a NUL",
    "%00",
    "\u043a\u043b\u044e\u0447",
    "\U0001f511",
    "\u200b",
    "\x01\x1f\x7f",
    "k" * 5000,
]


@pytest.mark.parametrize("kind", EVERY)
def test_hostile_keys_and_values_round_trip_and_stay_in_their_record(
    kind: str, open_store: Callable[..., SessionStore], private_redis: RedisServer
) -> None:
    canary = redis.Redis.from_url(private_redis.url)
    canary.set("canary", "alive")
    store = open_store(kind, redis_url=private_redis.url)
    mw = middleware(store)
    bystander = logged_in(mw, "bystander")
    client = logged_in(mw)
    data = {key: {"v": value, "n": i} for i, (key, value) in enumerate(zip(HOSTILE, reversed(HOSTILE), strict=True))}
    assert client.set(data).status == 200
    expected = {"user": "victim", **data}
    assert client.request("/read").data == expected
    assert stored(store, client.id) == expected
    # Change some, delete others (the per-key merge and delete paths).
    changed = {key: "changed " + key for key in HOSTILE[::2]}
    client.set(changed)
    deleted = HOSTILE[1::4]
    res = client.request("/del", body=json.dumps(deleted).encode())
    expected = {**expected, **changed}
    for key in deleted:
        del expected[key]
    assert res.data == expected
    assert Client(mw).request("/read").data == {}  # a stranger sees nothing
    fresh = Client(mw)
    fresh.cookie = client.cookie
    assert fresh.request("/read").data == expected
    assert stored(store, client.id) == expected
    assert bystander.request("/read").data == {"user": "bystander"}
    copies = 2 if kind == "failover" else 1
    assert len(dump(store)) == 2 * copies  # two sessions, no stray records
    assert canary.get("canary") == b"alive"
    canary.close()


@pytest.mark.parametrize("kind", EVERY)
@pytest.mark.parametrize(
    ("key", "value"),
    [("nul", "a\x00b"), ("nul-deep", {"x": ["\x00"]}), ("a\x00b", 1), ("surrogate", "\ud800"), ("\udc80", 1)],
    ids=["nul-value", "nul-nested", "nul-key", "surrogate-value", "surrogate-key"],
)
def test_nul_and_lone_surrogates_are_refused_at_the_assignment(
    kind: str, key: str, value: Any, open_store: Callable[..., SessionStore]
) -> None:
    store = open_store(kind)
    mw = middleware(store)
    client = logged_in(mw)
    before = dump(store)
    with pytest.raises(SessionValueError):
        call(mw, "/set", client.cookie, body=json.dumps({"ok": 1, key: value}).encode())
    assert_unchanged(before, dump(store))  # nothing written, not even the key set before the refused one
    assert client.request("/read").data == {"user": "victim"}


def nested(depth: int) -> Any:
    value: Any = "bottom"
    for level in range(depth):
        value = [value] if level % 2 else {"d": value}
    return value


@pytest.mark.parametrize("kind", EVERY)
def test_nesting_up_to_the_limit_round_trips(kind: str, open_store: Callable[..., SessionStore]) -> None:
    store = open_store(kind)
    client = logged_in(middleware(store))
    value = nested(MAX_DEPTH)
    client.set({"deep": value})
    assert client.request("/read").data == {"user": "victim", "deep": value}
    client.set({"other": 1})  # the merge of a record that holds it (SQLite re-encodes the whole record)
    assert stored(store, client.id) == {"user": "victim", "deep": value, "other": 1}


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5000])
def test_nesting_too_deep_is_a_session_value_error_at_the_assignment(depth: int) -> None:
    session = Session(lambda: Loaded(None, {}))
    with pytest.raises(SessionValueError, match=r"'deep'.*deeper than"):
        session["deep"] = nested(depth)
    assert "deep" not in session


def _deeper(frames: int, then: Callable[[], Any]) -> Any:
    return then() if frames == 0 else _deeper(frames - 1, then)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_value_accepted_at_the_assignment_can_be_read_back(
    kind: str, open_store: Callable[..., SessionStore]
) -> None:
    """Whatever nesting the assignment accepts must be saved (start_response runs a few frames
    deeper than the handler), and load and read in a later request whose handler runs a couple
    of hundred frames deeper (a framework's stack); otherwise the response is a 500, and the
    session answers every later request with a RecursionError until it expires."""

    def deepest(environ: Environ, start_response: StartResponse) -> list[bytes]:
        session = environ["session"]
        low, high = 1, 3000
        while low < high:  # the deepest value the assignment accepts here
            mid = (low + high + 1) // 2
            try:
                session["v"] = nested(mid)
                low = mid
            except (SessionValueError, RecursionError):
                high = mid - 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(low).encode()]

    def read(environ: Environ, start_response: StartResponse) -> list[bytes]:
        value = environ["session"]["v"]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"read" if value is not None else b""]

    store = open_store(kind)
    res = call(SessionMiddleware(deepest, store, secret=SECRET), "/")
    assert res.status == 200 and int(res.body) > 10
    assert res.issued is not None
    reader = SessionMiddleware(lambda e, s: _deeper(200, lambda: read(e, s)), store, secret=SECRET)
    for _ in range(2):
        assert call(reader, "/", res.issued).body == b"read"


@pytest.mark.parametrize("kind", EVERY)
def test_big_numbers_round_trip_and_too_big_ones_are_refused(
    kind: str, open_store: Callable[..., SessionStore]
) -> None:
    store = open_store(kind)
    client = logged_in(middleware(store))
    numbers = {"big": 10**4000, "negative": -(10**4000), "wide": 2**64 + 1, "tiny": 5e-324, "tenth": 0.1,
               "max": sys.float_info.max, "neg": -2.5e-8}  # fmt: skip
    client.set(numbers)
    data = client.request("/read").data
    for name, value in numbers.items():
        assert data[name] == value or float(data[name]) == value, name  # PostgreSQL: 1.79e308 reads as an int
    with pytest.raises(SessionValueError, match="'huge'"):  # past Python's int-to-text limit
        call(client.mw, "/pow", client.cookie, query="key=huge&exp=5000")
    for bad in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(SessionValueError):
            call(client.mw, "/set", client.cookie, body=f'{{"f": {bad}}}'.encode())
    assert client.request("/read").data == data


@pytest.mark.parametrize("value", [{1: "a"}, {"x": {True: 1}}, [{None: 1}], {1.5: 2}, {1: "a", "1": "b"}], ids=repr)
def test_nested_non_string_keys_are_refused(value: Any) -> None:
    """JSON would silently turn them into strings: {1: "a"} would read back as {"1": "a"}."""
    session = Session(lambda: Loaded(None, {}))
    with pytest.raises(SessionValueError, match="'k'"):
        session["k"] = value


@pytest.mark.parametrize("key", [1, None, b"k", ("a",)])
def test_non_string_session_keys_are_a_type_error_through_the_app(key: Any) -> None:
    def bad(environ: Environ, start_response: StartResponse) -> list[bytes]:
        environ["session"][key] = 1
        return app(environ, start_response)

    store = MemoryStore()
    with pytest.raises(TypeError):
        call(SessionMiddleware(bad, store, secret=SECRET), "/read")
    assert store._sessions == {}


# -- the size limit ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", EVERY)
def test_a_session_over_max_size_is_refused_and_nothing_is_written(
    kind: str, open_store: Callable[..., SessionStore]
) -> None:
    store = open_store(kind)
    mw = middleware(store, max_size=1024)
    client = logged_in(mw)
    base = json_object({"user": '"victim"', "k": '""'})
    room = 1024 - len(base.encode())
    assert client.set({"k": "x" * room}).status == 200  # exactly at the limit
    before = dump(store)
    with pytest.raises(SessionTooLarge) as info:
        call(mw, "/set", client.cookie, body=json.dumps({"k": "x" * (room + 1)}).encode())
    assert isinstance(info.value, SessionValueError) and isinstance(info.value, TypeError)
    assert "1025" in str(info.value) and "1024" in str(info.value)  # both sizes
    assert_unchanged(before, dump(store))
    assert client.request("/read").data == {"user": "victim", "k": "x" * room}
    # A new session over the limit is not created at all.
    with pytest.raises(SessionTooLarge):
        call(mw, "/set", body=json.dumps({"k": "y" * 2000}).encode())
    assert_unchanged(before, dump(store))


@pytest.mark.parametrize("kind", EVERY)
def test_a_login_over_max_size_keeps_the_old_session(kind: str, open_store: Callable[..., SessionStore]) -> None:
    """regenerate() moves the session to a new record: if that record is refused as too large,
    the old one must still be there (nothing partial: not a deletion without a creation)."""
    store = open_store(kind)
    mw = middleware(store, max_size=1024)
    client = logged_in(mw)
    before = dump(store)
    with pytest.raises(SessionTooLarge):
        call(mw, "/login", client.cookie, query="user=" + "z" * 2000)
    assert_unchanged(before, dump(store))
    assert client.request("/read").data == {"user": "victim"}


# -- a stolen copy of the store --------------------------------------------------------------------


TOKEN = re.compile(r"[A-Za-z0-9_.=-]{16,}")


@pytest.mark.parametrize("kind", EVERY)
def test_a_leaked_store_holds_no_usable_cookie(kind: str, open_store: Callable[..., SessionStore]) -> None:
    store = open_store(kind)
    old = middleware(store, secret=OLD_SECRET)
    mw = middleware(store, secret=[SECRET, OLD_SECRET])
    clients = [logged_in(mw, f"user{i}") for i in range(3)]
    rotated = logged_in(old, "rotated")
    rotated.mw = mw
    rotated.request("/read")  # re-signed with the current key
    regenerated = logged_in(mw, "regenerated")
    regenerated.request("/login", query="user=regenerated")
    clients += [rotated, regenerated]
    cookies = [c.cookie for c in clients if c.cookie is not None]
    assert len(cookies) == 5
    rows = dump(store)
    assert len(rows) == 5 * (2 if kind == "failover" else 1)
    everything = "\n".join(f"{r.key}\n{r.text}" for r in rows)
    assert all(f"user{i}" in everything for i in range(3))  # the dump is real
    for cookie in cookies:
        session_id = cookie[:ID_LENGTH]
        assert session_id not in everything and cookie.split(".")[2] not in everything
        assert any(r.key == store_key(session_id) for r in rows)  # filed under a one-way hash of the id
    # Nothing found in the dump logs anyone in, sent as the cookie or spliced into a genuine one's shape.
    candidates = {r.key for r in rows} | set(TOKEN.findall(everything))
    created = created_of(cookies[0])
    for token in candidates:
        for value in (token, f"{token[:ID_LENGTH]}.{created}.{token[-43:]}"):
            assert call(mw, "/read", value).data == {}, token


# -- timeouts --------------------------------------------------------------------------------------


def test_idle_timeout_on_every_store(open_store: Callable[..., SessionStore]) -> None:
    clients = {kind: logged_in(middleware(open_store(kind), max_age=1)) for kind in EVERY}
    first = {kind: c.cookie for kind, c in clients.items()}
    time.sleep(0.3)
    for kind, client in clients.items():
        res = client.request("/read")
        assert res.data == {"user": "victim"}, kind
        cookie = res.cookie()
        assert cookie is not None and cookie["max-age"] == "1", kind  # the idle timer restarted, Max-Age with it
    time.sleep(1.2)
    for kind, client in clients.items():
        assert stored(client.mw.store, client.id) is None, kind  # the store itself expired it
        assert client.request("/read").data == {}, kind
        assert call(client.mw, "/read", first[kind]).data == {}, kind


def test_absolute_timeout_ends_an_active_session_on_every_store(open_store: Callable[..., SessionStore]) -> None:
    lifetime = 1.5
    clients = {kind: Client(middleware(open_store(kind), max_age=1, absolute_timeout=lifetime)) for kind in EVERY}
    time.sleep(1.02 - time.time() % 1)  # just past a whole second: the signed creation time is the login time
    for client in clients.values():
        client.request("/login", query="user=victim")
    first = {kind: c.cookie or "" for kind, c in clients.items()}
    ids = {kind: c.id for kind, c in clients.items()}
    deadline = {kind: created_of(first[kind]) + lifetime for kind in clients}
    alive = dict.fromkeys(clients, 0)
    n = 0
    while time.time() < max(deadline.values()) + 0.4:
        n += 1
        for kind, client in clients.items():
            before = time.time()
            res = client.request("/set" if n % 2 else "/read", query=f"n={n}")
            after = time.time()
            if after < deadline[kind]:
                alive[kind] += 1
                assert res.data.get("user") == "victim", (kind, n)
                record = client.mw.store.load(store_key(ids[kind]))
                if time.time() < deadline[kind]:  # (a busy machine may reach the deadline since the request)
                    assert record is not None and record.expires <= deadline[kind] + 0.1, kind  # capped at it
                cookie = res.cookie()
                if cookie is not None and cookie["value"]:
                    assert int(cookie["max-age"]) <= math.ceil(deadline[kind] - before), kind
            elif before >= deadline[kind]:
                assert "user" not in res.data, (kind, n)  # however active, the session is over
        time.sleep(0.1)
    for kind, client in clients.items():
        assert alive[kind] >= 3, kind  # it was in use (written and touched) all along
        assert stored(client.mw.store, ids[kind]) is None, kind  # gone from the store, not only refused
        assert call(client.mw, "/read", first[kind]).data == {}, kind  # a replayed cookie finds nothing


@pytest.mark.parametrize("kind", EVERY)
def test_store_expiry_and_cookie_are_capped_at_the_absolute_deadline(
    kind: str, open_store: Callable[..., SessionStore]
) -> None:
    store = open_store(kind)
    mw = middleware(store, max_age=3600, absolute_timeout=30)
    client = Client(mw)
    before = time.time()
    res = client.request("/login")
    assert client.cookie is not None
    deadline = created_of(client.cookie) + 30
    cookie = res.cookie()
    assert cookie is not None and int(cookie["max-age"]) <= math.ceil(deadline - before)
    for path in ("/set", "/login"):  # a merge, then a regenerate (which keeps the creation time)
        client.request(path, query="x=1")
        assert created_of(client.cookie) + 30 == deadline
        for row in dump(store):
            assert row.expires <= deadline + 0.1, (path, row)


@pytest.mark.parametrize("kind", EVERY)
def test_a_cookie_past_its_absolute_deadline_names_no_session(
    kind: str, open_store: Callable[..., SessionStore]
) -> None:
    """The signed creation time is enforced by itself: even a record that still lives (a store
    that kept it longer) is not reachable with a cookie past the deadline."""
    store = open_store(kind)
    mw = middleware(store, absolute_timeout=60)
    session_id = new_id()
    store.create(store_key(session_id), {"user": '"victim"'}, 3600)
    old = mw.core.format.signer.sign(session_id, int(time.time()) - 61)
    res = call(mw, "/read", old)
    assert res.data == {} and res.expired
    assert call(mw, "/read", mw.core.format.signer.sign(session_id, int(time.time()) - 50)).data == {"user": "victim"}


# -- cookie attributes -------------------------------------------------------------------------------


def test_samesite_none_goes_out_with_secure_even_over_http() -> None:
    res = call(middleware(cookie_samesite="None", cookie_secure=True), "/set", query="x=1")
    cookie = res.cookie()
    assert cookie is not None
    assert cookie["samesite"] == "None" and cookie["secure"] is True and cookie["httponly"] is True
    with pytest.raises(ConfigError, match="SECURE"):
        middleware(cookie_samesite="None")  # automatic Secure is not enough: plain http would drop it


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_host_prefixed_cookie_has_what_browsers_require(scheme: str) -> None:
    mw = middleware(cookie_name="__Host-session", cookie_secure=True)
    res = call(mw, "/set", query="x=1", scheme=scheme)
    cookie = res.cookie("__Host-session")
    assert cookie is not None
    assert cookie["secure"] is True and cookie["path"] == "/" and "domain" not in cookie
    value = cookie["value"]
    res = call(mw, "/logout", header=f"__Host-session={value}", scheme=scheme)
    expired = res.cookie("__Host-session")
    assert expired is not None and expired["value"] == "" and expired["max-age"] == "0"
    # A browser accepts the deletion only with the same prefix requirements.
    assert expired["secure"] is True and expired["path"] == "/" and "domain" not in expired


@pytest.mark.parametrize(
    "options",
    [
        {"cookie_name": "__Host-session"},
        {"cookie_name": "__Host-session", "cookie_secure": False},
        {"cookie_name": "__Host-session", "cookie_secure": True, "cookie_path": "/app"},
        {"cookie_name": "__Host-session", "cookie_secure": True, "cookie_domain": "example.com"},
        {"cookie_name": "__Secure-session"},
        {"cookie_name": "__Secure-session", "cookie_secure": False},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_cookie_prefix_rules_are_checked_at_start_up(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=options["cookie_name"]):
        middleware(**options)


def test_secure_prefixed_cookie_may_have_a_path_and_domain() -> None:
    mw = middleware(cookie_name="__Secure-sid", cookie_secure=True, cookie_path="/app", cookie_domain="example.com")
    cookie = call(mw, "/set", query="x=1").cookie("__Secure-sid")
    assert cookie is not None and cookie["secure"] is True
    assert (cookie["path"], cookie["domain"]) == ("/app", "example.com")


@pytest.mark.parametrize("name", ["__HOST-session", "__host-session", "__SECURE-session", "__secure-session"])
def test_cookie_prefixes_are_matched_case_insensitively(name: str) -> None:
    """Browsers match the __Host- and __Secure- prefixes case-insensitively (RFC 6265bis):
    a "__host-" cookie sent without Secure is dropped by the browser, so it must not start."""
    with pytest.raises(ConfigError):
        middleware(cookie_name=name)


# -- secrets stay secret ---------------------------------------------------------------------------


def _secret_forms(secret: str) -> list[str]:
    key = hmac.digest(secret.encode(), b"wsgisession.cookie", "sha256")
    return [secret, key.hex(), base64.urlsafe_b64encode(key).decode().rstrip("="), base64.b64encode(key).decode()]


def test_no_secret_or_session_id_in_any_log_record(
    caplog: pytest.LogCaptureFixture, private_redis: RedisServer, make_store: Callable[..., SessionStore]
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, every level
    password = "redis-password-0123456789-s3cr3t"
    pg_password = "pg-password-9876543210-s3cr3t"
    redis.Redis.from_url(private_redis.url).config_set("requirepass", password)
    redis_url = f"redis://:{password}@127.0.0.1:{private_redis.port}/0"
    store = make_store("redis", url=redis_url, timeout=0.5)
    old = middleware(store, secret=OLD_SECRET)
    mw = middleware(store, secret=[SECRET, OLD_SECRET])
    seen: list[str] = []

    rotated = logged_in(old, "rotated")  # rotation: read with the new list, re-signed
    rotated.mw = mw
    assert rotated.request("/read").data == {"user": "rotated"}
    a, b = logged_in(mw, "a"), logged_in(mw, "b")
    seen += [c.cookie or "" for c in (a, b)] + [rotated.cookie or ""]
    call(mw, "/read", header=f"session={a.cookie}; session={b.cookie}")  # tossing
    for value in adversarial_values(a.cookie or "", b.cookie or "").values():  # forgeries
        call(mw, "/read", value)
    store.client.hset(store.prefix + store_key(b.id), "user", "{not json")  # a malformed record
    call(mw, "/read", b.cookie)
    private_redis.kill()  # store failures, loading and saving
    call(mw, "/read", a.cookie)
    mw.core._failures = RateLimitedLog()
    call(mw, "/set", query="x=1")
    dead_pg = PostgresStore(
        f"postgresql://postgres:{pg_password}@127.0.0.1:{free_port()}/test",
        create_table=False, cleanup_interval=0, timeout=1,
    )  # fmt: skip
    try:
        call(middleware(dead_pg), "/read", a.cookie)
    finally:
        dead_pg.close()

    texts = []
    for record in caplog.records:
        texts.append(record.getMessage())
        if record.exc_info:
            texts.append(logging.Formatter().formatException(record.exc_info))
    logged = "\n".join(texts)
    for expected in ("name different sessions", "malformed session record", "while loading", "while saving",
                     "Connection refused"):  # fmt: skip
        assert expected in logged, expected  # the scenario happened
    for secret in [*_secret_forms(SECRET), *_secret_forms(OLD_SECRET), password, pg_password]:
        assert secret not in logged
    for cookie in seen:
        assert cookie[:ID_LENGTH] not in logged and cookie.split(".")[2] not in logged


def test_no_secret_in_any_repr(make_store: Callable[..., SessionStore]) -> None:
    pg_password = "pg-password-9876543210-s3cr3t"
    parts = urlsplit(require_postgres())
    url = urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}:{pg_password}@{parts.hostname}:"
                                           f"{parts.port or 5432}"))  # fmt: skip
    table = unique("sess")
    postgres = PostgresStore(url, table=table, cleanup_interval=0)
    try:
        for store in (MemoryStore(), make_store("sqlite"), make_store("redis"), postgres):
            mw = middleware(store, secret=[SECRET, OLD_SECRET])
            client = logged_in(mw)
            cookie = client.cookie or ""
            session_id = client.id
            session = Session(lambda: Loaded(session_id, {"user": "victim"}))  # noqa: B023 - used at once
            session.get("user")
            texts = []
            core = mw.core
            for thing in (mw, mw.settings, core, core.format, vars(core), session, store, vars(mw),
                          getattr(store, "client", None)):  # fmt: skip
                texts += [repr(thing), str(thing)]
            text = "\n".join(texts)
            for secret in [*_secret_forms(SECRET), *_secret_forms(OLD_SECRET), pg_password]:
                assert secret not in text, type(store).__name__
            assert cookie[:ID_LENGTH] not in text and cookie.split(".")[2] not in text
    finally:
        postgres.close()
        drop_table(require_postgres(), table)
