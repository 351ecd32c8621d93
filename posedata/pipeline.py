"""The machinery that runs extractors over rows, once for every job that needs it.

A `Job` is: input rows (each names its `shard` and `index`), a `prepare` step that turns a
micro-batch of inputs into sample rows (decode + resize for `build`; read the stored images for `extend`),
one `StageSpec` per extractor in dependency order, and a `write` step that receives all rows
of one shard. Two executors run a Job: Ray Data (decode/prepare as tasks, each extractor as an
actor pool, shards written by tasks after a group-by on `shard`) and a sequential in-process
one. Neither knows which models are inside (datatrove's steps vs executors).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from posedata.extractors import create_extractor, extractor_class
from posedata.extractors.base import NOTES, Extractor, ExtractorError, Sample
from posedata.images import decode_jpeg_rgb
from posedata.layout import DatasetLocation
from posedata.records import STAGE_EXTRACT
from posedata.shards import decode_stored_output, encode_array, encode_stored_output
from posedata.storage import member_suffixes, output_names

Rows = list[dict[str, Any]]


def output_suffixes(extractor: Extractor) -> list[str]:
    """The tar members an extractor writes per sample (`keypoints.npy`, `skeleton.png`; an
    output stored as fp8 / bf16 bit patterns is `embeds.e4m3.npy` + `embeds.scale.npy` /
    `embeds.bf16.npy`: posedata.storage)."""
    return [m for spec in extractor.outputs().values() for m in member_suffixes(spec.suffix, spec.dtype)]


def feature_column(folder: str, suffix: str) -> str:
    """The row column that carries one encoded output of one feature between stages."""
    return f"f:{folder}:{suffix}"


@dataclass
class StageSpec:
    name: str
    kwargs: dict[str, Any]
    # feature name -> (folder, suffixes) of each feature this extractor requires
    dependencies: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    batch_size: int | None = None


@dataclass
class Job:
    inputs: Rows
    prepare: Callable[[Rows], Rows]
    stages: list[StageSpec]
    write: Callable[[Rows], dict[str, Any]]
    location: DatasetLocation
    micro_batch: int = 32  # samples that go through the stages together (see micro_batches)
    workers: int | None = None  # actors per extractor on CPU
    address: str | None = None


class ExtractorStage:
    """One extractor inside a job: builds Samples from rows, runs the model in batches,
    encodes the outputs into row columns. Runs inside a Ray actor or in-process."""

    def __init__(self, spec: StageSpec, location_url: str, storage_options: dict[str, Any], threads: int = 1):
        import torch

        # Same inputs, same bytes: on CPU some kernels (the VAE's convolutions) give other
        # low bits with another thread count, so every executor runs extractors with the
        # same fixed count (parallelism comes from more actors); on CUDA, deterministic
        # kernels.
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        self.spec = spec
        upstream = {dep: folder for dep, (folder, _) in spec.dependencies.items()}
        self.extractor: Extractor = create_extractor(spec.name, upstream=upstream, **spec.kwargs)
        self.folder = self.extractor.folder
        self.suffixes = output_suffixes(self.extractor)
        self.extractor.setup("cuda" if torch.cuda.is_available() else "cpu")
        self._write_null_embedding(DatasetLocation(location_url, storage_options))

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size or self.extractor.batch_size

    def _write_null_embedding(self, location: DatasetLocation) -> None:
        for suffix, array in (self.extractor.null_embedding() or {}).items():
            path = location.null_embedding(self.folder, suffix.removesuffix(".npy"))
            if not location.exists(path):
                location.write_bytes(path, encode_array(array))

    def _sample(self, row: dict[str, Any]) -> Sample:
        sample = Sample(
            key=row["key"],
            image=decode_jpeg_rgb(row["jpg"]),
            annotations=json.loads(row["annotations"]) if row.get("annotations") else {},
            original_size=(int(row["original_height"]), int(row["original_width"])),
        )
        for dep, (folder, suffixes) in self.spec.dependencies.items():
            members = {s: row[feature_column(folder, s)] for s in suffixes}
            sample[dep] = {s: decode_stored_output(s, members) for s in output_names(members)}
        return sample

    def __call__(self, rows: Rows) -> Rows:
        """Extract for one micro-batch (rows of one shard, in index order), in chunks of the
        extractor's batch size: which samples share a forward pass never depends on the
        executor or on how Ray cut the data."""
        for row in rows:
            for suffix in self.suffixes:
                row[feature_column(self.folder, suffix)] = b""
        live = [row for row in rows if row["status"] == "ok"]
        for start in range(0, len(live), self.batch_size):
            self._extract(live[start : start + self.batch_size])
        return rows

    def _extract(self, live: Rows) -> None:
        try:
            results = self.extractor([self._sample(r) for r in live])
            outcomes = [(row, result, None) for row, result in zip(live, results)]
        except Exception:
            # One bad image must not take the batch down: redo one by one to find it.
            outcomes = []
            for row in live:
                try:
                    outcomes.append((row, self.extractor([self._sample(row)])[0], None))
                except Exception as e:  # noqa: BLE001 - any failure becomes a reject reason
                    outcomes.append((row, None, e))
        for row, result, error in outcomes:
            if error is None:
                try:
                    notes = result.get(NOTES) or []
                    if notes:
                        row["notes"] = json.dumps({**json.loads(row.get("notes") or "{}"), self.spec.name: list(notes)}, sort_keys=True)
                    for spec in self.extractor.outputs().values():
                        for member, data in encode_stored_output(spec.suffix, result[spec.suffix], spec.dtype).items():
                            row[feature_column(self.folder, member)] = data
                    continue
                except Exception as e:  # noqa: BLE001
                    error = e
            detail = str(error) if isinstance(error, ExtractorError) else f"{error.__class__.__name__}: {error}"
            row.update(status="rejected", stage=STAGE_EXTRACT, reason=f"{self.extractor.name} failed: {detail}")


# ---- executors ---------------------------------------------------------------------------------


def micro_batches(inputs: Rows, size: int) -> list[Rows]:
    """Inputs cut into the fixed groups every stage processes together: rows of one shard,
    `size` consecutive indices at a time. Fixed by the plan, so both executors, any number
    of workers and any task order put the same samples through each forward pass."""
    groups: dict[tuple[str, int], Rows] = {}
    for row in sorted(inputs, key=lambda r: (r["shard"], int(r["index"]))):
        groups.setdefault((row["shard"], int(row["index"]) // size), []).append(row)
    return list(groups.values())


def run_locally(job: Job, echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """Sequential executor: the same steps, in this process (debugging, tiny datasets)."""
    from tqdm import tqdm

    stages = [ExtractorStage(spec, job.location.url, job.location.storage_options) for spec in job.stages]
    results: list[dict[str, Any]] = []
    shard_rows: Rows = []
    # micro_batches come shard by shard: each shard is written (done marker last) as soon as
    # its last micro-batch is through, so a killed run keeps every shard it finished.
    for group in tqdm(micro_batches(job.inputs, job.micro_batch), desc="batches", unit="batch", file=sys.stderr):
        if shard_rows and shard_rows[0]["shard"] != group[0]["shard"]:
            results.append(job.write(shard_rows))
            shard_rows = []
        rows = job.prepare(group)
        for stage in stages:
            stage(rows)
        shard_rows.extend(rows)
    if shard_rows:
        results.append(job.write(shard_rows))
    return results


def run_with_ray(job: Job, echo: Callable[[str], None]) -> list[dict[str, Any]]:
    import pandas as pd
    import ray

    init_ray(job.address)
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    # One Ray row per micro-batch (its samples packed as an Arrow IPC stream), and every
    # stage takes one row at a time: whatever Ray does with blocks (it requires a batch size
    # with GPUs, and then bundles and slices blocks across boundaries), the samples that
    # share a forward pass are the plan's micro-batches.
    groups = [{"shard": group[0]["shard"], "batch": pack_rows(group)} for group in micro_batches(job.inputs, job.micro_batch)]
    ds = ray.data.from_items(groups, override_num_blocks=len(groups))
    prepare = job.prepare

    def expand(df: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"shard": df["shard"], "batch": [pack_rows(prepare(unpack_rows(packed))) for packed in df["batch"]]})

    ds = ds.map_batches(expand, batch_format="pandas", batch_size=1, num_cpus=TASK_CPUS)
    requests = actor_requests([extractor_class(spec.name) for spec in job.stages], cpus, gpus, job.workers or 1)
    pools = ", ".join(f"{spec.name} {r.pool_size}x({r.num_cpus:g} CPU" + (f", {r.num_gpus:g} GPU)" if r.num_gpus else ")") for spec, r in zip(job.stages, requests))
    echo(f"ray: {cpus} CPUs, {gpus:g} GPUs; actor pools: {pools}")
    for spec, request in zip(job.stages, requests):
        options: dict[str, Any] = {"num_cpus": request.num_cpus, "compute": ray.data.ActorPoolStrategy(size=request.pool_size)}
        if request.num_gpus:
            options["num_gpus"] = request.num_gpus
        ds = ds.map_batches(
            _ActorAdapter,
            fn_constructor_kwargs=dict(spec=spec, location_url=job.location.url, storage_options=job.location.storage_options),
            batch_format="pandas",
            batch_size=1,
            **options,
        )

    write = job.write

    def write_group(df: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame([write([row for packed in df["batch"] for row in unpack_rows(packed)])])

    return ds.groupby("shard").map_groups(write_group, batch_format="pandas", num_cpus=TASK_CPUS).take_all()


# Prepare (decode) and write tasks ask for half a CPU each, so two can run per core and they
# never wait behind the actors.
TASK_CPUS = 0.5
LIGHT_ACTOR_CPUS = 0.05  # extractors without a model (annotation import)


@dataclass(frozen=True)
class ActorRequest:
    """What one extractor's Ray actor pool asks for: per actor, and how many actors."""

    num_cpus: float
    num_gpus: float
    pool_size: int


