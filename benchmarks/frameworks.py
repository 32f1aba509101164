"""What wsgisession's framework adapters cost per request: against each framework without sessions,
against the frameworks' own server-side sessions on the same servers, and against SessionMiddleware.

Run it from the repository root, with Redis and PostgreSQL on loopback::

    .venv/bin/pip install -e '.[bench]'   # Flask-Session, Flask-SQLAlchemy, Django, Pyramid
    .venv/bin/python benchmarks/frameworks.py [--rounds 21] [--batch-ms 40] [--variants a,b]
    .venv/bin/python benchmarks/frameworks.py --profile django-redis:write   # cProfile of one variant, then stop

REDIS_URL and DATABASE_URL (default: redis://127.0.0.1:6379/0 and postgresql://postgres@127.0.0.1:5432/test)
must point at 127.0.0.1 or localhost. Every run uses its own key prefixes, tables and PostgreSQL schema,
and removes them afterwards. The default run takes about two minutes.

Variants (benchmarks/framework_apps.py), all answering the same paths:

- each framework without sessions: Flask (its default session interface, unused: no SECRET_KEY),
  Django (no SessionMiddleware), Pyramid (no session factory); and bench.py's raw WSGI app;
- wsgisession's adapter in each framework on Redis, PostgreSQL and a MemoryStore, each store on a key
  prefix or table of its own (Django's engine serves one core per process: ``set_core`` switches it
  between the variants, outside the timed batches);
- SessionMiddleware on a MemoryStore around bench.py's raw app, and around each framework's app
  (whose views read ``environ["session"]``: the recipe before the adapters);
- the peers: Flask-Session 0.8 (redis; sqlalchemy on PostgreSQL, as apps.py configures them),
  Django's ``cache`` backend (RedisCache) and ``db`` backend (PostgreSQL, persistent connections,
  django_session in a schema of this run);
- Django's floor: its SessionMiddleware on a dict engine (no encoding, signing or server), what any
  session engine costs at least.

Workloads: ``read`` (a logged-in read of session["user_id"]), ``write`` (read and increment a
counter), ``untouched`` (the view never touches the session; the request carries the cookie),
``login`` (a visitor without a cookie gets a new session of two keys, stored, and its cookie). Each
workload has sessions of its own.

In-process, as bench.py measures: each app is called directly with a prepared environ; every round
times a batch of each variant and workload (about ``--batch-ms`` long), in a shuffled order; a figure
is the median over the rounds; ``±%`` is the interquartile range over the rounds; ``cpu µs`` is this
process's CPU time (the servers' is not in it). ``+µs`` is what the sessions add to their own
framework without sessions, ``xpeer`` compares with the fastest peer in the same framework on the same
store; both are medians of the rounds' differences or ratios (drift between rounds cancels).

The adapter's own cost is measured on a MemoryStore, so that no server is in it: as the issue defines
it, ``(framework + adapter - framework) - (raw app + SessionMiddleware - raw app)``; and directly,
``framework + adapter - framework wrapped in SessionMiddleware`` (the same core work, done inside the
same framework). Before timing, each variant is checked: the paths answer what they should, and a
login writes a record to its own store (and to no other variant's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import framework_apps
from bench import (  # sets the apps' environment
    DATABASE_URL,
    REDIS_URL,
    RUN,
    Timing,
    call,
    paired,
    profile_calls,
    time_rounds,
)
from common import close_all, drop_run_tables, loopback_only, print_table, remove_from_redis, run_keys
from werkzeug.test import create_environ

from wsgisession import SessionCore, Settings

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

    from wsgisession import SessionStore

WORKLOADS = ("read", "write", "untouched", "login")
Timings = dict[tuple[str, str], Timing]
FRAMEWORKS = ("Flask", "Django", "Pyramid")
ADAPTER_TARGET_US = 10.0
PEERS = ("Flask-Session", "Django cache", "Django db")


@dataclass
class Variant:
    key: str
    framework: str
    library: str
    store: str
    app: WSGIApplication
    stored: Callable[[], int] | None  # counts the records of its store
    our_store: SessionStore | None  # wsgisession's store, for ours
    cookies: dict[str, str] = field(default_factory=dict)  # per workload: "name=value" of its session

    @property
    def bare(self) -> str:
        """The key of its framework without sessions."""
        return self.key.partition("-")[0] + "-bare"

    @property
    def sessions(self) -> bool:
        return self.store != "-"

    @property
    def ours(self) -> bool:
        return self.library in ("wsgisession", "SessionMiddleware")

    def login(self) -> str:
        """Log in a new session; its cookie as ``name=value``."""
        status, cookies, body = call(self.app, "/login")
        pairs = [h.split(";", 1)[0].strip() for h in cookies]
        pairs = [p for p in pairs if p.partition("=")[2]]
        if not status.startswith("200") or body != b"ok" or len(pairs) != 1:
            raise RuntimeError(f"{self.key} /login: {status} {body!r}, cookies {cookies}")
        return pairs[0]

    def close(self) -> None:
        if self.our_store is not None:
            self.our_store.close()
        config = getattr(self.app, "config", {})
        if "SESSION_SQLALCHEMY" in config:  # Flask-Session
            with self.app.app_context():  # type: ignore[attr-defined]
                config["SESSION_SQLALCHEMY"].engine.dispose()
        if "SESSION_REDIS" in config:
            config["SESSION_REDIS"].close()


# -- checks: each variant does what is timed, on the store it names -----------------------


def check(variant: Variant, workload: str) -> None:
    """The path answers what it should, twice (a write increments its counter)."""
    cookie = variant.cookies.get(workload)
    path = "/" + workload
    status, _, body = call(variant.app, path, cookie)
    status2, _, body2 = call(variant.app, path, cookie)
    ok = status.startswith("200") and status2.startswith("200")
    if workload == "read":
        ok = ok and body == body2 == b"42"
    elif workload == "write" and variant.sessions:
        ok = ok and int(body2) == int(body) + 1
    elif workload in ("untouched", "login"):
        ok = ok and body == body2 == b"ok"
    if not ok:
        raise RuntimeError(f"{variant.key} /{workload}: {status} {body!r}, {status2} {body2!r}")


def check_stores(variants: list[Variant]) -> None:
    """A login writes one record to the variant's own store and none to another variant's; ours can
    be read back through the core, by the cookie it set."""
    counters = {v.key: v.stored for v in variants if v.stored is not None}
    for v in variants:
        if not v.sessions:
            continue
        before = {key: count() for key, count in counters.items()}
        cookie = v.login()
        after = {key: count() for key, count in counters.items()}
        changed = {k for k in before if after[k] != before[k]}
        expected = {v.key} if v.key in counters else set()
        if changed != expected or (v.key in counters and after[v.key] != before[v.key] + 1):
            raise RuntimeError(f"{v.key}: a login changed the record counts of {sorted(changed) or 'no variant'}")
        if v.our_store is not None:
            core = SessionCore(Settings.load({}, secret=os.environ["BENCH_SECRET"]), v.our_store)
            found = core.identify([cookie.partition("=")[2]])
            record = found and v.our_store.load(found.key)
            if not record or record.data.get("user_id") != 42:
                raise RuntimeError(f"{v.key}: the session of the login's cookie is not in its store ({record})")


# -- timing ------------------------------------------------------------------------------


def environ(variant: Variant, workload: str) -> dict[str, Any]:
    """The request of ``workload``: with the cookie of its session (a login comes without one)."""
    cookie = variant.cookies.get(workload)
    return create_environ("/" + workload, "http://127.0.0.1/", headers={"Cookie": cookie} if cookie else {})


def in_process(variants: list[Variant], rounds: int, batch_s: float, min_calls: int) -> Timings:
    """Per (variant, workload): the median µs per request, and each round's."""
    calls = {(v.key, w): (v.app, environ(v, w)) for v in variants for w in WORKLOADS}
    return time_rounds(calls, rounds, batch_s, min_calls)


