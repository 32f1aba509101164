"""The example apps behave the same, driven through WebTest: raw WSGI and Bottle under the middleware,
Pyramid through ``request.session`` (its tests are its own, below: its forms carry a CSRF token).

Each app is imported fresh per test, with its settings in the environment and its
store the default one: the embedded SQLite file, here in tmp_path.
"""

from __future__ import annotations

import calendar
import html
import http.client
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import ModuleType

import pytest
import webtest
from pyramid.interfaces import ISessionFactory
from servers import SECRET, drop_table, free_port, require_postgres, unique

from wsgisession import SessionMiddleware, SQLiteStore

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
APPS = ["raw_wsgi", "bottle_app"]  # under SessionMiddleware
MAX_AGE = 86400


def load_example(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import examples/NAME.py as a new module, so that it builds its app from the current environment."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # Pyramid looks its caller up there
    spec.loader.exec_module(module)
    return module


def is_session_setting(variable: str) -> bool:
    return variable.startswith("SESSION_") or variable in ("REDIS_URL", "DATABASE_URL")


def example_env(tmp_path: Path) -> dict[str, str]:
    """The process environment without session settings, plus the test secret and a private SQLite file."""
    env = {k: v for k, v in os.environ.items() if not is_session_setting(k)}
    env.update(
        SESSION_SECRET=SECRET,
        SESSION_SQLITE_PATH=str(tmp_path / "sessions.sqlite3"),
        SESSION_CLEANUP_INTERVAL="0",
    )
    return env


@pytest.fixture(params=APPS)
def app(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[SessionMiddleware]:
    # Whatever the CI environment says, the examples get the default store.
    for variable in filter(is_session_setting, list(os.environ)):
        monkeypatch.delenv(variable)
    for variable, value in example_env(tmp_path).items():
        if is_session_setting(variable):
            monkeypatch.setenv(variable, value)
    middleware = load_example(request.param, monkeypatch).app
    assert isinstance(middleware, SessionMiddleware)
    yield middleware
    middleware.close()


@pytest.fixture
def browser(app: SessionMiddleware) -> webtest.TestApp:
    return webtest.TestApp(app)


def set_cookies(response: webtest.TestResponse) -> list[dict[str, str]]:
    """The response's Set-Cookie headers, each as {"name": .., "value": .., attribute (lowercase): value}."""
    cookies = []
    for header in response.headers.getall("Set-Cookie"):
        first, *attributes = (part.strip() for part in header.split(";"))
        name, _, value = first.partition("=")
        cookie = {"name": name, "value": value}
        for attribute in attributes:
            key, _, val = attribute.partition("=")
            cookie[key.lower()] = val
        cookies.append(cookie)
    return cookies


def session_cookie(response: webtest.TestResponse) -> str:
    """The value of the one session cookie the response sets."""
    cookies = set_cookies(response)
    assert [c["name"] for c in cookies] == ["session"], response.headers
    return cookies[0]["value"]


def with_cookie(app: SessionMiddleware, value: str, method: str = "GET", path: str = "/api/session"):
    """A request from another client that presents only this session cookie."""
    client = webtest.TestApp(app)
    return client.request(path, method=method, headers={"Cookie": f"session={value}"})


def login(browser: webtest.TestApp, username: str) -> webtest.TestResponse:
    response = browser.post("/login", {"username": username})
    assert response.status_int == 303
    assert response.headers["Location"].endswith("/")
    return response


def test_default_store_is_the_embedded_sqlite_file(app: SessionMiddleware, tmp_path: Path) -> None:
    assert isinstance(app.store, SQLiteStore)
    assert Path(app.store.path) == tmp_path / "sessions.sqlite3"


def test_pages_that_create_no_session_set_no_cookie(app: SessionMiddleware, browser: webtest.TestApp) -> None:
    home = browser.get("/")
    assert home.status_int == 200
    assert home.content_type == "text/html"
    assert 'action="/login"' in home.text and 'name="username"' in home.text
    assert "Count: 0" in home.text
    assert home.headers.getall("Set-Cookie") == []
    assert home.headers["Vary"] == "Cookie"  # the page depends on the session

    api = browser.get("/api/session")
    assert api.json == {"user": None, "count": 0}
    assert api.headers.getall("Set-Cookie") == []

    missing = browser.get("/no/such/page", status=404)
    assert missing.headers.getall("Set-Cookie") == []
    assert "Vary" not in missing.headers  # the session was never touched

    empty = browser.post("/login", {"username": "  "}, status=400)
    assert empty.headers.getall("Set-Cookie") == []
    assert browser.cookies == {}
    assert with_cookie(app, "forged.cookie").json == {"user": None, "count": 0}


def test_login_sets_a_hardened_cookie_and_shows_the_user(browser: webtest.TestApp) -> None:
    response = login(browser, "alice")
    [cookie] = set_cookies(response)
    assert cookie["name"] == "session"
    assert re.fullmatch(r"[\w-]{43}\.\d+\.[\w-]{43}", cookie["value"])  # id, creation time, signature
    assert "httponly" in cookie
    assert cookie["samesite"] == "Lax"
    assert cookie["path"] == "/"
    assert cookie["max-age"] == str(MAX_AGE)
    expires = parsedate_to_datetime(cookie["expires"]).timestamp()
    assert abs(expires - (time.time() + MAX_AGE)) < 60
    assert "secure" not in cookie  # plain http: a Secure cookie would never come back

    home = browser.get("/")
    assert "Logged in as <b>alice</b>" in home.text
    assert 'action="/logout"' in home.text and 'name="username"' not in home.text
    assert browser.get("/api/session").json == {"user": "alice", "count": 0}


def test_reading_the_session_does_not_rewrite_the_cookie(browser: webtest.TestApp) -> None:
    login(browser, "alice")
    for path in ("/", "/api/session", "/"):
        response = browser.get(path)
        assert response.headers.getall("Set-Cookie") == [], path
        assert response.headers["Vary"] == "Cookie"


def test_counter_increments_for_anonymous_and_logged_in_users(browser: webtest.TestApp) -> None:
    response = browser.post("/counter")
    assert response.status_int == 303
    session_cookie(response)  # the first value stored starts a session
    assert browser.get("/api/session").json == {"user": None, "count": 1}

    login(browser, "alice")
    for _ in range(3):
        assert browser.post("/counter").status_int == 303
    assert browser.get("/api/session").json == {"user": "alice", "count": 4}
    assert "Count: 4" in browser.get("/").text


def test_each_client_has_its_own_session(app: SessionMiddleware) -> None:
    alice, bob = webtest.TestApp(app), webtest.TestApp(app)
    login(alice, "alice")
    login(bob, "bob")
    alice.post("/counter")
    alice.post("/counter")
    bob.post("/counter")
    assert alice.get("/api/session").json == {"user": "alice", "count": 2}
    assert bob.get("/api/session").json == {"user": "bob", "count": 1}


def test_logout_ends_the_session_for_every_copy_of_the_cookie(app: SessionMiddleware, browser: webtest.TestApp) -> None:
    old = session_cookie(login(browser, "alice"))
    browser.post("/counter")
    assert with_cookie(app, old).json == {"user": "alice", "count": 1}

    response = browser.post("/logout")
    assert response.status_int == 303
    [cookie] = set_cookies(response)
    assert cookie["value"] == "" and cookie["max-age"] == "0"  # the browser drops it
    assert browser.cookies == {}
    assert 'name="username"' in browser.get("/").text
    assert browser.get("/api/session").json == {"user": None, "count": 0}

    # A copy of the old cookie (another tab, a thief) is worth nothing now.
    replay = with_cookie(app, old)
    assert replay.json == {"user": None, "count": 0}
    assert set_cookies(replay)[0]["max-age"] == "0"
    fresh = with_cookie(app, old, "POST", "/counter")
    assert session_cookie(fresh) != old  # a brand-new session, not the old one revived
    assert with_cookie(app, session_cookie(fresh)).json == {"user": None, "count": 1}


def test_login_regenerates_the_session_id(app: SessionMiddleware, browser: webtest.TestApp) -> None:
    # Session fixation: a cookie obtained (or planted) before login must not become a logged-in one.
    before = session_cookie(browser.post("/counter"))
    after = session_cookie(login(browser, "alice"))
    assert after != before
    assert with_cookie(app, before).json == {"user": None, "count": 0}
    assert with_cookie(app, after).json == {"user": "alice", "count": 1}  # the data moved to the new id

    # Logging in again (as someone else) changes it again.
    again = session_cookie(login(browser, "bob"))
    assert again not in (before, after)
    assert with_cookie(app, after).json == {"user": None, "count": 0}
    assert browser.get("/api/session").json == {"user": "bob", "count": 1}


def test_usernames_are_kept_exactly_and_escaped_in_html(browser: webtest.TestApp) -> None:
    name = "Zoë <script>alert(1)</script> & co"
    login(browser, name)
    assert browser.get("/api/session").json == {"user": name, "count": 0}
    home = browser.get("/").text
    assert "<script>" not in home
    assert "Zoë &lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in home


@pytest.mark.parametrize("name", APPS)
def test_runs_as_a_script(name: str, tmp_path: Path) -> None:
    # `python examples/NAME.py` puts examples/ first on sys.path: the module names must not shadow
    # the frameworks (bottle, pyramid) they import.
    port = free_port()
    env = {**example_env(tmp_path), "PORT": str(port)}
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "wb") as errors:
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / f"{name}.py")], cwd=tmp_path, env=env,
            stdout=subprocess.PIPE, stderr=errors, text=True,
        )  # fmt: skip
    try:
        assert process.stdout is not None
        first_line = process.stdout.readline().strip()
        assert first_line == f"Serving on http://127.0.0.1:{port}", stderr.read_text()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/login", "username=carol", {"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        response.read()
        conn.close()
        assert response.status == 303
        cookie = response.getheader("Set-Cookie", "").split(";")[0]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/session", headers={"Cookie": cookie})
        assert json.loads(conn.getresponse().read()) == {"user": "carol", "count": 0}
        conn.close()
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_demo_reports_its_store_for_a_health_check_and_to_prometheus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """examples/raw_wsgi.py mounts the status app at /status and Prometheus at /metrics."""
    for variable in filter(is_session_setting, list(os.environ)):
        monkeypatch.delenv(variable)
    for variable, value in example_env(tmp_path).items():
        if is_session_setting(variable):
            monkeypatch.setenv(variable, value)
    app = load_example("raw_wsgi", monkeypatch).app
    try:
        browser = webtest.TestApp(app)
        status = browser.get("/status")
        assert status.json == {"ok": True, "serving": "SQLite", "stores": {"SQLite": {"state": "up"}}}
        assert "Set-Cookie" not in status.headers
        metrics = browser.get("/metrics")  # no failover here: Prometheus's own metrics, none of ours
        assert metrics.content_type == "text/plain" and "# TYPE process_" in metrics.text
    finally:
        app.close()


