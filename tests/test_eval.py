"""`posedata eval`: the papers' metrics on a dataset built from the real fixture photos, with
"generated" images made from the ground truths by known distortions. Random-weight networks
throughout (the real loading path is tested by saving random weights under the real file
names in a temporary TORCH_HOME)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image, ImageFilter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from posedata.cli import main as cli
from posedata.reader import Dataset

RES = (256, 176)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, fixtures_dir) -> Path:
    """The five fixture photos at 256x176 (all in split train), with the pcdms FID reference
    computed at build time and the TF-Inception one added by `extend`."""
    out = tmp_path_factory.mktemp("eval") / "ds"
    result = run("build", "folder", "--root", fixtures_dir / "deepfashion", "--out", out, "--res", "256x176", "--weights", "random", "--executor", "local", "--features", "fid_ref:pcdms")
    assert result.exit_code == 0, result.output
    result = run("extend", out, "--features", "fid_ref:pcdms-tf", "--weights", "random", "--executor", "local")
    assert result.exit_code == 0, result.output
    return out


def stored_images(ds: Path) -> dict[str, np.ndarray]:
    return {s["__key__"]: s["image"] for s in Dataset(str(ds)).samples("train", pixels=True)}


def noisy(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, image.shape)
    return np.clip(image.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)


DISTORTIONS = {
    "noise5": lambda im: noisy(im, 5, 1),
    "noise20": lambda im: noisy(im, 20, 2),
    "noise60": lambda im: noisy(im, 60, 3),
    "blur": lambda im: np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(1.5))),
    "darker": lambda im: (im.astype(np.float64) * 0.8).round().astype(np.uint8),
}


def write_samples(folder: Path, pairs: list[tuple[str, str, np.ndarray]], size: tuple[int, int] | None = None) -> Path:
    """samples.parquet (source_key, target_key, file relative to the folder) and the PNGs."""
    (folder / "png").mkdir(parents=True, exist_ok=True)
    rows = []
    for source, target, image in pairs:
        file = f"png/{source}_to_{target}.png"
        im = Image.fromarray(image)
        if size:
            im = im.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        im.save(folder / file)
        rows.append((source, target, file))
    pq.write_table(pa.table({"source_key": [r[0] for r in rows], "target_key": [r[1] for r in rows], "file": [r[2] for r in rows]}), folder / "samples.parquet")
    return folder


@pytest.fixture(scope="module")
def distorted(dataset, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One pair per fixture photo: source = the next photo, generated = a known distortion of
    the target. Returns the samples folder and distortion -> file."""
    images = stored_images(dataset)
    keys = sorted(images)
    pairs, which = [], {}
    for (name, distort), target, source in zip(DISTORTIONS.items(), keys, keys[1:] + keys[:1]):
        pairs.append((source, target, distort(images[target])))
        which[name] = f"png/{source}_to_{target}.png"
    return write_samples(tmp_path_factory.mktemp("distorted"), pairs), which


def reference_pcdms(generated_png: Path, truth: np.ndarray) -> tuple[float, float]:
    """Written from PCDMs' metrics.py: imread -> float32 -> cv2 INTER_CUBIC to (176, 256) ->
    / 255; PSNR data_range 1; ssim_256 on x 255 with sigma 1.2."""
    gen = cv2.resize(np.asarray(Image.open(generated_png).convert("RGB")).astype(np.float32), (176, 256), interpolation=cv2.INTER_CUBIC) / 255.0
    gt = cv2.resize(truth.astype(np.float32), (176, 256), interpolation=cv2.INTER_CUBIC) / 255.0
    psnr = peak_signal_noise_ratio(gt, gen, data_range=1)
    gen256, gt256 = gen * 255.0, gt * 255.0
    ssim = structural_similarity(gt256, gen256, gaussian_weights=True, sigma=1.2, use_sample_covariance=False, channel_axis=2, data_range=gen256.max() - gen256.min())
    return float(ssim), float(psnr)


