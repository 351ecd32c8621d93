"""ParsingExtractor: ATR label set, regions from a label map, SegFormer pipeline, real loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from posedata.extractors.base import NOTES, ExtractorError, local_weights_digest
from posedata.extractors.parsing import (
    ATR_ID2LABEL,
    ATR_LABELS,
    PROCESSOR_DEFAULTS,
    SEGFORMER_B2_CONFIG,
    TINY_CONFIG,
    LabelMappingError,
    ParsingExtractor,
    atr_lookup,
    regions_from_labels,
)
from posedata.shards import decode_output, encode_output

STORED = (256, 176)  # (H, W)


@pytest.fixture(scope="module")
def photos(fixtures_dir) -> list[np.ndarray]:
    """The real DeepFashion photos, resized to the stored resolution as uint8."""
    paths = sorted((fixtures_dir / "deepfashion").glob("*.png"))
    assert len(paths) >= 3
    height, width = STORED
    return [np.asarray(Image.open(p).convert("RGB").resize((width, height), Image.BICUBIC)) for p in paths]


@pytest.fixture(scope="module")
def tiny() -> ParsingExtractor:
    extractor = ParsingExtractor(weights="tiny", resolution=STORED)
    extractor.setup("cpu")
    return extractor


def samples(images: list[np.ndarray]) -> list[dict]:
    return [{"key": f"img{i}", "image": image, "annotations": {}} for i, image in enumerate(images)]


# ---- the label set ---------------------------------------------------------------------------


def test_label_set_is_schp_atr():
    """SCHP simple_extractor.py dataset_settings['atr'] and the checkpoint's id2label."""
    schp_atr = [
        "Background", "Hat", "Hair", "Sunglasses", "Upper-clothes", "Skirt", "Pants", "Dress", "Belt",
        "Left-shoe", "Right-shoe", "Face", "Left-leg", "Right-leg", "Left-arm", "Right-arm", "Bag", "Scarf",
    ]  # fmt: skip
    assert list(ATR_LABELS) == [name.lower() for name in schp_atr]
    assert [ATR_ID2LABEL[i] for i in range(18)] == schp_atr
    np.testing.assert_array_equal(atr_lookup(ATR_ID2LABEL), np.arange(18))
    card = ParsingExtractor(weights="tiny").card()
    assert card["labels"] == list(ATR_LABELS)


def test_label_mapping_by_name_any_order_and_spelling():
    order = np.random.RandomState(0).permutation(18)
    # Model class k is our class order[k], spelt differently.
    id2label = {str(k): ATR_LABELS[c].upper().replace("-", "_") for k, c in enumerate(order)}
    np.testing.assert_array_equal(atr_lookup(id2label), order)
    assert atr_lookup({k: v.replace("-", " ") for k, v in ATR_ID2LABEL.items()}).tolist() == list(range(18))


@pytest.mark.parametrize(
    "id2label, match",
    [
        ({i: f"LABEL_{i}" for i in range(18)}, "not in the ATR label set"),  # an untouched config
        ({**ATR_ID2LABEL, 3: "Glove"}, "Glove"),  # a LIP class
        ({i: ATR_ID2LABEL[i] for i in range(17)}, "missing \\['scarf'\\]"),  # one class short
        ({**ATR_ID2LABEL, 17: "Bag"}, "exactly once"),  # a duplicate
        ({0: "Background", 2: "Hat"}, "0..N-1"),
    ],
)
def test_label_mapping_rejects_other_label_sets(id2label, match):
    with pytest.raises(LabelMappingError, match=match):
        atr_lookup(id2label)


# ---- regions from a label map ----------------------------------------------------------------


