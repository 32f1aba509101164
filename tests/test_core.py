"""The framework-free core, with plain values in and out: no WSGI environ, no framework.

What every front door relies on: a Cookie header names a session, a save returns the Set-Cookie
values that go with what changed, and the choices a framework passes in (a browser-session
cookie, no refresh on reads, a value codec) change exactly what they say.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from cookies import parse_set_cookies
from servers import SECRET

from wsgisession import ConfigError, MemoryStore, Session, SessionCore, SessionValueError, Settings
from wsgisession.session import Codec, encode, measure
from wsgisession.settings import prefixed


class CountingStore(MemoryStore):
    """A MemoryStore that counts the calls of each method."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def load(self, key: str) -> Any:
        self._count("load")
        return super().load(key)

    def touch(self, key: str, ttl: float) -> bool:
        self._count("touch")
        return super().touch(key, ttl)


def make_core(store: MemoryStore | None = None, codec: Codec | None = None, **overrides: Any) -> SessionCore:
    settings = Settings.load({}, secret=SECRET, **overrides)
    store = store if store is not None else MemoryStore()
    return SessionCore(settings, store) if codec is None else SessionCore(settings, store, codec)


def request(core: SessionCore, header: str | None = None, **save: Any) -> tuple[Session, list[str]]:
    """One request: open the visit from a Cookie header, let ``save["do"]`` use the session, save."""
    visit = core.open(header)
    session = core.session(visit)
    save.pop("do", lambda s: None)(session)
    save.setdefault("secure", False)
    return session, core.save(visit, session, **save)


def logged_in(core: SessionCore) -> str:
    """The Cookie header of a fresh session holding a user."""
    _, cookies = request(core, do=lambda s: s.update(user="ann"))
    return "session=" + parse_set_cookies(cookies)[0]["value"]


def test_a_cookie_header_names_the_session_it_was_given() -> None:
    core = make_core()
    header = logged_in(core)
    session, cookies = request(core, f"theme=dark; {header}", do=lambda s: s.get("user"))
    assert session["user"] == "ann" and not session.new
    assert cookies == []  # an unchanged read sends nothing


def test_an_untouched_session_costs_no_store_call_and_no_cookie() -> None:
    store = CountingStore()
    core = make_core(store)
    header = logged_in(core)
    session, cookies = request(core, header)
    assert (store.calls, cookies, session.accessed) == ({}, [], False)


def test_a_browser_session_cookie_has_no_expiry_but_the_store_still_expires_it() -> None:
    store = MemoryStore()
    core = make_core(store, max_age=60)
    session, cookies = request(core, persistent=False, do=lambda s: s.update(user="ann"))
    cookie = parse_set_cookies(cookies)[0]
    assert "max-age" not in cookie and "expires" not in cookie and cookie["httponly"] is True
    record = store.load(core.format.store_key(session.id))
    assert record is not None and record.expires <= time.time() + 60


def test_refresh_false_leaves_an_unchanged_read_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    store = CountingStore()
    core = make_core(store, max_age=3600)
    header = logged_in(core)
    later = time.time() + 600  # past the once-a-minute refresh window
    monkeypatch.setattr(time, "time", lambda: later)
    _, cookies = request(core, header, refresh=False, do=lambda s: s.get("user"))
    assert cookies == [] and "touch" not in store.calls
    _, cookies = request(core, header, refresh=True, do=lambda s: s.get("user"))
    assert store.calls["touch"] == 1 and parse_set_cookies(cookies)[0]["max-age"] == "3600"


def test_httponly_and_partitioned_are_settings() -> None:
    _, cookies = request(make_core(cookie_httponly=False), do=lambda s: s.update(a=1))
    assert "httponly" not in parse_set_cookies(cookies)[0]
    _, cookies = request(make_core(cookie_partitioned=True, cookie_secure=True), do=lambda s: s.update(a=1))
    cookie = parse_set_cookies(cookies)[0]
    assert cookie["partitioned"] is True and cookie["secure"] is True
    with pytest.raises(ConfigError, match="PARTITIONED needs SESSION_COOKIE_SECURE"):
        make_core(cookie_partitioned=True)


def test_secure_follows_the_request_unless_set() -> None:
    _, cookies = request(make_core(), secure=True, do=lambda s: s.update(a=1))
    assert parse_set_cookies(cookies)[0]["secure"] is True
    _, cookies = request(make_core(cookie_secure=False), secure=True, do=lambda s: s.update(a=1))
    assert "secure" not in parse_set_cookies(cookies)[0]


class Tuples(Codec):
    """A codec that keeps tuples, as a front door's richer types would be kept."""

    def encode(self, key: str, value: Any) -> str:
        return encode(key, {"tuple": list(value)} if isinstance(value, tuple) else value)

    def measure(self, value: Any) -> str:
        return measure({"tuple": list(value)} if isinstance(value, tuple) else value)

    def load(self, data: dict[str, Any]) -> dict[str, Any]:
        return {k: tuple(v["tuple"]) if isinstance(v, dict) and "tuple" in v else v for k, v in data.items()}


def test_a_codec_carries_types_json_has_not_and_their_changes() -> None:
    store = MemoryStore()
    core = make_core(store, codec=Tuples())
    _, cookies = request(core, do=lambda s: s.update(point=(1, 2), user="ann"))
    header = "session=" + parse_set_cookies(cookies)[0]["value"]
    session, _ = request(core, header, do=lambda s: s.get("point"))
    assert session["point"] == (1, 2)
    session, _ = request(core, header, do=lambda s: s.update(point=(3, 4)))
    assert set(session.changes().set) == {"point"}  # the tuple key only, not the untouched one
    session, _ = request(core, header, do=lambda s: s.get("point"))
    assert session["point"] == (3, 4)
    plain, _ = request(make_core(store), header, do=lambda s: s.get("point"))  # another front door, plain JSON
    assert plain["point"] == {"tuple": [3, 4]} and plain["user"] == "ann"


def test_the_express_format_keeps_its_cookie_key() -> None:
    core = make_core(format="express")
    with pytest.raises(SessionValueError, match=r"session\[.cookie.\] is the express format.s own"):
        request(core, do=lambda s: s.update(cookie={"a": 1}))


def test_settings_come_from_any_mapping_of_the_variable_names() -> None:
    framework = {"SESSION_SECRET": SECRET, "SESSION_MAX_AGE": 120000, "SESSION_COOKIE_HTTPONLY": False,
                 "REDIS_URL": None, "SESSION_COOKIE_NAME": ""}  # fmt: skip
    settings = Settings.load(framework)
    assert (settings.max_age, settings.cookie_httponly, settings.redis_url) == (120.0, False, None)
    assert settings.cookie_name == "session"  # an empty value counts as unset
    pyramid = {"wsgisession.secret": SECRET, "wsgisession.redis_url": "redis://127.0.0.1:6379/3",
               "wsgisession.cookie_name": "sid", "other.key": "x", "wsgisession.table": ""}  # fmt: skip
    assert prefixed(pyramid, "wsgisession.") == {
        "SESSION_SECRET": SECRET, "REDIS_URL": "redis://127.0.0.1:6379/3", "SESSION_COOKIE_NAME": "sid"
    }  # fmt: skip
    assert Settings.load(prefixed(pyramid, "wsgisession.")).cookie_name == "sid"
