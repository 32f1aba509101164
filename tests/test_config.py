"""Settings: environment variables, keyword overrides, and the start-up errors a user sees."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from servers import SECRET
from webtest import TestApp

from wsgisession import ConfigError, MemoryStore, SessionMiddleware, Settings
from wsgisession.settings import _VARIABLES

OTHER = "another-secret-9876543210-ZYXWVUTSRQPONMLKJIHGFEDCBA"
HOW_TO_GENERATE = "secrets.token_urlsafe"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The middleware reads os.environ: start every test from none of its variables."""
    for variable, _ in _VARIABLES.values():
        monkeypatch.delenv(variable, raising=False)
    yield


def load(**env: str) -> Settings:
    return Settings.load({"SESSION_SECRET": SECRET, **env})


def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    environ["session"]["seen"] = True
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


# -- the secret -----------------------------------------------------------------------


def test_defaults() -> None:
    s = load()
    assert s.secrets == (SECRET,)
    assert s.max_age == 86400
    assert s.cookie_name == "session"
    assert s.cookie_path == "/"
    assert s.cookie_domain is None
    assert s.cookie_secure is None
    assert s.cookie_samesite == "Lax"
    assert s.fail_on_store_error is False
    assert s.store is None


def test_missing_secret_says_how_to_generate_one() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load({})
    assert "SESSION_SECRET" in str(info.value)
    assert HOW_TO_GENERATE in str(info.value)


def test_missing_secret_stops_the_middleware() -> None:
    with pytest.raises(ConfigError, match="SESSION_SECRET"):
        SessionMiddleware(hello, MemoryStore())


