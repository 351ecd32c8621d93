"""`posedata sample pcdm`: the three PCDMs stages chained over the pairs of a split.

prior (source CLIP embedding + both poses -> target CLIP embedding, classifier-free guidance)
-> inpaint ([source | target] canvas -> coarse target) -> refine (coarse -> refined), all from
the dataset's stored features; the VAE the features were made with decodes the images. Each
stage can also run alone: inpaint alone paints with the target's stored CLIP embedding,
refine alone refines the target's own latent (what its training sees).

Writes `<out>/<stage>/<source>_to_<target>.png` per pair and `<out>/sheet.png`: source |
target pose | coarse | refined | ground truth.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from posedata.reader import Dataset, find_feature
from posedata.render import draw_openpose
from posedata.train import plugin_class
from posedata.train.plugin import Plugin
from posedata.train.run import load_null_embeddings
from posedata.train.trainer import checkpoints

STAGES = ("prior", "inpaint", "refine")
PLUGINS = {"prior": "pcdm-prior", "inpaint": "pcdm-inpaint", "refine": "pcdm-refine"}
POSE = ("openpose", "keypoints_annotated")


def latest_model(run: str) -> str:
    """A run directory -> its newest checkpoint; a checkpoint or model folder as it is."""
    path = Path(run)
    found = checkpoints(path) if path.is_dir() else []
    if found:
        return str(found[-1][1])
    if path.exists():
        return str(path)
    raise FileNotFoundError(f"{run}: no run directory or checkpoint here")


def ordered_pairs(dataset: Dataset, split: str, needs, limit: int) -> Iterator[dict[str, Any]]:
    """The first `limit` pairs of the split's pair table, in table order, with pixels."""
    table = dataset.pairs(split)
    by_shard: dict[str, list[tuple[str, str]]] = {}
    for a, b, shard in zip(table["source_key"].to_pylist(), table["target_key"].to_pylist(), table["shard"].to_pylist()):
        if shard is not None:
            by_shard.setdefault(shard, []).append((a, b))
    columns = [dataset.column(n) for n in needs]
    count = 0
    for shard in dataset.shards(split):
        if shard not in by_shard:
            continue
        samples = {s["__key__"]: s for s in dataset.read_shard(shard, columns, pixels=True)}
        for a, b in by_shard[shard]:
            yield {"source": samples[a], "target": samples[b]}
            count += 1
            if count >= limit:
                return


def dataset_vae(dataset: Dataset, device: str):
    """The autoencoder the dataset's `vae:sd21` latents were made with, to decode samples."""
    from posedata.extractors import create_extractor

    folder, feature = find_feature(dataset.card, "vae:sd21") or (None, None)
    if feature is None:
        raise KeyError(f"{dataset.location.url}: no vae:sd21 feature to decode with")
    inputs = feature["fingerprint_inputs"]
    kwargs = {"weights": feature["weights"], "resolution": tuple(dataset.card["resolution"]), "preset": feature.get("preset")}
    if feature["weights"] == "pretrained":
        kwargs["model"] = inputs["model"]
    extractor = create_extractor("vae", **kwargs)
    if extractor.folder != folder:
        raise RuntimeError(f"cannot rebuild the VAE of {folder} (got {extractor.folder}); pass the VAE explicitly")
    return extractor.build_model().to(device).eval()


