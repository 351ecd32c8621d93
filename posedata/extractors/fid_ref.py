"""The reference side of FID, computed once per dataset and protocol: `fid_ref:<protocol>`.

FID compares the Inception statistics of generated images with those of a reference set
(every paper: the training images), and computing the reference is most of the work (48,674
Inception passes on DeepFashion). So it is a dataset feature like any other: one float32
[2048] pool vector per stored image, made exactly as the protocol makes its reference
images (`Protocol.truth_file` then `Protocol.fid_input`), written as sidecars by `posedata
build` / `posedata extend URL --features fid_ref:pcdms`, fingerprinted by protocol (code
version and every size / scaling rule), network weights (file digest or random seed) and
stored resolution, stored as `.npy` (no pickle). `posedata eval` reads the vectors of the
reference split, drops what the protocol drops, and takes mean and covariance (a few
seconds even for the full set), so every evaluation against the dataset reuses them.

Presets: `fid_ref:<protocol>` (torchvision Inception: the network of GFLA, PIDM, PCDMs and
CFLD) and `fid_ref:<protocol>-tf` (pytorch-fid's TF Inception: the standard `fid_tf`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from posedata.extractors.base import Extractor, OutputSpec, Sample, checked_image

FID_PROTOCOLS = ("pcdms", "cfld", "pidm", "gfla")  # PATN reports no FID
POOL_DIM = 2048


class FidReferenceExtractor(Extractor):
    name = "fid_ref"
    version = "1"
    default_model = "pytorch-fid InceptionV3 pool3"
    batch_size = 32
    PRESETS = {**{p: (p, "torchvision") for p in FID_PROTOCOLS}, **{f"{p}-tf": (p, "tf") for p in FID_PROTOCOLS}}

    def __init__(
        self,
        weights: str = "pretrained",
        model: str | None = None,
        resolution: tuple[int, int] = (256, 176),
        dtype: str = "fp32",
        seed: int = 0,
        preset: str = "pcdms",
    ) -> None:
        from posedata.eval.networks import check_weights
        from posedata.eval.protocol import create_protocol

        # No tiny Inception: `tiny` runs (tests, smoke builds) get the full one with seeded
        # random weights, the same feature `posedata eval --weights random` looks for.
        weights = "random" if weights == "tiny" else weights
        check_weights(weights)
        super().__init__(weights=weights, model=model, resolution=resolution, dtype=dtype, seed=seed)
        if preset not in self.PRESETS:
            raise KeyError(f"fid_ref has no preset {preset!r}; choose one of {', '.join(f'fid_ref:{p}' for p in self.PRESETS)}")
        self.preset = preset
        protocol_name, self.network_kind = self.PRESETS[preset]
        self.protocol = create_protocol(protocol_name, self.resolution)
        self.network = None

    @property
    def weight_role(self) -> str:
        return "tf_inception" if self.network_kind == "tf" else "inception"

    def model_label(self) -> str:
        from posedata.eval.networks import network_label

        return network_label(self.weight_role, self.weights, self.seed)

    def outputs(self) -> dict[str, OutputSpec]:
        return {"pool": OutputSpec("pool.npy", "float32", (POOL_DIM,), f"Inception pool3 features of the image under the {self.protocol.name} protocol's FID preprocessing")}

    def fingerprint_inputs(self) -> dict[str, Any]:
        inputs = super().fingerprint_inputs()
        inputs.update(
            {
                "model": self.model_label(),  # weight file digest or random seed
                "weights_digest": None,
                "dtype": "float32",  # always: FID is sensitive to the covariance's low bits
                "network": self.network_kind,
                "protocol": self.protocol.describe(),
            }
        )
        return inputs

    def setup(self, device: str) -> None:
        from posedata.eval.networks import FidNetwork

        super().setup(device)
        self.network = FidNetwork(self.network_kind, self.weights, self.seed).to(device)

    def __call__(self, batch: list[Sample]) -> list[dict[str, np.ndarray]]:
        images = [self.protocol.fid_input(self.protocol.truth_file(checked_image(s, self.name))) for s in batch]
        features = self.network.features(images, batch_size=len(images))
        return [{"pool.npy": f.astype(np.float32)} for f in features]
