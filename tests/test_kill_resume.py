"""Resume and idempotence: `kill -9` a build at any moment, run the same command again, and
the dataset is the one an uninterrupted run writes, file for file and byte for byte.

One folder source of 24 small real photos in 8 groups (6 shards of 4), one clean reference
build (`--executor local`, in this process), then `posedata build` in subprocesses, each
SIGKILLed at a seeded moment while a poller watches the output folder:

- local executor, a chain of kills: at a random moment after the scan, at the k-th done
  marker, as soon as a `.tmp-*` file shows up (a write caught before its rename), then one
  last run to the end. Each rerun says how many shards it skips.
- Ray executor with `--workers 2` (two workers, each holding every model), killed while its
  shard writers run, then the same command to the end. Every shard of that dataset was
  written by Ray with two workers taking micro-batches in whatever order, so its byte
  equality with the local reference is also the determinism check (workers, executor, task
  order).
- `--overwrite` starts over (a file dropped into the folder is gone, the result the same).

What is checked, all the time and not only at the kill: every file under its final name is
complete, i.e. byte-identical to the reference's file of that name (tars are also read to the
end with `tarfile`); the only other names allowed are `.tmp-*` (a write cut off before its
rename, never read). After the rerun, no `.tmp-*` is left: a build removes the stale
temporaries of its own folders when it starts (`posedata.build._remove_stale_temporaries`).
dataset.json is compared without build.finished and build.executor.

Ray processes of a killed driver: the embedded Ray's GCS and raylet die with the driver and
its workers follow within seconds (checked: none left after 60 s); the two per-node agents
(dashboard agent, runtime-env agent) outlive it by one to two minutes. The rerun starts while
they are still there, to show they do not break it; then the test kills them by pid (they are
in the killed driver's process session). Nothing else is killed: `ray stop --force` would
also stop other people's Ray on a shared machine.

Runtime on 2 cores: about 3 minutes (five local builds of ~12 s, two Ray builds with two
workers); 4.3 minutes when the machine was loaded 13x over.
Reproduce a failure with the seed it prints: POSEDATA_KILL_SEED=<seed> pytest tests/test_kill_resume.py
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image, ImageEnhance, ImageOps
from process_support import session_processes, signal_session

from posedata.cli import main as cli_main

POSEDATA = str(Path(sys.executable).with_name("posedata"))
SEED = int(os.environ.get("POSEDATA_KILL_SEED", "0"))
GROUP_SIZES = (3, 1, 4, 2, 2, 5, 3, 4)  # 24 photos; packed 4 per shard: 6 shards
N_SHARDS = 6
BUILD_OPTIONS = ("--res", "64x48", "--weights", "tiny", "--shard-size", "4", "--features", "openpose,clip,vae:sd21")
ENV = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
MARKERS = "_done/shards/"
# Ray's per-node agents, which outlive a killed driver for a minute or two (comm names are
# cut to 15 characters by the kernel).
RAY_AGENTS = ("ray::DashboardA", "ray::RuntimeEnv")


# ---- inputs and the reference ------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory, fixtures_dir) -> Path:
    """24 distinct small photos from the 5 real fixture photos (crop, flip, brightness), in
    8 group folders of uneven sizes."""
    sources = sorted(p for p in (fixtures_dir / "deepfashion").iterdir() if p.suffix in (".png", ".jpg"))
    assert len(sources) == 5
    images = [Image.open(p).convert("RGB") for p in sources]
    root = tmp_path_factory.mktemp("kill") / "photos"
    i = 0
    for g, size in enumerate(GROUP_SIZES):
        for v in range(size):
            image = images[i % len(images)]
            w, h = image.size
            inset = (i // len(images)) * max(2, w // 60)
            image = image.crop((inset, inset // 2, w - inset, h - inset))
            if i % 2:
                image = ImageOps.mirror(image)
            image = ImageEnhance.Brightness(image).enhance(0.9 + 0.02 * (i % 7)).resize((88, 128), Image.Resampling.BICUBIC)
            (root / f"person{g}").mkdir(parents=True, exist_ok=True)
            image.save(root / f"person{g}" / f"view{v}.jpg", quality=90)
            i += 1
    return root


def build_args(photos: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "folder", "--root", str(photos), "--out", str(out), *BUILD_OPTIONS, *extra]


@dataclass
class Reference:
    root: Path
    files: dict[str, bytes]  # relative path -> bytes, dataset.json excepted
    card: dict


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory) -> Reference:
    """The uninterrupted build, `--executor local`, through the CLI in this process."""
    out = tmp_path_factory.mktemp("reference") / "ds"
    result = CliRunner().invoke(cli_main, build_args(photos, out, "--executor", "local"), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    files = read_files(out)
    card = json.loads(files.pop("dataset.json"))
    assert card["counts"] == {"inputs": 24, "written": 24, "rejected": 0}
    assert len([f for f in files if f.startswith(MARKERS)]) == N_SHARDS
    assert not [f for f in files if is_temporary(f)]
    return Reference(out, files, card)


# ---- looking at an output folder --------------------------------------------------------------


def is_temporary(relative: str) -> bool:
    return relative.rsplit("/", 1)[-1].startswith(".tmp-")


def listing(out: Path) -> list[str]:
    found = []
    for directory, _, names in os.walk(out):
        for name in names:
            found.append(os.path.relpath(os.path.join(directory, name), out))
    return sorted(found)


def read_files(out: Path) -> dict[str, bytes]:
    return {rel: (out / rel).read_bytes() for rel in listing(out)}


def card_without_run(card: dict) -> dict:
    card = json.loads(json.dumps(card))
    card["build"].pop("finished")
    card["build"].pop("executor")
    return card


def check_complete(out: Path, relative: str, reference: Reference) -> None:
    """A file under its final name must be whole: the reference's bytes (the card: the same
    content but for the run's time and executor). Tars are also read to the end."""
    data = (out / relative).read_bytes()
    if relative == "dataset.json":
        assert card_without_run(json.loads(data)) == card_without_run(reference.card), "dataset.json differs from the reference's"
        return
    assert relative in reference.files, f"{relative}: an object the reference build does not have"
    if relative.endswith(".tar"):
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar]  # raises on a cut-off tar
        assert members, f"{relative}: empty tar"
    assert data == reference.files[relative], f"{relative}: {len(data)} bytes, the reference's has {len(reference.files[relative])}"


