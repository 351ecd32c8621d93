"""The plugin layer's parts, each alone (posedata.train.unet, posedata.train.diffusion,
posedata.train.config): base models, conv_in widening, the pose residual, the objective
(v-prediction, zero-terminal SNR, trailing spacing, min-SNR, noise offset, masks), condition
dropout, the sampling loop (CFG, rescale, learned variance, a gradient-taking hook) and a
model holding two UNets."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config

from posedata.train.config import Preset, SampleSettings, TrainConfig
from posedata.train.diffusion import Objective, decode_to_uint8, denoise, drop_conditions, guide, sample_latent
from posedata.train.unet import (
    BASE_MODELS,
    SD_SCHEDULER_CONFIG,
    PluginModel,
    TokenProjection,
    base_model,
    conv_in_residual,
    plain_config,
    pose_embedding,
    widen_conv_in,
)

SD15_UNET_PARAMS = 859_520_964  # stable-diffusion-v1-5 unet
SD21_UNET_PARAMS = 865_910_724  # stable-diffusion-2-1-base unet


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny_unet(name: str = "sd15", **overrides: Any) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(base_model(name).unet("tiny", **overrides))


def test_base_models_are_the_real_architectures():
    with torch.device("meta"):
        sd15 = UNet2DConditionModel.from_config(BASE_MODELS["sd15"].unet_config)
        sd21 = UNet2DConditionModel.from_config(BASE_MODELS["sd21"].unet_config)
    assert count(sd15) == SD15_UNET_PARAMS and sd15.config.cross_attention_dim == 768
    assert count(sd21) == SD21_UNET_PARAMS and sd21.config.cross_attention_dim == 1024
    assert BASE_MODELS["sd15"].vae_feature == "vae:sd15" and BASE_MODELS["sd21"].vae_feature == "vae:sd21"
    assert BASE_MODELS["sd15"].unet("random", in_channels=9)["in_channels"] == 9
    with pytest.raises(KeyError, match="sd15, sd21"):
        base_model("sdxl")


def test_widen_conv_in_copy_and_official():
    unet = tiny_unet()
    old_w, old_b = unet.conv_in.weight.clone(), unet.conv_in.bias.clone()
    widen_conv_in(unet, 9, "copy")
    assert unet.conv_in.in_channels == 9 and unet.config.in_channels == 9
    assert torch.equal(unet.conv_in.weight[:, :4], old_w) and (unet.conv_in.weight[:, 4:] == 0).all()
    assert torch.equal(unet.conv_in.bias, old_b)
    x = torch.randn(1, 4, 8, 8)
    extra = torch.randn(1, 5, 8, 8)
    with torch.no_grad():  # "copy": the new channels start without effect
        assert torch.allclose(unet.conv_in(torch.cat([x, extra], 1)), torch.nn.functional.conv2d(x, old_w, old_b, padding=1), atol=1e-6)
    official = tiny_unet()
    widen_conv_in(official, 9, "official")
    assert torch.equal(official.conv_in.bias, old_b) and (official.conv_in.weight[:, 4:] != 0).any()
    with pytest.raises(ValueError, match="init"):
        widen_conv_in(tiny_unet(), 9, "zeros")
    with pytest.raises(ValueError, match="more than"):
        widen_conv_in(unet, 8)


def test_pose_residual_is_added_after_conv_in_and_only_inside_the_block():
    unet = tiny_unet().eval()
    embed = pose_embedding(unet.config, (8, 8, 16, 16))
    assert embed.conv_out.weight.abs().sum() == 0  # zero-initialised, as ControlNet
    pose = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        embed.conv_out.weight.normal_(0, 0.1)
        residual = embed(pose)
        assert residual.shape == (2, 32, 8, 8)
        x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.randn(2, 5, 32)
        plain = unet(x, t, encoder_hidden_states=ctx).sample
        with conv_in_residual(unet, residual):
            posed = unet(x, t, encoder_hidden_states=ctx).sample
        after = unet(x, t, encoder_hidden_states=ctx).sample
    assert not torch.allclose(plain, posed) and torch.equal(plain, after)


def test_token_projection_keys_match_the_official_mlp():
    proj = TokenProjection(48, 24, 32)
    assert set(proj.state_dict()) == {"net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias", "net.4.weight", "net.4.bias"}
    assert proj(torch.randn(2, 5, 48)).shape == (2, 5, 32)


def test_objective_targets_and_schedules():
    x0 = torch.randn(4, 4, 8, 8)
    eps = Objective(SD_SCHEDULER_CONFIG)
    a = eps.noisy(x0, torch.Generator().manual_seed(0))
    b = eps.noisy(x0, torch.Generator().manual_seed(0))
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.target, a.noise)
    v = Objective({**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"})
    sched = v.train_scheduler()
    assert float(sched.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-10)  # zero terminal SNR
    step = v.noisy(x0, torch.Generator().manual_seed(0), sched)
    assert torch.allclose(step.target, sched.get_velocity(x0, step.noise, step.timesteps))
    sampler = v.sampler("ddim")
    sampler.set_timesteps(10)
    assert int(sampler.timesteps[0]) == 999 and sampler.config.prediction_type == "v_prediction"  # trailing spacing
    x0_pred = Objective({**SD_SCHEDULER_CONFIG, "prediction_type": "sample"}).noisy(x0, None)
    assert torch.equal(x0_pred.target, x0)
    with pytest.raises(ValueError, match="scheduler must be one of"):
        eps.sampler("plms")


def test_noise_offset_is_one_value_per_sample_and_channel():
    zeros = torch.zeros(3, 4, 16, 16)
    plain = Objective(SD_SCHEDULER_CONFIG).noisy(zeros, torch.Generator().manual_seed(1)).noise
    offset = Objective(SD_SCHEDULER_CONFIG, noise_offset=0.5).noisy(zeros, torch.Generator().manual_seed(1)).noise
    shift = offset - plain
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift))  # constant over H, W
    assert shift[..., 0, 0].std() > 0.1
    embeds = Objective(SD_SCHEDULER_CONFIG, noise_offset=0.5).noisy(torch.zeros(3, 16), torch.Generator().manual_seed(1))
    assert embeds.noise.shape == (3, 16)


def test_min_snr_weighting_and_masked_loss():
    x0 = torch.randn(6, 4, 8, 8)
    base = {**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}
    plain, weighted = Objective(base), Objective(base, min_snr_gamma=5.0)
    step = plain.noisy(x0, torch.Generator().manual_seed(2))
    pred = torch.randn_like(x0)
    per_sample = ((pred - step.target) ** 2).flatten(1).mean(1)
    assert torch.allclose(plain.loss(pred, step), per_sample.mean())
    alphas = DDPMScheduler.from_config(base).alphas_cumprod[step.timesteps]
    snr = alphas / (1 - alphas)
    expected = (per_sample * torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1)).mean()
    assert torch.allclose(weighted.loss(pred, step), expected, rtol=1e-5)
    mask = torch.ones(6, 1, 8, 8)
    mask[..., 6:] = 0  # padding columns
    garbage = pred.clone()
    garbage[..., 6:] = 1e6
    assert torch.allclose(plain.loss(garbage, step, mask=mask), plain.loss(pred, step, mask=mask))
    learned = Objective({**SD_SCHEDULER_CONFIG, "variance_type": "learned_range"})
    eps_step = learned.noisy(x0, torch.Generator().manual_seed(2))
    assert torch.equal(learned.loss(torch.cat([pred, torch.randn_like(pred)], 1), eps_step), Objective(SD_SCHEDULER_CONFIG).loss(pred, eps_step))


def test_sample_latent_and_condition_dropout():
    mean, std = torch.randn(2, 4, 3, 3), torch.rand(2, 4, 3, 3)
    a = sample_latent(mean, std, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(a, sample_latent(mean, std, 0.5, torch.Generator().manual_seed(0)))
    assert torch.allclose(sample_latent(mean, torch.zeros_like(std), 0.5), mean * 0.5)

    batch = {"tokens": torch.ones(400, 3, 2), "pose": torch.ones(400, 5), "a": torch.ones(400, 2), "b": torch.ones(400, 2)}
    null = torch.full((3, 2), 7.0)
    drop = drop_conditions(batch, {"tokens": null, "pose": 0.0, ("a", "b"): -1.0}, 0.25, torch.Generator().manual_seed(0))
    assert drop.shape == (400, 3) and 60 < int(drop[:, 0].sum()) < 140
    assert (batch["tokens"][drop[:, 0]] == 7).all() and (batch["tokens"][~drop[:, 0]] == 1).all()
    assert (batch["pose"][drop[:, 1]] == 0).all() and (batch["pose"][~drop[:, 1]] == 1).all()
    assert torch.equal(batch["a"], batch["b"]) and (batch["a"][drop[:, 2]] == -1).all()  # dropped together
    assert not torch.equal(drop[:, 0], drop[:, 1])  # independent draws
    assert not drop_conditions(batch, {"pose": 0.0}, 0.0).any()


def toy_predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a model: the conditional half (second) differs."""
    out = 0.1 * x + 0.001 * t.float()
    if x.shape[0] % 2 == 0:
        out[x.shape[0] // 2 :] += 0.3
    return out


def run_denoise(**kw):
    sched = Objective(SD_SCHEDULER_CONFIG).sampler(kw.pop("scheduler", "ddim"))
    args = dict(scheduler=sched, num_inference_steps=4, device="cpu", dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return denoise(toy_predict, (2, 4, 4, 4), **args)


def test_denoise_is_deterministic_and_guidance_changes_it():
    a, b = run_denoise(guidance_scale=2.0), run_denoise(guidance_scale=2.0)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert not torch.equal(a, run_denoise(guidance_scale=1.0))
    assert not torch.equal(a, run_denoise(guidance_scale=2.0, guidance_rescale=0.7))
    for name in ("unipc", "ddpm", "dpmpp", "euler", "euler_a"):
        assert run_denoise(scheduler=name).shape == (2, 4, 4, 4)
    pred = torch.cat([torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)])
    assert torch.allclose(guide(pred, 4, 3.0), torch.full((1, 4, 2, 2), 3.0))


def test_step_hook_may_take_gradients():
    seen = []

    def hook(step):
        assert torch.is_grad_enabled() and not step.latents.requires_grad
        x = step.latents.detach().requires_grad_(True)
        energy = (x**2).sum()  # a stand-in for a guidance objective G(x)
        (grad,) = torch.autograd.grad(energy, x)
        seen.append(step.index)
        return step.model_output + 0.5 * grad

    guided = run_denoise(step_hook=hook)
    assert seen == [0, 1, 2, 3] and not torch.equal(guided, run_denoise())
    assert torch.equal(run_denoise(step_hook=lambda step: None), run_denoise())


def test_learned_variance_output_is_guided_on_the_mean_and_stepped_whole():
    calls = []

    def predict(x, t):
        calls.append(x.shape[0])
        return torch.cat([toy_predict(x, t), torch.zeros_like(x)], dim=1)  # 8 channels: mean + variance

    learned = Objective({**SD_SCHEDULER_CONFIG, "variance_type": "learned_range"})
    args = dict(num_inference_steps=3, device="cpu", dtype=torch.float32, guidance_scale=2.0)
    out = denoise(predict, (2, 4, 4, 4), scheduler=learned.sampler("ddpm"), generator=torch.Generator().manual_seed(0), **args)
    assert out.shape == (2, 4, 4, 4) and torch.isfinite(out).all() and calls == [4, 4, 4]
    # a scheduler without learned variance gets the mean half only
    assert denoise(predict, (2, 4, 4, 4), scheduler=learned.sampler("ddim"), generator=torch.Generator().manual_seed(0), **args).shape == (2, 4, 4, 4)


class TwoUNets(PluginModel):
    """A model with two networks (TruePose's SourceNet + TargetNet pattern)."""

    @register_to_config
    def __init__(self, unet_config: dict, width: int = 8, unets: dict | None = None):
        super().__init__()
        self.source_unet = self.make_unet(unet_config, (unets or {}).get("source"))
        self.target_unet = self.make_unet(unet_config, (unets or {}).get("target"))
        self.head = torch.nn.Linear(width, width)


def test_a_model_with_two_unets_saves_and_loads(tmp_path):
    base = tiny_unet()
    model = TwoUNets(unet_config=plain_config(base), unets={"source": base, "target": tiny_unet()})
    assert "unets" not in model.config
    model.save_pretrained(tmp_path / "m")
    back = TwoUNets.from_pretrained(tmp_path / "m")
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    model.enable_gradient_checkpointing()
    assert model.source_unet.is_gradient_checkpointing and model.target_unet.is_gradient_checkpointing


def test_settings_are_validated_and_replaced():
    config = TrainConfig()
    assert config.replace(learning_rate=None, batch_size=3).batch_size == 3 and config.replace(learning_rate=None).learning_rate == 1e-4
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.5)
    assert SampleSettings().replace(guidance_scale=3.0, scheduler=None).as_kwargs()["guidance_scale"] == 3.0