@dataclass
class Paired:
    """A per-round quantity: its median over the rounds, and its quartiles."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Paired:
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        return cls(statistics.median(values), q[0], q[2])

    def range(self) -> str:
        return f"{self.low:+.1f}..{self.high:+.1f}"

    def __str__(self) -> str:
        return f"{self.median:+.1f} µs (IQR {self.range()})"


def over(a: Timing, b: Timing) -> Paired:
    """``a`` minus ``b``, round by round."""
    return Paired.of([x - y for x, y in zip(a.rounds, b.rounds, strict=True)])


def profile(variant: Variant, workload: str, calls: int) -> None:
    title = f"{variant.library} in {variant.framework} on {variant.store} /{workload}"
    profile_calls(variant.app, environ(variant, workload), calls, title)


# -- the report --------------------------------------------------------------------------


def peers_of(variant: Variant, variants: list[Variant]) -> list[Variant]:
    """The peers in ``variant``'s framework on its store (none for a peer itself)."""
    if not variant.ours:
        return []
    return [p for p in variants if p.framework == variant.framework and p.store == variant.store and p.library in PEERS]


def target(text: str, met: bool, detail: str) -> str:
    return f"  [{'met' if met else 'MISSED'}] {text}: {detail}"


def report(variants: list[Variant], timings: Timings) -> list[str]:
    """Print the table; return the target lines of the comparison with the peers."""
    header = ["workload", "framework", "library", "store", "µs/req", "±%", "cpu µs", "+µs", "xpeer", "peer"]
    rows = []
    for w in WORKLOADS:
        for v in variants:
            if v.framework == "WSGI":
                continue
            t = timings[v.key, w]
            bare = timings.get((v.bare, w))
            plus = f"{over(t, bare).median:+.1f}" if v.sessions and bare else ""
            peers = peers_of(v, variants)
            best = min(peers, key=lambda p: timings[p.key, w].us) if peers else None
            xpeer = f"{paired(t, timings[best.key, w]):.2f}" if best else ""
            rows.append([w, v.framework, v.library, v.store, f"{t.us:.1f}", f"{t.spread:.0f}", f"{t.cpu_us:.1f}",
                         plus, xpeer, best.library if best else ""])  # fmt: skip
    print_table(header, rows, 4, groups=True)
    lines = []
    for v in variants:
        for p in peers_of(v, variants):
            for w in WORKLOADS:
                mine, theirs = over(timings[v.key, w], timings[v.bare, w]), over(timings[p.key, w], timings[v.bare, w])
                lead = over(timings[v.key, w], timings[p.key, w])
                noise = " (within noise)" if lead.low <= 0 <= lead.high else ""
                detail = f"{mine.median:+.1f} vs {theirs.median:+.1f} µs over bare; difference {lead}{noise}"
                lines.append(target(f"{v.framework} on {v.store} /{w} ahead of {p.library}", lead.median < 0, detail))
    return lines


