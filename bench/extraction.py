"""Extraction efficiency and CPU scaling of `posedata build` (a script to run by hand, not a test).

    python bench/extraction.py                                   # CPU, tiny models, every default feature
    python bench/extraction.py --weights random --features openpose,higherhrnet,dinov2:base,clip --scaling-features openpose
    python bench/extraction.py --device cuda --weights random --res 512x352 --images 2048 --model-images 256

For each feature (and for the full feature set) it measures, at the same batch size:

- **model-only images/s**: `extractor(batch)` (the extractor's `__call__`, outputs returned as
  numpy) on images already decoded at the stored resolution, exactly the micro-batches the
  build forms (32 consecutive samples, cut into the extractor's batch size), after one
  warm-up batch; one torch thread on CPU, as the build's workers run. A feature that requires
  another (clip_regions reads parsing) is measured with it, as the build runs it. Full set:
  every extractor one after the other on the same images (the sum of their times).
- **end-to-end images/s** on a Ray build of N images with one worker (a Ray actor holding
  every extractor of the build, posedata.pipeline.ExtractorChain), from a timeline the
  worker logs (start and end of every extractor on every micro-batch of 32):
  - *e2e* (the headline): images / (the first micro-batch any extractor starts -> the last
    one the last extractor ends). Ray start-up, worker start, model set-up, scan, the final
    shard writes and the card are outside it; decode, resize, JPEG, handing micro-batches
    to the worker, every wait of the worker on decode, the models, the encoding of their
    outputs, and the pipeline's fill and drain are inside. It can only understate the
    pipeline's rate.
  - *steady*: the last extractor's rate after its first micro-batch (per worker, summed).
    Printed beside e2e, not used for the ratios.
  - *wall*: the whole build in this process with Ray already up (workers, models, writes,
    card), and, for the full set (`--cli`), `posedata build` as a user types it, in a
    subprocess, from start to exit (imports and Ray start-up included).
- **efficiency** = e2e / model-only. For several extractors the model-only figure is their
  bound: the worker runs them one after the other, so 1 / sum of seconds per image (on CPU
  on one thread; more workers, `--workers N`, add threads). The goal is >= 0.95.
- **scaling**: a build with `--workers 2` vs `--workers 1` (of the full set, or of
  `--scaling-features`; on CPU two single-threaded workers, on a GPU two workers sharing
  it): ratio of e2e throughputs, and of walls (the goal on CPU is >= 1.8x); beside it, on
  CPU, the **machine ceiling**: the slowest of those models, model-only, in one process vs
  two processes at once (no Ray): what two workers can get from this machine.
- **projection**: DeepFashion's 52,712 images at the full set's e2e rate.

Writes `bench/results/extraction.json` (every timing) and `bench/results/extraction.md` (the
table), and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# The build's workers run with one OpenMP thread (Ray sets it from their CPU share; see
# posedata.pipeline.ExtractorStage for torch's own count): model-only runs here must too, or
# idle OpenMP/BLAS pools compete with the measured thread. Before numpy and torch load.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "bench"))  # limits.py: the physical bounds

from report import git_commit, render_earlier, write_report  # noqa: E402

import posedata.pipeline
from posedata.build import BuildConfig, build, decode_rows, make_plan, upstream_folders
from posedata.extractors import (
    DEFAULT_FEATURES,
    create_extractor,
    dependency_order,
    extractor_class,
)
from posedata.extractors.base import WEIGHTS_MODES, Sample
from posedata.images import decode_jpeg_rgb
from posedata.pipeline import Job, micro_batches
from posedata.shards import decode_output, encode_output

FIXTURES = Path(os.environ.get("POSEDATA_FIXTURES", REPO.parent / "shared" / "fixtures")) / "deepfashion"
RESULTS = REPO / "bench" / "results"
MICRO_BATCH = Job.micro_batch  # the build's fixed micro-batch (posedata.pipeline)
GROUP = 8  # photos per group folder
DEEPFASHION_IMAGES = 52_712  # the In-shop benchmark's images (train + test), for the projection


# ---- inputs ----------------------------------------------------------------------------------------


def make_photos(root: Path, count: int) -> Path:
    """`count` distinct 750x1101 JPEGs (DeepFashion high-res size) made from the real fixture
    photos (crop, mirror, brightness), GROUP per folder."""
    sources = [Image.open(p).convert("RGB") for p in sorted(FIXTURES.glob("pcdms_img*_750x1101.png"))]
    assert sources, f"no fixture photos in {FIXTURES}; set POSEDATA_FIXTURES"
    for i in range(count):
        image = sources[i % len(sources)]
        inset = 4 * (i // len(sources)) % 120
        image = image.crop((inset, inset, 750 - inset, 1101 - inset)).resize((750, 1101), Image.Resampling.BICUBIC)
        if (i // len(sources)) % 2:
            image = ImageOps.mirror(image)
        image = ImageEnhance.Brightness(image).enhance(0.9 + 0.01 * (i % 20))
        folder = root / f"group{i // GROUP:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"photo{i:05d}.jpg", quality=90)
    return root


# ---- model only ------------------------------------------------------------------------------------


def stored_images(root: Path, resolution: tuple[int, int], count: int) -> list[Sample]:
    """The first `count` photos as the extractors see them in a build: decoded, resized,
    JPEG-encoded as stored, decoded again (posedata.build.decode_rows + decode_jpeg_rgb)."""
    paths = sorted(root.rglob("*.jpg"))[:count]
    rows = decode_rows(
        [
            {
                "key": p.stem,
                "split": "train",
                "group": p.parent.name,
                "path": str(p),
                "annotations": "",
            }
            for p in paths
        ],
        *resolution,
    )
    return [
        Sample(
            key=r["key"],
            image=decode_jpeg_rgb(r["jpg"]),
            annotations={},
            original_size=(r["original_height"], r["original_width"]),
        )
        for r in rows
    ]


def model_only(specs: list[str], samples: list[Sample], config: BuildConfig, device: str, ready: Callable[[], object] = lambda: None) -> dict[str, dict]:
    """Seconds and images/s of each extractor of `specs` (in dependency order) on `samples`, in
    the build's micro-batches; a required feature's outputs are fed the way the build feeds
    them (encoded as stored, decoded). `ready` is called between warm-up and timing."""
    import torch

    if device == "cpu":
        torch.set_num_threads(1)  # as each of the build's workers
    plan = make_plan(config)
    results: dict[str, dict] = {}
    done: dict[str, list[dict]] = {}  # spec -> outputs per sample, for dependants
    made = {}
    for spec in dependency_order(specs):
        extractor = create_extractor(spec, upstream=upstream_folders(spec, made), **plan.extractor_kwargs[spec])
        made[spec] = extractor
        extractor.setup(device)
        for dep in extractor.requires:
            provider = next(s for s in done if s.split(":")[0] == dep)
            for sample, outputs in zip(samples, done[provider]):
                sample[dep] = {suffix: decode_output(suffix, encode_output(suffix, value)) for suffix, value in outputs.items() if not suffix.startswith("__")}
        size = config.batch_sizes.get(spec) or extractor.batch_size
        rows = [{"shard": "train-000000", "index": i} for i in range(len(samples))]
        batches = [[samples[r["index"]] for r in group[start : start + size]] for group in micro_batches(rows, MICRO_BATCH) for start in range(0, len(group), size)]
        extractor(batches[0])  # warm-up (lazy init, allocator, cuDNN)
        ready()
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        outputs: list[dict] = []
        sync()
        start = time.perf_counter()
        for batch in batches:
            outputs += extractor(batch)
        sync()
        seconds = time.perf_counter() - start
        done[spec] = outputs
        results[spec] = {
            "seconds": seconds,
            "images": len(samples),
            "images_per_s": len(samples) / seconds,
            "batch_size": min(size, MICRO_BATCH),
        }
        del extractor
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    for sample in samples:
        for key in [k for k in sample if k not in ("key", "image", "annotations", "original_size")]:
            del sample[key]
    return results


def _ceiling_worker(spec: str, root: str, resolution: tuple[int, int], count: int, weights: str, barrier, results) -> None:
    """One process of `machine_ceiling`: `model_only` for `spec`, every process timing from
    the same moment (after its own warm-up)."""
    samples = stored_images(Path(root), resolution, count)
    config = BuildConfig(source="folder", root=root, out="/nonexistent", resolution=resolution, features=[spec], weights=weights)
    results.put(model_only([spec], samples, config, "cpu", ready=barrier.wait)[spec]["images_per_s"])


def machine_ceiling(spec: str, root: Path, resolution: tuple[int, int], count: int, weights: str) -> dict:
    """What two single-threaded processes running the same model get out of this machine
    next to one, with no Ray, decode or writes: the most a 2-worker build could scale. On a
    VM whose 2 vCPUs share caches, memory bandwidth or a physical core it is below 2."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    rates = {}
    for processes in (1, 2):
        barrier, results = context.Barrier(processes), context.Queue()
        workers = [
            context.Process(
                target=_ceiling_worker,
                args=(spec, str(root), resolution, count, weights, barrier, results),
            )
            for _ in range(processes)
        ]
        for w in workers:
            w.start()
        per_process = [results.get(timeout=3600) for _ in workers]
        for w in workers:
            w.join()
        rates[processes] = {
            "images_per_s": sum(per_process),
            "per_process": per_process,
        }
    return {
        "feature": spec,
        "images": count,
        "processes": rates,
        "ratio_2_vs_1": rates[2]["images_per_s"] / rates[1]["images_per_s"],
    }


