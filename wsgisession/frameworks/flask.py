"""Flask's own session API over wsgisession: ``flask.session`` is a server-side session.

    app = Flask(__name__)
    app.config.from_prefixed_env()  # or any way of filling app.config
    init_app(app)                   # reads the settings, detects the store (logged)

``flash()``, Flask-Login and Flask-WTF use ``flask.session`` and work unchanged. Flask's cookie settings
(``SESSION_COOKIE_*``, ``PERMANENT_SESSION_LIFETIME``, ``SECRET_KEY``...) are read as Flask reads them,
per request; wsgisession's own variables (``SESSION_SECRET``, ``REDIS_URL``...) once, from ``app.config``
over the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flask.json.tag import TaggedJSONSerializer
from flask.sessions import SessionInterface as FlaskSessionInterface
from flask.sessions import SessionMixin, session_json_serializer

from ..core import SessionCore, Visit, vary_with_cookie
from ..detection import create_session_store
from ..session import Codec, Session, encode, measure
from ..settings import NAMES, Settings, framework_secrets
from ..stores.base import SessionStore
from ..users import UserSessions

if TYPE_CHECKING:
    from flask import Flask
    from flask.wrappers import Request, Response

__all__ = ["FlaskSession", "SessionInterface", "TaggedCodec", "init_app"]

# Flask's settings of the session cookie and its secret, read on every request as Flask does.
FLASK_SETTINGS = (
    "SESSION_COOKIE_NAME", "SESSION_COOKIE_DOMAIN", "SESSION_COOKIE_PATH", "SESSION_COOKIE_HTTPONLY",
    "SESSION_COOKIE_SECURE", "SESSION_COOKIE_SAMESITE", "SESSION_COOKIE_PARTITIONED", "APPLICATION_ROOT",
    "PERMANENT_SESSION_LIFETIME", "SECRET_KEY", "SECRET_KEY_FALLBACKS",
)  # fmt: skip
_PLAIN = (str, int, float, bool, type(None))  # exact types that Flask's tags leave as they are


class TaggedCodec(Codec):
    """Values as Flask's own session takes them: its tagged JSON (tuple, bytes, ``Markup``, ``UUID``,
    ``datetime``, and any tag registered on the serializer) is what the store holds."""

    def __init__(self, serializer: TaggedJSONSerializer = session_json_serializer) -> None:
        self.serializer = serializer

    def encode(self, key: str, value: Any) -> str:
        return encode(key, value if type(value) in _PLAIN else self.serializer.tag(value))

    def measure(self, value: Any) -> str:
        return measure(value if type(value) in _PLAIN else self.serializer.tag(value))

    def load(self, data: dict[str, Any]) -> dict[str, Any]:
        return {key: self.untag(value) for key, value in data.items()}

    def untag(self, value: Any) -> Any:
        """A stored value with its tags, nested ones too, turned back into Python values."""
        if isinstance(value, dict):
            return self.serializer.untag({key: self.untag(item) for key, item in value.items()})
        if isinstance(value, list):
            return [self.untag(item) for item in value]
        return value


class FlaskSession(Session, SessionMixin):  # type: ignore[override]  # Session's properties replace the mixin's flags
    """``flask.session``: a :class:`~wsgisession.Session` (``regenerate()`` at login, ``invalidate()`` at
    logout) with Flask's ``permanent`` (the ``_permanent`` key). It loads on first use."""

    __slots__ = ("core", "https", "visit")

    def __init__(self, core: SessionCore, visit: Visit, https: bool) -> None:
        super().__init__(visit.load, core.format.new_id, core.codec)
        self.core = core  # the core of the settings the request began with
        self.visit = visit
        self.https = https

    @property
    def accessed(self) -> bool:
        """True once the request used the session's data (so it was loaded)."""
        return super().accessed

    @accessed.setter
    def accessed(self, value: bool) -> None:
        """Ignored: Flask sets it at every mention of ``flask.session``; what counts is whether it was loaded."""

    @property
    def modified(self) -> bool:
        """True when saving will write: a value changed (in place too), or the id did."""
        return super().modified

    @modified.setter
    def modified(self, value: bool) -> None:
        """Ignored: Flask code sets it after changing a nested value, a change found here anyway."""


