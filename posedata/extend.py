"""`posedata extend URL --features dinov2,parsing`: add feature sidecars to a finished dataset.

How teams share one bucket: the base shards are built once, and whoever needs a feature adds
it. Extending writes only new objects — `features/<name>@<fp>/...` sidecars, their done
markers under `_done/features/`, and `meta/features/<name>@<fp>/` (feature.json, null
embeddings, wids indexes) — and then records the feature in `dataset.json` and the dataset
card `README.md` (posedata.interop). No existing object is rewritten except those two.

Two teams extending at once: each writes its `feature.json` first, then merges every
`feature.json` it can list into `dataset.json`, writes it, and re-reads both until the card
holds everything listed. Whoever writes last has listed after the other's `feature.json`
existed, so the last writer cannot drop the other's feature (object stores list
consistently after a completed write: S3 and GCS are strongly consistent).
"""

from __future__ import annotations

import collections
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from posedata.errors import PosedataError
from posedata.extractors import (
    create_extractor,
    dependency_order,
    extractor_class,
    extractor_options,
    parse_spec,
    provider,
)
from posedata.extractors.base import Extractor
from posedata.interop import write_hub_card, write_wids_indexes
from posedata.layout import CARD, FEATURE_CARD, META, DatasetLocation
from posedata.pipeline import Job, StageSpec, feature_column, output_suffixes, run_locally, run_with_ray
from posedata.reader import Dataset, find_feature
from posedata.storage import card_members

__all__ = ["FEATURE_CARD", "ExtendConfig", "ExtendError", "extend", "feature_done_marker", "record_features"]


class ExtendError(PosedataError, RuntimeError):
    """Extending cannot proceed (unknown dependency, an image an extractor rejects)."""


@dataclass
class ExtendConfig:
    url: str
    features: list[str]
    weights: str = "pretrained"
    models: dict[str, str] = field(default_factory=dict)
    dtype: str | None = None  # None: the dtype the dataset was built with
    storage_options: dict[str, Any] = field(default_factory=dict)
    executor: str = "ray"
    address: str | None = None
    workers: int | None = None
    batch_sizes: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    flip: bool = False  # vae: also store the horizontally flipped image's latents


def feature_done_marker(location: DatasetLocation, folder: str, shard: str) -> str:
    return location.path("_done", "features", folder, f"{shard}.json")


