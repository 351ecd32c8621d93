"""Helpers shared by the source adapters.

Listing image files, reading the list / pair / keypoint files that PGPIS datasets ship, and a
small builder that keeps every input accounted for (a record or a reject, never nowhere).
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import hashlib
import io
import json
import math
import os
import posixpath
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from posedata.records import STAGE_SCAN, Record, Reject, SourceScan, safe_key
from posedata.sources.base import SourceError

# Extensions photos usually have. Not a filter (every file is an input and its bytes decide
# whether it is an image): only which file keeps a key when two differ only by extension.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif", ".heic", ".heif"})

# OpenPose / COCO-18 order (docs/design.md §4); every keypoint list a source stores has this length.
KEYPOINT_COUNT = 18


def is_image_name(name: str) -> bool:
    """By extension only (case-insensitive)."""
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def absolute_root(root: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(root))))


def require_directory(root: Path, expected: str) -> None:
    """Raise the one-line SourceError a missing root gets."""
    if not root.exists():
        raise SourceError(f"{root}: no such directory; {expected}")
    if not root.is_dir():
        raise SourceError(f"{root}: not a directory; {expected}")


@dataclass
class FileListing:
    """What is under one directory: its files (every one an input: the decode stage decides
    from the bytes whether it is an image) as sorted posix paths relative to it, and the
    entries that cannot be inputs, each with the reason it becomes a reject."""

    files: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)


# Real paths of folders no listing enters: the build's own --out, which a symlink under
# --root can still reach after check_output (a build would read its own shards, and a rerun
# would see its inputs change). Set by `not_reading`.
OWN_OUTPUT_REASON = "symlink into the build's own output --out: not read"
_NOT_READ: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("posedata_not_read", default=())


@contextlib.contextmanager
def not_reading(*folders: str) -> Iterator[None]:
    """Within the block, `list_files` refuses any folder or file whose real path is one of
    `folders` or lies inside one (one reject each, nothing under it read)."""
    token = _NOT_READ.set(tuple(os.path.realpath(f) for f in folders))
    try:
        yield
    finally:
        _NOT_READ.reset(token)


def is_inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies under it (both already resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _inside_any(real: str, folders: tuple[str, ...]) -> bool:
    return any(is_inside(real, f) for f in folders)


def list_files(directory: Path) -> FileListing:
    """Walk `directory`, following symlinked folders once each. Every regular file is listed;
    everything else under it is refused with a reason, never left out silently: a folder
    that cannot be listed (permissions), a named pipe, socket or device, a broken symlink,
    and hidden files and folders (name starting with '.', e.g. .DS_Store, .git: one reject
    per hidden folder, which is not read)."""
    from posedata.images import file_kind

    listing = FileListing()
    seen_real_dirs: dict[str, str] = {}  # real path -> the relative path it was read under
    not_read = _NOT_READ.get()

    def relative(path: str) -> str:
        return printable(os.path.relpath(path, directory).replace(os.sep, "/"))

    def unlistable(error: OSError) -> None:
        if error.filename is None or os.path.abspath(error.filename) == os.path.abspath(directory):
            raise SourceError(f"{directory}: cannot list this folder ({error.strerror or error}); check its permissions") from None
        where = relative(error.filename)
        listing.refused.append((where, f"cannot list folder: {error.__class__.__name__}: {error.strerror or error}"))

    for current, dirnames, filenames in os.walk(directory, followlinks=True, onerror=unlistable):
        real = os.path.realpath(current)
        if real in seen_real_dirs:  # a symlink loop, or the same folder linked twice
            listing.refused.append((relative(current), f"folder reached again through a symlink (already read as {seen_real_dirs[real]}/): not read again"))
            dirnames[:] = []
            continue
        seen_real_dirs[real] = relative(current)
        if _inside_any(real, not_read):
            listing.refused.append((relative(current), OWN_OUTPUT_REASON))
            dirnames[:] = []
            continue
        for name in sorted(d for d in dirnames if d.startswith(".")):
            listing.refused.append((relative(os.path.join(current, name)), "hidden folder (name starts with '.'): not read"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = os.path.join(current, name)
            if name.startswith("."):
                listing.refused.append((relative(path), "hidden file (name starts with '.'): not read"))
                continue
            if not_read and os.path.islink(path) and _inside_any(os.path.realpath(path), not_read):
                # the same reject whether --out exists yet or not (a rerun compares them)
                listing.refused.append((relative(path), OWN_OUTPUT_REASON))
                continue
            try:
                mode = os.stat(path).st_mode
            except OSError as error:
                broken = os.path.islink(path)
                reason = "broken symlink (its target does not exist)" if broken else f"cannot read file: {error.__class__.__name__}: {error.strerror or error}"
                listing.refused.append((relative(path), reason))
                continue
            if not is_utf8(path):  # the tables hold UTF-8 text: such a name cannot be written
                listing.refused.append((relative(path), "file name is not valid UTF-8 (shown with \\x escapes): rename the file to include it"))
            elif stat.S_ISREG(mode):
                listing.files.append(relative(path))
            else:
                listing.refused.append((relative(path), f"not a regular file ({file_kind(mode)})"))
    listing.files.sort()
    listing.refused.sort()
    return listing


def is_utf8(name: str) -> bool:
    """Whether a file name from the OS is valid UTF-8 (Python keeps undecodable bytes of a
    name as lone surrogates, which no UTF-8 table can hold)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def printable(name: str) -> str:
    """A file name as text any table can hold: bytes that are not UTF-8 as `\\xNN`."""
    return name if is_utf8(name) else os.fsencode(name).decode("utf-8", "backslashreplace")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def key_from_name(name: str) -> str:
    """The sample key of a file name or relative path: extension dropped, then safe_key."""
    return safe_key(posixpath.splitext(name.replace("\\", "/"))[0])


