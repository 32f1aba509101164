"""What the benchmark scripts share: the guard against non-loopback servers, and their tables."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from urllib.parse import urlsplit


def loopback_only(*urls: str) -> None:
    """Stop unless every URL names this machine: the benchmarks load and empty what they use."""
    for url in urls:
        if urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            sys.exit(f"refusing to benchmark against a non-loopback server: {url}")


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
