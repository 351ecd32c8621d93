"""The code passes the project's ruff rules (pyproject.toml [tool.ruff]): the lint diffusers
runs, minus line length, which is the formatter's business."""

import shutil
import subprocess

import pytest
from conftest import REPO


def test_ruff_check_passes():
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(REPO / ".venv" / "bin"))
    if ruff is None:
        pytest.fail("ruff is not installed; it is in the dev extra: pip install -e '.[dev]'")
    done = subprocess.run([ruff, "check", "--output-format", "concise", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"ruff check found problems (fix them, or `ruff check --fix FILE`):\n{done.stdout}{done.stderr}"
