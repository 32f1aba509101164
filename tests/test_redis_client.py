"""Redis clients from a URL (one server, Sentinel, Cluster), and redis-py's errors as StoreError: against real
redis-server processes where a test connects."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from redis.sentinel import SentinelConnectionPool, SentinelManagedSSLConnection
from servers import SECRET, RedisServer, free_port, running

from wsgisession import ConfigError, Settings, StoreError, create_session_store
from wsgisession.stores.redis import RedisStore
from wsgisession.stores.redis_client import client_from_url, raise_errors, store_errors

USER, PASSWORD = "app", "s@cret:pw"  # quoted in a URL as s%40cret%3Apw


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """A private redis-server with an ACL user of its own, beside the default one."""
    with running(RedisServer()) as server:
        admin = redis.Redis(port=server.port, socket_timeout=2)
        admin.acl_setuser(USER, enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], commands=["+@all"])
        admin.close()
        yield server


def url_of(server: RedisServer, password: str = "s%40cret%3Apw") -> str:
    return f"redis://{USER}:{password}@127.0.0.1:{server.port}/0"


def test_a_url_with_an_acl_user_connects_as_that_user(server: RedisServer) -> None:
    client = client_from_url(url_of(server), timeout=0.5)
    try:
        assert client.acl_whoami() == USER
    finally:
        client.close()
    store = RedisStore(url_of(server), prefix="acl:")
    try:
        store.create("k", {"n": "1"}, 60)
        record = store.load("k")
        assert record is not None and record.data == {"n": 1}
    finally:
        store.close()


def test_a_wrong_password_is_a_store_error_naming_redis(server: RedisServer) -> None:
    store = RedisStore(url_of(server, password="wrong"))
    try:
        with pytest.raises(StoreError) as raised:
            store.ping()
    finally:
        store.close()
    assert str(raised.value).startswith("Redis: ") and "wrong" not in str(raised.value)
    assert isinstance(raised.value.__cause__, redis.AuthenticationError)


def test_sentinel_url_builds_redis_py_sentinel_client() -> None:
    client = client_from_url(
        "rediss+sentinel://app:s%40cret@10.0.0.1:26380,[::1],sentinel.example/sessions/3"
        "?sentinel_password=spw&ssl_ca_certs=/etc/ca.pem",
        timeout=0.7,
    )
    assert isinstance(client, redis.Redis)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "sessions" and pool.connection_class is SentinelManagedSSLConnection
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (3, "app", "s@cret")
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.7
    assert kwargs["ssl_ca_certs"] == "/etc/ca.pem"
    sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
    assert [(s["host"], s["port"]) for s in sentinels] == [("10.0.0.1", 26380), ("::1", 26379),
                                                           ("sentinel.example", 26379)]  # fmt: skip
    assert {s["password"] for s in sentinels} == {"spw"} and {s["socket_timeout"] for s in sentinels} == {0.7}
    client.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:notaport/0", "'notaport'"),  # redis-py's own messages for a one-server URL
        ("redis://127.0.0.1:70000/0", "out of range"),
        ("http://127.0.0.1:6379/0", "unknown scheme http://: use redis://, rediss://, unix://"),
        ("127.0.0.1:6379", "unknown scheme (none)"),
        ("redis+sentinel:///mymaster/0", "no host"),
        ("redis+sentinel://h1:26379,,h2/mymaster", "no host"),
        ("redis+sentinel://h1:26379", "no service name"),
        ("redis+sentinel://h1:26379/", "no service name"),
        ("redis+sentinel://h1:notaport/mymaster", "bad port 'notaport'"),
        ("redis+sentinel://h1:70000/mymaster", "bad port '70000'"),
        ("redis+sentinel://h1/mymaster/zero", "bad database number"),
        ("redis+sentinel://h1/mymaster/0/extra", "too many path parts"),
        ("redis+sentinel://h1/mymaster?sentinel_pasword=x", "unknown option sentinel_pasword"),
        ("redis+sentinel://h1/mymaster?ssl_ca_certs=/ca.pem", "TLS options need rediss+sentinel://"),
        ("redis+cluster://", "no host"),
        ("redis+cluster://:pw@", "no host"),
        ("redis+cluster://h1:7000,h2:x", "bad port 'x'"),
        ("redis+cluster://h1:7000/1", "only database 0"),
        ("redis+cluster://::1:7000", "[address]:port"),
        ("rediss+cluster://h1?ssl_cert_reqs=maybe", "ssl_cert_reqs must be"),
        ("redis+clutser://h1:7000", "unknown scheme redis+clutser://"),
    ],
)
def test_bad_urls_raise_value_error_saying_why(url: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        client_from_url(url)
    assert message in str(raised.value)


@pytest.mark.parametrize(("url", "message"), [("redis://:hunter2@127.0.0.1:notaport/0", "'notaport'"),
                                            ("redis+sentinel://:hunter2@h1:26379", "no service name")])  # fmt: skip
def test_a_bad_url_in_settings_is_a_config_error_without_the_password(url: str, message: str) -> None:
    settings = Settings.load({}, secret=SECRET, store="redis", redis_url=url)
    with pytest.raises(ConfigError) as raised:
        create_session_store(settings)
    assert "is not a Redis URL" in str(raised.value) and message in str(raised.value)
    assert "hunter2" not in str(raised.value)


def test_store_errors_turns_a_refused_connection_into_a_store_error() -> None:
    client = client_from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)  # nothing listens there
    with pytest.raises(StoreError) as raised, store_errors():
        client.ping()
    assert str(raised.value).startswith("Redis: ") and str(raised.value) == f"Redis: {raised.value.__cause__}"
    assert isinstance(raised.value.__cause__, redis.ConnectionError)


def test_store_errors_lets_other_errors_through() -> None:
    with pytest.raises(KeyError), store_errors():
        raise KeyError("not redis-py's")


def test_a_cluster_no_node_of_which_answers_is_a_store_error() -> None:
    """redis-py raises RedisClusterException (not a RedisError) when no startup node answers."""
    store = RedisStore(f"redis+cluster://127.0.0.1:{free_port()}", timeout=0.5)
    with pytest.raises(StoreError, match=r"^Redis: ") as raised:
        store.ping()
    assert isinstance(raised.value.__cause__, redis.exceptions.RedisClusterException)


def test_raise_errors_raises_a_pipelines_first_error_reply(server: RedisServer) -> None:
    client = redis.Redis(port=server.port, socket_timeout=2)
    try:
        pipe = client.pipeline(transaction=False)
        pipe.set("text", "a")
        pipe.incr("text")  # two refusals, the INCR's first
        pipe.lpush("text", "b")
        replies = pipe.execute(raise_on_error=False)
    finally:
        client.close()
    raise_errors(replies[:1])  # no error: nothing raised
    with pytest.raises(StoreError, match=r"^Redis: .*not an integer") as raised:
        raise_errors(replies)
    assert raised.value.__cause__ is replies[1]
