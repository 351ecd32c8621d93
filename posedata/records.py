"""The records that flow from a source into the build, and the rejects that flow beside them.

A source never decodes pixels: it only says which files exist, which split and group each
belongs to, and which annotations came with it. Decoding happens later, inside the build's
Ray tasks, where a bad file becomes a reject instead of a crash.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

# Stages at which an input can be rejected; each reject names one of them.
STAGE_SCAN = "scan"  # the source adapter: unlisted, missing, junk id, duplicate key
STAGE_DECODE = "decode"  # reading and decoding the file
STAGE_EXTRACT = "extract"  # an extractor failed on this image

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def safe_key(text: str) -> str:
    """A webdataset-safe sample key: webdataset splits a tar member's name at its first dot,
    so a key must have none; slashes are flattened so a key is one path component."""
    return _KEY_UNSAFE.sub("_", text.replace("/", "__"))


@dataclass
class Record:
    """One input image as a source describes it.

    `annotations` holds what the dataset ships beside the image (e.g. keypoints from
    `fasion-resize-annotation-*.csv`): `{"keypoints": [[x, y, score]] * 18,
    "keypoints_frame": [height, width]}` with coordinates in that frame.
    """

    key: str
    split: str
    group: str
    path: str
    annotations: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Reject:
    """An input that did not make it into the dataset, and why (in words a person understands)."""

    path: str
    stage: str
    reason: str
    key: str = ""
    split: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SourceScan:
    """What a source found: records, rejects, and the pair lists it shipped (if any).

    `pairs` maps split -> list of (source_key, target_key); None for a split means "none
    shipped", and the build generates all ordered pairs within each group instead.
    `info` is free-form provenance written into the dataset card (layout detected, files
    read, their sha256).
    """

    records: list[Record]
    rejects: list[Reject]
    pairs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def has_keypoint_annotations(self) -> bool:
        return any("keypoints" in r.annotations for r in self.records)
