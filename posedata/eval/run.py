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
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
CHUNK = 32  # pairs measured together (LPIPS and Inception batches)
FID_KINDS = {"fid": "torchvision", "fid_tf": "tf"}
INCEPTION_SCORES = ("is", "mask_is")  # from the TF Inception's class logits of the generated images
WEIGHT_ROLES = {"lpips": "alexnet", "mask_lpips": "alexnet", "fid": "inception", "fid_tf": "tf_inception", "is": "tf_inception", "mask_is": "tf_inception"}
HIGHER_IS_BETTER = {"ssim": True, "psnr": True, "mask_ssim": True, "lpips": False, "mask_lpips": False, "fid": False, "fid_tf": False, "is": True, "mask_is": True}


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
    located = locate(dataset, {k for p in pairs for k in (p["source_key"], p["target_key"])})
    wrong_split = [p["target_key"] for p in pairs if located[p["target_key"]][1] != split]
    if wrong_split:
        raise EvalError(f"{len(wrong_split)} target(s) are not in split {split!r} of {dataset.location.url} (e.g. {wrong_split[0]!r} is in {located[wrong_split[0]][1]!r}); pass --split")
    references = {name: reference_features(dataset, proto, kind, weights, seed, reference_split) for name, kind in FID_KINDS.items() if name in wanted}

    echo(f"posedata eval {samples_dir}: {len(pairs)} pairs, protocol {proto.name} ({', '.join(wanted)}; weights: {weights})")
    measure = PairMeasures(proto, wanted, weights, seed, device)
    per_pair: list[dict[str, Any]] = [dict(p) for p in pairs]
    features = {name: [None] * len(pairs) for name in references}
    logits = {name: [None] * len(pairs) for name in INCEPTION_SCORES if name in wanted}
    by_shard: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        by_shard.setdefault(located[p["target_key"]][0], []).append(i)
    columns = [dataset.column(POSE)] if measure.masked else []
    from tqdm import tqdm

    with tqdm(total=len(pairs), desc="eval", unit="pair", file=sys.stderr, leave=False) as bar:
        # Shard by shard, a chunk of pairs at a time: a full test set never sits in memory.
        for shard in sorted(by_shard):
            wanted_keys = {pairs[i]["target_key"] for i in by_shard[shard]}
            targets = stored_samples(dataset, wanted_keys, located, columns)
            for at in range(0, len(by_shard[shard]), CHUNK):
                chunk = by_shard[shard][at : at + CHUNK]
                files = [measure.files(targets[pairs[i]["target_key"]], samples_dir_path / pairs[i]["file"]) for i in chunk]
                masks = measure.masks(files, [targets[pairs[i]["target_key"]] for i in chunk])
                for i, values in zip(chunk, measure.per_pair(files, masks)):
                    per_pair[i].update(values)
                for name, rows in measure.fid_features(files, list(references)).items():
                    for i, row in zip(chunk, rows):
                        features[name][i] = row
                for name, rows in measure.class_logits(files, masks, list(logits)).items():
                    for i, row in zip(chunk, rows):
                        logits[name][i] = row
                bar.update(len(chunk))

    results: dict[str, Any] = {}
    counted: dict[str, int] = {}
    for name in ("ssim", "mask_ssim", "psnr"):
        if name in wanted:
            results[name] = float(np.mean([r[name] for r in per_pair]))
    used = M.counted(len(pairs), proto.lpips_batch)
    for name in ("lpips", "mask_lpips"):
        if name in wanted:
            counted["lpips"] = used  # the pairs in sorted file order before the dropped last batch
            results[name] = float(np.mean([r[name] for r in per_pair[:used]])) if used else None
    for name, (reference, folder) in references.items():
        mine = np.stack(features[name])
        mine = mine[: M.counted(len(mine), proto.fid_batch)]
        reference = reference[: M.counted(len(reference), proto.fid_batch)]
        counted[f"{name}_generated"], counted[f"{name}_reference"] = len(mine), len(reference)
        if len(mine) < 2 or len(reference) < 2:
            results[name] = None
            notes.append(f"{name}: needs at least 2 images on each side (have {len(mine)} generated, {len(reference)} reference)")
        else:
            results[name] = M.frechet_distance(mine, reference)
        notes.append(f"{name}: reference features/{folder} (split {reference_split})")
    splits = proto.inception_splits
    for name, rows in logits.items():
        counted[name] = len(rows)  # every generated image, in sorted file order
        if len(rows) < splits:
            results[name] = None
            notes.append(f"{name}: needs at least {splits} images for its {splits} splits (have {len(rows)})")
        else:
            results[name], spread = M.inception_score(np.stack(rows), splits)
            notes.append(f"{name}: mean of {splits} splits, std {spread:.4f}")
    for name, value in results.items():
        if isinstance(value, float) and not math.isfinite(value):
            notes.append(f"{name} is {value} (a sample identical to its ground truth has infinite PSNR): written as null")

    report = {
        "protocol": proto.name,
        "n_pairs": len(pairs),
        "metrics": {m: finite(results.get(m)) for m in wanted},
        "counted": counted,
        "settings": {**proto.describe(), "weights": weights, "seed": seed, "split": split, "reference_split": reference_split},
        "dataset": dataset.location.url,
        "notes": notes,
        "per_pair": [{k: finite(v) for k, v in r.items()} for r in per_pair],
    }
    (samples_dir_path / METRICS_FILE).write_text(json.dumps(report, indent=2) + "\n")
    sheet = draw_sheet(dataset, measure, per_pair, samples_dir_path, sheet_pairs, located)
    echo(format_table(report))
    echo(f"wrote {samples_dir_path / METRICS_FILE} and {sheet} in {time.time() - started:.1f} s")
    return report


