"""Where everything lives inside a dataset (DESIGN.md §3), on any fsspec filesystem.

```
<root>/dataset.json  manifest.parquet  rejects.parquet  pairs/<split>.parquet
<root>/shards/<split>-000000.tar                     base shards: <key>.jpg, <key>.json
<root>/features/<name>@<fp>/<split>-000000.tar       one sidecar per feature, same keys/order
<root>/features/<name>@<fp>/null.<output>.npy        null embeddings (for CFG dropout)
<root>/_done/shards/<split>-000000.parquet           per-shard manifest + rejects, written last
<root>/_done/scan.parquet                            rejects found while scanning the source
```

Objects are written whole under their final name only once complete: on local disk through
a temporary name and a rename, on object stores by a single PUT (an object is invisible to
readers until its upload completes), so a reader never sees a partial file.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

CARD = "dataset.json"
MANIFEST = "manifest.parquet"
REJECTS = "rejects.parquet"
DONE = "_done"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}"


@dataclass
class DatasetLocation:
    """A dataset root on some filesystem. `url` is what the user typed (a path, file://,
    s3://, gs://, memory://); `storage_options` go to fsspec (endpoint, credentials)."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = self.root.rstrip("/")
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    # ---- paths ---------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def base_shard(self, shard: str) -> str:
        return self.path("shards", f"{shard}.tar")

    def feature_dir(self, folder: str) -> str:
        return self.path("features", folder)

    def sidecar(self, folder: str, shard: str) -> str:
        return self.path("features", folder, f"{shard}.tar")

    def null_embedding(self, folder: str, output: str) -> str:
        return self.path("features", folder, f"null.{output}.npy")

    def done_marker(self, shard: str) -> str:
        return self.path(DONE, "shards", f"{shard}.parquet")

    def url_of(self, path: str) -> str:
        """A URL another process (a Ray worker, webdataset) can open."""
        return self.fs.unstrip_protocol(path)

    # ---- I/O -----------------------------------------------------------------------------

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open(path, "rb") as f:
            return f.read()

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write `data` so that `path` appears complete or not at all."""
        parent = posixpath.dirname(path)
        if self.is_local:
            self.fs.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_bytes(path))

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def write_parquet(self, path: str, table) -> None:
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(path, buf.getvalue())

    def read_parquet(self, path: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Read from arrow-owned memory with the synchronous ParquetFile reader. Reading from
        # a Python buffer, arrow's I/O threads may release it (taking the GIL) while the
        # interpreter shuts down, which aborts the process ("terminate called without an
        # active exception"). Our tables are small.
        data = self.read_bytes(path)
        buffer = pa.allocate_buffer(len(data))
        np.frombuffer(buffer, dtype=np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
        return pq.ParquetFile(pa.BufferReader(buffer), pre_buffer=False).read(use_threads=False)

    def glob(self, pattern: str) -> list[str]:
        return sorted(self.fs.glob(self.path(pattern)))

    def remove_tree(self) -> None:
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    def card(self) -> dict[str, Any]:
        path = self.path(CARD)
        if not self.exists(path):
            raise FileNotFoundError(f"{self.url}: no {CARD} here; is this a posedata dataset (made by `posedata build`)?")
        return self.read_json(path)
