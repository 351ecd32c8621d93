"""ClipExtractor: PCDMs preprocessing, batching, null embedding, fingerprints, real loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from posedata.extractors import create_extractor
from posedata.extractors.base import local_weights_digest
from posedata.extractors.clip import (
    PROCESSOR_DEFAULTS,
    TINY_CONFIG,
    VIT_H_14_CONFIG,
    ClipExtractor,
)

STORED = (256, 176)  # (H, W): the PATN / CFLD DeepFashion frame


@pytest.fixture(scope="module")
def photos(fixtures_dir) -> list[np.ndarray]:
    """The real DeepFashion-size photos, resized to the stored resolution as uint8."""
    paths = sorted((fixtures_dir / "deepfashion").glob("*.png"))
    assert len(paths) >= 3
    height, width = STORED
    return [np.asarray(Image.open(p).convert("RGB").resize((width, height), Image.BICUBIC)) for p in paths]


@pytest.fixture(scope="module")
def tiny() -> ClipExtractor:
    extractor = ClipExtractor(weights="tiny", resolution=STORED)
    extractor.setup("cpu")
    return extractor


def samples(images: list[np.ndarray]) -> list[dict]:
    return [{"key": f"img{i}", "image": image, "annotations": {}} for i, image in enumerate(images)]


def test_registry_finds_it():
    assert isinstance(create_extractor("clip", weights="tiny"), ClipExtractor)


def test_tiny_embeds_shape_and_stored_dtype(tiny, photos):
    out = tiny(samples(photos))
    assert len(out) == len(photos)
    for item in out:
        assert set(item) == {"embeds.npy"}
        assert item["embeds.npy"].shape == (TINY_CONFIG["projection_dim"],)
        assert item["embeds.npy"].dtype == np.float16
        assert np.isfinite(item["embeds.npy"]).all()
    spec = tiny.outputs()["embeds"]
    assert spec.suffix == "embeds.npy" and spec.dtype == "float16" and spec.shape == (32,)
    # Different photos, different embeddings.
    assert not np.array_equal(out[0]["embeds.npy"], out[1]["embeds.npy"])


@pytest.mark.parametrize("dtype, stored", [("fp32", np.float32), ("bf16", np.float32)])
def test_other_dataset_dtypes(photos, dtype, stored):
    extractor = ClipExtractor(weights="tiny", resolution=STORED, dtype=dtype)
    extractor.setup("cpu")
    embeds = extractor(samples(photos[:1]))[0]["embeds.npy"]
    assert embeds.dtype == stored
    if dtype == "bf16":  # rounded to bf16 before being stored as float32
        as_bf16 = torch.from_numpy(embeds).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(embeds, as_bf16)


def test_batched_equals_one_by_one(tiny, photos):
    batched = tiny(samples(photos))
    for image, together in zip(photos, batched):
        alone = tiny(samples([image]))[0]
        np.testing.assert_allclose(
            alone["embeds.npy"].astype(np.float32), together["embeds.npy"].astype(np.float32), rtol=0, atol=2e-3
        )


def test_empty_batch(tiny):
    assert tiny([]) == []


def test_seeded_init_is_deterministic(photos):
    def embed(seed):
        extractor = ClipExtractor(weights="tiny", resolution=STORED, seed=seed, dtype="fp32")
        extractor.setup("cpu")
        return extractor(samples(photos[:1]))[0]["embeds.npy"]

    np.testing.assert_array_equal(embed(0), embed(0))
    assert not np.allclose(embed(0), embed(1))


def test_null_embedding_is_zero_pixels_not_black_image(tiny):
    null = tiny.null_embedding()
    assert set(null) == {"embeds.npy"}
    assert null["embeds.npy"].shape == (32,) and null["embeds.npy"].dtype == np.float16
    # It is the encoder's output for an all-zero normalised tensor ...
    with torch.inference_mode():
        direct = tiny._model(pixel_values=torch.zeros(1, 3, 224, 224)).image_embeds[0]
    np.testing.assert_array_equal(null["embeds.npy"], direct.to(torch.float16).numpy())
    # ... which is not a black image: black normalises to -mean/std, not 0.
    black = np.zeros((*STORED, 3), dtype=np.uint8)
    assert tiny.preprocess([black]).abs().min() > 1.0
    black_embeds = tiny(samples([black]))[0]["embeds.npy"]
    assert np.abs(black_embeds.astype(np.float32) - null["embeds.npy"].astype(np.float32)).max() > 1e-2


def test_recorded_processor_facts_are_the_default_processor():
    """What `CLIPImageProcessor()` constructs in the installed transformers (5.23: the
    torchvision backend) and its PIL twin both equal the facts the fingerprint records."""
    from transformers import CLIPImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    for processor in (CLIPImageProcessor(), CLIPImageProcessorPil()):
        config = processor.to_dict()
        for name, value in PROCESSOR_DEFAULTS.items():
            assert config[name] == pytest.approx(value), name
    assert PROCESSOR_DEFAULTS["resample"] == PILImageResampling.BICUBIC
    assert PROCESSOR_DEFAULTS["image_mean"] == list(OPENAI_CLIP_MEAN)
    assert PROCESSOR_DEFAULTS["image_std"] == list(OPENAI_CLIP_STD)


def test_preprocessing_reproduces_clip_image_processor(photos):
    """Square resize to 512 x 512 with PIL bicubic, then the default CLIP processor."""
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    squares = [Image.fromarray(image).resize((512, 512), Image.BICUBIC) for image in photos]
    for backend, reference in (("pil", CLIPImageProcessorPil()), ("torchvision", CLIPImageProcessor())):
        extractor = ClipExtractor(weights="tiny", resolution=STORED, processor_backend=backend)
        ours = extractor.preprocess(photos)
        expected = reference(images=squares, return_tensors="pt").pixel_values
        assert ours.shape == (len(photos), 3, 224, 224) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_vit_h_config_matches_open_clip():
    """The random-init config is laion's ViT-H-14 (open_clip's own model config), and the
    transformers model built from it has exactly the open_clip vision tower's parameter count."""
    import open_clip
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    reference = open_clip.get_model_config("ViT-H-14")
    vision = reference["vision_cfg"]
    assert VIT_H_14_CONFIG["hidden_size"] == vision["width"] == 1280
    assert VIT_H_14_CONFIG["num_hidden_layers"] == vision["layers"] == 32
    assert VIT_H_14_CONFIG["num_attention_heads"] == vision["width"] // vision["head_width"] == 16
    assert VIT_H_14_CONFIG["intermediate_size"] == 4 * vision["width"]
    assert VIT_H_14_CONFIG["patch_size"] == vision["patch_size"] == 14
    assert VIT_H_14_CONFIG["image_size"] == vision["image_size"] == 224
    assert VIT_H_14_CONFIG["projection_dim"] == reference["embed_dim"] == 1024
    assert not reference.get("quick_gelu", False) and VIT_H_14_CONFIG["hidden_act"] == "gelu"

    with torch.device("meta"):  # no memory, no init time
        ours = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H_14_CONFIG))
        theirs = open_clip.model.CLIP(**reference).visual
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) == 632_076_800
    assert ClipExtractor(weights="random").outputs()["embeds"].shape == (1024,)
    assert ClipExtractor().outputs()["embeds"].shape == (1024,)


