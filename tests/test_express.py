"""SESSION_FORMAT=express against the real Node.js packages: one cookie, one session, two applications.

tests/node_app/server.js is examples/raw_wsgi.py written with Express, express-session and
connect-redis or connect-pg-simple (versions pinned in its package.json and package-lock.json).
Each test drives that app and the raw WSGI example (under wsgiref, in a thread) with the same
cookie jar, over HTTP, against the real Redis and PostgreSQL, on a private key prefix and a
private table. Every record the Python side writes is read back and checked to be a document
express-session can read. The backends (BACKENDS): connect-redis's records on Redis and on Valkey,
connect-pg-simple's table through each PostgreSQL driver on the Python side.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from unittest import mock
from urllib.parse import unquote, urlencode
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psycopg2
import pytest
import redis
from servers import PG_DRIVERS, REDIS_KINDS, free_port, require_postgres, shared_redis_url, unique

from wsgisession import SessionMiddleware, SessionValueError
from wsgisession.signing import ExpressSigner

NODE_APP = Path(__file__).resolve().parent / "node_app"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
COOKIE = "connect.sid"
DAY_MS = 86_400_000
# Strong random secrets, the same on both sides; NEW is the current one, OLD the one rotated out.
NEW = secrets.token_urlsafe(36)
OLD = secrets.token_urlsafe(36)
ISO_MS_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
KNOWN_VECTOR = "s%3Aabcdefghijklmnopqrstuvwxyz012345.2T3g1YIBqofc0ViEUEt59cUq%2Ba6Wlfi59xfb4RQsxSQ"
BACKENDS = [*REDIS_KINDS, *(f"postgres-{driver}" for driver in PG_DRIVERS)]


# -- the Node.js application ------------------------------------------------------------


@pytest.fixture(scope="session")
def node_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of tests/node_app with its locked dependencies installed (`npm ci`)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are needed (Node.js 20 or later) for the Express interoperability tests")
    directory = tmp_path_factory.mktemp("node_app")
    for name in ("package.json", "package-lock.json", "server.js"):
        shutil.copy(NODE_APP / name, directory / name)
    command = [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline", "--loglevel=error"]
    env = {**os.environ, "npm_config_update_notifier": "false"}
    try:
        done = subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("npm ci took more than 240 s")
    if done.returncode != 0:
        pytest.fail(f"npm ci failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return directory


def node_eval(node_dir: Path, script: str, payload: Any) -> Any:
    """Run ``script`` with node in the app's directory, the JSON ``payload`` on stdin; its stdout as JSON."""
    done = subprocess.run(
        ["node", "-e", script], cwd=node_dir, input=json.dumps(payload), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# -- the stores, seen directly ------------------------------------------------------------


@dataclass
class Backend:
    """One store both applications share (a private Redis prefix or PostgreSQL table), read directly."""

    kind: str
    name: str  # the Redis key prefix, or the table
    url: str  # the Redis (or Valkey) URL, or the PostgreSQL one
    driver: str = ""  # the Python side's PostgreSQL driver
    redis: redis.Redis | None = None
    pg: Any = None

    @property
    def node_env(self) -> dict[str, str]:
        if self.kind == "redis":
            return {"STORE": "redis", "REDIS_URL": self.url, "PREFIX": self.name}
        return {"STORE": "postgres", "DATABASE_URL": self.url, "TABLE": self.name}

    @property
    def python_env(self) -> dict[str, str]:
        if self.kind == "redis":
            return {"SESSION_STORE": "redis", "REDIS_URL": self.url, "SESSION_REDIS_PREFIX": self.name}
        return {"SESSION_STORE": "postgres", "DATABASE_URL": self.url, "SESSION_TABLE": self.name,
                "SESSION_PG_DRIVER": self.driver}  # fmt: skip

    def raw(self, sid: str) -> tuple[str, float] | None:
        """The live record of session ``sid`` as stored (JSON text) and when it expires (Unix seconds)."""
        if self.redis is not None:
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(self.name + sid)
            pipe.pttl(self.name + sid)
            text, pttl = pipe.execute()
            return None if text is None else (text.decode(), time.time() + pttl / 1000)
        with self.pg.cursor() as cur:
            cur.execute(
                f"SELECT sess::text, extract(epoch from expire::timestamptz)::float8 FROM {self.name} "
                "WHERE sid = %s AND expire > now()",
                (sid,),
            )
            row = cur.fetchone()
        return None if row is None else (row[0], row[1])

    def live(self, sid: str) -> tuple[str, float]:
        """:meth:`raw`, for a record that must be there."""
        found = self.raw(sid)
        assert found is not None, f"no live record for session {sid}"
        return found

    def document(self, sid: str) -> dict[str, Any]:
        document = json.loads(self.live(sid)[0])
        assert isinstance(document, dict)
        return document

    def write(self, sid: str, text: str | bytes, ttl: float = 120) -> None:
        """Store ``text`` as the record of ``sid``, whatever it is, as another program might."""
        if self.redis is not None:
            self.redis.set(self.name + sid, text, px=round(ttl * 1000))
            return
        with self.pg.cursor() as cur:
            cur.execute(
                f"INSERT INTO {self.name} (sid, sess, expire) VALUES (%s, %s, to_timestamp(%s)) "
                "ON CONFLICT (sid) DO UPDATE SET sess = excluded.sess, expire = excluded.expire",
                (sid, text, time.time() + ttl),
            )

    def close(self) -> None:
        if self.redis is not None:
            keys = list(self.redis.scan_iter(match=self.name + "*", count=1000))
            if keys:
                self.redis.delete(*keys)
            self.redis.close()
        if self.pg is not None:
            with self.pg.cursor() as cur:
                cur.execute(f"DROP TABLE IF EXISTS {self.name}")
            self.pg.close()


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest, node_dir: Path) -> Iterator[Backend]:
    if request.param in REDIS_KINDS:
        url = shared_redis_url(request.param)
        store = Backend("redis", unique("express") + ":", url, redis=redis.Redis.from_url(url))
    else:
        url, driver = require_postgres(), request.param.partition("-")[2]
        table = unique("session")
        conn = psycopg2.connect(url)
        conn.autocommit = True
        # The table exactly as connect-pg-simple creates it (its table.sql), under names of our own:
        # its constraint and index names are fixed ("session_pkey"), and would collide between tables.
        ddl = (node_dir / "node_modules" / "connect-pg-simple" / "table.sql").read_text()
        ddl = ddl.replace('"session_pkey"', f'"{table}_pkey"').replace('"IDX_session_expire"', f'"IDX_{table}_expire"')
        with conn.cursor() as cur:
            cur.execute(ddl.replace('"session"', f'"{table}"'))
        store = Backend("postgres", table, url, driver, pg=conn)
    yield store
    store.close()


