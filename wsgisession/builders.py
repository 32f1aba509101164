"""The stores that settings describe, built (not connected: the caller decides when)."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

from .settings import ConfigError, Settings, mask_url
from .stores.base import CacheStore, SessionStore

if TYPE_CHECKING:
    from .stores.encrypted import Cipher
    from .stores.express import ExpressDocument
    from .stores.postgres import PostgresStore
    from .stores.sqlite import SQLiteStore

log = logging.getLogger("wsgisession")


def redis_from(settings: Settings) -> CacheStore:
    """The Redis store of these settings (connect-redis's keys in the express format)."""
    if not settings.redis_url:
        raise ConfigError("SESSION_STORE=redis needs REDIS_URL")
    try:
        from .stores.connect_redis import ConnectRedisStore
        from .stores.redis import RedisStore
    except ImportError:
        raise ConfigError("REDIS_URL is set but redis is not installed: pip install 'wsgisession[redis]'") from None
    try:
        if settings.format == "express":
            if settings.max_per_user:
                raise ConfigError("SESSION_MAX_PER_USER needs a store that lists a user's sessions; connect-redis's "
                                  "records (SESSION_FORMAT=express on Redis) have no index of them")  # fmt: skip
            return ConnectRedisStore(settings.redis_url, document=express_document(settings),
                                     prefix=settings.redis_prefix, timeout=settings.store_timeout)  # fmt: skip
        return RedisStore(settings.redis_url, prefix=settings.redis_prefix, timeout=settings.store_timeout)
    except ValueError as exc:
        raise ConfigError(f"REDIS_URL {mask_url(settings.redis_url)} is not a Redis URL: {exc}") from None


def postgres_from(settings: Settings, cleanup_interval: float) -> PostgresStore:
    """The PostgreSQL store of these settings, its driver and URL checked, not connected."""
    if not settings.database_url:
        raise ConfigError("SESSION_STORE=postgres needs DATABASE_URL")
    from .stores.pg_driver import DriverMissing, driver_class

    try:
        driver_class(settings.pg_driver).check(settings.database_url)
    except DriverMissing as exc:
        raise ConfigError(f"DATABASE_URL is set but {exc}") from None
    except ValueError:
        raise ConfigError(
            f"DATABASE_URL {mask_url(settings.database_url)} is not a PostgreSQL URL "
            "(expected postgresql://user:password@host:port/database)"
        ) from None
    # create_table=False: the caller runs setup(), and decides what a failure means
    return postgres_store(settings, settings.database_url, cleanup_interval=cleanup_interval, create_table=False)


def postgres_store(settings: Settings, dsn: str, **options: Any) -> PostgresStore:
    """The PostgreSQL store of these settings (connect-pg-simple's table in the express format);
    it connects only if ``options`` leave ``create_table`` on."""
    from .stores.connect_pg import ConnectPgStore
    from .stores.postgres import PostgresStore

    options = {"table": settings.table, "timeout": max(settings.store_timeout, 1.0), "prepare": settings.pg_prepare,
               "driver": settings.pg_driver, **options}  # fmt: skip
    if settings.format == "express":
        return ConnectPgStore(dsn, document=express_document(settings), **options)
    return PostgresStore(dsn, **options)


def with_encryption(store: SessionStore, settings: Settings) -> SessionStore:
    """``store`` with its values sealed under SESSION_ENCRYPTION_KEY (``store`` itself when it is not set)."""
    if not settings.encryption_keys:
        return store
    from .stores.encrypted import EncryptedStore

    return EncryptedStore(store, cipher_from(settings))


def cipher_from(settings: Settings) -> Cipher:
    """The cipher of SESSION_ENCRYPTION_KEY (which must be set)."""
    try:
        from .stores.encrypted import Cipher
    except ImportError:
        raise ConfigError(
            "SESSION_ENCRYPTION_KEY is set but cryptography is not installed: pip install 'wsgisession[encryption]'"
        ) from None
    return Cipher(settings.encryption_keys)


def express_document(settings: Settings) -> ExpressDocument:
    """The document express-session would store with these cookie settings."""
    from .stores.express import ExpressDocument

    return ExpressDocument(
        settings.max_age,
        path=settings.cookie_path,
        domain=settings.cookie_domain,
        secure=True if settings.cookie_secure else None,
        same_site=settings.cookie_samesite,
    )


def sqlite_from(settings: Settings, cleanup_interval: float) -> SessionStore:
    """The embedded SQLite store of these settings (its file is created now)."""
    store = sqlite_store(settings.sqlite_path, settings, cleanup_interval)
    log.warning(
        "Using the embedded SQLite session store at %s: for one host only; "
        "set REDIS_URL or DATABASE_URL to share sessions between hosts",
        store.path,
    )
    return store


def sqlite_store(path: str, settings: Settings, cleanup_interval: float) -> SQLiteStore:
    """The SQLite store in the file at ``path`` (created now), with the table of these settings."""
    from .stores.sqlite import SQLiteStore

    return SQLiteStore(os.path.abspath(path), table=settings.table, cleanup_interval=cleanup_interval)


def store_from_url(url: str, settings: Settings, cleanup_interval: float = 0) -> SessionStore:
    """The store a URL names, with the rest of these settings (format, key prefix, table): any URL that
    REDIS_URL takes, ``postgresql://`` (or ``postgres://``), or ``sqlite:///relative/path`` and
    ``sqlite:////absolute/path`` for a SQLite file. Not connected (a SQLite file is created)."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in ("postgresql", "postgres"):
        return postgres_from(dataclasses.replace(settings, database_url=url), cleanup_interval)
    if scheme == "sqlite":
        path = url[len("sqlite:///") :]
        if not url.startswith("sqlite:///") or not path:
            raise ConfigError(f"{url} is not a SQLite URL: sqlite:///relative/path or sqlite:////absolute/path")
        return sqlite_store(path, settings, cleanup_interval)
    if scheme.startswith(("redis", "rediss")) or scheme == "unix":
        return redis_from(dataclasses.replace(settings, redis_url=url))
    raise ConfigError(
        f"{mask_url(url)} is not a session store URL: redis:// (or rediss://, unix://, redis+sentinel://, "
        "redis+cluster://), postgresql:// or sqlite:///path"
    )
