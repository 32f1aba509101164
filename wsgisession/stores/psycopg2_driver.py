"""psycopg2: the hand-written pool, and statements prepared with SQL's PREPARE and EXECUTE."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Collection
from typing import Any, NamedTuple

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras

from .base import log
from .pg_driver import Driver
from .pool import Connections, Pool


class Psycopg2(Driver):
    """psycopg2, whose statements this driver prepares itself, once per connection."""

    name = "psycopg2"
    errors = (psycopg2.Error,)
    data_error = psycopg2.DataError

    def __init__(self, dsn: str, timeout: float, statements: Collection[str]) -> None:
        super().__init__(dsn, timeout, statements)
        self._prepared = {sql: _prepared(sql) for sql in self.statements}

    @staticmethod
    def parse(dsn: str) -> dict[str, Any]:
        return dict(psycopg2.extensions.parse_dsn(dsn))

    def connect(self) -> Any:
        conn = psycopg2.connect(
            self.dsn,
            connect_timeout=max(1, round(self.timeout)),
            application_name="wsgisession",
            connection_factory=_Connection,
        )
        conn.autocommit = True
        # JSON columns come back as text, decoded by the store, which copes with malformed records.
        psycopg2.extras.register_default_json(conn, loads=_text)
        psycopg2.extras.register_default_jsonb(conn, loads=_text)
        return conn

    def pool(self, size: int) -> Connections:
        return Pool(self.connect, size, self.timeout)

    def execute(self, cur: Any, sql: str, params: tuple[Any, ...]) -> None:
        """Run ``sql`` as the statement prepared on this connection (prepared in the same round
        trip on first use).

        Behind a pooler that hands each transaction to any server connection (PgBouncer in
        transaction mode), a statement is not prepared where the next call runs: the first
        sign of that makes this driver run its statements unprepared from then on. A statement
        that ALTER TABLE outdated is prepared anew on that connection.
        """
        statement = self._prepared.get(sql)
        if statement is None:
            cur.execute(sql, params)
            return
        known = cur.connection.prepared
        try:
            if statement.name in known:
                cur.execute(statement.execute, params)
                return
            try:
                cur.execute(f"{statement.prepare}; {statement.execute}", params)
            except psycopg2.errors.DuplicatePreparedStatement:  # by a call whose EXECUTE failed
                known.add(statement.name)
                cur.execute(statement.execute, params)
            known.add(statement.name)
        except psycopg2.errors.InvalidSqlStatementName as exc:
            if self._prepared:
                self._prepared = {}
                log.info("PostgreSQL: statements are no longer prepared (%s)", str(exc).strip())
            cur.execute(sql, params)
        except psycopg2.errors.FeatureNotSupported:  # "cached plan must not change result type"
            known.discard(statement.name)
            with contextlib.suppress(psycopg2.errors.InvalidSqlStatementName):
                cur.execute(f"DEALLOCATE {statement.name}")
            cur.execute(sql, params)


def _text(value: str) -> str:
    return value


class _Connection(psycopg2.extensions.connection):  # type: ignore[misc]
    """A psycopg2 connection that remembers the names of the statements prepared on it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prepared: set[str] = set()


class _Prepared(NamedTuple):
    """A statement as this driver prepares it: its name, its PREPARE and its EXECUTE."""

    name: str
    prepare: str
    execute: str


def _prepared(sql: str) -> _Prepared:
    """``PREPARE`` and ``EXECUTE`` for ``sql`` (``%s`` parameters), named after its text: two
    different statements never share a name, even on a server connection a pooler shares."""
    name = "wsgisession_" + hashlib.sha256(sql.encode()).hexdigest()[:20]
    first, *rest = sql.split("%s")
    body = first + "".join(f"${number}{part}" for number, part in enumerate(rest, 1))
    return _Prepared(name, f"PREPARE {name} AS {body}", f"EXECUTE {name} ({', '.join(['%s'] * len(rest))})")
