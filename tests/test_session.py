"""The Session object on its own: lazy loading, change tracking, JSON-only values, id lifecycle."""

from __future__ import annotations

import datetime
import decimal
import json
import math
from collections.abc import Callable
from typing import Any

import pytest

from wsgisession import Session, SessionValueError
from wsgisession.session import Loaded
from wsgisession.signing import ID_LENGTH, new_id


class Loader:
    """The load callable a Session is given, counting its calls."""

    def __init__(self, session_id: str | None = None, data: dict[str, Any] | None = None) -> None:
        self.session_id = session_id
        self.data = {} if data is None else data
        self.calls = 0

    def __call__(self) -> Loaded:
        self.calls += 1
        # A fresh copy, as a store returns: the session's in-place changes must be found by diffing.
        return Loaded(self.session_id, json.loads(json.dumps(self.data)))


def unchanged(session: Session) -> bool:
    changes = session.changes()
    return not changes.set and not changes.deleted


def stored(data: dict[str, Any]) -> tuple[Session, Loader, str]:
    session_id = new_id()
    loader = Loader(session_id, data)
    return Session(loader), loader, session_id


def test_nothing_loads_until_first_use() -> None:
    loader = Loader()
    session = Session(loader)
    assert not session.accessed
    assert not session.modified  # not even loaded
    assert "not loaded" in repr(session)
    assert loader.calls == 0
    assert session.get("x") is None
    assert session.accessed
    len(session)
    "x" in session  # noqa: B015
    list(session)
    assert loader.calls == 1  # loaded once, then kept


@pytest.mark.parametrize(
    "use",
    [
        lambda s: s["a"],
        lambda s: s.get("a"),
        lambda s: "a" in s,
        lambda s: len(s),
        lambda s: list(s),
        lambda s: s.id,
        lambda s: s.new,
        lambda s: s.setdefault("b", 1),
    ],
)
def test_every_kind_of_use_loads(use: Callable[[Session], Any]) -> None:
    session, loader, _ = stored({"a": 1})
    use(session)
    assert loader.calls == 1
    assert session.accessed


def test_new_session() -> None:
    session = Session(Loader())
    assert session.new
    assert len(session) == 0
    first = session.id
    assert len(first) == ID_LENGTH
    assert session.id == first  # one id for the whole request
    assert unchanged(session)  # an id alone is nothing to save


def test_loaded_session() -> None:
    session, _, session_id = stored({"user": "ann", "n": 1})
    assert not session.new
    assert session.id == session_id
    assert dict(session) == {"user": "ann", "n": 1}
    assert unchanged(session)


def test_reading_is_not_a_change() -> None:
    session, _, _ = stored({"cart": [1, 2], "prefs": {"a": {"b": 1}}, "n": 3})
    assert session["cart"] == [1, 2]
    assert session.get("prefs") == {"a": {"b": 1}}
    assert dict(session.items())["n"] == 3
    list(session.values())
    assert unchanged(session)


def test_setting_the_same_value_is_not_a_change() -> None:
    session, _, _ = stored({"n": 3, "cart": [1]})
    session["n"] = 3
    session["cart"] = [1]
    assert unchanged(session)


def test_only_changed_keys_are_reported() -> None:
    session, _, _ = stored({"a": 1, "b": 2, "c": 3})
    session["a"] = 10
    del session["b"]
    session["d"] = "new"
    changes = session.changes()
    assert dict(changes.set) == {"a": "10", "d": '"new"'}
    assert changes.deleted == ("b",)
    assert session.modified


def test_nested_change_in_place_is_detected() -> None:
    session, _, _ = stored({"cart": [1], "prefs": {"theme": {"color": "red"}}})
    session["cart"].append(2)
    session["prefs"]["theme"]["color"] = "blue"
    changes = session.changes()
    assert json.loads(changes.set["cart"]) == [1, 2]
    assert json.loads(changes.set["prefs"]) == {"theme": {"color": "blue"}}
    assert session.modified


def test_nested_change_through_get_values_items_and_setdefault() -> None:
    session, _, _ = stored({"a": [], "b": [], "c": [], "d": {}})
    session.get("a").append(1)
    next(v for k, v in session.items() if k == "b").append(2)
    for value in session.values():
        if isinstance(value, dict):
            value["x"] = 1
    session.setdefault("e", []).append(5)
    assert {k: json.loads(v) for k, v in session.changes().set.items()} == {"a": [1], "b": [2], "d": {"x": 1}, "e": [5]}


def test_set_then_delete_a_new_key_is_no_change() -> None:
    session, _, _ = stored({"a": 1})
    session["tmp"] = 1
    del session["tmp"]
    assert unchanged(session)


def test_delete_and_restore_is_no_change() -> None:
    session, _, _ = stored({"a": [1, 2]})
    value = session.pop("a")
    session["a"] = value
    assert unchanged(session)


def test_delete_missing_key_raises_key_error() -> None:
    session, _, _ = stored({"a": 1})
    with pytest.raises(KeyError):
        del session["missing"]
    assert session.pop("missing", "default") == "default"
    assert unchanged(session)


def test_clear_deletes_every_key() -> None:
    session, _, _ = stored({"a": 1, "b": 2})
    session.clear()
    assert len(session) == 0
    assert sorted(session.changes().deleted) == ["a", "b"]


