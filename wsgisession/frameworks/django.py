"""Django's session engine over :mod:`wsgisession.core`: ``SESSION_ENGINE = "wsgisession.frameworks.django"``.

``request.session`` (and so ``django.contrib.auth``, ``messages`` and every app that uses it) is then
a wsgisession session, saved by Django's own ``SessionMiddleware``. The session key Django puts in
its cookie is this library's signed cookie value; the store files the session under a hash of its id.
Unlike Django's backends, a save writes only the keys the request changed, so two concurrent
requests of one session keep each other's changes.

Settings: ``settings.WSGISESSION`` (a dict of this library's variable names, such as ``REDIS_URL``)
over the environment; the signing secret is ``SESSION_SECRET`` there, else Django's ``SECRET_KEY``
with ``SECRET_KEY_FALLBACKS``. The idle timeout is Django's (``SESSION_COOKIE_AGE``, ``set_expiry()``),
capped by ``SESSION_ABSOLUTE_TIMEOUT``.

Moving from one of Django's engines: ``SESSION_MIGRATE_FROM`` there, naming the engine (such as
``"django.contrib.sessions.backends.db"``), makes a cookie of that engine's still name its session: read
there once, it becomes a session of this engine's (same data, remaining lifetime and login), and is
deleted there. A store URL instead is the core's to handle (see :mod:`wsgisession.stores.migrating`).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import threading
import time
from collections import ChainMap
from datetime import datetime, timezone
from typing import Any, NamedTuple

from django.conf import settings as django_settings  # type: ignore[import-untyped]
from django.contrib.auth import SESSION_KEY as AUTH_USER_KEY  # type: ignore[import-untyped]
from django.contrib.auth.signals import user_logged_in  # type: ignore[import-untyped]
from django.contrib.sessions.backends.base import SessionBase, UpdateError  # type: ignore[import-untyped]
from django.contrib.sessions.backends.db import SessionStore as DatabaseSession  # type: ignore[import-untyped]
from django.contrib.sessions.backends.signed_cookies import (  # type: ignore[import-untyped]
    SessionStore as SignedCookieSession,
)
from django.core import signing  # type: ignore[import-untyped]

from ..core import Identity, SessionCore
from ..detection import create_session_store
from ..session import SessionValueError
from ..settings import ConfigError, Settings, framework_secrets
from ..stores.base import USER_KEY, Changes, StoreError
from ..users import UserSessions

MIGRATE_FROM = "SESSION_MIGRATE_FROM"


class _Engine(NamedTuple):
    core: SessionCore
    previous: type[SessionBase] | None  # the engine sessions move from (SESSION_MIGRATE_FROM)


_engine: _Engine | None = None
_core_lock = threading.Lock()


def get_core() -> SessionCore:
    """The process's :class:`SessionCore`, built on first use from Django's settings (the store
    chosen by :func:`~wsgisession.create_session_store`)."""
    return _current().core


def _current() -> _Engine:
    global _engine
    engine = _engine
    if engine is None:
        with _core_lock:
            if _engine is None:
                previous = previous_engine()  # a wrong name stops start-up before any store is built
                settings = load_settings()
                _engine = _Engine(SessionCore(settings, create_session_store(settings)), previous)
            engine = _engine
    return engine


def set_core(core: SessionCore | None) -> None:
    """Serve every session from ``core`` from now on (a store built by hand, or a test's); None builds
    one again from the settings on next use. The core replaced is not closed."""
    global _engine
    with _core_lock:
        _engine = None if core is None else _Engine(core, previous_engine())


def users() -> UserSessions:
    """A user's sessions (listed, ended, limited), on the process's core."""
    return get_core().users


def end_other_sessions(request: Any) -> int:
    """End every session of ``request.user`` but this request's: call it when the password changes
    (as Django's ``update_session_auth_hash``, which keeps this one). Returns how many ended."""
    return users().end_all(request.user.pk, keep=request.session)


def bind_login(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    """``user_logged_in``: bind the session (its key just cycled by ``login()``) to the user."""
    if isinstance(request.session, SessionStore):
        request.session.bind(user.pk, request.META.get("HTTP_USER_AGENT"), request.META.get("REMOTE_ADDR"))


def load_settings() -> Settings:
    """This library's settings from ``settings.WSGISESSION`` over the environment; without a
    SESSION_SECRET there, Django's SECRET_KEY signs (SECRET_KEY_FALLBACKS still verify)."""
    given, _ = _given()
    if given.get("SESSION_SECRET"):
        return Settings.load(given)
    secrets = framework_secrets("Django", django_settings.SECRET_KEY, django_settings.SECRET_KEY_FALLBACKS)
    return Settings.load(given, secret=secrets)


def previous_engine() -> type[SessionBase] | None:
    """The SessionStore of the Django engine that SESSION_MIGRATE_FROM names (None: it names none),
    imported now, so that a wrong name stops start-up rather than fail every request."""
    _, name = _given()
    if name is None:
        return None
    try:
        engine = importlib.import_module(name).SessionStore
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"{MIGRATE_FROM}: {name!r} is not a Django session engine ({exc}); name the SESSION_ENGINE that "
            "sessions move from, such as django.contrib.sessions.backends.db, or a session store URL"
        ) from None
    if not (isinstance(engine, type) and issubclass(engine, SessionBase)) or issubclass(engine, SessionStore):
        raise ConfigError(f"{MIGRATE_FROM}: {name!r} is not another Django session engine")
    return engine


def _given() -> tuple[ChainMap[str, Any], str | None]:
    """``settings.WSGISESSION`` over the environment, and the Django engine SESSION_MIGRATE_FROM names
    there, taken out (a store URL, with ``://``, stays: the core moves sessions from it)."""
    given = ChainMap({}, dict(getattr(django_settings, "WSGISESSION", {})), os.environ)
    name = str(given.get(MIGRATE_FROM) or "").strip()
    if not name or "://" in name:
        return given, None
    given[MIGRATE_FROM] = ""  # in the first map only: the core reads it as not set
    return given, name


class SessionStore(SessionBase):  # type: ignore[misc]
    """A Django session kept in this library's store.

    Its ``session_key`` is the signed cookie value: a key is valid only if one of the secrets signed it
    (and the session is within its absolute lifetime), so a client's own choice is never adopted.
    Values must be JSON (as with Django's default JSONSerializer; dict keys must be str).
    A store failure is logged; the session then reads as empty and nothing more is written.
    """

    def __init__(self, session_key: str | None = None) -> None:
        self._core, self._previous = _current()
        self._identity: Identity | None = None  # the session the key names (set as the key is)
        self._before: dict[str, str] | None = None  # each stored value's JSON text (None: not read)
        self._failed = False
        self._moved = False  # moved in from the previous engine by this object: stored as it is
        super().__init__(session_key)

    @property
    def store_key(self) -> str | None:
        """What the store files this session under (None for a session not stored yet)."""
        return self._identity.key if self._identity is not None else None

    def bind(self, user_id: Any, agent: str | None = None, ip: str | None = None) -> None:
        """Bind the session to ``user_id`` (at login), so that the user can list and end it."""
        self[USER_KEY] = self._binding(user_id, agent, ip)
        if self._core.settings.max_per_user:
            self.save()  # stored now, so that the limit counts it
            self._core.users.limit(str(user_id), self.store_key or "")

    def _binding(self, user_id: Any, agent: str | None, ip: str | None) -> dict[str, Any]:
        now = int(time.time())
        return {"id": str(user_id), "login": now, "seen": now, **self._core.client(agent, ip)}

    def _validate_session_key(self, key: str | None) -> bool:
        """Whether ``key`` is a genuine signed value of a live session (remembering which one), or,
        with SESSION_MIGRATE_FROM, perhaps a key of the previous engine's, held until the load looks it
        up there (so that a request that does not read the session leaves its cookie alone)."""
        self._identity = self._core.identify([key]) if key else None
        if self._identity is None and self._previous is not None:
            return bool(super()._validate_session_key(key))
        return self._identity is not None

    def _get_new_session_key(self) -> str:
        """A fresh signed key. A session given a new one (``cycle_key()`` at login) keeps its creation
        time, so its absolute lifetime, as the core's ``regenerate()`` does."""
        current = self._identity
        created = current.created if current is not None and current.created is not None else int(time.time())
        return self._core.sign(self._core.format.new_id(), created)

    def __setitem__(self, key: str, value: Any) -> None:
        self._encode(key, value)  # fail here, at the line that stored it, rather than at the save
        super().__setitem__(key, value)

    # -- the SessionBase contract ----------------------------------------------------

    def exists(self, session_key: str | None) -> bool:
        """Whether ``session_key`` names a live stored session."""
        identity = self._core.identify([session_key]) if session_key else None
        return identity is not None and self._core.store.load(identity.key) is not None

    def load(self) -> dict[str, Any]:
        """The stored session; empty for one gone (a save then starts a new key) or a store failure."""
        identity = self._identity
        if identity is None:
            return self._move_in(self.session_key) if self.session_key else {}
        try:
            record = self._core.store.load(identity.key)
        except StoreError as exc:
            self._fail("loading", exc)
            return {}
        if record is None:
            self._session_key = None
            return {}
        self._before = {key: self._core.codec.measure(value) for key, value in record.data.items()}
        if not identity.current:  # signed with an older secret: the cookie gets the current signature
            self._session_key = self._core.sign(identity.id, identity.created)
            self.modified = True
        return self._core.codec.load(record.data)

    def create(self) -> None:
        """Start a session under a fresh key, stored at once (with the data it holds)."""
        self._session_key = self._get_new_session_key()
        self.save(must_create=True)
        self.modified = True

    def save(self, must_create: bool = False) -> None:
        """Store the whole session (``must_create``), else only the keys changed since it was read.

        A session deleted meanwhile (a logout elsewhere) raises UpdateError rather than come back;
        Django's middleware answers SessionInterrupted. A store failure is logged and writes nothing.
        """
        data = self._get_session(no_load=must_create)
        if self._failed:  # read as empty: saved, it would erase what is stored
            return
        if self._identity is None:  # nothing stored yet (or the previous engine held nothing under the key)
            self.create()
            return
        binding = data.get(USER_KEY)
        seen = self._core.seen(binding) if isinstance(binding, dict) else None
        if seen is not None:  # a bound session's save says when it was seen
            data[USER_KEY] = seen
        try:
            if must_create:
                self._create_record(data)
            else:
                self._update_record(data)
        except StoreError as exc:
            self._fail("saving", exc)

    def delete(self, session_key: str | None = None) -> None:
        """Remove this session, or the one ``session_key`` names."""
        identity = self._identity if session_key is None else self._core.identify([session_key])
        if identity is None or self._failed:
            return
        try:
            self._core.store.delete(identity.key)
        except StoreError as exc:
            self._fail("deleting", exc)

    @classmethod
    def clear_expired(cls) -> None:
        """Delete expired sessions (``manage.py clearsessions``); Redis expires its own."""
        get_core().store.cleanup()

    # -- what a save writes --------------------------------------------------------------

    def _create_record(self, data: dict[str, Any]) -> None:
        assert self._identity is not None
        encoded = {key: self._encode(key, value) for key, value in data.items()}
        self._core.check_size(encoded)
        ttl = self._ttl()
        if ttl > 0:  # else it was born expired (a set_expiry() in the past)
            self._core.store.create(self._identity.key, encoded, ttl)
        self._before = encoded

    def _update_record(self, data: dict[str, Any]) -> None:
        assert self._identity is not None
        store, key = self._core.store, self._identity.key
        if self._before is None:  # replaced unread (clear()): the keys stored are the ones to delete
            record = store.load(key)
            if record is None:
                raise UpdateError
            self._before = {k: self._core.codec.measure(v) for k, v in record.data.items()}
        changes, texts = self._changes(data, self._before)
        ttl = self._ttl()
        if ttl <= 0:  # a set_expiry() in the past: it ends now
            store.delete(key)
            return
        if changes.set or changes.deleted:
            self._core.check_size(texts)
            found = store.update(key, changes, ttl)
        else:  # unchanged: extended, unless just moved in (its remaining lifetime kept)
            found = self._moved or store.touch(key, ttl)
        if not found:
            raise UpdateError
        self._before = texts

    def _changes(self, data: dict[str, Any], before: dict[str, str]) -> tuple[Changes, dict[str, str]]:
        """The keys set (as JSON text) and deleted since the session was read, and every value's text."""
        texts, changed = {}, {}
        for key, value in data.items():
            try:
                text: str | None = self._core.codec.measure(value)
            except (TypeError, ValueError):
                text = None
            if text is None or before.get(key) != text:
                text = changed[key] = self._encode(key, value)
            texts[key] = text
        return Changes(changed, tuple(key for key in before if key not in data)), texts

    def _encode(self, key: Any, value: Any) -> str:
        if not isinstance(key, str):
            raise SessionValueError(f"session keys must be str, not {type(key).__name__}")
        return self._core.codec.encode(key, value)

    def _ttl(self) -> float:
        """How long the session lives from now: Django's expiry age, capped by the absolute timeout."""
        assert self._identity is not None
        return self._core.ttl(self._identity.created, max_age=self.get_expiry_age())

    def _fail(self, action: str, exc: StoreError) -> None:
        self._failed = True
        self._core.report_failure(action, exc)

    # -- moving in from the previous engine ----------------------------------------------

    def _move_in(self, old_key: str) -> dict[str, Any]:
        """The previous engine's session under ``old_key``, moved into the store under a new key of
        ours, with its remaining lifetime and its login, and deleted there (a signed cookie, which
        cannot be, is remembered as moved): read once. Empty when there is none; its engine failing
        is logged, and the key kept, so that the cookie moves once the engine is back."""
        assert self._previous is not None
        old = self._previous(old_key)
        try:
            found = _read(old)
            if found is None:
                return {}
            data, expires = found
            user = data.get(AUTH_USER_KEY)
            if user is not None:  # bound as a login binds it, so that it is in the user's list
                data[USER_KEY] = self._binding(user, None, None)
            encoded = {key: self._encode(key, value) for key, value in data.items()}
        except Exception as exc:  # whatever its database, cache or serializer raises: never a 500
            self._core.report_failure("moving", StoreError(f"{type(old).__module__} failed: {exc!r}"))
            return {}
        now = int(time.time())
        ttl = self._core.ttl(now, max_age=expires - now)
        signed = isinstance(old, SignedCookieSession)
        session_id = self._core.format.new_id()
        key, store = self._core.format.store_key(session_id), self._core.store
        try:
            if ttl <= 0 or (signed and store.load(_moved_key(old_key)) is not None):
                return {}  # expired, or a signed cookie that moved already (replayed)
            store.create(key, encoded, ttl)
            if user is not None and self._core.settings.max_per_user:
                self._core.users.limit(str(user), key)
            if signed:
                store.create(_moved_key(old_key), {"moved": "true"}, expires - now)  # while it would move
        except StoreError as exc:
            self._fail("moving", exc)
            return {}
        if not signed:
            self._forget(old)
        self._session_key = self._core.sign(session_id, now)
        self._before, self._moved, self.modified = encoded, True, True  # the response sets our cookie
        return data

    def _forget(self, old: SessionBase) -> None:
        """Delete a session moved in from its previous engine (a failure is logged: it moved anyway)."""
        try:
            old.delete()
        except Exception as exc:  # whatever its database or cache raises
            self._core.report_failure("moving", StoreError(f"{type(old).__module__} failed to delete: {exc!r}"))


def _read(old: SessionBase) -> tuple[dict[str, Any], float] | None:
    """What a previous engine's session holds and when it expires (Unix seconds); None for none. A
    database row says when; otherwise Django's expiry age counts from the last save: a signed cookie's
    timestamp (which it outlives by SESSION_COOKIE_AGE at most), or now for a cache (which keeps no time)."""
    if isinstance(old, DatabaseSession):  # db and cached_db: the database is the reference
        rows = old.get_model_class().objects.filter(session_key=old.session_key, expire_date__gt=_moment(time.time()))
        row = rows.first()
        data = {} if row is None else old.decode(row.session_data)
        return (data, row.expire_date.timestamp()) if data else None
    data = old.load()
    if not data:
        return None
    saved, most = time.time(), float("inf")
    if isinstance(old, SignedCookieSession):
        saved = signing.b62_decode(old.session_key.rsplit(":", 2)[1])
        most = old.get_session_cookie_age()
    age = old.get_expiry_age(modification=_moment(saved), expiry=data.get("_session_expiry"))
    return data, saved + min(age, most)


def _moment(at: float) -> datetime:
    """A time as Django's ``timezone.now()`` gives it: aware with USE_TZ, else naive local time."""
    return datetime.fromtimestamp(at, tz=timezone.utc if django_settings.USE_TZ else None)


def _moved_key(old_key: str) -> str:
    """Where the store remembers that a signed cookie of the previous engine's moved in: a key that no
    session id hashes to."""
    return hashlib.sha256(f"moved-from-django:{old_key}".encode()).hexdigest()


user_logged_in.connect(bind_login, dispatch_uid="wsgisession.bind_login")
