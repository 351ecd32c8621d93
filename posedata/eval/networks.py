"""The networks behind LPIPS and FID, loaded offline.

Real weights are read only from files the user put where torchvision, `lpips` and pytorch-fid
look for them: torch's hub cache, `$TORCH_HOME/hub/checkpoints/` (default
`~/.cache/torch/hub/checkpoints/`). posedata checks the file is there first and never lets a
library download it; a missing file is an error naming the file and the folder.
`weights="random"` builds the same architectures with seeded random weights, so the whole
evaluation runs in tests and CI (the numbers then mean nothing, but every step runs).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import torch

EVAL_WEIGHTS = ("pretrained", "random")

# What a user supplies offline, by role.
WEIGHT_FILES = {
    # torchvision inception_v3 IMAGENET1K_V1: the FID network of GFLA, PIDM, PCDMs and CFLD
    "inception": "inception_v3_google-0cc3c7bd.pth",
    # torchvision alexnet: LPIPS's backbone (lpips ships its own linear layers)
    "alexnet": "alexnet-owt-7be5be79.pth",
    # torchvision vgg16: only for LPIPS-VGG, which none of the five protocols uses
    "vgg16": "vgg16-397923af.pth",
    # pytorch-fid's port of the TensorFlow FID Inception: the standard FID (`fid_tf`)
    "tf_inception": "pt_inception-2015-12-05-6726825d.pth",
}

# GFLA's input affine, copied by PIDM, PCDMs and CFLD: it maps a [0, 1] image with the
# ImageNet mean/std the way torchvision's `transform_input` maps a normalised one.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingWeights(FileNotFoundError):
    """A weight file posedata needs is not in torch's hub cache (nothing is downloaded)."""


def checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def weight_file(role: str) -> Path:
    path = checkpoint_dir() / WEIGHT_FILES[role]
    if not path.is_file():
        home = os.environ.get("TORCH_HOME")
        where = f"TORCH_HOME={home}" if home else "TORCH_HOME is not set, so torch looks under ~/.cache/torch"
        raise MissingWeights(
            f"{path}: missing ({role} weights; {where}). posedata downloads no weights: copy {WEIGHT_FILES[role]} "
            f"into {path.parent}/ (or point TORCH_HOME at the folder that holds hub/checkpoints/), or run with --weights random"
        )
    return path