class PairMeasures:
    """The per-pair work of one evaluation: the protocol's files for a pair, then SSIM,
    PSNR, LPIPS (batched), the FID features and the Inception Score logits of the generated
    images, with the networks built once."""

    def __init__(self, proto: Protocol, wanted: list[str], weights: str, seed: int, device: str):
        self.proto, self.wanted = proto, wanted
        self.masked = any(m.startswith("mask_") for m in wanted)
        self.lpips = lpips_network(weights, seed, device) if {"lpips", "mask_lpips"} & set(wanted) else None
        self.fid = {name: FidNetwork(kind, weights, seed).to(device) for name, kind in FID_KINDS.items() if name in wanted}
        self.tf_inception = None  # the Inception Score's network: fid_tf's when both are wanted
        if set(INCEPTION_SCORES) & set(wanted):
            self.tf_inception = self.fid.get("fid_tf") or FidNetwork("tf", weights, seed).to(device)

    def files(self, target: dict[str, Any], generated_path: Path) -> tuple[np.ndarray, np.ndarray]:
        """(generated, truth) as the protocol's script read them."""
        truth = self.proto.truth_file(target["image"])
        return self.proto.generated_file(read_generated(generated_path), truth.shape[:2]), truth

    def masks(self, files: list[tuple[np.ndarray, np.ndarray]], targets: list[dict[str, Any]]) -> list[np.ndarray] | None:
        """The target's body mask for each pair (one for mask-SSIM, mask-LPIPS and mask-IS)."""
        return [target_mask(t, truth.shape[:2]) for t, (_, truth) in zip(targets, files)] if self.masked else None

    def per_pair(self, files: list[tuple[np.ndarray, np.ndarray]], masks: list[np.ndarray] | None) -> list[dict[str, float]]:
        p, out = self.proto, [{} for _ in files]
        for i, (g, t) in enumerate(files):
            if "ssim" in self.wanted:
                out[i]["ssim"] = M.ssim(*p.ssim_inputs(g, t), sigma=p.ssim_sigma)
            if "mask_ssim" in self.wanted:
                out[i]["mask_ssim"] = M.ssim(*p.ssim_inputs(p.masked(g, masks[i]), p.masked(t, masks[i])), sigma=p.ssim_sigma)
            if "psnr" in self.wanted:
                out[i]["psnr"] = M.psnr(*p.psnr_inputs(g, t))
        if self.lpips is not None:
            inputs = [p.lpips_inputs(g, t) for g, t in files]
            if "lpips" in self.wanted:
                for row, d in zip(out, M.lpips_distances(self.lpips, [a for a, _ in inputs], [b for _, b in inputs])):
                    row["lpips"] = float(d)
            if "mask_lpips" in self.wanted:  # GFLA masks the [-1, 1] images
                masked = [(p.masked(a, m), p.masked(b, m)) for (a, b), m in zip(inputs, masks)]
                for row, d in zip(out, M.lpips_distances(self.lpips, [a for a, _ in masked], [b for _, b in masked])):
                    row["mask_lpips"] = float(d)
        return out

    def fid_features(self, files: list[tuple[np.ndarray, np.ndarray]], names: list[str]) -> dict[str, np.ndarray]:
        inputs = [self.proto.fid_input(g) for g, _ in files] if names else []
        return {name: self.fid[name].features(inputs) for name in names}

    def class_logits(self, files: list[tuple[np.ndarray, np.ndarray]], masks: list[np.ndarray] | None, names: list[str]) -> dict[str, np.ndarray]:
        """The TF Inception's 1008 class logits of each generated file (`is`) and of it
        masked by the target's body (`mask_is`, PATN multiplies the uint8 file by the mask)."""
        out = {}
        for name in names:
            generated = [g if name == "is" else self.proto.masked(g, m) for (g, _), m in zip(files, masks or [None] * len(files))]
            pool = self.tf_inception.features([self.proto.inception_score_input(g) for g in generated])
            out[name] = self.tf_inception.class_logits(pool)
        return out


