"""Session ids, their signed cookie values, and the one-way store key."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from servers import SECRET

from wsgisession.signing import ID_LENGTH, Signer, new_id, store_key

OTHER_SECRET = "another-secret-9876543210-ZYXWVUTSRQPONMLKJIHGFEDCBA"
URLSAFE = re.compile(r"[A-Za-z0-9_-]+")


def test_ids_are_43_url_safe_characters_and_unique() -> None:
    ids = {new_id() for _ in range(2000)}
    assert len(ids) == 2000
    for session_id in ids:
        assert len(session_id) == ID_LENGTH == 43
        assert URLSAFE.fullmatch(session_id)


T = 1_795_000_000  # a creation time, in Unix seconds
COOKIE_LENGTH = ID_LENGTH + 1 + len(str(T)) + 1 + 43


def test_sign_unsign_round_trip() -> None:
    signer = Signer([SECRET])
    session_id = new_id()
    value = signer.sign(session_id, T)
    assert len(value) == COOKIE_LENGTH == 98
    assert value.startswith(f"{session_id}.{T}.")
    assert URLSAFE.fullmatch(value.replace(".", ""))
    assert signer.unsign(value) == (session_id, T, True)
    # Deterministic: the same session signs the same way (the cookie does not change on every touch).
    assert signer.sign(session_id, T) == value


def test_first_secret_signs_every_secret_verifies() -> None:
    old, new = Signer([OTHER_SECRET]), Signer([SECRET, OTHER_SECRET])
    session_id = new_id()
    old_value = old.sign(session_id, T)
    assert new.unsign(old_value) == (session_id, T, False)  # accepted, but signed with an older key
    new_value = new.sign(session_id, T)
    assert new_value != old_value
    assert Signer([SECRET]).unsign(new_value) == (session_id, T, True)
    assert old.unsign(new_value) is None  # the new signature is made with the first secret only
    # Once the old secret is removed from the list, its cookies stop verifying.
    assert Signer([SECRET]).unsign(old_value) is None


def test_other_secret_does_not_verify() -> None:
    session_id = new_id()
    assert Signer([SECRET]).unsign(Signer([OTHER_SECRET]).sign(session_id, T)) is None


def _flip(char: str) -> str:
    return "A" if char != "A" else "B"


def test_tampered_values_are_refused() -> None:
    signer = Signer([SECRET])
    session_id, other_id = new_id(), new_id()
    value = signer.sign(session_id, T)
    signature = value[-43:]
    tampered = [
        value[:-1] + _flip(value[-1]),  # signature changed
        _flip(value[0]) + value[1:],  # id changed
        f"{other_id}.{T}.{signature}",  # another id with this id's signature
        f"{session_id}.{T}." + signer.sign(other_id, T)[-43:],  # this id with another's signature
        f"{session_id}.{T}.{signature.swapcase()}",
        f"{session_id}.{T + 86400}.{signature}",  # a later creation time: a longer life
        f"{session_id}.{T - 1}.{signature}",
    ]
    for candidate in tampered:
        assert signer.unsign(candidate) is None, candidate


def test_malformed_values_are_refused_without_exceptions() -> None:
    signer = Signer([SECRET])
    session_id = new_id()
    value = signer.sign(session_id, T)
    signature = value[-43:]
    malformed = [
        "",
        ".",
        "..",
        value[:-1],  # truncated
        value[:ID_LENGTH],  # the bare id
        value + "A",  # too long
        value + value,
        value.replace(".", "A"),  # no separator
        value[:10] + "." + value[11:],  # separator in the wrong place (and none where it belongs)
        f"{session_id}..{signature}",  # no creation time
        f"{session_id}.-5.{signature}",
        f"{session_id}.1e9.{signature}",
        f"{session_id}.{'9' * 13}.{signature}",  # more than 12 digits
        f"{session_id}.{T}{signature}",  # one separator only
        "é" + value[1:],  # non-ASCII, right length
        value[:-1] + "é",  # non-ASCII in the signature
        value[:-1] + "\x00",  # NUL in the signature
        "\x00" + value[1:],  # NUL in the id
        "+" + value[1:],  # outside the url-safe alphabet (standard base64)
        "/" + value[1:],
        "=" * COOKIE_LENGTH,
        value[:-1] + "=",
        value[:-1] + "\udcff",  # a lone surrogate (undecodable bytes decoded with surrogateescape)
        " " * COOKIE_LENGTH,
        "😀" * COOKIE_LENGTH,
    ]
    for candidate in malformed:
        assert signer.unsign(candidate) is None, repr(candidate)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | st.text(min_size=COOKIE_LENGTH, max_size=COOKIE_LENGTH))
def test_unsign_never_raises_on_arbitrary_text(text: str) -> None:
    assert Signer([SECRET, OTHER_SECRET]).unsign(text) is None


def test_signer_needs_a_secret() -> None:
    with pytest.raises(ValueError):
        Signer([])


def test_signer_repr_has_no_secret() -> None:
    signer = Signer([SECRET, OTHER_SECRET])
    text = repr(signer) + str(signer)
    assert SECRET not in text
    assert OTHER_SECRET not in text
    assert "2 key" in text


def test_store_key_is_not_the_id_and_is_stable() -> None:
    session_id = new_id()
    key = store_key(session_id)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert session_id not in key
    assert key == store_key(session_id)  # stable across calls (and processes: no per-process salt)
    assert key == store_key(str(session_id))
    assert store_key(new_id()) != key
    # The signed cookie value does not lead to the same key either.
    assert store_key(Signer([SECRET]).sign(session_id, T)) != key


def test_store_key_known_value() -> None:
    # Fixed across processes and releases: sessions survive restarts and are shared by workers.
    assert store_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
