"""Reading Set-Cookie headers as a browser's cookie jar would, for the tests' assertions."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def parse_set_cookies(headers: Iterable[str], name: str = "session") -> list[dict[str, Any]]:
    """The Set-Cookie header values for ``name``, parsed: {"value": ..., attribute (lower case): value or True}."""
    found = []
    for header in headers:
        first, *attributes = header.split("; ")
        cookie_name, _, value = first.partition("=")
        if cookie_name != name:
            continue
        parsed: dict[str, Any] = {"value": value}
        for attribute in attributes:
            key, sep, val = attribute.partition("=")
            parsed[key.lower()] = val if sep else True
        found.append(parsed)
    return found
