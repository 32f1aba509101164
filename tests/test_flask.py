"""``flask.session`` through wsgisession's interface, as a Flask application sees it.

Behaviour that involves the store (logins, flash messages, Flask-Login, Flask-WTF, tagged values, concurrent
requests, rotation of SECRET_KEY) runs on every store kind; the cookie settings on MemoryStore. The example
app (examples/flask_app.py) is driven at the end, on its default SQLite file and on Redis.
"""

from __future__ import annotations

import http.client
import importlib.util
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import flask
import pytest
from cookies import parse_set_cookies
from flask.testing import FlaskClient
from flask_login import LoginManager, UserMixin, current_user, login_required, login_user, logout_user
from flask_wtf.csrf import CSRFProtect, generate_csrf
from markupsafe import Markup
from servers import SECRET, RedisServer, free_port, require_redis, unique
from werkzeug.test import Client

from wsgisession import ConfigError, MemoryStore, SessionMiddleware, SessionStore, SessionValueError, SQLiteStore
from wsgisession.frameworks.flask import FlaskSession, SessionInterface, init_app
from wsgisession.stores.redis import RedisStore

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flask_app.py"
KEY_A, KEY_B, KEY_C = (secrets.token_urlsafe(32) for _ in range(3))
CREATED = int(time.time())
StoreKinds = Callable[..., SessionStore]


def is_session_setting(variable: str) -> bool:
    return variable.startswith("SESSION_") or variable in ("REDIS_URL", "DATABASE_URL")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """init_app reads os.environ under app.config: start every test from none of our variables."""
    for variable in filter(is_session_setting, list(os.environ)):
        monkeypatch.delenv(variable)


def make_app(store: SessionStore, **config: Any) -> flask.Flask:
    """A small app whose views use flask.session as applications do; signed with SECRET unless
    ``config`` names a secret."""
    app = flask.Flask(__name__)
    app.config.update(TESTING=True, **config)
    if "SECRET_KEY" not in config and "SESSION_SECRET" not in config:
        app.config["SESSION_SECRET"] = SECRET

    @app.get("/api/session")
    def api_session() -> dict[str, Any]:
        return {"user": flask.session.get("user"), "count": flask.session.get("count", 0)}

    @app.get("/nothing")
    def nothing() -> str:
        return "nothing"

    @app.post("/login")
    def login() -> str:
        flask.session.regenerate()  # type: ignore[attr-defined]
        flask.session["user"] = flask.request.form["user"]
        return "welcome"

    @app.post("/logout")
    def logout() -> str:
        flask.session.invalidate()  # type: ignore[attr-defined]
        return "bye"

    @app.post("/counter")
    def counter() -> str:
        flask.session["count"] = flask.session.get("count", 0) + 1
        return str(flask.session["count"])

    @app.post("/set")
    def set_values() -> str:
        flask.session.update(flask.request.form)
        return "set"

    @app.post("/permanent")
    def permanent() -> str:
        flask.session.permanent = flask.request.form.get("permanent") == "yes"
        return "set"

    init_app(app, store)
    return app


def cookies_of(response: Any, name: str = "session") -> list[dict[str, Any]]:
    return parse_set_cookies(response.headers.getlist("Set-Cookie"), name)


def session_cookie(response: Any, name: str = "session") -> str:
    """The value of the one session cookie the response sets."""
    [cookie] = cookies_of(response, name)
    return str(cookie["value"])


def visitor(app: flask.Flask, cookie: str | None = None) -> FlaskClient:
    """A client of its own, presenting ``cookie`` as its session cookie."""
    client = app.test_client()
    if cookie is not None:
        client.set_cookie("session", cookie)
    return client


def interface(app: flask.Flask) -> SessionInterface:
    found = app.session_interface
    assert isinstance(found, SessionInterface)
    return found


def stored(app: flask.Flask, cookie: str) -> dict[str, Any] | None:
    """What the store holds for the session a cookie names (None: nothing)."""
    core = interface(app).core
    identity = core.identify([cookie])
    assert identity is not None
    record = core.store.load(identity.key)
    return None if record is None else record.data


# -- logging in and out, flash messages, Flask-Login, Flask-WTF ------------------------------------------


