"""Properties, checked with Hypothesis, of what an attacker controls (the Cookie header) and of
what an application stores (any JSON value).

- Parsing: no input makes SessionCore.cookie_values/identify or Signer.unsign raise, and a
  model of the header says exactly which session, if any, a request names.
- Signing: only a value minted by Signer.sign with a key of the list is accepted; no mutation of
  a minted value is, unless it is the same value.
- Data: every JSON value round-trips through Session, encode and a store record, type for type;
  NUL characters and lone surrogates, wherever they hide, are refused with SessionValueError.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from servers import SECRET

from wsgisession import MemoryStore, Session, SessionMiddleware, SessionValueError
from wsgisession.core import MAX_COOKIE_HEADER
from wsgisession.session import Loaded, encode
from wsgisession.signing import ID_LENGTH, Signer, new_id, store_key
from wsgisession.stores.base import Changes, decode_record, json_object

OLD_SECRET = "retired-secret-9876543210-ZYXWVUTSRQPONMLKJIHGFEDCBA"
REMOVED_SECRET = "removed-secret-abcdefghijklmnopqrstuvwxyz-0123456789"
NOW = int(time.time())
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = json.dumps(dict(environ["session"])).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


# Everything explicit: the environment of the run must not change what is tested.
STORE = MemoryStore()
MW = SessionMiddleware(
    _app, STORE, secret=[SECRET, OLD_SECRET], cookie_name="session", max_age=3600, absolute_timeout=86400
)
SIGNER = MW.core.format.signer

# Sessions that exist: each with its cookie signed by the current key and by the older one.
IDS = [new_id() for _ in range(3)]
for _index, _session_id in enumerate(IDS):
    STORE.create(store_key(_session_id), {"user": json.dumps(f"user{_index}")}, 3600)
MINTED = {Signer([secret]).sign(i, NOW): i for i in IDS for secret in (SECRET, OLD_SECRET)}
CURRENT = {Signer([SECRET]).sign(i, NOW) for i in IDS}
FOREIGN = {Signer([REMOVED_SECRET]).sign(i, NOW) for i in IDS}  # genuine-looking, but by a key not in the list
MINTED_LIST = sorted(MINTED)


# -- strategies -------------------------------------------------------------------------------------

any_char = st.characters(codec=None) | st.integers(0xD800, 0xDFFF).map(chr)  # lone surrogates too
any_text = st.text(any_char, max_size=300)
latin1 = st.binary(max_size=300).map(lambda b: b.decode("latin-1"))  # what a WSGI server puts in environ
utf8_escaped = st.binary(max_size=300).map(lambda b: b.decode("utf-8", "surrogateescape"))


@st.composite
def mutated(draw: st.DrawFn, value: str) -> str:
    """``value`` after one to four random edits (replace, insert, delete, truncate, swap case, re-quote)."""
    text = value
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "swapcase", "quote", "pad"]))
        pos = draw(st.integers(0, max(len(text) - 1, 0)))
        char = draw(any_char | st.sampled_from(list('AZaz09-_.=+/%" ;')))
        if op == "replace" and text:
            text = text[:pos] + char + text[pos + 1 :]
        elif op == "insert":
            text = text[:pos] + char + text[pos:]
        elif op == "delete" and text:
            text = text[:pos] + text[pos + 1 :]
        elif op == "truncate":
            text = text[:pos]
        elif op == "swapcase" and text:
            text = text[:pos] + text[pos].swapcase() + text[pos + 1 :]
        elif op == "quote":
            text = f'"{text}"'
        elif op == "pad":
            text += "=" * draw(st.integers(1, 2))
    return text


minted = st.sampled_from(MINTED_LIST)
near_miss = minted.flatmap(mutated)
cookie_value = st.one_of(
    minted,
    minted.map(lambda v: f'"{v}"'),
    minted.map(lambda v: f"  {v} "),
    near_miss,
    st.sampled_from(sorted(FOREIGN)),
    st.text(st.characters(codec=None, exclude_characters=";"), max_size=120),
)
cookie_name = st.sampled_from(["session", " session", "session ", "Session", "sessions", "other", "", "s"])


@st.composite
def cookie_header(draw: st.DrawFn) -> tuple[str, list[tuple[str, str]]]:
    """A Cookie header of a few name=value pairs, and those pairs."""
    pairs = draw(st.lists(st.tuples(cookie_name, cookie_value), max_size=5))
    pairs = [(n, v.replace(";", "")) for n, v in pairs]
    separator = draw(st.sampled_from(["; ", ";", " ; "]))
    return separator.join(f"{n}={v}" for n, v in pairs), pairs


def named_by(pairs: list[tuple[str, str]]) -> str | None:
    """The model: the session a header names. Values of the session cookie (surrounding blanks and
    double quotes aside, RFC 6265 allows a quoted value) that are exactly a minted value name its
    session; one session named, however often: that one; none, or several different ones: none."""
    named = set()
    for name, value in pairs:
        if name.strip() == "session" and value.strip().strip('"') in MINTED:
            named.add(MINTED[value.strip().strip('"')])
    return named.pop() if len(named) == 1 else None


# -- parsing never fails, and names exactly the session the model says ----------------------------


def _parse(header: str) -> tuple[list[str], tuple[str, int, bool] | None]:
    values = MW.core.cookie_values(header)
    assert isinstance(values, list) and all(isinstance(v, str) for v in values)
    for value in values:
        result = SIGNER.unsign(value)
        assert result is None or value in MINTED
    assert SIGNER.unsign(header) is None or header in MINTED
    found = MW.core.identify(values)
    assert found is None or (found[0] in IDS and found[1] == NOW)
    return values, found


@SETTINGS
@given(st.one_of(any_text, latin1, utf8_escaped))
def test_no_header_text_makes_the_cookie_path_raise(header: str) -> None:
    _, found = _parse(header)
    assert found is None  # random text names no session


@SETTINGS
@given(cookie_header())
def test_a_header_names_exactly_the_session_the_model_says(header_and_pairs: tuple[str, list[tuple[str, str]]]) -> None:
    header, pairs = header_and_pairs
    assume(len(header) <= MAX_COOKIE_HEADER)
    _, found = _parse(header)
    expected = named_by(pairs)
    assert (found[0] if found else None) == expected, header
    if found is not None:  # "not current" (the middleware re-signs) only when a value was signed with the older key
        values = [v.strip().strip('"') for n, v in pairs if n.strip() == "session"]
        assert found[2] in {value in CURRENT for value in values if value in MINTED}


@settings(max_examples=150, deadline=None)
@given(cookie_header())
def test_a_request_sees_only_the_session_its_cookie_names(header_and_pairs: tuple[str, list[tuple[str, str]]]) -> None:
    header, pairs = header_and_pairs
    assume(len(header) <= MAX_COOKIE_HEADER)
    started: list[Any] = []
    body = b"".join(MW({"HTTP_COOKIE": header}, lambda status, headers, exc=None: started.append(status)))
    assert started == ["200 OK"]
    expected = named_by(pairs)
    data = json.loads(body)
    assert data == ({} if expected is None else {"user": f"user{IDS.index(expected)}"})


# -- only minted values are accepted --------------------------------------------------------------


@SETTINGS
@given(minted.flatmap(lambda v: st.tuples(st.just(v), mutated(v))))
def test_no_mutation_of_a_minted_cookie_is_accepted(original_and_mutation: tuple[str, str]) -> None:
    original, value = original_and_mutation
    result = SIGNER.unsign(value)
    if value == original:
        assert result == (MINTED[original], NOW, original in CURRENT)
    else:
        assert result is None, (original, value)


@SETTINGS
@given(
    session_id=st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"),
                       min_size=ID_LENGTH, max_size=ID_LENGTH),
    created=st.integers(0, 10**12 - 1),
    position=st.integers(0, 2),
)  # fmt: skip
def test_a_value_minted_with_a_listed_key_is_accepted_and_only_then(
    session_id: str, created: int, position: int
) -> None:
    secrets = [SECRET, OLD_SECRET, REMOVED_SECRET]
    value = Signer([secrets[position]]).sign(session_id, created)
    listed = Signer([SECRET, OLD_SECRET])
    if position < 2:
        assert listed.unsign(value) == (session_id, created, position == 0)
    else:
        assert listed.unsign(value) is None  # a removed key no longer verifies


def test_the_signature_is_not_malleable_in_its_unused_bits() -> None:
    """43 base64 characters carry 258 bits for a 256-bit HMAC: a decoder would accept several last
    characters; the value is compared as text, so only the minted one is accepted."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for original in MINTED_LIST:
        accepted = [c for c in alphabet if SIGNER.unsign(original[:-1] + c) is not None]
        assert accepted == [original[-1]]


