"""Extractor registry: one module per extractor, looked up by feature name (open_clip-style
single factory). Modules are imported lazily so `posedata inspect` never pays for torch."""

from __future__ import annotations

from typing import Any

from posedata.extractors.base import Extractor
from posedata.registry import lookup

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
    "fid_ref": "posedata.extractors.fid_ref:FidReferenceExtractor",
    "pose_latent": "posedata.extractors.pose_latent:PoseLatentExtractor",
}

# What `posedata build` computes when --features is not given: every feature that PCDMs
# (all three stages), IMAGPose, TruePose and RePoseDM consume. A feature spec is a name or
# `name:preset` (vae:sd21 = SD-2.1-base VAE for PCDMs, vae:sd15 = sd-vae-ft-mse for the
# SD-1.5 models; dinov2:giant for PCDMs, dinov2:base for IMAGPose).
DEFAULT_FEATURES = ("openpose", "clip", "vae:sd21", "vae:sd15", "dinov2:giant", "dinov2:base", "parsing", "clip_regions", "higherhrnet", "pose_latent:sd15")

# `--preset MODEL`: what one model family needs.
MODEL_PRESETS: dict[str, tuple[str, ...]] = {
    "pcdm": ("openpose", "clip", "vae:sd21", "dinov2:giant"),
    "imagpose": ("openpose:full", "vae:sd15", "dinov2:base"),  # hands: the official DWPose renders have them
    "truepose": ("openpose", "vae:sd15", "parsing", "clip_regions"),
    "reposedm": ("openpose", "vae:sd15", "higherhrnet", "pose_latent:sd15"),
}


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`vae:sd15` -> ("vae", "sd15"); `clip` -> ("clip", None)."""
    name, _, preset = spec.partition(":")
    return name, (preset or None)


def extractor_class(spec: str) -> type[Extractor]:
    name, _ = parse_spec(spec)
    return lookup(REGISTRY, name, "feature")


def extractor_options(spec: str, config: Any) -> dict[str, Any]:
    """The build / extend options an extractor declares (`build_options`) that are set in
    `config` (a BuildConfig or ExtendConfig): e.g. {"flip": True} for the VAE with --flip."""
    return {name: value for name in extractor_class(spec).build_options if (value := getattr(config, name, None))}


def create_extractor(spec: str, upstream: dict[str, str] | None = None, **kwargs) -> Extractor:
    """Build the extractor for a feature spec; `upstream` maps each feature it requires to
    the folder that feature was read from (it becomes part of the fingerprint)."""
    name, preset = parse_spec(spec)
    cls = extractor_class(name)
    if preset is not None:
        presets = getattr(cls, "PRESETS", None)
        if not presets or preset not in presets:
            choices = ", ".join(f"{name}:{p}" for p in (presets or {}))
            raise KeyError(f"feature {name!r} has no preset {preset!r}" + (f"; choose one of {choices}" if choices else ""))
        kwargs["preset"] = preset
    extractor = cls(**kwargs)
    if upstream:
        extractor.upstream = dict(upstream)
    return extractor


def dependency_order(specs: list[str]) -> list[str]:
    """Order feature specs so each comes after the features it `requires` (declared by the
    extractor class, not hard-coded here); a required feature not asked for is added."""
    ordered: list[str] = []
    visiting: set[str] = set()

    def visit(spec: str) -> None:
        if spec in ordered:
            return
        if spec in visiting:
            raise ValueError(f"feature dependency cycle through {spec!r}")
        visiting.add(spec)
        for dep in extractor_class(spec).requires:
            visit(provider(dep, specs))
        visiting.discard(spec)
        ordered.append(spec)

    for spec in specs:
        visit(spec)
    return ordered


def provider(name: str, specs: list[str]) -> str:
    """The spec in `specs` that provides feature `name` (the first one), else `name` itself."""
    return next((s for s in specs if parse_spec(s)[0] == name), name)
