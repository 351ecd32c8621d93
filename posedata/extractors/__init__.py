"""Extractor registry: one module per extractor, looked up by feature name (open_clip-style
single factory). Modules are imported lazily so `posedata inspect` never pays for torch."""

from __future__ import annotations

import importlib

from posedata.extractors.base import Extractor

# feature name -> "module:Class"
REGISTRY: dict[str, str] = {
    "openpose": "posedata.extractors.openpose:OpenPoseExtractor",
    "clip": "posedata.extractors.clip:ClipExtractor",
    "keypoints_annotated": "posedata.extractors.keypoints_annotated:AnnotatedKeypoints",
}

# What `posedata build` computes when --features is not given.
DEFAULT_FEATURES = ("openpose", "clip")


def extractor_class(name: str) -> type[Extractor]:
    if name not in REGISTRY:
        raise KeyError(f"unknown feature {name!r}; known: {', '.join(sorted(REGISTRY))}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create_extractor(name: str, **kwargs) -> Extractor:
    return extractor_class(name)(**kwargs)


def dependency_order(names: list[str]) -> list[str]:
    """Order features so each comes after the features it `requires` (declared by the
    extractor class, not hard-coded here); required features not asked for are added."""
    ordered: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in ordered:
            return
        if name in visiting:
            raise ValueError(f"feature dependency cycle through {name!r}")
        visiting.add(name)
        for dep in extractor_class(name).requires:
            visit(dep)
        visiting.discard(name)
        ordered.append(name)

    for n in names:
        visit(n)
    return ordered
