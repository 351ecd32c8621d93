"""What Ray costs on small work: `posedata build` of a few photos with `--executor local`
and with the default Ray executor, in turns, as a user types it (a script to run by hand,
not a test).

    python bench/small_build.py                                 # 11 photos, default features, tiny models, 3 rounds
    python bench/small_build.py --compare-ref e97cccb           # also the Ray job of an older commit, in the same turns
    python bench/small_build.py --images 40 --rounds 2

Each round runs every variant once, one after the other (local, ray[, ray at REF]), so a
busy machine slows them alike; the table gives each variant's median wall time (process
start to exit: imports, Ray start-up, model set-up, the build, the card) and its ratio to
the local executor in the same round (median over rounds). `--compare-ref` runs the same
command line with the code of another commit, exported with `git archive` into a temporary
folder and put first on PYTHONPATH (the checkout is not touched), with the same --features.

The photos are made from the fixture photos (750x1101 JPEG, DeepFashion's high-res size;
crop, mirror, brightness), 8 per group folder, like bench/extraction.py's.

Writes bench/results/small_build.json (every round) and bench/results/small_build.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from extraction import machine, make_photos  # noqa: E402
from report import git_commit, write_report  # noqa: E402

RESULTS = REPO / "bench" / "results"
# The default feature set of the commits before pose_latent (e97cccb and older): what both
# sides of --compare-ref can build.
COMMON_FEATURES = "openpose,clip,vae:sd21,vae:sd15,dinov2:giant,dinov2:base,parsing,clip_regions,higherhrnet"


def export(ref: str, into: Path) -> Path:
    """The tree of commit `ref`, extracted into `into` (git archive; the checkout is not touched)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def timed_build(photos: Path, out: Path, executor: str, args, code: Path | None) -> dict:
    command = [sys.executable, "-m", "posedata.cli", "build", "folder", "--root", str(photos), "--out", str(out), "--res", args.res, "--weights", args.weights, "--overwrite"]
    if args.features:
        command += ["--features", args.features]
    if executor == "local":
        command += ["--executor", "local"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(code or REPO) + os.pathsep + env.get("PYTHONPATH", "")
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(code or REPO), check=False)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines() + proc.stderr.splitlines()
    return {"seconds": seconds, "output_lines": len(lines), "load_average": os.getloadavg()[0]}


def same_files(a: Path, b: Path) -> bool:
    """Shards, sidecars, manifest, rejects, pairs and markers equal byte for byte (the card
    and the files that name the output folder differ by design)."""

    def files(root: Path) -> dict[str, bytes]:
        keep = ("shards", "features", "_done", "pairs")
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and (p.parts[len(root.parts)] in keep or p.suffix == ".parquet") and p.name != "build.json"}

    return files(a) == files(b)


def markdown(result: dict) -> str:
    variants = result["variants"]
    lines = [
        f"- command: `{result['command']}`",
        f"- date: {result['date']}; git {result['git']}",
        f"- machine: {result['machine']}; load average {result['load_average_at_start']:.1f} at the start, {result['load_average_at_end']:.1f} at the end (a shared machine: read the ratios, measured in turns, not the seconds)",
        f"- `posedata build folder` of {result['images']} photos (750x1101 JPEG) at {result['res']}, weights `{result['weights']}`, features: {result['features'] or 'the default set'}; {result['rounds']} rounds, each variant once per round in turn; wall = process start to exit",
        "",
        "| variant | median wall (s) | rounds (s) | **wall x local** (median of the per-round ratios) | per-round ratios | lines printed (stdout + stderr) |",
        "|---|---|---|---|---|---|",
    ]
    for name in variants:
        rounds = result["rounds_detail"]
        walls = [r[name]["seconds"] for r in rounds]
        ratios = [r[name]["seconds"] / r["local"]["seconds"] for r in rounds]
        printed = rounds[-1][name]["output_lines"]
        lines.append(f"| {name} | {statistics.median(walls):.1f} | {' / '.join(f'{w:.1f}' for w in walls)} | **{statistics.median(ratios):.2f}x** | {' / '.join(f'{x:.2f}' for x in ratios)} | {printed} |")
    if result.get("identical") is not None:
        lines += ["", f"Ray's files equal the local executor's byte for byte: {result['identical']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=11)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--res", default="256x176")
    parser.add_argument("--weights", default="tiny", choices=("tiny", "random"))
    parser.add_argument("--features", default=None, help=f"default: the build's default set (with --compare-ref: {COMMON_FEATURES})")
    parser.add_argument("--compare-ref", default=None, help="also time the Ray build of this git commit, in the same rounds")
    parser.add_argument("--out", default=str(RESULTS / "small_build.json"))
    args = parser.parse_args()
    if args.compare_ref and not args.features:
        args.features = COMMON_FEATURES

    tmp = Path(tempfile.mkdtemp(prefix="pdsmall"))
    try:
        photos = make_photos(tmp / "photos", args.images)
        variants = {"local": ("local", None), "ray": ("ray", None)}
        if args.compare_ref:
            variants[f"ray at {args.compare_ref}"] = ("ray", export(args.compare_ref, tmp / "old"))
        result = {
            "command": "python bench/small_build.py " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": git_commit(),
            "machine": machine(),
            "load_average_at_start": os.getloadavg()[0],
            "images": args.images,
            "res": args.res,
            "weights": args.weights,
            "features": args.features,
            "rounds": args.rounds,
            "variants": list(variants),
            "rounds_detail": [],
        }
        for round_ in range(args.rounds):
            timings = {}
            for name, (executor, code) in variants.items():
                timings[name] = timed_build(photos, tmp / "out" / name.replace(" ", "_"), executor, args, code)
                print(f"round {round_ + 1}: {name}: {timings[name]['seconds']:.1f} s (load average {timings[name]['load_average']:.1f})", flush=True)
            result["rounds_detail"].append(timings)
        result["identical"] = same_files(tmp / "out" / "local", tmp / "out" / "ray")
        result["load_average_at_end"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_report(args.out, result, markdown)


if __name__ == "__main__":
    main()
