"""What a session costs per request: wsgisession against doing it by hand, and against its peers.

Run it from the repository root, with Redis and PostgreSQL on loopback::

    .venv/bin/pip install -e '.[bench]'     # the peers: Beaker, Flask-Session, Flask-SQLAlchemy
    .venv/bin/python benchmarks/bench.py [--rounds 31] [--batch-ms 60] [--keys 0] [--variants a,b] [--http]
    .venv/bin/python benchmarks/bench.py --profile wsgisession-redis:read    # cProfile of one variant, then stop

REDIS_URL and DATABASE_URL (default: redis://127.0.0.1:6379/0 and postgresql://postgres@127.0.0.1:5432/test)
must point at 127.0.0.1 or localhost. Every run uses its own tables and key prefixes and removes them
afterwards. The default run takes about two minutes; ``--http`` adds about five (``wrk``:
``apt-get install wrk``).

Variants (benchmarks/apps.py), all answering the same paths:

- ``bare``: the app without sessions; ``Flask (no sessions)``: the Flask app without Flask-Session;
- ``raw`` per store: the floor, by hand: the cookie parsed from HTTP_COOKIE, one GET (Redis) or one
  SELECT by primary key on a pooled connection (PostgreSQL, SQLite), JSON decoding; writes encode and
  SET EX or upsert (INSERT ... ON CONFLICT). No signature, no hashing, no Set-Cookie on writes;
- wsgisession on Redis, PostgreSQL, SQLite, Redis+PostgreSQL (FailoverStore) and memory;
- Beaker's SessionMiddleware (ext:redis, ext:database on PostgreSQL) and Flask-Session (redis,
  sqlalchemy on PostgreSQL), configured as their documentation shows.

Workloads: ``read`` (a logged-in read of session["user_id"]), ``write`` (read and increment a
counter), ``untouched`` (the app never touches the session; the request carries the cookie). Each
workload has sessions of its own, of ``2 + --keys`` keys.

In-process: each app is called directly with a prepared environ. Every round times a batch of each
variant and workload (about ``--batch-ms`` long: thousands of calls for the fast ones), in a
shuffled order, so that drift of the machine hits all alike; a variant's figure is the median over
the rounds of its mean µs per request; ``±%`` is the interquartile range over the rounds (noise: a
busy machine shows); ``cpu µs`` is this process's CPU time per request (the servers' is not in it).
``xraw`` compares with ``raw`` on the same store, ``xbare`` with ``bare``, each the median over the
rounds of the ratio of the two batches of a round (so drift between rounds cancels); ``+µs`` is what the
session layer adds to its own framework (``bare``, or Flask without sessions for Flask-Session),
which is what the comparison with the peers uses.

``--http``: each variant under gunicorn (2 workers, gthread), loaded by ``wrk`` (or, without it, a
Python generator) with ``--connections`` concurrent connections for ``--duration`` seconds per
workload, rotating over as many sessions: requests/s (median over ``--http-rounds`` rounds, each
in a new order; ``±%``: max - min over them; ``xraw req/s``: the median of the rounds' ratios),
median and 99th percentile latency, errors. The load
generator runs on the same machine as the servers: compare the ``untouched`` rows, the same code
in every variant, to see how much of a difference is noise.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import http.client
import io
import os
import pstats
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
RUN = secrets.token_hex(4)  # in every table name and key prefix of this run
WORKDIR = ""  # made by main(): SQLite files, Beaker's locks, gunicorn logs, the wrk script
os.environ.update(
    REDIS_URL=REDIS_URL,
    DATABASE_URL=DATABASE_URL,
    BENCH_RUN=RUN,
    BENCH_SECRET="benchmark-secret-" + secrets.token_urlsafe(32),
)
sys.path.insert(0, str(HERE))

import apps  # noqa: E402 - reads the environment set above when it builds an app
import redis  # noqa: E402
from common import close_all, drop_run_tables, loopback_only, print_table, remove_from_redis, run_keys  # noqa: E402
from werkzeug.test import create_environ, run_wsgi_app  # noqa: E402

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

WORKLOADS = ("read", "write", "untouched")
READ_TARGET, WRITE_TARGET, UNTOUCHED_TARGET_US, HTTP_TARGET = 1.15, 1.25, 3.0, 0.9


# -- the variants ------------------------------------------------------------------------


@dataclass
class Variant:
    key: str
    library: str
    store: str
    app: WSGIApplication
    cookie_name: str
    cookies: list[str] = field(default_factory=list)  # "name=value" of the sessions it logged in

    @property
    def framework_bare(self) -> str:
        return "flask-bare" if self.key.startswith("flask") else "bare"

    @property
    def sessions(self) -> bool:
        return self.key not in ("bare", "flask-bare")

    def login(self) -> str:
        _, cookies, _ = call(self.app, "/login")
        for header in cookies:
            pair = header.split(";", 1)[0].strip()
            if pair.partition("=")[0] == self.cookie_name and pair.partition("=")[2]:
                self.cookies.append(pair)
                return pair
        raise RuntimeError(f"{self.library} {self.store}: /login set no {self.cookie_name} cookie")

    def close(self) -> None:
        app: Any = self.app
        if hasattr(app, "close"):  # wsgisession's middleware, the raw apps
            app.close()
        if "SESSION_SQLALCHEMY" in getattr(app, "config", {}):
            with app.app_context():
                app.config["SESSION_SQLALCHEMY"].engine.dispose()


def call(app: WSGIApplication, path: str, cookie: str | None = None) -> tuple[str, list[str], bytes]:
    environ = create_environ(path, "http://127.0.0.1/", headers={"Cookie": cookie} if cookie else {})
    body, status, headers = run_wsgi_app(app, environ, buffered=True)
    return status, headers.getlist("Set-Cookie"), b"".join(body)


def check(variant: Variant, workload: str, cookie: str) -> None:
    """Make sure the variant does what is timed: the session is really read, and written."""
    path = "/" + workload
    status, _, body = call(variant.app, path, cookie)
    status2, _, body2 = call(variant.app, path, cookie)
    ok = status.startswith("200") and status2.startswith("200")
    if workload == "read":
        ok = ok and body == body2 == b"42"
    elif workload == "write" and variant.sessions:
        ok = ok and int(body2) == int(body) + 1
    elif workload == "untouched":
        ok = ok and body == b"ok"
    if not ok:
        raise RuntimeError(f"{variant.library} {variant.store} /{workload}: {status} {body!r}, {status2} {body2!r}")


# -- in-process timing -------------------------------------------------------------------


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
    return _write


def _write(data: bytes) -> None:
    pass


def batch(app: WSGIApplication, environ: dict[str, Any], calls: int) -> tuple[float, float]:
    """Mean seconds per request over ``calls`` requests: elapsed, and CPU time of this process."""
    start_response = _start_response
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        body = app(environ.copy(), start_response)
        for _chunk in body:
            pass
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return (time.perf_counter() - started) / calls, (time.process_time() - cpu) / calls


def prepared(variant: Variant, workload: str) -> dict[str, Any]:
    """The request of ``workload``, with a session of its own (the writes do not touch the read's record)."""
    cookie = variant.cookies[WORKLOADS.index(workload)]
    return create_environ("/" + workload, "http://127.0.0.1/", headers={"Cookie": cookie})


@dataclass
class Timing:
    us: float  # median µs per request
    cpu_us: float  # median CPU µs per request, in this process (the servers' time is not in it)
    spread: float  # interquartile range over the rounds, in % of the median
    rounds: list[float]  # µs per request in each round, in round order


def paired(a: Timing | Load, b: Timing | Load) -> float:
    """``a``'s figure over ``b``'s: the median of the rounds' ratios. The two ran in the same round
    (seconds apart in process, within a minute or so over HTTP), so a slower or faster spell of the
    machine between rounds cancels out; one within a round does not."""
    return statistics.median(x / y for x, y in zip(a.rounds, b.rounds, strict=True))


def in_process(variants: list[Variant], rounds: int, batch_s: float, min_calls: int) -> dict[tuple[str, str], Timing]:
    """Median µs per request of each (variant, workload)."""
    calls = {(v.key, w): (v.app, prepared(v, w)) for v in variants for w in WORKLOADS}
    return time_rounds(calls, rounds, batch_s, min_calls)


def time_rounds(
    calls: dict[tuple[str, str], tuple[WSGIApplication, dict[str, Any]]], rounds: int, batch_s: float, min_calls: int
) -> dict[tuple[str, str], Timing]:
    """Each (app, environ): warmed up, then timed in batches of about ``batch_s`` seconds (at least
    ``min_calls`` calls), once per round in a shuffled order; the median µs per call and each round's."""
    sizes = {}
    for key, (app, environ) in calls.items():  # warm up, and size the batches
        batch(app, environ, 20)
        sizes[key] = max(min_calls, min(200_000, int(batch_s / batch(app, environ, 50)[0])))
    times: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in calls}
    for r in range(rounds):
        order = list(calls)
        random.Random(r).shuffle(order)
        print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
        for key in order:
            app, environ = calls[key]
            times[key].append(batch(app, environ, sizes[key]))
    return {k: summary([x * 1e6 for x, _ in t], [c * 1e6 for _, c in t]) for k, t in times.items()}


