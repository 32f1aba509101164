"""The ``wsgisession`` command: check the store the environment selects, clean it up, create its table,
list and end a user's sessions, move every session to another store, re-encrypt stored values.

Usage: ``python -m wsgisession {check,cleanup,init-db [--sql],sessions [--json] USER_ID,revoke USER_ID,
migrate --from URL --to URL [--dry-run],reencrypt}``.
Settings come from the same environment variables as the middleware. Exit status: 0 on success, 2 for a
configuration error (or a store that cannot list a user's sessions), 1 when the store fails (or none answers).
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from typing import TYPE_CHECKING, TextIO

from .builders import cipher_from, postgres_store, store_from_url
from .core import SessionCore
from .detection import NoStoreError, create_session_store
from .settings import ConfigError, Settings, mask_url
from .stores.base import Record, SessionStore, StoreError

if TYPE_CHECKING:
    from .stores.sql import SQLStore
    from .users import Device

PINGS = 5
AGENT_WIDTH = 40  # a user agent is cut to this in the table (--json gives it whole)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return the exit status; errors become one line on stderr."""
    args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.run
    try:
        return command(args)
    except (StoreError, NoStoreError) as exc:
        return _fail(exc, 1)
    except (ConfigError, NotImplementedError) as exc:
        return _fail(exc, 2)


def _parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands."""
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
    sessions = commands.add_parser("sessions", help="list a user's live sessions")
    sessions.add_argument("user_id", metavar="USER_ID", help="the id the application logged the user in with")
    sessions.add_argument("--json", action="store_true", help="print them as JSON (Unix times, the whole user agent)")
    sessions.set_defaults(run=sessions_command)
    revoke = commands.add_parser("revoke", help="end every session of a user, printing how many")
    revoke.add_argument("user_id", metavar="USER_ID", help="the id the application logged the user in with")
    revoke.set_defaults(run=revoke_command)
    migrate = commands.add_parser("migrate", help="move every live session to another store, as the application "
                                  "serves; run it again to go on after an interruption")  # fmt: skip
    migrate.add_argument("--from", dest="source", required=True, metavar="URL", help="the store sessions leave")
    migrate.add_argument("--to", dest="target", required=True, metavar="URL", help="the store they move to")
    migrate.add_argument("--dry-run", action="store_true", help="only count the live sessions that would move")
    migrate.set_defaults(run=migrate_command)
    reencrypt = commands.add_parser("reencrypt", help="rewrite the stored values under the first key of "
                                    "SESSION_ENCRYPTION_KEY (in the clear after none), as the app serves")  # fmt: skip
    reencrypt.set_defaults(run=reencrypt_command)
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


def sessions_command(args: argparse.Namespace) -> int:
    """Print a table of the user's live sessions, most recently seen first (``--json``: a JSON list,
    with the store's selection lines on stderr so that stdout is the JSON alone)."""
    settings = load_settings()
    with open_store(settings, sys.stderr if args.json else sys.stdout) as store:
        devices = SessionCore(settings, store).users.list(args.user_id)
    if args.json:
        fields = ("handle", "login", "seen", "expires", "agent", "ip")
        print(json.dumps([{field: getattr(device, field) for field in fields} for device in devices], indent=2))
    elif devices:
        _print_table(devices)
    else:
        print(f"No live sessions of user {args.user_id}")
    return 0


def revoke_command(args: argparse.Namespace) -> int:
    """End every session of the user; the next request of each is logged out."""
    settings = load_settings()
    with open_store(settings) as store:
        ended = SessionCore(settings, store).users.end_all(args.user_id)
    print(f"Ended {ended} session{'' if ended == 1 else 's'} of user {args.user_id}")
    return 0


def migrate_command(args: argparse.Namespace) -> int:
    """Move every live session from one store to the other, batch by batch (progress on stderr when it is
    a terminal); a session the target holds already stays as it is there. Ctrl-C stops after the batch."""
    from .stores.migrating import move

    if args.source == args.target:
        raise ConfigError("--from and --to name the same store")
    settings = load_settings()
    with closing(store_from_url(args.source, settings)) as source:
        if args.dry_run:
            print(f"{source.count()} live sessions in {mask_url(args.source)} would move to {mask_url(args.target)}")
            return 0
        with closing(store_from_url(args.target, settings)) as target:
            target.setup()
            progress, stopped = _each_batch("Moved", source, lambda batch: move(source, target, batch))
    print(progress.summary(f"from {mask_url(args.source)} to {mask_url(args.target)}"),
          f"{progress.done:,} copied, {progress.seen - progress.done:,} already there", sep=": ")  # fmt: skip
    return _interrupted("move the rest") if stopped else 0


def reencrypt_command(args: argparse.Namespace) -> int:
    """Rewrite the stored values the first key of SESSION_ENCRYPTION_KEY did not seal (or, after ``none``,
    that are sealed), session by session, without undoing a request's write. Ctrl-C stops after the batch."""
    from .stores.encrypted import Rewrite, reencrypt

    settings = load_settings()
    if not settings.encryption_keys:
        raise ConfigError("SESSION_ENCRYPTION_KEY is not set: set the keys to rewrite under (to turn encryption "
                          "off, set it to none,KEY first)")  # fmt: skip
    cipher = cipher_from(settings)
    total = Rewrite()

    def rewrite(batch: list[tuple[str, Record]]) -> int:
        nonlocal total
        done = reencrypt(store, cipher, batch)
        total = Rewrite(*(a + b for a, b in zip(total, done, strict=True)))
        return done.rewritten

    with open_store(settings) as store:
        progress, stopped = _each_batch("Checked", store, rewrite)
    print(progress.summary(), f"{total.rewritten:,} rewritten, {total.unreadable:,} values no key opens, "
          f"{total.busy:,} sessions busy (run again)", sep=": ")  # fmt: skip
    return _interrupted("check the rest") if stopped else 0