def model_bound(models: dict[str, dict], chain: list[str], resources: dict) -> dict:
    """The model-only images/s an end-to-end build of `chain` with one worker is compared
    with: the worker holds every extractor of the chain and runs them one after the other on
    each micro-batch (on CPU on one thread; on a GPU sharing it), so the bound is 1 / the sum
    of their seconds per image."""
    sequential = 1 / sum(models[s]["seconds"] / models[s]["images"] for s in chain)
    return {
        "model_only_images_per_s": sequential,
        "model_only_sequential_images_per_s": sequential,
        "model_only_bound": "sequential",
    }


# ---- end to end ------------------------------------------------------------------------------------


class TimedWorker(posedata.pipeline._ChainWorker):
    """The build's Ray worker, logging when it is ready and when each extractor of its chain
    is through a micro-batch. Defined in this script, so Ray ships it by value to the
    workers; `log_path` travels with it."""

    log_path = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._log({"event": "ready", "stage": None})
        run_stage = self.chain.run_stage

        def timed_stage(stage, rows):
            start = time.time()
            run_stage(stage, rows)
            end = time.time()
            self._log({"event": "block", "stage": stage.spec.name, "start": start, "end": end, "rows": len(rows)})

        self.chain.run_stage = timed_stage

    def _log(self, record: dict) -> None:
        record.update(pid=os.getpid())
        record.setdefault("end", time.time())
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def timed_build(config: BuildConfig, log: Path, last_stage: str) -> dict:
    """An in-process build with TimedWorker workers: wall seconds and steady images/s."""
    log.unlink(missing_ok=True)
    TimedWorker.log_path = str(log)
    original = posedata.pipeline._ChainWorker
    posedata.pipeline._ChainWorker = TimedWorker
    try:
        start = time.perf_counter()
        build(config, echo=lambda _: None)
        wall = time.perf_counter() - start
    finally:
        posedata.pipeline._ChainWorker = original
    records = [json.loads(line) for line in log.read_text().splitlines()]
    blocks = sorted(
        (r for r in records if r["event"] == "block" and r["stage"] == last_stage),
        key=lambda r: r["end"],
    )
    # Per actor of the last stage: images of its blocks after its first, over the time from its
    # first block's end to its last's; workers running side by side add up.
    rates = []
    for pid in {r["pid"] for r in blocks}:
        mine = [r for r in blocks if r["pid"] == pid]
        if len(mine) > 1 and mine[-1]["end"] > mine[0]["end"]:
            rates.append(sum(r["rows"] for r in mine[1:]) / (mine[-1]["end"] - mine[0]["end"]))
    # Span: from the first block any extractor starts to the last block the last stage ends. It
    # leaves out start-up (Ray, actors, models, scan) and the final writes, but keeps every
    # wait of an actor on decode or on the stage before it, and the pipeline's fill and drain,
    # so it can only understate the pipeline's rate.
    started = min(r["start"] for r in records if r["event"] == "block")
    span = max(r["end"] for r in blocks) - started
    busy = {}
    for r in records:
        if r["event"] == "block":
            b = busy.setdefault(r["stage"], {"rows": 0, "seconds": 0.0})
            b["rows"] += r["rows"]
            b["seconds"] += r["end"] - r["start"]
    return {
        "wall_seconds": wall,
        "blocks": len(blocks),
        "actors_measured": len(rates),
        "actors": len({r["pid"] for r in blocks}),
        "span_seconds": span,
        "span_images_per_s": sum(r["rows"] for r in blocks) / span,
        "steady_images_per_s": sum(rates) if rates and len(rates) == len({r["pid"] for r in blocks}) else None,
        # per stage: images / seconds inside the actor's __call__ (model + sample decode + output encode)
        "actor_images_per_s": {s: b["rows"] / b["seconds"] for s, b in busy.items() if b["seconds"] > 0},
    }