def test_decode_to_uint8():
    from diffusers import AutoencoderKL

    from posedata.extractors.vae import TINY_CONFIG

    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_CONFIG).eval()
    latents = torch.randn(2, 4, 4, 3)
    with torch.no_grad():
        images = decode_to_uint8(vae, latents)
        scaled = decode_to_uint8(vae, latents * vae.config.scaling_factor, scaled=True)
    assert images.dtype.name == "uint8" and images.shape[0] == 2 and images.shape[-1] == 3
    assert abs(images.astype(int) - scaled.astype(int)).max() <= 1


def test_unet_plugin_reads_the_base_models_vae_and_flipped_posteriors():
    from posedata.train.unet import UNetPlugin

    class Minimal(UNetPlugin):
        name = "minimal"
        needs = ("vae:sd15",)
        presets = {"paper": Preset(), "tiny": Preset()}
        min_snr_gamma = 5.0
        scheduler_changes = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}

    card = {"resolution": [64, 48], "features": {"vae@x": {"name": "vae", "preset": "sd15", "scaling_factor": 0.18215,
                                                            "outputs": {"mean.npy": {"shape": [4, 8, 6]}}}}}
    plugin = Minimal(card, weights="tiny")
    assert plugin.vae_need == "vae:sd15" and plugin.latent_shape == (4, 8, 6) and plugin.scaling_factor == 0.18215
    assert plugin.objective.prediction_type == "v_prediction" and plugin.objective.min_snr_gamma == 5.0
    assert float(plugin.noise_scheduler.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-10)
    sample = {"__key__": "k", "vae.mean": torch.zeros(4, 8, 6).numpy(), "vae.std": torch.ones(4, 8, 6).numpy(),
              "vae.mean_flip": torch.full((4, 8, 6), 2.0).numpy(), "vae.std_flip": torch.full((4, 8, 6), 3.0).numpy()}
    mean, std = plugin.posterior(sample)
    assert (mean == 0).all() and (std == 1).all()
    mean, std = plugin.posterior(sample, flipped=True)
    assert (mean == 2).all() and (std == 3).all()
    with pytest.raises(ValueError, match="--flip"):
        plugin.posterior({k: v for k, v in sample.items() if "flip" not in k}, flipped=True)
    with pytest.raises(ValueError, match="vae:sd15"):
        Minimal({"resolution": [64, 48], "features": {}}, weights="tiny")