def test_pcdms_ssim_and_psnr_equal_scikit_image_under_the_protocol(dataset, distorted):
    samples, which = distorted
    result = run("eval", samples, "--shards", dataset, "--protocol", "pcdms", "--metrics", "ssim,psnr", "--weights", "random", "--split", "train")
    assert result.exit_code == 0, result.output
    report = json.loads((samples / "metrics.json").read_text())
    assert report["protocol"] == "pcdms" and report["n_pairs"] == len(DISTORTIONS)
    truths = stored_images(dataset)
    mine = {p["file"]: p for p in report["per_pair"]}
    expected = {p["file"]: reference_pcdms(samples / p["file"], truths[p["target_key"]]) for p in report["per_pair"]}
    for file, (ssim, psnr) in expected.items():
        assert mine[file]["ssim"] == pytest.approx(ssim, abs=1e-3)
        assert mine[file]["psnr"] == pytest.approx(psnr, abs=1e-3)
    assert report["metrics"]["ssim"] == pytest.approx(np.mean([s for s, _ in expected.values()]), abs=1e-3)
    assert report["metrics"]["psnr"] == pytest.approx(np.mean([p for _, p in expected.values()]), abs=1e-3)
    # the known distortions rank as they must
    ssim = {name: mine[file]["ssim"] for name, file in which.items()}
    psnr = {name: mine[file]["psnr"] for name, file in which.items()}
    assert ssim["noise5"] > ssim["noise20"] > ssim["noise60"]
    assert psnr["noise5"] > psnr["noise20"] > psnr["noise60"]
    assert "ssim" in result.output and "psnr" in result.output


def test_default_run_writes_metrics_json_table_and_best_worst_sheet(dataset, distorted):
    samples, _ = distorted
    result = run("eval", samples, "--shards", dataset, "--weights", "random", "--split", "train", "--sheet-pairs", "2")
    assert result.exit_code == 0, result.output
    report = json.loads((samples / "metrics.json").read_text())
    # PCDMs reports SSIM, LPIPS, FID (+ PSNR), and the dataset has the TF-Inception reference too
    assert list(report["metrics"]) == ["ssim", "psnr", "lpips", "fid", "fid_tf"]
    assert all(np.isfinite(v) for v in report["metrics"].values())
    assert report["counted"] == {"lpips": 5, "fid_generated": 5, "fid_reference": 5, "fid_tf_generated": 5, "fid_tf_reference": 5}
    assert {"source_key", "target_key", "file", "ssim", "psnr", "lpips"} <= set(report["per_pair"][0])
    assert report["settings"]["ssim_sigma"] == 1.2 and report["settings"]["fid_batch"] == 128
    lpips = [p["lpips"] for p in report["per_pair"]]
    assert all(d >= 0 for d in lpips)
    # best 2 and worst 2 of 5 pairs, three cells each (source | generated | ground truth)
    sheet = Image.open(samples / "metrics_sheet.png")
    assert sheet.width >= 3 * 176 and sheet.height >= 4 * 256
    for name in ("ssim", "psnr", "lpips", "fid", "fid_tf"):
        assert name in result.output


def test_identical_images_give_zero_lpips_and_fid_against_themselves(dataset, tmp_path):
    images = stored_images(dataset)
    keys = sorted(images)
    samples = write_samples(tmp_path / "same", [(keys[0], k, images[k]) for k in keys])
    result = run("eval", samples, "--shards", dataset, "--metrics", "lpips,fid,fid_tf", "--weights", "random", "--split", "train")
    assert result.exit_code == 0, result.output
    report = json.loads((samples / "metrics.json").read_text())
    assert all(p["lpips"] == pytest.approx(0, abs=1e-6) for p in report["per_pair"])
    # the samples are the reference split's own images: same features, FID ~ 0
    for metric, feature in (("fid", "fid_ref:pcdms"), ("fid_tf", "fid_ref:pcdms-tf")):
        features = np.stack([s["fid_ref.pool"] for s in Dataset(str(dataset)).samples("train", [feature])])
        assert abs(report["metrics"][metric]) < 1e-5 * np.trace(np.cov(features, rowvar=False)), metric


def test_fid_rises_with_the_distortion(dataset, tmp_path):
    images = stored_images(dataset)
    keys = sorted(images)
    fids = []
    for sigma in (3, 80):
        samples = write_samples(tmp_path / f"n{sigma}", [(keys[0], k, noisy(images[k], sigma, 7)) for k in keys])
        result = run("eval", samples, "--shards", dataset, "--metrics", "fid", "--weights", "random", "--split", "train")
        assert result.exit_code == 0, result.output
        fids.append(json.loads((samples / "metrics.json").read_text())["metrics"]["fid"])
    assert 0 < fids[0] < fids[1]


