"""`posedata build`: source -> records -> Ray Data (decode/resize tasks -> one actor pool per
extractor -> shard writers) -> manifest, pairs, rejects and the dataset card.

The steps (decode, extract, write a shard) are plain functions over lists of row dicts,
handed as a `pipeline.Job` to one of two executors: Ray Data (the default; an embedded local
Ray, or `--address` for a cluster) or a sequential in-process one (`--executor local`).

A build is a set of shard tasks (docs/design.md §6): a shard whose done marker exists is
skipped, so rerunning the same command after a crash finishes the job.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

import posedata
from posedata.errors import PosedataError
from posedata.extend import record_features
from posedata.extractors import (
    DEFAULT_FEATURES,
    create_extractor,
    dependency_order,
    extractor_class,
    extractor_options,
    parse_spec,
    provider,
)
from posedata.extractors.base import Extractor
from posedata.images import ImageRejected, NotRegularFile, read_source_bytes, store_image
from posedata.interop import write_wids_indexes
from posedata.layout import (
    CARD,
    DONE,
    FORMAT_VERSION,
    MANIFEST,
    META,
    REJECTS,
    DatasetLocation,
    relative_source_path,
    without_root,
    without_root_in,
)
from posedata.pipeline import Job, StageSpec, output_suffixes, run_locally, run_with_ray
from posedata.plan import ShardTask, plan_shards
from posedata.records import STAGE_DECODE, SourceScan
from posedata.shards import (
    MANIFEST_SCHEMA,
    PAIRS_SCHEMA,
    REJECTS_SCHEMA,
    duplicates_across_splits,
    duplicates_text,
    write_shard,
)
from posedata.sources.common import OWN_OUTPUT_REASON, is_inside, not_reading

log = logging.getLogger("posedata.build")

CARD_FORMAT_VERSION = FORMAT_VERSION

# What a build writes at the top of its --out: the only entries `--overwrite` removes.
# (not README.md: the dataset card is rewritten by the build unless the user took it over)
OWN_ENTRIES = (CARD, MANIFEST, REJECTS, "pairs", "shards", "features", META, DONE)


class BuildError(PosedataError):
    """The build cannot start or cannot finish (the output is unsafe, the input changed since
    the first run, nothing could be written); the message says why and what to do."""


@dataclass
class BuildConfig:
    source: str
    root: str
    out: str
    resolution: tuple[int, int] | None = None  # (H, W); None = the source's default
    features: list[str] | None = None  # None = DEFAULT_FEATURES
    weights: str = "pretrained"
    models: dict[str, str] = field(default_factory=dict)  # feature -> hub id / local dir
    dtype: str = "fp16"
    shard_size: int = 1000
    source_options: dict[str, Any] = field(default_factory=dict)
    storage_options: dict[str, Any] = field(default_factory=dict)
    executor: str = "ray"  # "ray" | "local"
    address: str | None = None  # Ray cluster address; None = embedded local Ray
    workers: int | None = None  # actors per extractor on CPU (GPUs: one per GPU share)
    batch_sizes: dict[str, int] = field(default_factory=dict)
    overwrite: bool = False
    seed: int = 0
    flip: bool = False  # vae: also store the horizontally flipped image's latents


# ---- the steps ------------------------------------------------------------------------------


def decode_rows(rows: list[dict[str, Any]], height: int, width: int) -> list[dict[str, Any]]:
    """Read, decode and resize each input; a bad file becomes a rejected row, never a crash:
    whatever goes wrong between opening the file and the stored JPEG rejects that file alone,
    with the exception's text in the reason."""
    out = []
    for row in rows:
        row = dict(row, status="ok", stage="", reason="", notes="", jpg=b"", meta=b"", sha256="", original_width=0, original_height=0)
        try:
            data = read_source_bytes(row["path"])
        except NotRegularFile as e:
            out.append(dict(row, status="rejected", stage=STAGE_DECODE, reason=str(e)))
            continue
        except OSError as e:
            out.append(dict(row, status="rejected", stage=STAGE_DECODE, reason=f"cannot read file: {e.__class__.__name__}: {e.strerror or e}"))
            continue
        row["sha256"] = hashlib.sha256(data).hexdigest()
        try:
            stored = store_image(data, height, width)
        except ImageRejected as e:
            out.append(dict(row, status="rejected", stage=STAGE_DECODE, reason=str(e)))
            continue
        row["original_width"], row["original_height"] = stored.original_size
        row["jpg"] = stored.jpg
        meta = {
            "key": row["key"],
            "split": row["split"],
            "group": row["group"],
            "source_path": row.get("source_path") or row["path"],
            "original_size": [row["original_height"], row["original_width"]],
        }
        if stored.colour:
            meta["colour"] = stored.colour
        row["meta"] = json.dumps(meta, sort_keys=True).encode()
        out.append(row)
    return out


