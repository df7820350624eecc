"""The store directory: trusted before use, and reached inside without
following a link (docs/design.md section 3.5).

Who can write the directory decides what every reader computes (the
checksum is unkeyed), so a directory is used only when nobody but this user
(and root) can change what its path names:

- ``open_directory`` walks the path from ``/`` the way the kernel does,
  ``lstat`` on each component: every directory on the way must be owned by
  this user or root and not writable by group or others, unless it has the
  sticky bit (``/tmp``: others may add names there but not rename or delete
  ours); every symbolic link on the way must be owned by this user or root
  (in a sticky directory a link's owner can replace it). The store
  directory itself must be owned by this user or root and writable by
  nobody else, sticky or not. Group write is allowed only for this user's
  private group (named after the user, no other member, no ACL).
- A POSIX ACL that grants write to anyone shows in the group bits (the ACL
  mask), so it is refused like group write. Filesystems whose permissions are
  decided elsewhere (NFSv4 or CIFS ACLs, squashed or mapped owners) report
  what the client sees; they already get the network warning (``disk``).
- Missing directories are created mode 0700 whatever the umask; a missing
  directory behind a symbolic link (a dangling link) is reported as such,
  never created through it.

Inside the directory, value files are reached from the directory's file
descriptor, one component at a time, with ``O_NOFOLLOW``: a link or a
non-directory where diskcache's ``ab/cd`` subdirectories belong, or a link,
FIFO, socket or device where a value file belongs, is ``CorruptValue``:
opened ``O_NONBLOCK | O_NOCTTY`` (a FIFO never blocks, a socket cannot be
opened) and found by ``fstat``, closed unread. A value file is read only
when its size is the one its entry records, so nothing larger is read. Deleting never goes through a
link: a planted link is removed itself, never what it points to. POSIX only
(``dir_fd`` and ``O_NOFOLLOW``).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO, Iterator

from .codec import CorruptValue

__all__ = ["NETWORK_FILESYSTEMS", "filesystem_type", "Untrusted", "open_directory", "make_directory", "open_value", "create_value", "unlink_value", "walk_values",
           "remove_entry", "read_exactly", "close_all", "VALUE_NAME"]

# A directory fd that needs no read permission (Linux); elsewhere a plain one.
_DIRECTORY = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC
_LISTABLE = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_LINKS = 40  # what Linux follows in one path before ELOOP

# diskcache's value files: two levels of 2-hex subdirectories, a random name.
VALUE_NAME = re.compile(r"([0-9a-f]{2})/([0-9a-f]{2})/([0-9a-f]{28}\.val)")
_SUBDIRECTORY = re.compile(r"[0-9a-f]{2}")


# Filesystems on which SQLite's file locking is not to be trusted.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smbfs", "smb3", "9p", "afs", "ncpfs", "lustre", "gpfs", "beegfs",
    "ceph", "glusterfs", "fuse.sshfs", "fuse.ceph", "fuse.glusterfs", "fuse.s3fs", "fuse.gcsfuse",
    "fuse.rclone", "davfs", "fuse.davfs2",
})

def filesystem_type(path: Path, mounts_file: str = "/proc/mounts") -> str | None:
    """The fstype of the mount holding ``path``, or None where unknown
    (no /proc/mounts: not Linux)."""
    try:
        with open(mounts_file, encoding="utf-8") as mounts:
            lines = mounts.read().splitlines()
    except OSError:
        return None
    target, best, fstype = str(path.resolve()), -1, None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts writes space, tab, newline and backslash as \ooo.
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > best:
            best, fstype = len(mount), fields[2]
    return fstype


class Untrusted(Exception):
    """A path that someone other than this user (or root) can change."""


def _user(uid: int) -> str:
    try:
        import pwd
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _private_group(path: Path, gid: int) -> bool:
    """``gid`` is this user's private group and ``path`` has no ACL."""
    try:
        import grp
        import pwd
        user, group = pwd.getpwuid(os.geteuid()), grp.getgrgid(gid)
    except (ImportError, KeyError):
        return False
    if gid != user.pw_gid or group.gr_name != user.pw_name or set(group.gr_mem) - {user.pw_name}:
        return False
    try:
        os.getxattr(path, "system.posix_acl_access", follow_symlinks=False)
    except (OSError, AttributeError):  # ENODATA: no ACL; ENOTSUP: no ACLs there; not Linux
        return True
    return False


def _trust_problem(info: os.stat_result, path: Path, *, store: bool) -> str | None:
    """Why only this user and root cannot be said to control ``path``, or None."""
    me = os.geteuid()
    if info.st_uid not in (me, 0):
        return f"{path} is owned by {_user(info.st_uid)}, not by this user ({_user(me)}) or root"
    mode = stat.S_IMODE(info.st_mode)
    if stat.S_ISLNK(info.st_mode) or (not store and mode & stat.S_ISVTX):
        return None
    if mode & stat.S_IWOTH:
        return f"{path} is writable by every user (mode {mode:04o})"
    if mode & stat.S_IWGRP and not _private_group(path, info.st_gid):
        return f"{path} is writable by group {info.st_gid} (mode {mode:04o}; an ACL shows here too)"
    return None


