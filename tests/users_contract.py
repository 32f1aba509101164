"""The store contract of a user's sessions, for every store: a test module imports these tests
and gives them a ``store`` fixture (see test_users.py, test_users_sql.py, test_users_redis.py).
"""

from __future__ import annotations

import json
import secrets
import time

from wsgisession import SessionStore
from wsgisession.stores.base import USER_KEY, Changes


def binding(user: str, seen: int | None = None) -> str:
    t = int(time.time())
    return json.dumps({"id": user, "login": t, "seen": seen or t})


def bound(store: SessionStore, user: str, ttl: float = 600, seen: int | None = None, **values: object) -> str:
    """A session of ``user`` (last seen at ``seen``) created in ``store``; returns its key."""
    key = secrets.token_hex(32)
    store.create(key, {USER_KEY: binding(user, seen), **{k: json.dumps(v) for k, v in values.items()}}, ttl)
    return key


def keys_of(store: SessionStore, user: str) -> set[str]:
    return {record.key for record in store.user_sessions(user)}


def test_a_user_lists_their_live_sessions_only(store: SessionStore) -> None:
    user, other = secrets.token_hex(8), secrets.token_hex(8)
    mine = {bound(store, user, cart=[1]), bound(store, user)}
    theirs = bound(store, other)
    store.create(secrets.token_hex(32), {"anonymous": "true"}, 600)
    records = store.user_sessions(user)
    assert {record.key for record in records} == mine
    for record in records:
        assert record.binding["id"] == user and record.expires > time.time() + 500
    assert keys_of(store, other) == {theirs}
    assert store.user_sessions(secrets.token_hex(8)) == []


def test_an_expired_session_is_not_listed(store: SessionStore) -> None:
    user = secrets.token_hex(8)
    live, short = bound(store, user), bound(store, user, ttl=0.3)
    assert keys_of(store, user) == {live, short}
    time.sleep(0.6)
    assert keys_of(store, user) == {live}


def test_a_deleted_session_is_not_listed(store: SessionStore) -> None:
    user = secrets.token_hex(8)
    first, second, third = bound(store, user), bound(store, user), bound(store, user)
    store.delete(first)
    store.delete_many([second, secrets.token_hex(32)])  # a missing key is no error
    assert keys_of(store, user) == {third}


def test_binding_and_unbinding_through_an_update(store: SessionStore) -> None:
    user, other = secrets.token_hex(8), secrets.token_hex(8)
    key = secrets.token_hex(32)
    store.create(key, {"cart": "[]"}, 600)
    assert store.user_sessions(user) == []
    assert store.update(key, Changes({USER_KEY: binding(user)}), 600)
    assert keys_of(store, user) == {key}
    assert store.update(key, Changes({USER_KEY: binding(other)}), 600)  # another user logs in on it
    assert keys_of(store, user) == set() and keys_of(store, other) == {key}
    assert store.update(key, Changes({}, (USER_KEY,)), 600)  # unbound
    assert keys_of(store, other) == set()


def test_trim_ends_the_least_recently_seen_beyond_the_limit(store: SessionStore) -> None:
    user, other = secrets.token_hex(8), secrets.token_hex(8)
    t = int(time.time())
    # Expiries in the opposite order: a session capped by its absolute lifetime may expire first
    # though it was used last; "seen" ranks them.
    oldest = bound(store, user, ttl=300, seen=t - 300)
    middle = bound(store, user, ttl=200, seen=t - 200)
    newest = bound(store, user, ttl=100, seen=t - 100)
    theirs = bound(store, other, ttl=50)
    assert store.trim_user(user, 5) == []
    assert sorted(store.trim_user(user, 2)) == [oldest]
    assert keys_of(store, user) == {middle, newest}
    assert store.load(oldest) is None
    assert sorted(store.trim_user(user, 1, keep=middle)) == [newest]  # the login asking is never ended
    assert sorted(store.trim_user(user, 0)) == [middle]
    assert keys_of(store, user) == set() and keys_of(store, other) == {theirs}


def test_many_sessions_of_one_user_and_a_mass_ending(store: SessionStore) -> None:
    user = secrets.token_hex(8)
    keys = {bound(store, user) for _ in range(60)}
    assert keys_of(store, user) == keys
    store.delete_many(sorted(keys))
    assert keys_of(store, user) == set()
    assert all(store.load(key) is None for key in keys)
