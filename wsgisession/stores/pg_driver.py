"""The PostgreSQL drivers a store can run on: psycopg 3 or psycopg2, whichever the application installed.

A :class:`Driver` is what :class:`~.postgres.PostgresStore` needs of one: connections (autocommit, JSON
read back as text), a per-process pool, its prepared statements, and a pipeline for statements that
need not wait for each other's answers. The SQL itself is the same on both.
"""

from __future__ import annotations

import contextlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator
from typing import Any

from .pool import Connections

#: The drivers by name, each with the extra that installs it.
EXTRAS = {"psycopg": "psycopg", "psycopg2": "postgres"}


class DriverMissing(ImportError):
    """The driver asked for (or any, when none was) is not installed."""


class Driver(ABC):
    """One store's use of a driver: ``statements`` are the texts it runs as prepared statements."""

    name: str
    #: what the driver raises when the server cannot answer or refuses a statement
    errors: tuple[type[Exception], ...]
    #: what it raises for a value the server cannot take (jsonb refusing a NUL, say)
    data_error: type[Exception]

    def __init__(self, dsn: str, timeout: float, statements: Collection[str]) -> None:
        self.dsn = dsn
        self.timeout = timeout
        self.statements = frozenset(statements)

    @staticmethod
    @abstractmethod
    def parse(dsn: str) -> dict[str, Any]:
        """The parts of a connection string or URL, as libpq reads them (raising one of :attr:`errors`)."""

    @classmethod
    def check(cls, dsn: str) -> None:
        """Raise ValueError when ``dsn`` is not a connection string or URL (the message never quotes it)."""
        try:
            cls.parse(dsn)
        except cls.errors:  # its message quotes the URL, password and all
            raise ValueError("not a PostgreSQL connection string") from None

    @abstractmethod
    def connect(self) -> Any:
        """One new connection, in autocommit mode, that reads json and jsonb back as text."""

    @abstractmethod
    def pool(self, size: int) -> Connections:
        """This process's pool of at most ``size`` connections, opened lazily."""

    @abstractmethod
    def execute(self, cur: Any, sql: str, params: tuple[Any, ...]) -> None:
        """Run ``sql``: as a prepared statement when it is one of :attr:`statements`."""

    def cursor(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        """A cursor on ``conn`` for one operation (by default a new one, closed after)."""
        return contextlib.closing(conn.cursor())

    @contextlib.contextmanager
    def batch(self, cur: Any) -> Iterator[None]:
        """Send the statements run inside in as few round trips as their reads allow (no change by default)."""
        yield


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def default_driver() -> str:
    """psycopg 3 when it and its pool are installed, else psycopg2."""
    return "psycopg" if installed("psycopg") and installed("psycopg_pool") else "psycopg2"


def driver_class(name: str | None) -> type[Driver]:
    """The driver ``name`` (None: :func:`default_driver`); :class:`DriverMissing` when it is not installed."""
    name = name or default_driver()
    if name not in EXTRAS:
        raise ValueError(f"unknown PostgreSQL driver {name!r}: psycopg (psycopg 3) or psycopg2")
    try:
        if name == "psycopg":
            from .psycopg_driver import Psycopg

            return Psycopg
        from .psycopg2_driver import Psycopg2

        return Psycopg2
    except ImportError as exc:
        raise DriverMissing(
            f"the PostgreSQL driver {name} is not installed ({exc}): pip install 'wsgisession[{EXTRAS[name]}]'"
        ) from exc
