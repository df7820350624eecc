"""Whose fault an error is, for the command line's exit status: the input's
(a path that cannot serve the command: bad input, exit 2) or the work's (the
disk failing under it: a full disk, an I/O error; exit 1).

``disk_failed(error)`` looks at ``error`` and every error it was raised from
(``__cause__``, ``__context__``): an ``OSError`` whose errno is not one that
names the path (``PATH_ERRNOS``), or an SQLite error that is the disk's
(``SQLITE_FULL``, ``SQLITE_IOERR`` and its extended codes). Limit: an error
that carries neither (a message only) counts as the input's.
"""

from __future__ import annotations

import errno
import sqlite3

__all__ = ["PATH_ERRNOS", "disk_failed"]

# errno values that say the path given cannot serve: bad input.
PATH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS,
                         errno.ENAMETOOLONG, errno.ELOOP, errno.EEXIST})

def disk_failed(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from, is the disk failing."""
    while error is not None:
        if isinstance(error, OSError) and error.errno is not None and error.errno not in PATH_ERRNOS:
            return True
        name = getattr(error, "sqlite_errorname", "") if isinstance(error, sqlite3.Error) else ""
        if name == "SQLITE_FULL" or name.startswith("SQLITE_IOERR"):
            return True
        error = error.__cause__ or error.__context__
    return False
