"""Copying sessions between stores: ``scan`` lists every live session in batches, ``add`` stores a copy
unless a live session is there already, ``add_many`` a batch of them at once. Run on every store kind, on
the real servers: memory, SQLite, PostgreSQL (each driver), Redis (one server, Valkey's too, behind
Sentinels, a three-node cluster), the express format's stores (connect-redis's records, connect-pg-simple's
table on each driver) and the Redis + PostgreSQL pair (each of servers.PAIRS).
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from redis_topologies import ClusterSetup, SentinelSetup
from servers import (
    PAIRS,
    PG_DRIVERS,
    drop_table,
    each_pg_driver,
    each_redis_kind,
    free_port,
    require_postgres,
    shared_redis_url,
    unique,
)
from test_failover import PROBE, TIMEOUT
from test_round_trips import Wire, counting_redis
from test_users_sql import CountedConnectPg, CountedPostgres, CountedSQLite
from users_contract import keys_of

from wsgisession import SessionStore, StoreError
from wsgisession.stores.base import USER_KEY, Changes, Record, encode_values
from wsgisession.stores.connect_pg import ConnectPgStore
from wsgisession.stores.connect_redis import ConnectRedisStore
from wsgisession.stores.express import ExpressDocument
from wsgisession.stores.failover import FailoverStore
from wsgisession.stores.memory import MemoryStore
from wsgisession.stores.migrating import move
from wsgisession.stores.postgres import PostgresStore
from wsgisession.stores.redis import RedisStore

POSTGRES = [f"postgres-{driver}" for driver in PG_DRIVERS]
EXPRESS = ["express-redis", "express-redis-cluster", *(f"express-pg-{driver}" for driver in PG_DRIVERS)]
PAIR = [f"pair-{kind}-{driver}" for kind, driver in PAIRS]
KINDS = ["memory", "sqlite", *POSTGRES, "redis", "valkey", "redis-sentinel", "redis-cluster", *EXPRESS, *PAIR]
DOCUMENT = ExpressDocument(3600)
LOGIN = int(time.time())  # when the users of values() logged in


# -- the stores --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinel() -> Iterator[SentinelSetup]:
    setup = SentinelSetup().start()
    yield setup
    setup.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterSetup]:
    setup = ClusterSetup().start()
    yield setup
    setup.close()


@pytest.fixture
def build(request: pytest.FixtureRequest, make_store: Callable[..., SessionStore]) -> Iterator[Callable[[str], Any]]:
    """Build a store of a kind on private names; closed (its keys and tables gone) after the test."""
    made: list[tuple[SessionStore, Callable[[], None]]] = []

    def redis_url(kind: str) -> str:
        if kind.endswith("-cluster"):
            return str(request.getfixturevalue("cluster").url())
        if kind.endswith("-sentinel"):
            return str(request.getfixturevalue("sentinel").url())
        return shared_redis_url("valkey" if kind == "valkey" else "redis")

    def make(kind: str) -> Any:
        if kind in ("memory", "sqlite", *POSTGRES):
            return make_store(kind)
        prefix, table = unique("copy") + ":", unique("copy")
        cleanup = lambda: None  # noqa: E731
        driver = kind.rpartition("-")[2]
        store: SessionStore
        if kind.startswith(("redis", "valkey")):
            store = RedisStore(redis_url(kind), prefix=prefix)
        elif kind.startswith("express-redis"):
            store = ConnectRedisStore(redis_url(kind), document=DOCUMENT, prefix=prefix)
        elif kind.startswith("express-pg-"):
            url = require_postgres()
            store = ConnectPgStore(url, document=DOCUMENT, table=table, cleanup_interval=0, driver=driver)
            cleanup = lambda: drop_table(require_postgres(), table)  # noqa: E731
        elif kind.startswith("pair-"):
            cache = RedisStore(shared_redis_url(kind.split("-")[1]), prefix=prefix, timeout=TIMEOUT)
            durable = PostgresStore(require_postgres(), table=table, cleanup_interval=0, timeout=1.0, driver=driver)
            store = FailoverStore(cache, durable, probe_interval=PROBE)
            cleanup = lambda: drop_table(require_postgres(), table)  # noqa: E731
        else:
            raise ValueError(kind)
        made.append((store, cleanup))
        return store

    yield make
    for store, cleanup in made:
        redis_store = store.cache if isinstance(store, FailoverStore) else store
        if isinstance(redis_store, RedisStore):  # the session keys and the users' indexes
            names = list(redis_store.client.scan_iter(match=redis_store.prefix + "*", count=1000))
            if names:
                redis_store.client.unlink(*names)
        store.close()
        cleanup()


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest, build: Callable[[str], Any]) -> Any:
    return build(request.param)


def new_key(store: SessionStore) -> str:
    """A key as the store's format gives them: a SHA-256 in hex, or an express-session id."""
    return secrets.token_urlsafe(24) if express(store) else secrets.token_hex(32)