def test_login_regenerates_and_logout_ends_the_session(store: SessionStore) -> None:
    app = make_app(store)
    browser = app.test_client()
    anonymous = session_cookie(browser.post("/counter"))
    logged_in = session_cookie(browser.post("/login", data={"user": "alice"}))
    assert logged_in != anonymous  # a cookie planted before the login is worth nothing
    assert visitor(app, anonymous).get("/api/session").json == {"user": None, "count": 0}
    assert browser.get("/api/session").json == {"user": "alice", "count": 1}  # the data moved to the new id

    response = browser.post("/logout")
    [expired] = cookies_of(response)
    assert expired["value"] == "" and expired["max-age"] == "0"
    assert browser.get("/api/session").json == {"user": None, "count": 0}
    assert visitor(app, logged_in).get("/api/session").json == {"user": None, "count": 0}  # every copy ends
    assert stored(app, logged_in) is None


def test_flash_messages_reach_the_next_request_once(store: SessionStore) -> None:
    app = make_app(store)

    @app.post("/save")
    def save() -> str:
        flask.flash("Saved")
        flask.flash(Markup("<b>Careful</b>"), "warning")
        return ""

    @app.get("/messages")
    def messages() -> list[Any]:
        return [[category, str(message), type(message).__name__]
                for category, message in flask.get_flashed_messages(with_categories=True)]  # fmt: skip

    browser = app.test_client()
    browser.post("/save")
    assert browser.get("/messages").json == [["message", "Saved", "str"], ["warning", "<b>Careful</b>", "Markup"]]
    assert browser.get("/messages").json == []


def test_flask_login(store: SessionStore) -> None:
    app = make_app(store)
    manager = LoginManager(app)

    class User(UserMixin):
        def __init__(self, user_id: str) -> None:
            self.id = user_id

    @manager.user_loader
    def load_user(user_id: str) -> User | None:
        return User(user_id) if user_id in ("alice", "bob") else None

    @app.post("/flask-login")
    def flask_login() -> str:
        flask.session.regenerate()  # type: ignore[attr-defined]
        login_user(User(flask.request.form["user"]))
        return ""

    @app.get("/private")
    @login_required
    def private() -> str:
        return f"hello {current_user.id}"

    @app.post("/flask-logout")
    def flask_logout() -> str:
        logout_user()
        return ""

    alice, bob = app.test_client(), app.test_client()
    assert alice.get("/private").status_code == 401
    alice.post("/flask-login", data={"user": "alice"})
    bob.post("/flask-login", data={"user": "bob"})
    assert alice.get("/private").text == "hello alice"
    assert bob.get("/private").text == "hello bob"
    alice.post("/flask-logout")
    assert alice.get("/private").status_code == 401
    assert bob.get("/private").text == "hello bob"


def test_flask_wtf_csrf(store: SessionStore) -> None:
    app = make_app(store, SECRET_KEY=KEY_A)  # Flask-WTF signs its tokens with SECRET_KEY, and so do we here
    CSRFProtect(app)

    @app.route("/form", methods=["GET", "POST"])
    def form() -> str:
        return f"accepted {flask.request.form['text']}" if flask.request.method == "POST" else generate_csrf()

    browser = app.test_client()
    assert browser.post("/form", data={"text": "hi"}).status_code == 400  # no token
    token = browser.get("/form").text
    assert browser.post("/form", data={"text": "hi", "csrf_token": token}).text == "accepted hi"
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert browser.post("/form", data={"text": "hi", "csrf_token": forged}).status_code == 400
    other = app.test_client()  # a token from another session is refused
    other.get("/form")
    assert other.post("/form", data={"text": "hi", "csrf_token": token}).status_code == 400


# -- values: Flask's tagged JSON ---------------------------------------------------------------------------

WHEN = datetime(2024, 2, 29, 12, 30, 15, tzinfo=timezone.utc)
TAGGED: dict[str, Any] = {
    "tuple": (1, "two", 3.5),
    "bytes": b"\xff\x00binary",
    "markup": Markup("<em>safe</em>"),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "datetime": WHEN,
    "looks_tagged": {" t": "not-a-tuple"},
    "looks_tagged_too": {" t__": "not-a-tuple"},
    "nested": {"flashes": [("message", Markup("<b>x</b>")), ("error", "plain")], "at": [WHEN, (1, (2, b"3"))]},
    "plain": {"list": [1, 2], "text": "é \u2603"},
}


