"""The contract every registered training plugin keeps (diffusers' tester-mixin pattern): a
new plugin is tested by registering it in posedata.train.REGISTRY.

On a tiny dataset built from the real fixtures with every feature the registered plugins
read, each plugin's tiny preset, with no hyper-parameter flags: the loss is finite and falls,
a checkpoint loads back through `from_pretrained` and through the plugin's own loading path,
a stopped and resumed run repeats the uninterrupted one, and `posedata sample PLUGIN` writes
samples.parquet and the same outputs twice."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from posedata.cli import main as cli
from posedata.reader import Dataset
from posedata.train import REGISTRY, plugin_class
from posedata.train.run import run_training
from posedata.train.sample import trained_with
from posedata.train.trainer import load_model_weights

RES = (128, 96)  # latents 16 x 12: room for every plugin's tiny model
STEPS, HALF = 16, 8


def feature_specs(name: str) -> list[str]:
    """The features a plugin reads (the first of interchangeable names)."""
    return list(dict.fromkeys(need if isinstance(need, str) else need[0] for need in plugin_class(name).needs))


@pytest.fixture(scope="module")
def datasets(tiny_dataset):
    """A tiny dataset per feature set, built once (the PCDMs stages share one)."""
    return lambda name: tiny_dataset(res=RES, features=",".join(feature_specs(name)))


def losses(run: Path) -> list[float]:
    with open(run / "loss.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module", params=sorted(REGISTRY))
def trained(request, datasets, tmp_path_factory) -> tuple[str, Path, Path, Path]:
    """(plugin, its dataset, an uninterrupted run, the same run stopped half way and resumed)."""
    name = request.param
    dataset = datasets(name)
    root = tmp_path_factory.mktemp(name)
    kw = {"weights": "tiny", "checkpoint_every": HALF, "seed": 0}
    run_training(name, str(dataset), str(root / "full"), max_steps=STEPS, **kw)
    run_training(name, str(dataset), str(root / "split"), max_steps=HALF, **kw)
    run_training(name, str(dataset), str(root / "split"), max_steps=STEPS, resume="latest", **kw)
    return name, dataset, root / "full", root / "split"


def test_the_tiny_preset_learns_without_flags(trained):
    name, _, full, _ = trained
    curve = losses(full)
    assert len(curve) == STEPS and all(np.isfinite(curve)), curve
    assert np.mean(curve[-4:]) < np.mean(curve[:4]), (name, curve)


def test_a_resumed_run_repeats_the_uninterrupted_one(trained):
    _, _, full, split = trained
    assert losses(split) == pytest.approx(losses(full), rel=1e-5)
    a, b = load_model_weights(full / f"checkpoint-{STEPS}" / "model"), load_model_weights(split / f"checkpoint-{STEPS}" / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_a_checkpoint_loads_back(trained):
    name, dataset, full, _ = trained
    ckpt = full / f"checkpoint-{STEPS}"
    saved = load_model_weights(ckpt / "model")
    card = Dataset(str(dataset)).card
    plugin = plugin_class(name)(card, weights="pretrained", model=str(ckpt), **trained_with(str(ckpt)))
    assert plugin.preset_name == "tiny"  # the run's preset, from its config.json
    model = plugin.build_model()
    direct = type(model).from_pretrained(ckpt / "model")
    for loaded in (model, direct):
        state = loaded.state_dict()
        assert set(state) == set(saved)
        assert all(torch.equal(state[k], v) for k, v in saved.items())


def test_sampling_writes_the_table_and_repeats(trained, tmp_path):
    name, dataset, full, _ = trained
    outs = []
    for i in range(2):
        out = tmp_path / f"s{i}"
        result = CliRunner().invoke(cli, ["sample", name, "--shards", str(dataset), "--split", "train", "--run", str(full), "--out", str(out),
                                          "-n", "2", "--steps", "2"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outs.append(out)
    table = pq.read_table(outs[0] / "samples.parquet").to_pylist()
    assert len(table) >= 2 and {"source_key", "target_key", "file"} <= set(table[0])
    for row in table:
        first, second = outs[0] / row["file"], outs[1] / row["file"]
        assert first.is_file() and first.read_bytes() == second.read_bytes(), row["file"]
    assert (outs[0] / "sheet.png").is_file()