def test_the_demo_says_which_store_it_chose(tmp_path: Path) -> None:
    """Run as a script, the demo shows the store detection's lines (INFO included) on stderr."""
    port, table = free_port(), unique("demo")
    env = {**example_env(tmp_path), "PORT": str(port), "DATABASE_URL": require_postgres(), "SESSION_TABLE": table}
    process = subprocess.Popen([sys.executable, str(EXAMPLES / "raw_wsgi.py")], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline().startswith("Serving on")
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=10)
        drop_table(require_postgres(), table)
    assert "No REDIS_URL provided, using PostgreSQL for sessions" in errors


# -- the raw demo's "your devices" page: a user's sessions, listed and logged out ----------------------------


@pytest.fixture
def demo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[..., SessionMiddleware]]:
    """examples/raw_wsgi.py's middleware on its default store (the SQLite file), imported fresh with the
    example environment plus ``settings``."""
    apps: list[SessionMiddleware] = []

    def load(**settings: str) -> SessionMiddleware:
        for variable in filter(is_session_setting, list(os.environ)):
            monkeypatch.delenv(variable)
        for variable, value in {**example_env(tmp_path), **settings}.items():
            if is_session_setting(variable):
                monkeypatch.setenv(variable, value)
        apps.append(load_example("raw_wsgi", monkeypatch).app)
        return apps[-1]

    yield load
    for app in apps:
        app.close()