# -- the two applications -------------------------------------------------------------------


@dataclass
class Server:
    side: str  # "node" or "python"
    url: str
    backend: Backend
    secrets: tuple[str, ...]
    max_age_ms: int
    stop: Callable[[], None] = field(repr=False)

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.url.removeprefix("http://").partition(":")
        return host, int(port)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def load_raw_wsgi() -> Any:
    """examples/raw_wsgi.py's application (unwrapped), imported with throwaway settings."""
    spec = importlib.util.spec_from_file_location("express_raw_wsgi", EXAMPLES / "raw_wsgi.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with session_environment({"SESSION_SECRET": NEW, "SESSION_STORE": "memory"}):
        spec.loader.exec_module(module)
    module.app.close()
    return module.wsgi_app


@contextlib.contextmanager
def session_environment(settings: dict[str, str]) -> Iterator[None]:
    """os.environ without any session setting of the CI's, plus ``settings``."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_")}
    env = {k: v for k, v in keep.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    with mock.patch.dict(os.environ, {**env, **settings}, clear=True):
        yield


def json_response(start_response: Callable[..., Any], status: str, value: Any) -> list[bytes]:
    body = json.dumps(value).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def with_data_routes(example: Callable[..., Any]) -> Callable[..., Any]:
    """The example plus GET/POST /api/data (the whole session; merge a JSON object into it) and
    POST /api/incr?key=K (session[K] += 1), for checks the example's routes cannot make."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        session, path, method = environ["session"], environ.get("PATH_INFO"), environ["REQUEST_METHOD"]
        if path == "/api/data" and method == "GET":
            return json_response(start_response, "200 OK", dict(session))
        if path == "/api/data" and method == "POST":
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            session.update(json.loads(body))
            try:
                return json_response(start_response, "200 OK", dict(session))
            except SessionValueError as exc:  # raised by the save, in start_response: nothing was written
                return json_response(start_response, "400 Bad Request", {"error": str(exc)})
        if path == "/api/incr" and method == "POST":
            key = environ["QUERY_STRING"].removeprefix("key=")
            session[key] = session.get(key, 0) + 1
            return json_response(start_response, "200 OK", {key: session[key]})
        return example(environ, start_response)

    return app


class Servers:
    """The Node and Python applications of one backend, started on first use, one per configuration."""

    def __init__(self, backend: Backend, node_dir: Path, logs: Path) -> None:
        self.backend = backend
        self.node_dir = node_dir
        self.logs = logs
        self.app = with_data_routes(load_raw_wsgi())
        self._started: dict[tuple[Any, ...], Server] = {}

    def node(self, secrets: tuple[str, ...] = (NEW,), max_age_ms: int = DAY_MS) -> Server:
        key = ("node", secrets, max_age_ms)
        if key not in self._started:
            self._started[key] = self._start_node(secrets, max_age_ms)
        return self._started[key]

    def python(self, secrets: tuple[str, ...] = (NEW,), max_age_ms: int = DAY_MS) -> Server:
        key = ("python", secrets, max_age_ms)
        if key not in self._started:
            self._started[key] = self._start_python(secrets, max_age_ms)
        return self._started[key]

    def _start_node(self, secrets: tuple[str, ...], max_age_ms: int) -> Server:
        port = free_port()
        env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "PORT": str(port),
               "SECRET": ",".join(secrets), "MAX_AGE": str(max_age_ms), **self.backend.node_env}  # fmt: skip
        log_path = self.logs / f"node-{port}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                ["node", "server.js"], cwd=self.node_dir, env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                pytest.fail(f"node server.js exited ({process.returncode}):\n{log_path.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    process.kill()
                    pytest.fail(f"node server.js did not listen on port {port}:\n{log_path.read_text()}")
                time.sleep(0.05)

        def stop() -> None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            output = log_path.read_text()
            if "Error" in output:  # an error Express logged (its default handler prints the stack)
                sys.stderr.write(f"node server.js on port {port} logged:\n{output}\n")

        return Server("node", f"http://127.0.0.1:{port}", self.backend, secrets, max_age_ms, stop)

    def _start_python(self, secrets: tuple[str, ...], max_age_ms: int) -> Server:
        settings = {
            "SESSION_FORMAT": "express",
            "SESSION_SECRET": ",".join(secrets),
            "SESSION_MAX_AGE": str(max_age_ms),
            "SESSION_CLEANUP_INTERVAL": "0",
            **self.backend.python_env,
        }
        with session_environment(settings):
            middleware = SessionMiddleware(self.app)
        assert (middleware.settings.format, middleware.settings.cookie_name) == ("express", COOKIE)
        if self.backend.driver:  # SESSION_PG_DRIVER took: the Python side runs on the driver the test names
            assert middleware.store.driver.name == self.backend.driver  # type: ignore[attr-defined]
        httpd = make_server("127.0.0.1", 0, middleware, server_class=_ThreadingServer, handler_class=_Quiet)
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()

        def stop() -> None:
            httpd.shutdown()
            httpd.server_close()
            middleware.close()

        port = httpd.server_address[1]
        return Server("python", f"http://127.0.0.1:{port}", self.backend, secrets, max_age_ms, stop)

    def close(self) -> None:
        for server in self._started.values():
            server.stop()


@pytest.fixture(scope="session")
def servers(backend: Backend, node_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    started = Servers(backend, node_dir, tmp_path_factory.mktemp("logs"))
    yield started
    started.close()


# -- a browser ------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def set_cookies(self) -> list[str]:
        return [v for k, v in self.headers if k.lower() == "set-cookie" and v.startswith(COOKIE + "=")]


def send(server: Server, method: str, path: str, cookie: str | None = None, body: bytes = b"",
         content_type: str = "application/x-www-form-urlencoded") -> Response:  # fmt: skip
    """One HTTP request, on a connection of its own."""
    conn = http.client.HTTPConnection(*server.address, timeout=15)
    try:
        headers = {"Content-Type": content_type} if body else {}
        if cookie is not None:
            headers["Cookie"] = f"{COOKIE}={cookie}"
        conn.request(method, path, body=body or None, headers=headers)
        answer = conn.getresponse()
        return Response(answer.status, answer.getheaders(), answer.read())
    finally:
        conn.close()


def cookie_change(header: str) -> str | None:
    """The cookie value a Set-Cookie header leaves in the browser: None when it deletes the cookie."""
    pair, *attributes = header.split(";")
    value = pair.partition("=")[2].strip()
    for attribute in attributes:
        name, _, argument = attribute.strip().partition("=")
        if name.lower() == "max-age" and int(argument) <= 0:
            return None
        if name.lower() == "expires" and parsedate_to_datetime(argument).timestamp() <= time.time():
            return None
    return value or None


def express_id(cookie: str) -> str:
    """The session id an express-session cookie value names (the signature is not checked)."""
    value = unquote(cookie)
    assert value.startswith("s:"), cookie
    return value[2:].rpartition(".")[0]


def check_document(text: str, max_age_ms: int) -> dict[str, Any]:
    """The record as JSON, asserting it is one express-session can read: an object with a ``cookie``
    object as express-session writes it (expires as Date.toJSON, ms lifetimes)."""
    document = json.loads(text)
    assert isinstance(document, dict), text
    cookie = document.get("cookie")
    assert isinstance(cookie, dict), text
    assert ISO_MS_Z.fullmatch(cookie["expires"]), cookie
    # express-session computes originalMaxAge as expires - now on its own clock: a millisecond may pass
    # in between (seen: 86399999), so a document Node.js wrote may be a few ms short.
    assert isinstance(cookie["originalMaxAge"], int), cookie
    assert max_age_ms - 5 <= cookie["originalMaxAge"] <= max_age_ms, cookie
    assert cookie["httpOnly"] is True and cookie["path"] == "/" and cookie["sameSite"] == "lax", cookie
    return document


def iso_seconds(expires: str) -> float:
    return datetime.strptime(expires, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


class Browser:
    """A cookie jar for connect.sid shared between the two applications, as one browser on one site."""

    def __init__(self) -> None:
        self.cookie: str | None = None
        self.python_writes = 0

    def request(self, server: Server, method: str, path: str, form: dict[str, str] | None = None,
                data: Any = None) -> Response:  # fmt: skip
        if data is not None:
            response = send(server, method, path, self.cookie, json.dumps(data).encode(), "application/json")
        else:
            response = send(server, method, path, self.cookie, urlencode(form or {}).encode())
        assert response.status < 500, (server, path, response.status, response.body)
        for header in response.set_cookies():
            self.cookie = cookie_change(header)
            if server.side == "python" and self.cookie is not None:
                # Python handed out a live cookie: its record exists, and express-session can read it.
                found = server.backend.raw(express_id(self.cookie))
                assert found is not None, f"Python set a cookie for a session it did not store: {header}"
                check_document(found[0], server.max_age_ms)
                self.python_writes += 1
        return response

    def state(self, server: Server) -> dict[str, Any]:
        """What the example's GET /api/session says: {"user": .., "count": ..}."""
        response = self.request(server, "GET", "/api/session")
        assert response.status == 200
        return dict(response.json())

    def login(self, server: Server, username: str) -> Response:
        response = self.request(server, "POST", "/login", {"username": username})
        assert response.status == 303 and self.cookie is not None
        return response

    def post(self, server: Server, path: str) -> None:
        assert self.request(server, "POST", path).status == 303


def other(side: str) -> str:
    return "python" if side == "node" else "node"


def on(servers: Servers, side: str) -> Server:
    return servers.node() if side == "node" else servers.python()


# -- signing ----------------------------------------------------------------------------------


def test_known_vector() -> None:
    signer = ExpressSigner(["keyboard cat"])
    assert signer.sign("abcdefghijklmnopqrstuvwxyz012345") == KNOWN_VECTOR
    assert signer.unsign(KNOWN_VECTOR) == ("abcdefghijklmnopqrstuvwxyz012345", None, True)


def test_signatures_match_the_cookie_signature_module(node_dir: Path) -> None:
    """The signer express-session itself uses, on ids and secrets with characters that need escaping."""
    cases = [(secrets.token_urlsafe(24), secret) for secret in (NEW, OLD, "ünïcødé sécret ✓ " + NEW, "+/=%;" * 8)]
    script = """
      const path = require("path");
      const here = path.dirname(require.resolve("express-session"));  // the copy express-session uses
      const sig = require(require.resolve("cookie-signature", {paths: [here]}));
      let input = ""; process.stdin.on("data", (d) => input += d).on("end", () => {
        const out = JSON.parse(input).map(([id, secret]) => {
          const value = encodeURIComponent("s:" + sig.sign(id, secret));
          return [value, sig.unsign(decodeURIComponent(value).slice(2), secret)];
        });
        process.stdout.write(JSON.stringify(out));
      });
    """
    from_node = node_eval(node_dir, script, cases)
    for (session_id, secret), (node_value, _) in zip(cases, from_node, strict=True):
        signer = ExpressSigner([secret])
        assert signer.sign(session_id) == node_value
        assert signer.unsign(node_value) == (session_id, None, True)
        assert ExpressSigner([OLD if secret != OLD else NEW]).unsign(node_value) is None
    assert node_eval(node_dir, script, [["abcdefghijklmnopqrstuvwxyz012345", "keyboard cat"]])[0][0] == KNOWN_VECTOR


# -- one session, two applications ----------------------------------------------------------------


@pytest.mark.parametrize("first", ["node", "python"])
def test_a_login_on_one_side_is_a_login_on_the_other(servers: Servers, first: str) -> None:
    a, b = on(servers, first), on(servers, other(first))
    browser = Browser()
    browser.login(a, "alice")
    assert re.fullmatch(r"s%3A[A-Za-z0-9_-]{32}\.[A-Za-z0-9%]+", browser.cookie or ""), browser.cookie
    assert browser.state(a) == {"user": "alice", "count": 0}
    assert browser.state(b) == {"user": "alice", "count": 0}
    # Changes made by either are seen by the other, in turn, on the same session and cookie.
    sid = express_id(browser.cookie or "")
    for turn in range(1, 5):
        browser.post((a, b)[turn % 2], "/counter")
        assert browser.state(a) == browser.state(b) == {"user": "alice", "count": turn}
    assert express_id(browser.cookie or "") == sid
    document = check_document(servers.backend.live(sid)[0], DAY_MS)
    assert (document["user"], document["count"]) == ("alice", 4)


def test_values_survive_the_other_sides_writes(servers: Servers) -> None:
    """Keys one side never touches come back intact after the other rewrites or merges the document."""
    node, python = servers.node(), servers.python()
    browser = Browser()
    browser.login(node, "bob")
    values = {"prefs": {"theme": "dark", "langs": ["fr", "日本語"], "n": None, "x": 1.5}, "emoji": '🍪 "quoted" \\'}
    assert browser.request(python, "POST", "/api/data", data=values).status == 200
    browser.post(node, "/counter")  # express-session writes its whole document back
    browser.post(python, "/counter")  # wsgisession merges the one key it changed
    browser.post(node, "/counter")
    assert browser.request(python, "GET", "/api/data").json() == {"user": "bob", "count": 3, **values}
    document = servers.backend.document(express_id(browser.cookie or ""))
    assert {k: document[k] for k in values} == values


def cookie_attributes(header: str) -> dict[str, str]:
    """A Set-Cookie header's attributes, by lowercase name."""
    attributes = {}
    for attribute in header.split(";")[1:]:
        name, _, value = attribute.strip().partition("=")
        attributes[name.lower()] = value
    return attributes


def test_python_writes_the_document_express_session_writes(servers: Servers) -> None:
    """The same record and the same cookie for the same login, but for the expiry times."""
    node, python = servers.node(), servers.python()
    documents, headers = {}, {}
    for server in (node, python):
        browser = Browser()
        [headers[server.side]] = browser.login(server, "carol").set_cookies()
        sid = express_id(browser.cookie or "")
        text, expires = servers.backend.live(sid)
        documents[server.side] = check_document(text, DAY_MS)
        # cookie.expires is when the record expires (express-session's stores take the TTL from it;
        # connect-pg-simple rounds it up to the second).
        assert abs(iso_seconds(documents[server.side]["cookie"]["expires"]) - expires) < 1.5
    from_node, from_python = documents["node"], documents["python"]
    assert from_python.pop("wsgisession.user")["id"] == "carol"  # the Python demo's login binds the session
    assert list(from_python) == list(from_node) == ["cookie", "user"]
    assert list(from_python["cookie"]) == list(from_node["cookie"])
    assert from_python["cookie"].pop("originalMaxAge") == DAY_MS  # exact; Node's may be a ms short
    del from_node["cookie"]["originalMaxAge"], from_node["cookie"]["expires"], from_python["cookie"]["expires"]
    assert from_python == from_node
    # Set-Cookie: the same attributes; Python adds Max-Age (which browsers prefer), for the same time.
    node_cookie, python_cookie = cookie_attributes(headers["node"]), cookie_attributes(headers["python"])
    assert python_cookie.pop("max-age") == str(DAY_MS // 1000)
    times = [parsedate_to_datetime(cookie.pop("expires")).timestamp() for cookie in (node_cookie, python_cookie)]
    assert abs(times[0] - times[1]) < 5
    assert python_cookie == node_cookie == {"path": "/", "httponly": "", "samesite": "Lax"}


def test_an_update_by_python_renews_cookie_expires(servers: Servers) -> None:
    """After a merge, the stored cookie.expires is Python's new expiry (what connect-redis turns into a TTL)."""
    node, python = servers.node(), servers.python()
    browser = Browser()
    browser.login(node, "dan")
    sid = express_id(browser.cookie or "")
    time.sleep(1.2)  # so that a renewed expiry differs from Node's
    before = iso_seconds(servers.backend.document(sid)["cookie"]["expires"])
    browser.post(python, "/counter")
    text, expires = servers.backend.live(sid)
    after = iso_seconds(check_document(text, DAY_MS)["cookie"]["expires"])
    assert after > before + 1 and abs(after - expires) < 0.5
    assert browser.state(node) == {"user": "dan", "count": 1}


@pytest.mark.parametrize("logout_on", ["node", "python"])
def test_a_logout_on_either_side_ends_the_session_on_both(servers: Servers, logout_on: str) -> None:
    browser = Browser()
    browser.login(on(servers, other(logout_on)), "erin")
    browser.post(on(servers, logout_on), "/counter")
    cookie = browser.cookie
    assert cookie is not None
    browser.post(on(servers, logout_on), "/logout")
    assert browser.cookie is None  # both expire the cookie
    assert servers.backend.raw(express_id(cookie)) is None
    replay = Browser()  # a copy of the cookie, kept from before the logout, is worth nothing on either side
    for side in ("node", "python", "node"):
        replay.cookie = cookie
        assert replay.state(on(servers, side)) == {"user": None, "count": 0}
        assert servers.backend.raw(express_id(cookie)) is None


@pytest.mark.parametrize("first", ["node", "python"])
def test_a_login_on_the_other_side_replaces_the_session_id(servers: Servers, first: str) -> None:
    """A login regenerates the id on either side, and the old id is dead on both."""
    browser = Browser()
    browser.login(on(servers, first), "frank")
    before = browser.cookie
    browser.login(on(servers, other(first)), "grace")
    assert browser.cookie != before and express_id(browser.cookie or "") != express_id(before or "")
    assert servers.backend.raw(express_id(before or "")) is None
    for side in ("node", "python"):
        assert browser.state(on(servers, side))["user"] == "grace"
        stale = Browser()
        stale.cookie = before
        assert stale.state(on(servers, side))["user"] is None


# -- lifetimes and keys -----------------------------------------------------------------------


# Valkey expires keys as Redis does: the 8 s this takes are spent on Redis and on each driver, not on Valkey too.
@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "valkey"], indirect=True)
def test_expiry_agrees(servers: Servers) -> None:
    """Activity on either side keeps a session alive on both; idle past MAX_AGE, it is gone on both."""
    max_age_ms = 2000
    node, python = servers.node(max_age_ms=max_age_ms), servers.python(max_age_ms=max_age_ms)
    browsers = {"node": Browser(), "python": Browser()}
    for side, browser in browsers.items():
        browser.login(node if side == "node" else python, f"{side}-user")
        found = servers.backend.raw(express_id(browser.cookie or ""))
        assert found is not None and 0 < found[1] - time.time() <= 3.05  # a 2 s lifetime (Node rounds up to 1 s)
    # Alternate reads for twice MAX_AGE: each one extends the idle lifetime on both sides.
    end = time.monotonic() + 2 * max_age_ms / 1000
    turn = 0
    while time.monotonic() < end:
        for side, browser in browsers.items():
            server = (node, python)[turn % 2]
            assert browser.state(server)["user"] == f"{side}-user", (server.side, turn)
        turn += 1
        time.sleep(0.3)
    # Idle: Node's stores round the expiry up to the second, so both are gone 3.5 s after the last read.
    time.sleep(max_age_ms / 1000 + 1.5)
    for browser in browsers.values():
        cookie = browser.cookie
        assert servers.backend.raw(express_id(cookie or "")) is None
        for server in (node, python, node):
            browser.cookie = cookie  # the browser would have dropped it: send it anyway
            assert browser.state(server) == {"user": None, "count": 0}


def test_key_rotation_agrees(servers: Servers) -> None:
    node_old, node_both, node_new = servers.node((OLD,)), servers.node((NEW, OLD)), servers.node((NEW,))
    py_old, py_both, py_new = servers.python((OLD,)), servers.python((NEW, OLD)), servers.python((NEW,))

    # Node signs with the old key; Python with [new, old] reads it and re-signs it with the new one.
    browser = Browser()
    browser.login(node_old, "heidi")
    signed_old = browser.cookie
    sid = express_id(signed_old or "")
    assert signed_old == ExpressSigner([OLD]).sign(sid)
    assert browser.state(py_both)["user"] == "heidi"
    signed_new = browser.cookie
    assert signed_new == ExpressSigner([NEW]).sign(sid)
    # Node with [new, old] accepts both; once the old key is removed, neither side accepts the old cookie.
    for cookie, server, user in [
        (signed_new, node_both, "heidi"), (signed_old, node_both, "heidi"),
        (signed_new, node_new, "heidi"), (signed_new, py_new, "heidi"),
        (signed_old, node_new, None), (signed_old, py_new, None),
        (signed_new, node_old, None), (signed_new, py_old, None),
        (signed_new, node_new, "heidi"), (signed_new, py_new, "heidi"),  # the refusals deleted nothing
    ]:  # fmt: skip
        browser.cookie = cookie
        assert browser.state(server)["user"] == user, (cookie == signed_new, server.side, server.secrets)

    # The other way round: Python signs with the old key, Node with [new, old] writes and re-signs.
    browser = Browser()
    browser.login(py_old, "ivan")
    signed_old = browser.cookie
    sid = express_id(signed_old or "")
    assert signed_old == ExpressSigner([OLD]).sign(sid)
    browser.post(node_both, "/counter")
    assert browser.cookie == ExpressSigner([NEW]).sign(sid)
    assert browser.state(py_new) == {"user": "ivan", "count": 1}
    browser.cookie = signed_old
    assert browser.state(node_new) == browser.state(py_new) == {"user": None, "count": 0}


# -- concurrency ------------------------------------------------------------------------------------


def test_concurrent_merges_lose_nothing(servers: Servers) -> None:
    """Threads change different keys of one session at once through the middleware: every change lands.

    On Redis each merge is a compare-and-set of the whole document, retried; on PostgreSQL one UPDATE.
    The settings are the defaults, so a merge that gave up would vanish behind a 200.
    """
    python, node = servers.python(), servers.node()
    browser = Browser()
    browser.login(node, "judy")  # a session express-session created
    threads, rounds = 8, 25

    def worker(index: int) -> list[int]:
        return [send(python, "POST", f"/api/incr?key=k{index}", browser.cookie).status for _ in range(rounds)]

    with ThreadPoolExecutor(threads) as pool:
        statuses = [status for result in pool.map(worker, range(threads)) for status in result]
    assert statuses == [200] * len(statuses)
    data = browser.request(python, "GET", "/api/data").json()
    lost = {f"k{i}": rounds - data.get(f"k{i}", 0) for i in range(threads) if data.get(f"k{i}") != rounds}
    assert not lost, f"increments answered 200 but lost, per key: {lost}"
    expected = {"user": "judy", **{f"k{i}": rounds for i in range(threads)}}
    assert data == expected
    document = check_document(servers.backend.live(express_id(browser.cookie or ""))[0], DAY_MS)
    assert {k: v for k, v in document.items() if k != "cookie"} == expected
    assert browser.state(node)["user"] == "judy"  # express-session still reads it


# -- foreign and malformed records ---------------------------------------------------------------

MALFORMED_JSON: dict[str, str | bytes] = {
    "JSON without cookie": '{"user": "mallory", "count": 7}',
    "cookie a string": '{"cookie": "yes", "user": "mallory"}',
    "cookie null": '{"cookie": null, "user": "mallory"}',
    "cookie a list": '{"cookie": [{"path": "/"}], "user": "mallory"}',
    "cookie a number": '{"cookie": 1, "user": "mallory"}',
    "a list": '[{"cookie": {"path": "/"}, "user": "mallory"}]',
    "a string": '"mallory"',
    "a number": "42",
    "null": "null",
    "deeply nested": '{"cookie": {}, "user": "mallory", "x": ' + "[" * 5000 + "]" * 5000 + "}",
}
MALFORMED_REDIS: dict[str, str | bytes] = {
    "not JSON": "user=mallory; count=7",
    "truncated JSON": '{"cookie": {"originalMaxAge": 1000, "expires": "2030-01-',
    "not UTF-8": b'{"cookie": {}, "user": "\xff\xfe"}',
    "empty": "",
}


def write_foreign(backend: Backend, case: str, sid: str) -> None:
    if case == "a Redis hash":
        assert backend.redis is not None
        backend.redis.hset(backend.name + sid, mapping={"cookie": '{"path": "/"}', "user": '"mallory"'})
        backend.redis.pexpire(backend.name + sid, 120_000)
    elif case == "a Redis list":
        assert backend.redis is not None
        backend.redis.rpush(backend.name + sid, '{"cookie": {}, "user": "mallory"}')
        backend.redis.pexpire(backend.name + sid, 120_000)
    else:
        backend.write(sid, {**MALFORMED_JSON, **MALFORMED_REDIS}[case])


def stored(backend: Backend, sid: str) -> Any:
    """The record as it is, whatever its type, for checking that nothing rewrote it."""
    if backend.redis is not None:
        kind = backend.redis.type(backend.name + sid)
        return kind, backend.redis.dump(backend.name + sid)
    with backend.pg.cursor() as cur:
        cur.execute(f"SELECT sess::text FROM {backend.name} WHERE sid = %s", (sid,))
        return cur.fetchone()


def malformed_cases(backend: Backend) -> list[str]:
    cases = list(MALFORMED_JSON)
    if backend.kind == "redis":  # PostgreSQL's json column refuses these
        cases += [*MALFORMED_REDIS, "a Redis hash", "a Redis list"]
    return cases


def test_malformed_records_are_no_session_on_the_python_side(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    """Records Node never wrote (or a bug wrote) count as no session, with a log line, never a 5xx; and
    what Python writes next is a new, well-formed session under a new id, the foreign record untouched."""
    python = servers.python()
    failures = []
    for case in malformed_cases(servers.backend):
        sid = secrets.token_urlsafe(24)
        write_foreign(servers.backend, case, sid)
        before = stored(servers.backend, sid)
        cookie = ExpressSigner([NEW]).sign(sid)
        for method, path, form in [("GET", "/api/session", None), ("POST", "/counter", None),
                                   ("POST", "/login", {"username": "oscar"}), ("POST", "/logout", None)]:  # fmt: skip
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="wsgisession"):
                response = send(python, method, path, cookie, urlencode(form or {}).encode())
            if response.status >= 500:
                failures.append(f"{case}: {method} {path} -> {response.status}")
                continue
            if method == "GET":
                assert response.json() == {"user": None, "count": 0}, case
            warnings = [r.getMessage() for r in caplog.records if r.name == "wsgisession" and r.levelno >= 30]
            assert any("session record" in m for m in warnings), (case, method, path, warnings)
            new = [cookie_change(h) for h in response.set_cookies()]
            if method in ("GET", "POST") and path in ("/counter", "/login"):
                assert len(new) == 1 and new[0] is not None, (case, path)
                assert express_id(new[0]) != sid
                text = servers.backend.live(express_id(new[0]))[0]
                document = check_document(text, DAY_MS)
                assert document.get("user") == ("oscar" if path == "/login" else None), (case, document)
                assert document.get("count") == (1 if path == "/counter" else None), (case, document)
            else:  # a read of no session: the cookie naming it is dropped
                assert new in ([None], []), (case, path, new)
            assert stored(servers.backend, sid) == before, case
    assert not failures, failures


# Strings a Node.js application keeps in a session without complaint: JSON.stringify writes them as
# \u0000, \u2028 and \ud800 escapes (or as is), and Redis and the json column store that text.
NODE_STRINGS = {"a NUL": "nul\u0000inside", "a line separator": "line\u2028sep", "a lone surrogate": "half \ud800"}


@pytest.mark.parametrize("case", list(NODE_STRINGS))
def test_python_reads_and_updates_what_node_can_store(servers: Servers, case: str) -> None:
    """A session holding such a string (say, a username typed with a %00 in it) is read by Python, and
    a change Python makes to another key lands, the string kept as it was."""
    node, python = servers.node(), servers.python()
    user = "nina " + NODE_STRINGS[case]
    browser = Browser()
    if case == "a lone surrogate":  # a form cannot carry one (a JSON body can): store it as Node would
        browser.login(node, "nina")
        sid = express_id(browser.cookie or "")
        text, expires = servers.backend.live(sid)
        document = {**json.loads(text), "user": user}
        servers.backend.write(sid, json.dumps(document, separators=(",", ":")), expires - time.time())
    else:
        browser.login(node, user)  # express.urlencoded decodes %00 and %E2%80%A8
        assert servers.backend.document(express_id(browser.cookie or ""))["user"] == user
    assert browser.state(python) == {"user": user, "count": 0}
    browser.post(python, "/counter")
    assert browser.state(node) == {"user": user, "count": 1}  # the merge landed, and Node reads the result
    assert browser.state(python) == {"user": user, "count": 1}


def test_the_cookie_key_is_refused_and_the_record_kept(servers: Servers) -> None:
    """session["cookie"] would replace express-session's own object: Python refuses it and writes nothing."""
    browser = Browser()
    browser.login(servers.node(), "peggy")
    sid = express_id(browser.cookie or "")
    before = servers.backend.raw(sid)
    response = browser.request(servers.python(), "POST", "/api/data", data={"cookie": {"path": "/x"}, "n": 1})
    assert response.status == 400 and "cookie" in response.json()["error"]
    after = servers.backend.raw(sid)
    assert before is not None and after is not None and after[0] == before[0]
    assert browser.state(servers.node()) == {"user": "peggy", "count": 0}


def test_every_python_response_was_checked(servers: Servers) -> None:
    """The Browser checks each record Python hands a cookie for; make sure that check ran at all."""
    browser = Browser()
    browser.login(servers.python(), "quinn")
    browser.post(servers.python(), "/counter")
    assert browser.python_writes == 2
