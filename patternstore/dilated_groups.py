"""The stored schema of a dilated pattern: its ``groups`` table, one
``Group`` row per (branch, head group), independent of the sequence length.

It lives in ``patternstore`` because the generator writes it and
``patternstore`` never imports ``attention``; the attention code reads the
rows back as ``Group``s (``attention.dilated_plan``). ``GROUP_COLUMNS`` is
``Group._fields``, so the stored columns and the type cannot drift apart.

At sequence length n a group selects, in every segment
``[t*s, min((t+1)*s, n))`` with ``s = min(segment, n)``, the positions
``t*s + offset + rate*m`` on query heads ``[head_start, head_stop)``.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Group", "GROUP_COLUMNS"]


class Group(NamedTuple):
    """One row of the table: branch ``branch`` (segment length ``segment`` =
    w_i, not clipped to any length; dilation ``rate`` = r_i) on query heads
    ``[head_start, head_stop)``, selecting positions ``offset + rate * m``
    (``offset < rate``) of each segment."""

    branch: int
    segment: int
    rate: int
    offset: int
    head_start: int
    head_stop: int


GROUP_COLUMNS: tuple[str, ...] = Group._fields