def express(store: SessionStore) -> bool:
    return isinstance(store, (ConnectRedisStore, ConnectPgStore))


def lists_users(store: SessionStore) -> bool:
    """Whether the store lists a user's sessions (connect-redis's records refuse to)."""
    return not isinstance(store, ConnectRedisStore)


def values(n: int = 0, user: str | None = None) -> dict[str, str]:
    """A session's JSON texts, bound to ``user`` if given (the same texts whenever asked, in any second)."""
    data = encode_values({"n": n, "cart": [n, {"name": "zoë 😀", "price": 0.1}], "seen": None, "big": 2**60})
    if user is not None:
        data[USER_KEY] = json.dumps({"id": user, "login": LOGIN, "seen": LOGIN})
    return data


def decoded(data: dict[str, str]) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in data.items()}


def everything(store: SessionStore, batch: int = 1000) -> tuple[list[list[tuple[str, Record]]], dict[str, Record]]:
    """The batches of a whole scan, and what they hold by key."""
    batches = list(store.scan(batch=batch))
    return batches, {key: record for found in batches for key, record in found}


def create_many(store: SessionStore, keys: list[str], ttl: float = 600) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: store.create(key, {"n": "1"}, ttl), keys))


# -- replace (re-encryption's swap) ------------------------------------------------------------------


def test_replace_swaps_values_that_still_hold_and_keeps_the_expiry(store: SessionStore) -> None:
    if isinstance(store, ConnectRedisStore):  # the express format is never encrypted, so never rewritten
        with pytest.raises(NotImplementedError):
            store.replace(new_key(store), {}, {})
        return
    key, user = new_key(store), secrets.token_hex(8)
    store.create(key, values(1, user), 600)
    before = store.load(key)
    assert before is not None
    old = values(1, user)
    assert store.replace(key, {"n": old["n"], "cart": old["cart"]}, {"n": '"sealed n"', "cart": '"sealed cart"'})
    after = store.load(key)
    assert after is not None
    assert after.data == {**decoded(old), "n": "sealed n", "cart": "sealed cart"}
    assert after.expires == pytest.approx(before.expires, abs=0.5)
    if lists_users(store):
        assert keys_of(store, user) == {key}


def test_replace_writes_nothing_when_a_value_changed_or_the_session_is_gone(store: SessionStore) -> None:
    if isinstance(store, ConnectRedisStore):
        return  # refused: see above
    key = new_key(store)
    store.create(key, values(1), 600)
    store.update(key, Changes({"n": "7"}), 600)  # a request wrote n after it was read
    old = values(1)
    assert not store.replace(key, {"n": old["n"], "cart": old["cart"]}, {"n": '"x"', "cart": '"y"'})
    assert store.load(key).data == {**decoded(old), "n": 7}  # neither value written
    store.delete(key)
    assert not store.replace(key, {"cart": old["cart"]}, {"cart": '"y"'})
    assert store.load(key) is None  # not brought back


# -- add -----------------------------------------------------------------------------------------


