"""`posedata sample imagpose --mode single|t1|multi-source|multi-target`: a trained IMAGPose
run over a split, in every user scenario of the paper, each target written as its own image.

What each canvas holds (tiles TL, TR, BL, BR; S = known source, T = generated target):

    single        S S S T   one source, one target: the official test.py (the paper's T2)
    t1            S T T T   the target pose three times (the paper's T1; not in the official
                            code); the first target tile is kept
    multi-source  S S S T   up to three different images of the person (the pair's source,
                            then the others of its group; cycled when fewer): the paper's T3
    multi-target  S T T T   one source, up to three of its pair targets in one pass
                            (IMAGPose*); free tiles repeat the source

Items come from the split's pair table, in table order (pairs across two shards cannot be
read); the first `limit` items are sampled. The whole canvas is decoded with the dataset's
VAE and every target tile is cut out at the stored resolution (the official scripts save
whole canvases and record nothing). `samples.parquet`: source_key (the reference source),
target_key, file, mode, source_keys (every source on the canvas), tile; plus sheet.png.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from posedata.reader import Dataset
from posedata.train.diffusion import decode_to_uint8
from posedata.train.imagpose import SAMPLE_MODES, ImagPosePlugin
from posedata.train.sample import dataset_vae, load_stage, save_output, write_outputs

Item = tuple[list[dict[str, Any]], list[dict[str, Any]]]  # (sources, targets)


def sampling_items(dataset: Dataset, split: str, needs, mode: str, limit: int) -> tuple[list[Item], int]:
    """The first `limit` canvases' (sources, targets) of `mode` from the split's pair table
    (with pixels, for the contact sheet), and how many pairs cross two shards (skipped)."""
    if mode not in SAMPLE_MODES:
        raise ValueError(f"mode must be one of {SAMPLE_MODES}, got {mode!r}")
    table = dataset.pairs(split)
    by_shard: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    crossing = 0
    for a, b, shard in zip(table["source_key"].to_pylist(), table["target_key"].to_pylist(), table["shard"].to_pylist()):
        if shard is None:
            crossing += 1
        else:
            by_shard[shard].append((a, b))
    columns = [dataset.column(n) for n in needs]
    items: list[Item] = []
    for shard in dataset.shards(split):
        if shard not in by_shard or len(items) >= limit:
            continue
        samples = {s["__key__"]: s for s in dataset.read_shard(shard, columns, pixels=True)}
        members: dict[str, list[str]] = collections.defaultdict(list)
        for key, sample in samples.items():
            members[sample["group"]].append(key)
        pairs = by_shard[shard]
        if mode in ("single", "t1"):
            found = [([samples[a]], [samples[b]]) for a, b in pairs]
        elif mode == "multi-source":
            found = []
            for a, b in pairs:
                others = [k for k in members[samples[b]["group"]] if k not in (a, b)]
                found.append(([samples[k] for k in [a, *others][:3]], [samples[b]]))
        else:  # multi-target: a source's targets in table order, three per canvas
            targets: dict[str, list[str]] = collections.defaultdict(list)
            for a, b in pairs:
                targets[a].append(b)
            found = [([samples[a]], [samples[k] for k in keys[i : i + 3]]) for a, keys in targets.items() for i in range(0, len(keys), 3)]
        items += found[: limit - len(items)]
    return items, crossing


def sample_imagpose(
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
    """Sample a trained imagpose run in one scenario (`options["mode"]`); see the module
    docstring. `settings`: SampleSettings fields replacing the recipe's (None: keep)."""
    mode = (options or {}).get("mode") or "single"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dataset = Dataset(shards, storage_options)
    plugin, model = load_stage(dataset, plugin_name, run, device)
    if not isinstance(plugin, ImagPosePlugin):
        raise ValueError(f"{plugin_name} is not an IMAGPose plugin")
    chosen = plugin.sample_settings(recipe, **settings)
    items, crossing = sampling_items(dataset, split, plugin.needs, mode, limit)
    if not items:
        raise ValueError(f"{shards}: split {split!r} has no pairs inside one shard to sample")
    vae = dataset_vae(dataset, plugin.vae_need, device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    height, width = dataset.resolution
    tile_h, tile_w = plugin.tile_pixels
    rows, sheet_rows = [], []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        canvases = [plugin.layout(mode, sources, targets) for sources, targets in batch]
        with torch.no_grad():
            latents = plugin.sample_canvases(model, canvases, generator=generator, **chosen.as_kwargs())
            images = decode_to_uint8(vae, latents)  # whole canvases [B, 2Hp, 2Wp, 3]
        for (sources, _targets), (tiles, flags), image in zip(batch, canvases, images):
            written: set[str] = set()
            for tile, (sample, known) in enumerate(zip(tiles, flags)):
                if known or sample["__key__"] in written:  # t1: the target three times, keep the first
                    continue
                written.add(sample["__key__"])
                y, x = (tile // 2) * tile_h, (tile % 2) * tile_w
                cut = image[y : y + height, x : x + width]
                name = f"{sources[0]['__key__']}_to_{sample['__key__']}.png"
                file = save_output(out_dir, name if mode != "multi-target" else f"{sources[0]['__key__']}/{sample['__key__']}.png", cut)
                rows.append({"source_key": sources[0]["__key__"], "target_key": sample["__key__"], "file": file, "mode": mode,
                             "source_keys": [s["__key__"] for s in sources], "tile": tile})
                sheet_rows.append(({"source": sources[0], "target": sample}, [cut]))
        echo(f"{len(rows)} target(s) from {min(start + batch_size, len(items))}/{len(items)} canvases")
    table, sheet = write_outputs(out_dir, rows, sheet_rows, [f"imagpose ({mode})"], dataset.resolution)
    summary = {"plugin": plugin_name, "mode": mode, "canvases": len(items), "targets": len(rows), "pairs_across_shards_skipped": crossing,
               "settings": chosen.as_kwargs(), "out": str(out_dir), "samples": str(table), "sheet": str(sheet)}
    echo(f"sampled {len(rows)} targets on {len(items)} canvases of {split} with {plugin_name} --mode {mode} ({chosen.scheduler}, "
         f"{chosen.num_inference_steps} steps, guidance {chosen.guidance_scale}); {table}, contact sheet {sheet}")
    return summary
