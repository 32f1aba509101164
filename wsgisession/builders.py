"""The stores that settings describe, built (not connected: the caller decides when)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from .settings import ConfigError, Settings, mask_url
from .stores.base import CacheStore, SessionStore

if TYPE_CHECKING:
    from .stores.express import ExpressDocument
    from .stores.postgres import PostgresStore

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
    try:
        import psycopg2.extensions
    except ImportError:
        raise ConfigError(
            "DATABASE_URL is set but psycopg2 is not installed: pip install 'wsgisession[postgres]'"
        ) from None
    try:
        psycopg2.extensions.parse_dsn(settings.database_url)
    except psycopg2.ProgrammingError:  # its message quotes the URL, password and all
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
               **options}  # fmt: skip
    if settings.format == "express":
        return ConnectPgStore(dsn, document=express_document(settings), **options)
    return PostgresStore(dsn, **options)


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
    from .stores.sqlite import SQLiteStore

    path = os.path.abspath(settings.sqlite_path)
    store = SQLiteStore(path, table=settings.table, cleanup_interval=cleanup_interval)
    log.warning(
        "Using the embedded SQLite session store at %s: for one host only; "
        "set REDIS_URL or DATABASE_URL to share sessions between hosts",
        path,
    )
    return store
