"""Cluster execution on one machine: a real multi-node-shaped Ray cluster, a head
(`ray start --head --num-cpus 1`) and a worker node (`ray start --address HEAD --num-cpus 1`),
two raylets on one machine; `posedata build ... --address HEAD` runs on it as a separate driver
process, and the dataset equals a `--executor local` build byte for byte.

Isolation, so that the test neither disturbs nor is disturbed by other Ray on the machine:
- `RAY_TMPDIR` points at a private folder: `ray start` records its address in
  `$RAY_TMPDIR/ray/ray_current_cluster`, and a plain `ray.init()` anywhere else on the machine
  would otherwise join this cluster while it runs;
- token authentication with a token made for the test (`RAY_AUTH_MODE=token`,
  `RAY_AUTH_TOKEN`): Ray 2.5x turns token auth on for `ray start --head` when it finds
  `~/.ray/auth_token`, and then a node or driver without the token cannot join;
- teardown kills the processes of the two `ray start` process sessions by pid (raylets, GCS,
  agents and the workers they forked), not `ray stop --force`, which stops every Ray on the
  machine, other people's included.

Also here: with that cluster up and recorded, a build without `--address` still starts its
own local Ray (before the fix in posedata.pipeline.init_ray, `ray.init(num_cpus=...)` joined
the recorded cluster and `posedata build` failed with "When connecting to an existing
cluster, num_cpus and num_gpus must not be provided").

Measured on 2 shared cores: cluster up in ~8 s (26 s with the machine loaded 7x over), the
cluster build ~45 s (70 s loaded), the embedded-Ray check ~10 s; 1.3 to 2 minutes in all.
Deselect with `-m "not cluster"`.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps
from process_support import session_processes, signal_session

from posedata.cli import main as cli_main

pytestmark = pytest.mark.cluster

POSEDATA = str(Path(sys.executable).with_name("posedata"))
RAY = str(Path(sys.executable).with_name("ray"))
BUILD_OPTIONS = ("--res", "64x48", "--weights", "tiny", "--shard-size", "4", "--features", "openpose,clip,vae:sd21")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self) -> None:
        # Short: Ray's unix sockets live under it (paths are limited to ~107 bytes).
        self.tmp = tempfile.mkdtemp(prefix="pdray", dir="/tmp")
        self.env = dict(
            os.environ,
            RAY_TMPDIR=self.tmp,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_hex(32),
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        self.env.pop("RAY_ADDRESS", None)
        self.sessions: list[int] = []
        self.address = ""

    def ray_start(self, *args: str) -> str:
        proc = subprocess.Popen([RAY, "start", *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.sessions.append(proc.pid)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output[-3000:]
        return output

    def start(self) -> None:
        self.ray_start("--head", "--num-cpus", "1", "--port", str(free_port()), "--include-dashboard=false", "--disable-usage-stats")
        self.address = Path(self.tmp, "ray", "ray_current_cluster").read_text().strip()
        self.ray_start("--address", self.address, "--num-cpus", "1", "--disable-usage-stats")

    def nodes(self) -> dict:
        code = f"import json, ray; ray.init(address={self.address!r}, log_to_driver=False); print(json.dumps({{'nodes': sum(n['Alive'] for n in ray.nodes()), 'cpus': ray.cluster_resources().get('CPU')}}))"
        proc = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def stop(self) -> list[tuple[int, str]]:
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            for sid in self.sessions:
                signal_session(sid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(session_processes(s) for s in self.sessions):
                time.sleep(0.2)
        left = [p for s in self.sessions for p in session_processes(s)]
        shutil.rmtree(self.tmp, ignore_errors=True)
        return left


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        left = cluster.stop()
        assert not left, f"processes of the test cluster still running: {left}"


@pytest.fixture(scope="module")
def photos(tmp_path_factory, fixtures_dir) -> Path:
    """12 small photos from the real fixtures, 3 groups (3 shards of 4)."""
    sources = sorted(p for p in (fixtures_dir / "deepfashion").iterdir() if p.suffix in (".png", ".jpg"))
    root = tmp_path_factory.mktemp("cluster") / "photos"
    for i in range(12):
        image = Image.open(sources[i % len(sources)]).convert("RGB")
        if i >= len(sources):
            image = ImageOps.mirror(image)
        (root / f"group{i // 4}").mkdir(parents=True, exist_ok=True)
        image.resize((88, 128), Image.Resampling.BICUBIC).save(root / f"group{i // 4}" / f"view{i}.jpg", quality=90)
    return root


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file() and p.name != "dataset.json"}


def card_without_run(root: Path) -> dict:
    card = json.loads((root / "dataset.json").read_text())
    card["build"].pop("finished")
    card["build"].pop("executor")
    return card


@pytest.mark.timeout(300)
def test_build_on_a_two_node_cluster_equals_a_local_build(cluster, photos, tmp_path):
    assert cluster.nodes() == {"nodes": 2, "cpus": 2.0}
    local = tmp_path / "local" / "ds"
    result = CliRunner().invoke(cli_main, ["build", "folder", "--root", str(photos), "--out", str(local), *BUILD_OPTIONS, "--executor", "local"], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    out = tmp_path / "cluster" / "ds"
    proc = subprocess.run([POSEDATA, "build", "folder", "--root", str(photos), "--out", str(out), *BUILD_OPTIONS, "--address", cluster.address], env=cluster.env, capture_output=True, text=True, timeout=240, check=False)

    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "build summary" in proc.stdout and "written          12" in proc.stdout
    assert digests(out) == digests(local)
    assert card_without_run(out) == card_without_run(local)
    assert json.loads((out / "dataset.json").read_text())["build"]["executor"] == "ray"


@pytest.mark.timeout(120)
def test_without_address_a_build_starts_its_own_ray_even_with_a_cluster_recorded(cluster):
    """What `posedata build` without --address does first (posedata.pipeline.init_ray(None)),
    on a machine where `ray start` recorded a cluster that a plain ray.init() would join."""
    assert Path(cluster.tmp, "ray", "ray_current_cluster").is_file()
    code = (
        "import json, os, ray; from posedata.pipeline import init_ray; init_ray(None); "
        "print(json.dumps({'gcs': ray.get_runtime_context().gcs_address, 'nodes': len(ray.nodes()), 'cpus': ray.cluster_resources().get('CPU')})); ray.shutdown()"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ray = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ray["gcs"] != cluster.address and ray["nodes"] == 1 and ray["cpus"] == os.cpu_count()
