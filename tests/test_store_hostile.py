"""The store under hostile directories and faults (issue 27), on the real
filesystem: planted links, FIFOs, sockets and devices, huge files, directories
other users can write, unreadable directories, a directory deleted under an
open store, a held SQLite lock and a damaged database.

Every link test plants a decoy inside the test's own directory and checks it
survives; nothing here touches a path outside the test's temporary directory.
Tests that need another user run as root: they ``chown`` to an unused uid, or
fork a child that takes that uid (``as_user``); elsewhere they skip, saying so.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import pytest

from patternstore import DilatedSpec, PatternStore, SparseSpec, generate, maintenance
from patternstore.cli import main
from patternstore.diskerrors import DamagedStore, PatternStoreWarning
from patternstore.pattern import Pattern

SMALL = DilatedSpec([128, 512], [1, 2], 2)  # a row of SQLite
LARGE = SparseSpec("bigbird", seq_len=16384, block_size=32, num_heads=4, different_layout_per_head=True)  # a file
OTHERS = [DilatedSpec([64 * (i + 1)], [1], 1) for i in range(5)]
OTHER_UID = 12345  # no account has it: "another user"
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root: chown to another uid, or a child with another uid")


def warnings_of(action: Callable[[], object]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(w.message) for w in caught if issubclass(w.category, PatternStoreWarning)]


class Hung(Exception):
    """Raised by ``no_hang`` (not an ``OSError``: code under test that treats
    a failed read as a miss must not swallow it and block again)."""


@contextlib.contextmanager
def no_hang(seconds: float = 20.0) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the body blocks: SIGALRM,
    sent to the main thread itself (a process-wide alarm may land on one of
    torch's threads), interrupts a blocking open or read."""
    def expired(signum, frame):
        raise Hung(f"blocked for over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    alarm = threading.Timer(seconds, signal.pthread_kill, (threading.main_thread().ident, signal.SIGALRM))
    alarm.start()
    try:
        yield
    finally:
        alarm.cancel()
        signal.signal(signal.SIGALRM, previous)


def value_file(directory: Path) -> Path:
    (path,) = [p for p in directory.rglob("*.val")]
    return path


def stored(directory: Path) -> Path:
    """A store in ``directory`` holding SMALL and LARGE, its connections closed."""
    store = PatternStore(directory)
    store.get(SMALL), store.get(LARGE)
    store.disk.close()
    return directory


def fresh_get(directory: Path, spec) -> dict:
    """The counters of one get in a fresh store on ``directory`` (the
    pattern checked against a fresh generation)."""
    store = PatternStore(directory)
    with no_hang():
        assert store.get(spec).equals(generate(spec))
    return store.stats()


# ------------------------------------------------------------------ 1. links
@pytest.mark.parametrize("damaged", [False, True], ids=["valid-behind-link", "corrupt-behind-link"])
def test_a_value_reached_through_a_planted_directory_link_is_corrupt_and_never_deleted_through(tmp_path, damaged):
    directory = stored(tmp_path / "store")
    path = value_file(directory)
    first = path.parent.parent
    elsewhere = tmp_path / "elsewhere"
    first.rename(elsewhere)
    first.symlink_to(elsewhere)
    decoy = elsewhere / path.parent.name / path.name
    if damaged:
        decoy.write_bytes(decoy.read_bytes()[:-1] + b"\xff")
    content = decoy.read_bytes()

    stats = fresh_get(directory, LARGE)
    assert stats["corrupt"] == 1 and stats["disk_hits"] == 0 and stats["generations"] == 1
    assert decoy.read_bytes() == content  # the far end of the link was neither read as ours nor deleted
    assert fresh_get(directory, LARGE)["disk_hits"] == 1  # rewritten through a real directory
    result = maintenance.verify(maintenance.open_store(directory, writable=True), full=True, repair=True)
    assert result.ok and any(o.path == first and o.repair == "removed" for o in result.orphans)
    assert not first.is_symlink() and decoy.read_bytes() == content  # the link went, never its target


def test_a_planted_value_file_link_is_corrupt_and_the_decoy_survives(tmp_path):
    directory = stored(tmp_path / "store")
    path = value_file(directory)
    decoy = tmp_path / "decoy.val"
    shutil.copy(path, decoy)
    path.unlink()
    path.symlink_to(decoy)
    entry = maintenance.read_entry(maintenance.open_store(directory), LARGE.key)
    assert entry.value is None and "a link" in entry.problem and "never followed" in entry.problem
    stats = fresh_get(directory, LARGE)
    assert stats["corrupt"] == 1 and stats["generations"] == 1
    assert decoy.read_bytes() == (directory.parent / "decoy.val").read_bytes() and decoy.exists()
    assert not path.is_symlink()  # the store's own entry was dropped: the link itself, not the decoy


def test_writes_never_go_through_planted_links(tmp_path):
    directory = tmp_path / "store"
    PatternStore(directory).disk.close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for first in range(256):  # every subdirectory a write could pick
        (directory / f"{first:02x}").symlink_to(elsewhere)
    store = PatternStore(directory)
    caught = warnings_of(lambda: store.put(generate(LARGE)))
    assert len(caught) == 1 and "cannot write" in caught[0]  # ENOTDIR: a link opened as a directory, unfollowed
    assert list(elsewhere.iterdir()) == [] and not store.stored(LARGE.key)
    repaired = maintenance.verify(maintenance.open_store(directory, writable=True), repair=True)
    assert len(repaired.orphans) == 256 and repaired.ok and elsewhere.is_dir()
    assert fresh_get(directory, LARGE)["generations"] == 1 and fresh_get(directory, LARGE)["disk_hits"] == 1


def test_a_planted_locks_link_is_replaced_and_its_target_kept(tmp_path):
    directory = tmp_path / "store"
    PatternStore(directory).disk.close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    decoy = elsewhere / f"{LARGE.key}.lock"
    decoy.write_text("not a lock of ours")
    shutil.rmtree(directory / "locks")
    (directory / "locks").symlink_to(elsewhere)
    store = PatternStore(directory)
    assert (directory / "locks").is_dir() and not (directory / "locks").is_symlink()
    store.get(LARGE)
    store.clear()  # removes idle lock files: never the decoy
    assert decoy.read_text() == "not a lock of ours"


def test_a_planted_database_link_is_damage_and_its_target_kept(tmp_path):
    directory = stored(tmp_path / "store")
    decoy = tmp_path / "decoy.db"
    decoy.write_bytes(b"precious")
    for name in ("cache.db", "cache.db-wal", "cache.db-shm"):
        (directory / name).unlink(missing_ok=True)
    (directory / "cache.db").symlink_to(decoy)
    stores: list[PatternStore] = []
    caught = warnings_of(lambda: stores.append(PatternStore(directory)))
    assert len(caught) == 1 and "is not a regular file (a link or a special file, never opened)" in caught[0]
    assert stores[0].disk is None and isinstance(stores[0].disk_error, DamagedStore)
    assert main(["--dir", str(directory), "-q", "verify", "--repair"]) == 0
    assert decoy.read_bytes() == b"precious" and not (directory / "cache.db").is_symlink()
    assert fresh_get(directory, LARGE)["disk_hits"] == 1  # the value file verified and was kept


# ------------------------------------------------------------------ 2. special files
def plant_special(path: Path, kind: str) -> contextlib.AbstractContextManager:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
        return contextlib.nullcontext()
    if kind == "device":
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers: harmless if opened
        return contextlib.nullcontext()
    listener = socket.socket(socket.AF_UNIX)
    here = os.getcwd()
    os.chdir(path.parent)  # a socket's path is limited to 108 bytes: bind by the short relative name
    try:
        listener.bind(path.name)
    finally:
        os.chdir(here)
    return contextlib.closing(listener)


@pytest.mark.parametrize("kind", ["fifo", "socket", pytest.param("device", marks=needs_root)])
def test_a_special_file_in_place_of_a_value_is_corrupt_found_without_blocking(tmp_path, kind):
    directory = stored(tmp_path / "store")
    path = value_file(directory)
    with plant_special(path, kind):
        store = maintenance.open_store(directory)
        with no_hang():
            (entry,) = [e for e in maintenance.list_entries(store) if e.key == LARGE.key]
            result = maintenance.verify(store, full=True)
        assert "not a regular file" in entry.problem
        assert [p.key for p in result.problems] == [LARGE.key] and not result.ok
        stats = fresh_get(directory, LARGE)
        assert stats["corrupt"] == 1 and stats["generations"] == 1
    assert fresh_get(directory, LARGE)["disk_hits"] == 1


def test_a_fifo_never_hangs_the_command_line(tmp_path):
    directory = stored(tmp_path / "store")
    path = value_file(directory)
    path.unlink()
    os.mkfifo(path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    for command in (["ls"], ["verify"]):
        done = subprocess.run([sys.executable, "-m", "patternstore", "--dir", str(directory), *command],
                              env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert done.returncode in (0, 1) and "not a regular file" in done.stdout + done.stderr, done.stderr


# ------------------------------------------------------------------ 3. bounded reads
def test_a_huge_file_in_place_of_a_value_is_refused_unread(tmp_path):
    directory = stored(tmp_path / "store")
    path = value_file(directory)
    os.truncate(path, 2 << 30)  # 2 GiB, sparse
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    started = time.monotonic()
    entry = maintenance.read_entry(maintenance.open_store(directory), LARGE.key)
    stats = fresh_get(directory, LARGE)
    assert time.monotonic() - started < 10
    assert "refused unread" in entry.problem and str(2 << 30) in entry.problem
    assert stats["corrupt"] == 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 256 << 10  # not the 2 GiB


def test_a_row_claiming_a_huge_value_is_refused_unread(tmp_path):
    directory = stored(tmp_path / "store")
    path = value_file(directory)
    os.truncate(path, 2 << 30)
    with sqlite3.connect(directory / "cache.db") as db:  # the row made to agree with the file
        db.execute("UPDATE Cache SET size = ? WHERE key = ?", (2 << 30, LARGE.key))
        db.execute("UPDATE Settings SET value = ? WHERE key = 'size_limit'", (1 << 30,))
        db.execute("UPDATE Cache SET value = zeroblob(1 << 24), mode = 1 WHERE key = ?", (SMALL.key,))  # 16 MiB row
    db.close()
    store = maintenance.open_store(directory)
    large, small = (maintenance.read_entry(store, spec.key) for spec in (LARGE, SMALL))
    assert "refused unread" in large.problem and "at most 1073741824" in large.problem
    assert "refused unread" in small.problem and str(1 << 24) in small.problem


# ------------------------------------------------------------------ 4. trust
def planted_pattern(spec) -> Pattern:
    """A valid-looking pattern of ``spec`` whose layout is not ``spec``'s."""
    true = generate(spec)
    arrays = {name: tensor.clone() for name, tensor in true.arrays.items()}
    arrays["kv_indices"][:] = 0
    return Pattern(spec, arrays)


def refused(directory: Path, reason: str) -> None:
    """A store on ``directory`` uses no disk (one warning naming ``reason``)
    and serves the true pattern, not what was planted."""
    stores: list[PatternStore] = []
    caught = warnings_of(lambda: stores.append(PatternStore(directory)))
    (store,) = stores
    assert len(caught) == 1 and "refusing pattern store directory" in caught[0] and reason in caught[0], caught
    assert store.disk is None and store.get(LARGE).equals(generate(LARGE))
    assert main(["--dir", str(directory), "-q", "ls"]) == 2


def plant(directory: Path) -> None:
    store = PatternStore(directory)
    store.put(planted_pattern(LARGE))
    store.disk.close()


def test_a_directory_everyone_can_write_is_refused(tmp_path):
    plant(tmp_path / "store")
    (tmp_path / "store").chmod(0o777)
    refused(tmp_path / "store", "writable by every user (mode 0777)")
    (tmp_path / "store").chmod(0o1777)  # sticky or not: anyone can add files to it
    refused(tmp_path / "store", "writable by every user")


def test_a_parent_everyone_can_write_is_refused_unless_sticky(tmp_path):
    parent = tmp_path / "shared"
    plant(parent / "store")
    parent.chmod(0o777)
    refused(parent / "store", f"{parent} is writable by every user")
    parent.chmod(0o1777)  # like /tmp: others cannot rename or delete what is ours
    assert fresh_get(parent / "store", SMALL)["generations"] == 1


@needs_root
def test_a_directory_owned_by_another_user_is_refused(tmp_path):
    plant(tmp_path / "store")
    for path in [tmp_path / "store", *(tmp_path / "store").rglob("*")]:
        os.lchown(path, OTHER_UID, OTHER_UID)
    refused(tmp_path / "store", f"is owned by uid {OTHER_UID}")


@needs_root
def test_a_group_writable_directory_of_a_shared_group_is_refused(tmp_path):
    plant(tmp_path / "store")
    os.chown(tmp_path / "store", 0, OTHER_UID)
    (tmp_path / "store").chmod(0o770)
    refused(tmp_path / "store", f"writable by group {OTHER_UID}")


@needs_root
def test_a_parent_owned_by_another_user_is_refused(tmp_path):
    parent = tmp_path / "theirs"
    plant(parent / "store")
    os.chown(parent, OTHER_UID, OTHER_UID)
    refused(parent / "store", f"{parent} is owned by uid {OTHER_UID}")


@needs_root
def test_a_link_on_the_path_owned_by_another_user_is_refused(tmp_path):
    plant(tmp_path / "real")
    sticky = tmp_path / "sticky"
    sticky.mkdir(mode=0o1777)
    sticky.chmod(0o1777)
    (sticky / "store").symlink_to(tmp_path / "real")
    os.lchown(sticky / "store", OTHER_UID, OTHER_UID)  # its owner could point it anywhere
    refused(sticky / "store", "symbolic link")
    os.lchown(sticky / "store", 0, 0)
    assert fresh_get(sticky / "store", SMALL)["generations"] == 1


def test_a_new_store_under_a_sticky_world_writable_parent_is_used_and_private(tmp_path):
    """What /tmp is: the parents of a store may be sticky and world-writable."""
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    stores: list[PatternStore] = []
    assert warnings_of(lambda: stores.append(PatternStore(sticky / "a" / "store"))) == []
    assert stores[0].disk is not None and stores[0].get(SMALL).equals(generate(SMALL))
    assert stat.S_IMODE(os.stat(sticky / "a" / "store").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(sticky / "a").st_mode) == 0o700


# ------------------------------------------------------------------ 5. unreadable, as another user
@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary directory another uid can traverse (pytest's tmp_path
    sits under root's private directory)."""
    base = Path(tempfile.mkdtemp(prefix="patternstore-hostile-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


AS_USER_CHILD = """
import contextlib, json, os, sys, warnings
from pathlib import Path
from patternstore import PatternStore, SparseSpec, generate
from patternstore.cli import main
from patternstore.diskerrors import PatternStoreWarning
import encodings.hex_codec, grp, pwd, patternstore.maintenance, patternstore.precompute  # all, before the uid changes
large = SparseSpec("bigbird", seq_len=16384, block_size=32, num_heads=4, different_layout_per_head=True)
uid, directory, make = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "make"
os.setgroups([])
os.setegid(uid)
os.seteuid(uid)  # the interpreter's own files (under root's home) stay unreadable from here on
if make:
    PatternStore(directory).get(large)
    directory.chmod(0)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    store = PatternStore(directory)
    ok = store.get(large).equals(generate(large)) and store.get(large).equals(generate(large))
with contextlib.redirect_stderr(open(os.devnull, "w")):
    codes = {"ls": main(["--dir", str(directory), "-q", "ls"]),
             "precompute": main(["--dir", str(directory), "-q", "precompute", "--spec", "local:seq_len=64:block_size=8"])}
print(json.dumps({"ok": ok, "disk": store.disk is not None, "stats": store.stats(), "codes": codes,
                  "warnings": [str(w.message) for w in caught if issubclass(w.category, PatternStoreWarning)]}))
"""


def as_user(uid: int, directory: Path, *, make: bool = False) -> dict:
    """A fresh interpreter that imports everything as root, then takes
    ``uid`` as its effective uid and gid (no supplementary groups) and uses
    a store on ``directory`` (``make``: creates it first, then makes it mode
    0000): its warnings and what it did."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", AS_USER_CHILD, str(uid), str(directory), "make" if make else "use"],
                          env=env, capture_output=True, text=True, timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_root
def test_an_unreadable_directory_of_ones_own_serves_from_memory_with_one_warning(shared_tmp):
    home = shared_tmp / "home"
    home.mkdir(mode=0o700)
    os.chown(home, OTHER_UID, OTHER_UID)

    report = as_user(OTHER_UID, home / "store", make=True)
    assert report["ok"] and not report["disk"] and report["stats"]["generations"] == 1
    (warning,) = report["warnings"]
    assert "[Errno 13] Permission denied" in warning and str(home / "store") in warning
    assert report["codes"] == {"ls": 2, "precompute": 2}


@needs_root
@pytest.mark.parametrize("owner", [0, OTHER_UID + 1], ids=["root's", "another user's"])
def test_a_private_store_of_someone_else_serves_from_memory_with_one_warning(shared_tmp, owner):
    theirs = stored(shared_tmp / "theirs")
    for path in [theirs, *theirs.rglob("*")]:
        os.lchown(path, owner, owner)
    report = as_user(OTHER_UID, theirs)
    assert report["ok"] and not report["disk"] and report["stats"]["generations"] == 1
    (warning,) = report["warnings"]
    assert ("[Errno 13] Permission denied" in warning) if owner == 0 else (f"owned by uid {owner}" in warning)
    assert report["codes"] == {"ls": 2, "precompute": 2}


# ------------------------------------------------------------------ 6. deleted under an open store
@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def test_a_directory_deleted_under_an_open_store_is_recreated_private_and_writes_land(tmp_path):
    directory = tmp_path / "store"
    store = PatternStore(directory)
    store.get(SMALL)
    shutil.rmtree(directory)
    with umask(0):
        caught = warnings_of(lambda: [store.get(spec) for spec in OTHERS])
    assert len(caught) == 1 and "deleted or replaced" in caught[0]
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(directory / "locks").st_mode) == 0o700
    fresh = PatternStore(directory)
    assert sorted(fresh.stored_keys()) == sorted(spec.key for spec in OTHERS)
    assert all(fresh.get(spec).equals(generate(spec)) for spec in OTHERS) and fresh.stats()["disk_hits"] == 5


def test_a_directory_replaced_under_an_open_store_gets_the_writes(tmp_path):
    directory = tmp_path / "store"
    store = PatternStore(directory)
    store.get(SMALL)
    directory.rename(tmp_path / "old")
    directory.mkdir(mode=0o700)
    caught = warnings_of(lambda: store.put(generate(LARGE)))
    assert len(caught) == 1 and "deleted or replaced" in caught[0]
    assert PatternStore(directory).stored_keys() == [LARGE.key]
    assert PatternStore(tmp_path / "old").stored_keys() == [SMALL.key]


def test_a_database_deleted_under_an_open_store_is_noticed(tmp_path):
    directory = tmp_path / "store"
    store = PatternStore(directory)
    store.get(SMALL)
    for name in ("cache.db", "cache.db-wal", "cache.db-shm"):
        (directory / name).unlink(missing_ok=True)
    caught = warnings_of(lambda: store.put(generate(LARGE)))
    assert len(caught) == 1 and "deleted or replaced" in caught[0]
    assert PatternStore(directory).stored_keys() == [LARGE.key]


def test_a_directory_that_cannot_come_back_stops_writes_with_one_warning(tmp_path):
    directory = tmp_path / "store"
    store = PatternStore(directory)
    store.get(SMALL)
    shutil.rmtree(directory)
    directory.write_text("a file now")
    caught = warnings_of(lambda: [store.get(spec) for spec in OTHERS])
    assert len(caught) == 1 and "cannot be opened again" in caught[0] and "Not a directory" in caught[0]
    assert store.read_only and not any(store.stored(spec.key) for spec in OTHERS)
    assert directory.read_text() == "a file now"


# ------------------------------------------------------------------ 10. a held SQLite lock at open
def test_opening_waits_at_most_lock_timeout_for_sqlite_then_reads_read_only(tmp_path):
    directory = stored(tmp_path / "store")
    holder = sqlite3.connect(directory / "cache.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a writer stopped mid-transaction (Ctrl-Z)
    try:
        stores: list[PatternStore] = []
        started = time.monotonic()
        caught = warnings_of(lambda: stores.append(PatternStore(directory, lock_timeout=0.5)))
        waited = time.monotonic() - started
        (store,) = stores
        assert waited < 5, waited
        assert len(caught) == 1 and "lock_timeout=0.5s" in caught[0] and "read-only" in caught[0]
        assert store.read_only and store.get(LARGE).equals(generate(LARGE)) and store.stats()["disk_hits"] == 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()


# ------------------------------------------------------------------ 11. a way out of damage
def damage(directory: Path, how: str) -> None:
    database = directory / "cache.db"
    if how == "garbage":
        database.write_bytes(os.urandom(database.stat().st_size))
    elif how == "truncated":
        os.truncate(database, 4096)
    else:
        database.unlink()
        os.mkfifo(database)


@pytest.mark.parametrize("how", ["garbage", "truncated", "fifo"])
@pytest.mark.parametrize("command", [["verify", "--repair"], ["clear", "--yes"]])
def test_a_damaged_database_is_rebuilt_keeping_the_value_files_that_verify(tmp_path, how, command, capsys):
    directory = stored(tmp_path / "store")
    (directory / "ab" / "cd").mkdir(parents=True, exist_ok=True)
    (directory / "ab" / "cd" / "0123456789abcdef0123456789ab.val").write_bytes(b"not a value")  # dropped
    damage(directory, how)
    stores: list[PatternStore] = []
    with no_hang():
        caught = warnings_of(lambda: stores.append(PatternStore(directory)))
    assert stores[0].disk is None and isinstance(stores[0].disk_error, DamagedStore)
    assert len(caught) == 1 and "verify --repair" in caught[0] and "cache.db" in caught[0]
    with pytest.raises(maintenance.StoreUnavailable) as refusal:
        maintenance.open_store(directory, writable=True)
    assert "writable" not in str(refusal.value)  # the cause is the damage, not writability
    capsys.readouterr()
    with no_hang(60):
        assert main(["--dir", str(directory), *command]) == 0
    err = capsys.readouterr().err
    assert "rebuilt the damaged database" in err and "kept 1 value file(s) that verify, dropped 1" in err
    after = PatternStore(directory)
    if command[0] == "clear":
        assert after.stored_keys() == [] and list(directory.rglob("*.val")) == []
    else:
        assert after.stored_keys() == [LARGE.key]  # SMALL lived inside the database
        assert fresh_get(directory, LARGE)["disk_hits"] == 1 and fresh_get(directory, SMALL)["generations"] == 1


def test_a_dangling_link_as_the_directory_is_named_as_such_and_nothing_is_created(tmp_path):
    link = tmp_path / "store"
    link.symlink_to(tmp_path / "gone")
    stores: list[PatternStore] = []
    caught = warnings_of(lambda: stores.append(PatternStore(link)))
    assert len(caught) == 1 and "is a symbolic link to" in caught[0] and "which does not exist" in caught[0]
    assert "File exists" not in caught[0] and not (tmp_path / "gone").exists()
    assert stores[0].get(SMALL).equals(generate(SMALL))
