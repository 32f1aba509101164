"""Sessions in PostgreSQL over psycopg2: plain SQL, a per-process pool, one statement per write."""

from __future__ import annotations

import hashlib
from typing import Any

import psycopg2
import psycopg2.extras

from .base import Changes, json_object, now
from .sql import SQLStore


class PostgresStore(SQLStore):
    """Sessions in a PostgreSQL table ``(id text, data jsonb, expires_at timestamptz)``."""

    name = "PostgreSQL"

    param = "%s"
    data_type = "JSONB"
    time_type = "TIMESTAMPTZ"
    errors = (psycopg2.Error,)

    def __init__(
        self,
        dsn: str,
        *,
        table: str = "wsgisession",
        cleanup_interval: float = 120,
        pool_size: int = 8,
        timeout: float = 3.0,
        create_table: bool = True,
    ) -> None:
        self.dsn = dsn
        super().__init__(table, cleanup_interval, pool_size, timeout)
        self._lock_id = int.from_bytes(hashlib.sha256(f"wsgisession:{table}".encode()).digest()[:8], "big", signed=True)
        self._sql_merge = self._merge_sql()
        if create_table:
            self.setup()

    @staticmethod
    def timestamp(param: str) -> str:
        return f"to_timestamp({param})"

    @staticmethod
    def epoch(column: str) -> str:
        return f"date_part('epoch', {column})"

    def _create_statements(self) -> list[str]:
        # Concurrent CREATE TABLE IF NOT EXISTS can collide; a transaction lock serialises them.
        return ["BEGIN", f"SELECT pg_advisory_xact_lock({self._lock_id})", *self.schema(), "COMMIT"]

    def _connect(self) -> Any:
        conn = psycopg2.connect(self.dsn, connect_timeout=max(1, round(self._timeout)), application_name="wsgisession")
        conn.autocommit = True
        # JSON columns come back as text, decoded by the store, which copes with malformed records.
        psycopg2.extras.register_default_json(conn, loads=_text)
        psycopg2.extras.register_default_jsonb(conn, loads=_text)
        return conn

    def _merge_sql(self) -> str:
        """One statement that merges per-key changes into a live row (jsonb operators)."""
        return (
            f"UPDATE {self.table} SET data = (data - %s::text[]) || %s::jsonb, expires_at = to_timestamp(%s) "
            "WHERE id = %s AND expires_at > to_timestamp(%s)"
        )

    def _merge_params(self, key: str, changes: Changes, expires: float) -> tuple[Any, ...]:
        return (list(changes.deleted), json_object(changes.set), expires, key, now())

    def _merge(self, cur: Any, key: str, changes: Changes, expires: float) -> bool:
        cur.execute(self._sql_merge, self._merge_params(key, changes, expires))
        return bool(cur.rowcount)

    def _claim_cleanup(self, cur: Any) -> bool:
        # A transaction-level lock: held only for one batch, and valid behind PgBouncer.
        cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (self._lock_id,))
        return bool(cur.fetchone()[0])


def _text(value: str) -> str:
    return value