def test_tagged_values_round_trip_as_in_flasks_own_session(store: SessionStore) -> None:
    app = make_app(store)

    @app.post("/tagged")
    def tagged() -> str:
        flask.session.update(TAGGED)
        return ""

    @app.get("/touch")
    def touch() -> str:
        return str(len(flask.session))

    @app.post("/append")
    def append() -> str:
        flask.session["nested"]["at"].append((4, 5))  # in place: no reassignment
        return ""

    browser = app.test_client()
    cookie = session_cookie(browser.post("/tagged"))
    with browser:
        response = browser.get("/touch")
        session = flask.session
        for key, value in TAGGED.items():
            assert session[key] == value, key
            assert type(session[key]) is type(value), key
        assert type(session["nested"]["flashes"][0][1]) is Markup
    assert cookies_of(response) == []  # reading tagged values does not rewrite them
    data = stored(app, cookie)
    assert data is not None
    assert data["tuple"] == {" t": [1, "two", 3.5]}  # JSON another front door can read, not a pickle
    assert data["looks_tagged"] == {" di": {" t__": "not-a-tuple"}}  # Flask's own escape

    browser.post("/append")
    with browser:
        browser.get("/touch")
        assert flask.session["nested"]["at"] == [WHEN, (1, (2, b"3")), (4, 5)]


def test_a_value_tagged_json_cannot_hold_is_refused_where_it_is_stored() -> None:
    app = make_app(MemoryStore())

    @app.post("/set-a-set")
    def set_a_set() -> str:
        flask.session["numbers"] = {1, 2}
        return ""

    with pytest.raises(SessionValueError, match="numbers"):
        app.test_client().post("/set-a-set")


# -- Flask's settings, seen in Set-Cookie ------------------------------------------------------------------


def first_cookie(config: dict[str, Any], base_url: str = "http://localhost/", name: str = "session") -> dict[str, Any]:
    """The session cookie an app with ``config`` sets when a session starts."""
    app = make_app(MemoryStore(), **config)
    [cookie] = cookies_of(app.test_client().post("/counter", base_url=base_url), name)
    return cookie


def attributes(cookie: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cookie.items() if k != "value"}


def test_the_default_cookie_is_a_hardened_browser_session_cookie() -> None:
    # Flask's defaults: a session is not permanent (no Expires), SameSite None reads as Lax, Secure on https.
    assert attributes(first_cookie({})) == {"path": "/", "httponly": True, "samesite": "Lax"}
    assert attributes(first_cookie({}, "https://localhost/")) == {
        "path": "/", "secure": True, "httponly": True, "samesite": "Lax"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"SESSION_COOKIE_DOMAIN": "example.com"}, {"domain": "example.com"}),
        ({"SESSION_COOKIE_DOMAIN": ".example.com"}, {"domain": "example.com"}),  # as werkzeug writes it
        ({"SESSION_COOKIE_PATH": "/app"}, {"path": "/app"}),
        ({"APPLICATION_ROOT": "/root"}, {"path": "/root"}),
        ({"APPLICATION_ROOT": "/root", "SESSION_COOKIE_PATH": "/app"}, {"path": "/app"}),
        ({"SESSION_COOKIE_HTTPONLY": False}, {"httponly": None}),
        ({"SESSION_COOKIE_SECURE": True}, {"secure": True}),
        ({"SESSION_COOKIE_SAMESITE": "Strict"}, {"samesite": "Strict"}),
        ({"SESSION_COOKIE_SAMESITE": None}, {"samesite": "Lax"}),
        ({"SESSION_COOKIE_SAMESITE": "None", "SESSION_COOKIE_SECURE": True}, {"samesite": "None", "secure": True}),
        ({"SESSION_COOKIE_PARTITIONED": True, "SESSION_COOKIE_SECURE": True}, {"partitioned": True, "secure": True}),
    ],
)
def test_flasks_cookie_settings_are_honoured(config: dict[str, Any], expected: dict[str, Any]) -> None:
    cookie = first_cookie(config, base_url="http://example.com/root/app/")
    for attribute, value in expected.items():
        assert cookie.get(attribute) == value, (attribute, cookie)