# -- helpers -----------------------------------------------------------------------------


def load_settings() -> Settings:
    """The settings from the environment, without requiring SESSION_SECRET.

    ``cleanup`` and ``init-db`` sign nothing, but Settings.load insists on a valid secret: give
    it a throwaway random one so that a host without SESSION_SECRET can still run them.
    """
    return Settings.load(secret=secrets.token_urlsafe(36))


@contextmanager
def open_store(settings: Settings, out: TextIO | None = None) -> Iterator[SessionStore]:
    """Select the store as the middleware would (printing the selection's log lines to ``out``, stdout by
    default), without a cleanup thread."""
    out = out or sys.stdout
    with _print_logs(out):
        store = create_session_store(settings, cleanup_interval=0)
    if settings.store:
        print(f"Selected by SESSION_STORE={settings.store}", file=out)
    try:
        yield store
    finally:
        store.close()


@contextmanager
def _print_logs(out: TextIO) -> Iterator[None]:
    """Print the "wsgisession" logger's INFO and WARNING lines to ``out`` while selecting the store."""
    logger = logging.getLogger("wsgisession")
    handler = logging.StreamHandler(out)
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
    if name == "MigratingStore":
        new = store.new  # type: ignore[attr-defined]
        return f"{describe(new, settings)}, moving the sessions it misses from {mask_url(settings.migrate_from or '')}"
    if name == "FailoverStore":
        cache, durable = store.cache, store.durable  # type: ignore[attr-defined]
        return f"{name}: {describe(cache, settings)}, with a copy of every session in {describe(durable, settings)}"
    if "RedisStore" in kinds and settings.redis_url:
        return f"{name} at {mask_url(settings.redis_url)} (key prefix {settings.redis_prefix!r})"
    if "PostgresStore" in kinds and settings.database_url:
        driver = store.driver.name  # type: ignore[attr-defined]
        return f"{name} at {mask_url(settings.database_url)} (table {settings.table}, driver {driver})"
    if "SQLiteStore" in kinds:
        return f"{name} at {getattr(store, 'path', '?')} (table {settings.table})"
    if name == "MemoryStore":
        return f"{name} (this process only)"
    return name


def _print_table(devices: Sequence[Device]) -> None:
    """The devices as aligned columns, times in UTC."""
    rows = [("HANDLE", "LOGIN (UTC)", "LAST SEEN (UTC)", "EXPIRES (UTC)", "AGENT", "IP")]
    rows += [(device.handle, _utc(device.login), _utc(device.seen), _utc(device.expires), _cut(device.agent),
              device.ip or "-") for device in devices]  # fmt: skip
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _utc(seconds: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def _cut(agent: str) -> str:
    """A user agent short enough for a table row; "-" for none kept."""
    if not agent:
        return "-"
    return agent if len(agent) <= AGENT_WIDTH else agent[: AGENT_WIDTH - 3] + "..."


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


class _Progress:
    """What a pass over every session did so far, and a line that says it on stderr when it is a
    terminal, redrawn at most twice a second."""

    def __init__(self, verb: str, total: int) -> None:
        self.verb, self.total = verb, total
        self.out = sys.stderr if sys.stderr.isatty() else None
        self.seen = self.done = 0
        self.start = self._shown = time.monotonic()

    def add(self, seen: int, done: int) -> None:
        self.seen += seen
        self.done += done
        if self.out is not None and time.monotonic() - self._shown >= 0.5:
            self._shown = time.monotonic()
            rate = self.seen / max(self._shown - self.start, 1e-9)
            left = max(self.total - self.seen, 0) / rate if rate else 0
            print(f"\r{self.verb} {self.seen:,} of ~{self.total:,} sessions ({rate:,.0f}/s, {left:,.0f} s left)   ",
                  end="", file=self.out, flush=True)  # fmt: skip

    def summary(self, where: str = "") -> str:
        if self.out is not None:
            print(file=self.out)
        took = time.monotonic() - self.start
        where = f"{where} " if where else ""
        return f"{self.verb} {self.seen:,} sessions {where}in {took:.1f} s ({self.seen / took:,.0f}/s)"


def _each_batch(
    verb: str, store: SessionStore, step: Callable[[list[tuple[str, Record]]], int]
) -> tuple[_Progress, bool]:
    """Run ``step`` on each batch of the store's live sessions (it returns how many it changed), showing the
    progress; Ctrl-C stops after the batch. Returns the progress and whether it was interrupted."""
    progress = _Progress(verb, store.count())
    with _stop_on_interrupt() as stopped:
        for batch in store.scan():
            progress.add(len(batch), step(batch))
            if stopped.is_set():
                break
    return progress, stopped.is_set()


def _interrupted(what: str) -> int:
    print(f"Interrupted: run the same command again to {what}", file=sys.stderr)
    return 130


@contextmanager
def _stop_on_interrupt() -> Iterator[threading.Event]:
    """An event that Ctrl-C (SIGINT) sets instead of raising KeyboardInterrupt, while the block runs."""
    stopped = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stopped.set())
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGINT, previous)


def _fail(exc: Exception, status: int) -> int:
    """Print the error as one line on stderr and return ``status``."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"wsgisession: error: {message}", file=sys.stderr)
    return status


__all__ = ["main"]
