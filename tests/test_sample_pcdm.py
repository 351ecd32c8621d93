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
def trained(tmp_path_factory, tiny_dataset) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("sample")
    ds = tiny_dataset(res=RES, features="openpose,clip,vae:sd21,dinov2:giant")
    runs = {}
    for stage in ("prior", "inpaint", "refine"):
        runs[stage] = root / stage
        result = run("train", f"pcdm-{stage}", "--shards", ds, "--out", runs[stage], "--weights", "tiny", "--max-steps", 2)
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


def test_samples_table_same_pixels_twice_and_recipes(trained, tmp_path):
    import pyarrow.parquet as pq

    ds, runs = trained
    outs = []
    for i in range(2):
        out = tmp_path / f"chain{i}"
        result = run("sample", "pcdm", "--shards", ds, "--split", "train", "--prior", runs["prior"], "--inpaint", runs["inpaint"],
                     "--refine", runs["refine"], "--out", out, "-n", 2, "--steps", 2, "--seed", 7)
        assert result.exit_code == 0, result.output
        outs.append(out)
    rows = pq.read_table(outs[0] / "samples.parquet").to_pylist()
    assert len(rows) == 2
    assert {"source_key", "target_key", "file", "prior_file", "inpaint_file", "refine_file", "prior_cosine_to_target"} <= set(rows[0])
    for row in rows:
        assert row["file"] == row["refine_file"] == f"refine/{row['source_key']}_to_{row['target_key']}.png"
        for key in ("prior_file", "inpaint_file", "refine_file"):
            assert (outs[0] / row[key]).read_bytes() == (outs[1] / row[key]).read_bytes(), key  # same seed, same pixels
    # the prior alone still writes the table (file = its embedding); the paper recipe runs DDIM
    alone = tmp_path / "prior"
    result = run("sample", "pcdm", "--shards", ds, "--split", "train", "--prior", runs["prior"], "--out", alone, "-n", 2, "--recipe", "paper",
                 "--steps", 2)
    assert result.exit_code == 0, result.output
    assert pq.read_table(alone / "samples.parquet").column("file").to_pylist()[0].startswith("prior/")
    assert '"scheduler": "ddim"' in result.output and '"uncond": "all"' in result.output


def test_recipes_and_per_stage_settings(trained, tmp_path):
    ds, runs = trained
    result = run("sample", "pcdm", "--shards", ds, "--split", "train", "--refine", runs["refine"], "--out", tmp_path / "r", "-n", 1,
                 "--set", "refine.num_inference_steps=2", "--set", "refine.guidance_rescale=0")
    assert result.exit_code == 0, result.output
    assert '"num_inference_steps": 2' in result.output and '"guidance_rescale": 0.0' in result.output and '"scheduler": "unipc"' in result.output
    bad = CliRunner().invoke(cli, ["sample", "pcdm", "--shards", str(ds), "--refine", str(runs["refine"]), "--out", str(tmp_path / "x"),
                                   "--set", "refine.steps=2"])
    assert bad.exit_code != 0 and "the settings are" in bad.output


def test_train_help_lists_plugins_resume_without_value_and_warmup_warning(trained, tmp_path, caplog):
    ds, runs = trained
    help_text = run("train", "--help").output
    assert all(name in help_text for name in ("pcdm-prior", "pcdm-inpaint", "pcdm-refine"))
    assert "pcdm-prior" in run("sample", "--help").output and "pcdm" in run("sample", "--help").output
    unknown = CliRunner().invoke(cli, ["train", "nope", "--shards", "x", "--out", "y"])
    assert unknown.exit_code != 0 and "unknown plugin 'nope'" in unknown.output

    out = tmp_path / "prior"
    first = run("train", "pcdm-prior", "--shards", ds, "--out", out, "--weights", "tiny", "--max-steps", 2)
    assert first.exit_code == 0, first.output
    again = run("train", "pcdm-prior", "--shards", ds, "--out", out, "--weights", "tiny", "--max-steps", 3, "--resume")
    assert again.exit_code == 0, again.output
    assert '"start_step": 2' in again.output and '"steps": 3' in again.output

    with caplog.at_level("WARNING", logger="posedata.train.trainer"):
        warned = run("train", "pcdm-prior", "--shards", ds, "--out", tmp_path / "w", "--weights", "tiny", "--max-steps", 2, "--warmup-steps", 10)
    assert warned.exit_code == 0 and "max_steps 2 is below the warm-up (10 steps)" in caplog.text