def device(app: SessionMiddleware, agent: str = "", ip: str = "") -> webtest.TestApp:
    """A browser on its own device: its own cookie jar, user agent and address."""
    extra = {"HTTP_USER_AGENT": agent} if agent else {}
    return webtest.TestApp(app, extra_environ={**extra, "REMOTE_ADDR": ip or "127.0.0.1"})


def device_rows(page: webtest.TestResponse) -> list[dict[str, str]]:
    """The devices page's table: per row, its class, the texts of its cells by column, and its handle."""
    rows = []
    for css, cells in re.findall(r'<tr class="([^"]+)">(.*?)</tr>', page.text):
        texts = re.findall(r"<td[^>]*>(.*?)</td>", cells)
        handle = re.search(r'name="handle" value="([^"]*)"', cells)
        columns = ("login", "seen", "expires", "agent", "ip", "action")
        rows.append({"class": css, **dict(zip(columns, texts, strict=True)), "handle": handle[1] if handle else ""})
    return rows


def devices_page(browser: webtest.TestApp) -> webtest.TestResponse:
    page = browser.get("/devices")
    assert page.status_int == 200 and page.content_type == "text/html"
    return page


def end_device(browser: webtest.TestApp, handle: str) -> webtest.TestResponse:
    """Click the Log out button of the row with ``handle`` on this browser's devices page."""
    page = devices_page(browser)
    [button] = [f for f in page.forms.values() if f.action == "/devices/end" and f["handle"].value == handle]
    return button.submit()


