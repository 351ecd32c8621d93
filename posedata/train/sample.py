"""`posedata sample PLUGIN` and `posedata sample pcdm`: trained runs -> images of a split's pairs.

Every sample command writes, under its output folder:

    <file>.png / .npy     one output per pair (`<source>_to_<target>`; the pcdm chain puts
                          each stage in its own folder: prior/, inpaint/, refine/)
    samples.parquet       source_key, target_key, file (relative to the folder), plus the
                          plugin's extras: what evaluation (`posedata eval`) matches with
                          the ground truth
    sheet.png             contact sheet: source | target pose | output(s) | ground truth

Pairs are the first `limit` of the split's pair table, in table order (pairs across two
shards cannot be read and are counted in the summary). One seeded generator drives all
noise, so the same command gives the same pixels.

The chain (`sample_pcdm`): prior (source CLIP embedding + both poses -> target CLIP
embedding) -> inpaint ([source | target] canvas -> coarse target) -> refine (coarse ->
refined), all from the dataset's stored features; the VAE the features were made with
decodes the images. Each stage can run alone: inpaint alone paints with the target's
stored CLIP embedding, refine alone refines the target's own latent (what its training
sees). `recipe`: "official" (each stage as the official test scripts run it) or "paper"
(DDIM 50, w = 2); every stage's settings can be overridden.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw, ImageFont

from posedata.reader import Dataset, find_feature
from posedata.registry import load_object
from posedata.render import draw_openpose
from posedata.train import plugin_class
from posedata.train.checkpoint import checkpoints
from posedata.train.config import SampleSettings
from posedata.train.diffusion import decode_to_uint8
from posedata.train.plugin import Plugin, rebuild_extractor, stack
from posedata.train.run import load_null_embeddings

STAGES = ("prior", "inpaint", "refine")
PLUGINS = {"prior": "pcdm-prior", "inpaint": "pcdm-inpaint", "refine": "pcdm-refine"}
POSE = ("openpose", "keypoints_annotated")
SAMPLES_TABLE = "samples.parquet"


def latest_model(run: str) -> str:
    """A run directory -> its newest checkpoint; a checkpoint or model folder as it is."""
    path = Path(run)
    found = checkpoints(path) if path.is_dir() else []
    if found:
        return str(found[-1][1])
    if path.exists():
        return str(path)
    raise FileNotFoundError(f"{run}: no run directory or checkpoint here")


def trained_with(model: str) -> dict[str, Any]:
    """The preset and plugin options a checkpoint's run was trained with (the run's
    config.json, beside the checkpoint or in the run directory), so a run trained with the
    tiny preset is rebuilt with it; {} when there is no run config (a bare model folder)."""
    path = Path(model)
    for folder in (path, path.parent):
        config = folder / "config.json"
        recorded = json.loads(config.read_text()) if config.is_file() else {}
        if (folder / "summary.json").is_file() or "plugin" in recorded:
            return {"preset": recorded.get("preset"), **(recorded.get("plugin_options") or {})}
    return {}


def ordered_pairs(dataset: Dataset, split: str, needs, limit: int) -> tuple[list[dict[str, Any]], int]:
    """The first `limit` pairs of the split's pair table that lie inside one shard, in table
    order, with pixels; and how many pairs of the table cross two shards (not readable)."""
    table = dataset.pairs(split)
    by_shard: dict[str, list[tuple[str, str]]] = {}
    crossing = 0
    for a, b, shard in zip(table["source_key"].to_pylist(), table["target_key"].to_pylist(), table["shard"].to_pylist()):
        if shard is None:
            crossing += 1
        else:
            by_shard.setdefault(shard, []).append((a, b))

    def pairs() -> Iterator[dict[str, Any]]:
        columns = [dataset.column(n) for n in needs]
        for shard in dataset.shards(split):
            if shard in by_shard:
                samples = {s["__key__"]: s for s in dataset.read_shard(shard, columns, pixels=True)}
                for a, b in by_shard[shard]:
                    yield {"source": samples[a], "target": samples[b]}

    found = []
    for pair in pairs():
        if len(found) >= limit:
            break
        found.append(pair)
    return found, crossing


def with_pose(dataset: Dataset, needs) -> list:
    """`needs` plus the keypoints for the contact sheet when the dataset has them."""
    has_pose = any(find_feature(dataset.card, name) for name in POSE)
    return list(dict.fromkeys([*needs, *([POSE] if has_pose else [])]))


def dataset_vae(dataset: Dataset, need: str, device: str):
    """The autoencoder the dataset's `need` latents (e.g. vae:sd21) were made with."""
    if find_feature(dataset.card, need) is None:
        raise KeyError(f"{dataset.location.url}: no {need} feature to decode with")
    return rebuild_extractor(dataset.card, need, "sample").build_model().to(device).eval()


def load_stage(dataset: Dataset, name: str, run: str, device: str) -> tuple[Plugin, torch.nn.Module]:
    """A plugin and its trained model (newest checkpoint of `run`), in eval mode."""
    model, cls = latest_model(run), plugin_class(name)
    known = {"preset", *(o.name for o in cls.train_options)}
    plugin = cls(dataset.card, weights="pretrained", model=model, **{k: v for k, v in trained_with(model).items() if k in known})
    plugin.set_null_embeddings(load_null_embeddings(dataset, plugin))
    return plugin, plugin.build_model().to(device).eval()


