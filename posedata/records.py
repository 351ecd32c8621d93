"""The records that flow from a source into the build, and the rejects that flow beside them.

A source never decodes pixels: it only says which files exist, which split and group each
belongs to, and which annotations came with it. Decoding happens later, inside the build's
Ray tasks, where a bad file becomes a reject instead of a crash.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

# Stages at which an input can be rejected; each reject names one of them.
STAGE_SCAN = "scan"  # the source adapter: unlisted, missing, junk id, duplicate key
STAGE_DECODE = "decode"  # reading and decoding the file
STAGE_EXTRACT = "extract"  # an extractor failed on this image

# A path whose key is itself with "/" written "__": only key characters, single
# underscores never next to a "/", and no ending that looks like the hash suffix below.
_KEY_CLEAN = re.compile(r"(?!.*__)(?!.*_/)(?!.*/_)(?!.*//)(?!/)(?!.*/$)(?!.*-[0-9a-f]{12}$)[A-Za-z0-9_\-/]*")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
KEY_HASH_DIGITS = 12


def safe_key(text: str) -> str:
    """A webdataset-safe sample key for a relative path without its extension, different
    for every different path. webdataset splits a tar member's name at its first dot, so a
    key has none and no "/": "/" is written "__" (`alice/front` -> `alice__front`). When
    any other character had to be replaced (a space, a dot, `张三`, `Café` in either Unicode
    form, an emoji) or the path is otherwise ambiguous (`a__b` next to `a/b`), the key is
    the replaced text plus `-` and the first 12 hex digits of the path's sha256
    (`a b` -> `a_b-<hash>`), so two different paths never share a key."""
    if _KEY_CLEAN.fullmatch(text):
        return text.replace("/", "__")
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:KEY_HASH_DIGITS]
    return f"{_KEY_UNSAFE.sub('_', text.replace('/', '__'))}-{digest}"


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