def logged_in_as(browser: webtest.TestApp) -> object:
    return browser.get("/api/session").json["user"]


def test_the_devices_page_lists_a_users_sessions_and_marks_this_one(demo: Callable[..., SessionMiddleware]) -> None:
    app = demo()
    phone, laptop, other = device(app), device(app), device(app)
    started = time.time()
    for browser, name in ((phone, "alice"), (laptop, "alice"), (other, "bob")):
        login(browser, name)
    home = laptop.get("/")
    assert '<a href="/devices">Your devices</a>' in home.text
    page = devices_page(laptop)
    assert "Where <b>alice</b> is logged in" in page.text
    rows = device_rows(page)
    assert [row["class"] for row in rows].count("device current") == 1 and len(rows) == 2  # not bob's
    mine = next(row for row in rows if row["class"] == "device current")
    assert mine["action"] == "<b>This device</b>" and mine["handle"] == ""  # no button to log itself out
    [theirs] = [row for row in rows if row is not mine]
    assert re.fullmatch("[0-9a-f]{32}", theirs["handle"])
    for row in rows:  # human-readable UTC: logged in and seen just now, expiring in a day
        login_time = calendar.timegm(time.strptime(row["login"], "%Y-%m-%d %H:%M:%S"))
        assert started - 2 <= login_time <= time.time() + 1
        assert row["seen"] == row["login"]
        expires = calendar.timegm(time.strptime(row["expires"], "%Y-%m-%d %H:%M:%S"))
        assert abs(expires - (login_time + MAX_AGE)) <= 2
        assert (row["agent"], row["ip"]) == ("-", "-")  # not kept unless SESSION_CLIENT_DETAILS is on
    assert "kept only with SESSION_CLIENT_DETAILS=1" in page.text
    # A handle names a session to its user only: it is no cookie, nor part of one.
    cookies = [browser.cookies["session"] for browser in (phone, laptop, other)]
    assert not any(theirs["handle"] in cookie for cookie in cookies)
    assert with_cookie(app, theirs["handle"]).json == {"user": None, "count": 0}
    # bob sees his own device only; a visitor without a session is sent home.
    assert [row["class"] for row in device_rows(devices_page(other))] == ["device current"]
    visitor = device(app).get("/devices")
    assert visitor.status_int == 303 and visitor.headers["Location"].endswith("/")