@pytest.mark.parametrize(
    "value",
    [
        object(),
        b"bytes",
        {1, 2},
        datetime.datetime(2024, 1, 1),
        decimal.Decimal("1.5"),
        {"nested": [object()]},
        {(1, 2): "tuple key"},
        math.nan,
        math.inf,
        -math.inf,
        [1.0, math.nan],
    ],
    ids=repr,
)
def test_value_json_cannot_hold_fails_at_the_assignment_naming_the_key(value: Any) -> None:
    session, _, _ = stored({"cart": [1]})
    with pytest.raises(SessionValueError) as info:
        session["cart"] = value
    assert "'cart'" in str(info.value)
    assert isinstance(info.value, TypeError)  # code that catches TypeError keeps working
    assert session["cart"] == [1]  # the failed assignment changed nothing
    assert unchanged(session)


def test_value_error_on_a_new_key_leaves_it_absent() -> None:
    session, _, _ = stored({})
    with pytest.raises(SessionValueError, match="when"):
        session["when"] = datetime.date.today()
    assert "when" not in session
    assert unchanged(session)


@pytest.mark.parametrize("key", [1, None, b"k", ("a",), 1.5])
def test_keys_must_be_str(key: Any) -> None:
    session, _, _ = stored({})
    with pytest.raises(TypeError, match="str"):
        session[key] = 1
    assert len(session) == 0


def test_json_values_are_accepted() -> None:
    session, _, _ = stored({})
    value = {"s": "é✓", "i": 2**62, "f": 1.5, "b": True, "n": None, "l": [1, "x", [], {}], "u": "\x01"}
    session["v"] = value
    assert json.loads(session.changes().set["v"]) == value


def test_regenerate_gives_a_new_id_and_keeps_the_data() -> None:
    session, _, old_id = stored({"user": "ann"})
    session.regenerate()
    assert session.id != old_id
    assert len(session.id) == ID_LENGTH
    assert dict(session) == {"user": "ann"}
    assert session.modified  # the id changed: the middleware must save under the new id
    assert not session.new


def test_regenerate_new_session() -> None:
    session = Session(Loader())
    first = session.id
    session.regenerate()
    assert session.id != first


def test_invalidate_clears_data_and_makes_the_session_new() -> None:
    session, _, old_id = stored({"user": "ann", "cart": [1]})
    session.invalidate()
    assert session.new
    assert len(session) == 0
    assert session.modified
    assert session.id != old_id  # data set after a logout goes to a new session
    session["flash"] = "bye"
    assert dict(session) == {"flash": "bye"}


def test_repr_does_not_show_values() -> None:
    session, _, session_id = stored({"password": "hunter2-secret-value"})
    session.get("password")
    text = repr(session)
    assert "hunter2" not in text
    assert session_id not in text
    assert "1 keys" in text


def test_modified_is_false_until_something_changes() -> None:
    # Session.modified is public API: an application may use it to decide whether to act.
    new = Session(Loader())
    new.get("x")
    _ = new.id
    assert unchanged(new)
    assert not new.modified
    loaded, _, _ = stored({"cart": [1]})
    loaded["cart"]
    loaded["cart"] = [1]
    assert unchanged(loaded)
    assert not loaded.modified
    loaded["cart"].append(2)
    assert loaded.modified


@pytest.mark.parametrize("value", ["a\x00b", {"nested": ["\x00"]}, "lone \ud800 surrogate"], ids=repr)
def test_values_no_store_can_hold_are_refused_at_assignment(value: object) -> None:
    """PostgreSQL cannot store NUL and no store can hold a lone surrogate: refused for every store alike."""
    session = Session(lambda: Loaded(None, {}))
    with pytest.raises(SessionValueError, match="'k'"):
        session["k"] = value
    assert "k" not in session


def test_a_backslash_before_u0000_is_ordinary_text() -> None:
    session = Session(lambda: Loaded(None, {}))
    session["k"] = "C:\\u0000"
    assert session.changes().set == {"k": '"C:\\\\u0000"'}


@pytest.mark.parametrize("key", ["a\x00", "\udc00"], ids=repr)
def test_keys_no_store_can_hold_are_refused(key: str) -> None:
    session = Session(lambda: Loaded(None, {}))
    with pytest.raises(SessionValueError):
        session[key] = 1


def test_values_another_application_stored_may_be_read_while_other_keys_change() -> None:
    """A record written by another application (Node.js) may hold what encode() refuses: reading
    it, even a list the app could mutate, is fine, and only the keys this request changed are written."""
    stored = {"tags": ["a\x00b"], "nums": [float("nan")], "user": "ann"}
    session = Session(lambda: Loaded("A" * 43, stored))
    assert session["tags"] == ["a\x00b"]
    assert session["nums"][0] != session["nums"][0]  # NaN
    session["n"] = 1
    assert session.changes() == ({"n": "1"}, ())
    session["tags"].append("c")  # changing it makes it this request's to write, and so to refuse
    with pytest.raises(SessionValueError, match="'tags'"):
        session.changes()


def test_texts_are_what_the_session_stores_after_its_changes() -> None:
    """What the middleware sizes against SESSION_MAX_SIZE: every value's JSON, changed or not."""
    session, _, _ = stored({"cart": [1, 2], "prefs": {"a": 1}, "n": 1, "gone": "x"})
    assert session["prefs"] == {"a": 1}  # read, left as it was
    session["cart"].append(3)  # changed in place
    session["n"] = 2
    del session["gone"]
    session["new"] = "é"
    assert session.texts(session.changes()) == {"cart": "[1,2,3]", "prefs": '{"a":1}', "n": "2", "new": '"é"'}
