"""Flask's own session tests, from the source distribution of the installed Flask, against our interface.

The session and flashing tests of Flask's ``tests/test_basic.py`` (and the few in ``test_testing.py``,
``test_helpers.py`` and ``test_signals.py``) run here unchanged, with Flask's fixtures rebuilt so that
``flask.session`` is ours, on each store. Nothing of Flask's is copied: the modules are loaded from
``tests/.upstream/`` at collection time. A test that cannot pass by design is an expected failure
(strict: if it starts passing, the suite says so), with the reason; the README lists them.
``test_session_interface.py`` has one test, of a session interface of its own: nothing there applies.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import flask
import pytest
from flask.globals import request_ctx
from servers import SECRET
from upstream import sdist

from wsgisession import SessionStore
from wsgisession.frameworks.flask import init_app

TESTS = sdist("Flask") / "tests"
FLASK_LIFETIME = 31 * 86400 * 1000  # Flask's PERMANENT_SESSION_LIFETIME, in SESSION_ABSOLUTE_TIMEOUT's milliseconds


def load(name: str) -> ModuleType:
    """Flask's tests/NAME.py as a module of its own name (theirs is not importable, nor should be)."""
    spec = importlib.util.spec_from_file_location(f"flask_upstream_{name}", TESTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cannot_pass(test: Callable[..., Any], reason: str) -> Callable[..., Any]:
    return pytest.mark.xfail(strict=True, reason=reason)(test)


# -- their fixtures (tests/conftest.py), with our interface ---------------------------------------


@pytest.fixture(autouse=True)
def no_session_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the CI environment says, the settings are the app's."""
    for variable in list(os.environ):
        if variable.startswith("SESSION_") or variable in ("REDIS_URL", "DATABASE_URL"):
            monkeypatch.delenv(variable)


@pytest.fixture(params=["memory", "redis", "postgres"])
def app(request: pytest.FixtureRequest, make_store: Callable[..., SessionStore]) -> flask.Flask:
    """Their app (TESTING, SECRET_KEY "test key"), with our interface on a store of each kind. Their key
    is too short for our check, so SESSION_SECRET signs; the absolute timeout is raised to Flask's
    31-day lifetime, which it would otherwise cap at 7 days."""
    app = flask.Flask("flask_test", root_path=str(TESTS))
    app.config.update(
        TESTING=True, SECRET_KEY="test key", SESSION_SECRET=SECRET, SESSION_ABSOLUTE_TIMEOUT=FLASK_LIFETIME
    )
    init_app(app, make_store(request.param))
    return app


@pytest.fixture
def app_ctx(app: flask.Flask) -> Iterator[Any]:
    with app.app_context() as ctx:
        yield ctx


@pytest.fixture
def req_ctx(app: flask.Flask) -> Iterator[Any]:
    with app.test_request_context() as ctx:
        yield ctx


@pytest.fixture
def client(app: flask.Flask) -> flask.testing.FlaskClient:
    return app.test_client()


@pytest.fixture(autouse=True)
def leak_detector() -> Iterator[None]:
    """As theirs: no request context is left pushed."""
    yield
    leaks = []
    while request_ctx:
        leaks.append(request_ctx._get_current_object())
        request_ctx.pop()
    assert leaks == []


# -- tests/test_basic.py ------------------------------------------------------------------------------

basic = load("test_basic")
test_session_accessed = basic.test_session_accessed
test_session_path = basic.test_session_path
test_session_using_application_root = basic.test_session_using_application_root
test_session_using_session_settings = basic.test_session_using_session_settings
test_session_using_samesite_attribute = cannot_pass(
    basic.test_session_using_samesite_attribute,
    "SESSION_COOKIE_SAMESITE=None (Flask's default) gives SameSite=Lax, the safer reading, not no SameSite",
)
test_missing_session = cannot_pass(
    basic.test_missing_session,
    "no secret is a ConfigError when the interface is built (at start-up), not a NullSession at the "
    "first write; here SESSION_SECRET signs, so removing SECRET_KEY changes nothing",
)
test_session_secret_key_fallbacks = cannot_pass(
    basic.test_session_secret_key_fallbacks,
    "its keys ('0 key', ...) are far too short for our check (a ConfigError), and SESSION_SECRET, which signs "
    "here, comes before SECRET_KEY; rotation with SECRET_KEY_FALLBACKS is tested in test_flask.py",
)
test_session_expiration = basic.test_session_expiration
test_session_stored_last = basic.test_session_stored_last
test_session_special_types = basic.test_session_special_types
test_session_cookie_setting = cannot_pass(
    basic.test_session_cookie_setting,
    "an unchanged read extends a permanent session, and sends its cookie again, at most once a minute "
    "(a store write per read otherwise), not on every request as SESSION_REFRESH_EACH_REQUEST does in Flask",
)
test_session_vary_cookie = basic.test_session_vary_cookie
test_session_refresh_vary = cannot_pass(
    basic.test_session_refresh_vary,
    "lazy: a request that does not use the session does not load or refresh it (no store round trip), "
    "so it sends no cookie and no Vary: Cookie",
)
test_flashes = basic.test_flashes
test_extended_flashing = basic.test_extended_flashing

# -- tests/test_testing.py, test_helpers.py, test_signals.py -----------------------------------------

testing = load("test_testing")
test_redirect_session = testing.test_redirect_session
test_session_transactions = testing.test_session_transactions
test_session_transactions_keep_context = testing.test_session_transactions_keep_context
test_session_transaction_needs_cookies = testing.test_session_transaction_needs_cookies
test_flash_signal = load("test_signals").test_flash_signal
helpers = load("test_helpers")


def test_stream_keeps_session(app: flask.Flask, client: flask.testing.FlaskClient) -> None:
    helpers.TestStreaming().test_stream_keeps_session(app, client)
