"""Several processes on one directory: single flight, and SIGKILL mid-write.

Children are fresh interpreters (``python -c``) that import this checkout's
code through PYTHONPATH, so they work from a source tree and from an
installed package alike.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from patternstore import PatternStore, generate

REPO = Path(__file__).resolve().parents[1]

# Built identically in the parent and in every child.
SPECS_SOURCE = """
from patternstore import DilatedSpec, SparseSpec
SPECS = [DilatedSpec([n // 4, n], [1, 2], 2) for n in (256, 1024, 4096)] + [
    SparseSpec("bigbird", seq_len=n, block_size=32, num_heads=4, different_layout_per_head=True)
    for n in (8192, 32768, 65536)
]
"""
namespace: dict = {}
exec(SPECS_SOURCE, namespace)
SPECS = namespace["SPECS"]


def spawn(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_line(child: subprocess.Popen, expected: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = child.stdout.readline()
        if line.strip() == expected:
            return
        if not line and child.poll() is not None:
            raise AssertionError(f"child exited {child.returncode}: {child.stderr.read()}")
    raise AssertionError(f"child never printed {expected!r}")


SINGLE_FLIGHT_CHILD = """
import os, sys, time
import patternstore.store as store_module
from patternstore import PatternStore
directory, go, counter = sys.argv[1:4]
exec(sys.argv[4])
real_generate = store_module.generate

def slow_generate(spec):
    with open(counter, "a") as log:  # one line per generation, from any process
        log.write(f"{os.getpid()}\\n")
    time.sleep(0.5)  # long enough that every process arrives while it runs
    return real_generate(spec)

store_module.generate = slow_generate
store = PatternStore(directory)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.002)
pattern = store.get(SPECS[-1])
assert pattern.equals(real_generate(SPECS[-1]))
stats = store.stats()
print(stats["generations"], stats["disk_hits"], stats["lock_timeouts"], flush=True)
"""


@pytest.mark.slow
def test_four_processes_on_one_missing_key_generate_once(tmp_path):
    go, counter = tmp_path / "go", tmp_path / "generations"
    children = [spawn(SINGLE_FLIGHT_CHILD, str(tmp_path / "store"), str(go), str(counter), SPECS_SOURCE) for _ in range(4)]
    for child in children:
        wait_for_line(child, "ready")
    go.touch()
    totals = [0, 0, 0]
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        for i, count in enumerate(out.split()):
            totals[i] += int(count)
    assert len(counter.read_text().splitlines()) == 1
    assert totals == [1, 3, 0]  # generations, disk hits, lock timeouts


CRASH_CHILD = """
import sys
from patternstore import PatternStore, generate
from patternstore.codec import encode
exec(sys.argv[2])
store = PatternStore(sys.argv[1])
values = [(spec.key, encode(generate(spec))) for spec in SPECS]
print("ready", flush=True)
round = 0
while True:  # until killed: overwrite, delete, rewrite, values in SQLite and in files
    for i, (key, value) in enumerate(values):
        store.disk.write(key, value)
        if (i + round) % 3 == 0:
            store.disk.delete(key)
    round += 1
"""


@pytest.mark.slow
def test_sigkill_mid_write_leaves_only_correct_patterns(tmp_path):
    directory = tmp_path / "store"
    truth = {spec.key: generate(spec) for spec in SPECS}
    rng = random.Random(1234)
    for _ in range(3):
        child = spawn(CRASH_CHILD, str(directory), SPECS_SOURCE)
        wait_for_line(child, "ready")
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.communicate(timeout=60)
        assert child.returncode == -signal.SIGKILL
        store = PatternStore(directory)
        for spec in SPECS:
            assert store.get(spec).equals(truth[spec.key])
        stats = store.stats()
        assert stats["disk_hits"] + stats["misses"] == len(SPECS)
        assert stats["disk_hits"] > 0  # the child did write before it died


def in_forked_child(check) -> int:
    """Run ``check`` in a fork()ed child; its exit status (0: passed). The
    child has 20 s; a hang is killed by SIGALRM."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            signal.alarm(20)
            check()
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
def test_a_forked_child_opens_its_own_database_connection(tmp_path):
    store = PatternStore(tmp_path)
    first, second = SPECS[0], SPECS[1]
    store.get(first)
    parents_connection = store.disk._opened

    def child() -> None:
        assert store.get(first).equals(generate(first))  # memory, inherited
        assert store.get(second).equals(generate(second))  # written through a new connection
        assert store.disk._opened is not parents_connection

    assert in_forked_child(child) == 0
    assert store.disk._opened is parents_connection
    assert store.get(second).equals(generate(second)) and store.stats()["disk_hits"] == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
def test_fork_while_another_thread_holds_the_store_lock(tmp_path):
    import threading

    store = PatternStore(tmp_path)
    spec = SPECS[0]
    store.get(spec)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store.memory._lock:
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(10)
    try:
        status = in_forked_child(lambda: store.get(spec).equals(generate(spec)) or os._exit(2))
    finally:
        release.set()
        holder.join()
    assert status == 0
