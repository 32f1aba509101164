"""Redis clients from a URL: one server, Sentinel, Cluster; and redis-py's errors as :class:`~.base.StoreError`.

The URL picks redis-py's client: ``redis://``, ``rediss://`` and ``unix://`` one server;
``redis+sentinel://`` the master a set of Sentinels names; ``redis+cluster://`` a Redis
Cluster (see :func:`client_from_url`). Whichever it is, what it raises when Redis cannot answer
(:data:`ERRORS`) reaches a store's caller as a :class:`~.base.StoreError` made by :func:`failed` alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, NoReturn
from urllib.parse import parse_qsl, unquote

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import Connection
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from .base import StoreError

#: What any of redis-py's clients raises when Redis cannot answer: a cluster client also
#: raises RedisClusterException (not a RedisError) when it cannot reach a node that knows the slots.
ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)

Client = redis.Redis | RedisCluster

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
SENTINEL_PORT = 26379
CLUSTER_PORT = 6379
_TLS_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")


# -- errors ------------------------------------------------------------------------------------


def failed(exc: Exception) -> NoReturn:
    """Raise redis-py's ``exc`` (raised, or a pipeline's reply in its place) as :class:`StoreError`, chained."""
    raise StoreError(f"Redis: {exc}") from exc


class store_errors:
    """``with store_errors():`` raises what redis-py raises in the block (:data:`ERRORS`) as :func:`failed`
    does. A class (named as :class:`contextlib.suppress` is) rather than a generator: it wraps a store's every
    command, and costs it a fifth of what a generator-based one would."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if isinstance(exc, ERRORS):
            failed(exc)


def raise_errors(replies: Sequence[Any]) -> None:
    """Raise the first error among a pipeline's replies (run with ``raise_on_error=False``), if any, as
    :func:`failed` does."""
    for reply in replies:
        if isinstance(reply, Exception):
            failed(reply)


# -- clients -----------------------------------------------------------------------------------


def client_from_url(url: str, timeout: float = 1.0) -> Client:
    """redis-py's client for a ``REDIS_URL``, with short timeouts and one immediate reconnect.

    - ``redis://[user:password@]host[:port][/db]``, ``rediss://...`` (TLS), ``unix:///path.sock``:
      :meth:`redis.Redis.from_url`, with all of its query options.
    - ``redis+sentinel://[user:password@]host[:port][,host2[:port2]...]/service[/db]``: the master
      of ``service`` as the Sentinels name it (:meth:`redis.sentinel.Sentinel.master_for`), followed
      through a failover. The user and password are the master's; ``?sentinel_password=`` (and
      ``sentinel_username=``) authenticate to the Sentinels. Sentinels default to port 26379.
    - ``redis+cluster://[user:password@]host[:port][,host2[:port2]...]``: a Redis Cluster
      (:class:`redis.cluster.RedisCluster`) found through any of the listed nodes (port 6379 by default).
    - ``rediss+sentinel://`` and ``rediss+cluster://``: the same over TLS, to the Sentinels too;
      ``?ssl_ca_certs=``, ``ssl_certfile=``, ``ssl_keyfile=``, ``ssl_cert_reqs=`` (required, optional,
      none) and ``ssl_check_hostname=`` (true, false) tune it.

    A URL that cannot work raises :class:`ValueError` saying why. Making a cluster client
    connects (redis-py reads the slot map at once); :class:`~.redis.RedisStore` defers that to first use.
    """
    return client_factory(url, timeout)[0]()


