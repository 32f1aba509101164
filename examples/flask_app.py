"""The wsgisession demo as a Flask app: ``python examples/flask_app.py`` or ``gunicorn examples.flask_app:app``.

``init_app(app)`` makes ``flask.session`` a wsgisession session (settings from ``app.config`` and the
environment, SESSION_SECRET or else SECRET_KEY signing its cookie); ``flash()`` carries a notice to the
next page through it. Sessions go to an SQLite file unless REDIS_URL or DATABASE_URL is set.

    export SESSION_SECRET=$(python -c 'import secrets; print(secrets.token_urlsafe(48))')
    python examples/flask_app.py
"""

import logging
import os

from flask import Flask, abort, flash, redirect, render_template_string, request, session

from wsgisession.frameworks.flask import init_app

PAGE = """<!doctype html>
<title>wsgisession demo (Flask)</title>
{% for message in get_flashed_messages() %}<p class="flash">{{ message }}</p>
{% endfor %}
{%- if user %}
<form method="post" action="/logout"><p>Logged in as <b>{{ user }}</b> <button>Log out</button></p></form>
{%- else %}
<form method="post" action="/login"><input name="username" required> <button>Log in</button></form>
{%- endif %}
<form method="post" action="/counter"><p>Count: {{ count }} <button>+1</button></p></form>
"""

app = Flask(__name__)


@app.get("/")
def home():
    return render_template_string(PAGE, user=session.get("user"), count=session.get("count", 0))  # escaped


@app.get("/api/session")
def api_session():
    return {"user": session.get("user"), "count": session.get("count", 0)}  # Flask sends a dict as JSON


@app.post("/login")
def login():
    username = request.form.get("username", "").strip()
    if not username:
        abort(400, "username is required")
    session.regenerate()  # a new session id at login: a cookie planted before is worth nothing
    session["user"] = username
    flash(f"Welcome, {username}!")
    return redirect("/", 303)


@app.post("/counter")
def counter():
    session["count"] = session.get("count", 0) + 1
    return redirect("/", 303)


@app.post("/logout")
def logout():
    session.invalidate()  # deleted from the store, cookie expired
    flash("You are logged out.")  # starts a new, anonymous session
    return redirect("/", 303)


if __name__ == "__main__":  # as a script: say which store was chosen, and why
    logging.basicConfig(level=logging.INFO, format="%(message)s")
init_app(app)  # settings from app.config and the environment; the store is chosen here

if __name__ == "__main__":
    from wsgiref.simple_server import make_server

    port = int(os.environ.get("PORT", "8000"))
    with make_server("127.0.0.1", port, app) as server:
        print(f"Serving on http://127.0.0.1:{port}", flush=True)
        server.serve_forever()
