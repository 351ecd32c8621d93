"""Can the loader feed the GPU? The reader's samples/s per CPU core for each plugin's
feature set at paper size, from local disk and from an S3 server on loopback, against the
H100 bound of bench/limits.py (a script to run by hand, not a test).

    python bench/limits.py                         # first: the paper-size dataset and the bounds
    python bench/reader.py                         # every plugin, local disk and S3, ~7 min on 2 cores
    python bench/reader.py --compare-ref f35e031   # also the reader of an older commit, in the same turns
    python bench/reader.py --plugins pcdm-prior --targets local --seconds 3

The dataset: the 3 paper-size samples (512x352, every default feature, full-size random
weights, fp16) that bench/limits.py built, repeated into `--samples` samples in groups of 4
(12 ordered pairs per group, against DeepFashion's ~2 per image, so each shard read serves
more pairs: read the per-pair cost of decoding with that in mind) and shards of
`--shard-size`, written as a posedata dataset (tars, manifest, pairs, card) under
bench/results/reader_data/; for S3 the same files in a bucket of moto's server, started in
its own process on 127.0.0.1.

Per plugin and target, in one process (what one DataLoader worker does):

- **reader**: the plugin's stream (`PairStream`, or `GroupStream` for IMAGPose) with the
  plugin's `reads`, items per second (an item = one training sample: a pair, or a group of
  four); MB/s = items/s x the stored bytes of the features a sample hands over (with the
  shard cache those bytes come from memory after the first epoch: it is what the plugin
  gets, not what the disk delivered).
- **loader**: `posedata.train.run.batches_factory` (the stream + the plugin's collate into
  tensors, batches of --batch-size, 0 DataLoader workers): what `posedata train` runs.

Against the H100 SXM bound (samples/s of the paper-size step, bench/results/limits.json):
workers needed = bound / loader samples/s; and reader / (bound / W), W = `--workers-per-gpu`
(8: half the 16 cores per GPU of an H100 node): the goal is >= 4.

Each round measures every variant once in turn (new and, with --compare-ref, old), so a
busy machine slows them alike; the median round is reported.

Writes bench/results/reader.json and reader.md, and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from report import git_commit, write_report  # bench/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
LIMITS_DATA = RESULTS / "limits_data" / "random-512x352" / "ds"
DATA = RESULTS / "reader_data"
BUCKET = "bench"
GROUP = 4


# ---- the dataset -----------------------------------------------------------------------------------


def tar_members(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {suffix: bytes}} of a posedata tar."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, suffix = member.name.partition(".")
            out.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return out


def replicate(source: Path, out: Path, samples: int, shard_size: int) -> Path:
    """A posedata dataset of `samples` samples (groups of GROUP, shards of `shard_size`)
    repeating the samples of the dataset at `source`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(REPO))
    from posedata.shards import tar_bytes

    if (out / "dataset.json").is_file():
        card = json.loads((out / "dataset.json").read_text())
        if card["counts"]["written"] == samples and card.get("bench_shard_size") == shard_size:
            return out
    shutil.rmtree(out, ignore_errors=True)
    card = json.loads((source / "dataset.json").read_text())
    manifest = pq.read_table(source / "manifest.parquet")
    pairs_schema = pq.read_schema(source / "pairs" / "train.parquet")
    rows = manifest.to_pylist()
    base = tar_members(source / "shards" / f"{rows[0]['shard']}.tar")
    sidecars = {folder: tar_members(source / "features" / folder / f"{rows[0]['shard']}.tar") for folder in card["features"]}
    new_rows, pair_rows, shards = [], [], []
    for start in range(0, samples, shard_size):
        shard = f"train-{len(shards):06d}"
        shards.append(shard)
        keys = []
        for i in range(start, min(start + shard_size, samples)):
            src = rows[i % len(rows)]
            key = f"g{i // GROUP:05d}_{i % GROUP}"
            keys.append((key, src["key"]))
            new_rows.append({**src, "key": key, "group": f"g{i // GROUP:05d}", "shard": shard, "index": i - start})
        (out / "shards").mkdir(parents=True, exist_ok=True)
        (out / "shards" / f"{shard}.tar").write_bytes(tar_bytes([{"__key__": k, **base[s]} for k, s in keys]))
        for folder, members in sidecars.items():
            (out / "features" / folder).mkdir(parents=True, exist_ok=True)
            (out / "features" / folder / f"{shard}.tar").write_bytes(tar_bytes([{"__key__": k, **members[s]} for k, s in keys]))
    groups: dict[str, list[dict]] = {}
    for r in new_rows:
        groups.setdefault(r["group"], []).append(r)
    for members in groups.values():
        pair_rows += [{"split": "train", "source_key": a["key"], "target_key": b["key"], "shard": a["shard"]} for a in members for b in members if a is not b]
    pq.write_table(pa.Table.from_pylist(new_rows, schema=manifest.schema), out / "manifest.parquet")
    (out / "pairs").mkdir()
    pq.write_table(pa.Table.from_pylist(pair_rows, schema=pairs_schema), out / "pairs" / "train.parquet")
    shutil.copytree(source / "meta", out / "meta")
    card["splits"] = {"train": {"samples": samples, "shards": shards, "pairs": len(pair_rows), "pairs_across_shards": 0, "pairs_dropped": 0,
                                "pairs_origin": f"bench/reader.py: all ordered pairs within groups of {GROUP}"}}
    card["counts"] = {"inputs": samples, "written": samples, "rejected": 0}
    card["bench_shard_size"] = shard_size
    (out / "dataset.json").write_text(json.dumps(card, indent=2))
    return out