def adapter_costs(keys: set[str], timings: Timings) -> list[str]:
    """Print the adapters' own cost; return its target lines."""
    print("\nThe adapters' own cost, in µs per request, on a MemoryStore (medians of the rounds' values):\n"
          "  adapter +µs:     framework + adapter, over the framework without sessions\n"
          "  middleware +µs:  raw app + SessionMiddleware, over the raw app\n"
          "  cost:            the difference of the two (the issue's definition)\n"
          "  in framework:    framework wrapped in SessionMiddleware (views read environ['session']), over\n"
          "                   the framework without sessions\n"
          "  over middleware: framework + adapter, over the framework wrapped in SessionMiddleware\n"
          "  floor +µs:       Django's SessionMiddleware on a dict engine (no encoding, no signing), over Django\n"
          "  over floor:      framework + adapter, over that floor\n")  # fmt: skip
    header = ["workload", "framework", "adapter +µs", "middleware +µs", "cost", "IQR", "in framework",
              "over middleware", "IQR", "floor +µs", "over floor"]  # fmt: skip
    rows, lines, limit = [], [], ADAPTER_TARGET_US
    for w in WORKLOADS:
        raw = deltas(timings, "wsgi-memory", "wsgi-bare", w)
        for framework in FRAMEWORKS:
            ours, bare, wrapped, floor = (
                f"{framework.lower()}-{kind}" for kind in ("memory", "bare", "middleware", "floor")
            )
            if not {ours, bare} <= keys:
                continue
            adapter = deltas(timings, ours, bare, w)
            cost = Paired.of([a - b for a, b in zip(adapter, raw, strict=True)])
            row = [w, framework, f"{statistics.median(adapter):+.1f}", f"{statistics.median(raw):+.1f}",
                   f"{cost.median:+.1f}", cost.range()]  # fmt: skip
            lines.append(target(f"{framework} adapter cost /{w} within {limit:g} µs", cost.median <= limit, str(cost)))
            if wrapped in keys:
                direct = Paired.of(deltas(timings, ours, wrapped, w))
                in_framework = statistics.median(deltas(timings, wrapped, bare, w))
                row += [f"{in_framework:+.1f}", f"{direct.median:+.1f}", direct.range()]
                text = f"{framework} adapter /{w} within {limit:g} µs of SessionMiddleware around {framework}"
                lines.append(target(text, direct.median <= limit, str(direct)))
            if floor in keys:
                row += [""] * (9 - len(row))
                row += [f"{statistics.median(deltas(timings, floor, bare, w)):+.1f}",
                        f"{statistics.median(deltas(timings, ours, floor, w)):+.1f}"]  # fmt: skip
            rows.append(row + [""] * (len(header) - len(row)))
    print_table(header, rows, 2, groups=True)
    return lines


