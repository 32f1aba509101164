"""The wsgisession demo as a Pyramid app: ``python examples/pyramid_app.py`` or ``gunicorn examples.pyramid_app:app``.

``config.include("wsgisession.frameworks.pyramid")`` makes ``request.session`` a wsgisession session (settings
and store from the environment, or from ``wsgisession.*`` settings). Its flash messages carry a notice to the
next page, and its CSRF token guards every form.
"""

import html
import logging
import os

from pyramid.config import Configurator
from pyramid.csrf import SessionCSRFStoragePolicy, get_csrf_token, new_csrf_token
from pyramid.httpexceptions import HTTPBadRequest, HTTPSeeOther
from pyramid.response import Response

PAGE = """<!doctype html>
<title>wsgisession demo (Pyramid)</title>
{messages}{user}
<form method="post" action="/counter">{csrf}<p>Count: {count} <button>+1</button></p></form>
"""
MESSAGE = '<p class="flash">{}</p>\n'
CSRF = '<input type="hidden" name="csrf_token" value="{}">'
LOGIN = '<form method="post" action="/login">{csrf}<input name="username" required> <button>Log in</button></form>'
LOGOUT = '<form method="post" action="/logout">{csrf}<p>Logged in as <b>{user}</b> <button>Log out</button></p></form>'


def home(request):
    session = request.session
    user, csrf = session.get("user"), CSRF.format(get_csrf_token(request))
    messages = "".join(MESSAGE.format(html.escape(message)) for message in session.pop_flash())
    greeting = LOGOUT.format(csrf=csrf, user=html.escape(user)) if user else LOGIN.format(csrf=csrf)
    return Response(PAGE.format(messages=messages, user=greeting, csrf=csrf, count=session.get("count", 0)))


def api_session(request):
    session = request.session
    return {"user": session.get("user"), "count": session.get("count", 0)}  # rendered as JSON


def login(request):
    username = request.POST.get("username", "").strip()
    if not username:
        return HTTPBadRequest("username is required")
    session = request.session
    session.regenerate()  # a new session id at login: a cookie planted before is worth nothing
    new_csrf_token(request)  # and a new CSRF token
    session["user"] = username
    session.flash(f"Welcome, {username}!")
    return HTTPSeeOther("/")


def counter(request):
    session = request.session
    session["count"] = session.get("count", 0) + 1
    return HTTPSeeOther("/")


def logout(request):
    request.session.invalidate()  # deleted from the store, cookie expired
    request.session.flash("You are logged out.")  # starts a new, anonymous session
    return HTTPSeeOther("/")


if __name__ == "__main__":  # as a script: say which store was chosen, and why
    logging.basicConfig(level=logging.INFO, format="%(message)s")

with Configurator() as config:
    config.include("wsgisession.frameworks.pyramid")  # request.session; the store is chosen here
    config.set_csrf_storage_policy(SessionCSRFStoragePolicy())
    config.set_default_csrf_options(require_csrf=True)  # every POST needs the session's token
    config.add_route("home", "/", request_method="GET")
    config.add_route("api_session", "/api/session", request_method="GET")
    config.add_route("login", "/login", request_method="POST")
    config.add_route("counter", "/counter", request_method="POST")
    config.add_route("logout", "/logout", request_method="POST")
    for view in (home, login, counter, logout):
        config.add_view(view, route_name=view.__name__)
    config.add_view(api_session, route_name="api_session", renderer="json")
    app = config.make_wsgi_app()

if __name__ == "__main__":
    from wsgiref.simple_server import make_server

    port = int(os.environ.get("PORT", "8000"))
    with make_server("127.0.0.1", port, app) as server:
        print(f"Serving on http://127.0.0.1:{port}", flush=True)
        server.serve_forever()
