"""Rebuilding a store whose database is damaged: ``rebuild``, what
``patternstore verify --repair`` and ``patternstore clear`` do first when
SQLite cannot open ``cache.db`` (garbage, truncated, a planted link or FIFO)
or finds it unsound (``PRAGMA quick_check``).

Guarantees:
- Only a directory the store trusts is touched (``safedir.open_directory``),
  and nothing in it is followed through a link.
- Every value file that decodes under the key its own header names
  (checksum, format, spec and key: ``codec.decode_packed``) is stored again,
  into a fresh database; every other file in a value position (damaged, of
  another format, a planted link or special file) is deleted: a link itself,
  never its target. Values that lived inside the damaged database (under
  32 KiB, e.g. every dilated entry) are gone: they are regenerated when next
  asked for.
- One rebuild at a time (the ``locks/rebuild`` file lock, waited for at most
  ``lock_timeout``). A rebuild killed midway leaves the value files it had
  not moved yet as orphans (``verify --repair`` removes them after an hour);
  nothing read is ever wrong, since every value is checked when read.
"""

from __future__ import annotations

import os
import stat
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import filelock

from .codec import CorruptValue, decode_packed, stored_key
from .disk import DATABASE_FILES, DEFAULT_SIZE_LIMIT, DiskTier
from .diskerrors import DiskUnavailable
from .safedir import Untrusted, make_directory, open_directory, open_value, remove_entry, walk_values

__all__ = ["Rebuilt", "rebuild"]


@dataclass(frozen=True)
class Rebuilt:
    directory: Path
    cause: str     # what was wrong with the database
    kept: int      # value files that verified, stored again
    dropped: int   # files in value positions that did not, deleted


def rebuild(directory: Path, cause: str, lock_timeout: float) -> Rebuilt:
    """Replace the database of ``directory`` by a fresh one holding every
    value file that verifies (module docstring). Raises ``DiskUnavailable``
    when the directory cannot be used or written, or another process is
    rebuilding it."""
    try:
        root = open_directory(directory, create=False)
    except (Untrusted, OSError) as error:
        raise DiskUnavailable(f"cannot rebuild {directory}: {error}") from None
    try:
        make_directory(root, "locks")
        with filelock.FileLock(directory / "locks" / "rebuild", timeout=lock_timeout):
            found = list(walk_values(root))
            for name in DATABASE_FILES:  # links and special files included: unlink never follows
                with suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=root)
            tier = DiskTier(directory, None, lock_timeout)  # a fresh database
            if not tier.writable:
                raise DiskUnavailable(f"cannot rebuild {directory}: {tier.write_error}")
            kept = 0
            for name, info in found:
                kept += _restore(tier, root, name, info)
                remove_entry(root, name)
            tier.close()
    except (OSError, filelock.Timeout) as error:
        raise DiskUnavailable(f"cannot rebuild {directory}: {error}") from error
    finally:
        os.close(root)
    return Rebuilt(directory, cause, kept, len(found) - kept)


def _restore(tier: DiskTier, root: int, name: str, info: os.stat_result) -> bool:
    """Store the value file ``name`` again when it verifies under its own key."""
    if not stat.S_ISREG(info.st_mode):
        return False
    try:
        with open_value(root, name, None, DEFAULT_SIZE_LIMIT) as source:
            value = source.readall()
        key = stored_key(value)
        if key is None:
            return False
        decode_packed(value, key)
    except (CorruptValue, OSError):
        return False
    return tier.write(key, value)