def deltas(timings: Timings, a: str, b: str, workload: str) -> list[float]:
    """Per round: variant ``a``'s µs per request minus ``b``'s."""
    return [x - y for x, y in zip(timings[a, workload].rounds, timings[b, workload].rounds, strict=True)]


# -- cleanup -----------------------------------------------------------------------------


def cleanup(variants: list[Variant]) -> None:
    """Close every app's connections; remove this run's keys, tables and schema."""
    close_all((v.key, v.close) for v in variants)
    if "django" in sys.modules:
        framework_apps.close_django()
    remove_from_redis(REDIS_URL, run_keys(REDIS_URL, RUN))
    drop_run_tables(DATABASE_URL, RUN, [f"bench_{RUN}_{framework_apps.DJANGO_SCHEMA}"])


# -- main --------------------------------------------------------------------------------


def chosen(option: str | None) -> list[str]:
    """The variants to run: those named, and the baselines their figures need."""
    if not option:
        return list(framework_apps.VARIANTS)
    keys = [k.strip() for k in option.split(",") if k.strip()]
    unknown = set(keys) - set(framework_apps.VARIANTS)
    if unknown:
        sys.exit(f"unknown variants: {', '.join(sorted(unknown))}")
    needed = {k.partition("-")[0] + "-bare" for k in keys}
    if any(k.endswith(("-memory", "-middleware")) for k in keys):
        needed |= {"wsgi-bare", "wsgi-memory"}
    return [k for k in framework_apps.VARIANTS if k in set(keys) | needed]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=21, help="rounds (the median is reported)")
    parser.add_argument("--batch-ms", type=float, default=40, help="length of one batch of requests")
    parser.add_argument("--min-calls", type=int, default=50, help="fewest requests in a batch")
    parser.add_argument("--variants", help="comma-separated subset of: " + ", ".join(framework_apps.VARIANTS))
    parser.add_argument("--profile", metavar="VARIANT:WORKLOAD", help="profile one variant, and stop")
    parser.add_argument("--profile-calls", type=int, default=20000)
    args = parser.parse_args()
    loopback_only(REDIS_URL, DATABASE_URL)
    keys = chosen(args.profile.partition(":")[0] if args.profile else args.variants)
    if args.profile:
        keys = [args.profile.partition(":")[0]]

    variants: list[Variant] = []
    started = time.monotonic()
    try:
        for key in keys:
            try:
                built = framework_apps.build(key)
            except ImportError as exc:
                print(f"skipping {key}: {exc}", file=sys.stderr)
                continue
            framework, library, store = framework_apps.VARIANTS[key]
            variants.append(Variant(key, framework, library, store, built.app, built.stored, built.store))
        for v in variants:
            for w in ("read", "write", "untouched"):  # a session per workload; a login brings none
                if v.sessions:
                    v.cookies[w] = v.login()
        for v in variants:  # the bare ones get a cookie like their framework's sessions', which they ignore
            cookie = next((o.cookies for o in variants if o.sessions and o.bare == v.key), {})
            if not v.sessions:
                v.cookies.update(cookie)
            for w in WORKLOADS:
                check(v, w)
        check_stores(variants)
        if args.profile:
            profile(variants[0], args.profile.partition(":")[2] or "read", args.profile_calls)
            return
        print(f"in-process: {len(variants)} variants x {len(WORKLOADS)} workloads, {args.rounds} rounds",
              file=sys.stderr)  # fmt: skip
        timings = in_process(variants, args.rounds, args.batch_ms / 1000, args.min_calls)
    finally:
        cleanup(variants)

    print(f"\nSessions of 2 keys. In-process: median over {args.rounds} rounds of the mean µs/request (batches of "
          f"~{args.batch_ms:g} ms); +µs: over the framework without sessions; xpeer: against the fastest peer "
          "in the same framework on the same store; both medians of the rounds' differences or ratios\n")  # fmt: skip
    lines = report(variants, timings)
    measured = {v.key for v in variants}
    if {"wsgi-bare", "wsgi-memory"} <= measured:
        lines += adapter_costs(measured, timings)
    print("\nTargets:")
    print("\n".join(lines))
    print(f"\n({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
