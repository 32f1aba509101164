"""psycopg 3: psycopg_pool for the pool, psycopg's own prepared statements, and its pipeline mode."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.conninfo
import psycopg.errors
import psycopg_pool
from psycopg.types.string import TextLoader

from .base import log
from .pg_driver import Driver
from .pool import Connections, inherited

try:  # psycopg's cache of prepared statements: private, so checked for before use
    from psycopg._preparing import Prepare, PrepareManager

    _KNOWN_CACHE = True
except ImportError:  # pragma: no cover - a psycopg that moved it: statements are not prepared
    PrepareManager = object  # type: ignore[assignment,misc]
    _KNOWN_CACHE = False


class Psycopg(Driver):
    """psycopg 3: the statements a request runs are prepared by psycopg on first use on each connection."""

    name = "psycopg"
    errors = (psycopg.Error,)
    data_error = psycopg.DataError

    @staticmethod
    def parse(dsn: str) -> dict[str, Any]:
        return dict(psycopg.conninfo.conninfo_to_dict(dsn))

    def connect(self) -> Any:
        conn = _Connection.connect(self.dsn, **self._options())
        self._configure(conn)
        return conn

    def pool(self, size: int) -> Connections:
        # reconnect_timeout=0: a connection lost is replaced when a request needs one, not by a
        # background task retrying with back-off while the server is down (and for seconds after).
        pool = psycopg_pool.ConnectionPool(
            self.dsn, min_size=1, max_size=size, timeout=self.timeout, reconnect_timeout=0, open=False,
            connection_class=_Connection, kwargs=self._options(), configure=self._configure, name="wsgisession",
        )  # fmt: skip
        pool.open(wait=False)
        return _Pool(pool)

    def _options(self) -> dict[str, Any]:
        return {"autocommit": True, "connect_timeout": max(1, round(self.timeout)), "application_name": "wsgisession"}

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        # JSON columns come back as text, decoded by the store, which copes with malformed records.
        conn.adapters.register_loader("json", TextLoader)
        conn.adapters.register_loader("jsonb", TextLoader)
        if self.statements and not _names_by_text(conn):
            log.info("PostgreSQL: this psycopg's prepared statements are not known to wsgisession; none are prepared")
            self.statements = frozenset()

    def execute(self, cur: Any, sql: str, params: tuple[Any, ...]) -> None:
        """Run ``sql``, prepared if it is one of :attr:`~.Driver.statements`.

        Behind a pooler that hands each transaction to any server connection (PgBouncer older
        than 1.21 in transaction mode), a statement is not prepared where the next call runs: the
        first sign of that makes this driver run its statements unprepared from then on. A statement
        that ALTER TABLE outdated is deallocated and prepared anew.
        """
        if sql not in self.statements:
            cur.execute(sql, params, prepare=False)
            return
        prepared = cur.connection.prepared
        try:
            if sql in prepared:
                cur.execute(sql, params, prepare=True)
            else:
                with cur.connection.pipeline():  # psycopg would prepare in a round trip of its own
                    cur.execute(sql, params, prepare=True)
                prepared.add(sql)
        except (psycopg.errors.InvalidSqlStatementName, psycopg.errors.DuplicatePreparedStatement) as exc:
            if self.statements:
                self.statements = frozenset()
                log.info("PostgreSQL: statements are no longer prepared (%s)", str(exc).strip())
            cur.execute(sql, params, prepare=False)
        except psycopg.errors.FeatureNotSupported:  # "cached plan must not change result type"
            prepared.clear()
            cur.execute("DEALLOCATE ALL")  # psycopg forgets its names too
            self.execute(cur, sql, params)

    def cursor(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        """The connection's one cursor, kept open: a new cursor's adapters start cold (about 10 µs more
        CPU for its first statement)."""
        if conn.kept is None:
            conn.kept = conn.cursor()
        return contextlib.nullcontext(conn.kept)

    @contextlib.contextmanager
    def batch(self, cur: Any) -> Iterator[None]:
        with cur.connection.pipeline():
            yield


class _Connection(psycopg.Connection[Any]):
    """A psycopg connection that keeps one cursor, and the statements prepared on it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kept: psycopg.Cursor[Any] | None = None
        self.prepared: set[str] = set()


class _NamedByText(PrepareManager):
    """psycopg's cache of prepared statements, preparing only what is asked to be and naming each
    after its text and parameter types (psycopg numbers them, ``_pg3_0``, ``_pg3_1``, in each
    connection's order): the same name means the same statement on every connection, so behind
    a pooler that shares server connections a statement never runs another's parameters."""

    def get(self, query: Any, prepare: bool | None = None) -> tuple[Any, bytes]:
        if not prepare:
            return Prepare.NO, b""
        decision, name = super().get(query, prepare)
        if decision is Prepare.SHOULD:
            digest = hashlib.sha256(query.query + repr(query.types).encode()).hexdigest()[:20]
            name = f"wsgisession_{digest}".encode()
        return decision, name


def _names_by_text(conn: psycopg.Connection[Any]) -> bool:
    """Give ``conn`` the cache of prepared statements of :class:`_NamedByText`; False (nothing done) if
    this psycopg's own cache is not the one it extends."""
    if not (_KNOWN_CACHE and isinstance(getattr(conn, "_prepared", None), PrepareManager)):
        return False
    conn._prepared = _NamedByText()
    return True


class _Pool:
    """psycopg_pool's pool, as the SQL stores use a pool (:class:`~.pool.Connections`)."""

    def __init__(self, pool: psycopg_pool.ConnectionPool[Any]) -> None:
        self.pool = pool

    def acquire(self) -> Any:
        return self.pool.getconn()

    def release(self, conn: Any) -> None:
        self.pool.putconn(conn)

    def discard(self, conn: Any) -> None:
        with contextlib.suppress(psycopg.Error):
            conn.close()
        self.pool.putconn(conn)  # closed: the pool replaces it

    def close_idle(self) -> None:
        self.pool.drain()

    def close(self) -> None:
        self.pool.close()

    def forget(self) -> None:
        # The parent's connections and threads: kept from the garbage collector, whose finalizer
        # would end the parent's connections (a closed libpq connection sends Terminate).
        inherited.append(self.pool)