def test_add_stores_the_copy_its_expiry_and_its_user(store: SessionStore) -> None:
    key, user, expires = new_key(store), secrets.token_hex(8), time.time() + 4321.5
    assert store.add(key, values(1, user), expires) is True
    record = store.load(key)
    assert record is not None
    assert record.data == decoded(values(1, user))
    assert record.expires == pytest.approx(expires, abs=1)
    if lists_users(store):
        assert keys_of(store, user) == {key}


def test_add_never_replaces_a_live_session(store: SessionStore) -> None:
    key, ann, bob = new_key(store), secrets.token_hex(8), secrets.token_hex(8)
    store.create(key, values(1, ann), 600)
    before = store.load(key)
    assert store.add(key, values(2, bob), time.time() + 5000) is False
    after = store.load(key)
    assert before is not None and after is not None
    assert after.data == before.data == decoded(values(1, ann))
    assert after.expires == pytest.approx(before.expires, abs=0.5)
    if lists_users(store):
        assert keys_of(store, ann) == {key} and keys_of(store, bob) == set()


def test_add_replaces_an_expired_record(store: SessionStore) -> None:
    """SQL rows outlive their expiry until a cleanup: the copy replaces one, and its user's index."""
    key, ann, bob = new_key(store), secrets.token_hex(8), secrets.token_hex(8)
    store.create(key, values(1, ann), 0.05)
    time.sleep(0.15)
    assert store.load(key) is None
    assert store.add(key, values(2, bob), time.time() + 600) is True
    record = store.load(key)
    assert record is not None and record.data == decoded(values(2, bob))
    assert record.expires == pytest.approx(time.time() + 600, abs=2)
    if lists_users(store):
        assert keys_of(store, bob) == {key} and keys_of(store, ann) == set()


# -- add_many: a migration's batch ------------------------------------------------------------------


def test_add_many_stores_the_new_and_the_expired_never_the_live(store: SessionStore) -> None:
    """One batch as a migration gives it: the sessions the store holds live stay as they are; those it
    holds expired, and those it lacks, are stored with their expiry and their user; the count says how
    many. Adding the batch again stores nothing."""
    ann, bob = secrets.token_hex(8), secrets.token_hex(8)
    live, expired, new = ([new_key(store) for _ in range(3)] for _ in range(3))
    for key in live:
        store.create(key, values(1, ann), 600)
    for key in expired:
        store.create(key, values(2, ann), 0.05)
    time.sleep(0.15)
    expires = time.time() + 4321.5
    batch = [(key, values(3 + n, bob if n % 2 else None), expires) for n, key in enumerate(live + expired + new)]
    random.shuffle(batch)
    assert store.add_many(batch) == len(expired) + len(new)
    copies = {key: data for key, data, _ in batch}
    for key in live + expired + new:
        record = store.load(key)
        assert record is not None
        if key in live:
            assert record.data == decoded(values(1, ann))
            assert record.expires == pytest.approx(time.time() + 600, abs=2)
        else:
            assert record.data == decoded(copies[key])
            assert record.expires == pytest.approx(expires, abs=1)
    if lists_users(store):
        assert keys_of(store, ann) == set(live)
        assert keys_of(store, bob) == {key for key in expired + new if USER_KEY in copies[key]} != set()
    assert store.add_many(batch) == 0


def test_add_many_stores_the_first_of_a_key_given_twice(store: SessionStore) -> None:
    """A Redis SCAN may give a key twice, so a batch may hold it twice: it is stored once, the first."""
    key, other, expires = new_key(store), new_key(store), time.time() + 600
    assert store.add_many([(key, values(1), expires), (other, values(2), expires), (key, values(3), expires)]) == 2
    record = store.load(key)
    assert record is not None and record.data == decoded(values(1))
    assert store.add_many([]) == 0


# -- scan ----------------------------------------------------------------------------------------


