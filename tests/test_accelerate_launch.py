"""Two processes on CPU: `accelerate launch` of `posedata train pcdm-prior` on a tiny dataset
built from the fixture photos. Each process reads its own part of the pairs, only the main
process writes the run directory, every process adds its RNG state to the checkpoint.

The launch uses `--multi_gpu --num_processes 2` with ACCELERATE_USE_CPU=true (gloo):
`accelerate launch --cpu` alone starts a single process unless MPI is set up. Three launches
(a straight run, and a run stopped and resumed, compared bit for bit): ~45 s on 2 cores,
most of it importing torch in each process."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from posedata.reader import Dataset, PairStream

REPO = Path(__file__).resolve().parents[1]
NEEDS = ("clip", ("openpose", "keypoints_annotated"))

# posedata.cli's `train`, with every batch's pair keys written to <trace>/rank<N>.jsonl
TRACED_CLI = textwrap.dedent(
    """
    import json, os, sys
    import posedata.train.run as run

    trace, untraced = sys.argv.pop(1), run.collated_loader
    rank = int(os.environ["RANK"])

    def traced(pairs, plugin, *args, **kwargs):
        collate = plugin.collate

        def logging_collate(chunk, generator=None):
            with open(os.path.join(trace, f"rank{rank}.jsonl"), "a") as f:
                f.write(json.dumps([[p["source"]["__key__"], p["target"]["__key__"]] for p in chunk]) + "\\n")
            return collate(chunk, generator)

        plugin.collate = logging_collate
        return untraced(pairs, plugin, *args, **kwargs)

    run.collated_loader = traced
    from posedata.cli import main
    main()
    """
)


@pytest.fixture(scope="module")
def dataset(tiny_dataset) -> Path:
    return tiny_dataset(features="openpose,clip")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pair_stream_splits_by_rank(dataset):
    """What each process reads: disjoint parts that together are every pair (one shard and
    two consumers: both read the shard, each keeps every other pair)."""
    ds = Dataset(str(dataset))
    parts = []
    for rank in (0, 1):
        stream = PairStream(ds, "train", NEEDS, seed=0, epochs=1, rank=rank, world_size=2)
        parts.append({(p["source"]["__key__"], p["target"]["__key__"]) for p in stream})
    everything = {(p["source"]["__key__"], p["target"]["__key__"]) for p in PairStream(ds, "train", NEEDS, seed=0, epochs=1)}
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    assert parts[0] | parts[1] == everything and len(everything) == 20


def launch(tmp_path: Path, trace: Path, *args: str) -> None:
    script = tmp_path / "traced_cli.py"
    script.write_text(TRACED_CLI)
    trace.mkdir(exist_ok=True)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(script), str(trace), "train", "pcdm-prior", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_two_process_cpu_training_and_exact_resume(dataset, tmp_path):
    common = ["--shards", str(dataset), "--weights", "tiny", "--batch-size", "2", "--warmup-steps", "0", "--lr", "1e-3", "--num-workers", "1", "--ema-decay", "0.9"]
    run_dir, trace = tmp_path / "run", tmp_path / "trace"
    launch(tmp_path, trace, *common, "--out", str(run_dir), "--max-steps", "4", "--checkpoint-every", "4")

    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(("checkpoint-", ".tmp"))) == ["checkpoint-4"]
    ckpt = run_dir / "checkpoint-4"
    assert (ckpt / "rng_state_0.safetensors").is_file() and (ckpt / "rng_state_1.safetensors").is_file()
    assert (ckpt / "ema" / "diffusion_pytorch_model.safetensors").is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["batches_seen"] == 4 and state["stream"]["num_processes"] == 2
    config = json.loads((run_dir / "config.json").read_text())
    assert config["num_processes"] == 2 and config["distributed_type"].endswith("MULTI_CPU") and config["global_batch_size"] == 4
    assert config["data"]["world_size"] == 2 and config["data"]["features"]["clip"]["folder"].startswith("clip@")
    with open(run_dir / "loss.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss", "lr", "samples_per_s"] and [r[0] for r in rows[1:]] == ["1", "2", "3", "4"]

    seen = {}
    for rank in (0, 1):
        batches = [json.loads(line) for line in (trace / f"rank{rank}.jsonl").read_text().splitlines()]
        assert len(batches) >= 4 and all(len(b) == 2 for b in batches)
        seen[rank] = {tuple(p) for b in batches[:4] for p in b}
    assert len(seen[0]) == len(seen[1]) == 8 and not seen[0] & seen[1], seen

    # 2 steps, then resumed to 4: the same weights, EMA and losses as the straight run
    split = tmp_path / "split"
    launch(tmp_path, tmp_path / "trace-split", *common, "--out", str(split), "--max-steps", "2", "--checkpoint-every", "2")
    launch(tmp_path, tmp_path / "trace-split", *common, "--out", str(split), "--max-steps", "4", "--checkpoint-every", "2", "--resume", "latest")
    from posedata.train.trainer import load_model_weights

    for part in ("model", "ema"):
        a, b = load_model_weights(ckpt / part), load_model_weights(split / "checkpoint-4" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    with open(split / "loss.csv", newline="") as f:
        assert [r[:3] for r in csv.reader(f)] == [r[:3] for r in rows]
