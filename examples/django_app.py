"""The wsgisession demo as a single-file Django app: ``python examples/django_app.py`` or
``gunicorn examples.django_app:app``.

    export SESSION_SECRET=$(python -c 'import secrets; print(secrets.token_urlsafe(48))')

``SESSION_ENGINE = "wsgisession.frameworks.django"`` makes ``request.session`` a wsgisession session, saved by
Django's own SessionMiddleware; the messages framework keeps its messages in it. Settings and store come from
the environment (or from a ``WSGISESSION`` dict in the settings): sessions go to an SQLite file unless
REDIS_URL or DATABASE_URL is set. No database and no migrations: the login is a name kept in the session.
"""

import html
import logging
import os

from django.conf import settings
from django.contrib import messages
from django.core.wsgi import get_wsgi_application
from django.http import HttpResponse, HttpResponseBadRequest, JsonResponse
from django.middleware.csrf import get_token
from django.urls import path
from django.views.decorators.http import require_GET, require_POST

from wsgisession.frameworks.django import get_core

SETTINGS = {
    "ROOT_URLCONF": __name__,
    "ALLOWED_HOSTS": ["127.0.0.1", "localhost"],
    "MIDDLEWARE": [
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
    ],
    "SESSION_ENGINE": "wsgisession.frameworks.django",
    "SESSION_COOKIE_NAME": "session",  # the other demos' cookie: one login for all of them on one domain
    "SESSION_COOKIE_AGE": 86400,  # a day of inactivity, as the other demos
    "MESSAGE_STORAGE": "django.contrib.messages.storage.session.SessionStorage",
}

PAGE = """<!doctype html>
<title>wsgisession demo (Django)</title>
{messages}{user}
<form method="post" action="/counter">{csrf}<p>Count: {count} <button>+1</button></p></form>
"""
MESSAGE = '<p class="message">{}</p>\n'
CSRF = '<input type="hidden" name="csrfmiddlewaretoken" value="{}">'
LOGIN = '<form method="post" action="/login">{csrf}<input name="username" required> <button>Log in</button></form>'
LOGOUT = '<form method="post" action="/logout">{csrf}<p>Logged in as <b>{user}</b> <button>Log out</button></p></form>'


@require_GET
def home(request):
    session = request.session  # loaded from the store on first use
    user, csrf = session.get("user"), CSRF.format(get_token(request))
    notes = "".join(MESSAGE.format(html.escape(str(message))) for message in messages.get_messages(request))
    greeting = LOGOUT.format(csrf=csrf, user=html.escape(user)) if user else LOGIN.format(csrf=csrf)
    return HttpResponse(PAGE.format(messages=notes, user=greeting, csrf=csrf, count=session.get("count", 0)))


@require_GET
def api_session(request):
    return JsonResponse({"user": request.session.get("user"), "count": request.session.get("count", 0)})


@require_POST
def login(request):
    username = request.POST.get("username", "").strip()
    if not username:
        return HttpResponseBadRequest("username is required\n", content_type="text/plain")
    request.session.cycle_key()  # a new session key at login: a cookie planted before is worth nothing
    request.session["user"] = username
    messages.success(request, f"Welcome, {username}!")
    return see_other("/")


@require_POST
def counter(request):
    request.session["count"] = request.session.get("count", 0) + 1
    return see_other("/")


@require_POST
def logout(request):
    request.session.flush()  # deleted from the store, cookie expired
    return see_other("/")


def see_other(location):
    return HttpResponse(status=303, headers={"Location": location})


urlpatterns = [
    path("", home),
    path("api/session", api_session),
    path("login", login),
    path("counter", counter),
    path("logout", logout),
]

if __name__ == "__main__":  # as a script: say which store was chosen, and why
    logging.basicConfig(level=logging.INFO, format="%(message)s")
if not settings.configured:  # imported by a process that configured Django already (the tests), it keeps theirs
    settings.configure(**SETTINGS)
app = get_wsgi_application()
get_core()  # the store is chosen now, at start-up, rather than at the first request

if __name__ == "__main__":
    from wsgiref.simple_server import make_server

    port = int(os.environ.get("PORT", "8000"))
    with make_server("127.0.0.1", port, app) as server:
        print(f"Serving on http://127.0.0.1:{port}", flush=True)
        server.serve_forever()