def cli_build(root: Path, out: Path, specs: list[str], args) -> dict:
    command = [
        str(Path(sys.executable).with_name("posedata")),
        "build",
        "folder",
        "--root",
        str(root),
        "--out",
        str(out),
        "--res",
        args.res,
        "--weights",
        args.weights,
        "--features",
        ",".join(specs),
        "--overwrite",
    ]
    start = time.perf_counter()
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"),
        check=False,
    )
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return {"seconds": seconds, "command": " ".join(command[1:])}


# ---- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--features",
        default=",".join(DEFAULT_FEATURES),
        help="features measured one by one (plus all of them together); default: every default feature",
    )
    parser.add_argument("--weights", default="tiny", choices=WEIGHTS_MODES)
    parser.add_argument(
        "--device",
        default="cpu",
        help="model-only device (cpu, cuda); the build uses CUDA whenever there is one",
    )
    parser.add_argument("--res", default="256x176", help="stored resolution HxW")
    parser.add_argument(
        "--images",
        type=int,
        default=192,
        help="images per build (6 micro-batches of 32: two or more per worker with --workers 2)",
    )
    parser.add_argument("--model-images", type=int, default=64, help="images of the model-only runs")
    parser.add_argument(
        "--cli",
        default="full",
        choices=("all", "full", "none"),
        help="which entries also get a `posedata build` subprocess timing",
    )
    parser.add_argument("--entries", default="both", choices=("each", "full", "both"), help="end-to-end builds of each feature alone, of the full set, or both")
    parser.add_argument("--no-scaling", action="store_true", help="skip the --workers 2 vs 1 builds")
    parser.add_argument("--no-bracket", action="store_true", help="skip the second model-only run after the builds")
    parser.add_argument(
        "--scaling-features",
        default=None,
        help="features of the --workers 2 vs 1 builds (default: all of --features)",
    )
    parser.add_argument("--out", default=str(RESULTS / "extraction.json"))
    parser.add_argument(
        "--render",
        metavar="JSON",
        help="only print (and write beside it) the table of an earlier run's JSON",
    )
    args = parser.parse_args()
    if args.render:
        render_earlier(args.render, markdown)
        return

    import ray

    logging.getLogger("ray").setLevel(logging.ERROR)
    resolution = tuple(int(v) for v in args.res.lower().split("x"))
    specs = [s.strip() for s in args.features.split(",") if s.strip()]
    n = args.images
    tmp = Path(tempfile.mkdtemp(prefix="pdbench"))
    try:
        root = make_photos(tmp / "photos", n)

        def config(root: Path, features: list[str], workers: int = 1) -> BuildConfig:
            return BuildConfig(
                source="folder",
                root=str(root),
                out=str(tmp / "out" / "ds"),
                resolution=resolution,
                features=features,
                weights=args.weights,
                executor="ray",
                workers=workers,
                overwrite=True,
            )

        # Model only, every extractor once (dependencies included), on N images.
        started = time.perf_counter()
        m = min(args.model_images, n)
        samples = stored_images(root, resolution, m)
        decode_seconds = time.perf_counter() - started
        all_specs = dependency_order(specs)
        print(
            f"model-only: {len(all_specs)} extractors on {m} images at {args.res} ({args.weights}, {args.device})",
            flush=True,
        )
        models = model_only(all_specs, samples, config(root, all_specs), args.device)

        started = time.perf_counter()
        posedata.pipeline.init_ray(None)  # the embedded Ray `posedata build` starts
        ray_start = time.perf_counter() - started
        resources = ray.cluster_resources()

        each = [(spec, dependency_order([spec])) for spec in specs] if args.entries in ("each", "both") else []
        full = [("full set", all_specs)] if len(specs) > 1 and args.entries in ("full", "both") else []
        entries = each + full
        rows: list[dict] = []
        result = {
            "command": "python bench/extraction.py " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": git_commit(),
            "machine": machine(),
            "load_average_at_start": os.getloadavg(),
            "ray_resources": {k: v for k, v in resources.items() if k in ("CPU", "GPU")},
            "ray_start_seconds": ray_start,
            "settings": {
                "weights": args.weights,
                "device": args.device,
                "resolution": list(resolution),
                "images": n,
                "model_images": m,
                "micro_batch": MICRO_BATCH,
                "workers": 1,
            },
            "decode_only": {
                "seconds": decode_seconds,
                "images": m,
                "images_per_s": m / decode_seconds,
                "what": "posedata.build.decode_rows (read, decode 750x1101 JPEG, resize, JPEG q95) + decode_jpeg_rgb, one process",
            },
            "model_only": models,
            "entries": rows,
            "scaling": None,
            "complete": False,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        for label, chain in entries:
            print(f"end to end: {label} ({', '.join(chain)})", flush=True)
            timed = timed_build(config(root, chain), tmp / "timeline.jsonl", chain[-1])
            row = {
                "feature": label,
                "extractors": chain,
                "batch_size": {s: models[s]["batch_size"] for s in chain},
                **model_bound(models, chain, resources),
                "e2e_images_per_s": timed["span_images_per_s"],
                "e2e_steady_images_per_s": timed["steady_images_per_s"],
                "e2e_inprocess_wall_images_per_s": n / timed["wall_seconds"],
                "timed_build": timed,
            }
            row["efficiency"] = row["e2e_images_per_s"] / row["model_only_images_per_s"]
            if args.device.startswith("cuda"):
                import torch
                from limits import extraction_bound_of, load_limits

                bound = extraction_bound_of(chain, torch.cuda.get_device_name(0), load_limits())
                if bound:
                    row["gpu_bound"] = {"gpu": bound[0], "images_per_s": bound[1], "e2e_fraction": row["e2e_images_per_s"] / bound[1],
                                        "model_only_fraction": row["model_only_images_per_s"] / bound[1]}
            if args.cli == "all" or (args.cli == "full" and (label == "full set" or len(entries) == 1)):
                cli = cli_build(root, tmp / "cli" / "ds", chain, args)
                row["cli_wall_seconds"] = cli["seconds"]
                row["e2e_wall_images_per_s"] = n / cli["seconds"]
                row["cli_command"] = cli["command"]
            rows.append(row)
            out.write_text(json.dumps(result, indent=2) + "\n")  # what there is so far
            print(
                "  " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k not in ("extractors", "batch_size", "timed_build")}),
                flush=True,
            )

        if rows and not args.no_bracket:
            # Model-only again, after the builds: on a shared machine the load changes over
            # the minutes between the two, so each build is compared with the mean of the
            # model-only runs before and after it.
            print(f"model-only again: {len(all_specs)} extractors", flush=True)
            after = model_only(all_specs, samples, config(root, all_specs), args.device)
            result["model_only_after"] = after
            for row in rows:
                before_rate = row["model_only_images_per_s"]
                after_rate = model_bound(after, row["extractors"], resources)["model_only_images_per_s"]
                row.update(model_only_before_images_per_s=before_rate, model_only_after_images_per_s=after_rate,
                           model_only_images_per_s=(before_rate + after_rate) / 2)
                row["efficiency"] = row["e2e_images_per_s"] / row["model_only_images_per_s"]
            out.write_text(json.dumps(result, indent=2) + "\n")

        if not args.no_scaling:
            chain = dependency_order([f.strip() for f in args.scaling_features.split(",")]) if args.scaling_features else all_specs
            timed = {}
            for workers in (1, 2):
                print(f"scaling: {', '.join(chain)}, --workers {workers}", flush=True)
                timed[workers] = timed_build(config(root, chain, workers), tmp / "timeline.jsonl", chain[-1])
            result["scaling"] = {
                "features": chain,
                "workers": timed,
                "ratio_2_vs_1": timed[2]["span_images_per_s"] / timed[1]["span_images_per_s"],
                "wall_ratio_2_vs_1": timed[1]["wall_seconds"] / timed[2]["wall_seconds"],
            }
            if args.device == "cpu":
                # The slowest model that needs no other feature's outputs (those are fed in the build only).
                heaviest = max(
                    (s for s in chain if s in models and not extractor_class(s).requires),
                    key=lambda s: models[s]["seconds"],
                )
                print(
                    f"machine ceiling: {heaviest} model-only in 1 vs 2 processes at once",
                    flush=True,
                )
                result["scaling"]["machine_ceiling"] = machine_ceiling(heaviest, root, resolution, m, args.weights)
            out.write_text(json.dumps(result, indent=2) + "\n")
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result["complete"] = True
    result["load_average_at_end"] = os.getloadavg()
    write_report(out, result, markdown)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs, {gpu}; python {platform.python_version()}, torch {torch.__version__}"