def summary(us: list[float], cpu_us: list[float] | None = None) -> Timing:
    """A case's Timing from the µs of its rounds (and their CPU µs, if measured): the medians, and the
    interquartile range in % of the median."""
    q = statistics.quantiles(us, n=4) if len(us) > 1 else [us[0]] * 3
    median = statistics.median(us)
    return Timing(median, statistics.median(cpu_us) if cpu_us else 0.0, 100 * (q[2] - q[0]) / median, us)


def profile(variant: Variant, workload: str, calls: int) -> None:
    profile_calls(variant.app, prepared(variant, workload), calls, f"{variant.library} {variant.store} /{workload}")


def profile_calls(app: WSGIApplication, environ: dict[str, Any], calls: int, title: str) -> None:
    """Print cProfile's tables (by own time, by cumulative time) of ``calls`` calls of ``app``."""
    batch(app, environ, 200)
    profiler = cProfile.Profile()
    profiler.enable()
    batch(app, environ, calls)
    profiler.disable()
    for order, sort, restrict in (("by own time", "tottime", 30), ("by cumulative time", "cumulative", 45)):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(sort).print_stats(restrict)
        print(f"\n{title}, {calls} calls, {order}:")
        print(out.getvalue().split("\n", 6)[-1])


# -- HTTP --------------------------------------------------------------------------------


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    spread: float = 0.0  # of requests/s over the rounds: (max - min) in % of the median
    rounds: list[float] = field(default_factory=list)  # requests/s in each round, in round order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def gunicorn(variant: str, threads: int) -> Any:
    port = free_port()
    log_path = Path(WORKDIR) / f"gunicorn-{variant}.log"
    command = [sys.executable, "-m", "gunicorn", f"apps:build({variant!r})", "--chdir", str(HERE),
               "--bind", f"127.0.0.1:{port}", "--workers", "2", "--worker-class", "gthread",
               "--threads", str(threads), "--graceful-timeout", "5", "--log-level", "warning"]  # fmt: skip
    with contextlib.suppress(ImportError):
        from gunicorn.config import KNOWN_SETTINGS

        if any(setting.name == "control_socket_disable" for setting in KNOWN_SETTINGS):
            command.append("--no-control-socket")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn {variant} did not start:\n{log_path.read_text()[-3000:]}")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                conn.request("GET", "/untouched")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wrk(url: str, cookies: list[str], connections: int, duration: float) -> Load:
    script = Path(WORKDIR) / "cookies.lua"
    script.write_text(
        "local cookies = {" + ",".join(f'"{c}"' for c in cookies) + "}\nlocal i = 0\n"
        'request = function()\n  i = i + 1\n  wrk.headers["Cookie"] = cookies[i % #cookies + 1]\n'
        "  return wrk.format()\nend\n"
    )
    threads = min(connections, os.cpu_count() or 2)
    command = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{duration:g}s",
        "--latency",
        "-s",
        str(script),
    ]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout

    def latency(percentile: str) -> float:
        found = re.search(rf"^\s+{percentile}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not found:
            raise RuntimeError(f"wrk printed no {percentile}% latency:\n{out}")
        return float(found[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[found[2]]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx[1]) if non2xx else 0) + (sum(map(int, sockets.groups())) if sockets else 0)
    return Load(float(rps[1]) if rps else 0.0, latency("50"), latency("99"), errors)


def python_load(url: str, cookies: list[str], connections: int, duration: float) -> Load:
    """A stand-in for wrk: one thread per connection, keep-alive, until the time is up."""
    parts = urlsplit(url)
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors = [0] * connections
    deadline = time.monotonic() + duration

    def client(n: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        headers = {"Cookie": cookies[n % len(cookies)]}
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                conn.request("GET", parts.path, headers=headers)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    errors[n] += 1
            except (OSError, http.client.HTTPException):
                errors[n] += 1
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
            latencies[n].append(time.perf_counter() - started)
        conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(connections)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merged = sorted(x for per in latencies for x in per)
    elapsed = time.monotonic() - started
    if not merged:
        return Load(0.0, 0.0, 0.0, sum(errors))
    return Load(len(merged) / elapsed, merged[len(merged) // 2] * 1e3, merged[int(len(merged) * 0.99)] * 1e3,
                sum(errors))  # fmt: skip


def over_http(
    variants: list[Variant], connections: int, duration: float, threads: int, rounds: int
) -> dict[tuple[str, str], Load]:
    """Per variant and workload: the median requests/s and latencies over the rounds, and all errors."""
    load = wrk if shutil.which("wrk") else python_load
    if load is python_load:
        print("wrk is not installed (apt-get install wrk): using a Python load generator", file=sys.stderr)
    served = [v for v in variants if v.store != "memory"]  # gunicorn's two workers would not share memory
    for v in served:
        while v.sessions and len(v.cookies) < connections:
            v.login()
    samples: dict[tuple[str, str], list[Load]] = {}
    for r in range(rounds):
        order = served[:]
        random.Random(1000 + r).shuffle(order)  # a new order each round: drift does not favour anyone
        for v in order:
            cookies = v.cookies[:connections] if v.sessions else ["session=none"]
            print(f"  HTTP round {r + 1}/{rounds}: {v.library} {v.store}", file=sys.stderr, flush=True)
            with gunicorn(v.key, threads) as base:
                load(base + "/read", cookies, connections, 1.0)  # warm up: connections, pools
                for w in random.Random(r).sample(WORKLOADS, len(WORKLOADS)):
                    samples.setdefault((v.key, w), []).append(load(f"{base}/{w}", cookies, connections, duration))
    results = {}
    for k, runs in samples.items():
        rps = [x.rps for x in runs]
        median = statistics.median(rps)
        results[k] = Load(
            median,
            statistics.median(x.p50_ms for x in runs),
            statistics.median(x.p99_ms for x in runs),
            sum(x.errors for x in runs),
            100 * (max(rps) - min(rps)) / median if median else 0.0,
            rps,
        )
    return results


# -- the report --------------------------------------------------------------------------


def paired_ratio(a: Timing | Load | None, b: Timing | Load | None) -> str:
    return f"{paired(a, b):.2f}" if a and b else ""


def report(
    variants: list[Variant],
    timings: dict[tuple[str, str], Timing],
    loads: dict[tuple[str, str], Load] | None,
) -> list[str]:
    """Print the table; return the target lines."""
    times = {k: t.us for k, t in timings.items()}
    by_key = {v.key: v for v in variants}
    raw_of = {v.store: v.key for v in variants if v.library == "raw"}
    header = ["workload", "library", "store", "µs/req", "±%", "cpu µs", "xraw", "xbare", "+µs"]
    if loads is not None:
        header += ["req/s", "±%", "xraw req/s", "p50 ms", "p99 ms", "errors"]
    rows = []
    for w in WORKLOADS:
        for v in variants:
            us = times[v.key, w]
            raw = raw_of.get(v.store)
            own_bare = times.get((v.framework_bare, w))
            timing = timings[v.key, w]
            row = [w, v.library, v.store, f"{us:.1f}", f"{timing.spread:.0f}", f"{timing.cpu_us:.1f}",
                   paired_ratio(timing, timings.get((raw, w))) if raw else "",
                   paired_ratio(timing, timings.get(("bare", w))),
                   f"{us - own_bare:+.1f}" if v.sessions and own_bare else ""]  # fmt: skip
            if loads is not None:
                load = loads.get((v.key, w))
                raw_load = loads.get((raw, w)) if raw else None
                row += (
                    [f"{load.rps:.0f}", f"{load.spread:.0f}", paired_ratio(load, raw_load),
                     f"{load.p50_ms:.2f}", f"{load.p99_ms:.2f}", str(load.errors)] if load else [""] * 6
                )  # fmt: skip
            rows.append(row)
    print_table(header, rows, 3, groups=True)

    lines = []

    def target(text: str, met: bool, miss: str) -> None:
        lines.append(f"  [{'met' if met else 'MISSED'}] {text}" + ("" if met else f": missed by {miss}"))

    for w, limit in (("read", READ_TARGET), ("write", WRITE_TARGET)):
        for store in ("redis", "postgres"):
            ws, raw = timings.get((f"wsgisession-{store}", w)), timings.get((f"raw-{store}", w))
            if ws and raw:
                r = paired(ws, raw)
                target(f"{w} on {store} within {limit:.2f}x raw: {r:.2f}x ({ws.us:.1f} vs {raw.us:.1f} µs)",
                       r <= limit, f"{r - limit:.2f}x, {ws.us - raw.us * limit:.1f} µs/req too slow")  # fmt: skip
    bare = times.get(("bare", "untouched"))
    for v in variants:
        if v.library == "wsgisession" and bare:
            extra = times[v.key, "untouched"] - bare
            target(f"untouched on {v.store} within {UNTOUCHED_TARGET_US:g} µs of bare: {extra:+.1f} µs",
                   extra <= UNTOUCHED_TARGET_US, f"{extra - UNTOUCHED_TARGET_US:.1f} µs")  # fmt: skip
    for peer in ("beaker", "flask-session"):
        for store in ("redis", "postgres"):
            p, ours = by_key.get(f"{peer}-{store}"), by_key.get(f"wsgisession-{store}")
            if not (p and ours):
                continue
            for w in WORKLOADS:
                mine = times[ours.key, w] - times[ours.framework_bare, w]
                theirs = times[p.key, w] - times[p.framework_bare, w]
                target(f"ahead of {p.library} on {store} /{w}: +{mine:.1f} µs vs +{theirs:.1f} µs over bare",
                       mine < theirs, f"{mine - theirs:.1f} µs/req")  # fmt: skip
    if loads is not None:
        for store in ("redis", "postgres"):
            ws, raw = loads.get((f"wsgisession-{store}", "read")), loads.get((f"raw-{store}", "read"))
            if ws and raw:
                r = paired(ws, raw)
                text = f"HTTP read on {store} >= {HTTP_TARGET}x raw req/s: {r:.2f}x ({ws.rps:.0f} vs {raw.rps:.0f})"
                target(text, r >= HTTP_TARGET, f"{HTTP_TARGET - r:.2f}x, {HTTP_TARGET * raw.rps - ws.rps:.0f} req/s")
    return lines


# -- cleanup -----------------------------------------------------------------------------


def cleanup(variants: list[Variant]) -> None:
    close_all((v.key, v.close) for v in variants)
    keys = run_keys(REDIS_URL, RUN)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        # Beaker names its keys by session id alone: beaker_cache:<id>:session (and beaker_lock:...);
        # its signed cookie value ends with the id.
        beaker = [c.partition("=")[2] for v in variants if v.library == "Beaker" for c in v.cookies]
        for pattern in ("beaker_cache:*", "beaker_lock:beaker_cache:*"):
            for key in client.scan_iter(match=pattern, count=1000):
                parts = key.decode().split(":")
                if len(parts) > 2 and any(value.endswith(parts[-2]) for value in beaker):
                    keys.append(key)
    finally:
        client.close()
    remove_from_redis(REDIS_URL, keys)
    drop_run_tables(DATABASE_URL, RUN)
    shutil.rmtree(WORKDIR, ignore_errors=True)


# -- main --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=31, help="in-process rounds (the median is reported)")
    parser.add_argument("--batch-ms", type=float, default=60, help="in-process: length of one batch of requests")
    parser.add_argument("--min-calls", type=int, default=100, help="in-process: fewest requests in a batch")
    parser.add_argument("--keys", type=int, default=0, help="more keys in each session (30-character strings)")
    parser.add_argument("--variants", help="comma-separated subset of: " + ", ".join(apps.VARIANTS))
    parser.add_argument("--http", action="store_true", help="also measure each variant under gunicorn")
    parser.add_argument("--connections", type=int, default=100, help="HTTP: concurrent connections")
    parser.add_argument("--duration", type=float, default=2, help="HTTP: seconds per variant, workload and round")
    parser.add_argument("--http-rounds", type=int, default=3, help="HTTP: rounds (the median is reported)")
    parser.add_argument("--threads", type=int, default=8, help="HTTP: gthread threads per gunicorn worker")
    parser.add_argument("--profile", metavar="VARIANT:WORKLOAD", help="profile one variant in-process, and stop")
    parser.add_argument("--profile-calls", type=int, default=20000)
    args = parser.parse_args()
    loopback_only(REDIS_URL, DATABASE_URL)
    global WORKDIR
    WORKDIR = tempfile.mkdtemp(prefix="wsgisession-bench-")
    os.environ.update(BENCH_DIR=WORKDIR, BENCH_KEYS=str(args.keys))  # gunicorn's workers inherit them

    keys = list(apps.VARIANTS)
    if args.variants:
        keys = [k.strip() for k in args.variants.split(",")]
        for extra in ("bare", "flask-bare"):  # what the ratios need
            if extra not in keys and (extra == "bare" or any(k.startswith("flask") for k in keys)):
                keys.append(extra)
    if args.profile:
        keys = [args.profile.partition(":")[0]]
    unknown = set(keys) - set(apps.VARIANTS)
    if unknown:
        sys.exit(f"unknown variants: {', '.join(sorted(unknown))}")

    variants: list[Variant] = []
    started = time.monotonic()
    try:
        for key in keys:
            try:
                app = apps.build(key)
            except ImportError as exc:
                print(f"skipping {key}: {exc} (pip install -e '.[bench]')", file=sys.stderr)
                continue
            library, store = apps.VARIANTS[key]
            variants.append(Variant(key, library, store, app, apps.COOKIE_NAMES.get(key, "session")))
        for v in variants:
            for w in WORKLOADS:  # a session per workload
                cookie = v.login() if v.sessions else "session=none"
                if not v.sessions:
                    v.cookies.append(cookie)
                check(v, w, cookie)
        if args.profile:
            profile(variants[0], args.profile.partition(":")[2] or "read", args.profile_calls)
            return
        print(f"in-process: {len(variants)} variants x {len(WORKLOADS)} workloads, {args.rounds} rounds",
              file=sys.stderr)  # fmt: skip
        times = in_process(variants, args.rounds, args.batch_ms / 1000, args.min_calls)
        loads = (
            over_http(variants, args.connections, args.duration, args.threads, args.http_rounds) if args.http else None
        )
    finally:
        cleanup(variants)

    title = f"Sessions of {2 + args.keys} keys. In-process: median over {args.rounds} rounds of the mean µs/request"
    title += f" (batches of ~{args.batch_ms:g} ms); xraw, xbare: median of the rounds' ratios"
    title += "; cpu: this process's CPU time (the servers' is not in it)"
    if args.http:
        title += (f"\nHTTP: gunicorn 2 workers x {args.threads} gthreads, {args.connections} connections "
                  f"({'wrk' if shutil.which('wrk') else 'Python load generator'}), {args.duration:g} s per workload, "
                  f"median of {args.http_rounds} rounds")  # fmt: skip
    print(f"\n{title}\n")
    lines = report(variants, times, loads)
    print("\nTargets:")
    print("\n".join(lines))
    print(f"\n({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