def pair_name(pair: dict[str, Any]) -> str:
    return f"{pair['source']['__key__']}_to_{pair['target']['__key__']}"


def write_outputs(out_dir: Path, rows: list[dict[str, Any]], sheet_rows: list[tuple[dict[str, Any], list[Any]]], headers: list[str],
                  resolution: tuple[int, int]) -> tuple[Path, Path]:
    """samples.parquet (rows) and sheet.png."""
    table = out_dir / SAMPLES_TABLE
    pq.write_table(pa.Table.from_pylist(rows), table)
    sheet = out_dir / "sheet.png"
    contact_sheet(sheet_rows, headers, resolution, sheet)
    return table, sheet


def save_output(out_dir: Path, relative: str, value: Any) -> str:
    path = out_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if relative.endswith(".npy"):
        np.save(path, np.asarray(value), allow_pickle=False)
    else:
        Image.fromarray(np.asarray(value)).save(path)
    return relative


def sample_plugin(
    plugin_name: str,
    shards: str,
    run: str,
    out: str,
    *,
    split: str = "test",
    limit: int = 8,
    batch_size: int = 4,
    seed: int = 42,
    recipe: str | None = None,
    options: dict[str, Any] | None = None,
    device: str | None = None,
    storage_options: dict[str, Any] | None = None,
    echo: Callable[[str], None] = print,
    **settings: Any,
) -> dict[str, Any]:
    """Sample one plugin's trained run on a split's pairs. `settings`: SampleSettings fields
    replacing the recipe's (None: keep); `options`: the plugin's `sample_options` values.
    A plugin whose items are not pairs names its own `sampler` ("module:function", same
    arguments; IMAGPose's canvases of up to four images)."""
    sampler = getattr(plugin_class(plugin_name), "sampler", None)
    if sampler:
        return load_object(sampler)(
            plugin_name, shards, run, out, split=split, limit=limit, batch_size=batch_size, seed=seed, recipe=recipe, options=options,
            device=device, storage_options=storage_options, echo=echo, **settings)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dataset = Dataset(shards, storage_options)
    plugin, model = load_stage(dataset, plugin_name, run, device)
    chosen = plugin.sample_settings(recipe, **settings)
    pairs, crossing = ordered_pairs(dataset, split, with_pose(dataset, plugin.needs), limit)
    if not pairs:
        raise ValueError(f"{shards}: split {split!r} has no pairs inside one shard")
    vae = dataset_vae(dataset, plugin.vae_need, device) if plugin.output == "latents" else None
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, sheet_rows = [], []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        with torch.no_grad():
            outputs = plugin.sample_outputs(model, batch, generator=generator, settings=chosen, vae=vae, **(options or {}))
        for i, output in enumerate(outputs):
            output = dict(output)
            pair = batch[output.pop("pair", i)]
            image, array = output.pop("image", None), output.pop("array", None)
            name = output.pop("name", pair_name(pair))
            file = save_output(out_dir, f"{name}.png" if image is not None else f"{name}.npy", image if image is not None else array)
            rows.append({"source_key": pair["source"]["__key__"], "target_key": pair["target"]["__key__"], **output, "file": file})
            sheet_rows.append((pair, [image]))
    table, sheet = write_outputs(out_dir, rows, sheet_rows, ["output"], dataset.resolution)
    summary = {"plugin": plugin_name, "pairs": len(rows), "pairs_across_shards_skipped": crossing, "settings": chosen.as_kwargs(),
               "out": str(out_dir), "samples": str(table), "sheet": str(sheet)}
    echo(f"sampled {len(rows)} pairs of {split} with {plugin_name} ({chosen.scheduler}, {chosen.num_inference_steps} steps, "
         f"guidance {chosen.guidance_scale}); {table}, contact sheet {sheet}")
    return summary


