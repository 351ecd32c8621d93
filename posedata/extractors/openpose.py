"""OpenPose body keypoints and skeleton renders (controlnet-aux's OpenPose body model).

Network: `controlnet_aux.open_pose.model.bodypose_model` (the CMU COCO body model as ported by
pytorch-openpose / ControlNet), weights `body_pose_model.pth` from lllyasviel/Annotators.
Decoding: controlnet-aux's own `Body.__call__` post-processing (peaks on the Gaussian-smoothed
heatmaps, PAF scoring and greedy limb association), run unchanged.

Batching. `Body.__call__` does preprocessing, one network forward and post-processing in one
function for one image. We do the preprocessing the same way with controlnet-aux's own helpers,
run ONE forward over the whole batch, and then call `Body.__call__` per image with a stand-in
network (`_ReplayNet`) that hands back that image's slice of the batched output. So the
decoding is controlnet-aux's code, not a copy of it, and the stand-in checks that Body asked
for exactly the input we fed the real network.

Hands (`openpose:full`, what IMAGPose's DWPose renders and PCDMs' pose images show): for the
kept person, controlnet-aux's own hand pipeline, unchanged: `util.handDetect` boxes from the
wrist / elbow / shoulder keypoints and `Hand.__call__` (the CMU hand model, 4 scales, on the
BGR crop), called through `OpenposeDetector.detect_hands`. Stored as `hands.npy` float32
[2, 21, 3] (left, right; x, y in stored-image pixels, score 1 for a found joint: the hand
model reports no confidence), a missing hand or joint = (0, 0, 0); the skeleton then draws
them (`posedata.render.draw_hands`). The body-only default keeps its outputs and fingerprint.

Outputs per image: `keypoints.npy` float32 [18, 3] (x, y, score) in stored-image pixels,
COCO-18 OpenPose order (`posedata.render.COCO18_NAMES`), missing joint = (0, 0, 0); with
several people detected, the one with the highest total score (OpenPose's subset score: sum of
its joint and limb scores) is kept, ties going to the first found. No person is a valid output:
all zeros and a black skeleton. `skeleton.png` = `posedata.render.draw_openpose` of those
keypoints at the stored resolution.
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any, ClassVar

import numpy as np

from posedata.extractors.base import FEW_JOINTS, NOTES, Extractor, OutputSpec, Sample, checked_image, file_digest
from posedata.render import (
    COCO18_NAMES,
    HAND_EDGES,
    HAND_JOINT_RADIUS,
    HAND_LINE_THICKNESS,
    JOINT_RADIUS,
    LIMB_DIM,
    NUM_HAND_JOINTS,
    NUM_JOINTS,
    OPENPOSE_PAF_LIMBS,
    STICK_WIDTH,
    draw_openpose,
)

BODY_WEIGHTS_FILE = "body_pose_model.pth"
HAND_WEIGHTS_FILE = "hand_pose_model.pth"
# Where controlnet-aux finds the body weights in the repos it knows (OpenposeDetector.from_pretrained).
HUB_WEIGHTS_FILES = {"lllyasviel/ControlNet": "annotator/ckpts/body_pose_model.pth"}
HUB_HAND_WEIGHTS_FILES = {"lllyasviel/ControlNet": "annotator/ckpts/hand_pose_model.pth"}
NUM_HAND_CHANNELS = 22  # 21 joints + background
# Hand.__call__'s constants (open_pose/hand.py, 0.0.10), for the fingerprint.
HAND_SCALE_SEARCH = (0.5, 1.0, 1.5, 2.0)
HAND_PEAK_THRESHOLD = 0.05
HAND_BOX_RATIO_WRIST_ELBOW = 0.33  # util.handDetect

# The constants inside controlnet-aux's Body.__call__ (open_pose/body.py, 0.0.10). They are
# locals there, so they are restated here for our batched preprocessing and the fingerprint;
# _ReplayNet fails loudly if Body ever asks for a different input than we computed.
BOXSIZE = 368
SCALE_SEARCH = (0.5,)
STRIDE = 8
PAD_VALUE = 128
PEAK_THRESHOLD = 0.1  # thre1: smoothed heatmap value a peak must exceed
PAF_THRESHOLD = 0.05  # thre2: PAF score a sample along a limb must exceed
PEAK_SMOOTHING_SIGMA = 3
PAF_SAMPLES = 10  # mid_num
NUM_PAF_CHANNELS = 38
NUM_HEATMAP_CHANNELS = 19  # 18 joints + background

# For limb k of OPENPOSE_PAF_LIMBS: the (x, y) PAF channels (Body's `mapIdx` minus 19).
PAF_CHANNELS: tuple[tuple[int, int], ...] = (
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3),
    (4, 5), (6, 7), (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33),
    (36, 37), (18, 19), (26, 27),
)
assert len(PAF_CHANNELS) == len(OPENPOSE_PAF_LIMBS)

# A detected joint's score is the raw heatmap value at its peak. Peaks need the *smoothed*
# map above 0.1, so the raw value is positive for any trained model; untrained weights could
# give <= 0, which would read as "missing". Such joints are stored with this floor instead.
MIN_PRESENT_SCORE = 1e-6

TINY_HAND_ARCHITECTURE = "tiny-handpose: 3x[conv3x3+relu+maxpool2] (3-8-16-16), 1x1 head -> 22 heatmaps, stride 8"
FULL_HAND_ARCHITECTURE = "controlnet_aux.open_pose.model.handpose_model (VGG trunk + 6 CPM stages)"
TINY_ARCHITECTURE = "tiny-bodypose: 3x[conv3x3+relu+maxpool2] (3-8-16-16), 1x1 heads -> 38 PAF + 19 heatmap, stride 8"
FULL_ARCHITECTURE = "controlnet_aux.open_pose.model.bodypose_model (VGG-19 trunk + 6 two-branch CPM stages)"


# ---- network ---------------------------------------------------------------------------------


def build_tiny_bodypose_net():
    """A tiny network with bodypose_model's interface: [B, 3, H, W] -> (PAF [B, 38, H/8, W/8],
    heatmaps [B, 19, H/8, W/8]). For tests and CPU smoke runs of the real post-processing."""
    import torch.nn as nn

    class TinyBodyPoseNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            widths = (3, 8, 16, 16)
            for c_in, c_out in zip(widths[:-1], widths[1:]):
                layers += [nn.Conv2d(c_in, c_out, 3, 1, 1), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)]
            self.trunk = nn.Sequential(*layers)
            self.paf_head = nn.Conv2d(widths[-1], NUM_PAF_CHANNELS, 1)
            self.heatmap_head = nn.Conv2d(widths[-1], NUM_HEATMAP_CHANNELS, 1)

        def forward(self, x):
            features = self.trunk(x)
            return self.paf_head(features), self.heatmap_head(features)

    return TinyBodyPoseNet()


def build_tiny_handpose_net():
    """A tiny network with handpose_model's interface: [B, 3, H, W] -> heatmaps [B, 22, H/8, W/8]."""
    import torch.nn as nn

    layers: list[nn.Module] = []
    widths = (3, 8, 16, 16)
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, 1, 1), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)]
    return nn.Sequential(*layers, nn.Conv2d(widths[-1], NUM_HAND_CHANNELS, 1))