def assert_same_as_reference(out: Path, reference: Reference) -> None:
    files = read_files(out)
    card = json.loads(files.pop("dataset.json"))
    leftovers = [f for f in files if is_temporary(f)]
    assert not leftovers, f"temporaries left after the rerun: {leftovers}"
    assert sorted(files) == sorted(reference.files)
    different = [f for f in files if files[f] != reference.files[f]]
    assert not different, f"not byte-identical to the uninterrupted build: {different}"
    assert card_without_run(card) == card_without_run(reference.card)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert manifest == pq.read_table(reference.root / "manifest.parquet").to_pylist()


# ---- running and killing a build ----------------------------------------------------------------


@dataclass
class Run:
    killed: bool
    returncode: int | None
    output: str
    pid: int
    markers_before: int
    files_at_kill: list[str] = field(default_factory=list)
    temporaries_seen: set[str] = field(default_factory=set)

    def resumed(self) -> int | None:
        match = re.search(r"resuming: (\d+) of (\d+) shards already done", self.output)
        return int(match.group(1)) if match else None


def markers(files: list[str]) -> int:
    return sum(1 for f in files if f.startswith(MARKERS) and not is_temporary(f))


Trigger = Callable[[list[str], float, int], bool]  # (files now, seconds since start, markers at start) -> kill?


