"""Source registry: one module per dataset layout."""

from __future__ import annotations

from posedata.registry import lookup
from posedata.sources.base import Source, SourceError

REGISTRY: dict[str, str] = {
    "deepfashion": "posedata.sources.deepfashion:DeepFashionSource",
    "market1501": "posedata.sources.market1501:Market1501Source",
    "folder": "posedata.sources.folder:FolderSource",
}


def source_class(name: str) -> type[Source]:
    return lookup(REGISTRY, name, "source")


__all__ = ["Source", "SourceError", "source_class", "REGISTRY"]