def test_regions_from_hand_made_label_map():
    labels = np.zeros((6, 8), dtype=np.uint8)
    labels[1:3, 2:5] = 4  # upper-clothes: a 2 x 3 block
    labels[5, 7] = 2  # hair: one pixel in the corner
    labels[0, 0] = 14  # left-arm: two pixels far apart
    labels[4, 3] = 14
    classes, pixels, boxes = regions_from_labels(labels)
    np.testing.assert_array_equal(classes, [2, 4, 14])
    np.testing.assert_array_equal(pixels, [1, 6, 2])
    np.testing.assert_array_equal(boxes, [[7, 5, 8, 6], [2, 1, 5, 3], [0, 0, 4, 5]])
    assert classes.dtype == pixels.dtype == boxes.dtype == np.int32
    assert boxes.shape == (3, 4)
    # The box wraps the class exactly: every pixel inside, and each edge touches it.
    for c, (x0, y0, x1, y1) in zip(classes, boxes):
        inside = labels[y0:y1, x0:x1] == c
        assert inside.sum() == (labels == c).sum()
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


def test_regions_from_background_only():
    for labels in (np.zeros((4, 5), dtype=np.uint8), np.zeros((0, 0), dtype=np.uint8)):
        classes, pixels, boxes = regions_from_labels(labels)
        assert classes.shape == (0,) and pixels.shape == (0,) and boxes.shape == (0, 4)
        assert classes.dtype == pixels.dtype == boxes.dtype == np.int32


def test_regions_reject_non_2d():
    with pytest.raises(ValueError, match="H, W"):
        regions_from_labels(np.zeros((2, 2, 3), dtype=np.uint8))


# ---- the extractor ---------------------------------------------------------------------------


def test_tiny_outputs_on_real_photos(tiny, photos):
    out = tiny(samples(photos))
    assert len(out) == len(photos)
    specs = {spec.suffix: spec for spec in tiny.outputs().values()}
    assert set(specs) == {"labels.png", "classes.npy", "pixels.npy", "boxes.npy"}
    for item in out:
        assert set(item) == set(specs) | {NOTES}
        assert item[NOTES] == ([] if len(item["classes.npy"]) else ["only background"])
        labels = item["labels.png"]
        assert labels.shape == STORED and labels.dtype == np.uint8 and labels.max() < 18
        m = len(item["classes.npy"])
        assert item["classes.npy"].shape == (m,) and item["pixels.npy"].shape == (m,) and item["boxes.npy"].shape == (m, 4)
        for suffix, spec in specs.items():
            assert str(item[suffix].dtype) == spec.dtype
        # The arrays are the label map's regions; pixel counts add up with background.
        for got, expected in zip((item["classes.npy"], item["pixels.npy"], item["boxes.npy"]), regions_from_labels(labels)):
            np.testing.assert_array_equal(got, expected)
        assert item["pixels.npy"].sum() + (labels == 0).sum() == STORED[0] * STORED[1]
        # Stored losslessly through the shard codec.
        for suffix in specs:
            value = item[suffix]
            np.testing.assert_array_equal(decode_output(suffix, encode_output(suffix, value)), value)


def test_batched_equals_one_by_one(tiny, photos):
    together = tiny(samples(photos))
    for image, batched in zip(photos, together):
        alone = tiny(samples([image]))[0]
        for suffix in alone:
            np.testing.assert_array_equal(alone[suffix], batched[suffix])


def test_only_background_prediction_gives_empty_regions(photos):
    extractor = ParsingExtractor(weights="tiny", resolution=STORED)
    extractor.setup("cpu")
    classifier = extractor._model.decode_head.classifier
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.bias.zero_()
        classifier.bias[0] = 1.0
    item = extractor(samples(photos[:1]))[0]
    assert (item["labels.png"] == 0).all()
    assert item["classes.npy"].shape == (0,) and item["pixels.npy"].shape == (0,) and item["boxes.npy"].shape == (0, 4)
    assert item["boxes.npy"].dtype == np.int32


def test_empty_batch_and_bad_image(tiny):
    assert tiny([]) == []
    with pytest.raises(ExtractorError, match="bad"):
        tiny([{"key": "bad", "image": np.zeros((8, 8), dtype=np.uint8)}])