def _inspect(path: Path) -> tuple[Path, list[str]]:
    """Walk ``path`` (absolute) as the kernel resolves it, checking every
    directory and link on the way: (the real directory the existing part
    leads to, the names still missing below it). Raises ``Untrusted``, or
    ``OSError`` as the OS gave it (a dangling link as ENOENT naming it)."""
    current = Path("/")
    problem = _trust_problem(os.lstat(current), current, store=len(path.parts) == 1)
    if problem:
        raise Untrusted(problem)
    pending: list[tuple[str, Path | None]] = [(name, None) for name in path.parts[1:]]  # (name, link it came from)
    links = 0
    while pending:
        name, via = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        child = current / name
        try:
            info = os.lstat(child)
        except FileNotFoundError:
            link = via or next((origin for _, origin in pending if origin is not None), None)
            if link is not None:
                raise FileNotFoundError(errno.ENOENT, f"{link} is a symbolic link to {os.readlink(link)!r}, "
                                                      f"which does not exist", str(child)) from None
            return current, [name, *(rest for rest, _ in pending)]
        last = not pending
        if stat.S_ISLNK(info.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
            problem = _trust_problem(info, child, store=False)
            if problem:
                raise Untrusted(f"symbolic link {problem}")
            target = Path(os.readlink(child))
            if target.is_absolute():
                current = Path("/")
            pending = [(part, child) for part in target.parts[target.is_absolute():]] + pending
            continue
        if not stat.S_ISDIR(info.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(child))
        problem = _trust_problem(info, child, store=last)
        if problem:
            raise Untrusted(problem)
        current = child
    return current, []


def open_directory(path: Path, *, create: bool) -> int:
    """A file descriptor of the trusted directory ``path`` (absolute), for
    ``dir_fd`` use (it needs no read permission). ``create``: make what is
    missing, mode 0700. Raises ``Untrusted`` or ``OSError`` (errno and path
    as the OS gave them)."""
    real, missing = _inspect(path)
    if missing and not create:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(real / missing[0]))
    for name in missing:
        real = real / name
        try:
            os.mkdir(real, 0o700)
            os.chmod(real, 0o700)  # exactly 0700, whatever the umask
        except FileExistsError:
            pass  # made meanwhile (another process opening the same store): checked below
    if missing:
        real, missing = _inspect(path)
        if missing:  # removed again meanwhile
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(real / missing[0]))
    fd = os.open(real, _DIRECTORY | os.O_NOFOLLOW)
    problem = _trust_problem(os.fstat(fd), real, store=True)  # what was opened, not what was walked
    if problem:
        os.close(fd)
        raise Untrusted(problem)
    return fd


# ---------------------------------------------------------------- inside the directory
def make_directory(root: int, name: str) -> None:
    """``root/name``, a real directory (made mode 0700 if missing); anything
    else found under that name (a planted link or file) is removed itself,
    never followed."""
    try:
        info = os.stat(name, dir_fd=root, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            return
        os.unlink(name, dir_fd=root)
    except FileNotFoundError:
        pass
    try:
        os.mkdir(name, 0o700, dir_fd=root)
        os.chmod(name, 0o700, dir_fd=root)
    except FileExistsError:
        pass  # made meanwhile by another process


def _subdirectory(root: int, name: str, *, create: bool) -> int:
    """fd of ``root/name``, a real directory (ELOOP or ENOTDIR otherwise)."""
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=root)
            os.chmod(name, 0o700, dir_fd=root)
        except FileExistsError:
            pass
    return os.open(name, _DIRECTORY | os.O_NOFOLLOW, dir_fd=root)


def _parent(root: int, first: str, second: str, *, create: bool = False) -> int:
    outer = _subdirectory(root, first, create=create)
    try:
        return _subdirectory(outer, second, create=create)
    finally:
        os.close(outer)


def _planted(name: str, what: str) -> CorruptValue:
    return CorruptValue(f"value file {name}: {what}, not something the store made; refused unread, never followed")


def _open_beneath(root: int, name: str) -> int:
    """``openat`` of ``name`` (``ab/cd/x.val``) below ``root`` following no
    link on the way, the last component included: one ``O_NOFOLLOW`` open
    per component (ELOOP for a link, ENOTDIR for a non-directory where a
    directory belongs). Measured: 11 us against 7 us for a plain ``open``
    (an ``openat2`` with ``RESOLVE_NO_SYMLINKS`` through ctypes cost the same)."""
    first, second, last = name.split("/")
    parent = _parent(root, first, second)
    try:
        return os.open(last, _READ, dir_fd=parent)
    finally:
        os.close(parent)


