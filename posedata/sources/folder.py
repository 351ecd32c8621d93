"""Any directory tree of photos.

Every file under `root` is an input (its bytes decide whether it is an image: a file that
is not becomes a "not an image" reject at decode); hidden files and folders, folders that
cannot be listed and anything that is not a regular file (a named pipe, a broken symlink)
are rejects of the scan. A file is keyed by its path relative to root without the extension
(`alice/look_1/front.jpg` -> key `alice__look_1__front`; see `safe_key` for names that need
characters replaced). Two files whose keys collide (`a/b.jpg` and `a/b.png`) keep one, a
photo extension before any other and then the first in path order; the other is rejected
as a duplicate.

Group: by default the parent folder relative to root (files directly in root take the root
folder's name). With `group_regex`, the regex is searched in the relative posix path and the
group is its named group `group`, else its group 1, else the whole match; a file whose path
does not match is rejected.

Split: "train", except that `test_fraction` of the GROUPS go to "test". A group is held out
when sha1(f"{seed}:{group}"), read as a fraction in [0, 1), is below `test_fraction`: the
choice depends on the group name alone, so it never splits a group, does not change when
other groups are added or removed, and is the same on every machine.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from typing import Any, ClassVar

from posedata.records import SourceScan
from posedata.sources.base import SourceError
from posedata.sources.common import (
    ScanBuilder,
    absolute_root,
    key_from_name,
    list_files,
    require_directory,
)

EXPECTED_LAYOUT = "expected a folder holding photos (any format Pillow reads: JPEG, PNG, WebP, HEIC, ...)"


def group_fraction(group: str, seed: int = 0) -> float:
    """Where a group falls in [0, 1): the first 8 bytes of sha1(f"{seed}:{group}")."""
    digest = hashlib.sha1(f"{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class FolderSource:
    """A folder of photos. Options: `group_regex` (str or None), `test_fraction` (float in
    [0, 1], default 0.0), `seed` (int, default 0) - see the module docstring."""

    name: ClassVar[str] = "folder"
    default_resolution: ClassVar[tuple[int, int]] = (512, 352)

    def __init__(
        self,
        root: str,
        *,
        group_regex: str | None = None,
        test_fraction: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.root = absolute_root(root)
        self.group_pattern = self._compile(group_regex)
        if not 0.0 <= float(test_fraction) <= 1.0:
            raise SourceError(f"test_fraction must be between 0 and 1, got {test_fraction}")
        self.test_fraction = float(test_fraction)
        self.seed = int(seed)

    @staticmethod
    def _compile(group_regex: str | None) -> re.Pattern[str] | None:
        if group_regex is None:
            return None
        try:
            return re.compile(group_regex)
        except re.error as error:
            raise SourceError(
                f"group_regex {group_regex!r} is not a valid regex: {error}"
            ) from None

    def group_of(self, relative: str) -> str | None:
        """The group of a path relative to root, or None when group_regex does not match."""
        if self.group_pattern is None:
            parent = posixpath.dirname(relative)
            return parent if parent else self.root.name
        match = self.group_pattern.search(relative)
        if match is None:
            return None
        if "group" in self.group_pattern.groupindex:
            return match.group("group")
        return match.group(1) if self.group_pattern.groups else match.group(0)

    def split_of(self, group: str) -> str:
        return "test" if group_fraction(group, self.seed) < self.test_fraction else "train"

    def scan(self) -> SourceScan:
        require_directory(self.root, EXPECTED_LAYOUT)
        listing = list_files(self.root)
        if not listing.files and not listing.refused:
            raise SourceError(f"{self.root}: no files found; {EXPECTED_LAYOUT}")
        builder = ScanBuilder()
        for relative, reason in listing.refused:
            builder.reject(self.root / relative, reason, key_from_name(relative))
        regex = f"'{self.group_pattern.pattern}'" if self.group_pattern else None
        for relative in listing.files:
            path = self.root / relative
            key = key_from_name(relative)
            group = self.group_of(relative)
            if group is None:
                builder.reject(path, f"path does not match group_regex {regex}", key)
            elif not group:
                builder.reject(path, f"group_regex {regex} matched an empty group", key)
            else:
                builder.add(key, self.split_of(group), group, path)
        info: dict[str, Any] = {
            "source": self.name,
            "root": str(self.root),
            "layout": "folder",
            "group_from": f"group_regex {regex}" if regex else "parent folder",
            "split_from": (
                f"sha1 of the group name, seed {self.seed}, test_fraction {self.test_fraction}"
                if self.test_fraction > 0
                else "none (all train)"
            ),
            "options": {
                "group_regex": self.group_pattern.pattern if self.group_pattern else None,
                "test_fraction": self.test_fraction,
                "seed": self.seed,
            },
            "files": {},
            "counts": {"files_found": len(listing.files), "refused_while_listing": len(listing.refused)},
            "warnings": [],
        }
        scan = builder.build({}, info)
        # Few groups and a small fraction can hold out nothing: say so rather than surprise.
        splits = sorted(scan.info["counts"]["records_by_split"])
        if self.test_fraction > 0 and splits != ["test", "train"]:
            groups = len({record.group for record in scan.records})
            scan.info["warnings"].append(
                f"test_fraction {self.test_fraction} over {groups} groups "
                f"gave only split(s) {splits}"
            )
        return scan
