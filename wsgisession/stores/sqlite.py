"""The embedded default: sessions in a SQLite file, shared by the processes of one host."""

from __future__ import annotations

import sqlite3

from .base import USER_KEY
from .sql import SQLStore


class SQLiteStore(SQLStore):
    """Sessions in a SQLite database in WAL mode; one host only (no network sharing)."""

    name = "SQLite"

    table_options = " WITHOUT ROWID"
    offset = "LIMIT -1 OFFSET"
    # SQLite has one writer at a time: BEGIN IMMEDIATE makes a merge's read and write atomic
    # for the few microseconds it takes, with no lock held across the request.
    rewrite_begin = "BEGIN IMMEDIATE"
    errors = (sqlite3.Error,)

    def __init__(
        self,
        path: str = "wsgisession.sqlite3",
        *,
        table: str = "wsgisession",
        cleanup_interval: float = 120,
        timeout: float = 5.0,
        pool_size: int = 32,
    ) -> None:
        self.path = path
        super().__init__(table, cleanup_interval, pool_size, timeout)
        self.setup()

    @staticmethod
    def timestamp(param: str) -> str:
        return param

    @staticmethod
    def epoch(column: str) -> str:
        return column

    def binding(self, column: str) -> str:
        return f"json_extract({column}, '$.\"{USER_KEY}\"')"

    def bound_id(self, column: str) -> str:
        # json_extract fails on text that is not JSON, which another program may have stored.
        return f"(CASE WHEN json_valid({column}) THEN {self.binding_field(column, 'id')} END)"

    def binding_field(self, column: str, field: str) -> str:
        return f"json_extract({column}, '$.\"{USER_KEY}\".{field}')"

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn
