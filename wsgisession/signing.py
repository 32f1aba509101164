"""Session ids, their signed cookie form, and the one-way key a store files them under."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence

ID_BYTES = 32  # 256 bits of entropy
ID_LENGTH = 43  # len(secrets.token_urlsafe(32))
_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
COOKIE_LENGTH = 2 * ID_LENGTH + 1  # id "." signature, both 43 base64url characters


def new_id() -> str:
    """A fresh, unguessable session id."""
    return secrets.token_urlsafe(ID_BYTES)


def store_key(session_id: str) -> str:
    """What a store keys the session by: a dump of the store gives no usable cookie."""
    return hashlib.sha256(session_id.encode()).hexdigest()


class Signer:
    """Signs session ids with HMAC-SHA256; the first secret signs, every one verifies."""

    __slots__ = ("_keys",)

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("at least one secret is needed")
        # One key per secret, derived for this purpose only, so the application may use
        # the same SESSION_SECRET elsewhere without the two uses meeting.
        self._keys = [hmac.digest(s.encode(), b"wsgisession.cookie", "sha256") for s in secrets]

    def __repr__(self) -> str:
        return f"<Signer with {len(self._keys)} key(s)>"

    def sign(self, session_id: str) -> str:
        """The cookie value for ``session_id``."""
        return f"{session_id}.{self._signature(self._keys[0], session_id)}"

    def unsign(self, value: str) -> tuple[str, bool] | None:
        """Return ``(id, signed_with_current_key)`` for a genuine cookie value, else None.

        Anything of the wrong length or alphabet is refused before any HMAC is computed.
        """
        if (
            len(value) != COOKIE_LENGTH
            or not value.isascii()
            or value[ID_LENGTH] != "."
            or not _ALPHABET.issuperset(value[:ID_LENGTH])
        ):
            return None
        session_id, signature = value[:ID_LENGTH], value[ID_LENGTH + 1 :]
        for index, key in enumerate(self._keys):
            if hmac.compare_digest(signature, self._signature(key, session_id)):
                return session_id, index == 0
        return None

    @staticmethod
    def _signature(key: bytes, session_id: str) -> str:
        digest = hmac.digest(key, session_id.encode(), "sha256")
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
