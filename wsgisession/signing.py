"""Session ids, their signed cookie form, and the one-way key a store files them under."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence

ID_BYTES = 32  # 256 bits of entropy
ID_LENGTH = 43  # len(secrets.token_urlsafe(32))
SIGNATURE_LENGTH = 43  # an HMAC-SHA256 in base64url
_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
# id "." creation time (Unix seconds, at most 12 digits) "." signature
_SHORTEST, _LONGEST = ID_LENGTH + 3 + SIGNATURE_LENGTH, ID_LENGTH + 14 + SIGNATURE_LENGTH


def new_id() -> str:
    """A fresh, unguessable session id."""
    return secrets.token_urlsafe(ID_BYTES)


def store_key(session_id: str) -> str:
    """What a store keys the session by: a dump of the store gives no usable cookie."""
    return hashlib.sha256(session_id.encode()).hexdigest()


class Signer:
    """Signs session ids and their creation times with HMAC-SHA256; the first secret signs, every one verifies.

    The creation time travels signed in the cookie, so the server enforces a session's
    absolute lifetime without a store round trip and no client can extend it.
    """

    __slots__ = ("_keys",)

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("at least one secret is needed")
        # One key per secret, derived for this purpose only, so the application may use
        # the same SESSION_SECRET elsewhere without the two uses meeting.
        self._keys = [hmac.digest(s.encode(), b"wsgisession.cookie", "sha256") for s in secrets]

    def __repr__(self) -> str:
        return f"<Signer with {len(self._keys)} key(s)>"

    def sign(self, session_id: str, created: int) -> str:
        """The cookie value for the session ``session_id`` created at ``created`` (Unix seconds)."""
        payload = f"{session_id}.{created}"
        return f"{payload}.{self._signature(self._keys[0], payload)}"

    def unsign(self, value: str) -> tuple[str, int, bool] | None:
        """Return ``(id, created, signed_with_current_key)`` for a genuine cookie value, else None.

        Anything of the wrong length, shape or alphabet is refused before any HMAC is computed.
        """
        if not _SHORTEST <= len(value) <= _LONGEST or not value.isascii() or value[ID_LENGTH] != ".":
            return None
        payload, _, signature = value.rpartition(".")
        session_id, created = payload[:ID_LENGTH], payload[ID_LENGTH + 1 :]
        if len(signature) != SIGNATURE_LENGTH or not created.isdigit() or not _ALPHABET.issuperset(session_id):
            return None
        for index, key in enumerate(self._keys):
            if hmac.compare_digest(signature, self._signature(key, payload)):
                return session_id, int(created), index == 0
        return None

    @staticmethod
    def _signature(key: bytes, payload: str) -> str:
        digest = hmac.digest(key, payload.encode(), "sha256")
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