def test_a_device_logged_out_from_another_is_logged_out_at_its_next_request(
    demo: Callable[..., SessionMiddleware],
) -> None:
    app = demo()
    phone, laptop = device(app), device(app)
    login(phone, "alice")
    phone.post("/counter")
    login(laptop, "alice")
    [phone_row] = [row for row in device_rows(devices_page(laptop)) if row["handle"]]
    ended = end_device(laptop, phone_row["handle"])
    assert ended.status_int == 303 and ended.headers["Location"].endswith("/devices?ended=1")
    page = laptop.get(ended.headers["Location"])
    assert "Logged out 1 session(s)." in page.text
    assert [row["class"] for row in device_rows(page)] == ["device current"]
    assert logged_in_as(laptop) == "alice"
    # The phone's next request: logged out, its cookie expired; it no longer reaches the devices page.
    home = phone.get("/")
    assert 'name="username"' in home.text and "Count: 0" in home.text
    assert phone.cookies == {}
    assert phone.get("/devices").status_int == 303
    # The same handle again ends nothing.
    again = laptop.post("/devices/end", {"handle": phone_row["handle"]})
    assert again.headers["Location"].endswith("/devices?ended=0")


def test_only_the_users_own_sessions_can_be_ended_and_only_by_post(demo: Callable[..., SessionMiddleware]) -> None:
    app = demo()
    phone, laptop, mallory = device(app), device(app), device(app)
    login(phone, "alice")
    login(laptop, "alice")
    login(mallory, "mallory")
    [phone_row] = [row for row in device_rows(devices_page(laptop)) if row["handle"]]
    # Another user who learns a handle ends nothing with it; nor does a visitor, nor a GET (a link, an image).
    stolen = mallory.post("/devices/end", {"handle": phone_row["handle"]})
    assert stolen.headers["Location"].endswith("/devices?ended=0")
    assert device(app).post("/devices/end", {"handle": phone_row["handle"]}).headers["Location"].endswith("/")
    assert device(app).post("/devices/others").headers["Location"].endswith("/")
    laptop.get("/devices/end", {"handle": phone_row["handle"]}, status=404)
    laptop.get("/devices/others", status=404)
    assert logged_in_as(phone) == logged_in_as(laptop) == "alice"
    assert len(device_rows(devices_page(laptop))) == 2
    # A forged ?ended= shows nothing of what it says.
    forged = laptop.get("/devices", {"ended": "<script>x</script>"})
    assert "<script>" not in forged.text and 'class="message"' not in forged.text


def test_log_out_everywhere_else_keeps_only_this_device(demo: Callable[..., SessionMiddleware]) -> None:
    app = demo()
    browsers = [device(app) for _ in range(4)]
    for browser in browsers:
        login(browser, "alice")
    bob = device(app)
    login(bob, "bob")
    kept = browsers[2]
    page = devices_page(kept)
    [everywhere] = [f for f in page.forms.values() if f.action == "/devices/others"]
    response = everywhere.submit()
    assert response.status_int == 303 and response.headers["Location"].endswith("/devices?ended=3")
    page = kept.get(response.headers["Location"])
    assert "Logged out 3 session(s)." in page.text
    assert [row["class"] for row in device_rows(page)] == ["device current"]
    assert [logged_in_as(browser) for browser in browsers] == [None, None, "alice", None]
    assert logged_in_as(bob) == "bob"  # another user's sessions are not touched


def test_the_devices_page_shows_browser_and_ip_when_kept_as_text(demo: Callable[..., SessionMiddleware]) -> None:
    app = demo(SESSION_CLIENT_DETAILS="1")
    agent = 'Phone/1.0 <img src=x onerror="alert(1)"> & co'
    phone, laptop = device(app, agent, "10.1.2.3"), device(app, "Laptop/2.0", "192.0.2.7")
    login(phone, "<b>alice</b>")
    login(laptop, "<b>alice</b>")
    page = devices_page(laptop)
    assert "<img" not in page.text and "<b>alice</b>" not in page.text
    assert "Where <b>&lt;b&gt;alice&lt;/b&gt;</b> is logged in" in page.text
    shown = {(row["agent"], row["ip"], row["class"]) for row in device_rows(page)}
    assert shown == {(html.escape(agent), "10.1.2.3", "device"), ("Laptop/2.0", "192.0.2.7", "device current")}
    assert "SESSION_CLIENT_DETAILS" not in page.text