def test_recorded_processor_facts_are_the_segformer_defaults():
    """SegformerImageProcessor() (torchvision backend in 5.x) and its PIL twin construct the
    recorded parameters, which are also the checkpoint's preprocessor_config.json."""
    from transformers import SegformerImageProcessor
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
    from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

    for processor in (SegformerImageProcessor(), SegformerImageProcessorPil()):
        config = processor.to_dict()
        for name, value in PROCESSOR_DEFAULTS.items():
            assert config[name] == pytest.approx(value), name
    assert PROCESSOR_DEFAULTS["resample"] == PILImageResampling.BILINEAR
    assert PROCESSOR_DEFAULTS["image_mean"] == list(IMAGENET_DEFAULT_MEAN)
    assert PROCESSOR_DEFAULTS["image_std"] == list(IMAGENET_DEFAULT_STD)


def test_preprocessing_is_the_segformer_processor(photos):
    from transformers import SegformerImageProcessor
    from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

    for backend, reference in (("pil", SegformerImageProcessorPil()), ("torchvision", SegformerImageProcessor())):
        ours = ParsingExtractor(weights="tiny", resolution=STORED, processor_backend=backend).preprocess(photos)
        expected = reference(images=photos, return_tensors="pt").pixel_values
        assert ours.shape == (len(photos), 3, 512, 512) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    # PIL bilinear resize to 512 x 512 (squash), then ImageNet normalisation.
    square = np.asarray(Image.fromarray(photos[0]).resize((512, 512), Image.BILINEAR), dtype=np.float32) / 255
    mean, std = np.array(PROCESSOR_DEFAULTS["image_mean"]), np.array(PROCESSOR_DEFAULTS["image_std"])
    manual = torch.from_numpy(((square - mean) / std).transpose(2, 0, 1).astype(np.float32))
    torch.testing.assert_close(ParsingExtractor(weights="tiny").preprocess(photos[:1])[0], manual, rtol=0, atol=1e-5)


def test_segformer_b2_config_on_meta_device():
    """Random mode builds mattmdjaga/segformer_b2_clothes' architecture: SegFormer-B2 with
    18 classes; counted without allocating."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    assert SEGFORMER_B2_CONFIG["hidden_sizes"] == [64, 128, 320, 512]
    assert SEGFORMER_B2_CONFIG["depths"] == [3, 4, 6, 3]
    assert SEGFORMER_B2_CONFIG["decoder_hidden_size"] == 768
    assert SEGFORMER_B2_CONFIG["num_attention_heads"] == [1, 2, 5, 8]
    assert SEGFORMER_B2_CONFIG["num_labels"] == TINY_CONFIG["num_labels"] == 18
    # The entries the checkpoint's config leaves to SegformerConfig's defaults are MiT's.
    defaults = SegformerConfig()
    for name in ("sr_ratios", "patch_sizes", "strides", "mlp_ratios", "hidden_act", "layer_norm_eps", "num_encoder_blocks"):
        assert list(np.atleast_1d(getattr(defaults, name))) == list(np.atleast_1d(SEGFORMER_B2_CONFIG[name])), name
    with torch.device("meta"):
        model = SegformerForSemanticSegmentation(SegformerConfig(**SEGFORMER_B2_CONFIG))
    assert sum(p.numel() for p in model.segformer.parameters()) == 24_196_288  # MiT-B2 encoder, ~24.2M
    assert sum(p.numel() for p in model.parameters()) == 27_360_466
    assert ParsingExtractor(weights="random").architecture_config() == SEGFORMER_B2_CONFIG


def test_seeded_init_is_deterministic(photos):
    def labels(seed):
        extractor = ParsingExtractor(weights="tiny", resolution=STORED, seed=seed)
        extractor.setup("cpu")
        with torch.inference_mode():
            return extractor._model(pixel_values=extractor.preprocess(photos[:1])).logits

    torch.testing.assert_close(labels(0), labels(0), rtol=0, atol=0)
    assert not torch.allclose(labels(0), labels(1))


def test_fingerprints():
    def fp(**kwargs):
        return ParsingExtractor(**kwargs).fingerprint()

    base = fp(weights="tiny")
    assert base == fp(weights="tiny")
    assert len({fp(weights="tiny"), fp(weights="random"), fp(weights="pretrained")}) == 3
    assert base != fp(weights="tiny", resolution=(256, 176))
    assert base != fp(weights="tiny", seed=1)
    assert base != fp(weights="tiny", processor_backend="torchvision")
    assert fp(weights="pretrained") != fp(weights="pretrained", revision="abc123")
    inputs = ParsingExtractor(weights="tiny").fingerprint_inputs()
    assert inputs["labels"] == list(ATR_LABELS) and inputs["config"] == TINY_CONFIG
    assert inputs["preprocessing"]["processor_params"]["size"] == {"height": 512, "width": 512}
    assert ParsingExtractor().model_label() == "mattmdjaga/segformer_b2_clothes"


# ---- real loading path -----------------------------------------------------------------------


def save_tiny_checkpoint(path, seed: int, id2label: dict[int, str]):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(**TINY_CONFIG, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(seed)
    model = SegformerForSemanticSegmentation(config).eval()
    model.save_pretrained(path)
    return model


def reference_labels(model, pixel_values, size, lookup) -> np.ndarray:
    """The model card's postprocessing: bilinear upsampling of the logits, then argmax."""
    with torch.inference_mode():
        logits = model(pixel_values=pixel_values).logits
    up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return np.asarray(lookup)[up.argmax(dim=1).numpy()].astype(np.uint8)