def test_the_cookie_name_setting_names_the_cookie_read_and_written() -> None:
    app = make_app(MemoryStore(), SESSION_COOKIE_NAME="sid")
    browser = app.test_client()
    assert cookies_of(browser.post("/counter"), "sid") != []
    assert browser.post("/counter").text == "2"
    assert browser.get_cookie("session") is None


def test_settings_browsers_refuse_stop_start_up() -> None:
    with pytest.raises(ConfigError, match="PARTITIONED needs SESSION_COOKIE_SECURE"):
        make_app(MemoryStore(), SESSION_COOKIE_PARTITIONED=True)
    with pytest.raises(ConfigError, match="SAMESITE must be"):
        make_app(MemoryStore(), SESSION_COOKIE_SAMESITE="sometimes")


def test_a_permanent_session_lasts_the_lifetime_a_browser_session_ends_with_the_browser() -> None:
    app = make_app(MemoryStore(), PERMANENT_SESSION_LIFETIME=timedelta(hours=2))
    browser = app.test_client()
    [permanent] = cookies_of(browser.post("/permanent", data={"permanent": "yes"}))
    assert permanent["max-age"] == "7200"
    expires = datetime.strptime(permanent["expires"], "%a, %d %b %Y %H:%M:%S GMT").replace(tzinfo=timezone.utc)
    assert abs(expires.timestamp() - (time.time() + 7200)) < 60
    [browser_session] = cookies_of(browser.post("/permanent", data={"permanent": "no"}))
    assert "max-age" not in browser_session and "expires" not in browser_session


def test_a_browser_session_still_expires_in_the_store() -> None:
    app = make_app(MemoryStore(), PERMANENT_SESSION_LIFETIME=1)  # seconds, as Flask takes them too
    browser = app.test_client()
    browser.post("/login", data={"user": "alice"})
    time.sleep(1.1)
    assert browser.get("/api/session").json == {"user": None, "count": 0}


@pytest.mark.parametrize("refresh", [True, False])
def test_refresh_each_request(refresh: bool) -> None:
    # An unchanged read extends the session (and sends its cookie again) once a tenth of the lifetime has passed.
    store = MemoryStore()
    app = make_app(store, PERMANENT_SESSION_LIFETIME=timedelta(seconds=2), SESSION_REFRESH_EACH_REQUEST=refresh)
    browser = app.test_client()
    cookie = session_cookie(browser.post("/permanent", data={"permanent": "yes"}))
    core = interface(app).core
    key = core.identify([cookie]).key  # type: ignore[union-attr]
    before = store.load(key).expires  # type: ignore[union-attr]
    time.sleep(0.3)
    response = browser.get("/api/session")
    after = store.load(key).expires  # type: ignore[union-attr]
    if refresh:
        assert cookies_of(response)[0]["max-age"] == "2"
        assert after > before + 0.25
    else:
        assert cookies_of(response) == []
        assert after == before


def test_our_variables_fill_in_where_flask_keeps_its_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_COOKIE_SECURE", "true")
    monkeypatch.setenv("SESSION_COOKIE_NAME", "from_env")
    monkeypatch.setenv("SESSION_MAX_AGE", "3600000")  # milliseconds
    cookie = first_cookie({}, name="from_env")
    assert cookie.get("secure") is True  # Flask's SESSION_COOKIE_SECURE=False is its default: not a choice
    assert first_cookie({"SESSION_COOKIE_NAME": "from_config"}, name="from_config")  # Flask's, set: it wins

    app = make_app(MemoryStore())
    browser = app.test_client()
    assert cookies_of(browser.post("/permanent", data={"permanent": "yes"}), "from_env")[0]["max-age"] == "3600"
    app = make_app(MemoryStore(), PERMANENT_SESSION_LIFETIME=600)
    browser = app.test_client()
    assert cookies_of(browser.post("/permanent", data={"permanent": "yes"}), "from_env")[0]["max-age"] == "600"


def test_app_config_comes_before_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_SECRET", "too-short")
    monkeypatch.setenv("SESSION_MAX_SIZE", "100")
    app = make_app(MemoryStore(), SESSION_SECRET=SECRET, SESSION_MAX_SIZE=2048)
    assert interface(app).core.settings.max_size == 2048
    assert app.test_client().post("/counter").status_code == 200


