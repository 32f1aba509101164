"""What a user's index costs Redis in memory, and that it leaves with the sessions by itself.

Run it from the repository root, with redis-server installed (about a minute)::

    .venv/bin/python benchmarks/user_index.py [--users 100000] [--sessions 3] [--ttl 15]

A private redis-server on a free loopback port (tests/redis_topologies.py starts it; it is killed at the
end). ``--users`` users log in ``--sessions`` times each: RedisStore.create of a bound session (the
binding and one small value), its script pipelined a thousand at a time. Redis's ``used_memory``:

1. with the index: every session and every user's index; MEMORY USAGE of a sample of each kind of key;
2. without it: the same, after the index keys are deleted (by name), so their share is the difference;
3. after expiry: the same logins again, every session to expire at one moment ``--ttl`` seconds after
   the last login; then nothing but time, no command but INFO and DBSIZE: the keys left, every half
   second, until none is. Each index expires by its own TTL, with its user's last session.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Any

import redis

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from common import print_table
from redis_topologies import RedisProcess

from wsgisession.stores.base import USER_KEY
from wsgisession.stores.redis import INDEX, RedisStore

PREFIX = "sess:"
BATCH = 1000


def session_key(user: int, n: int) -> str:
    """A store key as the core makes them: a SHA-256 in hex."""
    return hashlib.sha256(f"{user}/{n}/{random.random()}".encode()).hexdigest()


def log_in_everyone(client: redis.Redis, users: int, sessions: int, until: float) -> float:
    """Every user's logins through RedisStore.create (on a pipeline as its client), each session to
    expire at ``until`` (Unix seconds); returns the seconds taken."""
    warm = RedisStore(client=client, prefix=PREFIX)
    warm.create("warm", {"x": "1"}, 1)  # the script, loaded
    warm.delete("warm")
    started = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    store = RedisStore(client=pipe, prefix=PREFIX)  # each create queues its script
    t = int(time.time())
    for user in range(users):
        for n in range(sessions):
            binding = json.dumps({"id": str(user), "login": t, "seen": t})
            store.create(session_key(user, n), {USER_KEY: binding, "theme": '"dark"'}, until - time.time())
            if len(pipe) >= BATCH:
                pipe.execute()
        if user % 20_000 == 0:
            print(f"  {user} users...", file=sys.stderr)
    pipe.execute()
    return time.perf_counter() - started


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def sample_usage(client: redis.Redis, names: list[str]) -> float:
    """The mean MEMORY USAGE (every element counted) of these keys."""
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.memory_usage(name, samples=0)
    sizes = [size for size in pipe.execute() if size is not None]
    return sum(sizes) / len(sizes)


def mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--ttl", type=float, default=15.0, help="the sessions' life in part 3, s")
    args = parser.parse_args()
    users, sessions = args.users, args.sessions
    root = tempfile.mkdtemp(prefix="wsgisession-bench-")
    server = RedisProcess(root, "index", ["--save", "", "--appendonly", "no"])
    try:
        server.start()
        client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=60)
        version = client.info("server")["redis_version"]
        rows = measure(client, users, sessions, args.ttl)
        client.close()
    finally:
        server.kill()
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{users} users, {sessions} sessions each (a binding and one small value), Redis {version}\n")
    print_table(["", "used_memory", "per user", "keys"], rows)


def measure(client: redis.Redis, users: int, sessions: int, ttl: float) -> list[list[str]]:
    rows: list[list[str]] = []
    client.flushall()
    empty = used(client)
    print(f"Logging in {users} users, {sessions} times each...", file=sys.stderr)
    took = log_in_everyone(client, users, sessions, time.time() + 3600)
    with_index = used(client) - empty
    indexes = [f"{PREFIX}{INDEX}{user}" for user in range(users)]
    sample = random.sample(range(users), min(1000, users))
    index_size = sample_usage(client, [indexes[user] for user in sample])
    members: list[Any] = [client.zrange(indexes[user], 0, -1) for user in sample[:100]]
    session_size = sample_usage(client, [PREFIX + member.decode() for found in members for member in found])
    encoding = client.object("encoding", indexes[0])
    rows.append(["sessions and their index", mib(with_index), f"{with_index / users:.0f} B", str(client.dbsize())])
    for start in range(0, users, BATCH):
        client.unlink(*indexes[start : start + BATCH])
    without = used(client) - empty
    rows.append(["sessions alone (index keys deleted)", mib(without), f"{without / users:.0f} B", str(client.dbsize())])
    share = with_index - without
    rows.append(["the index's share", mib(share), f"{share / users:.0f} B", f"{share / with_index:.0%}"])
    rows.append(["MEMORY USAGE: one index key (mean)", f"{index_size:.0f} B", f"{index_size:.0f} B", str(encoding)])
    rows.append(["MEMORY USAGE: one session (mean)", f"{session_size:.0f} B", f"{session_size * sessions:.0f} B", ""])

    client.flushall()
    print(f"Logging them in again, to expire {ttl:g} s after the last login...", file=sys.stderr)
    until = time.time() + 1.5 * took + ttl  # the logins take about as long as the first time
    log_in_everyone(client, users, sessions, until)
    time.sleep(max(0.0, until - 1 - time.time()))
    live = used(client) - empty
    rows.append(["again, 1 s before they all expire", mib(live), f"{live / users:.0f} B", str(client.dbsize())])
    expired_before = int(client.info("stats")["expired_keys"])
    keys = client.dbsize()
    while keys:
        time.sleep(0.5)
        keys = client.dbsize()
        print(f"  {time.time() - until:+5.1f} s: {keys} keys, {mib(used(client) - empty)}", file=sys.stderr)
    gone = time.time() - until
    after = used(client) - empty
    expired = int(client.info("stats")["expired_keys"]) - expired_before
    commands = {name: stats["calls"] for name, stats in client.info("commandstats").items()}
    rows.append([f"{gone:.1f} s after, time alone", mib(after), f"{after / users:.0f} B", "0"])
    rows.append(["expired by Redis (sessions + indexes)", "", "", str(expired)])
    scans = commands.get("cmdstat_scan", 0) + commands.get("cmdstat_keys", 0)
    rows.append(["SCAN or KEYS commands run", "", "", str(scans)])
    return rows


if __name__ == "__main__":
    main()
