"""Market-1501, as pose transfer papers use it (PATN, PG2, Deformable GAN).

Layout under `root`: `bounding_box_train/` (split "train") and/or `bounding_box_test/`
(split "test"); PATN's renamed copies `train/` and `test/` are accepted when neither exists.
`query/`, `gt_bbox/` and `gt_query/` are re-identification material and are not read.

File names are `<person id>_c<camera>s<sequence>_<frame>_<box>.jpg`, e.g.
`0002_c1s1_000451_03.jpg`: the group is the person id (`0002`), the key the name without its
extension. Person id -1 marks junk boxes and 0000 distractors: both are rejected.

Optional files in root: `market-pairs-{train,test}.csv` (header `from,to`, imported as given
into `SourceScan.pairs`) and `market-annotation-{train,test}.csv` (PATN keypoints, `:`
separated, stored as `annotations = {"keypoints": [[x, y, score]] * 18,
"keypoints_frame": [128, 64]}`, the 128x64 (height x width) frame of the release's images).
"""

from __future__ import annotations

import posixpath
import re
from typing import Any, ClassVar

from posedata.records import SourceScan
from posedata.sources.base import SourceError
from posedata.sources.common import (
    ScanBuilder,
    absolute_root,
    file_provenance,
    key_from_name,
    keypoint_table_warnings,
    list_files,
    read_keypoint_csv,
    read_pair_csv,
    require_directory,
)

EXPECTED_LAYOUT = (
    "expected bounding_box_train/ and bounding_box_test/ (or PATN's train/ and test/) holding "
    "<person id>_c<camera>s<sequence>_<frame>_<box>.jpg"
)
SPLIT_FOLDER_SETS = (
    {"train": "bounding_box_train", "test": "bounding_box_test"},
    {"train": "train", "test": "test"},
)
PAIR_CSVS = {"train": "market-pairs-train.csv", "test": "market-pairs-test.csv"}
KEYPOINT_CSVS = {"train": "market-annotation-train.csv", "test": "market-annotation-test.csv"}
KEYPOINT_FRAME = [128, 64]
JUNK_PERSON_IDS = {"-1": "junk", "0000": "distractor"}
IGNORED_FOLDERS = ("query", "gt_bbox", "gt_query")

_PERSON_ID = re.compile(r"^(-1|\d+)_")


def person_id(file_name: str) -> str | None:
    """`0002_c1s1_000451_03.jpg` -> `0002`; None when the name does not start with an id."""
    match = _PERSON_ID.match(posixpath.basename(file_name))
    return match.group(1) if match else None


class Market1501Source:
    """Market-1501. No options."""

    name: ClassVar[str] = "market1501"
    default_resolution: ClassVar[tuple[int, int]] = (128, 64)

    def __init__(self, root: str) -> None:
        self.root = absolute_root(root)

    def _split_folders(self) -> dict[str, str]:
        for folders in SPLIT_FOLDER_SETS:
            present = {split: f for split, f in folders.items() if (self.root / f).is_dir()}
            if present:
                return present
        raise SourceError(f"{self.root}: no Market-1501 layout found: {EXPECTED_LAYOUT}")

    def scan(self) -> SourceScan:
        require_directory(self.root, EXPECTED_LAYOUT)
        folders = self._split_folders()
        info: dict[str, Any] = {
            "source": self.name,
            "root": str(self.root),
            "layout": "bounding-box" if "bounding_box" in next(iter(folders.values())) else "patn",
            "image_dirs": list(folders.values()),
            "split_from": "folders",
            "ignored_folders": [f for f in IGNORED_FOLDERS if (self.root / f).is_dir()],
            "files": {},
            "warnings": [],
        }
        annotations = self._read_keypoints(info)
        builder = ScanBuilder()
        counts = {"files_found": 0, "refused_while_listing": 0}
        for split, folder in folders.items():
            listing = list_files(self.root / folder)
            counts["files_found"] += len(listing.files)
            counts["refused_while_listing"] += len(listing.refused)
            for relative, reason in listing.refused:
                builder.reject(self.root / folder / relative, reason, key_from_name(posixpath.basename(relative)), split)
            for relative in listing.files:
                path = self.root / folder / relative
                key = key_from_name(posixpath.basename(relative))
                pid = person_id(relative)
                if pid is None:
                    builder.reject(
                        path,
                        "not a Market-1501 name: expected "
                        "<person id>_c<camera>s<sequence>_<frame>_<box>.jpg",
                        key,
                        split,
                    )
                elif pid in JUNK_PERSON_IDS:
                    builder.reject(
                        path, f"Market-1501 {JUNK_PERSON_IDS[pid]} id {pid}", key, split
                    )
                else:
                    builder.add(key, split, pid, path, annotations.get(key))
        if counts["files_found"] + counts["refused_while_listing"] == 0:
            names = ", ".join(f"{f}/" for f in folders.values())
            raise SourceError(f"{self.root}: {names} hold no files; {EXPECTED_LAYOUT}")
        info["counts"] = counts
        return builder.build(self._read_pairs(info), info)

    def _read_pairs(self, info: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
        pairs: dict[str, list[tuple[str, str]]] = {}
        for split, filename in PAIR_CSVS.items():
            path = self.root / filename
            if path.is_file():
                rows = read_pair_csv(path)
                pairs[split] = [(key_from_name(s), key_from_name(t)) for s, t in rows]
                info["files"][filename] = file_provenance(path, rows=len(rows))
        return pairs

    def _read_keypoints(self, info: dict[str, Any]) -> dict[str, dict]:
        annotations: dict[str, dict] = {}
        sources_read = []
        for filename in KEYPOINT_CSVS.values():
            path = self.root / filename
            if not path.is_file():
                continue
            table = read_keypoint_csv(path, frame=KEYPOINT_FRAME)
            for name, points in table.by_name.items():
                annotations.setdefault(
                    key_from_name(name),
                    {"keypoints": points, "keypoints_frame": list(KEYPOINT_FRAME)},
                )
            info["files"][filename] = file_provenance(
                path,
                rows=len(table.by_name) + table.malformed_rows,
                malformed_rows=table.malformed_rows,
                joints_outside_frame=table.joints_outside_frame,
            )
            info["warnings"].extend(keypoint_table_warnings(filename, table, KEYPOINT_FRAME))
            sources_read.append(filename)
        info["keypoints"] = {"from": sources_read, "frame": KEYPOINT_FRAME}
        return annotations
