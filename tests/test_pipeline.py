"""The shared job machinery: an extractor failing on one image rejects that image only;
micro-batches are fixed by the plan; the CPU budget leaves room for decode and write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from posedata import extractors
from posedata.cli import main as cli
from posedata.extractors.base import Extractor, ExtractorError, OutputSpec
from posedata.pipeline import cpu_budget, micro_batches


class BrightnessExtractor(Extractor):
    """Mean brightness; refuses images whose key contains 'img7' (a stand-in for a model
    that fails on one input)."""

    name = "brightness"
    default_model = "none"

    def outputs(self):
        return {"mean": OutputSpec("mean.npy", "float32", (1,))}

    def __call__(self, batch):
        out = []
        for sample in batch:
            if "img7" in sample["key"]:
                raise ExtractorError("cannot handle this image")
            out.append({"mean.npy": np.array([sample["image"].mean()], np.float32)})
        return out


def test_an_extractor_failing_on_one_image_rejects_only_that_image(tmp_path: Path, fixtures_dir: Path, monkeypatch):
    monkeypatch.setitem(extractors.REGISTRY, "brightness", f"{__name__}:BrightnessExtractor")
    out = tmp_path / "ds"
    result = CliRunner().invoke(cli, ["build", "folder", "--root", str(fixtures_dir / "deepfashion"), "--out", str(out), "--res", "64x48", "--weights", "tiny", "--executor", "local", "--features", "brightness,clip"])
    assert result.exit_code == 0, result.output
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert [(r["key"], r["stage"], r["reason"]) for r in rejects] == [("pcdms_img7_750x1101", "extract", "brightness failed: cannot handle this image")]
    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.num_rows == 4 and "pcdms_img7_750x1101" not in manifest["key"].to_pylist()
    card = json.loads((out / "dataset.json").read_text())
    assert card["counts"] == {"inputs": 5, "written": 4, "rejected": 1}


def test_micro_batches_are_fixed_by_shard_and_index():
    rows = [{"shard": s, "index": i} for s in ("train-000001", "train-000000") for i in range(70)]
    groups = micro_batches(list(reversed(rows)), 32)
    assert [(g[0]["shard"], g[0]["index"], len(g)) for g in groups] == [
        ("train-000000", 0, 32), ("train-000000", 32, 32), ("train-000000", 64, 6),
        ("train-000001", 0, 32), ("train-000001", 32, 32), ("train-000001", 64, 6),
    ]


@pytest.mark.parametrize("cpus", [1, 2, 4, 16])
@pytest.mark.parametrize("stages", [[True], [True, True, False], [True] * 8 + [False]])
def test_cpu_actors_always_leave_room_for_a_decode_and_a_write_task(cpus, stages):
    shares = cpu_budget(cpus, stages, actors_per_stage=1)
    assert all(s > 0 for s in shares)
    if cpus >= 2:
        assert sum(shares) + 2 * 0.5 <= cpus + 1e-9
