"""HigherHRNet-W32 (COCO) keypoints and pose features for RePoseDM.

RePoseDM (Khandelwal, "RePoseDM: Recurrent Pose Alignment and Gradient Guidance for Pose
Guided Image Synthesis", arXiv 2310.16074) uses a bottom-up HigherHRNet-W32 trained on COCO as
its pose estimator (docs/design.md §4); its pose-alignment loss compares the estimator's backbone
features of the generated pose map with those of the target pose, so the target side is
computed once here.

Outputs per image:

- `keypoints.npy` float32 [17, 3]: (x, y, score) in stored-image pixel indices, COCO-17 order
  (`posedata.models.higherhrnet.COCO17_NAMES`), of the highest-scoring person; a joint that
  person lacks is (0, 0, 0); nobody found -> all zeros.
- `pose_features.npy` [32, ceil(H/4), ceil(W/4)] in the dataset dtype (fp16 by default): the
  backbone features of the image's own skeleton render (`render_pose_map`). The feature map is
  the output of HRNet stage 4's highest-resolution branch, 32 channels at 1/4 resolution; in
  HigherHRNet that tensor is also exactly the input of the 1/4 heatmap head (`final_layers[0]`),
  so the two candidate definitions are the same tensor. Training plugins get the matching
  features of a generated pose map from `HigherHRNet.pose_features(render / 255)`.

Skeleton render. We could not find RePoseDM's code (code and web searches for the paper's name
and method turn up only the paper's abstract pages), so the pose-map style is our choice:
OpenPose style via
`posedata.render.draw_openpose`, the same render ControlNet / PCDMs condition on. The COCO-17
detections become COCO-18 by adding neck = midpoint of the shoulders (present when both are,
score = the smaller of the two) and reordering (`coco17_to_coco18`); joints are drawn when
their score is above the detection threshold (0.1), so joints only added by `refine` with a
weak heatmap response are stored but not drawn.

Backend. We run the official network with our own code rather than through a pose library.
mmpose 1.x ships no HigherHRNet config, and its mmcv needs a ~13-minute patched source build;
mmpose 0.29 still has HigherHRNet but needs mmcv 1.7 and NumPy-2 shims. Instead the backbone is
timm's maintained HRNet-W32 (`timm.create_model("hrnet_w32", features_only=True)`, no timm
weights), whose module names are those of the Microsoft HRNet code, so the backbone keys of the
official HigherHRNet COCO checkpoint (`pose_higher_hrnet_w32_512.pth`, HRNet/HigherHRNet-Human-
Pose-Estimation) load unchanged; the small HigherHRNet head (1/4 heatmaps + tags, one deconv
module, 1/2 heatmaps) is plain torch in `posedata.models.higherhrnet`, with
`load_official_state_dict` mapping the official keys onto backbone + head. We checked, with the
official `lib/models/pose_higher_hrnet.py` and the W32-512 config, that the mapped state dict has
the same 1810 keys and shapes, that both networks give identical outputs for the same weights,
and that `aggregate_outputs` matches the official `get_multi_stage_outputs` (to 1e-6).
The whole model is one differentiable `nn.Module`. The decoding is a small documented version of
the official associative-embedding grouping (`decode_single_person`): single scale, no flip test
(the official W32-512 test flips; the repository's README reports 67.1 AP with flip), a greedy
tag grouping instead of Munkres matching. An mmpose backend stays optional future work, worth it
only if the grouping must match the official one exactly.

Preprocessing: RGB / 255, padded right/bottom with black to a multiple of 32, ImageNet
mean / std; the network sees the stored resolution. The official test instead resizes the short
side to 512 (`resize_align_multi_scale`), so at e.g. 256 x 176 people appear at a smaller scale
than the network was evaluated at, which can cost keypoint accuracy.

weights: "pretrained" loads the official checkpoint from `model`: the .pth itself, a directory
holding `pose_higher_hrnet_w32_512.pth`, or a Hugging Face repo id holding that file
(hf_hub_download, honours HF_HUB_OFFLINE). No canonical hub copy exists; the default is the bare
file name, to be downloaded from the official model zoo (links in the HigherHRNet README:
models/pytorch/pose_coco/pose_higher_hrnet_w32_512.pth). "random" is the full W32 with seeded
init; "tiny" a 4-stage HRNet of one block per branch (`TINY_CONFIG`), same outputs and shapes.
Both random modes zero the last BatchNorm scale of every residual block (`zero_init_last`), so
their outputs stay finite in fp16.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from posedata.extractors.base import (
    FEW_JOINTS,
    NOTES,
    Extractor,
    ExtractorError,
    OutputSpec,
    Sample,
    checked_image,
    file_digest,
    numpy_store_dtype,
    stored_dtype_label,
)
from posedata.render import (
    COCO18_NAMES,
    JOINT_RADIUS,
    LIMB_DIM,
    STICK_WIDTH,
    draw_openpose,
)

# posedata.models.higherhrnet imports torch, so it is imported inside the methods that run the
# network and `posedata inspect` can read this module without torch.
WEIGHTS_FILE = "pose_higher_hrnet_w32_512.pth"
NUM_JOINTS = 17
FEATURE_CHANNELS = 32
FEATURE_STRIDE = 4
# Restated from posedata.models.higherhrnet for the fingerprint, so that computing it needs no
# torch (tests/test_higherhrnet.py checks they agree).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NMS_KERNEL = 5
DETECTION_THRESHOLD = 0.1
TAG_THRESHOLD = 1.0
MAX_NUM_PEOPLE = 30
RENDER_SCORE_THRESHOLD = DETECTION_THRESHOLD
FULL_ARCHITECTURE = (
    "HigherHRNet-W32 (posedata.models.higherhrnet.W32_CONFIG): timm hrnet_w32 backbone, official W32 "
    "stage cfg, stage 4 fused to branch 0; head final_layers 32->34 @1/4, deconv cat 66->32 4x4/2 + "
    "4 BasicBlocks, final_layers 32->17 @1/2"
)
TINY_ARCHITECTURE = (
    "HigherHRNet tiny (posedata.models.higherhrnet.TINY_CONFIG): timm HRNet stem 16, 1 block per "
    "branch, widths 32-16-16-16, 1 module per stage; head as W32 with 1 BasicBlock"
)

# COCO-17 order of the HigherHRNet heatmap channels (official lib/dataset/__init__.py
# coco_part_labels), restated from posedata.models.higherhrnet (the tests check they agree).
COCO17_NAMES: tuple[str, ...] = (
    "nose", "l_eye", "r_eye", "l_ear", "r_ear",
    "l_shoulder", "r_shoulder", "l_elbow", "r_elbow", "l_wrist", "r_wrist",
    "l_hip", "r_hip", "l_knee", "r_knee", "l_ankle", "r_ankle",
)
# COCO-18 joint <- COCO-17 joint (neck, COCO-18 index 1, is computed from both shoulders).
COCO18_FROM_COCO17: dict[int, int] = {
    COCO18_NAMES.index(name): COCO17_NAMES.index(name) for name in COCO18_NAMES if name in COCO17_NAMES
}
NECK = COCO18_NAMES.index("neck")
L_SHOULDER, R_SHOULDER = COCO17_NAMES.index("l_shoulder"), COCO17_NAMES.index("r_shoulder")


def coco17_to_coco18(keypoints: np.ndarray) -> np.ndarray:
    """[17, 3] COCO-17 (x, y, score) -> [18, 3] OpenPose COCO-18: the same joints reordered,
    plus neck = midpoint of the shoulders with score min(both), (0, 0, 0) unless both present."""
    kp = np.asarray(keypoints, dtype=np.float32)
    if kp.shape != (NUM_JOINTS, 3):
        raise ValueError(f"expected COCO-17 keypoints [17, 3], got {kp.shape}")
    out = np.zeros((len(COCO18_NAMES), 3), dtype=np.float32)
    for j18, j17 in COCO18_FROM_COCO17.items():
        out[j18] = kp[j17]
    left, right = kp[L_SHOULDER], kp[R_SHOULDER]
    if left[2] > 0 and right[2] > 0:
        out[NECK, :2] = (left[:2] + right[:2]) / 2
        out[NECK, 2] = min(left[2], right[2])
    return out


def render_pose_map(keypoints: np.ndarray, height: int, width: int) -> np.ndarray:
    """The skeleton render whose features are stored: uint8 RGB [height, width, 3]."""
    return draw_openpose(coco17_to_coco18(keypoints), height, width, score_threshold=RENDER_SCORE_THRESHOLD)


class HigherHRNetExtractor(Extractor):
    """HigherHRNet-W32 COCO-17 keypoints + backbone features of the skeleton render."""

    name = "higherhrnet"
    version = "1"
    default_model = WEIGHTS_FILE
    batch_size = 16

    def __init__(
        self,
        weights: str = "pretrained",
        model: str | None = None,
        resolution: tuple[int, int] = (512, 352),
        dtype: str = "fp16",
        seed: int = 0,
        refine: bool = True,
    ) -> None:
        super().__init__(weights=weights, model=model, resolution=resolution, dtype=dtype, seed=seed)
        self.refine = bool(refine)
        self.net = None

    # ---- description ------------------------------------------------------------------------

    def architecture(self):
        from posedata.models.higherhrnet import TINY_CONFIG, W32_CONFIG

        return TINY_CONFIG if self.weights == "tiny" else W32_CONFIG

    def outputs(self) -> dict[str, OutputSpec]:
        return {
            "keypoints.npy": OutputSpec(
                "keypoints.npy",
                "float32",
                (NUM_JOINTS, 3),
                "COCO-17 order (x, y, score) in stored-image pixels, highest-scoring person; "
                "missing joint = (0, 0, 0), all zeros when nobody is found",
            ),
            "pose_features.npy": OutputSpec(
                "pose_features.npy",
                stored_dtype_label(self.dtype),
                (FEATURE_CHANNELS, "H/4", "W/4"),
                "HRNet stage-4 highest-resolution branch (= 1/4 heatmap-head input) of the image's "
                "own OpenPose-style skeleton render (coco17_to_coco18 + draw_openpose)",
            ),
        }

    def fingerprint_inputs(self) -> dict[str, Any]:
        inputs = super().fingerprint_inputs()
        if self.weights == "pretrained" and os.path.isfile(self.model_id):
            inputs["weights_digest"] = file_digest(self.model_id)
        inputs["weights_file"] = WEIGHTS_FILE if self.weights == "pretrained" else None
        inputs["architecture"] = TINY_ARCHITECTURE if self.weights == "tiny" else FULL_ARCHITECTURE
        inputs["init"] = None if self.weights == "pretrained" else "timm kaiming, zero_init_last"
        inputs["preprocessing"] = {
            "color_order": "RGB",
            "scale": "x / 255",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "input": "stored resolution, padded right/bottom with black to a multiple of 32",
            "compute_dtype": "fp32",
        }
        inputs["postprocessing"] = {
            "aggregation": "single scale, no flip; 1/4 output -> 1/2 size, heatmaps averaged with the 1/2 "
            "heatmaps, heatmaps and tags -> input size (bilinear, align_corners=False)",
            "decoder": "posedata.models.higherhrnet.decode_single_person",
            "nms_kernel": NMS_KERNEL,
            "detection_threshold": DETECTION_THRESHOLD,
            "tag_threshold": TAG_THRESHOLD,
            "max_people": MAX_NUM_PEOPLE,
            "adjust": True,
            "refine": self.refine,
            "person": "highest mean joint score",
            "keypoint_order": list(COCO17_NAMES),
        }
        inputs["pose_features"] = {
            "definition": "stage-4 highest-resolution branch output (final_layers[0] input)",
            "channels": FEATURE_CHANNELS,
            "stride": FEATURE_STRIDE,
            "render": {
                "style": "controlnet draw_bodypose on coco17_to_coco18 (neck = shoulder midpoint)",
                "score_threshold": RENDER_SCORE_THRESHOLD,
                "stick_width": STICK_WIDTH,
                "limb_dim": LIMB_DIM,
                "joint_radius": JOINT_RADIUS,
            },
        }
        return inputs

    def weights_path(self) -> str:
        """Local path of the official checkpoint for weights="pretrained" (downloads a hub id)."""
        if os.path.isfile(self.model_id):
            return self.model_id
        if os.path.isdir(self.model_id):
            path = os.path.join(self.model_id, WEIGHTS_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{self.model_id} has no {WEIGHTS_FILE}")
            return path
        if self.model_id.endswith(".pth") or self.model_id.count("/") != 1:  # a path, not a hub id
            raise FileNotFoundError(
                f"{self.model_id!r} not found: download {WEIGHTS_FILE} from the HigherHRNet model zoo "
                "(github.com/HRNet/HigherHRNet-Human-Pose-Estimation, README 'model zoo') and pass its "
                "path, or the folder holding it, as `model`"
            )
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id=self.model_id, filename=WEIGHTS_FILE)

    # ---- running ------------------------------------------------------------------------------

    def build_net(self):
        """The network for `weights`, on CPU, in eval mode, without gradients."""
        import torch

        from posedata.models.higherhrnet import (
            build_higherhrnet,
            load_official_state_dict,
        )

        if self.weights == "pretrained":
            net = build_higherhrnet(self.architecture(), seed=self.seed)
            state = torch.load(self.weights_path(), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]  # a training checkpoint rather than the model zoo file
            load_official_state_dict(net, state)
        else:
            net = build_higherhrnet(self.architecture(), seed=self.seed, zero_init_last=True)
        return net.eval().requires_grad_(False)

    def setup(self, device: str) -> None:
        self.device = device
        self.net = self.build_net().to(device)

    def null_embedding(self) -> dict[str, np.ndarray] | None:
        return None  # keypoints and pose features are not dropped for CFG

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 RGB [B, H, W, 3] -> (keypoints float32 [B, 17, 3], person scores [B])."""
        import torch

        from posedata.models.higherhrnet import (
            aggregate_outputs,
            decode_single_person,
            prepare_input,
        )

        if self.net is None:
            raise RuntimeError("call setup(device) first")
        height, width = images.shape[1:3]
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            inputs = prepare_input(x)
            out = self.net(inputs)
            heatmaps, tags = aggregate_outputs(out.heatmaps_quarter, out.tags, out.heatmaps_half, inputs.shape[-2:])
            heatmaps = heatmaps[..., :height, :width].float().cpu()
            tags = tags[..., :height, :width].float().cpu()
        keypoints = np.zeros((len(images), NUM_JOINTS, 3), dtype=np.float32)
        scores = np.zeros(len(images), dtype=np.float32)
        for i in range(len(images)):
            keypoints[i], scores[i] = decode_single_person(
                heatmaps[i],
                tags[i],
                detection_threshold=DETECTION_THRESHOLD,
                tag_threshold=TAG_THRESHOLD,
                nms_kernel=NMS_KERNEL,
                max_people=MAX_NUM_PEOPLE,
                refine=self.refine,
            )
        return keypoints, scores

    def pose_features(self, pose_maps: np.ndarray) -> np.ndarray:
        """uint8 RGB renders [B, H, W, 3] -> float32 [B, 32, ceil(H/4), ceil(W/4)]."""
        import torch

        if self.net is None:
            raise RuntimeError("call setup(device) first")
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pose_maps)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            return self.net.pose_features(x).float().cpu().numpy()

    def __call__(self, batch: list[Sample]) -> list[dict[str, np.ndarray]]:
        images = [checked_image(sample, self.name) for sample in batch]

        store = numpy_store_dtype(self.dtype)
        results: list[dict[str, np.ndarray] | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.shape[:2], []).append(i)
        for (height, width), indices in by_size.items():
            keypoints, _ = self.predict(np.stack([images[i] for i in indices]))
            renders = np.stack([render_pose_map(kp, height, width) for kp in keypoints])
            features = self.pose_features(renders)
            expected = (FEATURE_CHANNELS, math.ceil(height / FEATURE_STRIDE), math.ceil(width / FEATURE_STRIDE))
            if features.shape[1:] != expected:
                raise ExtractorError(f"pose features {features.shape[1:]} != {expected}")
            for row, i in enumerate(indices):
                results[i] = {
                    "keypoints.npy": keypoints[row],
                    "pose_features.npy": _round_to(features[row], self.dtype).astype(store),
                    NOTES: _pose_notes(keypoints[row]),
                }
        return results  # type: ignore[return-value]


def _round_to(array: np.ndarray, dtype: str) -> np.ndarray:
    """bf16 features are stored as float32 after bf16 rounding (base.numpy_store_dtype)."""
    if dtype != "bf16":
        return array
    import torch

    return torch.from_numpy(array).to(torch.bfloat16).float().numpy()


def _pose_notes(keypoints: np.ndarray) -> list[str]:
    present = int((keypoints[:, 2] > 0).sum())
    if present == 0:
        return ["no person"]
    return [f"fewer than {FEW_JOINTS} joints (cut off or occluded)"] if present < FEW_JOINTS else []
