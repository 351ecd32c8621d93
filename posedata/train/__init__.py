"""Training plugins, one module each, looked up by name."""

from __future__ import annotations

from posedata.registry import lookup
from posedata.train.plugin import Plugin

REGISTRY: dict[str, str] = {
    "pcdm-prior": "posedata.train.pcdm_prior:PcdmPriorPlugin",
    "pcdm-inpaint": "posedata.train.pcdm_inpaint:PcdmInpaintPlugin",
    "pcdm-refine": "posedata.train.pcdm_refine:PcdmRefinePlugin",
    "reposedm": "posedata.train.reposedm:RePoseDMPlugin",
    "truepose": "posedata.train.truepose:TruePosePlugin",
    "imagpose": "posedata.train.imagpose:ImagPosePlugin",
}


def plugin_class(name: str) -> type[Plugin]:
    return lookup(REGISTRY, name, "plugin")