def extend(config: ExtendConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    from posedata.build import check_feature_options  # build imports this module

    started = time.time()
    check_feature_options(list(config.features), config.batch_sizes, config.models)
    dataset = Dataset(config.url, config.storage_options)
    location, card = dataset.location, dataset.card
    dtype = config.dtype or card["build"]["dtype"]

    # Plan the extractors; dependencies come from this run or from the dataset.
    specs = dependency_order(list(config.features))
    extractors: dict[str, Extractor] = {}
    kwargs_by_spec: dict[str, dict[str, Any]] = {}
    dependencies: dict[str, dict[str, tuple[str, list[str]]]] = {}
    for spec in specs:
        name, _ = parse_spec(spec)
        if not extractor_class(name).uses_model:
            raise ExtendError(f"{name!r} comes from the source's annotations, not a model: it can only be made by `posedata build`")
        kwargs: dict[str, Any] = dict(weights=config.weights, resolution=tuple(card["resolution"]), dtype=dtype, seed=config.seed)
        model = config.models.get(spec) or config.models.get(name)
        if model:
            kwargs["model"] = model
        kwargs.update(extractor_options(name, config))
        deps = {}
        for dep in extractor_class(name).requires:
            source = provider(dep, specs)
            if source in extractors:
                deps[dep] = (extractors[source].folder, output_suffixes(extractors[source]))
            else:
                found = find_feature(card, dep)
                if not found:
                    raise ExtendError(f"{spec} needs {dep!r}, which {location.url} does not have: add it to --features")
                deps[dep] = (found[0], card_members(found[1]["outputs"]))
        kwargs_by_spec[spec], dependencies[spec] = kwargs, deps
        extractors[spec] = create_extractor(spec, upstream={d: f for d, (f, _) in deps.items()}, **kwargs)

    new = {spec: e for spec, e in extractors.items() if e.folder not in card["features"]}
    for spec, e in extractors.items():
        if spec not in new:
            echo(f"{spec}: already there as features/{e.folder} (same fingerprint): nothing to do")
    if not new:
        return {"added": [], "seconds": time.time() - started, "out": location.url}

    shards = [s for split in card["splits"] for s in dataset.shards(split)]
    todo = [s for s in shards if not all(location.exists(feature_done_marker(location, e.folder, s)) for e in new.values())]
    echo(
        f"posedata extend {location.url}: {', '.join(new)} over {len(shards)} shards"
        + (f" ({len(shards) - len(todo)} already done)" if len(todo) < len(shards) else "")
        + f" (weights: {config.weights}, dtype: {dtype})"
    )
    if todo:
        manifest = dataset.manifest.filter(pc.is_in(dataset.manifest["shard"], value_set=pa.array(todo)))
        rows = [
            {
                "key": r["key"], "split": r["split"], "group": r["group"], "shard": r["shard"], "index": r["index"],
                "path": r["source_path"], "original_width": r["original_width"], "original_height": r["original_height"],
            }
            for r in manifest.to_pylist()
        ]
        largest = max(collections.Counter(r["shard"] for r in rows).values())
        job = Job(
            inputs=rows,
            prepare=functools.partial(read_stored_rows, location, dependencies=_all_dataset_dependencies(dependencies, new)),
            stages=[StageSpec(spec, kwargs_by_spec[spec], dependencies[spec], config.batch_sizes.get(spec) or config.batch_sizes.get(parse_spec(spec)[0])) for spec in new],
            write=functools.partial(write_extension, location, outputs={e.folder: output_suffixes(e) for e in new.values()}, specs={e.folder: spec for spec, e in new.items()}),
            location=location,
            micro_batch=largest,  # one group per shard: the base shard is read once
            workers=config.workers,
            address=config.address,
        )
        (run_with_ray if config.executor == "ray" else run_locally)(job, echo)

    notes = _collect_notes(location, new, shards)
    write_wids_indexes(location, card, collections.Counter(dataset.manifest["shard"].to_pylist()), [e.folder for e in new.values()])
    for spec, e in new.items():
        location.write_json(location.feature_card(e.folder), {**e.card(), "spec": spec, "notes": notes.get(spec, {})})
    record_features(location)
    elapsed = time.time() - started
    echo(f"added {', '.join(f'{s} -> features/{e.folder}' for s, e in new.items())} in {elapsed:.1f} s")
    return {"added": [e.folder for e in new.values()], "seconds": elapsed, "out": location.url}


def _all_dataset_dependencies(dependencies, new) -> dict[str, tuple[str, list[str]]]:
    """Dependency folders read from the dataset (not computed in this run), by folder."""
    computed = {e.folder for e in new.values()}
    return {folder: (folder, suffixes) for deps in dependencies.values() for folder, suffixes in deps.values() if folder not in computed}


def read_stored_rows(location: DatasetLocation, rows: list[dict[str, Any]], dependencies: dict[str, tuple[str, list[str]]]) -> list[dict[str, Any]]:
    """The rows of one shard with the stored image (`jpg`) and the dataset's copies of the
    features the new extractors read, as the build's rows carry them."""
    from posedata.reader import _tar_samples

    shard = rows[0]["shard"]
    wanted = {r["key"] for r in rows}
    images = {s["__key__"]: s["jpg"] for s in _tar_samples(location, location.base_shard(shard)) if s["__key__"] in wanted}
    stored = {}
    for folder, suffixes in dependencies.values():
        for s in _tar_samples(location, location.sidecar(folder, shard)):
            if s["__key__"] in wanted:
                stored.setdefault(s["__key__"], {}).update({feature_column(folder, x): s[x] for x in suffixes})
    out = []
    for row in rows:
        if row["key"] not in images:
            raise ExtendError(f"{location.url_of(location.base_shard(shard))}: no image for {row['key']!r} (the manifest lists it)")
        out.append(dict(row, jpg=images[row["key"]], annotations="", status="ok", stage="", reason="", notes="", **stored.get(row["key"], {})))
    return out


def write_extension(location: DatasetLocation, rows: list[dict[str, Any]], outputs: dict[str, list[str]], specs: dict[str, str]) -> dict[str, Any]:
    """One shard's new sidecars, then their done markers (which carry the per-sample notes)."""
    from posedata.shards import tar_bytes

    rows = sorted(rows, key=lambda r: int(r["index"]))
    shard = rows[0]["shard"]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        # The image is in the dataset already; dropping it would misalign every sidecar.
        raise ExtendError(f"shard {shard}: {failed[0]['key']}: {failed[0]['reason']} ({len(failed)} such samples): nothing written for this shard")
    for folder, suffixes in outputs.items():
        samples = [{"__key__": r["key"], **{s: r[feature_column(folder, s)] for s in suffixes}} for r in rows]
        location.write_bytes(location.sidecar(folder, shard), tar_bytes(samples))
    for folder in outputs:
        notes = [json.loads(r["notes"]).get(specs[folder], []) if r.get("notes") else [] for r in rows]
        location.write_json(feature_done_marker(location, folder, shard), {"shard": shard, "samples": len(rows), "notes": dict(collections.Counter(n for ns in notes for n in ns))})
    return {"shard": shard, "written": len(rows)}


def _collect_notes(location: DatasetLocation, new: dict[str, Extractor], shards: list[str]) -> dict[str, dict[str, int]]:
    out = {}
    for spec, e in new.items():
        counts: collections.Counter = collections.Counter()
        for shard in shards:
            counts.update(location.read_json(feature_done_marker(location, e.folder, shard)).get("notes", {}))
        out[spec] = dict(sorted(counts.items()))
    return out


def record_features(location: DatasetLocation, attempts: int = 20) -> dict[str, Any]:
    """Merge every `meta/features/*/feature.json` (and format 1's `features/*/feature.json`)
    into dataset.json until a re-read shows the card holds them all (see the module docstring
    for why this is safe to run concurrently); then write the dataset card README.md."""
    for _ in range(attempts):
        card = location.read_json(location.path(CARD))
        listed = {p.rsplit("/", 2)[-2]: p for p in location.glob(f"features/*/{FEATURE_CARD}") + location.glob(f"{META}/features/*/{FEATURE_CARD}")}
        missing = {folder: location.read_json(path) for folder, path in listed.items() if folder not in card["features"]}
        if not missing:
            write_hub_card(location, card)
            return card
        card["features"] = dict(sorted({**card["features"], **missing}.items()))
        location.write_json(location.path(CARD), card)
    raise ExtendError(f"{location.url}: dataset.json kept changing under us; run `posedata extend` again to record the features")

