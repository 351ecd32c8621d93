"""`posedata eval SAMPLES_DIR --shards URL --protocol pcdms`: the papers' numbers for samples.

Reads `SAMPLES_DIR/samples.parquet` (source_key, target_key, file; `file` relative to
SAMPLES_DIR, as every `posedata sample` writes it), takes each ground truth (and the source,
for the sheet) from the dataset's stored images, and computes the protocol's metrics the way
its official script does (see protocol.py). FID compares the samples with the dataset's
stored reference features (`fid_ref:<protocol>`, made once by `posedata extend`). Writes
`SAMPLES_DIR/metrics.json` and `SAMPLES_DIR/metrics_sheet.png` (best and worst pairs by
LPIPS: source | generated | ground truth), and prints a table.

Pairs are taken in sorted file order, as the scripts take theirs (sorted paths): that order
decides which pairs fall in a last partial batch the protocol drops.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from posedata.errors import PosedataError
from posedata.eval import metrics as M
from posedata.eval.masks import body_mask
from posedata.eval.networks import EVAL_WEIGHTS, FidNetwork, lpips_network, weight_file
from posedata.eval.protocol import METRICS, Protocol, create_protocol
from posedata.reader import Dataset

SAMPLES_TABLE = "samples.parquet"
SAMPLES_COLUMNS = ("source_key", "target_key", "file")
METRICS_FILE = "metrics.json"
SHEET_FILE = "metrics_sheet.png"
POSE = ("keypoints_annotated", "openpose")  # the target pose the body masks are drawn from
WEIGHT_ROLES = {"lpips": "alexnet", "mask_lpips": "alexnet", "fid": "inception", "fid_tf": "tf_inception"}
HIGHER_IS_BETTER = {"ssim": True, "psnr": True, "mask_ssim": True, "lpips": False, "mask_lpips": False, "fid": False, "fid_tf": False}


class EvalError(PosedataError):
    """Evaluation cannot proceed: a missing table, image, reference or metric the protocol lacks."""


def available_metrics(protocol: Protocol) -> tuple[str, ...]:
    extra = ("fid_tf",) if "fid" in protocol.metrics else ()
    return protocol.metrics + protocol.market_metrics + extra


def evaluate(
    samples_dir: str,
    shards: str,
    protocol: str = "pcdms",
    metrics: list[str] | None = None,
    weights: str = "pretrained",
    split: str = "test",
    reference_split: str = "train",
    seed: int = 0,
    sheet_pairs: int = 4,
    device: str | None = None,
    storage_options: dict[str, Any] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    import torch

    started = time.time()
    if weights not in EVAL_WEIGHTS:
        raise EvalError(f"--weights must be one of {', '.join(EVAL_WEIGHTS)}, not {weights!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    samples_dir_path = Path(samples_dir)
    pairs = read_samples(samples_dir_path)
    dataset = Dataset(shards, storage_options)
    proto = create_protocol(protocol, dataset.resolution)
    market = (dataset.card.get("source") or {}).get("name") == "market1501"
    wanted, notes = choose_metrics(proto, metrics, market, dataset, weights, seed)

    if weights == "pretrained":  # every missing weight file now, before any work
        for role in sorted({WEIGHT_ROLES[m] for m in wanted if m in WEIGHT_ROLES}):
            weight_file(role)
    keys = {k for p in pairs for k in (p["source_key"], p["target_key"])}
    stored = stored_samples(dataset, keys, need_pose=any(m.startswith("mask_") for m in wanted))
    wrong_split = [p["target_key"] for p in pairs if stored[p["target_key"]]["split"] != split]
    if wrong_split:
        raise EvalError(f"{len(wrong_split)} target(s) are not in split {split!r} of {dataset.location.url} (e.g. {wrong_split[0]!r} is in {stored[wrong_split[0]]['split']!r}); pass --split")

    echo(f"posedata eval {samples_dir}: {len(pairs)} pairs, protocol {proto.name} ({', '.join(wanted)}; weights: {weights})")
    truths, generated = [], []
    for p in pairs:
        truth = proto.truth_file(stored[p["target_key"]]["image"])
        truths.append(truth)
        generated.append(proto.generated_file(read_generated(samples_dir_path / p["file"]), truth.shape[:2]))

    per_pair: list[dict[str, Any]] = [dict(p) for p in pairs]
    results: dict[str, Any] = {}
    counted: dict[str, int] = {}
    masks = None
    if any(m.startswith("mask_") for m in wanted):
        masks = [target_mask(stored[p["target_key"]], t.shape[:2]) for p, t in zip(pairs, truths)]

    if "ssim" in wanted or "mask_ssim" in wanted:
        for i, (g, t) in enumerate(progress(list(zip(generated, truths)), "ssim")):
            if "ssim" in wanted:
                per_pair[i]["ssim"] = M.ssim(*proto.ssim_inputs(g, t), sigma=proto.ssim_sigma)
            if "mask_ssim" in wanted:
                per_pair[i]["mask_ssim"] = M.ssim(*proto.ssim_inputs(proto.masked(g, masks[i]), proto.masked(t, masks[i])), sigma=proto.ssim_sigma)
        for name in ("ssim", "mask_ssim"):
            if name in wanted:
                results[name] = float(np.mean([r[name] for r in per_pair]))
    if "psnr" in wanted:
        for i, (g, t) in enumerate(zip(generated, truths)):
            per_pair[i]["psnr"] = M.psnr(*proto.psnr_inputs(g, t))
        results["psnr"] = float(np.mean([r["psnr"] for r in per_pair]))
    if "lpips" in wanted or "mask_lpips" in wanted:
        network = lpips_network(weights, seed, device)
        used = counted["lpips"] = M.counted(len(pairs), proto.lpips_batch)
        inputs = [proto.lpips_inputs(g, t) for g, t in zip(generated, truths)]
        for name in ("lpips", "mask_lpips"):
            if name not in wanted:
                continue
            if name == "mask_lpips":
                inputs = [(proto.masked(a, m), proto.masked(b, m)) for (a, b), m in zip(inputs, masks)]
            distances = M.lpips_distances(network, [a for a, _ in inputs], [b for _, b in inputs])
            for r, d in zip(per_pair, distances):
                r[name] = float(d)
            results[name] = float(np.mean(distances[:used])) if used else None
    for name, kind in (("fid", "torchvision"), ("fid_tf", "tf")):
        if name in wanted:
            reference, folder = reference_features(dataset, proto, kind, weights, seed, reference_split)
            network = FidNetwork(kind, weights, seed).to(device)
            mine = network.features([proto.fid_input(g) for g in generated])
            mine = mine[: M.counted(len(mine), proto.fid_batch)]
            reference = reference[: M.counted(len(reference), proto.fid_batch)]
            counted[f"{name}_generated"], counted[f"{name}_reference"] = len(mine), len(reference)
            if len(mine) < 2 or len(reference) < 2:
                results[name] = None
                notes.append(f"{name}: needs at least 2 images on each side (have {len(mine)} generated, {len(reference)} reference)")
            else:
                results[name] = M.frechet_distance(mine, reference)
            notes.append(f"{name}: reference features/{folder} (split {reference_split})")

    for name, value in results.items():
        if isinstance(value, float) and not math.isfinite(value):
            notes.append(f"{name} is {value} (a sample identical to its ground truth has infinite PSNR): written as null")
    report = {
        "protocol": proto.name,
        "n_pairs": len(pairs),
        "metrics": {m: results.get(m) for m in wanted},
        "counted": counted,
        "settings": {**proto.describe(), "weights": weights, "seed": seed, "split": split, "reference_split": reference_split},
        "dataset": dataset.location.url,
        "notes": notes,
        "per_pair": [{k: finite(v) for k, v in r.items()} for r in per_pair],
    }
    report["metrics"] = {k: finite(v) for k, v in report["metrics"].items()}
    (samples_dir_path / METRICS_FILE).write_text(json.dumps(report, indent=2) + "\n")
    sheet = samples_dir_path / SHEET_FILE
    from posedata.eval.sheet import best_and_worst_sheet

    rank_by = next((m for m in ("lpips", "ssim", "mask_lpips", "mask_ssim", "psnr") if m in wanted), None)
    best_and_worst_sheet(per_pair, stored, generated, truths, rank_by, not HIGHER_IS_BETTER.get(rank_by, False), sheet, sheet_pairs, f"{proto.name}: best and worst pairs by {rank_by}")
    echo(format_table(report))
    echo(f"wrote {samples_dir_path / METRICS_FILE} and {sheet} in {time.time() - started:.1f} s")
    return report


def read_samples(samples_dir: Path) -> list[dict[str, str]]:
    path = samples_dir / SAMPLES_TABLE
    if not path.is_file():
        raise EvalError(f"{path}: not found; `posedata sample` writes it (columns {', '.join(SAMPLES_COLUMNS)}, file relative to {samples_dir})")
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - any unreadable table is the user's file to fix
        raise EvalError(f"{path}: not a readable Parquet table ({e.__class__.__name__}: {e})") from None
    missing = [c for c in SAMPLES_COLUMNS if c not in table.column_names]
    if missing:
        raise EvalError(f"{path}: no column {', '.join(missing)} (has {', '.join(table.column_names)}); expected {', '.join(SAMPLES_COLUMNS)}")
    rows = [{c: str(v) for c, v in zip(SAMPLES_COLUMNS, values)} for values in zip(*(table[c].to_pylist() for c in SAMPLES_COLUMNS))]
    if not rows:
        raise EvalError(f"{path}: no pairs in it")
    return sorted(rows, key=lambda r: r["file"])


def read_generated(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise EvalError(f"{path}: listed in {SAMPLES_TABLE}, file not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise EvalError(f"{path}: not a readable image ({e})") from None


def choose_metrics(proto: Protocol, asked: list[str] | None, market: bool, dataset: Dataset, weights: str, seed: int) -> tuple[list[str], list[str]]:
    """The metrics to compute and notes about the ones left out. Asked-for metrics must be
    ones the protocol defines; by default its published ones, plus fid_tf when the dataset
    has that reference."""
    notes: list[str] = []
    allowed = available_metrics(proto)
    if asked:
        unknown = [m for m in asked if m not in METRICS]
        if unknown:
            raise EvalError(f"unknown metric {unknown[0]!r}; known: {', '.join(METRICS)}")
        undefined = [m for m in asked if m not in allowed]
        if undefined:
            raise EvalError(f"protocol {proto.name} defines no {undefined[0]} ({proto.papers}); it defines {', '.join(allowed)}")
        for name, kind in (("fid", "torchvision"), ("fid_tf", "tf")):
            if name in asked:
                reference_folder(dataset, proto, kind, weights, seed)  # fail now, not after the other metrics
        return list(dict.fromkeys(asked)), notes
    wanted = list(proto.default_metrics(market))
    if "fid" in wanted:
        try:
            reference_folder(dataset, proto, "tf", weights, seed)
            wanted.append("fid_tf")
        except (EvalError, FileNotFoundError) as e:
            notes.append(f"fid_tf (standard TF-Inception FID) skipped: {e}")
    return wanted, notes


def reference_folder(dataset: Dataset, proto: Protocol, kind: str, weights: str, seed: int) -> str:
    from posedata.extractors.fid_ref import FidReferenceExtractor

    preset = proto.name if kind == "torchvision" else f"{proto.name}-tf"
    extractor = FidReferenceExtractor(weights=weights, resolution=dataset.resolution, seed=seed, preset=preset)
    folder = extractor.folder
    if folder not in dataset.card["features"]:
        have = sorted(f for f, c in dataset.card["features"].items() if c["name"] == "fid_ref")
        raise EvalError(
            f"{dataset.location.url} has no FID reference for protocol {proto.name} with these weights (features/{folder}); "
            f"compute it once with `posedata extend {dataset.location.url} --features fid_ref:{preset} --weights {weights}`"
            + (f" (it has {', '.join(have)})" if have else "")
        )
    return folder


def reference_features(dataset: Dataset, proto: Protocol, kind: str, weights: str, seed: int, split: str) -> tuple[np.ndarray, str]:
    folder = reference_folder(dataset, proto, kind, weights, seed)
    features = [s["fid_ref.pool"] for s in dataset.samples(split, [folder])]
    return (np.stack(features) if features else np.zeros((0, 2048), np.float32)), folder


def stored_samples(dataset: Dataset, keys: set[str], need_pose: bool) -> dict[str, dict[str, Any]]:
    """The dataset's samples (stored image, split, and the pose for masks) of `keys`, read
    shard by shard; a key the dataset lacks is an error naming it."""
    manifest = dataset.manifest.filter(pc.is_in(dataset.manifest["key"], value_set=pa.array(sorted(keys))))
    found = dict(zip(manifest["key"].to_pylist(), manifest["shard"].to_pylist()))
    missing = sorted(keys - set(found))
    if missing:
        raise EvalError(f"{len(missing)} key(s) of {SAMPLES_TABLE} are not in {dataset.location.url} (e.g. {missing[0]!r}): are these samples of another dataset?")
    columns = [dataset.column(POSE)] if need_pose else []
    out = {}
    for shard in sorted(set(found.values())):
        for s in dataset.read_shard(shard, columns, pixels=True):
            if s["__key__"] in keys:
                out[s["__key__"]] = s
    return out


def target_mask(sample: dict[str, Any], size: tuple[int, int]) -> np.ndarray:
    """The body mask of a target at the truth file's size (keypoints scaled from the stored frame)."""
    keypoints = np.array(sample.get("keypoints_annotated.keypoints", sample.get("openpose.keypoints")), np.float64)
    h, w = sample["image"].shape[:2]
    keypoints[:, 0] *= size[1] / w
    keypoints[:, 1] *= size[0] / h
    return body_mask(keypoints, size)


def progress(items: list, what: str):
    from tqdm import tqdm

    return tqdm(items, desc=what, unit="pair", file=sys.stderr, leave=False)


def finite(value: Any) -> Any:
    """JSON has no NaN: a number that is not finite is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_table(report: dict[str, Any]) -> str:
    arrows = {True: "higher is better", False: "lower is better"}
    lines = [f"protocol {report['protocol']}, {report['n_pairs']} pairs ({report['settings']['weights']} weights)"]
    width = max(len(m) for m in report["metrics"]) if report["metrics"] else 6
    for name, value in report["metrics"].items():
        shown = "n/a" if value is None else f"{value:.4f}"
        lines.append(f"  {name:<{width}}  {shown:>10}   {arrows[HIGHER_IS_BETTER[name]]}")
    for key, n in report["counted"].items():
        lines.append(f"  ({key}: {n} counted)")
    lines.extend(f"  note: {n}" for n in report["notes"])
    return "\n".join(lines)
