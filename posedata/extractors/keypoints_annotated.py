"""The keypoints that came with the source, stored as their own feature beside extracted ones.

DeepFashion's `fasion-resize-annotation-*.csv` (PATN / CFLD) and similar files ship 18 COCO
keypoints per image. A source adapter puts them in the record's annotations; this extractor
rescales them to the stored resolution and writes them in the same layout as `openpose`, so a
plugin can read either (and a benchmark can compare them).

What it reads from each sample:

- `sample["annotations"]`: `{"keypoints": [[x, y, score]] * 18, "keypoints_frame": [H0, W0]
  or None}`. The frame is the image size the coordinates are in (256 x 176 for the DeepFashion
  CSVs). `[x, y]` entries without a score count as score 1.
- `sample["original_size"]`: `(H0, W0)` of the original image. Only needed, and then
  required, when `keypoints_frame` is None, meaning "in the original image's own pixels"; the
  build puts it there.

A joint is missing when it is None, not finite, has a score <= 0, or has a negative
coordinate (the CSVs write -1); missing joints are stored as (0, 0, 0). A sample without keypoint annotations gets
all zeros (every score 0), so it is well defined and the build can count such samples.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from posedata.extractors.base import NOTES, Extractor, ExtractorError, OutputSpec, Sample

NUM_JOINTS = 18  # COCO-18 (OpenPose body) order, as docs/design.md §4


class AnnotatedKeypoints(Extractor):
    name = "keypoints_annotated"
    version = "1"
    uses_model = False
    batch_size = 256

    def __init__(
        self,
        weights: str = "pretrained",
        model: str | None = None,
        resolution: tuple[int, int] = (512, 352),
        dtype: str = "fp16",
        seed: int = 0,
        annotation_source: str = "",
    ) -> None:
        # weights / model / seed / dtype are accepted so the build can construct every
        # extractor alike; none of them changes what this one writes.
        super().__init__(weights=weights, model=model, resolution=resolution, dtype=dtype, seed=seed)
        self.annotation_source = annotation_source

    def model_label(self) -> str:
        return "annotations"

    def outputs(self) -> dict[str, OutputSpec]:
        return {
            "keypoints": OutputSpec(
                "keypoints.npy",
                "float32",
                (NUM_JOINTS, 3),
                "source-annotated keypoints (x, y, score) in stored-image pixels, COCO-18; missing = 0",
            )
        }

    def fingerprint_inputs(self) -> dict[str, Any]:
        inputs = super().fingerprint_inputs()
        inputs.update(
            {
                "model": "annotations",
                "weights_digest": None,
                # Always float32, whatever the dataset dtype: fp16 and fp32 datasets share it.
                "dtype": "float32",
                "annotation_source": self.annotation_source,
                "layout": "coco18 (x, y, score); missing joint = (0, 0, 0)",
            }
        )
        return inputs

    def setup(self, device: str) -> None:
        # Pure function of the annotations: nothing to load, runs on CPU.
        super().setup("cpu")

    def __call__(self, batch: list[Sample]) -> list[dict[str, np.ndarray]]:
        results = []
        for sample in batch:
            keypoints = self.keypoints_for(sample)
            results.append({"keypoints.npy": keypoints, NOTES: [] if keypoints[:, 2].any() else ["no annotated keypoints"]})
        return results

    def keypoints_for(self, sample: Sample) -> np.ndarray:
        """[18, 3] float32 keypoints of one sample, in stored-image pixels."""
        key = sample.get("key", "?")
        out = np.zeros((NUM_JOINTS, 3), dtype=np.float32)
        annotations = sample.get("annotations") or {}
        keypoints = annotations.get("keypoints")
        if keypoints is None or len(keypoints) == 0:
            return out
        if len(keypoints) != NUM_JOINTS:
            raise ExtractorError(f"{self.name}: {key}: expected {NUM_JOINTS} keypoints, got {len(keypoints)}")

        frame_h, frame_w = self._frame(sample, annotations, key)
        height, width = self.resolution
        scale_x, scale_y = width / frame_w, height / frame_h
        for joint, point in enumerate(keypoints):
            parsed = _parse_point(point)
            if parsed is None:
                raise ExtractorError(f"{self.name}: {key}: keypoint {joint} is not [x, y] or [x, y, score]: {point!r}")
            x, y, score = parsed
            if score <= 0 or x < 0 or y < 0:
                continue  # missing joint stays (0, 0, 0)
            out[joint] = (x * scale_x, y * scale_y, score)
        return out

    def _frame(self, sample: Sample, annotations: dict[str, Any], key: str) -> tuple[float, float]:
        frame = annotations.get("keypoints_frame")
        if frame is None:
            frame = sample.get("original_size")
            if frame is None:
                raise ExtractorError(
                    f"{self.name}: {key}: keypoints_frame is None (original pixels) but the sample "
                    "has no original_size (H0, W0) to rescale from"
                )
        try:
            frame_h, frame_w = (float(v) for v in frame)
        except (TypeError, ValueError):
            raise ExtractorError(f"{self.name}: {key}: bad keypoint frame {frame!r}; expected (H, W)") from None
        if not (frame_h > 0 and frame_w > 0):
            raise ExtractorError(f"{self.name}: {key}: bad keypoint frame {frame!r}; expected positive (H, W)")
        return frame_h, frame_w


def _parse_point(point: Any) -> tuple[float, float, float] | None:
    """(x, y, score) of one annotated joint (missing ones get score 0); None when malformed."""
    if point is None:
        return (0.0, 0.0, 0.0)
    try:
        values = [float(v) for v in point]
    except (TypeError, ValueError):
        return None
    if len(values) == 2:
        values.append(1.0)
    if len(values) != 3:
        return None
    if not all(math.isfinite(v) for v in values):
        return (0.0, 0.0, 0.0)  # NaN / inf: some sources mark a missing joint so
    return values[0], values[1], values[2]
