"""TruePose style transfer (Sec. 5.4) on a tiny dataset built from the real fixture photos:
region names, the mask at the latent grid, the blend pinned against independent runs (m all
ones = plain sampling, m all zeros = the reference branch, one DDIM step = the per-pixel
blend of the two), clear errors, and `posedata sample truepose --style-region` end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_pcdm_inpaint import H, W, with_keypoints  # the same fixture size; random drawable poses

from posedata.cli import main as cli_main
from posedata.extractors.parsing import ATR_LABELS
from posedata.reader import Dataset, PairStream
from posedata.train.truepose import TruePosePlugin
from posedata.train.truepose_style import region_mask, style_region_ids

h, w = H // 8, W // 8
EVERY_REGION = ",".join(ATR_LABELS)


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    return tiny_dataset(res=(H, W), preset="truepose")


@pytest.fixture(scope="module")
def setup(dataset):
    ds = Dataset(str(dataset))
    pairs = with_keypoints(list(PairStream(ds, "train", TruePosePlugin.needs, seed=0, epochs=1)))[:2]
    plugin = TruePosePlugin(ds.card, weights="tiny")
    torch.manual_seed(0)
    model = plugin.build_model().eval()
    # CAA starts at zero and tiny random UNets barely read SourceNet: give CAA weights, so the
    # donor and the reference branch predict clearly different noise
    for caa in model.caa.values():
        torch.nn.init.normal_(caa.to_out[0].weight, std=0.5)
    return plugin, model, pairs


def run(setup, pairs=None, steps: int = 2, **kw) -> torch.Tensor:
    plugin, model, default = setup
    return plugin.sample(model, pairs or default, generator=torch.Generator().manual_seed(0), num_inference_steps=steps, **kw)


def as_reference_pairs(pairs):
    """Each pair's target as its own source: what the reference branch predicts from."""
    return [{"source": p["target"], "target": p["target"]} for p in pairs]


def block_mask(labels: np.ndarray, names: list[str]) -> np.ndarray:
    """m computed independently: the classes' share of each 8 x 8 pixel block >= 1/2."""
    chosen = np.isin(labels, [ATR_LABELS.index(n) for n in names]).astype(np.float64)
    return chosen.reshape(h, 8, w, 8).mean(axis=(1, 3)) >= 0.5


def test_region_names_parse_and_unknown_ones_are_named():
    assert style_region_ids("upper-clothes, Skirt") == [4, 5]
    assert style_region_ids(["face", "hair", "face"]) == [2, 11]
    with pytest.raises(ValueError, match=r"unknown --style-region shirt, coat; the parsing regions are background, hat"):
        style_region_ids("shirt,upper-clothes,coat")
    with pytest.raises(ValueError, match="names no region"):
        style_region_ids(" , ")