def run_build(args: list[str], out: Path, reference: Reference, log: Path, kill_when: Trigger | None = None, timeout: float = 400) -> Run:
    """`posedata ARGS` in its own process session; the folder is polled every ~10 ms, each
    new file under a final name checked to be complete the moment it is seen; SIGKILL when
    `kill_when` says so."""
    before = listing(out) if out.exists() else []
    checked = set(before)
    temporaries: set[str] = set()
    start = time.monotonic()
    with open(log, "w") as sink:
        proc = subprocess.Popen([POSEDATA, *args], stdout=sink, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
        killed = False
        try:
            while True:
                finished = proc.poll() is not None
                files = listing(out) if out.exists() else []
                for rel in files:
                    if is_temporary(rel):
                        temporaries.add(rel)
                    elif rel not in checked:
                        try:
                            check_complete(out, rel, reference)
                        except FileNotFoundError:
                            continue  # removed by --overwrite between listing and reading
                        checked.add(rel)
                if finished:
                    break
                if kill_when is not None and kill_when(files, time.monotonic() - start, markers(before)):
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    killed = True
                    break
                assert time.monotonic() - start < timeout, f"posedata build ran for more than {timeout} s"
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
    at_kill = listing(out) if killed and out.exists() else []
    return Run(killed, proc.returncode, log.read_text(), proc.pid, markers(before), at_kill, temporaries)


def check_folder_at_rest(out: Path, reference: Reference) -> list[str]:
    """After a kill: every final-named file is complete; returns the temporaries."""
    files = listing(out)
    for rel in files:
        if not is_temporary(rel):
            check_complete(out, rel, reference)
    return [f for f in files if is_temporary(f)]


def after_scan_plus(delay: float) -> Trigger:
    """`delay` seconds after the scan's rejects are written (model set-up, first batches), or
    at the first done marker if that comes sooner."""
    state: dict[str, float] = {}

    def trigger(files, elapsed, before):
        if "_done/scan.parquet" in files and "t" not in state:
            state["t"] = elapsed
        return ("t" in state and elapsed >= state["t"] + delay) or markers(files) > before

    return trigger


def at_new_marker(k: int) -> Trigger:
    return lambda files, elapsed, before: markers(files) >= before + k


def at_temporary_after_marker(fallback: int) -> Trigger:
    """As soon as a `.tmp-*` file is seen after the first new marker (a write caught before
    its rename); at the `fallback`-th new marker if none was caught."""

    def trigger(files, elapsed, before):
        new = markers(files) - before
        return (new >= 1 and any(is_temporary(f) for f in files)) or new >= fallback

    return trigger


# ---- the tests ------------------------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_local_build_killed_again_and_again_resumes_to_the_same_bytes(photos, reference, tmp_path):
    rng = random.Random(SEED)
    out = tmp_path / "kills" / "ds"
    args = build_args(photos, out, "--executor", "local")
    chain = [
        ("a random moment after the scan", after_scan_plus(rng.uniform(0.0, 4.0))),
        ("the k-th done marker", at_new_marker(rng.randint(1, 2))),
        ("a write caught before its rename", at_temporary_after_marker(fallback=2)),
        ("never: runs to the end", None),
    ]
    caught_temporaries = []
    for step, (what, trigger) in enumerate(chain):
        run = run_build(args, out, reference, tmp_path / f"run{step}.log", kill_when=trigger)
        context = f"seed {SEED}, run {step} ({what}); output:\n{run.output[-2000:]}"
        assert run.output.count("Traceback") == 0, context
        if step:
            assert run.resumed() == (run.markers_before or None), context  # says what it skips
        if trigger is None:
            assert not run.killed and run.returncode == 0, context
            break
        assert run.killed, f"the build finished before the kill point; {context}"
        left = check_folder_at_rest(out, reference)
        caught_temporaries += left
        assert markers(listing(out)) < N_SHARDS, context
        print(f"run {step}: killed at {what}: {markers(listing(out))} of {N_SHARDS} shards done, temporaries left: {left}")

        if what.startswith("a write caught") and not left:
            # A write lasts milliseconds and the poller rarely sees one: leave what a write cut
            # off there would, half of the next shard's tar under a temporary name.
            name = next(f for f in sorted(reference.files) if f.startswith("shards/") and f not in listing(out))
            planted = f"shards/.tmp-{'0' * 32}-{name.split('/')[-1]}"
            (out / planted).write_bytes(reference.files[name][: len(reference.files[name]) // 2])
            caught_temporaries.append(planted)

    assert_same_as_reference(out, reference)  # also: no temporary left anywhere
    assert caught_temporaries and not [t for t in caught_temporaries if (out / t).exists()]


@pytest.mark.timeout(400)
def test_ray_build_with_two_workers_killed_while_writing_resumes_to_the_same_bytes(photos, reference, tmp_path):
    """Ray writes each shard as soon as its micro-batches are through the workers: the kill
    lands at the k-th done marker, with shards still to extract and write."""
    rng = random.Random(SEED + 1)
    out = tmp_path / "ray" / "ds"
    args = build_args(photos, out, "--workers", "2")
    k = rng.randint(1, 3)

    killed = run_build(args, out, reference, tmp_path / "ray-killed.log", kill_when=at_new_marker(k))

    context = f"seed {SEED}, killed at marker {k}; output:\n{killed.output[-3000:]}"
    agents: list[tuple[int, str]] = []
    rerun = None
    try:
        assert killed.killed, f"the build finished before the kill point; {context}"
        # The driver's Ray goes down with it: GCS, raylet and workers within seconds; only the
        # per-node agents linger (and are killed below).
        deadline = time.monotonic() + 60
        while True:
            left = [p for p in session_processes(killed.pid) if p[1] not in RAY_AGENTS]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert not left, f"Ray processes of the killed driver still running after 60 s: {left}"
        agents = session_processes(killed.pid)
        done_by_the_killed_run = markers(listing(out))
        assert k <= done_by_the_killed_run < N_SHARDS, context
        check_folder_at_rest(out, reference)  # the workers may have written more after the kill

        rerun = run_build(args, out, reference, tmp_path / "ray-rerun.log")  # the agents still live

        context = f"seed {SEED}; rerun output:\n{rerun.output[-3000:]}"
        assert rerun.returncode == 0, context
        assert rerun.resumed() == done_by_the_killed_run, context
        assert_same_as_reference(out, reference)
    finally:
        signal_session(killed.pid)
        if rerun is not None:
            signal_session(rerun.pid)  # a driver that exits normally stops its Ray; in case not
    card = json.loads((out / "dataset.json").read_text())
    assert card["build"]["executor"] == "ray"
    print(f"kill point: marker {k}; {done_by_the_killed_run} shards done by the killed run; agents it left: {[n for _, n in agents]}")


def test_overwrite_starts_over(photos, reference, tmp_path):
    out = tmp_path / "over" / "ds"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("left by someone else\n")
    (out / "_done").mkdir()
    (out / "_done" / "build.json").write_text(json.dumps({"source": "not this build"}))

    refused = CliRunner().invoke(cli_main, build_args(photos, out, "--executor", "local"))
    assert refused.exit_code != 0 and "different settings" in str(refused.exception) + refused.output

    result = CliRunner().invoke(cli_main, build_args(photos, out, "--executor", "local", "--overwrite"), catch_exceptions=False)

    assert result.exit_code == 0, result.output
    assert "--overwrite: removing" in result.output and "resuming" not in result.output
    assert (out / "stale.txt").read_text() == "left by someone else\n"  # posedata deletes only what it wrote
    (out / "stale.txt").unlink()
    assert_same_as_reference(out, reference)
