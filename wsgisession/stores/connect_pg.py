"""Sessions in PostgreSQL as connect-pg-simple keeps them, for sharing with an Express application."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import USER_KEY, Changes, Record, json_object, now
from .express import ExpressDocument
from .postgres import PostgresStore

#: The column this store adds to connect-pg-simple's table: a copy of the session's binding to a user.
USER_COLUMN = "wsgisession_user"


class ConnectPgStore(PostgresStore):
    """Table ``session (sid varchar, sess json, expire timestamp(6))``, as connect-pg-simple creates it,
    plus a ``jsonb`` column that copies the session's binding (:data:`USER_KEY`'s value), indexed.

    Times are written with ``to_timestamp(epoch)`` and read through ``timestamptz``, so both
    applications agree whatever the connection's time zone. Updates merge in one statement.

    The binding is copied, not read from ``sess`` by an index expression: PostgreSQL's json operators
    fail on a document holding ``\\u0000`` or a lone surrogate, which Node.js stores without complaint,
    and such an index would make connect-pg-simple's saves of it fail. Its saves name their columns,
    so they leave the copy be.
    """

    columns = ("sid", "sess", "expire")

    def __init__(self, dsn: str, *, document: ExpressDocument, table: str = "session", **options: Any) -> None:
        self.document = document
        super().__init__(dsn, table=table, **options)

    @staticmethod
    def epoch(column: str) -> str:
        return f"date_part('epoch', {column}::timestamptz)"

    def binding(self, column: str) -> str:
        return USER_COLUMN

    def schema(self) -> list[str]:
        name, bound = self.table.rsplit(".", 1)[-1], self.bound_id("sess")
        return [
            f'CREATE TABLE IF NOT EXISTS {self.table} (sid varchar NOT NULL COLLATE "default", sess json NOT NULL, '
            "expire timestamp(6) NOT NULL, PRIMARY KEY (sid))",
            f'CREATE INDEX IF NOT EXISTS "IDX_{name}_expire" ON {self.table} (expire)',
            # ADD COLUMN IF NOT EXISTS would lock the table against reads at every start-up: only when missing.
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = '{self.table}'::regclass "
            f"AND attname = '{USER_COLUMN}' AND NOT attisdropped) THEN "
            f"ALTER TABLE {self.table} ADD COLUMN {USER_COLUMN} jsonb; END IF; END $$",
            f'CREATE INDEX IF NOT EXISTS "IDX_{name}_user" ON {self.table} ({bound}) WHERE {bound} IS NOT NULL',
        ]

    def _create_sql(self) -> str:
        return self._upsert("VALUES (%s, %s, to_timestamp(%s), %s)")

    def _upsert(self, rows: str) -> str:
        return (
            f"INSERT INTO {self.table} (sid, sess, expire, {USER_COLUMN}) {rows} ON CONFLICT (sid) DO UPDATE SET "
            f"sess = excluded.sess, expire = excluded.expire, {USER_COLUMN} = excluded.{USER_COLUMN}"
        )

    def _copied_rows(self) -> str:
        return (
            "SELECT k, d::json, to_timestamp(e), u::jsonb "
            "FROM unnest(%s::text[], %s::text[], %s::float8[], %s::text[]) AS rows(k, d, e, u)"
        )

    def _create_params(self, key: str, data: Mapping[str, str], expires: float) -> tuple[Any, ...]:
        return (*super()._create_params(key, data, expires), data.get(USER_KEY))

    def _rewrite_sql(self) -> str:
        return f"UPDATE {self.table} SET sess = %s, expire = to_timestamp(%s), {USER_COLUMN} = %s WHERE sid = %s"

    def _rewrite_params(self, key: str, data: Mapping[str, str], expires: float) -> tuple[Any, ...]:
        return (self._document(data, expires), expires, data.get(USER_KEY), key)

    def _merge_sql(self) -> str:
        return (
            f"UPDATE {self.table} SET sess = (((sess::jsonb - %s::text[]) || %s::jsonb) "
            "|| jsonb_build_object('cookie', %s::jsonb))::json, expire = to_timestamp(%s), "
            f"{USER_COLUMN} = CASE WHEN %s THEN %s::jsonb ELSE {USER_COLUMN} END "
            "WHERE sid = %s AND expire > to_timestamp(%s)"
        )

    def _merge_params(self, key: str, changes: Changes, expires: float) -> tuple[Any, ...]:
        deleted, changed, cookie = list(changes.deleted), json_object(changes.set), self.document.cookie(expires)
        rebound = USER_KEY in changes.set or USER_KEY in changes.deleted
        return (deleted, changed, cookie, expires, rebound, changes.set.get(USER_KEY), key, now())

    def _merge(self, cur: Any, key: str, changes: Changes, expires: float) -> bool:
        try:
            return super()._merge(cur, key, changes, expires)
        except self.driver.data_error:
            # jsonb refuses what json keeps and Node.js may have stored (a NUL, a lone
            # surrogate): merge in Python instead, with the row locked for the moment.
            return self._rewrite(cur, key, changes, expires)

    def _document(self, data: Mapping[str, str], expires: float) -> str:
        return self.document.dump(data, expires)

    def _record(self, raw: Any, expires: float) -> Record | None:
        return self.document.load(raw, expires, f"table {self.table}")
