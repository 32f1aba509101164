"""The session object an application sees: a dict of JSON values that knows what it changed."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator, MutableMapping
from json.encoder import encode_basestring
from typing import Any, NamedTuple

from .signing import new_id
from .stores.base import USER_KEY, Changes, bound_user

log = logging.getLogger("wsgisession")

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_lenient = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_IMMUTABLE = (str, int, float, bool, type(None))
_SCALARS = {None: "null", True: "true", False: "false"}
MAX_DEPTH = 100  # levels of nested lists and dicts in one value
_UNCHANGED = Changes({})
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")  # an escaped NUL, not an escaped backslash before "u0000"


class Loaded(NamedTuple):
    """What a session loader returns: the stored session's id (None when there is none),
    its data, its expiry and creation time (Unix seconds)."""

    id: str | None
    data: dict[str, Any]
    expires: float | None = None
    created: int | None = None


class SessionValueError(TypeError):
    """A session value that JSON cannot hold; the message names the key."""


class SessionTooLarge(SessionValueError):
    """The session's JSON passes SESSION_MAX_SIZE; the message gives both sizes."""


def encode(key: str, value: Any) -> str:
    """The JSON text of one session value, or :class:`SessionValueError` naming ``key``."""
    try:
        text = _scalar(value)
        if text is None:
            if isinstance(value, (dict, list, tuple)):
                _check_container(value, MAX_DEPTH)
            text = _encoder.encode(value)
        return _storable(text)
    except (TypeError, ValueError) as exc:
        raise SessionValueError(f"session[{key!r}] cannot be stored as JSON: {exc}") from None


def measure(value: Any) -> str:
    """The JSON text of a value as it stands, to compare or size it. Unlike :func:`encode` it takes
    what another application may have stored (NaN, a NUL, a lone surrogate); it is never written."""
    text = _scalar(value)
    return _lenient.encode(value) if text is None else text


def _scalar(value: Any) -> str | None:
    """The JSON text of the common scalars, without the encoder's overhead; None for the rest."""
    kind = type(value)
    if kind is int:
        return int.__repr__(value)
    if kind is bool or value is None:
        return _SCALARS[value]
    if kind is str:
        return encode_basestring(value)
    return None


def _check_container(value: dict[Any, Any] | list[Any] | tuple[Any, ...], depth: int) -> None:
    """Refuse what JSON would silently change (a non-str key becomes a str) or what nests too deep."""
    if depth == 0:
        raise ValueError(f"it nests deeper than {MAX_DEPTH} levels")
    items = value.values() if isinstance(value, dict) else value
    if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
        raise TypeError("its dicts may only have str keys")
    for item in items:
        if isinstance(item, (dict, list, tuple)):
            _check_container(item, depth - 1)


class Codec:
    """How session values become JSON text and back. This one is plain JSON; a front door may tag
    richer types (Flask's session takes tuples, bytes, datetimes) by overriding the three methods."""

    def encode(self, key: str, value: Any) -> str:
        """The JSON text to store for ``value``, or :class:`SessionValueError` naming ``key``."""
        return encode(key, value)

    def measure(self, value: Any) -> str:
        """A JSON text of ``value`` as it stands, to tell whether it changed (see :func:`measure`)."""
        return measure(value)

    def load(self, data: dict[str, Any]) -> dict[str, Any]:
        """The values an application sees, from a stored session's decoded JSON."""
        return data


JSON = Codec()


def _storable(text: str) -> str:
    """``text``, if every store can hold it: no NUL (PostgreSQL refuses it), valid UTF-8."""
    if "\\u0000" in text and _NUL.search(text):
        raise ValueError("it contains a NUL character")
    text.encode()  # a lone surrogate raises UnicodeEncodeError, a ValueError
    return text


