"""The framework-free core: which cookie names which session, its timeouts, what a save writes
and which Set-Cookie goes out. Plain values in, plain values out; every front door (the WSGI
middleware, the Flask, Django and Pyramid adapters) is a thin layer over it.

A request's session is loaded in :meth:`Visit.load` (lazily, on first use) and saved in
:meth:`SessionCore.save`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Any, NamedTuple

from werkzeug.http import http_date

from .builders import with_encryption
from .formats import CookieFormat, cookie_format
from .session import JSON, Codec, Loaded, Session, SessionTooLarge, SessionValueError, encode
from .settings import Settings
from .stores.base import USER_KEY, Changes, RateLimitedLog, SessionStore, StoreError, json_object
from .users import UserSessions

log = logging.getLogger("wsgisession")

MAX_COOKIE_HEADER = 8192  # a longer Cookie header is ignored, not parsed
VERIFIED_CACHE = 4096  # genuine cookie values remembered, per core


class Identity(NamedTuple):
    """A genuine session cookie: the session it names and how it was signed."""

    id: str
    created: int | None  # Unix seconds; None in the express-session format
    current: bool  # signed with the current (first) secret
    key: str  # the id's store key
    value: str  # the cookie value itself


class SessionCore:
    """Sessions of one store, under one set of settings, for any front door.

    ``format`` defaults to the one the settings name; ``codec`` turns values into JSON text and back.
    """

    def __init__(self, settings: Settings, store: SessionStore, codec: Codec = JSON) -> None:
        self.settings = settings
        self.store = with_encryption(store, settings)  # values sealed at rest when SESSION_ENCRYPTION_KEY is set
        self.codec = codec
        self.format: CookieFormat = cookie_format(settings.format, settings.secrets)
        # The expiry is extended at most once a minute (or every tenth of max_age).
        self.refresh_after = min(60.0, settings.max_age / 10)
        self._attributes = {secure: _cookie_attributes(settings, secure) for secure in (False, True)}
        self._verified: dict[str, Identity] = {}
        self._failures = RateLimitedLog()
        self._tossing = RateLimitedLog()
        self.users = UserSessions(self)  # a user's sessions: listed, ended, limited

    def open(self, cookie_header: str | None, agent: str | None = None, ip: str | None = None) -> Visit:
        """A request's visit, from its Cookie header (and its user agent and IP, kept at a login when
        SESSION_CLIENT_DETAILS is on); nothing is read until the session is used."""
        return Visit(self, cookie_header, self.client(agent, ip))

    def client(self, agent: str | None, ip: str | None) -> dict[str, str]:
        """What a login keeps of where it came from: the user agent and IP, if SESSION_CLIENT_DETAILS is on."""
        return {"agent": agent or "", "ip": ip or ""} if self.settings.client_details else {}

    def seen(self, binding: dict[str, Any], due: bool = False) -> dict[str, Any] | None:
        """``binding`` with this moment as "seen", when a write of its session should record it (``due``,
        a refresh, or a refresh interval since the last one); else None."""
        t = time.time()
        return {**binding, "seen": int(t)} if due or t - binding.get("seen", 0) >= self.refresh_after else None

    def session(self, visit: Visit) -> Session:
        """A lazy :class:`Session` for ``visit`` (a front door may build a subclass the same way)."""
        return Session(visit.load, self.format.new_id, self.codec)

    # -- which cookie names which session ---------------------------------------------

    def cookie_values(self, header: str | None) -> list[str]:
        """The values of a Cookie header's session cookies (a sibling domain may have added more than one)."""
        name = self.settings.cookie_name
        if not header or name not in header or len(header) > MAX_COOKIE_HEADER:
            return []
        values = []
        for part in header.split(";"):
            key, _, value = part.partition("=")
            if key.strip() == name:
                values.append(value.strip().strip('"'))
        return values

    def identify(self, values: list[str]) -> Identity | None:
        """The session a request's cookie values name.

        Forged and malformed values are ignored. Two genuine values naming different sessions
        (a sibling domain tossing its own cookie in) name none: the request gets a fresh session.
        """
        found = None
        for value in values:
            genuine = self._verify(value)
            if genuine is None or (found is not None and genuine[0] == found[0]):
                continue
            if found is not None:
                self._tossing.report("Several session cookies name different sessions; none is used")
                return None
            found = genuine
        if (
            found is not None
            and found.created is not None
            and found.created + self.settings.absolute_timeout <= time.time()
        ):
            return None  # past its absolute lifetime, however active
        return found

    def _verify(self, value: str) -> Identity | None:
        """``signer.unsign(value)``, remembered for genuine values: an active user's cookie is
        checked once, not on every request (the absolute lifetime is checked every time)."""
        found = self._verified.get(value)
        if found is None:
            unsigned = self.format.signer.unsign(value)
            if unsigned is None:
                return None
            session_id, created, current = unsigned
            found = Identity(session_id, created, current, self.format.store_key(session_id), value)
            if len(self._verified) >= VERIFIED_CACHE:
                self._verified.clear()
            self._verified[value] = found
        return found

    def sign(self, session_id: str, created: int | None) -> str:
        """The cookie value that names ``session_id``."""
        return self.format.signer.sign(session_id, created)

    # -- timeouts ------------------------------------------------------------------------

    def ttl(self, created: float | None, max_age: float | None = None) -> float:
        """How long a session created at ``created`` may live from now: idle timeout (``max_age``, or
        the setting), capped by the absolute one (the express format's cookies carry no creation time)."""
        idle = self.settings.max_age if max_age is None else max_age
        if created is None or not self.format.lifetime:
            return idle
        return min(idle, created + self.settings.absolute_timeout - time.time())

    # -- what a save writes ----------------------------------------------------------------

    def save(self, visit: Visit, session: Session, *, secure: bool, persistent: bool = True,
             refresh: bool = True) -> list[str]:  # fmt: skip
        """Write what the request changed and return the Set-Cookie values that go with it.

        ``secure``: the request came over https (for the cookie's Secure flag, unless set);
        ``persistent``: the cookie outlives the browser (else a browser-session cookie, though the
        store still expires it); ``refresh``: an unchanged read extends the session's life.
        A store failure is logged and writes nothing; :attr:`Visit.failed` says so afterwards.
        """
        if session.saved:
            return []
        session.mark_saved()
        if not session.accessed or visit.failed:
            return []
        try:
            return self._write(visit, session, secure, persistent, refresh)
        except StoreError as exc:
            visit.fail("saving", exc)
            return []

    def _write(self, visit: Visit, session: Session, secure: bool, persistent: bool, refresh: bool) -> list[str]:
        store, cookie = self.store, visit.cookie
        binding = session.binding
        if session.renewed or cookie is None:  # a new record is needed
            encoded = session.encoded()
            if binding is not None:  # a login: when, and (if kept) from where
                encoded[USER_KEY] = encode(USER_KEY, {**binding, "seen": int(time.time()), **visit.client})
            self.check_size(encoded)  # before anything is deleted
            if cookie is not None:
                store.delete(cookie.key)
            if not encoded:
                return [self.expired_cookie(secure)] if visit.had_cookie else []
            session_id = session.id
            started = session.created or int(time.time())  # regenerate() keeps the lifetime
            key = self.format.store_key(session_id)
            store.create(key, encoded, self.ttl(started))
            session.created = started
            if binding is not None and self.settings.max_per_user:
                self.users.limit(binding["id"], key)
            return [self.cookie(session_id, started, secure, persistent=persistent)]
        created, key = session.created, cookie.key
        if len(session) == 0:
            store.delete(key)
            return [self.expired_cookie(secure)]
        changes, ttl = session.changes(), self.ttl(created)
        resign = not cookie.current  # signed with an older secret
        due = resign or (refresh and ttl - ((session.expires or 0) - time.time()) >= self.refresh_after)
        seen = None if binding is None else self.seen(binding, due)
        if seen is not None:  # a bound session's writes say when it was last seen (to within the refresh interval)
            changes = Changes({**changes.set, USER_KEY: encode(USER_KEY, seen)}, changes.deleted)
        if changes.set or changes.deleted:
            self.check_size(session.texts(changes))
            extended = store.update(key, changes, ttl)
        elif due:
            extended = store.touch(key, ttl)
        else:
            return []  # an unchanged read: nothing to write, no cookie
        # A session deleted meanwhile (a logout, or a login's regenerate() in another request)
        # stays deleted; no cookie either, so this response cannot undo the other's cookie.
        if not extended:
            return []
        # A value the current secret signed goes back as it came.
        value = cookie.value if not resign and self.format.canonical else None
        return [self.cookie(cookie.id, created, secure, value, persistent=persistent)]

    def check_size(self, encoded: dict[str, str]) -> None:
        """Raise :class:`SessionTooLarge` when the session passes SESSION_MAX_SIZE, or
        :class:`SessionValueError` when it holds a key the cookie format keeps for itself."""
        for key in self.format.reserved.intersection(encoded):
            raise SessionValueError(f"session[{key!r}] is the {self.format.name} format's own: use another key")
        size = len(json_object(encoded).encode(errors="surrogatepass"))
        if size > self.settings.max_size:
            raise SessionTooLarge(
                f"the session holds {size} bytes of JSON, over the limit of {self.settings.max_size} "
                "(SESSION_MAX_SIZE); nothing was saved"
            )

    # -- which Set-Cookie goes out -----------------------------------------------------------

    def cookie(self, session_id: str, created: int | None, secure: bool, value: str | None = None, *,
               persistent: bool = True) -> str:  # fmt: skip
        """The Set-Cookie value that hands the session to the browser, for as long as it may live
        (``value``: the signed value, when the caller has it already)."""
        value = value or self.sign(session_id, created)
        if not persistent:
            return f"{self.settings.cookie_name}={value}{self._attributes[self.is_secure(secure)]}"
        max_age = max(1, math.ceil(self.ttl(created)))
        expires = _http_date(int(time.time()) + max_age)
        return (f"{self.settings.cookie_name}={value}; Expires={expires}; Max-Age={max_age}"
                f"{self._attributes[self.is_secure(secure)]}")  # fmt: skip

    def expired_cookie(self, secure: bool) -> str:
        """The Set-Cookie value that makes the browser drop the session cookie."""
        return (f"{self.settings.cookie_name}=; Expires={_http_date(0)}; Max-Age=0"
                f"{self._attributes[self.is_secure(secure)]}")  # fmt: skip

    def is_secure(self, https: bool) -> bool:
        """Whether the cookie gets the Secure flag, for a request that came over https or not."""
        setting = self.settings.cookie_secure
        return https if setting is None else setting

    def report_failure(self, action: str, exc: StoreError) -> None:
        """Log a store failure (at most once a minute, with a count of the repeats)."""
        self._failures.report(f"Session store failed while {action} a session: %s", exc)


