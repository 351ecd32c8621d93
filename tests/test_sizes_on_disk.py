"""The bytes-per-sample table (README, bench/storage_dtypes.py) against real files: a sidecar
is exactly 512-byte tar headers plus each .npy member padded to 512 (fp8: the bits and the
scale are two members), plus the end of the archive."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest

from posedata.reader import Dataset
from posedata.storage import member_nbytes

BLOCK = 512


def padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp8"])
def test_sidecar_bytes_match_the_formula(tiny_dataset, dtype: str):
    out = tiny_dataset(features="clip,vae:sd21", dtype=dtype)
    ds = Dataset(str(out))
    n = ds.card["counts"]["written"]
    for spec, shape_of in (("clip", lambda s: tuple(s["clip.embeds"].shape)), ("vae:sd21", lambda s: tuple(s["vae.mean"].shape))):
        column = ds.column(spec)
        sample = next(ds.samples("train", [spec]))
        outputs = list(column.suffixes)
        sizes = member_nbytes(shape_of(sample), dtype) * len(outputs)  # the members of one sample
        per_sample = sum(BLOCK + padded(size) for size in sizes)
        tar = out / "features" / column.folder / "train-000000.tar"
        with tarfile.open(tar) as t:
            assert len(t.getmembers()) == n * len(sizes)
            # the members' own sizes equal the formula's .npy sizes
            assert sorted(m.size for m in t.getmembers()) == sorted(sizes * n)
        archive_end = tar.stat().st_size - n * per_sample
        assert 2 * BLOCK <= archive_end <= 20 * BLOCK, (spec, dtype, tar.stat().st_size, n * per_sample)
        assert str(np.asarray(sample[f"{column.alias}.{outputs[0].rsplit('.', 1)[0]}"]).dtype) == ("float16" if dtype == "fp16" else "float32")