def find_first(root: Path, names: list[str]) -> Path | None:
    """The first of several accepted spellings that exists as a file in `root`."""
    for name in names:
        if (root / name).is_file():
            return root / name
    return None


def read_text(path: Path) -> str:
    """A list or CSV file as text: UTF-8, with or without a byte-order mark (editors on
    Windows add one, and it would otherwise stick to the first name). Any other encoding is
    one error naming the file and the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        hint = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise SourceError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{data[error.start]:02x}){hint}; save it as UTF-8"
        ) from None


def read_numbered_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped line) of every non-blank line."""
    return [(n, line.strip()) for n, line in enumerate(read_text(path).splitlines(), 1) if line.strip()]


def read_name_list(path: Path) -> list[str]:
    """One name per line; blank lines ignored."""
    return [line for _, line in read_numbered_lines(path)]


def read_pair_csv(path: Path) -> list[tuple[str, str]]:
    """PATN-style pair list: header `from,to`, one (source name, target name) per row. A row
    that is not two names is one error naming the file and the line."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if "from" not in columns or "to" not in columns:
        raise SourceError(f"{path}: expected a pair CSV with header 'from,to', found {columns}")
    reader.fieldnames = columns
    pairs = []
    for row in reader:
        source, target = (row.get("from") or "").strip(), (row.get("to") or "").strip()
        if not source or not target or None in row:
            found = ",".join(str(v) for k, v in row.items() if k is not None and v) + ("," + ",".join(row[None]) if None in row else "")
            raise SourceError(f"{path}, line {reader.line_num}: expected two names 'from,to', found {found!r}")
        pairs.append((source, target))
    return pairs


def keypoints_from_xy(xs: list[float], ys: list[float]) -> list[list[float]]:
    """[[x, y, score]] * 18; a joint with -1 in either coordinate is missing: [0, 0, 0]."""
    if len(xs) != KEYPOINT_COUNT or len(ys) != KEYPOINT_COUNT:
        raise ValueError(f"expected {KEYPOINT_COUNT} keypoints, got {len(xs)} x and {len(ys)} y")
    points = []
    for x, y in zip(xs, ys):
        if x == -1 or y == -1:
            points.append([0.0, 0.0, 0.0])
        else:
            points.append([float(x), float(y), 1.0])
    return points


@dataclass
class KeypointTable:
    """Keypoints read from a PATN annotation CSV, by file name."""

    by_name: dict[str, list[list[float]]]
    malformed_rows: int
    joints_outside_frame: int = 0  # not finite or outside the frame: stored as missing
    first_outside: str = ""  # where the first of them is, for the warning


def read_keypoint_csv(path: Path, frame: tuple[int, int] | list[int] | None = None) -> KeypointTable:
    """PATN annotation CSV: `sep=':'`, header `name:keypoints_y:keypoints_x`, each a JSON list
    of 18 ints with -1 for a missing joint. A malformed row is counted, not fatal: it only
    costs that image its shipped keypoints. With `frame` (H, W), a joint that is not finite
    or lies outside it (a typo such as 1e9) is marked missing and counted."""
    by_name: dict[str, list[list[float]]] = {}
    malformed = outside = 0
    first_outside = ""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter=":")
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if not {"name", "keypoints_y", "keypoints_x"} <= set(columns):
        raise SourceError(
            f"{path}: expected a keypoint CSV with header 'name:keypoints_y:keypoints_x', "
            f"found {columns}"
        )
    reader.fieldnames = columns
    for row in reader:
        try:
            ys = json.loads(row["keypoints_y"])
            xs = json.loads(row["keypoints_x"])
            points = keypoints_from_xy(xs, ys)
        except (TypeError, ValueError, AttributeError):
            malformed += 1
            continue
        if frame is not None:
            marked = mark_outside_frame(points, frame)
            if marked and not first_outside:
                first_outside = f"line {reader.line_num}, {row['name'].strip()}"
            outside += marked
        by_name[row["name"].strip()] = points
    return KeypointTable(by_name=by_name, malformed_rows=malformed, joints_outside_frame=outside, first_outside=first_outside)


def mark_outside_frame(points: list[list[float]], frame: tuple[int, int] | list[int]) -> int:
    """Mark joints that are not finite or lie outside the (H, W) frame missing ([0, 0, 0]);
    how many were marked."""
    height, width = frame
    marked = 0
    for point in points:
        x, y, score = point
        if score > 0 and not (math.isfinite(x) and math.isfinite(y) and 0 <= x <= width and 0 <= y <= height):
            point[:] = [0.0, 0.0, 0.0]
            marked += 1
    return marked


def keypoint_table_warnings(name: str, table: KeypointTable, frame) -> list[str]:
    """What the card says about one keypoint CSV's bad rows and joints."""
    warnings = []
    if table.malformed_rows:
        warnings.append(f"{name}: {table.malformed_rows} malformed rows skipped")
    if table.joints_outside_frame:
        warnings.append(
            f"{name}: {table.joints_outside_frame} joints not finite or outside the {frame[0]}x{frame[1]} frame "
            f"stored as missing (first at {table.first_outside})"
        )
    return warnings


