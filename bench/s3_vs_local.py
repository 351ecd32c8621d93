"""Build throughput and bytes per sample: into local disk vs into an S3 API server on loopback.

    python bench/s3_vs_local.py                       # writes bench/results/s3_vs_local.{json,md}
    python bench/s3_vs_local.py --images 40 --executors local

A script to run by hand, not a test. It makes ~100 photos from the fixture photos
(`../shared/fixtures/deepfashion`, each one cropped, mirrored and brightened a little
differently; 5 per person folder), then runs the real command line,

    posedata build folder --root PHOTOS --out OUT --res 256x176 --weights tiny --executor E

once per executor (`local`, `ray`) and target: a local folder, and `s3://bench/...` on moto's
S3 server (`moto.server.ThreadedMotoServer`, in this process, 127.0.0.1, no faults; the build
gets `--storage-options {"endpoint_url": ...}` and test credentials in AWS_*).

Each build runs `--repeats` times (default 2), local disk and S3 interleaved so that both see
the same load on a shared machine, and the fastest is reported, with all times in the JSON. Reported per run: images/s as the build reports it (from the start of the build, scan and
model set-up included, to the card written; Ray start-up included for `ray`), the wall time
of the whole command (Python and library imports included), the CPU time of the command and
the processes it waited for (user + system; for `ray`, what the Ray processes reported back
when they were reaped: less exact), and bytes per sample: the sum of
the sizes of every object / file of the dataset divided by the samples written, split into
base shards, feature sidecars and the rest (tables, markers, card, null embeddings).

Loopback S3 measures posedata's and s3fs's overhead (one PUT per object, HEAD / GET / LIST for
markers and the card), not a network: a real bucket adds its latency and bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("POSEDATA_FIXTURES", REPO.parent / "shared" / "fixtures")) / "deepfashion"
POSEDATA = str(Path(sys.executable).with_name("posedata"))
BUCKET = "bench"


def make_photos(root: Path, count: int, per_person: int = 5) -> int:
    """`count` distinct photos from the fixture photos, `per_person` to a folder."""
    sources = sorted(p for p in FIXTURES.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    if not sources:
        raise SystemExit(f"no fixture photos in {FIXTURES}; set POSEDATA_FIXTURES")
    photos = [Image.open(p).convert("RGB") for p in sources]
    for i in range(count):
        photo = photos[i % len(photos)]
        variant = i // len(photos)
        w, h = photo.size
        inset = (variant * 3) % max(1, min(w, h) // 8)
        image = photo.crop((inset, inset, w - inset, h - inset))
        if variant % 2:
            image = ImageOps.mirror(image)
        image = ImageEnhance.Brightness(image).enhance(0.9 + 0.02 * (variant % 10))
        folder = root / f"person_{i // per_person:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:04d}.jpg", quality=95)
    return count


def start_s3():
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    return server, endpoint


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true",
        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
    )
    return env


def dataset_sizes(url: str, storage_options: dict) -> tuple[dict[str, int], str]:
    """Bytes of every object under the dataset, by part; and a digest of the shards' and
    sidecars' contents (names and bytes), to check both targets hold the same data."""
    sys.path.insert(0, str(REPO))
    from posedata.layout import DatasetLocation

    location = DatasetLocation(url, storage_options)
    location.fs.invalidate_cache()
    sizes = {"base shards": 0, "feature sidecars": 0, "other": 0, "objects": 0}
    digest = hashlib.sha256()
    for path, info in sorted(location.fs.find(location.root, detail=True).items()):
        relative = path[len(location.root) + 1 :]
        part = "base shards" if relative.startswith("shards/") else "feature sidecars" if relative.startswith("features/") and relative.endswith(".tar") else "other"
        sizes[part] += int(info["size"])
        sizes["objects"] += 1
        if part != "other":
            digest.update(relative.encode() + b"\0" + location.read_bytes(path))
    sizes["total"] = sizes["base shards"] + sizes["feature sidecars"] + sizes["other"]
    return sizes, digest.hexdigest()


