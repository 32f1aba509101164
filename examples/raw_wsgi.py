"""The wsgisession demo: a plain WSGI app with a login and a counter kept in a server-side session.

    export SESSION_SECRET=$(python -c 'import secrets; print(secrets.token_urlsafe(48))')
    python examples/raw_wsgi.py          # or: gunicorn examples.raw_wsgi:app

Sessions go to an SQLite file unless REDIS_URL or DATABASE_URL is set.
"""

import html
import json
import logging
import os
from urllib.parse import parse_qs

from wsgisession import SessionMiddleware
from wsgisession.status import metrics_app, status_app

PAGE = """<!doctype html>
<title>wsgisession demo</title>
{user}
<form method="post" action="/counter"><p>Count: {count} <button>+1</button></p></form>
"""
LOGIN = '<form method="post" action="/login"><input name="username" required> <button>Log in</button></form>'
LOGOUT = '<form method="post" action="/logout"><p>Logged in as <b>{}</b> <button>Log out</button></p></form>'


def wsgi_app(environ, start_response):
    session = environ["session"]  # loaded from the store on first use
    route = environ["REQUEST_METHOD"], environ.get("PATH_INFO") or "/"

    if route == ("GET", "/"):
        user = session.get("user")
        page = PAGE.format(user=LOGOUT.format(html.escape(user)) if user else LOGIN, count=session.get("count", 0))
        return respond(start_response, "200 OK", "text/html", page)
    if route == ("GET", "/status"):  # for a load balancer: which store serves, since when, backlogs
        return status(environ, start_response)
    if route == ("GET", "/metrics") and metrics is not None:  # Prometheus
        return metrics(environ, start_response)
    if route == ("GET", "/api/session"):
        body = json.dumps({"user": session.get("user"), "count": session.get("count", 0)})
        return respond(start_response, "200 OK", "application/json", body)
    if route == ("POST", "/login"):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)).decode()
        username = parse_qs(body).get("username", [""])[0].strip()
        if not username:
            return respond(start_response, "400 Bad Request", "text/plain", "username is required\n")
        session.regenerate()  # a new session id at login: a cookie planted before is worth nothing
        session["user"] = username
    elif route == ("POST", "/counter"):
        session["count"] = session.get("count", 0) + 1
    elif route == ("POST", "/logout"):
        session.invalidate()  # deleted from the store, cookie expired
    else:
        return respond(start_response, "404 Not Found", "text/plain", "Not found\n")
    start_response("303 See Other", [("Location", "/"), ("Content-Length", "0")])
    return [b""]


def respond(start_response, status, content_type, text):
    body = text.encode()
    start_response(status, [("Content-Type", f"{content_type}; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]


if __name__ == "__main__":  # as a script: say which store was chosen, and why
    logging.basicConfig(level=logging.INFO, format="%(message)s")
app = SessionMiddleware(wsgi_app)  # settings and store from the environment
status = status_app(app.store)
try:
    metrics = metrics_app()
except ImportError:  # pip install 'wsgisession[metrics]'
    metrics = None

if __name__ == "__main__":
    from wsgiref.simple_server import make_server

    port = int(os.environ.get("PORT", "8000"))
    with make_server("127.0.0.1", port, app) as server:
        print(f"Serving on http://127.0.0.1:{port}", flush=True)
        server.serve_forever()