def detect_hands(hand_net, keypoints: np.ndarray, image_bgr: np.ndarray) -> np.ndarray:
    """controlnet-aux's hand detection for one person: `OpenposeDetector.detect_hands` (boxes
    from `util.handDetect`, joints from `Hand.__call__`) with `hand_net` as the hand model.
    `keypoints` [18, 3] in `image_bgr` pixels. Returns float32 [2, 21, 3] (left, right) in
    pixels, score 1 for a found joint, (0, 0, 0) for a missing one or hand."""
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import BodyResult, Keypoint
    from controlnet_aux.open_pose.hand import Hand

    hand = Hand.__new__(Hand)  # Hand.__init__ would load a checkpoint
    hand.model = hand_net
    detector = OpenposeDetector.__new__(OpenposeDetector)
    detector.hand_estimation = hand
    body = BodyResult([Keypoint(float(x), float(y)) if score > 0 else None for x, y, score in keypoints], 0.0, 0)
    height, width = image_bgr.shape[:2]
    out = np.zeros((2, NUM_HAND_JOINTS, 3), dtype=np.float32)
    for side, found in enumerate(detector.detect_hands(body, image_bgr)):
        for joint, point in enumerate(found or ()):
            if point.x >= 0 and point.y >= 0:  # detect_hands marks a missing joint with -1 / size
                out[side, joint] = (point.x * width, point.y * height, 1.0)
    return out