def run_build(photos: Path, out: str, executor: str, args, storage_options: dict | None) -> dict:
    cmd = [POSEDATA, "build", "folder", "--root", str(photos), "--out", out, "--res", args.res, "--weights", "tiny", "--executor", executor, "--overwrite"]
    if args.features:
        cmd += ["--features", args.features]
    if storage_options:
        cmd += ["--storage-options", json.dumps(storage_options)]
    started, cpu_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    here_before = resource.getrusage(resource.RUSAGE_SELF)  # this process serves S3 (moto)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=environment(), check=False)
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    here_after = resource.getrusage(resource.RUSAGE_SELF)
    server_cpu = (here_after.ru_utime + here_after.ru_stime) - (here_before.ru_utime + here_before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    match = re.search(r"written\s+(\d+).*?time\s+([\d.]+) s\s+\(([\d.]+) images/s\)", proc.stdout, re.DOTALL)
    if not match:
        raise SystemExit(f"no build summary in the output of {' '.join(cmd)}:\n{proc.stdout[-2000:]}")
    written, seconds = int(match.group(1)), float(match.group(2))
    sizes, digest = dataset_sizes(out, storage_options or {})
    return {
        "tars_sha256": digest,
        "written": written,
        "build_seconds": seconds,
        "images_per_s": written / seconds,
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "server_cpu_seconds": round(server_cpu, 2),  # moto in this process (S3 runs only)
        "wall_images_per_s": written / wall,
        "bytes": sizes,
        "bytes_per_sample": sizes["total"] / written,
        "base_bytes_per_sample": sizes["base shards"] / written,
        "feature_bytes_per_sample": sizes["feature sidecars"] / written,
    }


def table(runs: list[dict]) -> str:
    lines = [
        "| executor | target | images | build s | images/s | wall s | CPU s | bytes/sample | base shards | sidecars | other | objects |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        b = r["bytes"]
        lines.append(
            f"| {r['executor']} | {r['target']} | {r['written']} | {r['build_seconds']:.1f} | {r['images_per_s']:.2f} | {r['wall_seconds']:.1f} | {r['cpu_seconds']:.1f} | "
            f"{r['bytes_per_sample']:,.0f} | {r['base_bytes_per_sample']:,.0f} | {r['feature_bytes_per_sample']:,.0f} | {b['other'] / r['written']:,.0f} | {b['objects']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--res", default="256x176")
    parser.add_argument("--features", default="", help="--features for the build (default: posedata's default set)")
    parser.add_argument("--executors", default="local,ray")
    parser.add_argument("--repeats", type=int, default=2, help="builds per executor and target; the table shows the fastest")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "s3_vs_local.json"))
    args = parser.parse_args()

    for k in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[k]
    os.environ.update({k: v for k, v in environment().items() if k.startswith("AWS_")})  # for the size listing here
    server, endpoint = start_s3()
    runs = []
    try:
        with tempfile.TemporaryDirectory(prefix="posedata-bench-") as tmp:
            photos = Path(tmp) / "photos"
            make_photos(photos, args.images)
            targets = {
                executor: (
                    ("local disk", str(Path(tmp) / f"ds-{executor}"), None),
                    ("S3 (moto, loopback)", f"s3://{BUCKET}/ds-{executor}", {"endpoint_url": endpoint}),
                )
                for executor in args.executors.split(",")
            }
            tries: dict[tuple[str, str], list[dict]] = {}
            # Interleaved (local disk, S3, local disk, S3, ...) so that both see the same load.
            for attempt in range(args.repeats):
                for executor, pair in targets.items():
                    for target, out, options in pair:
                        print(f"building with --executor {executor} into {out} ({attempt + 1} of {args.repeats}) ...", file=sys.stderr, flush=True)
                        result = run_build(photos, out, executor, args, options)
                        tries.setdefault((executor, target), []).append(result)
                        print(table([{"executor": executor, "target": target, **result}]).splitlines()[-1], file=sys.stderr, flush=True)
            for (executor, target), results in tries.items():
                best = min(results, key=lambda r: r["build_seconds"])
                runs.append(
                    {
                        "executor": executor,
                        "target": target,
                        **best,
                        "all_build_seconds": [r["build_seconds"] for r in results],
                        "all_cpu_seconds": [r["cpu_seconds"] for r in results],
                    }
                )
    finally:
        server.stop()

    same = {}
    for executor in args.executors.split(","):
        pair = [r for r in runs if r["executor"] == executor]
        same[executor] = pair[0]["bytes"] == pair[1]["bytes"] and pair[0]["tars_sha256"] == pair[1]["tars_sha256"]
    results = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {"images": args.images, "res": args.res, "features": args.features or "default", "weights": "tiny", "repeats": args.repeats},
        "load_average_after": os.getloadavg(),
        "runs": runs,
        "same_bytes_local_vs_s3": same,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    markdown = table(runs)
    out.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nsame bytes on local disk and in S3 (sizes, and sha256 of every tar): {same}\nwritten: {out}, {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