def test_missing_reference_names_the_command_that_makes_it(dataset, distorted):
    samples, _ = distorted
    result = CliRunner().invoke(cli, ["eval", str(samples), "--shards", str(dataset), "--protocol", "cfld", "--metrics", "fid", "--weights", "random", "--split", "train"])
    assert result.exit_code == 1
    assert f"posedata extend {dataset} --features fid_ref:cfld --weights random" in result.output


def test_bad_inputs_are_one_line_errors(dataset, distorted, tmp_path):
    samples, _ = distorted
    invoke = lambda *a: CliRunner().invoke(cli, [str(x) for x in a])  # noqa: E731
    result = invoke("eval", tmp_path, "--shards", dataset, "--weights", "random")
    assert result.exit_code == 1 and "samples.parquet: not found" in result.output
    result = invoke("eval", samples, "--shards", dataset, "--protocol", "patn", "--metrics", "lpips", "--weights", "random", "--split", "train")
    assert result.exit_code == 1 and "protocol patn defines no lpips" in result.output
    result = invoke("eval", samples, "--shards", dataset, "--weights", "random", "--metrics", "ssim")  # default --split test
    assert result.exit_code == 1 and "not in split 'test'" in result.output
    keys = sorted(stored_images(dataset))
    unreadable = write_samples(tmp_path / "unreadable", [(keys[0], keys[1], np.zeros((8, 8, 3), np.uint8))])
    (unreadable / f"png/{keys[0]}_to_{keys[1]}.png").write_bytes(b"not a png")
    result = invoke("eval", unreadable, "--shards", dataset, "--weights", "random", "--metrics", "ssim", "--split", "train")
    assert result.exit_code == 1 and "not a readable image" in result.output and "Traceback" not in result.output
    (unreadable / f"png/{keys[0]}_to_{keys[1]}.png").unlink()
    result = invoke("eval", unreadable, "--shards", dataset, "--weights", "random", "--metrics", "ssim", "--split", "train")
    assert result.exit_code == 1 and "file not found" in result.output
    broken = tmp_path / "broken"
    write_samples(broken, [("a", "b", np.zeros((8, 8, 3), np.uint8))])
    result = invoke("eval", broken, "--shards", dataset, "--weights", "random", "--metrics", "ssim", "--split", "train")
    assert result.exit_code == 1 and "are not in" in result.output and "'a'" in result.output


def test_generated_images_at_another_size_follow_each_protocol(dataset, tmp_path):
    """512x352 samples against a 256x176 dataset: every protocol brings them to its own size."""
    images = stored_images(dataset)
    keys = sorted(images)
    samples = write_samples(tmp_path / "big", [(keys[0], k, noisy(images[k], 10, 5)) for k in keys], size=(512, 352))
    for protocol in ("pcdms", "cfld", "pidm", "gfla", "patn"):
        result = run("eval", samples, "--shards", dataset, "--protocol", protocol, "--metrics", "ssim", "--weights", "random", "--split", "train")
        assert result.exit_code == 0, (protocol, result.output)
        ssim = json.loads((samples / "metrics.json").read_text())["metrics"]["ssim"]
        assert 0.3 < ssim < 1.0, protocol


def test_real_weight_files_load_from_torch_home_and_missing_ones_are_named(dataset, distorted, tmp_path, monkeypatch):
    """The pretrained path: random weights saved under the real file names load through the
    libraries' own loaders (and give that network's outputs); a missing file is an error
    naming it and the folder, before any work."""
    import torch
    import torchvision
    from pytorch_fid.inception import FIDInceptionA  # noqa: F401 - the TF architecture is pytorch-fid's

    from posedata.eval.networks import WEIGHT_FILES, FidNetwork, lpips_network

    samples, _ = distorted
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    result = CliRunner().invoke(cli, ["eval", str(samples), "--shards", str(dataset), "--metrics", "ssim,lpips", "--split", "train"])
    assert result.exit_code == 1
    assert WEIGHT_FILES["alexnet"] in result.output and str(tmp_path / "torch" / "hub" / "checkpoints") in result.output
    assert not (samples / "png").joinpath("x").exists()

    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(1)
    inception = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True)
    torch.save(inception.state_dict(), checkpoints / WEIGHT_FILES["inception"])
    alexnet = torchvision.models.alexnet(weights=None)
    torch.save(alexnet.state_dict(), checkpoints / WEIGHT_FILES["alexnet"])

    loaded = FidNetwork("torchvision", "pretrained")
    assert torch.equal(loaded.inception.blocks[0][0].conv.weight, inception.Conv2d_1a_3x3.conv.weight)
    x = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        assert torch.allclose(loaded(x), FidNetwork("torchvision", "pretrained")(x))
    net = lpips_network("pretrained")
    assert torch.equal(net.net.slice1[0].weight, alexnet.features[0].weight)
    result = run("eval", samples, "--shards", dataset, "--metrics", "ssim,lpips", "--split", "train")
    assert result.exit_code == 0, result.output
    assert json.loads((samples / "metrics.json").read_text())["settings"]["weights"] == "pretrained"


