"""A user's sessions from every framework's front door, on real stores: Flask (with Flask-Login),
Django (django.contrib.auth) and Pyramid (a session-based security policy). Each logs in with the one
line the README shows, lists the user's devices, and ends one or all of them; an ended device is
logged out at its next request. (The WSGI middleware's own tests are in test_users.py.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import django_settings  # noqa: F401 - configures Django (process-global) before its imports
import flask
import flask_login
import pytest
import webtest
from django.contrib.auth import authenticate, login, logout, update_session_auth_hash
from django.contrib.auth.models import User
from django.core.management import call_command
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.test import Client, override_settings
from django.urls import path
from pyramid.authentication import SessionAuthenticationHelper
from pyramid.config import Configurator
from pyramid.security import forget, remember
from servers import SECRET, unique

from wsgisession import SessionCore, SessionStore
from wsgisession.frameworks import django as engine
from wsgisession.frameworks import pyramid as pyramid_door
from wsgisession.frameworks.flask import init_app
from wsgisession.users import UserSessions, handle

STORE_KINDS = ["memory", "postgres-psycopg", "postgres-psycopg2", "redis"]


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, make_store: Callable[..., SessionStore]) -> SessionStore:
    return make_store(request.param)


def handle_of(core: SessionCore, cookie_value: str) -> str:
    """The handle the list gives the session this cookie value names (checking that it is opaque)."""
    identity = core.identify([cookie_value])
    assert identity is not None
    name = handle(identity.key)
    assert name not in (identity.id, identity.key) and name not in cookie_value
    return name


def current_of(devices: list[dict[str, Any]]) -> str:
    """The handle of the one device marked current."""
    (current,) = [device["handle"] for device in devices if device["current"]]
    return current


# -- Flask, with Flask-Login ---------------------------------------------------------------


class FlaskUser(flask_login.UserMixin):  # type: ignore[misc]
    def __init__(self, user_id: str) -> None:
        self.id = user_id


def flask_app(store: SessionStore) -> flask.Flask:
    app = flask.Flask(__name__)
    app.config.update(SESSION_SECRET=SECRET)
    manager = flask_login.LoginManager(app)
    manager.user_loader(FlaskUser)

    def users() -> UserSessions:
        return flask.current_app.session_interface.users  # type: ignore[attr-defined, no-any-return]

    @app.post("/login")
    def log_in() -> Any:
        user = FlaskUser(flask.request.form["user"])
        flask_login.login_user(user)
        flask.session.login(user.id)  # the README's line
        return {"user": user.id}

    @app.post("/logout")
    def log_out() -> Any:
        flask_login.logout_user()
        flask.session.invalidate()
        return {"user": None}

    @app.get("/whoami")
    def whoami() -> Any:
        return {"user": flask_login.current_user.get_id()}

    @app.get("/devices")
    @flask_login.login_required
    def devices() -> Any:
        return [device._asdict() for device in users().list(flask_login.current_user.id, current=flask.session)]

    @app.post("/end")
    @flask_login.login_required
    def end() -> Any:
        return {"ended": users().end(flask_login.current_user.id, flask.request.form["handle"])}

    @app.post("/others")
    @flask_login.login_required
    def others() -> Any:
        return {"ended": users().end_all(flask_login.current_user.id, keep=flask.session)}

    init_app(app, store=store)
    return app


@pytest.fixture
def flask_devices(store: SessionStore) -> Callable[[], webtest.TestApp]:
    """Browsers (each a TestApp with its own cookie jar) on one Flask app."""
    app = flask_app(store)
    return lambda: webtest.TestApp(app)


def flask_core(device: webtest.TestApp) -> SessionCore:
    return device.app.session_interface.core  # type: ignore[no-any-return]


def test_flask_login_binds_the_session_and_lists_it(flask_devices: Callable[[], webtest.TestApp]) -> None:
    phone, laptop, other = flask_devices(), flask_devices(), flask_devices()
    phone.post("/login", {"user": "ann"})
    laptop.post("/login", {"user": "ann"})
    other.post("/login", {"user": "bob"})
    core = flask_core(laptop)

    devices = laptop.get("/devices").json
    assert {device["handle"] for device in devices} == {
        handle_of(core, phone.cookies["session"]),
        handle_of(core, laptop.cookies["session"]),
    }
    assert current_of(devices) == handle_of(core, laptop.cookies["session"])
    assert current_of(phone.get("/devices").json) == handle_of(core, phone.cookies["session"])
    for device in devices:
        assert device["login"] <= device["seen"] <= time.time() < device["expires"]
        assert (device["agent"], device["ip"]) == ("", "")  # not kept unless asked for

    phone.post("/logout")  # Flask-Login's logout_user() and the session's invalidate()
    assert [device["handle"] for device in laptop.get("/devices").json] == [current_of(devices)]


def test_flask_ending_a_device_logs_it_out_at_its_next_request(flask_devices: Callable[[], webtest.TestApp]) -> None:
    phone, laptop = flask_devices(), flask_devices()
    phone.post("/login", {"user": "ann"})
    laptop.post("/login", {"user": "ann"})
    phones = handle_of(flask_core(phone), phone.cookies["session"])

    assert laptop.post("/end", {"handle": phones}).json == {"ended": True}
    assert phone.get("/whoami").json == {"user": None}
    assert phone.get("/devices", expect_errors=True).status_int == 401
    assert laptop.get("/whoami").json == {"user": "ann"}
    assert laptop.post("/end", {"handle": phones}).json == {"ended": False}  # gone already


def test_flask_end_all_keeps_this_session(flask_devices: Callable[[], webtest.TestApp]) -> None:
    devices = [flask_devices() for _ in range(4)]
    for device in devices:
        device.post("/login", {"user": "ann"})
    bob = flask_devices()
    bob.post("/login", {"user": "bob"})

    assert devices[0].post("/others").json == {"ended": 3}
    assert [device.get("/whoami").json["user"] for device in devices] == ["ann", None, None, None]
    assert len(devices[0].get("/devices").json) == 1
    assert bob.get("/whoami").json == {"user": "bob"}  # another user's sessions are not touched


def test_flask_logins_remember_me_cookie_outlives_an_ended_session(store: SessionStore) -> None:
    """What the README warns of: login_user(remember=True) logs an ended device back in, unbound."""
    app = flask_app(store)
    app.config["SECRET_KEY"] = SECRET  # Flask-Login signs its remember-me cookie with it

    @app.post("/remember")
    def remember_me() -> Any:
        flask_login.login_user(FlaskUser("ann"), remember=True)
        flask.session.login("ann")
        return {"user": "ann"}

    phone = webtest.TestApp(app)
    phone.post("/remember")
    assert app.session_interface.users.end_all("ann") == 1  # type: ignore[attr-defined]
    assert phone.get("/whoami").json == {"user": "ann"}
    assert app.session_interface.users.list("ann") == []  # type: ignore[attr-defined]


# -- Django, with django.contrib.auth -----------------------------------------------------------


def django_login(request: HttpRequest) -> HttpResponse:
    user = authenticate(request, username=request.POST["username"], password=request.POST["password"])
    if user is None:
        return HttpResponse("no", status=403)
    login(request, user)  # bind_login binds the session, on user_logged_in
    return HttpResponse("ok")


def django_logout(request: HttpRequest) -> HttpResponse:
    logout(request)
    return HttpResponse("ok")


def django_whoami(request: HttpRequest) -> JsonResponse:
    request.session["visits"] = request.session.get("visits", 0) + 1  # an anonymous session, before a login
    return JsonResponse({"user": request.user.get_username() or None})


def django_devices(request: HttpRequest) -> JsonResponse:
    devices = engine.users().list(request.user.pk, current=request.session)
    return JsonResponse([device._asdict() for device in devices], safe=False)


def django_password(request: HttpRequest) -> JsonResponse:
    request.user.set_password(request.POST["password"])
    request.user.save()
    update_session_auth_hash(request, request.user)  # keeps this session (under a new key)
    return JsonResponse({"ended": engine.end_other_sessions(request)})  # and ends the others


urlpatterns = [
    path("login", django_login),
    path("logout", django_logout),
    path("whoami", django_whoami),
    path("devices", django_devices),
    path("password", django_password),
]


@pytest.fixture
def django_core(store: SessionStore) -> Iterator[Callable[..., SessionCore]]:
    """The engine on ``store``, with settings.WSGISESSION as given (read as the engine reads it)."""

    def use(**variables: str) -> SessionCore:
        with override_settings(WSGISESSION=variables):
            core = SessionCore(engine.load_settings(), store)
        engine.set_core(core)
        return core

    with override_settings(ROOT_URLCONF=__name__):
        yield use
    engine.set_core(None)


@pytest.fixture(scope="module")
def django_tables() -> None:
    call_command("migrate", verbosity=0)


@pytest.fixture
def account(django_tables: None) -> User:
    """A user of this test's own (the password test changes it)."""
    return User.objects.create_user(unique("user"), password="first-password")


