"""Sessions in Redis: one hash per session, its TTL the session's idle timeout.

Its client is one server's, a Sentinel-named master's or a cluster's, as the URL says (see
:mod:`.redis_client`, which also turns redis-py's errors into :class:`~.base.StoreError`). A
session's own commands, pipelines and scripts touch its key alone, so on a cluster each lands in
the session's hash slot.

A user's index: the sorted set ``<prefix>user:<user id>`` of the keys of the sessions bound to
the user (see :data:`~.base.USER_KEY`), each scored by its session's expiry (Unix ms). On one
server (and behind Sentinels) the script that writes a session keeps its user's index in the
same round trip: every write of a bound session scores it anew, a login drops the members whose
session is gone, and the index expires with its latest member. On a cluster the index lives in
another slot than the sessions, which no script may reach together: the index is written after
the session, one more round trip at a login and at a refresh, and after other writes once they
have moved the session's expiry :data:`LAG` past its score.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import redis
from redis.cluster import RedisCluster
from redis.connection import Connection

from .base import (
    USER_KEY,
    CacheStore,
    Changes,
    Copy,
    Record,
    StoreError,
    UserRecord,
    after_fork,
    beyond_limit,
    bound_user,
    json_value,
    log,
    now,
)
from .redis_client import (
    ERRORS,
    Client,
    client_factory,
    close_client,
    failed,
    on_new_connections,
    raise_errors,
    store_errors,
)

# The session's expiry (Unix seconds) sits in the hash beside its values, under a field no
# session key can have (they hold no NUL), so that a read is a single HGETALL.
EXPIRES = "\x00expires"
_EXPIRES = EXPIRES.encode()
# On a cluster, the score the session last got in its user's index (Unix ms).
INDEXED = "\x00indexed"
_INDEXED = INDEXED.encode()
#: What a user's index key adds to the prefix, before the user id.
INDEX = "user:"
#: On a cluster, how far (ms) a session's expiry may run ahead of its score in the index before
#: the index is told. Its members are kept that long past their score, and the index too.
LAG = 120_000

# What the scripts share: the field names, and the user index's upkeep (on one server: in the
# script that writes the session; on a cluster the index is another slot's, and _INDEX keeps it).
_COMMON = f"""
local USER, EXPIRES, INDEXED, INDEX = '{USER_KEY}', '\\000expires', '\\000indexed', '{INDEX}'