def start_s3(root: Path) -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process (not this one: its threads would share our GIL),
    with the dataset uploaded."""
    import socket

    import fsspec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", f"from moto.server import ThreadedMotoServer; s = ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False); s.start(); import time\nwhile True: time.sleep(60)"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    for _ in range(100):
        try:
            fs = fsspec.filesystem("s3", endpoint_url=endpoint, skip_instance_cache=True)
            fs.mkdir(BUCKET)
            break
        except Exception:  # noqa: BLE001 - the server is still starting
            time.sleep(0.2)
    fs.put(str(root), f"{BUCKET}/{root.name}", recursive=True)
    return server, endpoint


# ---- one measurement (run in a subprocess, with the code under test first on sys.path) -------------


def measure(url: str, storage_options: dict, plugin_name: str, batch_size: int, seconds: float) -> dict[str, Any]:
    import torch

    from posedata.reader import Dataset, GroupStream, PairStream, _tar_samples
    from posedata.train import plugin_class
    from posedata.train.run import batches_factory, load_null_embeddings

    torch.set_num_threads(1)
    dataset = Dataset(url, storage_options)
    plugin = plugin_class(plugin_name)(dataset.card, weights="random")
    plugin.set_null_embeddings(load_null_embeddings(dataset, plugin))
    stream_cls = GroupStream if getattr(plugin, "stream", "pairs") == "groups" else PairStream
    options = {"reads": getattr(plugin, "reads", None)} if "reads" in inspect.signature(PairStream.__init__).parameters else {}

    def rate(iterator, per_item: int) -> tuple[float, int]:
        next(iterator)  # warm-up: the first shard, the first decodes
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            next(iterator)
            count += per_item
        return count / (time.perf_counter() - start), count

    stream = stream_cls(dataset, "train", plugin.needs, pixels=plugin.needs_pixels, seed=0, **options)
    reader, items = rate(iter(stream), 1)
    uncached = None
    if "cache_bytes" in inspect.signature(PairStream.__init__).parameters:
        # every shard read from storage each time, as a dataset larger than the cache is
        uncached, _ = rate(iter(stream_cls(dataset, "train", plugin.needs, pixels=plugin.needs_pixels, seed=0, cache_bytes=0, **options)), 1)
    loader, samples = rate(batches_factory(dataset, plugin, "train", batch_size, 0)(0, 0), batch_size)
    # stored bytes a training sample hands over: the sample's members of the columns read
    columns = stream.columns
    per_image = {}
    for c in columns:
        shard = dataset.shards("train")[0]
        parts = list(_tar_samples(dataset.location, dataset.location.sidecar(c.folder, shard)))
        names = {s.rsplit(".", 1)[0] for s in c.suffixes}
        per_image[c.folder] = sum(len(v) for p in parts for k, v in p.items() if k.split(".")[0] in names) / len(parts)
    images = 4 if stream_cls is GroupStream else 2
    return {"reader_items_per_s": reader, "reader_uncached_items_per_s": uncached, "loader_samples_per_s": loader, "items": items, "samples": samples,
            "bytes_per_sample": images * sum(per_image.values()), "columns": {c.alias: list(c.suffixes) for c in columns}}


# ---- main ------------------------------------------------------------------------------------------


def export(ref: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_variant(code: Path, url: str, storage_options: dict, plugin: str, batch_size: int, seconds: float) -> dict[str, Any]:
    script = (f"import json, sys; sys.path.insert(0, {str(code)!r}); sys.path.insert(1, {str(REPO / 'bench')!r}); import reader; "
              f"print('RESULT ' + json.dumps(reader.measure({url!r}, {storage_options!r}, {plugin!r}, {batch_size}, {seconds})))")
    env = {**os.environ, "PYTHONPATH": str(code)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=str(code), check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{plugin} at {code}: {proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plugins", default=None, help="comma-separated (default: every registered plugin)")
    parser.add_argument("--targets", default="local,s3", help="local, s3 or both")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="loader batch")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers-per-gpu", type=int, default=8)
    parser.add_argument("--compare-ref", default=None)
    parser.add_argument("--out", default=str(RESULTS / "reader.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from posedata.train import REGISTRY

    if not (LIMITS_DATA / "dataset.json").is_file():
        raise SystemExit(f"no paper-size dataset at {LIMITS_DATA}: run `python bench/limits.py` first")
    limits = json.loads((RESULTS / "limits.json").read_text())
    data = replicate(LIMITS_DATA, DATA / "ds", args.samples, args.shard_size)
    plugins = [p.strip() for p in (args.plugins or ",".join(REGISTRY)).split(",") if p.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="pdreader"))
    server = None
    try:
        codes = {"new": REPO}
        if args.compare_ref:
            codes[f"at {args.compare_ref}"] = export(args.compare_ref, tmp / "old")
        where = {"local": (str(data), {})}
        if "s3" in targets:
            server, endpoint = start_s3(data)
            where["s3"] = (f"s3://{BUCKET}/{data.name}", {"endpoint_url": endpoint})
        runs: dict[str, dict[str, dict[str, list[dict]]]] = {}
        for round_ in range(args.rounds):
            for plugin in plugins:
                for target in targets:
                    for name, code in codes.items():
                        url, options = where[target]
                        r = run_variant(code, url, options, plugin, args.batch_size, args.seconds)
                        runs.setdefault(plugin, {}).setdefault(target, {}).setdefault(name, []).append(r)
                        print(f"round {round_ + 1}: {plugin} {target} {name}: reader {r['reader_items_per_s']:,.0f} items/s, loader {r['loader_samples_per_s']:,.0f} samples/s", flush=True)
    finally:
        if server is not None:
            server.terminate()
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for plugin, by_target in runs.items():
        bound = next((r["bound_cached"]["H100 SXM"]["samples_per_s"] for r in limits["training"] if r["plugin"] == plugin and "bound_cached" in r), None)
        for target, by_code in by_target.items():
            row = {"plugin": plugin, "target": target, "h100_bound": bound}
            for name, rs in by_code.items():
                row[name] = {
                    "reader_items_per_s": statistics.median(r["reader_items_per_s"] for r in rs),
                    "reader_uncached_items_per_s": statistics.median(r["reader_uncached_items_per_s"] for r in rs) if rs[0].get("reader_uncached_items_per_s") else None,
                    "loader_samples_per_s": statistics.median(r["loader_samples_per_s"] for r in rs),
                    "bytes_per_sample": rs[0]["bytes_per_sample"],
                    "columns": rs[0]["columns"],
                    "rounds": rs,
                }
            new = row["new"]
            if bound:
                row["workers_needed"] = math.ceil(bound / new["loader_samples_per_s"])
                row["reader_vs_bound_per_worker"] = new["reader_items_per_s"] / (bound / args.workers_per_gpu)
                row["loader_vs_bound_per_worker"] = new["loader_samples_per_s"] / (bound / args.workers_per_gpu)
            rows.append(row)
    result = {
        "command": "python bench/reader.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
        "load_average": os.getloadavg(),
        "settings": vars(args),
        "rows": rows,
    }
    write_report(args.out, result, markdown)


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    old = next((k for r in result["rows"] for k in r if k.startswith("at ")), None)
    lines = [
        f"- command: `{result['command']}`",
        f"- date: {result['date']}; git {result['git']}; load average {result['load_average'][0]:.1f} (a shared 2-core machine: read the ratios, measured in turns)",
        f"- {s['samples']} paper-size samples (512x352, fp16, full-size random-init features) in groups of {GROUP}, shards of {s['shard_size']}; one process, "
        f"torch 1 thread; reader = the plugin's stream alone, loader = stream + collate in batches of {s['batch_size']} (0 DataLoader workers); {s['seconds']:g} s per measurement, "
        f"median of {s['rounds']} rounds; bound = H100 SXM samples/s of the paper-size step (bench/limits.py); W = {s['workers_per_gpu']} workers per GPU",
        "",
        "| plugin | from | stored bytes / sample | reader samples/s" + (f" ({old} -> now)" if old else "") + " | reader, no shard cache | MB/s | loader samples/s" + (f" ({old} -> now)" if old else "")
        + " | H100 bound | workers per GPU for the bound (loader) | **reader / (bound / W)** |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        new = r["new"]
        reader = f"{new['reader_items_per_s']:,.0f}"
        loader = f"{new['loader_samples_per_s']:,.0f}"
        if old and old in r:
            reader = f"{r[old]['reader_items_per_s']:,.0f} -> {reader} ({new['reader_items_per_s'] / r[old]['reader_items_per_s']:.1f}x)"
            loader = f"{r[old]['loader_samples_per_s']:,.0f} -> {loader} ({new['loader_samples_per_s'] / r[old]['loader_samples_per_s']:.1f}x)"
        mb = new["reader_items_per_s"] * new["bytes_per_sample"] / 1e6
        bound = f"{r['h100_bound']:,.0f}" if r.get("h100_bound") else ""
        uncached = f"{new['reader_uncached_items_per_s']:,.0f}" if new.get("reader_uncached_items_per_s") else ""
        lines.append(f"| {r['plugin']} | {r['target']} | {new['bytes_per_sample'] / 1e3:,.1f} kB | {reader} | {uncached} | {mb:,.0f} | {loader} | {bound} | {r.get('workers_needed', '')} | "
                     f"**{r.get('reader_vs_bound_per_worker', float('nan')):.1f}** |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
