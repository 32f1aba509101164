"""Session ids, their signed cookie form, and the one-way key a store files them under."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from urllib.parse import quote, unquote

ID_BYTES = 32  # 256 bits of entropy
ID_LENGTH = 43  # len(secrets.token_urlsafe(32))
SIGNATURE_LENGTH = 43  # an HMAC-SHA256 in base64url
_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
# id "." creation time (Unix seconds, at most 12 digits) "." signature
_SHORTEST, _LONGEST = ID_LENGTH + 3 + SIGNATURE_LENGTH, ID_LENGTH + 14 + SIGNATURE_LENGTH


def new_id() -> str:
    """A fresh, unguessable session id."""
    return secrets.token_urlsafe(ID_BYTES)


def new_express_id() -> str:
    """A session id as express-session makes them (uid-safe: 24 random bytes, 32 characters)."""
    return secrets.token_urlsafe(24)


def store_key(session_id: str) -> str:
    """What a store keys the session by: a dump of the store gives no usable cookie."""
    return hashlib.sha256(session_id.encode()).hexdigest()


class _Keys:
    """What both cookie formats share: one key per secret; the first signs, every one verifies."""

    __slots__ = ("_keys",)

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("at least one secret is needed")
        self._keys = keys

    def __repr__(self) -> str:
        return f"<{type(self).__name__} with {len(self._keys)} key(s)>"

    def _verified(self, signature: str, message: str) -> bool | None:
        """Whether ``signature`` is the first key's (True), another key's (False) or none's (None)."""
        for index, key in enumerate(self._keys):
            if hmac.compare_digest(signature, self._signature(key, message)):
                return index == 0
        return None

    @staticmethod
    def _signature(key: bytes, message: str) -> str:
        raise NotImplementedError


class Signer(_Keys):
    """Signs session ids and their creation times with HMAC-SHA256; the first secret signs, every one verifies.

    The creation time travels signed in the cookie, so the server enforces a session's
    absolute lifetime without a store round trip and no client can extend it.
    """

    __slots__ = ()

    def __init__(self, secrets: Sequence[str]) -> None:
        # One key per secret, derived for this purpose only, so the application may use
        # the same SESSION_SECRET elsewhere without the two uses meeting.
        super().__init__([hmac.digest(s.encode(), b"wsgisession.cookie", "sha256") for s in secrets])

    def sign(self, session_id: str, created: int | None) -> str:
        """The cookie value for the session ``session_id`` created at ``created`` (Unix seconds)."""
        if created is None:
            raise ValueError("this cookie format needs the session's creation time")
        payload = f"{session_id}.{created}"
        return f"{payload}.{self._signature(self._keys[0], payload)}"

    def unsign(self, value: str) -> tuple[str, int | None, bool] | None:
        """Return ``(id, created, signed_with_current_key)`` for a genuine cookie value, else None.

        Anything of the wrong length, shape or alphabet is refused before any HMAC is computed.
        """
        if not _SHORTEST <= len(value) <= _LONGEST or not value.isascii() or value[ID_LENGTH] != ".":
            return None
        payload, _, signature = value.rpartition(".")
        session_id, created = payload[:ID_LENGTH], payload[ID_LENGTH + 1 :]
        if len(signature) != SIGNATURE_LENGTH or not created.isdigit() or not _ALPHABET.issuperset(session_id):
            return None
        current = self._verified(signature, payload)
        return None if current is None else (session_id, int(created), current)

    @staticmethod
    def _signature(key: bytes, payload: str) -> str:
        digest = hmac.digest(key, payload.encode(), "sha256")
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


_EXPRESS_ID = re.compile(r"[A-Za-z0-9_-]{8,128}")


class ExpressSigner(_Keys):
    """Signs ids exactly as express-session does (its cookie-signature module), so that one
    cookie logs a user in on a Node.js application and on this one.

    The value is ``s:`` + id + ``.`` + the HMAC-SHA256 of the id keyed with the secret itself,
    in standard base64 without ``=`` padding, URL-encoded as ``encodeURIComponent`` does.
    Such a cookie carries no creation time: this format has no absolute lifetime.
    """

    __slots__ = ()

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__([s.encode() for s in secrets])

    def sign(self, session_id: str, created: int | None = None) -> str:
        """The (URL-encoded) cookie value for ``session_id``."""
        return quote(f"s:{session_id}.{self._signature(self._keys[0], session_id)}", safe="-_.!~*'()")

    def unsign(self, value: str) -> tuple[str, int | None, bool] | None:
        """Return ``(id, None, signed_with_current_key)`` for a genuine cookie value, else None."""
        if len(value) > 512:
            return None
        value = unquote(value)
        if not value.startswith("s:") or not value.isascii():
            return None
        session_id, _, signature = value[2:].rpartition(".")
        if not _EXPRESS_ID.fullmatch(session_id):
            return None
        current = self._verified(signature, session_id)
        return None if current is None else (session_id, None, current)

    @staticmethod
    def _signature(key: bytes, session_id: str) -> str:
        return base64.b64encode(hmac.digest(key, session_id.encode(), "sha256")).rstrip(b"=").decode()
