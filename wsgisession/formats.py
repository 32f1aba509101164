"""The two cookie formats: how a session id is made, signed into a cookie and filed in a store.

``native`` is this library's own; ``express`` is express-session's, so that one cookie logs a user in
on a Node.js application and on this one. Everything that differs between the two is here, in one
object, instead of a flag tested wherever it matters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from .signing import ExpressSigner, Signer, new_express_id, new_id, store_key


@dataclasses.dataclass(frozen=True)
class CookieFormat:
    """A cookie format's signer, ids, store keys and rules."""

    name: str
    signer: Signer | ExpressSigner
    new_id: Callable[[], str]
    store_key: Callable[[str], str]  # what a store files a session id under
    lifetime: bool  # cookies carry the creation time, so the absolute timeout holds
    canonical: bool  # a signed value has one spelling: a genuine current cookie can go back as it came
    reserved: frozenset[str] = frozenset()  # session keys the format keeps for itself

    def __repr__(self) -> str:
        return f"<CookieFormat {self.name}>"


def cookie_format(name: str, secrets: Sequence[str]) -> CookieFormat:
    """The format called ``name`` (``native`` or ``express``), signing with ``secrets`` (the first signs)."""
    if name == "express":  # ids stored as they are, as Node.js reads them; no creation time in the cookie
        return CookieFormat("express", ExpressSigner(secrets), new_express_id, str, lifetime=False,
                            canonical=False, reserved=frozenset({"cookie"}))  # fmt: skip
    if name == "native":
        return CookieFormat("native", Signer(secrets), new_id, store_key, lifetime=True, canonical=True)
    raise ValueError(f"unknown cookie format {name!r}: native or express")
