"""The fault-injecting proxy (tests/proxy.py) against the shared real Redis: each fault does what
the outage tests rely on, and ``heal()`` ends it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis
from proxy import Proxy
from servers import require_redis, running

TIMEOUT = 0.5


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    target = redis.Redis.from_url(require_redis()).connection_pool.connection_kwargs["port"]
    with running(Proxy(target)) as proxy:
        yield proxy


def client(proxy: Proxy, timeout: float = TIMEOUT) -> redis.Redis:
    """A client through the proxy, failing after ``timeout`` seconds without a reply."""
    return redis.Redis.from_url(proxy.url, socket_timeout=timeout, socket_connect_timeout=timeout)


def test_commands_pass(proxy: Proxy) -> None:
    r = client(proxy)
    key = f"proxy-test-{time.monotonic_ns()}"
    assert r.set(key, "value", ex=10)
    assert r.get(key) == b"value"
    assert r.delete(key) == 1
    r.close()


def test_cut_times_out_and_heal_lets_new_clients_through(proxy: Proxy) -> None:
    before = client(proxy)
    assert before.ping()
    proxy.cut()
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        before.ping()  # an open connection: the reply never comes
    with pytest.raises(redis.TimeoutError):
        client(proxy).ping()  # a new one: accepted, then silence; never a refusal
    assert time.monotonic() - started < 4 * TIMEOUT
    proxy.heal()
    after = client(proxy)
    assert after.ping()
    before.close()
    after.close()


def test_freeze_holds_a_command_until_heal(proxy: Proxy) -> None:
    r = client(proxy, timeout=5)
    key = f"proxy-test-{time.monotonic_ns()}"
    assert r.ping()
    proxy.freeze()
    answers: list[object] = []
    sender = threading.Thread(target=lambda: answers.append(r.set(key, "late", ex=10)), daemon=True)
    sender.start()
    sender.join(0.5)
    assert sender.is_alive() and not answers, "a command passed a frozen proxy"
    direct = redis.Redis.from_url(require_redis(), socket_timeout=2)
    assert direct.get(key) is None, "the server saw a command sent during the freeze"
    proxy.heal()
    sender.join(5)
    assert answers == [True]
    assert direct.get(key) == b"late"
    direct.delete(key)
    direct.close()
    r.close()


def test_delay_makes_every_reply_late(proxy: Proxy) -> None:
    r = client(proxy, timeout=2)
    assert r.ping()
    proxy.delay(0.3)
    for _ in range(2):
        started = time.monotonic()
        assert r.ping()
        assert 0.3 <= time.monotonic() - started < 1.5
    proxy.heal()
    started = time.monotonic()
    assert r.ping()
    assert time.monotonic() - started < 0.3
    r.close()


def test_hang_one_in_three_hangs_every_third_reply(proxy: Proxy) -> None:
    clients = [client(proxy, timeout=0.3) for _ in range(9)]
    for r in clients:
        assert r.ping()  # connected first: the handshake's replies (HELLO and the like) are not counted
    proxy.hang_one_in(3)
    outcomes: list[object] = []
    for r in clients:
        try:
            outcomes.append(r.ping())
        except redis.TimeoutError:
            outcomes.append("timeout")
        r.close()
    assert outcomes == [True, True, "timeout"] * 3
    proxy.heal()
    r = client(proxy)
    assert r.ping()
    r.close()


def test_a_hung_connection_does_not_hang_the_others(proxy: Proxy) -> None:
    one, other = client(proxy), client(proxy)
    assert one.ping() and other.ping()
    proxy.hang_one_in(2)
    assert one.ping()  # reply 1 passes
    with pytest.raises(redis.TimeoutError):
        other.ping()  # reply 2 hangs, on this connection only
    assert one.ping()  # reply 3: the other connection goes on
    one.close()
    other.close()


def test_close_leaves_no_thread_and_refuses_new_connections() -> None:
    target = redis.Redis.from_url(require_redis()).connection_pool.connection_kwargs["port"]
    proxy = Proxy(target)
    with running(proxy):
        r = client(proxy)
        assert r.ping()
        proxy.freeze()  # and a connection left open, with data held
        port = proxy.port
    assert not any(t.name == f"proxy-{port}" for t in threading.enumerate())
    with pytest.raises(redis.ConnectionError):
        r.ping()
    r.close()