# -- the Pyramid example: request.session, with flash messages and CSRF tokens on its forms --------------


@pytest.fixture
def pyramid_app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[webtest.TestApp]:
    """A browser on examples/pyramid_app.py, imported fresh with the example environment."""
    for variable in filter(is_session_setting, list(os.environ)):
        monkeypatch.delenv(variable)
    for variable, value in example_env(tmp_path).items():
        if is_session_setting(variable):
            monkeypatch.setenv(variable, value)
    app = load_example("pyramid_app", monkeypatch).app
    yield webtest.TestApp(app)
    app.registry.getUtility(ISessionFactory).close()


def form(page: webtest.TestResponse, action: str) -> webtest.Form:
    """The page's form that posts to ``action``."""
    [found] = [f for f in page.forms.values() if f.action == action]
    return found


def submit(browser: webtest.TestApp, action: str, **fields: str) -> webtest.TestResponse:
    """Fill in and submit the home page's form for ``action``, as a browser would (CSRF token included)."""
    filled = form(browser.get("/"), action)
    for name, value in fields.items():
        filled[name] = value
    response = filled.submit()
    assert response.status_int == 303 and response.headers["Location"].endswith("/")
    return response


def flashes(page: webtest.TestResponse) -> list[str]:
    return re.findall(r'<p class="flash">(.*?)</p>', page.text)


def test_pyramid_demo_uses_the_embedded_sqlite_file(pyramid_app: webtest.TestApp, tmp_path: Path) -> None:
    store = pyramid_app.app.registry.getUtility(ISessionFactory).core.store
    assert isinstance(store, SQLiteStore)
    assert Path(store.path) == tmp_path / "sessions.sqlite3"


def test_pyramid_demo_pages(pyramid_app: webtest.TestApp) -> None:
    home = pyramid_app.get("/")
    assert home.status_int == 200 and home.content_type == "text/html"
    assert "Count: 0" in home.text and form(home, "/login")["username"].value == ""
    token = form(home, "/login")["csrf_token"].value
    assert form(home, "/counter")["csrf_token"].value == token and len(token) == 32
    session_cookie(home)  # unlike the other demos: the session holds the CSRF token of the forms
    assert home.headers["Vary"] == "Cookie"
    again = pyramid_app.get("/")
    assert again.headers.getall("Set-Cookie") == [] and form(again, "/login")["csrf_token"].value == token

    api = webtest.TestApp(pyramid_app.app).get("/api/session")
    assert api.json == {"user": None, "count": 0} and api.headers.getall("Set-Cookie") == []
    missing = pyramid_app.get("/no/such/page", status=404)
    assert missing.headers.getall("Set-Cookie") == [] and "Vary" not in missing.headers


def test_pyramid_demo_refuses_a_post_without_the_sessions_token(pyramid_app: webtest.TestApp) -> None:
    token = form(pyramid_app.get("/"), "/login")["csrf_token"].value
    pyramid_app.post("/login", {"username": "mallory"}, status=400)
    pyramid_app.post("/counter", {"csrf_token": "0" * 32}, status=400)
    stranger = webtest.TestApp(pyramid_app.app)  # another browser, with this browser's token
    stranger.post("/login", {"username": "mallory", "csrf_token": token}, status=400)
    assert pyramid_app.get("/api/session").json == {"user": None, "count": 0}
    assert stranger.get("/api/session").json == {"user": None, "count": 0}
    empty = form(pyramid_app.get("/"), "/login")
    empty["username"] = "  "
    assert "username is required" in empty.submit(status=400).text