def test_market_frame_adds_the_masked_metrics(tmp_path, fixtures_dir):
    """A Market-1501 tree (fixture photos at 128x64, annotated keypoints): PATN's mask-SSIM
    and GFLA's mask-LPIPS come by default, masked by the target's body."""
    root = tmp_path / "market"
    photos = sorted((fixtures_dir / "deepfashion").glob("*.[jp][pn]g"))
    names = {"bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg"], "bounding_box_test": ["0001_c1s1_001051_00.jpg", "0001_c5s1_001101_02.jpg", "0003_c1s1_000101_01.jpg"]}
    ys = [15, 28, 28, 45, 60, 28, 45, 60, 65, 90, 115, 65, 90, 115, 12, 12, 14, 14]
    xs = [32, 32, 22, 18, 16, 42, 46, 48, 26, 26, 26, 38, 38, 38, 29, 35, 26, 38]
    rows = []
    for (folder, files), offset in zip(names.items(), (0, 2)):
        (root / folder).mkdir(parents=True)
        for i, name in enumerate(files):
            Image.open(photos[offset + i]).convert("RGB").resize((64, 128), Image.Resampling.BICUBIC).save(root / folder / name)
            rows.append(f"{name}:{ys}:{xs}")
    (root / "market-annotation-test.csv").write_text("name:keypoints_y:keypoints_x\n" + "\n".join(rows[2:]) + "\n")
    out = tmp_path / "ds"
    result = run("build", "market1501", "--root", root, "--out", out, "--executor", "local", "--features", "keypoints_annotated")
    assert result.exit_code == 0, result.output

    images = {s["__key__"]: s["image"] for s in Dataset(str(out)).samples("test", pixels=True)}
    keys = sorted(images)
    samples = write_samples(tmp_path / "samples", [(keys[(i + 1) % 3], k, noisy(images[k], 15 * (i + 1), i)) for i, k in enumerate(keys)])
    result = run("eval", samples, "--shards", out, "--protocol", "patn", "--weights", "random")
    assert result.exit_code == 0, result.output
    report = json.loads((samples / "metrics.json").read_text())
    assert list(report["metrics"]) == ["is", "ssim", "mask_is", "mask_ssim"]
    # off the body both images are zeroed, so masking raises SSIM
    assert report["metrics"]["ssim"] < report["metrics"]["mask_ssim"] < 1
    # three images cannot fill PATN's 10 splits: no number, a note saying why
    assert report["metrics"]["is"] is None and report["counted"]["is"] == 3
    assert any(n.startswith("is: needs at least 10 images") for n in report["notes"])
    result = run("eval", samples, "--shards", out, "--protocol", "gfla", "--metrics", "lpips,mask_lpips", "--weights", "random")
    assert result.exit_code == 0, result.output
    report = json.loads((samples / "metrics.json").read_text())
    assert 0 < report["metrics"]["mask_lpips"] < report["metrics"]["lpips"]