def test_scan_yields_every_live_session_and_nothing_else(store: SessionStore, caplog: pytest.LogCaptureFixture) -> None:
    """Not the expired ones, and on Redis not a user's index (a key under the prefix too, which a
    scan would read as a malformed session, and log)."""
    user = secrets.token_hex(8)
    live = {new_key(store): values(n, user if n % 2 else None) for n in range(12)}
    live[new_key(store)] = {}  # an empty session is a session
    created = time.time()
    for key, data in live.items():
        store.create(key, data, 600)
    for _ in range(3):
        store.create(new_key(store), values(user=user), 0.05)
    time.sleep(0.15)
    caplog.set_level(logging.WARNING, logger="wsgisession")
    batches, found = everything(store, batch=5)
    assert not caplog.records
    assert found.keys() == live.keys()
    for key, data in live.items():
        assert found[key].data == decoded(data)
        assert created + 600 - 0.01 <= found[key].expires <= time.time() + 600
    assert all(0 < len(batch) <= 5 for batch in batches)
    if not isinstance(store, RedisStore):  # SCAN may return a key twice
        assert sum(map(len, batches)) == len(live)


def test_scan_of_2500_sessions_comes_in_batches(store: SessionStore) -> None:
    keys = [new_key(store) for _ in range(2500)]
    create_many(store, keys)
    batches, found = everything(store, batch=1000)
    assert found.keys() == set(keys)
    assert len(batches) >= 3 and max(map(len, batches)) <= 1000
    if not isinstance(store, RedisStore):
        assert sum(map(len, batches)) == len(keys)


def test_sessions_written_during_a_scan_do_not_break_it(store: SessionStore) -> None:
    """Those there all along are all seen; those created or ended meanwhile may be or not."""
    kept, ended = [new_key(store) for _ in range(30)], [new_key(store) for _ in range(5)]
    create_many(store, kept + ended)
    scan = store.scan(batch=10)
    seen = {key for key, _ in next(scan)}
    create_many(store, [new_key(store) for _ in range(30)])
    store.delete_many(ended)
    for batch in scan:
        seen |= {key for key, _ in batch}
    assert set(kept) <= seen


def test_scan_of_an_empty_store_yields_nothing(store: SessionStore) -> None:
    assert list(store.scan()) == []


# -- copying from one store to another ---------------------------------------------------------


def copy(source: SessionStore, target: SessionStore, batched: bool = False) -> int:
    """What a migration does: every session of ``source`` added to ``target`` (one by one, or a batch at
    a time); how many it took."""
    copied = 0
    for found in source.scan(batch=7):
        copies = [(key, encode_values(record.data), record.expires) for key, record in found]
        copied += target.add_many(copies) if batched else sum(target.add(*copy) for copy in copies)
    return copied


@pytest.mark.parametrize("batched", [False, True], ids=["add", "add_many"])
@pytest.mark.parametrize(
    ("source_kind", "target_kind"),
    [("redis", "postgres-psycopg2"), ("postgres-psycopg", "sqlite"), ("sqlite", "valkey"),
     ("express-redis", "express-pg-psycopg"), ("memory", "pair-redis-psycopg2"),
     ("pair-valkey-psycopg", "redis-cluster")],
)  # fmt: skip
def test_a_copy_loads_as_the_original(
    build: Callable[[str], Any], source_kind: str, target_kind: str, batched: bool
) -> None:
    """Every session loads from the target as from the source, bound to the same user; one the
    target has already stays as it is there, and copying again copies nothing."""
    source, target = build(source_kind), build(target_kind)
    user = secrets.token_hex(8)
    sessions = {new_key(source): values(n, user if n % 3 == 0 else None) for n in range(20)}
    sessions[new_key(source)] = {}
    for key, data in sessions.items():
        source.create(key, data, 600 + len(data))
    theirs = list(sessions)[:2]  # the target's own, newer: a user who came back meanwhile
    for key in theirs:
        target.create(key, {"newer": "true"}, 900)
    assert copy(source, target, batched) == len(sessions) - 2
    for key in sessions:
        copied, original = target.load(key), source.load(key)
        assert copied is not None and original is not None
        if key in theirs:
            assert copied.data == {"newer": True} and copied.expires == pytest.approx(time.time() + 900, abs=2)
        else:
            assert copied.data == original.data
            assert copied.expires == pytest.approx(original.expires, abs=0.05)
    if lists_users(source) and lists_users(target):
        bound = {key for key, data in sessions.items() if USER_KEY in data and key not in theirs}
        assert keys_of(target, user) == keys_of(source, user) - set(theirs) == bound
    assert copy(source, target, batched) == 0


