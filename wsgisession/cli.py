"""The ``wsgisession`` command: check the store the environment selects, clean it up, create its table.

Usage: ``python -m wsgisession {check,cleanup,init-db [--sql]}``. Settings come from the same
environment variables as the middleware. Exit status: 0 on success, 2 for a configuration
error, 1 when the store fails (or none answers).
"""

from __future__ import annotations

import argparse
import logging
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .builders import postgres_store
from .detection import NoStoreError, create_session_store
from .settings import ConfigError, Settings, mask_url
from .stores.base import SessionStore, StoreError

if TYPE_CHECKING:
    from .stores.sql import SQLStore

PINGS = 5


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return the exit status; errors become one line on stderr."""
    args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.run
    try:
        return command(args)
    except (StoreError, NoStoreError) as exc:
        return _fail(exc, 1)
    except ConfigError as exc:
        return _fail(exc, 2)


def _parser() -> argparse.ArgumentParser:
    """The argument parser with its three subcommands."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="wsgisession", description="Manage the wsgisession session store.")
    parser.add_argument("--version", action="version", version=f"wsgisession {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser("check", help="show which store the environment selects, and its round-trip time")
    check.set_defaults(run=check_command)
    cleanup = commands.add_parser("cleanup", help="delete expired sessions now (SQL stores)")
    cleanup.set_defaults(run=cleanup_command)
    init_db = commands.add_parser("init-db", help="create the session table of the selected SQL store")
    init_db.add_argument("--sql", action="store_true", help="print the CREATE statements instead of running them")
    init_db.set_defaults(run=init_db_command)
    return parser


# -- commands ----------------------------------------------------------------------------


def check_command(args: argparse.Namespace) -> int:
    """Check every setting as the application would (SESSION_SECRET included); print the selected
    store, why it was selected, and the median time of a few pings."""
    settings = Settings.load()
    with open_store(settings) as store:
        print(f"Store: {describe(store, settings)}")
        timings = []
        for _ in range(PINGS):
            start = time.perf_counter()
            store.ping()
            timings.append((time.perf_counter() - start) * 1000)
        print(f"Round trip: {statistics.median(timings):.2f} ms (median of {PINGS} pings)")
    return 0


def cleanup_command(args: argparse.Namespace) -> int:
    """Run one cleanup pass now and print how many expired sessions it removed."""
    with open_store(load_settings()) as store:
        removed = store.cleanup()
        print(f"Removed {removed} expired sessions")
        if _sql_store(store) is None:
            print(f"({type(store).__name__} expires sessions by itself: there is nothing to clean up)")
    return 0


def init_db_command(args: argparse.Namespace) -> int:
    """Create the selected SQL store's table, or print its CREATE statements with ``--sql``."""
    settings = load_settings()
    if args.sql:
        return _print_schema(settings)
    with open_store(settings) as store:
        sql_store = _sql_store(store)
        if sql_store is None:
            print(f"Nothing to create: {type(store).__name__} needs no table")
            return 0
        sql_store.setup()
        print(f"Table {sql_store.table} is ready: {describe(store, settings)}")
    return 0


# -- helpers -----------------------------------------------------------------------------


def load_settings() -> Settings:
    """The settings from the environment, without requiring SESSION_SECRET.

    ``cleanup`` and ``init-db`` sign nothing, but Settings.load insists on a valid secret: give
    it a throwaway random one so that a host without SESSION_SECRET can still run them.
    """
    return Settings.load(secret=secrets.token_urlsafe(36))


@contextmanager
def open_store(settings: Settings) -> Iterator[SessionStore]:
    """Select the store as the middleware would (printing the selection's log lines), without a cleanup thread."""
    with _print_logs():
        store = create_session_store(settings, cleanup_interval=0)
    if settings.store:
        print(f"Selected by SESSION_STORE={settings.store}")
    try:
        yield store
    finally:
        store.close()


@contextmanager
def _print_logs() -> Iterator[None]:
    """Print the "wsgisession" logger's INFO and WARNING lines to stdout while selecting the store."""
    logger = logging.getLogger("wsgisession")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Formatter())
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


class _Formatter(logging.Formatter):
    """The message alone, prefixed by its level when it is a warning or worse."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return f"{record.levelname}: {message}" if record.levelno >= logging.WARNING else message


def describe(store: SessionStore, settings: Settings) -> str:
    """The store's class and where it keeps sessions, with any password masked."""
    name = type(store).__name__
    kinds = {kind.__name__ for kind in type(store).__mro__}  # ConnectPgStore is a PostgresStore, and so on
    if name == "FailoverStore":
        cache, durable = store.cache, store.durable  # type: ignore[attr-defined]
        return f"{name}: {describe(cache, settings)}, with a copy of every session in {describe(durable, settings)}"
    if "RedisStore" in kinds and settings.redis_url:
        return f"{name} at {mask_url(settings.redis_url)} (key prefix {settings.redis_prefix!r})"
    if "PostgresStore" in kinds and settings.database_url:
        return f"{name} at {mask_url(settings.database_url)} (table {settings.table})"
    if "SQLiteStore" in kinds:
        return f"{name} at {getattr(store, 'path', '?')} (table {settings.table})"
    if name == "MemoryStore":
        return f"{name} (this process only)"
    return name


def _sql_store(store: SessionStore) -> SQLStore | None:
    """The store as a SQL store, or None when it keeps sessions elsewhere."""
    from .stores.sql import SQLStore

    return store if isinstance(store, SQLStore) else None


def _print_schema(settings: Settings) -> int:
    """Print the CREATE statements of the SQL store the settings would select, without connecting."""
    kind = _sql_kind(settings)
    if kind is None:
        print("-- Nothing to create: the selected store (Redis or memory) needs no table")
        return 0
    if kind == "postgres":
        # create_table=False: no connection; the statements depend only on the table and the format.
        store: SQLStore = postgres_store(settings, settings.database_url or "", create_table=False)
    else:
        from .stores.sqlite import SQLiteStore

        store = SQLiteStore(":memory:", table=settings.table, cleanup_interval=0)  # no file is touched
    try:
        for statement in store.schema():
            print(f"{statement};")
    finally:
        store.close()
    return 0


def _sql_kind(settings: Settings) -> str | None:
    """The SQL store create_session_store would use (or fall back to), or None when there is none."""
    if settings.store:
        return settings.store if settings.store in ("postgres", "sqlite") else None
    if settings.database_url:
        return "postgres"
    return None if settings.redis_url else "sqlite"


def _fail(exc: Exception, status: int) -> int:
    """Print the error as one line on stderr and return ``status``."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"wsgisession: error: {message}", file=sys.stderr)
    return status


__all__ = ["main"]