def test_eval_reads_what_posedata_sample_writes(tmp_path, fixtures_dir):
    """The real chain: build, train pcdm-refine (tiny, 2 steps), `posedata sample pcdm`, then
    `posedata eval` on its output folder."""
    ds, refine, out = tmp_path / "ds", tmp_path / "refine", tmp_path / "samples"
    result = run("build", "folder", "--root", fixtures_dir / "deepfashion", "--out", ds, "--res", "64x48", "--weights", "tiny", "--executor", "local", "--features", "openpose,vae:sd21,dinov2:giant")
    assert result.exit_code == 0, result.output
    result = run("train", "pcdm-refine", "--shards", ds, "--out", refine, "--weights", "tiny", "--max-steps", 2, "--batch-size", 2, "--warmup-steps", 0)
    assert result.exit_code == 0, result.output
    result = run("sample", "pcdm", "--shards", ds, "--split", "train", "--refine", refine, "--out", out, "-n", 3, "--steps", 2)
    assert result.exit_code == 0, result.output
    assert (out / "samples.parquet").is_file(), "`posedata sample pcdm` must write samples.parquet (source_key, target_key, file)"
    result = run("extend", ds, "--features", "fid_ref:pcdms", "--weights", "random", "--executor", "local")
    assert result.exit_code == 0, result.output
    result = run("eval", out, "--shards", ds, "--weights", "random", "--split", "train")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "metrics.json").read_text())
    assert report["n_pairs"] == 3
    assert all(report["metrics"][m] is not None and np.isfinite(report["metrics"][m]) for m in ("ssim", "psnr", "lpips", "fid"))
    assert (out / "metrics_sheet.png").is_file()


def test_patn_inception_scores_are_finite_and_mask_is_uses_mask_ssims_mask():
    """IS and mask-IS logits with random weights; mask-IS scores the generated files
    multiplied by the same body mask as mask-SSIM."""
    from posedata.eval import metrics as M
    from posedata.eval import run as eval_run
    from posedata.eval.networks import FidNetwork
    from posedata.eval.protocol import create_protocol

    proto = create_protocol("patn", (128, 64))
    measure = eval_run.PairMeasures(proto, ["is", "mask_is", "mask_ssim"], "random", 0, "cpu")
    rng = np.random.default_rng(0)
    files = [(rng.integers(0, 256, (128, 64, 3), dtype=np.uint8), rng.integers(0, 256, (128, 64, 3), dtype=np.uint8)) for _ in range(4)]
    ys = [15, 28, 28, 45, 60, 28, 45, 60, 65, 90, 115, 65, 90, 115, 12, 12, 14, 14]
    xs = [32, 32, 22, 18, 16, 42, 46, 48, 26, 26, 26, 38, 38, 38, 29, 35, 26, 38]
    targets = [{"image": t, "keypoints_annotated.keypoints": [[x + i, y, 1.0] for x, y in zip(xs, ys)]} for i, (_, t) in enumerate(files)]
    masks = measure.masks(files, targets)
    logits = measure.class_logits(files, masks, ["is", "mask_is"])
    assert logits["is"].shape == (4, 1008) and np.isfinite(logits["is"]).all()
    # the reference: the files masked by hand with the masks mask-SSIM uses, through the TF Inception
    net = FidNetwork("tf", "random", seed=0)
    by_hand = net.class_logits(net.features([(g * m[..., None]).astype(np.float32) / 255 for (g, _), m in zip(files, masks)]))
    np.testing.assert_allclose(logits["mask_is"], by_hand, rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits["mask_is"], logits["is"])
    for name in ("is", "mask_is"):
        score, spread = M.inception_score(logits[name], splits=2)
        assert np.isfinite(score) and 1.0 <= score <= 2.0 and np.isfinite(spread)


def test_patn_default_run_reports_a_finite_inception_score(dataset, tmp_path):
    """PATN's default metrics on DeepFashion are IS and SSIM: ten generated images (PATN's
    ten splits, one image each) with random weights give a finite score of at least 1."""
    images = stored_images(dataset)
    keys = sorted(images)
    pairs = [(source, target, noisy(images[target], 10, i)) for i, (source, target) in enumerate((s, t) for s in keys for t in keys if s != t)][:10]
    samples = write_samples(tmp_path / "samples", pairs)
    result = run("eval", samples, "--shards", dataset, "--protocol", "patn", "--weights", "random", "--split", "train")
    assert result.exit_code == 0, result.output
    report = json.loads((samples / "metrics.json").read_text())
    assert list(report["metrics"]) == ["is", "ssim"] and report["counted"]["is"] == 10
    assert np.isfinite(report["metrics"]["is"]) and report["metrics"]["is"] >= 1.0
    assert any(n.startswith("is: mean of 10 splits, std 0.0000") for n in report["notes"])  # one image a split: KL 0
    assert "10 splits" in report["settings"]["inception_score"]