def django_log_in(client: Client, user: User, password: str = "first-password") -> str:
    """Log ``client`` in as ``user``; the session cookie it now holds."""
    assert client.post("/login", {"username": user.username, "password": password}).status_code == 200
    return str(client.cookies["sessionid"].value)


def test_django_login_binds_the_cycled_key(django_core: Callable[..., SessionCore], account: User) -> None:
    core = django_core()
    laptop, phone = Client(), Client()
    assert laptop.get("/whoami").json() == {"user": None}
    anonymous = laptop.cookies["sessionid"].value
    after = django_log_in(laptop, account)
    assert after != anonymous
    django_log_in(phone, account)

    devices = laptop.get("/devices").json()
    assert len(devices) == 2
    assert current_of(devices) == handle_of(core, after)  # the key login() cycled to is the bound one
    assert current_of(phone.get("/devices").json()) == handle_of(core, phone.cookies["sessionid"].value)
    assert handle_of(core, anonymous) not in {d["handle"] for d in devices}

    laptop.post("/logout")  # flush(): the session is deleted, so no longer the user's
    assert [d.handle for d in engine.users().list(account.pk)] == [handle_of(core, phone.cookies["sessionid"].value)]


def test_django_password_change_ends_the_other_sessions(django_core: Callable[..., SessionCore], account: User) -> None:
    core = django_core()
    clients = [Client() for _ in range(3)]
    for client in clients:
        django_log_in(client, account)

    assert clients[0].post("/password", {"password": "second-password"}).json() == {"ended": 2}
    assert [client.get("/whoami").json()["user"] for client in clients] == [account.username, None, None]
    (device,) = clients[0].get("/devices").json()
    assert device["current"] and device["handle"] == handle_of(core, clients[0].cookies["sessionid"].value)
    assert len(engine.users().list(account.pk)) == 1  # ended in the store, not only refused by Django's hash check


