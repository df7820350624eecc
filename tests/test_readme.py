"""Every ```python block of README.md runs as pasted: each in a fresh
interpreter, in an empty working directory, with a fresh store directory
(``PATTERNSTORE_DIR``) and no state from the other blocks. A block that needs a
name must define it; a key it shows must be printed by the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 5


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_readme_block_runs_as_pasted(index, tmp_path):
    env = {**os.environ, "PATTERNSTORE_DIR": str(tmp_path / "store"), "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "2"}
    work = tmp_path / "cwd"
    work.mkdir()
    result = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=work, env=env, capture_output=True,
                            text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"README block {index} failed:\n{BLOCKS[index]}\n{result.stderr[-3000:]}"
