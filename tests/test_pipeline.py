"""The shared job machinery: an extractor failing on one image rejects that image only;
micro-batches are fixed by the plan; the CPU budget leaves room for decode and write; the
Ray workers (each holding every model) fill each GPU without stranding one (checked by
placing them as Ray does, and by a Ray build on a Ray that advertises a GPU this machine
does not have); posedata's own progress lines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from posedata import extractors
from posedata.cli import main as cli
from posedata.extractors.base import Extractor, ExtractorError, OutputSpec
from posedata.pipeline import TASK_CPUS, Progress, micro_batches, worker_request


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
@pytest.mark.parametrize("workers", [None, 1, 2, 3])
def test_cpu_workers_always_leave_room_for_a_decode_and_a_write_task(cpus, workers):
    request = worker_request(cpus, 0, workers)
    assert request.count == (workers or 1) and request.num_cpus > 0 and request.num_gpus == 0
    if cpus >= 2:
        assert request.count * request.num_cpus + 2 * TASK_CPUS <= cpus + 1e-9


def place_first_fit(share: float, count: int, gpus: int) -> list[float]:
    """Place `count` workers of `share` GPU each on the first GPU with room, as Ray's
    scheduler places fractional GPU requests; fails if one finds no room."""
    load = [0.0] * gpus
    for _ in range(count):
        gpu = next((g for g in range(gpus) if load[g] + share <= 1 + 1e-9), None)
        assert gpu is not None, f"no GPU has room for a worker of {share} GPU; loads {load}"
        load[gpu] += share
    return load


@pytest.mark.parametrize("gpus", [1, 2, 8])
@pytest.mark.parametrize("cpus", [2, 16, 64])
@pytest.mark.parametrize("workers", [None, 1, 2, 3])
def test_gpu_workers_fill_every_gpu_and_leave_cpus_for_decode(gpus, cpus, workers):
    request = worker_request(cpus, gpus, workers)
    per_gpu = workers or 1
    assert request.count == gpus * per_gpu and request.num_cpus > 0
    load = place_first_fit(request.num_gpus, request.count, gpus)
    assert all(load_ > 1 - 0.01 for load_ in load)  # every GPU busy, none over-booked
    assert request.count * request.num_cpus + 2 * TASK_CPUS <= cpus + 1e-9


def test_a_fraction_of_a_gpu_gets_its_workers():
    request = worker_request(4, 0.5, 2)
    assert request.count == 2 and request.num_gpus * 2 <= 0.5


def test_progress_lines_say_shards_images_rate_eta_and_rejects():
    lines: list[str] = []
    with Progress(lines.append, shards=4, images=100, interval=0.0) as progress:
        progress.batch_done(25)
        progress.shard_done({"written": 20, "rejected": 5})
    assert "1/4 shards written" in lines[-2] and "25/100 images" in lines[-2] and "ETA" in lines[-2] and "5 rejected so far" in lines[-2]
    assert "images/s" in lines[-1]


def test_ray_build_on_a_gpu_ray_equals_the_local_build(fixtures_dir, tmp_path, monkeypatch):
    """A Ray that advertises one GPU (this machine has none, so the worker runs its models on
    CPU): the worker holding four models takes the GPU, the build finishes, its progress
    is posedata's own lines (no Ray status blocks), and its files equal a local build's
    byte for byte."""
    import logging

    import ray

    import posedata.pipeline

    specs = "openpose,clip,vae:sd15,dinov2:base"
    args = ["--root", str(fixtures_dir / "deepfashion"), "--res", "64x48", "--weights", "tiny", "--features", specs]
    local = CliRunner().invoke(cli, ["build", "folder", *args, "--out", str(tmp_path / "local" / "ds"), "--executor", "local"])
    assert local.exit_code == 0, local.output

    requested = []
    original = posedata.pipeline.worker_request

    def spy(*a, **kwargs):
        requested.append(original(*a, **kwargs))
        return requested[-1]

    monkeypatch.setattr(posedata.pipeline, "worker_request", spy)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level=logging.WARNING)
    try:
        result = CliRunner().invoke(cli, ["build", "folder", *args, "--out", str(tmp_path / "ray" / "ds"), "--executor", "ray"])
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    (request,) = requested
    assert request.count == 1 and request.num_gpus == 1
    assert "ray: 2 CPUs, 1 GPUs; 1 worker (1 CPU, 1 GPU each), each holding openpose, clip, vae:sd15, dinov2:base" in result.output
    assert re.search(r"1/1 shards written, (\d+)/\1 images processed", result.output), result.output
    assert "Running Dataset" not in result.output and "INFO" not in result.output

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != "dataset.json"}

    assert files(tmp_path / "ray" / "ds") == files(tmp_path / "local" / "ds")  # same folder name: the card names it
