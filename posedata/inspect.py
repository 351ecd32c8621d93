"""`posedata inspect`: the card, counts per split, features with fingerprints and sizes,
rejects by reason — as text a person reads top to bottom."""

from __future__ import annotations

import collections
from typing import Any

from posedata.layout import REJECTS
from posedata.reader import Dataset
from posedata.shards import duplicates_across_splits, duplicates_text


def describe(url: str, storage_options: dict[str, Any] | None = None) -> str:
    ds = Dataset(url, storage_options)
    card, loc = ds.card, ds.location
    h, w = card["resolution"]
    lines = [
        f"dataset   {loc.url}",
        f"name      {card['name']}   (posedata {card['posedata_version']}, format {card['format_version']})",
        f"source    {card['source']['name']} at {card['source']['root']}  layout: {card['source']['info'].get('layout', '?')}",
        f"images    {h}x{w} (H x W) {card['image']['format']} q{card['image']['quality']}",
        f"counts    inputs {card['counts']['inputs']}  written {card['counts']['written']}  rejected {card['counts']['rejected']}",
        "",
        "splits",
    ]
    for split, info in card["splits"].items():
        lines.append(
            f"  {split:<8} {info['samples']:>7} samples  {len(info['shards']):>4} shards  {info.get('pairs', 0):>8} pairs"
            f"  ({info.get('pairs_origin', '')})"
        )
        if info.get("pairs_dropped"):
            lines.append(f"           {info['pairs_dropped']} listed pairs dropped (an image was rejected or missing)")
        if not info.get("samples"):
            lines.append(f"           no samples: every input of split {split!r} was rejected (see rejects below)")
        elif not info.get("pairs"):
            why = "every group holds a single image (see --group-regex)" if str(info.get("pairs_origin", "")).startswith("generated") else "no listed pair has both images here"
            lines.append(f"           0 pairs: {why}; plugins that train on pairs cannot use split {split!r}")
    # the card's count (builds since format 2), else counted from the manifest
    leak = duplicates_text(card["duplicates_across_splits"] if "duplicates_across_splits" in card else duplicates_across_splits(ds.manifest))
    if leak:
        lines.append(f"  duplicates {leak}")
    lines += ["", "features"]
    sizes = _feature_sizes(loc, card)
    for folder, feat in card["features"].items():
        outputs = ", ".join(_output_text(s, o) for s, o in feat["outputs"].items())
        size = sizes.get(folder)
        per_sample = f"{size / max(1, card['counts']['written']) / 1024:.1f} KiB/sample" if size is not None else "?"
        label = feat.get("spec") or feat["name"]
        lines.append(f"  {folder:<28} {label:<14} {feat['model']}  [{feat.get('weights', '')}]  {per_sample}")
        lines.append(f"  {'':<28} {'':<14} {outputs}")
        for note, n in feat.get("notes", {}).items():
            lines.append(f"  {'':<28} {'':<14} {n} samples: {note}")
    base = sizes.get("__base__")
    if base is not None:
        lines.append(f"  {'(base shards: images + meta)':<32} {base / max(1, card['counts']['written']) / 1024:.1f} KiB/sample")
    lines += ["", "rejects"]
    rejects = loc.read_parquet(loc.path(REJECTS))
    if len(rejects) == 0:
        lines.append("  none")
    else:
        by_reason = collections.Counter(zip(rejects["stage"].to_pylist(), rejects["reason"].to_pylist()))
        for (stage, reason), n in sorted(by_reason.items(), key=lambda kv: -kv[1])[:30]:
            lines.append(f"  {n:>6}  [{stage}] {reason}")
        if len(by_reason) > 30:
            lines.append(f"  ... {len(by_reason) - 30} more distinct reasons (read rejects.parquet)")
    return "\n".join(lines)


def _output_text(suffix: str, output: dict[str, Any]) -> str:
    """`embeds.npy float16 [1024]`; fp8 / bf16: the precision and the members that hold it."""
    if not output.get("members"):
        return f"{suffix} {output['dtype']} {output['shape']}"
    members = " + ".join(f"{m} {d['dtype']}" for m, d in output["members"].items())
    return f"{suffix} {output.get('precision')} {output['shape']} (as {members})"


def _feature_sizes(loc, card) -> dict[str, int]:
    sizes: dict[str, int] = {}
    try:
        sizes["__base__"] = sum(loc.fs.size(p) for p in loc.glob("shards/*.tar"))
        for folder in card["features"]:
            sizes[folder] = sum(loc.fs.size(p) for p in loc.glob(f"features/{folder}/*.tar"))
    except OSError:
        pass
    return sizes
