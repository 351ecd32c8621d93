"""HigherHRNet-W32 (Cheng et al., CVPR 2020) as a plain, differentiable torch module.

The network is timm's maintained HRNet (`timm.models.hrnet`, the `hrnet_w32` config) as the
backbone plus the small HigherHRNet head written here, so a training plugin (RePoseDM's
pose-alignment loss) can run it on generated pose maps and back-propagate through it.

Facts from the official code, HRNet/HigherHRNet-Human-Pose-Estimation
(`lib/models/pose_higher_hrnet.py`, `experiments/coco/higher_hrnet/w32_512_adam_lr1e-3.yaml`,
`lib/core/inference.py`, `lib/core/group.py`, `lib/config/default.py`, `tools/valid.py`):

- Backbone: HRNet-W32 stem (two 3x3 stride-2 convs, 64 channels), layer1 = 4 Bottlenecks
  (64 -> 256), stages 2/3/4 with 1/4/3 modules of 4 BasicBlocks per branch and branch widths
  32/64/128/256. Stage 4's last module fuses to the highest-resolution branch only
  (`multi_scale_output=False`): its output y_list[0] is [B, 32, H/4, W/4].
- Head: `final_layers[0]` 1x1 conv 32 -> 34 (17 heatmaps + 17 tag maps, TAG_PER_JOINT) on
  y_list[0]; `deconv_layers[0]` = cat(y_list[0], that output) (66 channels) ->
  ConvTranspose2d(4x4, stride 2, padding 1, no bias) + BN + ReLU -> 32 channels, then 4
  BasicBlocks; `final_layers[1]` 1x1 conv 32 -> 17 heatmaps at 1/2 resolution (WITH_AE_LOSS
  [True, False]: no tags there).
- Test-time aggregation (`get_multi_stage_outputs`, PROJECT2IMAGE True): the 1/4 output
  (heatmaps and tags) is bilinearly upsampled (align_corners=False) to the 1/2 output's size,
  the heatmaps are averaged with the 1/2 ones, then heatmaps and tags go to the input size.
- Grouping (`HeatmapParser`): NMS by 5x5 max-pool (NMS_KERNEL 5, NMS_PADDING 2 in the W32-512
  config), top 30 (MAX_NUM_PEOPLE) peaks per joint, DETECTION_THRESHOLD 0.1, TAG_THRESHOLD 1.0,
  person score = mean of the 17 joint values, quarter-pixel `adjust`, `refine` of missing joints
  from the person's mean tag.
- Input: RGB, ToTensor (/255) then Normalize with the ImageNet mean/std.

Key names. timm's HRNet is a port of the same Microsoft code and keeps its module names
(`conv1`, `bn1`, `conv2`, `bn2`, `layer1.*`, `transition1..3.*`, `stage2..4.*`), so an official
checkpoint key `X` of the backbone is our `backbone.X`, and `final_layers.*` / `deconv_layers.*`
are our `head.final_layers.*` / `head.deconv_layers.*` (the head below uses the official module
layout). timm builds stage 4's last module with every output branch; we drop the fuse layers of
branches 1-3 there (they are not in the official network and their outputs are never used), so
the two state dicts map one-to-one. tests/test_higherhrnet.py checks the mapped key list and
shapes against a digest of the official network's state dict.

`decode_single_person` is a deliberately small stand-in for the official associative-embedding
grouping; see its docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

COCO17_NAMES: tuple[str, ...] = (
    "nose", "l_eye", "r_eye", "l_ear", "r_ear",
    "l_shoulder", "r_shoulder", "l_elbow", "r_elbow", "l_wrist", "r_wrist",
    "l_hip", "r_hip", "l_knee", "r_knee", "l_ankle", "r_ankle",
)
NUM_JOINTS = len(COCO17_NAMES)

# tools/valid.py: torchvision Normalize after ToTensor, on RGB (COCODataset converts BGR->RGB).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# HRNet's four branches halve the resolution three times after the stride-4 stem: inputs must be
# a multiple of 32 (the official test resizes to multiples of 64). We pad right/bottom with black
# pixels, as the official cv2.warpAffine resize pads with 0 before normalisation.
INPUT_MULTIPLE = 32
FEATURE_STRIDE = 4
BN_MOMENTUM = 0.1

# Test-time constants of the W32-512 experiment (yaml TEST section, defaults from default.py).
NMS_KERNEL = 5
DETECTION_THRESHOLD = 0.1
TAG_THRESHOLD = 1.0
MAX_NUM_PEOPLE = 30

OFFICIAL_WEIGHTS_FILE = "pose_higher_hrnet_w32_512.pth"

# The official W32 stage configs (w32_512_adam_lr1e-3.yaml MODEL.EXTRA), in timm's cfg format.
# timm's `hrnet_w32` config is the same (checked by the tests); TINY shrinks it for CPU tests
# but keeps the 32-channel highest-resolution branch, so features keep their shape.
W32_BACKBONE: dict[str, Any] = {
    "stem_width": 64,
    "stage1": {"num_modules": 1, "num_branches": 1, "block_type": "BOTTLENECK", "num_blocks": (4,), "num_channels": (64,), "fuse_method": "SUM"},
    "stage2": {"num_modules": 1, "num_branches": 2, "block_type": "BASIC", "num_blocks": (4, 4), "num_channels": (32, 64), "fuse_method": "SUM"},
    "stage3": {"num_modules": 4, "num_branches": 3, "block_type": "BASIC", "num_blocks": (4, 4, 4), "num_channels": (32, 64, 128), "fuse_method": "SUM"},
    "stage4": {"num_modules": 3, "num_branches": 4, "block_type": "BASIC", "num_blocks": (4, 4, 4, 4), "num_channels": (32, 64, 128, 256), "fuse_method": "SUM"},
}
TINY_BACKBONE: dict[str, Any] = {
    "stem_width": 16,
    "stage1": {"num_modules": 1, "num_branches": 1, "block_type": "BOTTLENECK", "num_blocks": (1,), "num_channels": (8,), "fuse_method": "SUM"},
    "stage2": {"num_modules": 1, "num_branches": 2, "block_type": "BASIC", "num_blocks": (1, 1), "num_channels": (32, 16), "fuse_method": "SUM"},
    "stage3": {"num_modules": 1, "num_branches": 3, "block_type": "BASIC", "num_blocks": (1, 1, 1), "num_channels": (32, 16, 16), "fuse_method": "SUM"},
    "stage4": {"num_modules": 1, "num_branches": 4, "block_type": "BASIC", "num_blocks": (1, 1, 1, 1), "num_channels": (32, 16, 16, 16), "fuse_method": "SUM"},
}


@dataclass(frozen=True)
class HigherHRNetConfig:
    """Architecture of one HigherHRNet: the timm HRNet cfg plus the head's sizes."""

    name: str
    backbone: dict[str, Any] = field(default_factory=lambda: dict(W32_BACKBONE))
    num_joints: int = NUM_JOINTS
    tag_per_joint: bool = True
    deconv_channels: int = 32
    deconv_kernel: int = 4
    num_basic_blocks: int = 4
    final_conv_kernel: int = 1

    @property
    def feature_channels(self) -> int:
        return int(self.backbone["stage4"]["num_channels"][0])

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backbone": "timm.models.hrnet.HighResolutionNetFeatures",
            "backbone_cfg": self.backbone,
            "num_joints": self.num_joints,
            "tag_per_joint": self.tag_per_joint,
            "deconv_channels": self.deconv_channels,
            "deconv_kernel": self.deconv_kernel,
            "num_basic_blocks": self.num_basic_blocks,
            "final_conv_kernel": self.final_conv_kernel,
        }