-- A binding (USER_KEY's JSON text) decoded, and the user it names; or nil.
local function user_of(binding)
  if type(binding) ~= 'string' then return nil end
  local ok, value = pcall(cjson.decode, binding)
  if ok and type(value) == 'table' and type(value.id) == 'string' then return value.id, value end
  return nil
end

-- Score member in the index, drop the members scored below now - margin, and have the index
-- expire margin ms after its latest member.
local function index(key, member, score, now, margin)
  redis.call('zadd', key, score, member)
  redis.call('zremrangebyscore', key, '-inf', '(' .. (now - margin))
  local top = redis.call('zrange', key, -1, -1, 'withscores')
  redis.call('pexpire', key, top[2] - now + margin)
end

-- The members of the index whose session is alive and bound to user, as (key, binding, expiry,
-- decoded binding); the others leave it.
local function live(key, now, prefix, user)
  redis.call('zremrangebyscore', key, '-inf', '(' .. now)
  local found = {{}}
  for _, member in ipairs(redis.call('zrange', key, 0, -1)) do
    local values = redis.call('hmget', prefix .. member, USER, EXPIRES)
    local id, decoded = user_of(values[1])
    if id == user then
      found[#found + 1] = {{member, values[1], values[2] or '', decoded}}
    else
      redis.call('zrem', key, member)
    end
  end
  return found
end

-- On one server: move the session KEYS[1] from the index of old (its user before this write) to
-- its user's now, scored by its new expiry; at a login, tidy that index of sessions gone.
local function reindex(old, ttl, now, prefix, login)
  local new = user_of(redis.call('hget', KEYS[1], USER))
  local member = string.sub(KEYS[1], #prefix + 1)
  if old and old ~= new then redis.call('zrem', prefix .. INDEX .. old, member) end
  if new then
    local key = prefix .. INDEX .. new
    index(key, member, now + ttl, now, 0)
    if login then live(key, now, prefix, new) end
  end
end
"""

# Extend the session's life and apply per-key changes, only if the session still exists:
# one round trip, atomic, so a concurrent logout is never undone. ARGV: the TTL in ms, now (Unix
# ms), "index" (one server) or "cluster", the prefix, the number n of deleted fields, those n
# fields, then field/value pairs (the expiry's last). On a cluster it returns the session's
# binding when its expiry ran LAG ms past its score (the caller then tells the index).
# Commands take at most 1000 arguments from the script's stack at a time.
_UPDATE = (
    _COMMON
    + f"""
local ttl, now, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[4]
if redis.call('pexpire', KEYS[1], ttl) == 0 then return 0 end
local old = user_of(redis.call('hget', KEYS[1], USER))
local n = tonumber(ARGV[5])
for i = 6, 5 + n, 1000 do redis.call('hdel', KEYS[1], unpack(ARGV, i, math.min(i + 999, 5 + n))) end
for i = 6 + n, #ARGV, 1000 do redis.call('hset', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV))) end
if ARGV[3] == 'index' then
  reindex(old, ttl, now, prefix, false)
  return 1
end
local binding = redis.call('hget', KEYS[1], USER)
if binding and now + ttl - tonumber(redis.call('hget', KEYS[1], INDEXED) or 0) > {LAG} then
  redis.call('hset', KEYS[1], INDEXED, now + ttl)
  return binding
end
return 1
"""
)
# Replace the session. ARGV: the TTL in ms, now (Unix ms), "index" or "cluster", the prefix, then
# field/value pairs. A record of another type than a hash (a malformed one) is replaced too.
_REPLACE = """
local ttl, now, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[4]
local old = user_of(redis.pcall('hget', KEYS[1], USER))
redis.call('del', KEYS[1])
for i = 5, #ARGV, 1000 do redis.call('hset', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV))) end
redis.call('pexpire', KEYS[1], ttl)
if ARGV[3] == 'index' then reindex(old, ttl, now, prefix, true) end
return 1
"""
_CREATE = _COMMON + _REPLACE
# Write a copied session as _CREATE does, unless the key exists (Redis expires sessions itself, so
# one that exists is live; a record of another type is left alone too): then return 0.
_ADD = _COMMON + "\nif redis.call('exists', KEYS[1]) == 1 then return 0 end" + _REPLACE
# A cluster's index write. KEYS[1]: the index; ARGV: the session's key, its score, now, the margin.
_INDEX = (
    _COMMON
    + """
index(KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
return 1
"""
)
# A user's live sessions, on one server: KEYS[1] the index; ARGV: now (Unix ms), the prefix, the
# user. Returns key, binding, expiry, key, binding...
_LIST = (
    _COMMON
    + """
local found = {}
for _, session in ipairs(live(KEYS[1], tonumber(ARGV[1]), ARGV[2], ARGV[3])) do
  for i = 1, 3 do found[#found + 1] = session[i] end
end
return found
"""
)
# End the user's least recently used sessions beyond the ARGV[4] most recent, never ARGV[5] (the login
# that asks), on one server; ARGV[1..3] as _LIST's. Ranked as base.recency() does: last seen, login,
# expiry. Returns the keys ended.
_TRIM = (
    _COMMON
    + """
local prefix, keep = ARGV[2], ARGV[5]
local ranked = {}
for _, session in ipairs(live(KEYS[1], tonumber(ARGV[1]), prefix, ARGV[3])) do
  local binding = session[4]
  ranked[#ranked + 1] = {session[1], session[1] == keep and 1 or 0, math.floor(tonumber(binding.seen) or 0),
                         math.floor(tonumber(binding.login) or 0), tonumber(session[3]) or 0}
end
table.sort(ranked, function(a, b)
  for i = 2, 5 do
    if a[i] ~= b[i] then return a[i] > b[i] end
  end
  return false
end)
local ended = {}
for i = tonumber(ARGV[4]) + 1, #ranked do
  local member = ranked[i][1]
  redis.call('unlink', prefix .. member)
  redis.call('zrem', KEYS[1], member)
  ended[#ended + 1] = member
end
return ended
"""
)
# Set fields only if each still holds what it held (as JSON values), the expiry kept. ARGV: n, then n
# field names, their n expected JSON texts, their n new ones.
_SWAP = """
local function same(a, b)
  if type(a) ~= type(b) then return false end
  if type(a) ~= 'table' then return a == b end
  for k, v in pairs(a) do if not same(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end
local n = tonumber(ARGV[1])
for i = 2, n + 1 do
  local stored, expected = redis.call('hget', KEYS[1], ARGV[i]), ARGV[i + n]
  if not stored then return 0 end
  if stored ~= expected then
    local ok, a = pcall(cjson.decode, stored)
    local _, b = pcall(cjson.decode, expected)
    if not (ok and same(a, b)) then return 0 end
  end
end
for i = 2, n + 1 do redis.call('hset', KEYS[1], ARGV[i], ARGV[i + 2 * n]) end
return 1
"""
_DIGESTS = {
    script: hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
    for script in (_UPDATE, _CREATE, _ADD, _INDEX, _LIST, _TRIM, _SWAP)
}


class RedisStore(CacheStore):
    """Sessions as Redis hashes ``<prefix><key>`` of JSON values, expired by Redis itself."""

    name = "Redis"
    #: what the keys of sessions match after the prefix, as SCAN's MATCH: a SHA-256 in hex (what
    #: store_key() gives), so never a user's index (``<prefix>user:...``)
    session_keys = "[0-9a-f]" * 64

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Client | None = None,
        prefix: str = "sess:",
        timeout: float = 1.0,
    ) -> None:
        self._owns_client = client is None
        self._client: Client | None = None
        self._make: Callable[[], Client] | None = None
        self._lock = threading.Lock()
        if client is None:
            if url is None:
                raise ValueError("RedisStore needs a url or a client")
            make, connects = client_factory(url, timeout)  # a bad URL raises ValueError here
            if connects:
                self._make = make  # a cluster client connects when made: at first use, not at start-up
            else:
                client = make()
        if client is not None:
            self._client = client
            on_new_connections(client, self._connected)
        self.prefix = prefix
        self._expected: str | None = None  # the only server commands may run on (see expect())
        after_fork(self, RedisStore._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # it may have been held by a thread the fork left behind

    @property
    def client(self) -> Client:
        """redis-py's client; for a cluster, made (and connected) on first use."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    assert self._make is not None
                    self._client = self._run(self._make)  # a cluster: each node's server is not checked
                client = self._client
                assert client is not None
        return client

    def load(self, key: str) -> Record | None:
        try:
            # execute_command() rather than hgetall(): the same command, with less per-call wrapping
            fields = self.client.execute_command("HGETALL", self.prefix + key)  # type: ignore[no-untyped-call]
        except ERRORS as exc:
            fields = read_reply(exc)  # None for a record of another type
        return None if fields is None else _session(fields)

    def create(self, key: str, data: Mapping[str, str], ttl: float) -> None:
        self._write(_CREATE, key, data, ttl)  # one round trip, where MULTI takes two

    def add(self, key: str, data: Mapping[str, str], expires: float) -> bool:
        """One script, as :meth:`create`'s, that writes nothing where the key exists; on a cluster, the
        index then told as :meth:`create` tells it."""
        return self._write(_ADD, key, data, expires - now())

    def add_many(self, sessions: Sequence[Copy]) -> int:
        """add's script for every session, in one pipelined round trip (on a cluster, one to each node
        that holds some of them; then one more for the users' indexes of the bound ones stored)."""
        writes = [(self.prefix + key, *self._whole(key, data, expires - now())) for key, data, expires in sessions]
        replies = self._scripts(_ADD, [(name, args) for name, args, _ in writes])
        stored = [member for (*_, member), reply in zip(writes, replies, strict=True) if reply == 1]  # not an error
        self._index_copies([member for member in stored if member is not None])
        raise_errors(replies)
        return len(stored)

    def _write(self, script: str, key: str, data: Mapping[str, str], ttl: float) -> bool:
        """Write a whole session with ``script`` (:data:`_CREATE` or :data:`_ADD`), and on a cluster
        give its user's index the session written; False when the script wrote nothing."""
        args, member = self._whole(key, data, ttl)
        if not self._run(self._script, script, self.prefix + key, *args):
            return False
        if member is not None:
            self._tell_index(member, created=True)
        return True

    def _whole(self, key: str, data: Mapping[str, str], ttl: float) -> tuple[list[Any], _Member | None]:
        """The arguments of a script that writes a whole session (:data:`_CREATE`, :data:`_ADD`), and on
        a cluster, for a bound session, what its user's index is told once it is written."""
        t, ms = self._clock(ttl)
        args: list[Any] = [ms, t, *self._mode()]
        for field, value in data.items():
            args += (field, value)
        args += (EXPIRES, repr(t / 1000 + ttl))
        user = _user_in(data.get(USER_KEY)) if self._cluster else None
        if user is None:
            return args, None
        return [*args, INDEXED, t + ms], _Member(key, user, t + ms, t)

    def update(self, key: str, changes: Changes, ttl: float) -> bool:
        t, ms = self._clock(ttl)
        args: list[Any] = [ms, t, *self._mode(), len(changes.deleted), *changes.deleted]
        for field, value in changes.set.items():
            args += (field, value)
        args += (EXPIRES, repr(t / 1000 + ttl))
        user = _user_in(changes.set.get(USER_KEY)) if self._cluster else None
        if user is not None:  # a login or a refresh, on a cluster
            args += (INDEXED, t + ms)
        done = self._run(self._script, _UPDATE, self.prefix + key, *args)
        if not done:
            return False
        if isinstance(done, (bytes, str)):  # a cluster's session that ran ahead of its index
            user = _user_in(_text(done))
        if user is not None:
            self._tell_index(_Member(key, user, t + ms, t), created=False)
        return True

    def touch(self, key: str, ttl: float) -> bool:
        return self.update(key, Changes({}), ttl)

    def replace(self, key: str, expected: Mapping[str, str], new: Mapping[str, str]) -> bool:
        names = list(new)
        args = [len(names), *names, *(expected[name] for name in names), *(new[name] for name in names)]
        return bool(self._run(self._script, _SWAP, self.prefix + key, *args))

    def _script(self, script: str, name: str, *args: Any) -> Any:
        """Run ``script`` on the key ``name`` by its digest; a server that lacks it (new, restarted
        or flushed) is sent the script itself, which it then keeps."""
        client = self.client
        try:
            return client.execute_command("EVALSHA", _DIGESTS[script], 1, name, *args)  # type: ignore[no-untyped-call]
        except redis.exceptions.NoScriptError:
            return client.execute_command("EVAL", script, 1, name, *args)  # type: ignore[no-untyped-call]

    def _scripts(self, script: str, calls: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
        """Run ``script`` by its digest on each (key name, arguments) of ``calls``, in one pipelined round
        trip. Should a server lack it (new, restarted or flushed), it is loaded (on every primary of a
        cluster) and the calls it missed run again: not sent the script each, as :meth:`_script` sends
        it once. The replies, an error's in its place."""
        commands = [("EVALSHA", _DIGESTS[script], 1, name, *args) for name, args in calls]
        replies = self._pipelined(commands)
        missed = [i for i, reply in enumerate(replies) if isinstance(reply, redis.exceptions.NoScriptError)]
        if missed:
            self._run(self.client.script_load, script)
            for i, reply in zip(missed, self._pipelined([commands[i] for i in missed]), strict=True):
                replies[i] = reply
        return replies

    def _pipelined(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """The replies to ``commands``, sent in one pipeline (an error's in its place)."""
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(self._run(pipe.execute, raise_on_error=False))

    @staticmethod
    def _clock(ttl: float) -> tuple[int, int]:
        """Now in Unix ms (the application's clock, as every expiry), and ``ttl`` in ms."""
        return int(now() * 1000), milliseconds(ttl)

    @property
    def _cluster(self) -> bool:
        return isinstance(self.client, RedisCluster)

    def _mode(self) -> tuple[str, str]:
        """What the write scripts are told: who keeps the index (they, but on a cluster), and the prefix."""
        return ("cluster" if self._cluster else "index"), self.prefix

    def _index_key(self, user: str) -> str:
        return self.prefix + INDEX + user

    def _index_call(self, member: _Member) -> tuple[str, list[Any]]:
        """A cluster's index write, as :data:`_INDEX` takes it: the index, and its arguments (the member
        scored, those past their score by :data:`LAG` dropped)."""
        return self._index_key(member.user), [member.key, member.score, member.t, LAG]

    def _tell_index(self, member: _Member, created: bool) -> None:
        """Give a cluster's index the session just written (after it: a listing that finds a member's
        session missing drops it). Should that fail, a created session is deleted again, an updated
        one is told it was not indexed (its next write tries again): no session stays out of its index."""
        index, args = self._index_call(member)
        try:
            self._run(self._script, _INDEX, index, *args)
        except StoreError:
            with contextlib.suppress(*ERRORS):
                if created:
                    self.client.unlink(self.prefix + member.key)
                else:
                    self.client.hdel(self.prefix + member.key, INDEXED)
            raise

    def _index_copies(self, members: Sequence[_Member]) -> None:
        """Give a cluster's indexes the sessions just copied, in one pipelined round trip, as :meth:`_tell_index`
        gives one; should any write fail, every one of these sessions is deleted again (to be copied again)."""
        if not members:
            return
        try:
            raise_errors(self._scripts(_INDEX, [self._index_call(member) for member in members]))
        except StoreError:
            with contextlib.suppress(*ERRORS):
                self.client.unlink(*[self.prefix + member.key for member in members])
            raise

    # -- a user's sessions -------------------------------------------------------------------

    def user_sessions(self, user: str) -> list[UserRecord]:
        """One script on one server (it also drops the members of sessions gone). On a cluster, where
        the index and the sessions are in different slots: the index read, then the sessions' fields
        in a pipeline (one round trip to each node that holds any), then, if some are gone, their
        removal from the index: two round trips, or three."""
        index = self._index_key(user)
        t = int(now() * 1000)
        if not self._cluster:
            found = self._run(self._script, _LIST, index, t, self.prefix, user)
            triples = [found[i : i + 3] for i in range(0, len(found), 3)]
            return [r for r in (_user_record(user, *triple) for triple in triples) if r is not None]
        client = self.client
        pipe = client.pipeline(transaction=False)
        pipe.zremrangebyscore(index, "-inf", f"({t - LAG}")
        pipe.zrange(index, 0, -1)
        members: list[bytes] = self._run(pipe.execute)[1]
        if not members:
            return []
        pipe = client.pipeline(transaction=False)
        for member in members:
            pipe.hmget(self.prefix + _text(member), [USER_KEY, EXPIRES])
        fields = self._run(pipe.execute)
        records, gone = [], []
        for member, (binding, expires) in zip(members, fields, strict=True):
            record = _user_record(user, member, binding, expires)
            if record is None:
                gone.append(member)
            else:
                records.append(record)
        if gone:
            self._run(client.zrem, index, *gone)
        return records

    def trim_user(self, user: str, limit: int, keep: str | None = None) -> list[str]:
        """One script on one server; on a cluster, :meth:`user_sessions` then one pipelined round trip."""
        if not self._cluster:
            t = int(now() * 1000)
            ended = self._run(self._script, _TRIM, self._index_key(user), t, self.prefix, user, limit, keep or "")
            return [_text(key) for key in ended]
        keys = beyond_limit(self.user_sessions(user), limit, keep)
        if keys:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.unlink(self.prefix + key)
            pipe.zrem(self._index_key(user), *keys)
            self._run(pipe.execute)
        return keys

    def delete(self, key: str) -> None:
        self._run(self.client.delete, self.prefix + key)

    def ping(self) -> None:
        client = self.client
        if isinstance(client, RedisCluster):
            # redis-py pings one node of a cluster; a session may live on any primary.
            self._run(client.ping, target_nodes=RedisCluster.PRIMARIES)
        else:
            self._run(client.ping)

    def server_id(self) -> str:
        """The ``run_id`` of the server (of each primary of a cluster), new at every start of a server."""
        client = self.client
        if isinstance(client, RedisCluster):
            found = self._run(client.info, "server", target_nodes=RedisCluster.PRIMARIES)
            return ",".join(sorted(str(info["run_id"]) for info in found.values()))
        try:
            return str(self._run(client.info, "server")["run_id"])
        except StoreError as exc:
            if isinstance(exc.__cause__, ServerChanged):
                return exc.__cause__.server
            if isinstance(exc.__cause__, redis.ResponseError) and not wrong_type(exc.__cause__):
                return ""  # INFO refused (an ACL without it): it answers, which server cannot be told
            raise

    def expect(self, server: str) -> None:
        """Each new connection (redis-py opens one, unasked, where a pooled one broke) is checked
        for being to ``server``; one to another server fails its command (not on a cluster)."""
        self._expected = server

    def _connected(self, connection: Connection) -> None:
        """redis-py's hook for a new connection: the usual handshake, then the server check."""
        connection.on_connect()  # type: ignore[no-untyped-call]
        expected = self._expected
        if expected is None:
            return
        connection.send_command("INFO", "server")  # type: ignore[no-untyped-call]
        try:
            found = _RUN_ID.search(_text(connection.read_response()))
        except redis.ResponseError:  # INFO refused (an ACL without it): servers cannot be told apart
            return
        server = found.group(1) if found else ""
        if server != expected:
            raise ServerChanged(server)

    def clear(self) -> None:
        """Delete every session under the prefix (keys of the prefix that are not sessions stay)."""
        for names in self._names(1000):
            self._run(self.client.unlink, *names)

    def scan(self, batch: int = 1000) -> Iterator[list[tuple[str, Record]]]:
        """SCAN for the sessions' keys (never a user's index), then one pipelined round trip that reads
        each batch (on a cluster, one to each node holding some of it)."""
        start = len(self.prefix)
        for names in self._names(batch):
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                self._queue_load(pipe, name)
            replies = iter(self._run(pipe.execute, raise_on_error=False))
            found = [(_text(name)[start:], record) for name in names if (record := self._loaded(replies)) is not None]
            if found:
                yield found

    def count(self) -> int:
        """The sessions' keys counted by SCAN, without reading them."""
        return sum(len(names) for names in self._names(1000))

    def _names(self, batch: int) -> Iterator[list[Any]]:
        """The names of the sessions' keys, ``batch`` at a time: SCAN ... COUNT ``batch``, on a cluster
        on each primary in turn (redis-py's scan_iter)."""
        names: list[Any] = []
        with store_errors():
            for name in self.client.scan_iter(match=_glob_escape(self.prefix) + self.session_keys, count=batch):
                names.append(name)
                if len(names) == batch:
                    yield names
                    names = []
        if names:
            yield names

    def _queue_load(self, pipe: Any, name: Any) -> None:
        """Queue on ``pipe`` what reads the session in key ``name``: its hash."""
        pipe.hgetall(name)

    def _loaded(self, replies: Iterator[Any]) -> Record | None:
        """The session that :meth:`_queue_load`'s commands read, from the next of ``replies``."""
        fields = read_reply(next(replies))
        return None if fields is None else _session(fields)

    def delete_many(self, keys: Sequence[str]) -> None:
        if keys:
            self._run(self.client.unlink, *[self.prefix + key for key in keys])

    def close(self) -> None:
        if self._owns_client and self._client is not None:
            close_client(self._client)

    @staticmethod
    def _run(command: Any, *args: Any, **kwargs: Any) -> Any:
        with store_errors():
            return command(*args, **kwargs)


class _Member(NamedTuple):
    """A session as its user's index takes it, on a cluster: its key, its user, its score (its expiry),
    and the time of the write (Unix ms)."""

    key: str
    user: str
    score: int
    t: int


class ServerChanged(redis.ConnectionError):
    """A new connection reached another server than the expected one (restarted, failed over)."""

    def __init__(self, server: str) -> None:
        super().__init__(f"connected to another server (run_id {server or 'unknown'}) than the one expected")
        self.server = server


_RUN_ID = re.compile(r"^run_id:([0-9a-fA-F]+)", re.MULTILINE)


def _text(reply: Any) -> str:
    """A reply as text (bytes, or a RESP3 verbatim string)."""
    return reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)


def _session(fields: dict[bytes, bytes]) -> Record | None:
    """A session's hash, as HGETALL returns it, decoded; None for no hash, or a malformed one (logged)."""
    stamp = fields.pop(_EXPIRES, None)
    fields.pop(_INDEXED, None)
    try:
        data = {k.decode(): json_value(v.decode()) for k, v in fields.items()}
        expires = float(stamp) if stamp is not None else now()  # unknown: refresh it soon
    except (ValueError, RecursionError):
        log.warning("Ignoring a malformed session record in Redis")
        return None
    if stamp is None and not data:  # no hash (an empty session still has its expiry field)
        return None
    return Record(data, expires)


def read_reply(reply: Any) -> Any:
    """A reply to what reads a session, or the error redis-py raised or gave (a pipeline run with
    ``raise_on_error=False``) in its place: None for a refusal of a record of another type (a malformed
    one, no session: logged); any other error (CLUSTERDOWN, TRYAGAIN, MASTERDOWN, a lost connection...:
    Redis cannot answer now) raises :class:`StoreError`."""
    if isinstance(reply, redis.ResponseError) and wrong_type(reply):
        log.warning("Ignoring a malformed session record in Redis")
        return None
    if isinstance(reply, Exception):
        failed(reply)
    return reply


def _user_in(binding: str | None) -> str | None:
    """The user a binding's JSON text (USER_KEY's value) names, or None."""
    if binding is None:
        return None
    try:
        return bound_user({USER_KEY: json_value(binding)})
    except (ValueError, RecursionError):
        return None


def _user_record(user: str, key: Any, binding: Any, expires: Any) -> UserRecord | None:
    """A session of ``user`` from its key and fields as Redis returns them; None if gone or another's."""
    if binding is None:
        return None
    text = _text(binding)
    if _user_in(text) != user:
        return None
    return UserRecord(_text(key), json_value(text), float(_text(expires)) if expires else now())


def milliseconds(seconds: float) -> int:
    """A TTL in whole milliseconds, at least 1 (Redis refuses 0)."""
    return max(1, round(seconds * 1000))


def _glob_escape(text: str) -> str:
    """``text`` as a SCAN pattern that matches it literally."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def wrong_type(exc: redis.ResponseError) -> bool:
    """Whether Redis refused a command because the key holds another type (a malformed record)."""
    message = str(exc)
    return message.startswith("WRONGTYPE") or "error: WRONGTYPE" in message  # a pipeline prefixes the command
