"""VaeExtractor: posterior mean/std, flip copies, black null latent, presets, fingerprints,
scaling factor, real loading path (pipeline and VAE-only directory layouts)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

from posedata.extractors.base import ExtractorError, local_weights_digest
from posedata.extractors.vae import SD_VAE_CONFIG, TINY_CONFIG, VaeExtractor

STORED = (256, 176)  # (H, W): the PATN / CFLD DeepFashion frame
LATENT = (4, 32, 22)


@pytest.fixture(scope="module")
def photos(fixtures_dir) -> list[np.ndarray]:
    """The real DeepFashion-size photos, resized to the stored resolution as uint8."""
    paths = sorted((fixtures_dir / "deepfashion").glob("*.png"))
    assert len(paths) >= 3
    height, width = STORED
    return [np.asarray(Image.open(p).convert("RGB").resize((width, height), Image.BICUBIC)) for p in paths]


@pytest.fixture(scope="module")
def tiny() -> VaeExtractor:
    extractor = VaeExtractor(weights="tiny", resolution=STORED)
    extractor.setup("cpu")
    return extractor


@pytest.fixture(scope="module")
def tiny32() -> VaeExtractor:
    """Stored in fp32, so outputs compare with diffusers' at float precision."""
    extractor = VaeExtractor(weights="tiny", resolution=STORED, dtype="fp32")
    extractor.setup("cpu")
    return extractor


@pytest.fixture(scope="module")
def tiny_flip() -> VaeExtractor:
    extractor = VaeExtractor(weights="tiny", resolution=STORED, dtype="fp32", flip=True)
    extractor.setup("cpu")
    return extractor


def samples(images: list[np.ndarray]) -> list[dict]:
    return [{"key": f"img{i}", "image": image, "annotations": {}} for i, image in enumerate(images)]


def test_registry_finds_it(monkeypatch):
    from posedata import extractors

    monkeypatch.setitem(extractors.REGISTRY, "vae", "posedata.extractors.vae:VaeExtractor")
    assert isinstance(extractors.create_extractor("vae", weights="tiny"), VaeExtractor)


def test_tiny_shapes_and_stored_dtype(tiny, photos):
    out = tiny(samples(photos))
    assert len(out) == len(photos)
    for item in out:
        assert set(item) == {"mean.npy", "std.npy"}
        for name in ("mean.npy", "std.npy"):
            assert item[name].shape == LATENT and item[name].dtype == np.float16
            assert np.isfinite(item[name]).all()
        assert (item["std.npy"] > 0).all()
    specs = tiny.outputs()
    assert set(specs) == {"mean", "std"}
    assert specs["mean"].suffix == "mean.npy" and specs["std"].suffix == "std.npy"
    assert specs["mean"].dtype == "float16" and specs["mean"].shape == LATENT
    assert not np.array_equal(out[0]["mean.npy"], out[1]["mean.npy"])


def test_default_resolution_latent_shape():
    assert VaeExtractor(weights="tiny").outputs()["mean"].shape == (4, 64, 44)  # 512 x 352
    assert VaeExtractor().outputs()["std"].shape == (4, 64, 44)
    with pytest.raises(ValueError, match="divisible by 8"):
        VaeExtractor(weights="tiny", resolution=(256, 180))