# -- round trips -----------------------------------------------------------------------------------


def counted_redis(cls: type[RedisStore], redis_url: str) -> tuple[RedisStore, Wire]:
    """A store of ``cls`` (connect-redis's records for ConnectRedisStore) whose every round trip is counted."""
    wire = Wire()
    options = {"document": DOCUMENT} if cls is ConnectRedisStore else {}
    return cls(client=counting_redis(redis_url, wire), prefix=unique("trips") + ":", **options), wire


@each_redis_kind
@pytest.mark.parametrize("cls", [RedisStore, ConnectRedisStore])
def test_a_redis_scan_reads_each_batch_in_one_round_trip(cls: type[RedisStore], redis_url: str) -> None:
    store, wire = counted_redis(cls, redis_url)
    try:
        create_many(store, [new_key(store) for _ in range(2500)])
        wire.trips.clear()
        batches, found = everything(store, batch=1000)
        assert len(found) == 2500
        reads = [trip for trip in wire.trips if not trip.startswith("SCAN")]
        assert len(reads) == len(batches) == 3
    finally:
        store.clear()
        store.close()


@pytest.mark.parametrize(
    ("cls", "driver"), [(CountedPostgres, "psycopg"), (CountedPostgres, "psycopg2"), (CountedSQLite, None)],
    ids=["postgres-psycopg", "postgres-psycopg2", "sqlite"],
)  # fmt: skip
def test_a_sql_scan_is_one_select_per_batch(cls: type[Any], driver: str | None, tmp_path: Any) -> None:
    table = unique("trips")
    target = require_postgres() if cls is CountedPostgres else str(tmp_path / "trips.sqlite3")
    store = cls(target, table=table, cleanup_interval=0, **({"driver": driver} if driver else {}))
    try:
        create_many(store, [secrets.token_hex(32) for _ in range(2500)])
        store.statements.clear()
        batches, found = everything(store, batch=1000)
        assert len(found) == 2500 and len(batches) == 3
        assert len(store.statements) == 3
    finally:
        store.close()
        if cls is CountedPostgres:
            drop_table(target, table)


def prepared_runs(store: PostgresStore) -> list[int]:
    """How many times each statement prepared on the store's connection (its pool of one) ran, whichever
    way the driver prepared it (psycopg2: PREPARE in SQL; psycopg 3: the protocol's Parse)."""
    with store._cursor() as cur:
        cur.execute("SELECT generic_plans + custom_plans FROM pg_prepared_statements")
        return [runs for (runs,) in cur.fetchall()]


@each_pg_driver
def test_postgresql_prepares_the_add_a_copy_repeats(database_url: str, pg_driver: str) -> None:
    """A copy runs add() once per session: parsed and planned once per connection, as a request's statements."""
    table = unique("prepared")
    store = CountedPostgres(database_url, table=table, cleanup_interval=0, pool_size=1, driver=pg_driver)
    try:
        store.statements.clear()
        for _ in range(3):
            store.add(secrets.token_hex(32), {"n": "1"}, time.time() + 600)
        assert len(store.statements) == 3
        assert prepared_runs(store) == [3]
    finally:
        store.close()
        drop_table(database_url, table)


@each_pg_driver
@pytest.mark.parametrize("cls", [CountedPostgres, CountedConnectPg])
def test_postgresql_adds_a_batch_in_one_prepared_statement(cls: type[Any], database_url: str, pg_driver: str) -> None:
    """A migration's batch: one statement whatever its size, parsed and planned once per connection."""
    table = unique("batch")
    options = {"document": DOCUMENT} if cls is CountedConnectPg else {}
    store = cls(database_url, table=table, cleanup_interval=0, pool_size=1, driver=pg_driver, **options)
    try:
        store.statements.clear()
        for size in (1000, 10, 1000):
            assert store.add_many([(new_key(store), values(n), time.time() + 600) for n in range(size)]) == size
        assert len(store.statements) == 3
        assert prepared_runs(store) == [3]
    finally:
        store.close()
        drop_table(database_url, table)