def test_real_loading_path_from_local_dir(tmp_path, photos):
    saved = save_tiny_checkpoint(tmp_path / "ckpt", seed=123, id2label=dict(ATR_ID2LABEL))
    extractor = ParsingExtractor(weights="pretrained", model=str(tmp_path / "ckpt"), resolution=STORED)
    extractor.setup("cpu")
    assert not extractor._model.training
    out = extractor(samples(photos))
    expected = reference_labels(saved, extractor.preprocess(photos), STORED, np.arange(18))
    np.testing.assert_array_equal(np.stack([item["labels.png"] for item in out]), expected)
    # transformers' own postprocessing agrees.
    from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

    with torch.inference_mode():
        outputs = saved(pixel_values=extractor.preprocess(photos))
    post = SegformerImageProcessorPil().post_process_semantic_segmentation(outputs, target_sizes=[STORED] * len(photos))
    for item, theirs in zip(out, post):
        np.testing.assert_array_equal(item["labels.png"], theirs.numpy())
    digest = extractor.fingerprint_inputs()["weights_digest"]
    assert digest == local_weights_digest(str(tmp_path / "ckpt")) is not None


def test_checkpoint_with_permuted_labels_writes_our_ids(tmp_path, photos):
    order = np.random.RandomState(1).permutation(18)
    id2label = {k: ATR_ID2LABEL[int(c)] for k, c in enumerate(order)}
    saved = save_tiny_checkpoint(tmp_path / "perm", seed=7, id2label=id2label)
    extractor = ParsingExtractor(weights="pretrained", model=str(tmp_path / "perm"), resolution=STORED)
    extractor.setup("cpu")
    labels = extractor(samples(photos[:1]))[0]["labels.png"]
    np.testing.assert_array_equal(labels, reference_labels(saved, extractor.preprocess(photos[:1]), STORED, order)[0])


def test_checkpoint_with_unknown_labels_is_refused(tmp_path):
    save_tiny_checkpoint(tmp_path / "lip", seed=0, id2label={i: f"LABEL_{i}" for i in range(18)})
    extractor = ParsingExtractor(weights="pretrained", model=str(tmp_path / "lip"), resolution=STORED)
    with pytest.raises(LabelMappingError, match="ATR"):
        extractor.setup("cpu")
