"""Pyramid's ``request.session`` as a wsgisession session: ``config.include("wsgisession.frameworks.pyramid")``.

The settings are Pyramid's, under ``wsgisession.`` (``wsgisession.secret`` is SESSION_SECRET,
``wsgisession.redis_url`` is REDIS_URL), over the environment. A session is loaded on first use and
saved by a response callback, before the response goes out.
"""

from __future__ import annotations

import collections
import functools
import os
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from pyramid.interfaces import ISession, ISessionFactory  # type: ignore[import-untyped]
from zope.interface import implementer  # type: ignore[import-untyped]

from ..core import SessionCore, Visit
from ..detection import create_session_store
from ..middleware import add_vary_cookie
from ..session import JSON, Codec, Session
from ..settings import Settings, prefixed
from ..signing import new_id
from ..stores.base import SessionStore
from ..users import UserSessions

PREFIX = "wsgisession."  # of our names in Pyramid's settings
FLASH = "_f_"  # Pyramid's own keys: a flash queue's is FLASH + its name,
CSRF_TOKEN = "_csrft_"  # and the CSRF token's (SessionCSRFStoragePolicy's default)


@implementer(ISession)
class PyramidSession(Session):
    """A :class:`~wsgisession.Session` that is also Pyramid's ``ISession``: ``created``, flash queues and
    a CSRF token. ``invalidate()`` ends the session; values set after it go to a new one."""

    __slots__ = ("_started",)

    def __init__(
        self, load: Callable[[], tuple[Any, ...]], new_id: Callable[[], str] = new_id, codec: Codec = JSON
    ) -> None:
        super().__init__(load, new_id, codec)
        self._started = int(time.time())  # the creation time of a session this request starts

    @property
    def created(self) -> int:
        """When the session was created (Unix seconds); for a new one, when this request started it."""
        return super().created or self._started

    @created.setter
    def created(self, created: int) -> None:  # the core's, as it saves a new session
        self._started = created

    def changed(self) -> None:
        """Nothing to do: every value this request read is compared, as it is saved, with what it was when
        loaded, so a value changed in place is saved without this call (Pyramid code may still make it)."""

    def flash(self, msg: Any, queue: str = "", allow_duplicate: bool = True) -> None:
        """Add ``msg`` to the end of the flash queue ``queue`` (unless it is there and not ``allow_duplicate``)."""
        storage = self.get(FLASH + queue, [])
        if allow_duplicate or msg not in storage:
            self[FLASH + queue] = [*storage, msg]  # a value JSON cannot hold fails here

    def peek_flash(self, queue: str = "") -> list[Any]:
        """The messages of the flash queue ``queue``, left in it."""
        return self.get(FLASH + queue, [])  # type: ignore[no-any-return]

    def pop_flash(self, queue: str = "") -> list[Any]:
        """The messages of the flash queue ``queue``, which is emptied."""
        return self.pop(FLASH + queue, [])  # type: ignore[no-any-return]

    def new_csrf_token(self) -> str:
        """A new CSRF token, which replaces the session's."""
        token = self[CSRF_TOKEN] = secrets.token_hex(20)
        return token

    def get_csrf_token(self) -> str:
        """The session's CSRF token (a new one, if it has none)."""
        return self.get(CSRF_TOKEN) or self.new_csrf_token()


@implementer(ISessionFactory)
class SessionFactory:
    """Pyramid's session factory over a :class:`~wsgisession.SessionCore` (which other front doors may share)."""

    def __init__(self, core: SessionCore) -> None:
        self.core = core
        self.users = core.users  # a user's sessions: listed, ended, limited

    def __call__(self, request: Any) -> PyramidSession:
        """``request.session``: nothing is loaded until it is used; it is saved as the response goes out."""
        core = self.core
        visit = core.open(request.environ.get("HTTP_COOKIE"), request.user_agent, request.client_addr)
        session = PyramidSession(visit.load, core.format.new_id, core.codec)
        request.add_response_callback(functools.partial(self._save, visit, session))
        return session

    def _save(self, visit: Visit, session: PyramidSession, request: Any, response: Any) -> None:
        """Write what the request changed; add the cookie, and ``Vary: Cookie`` when the session was used."""
        accessed = session.accessed
        cookies = self.core.save(visit, session, secure=request.scheme == "https")
        if accessed:
            add_vary_cookie(response.headerlist)
            response.headerlist.extend(("Set-Cookie", value) for value in cookies)

    def close(self) -> None:
        """Close the store (its connections and cleanup thread)."""
        self.core.store.close()


def session_factory(
    settings: Mapping[str, Any] | None = None, store: SessionStore | None = None, **overrides: Any
) -> SessionFactory:
    """A factory for ``config.set_session_factory``: settings under ``wsgisession.`` in ``settings`` (Pyramid's)
    over the environment, ``overrides`` (as :meth:`Settings.load` takes them) over both; with no ``store``,
    the one the settings detect (and log)."""
    variables = collections.ChainMap(prefixed(settings or {}, PREFIX), os.environ)
    loaded = Settings.load(variables, **overrides)
    return SessionFactory(SessionCore(loaded, store if store is not None else create_session_store(loaded)))


def users(request: Any) -> UserSessions:
    """A user's sessions (listed, ended, limited), through the request's session factory (a view's way to them)."""
    factory = request.registry.getUtility(ISessionFactory)
    if not isinstance(factory, SessionFactory):
        raise TypeError(f"the session factory is {type(factory).__name__}, not wsgisession's SessionFactory")
    return factory.users


def includeme(config: Any) -> None:
    """``config.include("wsgisession.frameworks.pyramid")``: ``request.session`` is a wsgisession session."""
    config.set_session_factory(session_factory(config.get_settings()))
