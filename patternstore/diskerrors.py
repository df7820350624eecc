"""What the disk tier raises and warns, and the errors it turns into
warnings and misses (``DISK_ERRORS``): a directory or disk at fault never
raises to the caller of a get."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import diskcache

__all__ = ["PatternStoreWarning", "DiskUnavailable", "UntrustedDirectory", "DamagedStore", "DISK_ERRORS",
           "damaged", "why"]

# Errors a disk operation can raise when the directory or the disk is at
# fault; each becomes a warning and a miss, never an exception to the caller.
DISK_ERRORS = (OSError, sqlite3.Error, diskcache.Timeout)


class PatternStoreWarning(UserWarning):
    """The store works on, with less than it was asked for (see the message)."""


class DiskUnavailable(RuntimeError):
    """The directory cannot be used at all; the store keeps patterns in memory."""


class UntrustedDirectory(DiskUnavailable):
    """Someone besides this user and root can change the directory or the
    path to it (``safedir``): it is not used at all."""


class DamagedStore(DiskUnavailable):
    """The directory's database is not a database (garbage, truncated, not a
    regular file); ``directory`` is the store's. ``patternstore verify
    --repair`` rebuilds it (``rebuild``)."""

    def __init__(self, message: str, directory: Path) -> None:
        super().__init__(message)
        self.directory = directory


def damaged(error: BaseException) -> bool:
    """SQLite's refusal of a file that is not a sound database (as opposed
    to a lock, a permission or a full disk: ``OperationalError``)."""
    return isinstance(error, sqlite3.DatabaseError) and not isinstance(error, sqlite3.OperationalError)


def why(error: BaseException) -> str:
    """An error as one line: ``OSError``'s own text carries errno and path."""
    return str(error) or type(error).__name__