def client_factory(url: str, timeout: float) -> tuple[Callable[[], Client], bool]:
    """Check ``url``; return what makes its client, and whether making it connects."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    socket_options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if scheme in SENTINEL_SCHEMES:
        return _sentinel_factory(url, scheme, socket_options), False
    if scheme in CLUSTER_SCHEMES:
        return _cluster_factory(url, scheme, socket_options), True
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"unknown scheme {scheme + '://' if scheme else '(none)'}: use redis://, rediss://, unix://, "
            "redis+sentinel://, rediss+sentinel://, redis+cluster:// or rediss+cluster://"
        )
    # Short timeouts, and one immediate reconnect for a connection that went stale
    # (a restarted server) but no retry of a timeout: a hung server costs one timeout.
    client = redis.Redis.from_url(url, retry=_reconnect_once(), **socket_options)
    return lambda: client, False


def _reconnect_once() -> Retry:
    return Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))


class _Parts:
    """A multi-host URL taken apart: ``scheme://[user:password@]host:port,host:port/path?query``."""

    def __init__(self, url: str, scheme: str, default_port: int) -> None:
        rest = url.split("://", 1)[1].split("#", 1)[0]
        rest, _, query = rest.partition("?")
        netloc, slash, path = rest.partition("/")
        self.path = slash + path
        userinfo, at, hosts = netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        self.username = (unquote(user) or None) if at else None
        self.password = (unquote(password) or None) if at else None
        self.hosts = [_host_port(item.strip(), default_port, scheme) for item in hosts.split(",")]
        self.options = dict(parse_qsl(query, keep_blank_values=True))
        self.tls = SENTINEL_SCHEMES.get(scheme, False) or CLUSTER_SCHEMES.get(scheme, False)

    def take_options(self, scheme: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        """The query options as redis-py keywords; any other option is an error."""
        allowed = allowed + (_TLS_OPTIONS if self.tls else ())
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            tls_hint = "" if self.tls else f" (TLS options need {scheme.replace('redis+', 'rediss+')}://)"
            raise ValueError(
                f"unknown option {', '.join(unknown)} in a {scheme}:// URL; known: {', '.join(allowed)}{tls_hint}"
            )
        found: dict[str, Any] = {k: v for k, v in self.options.items() if v != ""}
        if found.get("ssl_cert_reqs", "none") not in ("required", "optional", "none"):
            raise ValueError("ssl_cert_reqs must be required, optional or none")
        if "ssl_check_hostname" in found:
            flag = found["ssl_check_hostname"].lower()
            if flag not in ("true", "false"):
                raise ValueError("ssl_check_hostname must be true or false")
            found["ssl_check_hostname"] = flag == "true"
        return found


def _host_port(item: str, default_port: int, scheme: str) -> tuple[str, int]:
    example = f"{scheme}://host:{default_port},host2:{default_port}" + ("/mymaster/0" if "sentinel" in scheme else "")
    if not item:
        raise ValueError(f"no host (or an empty one in the comma-separated list): expected {example}")
    if item.startswith("["):  # [IPv6]:port
        host, bracket, port = item[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise ValueError(f"bad host {item!r}: write an IPv6 address as [address]:port")
        port = port[1:]
    else:
        host, _, port = item.partition(":")
        if ":" in port:
            raise ValueError(f"bad host {item!r}: write an IPv6 address as [address]:port")
    if not host:
        raise ValueError(f"no host name in {item!r}: expected {example}")
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port {port!r} for host {host}: expected a number from 1 to 65535")
    return host, int(port)


def _sentinel_factory(url: str, scheme: str, socket_options: dict[str, Any]) -> Callable[[], Client]:
    parts = _Parts(url, scheme, SENTINEL_PORT)
    segments = [s for s in parts.path.split("/") if s]
    if not segments:
        raise ValueError(f"no service name: expected {scheme}://host:{SENTINEL_PORT}[,host2:port]/mymaster[/db]")
    if len(segments) > 2:
        raise ValueError(f"too many path parts {parts.path!r}: expected /service[/db]")
    service, db = unquote(segments[0]), segments[1] if len(segments) == 2 else "0"
    if not db.isdigit():
        raise ValueError(f"bad database number {db!r} after the service name: expected /{service}/0")
    options = parts.take_options(scheme, _SENTINEL_OPTIONS)
    tls = {k: v for k, v in options.items() if k.startswith("ssl_")}
    if parts.tls:
        tls["ssl"] = True
    sentinel_options = {
        **socket_options,
        **tls,
        "username": options.get("sentinel_username"),
        "password": options.get("sentinel_password"),
        # No retry on a Sentinel: the next one in the list is asked instead.
        "retry": Retry(NoBackoff(), 0),
    }
    manager = Sentinel(parts.hosts, sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call, unused-ignore]
    # The pool asks the Sentinels for the master's address whenever it opens a connection, and
    # drops a connection to a master that was demoted: a failover costs failed requests, no restart.
    client = manager.master_for(  # type: ignore[no-untyped-call, unused-ignore]
        service,
        db=int(db),
        username=parts.username,
        password=parts.password,
        retry=_reconnect_once(),
        **socket_options,
        **tls,
    )
    return lambda: client


def _cluster_factory(url: str, scheme: str, socket_options: dict[str, Any]) -> Callable[[], Client]:
    parts = _Parts(url, scheme, CLUSTER_PORT)
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"a cluster has only database 0, not {parts.path!r}: expected {scheme}://host:port,...")
    options = parts.take_options(scheme, ())
    if parts.tls:
        options["ssl"] = True
    nodes = [ClusterNode(host, port) for host, port in parts.hosts]  # type: ignore[no-untyped-call]

    def make() -> Client:
        # One immediate retry of a failed command (redis-py refreshes the slot map first):
        # a failover inside the cluster, or a node that moved, costs one more round trip.
        return RedisCluster(
            startup_nodes=nodes,
            username=parts.username,
            password=parts.password,
            retry=Retry(NoBackoff(), 1),
            **socket_options,
            **options,
        )

    return make


def on_new_connections(client: Client, hook: Callable[[Connection], None]) -> None:
    """Have ``hook`` run on every connection the client's pool opens (plain and Sentinel clients)."""
    if isinstance(client, redis.Redis):
        client.connection_pool.connection_kwargs.setdefault("redis_connect_func", hook)


def close_client(client: Client) -> None:
    """Close the client's connections; a Sentinel client's to the Sentinels too."""
    client.close()
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, SentinelConnectionPool):
        pool.sentinel_manager.close()