def write_rows(location: DatasetLocation, rows: list[dict[str, Any]], feature_outputs: dict[str, list[str]]) -> dict[str, Any]:
    rows = sorted(rows, key=lambda r: int(r["index"]))
    shard = rows[0]["shard"]
    counts = write_shard(location, shard, rows, feature_outputs)
    return {"shard": shard, **counts}


# ---- the build ------------------------------------------------------------------------------


@dataclass
class BuildPlan:
    config: BuildConfig
    scan: SourceScan
    resolution: tuple[int, int]
    tasks: list[ShardTask]
    features: list[str]
    extractor_kwargs: dict[str, dict[str, Any]]
    extractors: dict[str, Extractor]  # not set up: for fingerprints and the card only

    @property
    def feature_outputs(self) -> dict[str, list[str]]:
        return {e.folder: output_suffixes(e) for e in self.extractors.values()}

    def settings(self) -> dict[str, Any]:
        """What must match for a rerun to resume rather than start over."""
        return {
            "source": self.config.source,
            "root": self.config.root,  # as given (compared as an absolute path: comparable_settings)
            "source_options": self.config.source_options,
            "resolution": list(self.resolution),
            "shard_size": self.config.shard_size,
            "features": {spec: e.folder for spec, e in self.extractors.items()},
        }


def make_plan(config: BuildConfig) -> BuildPlan:
    from posedata.sources import source_class

    source_cls = source_class(config.source)
    with not_reading(*local_output(config)):
        scan = source_cls(config.root, **config.source_options).scan()
    resolution = tuple(config.resolution or source_cls.default_resolution)
    specs = list(config.features or DEFAULT_FEATURES)
    if scan.has_keypoint_annotations and "keypoints_annotated" not in specs:
        specs.append("keypoints_annotated")
    specs = dependency_order(specs)
    kwargs_by_spec = {}
    extractors: dict[str, Extractor] = {}
    for spec in specs:
        name, _ = parse_spec(spec)
        kwargs: dict[str, Any] = dict(weights=config.weights, resolution=resolution, dtype=config.dtype, seed=config.seed)
        model = config.models.get(spec) or config.models.get(name)
        if model:
            kwargs["model"] = model
        kwargs.update(extractor_options(name, config))
        if name == "keypoints_annotated":
            keypoint_files = scan.info.get("keypoints", {}).get("from", [])
            kwargs["annotation_source"] = json.dumps({f: scan.info.get("files", {}).get(f, {}).get("sha256") for f in keypoint_files}, sort_keys=True)
        if not extractor_class(name).uses_model:
            kwargs.pop("weights")
        kwargs_by_spec[spec] = kwargs
        extractors[spec] = create_extractor(spec, upstream=upstream_folders(spec, extractors), **kwargs)
    return BuildPlan(config, scan, resolution, plan_shards(scan.records, config.shard_size), specs, kwargs_by_spec, extractors)


def local_output(config: BuildConfig) -> list[str]:
    """--out as a local folder path, or nothing for a bucket URL (no symlink reaches one)."""
    try:
        location = DatasetLocation(config.out, config.storage_options)
    except ValueError:
        return []
    return [location.root] if location.is_local else []