def test_mask_is_the_reference_regions_at_the_latent_grid(setup):
    _, _, pairs = setup
    labels = np.stack([np.asarray(p["target"]["parsing.labels"]) for p in pairs])
    present = sorted({ATR_LABELS[i] for i in np.unique(labels)})
    names = present[: max(1, len(present) // 2)]
    got = region_mask(torch.from_numpy(labels), style_region_ids(names), (h, w))
    assert got.shape == (2, 1, h, w) and got.dtype == torch.bool
    for i in range(2):
        assert np.array_equal(got[i, 0].numpy(), block_mask(labels[i], names))


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_mask_all_ones_is_plain_sampling_and_all_zeros_the_reference_branch(setup, guidance):
    _, model, pairs = setup
    plain = run(setup, guidance_scale=guidance)
    reference = run(setup, as_reference_pairs(pairs), guidance_scale=guidance)
    assert not torch.allclose(plain, reference, atol=1e-3)  # the two branches differ
    ones = run(setup, guidance_scale=guidance, style_region=EVERY_REGION)
    zeros = run(setup, guidance_scale=guidance, style_region=EVERY_REGION, style_region_from="reference")
    # equal up to float rounding: the model runs a batch of a different size (latents up to ~50)
    torch.testing.assert_close(ones, plain, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(zeros, reference, rtol=1e-5, atol=1e-4)
    assert not model.state.source  # nothing left behind for the next forward pass


def test_one_step_is_the_per_pixel_blend_of_the_two_branches(setup):
    """One DDIM step is an elementwise function of x_T and the noise prediction, and both
    branches start from the same x_T: the output is m * plain + (1 - m) * reference, with m
    computed here from the stored labels, not by the code under test."""
    _, _, pairs = setup
    labels = [np.asarray(p["target"]["parsing.labels"]) for p in pairs]
    present = sorted({ATR_LABELS[i] for lab in labels for i in np.unique(lab)})
    # the region set whose mask is closest to half the grid: both branches show up
    names = min(([n] for n in present), key=lambda ns: abs(np.mean([block_mask(lab, ns).mean() for lab in labels]) - 0.5))
    m = torch.from_numpy(np.stack([block_mask(lab, names) for lab in labels]))[:, None]
    assert 0 < m.float().mean() < 1, names
    plain = run(setup, steps=1)
    reference = run(setup, as_reference_pairs(pairs), steps=1)
    for region_from, inside in (("source", m), ("reference", ~m)):
        styled = run(setup, steps=1, style_region=",".join(names), style_region_from=region_from)
        expected = torch.where(inside, plain, reference)
        torch.testing.assert_close(styled, expected, rtol=1e-5, atol=1e-4, msg=region_from)
    # the branches differ on both sides of m by far more than the tolerance: a wrong or
    # swapped mask fails the comparison above
    gap = (plain - reference).abs()
    assert gap.masked_select(m.expand_as(gap)).max() > 1e-2 and gap.masked_select(~m.expand_as(gap)).max() > 1e-2


def test_clear_errors(setup):
    plugin, model, pairs = setup
    with pytest.raises(ValueError, match="unknown --style-region shirt"):
        run(setup, style_region="shirt")
    with pytest.raises(ValueError, match="--style-region-from must be one of source, reference"):
        run(setup, style_region="face", style_region_from="target")
    card = {**plugin.card, "features": {k: v for k, v in plugin.card["features"].items() if v.get("name") != "parsing"}}
    no_parsing = TruePosePlugin(card, weights="tiny")
    with pytest.raises(ValueError, match="has no 'parsing' feature"):
        no_parsing.sample(model, pairs, num_inference_steps=1, style_region="face")
    bare = [{"source": pairs[0]["source"], "target": {k: v for k, v in pairs[0]["target"].items() if not k.startswith("parsing.")}}]
    with pytest.raises(ValueError, match="needs the reference's parsing labels"):
        run(setup, bare, style_region="face")


def test_cli_sample_style_transfer_end_to_end(dataset, tmp_path):
    import pyarrow.parquet as pq
    from PIL import Image

    run_dir = tmp_path / "run"
    result = CliRunner().invoke(cli_main, ["train", "truepose", "--shards", str(dataset), "--out", str(run_dir), "--weights", "tiny",
                                           "--max-steps", "2", "--batch-size", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    common = ["sample", "truepose", "--shards", str(dataset), "--split", "train", "--run", str(run_dir), "--limit", "2", "--steps", "2"]
    help_text = CliRunner().invoke(cli_main, ["sample", "truepose", "--help"]).output
    assert "--style-region" in help_text and "--style-region-from" in help_text

    out = tmp_path / "styled"
    result = CliRunner().invoke(cli_main, [*common, "--out", str(out), "--style-region", "upper-clothes,pants"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out / "samples.parquet").to_pylist()
    assert len(rows) == 2 and all(r["style_region"] == "upper-clothes,pants" and r["style_region_from"] == "source" for r in rows)
    assert all(0.0 <= r["style_mask_share"] <= 1.0 for r in rows)
    assert all(Image.open(out / r["file"]).size == (W, H) for r in rows) and (out / "sheet.png").is_file()

    plain, everything = tmp_path / "plain", tmp_path / "everything"
    assert CliRunner().invoke(cli_main, [*common, "--out", str(plain)], catch_exceptions=False).exit_code == 0
    result = CliRunner().invoke(cli_main, [*common, "--out", str(everything), "--style-region", EVERY_REGION], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert all(r["style_mask_share"] == 1.0 for r in pq.read_table(everything / "samples.parquet").to_pylist())
    for r in pq.read_table(plain / "samples.parquet").to_pylist():  # m all ones: the plain samples, pixel for pixel (+-1 rounding)
        a = np.asarray(Image.open(plain / r["file"]), dtype=int)
        b = np.asarray(Image.open(everything / r["file"]), dtype=int)
        assert np.abs(a - b).max() <= 1

    result = CliRunner().invoke(cli_main, [*common, "--out", str(tmp_path / "bad"), "--style-region", "shirt"])
    assert result.exit_code != 0
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: truepose: unknown --style-region shirt; the parsing regions are background")
    assert not (tmp_path / "bad" / "samples.parquet").exists()