def test_sqlite_adds_a_batch_in_one_transaction(tmp_path: Any) -> None:
    """In-process, a statement per session costs no round trip; one commit for the batch, not one each."""
    store = CountedSQLite(str(tmp_path / "batch.sqlite3"), table="batch", cleanup_interval=0)
    try:
        store.statements.clear()
        assert store.add_many([(new_key(store), values(n), time.time() + 600) for n in range(1000)]) == 1000
        assert store.statements[0] == "BEGIN IMMEDIATE" and store.statements[-1] == "COMMIT"
        assert len(store.statements) == 1002
    finally:
        store.close()


@each_redis_kind
@pytest.mark.parametrize("cls", [RedisStore, ConnectRedisStore])
def test_a_redis_add_many_is_one_round_trip(cls: type[RedisStore], redis_url: str) -> None:
    """A migration's batch: one pipelined round trip, whatever its size."""
    store, wire = counted_redis(cls, redis_url)
    try:
        batch = [(new_key(store), values(n), time.time() + 600) for n in range(1000)]
        store.add(*batch[0])  # the connection opened, the script loaded
        wire.trips.clear()
        assert store.add_many(batch) == 999
        assert len(wire.trips) == 1
    finally:
        store.clear()
        store.close()


@each_redis_kind
def test_a_server_that_lost_the_script_still_takes_the_batch(private_redis: Any) -> None:
    """A Redis restarted or flushed meanwhile lacks the script: each copy runs again, sent the script itself."""
    store = RedisStore(private_redis.url, prefix="lost:")
    user = secrets.token_hex(8)
    try:
        store.add(new_key(store), values(0), time.time() + 600)
        store.client.script_flush()
        batch = [(new_key(store), values(n, user), time.time() + 600) for n in range(5)]
        assert store.add_many(batch) == 5
        assert keys_of(store, user) == {key for key, _, _ in batch}
    finally:
        store.close()


def test_a_migration_copies_each_batch_in_one_round_trip(redis_url: str) -> None:
    """move(), which the command runs for every batch it reads: the batch reaches the new store in one
    round trip, and leaves the old one."""
    wire = Wire()
    old, new = MemoryStore(), RedisStore(client=counting_redis(redis_url, wire), prefix=unique("move") + ":")
    try:
        keys = [secrets.token_hex(32) for _ in range(1000)]
        for n, key in enumerate(keys):
            old.create(key, values(n), 600)
        new.add(secrets.token_hex(32), values(), time.time() + 600)  # the connection opened, the script loaded
        wire.trips.clear()
        assert sum(move(old, new, batch) for batch in old.scan(batch=500)) == 1000
        assert len(wire.trips) == 2
        assert list(old.scan()) == [] and all(new.load(key) is not None for key in keys)
    finally:
        new.clear()
        new.close()


# -- the pair: what the cache gets ----------------------------------------------------------------


@pytest.mark.parametrize("kind", PAIR)
def test_the_pair_caches_the_copy(build: Callable[[str], Any], kind: str) -> None:
    pair = build(kind)
    key, user = new_key(pair), secrets.token_hex(8)
    assert pair.add(key, values(1, user), time.time() + 600)
    cached = pair.cache.load(key)
    assert cached is not None and cached.data == decoded(values(1, user))
    assert keys_of(pair.cache, user) == {key}


class Hooked(PostgresStore):
    """A durable store where another request (``meanwhile``) comes just as add() stores a session."""

    def __init__(self, *args: Any, meanwhile: Callable[[PostgresStore, str], Any], **options: Any) -> None:
        self.meanwhile = meanwhile
        super().__init__(*args, **options)

    def add(self, key: str, data: Any, expires: float) -> bool:
        added = super().add(key, data, expires)
        self.meanwhile(self, key)
        return added


