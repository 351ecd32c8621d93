"""Where everything lives inside a dataset (docs/design.md §3), on any fsspec filesystem.

Format 2 (this version) keeps only shards in the folders users point tools at (`shards/`,
`features/<name>@<fp>/`: Ray Data and HF `datasets` read every file of a folder as a shard);
everything else about a folder lives under `meta/`:

```
<root>/README.md                                     dataset card for HF `datasets` / the Hub
<root>/dataset.json  manifest.parquet  rejects.parquet  pairs/<split>.parquet
<root>/shards/<split>-000000.tar                     base shards: <key>.jpg, <key>.json
<root>/features/<name>@<fp>/<split>-000000.tar       one sidecar per feature, same keys/order
<root>/meta/shards/<split>.wids.json                 wids shard index (URLs relative to it)
<root>/meta/features/<name>@<fp>/feature.json        the feature's card
<root>/meta/features/<name>@<fp>/null.<output>.npy   null embeddings (for CFG dropout)
<root>/meta/features/<name>@<fp>/<split>.wids.json   wids shard index of the sidecars
<root>/_done/shards/<split>-000000.parquet           per-shard manifest + rejects, written last
<root>/_done/scan.parquet                            rejects found while scanning the source
```

Format 1 kept `feature.json` and `null.*.npy` inside `features/<name>@<fp>/`; the `legacy_*`
paths find them there, and readers look in both places (new first).

Objects are written whole under their final name only once complete: on local disk through
a temporary name and a rename, on object stores by a single PUT (an object is invisible to
readers until its upload completes), so a reader never sees a partial file. s3fs's
`pipe_file` PUTs anything below 100 MiB in one request and switches to a multipart upload
above; a multipart upload that fails is aborted, and its parts never become an object.

**Transient failures** of an object store (a 5xx or throttling answer, a dropped or
timed-out connection, a body cut short) are retried here around whole operations, on top of
what the filesystem already retries per request (botocore: 5 attempts on 5xx and connection
errors; s3fs: 5 on connection errors and cut-short bodies; gcsfs: 6). Every `DatasetLocation`
read, write, existence check, listing and delete gets up to `posedata_retries` attempts (a
storage option, default `DEFAULT_ATTEMPTS`, taken out before the others go to fsspec), with
exponential backoff. That is safe because each operation is idempotent: a write PUTs the
whole object again under the same name, a read reads the whole object again. "Not found",
"access denied" and bad requests are never retried; local paths are not retried.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
import numpy as np

CARD = "dataset.json"
MANIFEST = "manifest.parquet"
REJECTS = "rejects.parquet"
DONE = "_done"
META = "meta"
FEATURE_CARD = "feature.json"
HUB_CARD = "README.md"
# dataset.json's format_version: 2 = shards-only folders, meta/, plain-numeric fp8 / bf16 members
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)

log = logging.getLogger("posedata.layout")

RETRIES_OPTION = "posedata_retries"  # storage option: attempts per operation (1: no retries)
DEFAULT_ATTEMPTS = 5
BACKOFF_SECONDS = 0.5  # before the 2nd attempt; doubles each time up to the cap; jittered
BACKOFF_CAP_SECONDS = 8.0

T = TypeVar("T")

_INHERITED_FILESYSTEMS: list = []  # see DatasetLocation.fs

# Exception classes (matched by name anywhere in the MRO, so that botocore, aiohttp, requests
# and gcsfs need not be importable) that mean "the connection failed or was cut: try again".
_TRANSIENT_TYPES = {
    "ConnectionError",  # builtin (resets, refused, broken pipe) and requests'
    "TimeoutError",
    "HTTPClientError",  # botocore: ConnectionClosedError, EndpointConnectionError, ReadTimeoutError, ...
    "ResponseStreamingError",
    "ResponseParserError",  # botocore: an answer cut off half-way through its XML
    "ClientPayloadError",  # aiohttp: body cut short
    "ClientConnectionError",  # aiohttp: ServerDisconnectedError, ClientOSError, ...
    "ServerTimeoutError",
    "IncompleteRead",  # http.client, urllib3
    "ProtocolError",
    "ChunkedEncodingError",
    "FSTimeoutError",  # fsspec
    "ChecksumError",  # gcsfs: the body did not match its hash
}
# Error codes of S3 (and GCS) answers that are worth another attempt.
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "OperationAborted"}
# s3fs turns error answers into a plain OSError, sometimes without the botocore error: these
# are the errnos it uses for the codes above (InternalError / 500: EREMOTEIO;
# ServiceUnavailable, SlowDown / 503: EBUSY) and for lost connections.
_TRANSIENT_ERRNOS = {errno.EREMOTEIO, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE}
_STATUS_IN_MESSAGE = re.compile(r"\((?:5\d\d|429)\)|\b(?:InternalError|ServiceUnavailable|SlowDown)\b")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}"


def relative_source_path(path: str, root: str) -> str:
    """A source file's path relative to the build's `--root` (POSIX separators), so that no
    path of the machine that built a dataset ends up in its tables; a path outside the root
    (none today: sources list files under it) is kept as given."""
    absolute_root = os.path.abspath(os.path.expanduser(root))
    absolute = os.path.abspath(path)
    if absolute == absolute_root or not absolute.startswith(absolute_root.rstrip(os.sep) + os.sep):
        return path
    return os.path.relpath(absolute, absolute_root).replace(os.sep, "/")


def without_root(text: str, root: str, given: str | None = None) -> str:
    """`text` (a reason, a note) with the absolute `root` prefix of any path in it removed;
    the root itself becomes `given` (the root as the user typed it)."""
    absolute_root = os.path.abspath(os.path.expanduser(root)).rstrip(os.sep)
    text = text.replace(absolute_root + os.sep, "")
    return text.replace(absolute_root, given if given is not None else root)


def without_root_in(value: Any, root: str) -> Any:
    """`without_root` on every string inside nested dicts and lists (a source's scan info)."""
    if isinstance(value, str):
        return without_root(value, root)
    if isinstance(value, dict):
        return {without_root_in(k, root): without_root_in(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_root_in(v, root) for v in value]
    return value


def _chain(error: BaseException) -> list[BaseException]:
    """The error and what caused it (`raise ... from`, or raised while handling)."""
    seen: list[BaseException] = []
    while error is not None and error not in seen and len(seen) < 16:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _http_answer(error: BaseException) -> tuple[int | None, str | None]:
    """(HTTP status, error code) of an error answer, where the exception carries one."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode"), response.get("Error", {}).get("Code")
    for attr in ("status", "code", "status_code"):  # aiohttp, gcsfs HttpError, requests
        value = getattr(error, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value < 600:
            return value, None
    return None, None


def is_transient(error: BaseException) -> bool:
    """Is another attempt worth it? Yes for 5xx / 429 / throttling answers and for lost,
    refused, timed-out or cut-short connections; no for not found, access denied, bad
    requests and anything else."""
    for e in _chain(error):
        if isinstance(e, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)):
            return False
        status, code = _http_answer(e)
        if code in _TRANSIENT_CODES:
            return True
        if status is not None:
            return status >= 500 or status in (408, 429)
        if any(cls.__name__ in _TRANSIENT_TYPES for cls in type(e).__mro__):
            return True
        if isinstance(e, OSError) and (e.errno in _TRANSIENT_ERRNOS or _STATUS_IN_MESSAGE.search(str(e))):
            return True
    return False


@dataclass
class DatasetLocation:
    """A dataset root on some filesystem. `url` is what the user typed (a path, file://,
    s3://, gs://, memory://); `storage_options` go to fsspec (endpoint, credentials), except
    `posedata_retries` (attempts per operation on an object store, default 5)."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        options = dict(self.storage_options)
        attempts = options.pop(RETRIES_OPTION, DEFAULT_ATTEMPTS)
        try:
            self.attempts = int(attempts)
        except (TypeError, ValueError):
            raise ValueError(f"storage option {RETRIES_OPTION!r} must be a whole number of attempts, not {attempts!r}") from None
        if self.attempts < 1:
            raise ValueError(f"storage option {RETRIES_OPTION!r} must be at least 1 (1: no retries), not {self.attempts}")
        self._fsspec_options = options
        self._fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        self._pid = os.getpid()
        self.root = self.root.rstrip("/")
        self.is_local = "file" in (self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,))
        if self.is_local:
            self.attempts = 1

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem, made again in a forked process (torch DataLoader workers): the
        event loop of an async one (s3fs, gcsfs) does not survive a fork ("This class is
        not fork-safe"). Unpickled elsewhere (Ray workers), it is made again too."""
        if self._pid != os.getpid():
            inherited = self._fs
            self._fs = fsspec.core.url_to_fs(self.url, **self._fsspec_options)[0]
            self._pid = os.getpid()
            # Keep a forked parent's instance alive: finalized here, it would try to close
            # the parent's connections on this process's loop (an error logged per worker).
            if inherited is not self._fs and not any(inherited is f for f in _INHERITED_FILESYSTEMS):
                _INHERITED_FILESYSTEMS.append(inherited)
        return self._fs

    # ---- paths ---------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def base_shard(self, shard: str) -> str:
        return self.path("shards", f"{shard}.tar")

    def feature_dir(self, folder: str) -> str:
        return self.path("features", folder)

    def sidecar(self, folder: str, shard: str) -> str:
        return self.path("features", folder, f"{shard}.tar")

    def feature_meta(self, folder: str, *parts: str) -> str:
        return self.path(META, "features", folder, *parts)

    def feature_card(self, folder: str) -> str:
        return self.feature_meta(folder, FEATURE_CARD)

    def null_embedding(self, folder: str, output: str) -> str:
        return self.feature_meta(folder, f"null.{output}.npy")

    def legacy_feature_card(self, folder: str) -> str:
        """Format 1: inside the feature folder."""
        return self.path("features", folder, FEATURE_CARD)

    def legacy_null_embedding(self, folder: str, output: str) -> str:
        return self.path("features", folder, f"null.{output}.npy")

    def wids_index(self, folder: str | None, split: str) -> str:
        """The wids shard index of one split of the base shards (folder None) or a feature."""
        return self.feature_meta(folder, f"{split}.wids.json") if folder else self.path(META, "shards", f"{split}.wids.json")

    def done_marker(self, shard: str) -> str:
        return self.path(DONE, "shards", f"{shard}.parquet")

    def url_of(self, path: str) -> str:
        """A URL another process (a Ray worker, webdataset) can open."""
        return self.fs.unstrip_protocol(path)

    # ---- I/O -----------------------------------------------------------------------------

    def _retry(self, what: str, path: str, operation: Callable[[], T]) -> T:
        """`operation()`, tried up to `self.attempts` times while it fails transiently."""
        attempt = 1
        while True:
            try:
                return operation()
            except Exception as e:
                if attempt >= self.attempts or not is_transient(e):
                    if attempt > 1:
                        e.add_note(f"posedata: {what} {self.url_of(path)}: gave up after {attempt} attempts")
                    raise
                delay = min(BACKOFF_CAP_SECONDS, BACKOFF_SECONDS * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                log.warning("%s %s failed (%s: %s); attempt %d of %d in %.1f s", what, self.url_of(path), e.__class__.__name__, e, attempt + 1, self.attempts, delay)
                time.sleep(delay)
                attempt += 1

    def exists(self, path: str) -> bool:
        if self.is_local:
            return self.fs.exists(path)

        # Not fs.exists: fsspec's generic one answers False for any error, a 503 included.
        def probe() -> bool:
            try:
                self.fs.info(path)
                return True
            except FileNotFoundError:
                return False

        return self._retry("check", path, probe)

    def read_bytes(self, path: str) -> bytes:
        if self.is_local:
            with self.fs.open(path, "rb") as f:
                return f.read()
        return self._retry("read", path, lambda: self.fs.cat_file(path))

    def open_read(self, path: str):
        """A binary file object over all of `path`, for parsers that stream (tar). Local: the
        file. Object stores: the object read whole, with retries, into memory: shards are
        tens of MB, about what s3fs's read-ahead block (50 MiB) holds anyway, and a connection
        lost for good half-way through can then never look like a truncated tar."""
        if self.is_local:
            return self.fs.open(path, "rb")
        return io.BytesIO(self.read_bytes(path))

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
            # One PUT (multipart above 100 MiB, aborted on failure): all or nothing, so
            # writing it again after a failure is safe.
            self._retry("write", path, lambda: self.fs.pipe_file(path, data))

    def size(self, path: str) -> int:
        return int(self._retry("check", path, lambda: self.fs.size(path)))

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
        return self._retry("list", self.path(pattern), lambda: sorted(self.fs.glob(self.path(pattern))))

    def card(self) -> dict[str, Any]:
        path = self.path(CARD)
        if not self.exists(path):
            raise FileNotFoundError(f"{self.url}: no {CARD} here; is this a posedata dataset (made by `posedata build`)?")
        card = self.read_json(path)
        version = card.get("format_version", 1) if isinstance(card, dict) else None
        if version not in READABLE_FORMATS:
            raise ValueError(f"{self.url_of(path)}: dataset format {version!r}; this posedata reads formats {', '.join(map(str, READABLE_FORMATS))} (upgrade posedata)")
        return card

    def existing(self, *paths: str) -> str | None:
        """The first of `paths` that exists (a format-2 place, then the format-1 one)."""
        return next((p for p in paths if self.exists(p)), None)
