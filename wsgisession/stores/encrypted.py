"""Session values encrypted at rest: a store wrapper that seals each value on its own.

Each value is sealed with AES-256-GCM (``cryptography``) under the first of the configured keys,
its additional data the session's store key and the value's name: a value copied to another
session, or under another name, does not open. Values are sealed one by one, so stores still
merge per key. What stays readable: the names of the values, their sizes, the expiry, and the
user binding (:data:`USER_KEY`: the user id, login and last-seen times), which the stores index; the
client's details in it (user agent and IP) are sealed.

A sealed value is stored as a JSON string: :data:`MARK`, then the base64 of the key's id (4
bytes), the nonce (12) and the ciphertext with its tag. Nonces are a per-process random prefix
(drawn again in each forked child) and a counter, so they never repeat under a key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .base import (
    USER_KEY,
    Changes,
    Copy,
    RateLimitedLog,
    Record,
    SessionStore,
    UserRecord,
    after_fork,
    encode_values,
    json_value,
)

#: What a sealed value's text starts with: a noncharacter no value of an application begins with.
MARK = "\ufdd0" + "1"
#: The first entry of SESSION_ENCRYPTION_KEY that writes values in the clear (to turn encryption off).
NONE = "none"
_MARK_JSON = '"\\ufdd01'
_COUNTER_LIMIT = 2**32
#: What a user binding holds of the client (with SESSION_CLIENT_DETAILS): personal data, sealed too.
CLIENT = ("agent", "ip")
_REMEMBERED = 4096  # opened values a Cipher remembers: a session read again opens nothing again
_REMEMBERED_SIZE = 1024  # ... of at most this many characters each (at most 4 MiB in all)
REWRITE_ATTEMPTS = 3  # a session that changes between each read and swap more often is left for the next run


class Cipher:
    """Seals and opens single values under a list of keys: the first seals (None: values are written
    in the clear), every key opens."""

    _next: tuple[bytes, Iterator[int]]  # the nonces' prefix, and the counter after it

    def __init__(self, keys: Sequence[str]) -> None:
        derived = [(_key_id(secret), AESGCM(_derive(secret))) for secret in keys if secret != NONE]
        self._openers = dict(derived)
        self._texts: dict[tuple[str, str, str], str] = {}  # what values opened to, by (store key, name, value)
        self._sealer = None if keys[0] == NONE else derived[0]
        self._new_prefix()
        after_fork(self, Cipher._new_prefix)

    @property
    def seals(self) -> bool:
        """Whether values are written sealed (False when turning encryption off)."""
        return self._sealer is not None

    def seal(self, key: str, name: str, text: str) -> str:
        """The JSON text that stores ``text`` (a value's JSON text) sealed, bound to ``key`` and ``name``."""
        assert self._sealer is not None
        key_id, aead = self._sealer
        nonce = self._nonce()
        sealed = aead.encrypt(nonce, text.encode(), _bound(key, name))
        encoded = binascii.b2a_base64(key_id + nonce + sealed, newline=False).decode()
        self._remember((key, name, MARK + encoded), text)  # read next by this process: nothing to open
        return f'{_MARK_JSON}{encoded}"'

    def open(self, key: str, name: str, value: str) -> Any:
        """The value a sealed one holds; raises ValueError when no key opens it as this key's ``name``."""
        found = (key, name, value)
        text = self._texts.get(found)
        if text is None:
            try:
                raw = binascii.a2b_base64(value[len(MARK) :])  # no alphabet check: the tag authenticates what it gives
                text = self._openers[raw[:4]].decrypt(raw[4:16], raw[16:], _bound(key, name)).decode()
            except (KeyError, InvalidTag, ValueError) as exc:  # ValueError: not ASCII, a nonce cut short
                raise ValueError(f"no configured key opens it ({type(exc).__name__})") from None
            self._remember(found, text)
        return json_value(text)

    def is_current(self, value: Any) -> bool:
        """Whether a stored value is as this cipher writes it: sealed under its first key (in the clear
        when it writes values in the clear)."""
        sealed = isinstance(value, str) and value.startswith(MARK)
        if self._sealer is None:
            return not sealed
        return sealed and _key_of(value) == self._sealer[0]

    def rewritten(self, key: str, name: str, value: Any) -> str:
        """The JSON text of a stored value as this cipher writes it now: opened if sealed, then sealed under
        the first key (or left in the clear); raises ValueError when no key opens it."""
        if isinstance(value, str) and value.startswith(MARK):
            value = self.open(key, name, value)
        text = encode_values({name: value})[name]
        return self.seal(key, name, text) if self._sealer is not None else text

    def _remember(self, found: tuple[str, str, str], text: str) -> None:
        """Keep what a value opens to (a bounded number of them: all are dropped when full)."""
        if len(text) > _REMEMBERED_SIZE:
            return
        if len(self._texts) >= _REMEMBERED:
            self._texts.clear()
        self._texts[found] = text

    def _nonce(self) -> bytes:
        prefix, counter = self._next  # one read: a prefix never meets another prefix's counter
        n = next(counter)
        if n >= _COUNTER_LIMIT:
            with self._lock:
                if self._next[1] is counter:
                    self._next = os.urandom(8), itertools.count()
            return self._nonce()
        return prefix + n.to_bytes(4, "big")

    def _new_prefix(self) -> None:
        self._lock = threading.Lock()
        self._next = os.urandom(8), itertools.count()


class EncryptedStore(SessionStore):
    """``store`` with every value sealed by ``cipher`` but the user binding; values stored in the clear
    (before encryption was turned on) are read as they are. A value no key opens reads as absent."""

    def __init__(self, store: SessionStore, cipher: Cipher) -> None:
        self.store = store
        self.cipher = cipher
        self.name = store.name
        self._refused = RateLimitedLog()

    def load(self, key: str) -> Record | None:
        record = self.store.load(key)
        return None if record is None else self._opened(key, record)

    def create(self, key: str, data: Mapping[str, str], ttl: float) -> None:
        self.store.create(key, self._sealed(key, data), ttl)

    def update(self, key: str, changes: Changes, ttl: float) -> bool:
        return self.store.update(key, Changes(self._sealed(key, changes.set), changes.deleted), ttl)

    def touch(self, key: str, ttl: float) -> bool:
        return self.store.touch(key, ttl)

    def delete(self, key: str) -> None:
        self.store.delete(key)

    def delete_many(self, keys: Sequence[str]) -> None:
        self.store.delete_many(keys)

    def add(self, key: str, data: Mapping[str, str], expires: float) -> bool:
        return self.store.add(key, self._sealed(key, data), expires)

    def add_many(self, sessions: Sequence[Copy]) -> int:
        return self.store.add_many([(key, self._sealed(key, data), expires) for key, data, expires in sessions])

    def scan(self, batch: int = 1000) -> Iterator[list[tuple[str, Record]]]:
        for found in self.store.scan(batch):
            yield [(key, self._opened(key, record)) for key, record in found]

    def count(self) -> int:
        return self.store.count()

    def user_sessions(self, user: str) -> list[UserRecord]:
        records = self.store.user_sessions(user)
        for record in records:
            self._open_binding(record.key, record.binding)
        return records

    def trim_user(self, user: str, limit: int, keep: str | None = None) -> list[str]:
        return self.store.trim_user(user, limit, keep)

    def ping(self) -> None:
        self.store.ping()

    def setup(self) -> None:
        self.store.setup()

    def cleanup(self) -> int:
        return self.store.cleanup()

    def close(self) -> None:
        self.store.close()

    def status(self) -> dict[str, Any]:
        return self.store.status()

    def _sealed(self, key: str, data: Mapping[str, str]) -> Mapping[str, str]:
        if not self.cipher.seals:
            return data
        seal = self.cipher.seal
        return {name: self._sealed_binding(key, text) if name == USER_KEY else seal(key, name, text)
                for name, text in data.items()}  # fmt: skip

    def _sealed_binding(self, key: str, text: str) -> str:
        """A binding's JSON text with the client's details sealed (the stores read only the rest)."""
        binding = json_value(text)
        if not isinstance(binding, dict) or not any(field in binding for field in CLIENT):
            return text
        for field in CLIENT:
            if field in binding:
                sealed = self.cipher.seal(key, f"{USER_KEY}.{field}", encode_values({field: binding[field]})[field])
                binding[field] = json_value(sealed)
        return encode_values({USER_KEY: binding})[USER_KEY]

    def _opened(self, key: str, record: Record) -> Record:
        data = record.data
        for name, value in list(data.items()):
            if isinstance(value, str) and value.startswith(MARK):
                try:
                    data[name] = self.cipher.open(key, name, value)
                except ValueError as exc:
                    del data[name]
                    self._refused.report("Ignoring the value %r of a session: %s", name, exc)
            elif name == USER_KEY and isinstance(value, dict):
                self._open_binding(key, value)
        return record

    def _open_binding(self, key: str, binding: dict[str, Any]) -> None:
        """Open the client's details in a binding, in place (a detail no key opens becomes "")."""
        for field in CLIENT:
            value = binding.get(field)
            if isinstance(value, str) and value.startswith(MARK):
                try:
                    binding[field] = self.cipher.open(key, f"{USER_KEY}.{field}", value)
                except ValueError as exc:
                    binding[field] = ""
                    self._refused.report("Ignoring the %s of a session's user binding: %s", field, exc)


class Rewrite(NamedTuple):
    """What re-encrypting some sessions did."""

    rewritten: int = 0  # sessions whose values were rewritten
    unreadable: int = 0  # values no configured key opens, left as they are
    busy: int = 0  # sessions that kept changing while they were rewritten, left for the next run


def reencrypt(store: SessionStore, cipher: Cipher, sessions: Sequence[tuple[str, Record]]) -> Rewrite:
    """Rewrite the values of ``sessions`` (as ``store``, the store under any EncryptedStore, gives them)
    that ``cipher`` would not write as they are. Each session's values are swapped only if they are
    still the ones read (:meth:`SessionStore.replace`), so a request's write in between is never undone."""
    done = Rewrite()
    for key, record in sessions:
        for _ in range(REWRITE_ATTEMPTS):
            stale = {name: value for name, value in record.data.items()
                     if name != USER_KEY and not cipher.is_current(value)}  # fmt: skip
            new, unreadable = {}, 0
            for name, value in stale.items():
                try:
                    new[name] = cipher.rewritten(key, name, value)
                except ValueError:
                    unreadable += 1
            if not new or store.replace(key, encode_values({name: stale[name] for name in new}), new):
                done = done._replace(rewritten=done.rewritten + bool(new), unreadable=done.unreadable + unreadable)
                break
            reread = store.load(key)
            if reread is None:
                break
            record = reread
        else:
            done = done._replace(busy=done.busy + 1)
    return done


def _derive(secret: str) -> bytes:
    """The AES-256 key of a configured key (HKDF-SHA256: any long random string will do)."""
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"wsgisession value encryption v1").derive(secret.encode())


def _key_id(secret: str) -> bytes:
    """Four bytes that name a key in what it sealed (not the key: a hash of another derivation)."""
    return hashlib.sha256(b"wsgisession key id\0" + secret.encode()).digest()[:4]


def _key_of(value: str) -> bytes:
    """The id of the key that sealed a value (its first 4 bytes, in its first 8 base64 characters)."""
    try:
        return base64.b64decode(value[len(MARK) : len(MARK) + 8])[:4]
    except binascii.Error:
        return b""


def _bound(key: str, name: str) -> bytes:
    """What a value is bound to: its session's store key and its name."""
    return f"{key}\0{name}".encode()
