"""A user's sessions: listed, ended one by one or all at once, and limited in number.

A session is bound to a user by :meth:`wsgisession.Session.login`; the store indexes the binding
(see :data:`wsgisession.stores.base.USER_KEY`). Every front door reaches this through its core:
``middleware.users``, the Flask interface's ``users``, Django's ``users()``, Pyramid's factory's ``users``.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, NamedTuple, Protocol

from .session import Session
from .stores.base import StoreError, UserRecord

if TYPE_CHECKING:
    from .core import SessionCore

log = logging.getLogger("wsgisession")


class Device(NamedTuple):
    """One of a user's live sessions, as the user may see it: never its id, nor its store key."""

    handle: str  # names the session to :meth:`UserSessions.end`
    login: int  # Unix seconds
    seen: int  # the last request that used it, to within the refresh interval (a minute)
    expires: int
    current: bool  # the session of the request that asked
    agent: str  # "" unless SESSION_CLIENT_DETAILS is on
    ip: str


def handle(key: str) -> str:
    """The handle of the session filed under ``key``: a one-way name, useless as a cookie or a store key."""
    return hashlib.sha256(f"handle:{key}".encode()).hexdigest()[:32]


class FiledSession(Protocol):
    """A front door's own session object that knows its store key (Django's SessionStore)."""

    @property
    def store_key(self) -> str | None: ...


class UserSessions:
    """Lists and ends a user's sessions (user ids are compared as str)."""

    def __init__(self, core: SessionCore) -> None:
        self._core = core

    def list(self, user_id: str | int, current: Session | FiledSession | None = None) -> list[Device]:
        """The user's live sessions, most recently seen first; ``current``: the asking request's session."""
        mine = self._key_of(current)
        devices = [_device(record, record.key == mine) for record in self._core.store.user_sessions(str(user_id))]
        return sorted(devices, key=lambda device: -device.seen)

    def end(self, user_id: str | int, which: str) -> bool:
        """End the user's session whose handle is ``which``; False when the user has none such (any longer)."""
        keys = [record.key for record in self._core.store.user_sessions(str(user_id)) if handle(record.key) == which]
        self._core.store.delete_many(keys)
        return bool(keys)

    def end_all(self, user_id: str | int, keep: Session | FiledSession | None = None) -> int:
        """End every session of the user (but ``keep``'s: "log out everywhere else"); return how many ended."""
        kept = self._key_of(keep)
        keys = [record.key for record in self._core.store.user_sessions(str(user_id)) if record.key != kept]
        self._core.store.delete_many(keys)
        return len(keys)

    def limit(self, user_id: str, login: str) -> None:
        """End the user's least recently used sessions beyond SESSION_MAX_PER_USER, never ``login`` (the
        store key of the login that asks). A store failure is logged: the login goes on, and the limit
        holds again at the next one."""
        try:
            ended = self._core.store.trim_user(user_id, self._core.settings.max_per_user, keep=login)
        except StoreError as exc:
            self._core.report_failure("limiting", exc)
            return
        if ended:
            log.info("Ended %d session(s) of a user past SESSION_MAX_PER_USER", len(ended))

    def _key_of(self, session: Session | FiledSession | None) -> str | None:
        """The store key of a session this request uses (None for none, or one bound to no user)."""
        if not isinstance(session, Session):
            return None if session is None else session.store_key
        return None if session.user_id is None else self._core.format.store_key(session.id)


def _device(record: UserRecord, current: bool) -> Device:
    binding = record.binding
    login = int(binding.get("login") or 0)
    return Device(handle(record.key), login, int(binding.get("seen") or login), int(record.expires), current,
                  str(binding.get("agent", "")), str(binding.get("ip", "")))  # fmt: skip
