"""The machinery that runs extractors over rows, once for every job that needs it.

A `Job` is: input rows (each names its `shard` and `index`), a `prepare` step that turns a
micro-batch of inputs into sample rows (decode + resize for `build`; read the stored images for `extend`),
one `StageSpec` per extractor in dependency order, and a `write` step that receives all rows
of one shard. Two executors run a Job, both through one `ExtractorChain` (every extractor of
the job, in dependency order, in one process): Ray (prepare tasks, one chain per worker actor
-- per GPU, or `--workers` of them on CPU --, a write task per shard as soon as its
micro-batches are through) and a sequential in-process one. Neither knows which models are
inside (datatrove's steps vs executors)."""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from posedata.errors import PosedataError
from posedata.extractors import create_extractor
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
    workers: int | None = None  # Ray workers (each holding every model): per GPU, or in all on CPU
    address: str | None = None
    verbose: bool | None = None  # Ray's own logs too; None: when INFO logging is on (`--verbose`)


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


class ExtractorChain:
    """Every extractor of a job, in dependency order, in one process: a micro-batch goes
    through all of them in turn (each model in its own batch size), so it is decoded once,
    enters the process once and leaves it once, whatever the number of models. Both
    executors run this: in-process (`run_locally`) and as the Ray worker (`run_with_ray`)."""

    def __init__(self, specs: list[StageSpec], location_url: str, storage_options: dict[str, Any], threads: int = 1):
        self.stages = [ExtractorStage(spec, location_url, storage_options, threads) for spec in specs]

    def run_stage(self, stage: ExtractorStage, rows: Rows) -> None:
        stage(rows)

    def __call__(self, rows: Rows) -> Rows:
        for stage in self.stages:
            self.run_stage(stage, rows)
        return rows


