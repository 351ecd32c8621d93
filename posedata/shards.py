"""Writing one shard task's files: the base shard, one sidecar per feature, and the done
marker (written last) that holds the shard's manifest and reject rows.

Tars are written with webdataset's TarWriter with a fixed mtime and owner, so the same
samples always give byte-identical files (reruns are idempotent).
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
import webdataset as wds

from posedata.images import decode_jpeg_rgb, decode_png, encode_png
from posedata.layout import DatasetLocation
from posedata.storage import decode_float, decode_output_members, encode_members, output_members

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("split", pa.string()),
        ("group", pa.string()),
        ("shard", pa.string()),
        ("index", pa.int32()),
        ("source_path", pa.string()),
        ("source_sha256", pa.string()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("status", pa.string()),
    ]
)
REJECTS_SCHEMA = pa.schema(
    [
        ("source_path", pa.string()),
        ("key", pa.string()),
        ("split", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
    ]
)
# pairs/<split>.parquet; `split` too, so the folder read as one table keeps it
PAIRS_SCHEMA = pa.schema([("split", pa.string()), ("source_key", pa.string()), ("target_key", pa.string()), ("shard", pa.string())])
# The done marker is one table of both kinds of rows, told apart by `status`.
MARKER_SCHEMA = pa.schema(
    list(MANIFEST_SCHEMA) + [pa.field("stage", pa.string()), pa.field("reason", pa.string()), pa.field("notes", pa.string())]
)


def duplicates_across_splits(manifest: pa.Table) -> dict[str, Any]:
    """The same image (same `source_sha256`) in more than one split: a leak between splits
    (a test image the model trained on). {"images": distinct images, "samples": manifest rows
    holding them, "splits": {"test+train": images}, "examples": a few lists of their keys}."""
    splits_of: dict[str, set[str]] = {}
    keys_of: dict[str, list[str]] = {}
    for key, split, sha in zip(manifest["key"].to_pylist(), manifest["split"].to_pylist(), manifest["source_sha256"].to_pylist()):
        if sha:
            splits_of.setdefault(sha, set()).add(split)
            keys_of.setdefault(sha, []).append(key)
    leaked = [sha for sha, splits in splits_of.items() if len(splits) > 1]
    by_splits: dict[str, int] = {}
    for sha in leaked:
        name = "+".join(sorted(splits_of[sha]))
        by_splits[name] = by_splits.get(name, 0) + 1
    return {
        "images": len(leaked),
        "samples": sum(len(keys_of[sha]) for sha in leaked),
        "splits": dict(sorted(by_splits.items())),
        "examples": [sorted(keys_of[sha]) for sha in sorted(leaked, key=lambda s: min(keys_of[s]))[:5]],
    }


def duplicates_text(duplicates: dict[str, Any]) -> str | None:
    """One line about `duplicates_across_splits`, or None when there are none."""
    if not duplicates or not duplicates.get("images"):
        return None
    n = duplicates["images"]
    where = ", ".join(f"{splits}: {count}" for splits, count in duplicates.get("splits", {}).items())
    example = " = ".join(duplicates["examples"][0]) if duplicates.get("examples") else ""
    return f"{n} image{'s' if n != 1 else ''} (same sha256) in more than one split ({where}): a leak between splits" + (f"; e.g. {example}" if example else "")


def encode_array(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # np.asarray, not ascontiguousarray: that would turn the 0-d packed fp8/bf16 record 1-d
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_array(data: bytes) -> np.ndarray:
    """np.load without pickle; packed bf16 / fp8 arrays come back as float32."""
    return decode_float(load_npy(data))


# .npy header (bytes) -> (dtype, shape, Fortran order), for headers np.load has accepted.
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}
_NPY_HEADERS_MAX = 4096


def load_npy(data: bytes) -> np.ndarray:
    """`np.load(io.BytesIO(data), allow_pickle=False)` of a whole .npy held in memory, a
    writable copy as np.load gives. np.load parses the header's Python literal every time
    (tens of microseconds, more than the copy of a small array); a reader meets the same few
    headers millions of times, so each distinct header is parsed once, by np.load itself
    (which refuses object dtypes), and then only the values are copied out."""
    if data[:6] == b"\x93NUMPY" and len(data) >= 10:
        start = 10 if data[6] == 1 else 12
        length = int.from_bytes(data[8:start], "little")
        header = data[start : start + length]
        known = _NPY_HEADERS.get(header)
        if known is not None:
            dtype, shape, fortran = known
            count = math.prod(shape)
            values = np.frombuffer(data, dtype=dtype, count=count, offset=start + length)  # ValueError when truncated
            return values.reshape(shape, order="F" if fortran else "C").copy(order="K")
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if len(_NPY_HEADERS) < _NPY_HEADERS_MAX:
            _NPY_HEADERS[header] = (array.dtype, array.shape, array.ndim > 1 and array.flags.f_contiguous and not array.flags.c_contiguous)
        return array
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_output(suffix: str, value: np.ndarray) -> bytes:
    if suffix.endswith(".png"):
        return encode_png(np.asarray(value, dtype=np.uint8))
    if suffix.endswith(".npy"):
        return encode_array(np.asarray(value))
    if suffix.endswith(".json"):
        return json.dumps(value, sort_keys=True).encode()
    raise ValueError(f"no encoder for output suffix {suffix!r}")


def decode_output(suffix: str, data: bytes) -> Any:
    """Decode one tar member by its extension (`embeds.npy`, `skeleton.png`, `jpg`, `json`)."""
    ext = suffix.rsplit(".", 1)[-1]
    if ext == "png":
        return decode_png(data)
    if ext == "npy":
        return decode_array(data)
    if ext == "json":
        return json.loads(data)
    if ext in ("jpg", "jpeg"):
        return decode_jpeg_rgb(data)
    return data


def decode_stored_output(suffix: str, members: dict[str, bytes]) -> Any:
    """Output `suffix` (as the card names it: `embeds.npy`, `skeleton.png`) of one sample from
    its tar members, whatever dtype it was stored in: fp8 / bf16 bit-pattern members
    (`embeds.e4m3.npy` + `embeds.scale.npy`, `embeds.bf16.npy`) come back as float32.
    KeyError if the sample has no member for it."""
    names = output_members(suffix, members)
    if names is None:
        raise KeyError(suffix)
    if names == [suffix]:
        return decode_output(suffix, members[suffix])
    return decode_output_members(suffix, {n: load_npy(members[n]) for n in names})


def encode_stored_output(suffix: str, value: Any, dtype_label: str) -> dict[str, bytes]:
    """Output `suffix` as {member suffix: bytes} for the tar: one member, or the bit-pattern
    members of an output the extractor declares bfloat16 / float8_e4m3fn."""
    return {member: encode_output(member, array) for member, array in encode_members(suffix, value, dtype_label).items()} if suffix.endswith(".npy") else {suffix: encode_output(suffix, value)}


def tar_bytes(samples: list[dict[str, Any]]) -> bytes:
    """A tar of webdataset samples (`__key__` + suffix -> bytes), deterministic bytes."""
    buf = io.BytesIO()
    # An int mtime: a float one makes tarfile add a 1 KiB PAX header to every member.
    with wds.TarWriter(buf, user="posedata", group="posedata", mtime=0, encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    return buf.getvalue()


def write_shard(
    location: DatasetLocation,
    shard: str,
    rows: list[dict[str, Any]],
    feature_outputs: dict[str, list[str]],
) -> dict[str, int]:
    """Write one shard task's files. `rows` are the shard's samples in planned order, each
    with `status` "ok" or "rejected"; ok rows carry `jpg`, `meta` and one bytes entry per
    feature output under `f:<folder>:<suffix>`. `feature_outputs` maps feature folder ->
    output suffixes. The marker is written last: a shard without it is redone on rerun."""
    accepted = [r for r in rows if r["status"] == "ok"]

    location.write_bytes(
        location.base_shard(shard),
        tar_bytes([{"__key__": r["key"], "jpg": r["jpg"], "json": r["meta"]} for r in accepted]),
    )
    for folder, suffixes in feature_outputs.items():
        samples = [{"__key__": r["key"], **{s: r[f"f:{folder}:{s}"] for s in suffixes}} for r in accepted]
        location.write_bytes(location.sidecar(folder, shard), tar_bytes(samples))

    marker_rows = []
    for index, r in enumerate(accepted):
        marker_rows.append(_manifest_row(r, shard, index, status="ok"))
    for r in rows:
        if r["status"] != "ok":
            marker_rows.append(_manifest_row(r, shard, -1, status="rejected"))
    location.write_parquet(location.done_marker(shard), pa.Table.from_pylist(marker_rows, schema=MARKER_SCHEMA))
    return {"written": len(accepted), "rejected": len(rows) - len(accepted)}


def _manifest_row(r: dict[str, Any], shard: str, index: int, status: str) -> dict[str, Any]:
    return {
        "key": r["key"],
        "split": r["split"],
        "group": r["group"],
        "shard": shard,
        "index": index,
        # relative to --root (build.task_rows): no path of the building machine in the tables
        "source_path": r.get("source_path") or r["path"],
        "source_sha256": r.get("sha256") or "",
        "original_width": int(r.get("original_width") or 0),
        "original_height": int(r.get("original_height") or 0),
        "status": status,
        "stage": r.get("stage") or "",
        "reason": (r.get("reason") or "").replace(r["path"], r["source_path"]) if r.get("source_path") else (r.get("reason") or ""),
        # extractor notes about this sample, JSON {feature spec: [notes]} ("no person")
        "notes": r.get("notes") or "",
    }
