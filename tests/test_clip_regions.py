"""ClipRegionsExtractor: one CLIP embedding per parsing box, through the clip feature's pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from posedata.extractors.base import NOTES, ExtractorError
from posedata.extractors.clip import PROCESSOR_DEFAULTS, TINY_CONFIG, ClipExtractor
from posedata.extractors.clip_regions import PAD_FILL, ClipRegionsExtractor, crop_region
from posedata.extractors.parsing import ParsingExtractor
from posedata.shards import decode_output, encode_output

STORED = (256, 176)  # (H, W)
D = TINY_CONFIG["projection_dim"]

# Hand-made parsing results for the stored frame: (classes, boxes x0, y0, x1, y1).
REGIONS = [
    ([2, 4, 11], [[60, 5, 120, 60], [30, 60, 150, 150], [70, 20, 110, 58]]),
    ([6], [[40, 140, 140, 256]]),
    ([1, 9, 10, 16], [[0, 0, 176, 256], [50, 230, 80, 256], [95, 228, 130, 256], [150, 100, 151, 101]]),
]


@pytest.fixture(scope="module")
def photos(fixtures_dir) -> list[np.ndarray]:
    paths = sorted((fixtures_dir / "deepfashion").glob("*.png"))
    assert len(paths) >= 3
    height, width = STORED
    return [np.asarray(Image.open(p).convert("RGB").resize((width, height), Image.BICUBIC)) for p in paths]


@pytest.fixture(scope="module")
def tiny() -> ClipRegionsExtractor:
    extractor = ClipRegionsExtractor(weights="tiny", resolution=STORED)
    extractor.setup("cpu")
    return extractor


@pytest.fixture(scope="module")
def clip() -> ClipExtractor:
    extractor = ClipExtractor(weights="tiny", resolution=STORED)
    extractor.setup("cpu")
    return extractor


def parsing(classes, boxes) -> dict:
    """What the build puts under sample["parsing"] (decoded arrays, keyed by suffix)."""
    return {
        "classes.npy": np.asarray(classes, dtype=np.int32),
        "boxes.npy": np.asarray(boxes, dtype=np.int32).reshape(-1, 4),
    }


def samples(images, regions) -> list[dict]:
    return [
        {"key": f"img{i}", "image": image, "annotations": {}, "parsing": parsing(classes, boxes)}
        for i, (image, (classes, boxes)) in enumerate(zip(images, regions))
    ]


def test_outputs_and_shapes(tiny, photos):
    out = tiny(samples(photos, REGIONS))
    assert len(out) == len(photos)
    for item, (classes, _) in zip(out, REGIONS):
        assert set(item) == {"embeds.npy", "classes.npy", NOTES}
        assert item["embeds.npy"].shape == (len(classes), D) and item["embeds.npy"].dtype == np.float16
        assert item["classes.npy"].dtype == np.int32
        np.testing.assert_array_equal(item["classes.npy"], classes)
        assert np.isfinite(item["embeds.npy"]).all()
    specs = tiny.outputs()
    assert specs["embeds"].suffix == "embeds.npy" and specs["embeds"].shape == ("M", D) and specs["embeds"].dtype == "float16"
    assert specs["classes"].suffix == "classes.npy" and specs["classes"].dtype == "int32"
    assert tiny.requires == ("parsing",)
    assert ClipRegionsExtractor().outputs()["embeds"].shape == ("M", 1024)  # ViT-H/14 by default


def test_embeddings_are_clip_of_the_hand_cropped_image(tiny, clip, photos):
    """Row j is what the clip feature stores for the image cut to box j by hand."""
    out = tiny(samples(photos, REGIONS))
    crops = [image[y0:y1, x0:x1] for image, (_, boxes) in zip(photos, REGIONS) for x0, y0, x1, y1 in boxes]
    expected = np.stack([row["embeds.npy"] for row in clip([{"key": "c", "image": c} for c in crops])])
    np.testing.assert_array_equal(np.concatenate([item["embeds.npy"] for item in out]), expected)
    # Distinct crops, distinct embeddings.
    assert not np.array_equal(out[0]["embeds.npy"][0], out[0]["embeds.npy"][1])


def test_batching_of_crops_equals_one_by_one(tiny, photos):
    together = tiny(samples(photos, REGIONS))
    for image, (classes, boxes), batched in zip(photos, REGIONS, together):
        alone = tiny(samples([image], [(classes, boxes)]))[0]
        np.testing.assert_array_equal(alone["classes.npy"], batched["classes.npy"])
        np.testing.assert_allclose(
            alone["embeds.npy"].astype(np.float32), batched["embeds.npy"].astype(np.float32), rtol=0, atol=2e-3
        )
        for j, (c, box) in enumerate(zip(classes, boxes)):  # and crop by crop
            single = tiny(samples([image], [([c], [box])]))[0]["embeds.npy"]
            np.testing.assert_allclose(single[0].astype(np.float32), batched["embeds.npy"][j].astype(np.float32), rtol=0, atol=2e-3)


def test_one_clip_forward_per_batch(tiny, photos, monkeypatch):
    calls = []
    encode = tiny.clip.encode_pixels
    monkeypatch.setattr(tiny.clip, "encode_pixels", lambda pixels: calls.append(len(pixels)) or encode(pixels))
    tiny(samples(photos, REGIONS))
    assert calls == [sum(len(classes) for classes, _ in REGIONS)]


def test_no_regions(tiny, photos, monkeypatch):
    empty = ([], np.zeros((0, 4), dtype=np.int32))
    # A sample with only background among others ...
    out = tiny(samples(photos, [REGIONS[0], empty, REGIONS[1]]))
    assert out[1]["embeds.npy"].shape == (0, D) and out[1]["embeds.npy"].dtype == np.float16
    assert out[1]["classes.npy"].shape == (0,) and out[1]["classes.npy"].dtype == np.int32
    assert out[0]["embeds.npy"].shape == (3, D) and out[2]["embeds.npy"].shape == (1, D)
    # ... and a batch with none at all: no forward.
    monkeypatch.setattr(tiny.clip, "encode_pixels", lambda pixels: pytest.fail("no crop, no forward"))
    out = tiny(samples(photos[:2], [empty, empty]))
    for item in out:
        assert item["embeds.npy"].shape == (0, D) and item["embeds.npy"].dtype == np.float16
        assert item["classes.npy"].shape == (0,)
        np.testing.assert_array_equal(decode_output("embeds.npy", encode_output("embeds.npy", item["embeds.npy"])), item["embeds.npy"])
    assert tiny([]) == []


def test_null_embedding_is_the_clip_null(tiny, clip):
    null = tiny.null_embedding()
    assert set(null) == {"embeds.npy"} and null["embeds.npy"].shape == (D,)
    np.testing.assert_array_equal(null["embeds.npy"], clip.null_embedding()["embeds.npy"])
    with torch.inference_mode():
        direct = tiny.clip._model(pixel_values=torch.zeros(1, 3, 224, 224)).image_embeds[0]
    np.testing.assert_array_equal(null["embeds.npy"], direct.to(torch.float16).numpy())


def test_pad_crop_rule():
    image = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3)
    box = (2, 1, 8, 5)  # 6 wide, 4 high
    np.testing.assert_array_equal(crop_region(image, box), image[1:5, 2:8])
    padded = crop_region(image, box, "pad")
    assert padded.shape == (6, 6, 3)
    np.testing.assert_array_equal(padded[1:5], image[1:5, 2:8])
    assert (padded[[0, 5]] == np.array(PAD_FILL, dtype=np.uint8)).all()
    assert PAD_FILL == tuple(round(255 * m) for m in PROCESSOR_DEFAULTS["image_mean"]) == (123, 117, 104)
    tall = crop_region(image, (0, 0, 2, 6), "pad")
    assert tall.shape == (6, 6, 3) and (tall[:, 2:4] == image[:, 0:2]).all()
    with pytest.raises(ValueError, match="crop_rule"):
        crop_region(image, box, "stretch")


def test_pad_rule_embeds_the_padded_crop(photos, clip):
    extractor = ClipRegionsExtractor(weights="tiny", resolution=STORED, crop_rule="pad")
    extractor.setup("cpu")
    classes, boxes = REGIONS[0]
    out = extractor(samples(photos[:1], [REGIONS[0]]))[0]["embeds.npy"]
    expected = clip([{"key": "c", "image": crop_region(photos[0], b, "pad")} for b in boxes])
    np.testing.assert_array_equal(out, np.stack([row["embeds.npy"] for row in expected]))


@pytest.mark.parametrize(
    "regions, match",
    [
        (([2], [[0, 0, 177, 10]]), "outside"),  # past the right edge
        (([2], [[10, 10, 10, 20]]), "empty"),  # zero width
        (([2, 4], [[0, 0, 5, 5]]), "2 parsing classes but 1 boxes"),
    ],
)
def test_bad_regions_raise_extractor_error(tiny, photos, regions, match):
    with pytest.raises(ExtractorError, match=match):
        tiny(samples(photos[:1], [regions]))


def test_missing_parsing_or_bad_image(tiny, photos):
    with pytest.raises(ExtractorError, match="no parsing"):
        tiny([{"key": "k", "image": photos[0]}])
    with pytest.raises(ExtractorError, match="bad"):
        tiny([{"key": "bad", "image": np.zeros((8, 8), dtype=np.uint8), "parsing": parsing([], [])}])


def test_fingerprint_holds_clip_inputs_and_crop_rule():
    def fp(**kwargs):
        return ClipRegionsExtractor(**kwargs).fingerprint()

    base = fp(weights="tiny")
    assert base == fp(weights="tiny")
    assert base != fp(weights="tiny", crop_rule="pad")
    assert base != fp(weights="tiny", processor_backend="torchvision")
    assert base != fp(weights="tiny", square_size=448)
    assert base != fp(weights="tiny", seed=1)
    assert fp(weights="pretrained") != fp(weights="pretrained", revision="abc")
    regions = ClipRegionsExtractor(weights="tiny")
    inputs = regions.fingerprint_inputs()
    assert inputs["feature"] == "clip_regions"
    assert inputs["clip"] == ClipExtractor(weights="tiny").fingerprint_inputs()
    assert inputs["crop"]["crop_rule"] == "resize"
    assert regions.folder != ClipExtractor(weights="tiny").folder
    assert regions.card()["requires"] == ["parsing"]


def test_on_parsing_outputs_through_the_shard_codec(photos):
    """The build's path: parsing's outputs encoded into the shard, decoded into the sample."""
    parser = ParsingExtractor(weights="tiny", resolution=STORED)
    parser.setup("cpu")
    regions = ClipRegionsExtractor(weights="tiny", resolution=STORED)
    regions.setup("cpu")
    parsed = parser([{"key": f"img{i}", "image": image} for i, image in enumerate(photos)])
    batch = []
    for i, (image, item) in enumerate(zip(photos, parsed)):
        decoded = {s: decode_output(s, encode_output(s, v)) for s, v in item.items() if s != NOTES}
        batch.append({"key": f"img{i}", "image": image, "parsing": decoded})
    for item, parse in zip(regions(batch), parsed):
        np.testing.assert_array_equal(item["classes.npy"], parse["classes.npy"])
        assert item["embeds.npy"].shape == (len(parse["classes.npy"]), D)


def test_real_loading_path_passes_the_clip_model(tmp_path, photos):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(5)
    saved = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CONFIG)).eval()
    saved.save_pretrained(tmp_path / "clip")
    extractor = ClipRegionsExtractor(weights="pretrained", model=str(tmp_path / "clip"), resolution=STORED, dtype="fp32")
    assert extractor.outputs()["embeds"].shape == ("M", D)
    extractor.setup("cpu")
    classes, boxes = REGIONS[0]
    out = extractor(samples(photos[:1], [REGIONS[0]]))[0]["embeds.npy"]
    crops = [photos[0][y0:y1, x0:x1] for x0, y0, x1, y1 in boxes]
    with torch.inference_mode():
        expected = saved(pixel_values=extractor.clip.preprocess(crops)).image_embeds.numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    assert extractor.fingerprint_inputs()["clip"]["weights_digest"] is not None
