"""The wsgisession demo: a plain WSGI app with a login and a counter kept in a server-side session.

    export SESSION_SECRET=$(python -c 'import secrets; print(secrets.token_urlsafe(48))')
    python examples/raw_wsgi.py          # or: gunicorn examples.raw_wsgi:app

Sessions go to an SQLite file unless REDIS_URL or DATABASE_URL is set. A logged-in user's devices
are listed at /devices, where any of them can be logged out; SESSION_CLIENT_DETAILS=1 shows each one's
browser and IP there.
"""

import html
import json
import logging
import os
import re
import time
from urllib.parse import parse_qs

from wsgisession import SessionMiddleware, StoreError
from wsgisession.status import metrics_app, status_app

PAGE = """<!doctype html>
<title>wsgisession demo</title>
{user}
<form method="post" action="/counter"><p>Count: {count} <button>+1</button></p></form>
"""
LOGIN = '<form method="post" action="/login"><input name="username" required> <button>Log in</button></form>'
LOGOUT = """<form method="post" action="/logout"><p>Logged in as <b>{}</b> <button>Log out</button></p></form>
<p><a href="/devices">Your devices</a></p>"""
DEVICES = """<!doctype html>
<title>Your devices - wsgisession demo</title>
<h1>Your devices</h1>
<p>Where <b>{user}</b> is logged in, most recently seen first (times in UTC). <a href="/">Home</a></p>
{notice}
<table>
<tr><th>Logged in</th><th>Last seen</th><th>Expires</th><th>Browser</th><th>IP</th><th></th></tr>
{rows}
</table>
{details}
<form method="post" action="/devices/others"><p><button>Log out everywhere else</button></p></form>
"""
DEVICE = """<tr class="{css}"><td>{login}</td><td>{seen}</td><td>{expires}</td><td class="agent">{agent}</td>\
<td class="ip">{ip}</td><td>{action}</td></tr>"""
END = """<form method="post" action="/devices/end"><input type="hidden" name="handle" value="{}">\
<button>Log out</button></form>"""
NO_DETAILS = "<p>Browsers and IPs are kept only with SESSION_CLIENT_DETAILS=1.</p>"
UNAVAILABLE = "Your devices cannot be reached right now: try again in a moment.\n"


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
    if route == ("GET", "/devices"):
        try:
            return devices(environ, start_response, session)
        except StoreError:  # the store is away: the session may be served from elsewhere, the list is not
            return respond(start_response, "503 Service Unavailable", "text/plain", UNAVAILABLE)
    if route == ("POST", "/login"):
        username = form(environ).get("username", "").strip()
        if not username:
            return respond(start_response, "400 Bad Request", "text/plain", "username is required\n")
        session.login(username)  # a new session id (a cookie planted before is worth nothing), bound to the user
        session["user"] = username  # the name the pages show
    elif route == ("POST", "/counter"):
        session["count"] = session.get("count", 0) + 1
    elif route == ("POST", "/logout"):
        session.invalidate()  # deleted from the store, cookie expired
    elif route in (("POST", "/devices/end"), ("POST", "/devices/others")):  # POST only: a link cannot log out
        try:
            return end_sessions(environ, start_response, session, route[1])
        except StoreError:
            return respond(start_response, "503 Service Unavailable", "text/plain", UNAVAILABLE)
    else:
        return respond(start_response, "404 Not Found", "text/plain", "Not found\n")
    return see_other(start_response, "/")


def devices(environ, start_response, session):
    """The "your devices" page: the user's sessions, a button to log out each other one, or all of them."""
    user = session.user_id
    if user is None:
        return see_other(start_response, "/")
    rows, details = [], False
    for device in app.users.list(user, current=session):
        action = "<b>This device</b>" if device.current else END.format(html.escape(device.handle))
        rows.append(DEVICE.format(
            css="device current" if device.current else "device", login=utc(device.login), seen=utc(device.seen),
            expires=utc(device.expires), agent=html.escape(device.agent or "-"), ip=html.escape(device.ip or "-"),
            action=action,
        ))  # fmt: skip
        details = details or bool(device.agent or device.ip)
    ended = parse_qs(environ.get("QUERY_STRING", "")).get("ended", [""])[0]
    notice = f'<p class="message">Logged out {ended} session(s).</p>' if re.fullmatch("[0-9]{1,6}", ended) else ""
    page = DEVICES.format(user=html.escape(user), notice=notice, rows="\n".join(rows),
                          details="" if details else NO_DETAILS)  # fmt: skip
    return respond(start_response, "200 OK", "text/html", page)


def end_sessions(environ, start_response, session, path):
    """Log out one of the user's other sessions (named by its handle), or all of them but this one."""
    user = session.user_id
    if user is None:
        return see_other(start_response, "/")
    if path == "/devices/end":  # a handle names a session of this user only: another's handle ends nothing
        ended = int(app.users.end(user, form(environ).get("handle", "")))
    else:
        ended = app.users.end_all(user, keep=session)
    return see_other(start_response, f"/devices?ended={ended}")


def utc(seconds):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def form(environ):
    """The fields of a POSTed form (the first value of each)."""
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)).decode()
    return {name: values[0] for name, values in parse_qs(body).items()}


def see_other(start_response, location):
    start_response("303 See Other", [("Location", location), ("Content-Length", "0")])
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