@pytest.mark.parametrize("blank", ["", "   ", ",", " , ,", ",,,"])
def test_blank_secret_is_missing(blank: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load({"SESSION_SECRET": blank})
    assert "SESSION_SECRET" in str(info.value)
    assert HOW_TO_GENERATE in str(info.value)


def test_empty_secret_list_as_argument_is_refused() -> None:
    with pytest.raises(ConfigError, match="SESSION_SECRET"):
        Settings.load({}, secret=[])
    with pytest.raises(ConfigError, match="SESSION_SECRET"):
        SessionMiddleware(hello, MemoryStore(), secret=[])


@pytest.mark.parametrize(
    "weak",
    [
        "password",
        "changeme",
        "keyboard cat",
        "short-but-random-Xy7",  # too short
        "a" * 64,  # long but trivial
        "abababababababababababababababababababab",
        "0123456" * 10,  # 7 distinct characters
        "  Your-Secret-Key  ",
        "x9!Kp2$vQ7mZ3@rT8wL5nB1",  # random but 23 characters
    ],
)
def test_weak_secret_message_says_how_to_generate_and_hides_the_secret(weak: str) -> None:
    for attempt in (lambda: Settings.load({"SESSION_SECRET": weak}), lambda: Settings.load({}, secret=weak)):
        with pytest.raises(ConfigError) as info:
            attempt()
        message = str(info.value)
        assert "SESSION_SECRET" in message
        assert HOW_TO_GENERATE in message
        assert weak.strip() not in message
        assert weak.strip() not in repr(info.value)


def test_weak_secret_in_a_rotation_list_names_its_position_and_hides_it() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load({"SESSION_SECRET": f"{SECRET},changeme-changeme"})
    message = str(info.value)
    assert "2 of" in message
    assert "changeme-changeme" not in message
    assert SECRET not in message


def test_comma_list_is_a_rotation_first_signs() -> None:
    s = load(SESSION_SECRET=f" {SECRET} , {OTHER} ,")
    assert s.secrets == (SECRET, OTHER)
    mw = SessionMiddleware(hello, MemoryStore(), secret=list(s.secrets))
    session_id = "A" * 43
    assert mw.core.format.signer.unsign(mw.core.format.signer.sign(session_id, 1)) == (session_id, 1, True)


def test_secret_from_environment_reaches_the_middleware(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_SECRET", f"{SECRET},{OTHER}")
    mw = SessionMiddleware(hello, MemoryStore())
    assert mw.settings.secrets == (SECRET, OTHER)
    res = TestApp(mw).get("/")
    value = res.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    assert mw.core.format.signer.unsign(value) == (value[:43], int(value.split(".")[1]), True)
    only_other = SessionMiddleware(hello, MemoryStore(), secret=OTHER)
    assert only_other.core.format.signer.unsign(value) is None  # signed with the first secret of the list


def test_repr_of_settings_and_signer_hide_secrets_and_urls() -> None:
    s = Settings.load(
        {
            "SESSION_SECRET": f"{SECRET},{OTHER}",
            "REDIS_URL": "redis://:hunter2password@127.0.0.1:6379/0",
            "DATABASE_URL": "postgresql://app:pgpassword77@127.0.0.1/db",
        }
    )
    text = repr(s) + str(s)
    for hidden in (SECRET, OTHER, "hunter2password", "pgpassword77"):
        assert hidden not in text
    mw = SessionMiddleware(hello, MemoryStore(), secret=[SECRET, OTHER])
    shown = repr(mw.core.format.signer) + str(mw.core.format.signer) + repr(mw.settings)
    assert SECRET not in shown
    assert OTHER not in shown


# -- max age ------------------------------------------------------------------------


def test_max_age_is_milliseconds_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(SESSION_MAX_AGE="3600000").max_age == 3600
    assert load(SESSION_MAX_AGE="1500").max_age == 1.5
    monkeypatch.setenv("SESSION_SECRET", SECRET)
    monkeypatch.setenv("SESSION_MAX_AGE", "7200000")
    res = TestApp(SessionMiddleware(hello, MemoryStore())).get("/")
    assert "Max-Age=7200;" in res.headers["Set-Cookie"] + ";"


def test_a_max_age_that_looks_like_seconds_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """SESSION_MAX_AGE=86400 (a seconds habit) would give 86-second sessions: said at start-up."""
    caplog.set_level(logging.WARNING, logger="wsgisession")
    assert load(SESSION_MAX_AGE="86400").max_age == 86.4
    assert "SESSION_MAX_AGE=86400 gives sessions of 86.4 seconds: it is in milliseconds" in caplog.text
    assert "write 86400000" in caplog.text
    caplog.clear()
    load(SESSION_MAX_AGE="86400000", SESSION_ABSOLUTE_TIMEOUT="604800000")
    assert caplog.text == ""


def test_max_age_argument_is_seconds() -> None:
    res = TestApp(SessionMiddleware(hello, MemoryStore(), secret=SECRET, max_age=90)).get("/")
    assert "Max-Age=90;" in res.headers["Set-Cookie"] + ";"


@pytest.mark.parametrize("value", ["abc", "1.5", "10s", "0", "-1000", "1e3"])
def test_invalid_max_age_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="SESSION_MAX_AGE"):
        load(SESSION_MAX_AGE=value)


@pytest.mark.parametrize("value", [0, -5])
def test_invalid_max_age_argument(value: float) -> None:
    with pytest.raises(ConfigError, match="SESSION_MAX_AGE"):
        SessionMiddleware(hello, MemoryStore(), secret=SECRET, max_age=value)


def test_sub_second_max_age_does_not_make_a_cookie_that_is_dropped_at_once() -> None:
    # SESSION_MAX_AGE=500 (ms) is a valid setting: the cookie must not say Max-Age=0 ("delete me now").
    res = TestApp(SessionMiddleware(hello, MemoryStore(), secret=SECRET, max_age=0.5)).get("/")
    assert "Max-Age=1;" in res.headers["Set-Cookie"] + ";"  # whole seconds, at least one


# -- cookie attributes ------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [("lax", "Lax"), ("Strict", "Strict"), ("STRICT", "Strict")])
def test_samesite_values(raw: str, expected: str) -> None:
    assert load(SESSION_COOKIE_SAMESITE=raw).cookie_samesite == expected


def test_samesite_none_needs_secure() -> None:
    with pytest.raises(ConfigError) as info:
        load(SESSION_COOKIE_SAMESITE="None")
    assert "SESSION_COOKIE_SAMESITE" in str(info.value)
    assert "SESSION_COOKIE_SECURE" in str(info.value)
    with pytest.raises(ConfigError, match="SESSION_COOKIE_SECURE"):
        load(SESSION_COOKIE_SAMESITE="none", SESSION_COOKIE_SECURE="false")
    s = load(SESSION_COOKIE_SAMESITE="none", SESSION_COOKIE_SECURE="true")
    assert (s.cookie_samesite, s.cookie_secure) == ("None", True)


@pytest.mark.parametrize("value", ["bogus", "lax;", "1"])
def test_invalid_samesite_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="SESSION_COOKIE_SAMESITE"):
        load(SESSION_COOKIE_SAMESITE=value)


def test_invalid_samesite_argument() -> None:
    with pytest.raises(ConfigError, match="SESSION_COOKIE_SAMESITE"):
        SessionMiddleware(hello, MemoryStore(), secret=SECRET, cookie_samesite="bogus")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("auto", None), ("AUTO", None), ("true", True), ("1", True), ("yes", True), ("false", False), ("off", False)],
)
def test_secure_values(raw: str, expected: bool | None) -> None:
    assert load(SESSION_COOKIE_SECURE=raw).cookie_secure is expected


@pytest.mark.parametrize("variable", ["SESSION_COOKIE_SECURE", "SESSION_FAIL_ON_STORE_ERROR", "SESSION_PG_PREPARE"])
@pytest.mark.parametrize("value", ["maybe", "2", "tru", "enabled"])
def test_invalid_booleans_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(**{variable: value})
    assert variable in str(info.value)


def test_fail_on_store_error_flag() -> None:
    assert load(SESSION_FAIL_ON_STORE_ERROR="true").fail_on_store_error is True
    assert load(SESSION_FAIL_ON_STORE_ERROR="0").fail_on_store_error is False


