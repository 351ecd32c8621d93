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


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, fixtures_dir):
    """`tiny_dataset(features=... or preset=..., res=(H, W), **options)`: the path of a dataset
    built from the fixture photos (`--executor local`, `--weights tiny` unless given), built
    once per argument set so modules asking for the same one share it. Options are further
    `build folder` flags: group_regex="..." -> --group-regex ...; tests must not write into it."""
    from click.testing import CliRunner

    from posedata.cli import main as cli_main

    built: dict[tuple, Path] = {}

    def build(*, res: tuple[int, int] = (64, 48), features: str | None = None, preset: str | None = None,
              weights: str = "tiny", **options: str) -> Path:
        key = (tuple(res), features, preset, weights, tuple(sorted(options.items())))
        if key not in built:
            out = tmp_path_factory.mktemp("tiny-dataset") / "ds"
            args = ["build", "folder", "--root", str(fixtures_dir / "deepfashion"), "--out", str(out),
                    "--res", "x".join(map(str, res)), "--weights", weights, "--executor", "local"]
            args += ["--features", features] if features else []
            args += ["--preset", preset] if preset else []
            for name, value in options.items():
                args += ["--" + name.replace("_", "-"), str(value)]
            result = CliRunner().invoke(cli_main, args, catch_exceptions=False)
            assert result.exit_code == 0, result.output
            built[key] = out
        return built[key]

    return build