def original_key_names(state_dict: dict) -> dict:
    """bodypose_model state dict -> the key names of lllyasviel's body_pose_model.pth (the
    inverse of controlnet-aux `util.transfer`, which strips the `model0.` / `model1_1.` block
    prefix): `model0.conv1_1.weight` -> `conv1_1.weight`. Layer names are unique across blocks."""
    return {".".join(key.split(".")[1:]): value for key, value in state_dict.items()}


# ---- preprocessing and decoding (controlnet-aux's Body) ---------------------------------------


def preprocess_for_body(image_bgr: np.ndarray) -> np.ndarray:
    """Body.__call__'s network input for one BGR uint8 image: resize so the height is
    0.5 * 368, pad right/down to a multiple of 8 with 128, CHW, x / 256 - 0.5. float32 [3, Hp, Wp]."""
    from controlnet_aux.open_pose import util

    (scale_factor,) = SCALE_SEARCH  # controlnet-aux runs a single scale
    scale = scale_factor * BOXSIZE / image_bgr.shape[0]
    resized = util.smart_resize_k(image_bgr, fx=scale, fy=scale)
    padded, _ = util.padRightDownCorner(resized, STRIDE, PAD_VALUE)
    return np.ascontiguousarray(np.transpose(np.float32(padded), (2, 0, 1)) / 256 - 0.5)


def network_input_shape(height: int, width: int) -> tuple[int, int]:
    """(Hp, Wp) of the padded network input for a `height` x `width` image; outputs are at
    (Hp / 8, Wp / 8)."""
    probe = np.zeros((height, width, 3), dtype=np.uint8)
    return tuple(preprocess_for_body(probe).shape[1:])  # type: ignore[return-value]


class _ReplayNetFactory:
    """Builds (lazily, to keep torch out of import time) the stand-in network for Body."""

    _cls = None

    @classmethod
    def create(cls):
        if cls._cls is None:
            import torch
            import torch.nn as nn

            class _ReplayNet(nn.Module):
                """Stands in for bodypose_model inside Body.__call__: returns the outputs that
                were already computed for this image by the batched forward."""

                def __init__(self) -> None:
                    super().__init__()
                    # Body reads the device from the first parameter.
                    self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)
                    self.outputs = None
                    self.expected_hw: tuple[int, int] | None = None

                def forward(self, data):
                    if self.outputs is None:
                        raise RuntimeError("no network outputs loaded for this image")
                    if tuple(data.shape[2:]) != self.expected_hw:
                        raise RuntimeError(
                            f"controlnet-aux Body asked for a {tuple(data.shape[2:])} input but the batched "
                            f"forward used {self.expected_hw}: its preprocessing changed, update openpose.py"
                        )
                    outputs, self.outputs = self.outputs, None
                    return outputs

            cls._cls = _ReplayNet
        return cls._cls()


def _replay_body():
    from controlnet_aux.open_pose.body import Body

    body = Body.__new__(Body)  # Body.__init__ would load a checkpoint; we only want __call__
    body.model = _ReplayNetFactory.create()
    return body


