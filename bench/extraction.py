"""Extraction efficiency and CPU scaling of `posedata build` (a script to run by hand, not a test).

    python bench/extraction.py                                   # CPU, tiny models (~10 min on 2 cores)
    python bench/extraction.py --device cuda --weights random --images 512
    python bench/extraction.py --features openpose,vae:sd21 --weights random --images 16 --no-scaling

For each feature (and for the full feature set) it measures, at the same batch size:

- **model-only images/s**: `extractor(batch)` (the extractor's `__call__`, outputs returned as
  numpy) on images already decoded at the stored resolution, exactly the micro-batches the
  build forms (32 consecutive samples, cut into the extractor's batch size), after one
  warm-up batch; one torch thread on CPU, as the build's actors run. A feature that requires
  another (clip_regions reads parsing) is measured with it, as the build runs it. Full set:
  every extractor one after the other on the same images (the sum of their times).
- **end-to-end images/s**, two ways:
  - *steady*: the Ray build in this process with Ray already started, of N and of 2N
    images; N / (T(2N) - T(N)). The difference cancels every fixed cost (Ray start-up,
    actor and model set-up, scan, card): the pipeline's own throughput (decode + resize +
    JPEG, extract, encode, write).
  - *wall*: `posedata build` as a user types it, in a subprocess, on the 2N images, timed
    from start to exit (imports, Ray start, models, everything); 2N / wall.
- **efficiency** = end-to-end (steady) / model-only. The goal is >= 0.85.
- **scaling**: a CPU build with `--workers 2` vs `--workers 1` (of the full set, or of
  `--scaling-features`), steady throughput ratio (the goal is >= 1.8x).

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
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from posedata.build import BuildConfig, build, decode_rows, make_plan, upstream_folders  # noqa: E402
from posedata.extractors import DEFAULT_FEATURES, create_extractor, dependency_order, extractor_class  # noqa: E402
from posedata.extractors.base import Sample  # noqa: E402
from posedata.images import decode_jpeg_rgb  # noqa: E402
from posedata.pipeline import Job, micro_batches  # noqa: E402
from posedata.shards import decode_output, encode_output  # noqa: E402

FIXTURES = Path(os.environ.get("POSEDATA_FIXTURES", REPO.parent / "shared" / "fixtures")) / "deepfashion"
RESULTS = REPO / "bench" / "results"
MICRO_BATCH = Job.micro_batch  # the build's fixed micro-batch (posedata.pipeline)
GROUP = 8  # photos per group folder


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
    rows = decode_rows([{"key": p.stem, "split": "train", "group": p.parent.name, "path": str(p), "annotations": ""} for p in paths], *resolution)
    return [Sample(key=r["key"], image=decode_jpeg_rgb(r["jpg"]), annotations={}, original_size=(r["original_height"], r["original_width"])) for r in rows]


def model_only(specs: list[str], samples: list[Sample], config: BuildConfig, device: str) -> dict[str, dict]:
    """Seconds and images/s of each extractor of `specs` (in dependency order) on `samples`, in
    the build's micro-batches; a required feature's outputs are fed the way the build feeds
    them (encoded as stored, decoded)."""
    import torch

    if device == "cpu":
        torch.set_num_threads(1)  # as each of the build's actors
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
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        outputs: list[dict] = []
        sync()
        start = time.perf_counter()
        for batch in batches:
            outputs += extractor(batch)
        sync()
        seconds = time.perf_counter() - start
        done[spec] = outputs
        results[spec] = {"seconds": seconds, "images": len(samples), "images_per_s": len(samples) / seconds, "batch_size": min(size, MICRO_BATCH)}
        del extractor
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    for sample in samples:
        for key in [k for k in sample if k not in ("key", "image", "annotations", "original_size")]:
            del sample[key]
    return results


# ---- end to end ------------------------------------------------------------------------------------


def inprocess_build(config: BuildConfig) -> float:
    start = time.perf_counter()
    build(config, echo=lambda _: None)
    return time.perf_counter() - start


def cli_build(root: Path, out: Path, specs: list[str], args) -> dict:
    command = [str(Path(sys.executable).with_name("posedata")), "build", "folder", "--root", str(root), "--out", str(out), "--res", args.res, "--weights", args.weights, "--features", ",".join(specs), "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"), check=False)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return {"seconds": seconds, "command": " ".join(command[1:])}


# ---- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", default=",".join(DEFAULT_FEATURES), help="features measured one by one (plus all of them together); default: every default feature")
    parser.add_argument("--weights", default="tiny", choices=("tiny", "random", "pretrained"))
    parser.add_argument("--device", default="cpu", help="model-only device (cpu, cuda); the build uses CUDA whenever there is one")
    parser.add_argument("--res", default="256x176", help="stored resolution HxW")
    parser.add_argument("--images", type=int, default=96, help="N: builds of N and 2N images")
    parser.add_argument("--cli", default="full", choices=("all", "full", "none"), help="which entries also get a `posedata build` subprocess timing")
    parser.add_argument("--no-scaling", action="store_true", help="skip the --workers 2 vs 1 builds")
    parser.add_argument("--scaling-features", default=None, help="features of the --workers 2 vs 1 builds (default: all of --features)")
    parser.add_argument("--out", default=str(RESULTS / "extraction.json"))
    args = parser.parse_args()

    import ray

    logging.getLogger("ray").setLevel(logging.ERROR)
    resolution = tuple(int(v) for v in args.res.lower().split("x"))
    specs = [s.strip() for s in args.features.split(",") if s.strip()]
    n = args.images
    tmp = Path(tempfile.mkdtemp(prefix="pdbench"))
    try:
        root_n, root_2n = make_photos(tmp / "n", n), make_photos(tmp / "2n", 2 * n)

        def config(root: Path, features: list[str], workers: int = 1) -> BuildConfig:
            return BuildConfig(source="folder", root=str(root), out=str(tmp / "out" / "ds"), resolution=resolution, features=features, weights=args.weights, executor="ray", workers=workers, overwrite=True)

        # Model only, every extractor once (dependencies included), on N images.
        started = time.perf_counter()
        samples = stored_images(root_n, resolution, n)
        decode_seconds = time.perf_counter() - started
        all_specs = dependency_order(specs)
        print(f"model-only: {len(all_specs)} extractors on {n} images at {args.res} ({args.weights}, {args.device})", flush=True)
        models = model_only(all_specs, samples, config(root_n, all_specs), args.device)

        started = time.perf_counter()
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level=logging.WARNING)
        ray_start = time.perf_counter() - started
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.issue_detectors_config.detectors = []  # memory hints, printed every 30 s
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        resources = ray.cluster_resources()

        entries = [(spec, dependency_order([spec])) for spec in specs] + ([("full set", all_specs)] if len(specs) > 1 else [])
        rows: list[dict] = []
        result = {
            "command": "python bench/extraction.py " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
            "machine": machine(),
            "load_average_at_start": os.getloadavg(),
            "ray_resources": {k: v for k, v in resources.items() if k in ("CPU", "GPU")},
            "ray_start_seconds": ray_start,
            "settings": {"weights": args.weights, "device": args.device, "resolution": list(resolution), "images": n, "micro_batch": MICRO_BATCH, "workers": 1},
            "decode_only": {"seconds": decode_seconds, "images": n, "images_per_s": n / decode_seconds, "what": "posedata.build.decode_rows (read, decode 750x1101 JPEG, resize, JPEG q95) + decode_jpeg_rgb, one process"},
            "model_only": models,
            "entries": rows,
            "scaling": None,
            "complete": False,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        for label, chain in entries:
            print(f"end to end: {label} ({', '.join(chain)})", flush=True)
            t_n = inprocess_build(config(root_n, chain))
            t_2n = inprocess_build(config(root_2n, chain))
            model_seconds = sum(models[s]["seconds"] for s in chain)
            row = {
                "feature": label,
                "extractors": chain,
                "batch_size": {s: models[s]["batch_size"] for s in chain},
                "model_only_images_per_s": n / model_seconds,
                "build_n_seconds": t_n,
                "build_2n_seconds": t_2n,
                "e2e_steady_images_per_s": n / (t_2n - t_n) if t_2n > t_n else None,
                "e2e_inprocess_wall_images_per_s": 2 * n / t_2n,
            }
            row["efficiency"] = row["e2e_steady_images_per_s"] / row["model_only_images_per_s"] if row["e2e_steady_images_per_s"] else None
            if args.cli == "all" or (args.cli == "full" and (label == "full set" or len(entries) == 1)):
                cli = cli_build(root_2n, tmp / "cli" / "ds", chain, args)
                row["cli_wall_seconds"] = cli["seconds"]
                row["e2e_wall_images_per_s"] = 2 * n / cli["seconds"]
                row["cli_command"] = cli["command"]
            rows.append(row)
            out.write_text(json.dumps(result, indent=2) + "\n")  # what there is so far
            print("  " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k not in ("extractors", "batch_size")}), flush=True)

        if not args.no_scaling:
            chain = dependency_order([f.strip() for f in args.scaling_features.split(",")]) if args.scaling_features else all_specs
            steady = {}
            for workers in (1, 2):
                print(f"scaling: {len(chain)} extractors, --workers {workers}", flush=True)
                t_n = inprocess_build(config(root_n, chain, workers))
                t_2n = inprocess_build(config(root_2n, chain, workers))
                steady[workers] = {"build_n_seconds": t_n, "build_2n_seconds": t_2n, "e2e_steady_images_per_s": n / (t_2n - t_n) if t_2n > t_n else None}
            ratio = steady[2]["e2e_steady_images_per_s"] / steady[1]["e2e_steady_images_per_s"] if steady[1]["e2e_steady_images_per_s"] and steady[2]["e2e_steady_images_per_s"] else None
            wall_ratio = steady[1]["build_2n_seconds"] / steady[2]["build_2n_seconds"]
            result["scaling"] = {"features": chain, "workers": steady, "ratio_2_vs_1": ratio, "wall_ratio_2_vs_1": wall_ratio}
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result["complete"] = True
    result["load_average_at_end"] = os.getloadavg()
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print()
    print(table)


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
    lines = [
        f"- command: `{result['command']}`",
        f"- date: {result['date']}; git {result['git']}",
        f"- machine: {result['machine']}; Ray resources {result['ray_resources']}; load average {result['load_average_at_start'][0]:.1f} at the start, {result['load_average_at_end'][0]:.1f} at the end",
        f"- decode only (read, decode, resize, store as JPEG, decode again; one process): {result['decode_only']['images_per_s']:.1f} images/s",
        f"- {s['images']} / {2 * s['images']} images (750x1101 JPEG) stored at {s['resolution'][0]}x{s['resolution'][1]}, weights `{s['weights']}`, model-only on `{s['device']}`, one actor per extractor, micro-batch {s['micro_batch']}; Ray start-up {result['ray_start_seconds']:.1f} s",
        "",
        "| feature | batch | model-only img/s | e2e steady img/s | efficiency (steady / model) | e2e in-process wall img/s | `posedata build` wall img/s (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["entries"]:
        batch = ", ".join(str(b) for b in dict.fromkeys(row["batch_size"].values()))
        wall = f"{fmt(row.get('e2e_wall_images_per_s'), 2)} ({row['cli_wall_seconds']:.0f} s)" if "cli_wall_seconds" in row else ""
        lines.append(f"| {row['feature']}{' (' + ' + '.join(row['extractors']) + ')' if len(row['extractors']) > 1 and row['feature'] != 'full set' else ''} | {batch} | {fmt(row['model_only_images_per_s'])} | {fmt(row['e2e_steady_images_per_s'])} | {fmt(row['efficiency'], 2)} | {fmt(row['e2e_inprocess_wall_images_per_s'])} | {wall} |")
    if result["scaling"]:
        sc = result["scaling"]
        w1, w2 = sc["workers"][1], sc["workers"][2]
        lines += [
            "",
            f"Scaling on CPU, {', '.join(sc['features'])}: one vs two actors per extractor (one torch thread each):",
            "",
            "| --workers | e2e steady img/s | build of 2N, s |",
            "|---|---|---|",
            f"| 1 | {fmt(w1['e2e_steady_images_per_s'])} | {w1['build_2n_seconds']:.1f} |",
            f"| 2 | {fmt(w2['e2e_steady_images_per_s'])} | {w2['build_2n_seconds']:.1f} |",
            f"| 2 vs 1 | {fmt(sc['ratio_2_vs_1'], 2)}x | {sc['wall_ratio_2_vs_1']:.2f}x |",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