def sample_pcdm(
    shards: str,
    out: str,
    *,
    prior: str | None = None,
    inpaint: str | None = None,
    refine: str | None = None,
    split: str = "test",
    limit: int = 8,
    batch_size: int = 4,
    recipe: str = "official",
    stage_settings: dict[str, dict[str, Any]] | None = None,
    seed: int = 42,
    device: str | None = None,
    storage_options: dict[str, Any] | None = None,
    echo: Callable[[str], None] = print,
    **settings: Any,
) -> dict[str, Any]:
    """The PCDMs chain. `recipe` picks every stage's SampleSettings; `settings`
    (num_inference_steps, guidance_scale, ...) replace them for every stage, then
    `stage_settings[stage]` for one stage."""
    runs = {"prior": prior, "inpaint": inpaint, "refine": refine}
    if not any(runs.values()):
        raise ValueError("give at least one of --prior, --inpaint, --refine")
    unknown = set(stage_settings or {}) - set(STAGES)
    if unknown:
        raise ValueError(f"stage settings for {sorted(unknown)}: the stages are {', '.join(STAGES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dataset = Dataset(shards, storage_options)
    plugins: dict[str, Plugin] = {}
    models: dict[str, torch.nn.Module] = {}
    chosen: dict[str, SampleSettings] = {}
    for stage, run in runs.items():
        if run:
            plugins[stage], models[stage] = load_stage(dataset, PLUGINS[stage], run, device)
            chosen[stage] = plugins[stage].sample_settings(recipe, **settings).replace(**(stage_settings or {}).get(stage, {}))
    # the plugins' features, plus the target pose for the contact sheet
    needs = with_pose(dataset, [n for p in plugins.values() for n in p.needs])
    image_stage = next((p for s, p in plugins.items() if s != "prior"), None)
    vae = dataset_vae(dataset, image_stage.vae_need, device) if image_stage is not None else None
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    pairs, crossing = ordered_pairs(dataset, split, needs, limit)
    if not pairs:
        raise ValueError(f"{shards}: split {split!r} has no pairs inside one shard")
    rows, sheet_rows, similarities = [], [], []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        with torch.no_grad():
            target_embeds = coarse_latents = coarse = refined = cosine = None
            if "prior" in plugins:
                target_embeds = plugins["prior"].sample(models["prior"], batch, generator=generator, **chosen["prior"].as_kwargs())
                truth = stack([p["target"] for p in batch], "clip.embeds")
                cosine = torch.nn.functional.cosine_similarity(target_embeds.float().cpu(), truth, dim=-1).tolist()
                similarities += cosine
            if "inpaint" in plugins:
                coarse_latents = plugins["inpaint"].sample(models["inpaint"], batch, target_embeds=target_embeds, generator=generator,
                                                           **chosen["inpaint"].as_kwargs())
                coarse = decode_to_uint8(vae, coarse_latents)
            if "refine" in plugins:
                if coarse_latents is None:  # refine alone: the target's own latent, as in training
                    coarse_latents = plugins["refine"].target_as_coarse(batch, generator)
                refined = decode_to_uint8(vae, plugins["refine"].sample(models["refine"], batch, coarse=coarse_latents, generator=generator,
                                                                         **chosen["refine"].as_kwargs()))
        for i, pair in enumerate(batch):
            name = pair_name(pair)
            row: dict[str, Any] = {"source_key": pair["source"]["__key__"], "target_key": pair["target"]["__key__"]}
            if target_embeds is not None:
                row["prior_file"] = save_output(out_dir, f"prior/{name}.npy", target_embeds[i].float().cpu().numpy())
                row["prior_cosine_to_target"] = cosine[i]
            for stage, images in (("inpaint", coarse), ("refine", refined)):
                if images is not None:
                    row[f"{stage}_file"] = save_output(out_dir, f"{stage}/{name}.png", images[i])
            # the chain's final output is what evaluation reads
            row["file"] = row.get("refine_file") or row.get("inpaint_file") or row["prior_file"]
            rows.append(row)
            sheet_rows.append((pair, [None if coarse is None else coarse[i], None if refined is None else refined[i]]))

    table, sheet = write_outputs(out_dir, rows, sheet_rows, ["coarse", "refined"], dataset.resolution)
    summary = {"pairs": len(rows), "pairs_across_shards_skipped": crossing, "stages": list(plugins), "recipe": recipe,
               "settings": {s: c.as_kwargs() for s, c in chosen.items()}, "out": str(out_dir), "samples": str(table), "sheet": str(sheet)}
    if similarities:
        summary["prior_cosine_to_target_mean"] = float(np.mean(similarities))
    echo(f"sampled {len(rows)} pairs of {split} through {' -> '.join(plugins)} ({recipe} recipe); {table}, contact sheet {sheet}")
    return summary


def contact_sheet(rows: list[tuple[dict[str, Any], list[Any]]], headers: list[str], resolution: tuple[int, int], path: os.PathLike) -> None:
    """source | target pose | <headers> | ground truth, one row per pair (None: a blank cell)."""
    height, width = resolution
    headers = ["source", "target pose", *headers, "ground truth"]
    pad, caption = 6, 16
    sheet = Image.new("RGB", (len(headers) * (width + pad) + pad, caption + len(rows) * (height + caption + pad) + pad), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for c, header in enumerate(headers):
        draw.text((pad + c * (width + pad), 2), header, fill=(235, 235, 235), font=font)
    blank = np.zeros((height, width, 3), np.uint8)
    for r, (pair, outputs) in enumerate(rows):
        target = pair["target"]
        pose = draw_openpose(target["openpose.keypoints"], height, width) if "openpose.keypoints" in target else None
        cells = [pair["source"]["image"], pose, *outputs, target["image"]]
        y = caption + r * (height + caption + pad)
        for c, cell in enumerate(cells):
            sheet.paste(Image.fromarray(blank if cell is None else np.asarray(cell)), (pad + c * (width + pad), y))
        draw.text((pad, y + height + 2), f"{pair['source']['__key__']} -> {target['__key__']}", fill=(235, 235, 235), font=font)
    sheet.save(path)
