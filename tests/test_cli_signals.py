"""Signals to ``patternstore precompute --jobs 2``, run as a real process in
its own session: Ctrl-C (SIGINT to the whole process group, as a terminal
sends it) and SIGTERM to the command alone stop it without working off
the queue (at most the two specs in flight when the signal came may still be
stored), exit 130 and 143, and leave what was stored valid; SIGKILL (the
parent's death) takes the workers and the resource tracker with it. Every
process of the session is found by scanning /proc, and must be gone within a
bounded wait."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from patternstore.maintenance import open_store, verify

REPO = Path(__file__).resolve().parents[1]
# Eight specs of about a second each on one thread (256 random draws per row): a queue to interrupt.
SPECS = [f"bigbird:seq_len=65536:block_size=64:num_heads=4:different_layout_per_head=true:num_random_blocks=256"
         f":seed={seed}" for seed in range(8)]

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the processes")


def session_members(session: int) -> list[int]:
    """Live (not zombie) processes whose session id is ``session``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
        if int(fields[3]) == session and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def start_precompute(directory: Path) -> subprocess.Popen:
    """The command in a new session (its id is the command's pid), once one
    spec is stored and both workers run (the session then holds the command,
    its two workers and the resource tracker)."""
    args = [sys.executable, "-m", "patternstore", "--dir", str(directory), "precompute", "--jobs", "2"]
    for spec in SPECS:
        args += ["--spec", spec]
    child = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    first = child.stderr.readline()  # "[1/8] generated ...": one spec is stored
    assert first.startswith("[1/8] generated"), first + child.stderr.read()
    assert len(session_members(child.pid)) >= 4
    return child


def stored(directory: Path) -> int:
    return len(open_store(directory).stored_keys())


# Ctrl-C reaches the workers too (they ignore it); SIGTERM and SIGKILL reach the command alone.
SIGNALS = [("ctrl-c", signal.SIGINT, 130), ("sigterm", signal.SIGTERM, 143),
           ("parent killed", signal.SIGKILL, -signal.SIGKILL)]


@pytest.mark.parametrize("how, signum, status", SIGNALS, ids=[s[0] for s in SIGNALS])
def test_a_signal_stops_the_work_and_leaves_no_process(how, signum, status, tmp_path):
    directory = tmp_path / "store"
    child = start_precompute(directory)
    before = stored(directory)
    if how == "ctrl-c":
        os.killpg(child.pid, signum)  # a terminal sends it to every process of the group
    else:
        child.send_signal(signum)  # to the command alone
    try:
        assert child.wait(timeout=30) == status
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert wait_until(lambda: not session_members(child.pid), timeout=15), session_members(child.pid)
    assert 1 <= before <= stored(directory) <= before + 2  # stopped: the queue was not worked off first
    if how != "parent killed":
        assert child.stderr.read().splitlines()[-1] == ("patternstore: interrupted" if status == 130
                                                        else "patternstore: terminated")
    checked = verify(open_store(directory), sample=0)  # every entry decoded: checksum, format, key
    assert checked.ok and checked.entries == stored(directory)  # what was stored stays valid
