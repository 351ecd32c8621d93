"""DeepFashion In-Shop Clothes Retrieval, as pose-guided person image synthesis papers use it.

Layouts recognised under `root`, in this order:

1. **original** - `img_highres/` or `img/` (img_highres preferred when both exist; the
   `image_dir` option forces one) holding the release's tree
   `WOMEN|MEN/<category>/id_XXXXXXXX/NN_V_view.jpg` (flattened names are accepted there too).
   Splits come from `train.lst` / `test.lst` in root, which list FLATTENED names (see
   `flatten_name`). Without lists every image goes to split "train", with a warning.
2. **pidm** - the same image folder plus `train_pairs.txt` / `test_pairs.txt` and/or `pose/`
   (PIDM / NTED / GFLA). Pair lines are `target,source1,source2,...` naming images by their
   path under root (`img/WOMEN/.../02_1_front.jpg`); each gives pairs (source_i, target).
   Splits come from train.lst / test.lst when present (PIDM's download ships them), else from
   which pair file names the image.
3. **split-folders** - `train_highres/` + `test_highres/` (or `train/` + `test/`, PATN's
   256x176 set) holding flattened names; the folder gives the split. Lists present in root
   are only hashed and reported.

Optional files in root, any layout (the PATN spelling `fasion-` and `fashion-` both work):
`fasion-resize-pairs-{train,test}.csv` (header `from,to`) are imported as given into
`SourceScan.pairs`; `fasion-resize-annotation-{train,test}.csv` give each image keypoints.

Keypoints land on a record as `annotations = {"keypoints": [[x, y, score]] * 18,
"keypoints_frame": [256, 176]}` (COCO-18 order; score 1.0 present, `[0, 0, 0.0]` missing),
in the 256x176 (height x width) frame of PATN's resized images; the build rescales them to
the stored resolution. Both sources of keypoints use that frame:

- annotation CSVs are in it already;
- PIDM's `pose/<path>.txt` (18 lines `x y`, -1 missing) is in the 256x256 frame of the
  original low-res DeepFashion images, whose 176-wide person crop starts at x = 40; PIDM's
  and NTED's loaders subtract 40 from x and then scale by (W/176, H/256). The scan applies
  the same shift, so the stored frame is again [256, 176].

When both exist for an image, the CSV wins (it is the list most papers share) and the pose
file fills only images the CSV lacks.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from posedata.records import SourceScan
from posedata.sources.base import SourceError
from posedata.sources.common import (
    KEYPOINT_COUNT,
    ScanBuilder,
    absolute_root,
    file_provenance,
    find_first,
    key_from_name,
    keypoint_table_warnings,
    keypoints_from_xy,
    list_files,
    load_manifest,
    read_keypoint_csv,
    read_name_list,
    read_numbered_lines,
    read_pair_csv,
    read_text,
    require_directory,
)

EXPECTED_LAYOUT = (
    "expected img/ or img_highres/ (WOMEN|MEN/<category>/id_XXXXXXXX/*.jpg) with "
    "train.lst/test.lst, or train_highres/ and test_highres/ (or train/ and test/) of "
    "flattened names, or the PIDM layout (img/, pose/, train_pairs.txt, test_pairs.txt)"
)

IMAGE_DIRS = ("img_highres", "img")
SPLIT_FOLDER_SETS = (("train_highres", "test_highres"), ("train", "test"))
LIST_FILES = {"train": "train.lst", "test": "test.lst"}
PIDM_PAIR_FILES = {"train": "train_pairs.txt", "test": "test_pairs.txt"}
PIDM_POSE_DIR = "pose"
PAIR_CSVS = {
    s: [f"fasion-resize-pairs-{s}.csv", f"fashion-resize-pairs-{s}.csv"] for s in LIST_FILES
}
KEYPOINT_CSVS = {
    s: [f"fasion-resize-annotation-{s}.csv", f"fashion-resize-annotation-{s}.csv"]
    for s in LIST_FILES
}

# The frame (height, width) every DeepFashion keypoint is stored in (see module docstring).
KEYPOINT_FRAME = [256, 176]
# PIDM pose files sit in the 256x256 low-res frame: the 176-wide crop starts at this x.
PIDM_POSE_X_OFFSET = 40

_TREE_PATH = re.compile(r"(?:^|/)(WOMEN|MEN)/([^/]+)/id_(\d{8})/([^/]+)$")
_FLAT_NAME = re.compile(r"^fashion(WOMEN|MEN)(.+?)id(\d{8})(\d+)_(\d+)([A-Za-z]+)(\.[A-Za-z]+)$")
_ITEM_ID = re.compile(r"id(\d{8})")


def flatten_name(tree_path: str) -> str:
    """The PATN / CFLD flattened file name of an original-tree path.

    `[img/]WOMEN/Blouses_Shirts/id_00000001/02_1_front.jpg` ->
    `fashionWOMENBlouses_Shirtsid0000000102_1front.jpg`: the id part loses its `_`, the file
    name keeps only its first `_`, the category keeps its underscores.
    """
    match = _TREE_PATH.search(tree_path.replace("\\", "/"))
    if not match:
        raise ValueError(
            f"not a DeepFashion tree path (WOMEN|MEN/<category>/id_XXXXXXXX/<file>): {tree_path!r}"
        )
    gender, category, item_digits, filename = match.groups()
    head, underscore, rest = filename.partition("_")
    file_part = f"{head}_{rest.replace('_', '')}" if underscore else filename
    return f"fashion{gender}{category}id{item_digits}{file_part}"


def unflatten_name(flat_name: str) -> str:
    """The inverse of `flatten_name` for the release's file names (`NN_V_view.ext`):
    `fashionWOMENBlouses_Shirtsid0000000102_1front.jpg` ->
    `WOMEN/Blouses_Shirts/id_00000001/02_1_front.jpg` (relative to img/ or img_highres/)."""
    match = _FLAT_NAME.match(posixpath.basename(flat_name))
    if not match:
        raise ValueError(f"not a flattened DeepFashion name: {flat_name!r}")
    gender, category, item_digits, number, variant, view, extension = match.groups()
    return f"{gender}/{category}/id_{item_digits}/{number}_{variant}_{view}{extension}"


def flattened_name(entry: str) -> str:
    """The flattened file name of however a file or list names an image: a tree path (also
    PIDM's `img/WOMEN/...`) is flattened, anything else is taken by its base name."""
    entry = entry.strip().replace("\\", "/")
    if _TREE_PATH.search(entry):
        return flatten_name(entry)
    return posixpath.basename(entry)


def entry_key(entry: str) -> str:
    """The sample key of a list / pair / annotation entry, matching the key of its image."""
    return key_from_name(flattened_name(entry))


def item_group(name: str) -> str | None:
    """The clothing item, `id_XXXXXXXX`, of a flattened name or tree path; None if absent."""
    match = _ITEM_ID.search(flattened_name(name))
    return f"id_{match.group(1)}" if match else None


def read_pidm_pose(path: Path) -> list[list[float]]:
    """One PIDM pose file as [[x, y, score]] * 18 in the [256, 176] frame."""
    rows = [line.split() for line in read_text(path).splitlines() if line.strip()]
    if len(rows) != KEYPOINT_COUNT or any(len(row) < 2 for row in rows):
        raise ValueError(f"expected {KEYPOINT_COUNT} lines 'x y', got {len(rows)} lines")
    xs = [float(row[0]) for row in rows]
    ys = [float(row[1]) for row in rows]
    points = keypoints_from_xy(xs, ys)
    for point in points:
        if point[2] > 0:
            point[0] -= PIDM_POSE_X_OFFSET
    return points


@dataclass
class _FoundImage:
    path: Path
    relative: str  # relative to its image folder
    flat_name: str
    key: str
    group: str
    folder_split: str | None  # the split its folder says (split-folders layout only)


@dataclass
class _Listing:
    """Which images a set of per-split files names: split -> key -> entry as written."""

    entries: dict[str, dict[str, str]]
    file_of: dict[str, str]  # split -> file name, for reasons


class DeepFashionSource:
    """DeepFashion In-Shop. Options: `image_dir` - a folder under root to read images from
    instead of detecting img_highres/ or img/ (e.g. "img" when both exist and you want the
    low-res release)."""

    name: ClassVar[str] = "deepfashion"
    default_resolution: ClassVar[tuple[int, int]] = (256, 176)

    def __init__(self, root: str, *, image_dir: str | None = None) -> None:
        self.root = absolute_root(root)
        self.image_dir = image_dir

    # -- layout ---------------------------------------------------------------------------

    def _image_folders(self) -> list[tuple[str, str | None]]:
        """(folder under root, split it implies or None) for the detected layout."""
        if self.image_dir is not None:
            if not (self.root / self.image_dir).is_dir():
                raise SourceError(
                    f"{self.root}: image_dir {self.image_dir}/ not found; {EXPECTED_LAYOUT}"
                )
            return [(self.image_dir, None)]
        for folder in IMAGE_DIRS:
            if (self.root / folder).is_dir():
                return [(folder, None)]
        for train_folder, test_folder in SPLIT_FOLDER_SETS:
            present = [
                (folder, split)
                for folder, split in ((train_folder, "train"), (test_folder, "test"))
                if (self.root / folder).is_dir()
            ]
            if present:
                return present
        raise SourceError(f"{self.root}: no DeepFashion layout found: {EXPECTED_LAYOUT}")

    # -- scan -----------------------------------------------------------------------------

    def scan(self) -> SourceScan:
        require_directory(self.root, EXPECTED_LAYOUT)
        folders = self._image_folders()
        split_folders = folders[0][1] is not None
        has_pidm_files = (self.root / PIDM_POSE_DIR).is_dir() or any(
            (self.root / name).is_file() for name in PIDM_PAIR_FILES.values()
        )
        layout = "split-folders" if split_folders else ("pidm" if has_pidm_files else "original")
        info: dict[str, Any] = {
            "source": self.name,
            "root": str(self.root),
            "layout": layout,
            "image_dirs": [folder for folder, _ in folders],
            "files": {},
            "warnings": [],
        }
        builder = ScanBuilder()

        images = self._find_images(folders, builder, info)
        lists = self._read_lists(info)
        pidm_pairs, pidm_listing = self._read_pidm_pairs(info)

        if split_folders:
            info["split_from"] = "folders"
            assigned = [(image, image.folder_split) for image in images]
        elif lists.entries:
            info["split_from"] = "/".join(lists.file_of.values())
            assigned = self._split_by_listing(images, lists, builder, info, "listed in")
        elif pidm_listing.entries:
            info["split_from"] = "/".join(pidm_listing.file_of.values())
            assigned = self._split_by_listing(images, pidm_listing, builder, info, "named in")
        else:
            info["split_from"] = "none"
            info["warnings"].append(
                "no train.lst/test.lst (or PIDM pair files) found: every image was put in "
                "split 'train'"
            )
            assigned = [(image, "train") for image in images]

        annotations = self._read_keypoints(images, info)
        for image, split in assigned:
            builder.add(image.key, split, image.group, image.path, annotations.get(image.key))

        pairs = self._read_pair_csvs(info)
        for split, split_pairs in pidm_pairs.items():
            if split in pairs:
                info["warnings"].append(
                    f"{info['pair_files'][split]} ignored for split {split}: "
                    f"{PIDM_PAIR_FILES[split]} of the PIDM layout takes precedence"
                )
            pairs[split] = split_pairs
            info["pair_files"][split] = PIDM_PAIR_FILES[split]
        return builder.build(dict(sorted(pairs.items())), info)

    def _find_images(
        self, folders: list[tuple[str, str | None]], builder: ScanBuilder, info: dict[str, Any]
    ) -> list[_FoundImage]:
        images: list[_FoundImage] = []
        counts = {
            "files_found": 0,
            "tree_names": 0,
            "flattened_names": 0,
            "refused_while_listing": 0,
            "list_entries_without_file": 0,
        }
        for folder, folder_split in folders:
            listing = list_files(self.root / folder)
            counts["files_found"] += len(listing.files)
            counts["refused_while_listing"] += len(listing.refused)
            for relative, reason in listing.refused:
                builder.reject(self.root / folder / relative, reason, key_from_name(relative), folder_split or "")
            for relative in listing.files:
                path = self.root / folder / relative
                flat = flattened_name(relative)
                group = item_group(flat)
                if group is None:
                    builder.reject(
                        path,
                        "not a DeepFashion image name: expected WOMEN|MEN/<category>/"
                        "id_XXXXXXXX/<file> or a flattened name containing idXXXXXXXX",
                        key_from_name(relative),
                        folder_split or "",
                    )
                    continue
                is_tree_path = flat != posixpath.basename(relative)
                counts["tree_names" if is_tree_path else "flattened_names"] += 1
                images.append(
                    _FoundImage(path, relative, flat, key_from_name(flat), group, folder_split)
                )
        if counts["files_found"] + counts["refused_while_listing"] == 0:
            folder_names = ", ".join(f"{f}/" for f, _ in folders)
            raise SourceError(f"{self.root}: {folder_names} hold no files; {EXPECTED_LAYOUT}")
        info["counts"] = counts
        return images

    def _split_by_listing(
        self,
        images: list[_FoundImage],
        listing: _Listing,
        builder: ScanBuilder,
        info: dict[str, Any],
        verb: str,
    ) -> list[tuple[_FoundImage, str]]:
        """Split each image by the file that names it; reject images named by none or by
        several, and entries whose image is missing (path = the entry as written)."""
        splits_of_key: dict[str, list[str]] = {}
        for split, entries in listing.entries.items():
            for key in entries:
                splits_of_key.setdefault(key, []).append(split)
        files = " or ".join(listing.file_of.values())
        assigned: list[tuple[_FoundImage, str]] = []
        found_keys = set()
        for image in images:
            found_keys.add(image.key)
            splits = splits_of_key.get(image.key, [])
            if len(splits) == 1:
                assigned.append((image, splits[0]))
            elif not splits:
                builder.reject(image.path, f"not {verb} {files}", image.key)
            else:
                both = " and ".join(listing.file_of[s] for s in splits)
                builder.reject(image.path, f"{verb} both {both}", image.key)
        missing = 0
        for split, entries in listing.entries.items():
            for key, entry in entries.items():
                if key not in found_keys:
                    missing += 1
                    reason = f"{verb} {listing.file_of[split]}, file not found"
                    builder.reject(entry, reason, key, split)
        info["counts"]["list_entries_without_file"] = missing
        return assigned

    def _read_lists(self, info: dict[str, Any]) -> _Listing:
        """train.lst / test.lst, each hashed and compared with the canonical list."""
        canonical_lists = load_manifest("deepfashion")["lists"]
        listing = _Listing(entries={}, file_of={})
        for split, filename in LIST_FILES.items():
            path = self.root / filename
            if not path.is_file():
                continue
            entries = read_name_list(path)
            keyed: dict[str, str] = {}
            for entry in entries:
                keyed.setdefault(entry_key(entry), entry)
            expected = canonical_lists.get(filename, {})
            provenance = file_provenance(path, entries=len(entries), unique_entries=len(keyed))
            expected_sha = expected.get("sha256")
            provenance["canonical"] = provenance["sha256"] == expected_sha if expected_sha else None
            provenance["canonical_sha256"] = expected_sha
            if provenance["canonical"] is False:
                info["warnings"].append(
                    f"{filename} is not the canonical list ({len(entries)} names; the canonical "
                    f"one has {expected.get('count')}): used as given"
                )
            info["files"][filename] = provenance
            listing.entries[split] = keyed
            listing.file_of[split] = filename
        if len(listing.entries) == 1 and info["layout"] != "split-folders":
            (present,) = listing.file_of.values()
            info["warnings"].append(f"only {present} found: images it does not list are rejected")
        return listing

    def _read_pidm_pairs(
        self, info: dict[str, Any]
    ) -> tuple[dict[str, list[tuple[str, str]]], _Listing]:
        """PIDM pair files: pairs (source_i, target) per line, and which images each names."""
        pairs: dict[str, list[tuple[str, str]]] = {}
        listing = _Listing(entries={}, file_of={})
        for split, filename in PIDM_PAIR_FILES.items():
            path = self.root / filename
            if not path.is_file():
                continue
            lines = read_numbered_lines(path)
            split_pairs: list[tuple[str, str]] = []
            named: dict[str, str] = {}
            for number, line in lines:
                names = [part.strip() for part in line.split(",") if part.strip()]
                if len(names) < 2:
                    raise SourceError(
                        f"{path}, line {number}: expected 'target,source1[,source2...]' (two or more "
                        f"image paths separated by commas), found {line!r}"
                    )
                target, *sources = names
                for entry in (target, *sources):
                    named.setdefault(entry_key(entry), entry)
                split_pairs.extend((entry_key(source), entry_key(target)) for source in sources)
            info["files"][filename] = file_provenance(
                path, lines=len(lines), pairs=len(split_pairs)
            )
            pairs[split] = split_pairs
            listing.entries[split] = named
            listing.file_of[split] = filename
        return pairs, listing

    def _read_pair_csvs(self, info: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
        pairs: dict[str, list[tuple[str, str]]] = {}
        info["pair_files"] = {}
        for split, spellings in PAIR_CSVS.items():
            path = find_first(self.root, spellings)
            if path is None:
                continue
            rows = read_pair_csv(path)
            pairs[split] = [(entry_key(source), entry_key(target)) for source, target in rows]
            info["files"][path.name] = file_provenance(path, rows=len(rows))
            info["pair_files"][split] = path.name
        return pairs

    def _read_keypoints(self, images: list[_FoundImage], info: dict[str, Any]) -> dict[str, dict]:
        """key -> annotations, from the annotation CSVs first, then PIDM's pose/ files."""
        found_keys = {image.key for image in images}
        by_key: dict[str, list[list[float]]] = {}
        sources_read: list[str] = []
        for spellings in KEYPOINT_CSVS.values():
            path = find_first(self.root, spellings)
            if path is None:
                continue
            table = read_keypoint_csv(path, frame=KEYPOINT_FRAME)
            keyed = {entry_key(name): points for name, points in table.by_name.items()}
            for key, points in keyed.items():
                by_key.setdefault(key, points)
            info["files"][path.name] = file_provenance(
                path,
                rows=len(table.by_name) + table.malformed_rows,
                malformed_rows=table.malformed_rows,
                joints_outside_frame=table.joints_outside_frame,
                rows_without_image=sum(1 for key in keyed if key not in found_keys),
            )
            info["warnings"].extend(keypoint_table_warnings(path.name, table, KEYPOINT_FRAME))
            sources_read.append(path.name)

        pose_dir = self.root / PIDM_POSE_DIR
        if pose_dir.is_dir():
            from_pose, malformed = self._read_pidm_poses(pose_dir, images, skip=set(by_key))
            by_key.update(from_pose)
            sources_read.append(f"{PIDM_POSE_DIR}/")
            info["files"][f"{PIDM_POSE_DIR}/"] = {
                "pose_files_used": len(from_pose),
                "malformed": malformed,
            }
            if malformed:
                info["warnings"].append(
                    f"{PIDM_POSE_DIR}/: {malformed} malformed pose files skipped"
                )

        info["keypoints"] = {"from": sources_read, "frame": KEYPOINT_FRAME}
        return {
            key: {"keypoints": points, "keypoints_frame": list(KEYPOINT_FRAME)}
            for key, points in by_key.items()
        }

    def _read_pidm_poses(
        self, pose_dir: Path, images: list[_FoundImage], skip: set[str]
    ) -> tuple[dict[str, list[list[float]]], int]:
        """Pose files mirror the image tree (`pose/WOMEN/.../02_1_front.txt`) or are named
        by the flattened name (`pose/fashionWOMEN...02_1front.txt`)."""
        pose_files = {
            posixpath.splitext(p.relative_to(pose_dir).as_posix())[0]: p
            for p in sorted(pose_dir.rglob("*.txt"))
        }
        by_key: dict[str, list[list[float]]] = {}
        malformed = 0
        for image in images:
            if image.key in skip or image.key in by_key:
                continue
            path = pose_files.get(posixpath.splitext(image.relative)[0]) or pose_files.get(
                posixpath.splitext(image.flat_name)[0]
            )
            if path is None:
                continue
            try:
                by_key[image.key] = read_pidm_pose(path)
            except (OSError, UnicodeDecodeError, ValueError):
                malformed += 1
        return by_key, malformed
