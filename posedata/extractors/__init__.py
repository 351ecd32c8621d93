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
    "parsing": "posedata.extractors.parsing:ParsingExtractor",
    "clip_regions": "posedata.extractors.clip_regions:ClipRegionsExtractor",
    "vae": "posedata.extractors.vae:VaeExtractor",
    "dinov2": "posedata.extractors.dinov2:Dinov2Extractor",
    "higherhrnet": "posedata.extractors.higherhrnet:HigherHRNetExtractor",
}

# What `posedata build` computes when --features is not given.
DEFAULT_FEATURES = ("openpose", "clip")


def extractor_class(name: str) -> type[Extractor]:
    if name not in REGISTRY:
        raise KeyError(f"unknown feature {name!r}; known: {', '.join(sorted(REGISTRY))}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create_extractor(name: str, upstream: dict[str, str] | None = None, **kwargs) -> Extractor:
    """Build extractor `name`; `upstream` maps each feature it requires to the folder that
    feature was read from (it becomes part of the fingerprint)."""
    extractor = extractor_class(name)(**kwargs)
    if upstream:
        extractor.upstream = dict(upstream)
    return extractor


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