@pytest.fixture
def hooked(redis_url: str, database_url: str) -> Iterator[Callable[..., FailoverStore]]:
    """Build a pair whose durable store runs ``meanwhile`` as it adds a session."""
    made: list[tuple[FailoverStore, str]] = []

    def make(meanwhile: Callable[[PostgresStore, str], Any]) -> FailoverStore:
        table = unique("hooked")
        durable = Hooked(database_url, table=table, cleanup_interval=0, meanwhile=meanwhile)
        made.append((FailoverStore(RedisStore(redis_url, prefix=table + ":"), durable, probe_interval=PROBE), table))
        return made[-1][0]

    yield make
    for pair, table in made:
        pair.cache.clear()
        pair.close()
        drop_table(database_url, table)


def test_the_pair_gives_no_copy_to_a_cache_that_lost_a_live_session(hooked: Callable[..., FailoverStore]) -> None:
    """The durable store refuses the copy: the cache, which had lost the session (a restart, an
    eviction), never holds the copy in its place, not even while the durable store is asked."""
    cached: list[Record | None] = []
    pair = hooked(lambda durable, key: cached.append(pair.cache.load(key)))
    key = secrets.token_hex(32)
    pair.create(key, values(1), 600)
    pair.cache.delete(key)
    assert pair.add(key, values(2), time.time() + 600) is False
    assert cached == [None] and pair.cache.load(key) is None
    record = pair.load(key)
    assert record is not None and record.data == decoded(values(1))


@pytest.mark.parametrize(
    ("meanwhile", "expected"),
    [(lambda store, key: store.delete(key), None),
     (lambda store, key: store.update(key, Changes({"n": "99"}), 600), 99)],
    ids=["logout", "update"],
)  # fmt: skip
def test_what_comes_between_the_pairs_two_writes_wins(
    hooked: Callable[..., FailoverStore], meanwhile: Callable[[PostgresStore, str], Any], expected: int | None
) -> None:
    """A logout (or an update) that reaches the durable store after the copy, before the cache has it,
    finds no copy in the cache to drop: the pair must not leave its copy there to be served."""
    pair = hooked(meanwhile)
    key = secrets.token_hex(32)
    assert pair.add(key, values(1), time.time() + 600) is True
    for store in (pair, pair.cache):
        record = store.load(key)
        assert (record and record.data["n"]) == expected


def test_a_copy_the_cache_missed_is_marked(private_redis: Any, database_url: str) -> None:
    """The cache fails as the copy is added: it is marked, so that no older copy of it is read
    from the cache once it is back."""
    table = unique("missed")
    pair = FailoverStore(RedisStore(private_redis.url, prefix="m:", timeout=TIMEOUT),
                         PostgresStore(database_url, table=table, cleanup_interval=0), probe_interval=60)  # fmt: skip
    try:
        pair.load(secrets.token_hex(32))  # the first probe, with the cache up
        private_redis.kill()
        key = secrets.token_hex(32)
        assert pair.add(key, values(1), time.time() + 600) is True
        assert key in {marked for _, marked in pair.durable.stale(10)}
        record = pair.load(key)
        assert record is not None and record.data == decoded(values(1))
    finally:
        pair.close()
        drop_table(database_url, table)


@pytest.mark.parametrize("batched", [False, True], ids=["add", "add_many"])
def test_the_pair_takes_no_copy_while_the_durable_store_is_away(redis_url: str, batched: bool) -> None:
    """Only the durable store can tell whether a session is there: without it, no copy."""
    prefix = unique("away") + ":"
    durable = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/test", cleanup_interval=0,
                            create_table=False, timeout=1.0)  # fmt: skip
    pair = FailoverStore(RedisStore(redis_url, prefix=prefix), durable, durable_up=False, probe_interval=60)
    try:
        key = secrets.token_hex(32)
        copy = (key, values(1), time.time() + 600)
        with pytest.raises(StoreError):
            pair.add_many([copy]) if batched else pair.add(*copy)
        assert pair.cache.load(key) is None
    finally:
        pair.close()