def fmt(value, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    s = result["settings"]
    end = result.get("load_average_at_end", [float("nan")])[0]
    lines = [
        f"- command: `{result['command']}`",
        f"- date: {result['date']}; git {result['git']}",
        f"- machine: {result['machine']}; Ray resources {result['ray_resources']}; load average {result['load_average_at_start'][0]:.1f} at the start, {end:.1f} at the end",
        f"- builds of {s['images']} photos (750x1101 JPEG) stored at {s['resolution'][0]}x{s['resolution'][1]}, weights `{s['weights']}`, one worker holding every extractor, micro-batch {s['micro_batch']}; model-only on `{s['device']}` over {s['model_images']} images; Ray start-up {result['ray_start_seconds']:.1f} s",
        f"- decode only (read, decode, resize, store as JPEG, decode again; one process): {result['decode_only']['images_per_s']:.1f} images/s",
        "- e2e = images / (first micro-batch started by any extractor -> last one ended by the last extractor): no start-up, but every wait on decode, fill and drain included",
        "- model-only: one extractor alone, or for several their bound (see the column); steady = the last extractor's rate after its first block",
        "",
        "| feature | batch | model-only img/s (bound) | e2e img/s | **efficiency** (e2e / model-only) | e2e steady img/s | in the worker img/s (per extractor) | in-process build wall img/s (s) | `posedata build` wall img/s (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["entries"]:
        timed = row["timed_build"]
        batch = ", ".join(str(b) for b in dict.fromkeys(row["batch_size"].values()))
        name = row["feature"] + (" (" + " + ".join(row["extractors"]) + ")" if len(row["extractors"]) > 1 and row["feature"] != "full set" else "")
        bound = "" if row["model_only_bound"] == "sequential" else f" ({row['model_only_bound']}; one after the other {row['model_only_sequential_images_per_s']:.2f})"
        if "model_only_after_images_per_s" in row:
            bound += f" (mean of {row['model_only_before_images_per_s']:.2f} before and {row['model_only_after_images_per_s']:.2f} after the builds)"
        actor = ", ".join(fmt(timed["actor_images_per_s"].get(e)) for e in row["extractors"])
        wall = f"{fmt(row.get('e2e_wall_images_per_s'), 2)} ({row['cli_wall_seconds']:.0f} s)" if "cli_wall_seconds" in row else ""
        lines.append(
            f"| {name} | {batch} | {fmt(row['model_only_images_per_s'], 2)}{bound} | {fmt(row['e2e_images_per_s'], 2)} | **{fmt(row['efficiency'], 2)}** | {fmt(row['e2e_steady_images_per_s'], 2)} "
            f"| {actor} | {fmt(row['e2e_inprocess_wall_images_per_s'], 2)} ({timed['wall_seconds']:.0f} s) | {wall} |"
        )
    bounded = [row for row in result["entries"] if row.get("gpu_bound")]
    if bounded:
        lines += ["", "Against the physical bound of the GPU (`bench/limits.py`: dense bf16 peak / FLOPs per image, at the resolution it counted):", ""]
        for row in bounded:
            b = row["gpu_bound"]
            lines.append(f"- {row['feature']}: e2e {row['e2e_images_per_s']:.1f} images/s = **{100 * b['e2e_fraction']:.1f} %** of the {b['gpu']} bound {b['images_per_s']:,.0f} images/s (model-only {100 * b['model_only_fraction']:.1f} %)")
    # The projection is for what a build computes: the full set, or the one feature measured.
    full = [row for row in result["entries"] if row["feature"] == "full set"] or (result["entries"] if len(result["entries"]) == 1 else [])
    if full:
        rate = full[0]["e2e_images_per_s"]
        gpus = result["ray_resources"].get("GPU")
        where = f"{gpus:g} GPU(s)" if gpus else f"{result['ray_resources'].get('CPU', 0):g} CPUs"
        lines += [
            "",
            f"Projected time for DeepFashion's {DEEPFASHION_IMAGES:,} images at the e2e rate of {full[0]['feature']} ({rate:.2f} images/s on {where}): {DEEPFASHION_IMAGES / rate / 60:,.1f} minutes.",
        ]
    if result["scaling"]:
        sc = result["scaling"]
        workers = {int(k): v for k, v in sc["workers"].items()}  # JSON has "1", "2"
        w1, w2 = workers[1], workers[2]
        lines += [
            "",
            f"Scaling, {', '.join(sc['features'])}: one vs two workers, each holding every extractor (on CPU one torch thread each):",
            "",
            "| --workers | e2e img/s | e2e steady img/s | in the worker img/s (per worker, per extractor) | build wall, in-process (s) |",
            "|---|---|---|---|---|",
            f"| 1 | {fmt(w1['span_images_per_s'], 2)} | {fmt(w1['steady_images_per_s'], 2)} | {', '.join(fmt(v) for v in w1['actor_images_per_s'].values())} | {w1['wall_seconds']:.1f} |",
            f"| 2 | {fmt(w2['span_images_per_s'], 2)} | {fmt(w2['steady_images_per_s'], 2)} | {', '.join(fmt(v) for v in w2['actor_images_per_s'].values())} | {w2['wall_seconds']:.1f} |",
            f"| **2 vs 1** | **{fmt(sc['ratio_2_vs_1'], 2)}x** | | | {sc['wall_ratio_2_vs_1']:.2f}x |",
        ]
        ceiling = sc.get("machine_ceiling")
        if ceiling:
            processes = {int(k): v for k, v in ceiling["processes"].items()}
            lines += [
                "",
                (
                    f"Machine ceiling: {ceiling['feature']} model-only, one torch thread per process, no Ray, {ceiling['images']} images: "
                    f"1 process {processes[1]['images_per_s']:.2f} images/s, 2 processes at once {processes[2]['images_per_s']:.2f} images/s "
                    f"({' + '.join(f'{v:.2f}' for v in processes[2]['per_process'])}): **{ceiling['ratio_2_vs_1']:.2f}x** is the most two workers can get from this machine; "
                    f"the build reached {fmt(sc['ratio_2_vs_1'], 2)}x."
                ),
            ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
