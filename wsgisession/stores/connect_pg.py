"""Sessions in PostgreSQL as connect-pg-simple keeps them, for sharing with an Express application."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg2

from .base import Changes, Record, json_object, now
from .express import ExpressDocument
from .postgres import PostgresStore


class ConnectPgStore(PostgresStore):
    """Table ``session (sid varchar, sess json, expire timestamp(6))``, as connect-pg-simple creates it.

    Times are written with ``to_timestamp(epoch)`` and read through ``timestamptz``, so both
    applications agree whatever the connection's time zone. Updates merge in one statement.
    """

    columns = ("sid", "sess", "expire")
    rewrite_lock = " FOR UPDATE"

    def __init__(self, dsn: str, *, document: ExpressDocument, table: str = "session", **options: Any) -> None:
        self.document = document
        super().__init__(dsn, table=table, **options)

    @staticmethod
    def epoch(column: str) -> str:
        return f"date_part('epoch', {column}::timestamptz)"

    def schema(self) -> list[str]:
        return [
            f'CREATE TABLE IF NOT EXISTS {self.table} (sid varchar NOT NULL COLLATE "default", sess json NOT NULL, '
            "expire timestamp(6) NOT NULL, PRIMARY KEY (sid))",
            f'CREATE INDEX IF NOT EXISTS "IDX_{self.table.rsplit(".", 1)[-1]}_expire" ON {self.table} (expire)',
        ]

    def _merge_sql(self) -> str:
        return (
            f"UPDATE {self.table} SET sess = (((sess::jsonb - %s::text[]) || %s::jsonb) "
            "|| jsonb_build_object('cookie', %s::jsonb))::json, expire = to_timestamp(%s) "
            "WHERE sid = %s AND expire > to_timestamp(%s)"
        )

    def _merge_params(self, key: str, changes: Changes, expires: float) -> tuple[Any, ...]:
        deleted, changed = list(changes.deleted), json_object(changes.set)
        return (deleted, changed, self.document.cookie(expires), expires, key, now())

    def _merge(self, cur: Any, key: str, changes: Changes, expires: float) -> bool:
        try:
            return super()._merge(cur, key, changes, expires)
        except psycopg2.DataError:
            # jsonb refuses what json keeps and Node.js may have stored (a NUL, a lone
            # surrogate): merge in Python instead, with the row locked for the moment.
            return self._rewrite(cur, key, changes, expires)

    def _document(self, data: Mapping[str, str], expires: float) -> str:
        return self.document.dump(data, expires)

    def _record(self, raw: Any, expires: float) -> Record | None:
        return self.document.load(raw, expires, f"table {self.table}")
