"""The WSGI middleware: where a request's session is loaded (lazily) and saved (at start_response)."""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from werkzeug.http import http_date

from .detection import create_session_store
from .session import Loaded, Session, SessionTooLarge, SessionValueError, encode
from .settings import Settings
from .signing import ExpressSigner, Signer, new_express_id, new_id, store_key
from .stores.base import SessionStore, StoreError, json_object

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("wsgisession")

MAX_COOKIE_HEADER = 8192  # a longer Cookie header is ignored, not parsed
VERIFIED_CACHE = 4096  # genuine cookie values remembered, per middleware
_UNAVAILABLE = b"Session store unavailable\n"
_UNAVAILABLE_HEADERS = (("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(_UNAVAILABLE))))
Headers = list[tuple[str, str]]


class Identity(NamedTuple):
    """A genuine session cookie: the session it names and how it was signed."""

    id: str
    created: int | None  # Unix seconds; None in the express-session format
    current: bool  # signed with the current (first) secret
    key: str  # the id's store key
    value: str  # the cookie value itself


class SessionMiddleware:
    """Wraps a WSGI application and puts its :class:`Session` at ``environ["session"]``.

    Keyword arguments override the environment variables of the same meaning
    (``secret`` is ``SESSION_SECRET``; ``max_age`` and ``absolute_timeout`` are in seconds,
    ``max_size`` in bytes; ``format="express"`` is ``SESSION_FORMAT=express``). With no
    ``store``, one is chosen from the environment by :func:`create_session_store`.
    """

    def __init__(
        self,
        app: WSGIApplication,
        store: SessionStore | None = None,
        *,
        secret: str | list[str] | None = None,
        max_age: float | None = None,
        absolute_timeout: float | None = None,
        max_size: int | None = None,
        cookie_name: str | None = None,
        cookie_path: str | None = None,
        cookie_domain: str | None = None,
        cookie_secure: bool | None = None,
        cookie_samesite: str | None = None,
        fail_on_store_error: bool | None = None,
        format: str | None = None,
    ) -> None:
        self.app = app
        self.settings = Settings.load(
            secret=secret,
            max_age=max_age,
            absolute_timeout=absolute_timeout,
            max_size=max_size,
            cookie_name=cookie_name,
            cookie_path=cookie_path,
            cookie_domain=cookie_domain,
            cookie_secure=cookie_secure,
            cookie_samesite=cookie_samesite,
            fail_on_store_error=fail_on_store_error,
            format=format,
        )
        self.store = store if store is not None else create_session_store(self.settings)
        self.express = self.settings.format == "express"
        # express-session's cookies and ids, stored under the id itself, as Node.js reads them
        self.signer: Signer | ExpressSigner = (ExpressSigner if self.express else Signer)(self.settings.secrets)
        self.new_id = new_express_id if self.express else new_id
        self.store_key = str if self.express else store_key
        # The expiry is extended at most once a minute (or every tenth of max_age).
        self.refresh_after = min(60.0, self.settings.max_age / 10)
        self._attributes = {secure: _cookie_attributes(self.settings, secure) for secure in (False, True)}
        self._verified: dict[str, Identity] = {}
        self._failures = _RateLimitedLog()
        self._tossing = _RateLimitedLog()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = _Request(self, environ, start_response)
        environ["session"] = request.session
        body = self.app(environ, request.start_response)
        if self.settings.fail_on_store_error:
            return request.replace_on_failure(body)
        return body

    def close(self) -> None:
        """Close the store (its connections and cleanup thread)."""
        self.store.close()

    # -- loading and saving ------------------------------------------------------------

    def cookie_values(self, environ: WSGIEnvironment) -> list[str]:
        """The values of the request's session cookies (a sibling domain may have added more than one)."""
        header = environ.get("HTTP_COOKIE")
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
            unsigned = self.signer.unsign(value)
            if unsigned is None:
                return None
            session_id, created, current = unsigned
            found = Identity(session_id, created, current, self.store_key(session_id), value)
            if len(self._verified) >= VERIFIED_CACHE:
                self._verified.clear()
            self._verified[value] = found
        return found

    def ttl(self, created: float | None) -> float:
        """How long a session created at ``created`` may live from now: idle timeout, capped by the
        absolute one (express-session's cookies carry no creation time, and have none)."""
        if created is None or self.express:
            return self.settings.max_age
        return min(self.settings.max_age, created + self.settings.absolute_timeout - time.time())

    def save(self, session: Session, environ: WSGIEnvironment, cookie: Identity | None, had_cookie: bool) -> Headers:
        """Write what the request changed and return the headers that go with it (``cookie``: the
        request's genuine session cookie, if any; ``had_cookie``: whether it carried one at all)."""
        loaded_id, data, store = session._loaded_id, session._loaded(), self.store
        # A session is loaded only through a verified cookie, which carries its store key.
        if loaded_id is None or cookie is None or session._id != loaded_id:  # a new record is needed
            encoded = self._encode_within_limit(data)  # before anything is deleted
            if loaded_id is not None:
                store.delete(cookie.key if cookie is not None else self.store_key(loaded_id))
            if not data:
                return [self.expired_cookie(environ)] if had_cookie else []
            session_id = session.id
            created: int | None = session._created or int(time.time())  # regenerate() keeps the lifetime
            store.create(self.store_key(session_id), encoded, self.ttl(created))
            session._created = created
            return [self.cookie(environ, session_id, created)]
        created, key = session._created, cookie.key
        if not data:
            store.delete(key)
            return [self.expired_cookie(environ)]
        changes, ttl = session.changes(), self.ttl(created)
        resign = not cookie.current  # signed with an older secret
        if changes.set or changes.deleted:
            self._check_size(session.texts(changes))
            extended = store.update(key, changes, ttl)
        elif resign or ttl - ((session._expires or 0) - time.time()) >= self.refresh_after:
            extended = store.touch(key, ttl)
        else:
            return []  # an unchanged read: nothing to write, no cookie
        # A session deleted meanwhile (a logout, or a login's regenerate() in another request)
        # stays deleted; no cookie either, so this response cannot undo the other's cookie.
        if not extended:
            return []
        # A value the current secret signed goes back as it came (the native format has one spelling).
        value = cookie.value if not resign and not self.express else None
        return [self.cookie(environ, loaded_id, created, value)]

    def _encode_within_limit(self, data: dict[str, Any]) -> dict[str, str]:
        """Every value as JSON, for a new record; see :meth:`_check_size`."""
        encoded = {k: encode(k, v) for k, v in data.items()}
        self._check_size(encoded)
        return encoded

    def _check_size(self, encoded: dict[str, str]) -> None:
        """Raise :class:`SessionTooLarge` when the session passes SESSION_MAX_SIZE (or, in the
        Node.js-compatible mode, holds express-session's own ``cookie`` key)."""
        if self.express and "cookie" in encoded:
            raise SessionValueError("session['cookie'] is express-session's own: use another key")
        size = len(json_object(encoded).encode(errors="surrogatepass"))
        if size > self.settings.max_size:
            raise SessionTooLarge(
                f"the session holds {size} bytes of JSON, over the limit of {self.settings.max_size} "
                "(SESSION_MAX_SIZE); nothing was saved"
            )

    def cookie(
        self, environ: WSGIEnvironment, session_id: str, created: int | None, value: str | None = None
    ) -> tuple[str, str]:
        """The Set-Cookie header that hands the session to the browser, for as long as it may live
        (``value``: the signed value, when the caller has it already)."""
        max_age = max(1, math.ceil(self.ttl(created)))
        expires = _http_date(int(time.time()) + max_age)
        value = value or self.signer.sign(session_id, created)
        return ("Set-Cookie", f"{self.settings.cookie_name}={value}; Expires={expires}; Max-Age={max_age}"
                              f"{self._attributes[self._secure(environ)]}")  # fmt: skip

    def expired_cookie(self, environ: WSGIEnvironment) -> tuple[str, str]:
        """The Set-Cookie header that makes the browser drop the session cookie."""
        return ("Set-Cookie", f"{self.settings.cookie_name}=; Expires={_http_date(0)}; Max-Age=0"
                              f"{self._attributes[self._secure(environ)]}")  # fmt: skip

    def _secure(self, environ: WSGIEnvironment) -> bool:
        secure = self.settings.cookie_secure
        return environ.get("wsgi.url_scheme") == "https" if secure is None else secure


def _cookie_attributes(settings: Settings, secure: bool) -> str:
    """What follows the value and the expiry in every Set-Cookie of this middleware."""
    domain = f"; Domain={settings.cookie_domain}" if settings.cookie_domain else ""
    flags = "; Secure; HttpOnly" if secure else "; HttpOnly"
    return f"{domain}; Path={settings.cookie_path}{flags}; SameSite={settings.cookie_samesite}"


@functools.lru_cache(maxsize=4)
def _http_date(seconds: int) -> str:
    """An HTTP date, formatted once per second (werkzeug's, which no locale changes)."""
    return http_date(seconds)


class _Request:
    """One request's session state: the lazy load, and the save when the response starts."""

    __slots__ = ("_start_response", "cookie", "environ", "failed", "had_cookie", "middleware", "replaced", "session")

    def __init__(self, middleware: SessionMiddleware, environ: WSGIEnvironment, start_response: StartResponse):
        self.middleware = middleware
        self.environ = environ
        self.session = Session(self.load, middleware.new_id)
        self.failed = False  # the store failed: the session is neither saved nor its cookie changed
        self.cookie: Identity | None = None  # the genuine session cookie it carried, if any
        self.had_cookie = False  # the request carried a session cookie, genuine or not
        self.replaced = False  # a 503 went out instead of the application's response
        self._start_response = start_response

    def load(self) -> Loaded:
        values = self.middleware.cookie_values(self.environ)
        self.had_cookie = bool(values)
        found = self.middleware.identify(values)
        if found is None:
            return Loaded(None, {})
        try:
            record = self.middleware.store.load(found.key)
        except StoreError as exc:
            self.fail("loading", exc)
            return Loaded(None, {})
        if record is None:
            return Loaded(None, {})
        self.cookie = found
        return Loaded(found.id, record.data, record.expires, found.created)

    def start_response(self, status: str, headers: Headers, exc_info: Any = None) -> Callable[[bytes], object]:
        session = self.session
        if not session._saved:
            session._saved = True  # from here on, changes are not saved (and say so)
            if session.accessed:
                headers = list(headers)  # the application's list may be shared between requests
                _add_vary_cookie(headers)
                if not self.failed:
                    try:
                        headers.extend(self.middleware.save(session, self.environ, self.cookie, self.had_cookie))
                    except StoreError as exc:
                        self.fail("saving", exc)
        if self.failed and self.middleware.settings.fail_on_store_error:
            self.replaced = True
            self._start_response("503 Service Unavailable", list(_UNAVAILABLE_HEADERS), exc_info)
            return _discard
        return self._start_response(status, headers, exc_info)

    def replace_on_failure(self, body: Iterable[bytes]) -> Iterator[bytes]:
        """Pass the body through, unless a 503 replaced the response (also when the
        application calls start_response lazily, from inside its body)."""
        chunks = iter(body)
        try:
            while not self.replaced:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    return
                if not self.replaced:
                    yield chunk
            yield _UNAVAILABLE
        finally:
            if hasattr(body, "close"):
                body.close()

    def fail(self, action: str, exc: StoreError) -> None:
        self.failed = True
        self.middleware._failures.report(f"Session store failed while {action} a session: %s", exc)


def _discard(data: bytes) -> None:
    pass


def _add_vary_cookie(headers: Headers) -> None:
    for index, (name, value) in enumerate(headers):
        if name.lower() == "vary":
            if "cookie" not in value.lower() and value.strip() != "*":
                headers[index] = (name, f"{value}, Cookie")
            return
    headers.append(("Vary", "Cookie"))


class _RateLimitedLog:
    """A WARNING that may repeat often (a store outage, an attack) logged at most once a
    minute, with a count of the repeats it held back."""

    def __init__(self, interval: float = 60.0) -> None:
        self._interval = interval
        self._next = 0.0
        self._suppressed = 0
        self._lock = threading.Lock()

    def report(self, message: str, *args: object) -> None:
        with self._lock:
            t = time.monotonic()
            if t < self._next:
                self._suppressed += 1
                return
            more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
            self._next, self._suppressed = t + self._interval, 0
        log.warning(message + more, *args)
