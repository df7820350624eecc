"""Byte counts for people (``format_size``); no torch, for the command line's start-up."""

from __future__ import annotations

__all__ = ["format_size"]


def format_size(n: int) -> str:
    """``n`` bytes for people: B, KiB, MiB, GiB."""
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"
