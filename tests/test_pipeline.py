"""The shared job machinery: an extractor failing on one image rejects that image only;
micro-batches are fixed by the plan; the CPU budget leaves room for decode and write; actor
pools on GPUs fit side by side (checked by placing them as Ray does, and by a Ray build on a
Ray that advertises a GPU this machine does not have)."""

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
from posedata.extractors import DEFAULT_FEATURES, dependency_order, extractor_class
from posedata.pipeline import TASK_CPUS, actor_requests, cpu_budget, micro_batches


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
    extract_rejects = [(r["key"], r["stage"], r["reason"]) for r in rejects if r["stage"] == "extract"]
    assert extract_rejects == [("pcdms_img7_750x1101", "extract", "brightness failed: cannot handle this image")]
    assert [r["key"] for r in rejects if r["stage"] != "extract"] == ["train"]  # train.lst: not an image
    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.num_rows == 4 and "pcdms_img7_750x1101" not in manifest["key"].to_pylist()
    card = json.loads((out / "dataset.json").read_text())
    assert card["counts"] == {"inputs": 6, "written": 4, "rejected": 2}


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


def place_first_fit(requests, gpus: int) -> list[float]:
    """Place every actor, pool after pool, on the first GPU with room for its share, as Ray's
    scheduler places fractional GPU requests; fails if one finds no room."""
    load = [0.0] * gpus
    for r in requests:
        for _ in range(r.pool_size if r.num_gpus else 0):
            gpu = next((g for g in range(gpus) if load[g] + r.num_gpus <= 1 + 1e-9), None)
            assert gpu is not None, f"no GPU has room for an actor of {r.num_gpus} GPU; loads {load}"
            load[gpu] += r.num_gpus
    return load


FULL_SET = dependency_order(list(DEFAULT_FEATURES)) + ["keypoints_annotated"]


@pytest.mark.parametrize("gpus", [1, 2, 8])
@pytest.mark.parametrize("cpus", [2, 16, 64])
@pytest.mark.parametrize("specs", [FULL_SET, ["openpose"], ["openpose", "keypoints_annotated"], ["dinov2:giant", "vae:sd21"]], ids=["full", "openpose", "openpose+annotated", "dinov2+vae"])
def test_gpu_actor_pools_fit_side_by_side(specs, cpus, gpus):
    classes = [extractor_class(s) for s in specs]
    requests = actor_requests(classes, cpus, gpus, workers=1)
    for cls, r in zip(classes, requests):
        assert r.pool_size >= 1 and r.num_cpus > 0
        if cls.uses_model:
            # every model gets an actor on every GPU, with a GPU share in proportion to its weight
            assert r.num_gpus > 0 and r.pool_size >= gpus
        else:
            assert r.num_gpus == 0
    place_first_fit(requests, gpus)  # whatever order the pools start in
    place_first_fit(list(reversed(requests)), gpus)
    assert sum(r.num_cpus * r.pool_size for r in requests) + 2 * TASK_CPUS <= cpus + 1e-9


def test_a_single_small_model_gets_several_actors_per_gpu():
    (request,) = actor_requests([extractor_class("openpose")], cpus=16, gpus=1, workers=1)
    assert request.pool_size >= 2 and request.pool_size * request.num_gpus <= 1


def test_ray_build_on_a_gpu_ray_equals_the_local_build(fixtures_dir, tmp_path, monkeypatch):
    """A Ray that advertises one GPU (this machine has none, so the actors run their models on
    CPU): the GPU pools of four models whose shares add up to more than one GPU all start,
    the build finishes, and its files equal a local build's byte for byte."""
    import logging

    import ray

    specs = "openpose,clip,vae:sd15,dinov2:base"
    args = ["--root", str(fixtures_dir / "deepfashion"), "--res", "64x48", "--weights", "tiny", "--features", specs]
    local = CliRunner().invoke(cli, ["build", "folder", *args, "--out", str(tmp_path / "local"), "--executor", "local"])
    assert local.exit_code == 0, local.output

    requested = []
    original = ray.data.Dataset.map_batches

    def spy(self, fn, *a, **kwargs):
        if isinstance(fn, type):
            requested.append((kwargs.get("num_gpus", 0), kwargs["compute"].max_size))
        return original(self, fn, *a, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", spy)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level=logging.WARNING)
    try:
        result = CliRunner().invoke(cli, ["build", "folder", *args, "--out", str(tmp_path / "ray"), "--executor", "ray"])
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    assert len(requested) == 4 and all(g > 0 for g, _ in requested)
    assert sum(g * n for g, n in requested) <= 1

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != "dataset.json"}

    assert files(tmp_path / "ray") == files(tmp_path / "local")
