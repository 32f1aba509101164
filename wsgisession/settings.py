"""Settings from the environment (or any mapping) and keyword arguments, validated once.

A bad value stops start-up with a message naming the variable, instead of failing at the first
request.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .stores.pg_driver import EXTRAS
from .stores.sql import TABLE_NAME

log = logging.getLogger("wsgisession")

MIN_SECRET_LENGTH = 32
COOKIE_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # an RFC 6265 token
_KNOWN_WEAK = {"secret", "changeme", "change-me", "your-secret-key", "keyboard cat", "development", "password"}
GENERATE_SECRET = "python -c 'import secrets; print(secrets.token_urlsafe(48))'"  # told wherever one is missing
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
STORES = ("redis", "postgres", "sqlite", "memory")
SHORT_SESSION = 900  # seconds: a timeout under this, from the environment, is said at start-up


class ConfigError(ValueError):
    """A setting is missing or invalid; the message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting, resolved: explicit arguments over environment variables over defaults."""

    secrets: tuple[str, ...] = dataclasses.field(repr=False)
    max_age: float = 86400.0
    absolute_timeout: float = 7 * 86400.0
    max_size: int = 65536
    cookie_name: str = "session"
    cookie_path: str = "/"
    cookie_domain: str | None = None
    cookie_secure: bool | None = None  # None: Secure when the request came over https
    cookie_samesite: str = "Lax"
    cookie_httponly: bool = True
    cookie_partitioned: bool = False  # CHIPS: a cookie of its own per top-level site
    fail_on_store_error: bool = False
    format: str = "native"
    store: str | None = None
    redis_url: str | None = dataclasses.field(default=None, repr=False)
    database_url: str | None = dataclasses.field(default=None, repr=False)
    sqlite_path: str = "wsgisession.sqlite3"
    table: str = "wsgisession"
    redis_prefix: str = "sess:"
    store_timeout: float = 1.0
    cleanup_interval: float = 120.0
    probe_interval: float = 1.0
    latency_budget: float = 0.1
    pg_prepare: bool = True
    pg_driver: str | None = None  # None: psycopg 3 when installed, else psycopg2
    max_per_user: int = 0  # 0: no limit
    client_details: bool = False  # keep each logged-in session's user agent and IP, for the user's list
    migrate_from: str | None = dataclasses.field(default=None, repr=False)  # the store sessions move from
    encryption_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)  # the first seals, all open

    @classmethod
    def load(cls, environ: Mapping[str, Any] | None = None, **overrides: Any) -> Settings:
        """Read the ``SESSION_*``, ``REDIS_URL`` and ``DATABASE_URL`` variables (from the environment, or
        any mapping of those names: a framework's settings), then apply ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, (variable, parse) in _VARIABLES.items():
            found = env.get(variable)
            raw = "" if found is None else str(found).strip()
            if raw:
                try:
                    values[name] = parse(raw)
                except ValueError as exc:
                    raise ConfigError(f"{variable}: {exc}") from None
                if parse is _milliseconds and values[name] < SHORT_SESSION:  # perhaps a seconds habit
                    log.warning("%s=%s gives sessions of %g seconds: it is in milliseconds (as express-session's "
                                "maxAge); for %s seconds, write %s000",
                                variable, raw, values[name], raw, raw)  # fmt: skip
        secret = overrides.pop("secret", None)
        if secret is not None:
            values["secrets"] = (secret,) if isinstance(secret, str) else tuple(secret)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("cookie_domain"):  # a leading dot means nothing to browsers (werkzeug drops it too)
            values["cookie_domain"] = values["cookie_domain"].lstrip(".") or None
        if "cookie_samesite" in values:
            values["cookie_samesite"] = values["cookie_samesite"].capitalize()
        if values.get("format") == "express":  # express-session's and connect-pg-simple's names
            values.setdefault("cookie_name", "connect.sid")
            values.setdefault("table", "session")
        if "secrets" not in values:
            raise ConfigError(
                f"SESSION_SECRET is not set. Set it to a long random string, for example: {GENERATE_SECRET}"
            )
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Raise :class:`ConfigError` for any value that cannot work."""
        check_secrets(self.secrets)
        if self.encryption_keys:
            self._check_encryption()
        if self.max_age <= 0 or self.absolute_timeout <= 0:
            raise ConfigError("SESSION_MAX_AGE and SESSION_ABSOLUTE_TIMEOUT must be positive")
        if self.max_per_user < 0:
            raise ConfigError("SESSION_MAX_PER_USER must be 0 (no limit) or more")
        if self.max_size < 1024:
            raise ConfigError("SESSION_MAX_SIZE must be at least 1024 bytes")
        if self.cookie_samesite not in ("Lax", "Strict", "None"):
            raise ConfigError("SESSION_COOKIE_SAMESITE must be Lax, Strict or None")
        if self.cookie_samesite == "None" and self.cookie_secure is not True:
            raise ConfigError("SESSION_COOKIE_SAMESITE=None needs SESSION_COOKIE_SECURE=true (browsers require it)")
        if self.cookie_partitioned and self.cookie_secure is not True:
            raise ConfigError("SESSION_COOKIE_PARTITIONED needs SESSION_COOKIE_SECURE=true (browsers require it)")
        if not COOKIE_NAME.fullmatch(self.cookie_name):
            raise ConfigError(f"SESSION_COOKIE_NAME {self.cookie_name!r} is not a valid cookie name")
        if not self.cookie_path.startswith("/"):
            raise ConfigError("SESSION_COOKIE_PATH must start with /")
        prefix = self.cookie_name.lower()  # browsers match the prefixes case-insensitively
        if prefix.startswith(("__host-", "__secure-")) and self.cookie_secure is not True:
            raise ConfigError(
                f"a cookie named {self.cookie_name} needs SESSION_COOKIE_SECURE=true (browsers require it)"
            )
        if prefix.startswith("__host-") and (self.cookie_path != "/" or self.cookie_domain):
            raise ConfigError(
                f"a cookie named {self.cookie_name} needs SESSION_COOKIE_PATH=/ and no SESSION_COOKIE_DOMAIN"
            )
        if self.format not in ("native", "express"):
            raise ConfigError(f"SESSION_FORMAT must be native or express, not {self.format!r}")
        if self.pg_driver not in (None, *EXTRAS):
            raise ConfigError(f"SESSION_PG_DRIVER must be psycopg (psycopg 3) or psycopg2, not {self.pg_driver!r}")
        if self.store is not None and self.store not in STORES:
            raise ConfigError(f"SESSION_STORE must be one of {', '.join(STORES)}, not {self.store!r}")
        if not TABLE_NAME.fullmatch(self.table):
            raise ConfigError(f"SESSION_TABLE {self.table!r} is not a table name: use letters, digits and _")
        if min(self.store_timeout, self.probe_interval, self.latency_budget) <= 0 or self.cleanup_interval < 0:
            raise ConfigError(
                "SESSION_STORE_TIMEOUT, SESSION_PROBE_INTERVAL and SESSION_LATENCY_BUDGET must be positive, "
                "SESSION_CLEANUP_INTERVAL not negative"
            )

    def _check_encryption(self) -> None:
        """SESSION_ENCRYPTION_KEY: keys as strong as SESSION_SECRET and none of its ("none" first turns it off)."""
        keys = self.encryption_keys
        if keys[0] == "none" and len(keys) == 1:
            raise ConfigError("SESSION_ENCRYPTION_KEY=none: remove it instead, or list the keys that still open "
                              "stored values after it (none,KEY)")  # fmt: skip
        check_secrets(keys[1:] if keys[0] == "none" else keys, "SESSION_ENCRYPTION_KEY")
        if set(keys) & set(self.secrets):
            raise ConfigError("SESSION_ENCRYPTION_KEY must differ from SESSION_SECRET: one key, one purpose")
        if self.format == "express":
            raise ConfigError("SESSION_ENCRYPTION_KEY cannot be used with SESSION_FORMAT=express: express-session "
                              "(Node.js) could not read the encrypted values")  # fmt: skip


def check_secrets(secrets: Sequence[str], variable: str = "SESSION_SECRET") -> None:
    """Raise :class:`ConfigError` unless every secret is long and random enough."""
    if not secrets:
        raise ConfigError(f"{variable} is empty. Set it to a long random string, for example: {GENERATE_SECRET}")
    for position, secret in enumerate(secrets, 1):
        noun = "secret" if variable == "SESSION_SECRET" else "key"
        where = variable + (f" ({noun} {position} of the list)" if len(secrets) > 1 else "")
        if secret.strip().lower() in _KNOWN_WEAK or len(set(secret)) < 8:
            raise ConfigError(f"{where} is a well-known or trivial value. Generate one with: {GENERATE_SECRET}")
        if len(secret) < MIN_SECRET_LENGTH:
            raise ConfigError(
                f"{where} is too short ({len(secret)} characters; at least {MIN_SECRET_LENGTH} random ones "
                f"are needed). Generate one with: {GENERATE_SECRET}"
            )


def framework_secrets(framework: str, key: Any, fallbacks: Iterable[Any]) -> list[str]:
    """A framework's SECRET_KEY then its SECRET_KEY_FALLBACKS (the first signs, all verify), for when
    SESSION_SECRET is not set: checked as SESSION_SECRET is, with messages that say where they came from."""
    if not key:
        raise ConfigError(
            f"Neither SESSION_SECRET nor SECRET_KEY is set: {framework}'s session cookies need a secret. "
            f"Set one to a long random string, for example: {GENERATE_SECRET}"
        )
    secrets = [k.hex() if isinstance(k, bytes) else str(k) for k in (key, *fallbacks)]
    try:
        check_secrets(secrets)
    except ConfigError as exc:
        raise ConfigError(
            f"SESSION_SECRET is not set, so {framework}'s SECRET_KEY (then SECRET_KEY_FALLBACKS) signs the "
            f"session cookies, and it is refused: {exc}"
        ) from None
    return secrets


def _milliseconds(raw: str) -> float:
    return int(raw) / 1000


def _flag(raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"expected true or false, not {raw!r}")


def _secure(raw: str) -> bool | None:
    return None if raw.lower() == "auto" else _flag(raw)


def _key_list(raw: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in raw.split(",") if s.strip())


_VARIABLES: dict[str, tuple[str, Any]] = {
    "secrets": ("SESSION_SECRET", _key_list),
    "max_age": ("SESSION_MAX_AGE", _milliseconds),
    "absolute_timeout": ("SESSION_ABSOLUTE_TIMEOUT", _milliseconds),
    "max_size": ("SESSION_MAX_SIZE", int),
    "cookie_name": ("SESSION_COOKIE_NAME", str),
    "cookie_path": ("SESSION_COOKIE_PATH", str),
    "cookie_domain": ("SESSION_COOKIE_DOMAIN", str),
    "cookie_secure": ("SESSION_COOKIE_SECURE", _secure),
    "cookie_samesite": ("SESSION_COOKIE_SAMESITE", str),  # capitalised in Settings.load, as the argument
    "cookie_httponly": ("SESSION_COOKIE_HTTPONLY", _flag),
    "cookie_partitioned": ("SESSION_COOKIE_PARTITIONED", _flag),
    "fail_on_store_error": ("SESSION_FAIL_ON_STORE_ERROR", _flag),
    "format": ("SESSION_FORMAT", str.lower),
    "store": ("SESSION_STORE", str.lower),
    "redis_url": ("REDIS_URL", str),
    "database_url": ("DATABASE_URL", str),
    "sqlite_path": ("SESSION_SQLITE_PATH", str),
    "table": ("SESSION_TABLE", str),
    "redis_prefix": ("SESSION_REDIS_PREFIX", str),
    "store_timeout": ("SESSION_STORE_TIMEOUT", float),
    "cleanup_interval": ("SESSION_CLEANUP_INTERVAL", float),
    "probe_interval": ("SESSION_PROBE_INTERVAL", float),
    "latency_budget": ("SESSION_LATENCY_BUDGET", float),
    "pg_prepare": ("SESSION_PG_PREPARE", _flag),
    "pg_driver": ("SESSION_PG_DRIVER", str.lower),
    "max_per_user": ("SESSION_MAX_PER_USER", int),
    "client_details": ("SESSION_CLIENT_DETAILS", _flag),
    "migrate_from": ("SESSION_MIGRATE_FROM", str),
    "encryption_keys": ("SESSION_ENCRYPTION_KEY", _key_list),
}


NAMES = frozenset(variable for variable, _ in _VARIABLES.values())  # every variable read


def prefixed(mapping: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The variables a framework's settings give under ``prefix``, by their environment names:
    ``wsgisession.secret`` is ``SESSION_SECRET``, ``wsgisession.redis_url`` is ``REDIS_URL``."""
    found = {}
    for variable, _ in _VARIABLES.values():
        key = prefix + variable.lower().removeprefix("session_")
        if mapping.get(key) not in (None, ""):
            found[variable] = mapping[key]
    return found


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``, for logs and messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable URL>"
