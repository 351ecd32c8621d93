"""The one protocol every extractor follows, and the fingerprint that names its output.

An extractor is a frozen model (or a pure function of the source's annotations) that maps a
batch of decoded images at the stored resolution to one dict of arrays per image. The build
job runs any list of them and never knows which model is inside (datatrove's steps vs
executors): it asks each for its `outputs()`, calls `setup(device)` once per actor and then
`__call__` on batches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from posedata.storage import card_output

WEIGHTS_MODES = ("pretrained", "random", "tiny")

# Key of the optional per-sample notes in an extractor's result dict.
NOTES = "__notes__"

# Below this many detected joints a person counts as partly out of frame / occluded.
FEW_JOINTS = 8


@dataclass(frozen=True)
class OutputSpec:
    """One file per sample in the feature's sidecar tar: `<key>.<suffix>`.

    `suffix` ends in `.npy` (array, stored in `dtype` with allow_pickle=False) or `.png`
    (uint8 image). `shape` is documentation for the card, with H and W standing for the
    stored resolution and M for a count that varies per sample.
    """

    suffix: str
    dtype: str
    shape: tuple[Any, ...]
    description: str = ""

    @property
    def is_png(self) -> bool:
        return self.suffix.endswith(".png")


class Sample(dict):
    """What an extractor sees of one image: `key`, `image` (uint8 [H, W, 3] at the stored
    resolution), `annotations` (from the source, in the frame they came in:
    `annotations["keypoints_frame"]`, or the original image when that is None),
    `original_size` ((H0, W0) of the source file) and, for each feature it `requires`, that
    feature's outputs as `{suffix: array}` under the feature's name."""


def fingerprint(payload: dict[str, Any]) -> str:
    """First 12 hex digits of sha256 over canonical JSON (docs/design.md §4)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


class ExtractorError(RuntimeError):
    """Raised by an extractor for one image it cannot process; the build rejects that image."""


def checked_image(sample: Sample, feature: str) -> np.ndarray:
    """The sample's image, which every extractor expects as uint8 [H, W, 3] RGB."""
    image = sample["image"]
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        raise ExtractorError(f"{feature}: {sample.get('key', '?')}: expected uint8 [H, W, 3], got {getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
    return image


class Extractor:
    """Base class. Subclasses set the class attributes and implement the four methods.

    Weights (`weights`): "pretrained" loads real weights with `from_pretrained` from
    `model` (a hub id or a local directory; the default is the class's `default_model`);
    "random" builds the full-size architecture with seeded random weights (benchmarks);
    "tiny" builds a tiny config of the same architecture (tests, CPU smoke runs).
    """

    name: ClassVar[str]
    # Bump when the code changes what is written: it is part of the fingerprint.
    version: ClassVar[str] = "1"
    default_model: ClassVar[str] = ""
    # Features this extractor reads from the sample (the build orders extractors by these).
    requires: ClassVar[tuple[str, ...]] = ()
    batch_size: ClassVar[int] = 16
    # True when the extractor runs a neural network (False: pure function of annotations).
    uses_model: ClassVar[bool] = True
    # Options of `posedata build` / `extend` (BuildConfig / ExtendConfig fields) this extractor
    # takes as keyword arguments when they are set, e.g. the VAE's ("flip",).
    build_options: ClassVar[tuple[str, ...]] = ()
    # Folders of the features this one was computed from (set by `create_extractor`): part of
    # the fingerprint, so regions cut from another parser's maps get another folder.
    upstream: dict[str, str] = {}

    def __init__(
        self,
        weights: str = "pretrained",
        model: str | None = None,
        resolution: tuple[int, int] = (512, 352),
        dtype: str = "fp16",
        seed: int = 0,
    ) -> None:
        if weights not in WEIGHTS_MODES:
            raise ValueError(f"weights must be one of {WEIGHTS_MODES}, got {weights!r}")
        self.weights = weights
        self.model_id = model or self.default_model
        self.resolution = tuple(resolution)
        self.dtype = dtype
        self.seed = seed
        self.device = "cpu"

    # ---- what the build asks of every extractor -------------------------------------------

    def fingerprint_inputs(self) -> dict[str, Any]:
        """Everything that changes the output: model id, revision or weights hash,
        preprocessing, resolution, dtype. Subclasses extend this dict."""
        return {
            "feature": self.name,
            "code_version": self.version,
            "model": self.model_label(),
            "weights_digest": local_weights_digest(self.model_id) if self.weights == "pretrained" else None,
            "resolution": list(self.resolution),
            "dtype": self.dtype,
            **({"upstream": dict(sorted(self.upstream.items()))} if self.upstream else {}),
        }

    def fingerprint(self) -> str:
        return fingerprint(self.fingerprint_inputs())

    @property
    def folder(self) -> str:
        """The feature's folder name inside `features/`: `<name>@<fp>`."""
        return f"{self.name}@{self.fingerprint()}"

    def model_label(self) -> str:
        if self.weights == "pretrained":
            return self.model_id
        return f"{self.weights}-init:{self.model_id}:seed{self.seed}"

    def outputs(self) -> dict[str, OutputSpec]:
        raise NotImplementedError

    def setup(self, device: str) -> None:
        """Load the model onto `device`. Called once per actor, never on the driver."""
        self.device = device

    def __call__(self, batch: list[Sample]) -> list[dict[str, np.ndarray]]:
        """One dict per sample, keyed by output suffix (`"keypoints.npy"`, `"skeleton.png"`).
        A result may also carry `NOTES`: a list of short notes about that sample ("no person",
        "several people") that the build counts and `posedata inspect` shows."""
        raise NotImplementedError

    def null_embedding(self) -> dict[str, np.ndarray] | None:
        """The output for an all-zero input after preprocessing (for CFG dropout), or None
        for features that are not embeddings. Called after setup()."""
        return None

    def card(self) -> dict[str, Any]:
        """What the dataset card records about this feature."""
        return {
            "name": self.name,
            "preset": getattr(self, "preset", None),
            "fingerprint": self.fingerprint(),
            "folder": self.folder,
            "weights": self.weights,
            "model": self.model_label(),
            "dtype": self.dtype,
            "requires": list(self.requires),
            # bf16 / fp8 outputs list the plain-numeric members that hold them (posedata.storage)
            "outputs": {s.suffix: card_output(s.suffix, s.dtype, s.shape, s.description) for s in self.outputs().values()},
            "fingerprint_inputs": self.fingerprint_inputs(),
        }


def torch_dtype(name: str):
    import torch

    # fp8 storage computes in fp16; the per-tensor fp8 packing happens when the output is stored
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.float16}[name]


