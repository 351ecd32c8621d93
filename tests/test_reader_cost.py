"""What keeps the reader's cost per sample down, and that it changes nothing a plugin sees:
.npy headers parsed once (`shards.load_npy` equals np.load), only the outputs a plugin
`reads` decoded, and a stream's shards read once while they fit its cache (members kept as
bytes, decoded afresh each epoch)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import posedata.reader
from posedata.cli import main as cli_main
from posedata.reader import Dataset, PairStream
from posedata.shards import load_npy
from posedata.train import plugin_class
from posedata.train.run import batches_factory, load_null_embeddings


def saved(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


ARRAYS = [
    np.arange(12, dtype=np.float16).reshape(3, 4),
    np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
    np.zeros((0, 4), np.uint8),
    np.array(3.5, np.float32),
    np.array((7, 0.25), dtype=[("bits", "u1"), ("scale", "<f4")]),  # format 1's packed fp8 record
    np.arange(5, dtype=">i4"),
]


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{a.shape}{'F' if a.flags.f_contiguous and a.ndim > 1 else ''}")
def test_load_npy_equals_np_load_every_time(array):
    data = saved(array)
    for _ in range(3):  # the first parses the header with np.load, the next ones reuse it
        loaded, expected = load_npy(data), np.load(io.BytesIO(data), allow_pickle=False)
        assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
        assert loaded.tobytes() == expected.tobytes() and loaded.flags.writeable
        assert loaded.flags.f_contiguous == expected.flags.f_contiguous


def test_load_npy_refuses_what_np_load_refuses():
    with pytest.raises(ValueError):
        load_npy(saved(np.array([{"a": 1}], dtype=object)))
    data = saved(np.arange(100, dtype=np.float32))
    load_npy(data)  # header known
    with pytest.raises(ValueError):
        load_npy(data[:-8])  # truncated


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, fixtures_dir) -> Path:
    out = tmp_path_factory.mktemp("cost") / "ds"
    args = ["build", "folder", "--root", str(fixtures_dir / "deepfashion"), "--out", str(out), "--res", "64x48", "--weights", "tiny",
            "--features", "openpose,clip", "--executor", "local"]
    result = CliRunner().invoke(cli_main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def items(stream: PairStream, n: int) -> list[dict]:
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_reads_decode_only_the_named_outputs_and_the_same_values(dataset):
    ds = Dataset(str(dataset))
    needs = ("clip", ("openpose", "keypoints_annotated"))
    whole = items(PairStream(ds, "train", needs, seed=3), 12)
    some = items(PairStream(ds, "train", needs, seed=3, reads={"openpose": ("keypoints", "hands")}), 12)
    for a, b in zip(whole, some):
        for side in ("source", "target"):
            assert "openpose.skeleton" in a[side] and "openpose.skeleton" not in b[side]
            assert set(b[side]) == set(a[side]) - {"openpose.skeleton"}
            for key in b[side]:
                assert np.array_equal(np.asarray(a[side][key]), np.asarray(b[side][key])), key


def test_a_cached_stream_reads_each_tar_once_and_yields_what_an_uncached_one_does(dataset, monkeypatch):
    ds = Dataset(str(dataset))
    needs = ("clip", ("openpose", "keypoints_annotated"))
    opened = []
    original = posedata.reader._tar_samples

    def counting(location, path):
        opened.append(path)
        return original(location, path)

    monkeypatch.setattr(posedata.reader, "_tar_samples", counting)
    uncached = PairStream(ds, "train", needs, seed=1, cache_bytes=0)
    n = 3 * len(uncached)  # three epochs
    expected = items(uncached, n)
    reads_uncached = len(opened)
    opened.clear()
    cached = PairStream(ds, "train", needs, seed=1)
    got = items(cached, n)
    assert reads_uncached == 3 * len(set(opened)) and len(opened) == len(set(opened))  # once, not every epoch
    for a, b in zip(expected, got):
        for side in ("source", "target"):
            assert a[side]["__key__"] == b[side]["__key__"]
            assert all(np.array_equal(np.asarray(a[side][k]), np.asarray(b[side][k])) for k in a[side])
    # a consumer writing into an array does not reach the next epoch: members are kept as bytes
    first = got[0]["source"]["clip.embeds"]
    first[...] = 0
    again = [x for x in items(cached, n) if x["source"]["__key__"] == got[0]["source"]["__key__"]]
    assert np.array_equal(np.asarray(again[0]["source"]["clip.embeds"]), np.asarray(expected[0]["source"]["clip.embeds"]))


def test_the_prior_trains_on_the_same_batches_with_its_reads(dataset, monkeypatch):
    ds = Dataset(str(dataset))
    plugin = plugin_class("pcdm-prior")(ds.card, weights="tiny")
    plugin.set_null_embeddings(load_null_embeddings(ds, plugin))
    assert plugin.reads == {"openpose": ("keypoints",)}
    with_reads = [next(it) for it in [batches_factory(ds, plugin, "train", 4, 0)(0, 0)] for _ in range(6)]
    monkeypatch.setattr(type(plugin), "reads", None)
    whole = [next(it) for it in [batches_factory(ds, plugin, "train", 4, 0)(0, 0)] for _ in range(6)]
    for a, b in zip(with_reads, whole):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
