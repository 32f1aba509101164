"""The wsgisession demo as a Bottle app: ``python examples/bottle_app.py`` or ``gunicorn examples.bottle_app:app``."""

import html
import logging
import os

import bottle

from wsgisession import SessionMiddleware

PAGE = """<!doctype html>
<title>wsgisession demo (Bottle)</title>
{user}
<form method="post" action="/counter"><p>Count: {count} <button>+1</button></p></form>
"""
LOGIN = '<form method="post" action="/login"><input name="username" required> <button>Log in</button></form>'
LOGOUT = '<form method="post" action="/logout"><p>Logged in as <b>{}</b> <button>Log out</button></p></form>'

wsgi_app = bottle.Bottle()


def session():
    return bottle.request.environ["session"]


@wsgi_app.get("/")
def home():
    user = session().get("user")
    return PAGE.format(user=LOGOUT.format(html.escape(user)) if user else LOGIN, count=session().get("count", 0))


@wsgi_app.get("/api/session")
def api_session():
    return {"user": session().get("user"), "count": session().get("count", 0)}  # Bottle sends a dict as JSON


@wsgi_app.post("/login")
def login():
    username = bottle.request.forms.username.strip()  # attribute access decodes UTF-8
    if not username:
        bottle.abort(400, "username is required")
    session().regenerate()  # a new session id at login: a cookie planted before is worth nothing
    session()["user"] = username
    bottle.redirect("/", 303)


@wsgi_app.post("/counter")
def counter():
    session()["count"] = session().get("count", 0) + 1
    bottle.redirect("/", 303)


@wsgi_app.post("/logout")
def logout():
    session().invalidate()  # deleted from the store, cookie expired
    bottle.redirect("/", 303)


if __name__ == "__main__":  # as a script: say which store was chosen, and why
    logging.basicConfig(level=logging.INFO, format="%(message)s")
app = SessionMiddleware(wsgi_app)  # settings and store from the environment

if __name__ == "__main__":
    from wsgiref.simple_server import make_server

    port = int(os.environ.get("PORT", "8000"))
    with make_server("127.0.0.1", port, app) as server:
        print(f"Serving on http://127.0.0.1:{port}", flush=True)
        server.serve_forever()
