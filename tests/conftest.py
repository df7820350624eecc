"""Test-session set-up shared by every test file.

The suite never touches the user's real cache directory: before any test (and
any subprocess a test starts, which inherits the environment) the default
store directory points into a fresh temporary directory, removed at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

_SESSION_DIR = tempfile.mkdtemp(prefix="patternstore-tests-")


def pytest_configure(config) -> None:
    os.environ["PATTERNSTORE_DIR"] = os.path.join(_SESSION_DIR, "default-store")


def pytest_unconfigure(config) -> None:
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    waking a second intra-op thread for each op costs more than the op
    (milliseconds on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo():
    """An empty dynamo cache before and after the test (a compile test counts
    its own graphs and recompiles)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