def test_django_max_per_user_from_settings(django_core: Callable[..., SessionCore], account: User) -> None:
    django_core(SESSION_MAX_PER_USER="2")
    clients = [Client() for _ in range(3)]
    # An idle timeout under the absolute one (a week), so that each login expires later than the one
    # before: with Django's default (two weeks) all expire a week after they began, and the limit
    # cannot tell which was used least recently.
    with override_settings(SESSION_COOKIE_AGE=86400):
        for client in clients:
            django_log_in(client, account)
            time.sleep(0.01)

    assert [client.get("/whoami").json()["user"] for client in clients] == [None, account.username, account.username]
    assert len(engine.users().list(account.pk)) == 2


def test_django_client_details_from_settings(django_core: Callable[..., SessionCore], account: User) -> None:
    django_core(SESSION_CLIENT_DETAILS="true")
    phone = Client(HTTP_USER_AGENT="Mozilla/5.0 (phone)")
    django_log_in(phone, account)
    assert [(d["agent"], d["ip"]) for d in phone.get("/devices").json()] == [("Mozilla/5.0 (phone)", "127.0.0.1")]

    django_core()  # off by default
    laptop = Client(HTTP_USER_AGENT="Mozilla/5.0 (laptop)")
    django_log_in(laptop, account)
    assert ("", "") in [(d["agent"], d["ip"]) for d in laptop.get("/devices").json()]


# -- Pyramid, with a security policy that keeps the user id in the session -------------------------


