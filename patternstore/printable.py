"""Untrusted text made safe to print on a terminal: ``printable(text, limit)``.

Text that comes from outside (a bundle's keys and headers, a store
directory's rows, messages that quote them) may hold terminal escape
sequences and may be of any length. Guarantees of ``printable``:

- every character that ``str.isprintable`` refuses (C0 and C1 controls, DEL,
  bidirectional overrides, unassigned code points; a space is kept) is written
  the way ``repr`` writes it (``\\x1b``, ``\\n``, ``\\u202e``), so nothing but
  printable characters reaches the terminal;
- at most ``limit`` characters of ``text`` are shown, then ``...`` and the
  full length, so a 200,000-character key prints as one short line.

Limit: a backslash is shown as it is, so an escape in the output may also be a
backslash that was in the text; the text is for people, not to be parsed back.
"""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: str, limit: int = 200) -> str:
    """``text`` with every non-printable character escaped as ``repr`` does,
    cut after ``limit`` characters (the full length is said)."""
    shown = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text[:limit])
    return shown if len(text) <= limit else f"{shown}... ({len(text)} characters)"