W32_CONFIG = HigherHRNetConfig(name="higherhrnet-w32")
TINY_CONFIG = HigherHRNetConfig(name="higherhrnet-tiny", backbone=dict(TINY_BACKBONE), num_basic_blocks=1)


# ---- network ---------------------------------------------------------------------------------


def build_hrnet_backbone(config: HigherHRNetConfig) -> nn.Module:
    """timm's HRNet returning only the stage-4 highest-resolution branch ([B, C, H/4, W/4]).

    W32 is `timm.create_model("hrnet_w32", features_only=True, feature_location="")` (the
    registered config, no timm weights: the COCO weights come from the HigherHRNet checkpoint);
    other configs build the same class with their own cfg. Stage 4's last module is then cut to
    the official `multi_scale_output=False` form (fuse layers for output branch 0 only).
    """
    import timm
    from timm.models.hrnet import HighResolutionNetFeatures

    if config.backbone == W32_BACKBONE:
        backbone = timm.create_model(
            "hrnet_w32", pretrained=False, features_only=True, feature_location="", out_indices=(1,)
        )
    else:
        backbone = HighResolutionNetFeatures(dict(config.backbone), feature_location="", out_indices=(1,))
    last = backbone.stage4[-1]
    last.fuse_layers = last.fuse_layers[:1]
    last.multi_scale_output = False
    return backbone


