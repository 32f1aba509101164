"""The wsgisession demo as a Pyramid app: ``python examples/pyramid_app.py`` or ``gunicorn examples.pyramid_app:app``.

The session is read from ``request.environ["session"]``; Pyramid's own session API is not used.
"""

import html
import logging
import os

from pyramid.config import Configurator
from pyramid.httpexceptions import HTTPBadRequest, HTTPSeeOther
from pyramid.response import Response

from wsgisession import SessionMiddleware

PAGE = """<!doctype html>
<title>wsgisession demo (Pyramid)</title>
{user}
<form method="post" action="/counter"><p>Count: {count} <button>+1</button></p></form>
"""
LOGIN = '<form method="post" action="/login"><input name="username" required> <button>Log in</button></form>'
LOGOUT = '<form method="post" action="/logout"><p>Logged in as <b>{}</b> <button>Log out</button></p></form>'


def home(request):
    session = request.environ["session"]
    user = session.get("user")
    greeting = LOGOUT.format(html.escape(user)) if user else LOGIN
    return Response(PAGE.format(user=greeting, count=session.get("count", 0)))


def api_session(request):
    session = request.environ["session"]
    return {"user": session.get("user"), "count": session.get("count", 0)}  # rendered as JSON


def login(request):
    username = request.POST.get("username", "").strip()
    if not username:
        return HTTPBadRequest("username is required")
    session = request.environ["session"]
    session.regenerate()  # a new session id at login: a cookie planted before is worth nothing
    session["user"] = username
    return HTTPSeeOther("/")


def counter(request):
    session = request.environ["session"]
    session["count"] = session.get("count", 0) + 1
    return HTTPSeeOther("/")


def logout(request):
    request.environ["session"].invalidate()  # deleted from the store, cookie expired
    return HTTPSeeOther("/")


with Configurator() as config:
    config.add_route("home", "/", request_method="GET")
    config.add_route("api_session", "/api/session", request_method="GET")
    config.add_route("login", "/login", request_method="POST")
    config.add_route("counter", "/counter", request_method="POST")
    config.add_route("logout", "/logout", request_method="POST")
    for view in (home, login, counter, logout):
        config.add_view(view, route_name=view.__name__)
    config.add_view(api_session, route_name="api_session", renderer="json")
    wsgi_app = config.make_wsgi_app()

if __name__ == "__main__":  # as a script: say which store was chosen, and why
    logging.basicConfig(level=logging.INFO, format="%(message)s")
app = SessionMiddleware(wsgi_app)  # settings and store from the environment

if __name__ == "__main__":
    from wsgiref.simple_server import make_server

    port = int(os.environ.get("PORT", "8000"))
    with make_server("127.0.0.1", port, app) as server:
        print(f"Serving on http://127.0.0.1:{port}", flush=True)
        server.serve_forever()