def test_preprocessing_is_pcdms_to_tensor_normalize(photos):
    """x / 127.5 - 1 == torchvision ToTensor() + Normalize([0.5], [0.5]) (PCDMs' transform)."""
    from torchvision import transforms

    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    ours = VaeExtractor.preprocess(photos)
    expected = torch.stack([reference(Image.fromarray(p)) for p in photos])
    assert ours.shape == (len(photos), 3, *STORED) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_mean_std_reproduce_diffusers_latent_dist(tiny32, photos):
    out = tiny32(samples(photos))
    with torch.inference_mode():
        dist = tiny32._model.encode(VaeExtractor.preprocess(photos)).latent_dist
    mean = np.stack([item["mean.npy"] for item in out])
    std = np.stack([item["std.npy"] for item in out])
    assert mean.dtype == np.float32
    np.testing.assert_allclose(mean, dist.mean.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(std, dist.std.numpy(), rtol=0, atol=1e-5)
    # A plugin's mean + std * eps is latent_dist.sample() with the same noise.
    generator = torch.Generator().manual_seed(7)
    sample = dist.sample(generator=generator)
    eps = torch.randn(sample.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(torch.from_numpy(mean) + torch.from_numpy(std) * eps, sample, rtol=0, atol=1e-5)


def test_flip_outputs_are_the_flipped_images_posteriors(tiny_flip, photos):
    # (CPU conv kernels differ slightly with the batch size, hence atol 1e-3 in fp32.)
    out = tiny_flip(samples(photos))
    flipped = tiny_flip(samples([np.ascontiguousarray(p[:, ::-1]) for p in photos]))
    assert set(tiny_flip.outputs()) == {"mean", "std", "mean_flip", "std_flip"}
    for item, other in zip(out, flipped):
        assert set(item) == {"mean.npy", "std.npy", "mean_flip.npy", "std_flip.npy"}
        np.testing.assert_allclose(item["mean_flip.npy"], other["mean.npy"], rtol=0, atol=1e-3)
        np.testing.assert_allclose(item["std_flip.npy"], other["std.npy"], rtol=0, atol=1e-3)
        np.testing.assert_allclose(other["mean_flip.npy"], item["mean.npy"], rtol=0, atol=1e-3)
        # Not merely the flipped latent: the encoder is not flip-equivariant.
        assert not np.allclose(item["mean_flip.npy"], item["mean.npy"][:, :, ::-1], atol=1e-3)


def test_batched_equals_one_by_one(tiny, photos):
    batched = tiny(samples(photos))
    for image, together in zip(photos, batched):
        alone = tiny(samples([image]))[0]
        for name in ("mean.npy", "std.npy"):
            np.testing.assert_allclose(alone[name].astype(np.float32), together[name].astype(np.float32), rtol=0, atol=2e-3)


def test_empty_batch(tiny):
    assert tiny([]) == []


@pytest.mark.parametrize("dtype, stored", [("fp32", np.float32), ("bf16", np.float32)])
def test_other_dataset_dtypes(photos, dtype, stored):
    extractor = VaeExtractor(weights="tiny", resolution=STORED, dtype=dtype)
    extractor.setup("cpu")
    item = extractor(samples(photos[:1]))[0]
    # bf16 comes back as float32 (bf16-rounded) and is declared "bfloat16": the build packs it
    assert item["mean.npy"].dtype == stored and extractor.outputs()["mean"].dtype == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    if dtype == "bf16":
        as_bf16 = torch.from_numpy(item["mean.npy"]).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(item["mean.npy"], as_bf16)


def test_seeded_init_is_deterministic(photos):
    def mean(seed):
        extractor = VaeExtractor(weights="tiny", resolution=STORED, seed=seed, dtype="fp32")
        extractor.setup("cpu")
        return extractor(samples(photos[:1]))[0]["mean.npy"]

    np.testing.assert_array_equal(mean(0), mean(0))
    assert not np.allclose(mean(0), mean(1))


def test_null_embedding_is_the_black_image_posterior(tiny32):
    null = tiny32.null_embedding()
    assert set(null) == {"black_mean.npy", "black_std.npy"}
    for array in null.values():
        assert array.shape == LATENT and array.dtype == np.float32
    black = np.zeros((*STORED, 3), dtype=np.uint8)
    item = tiny32(samples([black]))[0]
    np.testing.assert_array_equal(null["black_mean.npy"], item["mean.npy"])
    np.testing.assert_array_equal(null["black_std.npy"], item["std.npy"])
    assert (null["black_std.npy"] > 0).all()


def test_build_writes_readable_null_names(tmp_path, tiny):
    """ExtractorStage writes each null output as meta/features/<folder>/null.<name>.npy; plugins
    ask for them as `vae.black_mean` / `vae.black_std`."""
    try:
        from posedata.pipeline import ExtractorStage
    except ImportError:  # before the pipeline module split
        from posedata.build import ExtractorStage
    from posedata.layout import DatasetLocation
    from posedata.shards import decode_array

    location = DatasetLocation(str(tmp_path))
    ExtractorStage._write_null_embedding(types.SimpleNamespace(extractor=tiny, folder=tiny.folder), location)
    folder = tmp_path / "meta" / "features" / tiny.folder
    assert sorted(p.name for p in folder.iterdir()) == ["null.black_mean.npy", "null.black_std.npy"]
    stored = decode_array((folder / "null.black_mean.npy").read_bytes())
    assert stored.shape == LATENT and stored.dtype == np.float16
    np.testing.assert_array_equal(stored, tiny.null_embedding()["black_mean.npy"])


def test_half_precision_overflow_falls_back_to_fp32(photos, monkeypatch):
    extractor = VaeExtractor(weights="tiny", resolution=STORED, dtype="fp32")
    extractor.setup("cpu")
    expected = extractor(samples(photos[:1]))[0]
    # Pretend the device runs the encoder under half-precision autocast and overflows there
    # (bf16 autocast is what CPUs support; on CUDA it is fp16).
    extractor._autocast_dtype = torch.bfloat16
    encoder = extractor._model.encoder
    real_forward = encoder.forward
    calls = []

    def forward(x):
        out = real_forward(x)
        calls.append(torch.is_autocast_enabled("cpu"))
        return torch.full_like(out, float("inf")) if calls[-1] else out

    monkeypatch.setattr(encoder, "forward", forward)
    item = extractor(samples(photos[:1]))[0]
    assert calls == [True, False]  # half precision first, then the fp32 re-encode
    np.testing.assert_array_equal(item["mean.npy"], expected["mean.npy"])
    np.testing.assert_array_equal(item["std.npy"], expected["std.npy"])
    assert extractor._model.dtype == torch.float32  # weights never left fp32


def test_presets_and_scaling_factor():
    default = VaeExtractor()
    assert default.preset == "sd21" and default.model_id == "stabilityai/stable-diffusion-2-1-base"
    assert default.subfolder == "vae"
    sd15 = VaeExtractor(preset="sd15")
    assert sd15.model_id == "stabilityai/sd-vae-ft-mse" and sd15.subfolder is None
    by_model = VaeExtractor(model="stabilityai/sd-vae-ft-mse")
    assert by_model.preset == "sd15" and by_model.subfolder is None
    assert by_model.fingerprint() == sd15.fingerprint()
    with pytest.raises(ValueError, match="preset"):
        VaeExtractor(preset="sd21", model="stabilityai/sd-vae-ft-mse")
    with pytest.raises(ValueError, match="unknown preset"):
        VaeExtractor(preset="sdxl")
    # A hub id with no recorded facts: unknown until loaded, and the fingerprint never
    # changes because setup() loaded it.
    unknown = VaeExtractor(model="someone/custom-vae", subfolder=None)
    assert unknown.scaling_factor() is None and unknown.card()["scaling_factor"] is None
    for extractor in (default, sd15, VaeExtractor(weights="random"), VaeExtractor(weights="tiny")):
        card = extractor.card()
        assert card["scaling_factor"] == 0.18215
        assert card["fingerprint_inputs"]["scaling_factor"] == 0.18215
        assert card["folder"] == f"vae@{card['fingerprint']}"


def test_sd_vae_config_facts():
    """The random-init config is the SD VAE (SD-2.1-base vae/config.json, sd-vae-ft-mse):
    83,653,863 parameters, downsampling by 8."""
    from diffusers import AutoencoderKL

    assert SD_VAE_CONFIG["block_out_channels"] == [128, 256, 512, 512]
    assert SD_VAE_CONFIG["down_block_types"] == ["DownEncoderBlock2D"] * 4
    assert SD_VAE_CONFIG["layers_per_block"] == 2 and SD_VAE_CONFIG["latent_channels"] == 4
    assert VaeExtractor.PRESETS["sd21"]["config"]["sample_size"] == 768
    assert VaeExtractor.PRESETS["sd15"]["config"]["sample_size"] == 256
    with torch.device("meta"):
        full = AutoencoderKL(**SD_VAE_CONFIG)
    assert sum(p.numel() for p in full.parameters()) == 83_653_863
    assert len(TINY_CONFIG["block_out_channels"]) == 4  # tiny still downsamples by 8
    assert VaeExtractor(weights="random").architecture_config() == VaeExtractor.PRESETS["sd21"]["config"]


def test_fingerprints():
    def fp(**kwargs):
        return VaeExtractor(**kwargs).fingerprint()

    base = fp(weights="tiny")
    assert base == fp(weights="tiny")
    assert len({fp(weights="tiny"), fp(weights="random"), fp(weights="pretrained")}) == 3
    assert fp(preset="sd21") != fp(preset="sd15")  # different VAEs, different folders
    assert fp(weights="random", preset="sd21") != fp(weights="random", preset="sd15")
    assert base != fp(weights="tiny", flip=True)
    assert base != fp(weights="tiny", resolution=(256, 176))
    assert base != fp(weights="tiny", dtype="fp32")
    assert base != fp(weights="tiny", compute_dtype="fp32")
    assert base != fp(weights="tiny", seed=1)
    assert fp() != fp(revision="abc123")
    inputs = VaeExtractor(weights="tiny", flip=True).fingerprint_inputs()
    assert inputs["flip"] is True and inputs["config"] == TINY_CONFIG
    assert inputs["preprocessing"]["scale"] == "x / 127.5 - 1"
    assert inputs["compute_dtype"].startswith("cpu:fp32,cuda:fp32-weights+fp16-autocast")


def save_tiny_vae(path, seed: int, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**{**TINY_CONFIG, **overrides}).eval()
    model.save_pretrained(path)
    return model


def test_real_loading_path_pipeline_layout(tmp_path, photos):
    """A directory laid out like stabilityai/stable-diffusion-2-1-base (the VAE in vae/)."""
    saved = save_tiny_vae(tmp_path / "pipe" / "vae", seed=123)
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    extractor = VaeExtractor(weights="pretrained", model=str(tmp_path / "pipe"), resolution=STORED, dtype="fp32")
    assert extractor.subfolder == "vae"
    assert extractor.outputs()["mean"].shape == LATENT  # read from vae/config.json
    assert extractor.scaling_factor() == 0.18215
    extractor.setup("cpu")
    assert not extractor._model.training

    out = extractor(samples(photos))
    with torch.inference_mode():
        dist = saved.encode(VaeExtractor.preprocess(photos)).latent_dist
    np.testing.assert_allclose(np.stack([o["mean.npy"] for o in out]), dist.mean.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.stack([o["std.npy"] for o in out]), dist.std.numpy(), rtol=0, atol=1e-5)

    # The local weights are in the fingerprint: another checkpoint, another folder.
    save_tiny_vae(tmp_path / "other" / "vae", seed=456)
    other = VaeExtractor(weights="pretrained", model=str(tmp_path / "other"), resolution=STORED, dtype="fp32")
    digest = extractor.fingerprint_inputs()["weights_digest"]
    assert digest == local_weights_digest(str(tmp_path / "pipe")) is not None
    assert other.fingerprint() != extractor.fingerprint()
    same = VaeExtractor(weights="pretrained", model=str(tmp_path / "pipe"), resolution=STORED, dtype="fp32")
    assert same.fingerprint() == extractor.fingerprint()


def test_real_loading_path_vae_only_layout_and_scaling_factor(tmp_path, photos):
    """A directory laid out like stabilityai/sd-vae-ft-mse (config.json at the root), with
    another scaling factor: it reaches the card and the fingerprint."""
    saved = save_tiny_vae(tmp_path / "vae_only", seed=5, scaling_factor=0.13025)
    extractor = VaeExtractor(weights="pretrained", model=str(tmp_path / "vae_only"), resolution=STORED, dtype="fp32")
    assert extractor.subfolder is None
    assert extractor.card()["scaling_factor"] == 0.13025
    assert extractor.fingerprint_inputs()["scaling_factor"] == 0.13025
    before = extractor.fingerprint()
    extractor.setup("cpu")
    assert extractor.fingerprint() == before and extractor.card()["scaling_factor"] == 0.13025
    item = extractor(samples(photos[:1]))[0]
    with torch.inference_mode():
        expected = saved.encode(VaeExtractor.preprocess(photos[:1])).latent_dist.mean[0].numpy()
    np.testing.assert_allclose(item["mean.npy"], expected, rtol=0, atol=1e-5)
    # An explicit subfolder that does not exist fails at load time (diffusers would silently
    # load the root instead).
    wrong = VaeExtractor(weights="pretrained", model=str(tmp_path / "vae_only"), subfolder="vae", resolution=STORED)
    with pytest.raises(FileNotFoundError, match="subfolder"):
        wrong.setup("cpu")


def test_bad_images_raise_extractor_error(tiny):
    with pytest.raises(ExtractorError, match="bad"):
        tiny([{"key": "bad", "image": np.zeros((8, 8), dtype=np.uint8)}])
    with pytest.raises(ExtractorError, match="stored resolution"):
        tiny([{"key": "big", "image": np.zeros((512, 352, 3), dtype=np.uint8)}])