class Visit:
    """One request's use of a session: the cookie it came with, the lazy load, and whether
    the store failed (then the session is neither saved nor its cookie changed)."""

    __slots__ = ("_core", "_header", "client", "cookie", "failed", "had_cookie")

    def __init__(self, core: SessionCore, cookie_header: str | None, client: dict[str, str]) -> None:
        self._core = core
        self._header = cookie_header
        self.client = client  # the user agent and IP, when they are kept
        self.cookie: Identity | None = None  # the genuine session cookie it carried, once loaded
        self.had_cookie = False  # it carried a session cookie, genuine or not
        self.failed = False

    def load(self) -> Loaded:
        """The stored session the request's cookie names (empty for none, a forged one, or a store failure)."""
        core = self._core
        values = core.cookie_values(self._header)
        self.had_cookie = bool(values)
        found = core.identify(values)
        if found is None:
            return Loaded(None, {})
        try:
            record = core.store.load(found.key)
        except StoreError as exc:
            self.fail("loading", exc)
            return Loaded(None, {})
        if record is None:
            return Loaded(None, {})
        self.cookie = found
        return Loaded(found.id, record.data, record.expires, found.created)

    def fail(self, action: str, exc: StoreError) -> None:
        """Note (and log) that the store failed: nothing of this request is saved."""
        self.failed = True
        self._core.report_failure(action, exc)


def vary_with_cookie(vary: str | None) -> str | None:
    """The Vary header a response that used the session needs, given the one it has (None: has none);
    None when it already varies on Cookie (or on everything)."""
    if vary is None:
        return "Cookie"
    if "cookie" in vary.lower() or vary.strip() == "*":
        return None
    return f"{vary}, Cookie"


def _cookie_attributes(settings: Settings, secure: bool) -> str:
    """What follows the value and the expiry in every Set-Cookie of these settings."""
    domain = f"; Domain={settings.cookie_domain}" if settings.cookie_domain else ""
    flags = "; Secure" if secure else ""
    flags += "; HttpOnly" if settings.cookie_httponly else ""
    partitioned = "; Partitioned" if settings.cookie_partitioned else ""
    return f"{domain}; Path={settings.cookie_path}{flags}; SameSite={settings.cookie_samesite}{partitioned}"


@functools.lru_cache(maxsize=4)
def _http_date(seconds: int) -> str:
    """An HTTP date, formatted once per second (werkzeug's, which no locale changes)."""
    return http_date(seconds)
