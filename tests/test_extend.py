"""`posedata extend`: new sidecars, nothing existing touched, no-ops said, concurrent
extenders both recorded, fingerprints that change when (and only when) a setting does."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from posedata.cli import main as cli
from posedata.extend import ExtendConfig, ExtendError, extend, record_features
from posedata.extractors import create_extractor
from posedata.layout import DatasetLocation
from posedata.reader import Dataset


def run(*args: str):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


def digests(root: Path, skip: set[str] = frozenset()) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


@pytest.fixture(scope="module")
def built(tmp_path_factory, fixtures_dir) -> Path:
    out = tmp_path_factory.mktemp("extend") / "ds"
    result = run("build", "folder", "--root", str(fixtures_dir / "deepfashion"), "--out", str(out), "--res", "64x48", "--weights", "tiny", "--executor", "local", "--features", "openpose,clip", "--shard-size", "3")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def dataset(built, tmp_path) -> Path:
    copy = tmp_path / "ds"
    shutil.copytree(built, copy)
    return copy


def test_extend_adds_sidecars_and_touches_nothing_that_exists(dataset):
    # dataset.json and the dataset card README.md made from it are the only files rewritten
    before = digests(dataset, skip={"dataset.json", "README.md"})
    result = run("extend", str(dataset), "--features", "clip_regions,vae:sd15", "--weights", "tiny", "--executor", "local")
    assert result.exit_code == 0, result.output

    after = digests(dataset, skip={"dataset.json", "README.md"})
    assert {k: after[k] for k in before} == before, "an existing file changed"
    added = set(after) - set(before)
    assert all(p.startswith(("features/", "meta/features/", "_done/features/")) for p in added), added
    card = json.loads((dataset / "dataset.json").read_text())
    specs = sorted(f["spec"] for f in card["features"].values())
    # clip_regions needs parsing, which the dataset lacked: it was added too, first.
    assert specs == ["clip", "clip_regions", "openpose", "parsing", "vae:sd15"]
    ds = Dataset(str(dataset))
    shards = ds.shards("train")
    for folder in card["features"]:
        assert sorted(p.stem for p in (dataset / "features" / folder).glob("*.tar")) == shards
    sample = next(ds.samples("train", ["vae:sd15", "clip_regions", "clip"]))
    assert sample["vae.mean"].shape == (4, 8, 6) and sample["vae.mean"].dtype == np.float16
    assert sample["clip_regions.embeds"].shape[0] == len(sample["clip_regions.classes"])
    folder = ds.column("vae:sd15").folder
    assert (dataset / "meta" / "features" / folder / "null.black_mean.npy").is_file()
    assert (dataset / "meta" / "features" / folder / "train.wids.json").is_file()
    assert f"features/{folder}/train-*.tar" in (dataset / "README.md").read_text()  # a config in the dataset card


def test_extend_with_a_fingerprint_already_there_is_a_noop_that_says_so(dataset):
    before = digests(dataset)
    result = run("extend", str(dataset), "--features", "clip", "--weights", "tiny", "--executor", "local")
    assert result.exit_code == 0, result.output
    assert "already there" in result.output and "nothing to do" in result.output
    assert digests(dataset) == before


def test_extend_reuses_a_dependency_the_dataset_has(dataset):
    assert run("extend", str(dataset), "--features", "parsing", "--weights", "tiny", "--executor", "local").exit_code == 0
    parsing_files = digests(dataset / "features")
    result = run("extend", str(dataset), "--features", "clip_regions", "--weights", "tiny", "--executor", "local")
    assert result.exit_code == 0, result.output
    assert "added clip_regions -> " in result.output and "parsing -> " not in result.output  # only clip_regions computed
    after = digests(dataset / "features")
    assert {k: after[k] for k in parsing_files} == parsing_files


def test_annotation_features_cannot_be_extended(dataset):
    with pytest.raises(ExtendError, match="annotations"):
        extend(ExtendConfig(str(dataset), ["keypoints_annotated"], weights="tiny", executor="local"), echo=lambda _: None)


def test_two_teams_extending_at_once_both_end_up_in_the_card(dataset):
    errors = []

    def team(spec: str) -> None:
        try:
            extend(ExtendConfig(str(dataset), [spec], weights="tiny", executor="local"), echo=lambda _: None)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=team, args=(s,)) for s in ("vae:sd21", "dinov2:base")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    specs = {f["spec"] for f in json.loads((dataset / "dataset.json").read_text())["features"].values()}
    assert {"vae:sd21", "dinov2:base"} <= specs


def test_a_card_written_by_a_stale_writer_is_repaired(dataset):
    """The race itself: team B writes a card from before team A's feature was recorded.
    The merge loop (run by every extender after it writes) puts A's feature back."""
    assert run("extend", str(dataset), "--features", "dinov2:base", "--weights", "tiny", "--executor", "local").exit_code == 0
    location = DatasetLocation(str(dataset))
    card = json.loads((dataset / "dataset.json").read_text())
    stale = dict(card, features={k: v for k, v in card["features"].items() if not k.startswith("dinov2@")})
    location.write_json(location.path("dataset.json"), stale)
    repaired = record_features(location)
    assert any(k.startswith("dinov2@") for k in repaired["features"])


def test_fingerprints_change_when_and_only_when_a_recorded_setting_does():
    def fp(spec="vae:sd21", **kw):
        settings = dict(weights="tiny", resolution=(64, 48), dtype="fp16", seed=0) | kw
        return create_extractor(spec, **settings).fingerprint()

    base = fp()
    assert fp() == base  # same settings, same folder
    for changed in (fp("vae:sd15"), fp(resolution=(128, 96)), fp(dtype="fp8"), fp(dtype="bf16"), fp(weights="random"), fp(seed=1), fp(flip=True)):
        assert changed != base
    # settings that do not change the output do not change the folder
    assert create_extractor("clip", weights="tiny", resolution=(64, 48), dtype="fp16").fingerprint() == create_extractor("clip", weights="tiny", resolution=(64, 48), dtype="fp16", seed=0).fingerprint()
    regions = [create_extractor("clip_regions", weights="tiny", resolution=(64, 48), upstream={"parsing": f}).fingerprint() for f in ("parsing@aaa", "parsing@bbb")]
    assert regions[0] != regions[1]  # regions cut from another parser's maps live elsewhere