def numpy_store_dtype(name: str) -> np.dtype:
    """The numpy dtype an extractor returns float outputs in. numpy has no bfloat16 or fp8:
    for those the extractor returns float32 (bf16-rounded for bf16) and the build packs them
    (`posedata.storage`: bf16 as uint16 bits, fp8 as e4m3 bits + a per-tensor scale)."""
    return {"fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32), "bf16": np.dtype(np.float32), "fp8": np.dtype(np.float32)}[name]


def stored_dtype_label(name: str) -> str:
    """What the card says a float output is stored as; outputs declared with this label
    follow the dataset's --dtype (the build packs bf16 and fp8 ones)."""
    return {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16", "fp8": "float8_e4m3fn"}[name]


def local_weights_digest(model: str) -> str | None:
    """For a local model directory: a hash over its files' names, sizes and first MiB, so two
    different local checkpoints never share a fingerprint (hub ids carry their revision
    instead). None when `model` is not a local directory."""
    import os

    if not os.path.isdir(model):
        return None
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(model)):
        for f in sorted(files):
            path = os.path.join(root, f)
            h.update(os.path.relpath(path, model).encode())
            h.update(str(os.path.getsize(path)).encode())
            with open(path, "rb") as fh:
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:12]


def file_digest(path: str) -> str:
    """Name, size and first MiB of one weights file (cf. local_weights_digest for folders)."""
    import os

    h = hashlib.sha256()
    h.update(os.path.basename(path).encode())
    h.update(str(os.path.getsize(path)).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
    return h.hexdigest()[:12]


def resolve_preset(presets: dict[str, dict[str, Any]], default: str, preset: str | None, model: str | None) -> str:
    """`preset=` names one; `model=` equal to a preset's hub id selects that preset; any other
    model (a local directory, another hub id) keeps the named or default preset's
    architecture facts for random/tiny modes."""
    if preset is not None and preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(sorted(presets))}")
    by_model = [name for name, spec in presets.items() if model is not None and spec["model"] == model]
    if by_model:
        if preset is not None and preset != by_model[0]:
            raise ValueError(f"model {model!r} is preset {by_model[0]!r}, not {preset!r}")
        return by_model[0]
    return preset or default