def micro_batches(inputs: Rows, size: int) -> list[Rows]:
    """Inputs cut into the fixed groups every stage processes together: rows of one shard,
    `size` consecutive indices at a time. Fixed by the plan, so both executors, any number
    of workers and any task order put the same samples through each forward pass."""
    groups: dict[tuple[str, int], Rows] = {}
    for row in sorted(inputs, key=lambda r: (r["shard"], int(r["index"]))):
        groups.setdefault((row["shard"], int(row["index"]) // size), []).append(row)
    return list(groups.values())


class Progress:
    """posedata's own progress lines for a job (Ray's are off unless --verbose): shards
    written / total, images processed, images/s, ETA and rejects so far. A line at
    most every `interval` seconds, and a last one at the end; a background thread keeps
    printing while nothing finishes (a first model load can take minutes)."""

    def __init__(self, echo: Callable[[str], None], shards: int, images: int, interval: float = 10.0):
        import threading

        self.echo, self.shards, self.images, self.interval = echo, shards, images, interval
        self.started = time.monotonic()
        self.first_batch: float | None = None
        self.extracted = self.shards_done = self.rejected = 0
        self.last_print = self.started
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            self.print()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            if time.monotonic() - self.last_print >= self.interval:
                self.print()

    def batch_done(self, images: int) -> None:
        with self._lock:
            self.extracted += images
            if self.first_batch is None:
                self.first_batch = time.monotonic()
        self.maybe_print()

    def shard_done(self, result: dict[str, Any]) -> None:
        with self._lock:
            self.shards_done += 1
            self.rejected += int(result.get("rejected", 0))
        self.maybe_print()

    def maybe_print(self) -> None:
        if time.monotonic() - self.last_print >= self.interval:
            self.print()

    def line(self) -> str:
        now = time.monotonic()
        elapsed = now - self.started
        parts = [f"{self.shards_done}/{self.shards} shards written", f"{self.extracted:,}/{self.images:,} images processed"]
        if self.extracted and self.first_batch is not None:
            # The rate since the start (model loading included): what the user waits for.
            rate = self.extracted / elapsed
            parts.append(f"{rate:.1f} images/s")
            if self.extracted < self.images:
                parts.append(f"ETA {_duration((self.images - self.extracted) / rate)}")
        elif self.extracted < self.images:
            parts.append("loading models and decoding the first images")
        parts.append(f"{self.rejected} rejected so far")
        return f"  [{_duration(elapsed)}] " + ", ".join(parts)

    def print(self) -> None:
        with self._lock:
            self.last_print = time.monotonic()
            text = self.line()
        self.echo(text)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def run_locally(job: Job, echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """Sequential executor: the same steps, in this process (debugging, tiny datasets)."""
    groups = micro_batches(job.inputs, job.micro_batch)
    results: list[dict[str, Any]] = []
    with Progress(echo, len({g[0]["shard"] for g in groups}), len(job.inputs)) as progress:
        chain = ExtractorChain(job.stages, job.location.url, job.location.storage_options)
        shard_rows: Rows = []
        # micro_batches come shard by shard: each shard is written (done marker last) as soon
        # as its last micro-batch is through, so a killed run keeps every shard it finished.
        for group in groups:
            if shard_rows and shard_rows[0]["shard"] != group[0]["shard"]:
                results.append(job.write(shard_rows))
                progress.shard_done(results[-1])
                shard_rows = []
            shard_rows.extend(chain(job.prepare(group)))
            progress.batch_done(len(group))
        if shard_rows:
            results.append(job.write(shard_rows))
            progress.shard_done(results[-1])
    return results


# Prepare (decode) and write tasks ask for half a CPU each, so two can run per core and they
# never wait behind the workers.
TASK_CPUS = 0.5


@dataclass(frozen=True)
class WorkerRequest:
    """What each Ray worker (one ExtractorChain actor) asks for, and how many there are."""

    num_cpus: float
    num_gpus: float
    count: int


def worker_request(cpus: int, gpus: float, workers: int | None) -> WorkerRequest:
    """The Ray workers of a job: with GPUs, `workers` per GPU (default 1), each reserving its
    fraction of one GPU; on CPU, `workers` in all (default 1), each running its models on
    one thread (parallelism comes from more workers; see ExtractorStage).

    Equal fractions of 1 / n fill each GPU exactly, so Ray's first-fit placement never
    strands a worker. Ray reserves an actor's CPUs for its whole life, so the workers leave
    room for at least one prepare and one write task (see cpu_budget)."""
    per = max(1, workers or 1)
    if gpus:
        whole = math.floor(gpus)
        count = max(1, whole) * per
        share = (1.0 if whole else gpus) / per
        num_gpus = math.floor(share * 10_000) / 10_000  # Ray's resource precision: stay within the GPUs
    else:
        count, num_gpus = per, 0.0
    return WorkerRequest(cpu_budget(cpus, count), num_gpus, count)


def cpu_budget(cpus: int, workers: int) -> float:
    """CPUs each worker asks for. Ray reserves an actor's CPUs for its whole life, so the
    workers together must leave room for at least one prepare and one write task, or the
    job waits forever for a CPU (on 2 cores, workers that take every CPU deadlock)."""
    available = max(0.2, cpus - 2 * TASK_CPUS)
    # Up to half the machine for the models; decode keeps the rest busy feeding them.
    per_worker = min(available / workers, max(1.0, cpus / (2 * workers)))
    return math.floor(per_worker * 1000) / 1000  # round down: the sum must stay in budget


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


def _prepare_task(prepare: Callable[[Rows], Rows], packed: bytes) -> bytes:
    """Ray task: decode one micro-batch (build) or read its stored inputs (extend)."""
    return pack_rows(prepare(unpack_rows(packed)))


def _write_task(write: Callable[[Rows], dict[str, Any]], *packed: bytes) -> dict[str, Any]:
    """Ray task: write one shard from its micro-batches (Ray hands over the worker outputs
    straight from the object store; the driver never holds them)."""
    return write([row for batch in packed for row in unpack_rows(batch)])


class _ChainWorker:
    """The Ray actor: one ExtractorChain (every model of the job) and the node it runs on."""

    def __init__(self, stages: list[StageSpec], location_url: str, storage_options: dict[str, Any]):
        self.chain = ExtractorChain(stages, location_url, storage_options)

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def run(self, packed: bytes) -> bytes:
        return pack_rows(self.chain(unpack_rows(packed)))


# Micro-batches a worker holds at once beyond the one it runs: enough that it never waits
# for its next input while the decode tasks keep up.
QUEUED_PER_WORKER = 2


def run_with_ray(job: Job, echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """Ray executor. Workers (Ray actors) each hold every model of the job (ExtractorChain);
    the driver hands each micro-batch to a prepare task (decode), its output to the least
    busy worker, and a shard's outputs, once all are back, to a write task. Data moves by
    reference: the decoded images enter the object store once and a worker's outputs leave
    it once, into the write task; the driver only holds references. Micro-batches are fixed
    by the plan and written in index order, so the bytes equal the local executor's."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    verbose = job.verbose if job.verbose is not None else logging.getLogger().isEnabledFor(logging.INFO)
    init_ray(job.address, verbose)
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    groups = micro_batches(job.inputs, job.micro_batch)
    shard_of = [g[0]["shard"] for g in groups]
    left_in_shard = collections.Counter(shard_of)
    request = worker_request(cpus, gpus, job.workers)
    each = f"{request.num_cpus:g} CPU" + (f", {request.num_gpus:g} GPU" if request.num_gpus else "")
    echo(f"ray: {cpus} CPUs, {gpus:g} GPUs; {request.count} worker{'s' if request.count > 1 else ''} ({each} each), each holding {', '.join(s.name for s in job.stages)}")

    # Free CPUs keep decode tasks running ahead of the workers: two per CPU the workers leave.
    decode_slots = max(1, int((cpus - request.count * request.num_cpus) / TASK_CPUS))
    window = QUEUED_PER_WORKER + max(1, decode_slots // request.count)
    prepare = ray.remote(num_cpus=TASK_CPUS)(_prepare_task)
    write = ray.remote(num_cpus=TASK_CPUS)(_write_task)
    worker_class = ray.remote(num_cpus=request.num_cpus, num_gpus=request.num_gpus, max_restarts=2, max_task_retries=2)(_ChainWorker)
    prepare_ref, write_ref = ray.put(job.prepare), ray.put(job.write)
    workers = [worker_class.remote(job.stages, job.location.url, job.location.storage_options) for _ in range(request.count)]
    results: list[dict[str, Any]] = []
    try:
        nodes: dict[int, str] = {}
        node_calls = {w.node.remote(): i for i, w in enumerate(workers)}
        busy = [0] * len(workers)
        running: dict[Any, tuple[int, int]] = {}  # output ref -> (micro-batch, worker)
        outputs: dict[str, dict[int, Any]] = collections.defaultdict(dict)
        writes: list[Any] = []
        pending = collections.deque(range(len(groups)))
        with Progress(echo, len(left_in_shard), len(job.inputs)) as progress:
            while pending or running or writes or node_calls:
                while pending:
                    w = min(range(len(workers)), key=busy.__getitem__)
                    if busy[w] >= window:
                        break
                    i = pending.popleft()
                    # Decode on the worker's node (once known), so images cross the network once at most.
                    strategy = NodeAffinitySchedulingStrategy(nodes[w], soft=True) if w in nodes else "DEFAULT"
                    decoded = prepare.options(scheduling_strategy=strategy).remote(prepare_ref, pack_rows(groups[i]))
                    running[workers[w].run.remote(decoded)] = (i, w)
                    busy[w] += 1
                # fetch_local=False: a worker's outputs go to the write task, never to the driver's node
                ready, _ = ray.wait([*running, *writes, *node_calls], num_returns=1, timeout=1.0, fetch_local=False)
                for ref in ready:
                    if ref in node_calls:
                        nodes[node_calls.pop(ref)] = ray.get(ref)
                    elif ref in running:
                        i, w = running.pop(ref)
                        busy[w] -= 1
                        progress.batch_done(len(groups[i]))
                        shard = shard_of[i]
                        outputs[shard][i] = ref
                        left_in_shard[shard] -= 1
                        if not left_in_shard[shard]:
                            done = outputs.pop(shard)
                            writes.append(write.remote(write_ref, *(done[k] for k in sorted(done))))
                    else:
                        writes.remove(ref)
                        results.append(ray.get(ref))
                        progress.shard_done(results[-1])
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, PosedataError):  # a user-fixable problem in a task: its one line, not Ray's wrapping
            raise e.cause from None
        raise
    except ray.exceptions.RayActorError as e:
        cause = getattr(getattr(e, "cause", None), "cause", None)  # the exception of the worker's constructor, if that was it
        if isinstance(cause, PosedataError):
            raise cause from None
        raise RuntimeError(f"a Ray worker holding the models failed: {e}") from None
    finally:
        for worker in workers:
            ray.kill(worker)
    return results


def init_ray(address: str | None, verbose: bool = False) -> None:
    import ray

    if ray.is_initialized():
        return
    # Ray's own logs (start-up notices, worker output) only with --verbose: posedata prints
    # its own progress.
    level = logging.INFO if verbose else logging.ERROR
    if address:
        ray.init(address=address, log_to_driver=verbose, configure_logging=True, logging_level=level)
    else:
        # "local": start our own Ray. Without it ray.init joins the cluster that the last
        # `ray start` on this machine recorded (/tmp/ray/ray_current_cluster) and then
        # refuses num_cpus; joining a cluster is what --address is for. Worker niceness 0:
        # Ray starts its workers at nice 15, so on a machine shared with anything else they
        # yield to it (measured: two workers got one core between them beside one busy
        # process, while the local executor, at nice 0, got its core); the workers are the job.
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=verbose, configure_logging=True, logging_level=level,
                 _system_config={"worker_niceness": 0})