@pytest.mark.parametrize("name", ["my session", "a=b", "a;b", 'a"b', "a,b", "a\tb"])
def test_invalid_cookie_name_names_the_variable(name: str) -> None:
    with pytest.raises(ConfigError, match="SESSION_COOKIE_NAME"):
        load(SESSION_COOKIE_NAME=name)
    with pytest.raises(ConfigError, match="SESSION_COOKIE_NAME"):
        SessionMiddleware(hello, MemoryStore(), secret=SECRET, cookie_name=name)


def test_invalid_cookie_path_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="SESSION_COOKIE_PATH"):
        load(SESSION_COOKIE_PATH="app")


def test_cookie_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_SECRET", SECRET)
    monkeypatch.setenv("SESSION_COOKIE_NAME", "sid")
    monkeypatch.setenv("SESSION_COOKIE_PATH", "/app")
    monkeypatch.setenv("SESSION_COOKIE_DOMAIN", "example.com")
    monkeypatch.setenv("SESSION_COOKIE_SECURE", "true")
    monkeypatch.setenv("SESSION_COOKIE_SAMESITE", "strict")
    res = TestApp(SessionMiddleware(hello, MemoryStore())).get("/app/")
    header = res.headers["Set-Cookie"]
    assert header.startswith("sid=")
    for attribute in ("Path=/app", "Domain=example.com", "Secure", "HttpOnly", "SameSite=Strict"):
        assert attribute in header.split("; "), (attribute, header)


# -- the store setting ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["mysql", "bogus", "redis,postgres"])
def test_invalid_store_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(SESSION_STORE=value)
    assert "SESSION_STORE" in str(info.value)
    assert "redis" in str(info.value)  # and lists the valid ones


def test_store_is_case_insensitive() -> None:
    assert load(SESSION_STORE="Memory").store == "memory"


def test_forced_memory_store_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_SECRET", SECRET)
    monkeypatch.setenv("SESSION_STORE", "memory")
    mw = SessionMiddleware(hello, secret=None)
    assert isinstance(mw.store, MemoryStore)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SESSION_STORE_TIMEOUT", "fast"),
        ("SESSION_STORE_TIMEOUT", "0"),
        ("SESSION_CLEANUP_INTERVAL", "-1"),
        ("SESSION_LATENCY_BUDGET", "0"),
        ("SESSION_LATENCY_BUDGET", "100ms"),
    ],
)
def test_invalid_numbers_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load(**{variable: value})


def test_latency_budget_is_seconds() -> None:
    assert load(SESSION_LATENCY_BUDGET="0.25").latency_budget == 0.25
    assert load().latency_budget == 0.1


def test_table_name_leaves_room_for_its_table_of_stale_marks() -> None:
    assert load(SESSION_TABLE="t" * 57).table == "t" * 57
    with pytest.raises(ConfigError, match="SESSION_TABLE"):
        load(SESSION_TABLE="t" * 58)  # "_stale" would pass PostgreSQL's 63 characters


# -- precedence ---------------------------------------------------------------------


def test_keyword_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_SECRET", OTHER)
    monkeypatch.setenv("SESSION_MAX_AGE", "1000000")
    monkeypatch.setenv("SESSION_COOKIE_NAME", "from_env")
    monkeypatch.setenv("SESSION_COOKIE_SECURE", "true")
    monkeypatch.setenv("SESSION_FAIL_ON_STORE_ERROR", "true")
    mw = SessionMiddleware(
        hello,
        MemoryStore(),
        secret=SECRET,
        max_age=60,
        cookie_name="from_kwargs",
        cookie_secure=False,
        fail_on_store_error=False,
    )
    s = mw.settings
    assert s.secrets == (SECRET,)
    assert (s.max_age, s.cookie_name, s.cookie_secure, s.fail_on_store_error) == (60, "from_kwargs", False, False)
    header = TestApp(mw).get("/").headers["Set-Cookie"]
    assert header.startswith("from_kwargs=")
    assert "Max-Age=60" in header.split("; ")
    assert "Secure" not in header.split("; ")


def test_an_invalid_environment_value_fails_even_when_an_argument_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # A typo in the environment is reported, not silently ignored.
    monkeypatch.setenv("SESSION_MAX_AGE", "abc")
    with pytest.raises(ConfigError, match="SESSION_MAX_AGE"):
        SessionMiddleware(hello, MemoryStore(), secret=SECRET, max_age=60)


def test_unset_arguments_keep_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_SECRET", SECRET)
    monkeypatch.setenv("SESSION_COOKIE_NAME", "envname")
    mw = SessionMiddleware(hello, MemoryStore(), cookie_name=None)
    assert mw.settings.cookie_name == "envname"


def test_settings_are_frozen() -> None:
    s = load()
    with pytest.raises(AttributeError):
        s.max_age = 1  # type: ignore[misc]
