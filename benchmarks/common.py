"""What the benchmark scripts share: the guard against non-loopback servers, their tables, and the
clean-up of what a run left in Redis and PostgreSQL."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from urllib.parse import urlsplit

import psycopg2
import redis


def loopback_only(*urls: str) -> None:
    """Stop unless every URL names this machine: the benchmarks load and empty what they use."""
    for url in urls:
        if urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            sys.exit(f"refusing to benchmark against a non-loopback server: {url}")


def rst_table(rows: Sequence[Sequence[str]]) -> str:
    """``rows`` (the first is the header) as a reStructuredText simple table, for the README."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    rule = "  ".join("=" * w for w in widths)
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join([rule, lines[0], rule, *lines[1:], rule])


def print_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1, groups: bool = False
) -> None:
    """Print rows under header; the first ``text_columns`` columns left-aligned, the rest right-aligned
    (``groups``: a blank line wherever the first column changes)."""
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" if i < text_columns else f"{{:>{w}}}" for i, w in enumerate(widths))
    print(line.format(*header).rstrip())
    print(line.format(*("-" * w for w in widths)))
    previous = None
    for row in rows:
        if groups and previous is not None and row[0] != previous:
            print()
        previous = row[0]
        print(line.format(*row).rstrip())


def remove_from_redis(url: str, keys: Iterable[bytes]) -> None:
    """Delete these keys, a thousand at a time."""
    client = redis.Redis.from_url(url)
    try:
        batch = list(keys)
        for start in range(0, len(batch), 1000):
            client.delete(*batch[start : start + 1000])
    finally:
        client.close()


def drop_run_tables(url: str, run: str, schemas: Sequence[str] = ()) -> None:
    """Drop every table named ``bench_<run>_...`` (in any schema), then these schemas."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT schemaname, tablename FROM pg_tables WHERE tablename LIKE %s", (f"bench\\_{run}\\_%",))
            for schema, table in cur.fetchall():
                cur.execute(f'DROP TABLE IF EXISTS "{schema}"."{table}"')
            for schema in schemas:
                cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        conn.close()


def close_all(closers: Iterable[tuple[str, Callable[[], object]]]) -> None:
    """Call each (name, close); one that fails is reported on stderr and the rest still run."""
    for name, close in closers:
        try:
            close()
        except Exception as exc:  # clean up the rest anyway
            print(f"closing {name} failed: {exc}", file=sys.stderr)


def run_keys(url: str, run: str) -> list[bytes]:
    """The Redis keys of this run (named ``bench_<run>_...``)."""
    client = redis.Redis.from_url(url)
    try:
        return list(client.scan_iter(match=f"bench_{run}_*", count=1000))
    finally:
        client.close()