class Session(MutableMapping[str, Any]):
    """One request's session. It loads on first use and remembers, per key, what it was
    when loaded, so that the middleware writes only the keys this request changed.
    """

    __slots__ = (
        "_before", "_codec", "_created", "_data", "_expires", "_id", "_load", "_loaded_id", "_new", "_new_id",
        "_saved",
    )  # fmt: skip

    def __init__(
        self, load: Callable[[], tuple[Any, ...]], new_id: Callable[[], str] = new_id, codec: Codec = JSON
    ) -> None:
        """``load`` returns a :class:`Loaded` (or a tuple of its first fields), called on first use;
        ``new_id`` makes ids; ``codec`` turns values into JSON text and back."""
        self._load = load
        self._new_id = new_id
        self._codec = codec
        self._data: dict[str, Any] | None = None
        # JSON text at load time (None: absent) of every key this request may have changed.
        self._before: dict[str, str | None] = {}
        self._id: str | None = None
        self._loaded_id: str | None = None
        self._expires: float | None = None
        self._created: int | None = None
        self._new = True
        self._saved = False

    def __repr__(self) -> str:
        state = "not loaded" if self._data is None else f"{len(self._data)} keys"
        return f"<Session {state}>"

    # -- the data ----------------------------------------------------------------------

    def _loaded(self) -> dict[str, Any]:
        """The data, loaded on first use."""
        data = self._data
        if data is None:
            loaded = self._load()
            if type(loaded) is not Loaded:
                loaded = Loaded(*loaded)
            self._loaded_id, data, self._expires, self._created = loaded
            data = self._codec.load(data)
            self._id, self._new, self._data = self._loaded_id, self._loaded_id is None, data
        return data

    def __getitem__(self, key: str) -> Any:
        value = self._loaded()[key]
        if not isinstance(value, _IMMUTABLE) and key not in self._before:
            self._before[key] = self._codec.measure(value)  # the app may mutate it in place
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"session keys must be str, not {type(key).__name__}")
        try:
            _storable(_encoder.encode(key))
        except ValueError as exc:
            raise SessionValueError(f"session key {key!r} cannot be stored: {exc}") from None
        self._codec.encode(key, value)  # fail here, at the line that stored it
        data = self._loaded()
        self._remember(key, data)
        data[key] = value
        self._warn_if_saved()

    def __delitem__(self, key: str) -> None:
        data = self._loaded()
        if key not in data:
            raise KeyError(key)
        self._remember(key, data)
        del data[key]
        self._warn_if_saved()

    def __contains__(self, key: object) -> bool:
        return key in self._loaded()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self._loaded() else default

    def clear(self) -> None:
        for key in list(self._loaded()):
            del self[key]

    # -- identity and lifecycle --------------------------------------------------------

    @property
    def id(self) -> str:
        """The session id (the cookie's, or a fresh one for a new session)."""
        self._loaded()
        if self._id is None:
            self._id = self._new_id()
        return self._id

    @property
    def new(self) -> bool:
        """True when the request brought no live session, or after :meth:`invalidate`."""
        self._loaded()
        return self._new

    @property
    def loaded_id(self) -> str | None:
        """The id of the stored session this request loaded; None when it brought none."""
        self._loaded()
        return self._loaded_id

    @property
    def renewed(self) -> bool:
        """True when saving needs a new record: none was loaded, or :meth:`regenerate` or
        :meth:`invalidate` dropped the one that was."""
        self._loaded()
        return self._loaded_id is None or self._id != self._loaded_id

    @property
    def created(self) -> int | None:
        """When the session was created (Unix seconds); None for a new one until it is saved."""
        self._loaded()
        return self._created

    @created.setter
    def created(self, created: int) -> None:
        self._created = created

    @property
    def expires(self) -> float | None:
        """When the stored session expires, as loaded (Unix seconds); None for a new one."""
        self._loaded()
        return self._expires

    @property
    def saved(self) -> bool:
        """True once the response has started: later changes are not saved (and say so)."""
        return self._saved

    def mark_saved(self) -> None:
        """Note that the response started; the front door calls it once, as it saves."""
        self._saved = True

    @property
    def modified(self) -> bool:
        """True when saving will write: data changed, or the id did."""
        if self._data is None:
            return False
        if self._loaded_id is not None and self._id != self._loaded_id:
            return True
        changes = self.changes()
        return bool(changes.set or changes.deleted)

    @property
    def accessed(self) -> bool:
        """True once the request has used the session (so it was loaded)."""
        return self._data is not None

    @property
    def user_id(self) -> str | None:
        """The user :meth:`login` bound this session to, or None."""
        return bound_user(self._loaded())

    @property
    def binding(self) -> dict[str, Any] | None:
        """A copy of the session's binding to its user (``id``, ``login`` and ``seen`` times...), or None."""
        binding = self._loaded().get(USER_KEY)
        return dict(binding) if isinstance(binding, dict) else None

    def login(self, user_id: str | int) -> None:
        """Log ``user_id`` in: a fresh id, as :meth:`regenerate` gives, bound to the user, who can then
        see this session in their list and end it (see :class:`wsgisession.users.UserSessions`)."""
        self.regenerate()
        self[USER_KEY] = {"id": str(user_id), "login": int(time.time())}

    def regenerate(self) -> None:
        """Give the session a fresh id, keeping its data; the old id stops working. Call it at login."""
        self._loaded()
        self._id = self._new_id()
        self._warn_if_saved()

    def invalidate(self) -> None:
        """End the session: it is deleted from the store and its cookie expired. Call it at logout."""
        self._loaded().clear()
        self._before.clear()
        self._id, self._new, self._created = None, True, None
        self._warn_if_saved()

    def changes(self) -> Changes:
        """The keys set (as JSON text) and deleted since the session was loaded."""
        data = self._loaded()
        if not self._before:
            return _UNCHANGED
        changed: dict[str, str] = {}
        deleted = []
        for key, before in self._before.items():
            if key not in data:
                if before is not None:
                    deleted.append(key)
                continue
            value = data[key]
            try:
                unchanged = self._codec.measure(value) == before  # as loaded, even if another app stored it
            except (TypeError, ValueError):
                unchanged = False
            if not unchanged:
                changed[key] = self._codec.encode(key, value)  # what is written must be storable
        return Changes(changed, tuple(deleted))

    def texts(self, changes: Changes) -> dict[str, str]:
        """The JSON text of every value once ``changes`` (from :meth:`changes`) are stored; what
        this request read and left as it was is not encoded again."""
        before, measure = self._before, self._codec.measure
        return {k: changes.set.get(k) or before.get(k) or measure(v) for k, v in self._loaded().items()}

    def encoded(self) -> dict[str, str]:
        """The JSON text of every value, for a new record (:class:`SessionValueError` for one that has none)."""
        encode = self._codec.encode
        return {k: encode(k, v) for k, v in self._loaded().items()}

    def _remember(self, key: str, data: dict[str, Any]) -> None:
        if key not in self._before:
            self._before[key] = self._codec.measure(data[key]) if key in data else None

    def _warn_if_saved(self) -> None:
        if self._saved:
            log.warning("The session changed after the response started; this change is not saved")