def test_fingerprints():
    def fp(**kwargs):
        return ClipExtractor(**kwargs).fingerprint()

    base = fp(weights="tiny")
    assert base == fp(weights="tiny")  # equal settings, equal folder
    assert len({fp(weights="tiny"), fp(weights="random"), fp(weights="pretrained")}) == 3
    assert base != fp(weights="tiny", resolution=(256, 176))
    assert base != fp(weights="tiny", dtype="fp32")
    assert base != fp(weights="tiny", seed=1)
    assert base != fp(weights="tiny", square_size=448)
    assert base != fp(weights="tiny", processor_backend="torchvision")
    assert fp(weights="pretrained") != fp(weights="pretrained", revision="abc123")

    inputs = ClipExtractor(weights="tiny").fingerprint_inputs()
    pre = inputs["preprocessing"]
    assert pre["square_resize"] == [512, 512] and pre["square_resample"] == "PIL.Image.BICUBIC"
    assert pre["processor_params"]["size"] == {"shortest_edge": 224}
    assert pre["processor_params"]["crop_size"] == {"height": 224, "width": 224}
    assert inputs["config"] == TINY_CONFIG and inputs["output"] == "image_embeds"
    card = ClipExtractor(weights="tiny").card()
    assert card["folder"] == f"clip@{card['fingerprint']}"


def save_tiny_checkpoint(path, seed: int):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CONFIG)).eval()
    model.save_pretrained(path)
    return model


def test_real_loading_path_from_local_dir(tmp_path, photos):
    saved = save_tiny_checkpoint(tmp_path / "ckpt_a", seed=123)
    extractor = ClipExtractor(weights="pretrained", model=str(tmp_path / "ckpt_a"), resolution=STORED, dtype="fp32")
    assert extractor.outputs()["embeds"].shape == (TINY_CONFIG["projection_dim"],)  # read from config.json
    extractor.setup("cpu")
    assert not extractor._model.training

    out = np.stack([item["embeds.npy"] for item in extractor(samples(photos))])
    with torch.inference_mode():
        expected = saved(pixel_values=extractor.preprocess(photos)).image_embeds.numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)

    # The local checkpoint's weights are in the fingerprint: another checkpoint, another folder.
    save_tiny_checkpoint(tmp_path / "ckpt_b", seed=456)
    other = ClipExtractor(weights="pretrained", model=str(tmp_path / "ckpt_b"), resolution=STORED, dtype="fp32")
    digest = extractor.fingerprint_inputs()["weights_digest"]
    assert digest == local_weights_digest(str(tmp_path / "ckpt_a")) is not None
    assert other.fingerprint_inputs()["weights_digest"] != digest
    assert other.fingerprint() != extractor.fingerprint()
    same = ClipExtractor(weights="pretrained", model=str(tmp_path / "ckpt_a"), resolution=STORED, dtype="fp32")
    assert same.fingerprint() == extractor.fingerprint()


def test_bad_image_raises_extractor_error(tiny):
    from posedata.extractors.base import ExtractorError

    with pytest.raises(ExtractorError, match="bad"):
        tiny([{"key": "bad", "image": np.zeros((8, 8), dtype=np.uint8)}])
