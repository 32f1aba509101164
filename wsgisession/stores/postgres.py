"""Sessions in PostgreSQL over psycopg 3 or psycopg2: plain SQL, a per-process pool, one statement per write."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from .base import USER_KEY, Changes, Copy, json_object, now
from .pg_driver import driver_class
from .pool import Connections
from .sql import SQLStore


class PostgresStore(SQLStore):
    """Sessions in a PostgreSQL table ``(id text, data jsonb, expires_at timestamptz)``."""

    name = "PostgreSQL"

    param = "%s"
    data_type = "JSONB"
    time_type = "TIMESTAMPTZ"
    mark_type = "BIGSERIAL"
    nulls_last = " NULLS LAST"
    rewrite_lock = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(
        self,
        dsn: str,
        *,
        table: str = "wsgisession",
        cleanup_interval: float = 120,
        pool_size: int = 8,
        timeout: float = 3.0,
        create_table: bool = True,
        prepare: bool = True,
        driver: str | None = None,
    ) -> None:
        """``prepare=False``: never prepare statements (for a pooler that pins the connection of a
        client that does, such as RDS Proxy). ``driver``: ``"psycopg"`` (psycopg 3) or ``"psycopg2"``;
        by default psycopg 3 when it is installed (see :mod:`.pg_driver`)."""
        self.dsn = dsn
        super().__init__(table, cleanup_interval, pool_size, timeout)
        self._lock_id = int.from_bytes(hashlib.sha256(f"wsgisession:{table}".encode()).digest()[:8], "big", signed=True)
        self._sql_merge = self._merge_sql()
        self._sql_add_many = self._copy_sql(self._upsert(self._copied_rows()))
        # ANY(ARRAY(...)): the keys are found first, then deleted through the primary key. With IN (...),
        # PostgreSQL may join the subquery to a scan of the whole table instead: it cannot estimate how
        # many sessions one user has (a partial index's expression has no statistics).
        i = self.columns[0]
        self._sql_trim_user = f"DELETE FROM {self.table} WHERE {i} = ANY(ARRAY({self._sql_beyond})) RETURNING {i}"
        self._sql_delete_many = f"DELETE FROM {self.table} WHERE {i} = ANY(%s::text[])"
        # The statements each request runs, prepared once per connection: the server then
        # parses and plans them once, not on every call (about a fifth of a read's time); the adds
        # that copy sessions in, which a migration repeats; and the deletion of a list of sessions.
        statements = (self._sql_load, self._sql_create, self._sql_touch, self._sql_delete, self._sql_merge,
                      self._sql_add, self._sql_add_many, self._sql_delete_many)  # fmt: skip
        self.driver = driver_class(driver)(dsn, timeout, statements if prepare else ())
        self.errors = self.driver.errors
        if create_table:
            self.setup()

    @staticmethod
    def timestamp(param: str) -> str:
        return f"to_timestamp({param})"

    @staticmethod
    def epoch(column: str) -> str:
        return f"date_part('epoch', {column})"

    def binding(self, column: str) -> str:
        return f"({column} -> '{USER_KEY}')"

    def bound_id(self, column: str) -> str:
        return f"({self.binding(column)} ->> 'id')"

    def binding_field(self, column: str, field: str) -> str:
        return f"({self.binding(column)} -> '{field}')"  # jsonb: numbers compare as numbers

    def _create_statements(self) -> list[str]:
        # Concurrent CREATE TABLE IF NOT EXISTS can collide; a transaction lock serialises them.
        return ["BEGIN", f"SELECT pg_advisory_xact_lock({self._lock_id})", *self.schema(), "COMMIT"]

    def _connect(self) -> Any:
        return self.driver.connect()

    def _new_pool(self) -> Connections:
        return self.driver.pool(self._pool_size)

    def _cursor_on(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        return self.driver.cursor(conn)

    def _batch(self, cur: Any) -> contextlib.AbstractContextManager[None]:
        return self.driver.batch(cur)

    def add_many(self, sessions: Sequence[Copy]) -> int:
        """One statement for the batch, its values in one array per column (so its text, prepared, is the
        same whatever the batch): its rowcount counts the rows inserted or replaced, the copies stored."""
        if not sessions:
            return 0
        columns = zip(*(self._create_params(*session) for session in _distinct(sessions)), strict=True)
        with self._cursor() as cur:
            self._execute(cur, self._sql_add_many, (*map(list, columns), now()))
            return int(cur.rowcount)

    def _copied_rows(self) -> str:
        """add_many's rows: a SELECT from one array for each of :meth:`_create_params`' values."""
        return "SELECT k, d::jsonb, to_timestamp(e) FROM unnest(%s::text[], %s::text[], %s::float8[]) AS rows(k, d, e)"

    def trim_user(self, user: str, limit: int, keep: str | None = None) -> list[str]:
        """One statement: DELETE ... RETURNING."""
        with self._cursor() as cur:
            cur.execute(self._sql_trim_user, (user, now(), keep, limit))
            return [key for (key,) in cur.fetchall()]

    def _delete_keys(self, cur: Any, keys: list[str]) -> None:
        """One DELETE, however many the keys: they go as one array (and the statement is prepared)."""
        self._execute(cur, self._sql_delete_many, (keys,))

    def _merge_sql(self) -> str:
        """One statement that merges per-key changes into a live row (jsonb operators)."""
        return (
            f"UPDATE {self.table} SET data = (data - %s::text[]) || %s::jsonb, expires_at = to_timestamp(%s) "
            "WHERE id = %s AND expires_at > to_timestamp(%s)"
        )

    def _merge_params(self, key: str, changes: Changes, expires: float) -> tuple[Any, ...]:
        return (list(changes.deleted), json_object(changes.set), expires, key, now())

    def _merge(self, cur: Any, key: str, changes: Changes, expires: float) -> bool:
        self._execute(cur, self._sql_merge, self._merge_params(key, changes, expires))
        return bool(cur.rowcount)

    def _execute(self, cur: Any, sql: str, params: tuple[Any, ...]) -> None:
        self.driver.execute(cur, sql, params)


def _distinct(sessions: Sequence[Copy]) -> Iterable[Copy]:
    """The first session of each key (adding the next would find it live): one upsert may change a row
    once only, and a Redis SCAN may give a key twice."""
    first: dict[str, Copy] = {}
    for session in sessions:
        first.setdefault(session[0], session)
    return first.values()