def test_pyramid_demo_login_flashes_a_welcome_and_regenerates(pyramid_app: webtest.TestApp) -> None:
    before = session_cookie(pyramid_app.get("/"))
    old_token = form(pyramid_app.get("/"), "/counter")["csrf_token"].value
    after = session_cookie(submit(pyramid_app, "/login", username="alice"))
    assert after != before
    assert with_cookie(pyramid_app.app, before).json == {"user": None, "count": 0}  # the old id is dead

    home = pyramid_app.get("/")
    assert flashes(home) == ["Welcome, alice!"]
    assert "Logged in as <b>alice</b>" in home.text and 'name="username"' not in home.text
    assert flashes(pyramid_app.get("/")) == []  # shown once
    assert form(home, "/counter")["csrf_token"].value != old_token  # a new token at login
    pyramid_app.post("/counter", {"csrf_token": old_token}, status=400)
    assert pyramid_app.get("/api/session").json == {"user": "alice", "count": 0}


def test_pyramid_demo_counter_for_anonymous_and_logged_in_users(pyramid_app: webtest.TestApp) -> None:
    submit(pyramid_app, "/counter")
    assert pyramid_app.get("/api/session").json == {"user": None, "count": 1}
    submit(pyramid_app, "/login", username="alice")
    for _ in range(3):
        submit(pyramid_app, "/counter")
    assert pyramid_app.get("/api/session").json == {"user": "alice", "count": 4}
    assert "Count: 4" in pyramid_app.get("/").text
    bob = webtest.TestApp(pyramid_app.app)
    submit(bob, "/login", username="bob")
    submit(bob, "/counter")
    assert bob.get("/api/session").json == {"user": "bob", "count": 1}
    assert pyramid_app.get("/api/session").json == {"user": "alice", "count": 4}


def test_pyramid_demo_logout_ends_the_session(pyramid_app: webtest.TestApp) -> None:
    old = session_cookie(submit(pyramid_app, "/login", username="alice"))
    response = submit(pyramid_app, "/logout")
    assert session_cookie(response) != old  # a new, anonymous session carries the notice
    home = pyramid_app.get("/")
    assert flashes(home) == ["You are logged out."] and 'name="username"' in home.text
    assert pyramid_app.get("/api/session").json == {"user": None, "count": 0}
    assert with_cookie(pyramid_app.app, old).json == {"user": None, "count": 0}  # a copy is worth nothing


def test_pyramid_demo_escapes_what_users_type(pyramid_app: webtest.TestApp) -> None:
    name = "Zoë <script>alert(1)</script> & co"
    submit(pyramid_app, "/login", username=name)
    assert pyramid_app.get("/api/session").json == {"user": name, "count": 0}
    home = pyramid_app.get("/").text
    assert "<script>" not in home
    escaped = "Zoë &lt;script&gt;alert(1)&lt;/script&gt; &amp; co"
    assert f"Logged in as <b>{escaped}</b>" in home and f"Welcome, {escaped}!" in home


def test_pyramid_demo_runs_as_a_script_and_says_which_store_it_chose(tmp_path: Path) -> None:
    port, table = free_port(), unique("demo")
    env = {**example_env(tmp_path), "PORT": str(port), "DATABASE_URL": require_postgres(), "SESSION_TABLE": table}
    process = subprocess.Popen([sys.executable, str(EXAMPLES / "pyramid_app.py")], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == f"Serving on http://127.0.0.1:{port}"
        status, headers, page = http_request(port, "GET", "/")
        cookie = headers["Set-Cookie"].split(";")[0]
        token = re.search(r'name="csrf_token" value="(\w+)"', page)
        assert status == 200 and token is not None
        form_body = f"username=carol&csrf_token={token[1]}"
        form_headers = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie}
        status, headers, _ = http_request(port, "POST", "/login", form_body, form_headers)
        assert status == 303
        cookie = headers["Set-Cookie"].split(";")[0]
        status, _, body = http_request(port, "GET", "/api/session", headers={"Cookie": cookie})
        assert json.loads(body) == {"user": "carol", "count": 0}
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=10)
        drop_table(require_postgres(), table)
    assert "No REDIS_URL provided, using PostgreSQL for sessions" in errors
    assert "Using PostgreSQL for session storage" in errors


def http_request(port: int, method: str, path: str, body: str | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:  # fmt: skip
    """One request to a server on this machine: its status, headers and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body, headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()
