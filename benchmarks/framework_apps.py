"""The Flask, Django and Pyramid apps that ``frameworks.py`` measures, one per variant.

Every variant answers the paths of ``apps.py``: ``/login`` (a new session holding ``user_id`` 42 and
``counter`` 0), ``/read`` (answers ``session["user_id"]``), ``/write`` (increments ``counter``, answers
it) and ``/untouched`` (answers ``ok``, never touching the session). A framework's bare variant
answers the same without a session.

``build(variant)`` returns the WSGI app, a function counting the records its store holds (to check
that the variant writes where it should) and wsgisession's store, for ours. Names come from the
environment frameworks.py sets (through ``apps.env``): ``BENCH_RUN`` (in every key prefix, table and
schema name), ``BENCH_SECRET``, ``REDIS_URL``, ``DATABASE_URL``. Django is configured once per process
(``django_setup``); this module is its ROOT_URLCONF, and the floor engine's SESSION_ENGINE.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote, urlsplit

from apps import TTL, USER_ID, bare_app, env, flask_variant, login_data, name, wsgisession_variant

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from wsgisession import SessionStore as Store

# variant: (framework, library, store) as the table shows them
VARIANTS: dict[str, tuple[str, str, str]] = {
    "wsgi-bare": ("WSGI", "no sessions", "-"),
    "wsgi-memory": ("WSGI", "SessionMiddleware", "memory"),
    "flask-bare": ("Flask", "no sessions", "-"),
    "flask-memory": ("Flask", "wsgisession", "memory"),
    "flask-redis": ("Flask", "wsgisession", "redis"),
    "flask-postgres": ("Flask", "wsgisession", "postgres"),
    "flask-session-redis": ("Flask", "Flask-Session", "redis"),
    "flask-session-postgres": ("Flask", "Flask-Session", "postgres"),
    "flask-middleware": ("Flask", "SessionMiddleware", "memory"),
    "django-bare": ("Django", "no sessions", "-"),
    "django-memory": ("Django", "wsgisession", "memory"),
    "django-redis": ("Django", "wsgisession", "redis"),
    "django-postgres": ("Django", "wsgisession", "postgres"),
    "django-cache": ("Django", "Django cache", "redis"),
    "django-db": ("Django", "Django db", "postgres"),
    "django-middleware": ("Django", "SessionMiddleware", "memory"),
    "django-floor": ("Django", "dict engine (floor)", "memory"),
    "pyramid-bare": ("Pyramid", "no sessions", "-"),
    "pyramid-memory": ("Pyramid", "wsgisession", "memory"),
    "pyramid-redis": ("Pyramid", "wsgisession", "redis"),
    "pyramid-postgres": ("Pyramid", "wsgisession", "postgres"),
    "pyramid-middleware": ("Pyramid", "SessionMiddleware", "memory"),
}
Counter = Callable[[], int]


# -- the stores: each variant its own key prefix or table --------------------------------


def our_store(variant: str, kind: str) -> Store:
    """The wsgisession store of ``variant``: a MemoryStore, or Redis / PostgreSQL under names of its own."""
    if kind == "memory":
        from wsgisession import MemoryStore

        return MemoryStore()
    if kind == "redis":
        from wsgisession.stores.redis import RedisStore

        return RedisStore(env("REDIS_URL"), prefix=name(variant.replace("-", "_")) + ":")
    from wsgisession.stores.postgres import PostgresStore

    return PostgresStore(env("DATABASE_URL"), table=name(variant.replace("-", "_")))


def redis_keys(prefix: str) -> Counter:
    """Counts the Redis keys under ``prefix``."""
    import redis

    client = redis.Redis.from_url(env("REDIS_URL"))
    return lambda: sum(1 for _ in client.scan_iter(match=prefix + "*", count=1000))


def table_rows(table: str) -> Counter:
    """Counts the rows of a PostgreSQL table (``schema.table`` or a table of the search path)."""
    import psycopg2

    def count() -> int:
        conn = psycopg2.connect(env("DATABASE_URL"))
        try:
            with conn.cursor() as cur:
                cur.execute(f"SELECT count(*) FROM {table}")
                return int(cur.fetchone()[0])
        finally:
            conn.close()

    return count


def store_counter(variant: str, kind: str) -> Counter | None:
    """Counts the records of our store of ``variant`` (None for memory: the check reads it instead)."""
    if kind == "redis":
        return redis_keys(name(variant.replace("-", "_")) + ":")
    if kind == "postgres":
        return table_rows(name(variant.replace("-", "_")))
    return None


# -- Flask -------------------------------------------------------------------------------


def flask_app(variant: str, store: Store | None, environ: bool = False) -> WSGIApplication:
    """A Flask app: with wsgisession's session interface on ``store`` (``flask.session``); or, with
    ``environ``, wrapped in SessionMiddleware on ``store`` (``request.environ["session"]``); or without
    sessions, when ``store`` is None."""
    import flask

    app = flask.Flask(variant)
    sessions = store is not None
    if store is not None and not environ:
        from wsgisession.frameworks.flask import init_app

        app.config.update(SECRET_KEY=env("BENCH_SECRET"), PERMANENT_SESSION_LIFETIME=TTL)
        init_app(app, store=store)

    def session() -> Any:
        return flask.request.environ["session"] if environ else flask.session

    @app.route("/read")
    def read() -> str:
        return str(session()["user_id"]) if sessions else str(USER_ID)

    @app.route("/write")
    def write() -> str:
        if not sessions:
            return "1"
        session()["counter"] += 1
        return str(session()["counter"])

    @app.route("/login")
    def login() -> str:
        if sessions:
            session().update(login_data())
        return "ok"

    @app.route("/untouched")
    def untouched() -> str:
        return "ok"

    if environ and store is not None:
        return middleware(app, store)
    return app


def middleware(app: WSGIApplication, store: Store) -> WSGIApplication:
    """``app`` in SessionMiddleware on ``store``, as apps.py configures it."""
    from wsgisession import SessionMiddleware

    return SessionMiddleware(app, store, secret=env("BENCH_SECRET"), max_age=TTL)


# -- Django ------------------------------------------------------------------------------

urlpatterns: list[Any] = []  # Django's URLs: ROOT_URLCONF is this module; filled by django_setup()
DJANGO_SCHEMA = "django"  # the schema of Django's own tables (django_session), under name()


def django_setup() -> None:
    """Configure Django once for the process: PostgreSQL (persistent connections, a private
    schema for django_session), a Redis cache under a private key prefix, and the URLs."""
    import django
    from django.conf import settings
    from django.urls import path

    if settings.configured:
        return
    url = urlsplit(env("DATABASE_URL"))
    settings.configure(
        DEBUG=False,
        SECRET_KEY=env("BENCH_SECRET"),
        ALLOWED_HOSTS=["127.0.0.1", "localhost"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[],
        INSTALLED_APPS=["django.contrib.sessions"],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": url.path.lstrip("/"),
                "USER": unquote(url.username or ""),
                "PASSWORD": unquote(url.password or ""),
                "HOST": url.hostname,
                "PORT": url.port or 5432,
                "CONN_MAX_AGE": None,  # persistent, as a production setup has them (else a connect per request)
                "OPTIONS": {"options": f"-c search_path={name(DJANGO_SCHEMA)}"},
            }
        },
        CACHES={
            "default": {
                "BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": env("REDIS_URL"),
                "KEY_PREFIX": name("django_cache"),
            }
        },
        SESSION_COOKIE_AGE=TTL,
        USE_TZ=True,
        LOGGING_CONFIG=None,
    )
    django.setup()
    global SessionStore
    SessionStore = floor_engine()
    urlpatterns.extend(path(view.__name__, view) for view in django_views())


def django_views() -> list[Callable[[Any], Any]]:
    """The four views; the session is ``request.session`` (Django's SessionMiddleware), or
    ``request.META["session"]`` (wsgisession's middleware around the handler), or none."""
    from django.http import HttpResponse

    def session_of(request: Any) -> Any:
        session = request.META.get("session")
        return getattr(request, "session", None) if session is None else session

    def read(request: Any) -> HttpResponse:
        session = session_of(request)
        return HttpResponse(str(USER_ID) if session is None else str(session["user_id"]))

    def write(request: Any) -> HttpResponse:
        session = session_of(request)
        if session is None:
            return HttpResponse("1")
        session["counter"] += 1
        return HttpResponse(str(session["counter"]))

    def login(request: Any) -> HttpResponse:
        session = session_of(request)
        if session is not None:
            session.update(login_data())
        return HttpResponse("ok")

    def untouched(request: Any) -> HttpResponse:
        return HttpResponse("ok")

    return [read, write, login, untouched]


def django_migrate() -> None:
    """Create the private schema and Django's django_session table in it."""
    import psycopg2
    from django.core.management import call_command

    conn = psycopg2.connect(env("DATABASE_URL"))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {name(DJANGO_SCHEMA)}")
    conn.close()
    call_command("migrate", "sessions", verbosity=0)


def django_app(engine: str | None) -> WSGIApplication:
    """A Django WSGIHandler with SessionMiddleware on ``engine`` (none when None). The middleware reads
    SESSION_ENGINE when the handler loads it, so each handler keeps the engine it was built with."""
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import override_settings

    django_setup()
    middleware = [] if engine is None else ["django.contrib.sessions.middleware.SessionMiddleware"]
    with override_settings(MIDDLEWARE=middleware, SESSION_ENGINE=engine or ""):
        handler: WSGIApplication = WSGIHandler()
    return handler


def django_engine(store: Store) -> WSGIApplication:
    """A Django WSGIHandler with SessionMiddleware on wsgisession's engine, on ``store``. The engine
    serves one core per process (``set_core``): each request first makes it this variant's."""
    from wsgisession import SessionCore, Settings
    from wsgisession.frameworks.django import set_core

    core = SessionCore(Settings.load({}, secret=env("BENCH_SECRET"), max_age=TTL), store)
    handler = django_app("wsgisession.frameworks.django")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if serving[0] is not core:  # a batch times one variant: the switch is not in the figures
            set_core(core)
            serving[0] = core
        return handler(environ, start_response)

    return app


serving: list[Any] = [None]  # the core wsgisession's Django engine serves now


def floor_engine() -> type:
    """Django's SessionBase on a dict of this process: no encoding, no signing, no server. Django's
    SessionMiddleware over it is what any engine costs at least (``SESSION_ENGINE`` is this module)."""
    from django.contrib.sessions.backends.base import SessionBase

    records: dict[str, dict[str, Any]] = {}

    class FloorStore(SessionBase):  # type: ignore[misc]
        def load(self) -> dict[str, Any]:
            data = records.get(self.session_key)
            if data is None:
                self._session_key = None
                return {}
            return dict(data)

        def exists(self, session_key: str) -> bool:
            return session_key in records

        def create(self) -> None:
            self._session_key = self._get_new_session_key()
            self.save(must_create=True)
            self.modified = True

        def save(self, must_create: bool = False) -> None:
            if self.session_key is None:
                return self.create()
            records[self.session_key] = dict(self._get_session(no_load=must_create))
            return None

        def delete(self, session_key: str | None = None) -> None:
            records.pop(session_key or self.session_key, None)

    return FloorStore


SessionStore: type | None = None  # the floor engine, once Django is set up


# -- Pyramid -----------------------------------------------------------------------------


def pyramid_app(store: Store | None, environ: bool = False) -> WSGIApplication:
    """A Pyramid app: with wsgisession's session factory on ``store`` (``request.session``); or, with
    ``environ``, wrapped in SessionMiddleware on ``store`` (``request.environ["session"]``); or without
    sessions, when ``store`` is None."""
    from pyramid.config import Configurator
    from pyramid.response import Response

    sessions = store is not None

    def session(request: Any) -> Any:
        return request.environ["session"] if environ else request.session

    def read(request: Any) -> Response:
        return Response(str(session(request)["user_id"]) if sessions else str(USER_ID))

    def write(request: Any) -> Response:
        if not sessions:
            return Response("1")
        session(request)["counter"] += 1
        return Response(str(session(request)["counter"]))

    def login(request: Any) -> Response:
        if sessions:
            session(request).update(login_data())
        return Response("ok")

    def untouched(request: Any) -> Response:
        return Response("ok")

    with Configurator(settings={"wsgisession.secret": env("BENCH_SECRET")}) as config:
        if store is not None and not environ:
            from wsgisession.frameworks.pyramid import session_factory

            config.set_session_factory(session_factory(config.get_settings(), store=store, max_age=TTL))
        for view in (read, write, login, untouched):
            config.add_route(view.__name__, "/" + view.__name__)
            config.add_view(view, route_name=view.__name__)
        app = config.make_wsgi_app()
    return middleware(app, store) if environ and store is not None else app


# -- the variants ------------------------------------------------------------------------


class Built(NamedTuple):
    """A variant's app; what counts its store's records (None: nothing to count); wsgisession's store."""

    app: WSGIApplication
    stored: Counter | None = None
    store: Store | None = None


def build(variant: str) -> Built:
    """The app of ``variant`` (a key of VARIANTS)."""
    framework, (_, library, kind) = variant.partition("-")[0], VARIANTS[variant]
    if variant == "wsgi-bare":
        return Built(bare_app)
    if variant == "wsgi-memory":
        app: Any = wsgisession_variant("memory")
        return Built(app, None, app.store)
    if library == "Flask-Session":
        stored = redis_keys(name("flask") + ":") if kind == "redis" else table_rows(name("flask"))
        return Built(flask_variant(kind), stored)
    if variant == "django-cache":
        return Built(django_app("django.contrib.sessions.backends.cache"), redis_keys(name("django_cache") + ":"))
    if variant == "django-floor":
        return Built(django_app(__name__))
    if variant == "django-db":
        django_setup()
        django_migrate()
        return Built(
            django_app("django.contrib.sessions.backends.db"), table_rows(f"{name(DJANGO_SCHEMA)}.django_session")
        )
    store = None if kind == "-" else our_store(variant, kind)
    environ = library == "SessionMiddleware"
    if framework == "flask":
        app = flask_app(variant, store, environ)
    elif framework == "pyramid":
        app = pyramid_app(store, environ)
    elif store is None or environ:
        app = django_app(None)
        app = app if store is None else middleware(app, store)
    else:
        app = django_engine(store)
    return Built(app, store_counter(variant, kind), store)


def close_django() -> None:
    """Close Django's database connections and caches, if Django was set up."""
    from django.conf import settings

    if settings.configured:
        from django.core.cache import caches
        from django.db import connections

        connections.close_all()
        caches.close_all()
