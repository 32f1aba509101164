"""The ``wsgisession`` command, run as a user runs it: a subprocess with a controlled environment,
against the real Redis and PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import webtest
from servers import SECRET, free_port, unique
from servers import pg_sql as sql

from wsgisession import SessionMiddleware
from wsgisession.stores.postgres import PostgresStore

ROUND_TRIP = re.compile(r"^Round trip: \d+\.\d+ ms", re.MULTILINE)
_OWN_VARIABLES = ("REDIS_URL", "DATABASE_URL")


def run_cli(
    cwd: Path, *args: str, env: dict[str, str], program: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI with only the session variables given in ``env`` (none inherited from this process),
    and the test secret unless ``env`` sets SESSION_SECRET (to "" for none)."""
    base = {k: v for k, v in os.environ.items() if not (k.startswith("SESSION_") or k in _OWN_VARIABLES)}
    return subprocess.run(
        [*(program or [sys.executable, "-m", "wsgisession"]), *args],
        env={**base, "SESSION_SECRET": SECRET, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], status: int) -> str:
    """The command failed with ``status`` and said why in one line on stderr, without a traceback."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("wsgisession: error: "), lines[0]
    return lines[0]


def with_password(url: str, password: str) -> tuple[str, str]:
    """The URL with a password (the trust-auth test server ignores it), and the password it carries."""
    parts = urlsplit(url)
    if parts.password:
        return url, parts.password
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username or 'postgres'}:{password}@{host}"
    return urlunsplit(parts._replace(netloc=netloc)), password


def closed_port_url(scheme: str, password: str = "") -> str:
    """A URL on a loopback port nobody listens on."""
    if scheme == "redis":
        return f"redis://{':' + password + '@' if password else ''}127.0.0.1:{free_port()}/0"
    return f"postgresql://postgres{':' + password if password else ''}@127.0.0.1:{free_port()}/test"


# -- check ------------------------------------------------------------------------------


def test_check_on_sqlite_names_the_store_and_warns(tmp_path: Path) -> None:
    path = tmp_path / "sessions.sqlite3"
    result = run_cli(tmp_path, "check", env={"SESSION_SQLITE_PATH": str(path)})
    assert result.returncode == 0, result.stderr
    assert f"Store: SQLiteStore at {path}" in result.stdout
    assert re.search(r"^WARNING: Using the embedded SQLite session store", result.stdout, re.MULTILINE)
    assert ROUND_TRIP.search(result.stdout), result.stdout
    assert path.exists()


def test_check_on_redis(tmp_path: Path, redis_url: str) -> None:
    result = run_cli(tmp_path, "check", env={"REDIS_URL": redis_url, "SESSION_REDIS_PREFIX": unique("cli") + ":"})
    assert result.returncode == 0, result.stderr
    assert "Using Redis for session storage" in result.stdout
    assert f"Store: RedisStore at {redis_url}" in result.stdout
    assert ROUND_TRIP.search(result.stdout), result.stdout
    assert result.stderr == ""


def test_check_on_postgres_masks_the_password(tmp_path: Path, database_url: str, table: str) -> None:
    url, password = with_password(database_url, "cli-pg-password-7731")
    result = run_cli(tmp_path, "check", env={"DATABASE_URL": url, "SESSION_TABLE": table})
    assert result.returncode == 0, result.stderr
    assert "No REDIS_URL provided, using PostgreSQL for sessions" in result.stdout
    assert "Using PostgreSQL for session storage" in result.stdout
    assert re.search(
        rf"^Store: PostgresStore at \S+:\*\*\*@\S+ \(table {table}, driver psycopg\)$", result.stdout, re.MULTILINE
    )
    assert ROUND_TRIP.search(result.stdout), result.stdout
    assert password not in result.stdout + result.stderr


def test_check_reports_the_fallback_without_passwords(tmp_path: Path, database_url: str, table: str) -> None:
    redis_url = closed_port_url("redis", "cli-redis-password-1234")
    pg_url, pg_password = with_password(database_url, "cli-pg-password-5678")
    result = run_cli(tmp_path, "check", env={"REDIS_URL": redis_url, "DATABASE_URL": pg_url, "SESSION_TABLE": table})
    assert result.returncode == 0, result.stderr
    assert "WARNING: Redis unavailable, falling back to PostgreSQL" in result.stdout
    assert "Store: FailoverStore: RedisStore" in result.stdout  # Redis may come back: it is still watched
    assert "with a copy of every session in PostgresStore" in result.stdout
    assert ROUND_TRIP.search(result.stdout)
    output = result.stdout + result.stderr
    assert "cli-redis-password-1234" not in output
    assert pg_password not in output
    assert ":***@127.0.0.1" in output


# -- cleanup ----------------------------------------------------------------------------


def test_cleanup_removes_expired_postgres_rows(tmp_path: Path, database_url: str, table: str) -> None:
    PostgresStore(database_url, table=table, cleanup_interval=0).close()  # the table, as the middleware makes it
    now = time.time()
    rows = [("expired-1", now - 3600), ("expired-2", now - 60), ("expired-3", now - 1), ("live-1", now + 3600),
            ("live-2", now + 60)]  # fmt: skip
    for key, expires in rows:
        sql(database_url, f"INSERT INTO {table} (id, data, expires_at) VALUES (%s, '{{}}', to_timestamp(%s))",
            (key, expires))  # fmt: skip

    result = run_cli(tmp_path, "cleanup", env={"DATABASE_URL": database_url, "SESSION_TABLE": table})

    assert result.returncode == 0, result.stderr
    assert re.search(r"^Removed 3 expired sessions$", result.stdout, re.MULTILINE), result.stdout
    remaining = sql(database_url, f"SELECT id FROM {table} ORDER BY id")
    assert remaining == [("live-1",), ("live-2",)]


def test_cleanup_on_redis_removes_nothing(tmp_path: Path, redis_url: str) -> None:
    result = run_cli(tmp_path, "cleanup", env={"REDIS_URL": redis_url, "SESSION_REDIS_PREFIX": unique("cli") + ":"})
    assert result.returncode == 0, result.stderr
    assert "Removed 0 expired sessions" in result.stdout


# -- init-db ----------------------------------------------------------------------------


def test_init_db_creates_the_postgres_table(tmp_path: Path, database_url: str, table: str) -> None:
    env = {"DATABASE_URL": database_url, "SESSION_TABLE": table, "SESSION_STORE": "postgres"}
    result = run_cli(tmp_path, "init-db", env=env)
    assert result.returncode == 0, result.stderr
    assert table in result.stdout
    columns = sql(database_url, "SELECT column_name FROM information_schema.columns WHERE table_name = %s", (table,))
    assert {c for (c,) in columns} == {"id", "data", "expires_at"}
    indexes = sql(database_url, "SELECT indexname FROM pg_indexes WHERE tablename = %s", (table,))
    assert f"{table}_expires_at" in {i for (i,) in indexes}
    again = run_cli(tmp_path, "init-db", env=env)  # idempotent
    assert again.returncode == 0, again.stderr


def test_init_db_sql_prints_postgres_statements_without_connecting(
    tmp_path: Path, database_url: str, table: str
) -> None:
    # DATABASE_URL points at a closed port: printing the statements needs no connection.
    env = {"DATABASE_URL": closed_port_url("postgresql"), "SESSION_TABLE": table}
    result = run_cli(tmp_path, "init-db", "--sql", env=env)
    assert result.returncode == 0, result.stderr
    assert f"CREATE TABLE IF NOT EXISTS {table} " in result.stdout
    assert "JSONB" in result.stdout
    # What it printed is the real schema: running it creates a working table.
    sql(database_url, result.stdout)
    store = PostgresStore(database_url, table=table, cleanup_interval=0, create_table=False)
    try:
        store.create("k", {"a": "1"}, 60)
        record = store.load("k")
        assert record is not None and record.data == {"a": 1}
    finally:
        store.close()


def test_init_db_sql_prints_connect_pg_simple_table_in_the_express_format(tmp_path: Path, database_url: str) -> None:
    """What init-db would create in the Node.js-compatible mode: connect-pg-simple's table, not ours."""
    env = {"DATABASE_URL": closed_port_url("postgresql"), "SESSION_FORMAT": "express", "SESSION_TABLE": "cli_express"}
    result = run_cli(tmp_path, "init-db", "--sql", env=env)
    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE IF NOT EXISTS cli_express (sid varchar" in result.stdout
    assert "sess json NOT NULL" in result.stdout and "JSONB" not in result.stdout


def test_init_db_sql_prints_sqlite_statements_without_touching_a_file(tmp_path: Path) -> None:
    program = [str(Path(sys.executable).parent / "wsgisession")]  # the console script of setup.cfg
    result = run_cli(tmp_path, "init-db", "--sql", env={"SESSION_TABLE": "cli_sqlite"}, program=program)
    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE IF NOT EXISTS cli_sqlite " in result.stdout
    assert list(tmp_path.iterdir()) == []
    conn = sqlite3.connect(str(tmp_path / "check.sqlite3"))
    conn.executescript(result.stdout)
    assert conn.execute("SELECT count(*) FROM cli_sqlite").fetchone() == (0,)
    conn.close()


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_init_db_without_a_sql_store_has_nothing_to_create(tmp_path: Path, redis_url: str, kind: str) -> None:
    env = {"REDIS_URL": redis_url, "SESSION_STORE": kind}
    result = run_cli(tmp_path, "init-db", env=env)
    assert result.returncode == 0, result.stderr
    assert "Nothing to create" in result.stdout
    printed = run_cli(tmp_path, "init-db", "--sql", env=env)
    assert printed.returncode == 0, printed.stderr
    assert "CREATE" not in printed.stdout and "Nothing to create" in printed.stdout


# -- sessions and revoke --------------------------------------------------------------------

LONG_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"


def user_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """/login?USER logs USER in; any other path says who is logged in."""
    session = environ["session"]
    if environ["PATH_INFO"] == "/login":
        session.login(environ["QUERY_STRING"])
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({"user": session.user_id}).encode()]


