import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The real fixtures from public repositories (../shared/fixtures), read in place."""
    path = Path(os.environ.get("POSEDATA_FIXTURES", REPO.parent / "shared" / "fixtures"))
    if not path.is_dir():
        pytest.fail(f"fixtures not found at {path}; set POSEDATA_FIXTURES")
    return path
