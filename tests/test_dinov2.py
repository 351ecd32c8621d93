"""Dinov2Extractor: PCDMs preprocessing, 257 tokens, batching, null embedding, position-embedding
interpolation as transformers 4.32.1, presets, fingerprints, real loading path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from posedata.extractors.base import ExtractorError, local_weights_digest
from posedata.extractors.clip import ClipExtractor
from posedata.extractors.dinov2 import (
    DINOV2_BASE_CONFIG,
    DINOV2_GIANT_CONFIG,
    TINY_OVERRIDES,
    Dinov2Extractor,
    use_legacy_pos_interpolation,
)

STORED = (256, 176)  # (H, W)
TOKENS = 257  # (224 / 14)^2 + CLS
TINY_TOKENS = (TOKENS, TINY_OVERRIDES["hidden_size"])


@pytest.fixture(scope="module")
def photos(fixtures_dir) -> list[np.ndarray]:
    paths = sorted((fixtures_dir / "deepfashion").glob("*.png"))
    assert len(paths) >= 3
    height, width = STORED
    return [np.asarray(Image.open(p).convert("RGB").resize((width, height), Image.BICUBIC)) for p in paths]


@pytest.fixture(scope="module")
def tiny() -> Dinov2Extractor:
    extractor = Dinov2Extractor(weights="tiny", resolution=STORED)
    extractor.setup("cpu")
    return extractor


def samples(images: list[np.ndarray]) -> list[dict]:
    return [{"key": f"img{i}", "image": image, "annotations": {}} for i, image in enumerate(images)]


def test_registry_finds_it(monkeypatch):
    from posedata import extractors

    monkeypatch.setitem(extractors.REGISTRY, "dinov2", "posedata.extractors.dinov2:Dinov2Extractor")
    assert isinstance(extractors.create_extractor("dinov2", weights="tiny"), Dinov2Extractor)


def test_tiny_tokens_shape_and_stored_dtype(tiny, photos):
    out = tiny(samples(photos))
    assert len(out) == len(photos)
    for item in out:
        assert set(item) == {"tokens.npy"}
        assert item["tokens.npy"].shape == TINY_TOKENS and item["tokens.npy"].dtype == np.float16
        assert np.isfinite(item["tokens.npy"]).all()
    spec = tiny.outputs()["tokens"]
    assert spec.suffix == "tokens.npy" and spec.dtype == "float16" and spec.shape == TINY_TOKENS
    assert not np.array_equal(out[0]["tokens.npy"], out[1]["tokens.npy"])


def test_output_shapes_of_the_presets():
    assert Dinov2Extractor().outputs()["tokens"].shape == (257, 1536)
    assert Dinov2Extractor(weights="random").outputs()["tokens"].shape == (257, 1536)
    assert Dinov2Extractor(preset="base").outputs()["tokens"].shape == (257, 768)
    assert Dinov2Extractor(model="facebook/dinov2-base").outputs()["tokens"].shape == (257, 768)
    assert Dinov2Extractor(model="someone/dinov2-finetune").outputs()["tokens"].shape == (257, "C")


@pytest.mark.parametrize("dtype, stored", [("fp32", np.float32), ("bf16", np.float32)])
def test_other_dataset_dtypes(photos, dtype, stored):
    extractor = Dinov2Extractor(weights="tiny", resolution=STORED, dtype=dtype)
    extractor.setup("cpu")
    tokens = extractor(samples(photos[:1]))[0]["tokens.npy"]
    assert tokens.dtype == stored
    if dtype == "bf16":
        np.testing.assert_array_equal(tokens, torch.from_numpy(tokens).to(torch.bfloat16).float().numpy())


def test_batched_equals_one_by_one(tiny, photos):
    batched = tiny(samples(photos))
    for image, together in zip(photos, batched):
        alone = tiny(samples([image]))[0]
        np.testing.assert_allclose(
            alone["tokens.npy"].astype(np.float32), together["tokens.npy"].astype(np.float32), rtol=0, atol=5e-3
        )


def test_empty_batch(tiny):
    assert tiny([]) == []


def test_seeded_init_is_deterministic(photos):
    def tokens(seed):
        extractor = Dinov2Extractor(weights="tiny", resolution=STORED, seed=seed, dtype="fp32")
        extractor.setup("cpu")
        return extractor(samples(photos[:1]))[0]["tokens.npy"]

    np.testing.assert_array_equal(tokens(0), tokens(0))
    assert not np.allclose(tokens(0), tokens(1))


def test_null_embedding_is_zero_pixels_not_black_image(tiny):
    null = tiny.null_embedding()
    assert set(null) == {"tokens.npy"}
    assert null["tokens.npy"].shape == TINY_TOKENS and null["tokens.npy"].dtype == np.float16
    with torch.inference_mode():
        direct = tiny._model(pixel_values=torch.zeros(1, 3, 224, 224)).last_hidden_state[0]
    np.testing.assert_array_equal(null["tokens.npy"], direct.to(torch.float16).numpy())
    black = np.zeros((*STORED, 3), dtype=np.uint8)
    assert tiny.preprocess([black]).abs().min() > 1.0  # black normalises to -mean/std, not 0
    black_tokens = tiny(samples([black]))[0]["tokens.npy"]
    assert np.abs(black_tokens.astype(np.float32) - null["tokens.npy"].astype(np.float32)).max() > 1e-2


def test_preprocessing_reproduces_pcdms(photos):
    """stage2_dataset.py / stage3_dataset.py: resize to (512, 512) with PIL BICUBIC, then a
    default-constructed CLIPImageProcessor(); the same pipeline as the CLIP extractor's."""
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    squares = [Image.fromarray(image).resize((512, 512), Image.BICUBIC) for image in photos]
    for backend, reference in (("pil", CLIPImageProcessorPil()), ("torchvision", CLIPImageProcessor())):
        extractor = Dinov2Extractor(weights="tiny", resolution=STORED, processor_backend=backend)
        ours = extractor.preprocess(photos)
        expected = reference(images=squares, return_tensors="pt").pixel_values
        assert ours.shape == (len(photos), 3, 224, 224) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
        clip = ClipExtractor(weights="tiny", resolution=STORED, processor_backend=backend)
        torch.testing.assert_close(ours, clip.preprocess(photos), rtol=0, atol=0)
    pre = Dinov2Extractor(weights="tiny").fingerprint_inputs()["preprocessing"]
    assert pre == ClipExtractor(weights="tiny").fingerprint_inputs()["preprocessing"]
    assert pre["square_resize"] == [512, 512] and pre["processor"] == "CLIPImageProcessor (default-constructed)"


