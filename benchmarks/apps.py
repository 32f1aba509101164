"""The WSGI apps that ``bench.py`` measures, one per variant, importable by gunicorn.

Every variant answers the same four paths:

- ``/login``: starts a session holding ``user_id`` (42), ``counter`` (0) and ``BENCH_KEYS`` more
  strings (default none), and sets its cookie;
- ``/read``: answers ``session["user_id"]`` (a logged-in read);
- ``/write``: increments ``session["counter"]`` and answers it (a read and a write);
- ``/untouched``: answers ``ok`` without touching the session.

``build(variant)`` makes one (gunicorn: ``apps:build('wsgisession-redis')``, from this directory).
Names come from the environment bench.py sets: ``BENCH_RUN`` (in every key prefix and table name),
``BENCH_SECRET``, ``BENCH_DIR`` (SQLite files, Beaker's lock directory), ``BENCH_KEYS`` (more keys in
each session), ``REDIS_URL``, ``DATABASE_URL``.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

TTL = 86400  # one day, every library's idle timeout
USER_ID = 42

# variant: (library, store) as the table shows them
VARIANTS: dict[str, tuple[str, str]] = {
    "bare": ("bare (no sessions)", "-"),
    "raw-redis": ("raw", "redis"),
    "raw-postgres": ("raw", "postgres"),
    "raw-sqlite": ("raw", "sqlite"),
    "raw-failover": ("raw", "redis+postgres"),
    "wsgisession-memory": ("wsgisession", "memory"),
    "wsgisession-redis": ("wsgisession", "redis"),
    "wsgisession-postgres": ("wsgisession", "postgres"),
    "wsgisession-sqlite": ("wsgisession", "sqlite"),
    "wsgisession-failover": ("wsgisession", "redis+postgres"),
    "beaker-redis": ("Beaker", "redis"),
    "beaker-postgres": ("Beaker", "postgres"),
    "flask-bare": ("Flask (no sessions)", "-"),
    "flask-session-redis": ("Flask-Session", "redis"),
    "flask-session-postgres": ("Flask-Session", "postgres"),
}
COOKIE_NAMES = {"beaker-redis": "beaker.session.id", "beaker-postgres": "beaker.session.id"}  # else "session"


def env(name: str) -> str:
    defaults = {
        "BENCH_KEYS": "0",
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/test",
        "BENCH_RUN": "dev",
        "BENCH_DIR": "/tmp",
    }
    value = os.environ.get(name, defaults.get(name))
    if value is None:
        raise RuntimeError(f"{name} is not set (bench.py sets it)")
    return value


def name(what: str) -> str:
    """A table name or key prefix of this run only."""
    return f"bench_{env('BENCH_RUN')}_{what}"


def sqlalchemy_url() -> str:
    return "postgresql+psycopg2://" + env("DATABASE_URL").split("://", 1)[1]


def login_data() -> dict[str, Any]:
    """What /login stores: user_id, counter, and BENCH_KEYS more string values."""
    extra = {f"k{i}": f"value number {i} " + "x" * 20 for i in range(int(env("BENCH_KEYS")))}
    return {"user_id": USER_ID, "counter": 0, **extra}


def respond(start_response: StartResponse, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), *headers])
    return [body]


# -- no sessions -------------------------------------------------------------------------


def bare_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    body = str(USER_ID).encode() if path == "/read" else b"1" if path == "/write" else b"ok"
    return respond(start_response, body)


# -- raw: by hand, only what a session layer must do ------------------------------------


class Backend(Protocol):
    def load(self, sid: str) -> dict[str, Any] | None: ...
    def save(self, sid: str, data: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class RawRedis:
    """One GET per read, one SET EX per write; the session is one JSON string."""

    def __init__(self, prefix: str) -> None:
        import redis

        self.client = redis.Redis.from_url(env("REDIS_URL"))
        self.prefix = prefix

    def load(self, sid: str) -> dict[str, Any] | None:
        raw = self.client.get(self.prefix + sid)
        return None if raw is None else json.loads(raw)

    def save(self, sid: str, data: dict[str, Any]) -> None:
        self.client.set(self.prefix + sid, json.dumps(data), ex=TTL)

    def close(self) -> None:
        self.client.close()


class RawSQL:
    """One SELECT by primary key per read, one upsert per write, on a pooled connection."""

    def __init__(self, connect: Callable[[], Any], load_sql: str, save_sql: str, clock: bool = False) -> None:
        self._connect = connect
        self._idle: list[Any] = []  # list.pop/append are atomic: a thread-safe pool
        self._load_sql = load_sql
        self._save_sql = save_sql
        self._clock = clock  # pass the time (SQLite has no clock function of sub-second precision here)

    def _run(self, sql: str, params: tuple[Any, ...]) -> Any:
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = self._connect()
        try:
            cur = conn.cursor()
            cur.execute(sql, params)
            row = cur.fetchone() if cur.description else None
            cur.close()
        except BaseException:
            conn.close()
            raise
        self._idle.append(conn)
        return row

    def load(self, sid: str) -> dict[str, Any] | None:
        row = self._run(self._load_sql, (sid, time.time()) if self._clock else (sid,))
        return None if row is None else json.loads(row[0])

    def save(self, sid: str, data: dict[str, Any]) -> None:
        encoded = json.dumps(data)
        self._run(self._save_sql, (sid, encoded, time.time() + TTL) if self._clock else (sid, encoded))

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


def raw_postgres(table: str) -> RawSQL:
    import psycopg2

    def connect() -> Any:
        conn = psycopg2.connect(env("DATABASE_URL"))
        conn.autocommit = True
        return conn

    conn = connect()
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE IF NOT EXISTS {table} (id TEXT PRIMARY KEY, data TEXT NOT NULL, "
                    "expires_at TIMESTAMPTZ NOT NULL)")  # fmt: skip
    conn.close()
    return RawSQL(
        connect,
        f"SELECT data FROM {table} WHERE id = %s AND expires_at > now()",
        f"INSERT INTO {table} (id, data, expires_at) VALUES (%s, %s, now() + interval '{TTL} seconds') "
        "ON CONFLICT (id) DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at",
    )


def raw_sqlite(path: str) -> RawSQL:
    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    conn = connect()
    conn.execute("CREATE TABLE IF NOT EXISTS raw (id TEXT PRIMARY KEY, data TEXT NOT NULL, expires_at REAL NOT NULL)")
    conn.close()
    return RawSQL(
        connect,
        "SELECT data FROM raw WHERE id = ? AND expires_at > ?",
        "INSERT INTO raw (id, data, expires_at) VALUES (?, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at",
        clock=True,
    )


class RawFailover:
    """Reads from Redis; each write goes to PostgreSQL, then to Redis."""

    def __init__(self, cache: RawRedis, durable: RawSQL) -> None:
        self.cache, self.durable = cache, durable

    def load(self, sid: str) -> dict[str, Any] | None:
        return self.cache.load(sid)

    def save(self, sid: str, data: dict[str, Any]) -> None:
        self.durable.save(sid, data)
        self.cache.save(sid, data)

    def close(self) -> None:
        self.cache.close()
        self.durable.close()


def raw_app(backend: Backend) -> WSGIApplication:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        if path == "/untouched":
            return respond(start_response, b"ok")
        if path == "/login":
            sid = secrets.token_urlsafe(32)
            backend.save(sid, login_data())
            return respond(start_response, b"ok", [("Set-Cookie", f"session={sid}; Path=/; HttpOnly")])
        sid = None
        for part in environ.get("HTTP_COOKIE", "").split(";"):
            key, _, value = part.partition("=")
            if key.strip() == "session":
                sid = value.strip()
        data = (backend.load(sid) if sid else None) or {}
        if path == "/write":
            data["counter"] = data.get("counter", 0) + 1
            if sid:
                backend.save(sid, data)
            return respond(start_response, str(data["counter"]).encode())
        return respond(start_response, str(data.get("user_id")).encode())

    app.close = backend.close  # type: ignore[attr-defined]
    return app


# -- wsgisession -------------------------------------------------------------------------


def wsgisession_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    session = environ["session"]
    path = environ["PATH_INFO"]
    if path == "/read":
        return respond(start_response, str(session["user_id"]).encode())
    if path == "/write":
        session["counter"] += 1
        return respond(start_response, str(session["counter"]).encode())
    if path == "/login":
        session.update(login_data())
    return respond(start_response, b"ok")


def wsgisession_variant(store_kind: str) -> WSGIApplication:
    from wsgisession import MemoryStore, SessionMiddleware, SessionStore, SQLiteStore

    store: SessionStore
    if store_kind == "memory":
        store = MemoryStore()
    elif store_kind == "redis":
        from wsgisession.stores.redis import RedisStore

        store = RedisStore(env("REDIS_URL"), prefix=name("ws") + ":")
    elif store_kind == "postgres":
        from wsgisession.stores.postgres import PostgresStore

        # raw is written on psycopg2, so the store is too: benchmarks/drivers.py puts psycopg 3 beside it
        store = PostgresStore(env("DATABASE_URL"), table=name("ws"), driver="psycopg2")
    elif store_kind == "sqlite":
        store = SQLiteStore(os.path.join(env("BENCH_DIR"), "wsgisession.sqlite3"))
    elif store_kind == "failover":
        from wsgisession.stores.failover import FailoverStore
        from wsgisession.stores.postgres import PostgresStore
        from wsgisession.stores.redis import RedisStore

        store = FailoverStore(
            RedisStore(env("REDIS_URL"), prefix=name("wsfo") + ":"),
            PostgresStore(env("DATABASE_URL"), table=name("wsfo"), driver="psycopg2"),
        )
    else:
        raise ValueError(store_kind)
    return SessionMiddleware(wsgisession_app, store, secret=env("BENCH_SECRET"), max_age=TTL)


# -- Beaker ------------------------------------------------------------------------------


def beaker_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    session = environ["beaker.session"]
    path = environ["PATH_INFO"]
    if path == "/read":
        return respond(start_response, str(session["user_id"]).encode())
    if path == "/write":
        session["counter"] += 1
        session.save()
        return respond(start_response, str(session["counter"]).encode())
    if path == "/login":
        session.update(login_data())
        session.save()
    return respond(start_response, b"ok")


def beaker_variant(store_kind: str) -> WSGIApplication:
    """Beaker as its documentation configures it: a signed cookie, a timeout, an ext: backend."""
    from beaker.middleware import SessionMiddleware as BeakerMiddleware

    config: dict[str, Any] = {
        "session.key": "beaker.session.id",
        "session.timeout": TTL,
        "session.secret": env("BENCH_SECRET"),
        "session.lock_dir": os.path.join(env("BENCH_DIR"), "beaker-lock"),
    }
    if store_kind == "redis":
        config.update({"session.type": "ext:redis", "session.url": env("REDIS_URL")})
    else:
        config.update({"session.type": "ext:database", "session.url": sqlalchemy_url(),
                       "session.table_name": name("beaker")})  # fmt: skip
    return BeakerMiddleware(beaker_app, config)  # type: ignore[no-any-return]


# -- Flask, and Flask-Session ------------------------------------------------------------


def flask_variant(store_kind: str | None) -> WSGIApplication:
    """A Flask app; with Flask-Session configured as its documentation shows, unless ``store_kind`` is None."""
    from flask import Flask, session

    app = Flask(f"bench_{store_kind}")
    if store_kind is not None:
        from flask_session import Session

        app.secret_key = env("BENCH_SECRET")
        if store_kind == "redis":
            import redis

            app.config.update(SESSION_TYPE="redis", SESSION_REDIS=redis.Redis.from_url(env("REDIS_URL")),
                              SESSION_KEY_PREFIX=name("flask") + ":")  # fmt: skip
        else:
            from flask_sqlalchemy import SQLAlchemy

            app.config.update(SESSION_TYPE="sqlalchemy", SQLALCHEMY_DATABASE_URI=sqlalchemy_url(),
                              SESSION_SQLALCHEMY_TABLE=name("flask"))  # fmt: skip
            app.config["SESSION_SQLALCHEMY"] = SQLAlchemy(app)
        Session(app)

    @app.route("/read")
    def read() -> str:
        return str(session["user_id"]) if store_kind else str(USER_ID)

    @app.route("/write")
    def write() -> str:
        if not store_kind:
            return "1"
        session["counter"] += 1
        return str(session["counter"])

    @app.route("/login")
    def login() -> str:
        session.update(login_data())
        return "ok"

    @app.route("/untouched")
    def untouched() -> str:
        return "ok"

    return app


def build(variant: str) -> WSGIApplication:
    """The WSGI app of ``variant`` (a key of VARIANTS)."""
    if variant == "bare":
        return bare_app
    if variant == "flask-bare":
        return flask_variant(None)
    kind, _, store = variant.rpartition("-")
    if kind == "raw":
        backend: Backend
        if store == "redis":
            backend = RawRedis(name("raw") + ":")
        elif store == "postgres":
            backend = raw_postgres(name("raw"))
        elif store == "sqlite":
            backend = raw_sqlite(os.path.join(env("BENCH_DIR"), "raw.sqlite3"))
        else:
            backend = RawFailover(RawRedis(name("rawfo") + ":"), raw_postgres(name("rawfo")))
        return raw_app(backend)
    if kind == "wsgisession":
        return wsgisession_variant(store)
    if kind == "beaker":
        return beaker_variant(store)
    if kind == "flask-session":
        return flask_variant(store)
    raise ValueError(f"unknown variant {variant!r}")