def weights_digest(path: Path) -> str:
    """Name, size and the first MiB of a weight file: enough to tell two files apart cheaply."""
    h = hashlib.sha256(path.name.encode())
    h.update(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def network_label(role: str, weights: str, seed: int) -> str:
    """What a fingerprint records about a network: its file (and digest) or its random seed."""
    if weights == "pretrained":
        path = weight_file(role)
        return f"{path.name}@{weights_digest(path)}"
    return f"random-init:{role}:seed{seed}"


def check_weights(weights: str) -> None:
    if weights not in EVAL_WEIGHTS:
        raise ValueError(f"weights must be one of {EVAL_WEIGHTS}, got {weights!r} (the metric networks have no tiny variant)")


# ---- LPIPS --------------------------------------------------------------------------------------


def lpips_network(weights: str = "pretrained", seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    """`lpips.LPIPS(net="alex")`, version 0.1, the model every protocol here uses. Called as
    `net(a, b)` on [-1, 1] float tensors [B, 3, H, W]; returns [B, 1, 1, 1]."""
    import lpips

    check_weights(weights)
    with warnings.catch_warnings():  # lpips 0.1.4 still calls torchvision with `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        if weights == "pretrained":
            weight_file("alexnet")  # torchvision then loads it from the hub cache
            net = lpips.LPIPS(net="alex", version="0.1", verbose=False)
        else:
            torch.manual_seed(seed)
            net = lpips.LPIPS(pretrained=False, net="alex", version="0.1", pnet_rand=True, verbose=False)
        with torch.no_grad():  # LPIPS's training keeps its linear weights non-negative
            for p in net.lins.parameters():
                p.abs_()
    return net.eval().requires_grad_(False).to(device)


# ---- Inception ----------------------------------------------------------------------------------


class FidNetwork(torch.nn.Module):
    """pytorch-fid's `InceptionV3([3])`: [0, 1] images [B, 3, H, W] -> pool features [B, 2048].

    `kind="torchvision"`: torchvision's Inception (IMAGENET1K_V1) with GFLA's affine and no
    other scaling (`normalize_input=False, use_fid_inception=False`): the network of GFLA,
    PIDM, PCDMs and CFLD. `kind="tf"`: pytorch-fid's default, the TF FID Inception with
    inputs scaled to [-1, 1]: the standard FID (`fid_tf`). Both resize to 299 x 299
    bilinearly (align_corners=False) first; the affine commutes with that resize.
    """

    KINDS = ("torchvision", "tf")

    def __init__(self, kind: str = "torchvision", weights: str = "pretrained", seed: int = 0):
        super().__init__()
        from pytorch_fid.inception import InceptionV3

        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        check_weights(weights)
        self.kind = kind
        tf = kind == "tf"
        with _keep_tf_classifier() as kept:
            if weights == "pretrained":
                weight_file("tf_inception" if tf else "inception")  # the library loads it from the hub cache
                self.inception = InceptionV3([3], resize_input=True, normalize_input=tf, use_fid_inception=tf)
            else:
                torch.manual_seed(seed)
                with _no_download():
                    self.inception = InceptionV3([3], resize_input=True, normalize_input=tf, use_fid_inception=tf)
                for m in self.inception.modules():  # He init: activations keep their scale through 94 layers
                    if isinstance(m, torch.nn.Conv2d):
                        torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        # The TF Inception's 1008-way classifier (in the same weight file; pytorch-fid drops it
        # after loading): the Inception Score's logits. None for the torchvision kind.
        self.classifier = kept[0].fc if kept else None
        self.register_buffer("scale", torch.tensor([s / 0.5 for s in IMAGENET_STD]).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor([(m - 0.5) / 0.5 for m in IMAGENET_MEAN]).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        x = images01 if self.kind == "tf" else images01 * self.scale + self.shift
        return self.inception(x)[0].flatten(1)

    def features(self, images: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """[0, 1] float32 HxWx3 arrays (all one size) -> float32 [N, 2048]."""
        device = self.scale.device
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.stack(images[start : start + batch_size])).permute(0, 3, 1, 2).float()
            with torch.no_grad():
                out.append(self(batch.to(device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048), np.float32)

    def class_logits(self, features: np.ndarray) -> np.ndarray:
        """Pool features [N, 2048] -> the TF Inception's 1008 class logits, float64.

        As the Inception Score script every paper copies (OpenAI's `inception_score.py`):
        `matmul(pool_3, W)` with the weight of `softmax/logits/MatMul`, no bias."""
        if self.classifier is None:
            raise ValueError("class logits need the TF Inception (kind='tf'); the torchvision kind keeps no classifier")
        weight = self.classifier.weight.detach().double().cpu().numpy()
        return np.asarray(features, np.float64) @ weight.T


@contextlib.contextmanager
def _keep_tf_classifier() -> Iterator[list[torch.nn.Module]]:
    """Keep the full TF Inception pytorch-fid builds (and loads) inside `InceptionV3`, whose
    `fc` it would otherwise discard: one loader for FID's pool features and IS's logits."""
    import pytorch_fid.inception as pfi

    kept: list[torch.nn.Module] = []
    original = pfi.fid_inception_v3

    def keeping(*args, **kwargs):
        kept.append(original(*args, **kwargs))
        return kept[-1]

    with mock.patch.object(pfi, "fid_inception_v3", keeping):
        yield kept


@contextlib.contextmanager
def _no_download() -> Iterator[None]:
    """pytorch-fid builds its networks only with downloaded weights: let it build the same
    architecture and skip the weights (the caller initialises them)."""
    import pytorch_fid.inception as pfi
    from torchvision.models.inception import Inception3

    original = pfi._inception_v3

    def architecture_only(*args, **kwargs):
        kwargs["weights"] = None
        return original(*args, **kwargs)

    with (
        mock.patch.object(pfi, "_inception_v3", architecture_only),
        mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(Inception3, "load_state_dict", lambda self, *a, **k: None),
    ):
        yield
