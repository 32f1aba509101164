"""One store, every front door at once: one login seen by a raw WSGI app, a Flask app, a Django app
and a Pyramid app behind one domain (one cookie name and format between them), and one logout
ending it for all. On Redis, and on PostgreSQL through each driver.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import django_settings  # noqa: F401 - configures Django (process-global) before its imports
import flask
import pytest
import webtest
from cookies import parse_set_cookies
from django.core.handlers.wsgi import WSGIHandler
from django.http import HttpRequest, JsonResponse
from django.test import override_settings
from django.urls import path
from pyramid.config import Configurator
from servers import SECRET

from wsgisession import SessionCore, SessionMiddleware, SessionStore, Settings
from wsgisession.frameworks import django as engine
from wsgisession.frameworks.flask import init_app
from wsgisession.frameworks.pyramid import SessionFactory

COOKIE = "session"
Doors = dict[str, webtest.TestApp]


def raw_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    session, route = environ["session"], environ["PATH_INFO"]
    if route == "/login":
        session.regenerate()
        session["user"] = "ann"
    elif route == "/logout":
        session.invalidate()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({"user": session.get("user"), "cart": session.get("cart")}).encode()]


def flask_app(store: SessionStore) -> flask.Flask:
    app = flask.Flask(__name__)
    app.config.update(SESSION_SECRET=SECRET)

    @app.get("/whoami")
    def whoami() -> Any:
        return {"user": flask.session.get("user"), "cart": flask.session.get("cart")}

    @app.post("/cart")
    def cart() -> Any:
        flask.session["cart"] = [*flask.session.get("cart", []), flask.request.form["item"]]
        return {"cart": flask.session["cart"]}

    init_app(app, store=store)
    return app


def whoami(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"user": request.session.get("user"), "cart": request.session.get("cart")})


def logout(request: HttpRequest) -> JsonResponse:
    request.session.flush()
    return JsonResponse({"user": None})


urlpatterns = [path("whoami", whoami), path("logout", logout)]


def pyramid_app(core: SessionCore) -> Any:
    def whoami(request: Any) -> dict[str, Any]:
        return {"user": request.session.get("user"), "cart": request.session.get("cart")}

    with Configurator() as config:
        config.set_session_factory(SessionFactory(core))
        config.add_route("whoami", "/whoami")
        config.add_view(whoami, route_name="whoami", renderer="json")
        return config.make_wsgi_app()


@pytest.fixture(params=["redis", "postgres-psycopg", "postgres-psycopg2"])
def doors(
    request: pytest.FixtureRequest, make_store: Callable[..., SessionStore]
) -> Iterator[dict[str, webtest.TestApp]]:
    """The four front doors over one store, as TestApps that keep no cookies of their own."""
    store = make_store(request.param)
    core = SessionCore(Settings.load({}, secret=SECRET, cookie_name=COOKIE), store)
    engine.set_core(core)
    with override_settings(ROOT_URLCONF=__name__, SESSION_COOKIE_NAME=COOKIE):
        yield {
            "raw": webtest.TestApp(SessionMiddleware(raw_app, store, secret=SECRET)),
            "flask": webtest.TestApp(flask_app(store)),
            "django": webtest.TestApp(WSGIHandler()),
            "pyramid": webtest.TestApp(pyramid_app(core)),
        }
    engine.set_core(None)


def set_cookies(response: webtest.TestResponse) -> list[dict[str, Any]]:
    """The session cookies a response set (Django writes its header with a leading space)."""
    return parse_set_cookies([value.strip() for value in response.headers.getall("Set-Cookie")], COOKIE)


def sent_cookie(response: webtest.TestResponse) -> str:
    """The session cookie a response set, as the browser sends it back."""
    cookies = set_cookies(response)
    assert cookies, response.headers
    return f"{COOKIE}={cookies[-1]['value']}"


def user(door: webtest.TestApp, cookie: str, route: str = "/whoami") -> Any:
    return door.get(route, headers={"Cookie": cookie}).json


def test_one_login_is_seen_by_every_front_door_and_one_logout_ends_it(doors: Doors) -> None:
    cookie = sent_cookie(doors["raw"].get("/login"))
    assert user(doors["flask"], cookie)["user"] == "ann"
    assert user(doors["django"], cookie)["user"] == "ann"
    assert user(doors["pyramid"], cookie)["user"] == "ann"
    # a change made through Flask is what the others read, in the same cookie
    doors["flask"].post("/cart", {"item": "tea"}, headers={"Cookie": cookie})
    assert user(doors["django"], cookie)["cart"] == ["tea"] == user(doors["raw"], cookie, "/")["cart"]
    # Django's logout (flush) ends the session for every front door
    response = doors["django"].get("/logout", headers={"Cookie": cookie})
    assert is_expired(response), response.headers
    for name in ("raw", "flask", "pyramid"):
        assert user(doors[name], cookie, "/" if name == "raw" else "/whoami") == {"user": None, "cart": None}, name


def is_expired(response: webtest.TestResponse) -> bool:
    cookies = set_cookies(response)
    return bool(cookies) and cookies[-1]["value"] in ("", '""')
