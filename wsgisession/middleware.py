"""The WSGI middleware: the front door for Bottle and raw WSGI over :mod:`wsgisession.core`.

A request's session is loaded lazily (:meth:`wsgisession.core.Visit.load`) and saved when the
application calls ``start_response`` (:meth:`wsgisession.core.SessionCore.save`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .core import SessionCore, Visit, vary_with_cookie
from .detection import create_session_store
from .settings import Settings
from .stores.base import SessionStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

_UNAVAILABLE = b"Session store unavailable\n"
_UNAVAILABLE_HEADERS = (("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(_UNAVAILABLE))))
Headers = list[tuple[str, str]]


class SessionMiddleware:
    """Wraps a WSGI application and puts its :class:`~wsgisession.Session` at ``environ["session"]``.

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
        self.core = SessionCore(self.settings, self.store)
        self.users = self.core.users  # a user's sessions: listed, ended, limited

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = _Request(self.core, environ, start_response)
        environ["session"] = request.session
        body = self.app(environ, request.start_response)
        if self.settings.fail_on_store_error:
            return request.replace_on_failure(body)
        return body

    def close(self) -> None:
        """Close the store (its connections and cleanup thread)."""
        self.store.close()


class _Request:
    """One request through the middleware: its visit, and the save when the response starts."""

    __slots__ = ("_start_response", "core", "environ", "replaced", "session", "visit")

    def __init__(self, core: SessionCore, environ: WSGIEnvironment, start_response: StartResponse):
        self.core = core
        self.environ = environ
        self.visit: Visit = core.open(environ.get("HTTP_COOKIE"), environ.get("HTTP_USER_AGENT"),
                                      environ.get("REMOTE_ADDR"))  # fmt: skip
        self.session = core.session(self.visit)
        self.replaced = False  # a 503 went out instead of the application's response
        self._start_response = start_response

    def start_response(self, status: str, headers: Headers, exc_info: Any = None) -> Callable[[bytes], object]:
        session = self.session
        if not session.saved:
            accessed = session.accessed
            cookies = self.core.save(self.visit, session, secure=self.environ.get("wsgi.url_scheme") == "https")
            if accessed:
                headers = list(headers)  # the application's list may be shared between requests
                add_vary_cookie(headers)
                headers.extend(("Set-Cookie", value) for value in cookies)
        if self.visit.failed and self.core.settings.fail_on_store_error:
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


def _discard(data: bytes) -> None:
    pass


def add_vary_cookie(headers: Headers) -> None:
    """Add ``Cookie`` to the response's Vary header (a response that used the session differs per cookie)."""
    for index, (name, value) in enumerate(headers):
        if name.lower() == "vary":
            vary = vary_with_cookie(value)
            if vary is not None:
                headers[index] = (name, vary)
            return
    headers.append(("Vary", "Cookie"))
