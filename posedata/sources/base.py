"""The one protocol every source adapter follows."""

from __future__ import annotations

from typing import ClassVar, Protocol

from posedata.errors import PosedataError
from posedata.records import SourceScan


class SourceError(PosedataError, ValueError):
    """A source cannot be read at all (missing root, unknown layout). The message is one line
    that says what was expected, so the CLI can print it as it is."""


class Source(Protocol):
    name: ClassVar[str]
    # (height, width) used when --res is not given, as the papers write it
    default_resolution: ClassVar[tuple[int, int]]

    def scan(self) -> SourceScan:
        """List every input: each ends up in `records` or in `rejects`, never nowhere."""
        ...
