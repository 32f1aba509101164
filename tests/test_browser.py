"""The demos in a real browser: Debian's headless chromium, driven by playwright-core (tests/browser/demo.js).

Each demo runs as a script (``python examples/NAME.py``) on a free port, with its default store (an SQLite
file in tmp_path) or, for two of them, on the real Redis or PostgreSQL. The script logs in through the form,
counts, reads the session cookie from the browser's jar, reloads, logs out, replays the old cookie and logs
in with HTML in the name; the first check that fails ends it with a message. The script is itself checked:
it must fail on a scratch demo broken in each of the ways it looks for.

tests/browser/devices.js drives the raw WSGI demo's "your devices" page with two browser contexts as two
devices of one user (a phone and a laptop): each lists both, ends the other, which is logged out at its next
request.

Needs /usr/bin/chromium and Node.js 20 or later with npm: ``.ci/services`` installs them.
"""

from __future__ import annotations

import html
import http.client
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psycopg2
import pytest
import redis
from servers import SECRET, drop_table, free_port, require_postgres, require_redis, unique

from wsgisession.formats import cookie_format

BROWSER = Path(__file__).resolve().parent / "browser"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CHROMIUM = Path("/usr/bin/chromium")
MAX_AGE = 86400
STEPS = 8  # what demo.js reports when it went through to the end
STORE_URLS = ("REDIS_URL", "DATABASE_URL")

# What each demo shows beyond the common flow: demo.js's options.
DEMOS = {
    "raw_wsgi": [],
    "bottle_app": [],
    "flask_app": ["--flash", "--logout-flash", "--cookie=browser-session"],  # session.permanent is not set
    "django_app": ["--flash"],
    "pyramid_app": ["--flash", "--logout-flash"],
}
CASES = [(name, "sqlite") for name in DEMOS] + [("pyramid_app", "redis"), ("flask_app", "postgres")]