def decode_network_outputs(
    paf: np.ndarray, heatmap: np.ndarray, height: int, width: int, body=None
) -> tuple[np.ndarray, np.ndarray]:
    """controlnet-aux's Body post-processing on one image's network outputs.

    `paf` [38, h, w] and `heatmap` [19, h, w] at stride 8 of the padded input for a
    `height` x `width` image (h, w = network_input_shape(height, width) / 8).
    Returns Body's (candidate [N, 4]: x, y, score, id in image pixels; subset [P, 20]:
    candidate index per joint or -1, total score, joint count).
    """
    import torch

    body = body or _replay_body()
    padded_hw = network_input_shape(height, width)
    grid = (padded_hw[0] // STRIDE, padded_hw[1] // STRIDE)
    if paf.shape != (NUM_PAF_CHANNELS, *grid) or heatmap.shape != (NUM_HEATMAP_CHANNELS, *grid):
        raise ValueError(f"expected PAF [38, {grid[0]}, {grid[1]}] and heatmap [19, ...], got {paf.shape}, {heatmap.shape}")
    body.model.expected_hw = padded_hw
    body.model.outputs = (
        torch.from_numpy(np.ascontiguousarray(paf, dtype=np.float32))[None],
        torch.from_numpy(np.ascontiguousarray(heatmap, dtype=np.float32))[None],
    )
    # Body only uses the image for its size (it re-runs the resize and pad to feed the model).
    candidate, subset = body(np.zeros((height, width, 3), dtype=np.uint8))
    return np.asarray(candidate, dtype=np.float64).reshape(-1, 4), np.asarray(subset, dtype=np.float64).reshape(-1, 20)


def pose_notes(keypoints: np.ndarray, people: int) -> list[str]:
    """What a person looking at the dataset would want counted about one detection."""
    present = int((keypoints[:, 2] > 0).sum())
    if people == 0 or present == 0:
        return ["no person"]
    notes = ["several people (kept the highest-scoring)"] if people > 1 else []
    if present < FEW_JOINTS:
        notes.append(f"fewer than {FEW_JOINTS} joints (cut off or occluded)")
    return notes


def select_person(candidate: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """The person with the highest total score (subset column 18) as float32 [18, 3]
    (x, y, score); joints that person lacks and 'nobody found' are (0, 0, 0)."""
    keypoints = np.zeros((NUM_JOINTS, 3), dtype=np.float32)
    if len(subset) == 0:
        return keypoints
    best = subset[int(np.argmax(subset[:, 18]))]
    for joint in range(NUM_JOINTS):
        index = int(best[joint])
        if index >= 0:
            x, y, score = candidate[index, :3]
            keypoints[joint] = (x, y, max(float(score), MIN_PRESENT_SCORE))
    return keypoints


# ---- the extractor ----------------------------------------------------------------------------


class OpenPoseExtractor(Extractor):
    """OpenPose body keypoints (COCO-18) + ControlNet-style skeleton render.

    weights: "pretrained" loads body_pose_model.pth from `model` (a hub id, downloaded with
    huggingface_hub, which honours HF_HUB_OFFLINE; a local directory holding the file; or the
    .pth path itself); "random" is the full bodypose_model with torch.manual_seed(seed) init;
    "tiny" is `build_tiny_bodypose_net` (same outputs, seconds on CPU).

    The network always runs in fp32 and keypoints are stored as float32, so `dtype` is fixed
    to "fp32" (the post-processing thresholds were set on fp32 outputs).
    """

    name = "openpose"
    version = "1"
    default_model = "lllyasviel/Annotators"
    batch_size = 16
    # `openpose:full`: body + both hands (controlnet-aux's hand model), as DWPose renders them
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"full": {"hands": True, "consumers": ["imagpose", "pcdm"]}}

    def __init__(
        self,
        weights: str = "pretrained",
        model: str | None = None,
        resolution: tuple[int, int] = (512, 352),
        dtype: str = "fp32",
        seed: int = 0,
        preset: str | None = None,
    ) -> None:
        super().__init__(weights=weights, model=model, resolution=resolution, dtype=dtype, seed=seed)
        if preset is not None and preset not in self.PRESETS:
            raise ValueError(f"unknown openpose preset {preset!r}; known: {', '.join(sorted(self.PRESETS))} (none = body only)")
        self.preset = preset
        self.hands = bool(preset and self.PRESETS[preset]["hands"])
        self.dtype = "fp32"
        self.net = None
        self.hand_net = None
        self._body = None

    # ---- description ------------------------------------------------------------------------

    def outputs(self) -> dict[str, OutputSpec]:
        return {
            "keypoints.npy": OutputSpec(
                "keypoints.npy",
                "float32",
                (NUM_JOINTS, 3),
                "COCO-18 OpenPose order (x, y, score) in stored-image pixels; missing joint = (0, 0, 0); "
                "the highest-scoring person when several are found, all zeros when none",
            ),
            "skeleton.png": OutputSpec(
                "skeleton.png",
                "uint8",
                ("H", "W", 3),
                "OpenPose body render as ControlNet / PCDMs draw it (posedata.render.draw_openpose)"
                + (", hands on top as DWPose draws them" if self.hands else ""),
            ),
            **({"hands.npy": OutputSpec(
                "hands.npy",
                "float32",
                (2, NUM_HAND_JOINTS, 3),
                "left and right hand, 21 OpenPose hand joints each (x, y, score) in stored-image pixels; score 1 = found; "
                "missing hand or joint = (0, 0, 0)",
            )} if self.hands else {}),
        }

    def fingerprint_inputs(self) -> dict[str, Any]:
        inputs = super().fingerprint_inputs()
        inputs["dtype"] = "fp32"
        if self.weights == "pretrained" and os.path.isfile(self.model_id):
            inputs["weights_digest"] = file_digest(self.model_id)
        inputs["weights_file"] = None if self.weights != "pretrained" else self._weights_filename()
        inputs["architecture"] = TINY_ARCHITECTURE if self.weights == "tiny" else FULL_ARCHITECTURE
        inputs["preprocessing"] = {
            "color_order": "BGR",
            "boxsize": BOXSIZE,
            "scale_search": list(SCALE_SEARCH),
            "stride": STRIDE,
            "pad_value": PAD_VALUE,
            "normalize": "x / 256 - 0.5",
        }
        inputs["postprocessing"] = {
            "decoder": "controlnet_aux.open_pose.body.Body",
            "controlnet_aux": _package_version("controlnet-aux"),
            "peak_threshold": PEAK_THRESHOLD,
            "paf_threshold": PAF_THRESHOLD,
            "peak_smoothing_sigma": PEAK_SMOOTHING_SIGMA,
            "paf_samples": PAF_SAMPLES,
            "person": "highest total score",
            "keypoint_order": list(COCO18_NAMES),
        }
        inputs["render"] = {
            "style": "controlnet draw_bodypose",
            "stick_width": STICK_WIDTH,
            "limb_dim": LIMB_DIM,
            "joint_radius": JOINT_RADIUS,
        }
        if self.hands:  # only here, so the body-only fingerprint stays what it was
            inputs["hands"] = {
                "detector": "controlnet_aux.open_pose.OpenposeDetector.detect_hands (util.handDetect + hand.Hand)",
                "weights_file": None if self.weights != "pretrained" else self._hand_weights_filename(),
                "weights_digest": file_digest(self._hand_weights_local()) if self.weights == "pretrained" and os.path.exists(self.model_id) else None,
                "architecture": TINY_HAND_ARCHITECTURE if self.weights == "tiny" else FULL_HAND_ARCHITECTURE,
                "scale_search": list(HAND_SCALE_SEARCH),
                "peak_threshold": HAND_PEAK_THRESHOLD,
                "box_ratio_wrist_elbow": HAND_BOX_RATIO_WRIST_ELBOW,
                "render": {"edges": len(HAND_EDGES), "line_thickness": HAND_LINE_THICKNESS, "joint_radius": HAND_JOINT_RADIUS},
            }
        return inputs

    def _hand_weights_filename(self) -> str:
        return HUB_HAND_WEIGHTS_FILES.get(self.model_id, HAND_WEIGHTS_FILE)

    def _hand_weights_local(self) -> str:
        """hand_pose_model.pth beside the body weights (a folder, or the body .pth's folder)."""
        folder = self.model_id if os.path.isdir(self.model_id) else os.path.dirname(self.model_id)
        path = os.path.join(folder, HAND_WEIGHTS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder or '.'}: no {HAND_WEIGHTS_FILE} (openpose:full needs the hand model beside the body model)")
        return path

    def hand_weights_path(self) -> str:
        """Local path of hand_pose_model.pth for weights="pretrained" (downloads a hub id)."""
        if os.path.exists(self.model_id):
            return self._hand_weights_local()
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id=self.model_id, filename=self._hand_weights_filename())

    def build_hand_net(self):
        """The hand network for `weights`, on CPU, in eval mode, without gradients."""
        import torch

        if self.weights == "pretrained":
            from controlnet_aux.open_pose.model import handpose_model
            from controlnet_aux.open_pose.util import transfer

            net = handpose_model()
            state = torch.load(self.hand_weights_path(), map_location="cpu", weights_only=True)
            net.load_state_dict(transfer(net, state))
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + 1)  # not the body's stream
                if self.weights == "random":
                    from controlnet_aux.open_pose.model import handpose_model

                    net = handpose_model()
                else:
                    net = build_tiny_handpose_net()
        return net.eval().requires_grad_(False)

    def _weights_filename(self) -> str:
        return HUB_WEIGHTS_FILES.get(self.model_id, BODY_WEIGHTS_FILE)

    def weights_path(self) -> str:
        """Local path of body_pose_model.pth for weights="pretrained" (downloads a hub id)."""
        if os.path.isfile(self.model_id):
            return self.model_id
        if os.path.isdir(self.model_id):
            path = os.path.join(self.model_id, BODY_WEIGHTS_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{self.model_id} has no {BODY_WEIGHTS_FILE}")
            return path
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id=self.model_id, filename=self._weights_filename())

    # ---- running ------------------------------------------------------------------------------

    def build_net(self):
        """The network for `weights`, on CPU, in eval mode, without gradients."""
        import torch

        if self.weights == "pretrained":
            from controlnet_aux.open_pose.model import bodypose_model
            from controlnet_aux.open_pose.util import transfer

            net = bodypose_model()
            state = torch.load(self.weights_path(), map_location="cpu", weights_only=True)
            net.load_state_dict(transfer(net, state))
        else:
            # fork_rng: seed the init without moving the caller's global RNG
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                if self.weights == "random":
                    from controlnet_aux.open_pose.model import bodypose_model

                    net = bodypose_model()
                else:
                    net = build_tiny_bodypose_net()
        return net.eval().requires_grad_(False)

    def setup(self, device: str) -> None:
        self.device = device
        self.net = self.build_net().to(device)
        self.hand_net = self.build_hand_net().to(device) if self.hands else None
        self._body = _replay_body()

    def null_embedding(self) -> dict[str, np.ndarray] | None:
        return None  # keypoints are not an embedding; "no pose" is all-zero keypoints

    def forward(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Batched network forward: float32 [B, 3, Hp, Wp] -> (PAF [B, 38, h, w], heatmap [B, 19, h, w])."""
        import torch

        if self.net is None:
            raise RuntimeError("call setup(device) first")
        with torch.inference_mode():
            paf, heatmap = self.net(torch.from_numpy(inputs).to(self.device))
        return paf.float().cpu().numpy(), heatmap.float().cpu().numpy()

    def __call__(self, batch: list[Sample]) -> list[dict[str, np.ndarray]]:
        images = [checked_image(sample, self.name) for sample in batch]

        # One forward per image size (all images share the stored resolution in a build).
        results: list[dict[str, np.ndarray] | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.shape[:2], []).append(i)
        for (height, width), indices in by_size.items():
            # controlnet-aux's Body works on BGR (OpenposeDetector flips RGB input first).
            bgr = {i: np.ascontiguousarray(images[i][:, :, ::-1]) for i in indices}
            inputs = np.stack([preprocess_for_body(bgr[i]) for i in indices])
            pafs, heatmaps = self.forward(inputs)
            for row, i in enumerate(indices):
                candidate, subset = decode_network_outputs(pafs[row], heatmaps[row], height, width, body=self._body)
                keypoints = select_person(candidate, subset)
                hands = detect_hands(self.hand_net, keypoints, bgr[i]) if self.hands else None
                results[i] = {
                    "keypoints.npy": keypoints,
                    "skeleton.png": draw_openpose(keypoints, height, width, hands=hands),
                    NOTES: pose_notes(keypoints, people=len(subset)),
                    **({"hands.npy": hands} if hands is not None else {}),
                }
        return results  # type: ignore[return-value]


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