def file_provenance(path: Path, **extra: Any) -> dict[str, Any]:
    """What `SourceScan.info["files"]` says about one list / pair / annotation file read."""
    return {"sha256": sha256_file(path), **extra}


def load_manifest(name: str) -> dict[str, Any]:
    """A dataset recipe from the installed `posedata.manifests` package.

    In a source checkout that was never `pip install`ed the top-level `manifests/` folder is
    not importable under that name, so fall back to reading it beside the package.
    """
    filename = f"{name}.json"
    try:
        text = resources.files("posedata.manifests").joinpath(filename).read_text("utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        text = (Path(__file__).resolve().parents[2] / "manifests" / filename).read_text("utf-8")
    return json.loads(text)


class ScanBuilder:
    """Collects candidate records and rejects, then resolves duplicate keys and sorts.

    Duplicates: of several candidates with the same key, one with a photo extension wins over
    others, then the first in sorted path order; the others become rejects that name the
    winner, whatever order they were added in.
    """

    def __init__(self) -> None:
        self._candidates: list[Record] = []
        self.rejects: list[Reject] = []

    def add(self, key: str, split: str, group: str, path: Path | str, annotations=None) -> None:
        self._candidates.append(Record(key, split, group, str(path), dict(annotations or {})))

    def reject(self, path: Path | str, reason: str, key: str = "", split: str = "") -> None:
        self.rejects.append(Reject(str(path), STAGE_SCAN, reason, key, split))

    def build(self, pairs: dict[str, list[tuple[str, str]]], info: dict[str, Any]) -> SourceScan:
        records: list[Record] = []
        winner_path: dict[str, str] = {}
        # A photo extension keeps the key before any other file (`look.jpg` over `look.json`).
        for record in sorted(self._candidates, key=lambda r: (not is_image_name(r.path), r.path)):
            if record.key in winner_path:
                self.reject(
                    record.path,
                    f"duplicate key {record.key} (same as {winner_path[record.key]})",
                    record.key,
                    record.split,
                )
                continue
            winner_path[record.key] = record.path
            records.append(record)
        records.sort(key=lambda r: (r.split, r.group, r.key))
        rejects = sorted(self.rejects, key=lambda r: (r.path, r.reason))

        known = set(winner_path)
        for split, split_pairs in pairs.items():
            unknown = sum(1 for s, t in split_pairs if s not in known or t not in known)
            info.setdefault("pairs", {})[split] = {
                "count": len(split_pairs),
                "with_unknown_keys": unknown,
            }
        info["counts"] = {
            **info.get("counts", {}),
            "records": len(records),
            "rejects": len(rejects),
            "records_by_split": dict(sorted(Counter(r.split for r in records).items())),
            "groups_by_split": {
                split: len({r.group for r in records if r.split == split})
                for split in sorted({r.split for r in records})
            },
            "records_with_keypoints": sum(1 for r in records if "keypoints" in r.annotations),
        }
        info.setdefault("warnings", [])
        return SourceScan(records=records, rejects=rejects, pairs=pairs, info=info)
