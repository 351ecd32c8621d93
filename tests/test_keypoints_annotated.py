"""AnnotatedKeypoints: source keypoints rescaled to the stored resolution."""

from __future__ import annotations

import numpy as np
import pytest

from posedata.extractors import create_extractor
from posedata.extractors.base import ExtractorError
from posedata.extractors.keypoints_annotated import NUM_JOINTS, AnnotatedKeypoints

MISSING = [-1.0, -1.0, 0.0]


def deepfashion_keypoints() -> list[list[float]]:
    """18 joints in the 256 x 176 (H x W) CSV frame; Lear and Rear missing (-1, as the CSVs)."""
    points = [[8.0 * i + 4.0, 12.0 * i + 6.0, 1.0] for i in range(NUM_JOINTS)]
    points[16] = list(MISSING)
    points[17] = list(MISSING)
    return points


def sample(annotations=None, **extra) -> dict:
    return {"key": "k", "image": np.zeros((512, 352, 3), dtype=np.uint8), "annotations": annotations or {}, **extra}


def test_registry_and_protocol():
    extractor = create_extractor("keypoints_annotated")
    assert isinstance(extractor, AnnotatedKeypoints)
    assert extractor.uses_model is False
    spec = extractor.outputs()["keypoints"]
    assert spec.suffix == "keypoints.npy" and spec.dtype == "float32" and spec.shape == (18, 3)
    assert extractor.null_embedding() is None


def test_rescaling_is_exact_on_hand_computed_values():
    extractor = AnnotatedKeypoints(resolution=(512, 352))
    extractor.setup("cuda")  # no model: stays on CPU whatever it is given
    annotations = {"keypoints": deepfashion_keypoints(), "keypoints_frame": [256, 176]}
    out = extractor([sample(annotations)])[0]["keypoints.npy"]
    assert out.shape == (18, 3) and out.dtype == np.float32
    # 256x176 -> 512x352: both axes x2. Joint 0: (4, 6) -> (8, 12); joint 5: (44, 66) -> (88, 132).
    np.testing.assert_array_equal(out[0], [8.0, 12.0, 1.0])
    np.testing.assert_array_equal(out[5], [88.0, 132.0, 1.0])
    np.testing.assert_array_equal(out[15], [248.0, 372.0, 1.0])


def test_rescaling_unequal_axes():
    # Frame 256x176 -> stored 128x64 (H x W): x * 64/176, y * 128/256.
    extractor = AnnotatedKeypoints(resolution=(128, 64))
    points = [list(MISSING)] * NUM_JOINTS
    points[1] = [88.0, 100.0, 0.5]
    points[2] = [11.0, 255.0, 0.75]
    out = extractor.keypoints_for(sample({"keypoints": points, "keypoints_frame": [256, 176]}))
    np.testing.assert_array_equal(out[1], np.float32([32.0, 50.0, 0.5]))
    np.testing.assert_array_equal(out[2], np.float32([4.0, 127.5, 0.75]))
    np.testing.assert_array_equal(out[0], [0, 0, 0])


def test_missing_joints_are_zero():
    extractor = AnnotatedKeypoints(resolution=(512, 352))
    points = deepfashion_keypoints()
    points[3] = [50.0, 60.0, 0.0]  # score 0
    points[4] = None  # absent
    points[6] = [-1.0, 30.0, 1.0]  # negative coordinate, as the CSVs write missing
    points[7] = [float("nan"), 30.0, 1.0]
    out = extractor.keypoints_for(sample({"keypoints": points, "keypoints_frame": [256, 176]}))
    for joint in (3, 4, 6, 7, 16, 17):
        np.testing.assert_array_equal(out[joint], [0, 0, 0])
    assert (out[[0, 1, 2, 5, 8], 2] == 1.0).all()


def test_point_without_score_counts_as_present():
    extractor = AnnotatedKeypoints(resolution=(256, 176))
    points = [None] * NUM_JOINTS
    points[0] = [10.0, 20.0]
    out = extractor.keypoints_for(sample({"keypoints": points, "keypoints_frame": [256, 176]}))
    np.testing.assert_array_equal(out[0], [10.0, 20.0, 1.0])


@pytest.mark.parametrize("annotations", [None, {}, {"keypoints": None}, {"keypoints": []}])
def test_no_annotations_gives_all_zeros(annotations):
    s = sample()
    s["annotations"] = annotations
    out = AnnotatedKeypoints().keypoints_for(s)
    assert out.shape == (18, 3) and out.dtype == np.float32
    assert not out.any()


def test_sample_without_annotations_key():
    out = AnnotatedKeypoints()([{"key": "k", "image": np.zeros((512, 352, 3), np.uint8)}])
    assert not out[0]["keypoints.npy"].any()


def test_frame_none_uses_original_size():
    # Coordinates in the original photo's pixels. 1024x704 (H x W) -> 512x352 is exactly /2.
    extractor = AnnotatedKeypoints(resolution=(512, 352))
    points = [None] * NUM_JOINTS
    points[0] = [700.0, 1000.0, 0.9]
    annotations = {"keypoints": points, "keypoints_frame": None}
    out = extractor.keypoints_for(sample(annotations, original_size=(1024, 704)))
    np.testing.assert_array_equal(out[0], np.float32([350.0, 500.0, 0.9]))

    # DeepFashion's real high-res size: 1101 x 750 -> x * 352/750, y * 512/1101.
    out = extractor.keypoints_for(sample(annotations, original_size=(1101, 750)))
    np.testing.assert_array_equal(out[0], np.float32([700.0 * 352 / 750, 1000.0 * 512 / 1101, 0.9]))


def test_frame_none_without_original_size_is_an_extractor_error():
    annotations = {"keypoints": deepfashion_keypoints(), "keypoints_frame": None}
    with pytest.raises(ExtractorError, match="original_size"):
        AnnotatedKeypoints().keypoints_for(sample(annotations))


@pytest.mark.parametrize(
    "annotations",
    [
        {"keypoints": [[1.0, 2.0, 1.0]] * 17, "keypoints_frame": [256, 176]},  # wrong count
        {"keypoints": [[1.0, 2.0, 1.0, 4.0]] * 18, "keypoints_frame": [256, 176]},  # malformed joint
        {"keypoints": [[1.0, 2.0, 1.0]] * 18, "keypoints_frame": [0, 176]},  # bad frame
    ],
)
def test_malformed_annotations_raise(annotations):
    with pytest.raises(ExtractorError):
        AnnotatedKeypoints().keypoints_for(sample(annotations))


def test_fingerprint():
    def fp(**kwargs):
        return AnnotatedKeypoints(**kwargs).fingerprint()

    assert fp() == fp()
    assert fp() != fp(resolution=(256, 176))
    assert fp(annotation_source="sha256:aaa") != fp(annotation_source="sha256:bbb")
    # Stored as float32 whatever the dataset dtype, and no model: these change nothing.
    assert fp(dtype="fp16") == fp(dtype="fp32")
    assert fp(weights="tiny", seed=3) == fp()
    inputs = AnnotatedKeypoints(annotation_source="sha256:aaa").fingerprint_inputs()
    assert inputs["model"] == "annotations" and inputs["annotation_source"] == "sha256:aaa"
    assert inputs["feature"] == "keypoints_annotated" and inputs["dtype"] == "float32"
    assert AnnotatedKeypoints().card()["model"] == "annotations"
