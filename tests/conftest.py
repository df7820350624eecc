"""Test-session set-up shared by every test file.

The suite never touches the user's real cache directory: before any test (and
any subprocess a test starts, which inherits the environment) the default
store directory points into a fresh temporary directory, removed at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile

_SESSION_DIR = tempfile.mkdtemp(prefix="patternstore-tests-")


def pytest_configure(config) -> None:
    os.environ["PATTERNSTORE_DIR"] = os.path.join(_SESSION_DIR, "default-store")


def pytest_unconfigure(config) -> None:
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)
