"""The choice of store at start-up: Redis when it answers, PostgreSQL behind it or instead, the
embedded SQLite file when neither is configured. Each choice is logged on the "wsgisession" logger."""

from __future__ import annotations

import logging
import time

from .builders import postgres_from, redis_from, sqlite_from, store_from_url
from .settings import ConfigError, Settings, mask_url
from .stores.base import SessionStore, StoreError

log = logging.getLogger("wsgisession")


class NoStoreError(ConfigError):
    """No session store answers at start-up (a ConfigError: start-up stops, with one message)."""


REDIS_RETRIES = 3


def create_session_store(settings: Settings, cleanup_interval: float | None = None) -> SessionStore:
    """Build the store the settings select, detecting Redis and PostgreSQL unless SESSION_STORE forces one.

    ``cleanup_interval`` overrides the setting (the CLI passes 0: no thread). With SESSION_MIGRATE_FROM,
    the store also moves each session it misses from the store that URL names.
    """
    interval = settings.cleanup_interval if cleanup_interval is None else cleanup_interval
    store = _select(settings, interval)
    if not settings.migrate_from:
        return store
    return _migrating(store, settings)


def _migrating(store: SessionStore, settings: Settings) -> SessionStore:
    """``store``, moving the sessions it misses from the one SESSION_MIGRATE_FROM names."""
    from .stores.migrating import MigratingStore

    url = settings.migrate_from or ""
    if url in (settings.redis_url, settings.database_url):
        raise ConfigError("SESSION_MIGRATE_FROM names the store sessions are kept in: name the one they move from")
    log.info("Sessions missing here are looked up in %s and moved (SESSION_MIGRATE_FROM) until it holds none",
             mask_url(url))  # fmt: skip
    return MigratingStore(store, store_from_url(url, settings), until=settings.max_age)


def _select(settings: Settings, interval: float) -> SessionStore:
    """The store the settings select, detected unless SESSION_STORE forces one."""
    forced = settings.store
    if forced == "memory":
        from .stores.memory import MemoryStore

        return MemoryStore()
    if forced == "sqlite":
        return sqlite_from(settings, interval)
    if forced == "redis":
        return redis_from(settings)
    if forced == "postgres":
        store = postgres_from(settings, interval)
        store.setup()
        return store

    if settings.format == "express" and settings.redis_url and settings.database_url:
        raise ConfigError(
            "SESSION_FORMAT=express shares sessions with a Node.js application, which reads one store: "
            "set SESSION_STORE=redis or SESSION_STORE=postgres to match its store"
        )
    redis_store, redis_up, redis_failure = None, False, "REDIS_URL is not set"
    if settings.redis_url:
        redis_store = redis_from(settings)
        try:
            _ping_with_retries(redis_store)
            redis_up = True
            log.info("Using Redis for session storage")
        except StoreError as exc:
            redis_failure = f"Redis at {mask_url(settings.redis_url)} did not answer: {str(exc).rstrip('. ')}"
            if settings.database_url:
                log.warning("Redis unavailable, falling back to PostgreSQL (%s)", redis_failure)
        if not settings.database_url:
            if redis_up:
                return redis_store
            raise NoStoreError(f"Cannot start: {redis_failure}; DATABASE_URL is not set for a fallback")
    elif settings.database_url:
        log.info("No REDIS_URL provided, using PostgreSQL for sessions")

    if not settings.database_url:
        return sqlite_from(settings, interval)
    postgres = postgres_from(settings, interval)
    try:
        postgres.setup()
        postgres_up = True
    except StoreError as exc:
        if not redis_up:
            raise NoStoreError(
                f"Cannot start: no session store is reachable. {redis_failure}; "
                f"PostgreSQL at {mask_url(settings.database_url)} failed: {exc}"
            ) from None
        postgres_up = False
        log.warning("PostgreSQL unavailable, keeping sessions in Redis until it is back (%s)", exc)
    if redis_store is None or not redis_up:
        log.info("Using PostgreSQL for session storage")
    if redis_store is None:
        return postgres
    log.info("Keeping a durable copy of every session in PostgreSQL (SESSION_STORE=redis turns it off)")
    from .stores.failover import FailoverStore

    return FailoverStore(
        redis_store,
        postgres,
        probe_interval=settings.probe_interval,
        latency_budget=settings.latency_budget,
        cache_up=redis_up,
        durable_up=postgres_up,
        host=f"{settings.redis_url}|{settings.redis_prefix}|{settings.database_url}|{settings.table}",
    )


def _ping_with_retries(store: SessionStore) -> None:
    for attempt in range(REDIS_RETRIES + 1):
        try:
            store.ping()
            return
        except StoreError:
            if attempt == REDIS_RETRIES:
                raise
            time.sleep(min((attempt + 1) * 200, 1000) / 1000)