def legacy_reference(position_embeddings: torch.Tensor, grid: int) -> torch.Tensor:
    """transformers 4.32.1 Dinov2Embeddings.interpolate_pos_encoding at a 224 x 224 input."""
    side = int(math.sqrt(position_embeddings.shape[1] - 1))
    dim = position_embeddings.shape[-1]
    patch = position_embeddings[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / side
    patch = torch.nn.functional.interpolate(patch, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    return torch.cat([position_embeddings[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def test_position_embeddings_interpolate_as_transformers_4_32(photos):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(**{**DINOV2_GIANT_CONFIG, **TINY_OVERRIDES})
    model = Dinov2Model(config).eval()
    embeddings = model.embeddings
    dummy = torch.zeros(1, TOKENS, config.hidden_size)
    with torch.no_grad():
        installed = embeddings.interpolate_pos_encoding(dummy, 224, 224)
        use_legacy_pos_interpolation(model)
        legacy = embeddings.interpolate_pos_encoding(dummy, 224, 224)
        expected = legacy_reference(embeddings.position_embeddings, 16)
    assert legacy.shape == installed.shape == (1, TOKENS, config.hidden_size)
    torch.testing.assert_close(legacy, expected, rtol=0, atol=0)
    assert (legacy - installed).abs().max() > 1e-3  # the installed transformers samples elsewhere
    # At the checkpoint's own grid nothing is interpolated.
    same = torch.zeros(1, 37 * 37 + 1, config.hidden_size)
    assert embeddings.interpolate_pos_encoding(same, 518, 518) is embeddings.position_embeddings

    extractor = Dinov2Extractor(weights="tiny", resolution=STORED, dtype="fp32")
    extractor.setup("cpu")
    modern = Dinov2Extractor(weights="tiny", resolution=STORED, dtype="fp32", pos_interpolation="transformers")
    modern.setup("cpu")
    pixels = extractor.preprocess(photos[:1])
    with torch.inference_mode():
        plain = modern._model(pixel_values=pixels).last_hidden_state[0].numpy()
    np.testing.assert_allclose(modern(samples(photos[:1]))[0]["tokens.npy"], plain, rtol=0, atol=1e-6)
    assert not np.allclose(extractor(samples(photos[:1]))[0]["tokens.npy"], plain, atol=1e-3)


def test_configs_match_the_checkpoints():
    """facebook/dinov2-giant and dinov2-base config.json facts; parameter counts on meta."""
    from transformers import Dinov2Config, Dinov2Model

    giant = DINOV2_GIANT_CONFIG
    assert (giant["hidden_size"], giant["num_hidden_layers"], giant["num_attention_heads"]) == (1536, 40, 24)
    assert giant["use_swiglu_ffn"] and giant["mlp_ratio"] == 4
    assert (giant["image_size"], giant["patch_size"]) == (518, 14)
    base = DINOV2_BASE_CONFIG
    assert (base["hidden_size"], base["num_hidden_layers"], base["num_attention_heads"]) == (768, 12, 12)
    assert not base["use_swiglu_ffn"] and (base["image_size"], base["patch_size"]) == (518, 14)

    with torch.device("meta"):
        g = Dinov2Model(Dinov2Config(**giant))
        b = Dinov2Model(Dinov2Config(**base))
    linears = [m for m in g.encoder.layer[0].mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert max(m.in_features for m in linears) == 4096  # SwiGLU hidden of ViT-g/14
    assert 1_136_000_000 < sum(p.numel() for p in g.parameters()) < 1_137_000_000  # ViT-g/14: 1.1B
    assert 86_500_000 < sum(p.numel() for p in b.parameters()) < 86_700_000  # ViT-B/14: 86.6M
    assert g.embeddings.position_embeddings.shape == (1, 37 * 37 + 1, 1536)

    assert Dinov2Extractor(weights="random").architecture_config() == giant
    assert Dinov2Extractor(weights="random", preset="base").architecture_config() == base
    assert Dinov2Extractor(weights="tiny", preset="base").architecture_config()["use_swiglu_ffn"] is False


def test_presets():
    assert Dinov2Extractor().model_id == "facebook/dinov2-giant" and Dinov2Extractor().preset == "giant"
    by_model = Dinov2Extractor(model="facebook/dinov2-base")
    assert by_model.preset == "base" and by_model.fingerprint() == Dinov2Extractor(preset="base").fingerprint()
    with pytest.raises(ValueError, match="preset"):
        Dinov2Extractor(preset="giant", model="facebook/dinov2-base")
    with pytest.raises(ValueError, match="unknown preset"):
        Dinov2Extractor(preset="large")
    card = Dinov2Extractor(preset="base").card()
    assert card["preset"] == "base" and card["folder"] == f"dinov2@{card['fingerprint']}"


def test_fingerprints():
    def fp(**kwargs):
        return Dinov2Extractor(**kwargs).fingerprint()

    base = fp(weights="tiny")
    assert base == fp(weights="tiny")
    assert len({fp(weights="tiny"), fp(weights="random"), fp(weights="pretrained")}) == 3
    assert fp(preset="giant") != fp(preset="base")
    assert fp(weights="tiny", preset="giant") != fp(weights="tiny", preset="base")
    assert base != fp(weights="tiny", resolution=(256, 176))
    assert base != fp(weights="tiny", dtype="fp32")
    assert base != fp(weights="tiny", seed=1)
    assert base != fp(weights="tiny", square_size=448)
    assert base != fp(weights="tiny", processor_backend="torchvision")
    assert base != fp(weights="tiny", pos_interpolation="transformers")
    assert fp() != fp(revision="abc123")
    inputs = Dinov2Extractor(weights="tiny").fingerprint_inputs()
    assert inputs["output"] == "last_hidden_state" and inputs["architecture"] == "Dinov2Model"
    assert inputs["pos_interpolation"]["transformers"].startswith("4.32.1")
    assert inputs["preprocessing"]["processor_params"]["crop_size"] == {"height": 224, "width": 224}


def save_tiny_checkpoint(path, seed: int):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**{**DINOV2_GIANT_CONFIG, **TINY_OVERRIDES})).eval()
    model.save_pretrained(path)
    return model


def test_real_loading_path_from_local_dir(tmp_path, photos):
    saved = save_tiny_checkpoint(tmp_path / "ckpt_a", seed=123)
    extractor = Dinov2Extractor(weights="pretrained", model=str(tmp_path / "ckpt_a"), resolution=STORED, dtype="fp32")
    assert extractor.outputs()["tokens"].shape == TINY_TOKENS  # read from config.json
    extractor.setup("cpu")
    assert not extractor._model.training

    out = np.stack([item["tokens.npy"] for item in extractor(samples(photos))])
    use_legacy_pos_interpolation(saved)  # what the extractor does by default
    with torch.inference_mode():
        expected = saved(pixel_values=extractor.preprocess(photos)).last_hidden_state.numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)

    save_tiny_checkpoint(tmp_path / "ckpt_b", seed=456)
    other = Dinov2Extractor(weights="pretrained", model=str(tmp_path / "ckpt_b"), resolution=STORED, dtype="fp32")
    digest = extractor.fingerprint_inputs()["weights_digest"]
    assert digest == local_weights_digest(str(tmp_path / "ckpt_a")) is not None
    assert other.fingerprint() != extractor.fingerprint()
    same = Dinov2Extractor(weights="pretrained", model=str(tmp_path / "ckpt_a"), resolution=STORED, dtype="fp32")
    assert same.fingerprint() == extractor.fingerprint()


def test_bad_image_raises_extractor_error(tiny):
    with pytest.raises(ExtractorError, match="bad"):
        tiny([{"key": "bad", "image": np.zeros((8, 8), dtype=np.uint8)}])