# -- session data round-trips ------------------------------------------------------------------------

good_char = st.characters(codec=None, exclude_categories=("Cs",), exclude_characters="\x00")
good_text = st.text(good_char, max_size=20)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), good_text
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(good_text, children, max_size=4),
    max_leaves=25,
)


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (1 is not 1.0 nor True; -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return bool(a == b)


@SETTINGS
@given(key=good_text, value=json_values)
def test_any_json_value_round_trips_through_the_session_and_a_record(key: str, value: Any) -> None:
    session = Session(lambda: Loaded(None, {}))
    session[key] = value
    text = session.changes().set[key]
    assert text == encode(key, value)
    assert same(json.loads(text), value)
    # As a store keeps it (a JSON object of the encoded values), then loaded into the next request's session.
    record = decode_record(json_object({key: text}), 0.0, "test")
    assert record is not None and same(record.data[key], value)
    loaded = Session(lambda: Loaded(new_id(), record.data, time.time() + 60, NOW))
    assert same(loaded[key], value)
    assert not loaded.modified
    assert loaded.changes() == Changes({}, ())


@settings(max_examples=100, deadline=None)
@given(value=json_values)
def test_any_json_value_round_trips_through_the_middleware(value: Any) -> None:
    store = MemoryStore()

    def write(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["session"]["v"] = value
        start_response("200 OK", [])
        return []

    got: list[Any] = []

    def read(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        got.append(environ["session"]["v"])
        start_response("200 OK", [])
        return []

    headers: list[tuple[str, str]] = []
    SessionMiddleware(write, store, secret=SECRET)({}, lambda s, h, e=None: headers.extend(h))
    cookie = next(v for n, v in headers if n == "Set-Cookie").split(";")[0]
    SessionMiddleware(read, store, secret=SECRET)({"HTTP_COOKIE": cookie}, lambda s, h, e=None: None)
    assert len(got) == 1 and same(got[0], value)


bad_char = st.sampled_from(["\x00", "\ud800", "\udfff", "\udc80"])
bad_text = st.tuples(good_text, bad_char, good_text).map("".join)


@st.composite
def poisoned(draw: st.DrawFn) -> Any:
    """A JSON-like value with a NUL or a lone surrogate somewhere: a string, a key, deep inside."""
    value: Any = draw(bad_text)
    for _ in range(draw(st.integers(0, 4))):
        siblings = draw(st.lists(json_values, max_size=2))
        if draw(st.booleans()):
            siblings.insert(draw(st.integers(0, len(siblings))), value)
            value = siblings
        else:
            key = draw(bad_text) if draw(st.integers(0, 4)) == 0 else draw(good_text)
            value = {**{f"s{i}": s for i, s in enumerate(siblings)}, key: value}
    return value


@SETTINGS
@given(value=poisoned())
def test_nul_and_lone_surrogates_are_refused_wherever_they_hide(value: Any) -> None:
    session = Session(lambda: Loaded(None, {"before": 1}))
    with pytest.raises(SessionValueError, match="'k'"):
        session["k"] = value
    assert "k" not in session and not session.modified


@SETTINGS
@given(bad_text)
def test_keys_with_nul_or_lone_surrogates_are_refused(key: str) -> None:
    session = Session(lambda: Loaded(None, {}))
    with pytest.raises(SessionValueError):
        session[key] = 1
    assert len(session) == 0


@SETTINGS
@given(st.lists(st.sampled_from(["\\", "u0000", "\\u0000", "\x00", '"', "a", "u", "0"]), max_size=12).map("".join))
def test_a_nul_is_refused_exactly_when_there_is_one(text: str) -> None:
    """The NUL check looks for an escaped NUL in JSON text; backslashes and the letters
    u0000 around it must neither hide a real NUL nor make one up."""
    session = Session(lambda: Loaded(None, {}))
    for target in ("value", "key"):
        if "\x00" in text:
            with pytest.raises(SessionValueError):
                if target == "value":
                    session["k"] = text
                else:
                    session[text] = 1
        elif target == "value":
            session["k"] = text
            assert json.loads(session.changes().set["k"]) == text
        else:
            session[text] = 1
            assert text in session
