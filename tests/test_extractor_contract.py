"""The contract every registered extractor keeps (diffusers' tester-mixin pattern): a new
extractor is tested by registering it in posedata.extractors.REGISTRY.

In tiny mode, on real fixture photos at a small stored resolution: a batch gives what the
same images give one by one, two extractors built with the same seed give the same outputs,
an encoder's null embedding is finite and repeatable, and the fingerprint depends only on
the settings (the same in another interpreter; another resolution, dtype or weights mode
gives another)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from posedata.extractors import REGISTRY, create_extractor, extractor_class
from posedata.extractors.base import Sample, fingerprint

RES = (64, 48)  # (H, W)


def make(name: str, **kw):
    args = {"weights": "tiny", "resolution": RES, "dtype": "fp32", "seed": 0, **kw}
    return create_extractor(name, **args)


@pytest.fixture(scope="module")
def images(fixtures_dir) -> list[np.ndarray]:
    paths = sorted(p for p in (fixtures_dir / "deepfashion").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:3]
    assert len(paths) == 3
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB").resize((RES[1], RES[0]), Image.BICUBIC)))
    return out


def samples_for(name: str, images: list[np.ndarray]) -> list[Sample]:
    """Samples with the outputs of every feature `name` requires (computed by those
    extractors, as the build does)."""
    samples = [Sample(key=f"k{i}", image=im, annotations={}, original_size=RES) for i, im in enumerate(images)]
    for dep in extractor_class(name).requires:
        extractor = make(dep)
        extractor.setup("cpu")
        for sample, out in zip(samples, extractor(samples_for(dep, images))):
            sample[dep] = {k: v for k, v in out.items() if not k.startswith("__")}
    return samples


def assert_same(a: dict, b: dict, exact: bool, where: str) -> None:
    keys_a, keys_b = {k for k in a if not k.startswith("__")}, {k for k in b if not k.startswith("__")}
    assert keys_a == keys_b, where
    for k in keys_a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.shape == y.shape and x.dtype == y.dtype, (where, k)
        if exact or not np.issubdtype(x.dtype, np.floating):
            assert np.array_equal(x, y), (where, k)
        else:  # some CPU kernels change their low bits with the batch size
            assert np.allclose(x, y, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(x).max()))), (where, k)


@pytest.fixture(scope="module", params=sorted(REGISTRY))
def extracted(request, images):
    """(name, extractor, samples, batched outputs)."""
    name = request.param
    extractor = make(name)
    extractor.setup("cpu")
    samples = samples_for(name, images)
    return name, extractor, samples, extractor(samples)


def test_outputs_match_the_declared_suffixes(extracted):
    name, extractor, samples, outputs = extracted
    assert len(outputs) == len(samples)
    declared = {spec.suffix for spec in extractor.outputs().values()}
    for out in outputs:
        assert {k for k in out if not k.startswith("__")} <= declared, name


def test_batched_equals_one_by_one(extracted):
    """Up to floating-point noise. Keypoints are decisions at a threshold: with tiny random
    weights (flat heatmaps) the low bits a batch changes can flip one joint, and with it
    whatever is drawn from the keypoints; such a sample is allowed, one in three at most."""
    name, extractor, samples, outputs = extracted
    flipped = 0
    for sample, batched in zip(samples, outputs):
        (alone,) = extractor([sample])
        if "keypoints.npy" in batched and not np.allclose(batched["keypoints.npy"], alone["keypoints.npy"], atol=1e-3):
            flipped += 1
            continue
        assert_same(batched, alone, exact=False, where=f"{name} {sample['key']}")
    assert flipped <= 1, name


def test_seeded_init_gives_the_same_outputs(extracted):
    name, _, samples, outputs = extracted
    again = make(name)
    again.setup("cpu")
    for a, b in zip(outputs, again(samples)):
        assert_same(a, b, exact=True, where=name)


def test_null_embedding_is_finite_and_repeatable(extracted):
    name, extractor, _, _ = extracted
    null = extractor.null_embedding()
    if null is None:
        pytest.skip(f"{name} is not an embedding (no null)")
    again = make(name)
    again.setup("cpu")
    other = again.null_embedding()
    assert null and set(null) == set(other)
    for k, v in null.items():
        assert np.isfinite(np.asarray(v, np.float64)).all(), (name, k)
        assert np.array_equal(v, other[k]), (name, k)


def fingerprint_elsewhere(name: str) -> str:
    code = ("import json; from posedata.extractors import create_extractor; "
            f"print(create_extractor({name!r}, weights='tiny', resolution={RES!r}, dtype='fp32', seed=0).fingerprint())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300,
                          env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_fingerprint_depends_on_the_settings_only(name):
    extractor = make(name)
    fp, inputs = extractor.fingerprint(), extractor.fingerprint_inputs()
    assert fp == make(name).fingerprint() and len(fp) == 12 and extractor.folder == f"{extractor.name}@{fp}"
    assert fp == fingerprint(inputs) and json.dumps(inputs, sort_keys=True, default=str)  # the hash of JSON-ready inputs
    assert {"feature", "code_version", "model", "resolution", "dtype"} <= set(inputs) and inputs["resolution"] == list(RES)
    assert fingerprint_elsewhere(name) == fp  # no per-interpreter state (hash salt, ids) in it
    assert make(name, resolution=(128, 96)).fingerprint() != fp