class BasicBlock(nn.Module):
    """The official HRNet BasicBlock (same parameter names: conv1, bn1, conv2, bn2)."""

    expansion = 1

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class HigherHRNetHead(nn.Module):
    """final_layers[0] (1/4: heatmaps + tags), one deconv module, final_layers[1] (1/2: heatmaps).

    Module layout and names as `PoseHigherResolutionNet._make_final_layers` /
    `_make_deconv_layers` for NUM_DECONVS 1, CAT_OUTPUT [True], WITH_AE_LOSS [True, False]
    (every published COCO / CrowdPose config)."""

    def __init__(self, config: HigherHRNetConfig) -> None:
        super().__init__()
        in_channels = config.feature_channels
        joints = config.num_joints
        dim_tag = joints if config.tag_per_joint else 1
        kernel = config.final_conv_kernel
        padding = 1 if kernel == 3 else 0
        out0 = joints + dim_tag
        self.final_layers = nn.ModuleList(
            [
                nn.Conv2d(in_channels, out0, kernel, 1, padding),
                nn.Conv2d(config.deconv_channels, joints, kernel, 1, padding),
            ]
        )
        deconv_padding, output_padding = {4: (1, 0), 3: (1, 1), 2: (0, 0)}[config.deconv_kernel]
        layers: list[nn.Module] = [
            nn.Sequential(
                nn.ConvTranspose2d(
                    in_channels + out0,
                    config.deconv_channels,
                    config.deconv_kernel,
                    stride=2,
                    padding=deconv_padding,
                    output_padding=output_padding,
                    bias=False,
                ),
                nn.BatchNorm2d(config.deconv_channels, momentum=BN_MOMENTUM),
                nn.ReLU(inplace=True),
            )
        ]
        layers += [nn.Sequential(BasicBlock(config.deconv_channels)) for _ in range(config.num_basic_blocks)]
        self.deconv_layers = nn.ModuleList([nn.Sequential(*layers)])

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y0 = self.final_layers[0](features)
        x = self.deconv_layers[0](torch.cat((features, y0), 1))
        return y0, self.final_layers[1](x)


class HigherHRNetOutput(NamedTuple):
    features: torch.Tensor  # [B, 32, H/4, W/4]: stage-4 highest-resolution branch (= head input)
    heatmaps_quarter: torch.Tensor  # [B, 17, H/4, W/4]
    tags: torch.Tensor  # [B, 17, H/4, W/4] associative-embedding tags (1-D per joint)
    heatmaps_half: torch.Tensor  # [B, 17, H/2, W/2]