class SessionInterface(FlaskSessionInterface):
    """Flask's session interface over a wsgisession store: the settings are read, and the store
    detected (or ``store`` taken), when it is built; a missing or weak secret raises :class:`ConfigError`."""

    serializer = session_json_serializer  # tags registered on it (as with Flask's own session) apply
    session_class = FlaskSession

    def __init__(self, app: Flask, store: SessionStore | None = None) -> None:
        self.codec = TaggedCodec(self.serializer)
        self._variables = _variables(app.config)
        flask_settings = _flask_settings(app)
        settings = self._settings(app)
        self.store = store if store is not None else create_session_store(settings)
        self._current = (flask_settings, SessionCore(settings, self.store, self.codec))

    @property
    def core(self) -> SessionCore:
        """The core of the settings read last."""
        return self._current[1]

    @property
    def users(self) -> UserSessions:
        """A user's sessions: listed, ended, limited."""
        return self._current[1].users

    def core_for(self, app: Flask) -> SessionCore:
        """The core for the app's settings now: Flask reads its own on every request, so a change
        (in a test, say) builds a new core over the same store."""
        flask_settings, core = self._current
        now = _flask_settings(app)
        if now != flask_settings:
            core = SessionCore(self._settings(app), self.store, self.codec)
            self._current = (now, core)
        return core

    def open_session(self, app: Flask, request: Request) -> FlaskSession:
        core = self.core_for(app)
        environ = request.environ
        visit = core.open(environ.get("HTTP_COOKIE"), environ.get("HTTP_USER_AGENT"), request.remote_addr)
        return self.session_class(core, visit, request.is_secure)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        if not isinstance(session, FlaskSession):
            return
        loaded = session.accessed
        cookies = session.core.save(
            session.visit,
            session,
            secure=session.https,
            persistent=loaded and session.permanent,
            refresh=bool(app.config["SESSION_REFRESH_EACH_REQUEST"]),
        )
        vary = vary_with_cookie(response.headers.get("Vary")) if loaded else None
        if vary is not None:  # not response.vary.add(): it parses the header into a set and back
            response.headers["Vary"] = vary
        for cookie in cookies:
            response.headers.add("Set-Cookie", cookie)

    def close(self) -> None:
        """Close the store (its connections and cleanup thread)."""
        self.store.close()

    def _settings(self, app: Flask) -> Settings:
        """wsgisession's variables, with Flask's settings over them where the app changed Flask's defaults."""
        config, variables = app.config, self._variables

        def changed(name: str) -> bool:
            return bool(config.get(name) != app.default_config.get(name))

        lifetime = app.permanent_session_lifetime
        our_max_age = variables.get("SESSION_MAX_AGE") and lifetime == app.default_config["PERMANENT_SESSION_LIFETIME"]
        root = config.get("APPLICATION_ROOT") if changed("APPLICATION_ROOT") else None
        return Settings.load(
            variables,
            secret=None if variables.get("SESSION_SECRET") else _secret_key(config),
            max_age=None if our_max_age else lifetime.total_seconds(),
            cookie_name=config.get("SESSION_COOKIE_NAME") if changed("SESSION_COOKIE_NAME") else None,
            cookie_domain=config.get("SESSION_COOKIE_DOMAIN") or None,
            cookie_path=config.get("SESSION_COOKIE_PATH") or root,
            cookie_httponly=None if config.get("SESSION_COOKIE_HTTPONLY") else False,
            cookie_secure=True if config.get("SESSION_COOKIE_SECURE") else None,  # else Secure on https
            cookie_samesite=config.get("SESSION_COOKIE_SAMESITE") or None,  # Flask's None: Lax
            cookie_partitioned=True if config.get("SESSION_COOKIE_PARTITIONED") else None,
        )


def init_app(app: Flask, store: SessionStore | None = None) -> SessionInterface:
    """Make ``flask.session`` a wsgisession session; call it once ``app.config`` is filled."""
    interface = SessionInterface(app, store)
    app.session_interface = interface
    return interface


def _flask_settings(app: Flask) -> tuple[Any, ...]:
    """Flask's settings of the session cookie as they stand (to tell when they changed)."""
    return tuple(map(app.config.get, FLASK_SETTINGS))


def _secret_key(config: Mapping[str, Any]) -> list[str]:
    """Flask's SECRET_KEY then SECRET_KEY_FALLBACKS, checked as SESSION_SECRET is."""
    return framework_secrets("Flask", config.get("SECRET_KEY"), config.get("SECRET_KEY_FALLBACKS") or ())


def _variables(config: Mapping[str, Any]) -> dict[str, Any]:
    """wsgisession's variables: the environment's, under ``app.config``'s (Flask's settings are read apart)."""
    ours = {name: value for name, value in config.items() if name in NAMES and name not in FLASK_SETTINGS}
    return {**os.environ, **ours}
