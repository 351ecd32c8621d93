"""`posedata sample pcdm`: the three stages chained (and alone) on tiny trained runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from posedata.cli import main as cli

RES = (64, 48)


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fixtures_dir) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("sample")
    ds = root / "ds"
    result = run("build", "folder", "--root", fixtures_dir / "deepfashion", "--out", ds, "--res", "x".join(map(str, RES)), "--weights", "tiny", "--executor", "local", "--features", "openpose,clip,vae:sd21,dinov2:giant")
    assert result.exit_code == 0, result.output
    runs = {}
    for stage in ("prior", "inpaint", "refine"):
        runs[stage] = root / stage
        result = run("train", f"pcdm-{stage}", "--shards", ds, "--out", runs[stage], "--weights", "tiny", "--max-steps", 2, "--batch-size", 2, "--warmup-steps", 0)
        assert result.exit_code == 0, result.output
    return ds, runs


def test_the_chain_writes_a_png_per_pair_and_stage_and_a_contact_sheet(trained, tmp_path):
    ds, runs = trained
    out = tmp_path / "samples"
    result = run("sample", "pcdm", "--shards", ds, "--split", "train", "--prior", runs["prior"], "--inpaint", runs["inpaint"], "--refine", runs["refine"], "--out", out, "-n", 3, "--steps", 2)
    assert result.exit_code == 0, result.output
    for stage in ("inpaint", "refine"):
        pngs = sorted((out / stage).glob("*_to_*.png"))
        assert len(pngs) == 3
        assert Image.open(pngs[0]).size == (RES[1], RES[0])
    embeds = sorted((out / "prior").glob("*.npy"))
    assert len(embeds) == 3 and np.load(embeds[0], allow_pickle=False).shape == (32,)
    sheet = Image.open(out / "sheet.png")
    assert sheet.size[0] >= 5 * RES[1] and sheet.size[1] >= 3 * RES[0]


@pytest.mark.parametrize("stage", ["inpaint", "refine"])
def test_each_stage_samples_alone(trained, tmp_path, stage):
    ds, runs = trained
    out = tmp_path / stage
    result = run("sample", "pcdm", "--shards", ds, "--split", "train", f"--{stage}", runs[stage], "--out", out, "-n", 2, "--steps", 2, "--scheduler", "unipc")
    assert result.exit_code == 0, result.output
    assert len(list((out / stage).glob("*.png"))) == 2


def test_no_stage_is_a_clear_error(trained, tmp_path):
    ds, _ = trained
    result = CliRunner().invoke(cli, ["sample", "pcdm", "--shards", str(ds), "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "at least one of --prior, --inpaint, --refine" in result.output