class HigherHRNet(nn.Module):
    """HigherHRNet = timm HRNet backbone + HigherHRNet head. Input: normalised RGB [B, 3, H, W]
    with H, W multiples of 32 (see `prepare_input`)."""

    def __init__(self, config: HigherHRNetConfig = W32_CONFIG) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_hrnet_backbone(config)
        self.head = HigherHRNetHead(config)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pose feature map: stage-4 highest-resolution branch, [B, 32, H/4, W/4]. It is also
        exactly the input of the 1/4 heatmap head (`final_layers[0]`)."""
        return self.backbone(x)[0]

    def forward(self, x: torch.Tensor) -> HigherHRNetOutput:
        features = self.forward_features(x)
        y0, y1 = self.head(features)
        joints = self.config.num_joints
        return HigherHRNetOutput(features, y0[:, :joints], y0[:, joints:], y1)

    def pose_features(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable pose features of RGB images in [0, 1], [B, 3, H, W] (e.g. a rendered
        skeleton): normalise, pad to a multiple of 32, backbone, crop back to
        [B, 32, ceil(H/4), ceil(W/4)]. What the extractor stores as `pose_features.npy`."""
        height, width = images.shape[-2:]
        features = self.forward_features(prepare_input(images))
        return features[..., : math.ceil(height / FEATURE_STRIDE), : math.ceil(width / FEATURE_STRIDE)]


def build_higherhrnet(
    config: HigherHRNetConfig = W32_CONFIG, seed: int | None = None, zero_init_last: bool = False
) -> HigherHRNet:
    """Build the network; with `seed`, its random init is seeded without moving the caller's RNG.

    `zero_init_last` (for random-weight networks): timm's Kaiming init makes W32's activations
    grow to ~1e8 through its ~100 residual blocks, far beyond fp16. Zeroing the last BatchNorm
    scale of every residual block (timm's / torchvision's `zero_init_last`) makes each block
    the identity at init; the random W32's features then stay in the hundreds. Pretrained
    weights overwrite the init and do not need it."""
    from timm.models.resnet import BasicBlock as TimmBasicBlock
    from timm.models.resnet import Bottleneck as TimmBottleneck

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        net = HigherHRNet(config)
    if zero_init_last:
        for module in net.modules():
            if isinstance(module, (BasicBlock, TimmBasicBlock)):
                nn.init.zeros_(module.bn2.weight)
            elif isinstance(module, TimmBottleneck):
                nn.init.zeros_(module.bn3.weight)
    return net


def prepare_input(images: torch.Tensor, multiple: int = INPUT_MULTIPLE) -> torch.Tensor:
    """RGB in [0, 1], [B, 3, H, W] -> pad right/bottom with black to a multiple of `multiple`,
    then ImageNet-normalise. Differentiable."""
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h), value=0.0)
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


# ---- official checkpoint keys ----------------------------------------------------------------

BACKBONE_KEY_ROOTS = frozenset(
    {"conv1", "bn1", "conv2", "bn2", "layer1", "transition1", "transition2", "transition3", "stage2", "stage3", "stage4"}
)
HEAD_KEY_ROOTS = frozenset({"final_layers", "deconv_layers"})


def official_to_model_key(key: str) -> str:
    """Official `PoseHigherResolutionNet` state-dict key -> our key (`module.` prefix from
    DataParallel checkpoints is dropped). Raises KeyError for a key of neither part."""
    key = key.removeprefix("module.")
    root = key.split(".", 1)[0]
    if root in BACKBONE_KEY_ROOTS:
        return "backbone." + key
    if root in HEAD_KEY_ROOTS:
        return "head." + key
    raise KeyError(f"not a HigherHRNet key: {key!r}")


