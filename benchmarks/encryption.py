"""What encryption at rest costs per request: SessionMiddleware with and without SESSION_ENCRYPTION_KEY.

Run it from the repository root, with Redis on loopback (about 20 seconds)::

    .venv/bin/python benchmarks/encryption.py [--rounds 31] [--batch-ms 40] [--stores memory,redis]
    .venv/bin/python benchmarks/encryption.py --profile read    # cProfile of the encrypted read on memory, then stop

REDIS_URL (default: redis://127.0.0.1:6379/0) must point at 127.0.0.1 or localhost; the run's keys are
removed afterwards. In-process, through SessionMiddleware, on a session of five values as an application
keeps them (a user id, a CSRF token, an OAuth token, a cart, a counter), every one sealed when a key is set:

- ``read``: reads ``session["user_id"]`` (the session is loaded: its five values opened);
- ``write``: increments the counter (five values opened, the one changed sealed);
- ``new``: a request without a cookie that sets the five values (five sealed).

Each round times a batch of every variant (about ``--batch-ms`` long) in a shuffled order (bench.py's
``time_rounds``); ``µs`` is the median over the rounds of a variant's mean per request, ``±%`` the
interquartile range over the rounds, ``+µs`` the median over the rounds of the difference between the
encrypted batch and the plain one of the same round, ``x`` the median of their ratios (so a slower spell
of the machine between rounds cancels out). Target: at most 10 µs more per request for ``read`` and ``write``.
Below the table: one value sealed, and opened (for the first time, and again), on its own, in µs.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
import timeit
from typing import TYPE_CHECKING, Any

from bench import REDIS_URL, RUN, Timing, call, paired, profile_calls, time_rounds
from common import loopback_only, print_table, remove_from_redis, run_keys
from werkzeug.test import create_environ

from wsgisession import MemoryStore, SessionMiddleware, SessionStore
from wsgisession.stores.encrypted import MARK, Cipher

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

KEY = "benchmark-encryption-key-" + secrets.token_urlsafe(32)
SECRET = os.environ["BENCH_SECRET"]  # set by bench.py
VALUES: dict[str, Any] = {
    "user_id": 4711,
    "csrf_token": secrets.token_urlsafe(32),
    "oauth_token": "ya29." + secrets.token_urlsafe(120),
    "cart": [{"sku": "TEA-042", "qty": 2}, {"sku": "MUG-007", "qty": 1}],
    "counter": 0,
}
WORKLOADS = ("read", "write", "new")
STORES = {"memory": "memory", "redis": "Redis"}
TARGET_US = 10.0


def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    session, path = environ["session"], environ["PATH_INFO"]
    if path == "/read":
        body = str(session["user_id"])
    elif path == "/write":
        session["counter"] += 1
        body = str(session["counter"])
    else:
        session.update(VALUES)
        body = "ok"
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body.encode()]


def make_store(kind: str) -> SessionStore:
    if kind == "memory":
        return MemoryStore()
    from wsgisession.stores.redis import RedisStore

    return RedisStore(REDIS_URL, prefix=f"bench_{RUN}_enc:")


def middleware(store: SessionStore, encrypted: bool) -> SessionMiddleware:
    """The app on ``store``, configured as an application is: SESSION_ENCRYPTION_KEY in the environment, or not."""
    if encrypted:
        os.environ["SESSION_ENCRYPTION_KEY"] = KEY
    try:
        return SessionMiddleware(app, store, secret=SECRET)
    finally:
        os.environ.pop("SESSION_ENCRYPTION_KEY", None)


def session_cookie(web: SessionMiddleware, store: SessionStore, encrypted: bool) -> str:
    """The cookie of a new session of VALUES, checked to be stored sealed (or in the clear)."""
    _, cookies, _ = call(web, "/new")
    cookie = cookies[0].split(";", 1)[0]
    identity = web.core.identify(web.core.cookie_values(cookie))
    record = store.load(identity.key) if identity else None
    if record is None or [str(v).startswith(MARK) for v in record.data.values()] != [encrypted] * len(VALUES):
        sys.exit(f"the session is not stored as expected (encrypted: {encrypted}): {record}")
    return cookie


Calls = dict[tuple[str, str], tuple[SessionMiddleware, dict[str, Any]]]  # (variant, workload): (app, request)


def variant(kind: str, encrypted: bool) -> str:
    return f"{kind} {'encrypted' if encrypted else 'plain'}"


def prepare(kind: str, encrypted: bool) -> tuple[SessionStore, Calls]:
    """A store of its own, the app on it, and the request of each workload (read and write: a session each)."""
    store = make_store(kind)
    web = middleware(store, encrypted)
    calls: Calls = {}
    for workload in WORKLOADS:
        headers = {} if workload == "new" else {"Cookie": session_cookie(web, store, encrypted)}
        calls[variant(kind, encrypted), workload] = (web, create_environ(f"/{workload}", headers=headers))
    return store, calls


def cipher_costs(repeat: int = 20_000) -> list[list[str]]:
    """One value (the OAuth token) sealed, opened for the first time (each of ``repeat`` values sealed
    apart) and opened again (the same value): µs, the best of 5 runs."""
    cipher, text, key = Cipher([KEY]), json.dumps(VALUES["oauth_token"]), "0" * 64
    values = [json.loads(cipher.seal(key, "oauth_token", text)) for _ in range(repeat)]
    runs = {
        "Cipher.seal": lambda: [cipher.seal(key, "oauth_token", text) for _ in values],
        "Cipher.open, first time": lambda: [cipher.open(key, "oauth_token", value) for value in values],
        "Cipher.open, again": lambda: [cipher.open(key, "oauth_token", values[0]) for _ in values],
    }
    return [[name, f"{len(text)} B", f"{min(timeit.repeat(run, number=1, repeat=5)) / repeat * 1e6:.2f}"]
            for name, run in runs.items()]  # fmt: skip


def report(timings: dict[tuple[str, str], Timing], kinds: list[str]) -> list[str]:
    """Print the table; return the target lines."""
    header = ["store", "workload", "plain µs", "±%", "encrypted µs", "±%", "+µs", "x"]
    rows, lines = [], []
    for kind in kinds:
        for workload in WORKLOADS:
            plain, sealed = timings[variant(kind, False), workload], timings[variant(kind, True), workload]
            added = statistics.median(e - p for e, p in zip(sealed.rounds, plain.rounds, strict=True))
            rows.append([STORES[kind], workload, f"{plain.us:.1f}", f"{plain.spread:.0f}", f"{sealed.us:.1f}",
                         f"{sealed.spread:.0f}", f"{added:+.1f}", f"{paired(sealed, plain):.2f}"])  # fmt: skip
            if workload != "new":
                met = added <= TARGET_US
                lines.append(f"  [{'met' if met else 'MISSED'}] {STORES[kind]} {workload}: {added:+.1f} µs per "
                             f"request (target: at most +{TARGET_US:g})")  # fmt: skip
    print_table(header, rows, 2, groups=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=31, help="rounds (the median is reported)")
    parser.add_argument("--batch-ms", type=float, default=40, help="length of one batch of a variant")
    parser.add_argument("--min-calls", type=int, default=50, help="fewest requests in a batch")
    parser.add_argument("--stores", default=",".join(STORES), help="comma-separated subset of: " + ", ".join(STORES))
    parser.add_argument("--profile", choices=WORKLOADS, help="profile the encrypted workload on memory, then stop")
    args = parser.parse_args()
    loopback_only(REDIS_URL)
    kinds = [k.strip() for k in args.stores.split(",")]
    if set(kinds) - set(STORES):
        sys.exit(f"unknown stores: {', '.join(sorted(set(kinds) - set(STORES)))}")
    if args.profile:
        _, calls = prepare("memory", True)
        profile_calls(*calls[variant("memory", True), args.profile], 20_000, f"encrypted /{args.profile} on memory")
        return
    started = time.monotonic()
    stores: list[SessionStore] = []
    calls: Calls = {}
    try:
        for kind in kinds:
            for encrypted in (False, True):
                store, made = prepare(kind, encrypted)
                stores.append(store)
                calls.update(made)
        timings = time_rounds(calls, args.rounds, args.batch_ms / 1000, args.min_calls)
    finally:
        for store in stores:
            store.close()
        if "redis" in kinds:
            remove_from_redis(REDIS_URL, run_keys(REDIS_URL, RUN))
    print(f"\nMedian over {args.rounds} rounds of the mean µs per request (batches of ~{args.batch_ms:g} ms), "
          f"a session of {len(VALUES)} values\n")  # fmt: skip
    lines = report(timings, kinds)
    print()
    print_table(["what", "value", "µs"], cipher_costs(), 2)
    print("\n" + "\n".join(lines))
    print(f"\n({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