def sample_pcdm(
    shards: str,
    out: str,
    *,
    prior: str | None = None,
    inpaint: str | None = None,
    refine: str | None = None,
    split: str = "test",
    count: int = 8,
    batch_size: int = 4,
    steps: int = 50,
    guidance_scale: float = 2.0,
    scheduler: str = "ddim",
    seed: int = 42,
    device: str | None = None,
    storage_options: dict[str, Any] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    runs = {"prior": prior, "inpaint": inpaint, "refine": refine}
    if not any(runs.values()):
        raise ValueError("give at least one of --prior, --inpaint, --refine")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dataset = Dataset(shards, storage_options)
    plugins: dict[str, Plugin] = {}
    models: dict[str, torch.nn.Module] = {}
    for stage, run in runs.items():
        if run:
            plugin = plugin_class(PLUGINS[stage])(dataset.card, weights="pretrained", model=latest_model(run))
            plugin.set_null_embeddings(load_null_embeddings(dataset, plugin))
            plugins[stage], models[stage] = plugin, plugin.build_model().to(device).eval()
    # the plugins' features, plus the target pose for the contact sheet
    needs = list(dict.fromkeys([*(n for p in plugins.values() for n in p.needs), POSE]))
    vae = dataset_vae(dataset, device) if ("inpaint" in plugins or "refine" in plugins) else None
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out_dir = Path(out)
    for stage in plugins:
        (out_dir / stage).mkdir(parents=True, exist_ok=True)

    rows, similarities = [], []
    pairs = list(ordered_pairs(dataset, split, needs, count))
    if not pairs:
        raise ValueError(f"{shards}: split {split!r} has no pairs inside one shard")
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        with torch.no_grad():
            target_embeds = coarse_latents = coarse = refined = None
            if "prior" in plugins:
                target_embeds = plugins["prior"].sample(models["prior"], batch, generator=generator, guidance_scale=guidance_scale, num_inference_steps=steps)
                truth = torch.stack([torch.as_tensor(np.asarray(p["target"]["clip.embeds"], np.float32)) for p in batch])
                similarities += torch.nn.functional.cosine_similarity(target_embeds.float().cpu(), truth, dim=-1).tolist()
            options = dict(generator=generator, guidance_scale=guidance_scale, num_inference_steps=steps, scheduler=scheduler)
            if "inpaint" in plugins:
                coarse_latents = plugins["inpaint"].sample(models["inpaint"], batch, target_embeds=target_embeds, **options)
                coarse = decode_images(vae, coarse_latents)
            if "refine" in plugins:
                if coarse_latents is None:  # refine alone: the target's own latent, as in training
                    coarse_latents = target_latents(batch, generator)
                refined = decode_images(vae, plugins["refine"].sample(models["refine"], batch, coarse=coarse_latents, **options))
        for i, pair in enumerate(batch):
            name = f"{pair['source']['__key__']}_to_{pair['target']['__key__']}"
            for stage, images in (("inpaint", coarse), ("refine", refined)):
                if images is not None:
                    Image.fromarray(images[i]).save(out_dir / stage / f"{name}.png")
            if target_embeds is not None:
                np.save(out_dir / "prior" / f"{name}.npy", target_embeds[i].float().cpu().numpy(), allow_pickle=False)
            rows.append((pair, None if coarse is None else coarse[i], None if refined is None else refined[i]))

    sheet = out_dir / "sheet.png"
    contact_sheet(rows, dataset.resolution, sheet)
    summary = {"pairs": len(rows), "stages": list(plugins), "out": str(out_dir), "sheet": str(sheet)}
    if similarities:
        summary["prior_cosine_to_target_mean"] = float(np.mean(similarities))
    echo(f"sampled {len(rows)} pairs of {split} through {' -> '.join(plugins)}; contact sheet {sheet}")
    return summary


def target_latents(batch: list[dict[str, Any]], generator: torch.Generator) -> torch.Tensor:
    """A draw from each target's stored VAE posterior (unscaled latents)."""
    mean = torch.stack([torch.as_tensor(np.asarray(p["target"]["vae.mean"], np.float32)) for p in batch])
    std = torch.stack([torch.as_tensor(np.asarray(p["target"]["vae.std"], np.float32)) for p in batch])
    return mean + std * torch.randn(mean.shape, generator=generator)


def decode_images(vae, latents: torch.Tensor) -> np.ndarray:
    """Unscaled latents [B, 4, h, w] -> uint8 images [B, H, W, 3]."""
    images = vae.decode(latents.to(next(vae.parameters()).dtype)).sample
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def contact_sheet(rows, resolution: tuple[int, int], path: os.PathLike) -> None:
    """source | target pose | coarse | refined | ground truth, one row per pair."""
    height, width = resolution
    headers = ["source", "target pose", "coarse", "refined", "ground truth"]
    pad, caption = 6, 16
    sheet = Image.new("RGB", (len(headers) * (width + pad) + pad, caption + len(rows) * (height + caption + pad) + pad), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for c, header in enumerate(headers):
        draw.text((pad + c * (width + pad), 2), header, fill=(235, 235, 235), font=font)
    blank = np.zeros((height, width, 3), np.uint8)
    for r, (pair, coarse, refined) in enumerate(rows):
        target = pair["target"]
        cells = [pair["source"]["image"], draw_openpose(target["openpose.keypoints"], height, width), coarse, refined, target["image"]]
        y = caption + r * (height + caption + pad)
        for c, cell in enumerate(cells):
            sheet.paste(Image.fromarray(blank if cell is None else np.asarray(cell)), (pad + c * (width + pad), y))
        draw.text((pad, y + height + 2), f"{pair['source']['__key__']} -> {target['__key__']}", fill=(235, 235, 235), font=font)
    sheet.save(path)