def upstream_folders(spec: str, extractors: dict[str, Extractor]) -> dict[str, str]:
    """Folders of the features `spec` requires, taken from the extractors already planned."""
    specs = list(extractors)
    return {dep: extractors[provider(dep, specs)].folder for dep in extractor_class(spec).requires}


def task_rows(plan: BuildPlan, task: ShardTask) -> list[dict[str, Any]]:
    return [
        {
            "key": r.key,
            "split": r.split,
            "group": r.group,
            "path": r.path,
            "source_path": relative_source_path(r.path, plan.config.root),
            "annotations": json.dumps(r.annotations, sort_keys=True) if r.annotations else "",
            "shard": task.name,
            "index": i,
        }
        for i, r in enumerate(task.records)
    ]


def make_job(plan: BuildPlan, location: DatasetLocation, todo: list[ShardTask]) -> Job:
    height, width = plan.resolution
    stages = []
    for spec in plan.features:
        providers = {dep: plan.extractors[provider(dep, plan.features)] for dep in plan.extractors[spec].requires}
        dependencies = {dep: (e.folder, output_suffixes(e)) for dep, e in providers.items()}
        batch_size = plan.config.batch_sizes.get(spec) or plan.config.batch_sizes.get(parse_spec(spec)[0])
        stages.append(StageSpec(spec, plan.extractor_kwargs[spec], dependencies, batch_size))
    return Job(
        inputs=[row for task in todo for row in task_rows(plan, task)],
        prepare=functools.partial(decode_rows, height=height, width=width),
        stages=stages,
        write=functools.partial(write_rows, location, feature_outputs=plan.feature_outputs),
        location=location,
        workers=plan.config.workers,
        address=plan.config.address,
    )


def check_options(config: BuildConfig) -> None:
    """Every option that can be checked before the source is read: wrong values are one
    error naming the option, never a default used in silence or a traceback later."""
    if config.shard_size < 1:
        raise BuildError(f"--shard-size must be at least 1, not {config.shard_size}")
    if config.workers is not None and config.workers < 1:
        raise BuildError(f"--workers must be at least 1, not {config.workers}")
    check_feature_options(list(config.features or DEFAULT_FEATURES), config.batch_sizes, config.models, also=("keypoints_annotated",))


def check_feature_options(features: list[str], batch_sizes: dict[str, Any], models: dict[str, str], also: tuple[str, ...] = ()) -> None:
    """`--features` names known features and presets; `--batch-size` and `--model` name
    features of this run (or `also`, features a run may add itself), batch sizes whole
    numbers >= 1 (build and extend, before anything is read)."""
    try:
        specs = dependency_order(list(features))
        for spec in specs:
            name, preset = parse_spec(spec)
            presets = getattr(extractor_class(name), "PRESETS", None)
            if preset is not None and (not presets or preset not in presets):
                raise KeyError(f"feature {name!r} has no preset {preset!r}" + (f"; choose one of {', '.join(f'{name}:{p}' for p in presets)}" if presets else ""))
    except (KeyError, ValueError) as e:
        raise BuildError(f"--features: {str(e).strip(chr(39) + chr(34))}") from None
    known = set(specs) | {parse_spec(s)[0] for s in specs} | set(also)
    for option, values in (("--batch-size", batch_sizes), ("--model", models)):
        for feature, value in values.items():
            if feature not in known:
                raise BuildError(f"{option} {feature}={value}: {feature!r} is not a feature of this run (features: {', '.join(specs)})")
            if option == "--batch-size" and (not isinstance(value, int) or value < 1):
                raise BuildError(f"--batch-size {feature}={value}: the batch size must be a whole number of at least 1")