class SessionSecurityPolicy:
    """Pyramid's session-based identity (SessionAuthenticationHelper), as its docs build it."""

    def __init__(self) -> None:
        self.helper = SessionAuthenticationHelper()

    def identity(self, request: Any) -> Any:
        return self.helper.authenticated_userid(request)

    def authenticated_userid(self, request: Any) -> Any:
        return self.helper.authenticated_userid(request)

    def permits(self, request: Any, context: Any, permission: str) -> bool:
        return True

    def remember(self, request: Any, userid: Any, **kw: Any) -> list[tuple[str, str]]:
        return self.helper.remember(request, userid, **kw)  # type: ignore[no-any-return]

    def forget(self, request: Any, **kw: Any) -> list[tuple[str, str]]:
        return self.helper.forget(request, **kw)  # type: ignore[no-any-return]


def pyramid_app(factory: pyramid_door.SessionFactory) -> Any:
    def log_in(request: Any) -> Any:
        userid = request.params["user"]
        request.session.login(userid)  # the README's line, next to remember()
        request.response.headerlist.extend(remember(request, userid))
        return {"user": userid}

    def log_out(request: Any) -> Any:
        request.response.headerlist.extend(forget(request))
        request.session.invalidate()
        return {"user": None}

    def whoami(request: Any) -> Any:
        return {"user": request.authenticated_userid}

    def devices(request: Any) -> Any:
        found = pyramid_door.users(request).list(request.authenticated_userid, current=request.session)
        return [device._asdict() for device in found]

    def end(request: Any) -> Any:
        return {"ended": pyramid_door.users(request).end(request.authenticated_userid, request.params["handle"])}

    with Configurator() as config:
        config.set_session_factory(factory)
        config.set_security_policy(SessionSecurityPolicy())
        for name, view, method in [("login", log_in, "POST"), ("logout", log_out, "POST"), ("whoami", whoami, "GET"),
                                   ("devices", devices, "GET"), ("end", end, "POST")]:  # fmt: skip
            config.add_route(name, f"/{name}", request_method=method)
            config.add_view(view, route_name=name, renderer="json")
        return config.make_wsgi_app()


@pytest.fixture
def pyramid_factory(store: SessionStore) -> pyramid_door.SessionFactory:
    return pyramid_door.session_factory(store=store, secret=SECRET)


def test_pyramid_login_next_to_remember_binds_and_lists(pyramid_factory: pyramid_door.SessionFactory) -> None:
    app = pyramid_app(pyramid_factory)
    phone, laptop = webtest.TestApp(app), webtest.TestApp(app)
    phone.post("/login", {"user": "ann"})
    laptop.post("/login", {"user": "ann"})
    core = pyramid_factory.core

    devices = laptop.get("/devices").json
    assert {device["handle"] for device in devices} == {
        handle_of(core, phone.cookies["session"]),
        handle_of(core, laptop.cookies["session"]),
    }
    assert current_of(devices) == handle_of(core, laptop.cookies["session"])
    assert [device.handle for device in pyramid_factory.users.list("ann")] == [d["handle"] for d in devices]

    laptop.post("/logout")  # forget() and invalidate(): no longer the user's
    phones = handle_of(core, phone.cookies["session"])
    assert [device.handle for device in pyramid_factory.users.list("ann")] == [phones]


def test_pyramid_ending_one_device(pyramid_factory: pyramid_door.SessionFactory) -> None:
    app = pyramid_app(pyramid_factory)
    phone, laptop = webtest.TestApp(app), webtest.TestApp(app)
    phone.post("/login", {"user": "ann"})
    laptop.post("/login", {"user": "ann"})
    phones = handle_of(pyramid_factory.core, phone.cookies["session"])

    assert laptop.post("/end", {"handle": phones}).json == {"ended": True}
    assert phone.get("/whoami").json == {"user": None}
    assert laptop.get("/whoami").json == {"user": "ann"}
    assert pyramid_factory.users.end_all("ann") == 1  # the factory's users, outside any request
    assert laptop.get("/whoami").json == {"user": None}


def test_pyramid_users_needs_wsgisessions_factory() -> None:
    with Configurator() as config:
        config.set_session_factory(lambda request: {})
        registry = config.registry
    request = type("Request", (), {"registry": registry})()
    with pytest.raises(TypeError, match="not wsgisession's SessionFactory"):
        pyramid_door.users(request)