def draw_sheet(dataset: Dataset, measure: PairMeasures, per_pair: list[dict[str, Any]], samples_dir: Path, count: int, located) -> Path:
    """The best and worst pairs by LPIPS (else SSIM, ...), re-read for the sheet only."""
    from posedata.eval.sheet import best_and_worst_sheet, chosen_pairs

    rank_by = next((m for m in ("lpips", "ssim", "mask_lpips", "mask_ssim", "psnr") if m in measure.wanted), None)
    lower_is_better = not HIGHER_IS_BETTER.get(rank_by, False)
    sections = chosen_pairs(per_pair, rank_by, lower_is_better, count)
    shown = sorted({i for _, indices in sections for i in indices})
    stored = stored_samples(dataset, {k for i in shown for k in (per_pair[i]["source_key"], per_pair[i]["target_key"])}, located)
    files = {i: measure.files(stored[per_pair[i]["target_key"]], samples_dir / per_pair[i]["file"]) for i in shown}
    rows = {i: (stored[per_pair[i]["source_key"]]["image"], *files[i]) for i in shown}
    title = f"{measure.proto.name}: " + (f"best and worst pairs by {rank_by}" if rank_by else "pairs")
    return best_and_worst_sheet(sections, per_pair, rows, samples_dir / SHEET_FILE, title)


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


def locate(dataset: Dataset, keys: set[str]) -> dict[str, tuple[str, str]]:
    """key -> (shard, split) from the manifest; a key the dataset lacks is an error naming it."""
    manifest = dataset.manifest.filter(pc.is_in(dataset.manifest["key"], value_set=pa.array(sorted(keys))))
    found = {k: (shard, split) for k, shard, split in zip(manifest["key"].to_pylist(), manifest["shard"].to_pylist(), manifest["split"].to_pylist())}
    missing = sorted(keys - set(found))
    if missing:
        raise EvalError(f"{len(missing)} key(s) of {SAMPLES_TABLE} are not in {dataset.location.url} (e.g. {missing[0]!r}): are these samples of another dataset?")
    return found


def stored_samples(dataset: Dataset, keys: set[str], located: dict[str, tuple[str, str]], columns: list | None = None) -> dict[str, dict[str, Any]]:
    """The dataset's samples (stored image, and `columns`) of `keys`, read shard by shard."""
    out = {}
    for shard in sorted({located[k][0] for k in keys}):
        for s in dataset.read_shard(shard, columns or [], pixels=True):
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