@pytest.fixture(scope="session")
def browser_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of tests/browser with playwright-core installed from its lock file (`npm ci`)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not CHROMIUM.exists() or node is None or npm is None:
        pytest.fail(f"the browser tests need {CHROMIUM} and Node.js 20+ with npm: run `bash .ci/services` as root")
    directory = tmp_path_factory.mktemp("browser")
    for name in ("package.json", "package-lock.json", "harness.js", "demo.js", "devices.js"):
        shutil.copy(BROWSER / name, directory / name)
    command = [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline", "--loglevel=error"]
    env = {**os.environ, "npm_config_update_notifier": "false"}
    done = subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True, timeout=240)
    if done.returncode != 0:
        pytest.fail(f"npm ci failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return directory


def drive(
    browser_dir: Path, url: str, options: list[str], screenshot: Path, script: str = "demo.js"
) -> tuple[int, dict[str, Any], str]:
    """Run ``script`` (demo.js) on ``url``: its exit code, its JSON result and what it said on stderr."""
    command = ["node", str(browser_dir / script), url, *options, f"--screenshot={screenshot}"]
    done = subprocess.run(command, cwd=browser_dir, capture_output=True, text=True, timeout=60)
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"demo.js printed no result ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.returncode, result, done.stderr


# -- the demos, each run as a script ------------------------------------------------------------------------


def demo_env(tmp_path: Path, port: int, store: str, name: str) -> dict[str, str]:
    """The environment without the CI's session settings, plus a secret, a private SQLite file, and the store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_") and k not in STORE_URLS}
    env.update(PORT=str(port), SESSION_SECRET=SECRET, SESSION_SQLITE_PATH=str(tmp_path / "sessions.sqlite3"))
    if store in ("redis", "failover"):
        env.update(REDIS_URL=require_redis(), SESSION_REDIS_PREFIX=name + ":")
    if store in ("postgres", "failover"):
        env.update(DATABASE_URL=require_postgres(), SESSION_TABLE=name)
    return env


def wait_until_it_answers(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        if process.poll() is not None:
            pytest.fail(f"the demo exited ({process.returncode}):\n{log.read_text()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/api/session")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"the demo did not answer on port {port}:\n{log.read_text()}")
            time.sleep(0.1)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def live_records(store: str, name: str, tmp_path: Path) -> int:
    """How many sessions the store the environment chose holds now."""
    if store == "sqlite":
        with sqlite3.connect(tmp_path / "sessions.sqlite3") as conn:
            return int(conn.execute("SELECT count(*) FROM wsgisession").fetchone()[0])
    if store == "redis":
        client = redis.Redis.from_url(require_redis())
        try:
            return len(list(client.scan_iter(match=name + ":*")))
        finally:
            client.close()
    conn = psycopg2.connect(require_postgres())
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {name}")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def forget(store: str, name: str) -> None:
    """Remove what a Redis or PostgreSQL run left (an SQLite file goes with tmp_path)."""
    if store in ("redis", "failover"):
        client = redis.Redis.from_url(require_redis())
        keys = list(client.scan_iter(match=name + ":*"))
        if keys:
            client.delete(*keys)
        client.close()
    if store in ("postgres", "failover"):
        drop_table(require_postgres(), name)


@pytest.mark.parametrize(("demo", "store"), CASES, ids=[f"{demo}-{store}" for demo, store in CASES])
def test_a_person_logs_in_counts_and_logs_out(browser_dir: Path, tmp_path: Path, demo: str, store: str) -> None:
    port, name = free_port(), unique("browser")
    log = tmp_path / "server.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / f"{demo}.py")],
            cwd=tmp_path,
            env=demo_env(tmp_path, port, store, name),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_it_answers(process, port, log)
        code, result, said = drive(browser_dir, f"http://127.0.0.1:{port}", DEMOS[demo], tmp_path / "failure.png")
        records = live_records(store, name, tmp_path)
    finally:
        stop(process)
        forget(store, name)
    output = log.read_text()
    assert code == 0 and result["ok"], f"{said}({result.get('screenshot')})\nthe demo logged:\n{output[-3000:]}"
    assert len(result["steps"]) == STEPS, result["steps"]
    persistent = "--cookie=browser-session" not in DEMOS[demo]
    cookie = result["cookie"]
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"], cookie["secure"]) == (True, "Lax", "/", False)
    if persistent:
        assert abs(cookie["expiresIn"] - MAX_AGE) < 120, cookie
    else:
        assert cookie["expiresIn"] is None, cookie
    assert "session" not in result["scriptCookies"]
    assert records >= 1, f"no session in the {store} store: the demo kept them elsewhere"  # the last login's
    assert "Traceback" not in output, output
    if store != "sqlite":
        assert f"Using {'Redis' if store == 'redis' else 'PostgreSQL'} for session storage" in output, output


# -- the raw demo's "your devices" page: two browser contexts as two devices of one user -----------------------

DEVICE_STEPS = 8  # what devices.js reports when it went through to the end


def start_demo(demo: str, tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``python examples/DEMO.py`` in ``tmp_path`` with ``env``, logging to tmp_path/server.log, answering."""
    log = tmp_path / "server.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen([sys.executable, str(EXAMPLES / f"{demo}.py")], cwd=tmp_path, env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_until_it_answers(process, int(env["PORT"]), log)
    except BaseException:
        stop(process)
        raise
    return process


@pytest.mark.parametrize("store", ["sqlite", "failover"])  # failover: Redis in front of PostgreSQL
def test_two_devices_of_one_user_log_each_other_out(browser_dir: Path, tmp_path: Path, store: str) -> None:
    """devices.js: a phone and a laptop log in as one user; each sees both on its devices page and ends the other,
    which is logged out at its next request. The page shows each device's browser (SESSION_CLIENT_DETAILS=1)."""
    port, name = free_port(), unique("devices")
    env = {**demo_env(tmp_path, port, store, name), "SESSION_CLIENT_DETAILS": "1"}
    process = start_demo("raw_wsgi", tmp_path, env)
    try:
        code, result, said = drive(browser_dir, f"http://127.0.0.1:{port}", [], tmp_path / "failure.png", "devices.js")
        records = live_records("postgres" if store == "failover" else store, name, tmp_path)
    finally:
        stop(process)
        forget(store, name)
    output = (tmp_path / "server.log").read_text()
    assert code == 0 and result["ok"], f"{said}({result.get('screenshot')})\nthe demo logged:\n{output[-3000:]}"
    assert len(result["steps"]) == DEVICE_STEPS, result["steps"]
    assert records == 1, "the phone's last session should be the only one left in the store"
    # A handle names a session on the page only: it is neither a cookie, nor a part of one, nor a store key.
    handles, cookies = result["handles"], result["cookies"]
    assert len(handles) == len(set(handles)) == 2 and len(cookies) == len(set(cookies)) == 3, result
    keys = {cookie_format("native", [SECRET]).store_key(cookie.split(".")[0]) for cookie in cookies}
    assert not [handle for handle in handles for text in (*cookies, *keys) if handle in text]
    assert "Traceback" not in output, output


# -- the script fails on a demo that is wrong ------------------------------------------------------------------

BROKEN = {
    "does not log in": "after the login the page says null is logged in",
    "shows the name as HTML": "the name's HTML was rendered",
    "lets scripts read the cookie": "the session cookie is not HttpOnly",
    "keeps the session at logout": "the old cookie, replayed after the logout, logs in",
}


PAGE = '{user}<form method="post" action="/counter"><p>Count: {count} <button>+1</button></p></form>'
LOGIN = '<form method="post" action="/login"><input name="username" required> <button>Log in</button></form>'
LOGOUT = '<form method="post" action="/logout"><p>Logged in as <b>{}</b> <button>Log out</button></p></form>'


def scratch_demo(broken: str) -> Callable[..., Any]:
    """The demo's pages over an in-memory dict of sessions, wrong in the one way ``broken`` names."""
    sessions: dict[str, dict[str, Any]] = {}
    attributes = "Path=/; SameSite=Lax; Max-Age=86400"
    if broken != "lets scripts read the cookie":
        attributes += "; HttpOnly"

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        cookie = environ.get("HTTP_COOKIE", "").partition("session=")[2].partition(";")[0]
        session = sessions.get(cookie)
        route = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        headers = [("Location", "/"), ("Content-Length", "0")]
        if route == ("POST", "/login"):
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)).decode()
            cookie = secrets.token_urlsafe(16)
            sessions[cookie] = {"count": 0}
            if broken != "does not log in":
                sessions[cookie]["user"] = parse_qs(body)["username"][0]
            headers.append(("Set-Cookie", f"session={cookie}; {attributes}"))
        elif route == ("POST", "/counter") and session is not None:
            session["count"] += 1
        elif route == ("POST", "/logout"):
            if broken != "keeps the session at logout":
                sessions.pop(cookie, None)
            headers.append(("Set-Cookie", "session=; Path=/; Max-Age=0"))
        elif route[0] == "GET":
            user = (session or {}).get("user")
            shown = user if broken == "shows the name as HTML" else html.escape(user or "")
            page = PAGE.format(user=LOGOUT.format(shown) if user else LOGIN, count=(session or {}).get("count", 0))
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [page.encode()]
        start_response("303 See Other", headers)
        return [b""]

    return app


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[..., Any]], str]]:
    """Serve a WSGI app on a free port in a thread: its base URL."""
    servers: list[WSGIServer] = []

    def start(app: Callable[..., Any]) -> str:
        httpd = make_server("127.0.0.1", 0, app, server_class=_ThreadingServer, handler_class=_Quiet)
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("broken", list(BROKEN))
def test_the_script_fails_on_a_broken_demo(
    browser_dir: Path, tmp_path: Path, serve: Callable[[Callable[..., Any]], str], broken: str
) -> None:
    screenshot = tmp_path / "failure.png"
    code, result, said = drive(browser_dir, serve(scratch_demo(broken)), [], screenshot)
    assert code == 1 and not result["ok"]
    assert BROKEN[broken] in result["error"] and BROKEN[broken] in said, said
    assert screenshot.stat().st_size > 0


def test_the_scratch_demo_unbroken_passes(browser_dir: Path, tmp_path: Path, serve: Callable[..., str]) -> None:
    """The broken demos fail for the reason named, not for something else the scratch demo lacks."""
    code, result, said = drive(browser_dir, serve(scratch_demo("")), [], tmp_path / "failure.png")
    assert code == 0 and result["ok"] and len(result["steps"]) == STEPS, said