def build(config: BuildConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    started = time.time()
    check_options(config)
    location = check_output(config)  # before anything is read or written
    plan = make_plan(config)
    n_inputs = len(plan.scan.records) + len(plan.scan.rejects)
    echo(
        f"posedata build {config.source}: {len(plan.scan.records)} images found, {len(plan.scan.rejects)} rejected while scanning; "
        f"{len(plan.tasks)} shards at {plan.resolution[0]}x{plan.resolution[1]}; features: {', '.join(plan.features)} (weights: {config.weights})"
    )
    if not plan.scan.records:
        echo(format_reasons(collections.Counter(f"{r.stage}: {_reason_kind(r.reason)}" for r in plan.scan.rejects)))
        raise BuildError(f"{config.root}: nothing to build: all {n_inputs} inputs were rejected while scanning (reasons above); nothing was written")

    _prepare_output(location, plan, echo)
    todo = [t for t in plan.tasks if not location.exists(location.done_marker(t.name))]
    if len(todo) < len(plan.tasks):
        echo(f"resuming: {len(plan.tasks) - len(todo)} of {len(plan.tasks)} shards already done")
    if todo:
        runner = run_with_ray if config.executor == "ray" else run_locally
        runner(make_job(plan, location, todo), echo)
    summary = finalize(plan, location, started, echo)
    echo(format_summary(summary))
    return summary


def check_output(config: BuildConfig) -> DatasetLocation:
    """The output location, once it is known to be safe to write to, before anything is read
    or written: never the source folder, a folder inside it or one that holds it (an
    `--overwrite` would delete the photos, and a build would read its own output); never a
    URL that fsspec would chain (`name::v1` writes to `name`); never a file, nor a folder
    holding anything posedata did not write. `--overwrite` then only removes a dataset's own
    entries (see OWN_ENTRIES)."""
    out = config.out
    if "::" in out:
        raise BuildError(
            f"--out {out!r}: '::' chains URLs in fsspec (this would write to {out.split('::')[0]!r}); choose an --out without '::'"
        )
    try:
        location = DatasetLocation(out, config.storage_options)
    except ValueError as e:
        raise BuildError(f"--storage-options: {e}") from None
    if location.is_local:
        out_path = os.path.realpath(location.root)
        root_path = os.path.realpath(os.path.expanduser(config.root))
        if is_inside(out_path, root_path) or is_inside(root_path, out_path):
            where = "is" if out_path == root_path else ("is inside" if is_inside(out_path, root_path) else "holds")
            raise BuildError(
                f"--out {out_path} {where} the source folder --root {root_path}: a dataset must live apart from its photos "
                "(a build would read its own output, and --overwrite would delete the photos); choose an --out outside --root"
            )
    if not location.exists(location.root):
        return location
    if location.fs.isfile(location.root):
        raise BuildError(f"--out {location.url} is a file, not a folder; choose a folder (it is created if missing)")
    if is_dataset(location):
        return location
    entries = sorted(location.fs.ls(location.root, detail=False))
    if entries:
        example = posixpath.basename(entries[0].rstrip("/"))
        raise BuildError(
            f"--out {location.url} is not empty ({len(entries)} entries, e.g. {example!r}) and is not a posedata dataset: "
            "posedata writes only into an empty or new folder, or into a dataset it made (--overwrite never deletes anything else); "
            "choose another --out"
        )
    return location


def is_dataset(location: DatasetLocation) -> bool:
    """A folder posedata wrote: it holds a dataset card or a build's `_done/` markers."""
    return location.exists(location.path(CARD)) or location.exists(location.path(DONE))


def remove_dataset(location: DatasetLocation) -> None:
    """`--overwrite`: remove what a build writes (OWN_ENTRIES and its temporaries), nothing
    else; check_output has made sure the folder is a dataset."""
    for name in OWN_ENTRIES:
        path = location.path(name)
        if location.exists(path):
            location.fs.rm(path, recursive=True)
    if location.is_local:
        for name in os.listdir(location.root):
            if name.startswith(".tmp-") and os.path.isfile(os.path.join(location.root, name)):
                os.remove(os.path.join(location.root, name))


def comparable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Build settings as a rerun compares them: JSON values, the source root absolute (the
    file keeps it as the user typed it; older builds wrote it absolute)."""
    settings = json.loads(json.dumps(settings))
    if isinstance(settings.get("root"), str):
        settings["root"] = os.path.abspath(os.path.expanduser(settings["root"]))
    return settings


INPUTS_LISTING = "inputs.parquet"  # in _done/: every input of the first run, to compare reruns with


def input_listing(plan: BuildPlan) -> pa.Table:
    """Every input of this scan (records and scan rejects): its path relative to --root, size
    and modification time; the schema's metadata holds a digest of the whole scan (keys,
    splits, groups, annotations, rejects, pairs) for changes in lists and CSVs."""
    root = os.path.abspath(os.path.expanduser(plan.config.root))
    rows = []
    # a link into --out leads to what the build itself writes: its time and size change
    own_output = {r.path for r in plan.scan.rejects if r.reason == OWN_OUTPUT_REASON}
    for path in sorted({r.path for r in plan.scan.records} | {r.path for r in plan.scan.rejects}):
        size = mtime = -1  # also for a list entry without its file, a broken link
        if path not in own_output:
            try:
                info = os.stat(path)
                size, mtime = info.st_size, info.st_mtime_ns
            except OSError:
                pass
        rows.append({"path": os.path.relpath(path, root) if os.path.isabs(path) else path, "size": size, "mtime_ns": mtime})
    scan = {
        "records": [[r.key, r.split, r.group, os.path.relpath(r.path, root), r.annotations] for r in plan.scan.records],
        "rejects": [[os.path.relpath(r.path, root) if os.path.isabs(r.path) else r.path, r.stage, r.reason.replace(root, "<root>"), r.key, r.split] for r in plan.scan.rejects],
        "pairs": {split: [list(p) for p in pairs] for split, pairs in sorted(plan.scan.pairs.items())},
    }
    digest = hashlib.sha256(json.dumps(scan, sort_keys=True, default=str).encode()).hexdigest()
    schema = pa.schema([("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64())], metadata={"scan_sha256": digest})
    return pa.Table.from_pylist(rows, schema=schema)


def check_inputs_unchanged(location: DatasetLocation, plan: BuildPlan) -> None:
    """A rerun resumes only over the inputs of the first run: files added, removed or
    changed since (or edited lists, pairs, annotations) would be lost or listed wrongly, so
    refuse, naming what changed."""
    path = location.path(DONE, INPUTS_LISTING)
    current = input_listing(plan)
    if not location.exists(path):  # a dataset from before posedata kept the listing
        location.write_parquet(path, current)
        return
    previous = location.read_parquet(path)

    def files(table: pa.Table) -> dict[str, tuple[int, int]]:
        return {p: (s, m) for p, s, m in zip(table["path"].to_pylist(), table["size"].to_pylist(), table["mtime_ns"].to_pylist())}

    before, now = files(previous), files(current)
    added = sorted(set(now) - set(before))
    removed = sorted(set(before) - set(now))
    changed = sorted(p for p in set(now) & set(before) if now[p] != before[p])
    parts = [f"{len(names)} {what} (e.g. {names[0]})" for names, what in ((added, "added"), (removed, "removed"), (changed, "changed: size or time")) if names]
    digest = (previous.schema.metadata or {}).get(b"scan_sha256", b"").decode()
    if not parts and digest == current.schema.metadata[b"scan_sha256"].decode():
        return
    what = "; ".join(parts) if parts else "the lists, pairs or annotations were edited"
    raise BuildError(
        f"{location.url}: the source folder {plan.config.root} changed since this dataset was built from it ({what}); "
        "a rerun would leave the dataset out of step with it. Use --overwrite to rebuild from the folder as it is now, or another --out"
    )


def _prepare_output(location: DatasetLocation, plan: BuildPlan, echo) -> None:
    settings_path = location.path("_done", "build.json")
    if plan.config.overwrite and location.exists(location.root):
        echo(f"--overwrite: removing the dataset at {location.url}")
        remove_dataset(location)
    if location.exists(settings_path):
        previous = location.read_json(settings_path)
        previous, current = comparable_settings(previous), comparable_settings(plan.settings())
        if previous != current:
            changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
            raise BuildError(
                f"{location.url} already holds a build with different settings ({', '.join(changed)} differ); "
                "use --overwrite to start over, or another --out (use `posedata extend` to add features)"
            )
        check_inputs_unchanged(location, plan)
    elif location.exists(location.path(CARD)):
        raise BuildError(f"{location.url} already holds a dataset; use --overwrite to start over or another --out")
    else:
        try:
            location.write_json(settings_path, plan.settings())
        except OSError as e:
            raise BuildError(f"--out {location.url}: cannot write there ({e.strerror or e}); choose a folder you can write to") from None
        location.write_parquet(location.path(DONE, INPUTS_LISTING), input_listing(plan))
    _remove_stale_temporaries(location, plan)
    # The scan rejects are part of the result; written once, up front.
    location.write_parquet(
        location.path("_done", "scan.parquet"),
        pa.Table.from_pylist(
            [
                {"source_path": relative_source_path(r.path, plan.config.root), "key": r.key, "split": r.split, "stage": r.stage, "reason": without_root(r.reason, plan.config.root)}
                for r in plan.scan.rejects
            ],
            schema=REJECTS_SCHEMA,
        ),
    )


# A temporary of dataset.json older than this is a leftover: a write renames its temporary
# within milliseconds.
STALE_ROOT_TEMPORARY_SECONDS = 60.0


def _remove_stale_temporaries(location: DatasetLocation, plan: BuildPlan) -> None:
    """Remove the `.tmp-*` files a killed build left behind (a write cut off before its
    rename; readers never open them), in the folders a build writes to: shards/, pairs/,
    _done/, _done/shards/, its own feature folders and the root. `posedata extend` writes
    only its own feature folders and, in the root, dataset.json: a temporary of dataset.json
    younger than a minute may be its write in progress and is left alone. Object stores have
    no temporaries: every object is one PUT."""
    if not location.is_local:
        return
    own = [location.path("shards"), location.path("pairs"), location.path("_done"), location.path("_done", "shards")]
    own += [location.feature_dir(e.folder) for e in plan.extractors.values()]
    own += [location.path(META, "shards")] + [location.feature_meta(e.folder) for e in plan.extractors.values()]
    now = time.time()
    for directory in [location.root, *own]:
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            path = os.path.join(directory, name)
            if not name.startswith(".tmp-") or not os.path.isfile(path):
                continue
            try:
                if directory == location.root and name.endswith(CARD) and now - os.path.getmtime(path) < STALE_ROOT_TEMPORARY_SECONDS:
                    continue  # perhaps a `posedata extend` writing the card right now
                os.remove(path)
            except FileNotFoundError:
                pass


# ---- finishing ------------------------------------------------------------------------------


def split_names(plan: BuildPlan) -> list[str]:
    """Every split the source named: planned shards, scan rejects, shipped pair lists."""
    named = {t.split for t in plan.tasks} | {r.split for r in plan.scan.rejects if r.split} | set(plan.scan.pairs)
    return sorted(named)


def reconcile(plan: BuildPlan, location: DatasetLocation, markers: pa.Table) -> None:
    """Every planned input is in exactly one done-marker row (manifest or reject), and
    nothing else is: otherwise stop before the manifest and the card are written, naming the
    difference."""
    expected = collections.Counter(row.get("source_path") or row["path"] for task in plan.tasks for row in task_rows(plan, task))
    got = collections.Counter(markers["source_path"].to_pylist())
    if got == expected:
        return
    missing, extra = sorted((expected - got).elements()), sorted((got - expected).elements())
    parts = [f"{len(missing)} planned inputs not in any shard's rows (e.g. {missing[0]})" if missing else "", f"{len(extra)} rows that were not planned (e.g. {extra[0]})" if extra else ""]
    raise BuildError(
        f"{location.url}: reconciliation failed: {'; '.join(p for p in parts if p)}; the dataset card was not written. "
        "Rerun with --overwrite to rebuild it"
    )


def finalize(plan: BuildPlan, location: DatasetLocation, started: float, echo: Callable[[str], None] = print) -> dict[str, Any]:
    import pyarrow.compute as pc

    markers = pa.concat_tables([location.read_parquet(location.done_marker(t.name)) for t in plan.tasks])
    manifest = markers.filter(pc.equal(markers["status"], "ok")).select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    failed = markers.filter(pc.equal(markers["status"], "rejected"))
    failed = pa.table({"source_path": failed["source_path"], "key": failed["key"], "split": failed["split"], "stage": failed["stage"], "reason": failed["reason"]}, schema=REJECTS_SCHEMA)
    rejects = pa.concat_tables([location.read_parquet(location.path("_done", "scan.parquet")).cast(REJECTS_SCHEMA), failed])
    reconcile(plan, location, markers)  # before anything final is written

    location.write_parquet(location.path(REJECTS), rejects)
    if len(manifest) == 0:
        reasons = collections.Counter(f"{s}: {_reason_kind(r)}" for s, r in zip(rejects["stage"].to_pylist(), rejects["reason"].to_pylist()))
        echo(format_reasons(reasons))
        raise BuildError(
            f"nothing written: all {len(rejects)} inputs were rejected (reasons above; every one in "
            f"{location.url_of(location.path(REJECTS))}); no dataset card was written"
        )
    location.write_parquet(location.path(MANIFEST), manifest)

    pair_counts = write_pairs(plan, location, manifest)
    splits: dict[str, Any] = {}
    for split in split_names(plan):
        # A split whose every input was rejected stays listed, with 0 samples (and its empty
        # shards), so the card, verify, show and train all say the same about it.
        shards = sorted({t.name for t in plan.tasks if t.split == split})
        splits[split] = {"samples": manifest["split"].to_pylist().count(split), "shards": shards, **pair_counts.get(split, {})}
    notes = count_notes(markers.filter(pc.equal(markers["status"], "ok"))["notes"].to_pylist())
    features = {}
    for spec, extractor in plan.extractors.items():
        features[extractor.folder] = {**extractor.card(), "spec": spec, "notes": notes.get(spec, {})}
    reasons = collections.Counter(f"{s}: {_reason_kind(r)}" for s, r in zip(rejects["stage"].to_pylist(), rejects["reason"].to_pylist()))
    elapsed = time.time() - started
    card = {
        "format_version": CARD_FORMAT_VERSION,
        "posedata_version": posedata.__version__,
        "name": os.path.basename(location.root.rstrip("/")) or plan.config.source,
        # the root only here, as the user gave it; no other path of this machine (manifest paths are relative to it)
        "source": {"name": plan.config.source, "root": plan.config.root, "options": plan.config.source_options, "info": without_root_in(plan.scan.info, plan.config.root)},
        "resolution": list(plan.resolution),
        "image": {"format": "jpg", "quality": 95, "chroma_subsampling": "4:4:4", "resize": "PIL bicubic with antialiasing, straight to H x W"},
        "splits": splits,
        "features": features,
        "counts": {"inputs": len(manifest) + len(rejects), "written": len(manifest), "rejected": len(rejects)},
        "rejects_by_reason": dict(sorted(reasons.items())),
        "duplicates_across_splits": duplicates_across_splits(manifest),
        "build": {"shard_size": plan.config.shard_size, "weights": plan.config.weights, "dtype": plan.config.dtype, "executor": plan.config.executor, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    write_wids_indexes(location, card, collections.Counter(manifest["shard"].to_pylist()), [None, *features])
    for folder, feature in features.items():
        location.write_json(location.feature_card(folder), feature)
    location.write_json(location.path(CARD), card)  # last: its presence means "complete"
    record_features(location)  # keep features that `posedata extend` added since; writes README.md
    return {"inputs": len(manifest) + len(rejects), "written": len(manifest), "rejected": len(rejects), "rejects_by_reason": card["rejects_by_reason"], "duplicates_across_splits": card["duplicates_across_splits"], "seconds": elapsed, "splits": {s: v["samples"] for s, v in splits.items()}, "out": location.url}


def count_notes(notes_json: list[str]) -> dict[str, dict[str, int]]:
    """{feature spec: {note: samples}} from the per-sample notes of the done markers."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for text in notes_json:
        for spec, notes in (json.loads(text) if text else {}).items():
            counts[spec].update(notes)
    return {spec: dict(sorted(c.items())) for spec, c in counts.items()}