def actor_requests(classes: list[type], cpus: int, gpus: float, workers: int) -> list[ActorRequest]:
    """Actor pools for the extractors of one job, in order, that fit the cluster together.

    Ray reserves an actor's resources for its whole life and Ray Data starts every pool at
    once, so the pools must fit side by side or a later stage never gets an actor and the job
    waits forever. On CPU: `workers` actors per extractor (see cpu_budget). With GPUs: every
    model shares each GPU, one actor per model per GPU, its share of a GPU in proportion to
    the extractor's `gpu_share` (scaled down when the shares add up to more than one GPU;
    when they add up to half a GPU or less, several copies per GPU keep it busy).

    The shares are reservations for Ray's scheduler, not limits on the GPU, so leaving some
    unreserved costs nothing, and it must be left: Ray places fractional actors first-fit, and
    first-fit can strand up to one actor's share on each GPU. Reserving at most (1 - the
    largest share) per GPU guarantees that every actor finds room."""
    uses_model = [cls.uses_model for cls in classes]
    if not gpus:
        shares = cpu_budget(cpus, uses_model, workers)
        return [ActorRequest(share, 0.0, workers if m else 1) for share, m in zip(shares, uses_model)]
    model_shares = [cls.gpu_share for cls, m in zip(classes, uses_model) if m]
    total, largest = sum(model_shares) or 1.0, max(model_shares, default=1.0)
    scale = min(1.0, 1 / (total + largest))  # per GPU: total * scale <= 1 - largest * scale
    copies_per_gpu = max(1, math.floor(1 / (total + largest)))
    pool_size = max(1, math.floor(gpus) * copies_per_gpu)
    if gpus < 1:  # a fraction of one GPU (a shared node): shrink the shares to fit
        scale *= gpus
    cpu_shares = cpu_budget(cpus, uses_model, pool_size)
    requests = []
    for cls, m, cpu_share in zip(classes, uses_model, cpu_shares):
        if m:
            # Round down to Ray's resource precision (1e-4) so that the sum stays within the GPUs.
            num_gpus = math.floor(cls.gpu_share * scale * 10_000) / 10_000
            requests.append(ActorRequest(cpu_share, num_gpus, pool_size))
        else:
            requests.append(ActorRequest(cpu_share, 0.0, 1))
    return requests


