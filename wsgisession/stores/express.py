"""The session document of express-session: the application's keys plus a ``cookie`` object.

The Redis and PostgreSQL stores of the Node.js-compatible mode write and read this
document, so that an Express application and this one share each other's sessions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from .base import Record, decode_record, json_object, log


class ExpressDocument:
    """Writes and reads sessions as express-session does, with the cookie settings it would store.

    A record without a ``cookie`` object crashes express-session, so every document written
    has one, and one read without it counts as no session.
    """

    def __init__(
        self,
        max_age: float,
        *,
        path: str = "/",
        domain: str | None = None,
        secure: bool | None = None,
        same_site: str | None = None,
    ) -> None:
        # express-session's own key order: originalMaxAge, expires, secure, httpOnly, domain, path, sameSite.
        self._before = {"originalMaxAge": round(max_age * 1000)}
        self._after: dict[str, Any] = {"secure": secure} if secure is not None else {}
        self._after["httpOnly"] = True
        if domain:
            self._after["domain"] = domain
        self._after["path"] = path
        if same_site:
            self._after["sameSite"] = same_site.lower()

    def cookie(self, expires: float) -> str:
        """The ``cookie`` object's JSON text for a session that expires at ``expires`` (Unix seconds)."""
        return json.dumps({**self._before, "expires": iso(expires), **self._after}, separators=(",", ":"))

    def dump(self, data: Mapping[str, str], expires: float) -> str:
        """The document for a session's JSON-encoded values."""
        return json_object({"cookie": self.cookie(expires), **data})

    def load(self, raw: Any, expires: float, source: str) -> Record | None:
        """The session in a stored document, or None (logged) for one express-session could not read."""
        record = decode_record(raw, expires, source)
        if record is None:
            return None
        if not isinstance(record.data.pop("cookie", None), dict):
            log.warning("Ignoring a session record without a cookie object in %s", source)
            return None
        return record


def iso(seconds: float) -> str:
    """A Unix time as JavaScript's ``Date.toJSON`` writes it: UTC, milliseconds, ``Z``."""
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
