"""Byte counts for people (``format_size``) and from people (``parse_size``);
no torch, for the command line's start-up."""

from __future__ import annotations

import re

__all__ = ["format_size", "parse_size"]

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_SIZE = re.compile(r"(\d+)\s*(|B|K|KiB|M|MiB|G|GiB|T|TiB)", re.IGNORECASE)
_POWERS = {"": 0, "b": 0, "k": 1, "kib": 1, "m": 2, "mib": 2, "g": 3, "gib": 3, "t": 4, "tib": 4}


def format_size(n: int) -> str:
    """``n`` bytes for people: B, KiB, MiB, GiB, ..., EiB."""
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, _UNITS[0]
    for bigger in _UNITS[1:]:
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def parse_size(name: str, text: str) -> int:
    """A byte count >= 1 written as an integer with an optional binary unit
    (``4294967296``, ``4GiB``, ``512M``; K, M, G, T are powers of 1024);
    ``ValueError`` naming ``name`` otherwise."""
    match = _SIZE.fullmatch(text.strip())
    if match is None or int(match[1]) < 1:
        raise ValueError(f"{name} must be a size >= 1 byte such as 4294967296, 4GiB or 512MiB, got {text!r}")
    return int(match[1]) * 1024 ** _POWERS[match[2].lower()]