def open_value(root: int, name: str, size: int | None, limit: int) -> BinaryIO:
    """The value file ``name`` (relative to ``root``) opened unbuffered for
    reading. ``size``: the bytes its entry records (None: whatever it holds);
    never more than ``limit``. ``CorruptValue`` for a name the store does not
    make, a link on its path or at its end, anything not a regular file (a
    FIFO is opened ``O_NONBLOCK``, a socket cannot be, a device is opened
    ``O_NOCTTY`` and closed unread), or another size; ``OSError`` when it is
    missing or unreadable."""
    match = VALUE_NAME.fullmatch(name or "")
    if match is None:
        raise CorruptValue(f"value file name {name!r} is not one the store makes; refused unread")
    try:
        fd = _open_beneath(root, name)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise _planted(name, "a link, or a link on its path") from None
        if error.errno == errno.ENOTDIR:
            raise _planted(name, "a directory on its path is not a directory") from None
        if error.errno == errno.ENXIO:
            raise _planted(name, "not a regular file (a socket)") from None
        raise
    info = os.fstat(fd)
    expected = info.st_size if size is None else size
    if not stat.S_ISREG(info.st_mode) or info.st_size != expected or expected > limit:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _planted(name, "not a regular file")
        raise CorruptValue(f"value file {name} holds {info.st_size} bytes, its entry records {expected} "
                           f"(at most {limit}); refused unread")
    return open(fd, "rb", buffering=0)


def create_value(root: int, name: str) -> BinaryIO:
    """A new value file ``name`` (``ab/cd/<hex>.val``), mode 0600, opened
    for writing; its subdirectories are made 0700 where missing. Never
    through a link: an existing name or a planted link is an ``OSError``."""
    match = VALUE_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"value file name {name!r} is not ab/cd/<28 hex>.val")
    parent = _parent(root, match[1], match[2], create=True)
    try:
        return os.fdopen(os.open(match[3], _CREATE, 0o600, dir_fd=parent), "wb")
    finally:
        os.close(parent)


def unlink_value(root: int, name: str) -> None:
    """Delete the value file ``name`` and its subdirectories once empty. A
    name the store does not make, or a path through a link, is left alone;
    errors (already gone, another process removing it) are ignored."""
    match = VALUE_NAME.fullmatch(name or "")
    if match is None:
        return
    with suppress(OSError):
        outer = _subdirectory(root, match[1], create=False)
        try:
            inner = _subdirectory(outer, match[2], create=False)
            try:
                os.unlink(match[3], dir_fd=inner)  # unlinkat never follows the last component
            finally:
                os.close(inner)
            with suppress(OSError):
                os.rmdir(match[2], dir_fd=outer)  # only if empty
        finally:
            os.close(outer)
        with suppress(OSError):
            os.rmdir(match[1], dir_fd=root)


def walk_values(root: int) -> Iterator[tuple[str, os.stat_result]]:
    """(relative name, ``lstat``) of every ``*.val`` entry in value
    positions (``ab/cd/*.val``), and of every link or non-directory where an
    ``ab`` or ``cd`` subdirectory belongs; nothing is followed or opened
    but the real subdirectories."""
    try:
        listable = os.open(".", _LISTABLE, dir_fd=root)
    except OSError:  # unreadable: nothing to list
        return
    try:
        yield from _walk(listable, "", depth=0)
    finally:
        os.close(listable)


def _walk(fd: int, prefix: str, depth: int) -> Iterator[tuple[str, os.stat_result]]:
    try:
        names = sorted(os.listdir(fd))
    except OSError:  # removed meanwhile
        return
    for name in names:
        if depth < 2 and not _SUBDIRECTORY.fullmatch(name) or depth == 2 and not name.endswith(".val"):
            continue
        try:
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            continue
        if depth == 2 or not stat.S_ISDIR(info.st_mode):
            yield prefix + name, info
            continue
        try:
            inner = os.open(name, _LISTABLE, dir_fd=fd)
        except OSError:
            continue
        try:
            yield from _walk(inner, f"{prefix}{name}/", depth + 1)
        finally:
            os.close(inner)


def remove_entry(root: int, name: str) -> bool:
    """Delete ``name`` (relative to ``root``; a ``walk_values`` name), never
    through a link: a planted link itself goes. True when it is gone (or
    already was, or never was)."""
    *directories, last = name.split("/")
    if any(part in ("", ".", "..") for part in (*directories, last)):
        return False
    opened: list[int] = []
    try:
        fd = root
        for directory in directories:
            fd = _subdirectory(fd, directory, create=False)
            opened.append(fd)
        os.unlink(last, dir_fd=fd)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    finally:
        for fd in opened:
            os.close(fd)
    return True


def read_exactly(source: BinaryIO) -> bytes:
    """The bytes of a value file ``safedir.open_value`` opened: its size as
    checked then, never more."""
    size = os.fstat(source.fileno()).st_size
    chunks, done = [], 0
    while done < size:
        chunk = source.read(size - done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