def model_to_official_key(key: str) -> str:
    """Our state-dict key -> the official one (inverse of `official_to_model_key`)."""
    for prefix in ("backbone.", "head."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    raise KeyError(f"not a HigherHRNet key: {key!r}")


def official_state_dict(model: HigherHRNet) -> dict[str, torch.Tensor]:
    """Our weights in the official checkpoint naming (what pose_higher_hrnet_w32_512.pth holds)."""
    return {model_to_official_key(k): v for k, v in model.state_dict().items()}


def load_official_state_dict(model: HigherHRNet, state_dict: dict[str, torch.Tensor]) -> HigherHRNet:
    """Load an official HigherHRNet checkpoint into `model`, strictly: every official key must
    map onto one of ours with the same shape and every one of ours must be filled, except the
    BatchNorm `num_batches_tracked` counters (absent from checkpoints saved by torch < 0.4.1;
    they do not affect eval outputs) which keep the model's value."""
    mapped = {official_to_model_key(k): v for k, v in state_dict.items()}
    own = model.state_dict()
    unexpected = sorted(set(mapped) - set(own))
    missing = sorted(k for k in set(own) - set(mapped) if not k.endswith("num_batches_tracked"))
    wrong_shape = sorted(k for k in set(mapped) & set(own) if tuple(mapped[k].shape) != tuple(own[k].shape))
    if unexpected or missing or wrong_shape:
        raise ValueError(
            "checkpoint does not fit this HigherHRNet "
            f"({model.config.name}): unexpected {unexpected[:5]}, missing {missing[:5]}, wrong shape {wrong_shape[:5]}"
        )
    for key in set(own) - set(mapped):
        mapped[key] = own[key]
    model.load_state_dict(mapped, strict=True)
    return model


# ---- test-time aggregation and decoding ------------------------------------------------------


def aggregate_outputs(
    heatmaps_quarter: torch.Tensor, tags: torch.Tensor, heatmaps_half: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Official single-scale, no-flip aggregation (`get_multi_stage_outputs` with
    PROJECT2IMAGE): the whole 1/4 output (heatmaps and tags) is upsampled to the 1/2 output's
    size, the two heatmaps are averaged, then heatmaps and tags are upsampled to `size` (H, W);
    all bilinear with align_corners=False. Returns (heatmaps [B, 17, H, W], tags [B, 17, H, W])."""
    half_size = heatmaps_half.shape[-2:]
    heatmaps_up = F.interpolate(heatmaps_quarter, size=half_size, mode="bilinear", align_corners=False)
    tags_up = F.interpolate(tags, size=half_size, mode="bilinear", align_corners=False)
    averaged = (heatmaps_up + heatmaps_half) / 2.0
    heatmaps = F.interpolate(averaged, size=size, mode="bilinear", align_corners=False)
    tags = F.interpolate(tags_up, size=size, mode="bilinear", align_corners=False)
    return heatmaps, tags


def _quarter_offset(heatmap: np.ndarray, row: int, col: int) -> tuple[float, float]:
    """Official `adjust`: move a quarter pixel towards the larger neighbour in x and in y (we
    leave an exactly symmetric peak where it is; the official code then moves it -0.25)."""
    height, width = heatmap.shape
    right, left = heatmap[row, min(col + 1, width - 1)], heatmap[row, max(col - 1, 0)]
    down, up = heatmap[min(row + 1, height - 1), col], heatmap[max(row - 1, 0), col]
    dx = 0.25 if right > left else (-0.25 if right < left else 0.0)
    dy = 0.25 if down > up else (-0.25 if down < up else 0.0)
    return float(np.clip(col + dx, 0, width - 1)), float(np.clip(row + dy, 0, height - 1))


def decode_single_person(
    heatmaps: np.ndarray | torch.Tensor,
    tags: np.ndarray | torch.Tensor,
    detection_threshold: float = DETECTION_THRESHOLD,
    tag_threshold: float = TAG_THRESHOLD,
    nms_kernel: int = NMS_KERNEL,
    max_people: int = MAX_NUM_PEOPLE,
    refine: bool = True,
) -> tuple[np.ndarray, float]:
    """Keypoints of the highest-scoring person from aggregated maps of one image.

    `heatmaps`, `tags`: [17, H, W] at image resolution (`aggregate_outputs`). Returns
    (keypoints float32 [17, 3] (x, y, score) in pixel-index coordinates, person score); a joint
    the person lacks is (0, 0, 0); nobody found -> all zeros and score 0.

    A small version of the official `HeatmapParser.parse`:
    1. NMS: keep pixels equal to their `nms_kernel` x `nms_kernel` max-pool; the `max_people`
       strongest per joint with value > `detection_threshold` are candidates.
    2. Grouping (official: Munkres matching joint by joint in a fixed order): candidates are
       taken strongest first; each joins the person that lacks that joint and whose mean tag is
       nearest, if nearer than `tag_threshold`, else starts a new person.
    3. Person score = sum of its joint values / 17 (the official mean over all 17 joints); the
       best person is kept (ties: the one started first).
    4. Official `adjust` (quarter-pixel step to the larger neighbour) and, with `refine`,
       official `refine`: each joint the person lacks is placed at the argmax of
       heatmap - round(|tag - person's mean tag|) and kept if its heatmap value is > 0.
    Coordinates are pixel indices (the official +0.5 for COCO's pixel-area convention is not
    added), the convention of posedata's other keypoints.
    """
    heat = torch.as_tensor(heatmaps, dtype=torch.float32)
    tag = torch.as_tensor(tags, dtype=torch.float32)
    joints, height, width = heat.shape
    if tag.shape != heat.shape:
        raise ValueError(f"tags {tuple(tag.shape)} must match heatmaps {tuple(heat.shape)} (one tag per joint)")
    pooled = F.max_pool2d(heat[None], nms_kernel, 1, (nms_kernel - 1) // 2)[0]
    peaks = heat * (pooled == heat)
    k = min(max_people, height * width)
    values, indices = peaks.view(joints, -1).topk(k, dim=1)
    values, indices = values.numpy(), indices.numpy()
    heat_np, tag_np = heat.numpy(), tag.numpy()

    candidates = [
        (float(values[j, n]), j, int(indices[j, n]))
        for j in range(joints)
        for n in range(k)
        if values[j, n] > detection_threshold
    ]
    candidates.sort(key=lambda c: -c[0])  # stable: equal values keep joint order
    # people[p]: joint -> (row, col, value); mean tag and "has joint j" kept as arrays
    people: list[dict[int, tuple[int, int, float]]] = []
    tag_sums = np.zeros(len(candidates))
    counts = np.zeros(len(candidates))
    has_joint = np.zeros((len(candidates), joints), dtype=bool)
    for value, joint, index in candidates:
        row, col = divmod(index, width)
        t = float(tag_np[joint, row, col])
        p = -1
        if people:
            n = len(people)
            distance = np.abs(t - tag_sums[:n] / counts[:n])
            distance[has_joint[:n, joint]] = np.inf
            nearest = int(np.argmin(distance))  # ties: the person started first
            if distance[nearest] < tag_threshold:
                p = nearest
        if p < 0:
            p = len(people)
            people.append({})
        people[p][joint] = (row, col, value)
        tag_sums[p] += t
        counts[p] += 1
        has_joint[p, joint] = True

    keypoints = np.zeros((joints, 3), dtype=np.float32)
    if not people:
        return keypoints, 0.0
    scores = [sum(v for _, _, v in person.values()) / joints for person in people]
    best = int(np.argmax(scores))
    person = people[best]
    for joint, (row, col, value) in person.items():
        x, y = _quarter_offset(heat_np[joint], row, col)
        keypoints[joint] = (x, y, value)

    if refine:
        mean_tag = tag_sums[best] / counts[best]
        for joint in range(joints):
            if joint in person:
                continue
            score_map = heat_np[joint] - np.round(np.abs(tag_np[joint] - mean_tag))
            row, col = np.unravel_index(int(np.argmax(score_map)), score_map.shape)
            value = float(heat_np[joint, row, col])
            if value > 0:
                x, y = _quarter_offset(heat_np[joint], int(row), int(col))
                keypoints[joint] = (x, y, value)
    return keypoints, float(max(scores))
