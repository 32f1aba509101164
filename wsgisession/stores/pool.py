"""A bounded, thread-safe pool of DB-API connections for one process: SQLite's and psycopg2's."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from .base import StoreError

# Connections inherited through a fork are kept, never closed, so that the child
# does not end the parent's connection (a PostgreSQL close sends Terminate).
inherited: list[Any] = []


class Connections(Protocol):
    """What the SQL stores need of a pool: :class:`Pool`, or a driver's own pool behind an adapter."""

    def acquire(self) -> Any: ...
    def release(self, conn: Any) -> None: ...
    def discard(self, conn: Any) -> None: ...
    def close_idle(self) -> None: ...
    def close(self) -> None: ...
    def forget(self) -> None: ...


class Pool:
    """A bounded, thread-safe pool of DB-API connections for one process.

    The last connection returned is lent first. Lending an idle connection takes no lock
    (``list.pop`` and ``append`` are atomic); only opening one, or waiting when ``size`` are
    out, does.
    """

    def __init__(self, connect: Callable[[], Any], size: int, timeout: float) -> None:
        self._connect = connect
        self._idle: list[Any] = []
        self._size = size
        self._open = 0  # connections made and not yet closed
        self._waiting = 0  # threads waiting for one
        self._changed = threading.Condition()
        self._timeout = timeout
        self._closed = False

    def acquire(self) -> Any:
        """Lend a connection: an idle one, a new one, or the next one returned within the timeout."""
        try:
            return self._idle.pop()
        except IndexError:
            return self._open_or_wait()

    def release(self, conn: Any) -> None:
        """Take a lent connection back."""
        if self._closed:
            self.discard(conn)
            return
        self._idle.append(conn)
        if self._closed:  # close() ran meanwhile, perhaps before the append
            self.close_idle()
        elif self._waiting:  # read after the append: a waiter counted itself before it looked
            with self._changed:
                self._changed.notify()

    def discard(self, conn: Any) -> None:
        """Close a lent connection (one that saw an error), never to lend it again."""
        try:
            close_quietly(conn)
        finally:
            self._gone()

    def _open_or_wait(self) -> Any:
        deadline = time.monotonic() + self._timeout
        with self._changed:
            self._waiting += 1
            try:
                while True:
                    if self._closed:
                        raise StoreError("the session store is closed")
                    with contextlib.suppress(IndexError):
                        return self._idle.pop()
                    if self._open < self._size:
                        self._open += 1
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise StoreError(f"no free database connection within {self._timeout} s")
                    self._changed.wait(remaining)
            finally:
                self._waiting -= 1
        try:
            return self._connect()
        except BaseException:
            self._gone()
            raise

    def _gone(self) -> None:
        """A connection counted as open is not: its place may be taken again."""
        with self._changed:
            self._open -= 1
            self._changed.notify()

    def close(self) -> None:
        """Close the idle connections, and each lent one when it comes back; waiters get StoreError."""
        self._closed = True
        self.close_idle()

    def close_idle(self) -> None:
        """Close the connections no thread has borrowed (the next ones are opened anew)."""
        with self._changed:
            while True:
                try:
                    conn = self._idle.pop()  # a lock-free acquire() may take one meanwhile
                except IndexError:
                    break
                close_quietly(conn)
                self._open -= 1
            self._changed.notify_all()

    def forget(self) -> None:
        """Drop every connection without closing it (they belong to the parent process)."""
        inherited.extend(self._idle)
        self._idle.clear()


def close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):  # the connection is being thrown away
        conn.close()