def test_a_setting_changed_after_init_app_applies_from_the_next_request() -> None:
    # Flask reads its settings on every request; tests in particular change them on a running app.
    app = make_app(MemoryStore())
    browser = app.test_client()
    browser.post("/counter")
    app.config["SESSION_COOKIE_SAMESITE"] = "Strict"
    assert cookies_of(browser.post("/set", data={"x": "1"}))[0]["samesite"] == "Strict"
    assert browser.post("/counter").text == "2"  # same store, same session
    app.config["SESSION_COOKIE_SAMESITE"] = "often"
    with pytest.raises(ConfigError):
        browser.post("/counter")


# -- the secret --------------------------------------------------------------------------------------------


def test_secret_key_rotation_with_fallbacks(store: SessionStore) -> None:
    first = make_app(store, SECRET_KEY=KEY_A)
    signed_a = session_cookie(first.test_client().post("/login", data={"user": "alice"}))

    rotated = make_app(store, SECRET_KEY=KEY_B, SECRET_KEY_FALLBACKS=[KEY_A])  # the next deployment
    response = visitor(rotated, signed_a).get("/api/session")
    assert response.json == {"user": "alice", "count": 0}
    signed_b = session_cookie(response)  # the old cookie is signed again with the new key
    assert signed_b != signed_a

    again = make_app(store, SECRET_KEY=KEY_C, SECRET_KEY_FALLBACKS=[KEY_B])
    assert visitor(again, signed_b).get("/api/session").json == {"user": "alice", "count": 0}
    assert visitor(again, signed_a).get("/api/session").json == {"user": None, "count": 0}  # KEY_A is retired
    done = make_app(store, SECRET_KEY=KEY_C)
    assert visitor(done, signed_b).get("/api/session").json == {"user": None, "count": 0}


def test_session_secret_comes_before_secret_key() -> None:
    app = make_app(MemoryStore(), SESSION_SECRET=SECRET, SECRET_KEY=KEY_A)
    cookie = session_cookie(app.test_client().post("/login", data={"user": "alice"}))
    shared = make_app(MemoryStore(), SESSION_SECRET=SECRET)  # another app: a different store, the same signer
    assert interface(shared).core.identify([cookie]) is not None
    assert interface(make_app(MemoryStore(), SECRET_KEY=KEY_A)).core.identify([cookie]) is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "Neither SESSION_SECRET nor SECRET_KEY is set"),
        ({"SECRET_KEY": "dev"}, "Flask's SECRET_KEY .* is refused: SESSION_SECRET is a well-known or trivial"),
        ({"SECRET_KEY": "a-fairly-long-but-not-32"}, "SECRET_KEY .* refused: .* too short"),
        ({"SECRET_KEY": KEY_A, "SECRET_KEY_FALLBACKS": ["old-short-key-1"]}, r"secret 2 of the list\) is too short"),
        ({"SESSION_SECRET": "keyboard cat", "SECRET_KEY": KEY_A}, "SESSION_SECRET is a well-known"),
    ],
)
def test_a_missing_or_weak_secret_stops_start_up(config: dict[str, Any], message: str) -> None:
    app = flask.Flask(__name__)
    app.config.update(config)
    with pytest.raises(ConfigError, match=message):
        init_app(app, MemoryStore())
    assert not isinstance(app.session_interface, SessionInterface)


def test_a_random_bytes_secret_key_is_taken() -> None:
    app = make_app(MemoryStore(), SECRET_KEY=os.urandom(24))
    browser = app.test_client()
    browser.post("/login", data={"user": "alice"})
    assert browser.get("/api/session").json == {"user": "alice", "count": 0}


# -- guarantees: laziness, Vary, concurrency, outages, ids ---------------------------------------------------


class CountingStore(MemoryStore):
    """A MemoryStore that records the calls made to it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def load(self, key: str) -> Any:
        self.calls.append("load")
        return super().load(key)

    def create(self, key: str, data: Any, ttl: float) -> None:
        self.calls.append("create")
        super().create(key, data, ttl)

    def update(self, key: str, changes: Any, ttl: float) -> bool:
        self.calls.append("update")
        return super().update(key, changes, ttl)

    def touch(self, key: str, ttl: float) -> bool:
        self.calls.append("touch")
        return super().touch(key, ttl)

    def delete(self, key: str) -> None:
        self.calls.append("delete")
        super().delete(key)


def test_a_request_that_does_not_use_the_session_costs_no_store_call() -> None:
    store = CountingStore()
    app = make_app(store)
    browser = app.test_client()
    assert browser.get("/api/session").json == {"user": None, "count": 0}
    assert store.calls == []  # no cookie: nothing to load
    browser.post("/login", data={"user": "alice"})
    store.calls.clear()

    with browser:
        response = browser.get("/nothing")
        session = flask.globals.request_ctx._get_current_object()._session
        assert isinstance(session, FlaskSession) and not session.accessed
    assert store.calls == []
    assert "Vary" not in response.headers and cookies_of(response) == []
    browser.get("/api/session")
    assert store.calls == ["load"]
    store.calls.clear()
    browser.post("/counter")
    assert store.calls == ["load", "update"]


def test_vary_cookie_on_responses_that_used_the_session() -> None:
    app = make_app(MemoryStore())

    @app.get("/compressed")
    def compressed() -> flask.Response:
        response = flask.make_response(str(flask.session.get("count", 0)))
        response.vary.add("Accept-Encoding")
        return response

    browser = app.test_client()
    assert browser.get("/api/session").headers["Vary"] == "Cookie"
    assert browser.get("/compressed").headers.getlist("Vary") == ["Accept-Encoding, Cookie"]
    assert "Vary" not in browser.get("/nothing").headers


def add_slow_view(app: flask.Flask) -> Callable[[str, Callable[[], object]], Any]:
    """A view that loads the session, waits while something else runs, then sets key "slow"; and the
    function that runs it as ``overlapping(cookie, during)``, returning its response."""
    loaded, go = threading.Event(), threading.Event()

    @app.post("/slow")
    def slow() -> str:
        flask.session.get("user")
        loaded.set()
        assert go.wait(10)
        flask.session["slow"] = "written"
        return ""

    def overlapping(cookie: str, during: Callable[[], object]) -> Any:
        result: list[Any] = []
        thread = threading.Thread(target=lambda: result.append(visitor(app, cookie).post("/slow")))
        thread.start()
        try:
            assert loaded.wait(10)
            during()
        finally:
            go.set()
            thread.join(10)
        [response] = result
        assert response.status_code == 200
        return response

    return overlapping


def test_two_overlapping_requests_keep_both_changes(store: SessionStore) -> None:
    app = make_app(store)
    overlapping = add_slow_view(app)
    cookie = session_cookie(app.test_client().post("/login", data={"user": "alice"}))
    overlapping(cookie, lambda: visitor(app, cookie).post("/set", data={"fast": "written"}))
    assert stored(app, cookie) == {"user": "alice", "slow": "written", "fast": "written"}


def test_a_request_that_began_before_a_logout_does_not_bring_the_session_back(store: SessionStore) -> None:
    app = make_app(store)
    overlapping = add_slow_view(app)
    cookie = session_cookie(app.test_client().post("/login", data={"user": "alice"}))
    response = overlapping(cookie, lambda: visitor(app, cookie).post("/logout"))
    assert cookies_of(response) == []  # nor a cookie that would undo the logout's
    assert stored(app, cookie) is None
    assert visitor(app, cookie).get("/api/session").json == {"user": None, "count": 0}


def test_a_store_outage_degrades_to_an_empty_session(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore(private_redis.url, prefix=unique("flask") + ":", timeout=0.5)
    try:
        app = make_app(store)
        browser = app.test_client()
        browser.post("/login", data={"user": "alice"})
        private_redis.kill()
        with caplog.at_level(logging.WARNING, logger="wsgisession"):
            response = browser.get("/api/session")
            assert response.status_code == 200 and response.json == {"user": None, "count": 0}
            counted = browser.post("/counter")
            assert counted.status_code == 200 and cookies_of(counted) == []  # nothing saved, cookie kept
        assert "Session store failed while loading a session" in caplog.text
        assert browser.get_cookie("session") is not None
    finally:
        store.close()


def test_a_client_chosen_id_is_never_adopted() -> None:
    app = make_app(MemoryStore())
    core = interface(app).core
    chosen = core.format.new_id()
    planted = core.sign(chosen, CREATED)  # genuine signature, but no such session in the store
    response = visitor(app, planted).post("/counter")
    identity = core.identify([session_cookie(response)])
    assert identity is not None and identity.id != chosen
    assert session_cookie(visitor(app, "made-up-value").post("/counter")) != "made-up-value"


def test_one_login_seen_by_a_flask_app_and_a_raw_wsgi_app(store: SessionStore) -> None:
    app = make_app(store)

    def raw_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(environ["session"].get("user")).encode()]

    raw = SessionMiddleware(raw_app, store, secret=SECRET)
    cookie = session_cookie(app.test_client().post("/login", data={"user": "alice"}))
    assert Client(raw, use_cookies=False).get("/", headers={"Cookie": f"session={cookie}"}).text == "alice"


# -- the example: examples/flask_app.py ---------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def example(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[flask.Flask]:
    """examples/flask_app.py imported fresh, its store chosen from the environment: the default (SQLite) or Redis."""
    monkeypatch.setenv("SESSION_SECRET", SECRET)
    monkeypatch.setenv("SESSION_SQLITE_PATH", str(tmp_path / "sessions.sqlite3"))
    monkeypatch.setenv("SESSION_CLEANUP_INTERVAL", "0")
    if request.param == "redis":
        monkeypatch.setenv("REDIS_URL", require_redis())
        monkeypatch.setenv("SESSION_REDIS_PREFIX", unique("flaskdemo") + ":")
    spec = importlib.util.spec_from_file_location("example_flask_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = module.app
    store = interface(app).store
    assert isinstance(store, SQLiteStore if request.param == "sqlite" else RedisStore)
    yield app
    if isinstance(store, RedisStore):
        store.clear()
    interface(app).close()


def test_example_pages_that_start_no_session_set_no_cookie(example: flask.Flask) -> None:
    browser = example.test_client()
    home = browser.get("/")
    assert home.status_code == 200 and 'action="/login"' in home.text and "Count: 0" in home.text
    assert cookies_of(home) == [] and home.headers["Vary"] == "Cookie"
    assert browser.get("/api/session").json == {"user": None, "count": 0}
    missing = browser.get("/no/such/page")
    assert missing.status_code == 404 and cookies_of(missing) == [] and "Vary" not in missing.headers
    assert browser.post("/login", data={"username": "  "}).status_code == 400
    assert browser.get_cookie("session") is None


def test_example_login_flash_counter_logout(example: flask.Flask) -> None:
    browser = example.test_client()
    before = session_cookie(browser.post("/counter"))
    response = browser.post("/login", data={"username": "Zoë <script>"})
    assert response.status_code == 303 and response.headers["Location"] == "/"
    after = session_cookie(response)
    assert after != before
    home = browser.get("/").text
    assert '<p class="flash">Welcome, Zoë &lt;script&gt;!</p>' in home
    assert "Logged in as <b>Zoë &lt;script&gt;</b>" in home and "Count: 1" in home
    assert "flash" not in browser.get("/").text  # shown once
    browser.post("/counter")
    assert browser.get("/api/session").json == {"user": "Zoë <script>", "count": 2}
    assert visitor(example, before).get("/api/session").json == {"user": None, "count": 0}

    assert browser.post("/logout").status_code == 303
    home = browser.get("/").text
    assert '<p class="flash">You are logged out.</p>' in home and 'action="/login"' in home
    assert visitor(example, after).get("/api/session").json == {"user": None, "count": 0}


def test_example_runs_as_a_script_and_says_which_store_it_chose(tmp_path: Path) -> None:
    port, prefix = free_port(), unique("flaskdemo") + ":"
    env = {k: v for k, v in os.environ.items() if not is_session_setting(k)}
    env.update(SESSION_SECRET=SECRET, REDIS_URL=require_redis(), SESSION_REDIS_PREFIX=prefix, PORT=str(port))
    process = subprocess.Popen([sys.executable, str(EXAMPLE)], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == f"Serving on http://127.0.0.1:{port}"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/login", "username=carol", {"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        response.read()
        cookie = response.getheader("Set-Cookie", "").split(";")[0]
        conn.request("GET", "/api/session", headers={"Cookie": cookie})
        assert conn.getresponse().read() == b'{"count":0,"user":"carol"}\n'
        conn.close()
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=10)
        RedisStore(require_redis(), prefix=prefix).clear()
    assert "Using Redis for session storage" in errors  # an INFO line: the script shows them