def cpu_budget(cpus: int, uses_model: list[bool], actors_per_stage: int) -> list[float]:
    """CPUs each CPU-side actor asks for. Ray reserves an actor's CPUs for its whole life,
    so the actors together must leave room for at least one prepare and one write task, or
    the job waits forever for a CPU (on 2 cores, pools that take every CPU deadlock)."""
    light = LIGHT_ACTOR_CPUS * actors_per_stage * sum(1 for m in uses_model if not m)
    heavy_actors = actors_per_stage * sum(1 for m in uses_model if m)
    available = max(0.2, cpus - 2 * TASK_CPUS - light)
    # Up to half the machine for the models; decode keeps the rest busy feeding them.
    per_actor = min(available / heavy_actors, max(1.0, cpus / (2 * heavy_actors))) if heavy_actors else 0.0
    per_actor = math.floor(per_actor * 1000) / 1000  # round down: the sum must stay in budget
    return [per_actor if m else LIGHT_ACTOR_CPUS for m in uses_model]


def pack_rows(rows: Rows) -> bytes:
    """A micro-batch's rows as one Arrow IPC stream (bytes, strings and ints; no pickle)."""
    import pyarrow as pa

    columns = list(dict.fromkeys(name for row in rows for name in row))
    table = pa.Table.from_pylist([{name: row.get(name) for name in columns} for row in rows])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def unpack_rows(data: bytes) -> Rows:
    import pyarrow as pa

    return pa.ipc.open_stream(data).read_all().to_pylist()


class _ActorAdapter:
    """Ray actor around an ExtractorStage: each call gets one packed micro-batch (one row)."""

    def __init__(self, **kwargs):
        self.stage = ExtractorStage(**kwargs)

    def __call__(self, df):
        import pandas as pd

        return pd.DataFrame({"shard": df["shard"], "batch": [pack_rows(self.stage(unpack_rows(packed))) for packed in df["batch"]]})


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local": start our own Ray. Without it ray.init joins the cluster that the last
        # `ray start` on this machine recorded (/tmp/ray/ray_current_cluster) and then
        # refuses num_cpus; joining a cluster is what --address is for.
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level=logging.WARNING)
