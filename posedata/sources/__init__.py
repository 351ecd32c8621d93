"""Source registry: one module per dataset layout."""

from __future__ import annotations

import importlib

from posedata.sources.base import Source, SourceError

REGISTRY: dict[str, str] = {
    "deepfashion": "posedata.sources.deepfashion:DeepFashionSource",
    "market1501": "posedata.sources.market1501:Market1501Source",
    "folder": "posedata.sources.folder:FolderSource",
}


def source_class(name: str) -> type[Source]:
    if name not in REGISTRY:
        raise KeyError(f"unknown source {name!r}; known: {', '.join(sorted(REGISTRY))}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["Source", "SourceError", "source_class", "REGISTRY"]