@pytest.fixture(params=["postgres", "redis", "failover"])
def store_env(request: pytest.FixtureRequest, redis_url: str, database_url: str, table: str) -> dict[str, str]:
    """The variables that select a store on private names, for the application and the command alike."""
    postgres = {"DATABASE_URL": database_url, "SESSION_TABLE": table}
    redis = {"REDIS_URL": redis_url, "SESSION_REDIS_PREFIX": unique("cli") + ":"}
    return {"postgres": {**postgres, "SESSION_STORE": "postgres"}, "redis": redis, "failover": {**postgres, **redis}}[
        request.param
    ]


@pytest.fixture
def user_mw(store_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[SessionMiddleware]:
    """The application, on the store its environment selects, keeping the client details of each login."""
    for name, value in {**store_env, "SESSION_SECRET": SECRET, "SESSION_CLIENT_DETAILS": "true"}.items():
        monkeypatch.setenv(name, value)
    mw = SessionMiddleware(user_app)
    yield mw
    mw.close()


def device(mw: SessionMiddleware, user: str, agent: str = "Mozilla/5.0 (phone)") -> webtest.TestApp:
    """A browser (its own cookie jar) logged in as ``user``."""
    browser = webtest.TestApp(mw, extra_environ={"HTTP_USER_AGENT": agent, "REMOTE_ADDR": "10.0.0.7"})
    browser.get(f"/login?{user}")
    return browser


def utc(seconds: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def test_sessions_lists_the_users_devices(
    tmp_path: Path, store_env: dict[str, str], user_mw: SessionMiddleware
) -> None:
    device(user_mw, "ann")
    device(user_mw, "ann", LONG_AGENT)
    device(user_mw, "bob")
    listed = user_mw.users.list("ann")

    result = run_cli(tmp_path, "sessions", "ann", env=store_env)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()[-3:]
    assert header.split() == ["HANDLE", "LOGIN", "(UTC)", "LAST", "SEEN", "(UTC)", "EXPIRES", "(UTC)", "AGENT", "IP"]
    assert [row.split()[0] for row in rows] == [d.handle for d in listed]  # most recently seen first
    for row, listed_device in zip(rows, listed, strict=True):
        assert utc(listed_device.login) in row and utc(listed_device.expires) in row
        assert row.endswith("  10.0.0.7")
    assert "Mozilla/5.0 (phone)" in result.stdout and LONG_AGENT[:30] in result.stdout
    assert LONG_AGENT not in result.stdout  # cut to fit a row
    assert user_mw.users.list("bob")[0].handle not in result.stdout

    as_json = run_cli(tmp_path, "sessions", "--json", "ann", env=store_env)
    assert as_json.returncode == 0, as_json.stderr
    fields = ("handle", "login", "seen", "expires", "agent", "ip")
    assert json.loads(as_json.stdout) == [{field: getattr(d, field) for field in fields} for d in listed]
    assert LONG_AGENT in as_json.stdout  # whole


def test_revoke_ends_every_session_of_the_user(
    tmp_path: Path, store_env: dict[str, str], user_mw: SessionMiddleware
) -> None:
    phone, laptop, bob = device(user_mw, "ann"), device(user_mw, "ann"), device(user_mw, "bob")

    result = run_cli(tmp_path, "revoke", "ann", env=store_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "Ended 2 sessions of user ann"
    assert phone.get("/").json == laptop.get("/").json == {"user": None}  # logged out at their next request
    assert bob.get("/").json == {"user": "bob"}
    again = run_cli(tmp_path, "revoke", "ann", env=store_env)
    assert again.stdout.splitlines()[-1] == "Ended 0 sessions of user ann"


def test_sessions_of_a_user_without_any(tmp_path: Path, redis_url: str) -> None:
    env = {"REDIS_URL": redis_url, "SESSION_REDIS_PREFIX": unique("cli") + ":"}
    result = run_cli(tmp_path, "sessions", "nobody", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "No live sessions of user nobody"
    as_json = run_cli(tmp_path, "sessions", "--json", "nobody", env=env)
    assert (as_json.returncode, json.loads(as_json.stdout)) == (0, [])
    assert "Using Redis for session storage" in as_json.stderr  # how the store was chosen: not in the JSON


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        {"REDIS_URL": "foo://x"},
        {"REDIS_URL": "redis://:cli-secret-pw@127.0.0.1:notaport/0"},
        {"DATABASE_URL": "mysql://u:cli-secret-pw@db.example/app"},
        {"DATABASE_URL": "not a url"},
        {"SESSION_STORE": "cassandra"},
        {"SESSION_STORE": "postgres"},  # without DATABASE_URL
    ],
    ids=["redis-scheme", "redis-port", "database-scheme", "database-garbage", "unknown-store", "forced-without-url"],
)
def test_configuration_errors_exit_2_with_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    result = run_cli(tmp_path, "check", env=env)
    line = assert_one_line_error(result, 2)
    assert "cli-secret-pw" not in result.stdout + result.stderr
    assert any(name in line for name in ("REDIS_URL", "DATABASE_URL", "SESSION_STORE")), line


def test_unreachable_forced_postgres_fails_with_one_line(tmp_path: Path) -> None:
    env = {"SESSION_STORE": "postgres", "DATABASE_URL": closed_port_url("postgresql", "cli-unreachable-pw")}
    for command in (["check"], ["cleanup"], ["init-db"], ["sessions", "ann"], ["sessions", "--json", "ann"],
                    ["revoke", "ann"]):  # fmt: skip
        result = run_cli(tmp_path, *command, env=env)
        line = assert_one_line_error(result, 1)
        assert "cli-unreachable-pw" not in result.stdout + result.stderr
        assert "127.0.0.1" in line


@pytest.mark.parametrize("command", [["sessions", "ann"], ["revoke", "ann"]], ids=["sessions", "revoke"])
def test_user_commands_exit_2_on_bad_configuration(tmp_path: Path, command: list[str]) -> None:
    for env in ({"SESSION_STORE": "cassandra"}, {"REDIS_URL": "redis://:cli-secret-pw@127.0.0.1:notaport/0"}):
        result = run_cli(tmp_path, *command, env=env)
        assert_one_line_error(result, 2)
        assert "cli-secret-pw" not in result.stdout + result.stderr


def test_user_commands_on_a_store_without_a_user_index_exit_2(tmp_path: Path, redis_url: str) -> None:
    env = {"REDIS_URL": redis_url, "SESSION_FORMAT": "express", "SESSION_REDIS_PREFIX": unique("cli") + ":"}
    for command in (["sessions", "ann"], ["revoke", "ann"]):
        assert "express format" in assert_one_line_error(run_cli(tmp_path, *command, env=env), 2)


def test_no_reachable_store_is_a_store_failure(tmp_path: Path) -> None:
    env = {"DATABASE_URL": closed_port_url("postgresql", "cli-unreachable-pw")}
    result = run_cli(tmp_path, "check", env=env)
    line = assert_one_line_error(result, 1)
    assert "REDIS_URL is not set" in line and "PostgreSQL at" in line
    assert "cli-unreachable-pw" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("secret", "says"), [("", "SESSION_SECRET is not set"), ("short", "trivial"), ("x7Kq-2mZ9!pR", "too short")]
)
def test_check_refuses_the_secret_the_application_would_refuse(tmp_path: Path, secret: str, says: str) -> None:
    result = run_cli(tmp_path, "check", env={"SESSION_STORE": "memory", "SESSION_SECRET": secret})
    assert says in assert_one_line_error(result, 2)


def test_commands_that_sign_nothing_need_no_secret(tmp_path: Path) -> None:
    # SESSION_SECRET unset, or set to a value the middleware would refuse.
    for env in ({"SESSION_SECRET": ""}, {"SESSION_SECRET": "short"}):
        for command in (["cleanup"], ["init-db"], ["sessions", "ann"], ["revoke", "ann"]):
            result = run_cli(tmp_path, *command, env={"SESSION_SQLITE_PATH": str(tmp_path / "s.sqlite3"), **env})
            assert result.returncode == 0, result.stderr


def test_missing_command_prints_usage(tmp_path: Path) -> None:
    result = run_cli(tmp_path, env={})
    assert result.returncode == 2
    assert "usage: wsgisession" in result.stderr