def _reason_kind(reason: str) -> str:
    """Group reject reasons for counting: drop the per-file detail after the first colon."""
    kind = reason.split(":")[0].split("(")[0].strip()
    return "duplicate key" if kind.startswith("duplicate key ") else kind


def write_pairs(plan: BuildPlan, location: DatasetLocation, manifest: pa.Table) -> dict[str, dict[str, Any]]:
    """pairs/<split>.parquet: imported lists as given (minus pairs whose images were
    rejected), otherwise every ordered pair within a group."""
    shard_of = dict(zip(manifest["key"].to_pylist(), manifest["shard"].to_pylist()))
    group_of = dict(zip(manifest["key"].to_pylist(), manifest["group"].to_pylist()))
    out: dict[str, dict[str, Any]] = {}
    for split in split_names(plan):
        keys = [k for k, s in zip(manifest["key"].to_pylist(), manifest["split"].to_pylist()) if s == split]
        imported = plan.scan.pairs.get(split)
        if imported is not None:
            kept = [(a, b) for a, b in imported if a in shard_of and b in shard_of]
            origin = f"imported from the source ({plan.scan.info.get('pair_files', {}).get(split, 'official list')})"
        else:
            by_group: dict[str, list[str]] = collections.defaultdict(list)
            for k in keys:
                by_group[group_of[k]].append(k)
            kept = [(a, b) for members in by_group.values() for a in members for b in members if a != b]
            origin = "generated: all ordered pairs within each group"
        table = pa.table(
            {
                "split": [split] * len(kept),  # so that pairs/*.parquet read as one table keep it
                "source_key": [a for a, _ in kept],
                "target_key": [b for _, b in kept],
                "shard": [shard_of[a] if shard_of[a] == shard_of[b] else None for a, b in kept],
            },
            schema=PAIRS_SCHEMA,
        )
        location.write_parquet(location.path("pairs", f"{split}.parquet"), table)
        out[split] = {
            "pairs": len(kept),
            "pairs_origin": origin,
            "pairs_dropped": (len(imported) - len(kept)) if imported is not None else 0,
            "pairs_across_shards": sum(1 for a, b in kept if shard_of[a] != shard_of[b]),
        }
    return out


def format_reasons(reasons: dict[str, int]) -> str:
    """The rejects of a build, counted by stage and kind of reason, most frequent first."""
    return "\n".join(f"    {n:>6}  {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        "",
        "build summary",
        f"  inputs     {summary['inputs']:>8}",
        f"  written    {summary['written']:>8}   " + "  ".join(f"{k}={v}" for k, v in summary["splits"].items()),
        f"  rejected   {summary['rejected']:>8}",
    ]
    if summary["rejects_by_reason"]:
        lines.append(format_reasons(summary["rejects_by_reason"]))
    leak = duplicates_text(summary.get("duplicates_across_splits") or {})
    if leak:
        lines.append(f"  duplicates {leak}")
    rate = summary["written"] / summary["seconds"] if summary["seconds"] else 0.0
    lines.append(f"  time       {summary['seconds']:>8.1f} s   ({rate:.1f} images/s)")
    lines.append(f"  dataset    {summary['out']}")
    return "\n".join(lines)
