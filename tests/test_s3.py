"""Buckets, end to end: `posedata build` into s3://, `posedata train` from it, against a real S3
API on 127.0.0.1 (moto's server mode, started here) behind a proxy that injects transient
failures (500 / 503 answers, connections dropped before or after the server acted, bodies
cut off half-way; `s3_support.py`). Whatever the faults, the build exits 0 and the bucket
holds exactly the bytes a local build of the same photos writes: nothing corrupt, nothing
lost, nothing half-written.

How the layers share the work (checked below): botocore retries 5xx answers and lost
connections per request, s3fs retries lost connections and cut-off bodies per call, and
`DatasetLocation` retries whole operations (`posedata_retries`) for what outlasts both. The
targeted tests turn botocore's retries off so that a single fault reaches posedata.

Storage options take every usual form: `endpoint_url` + `key` / `secret` at the top level,
`client_kwargs={"endpoint_url", "region_name"}`, or nothing at all with `AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` in the environment.

Runtime on 2 cores: about 2 minutes (one local-disk and one S3 build with the local executor,
one Ray build, one 10-step training run, and the targeted fault tests).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("moto.server", reason='needs moto[server] (pip install -e ".[dev]")')

import webdataset as wds
from s3_support import FaultyProxy, S3Server, isolated_aws_env

from posedata.layout import (
    DEFAULT_ATTEMPTS,
    RETRIES_OPTION,
    DatasetLocation,
    is_transient,
)
from posedata.reader import Dataset

POSEDATA = str(Path(sys.executable).with_name("posedata"))


def _transient_error_types() -> tuple[type[BaseException], ...]:
    """What a failed call can raise once s3fs gives up: OSError (error answers, as s3fs
    translates them), botocore's connection errors, aiohttp's cut-off bodies."""
    import aiohttp
    from botocore.exceptions import BotoCoreError

    return (OSError, BotoCoreError, aiohttp.ClientError)

BUCKET = "bucket"
BUILD_ARGS = ["--res", "64x48", "--weights", "tiny", "--features", "openpose,clip"]
# botocore's own retries off: every fault reaches s3fs and posedata's retry.
NO_BOTOCORE_RETRIES = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}
# Fault every 3rd request of each method (GET, PUT, HEAD, POST, DELETE), cycling through all
# kinds, so every kind hits every method whatever the order of requests.
EVERY = 3
KINDS = ("drop", "truncate", "503", "drop_after", "500")


def run_posedata(*args: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(env, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([POSEDATA, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


# ---- the server, the proxy, the environment ------------------------------------------------


@pytest.fixture(scope="module")
def aws_env():
    """Test credentials and none of this machine's AWS settings, here and in subprocesses."""
    with pytest.MonkeyPatch.context() as mp:
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            mp.delenv(k)
        for k, v in isolated_aws_env({}).items():
            mp.setenv(k, v)
        yield dict(os.environ)


@pytest.fixture(scope="module")
def server(aws_env):
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = S3Server.start()
    server.create_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture
def proxy(server):
    proxy = FaultyProxy(server.endpoint).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def faulty(server):
    """The proxy the end-to-end runs go through."""
    proxy = FaultyProxy(server.endpoint, every=EVERY, kinds=KINDS).start()
    yield proxy
    proxy.stop()


def direct(server) -> dict:
    """Storage options that reach the server without faults (to look at what is stored)."""
    return {"endpoint_url": server.endpoint, "key": "testing", "secret": "testing"}


# ---- which errors are worth another attempt --------------------------------------------------


def test_transient_errors_are_told_from_permanent_ones():
    import aiohttp
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    def client_error(status: int, code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    def wrapped(cause: BaseException) -> OSError:  # as s3fs raises it
        try:
            raise OSError(5, "wrapped") from cause
        except OSError as e:
            return e

    transient = [
        client_error(500, "InternalError"),
        client_error(503, "SlowDown"),
        client_error(503, "503"),
        client_error(429, "TooManyRequests"),
        client_error(400, "RequestTimeout"),
        ConnectionClosedError(endpoint_url="http://x"),
        EndpointConnectionError(endpoint_url="http://x"),
        ReadTimeoutError(endpoint_url="http://x"),
        aiohttp.ClientPayloadError("Response payload is not completed"),
        aiohttp.ServerDisconnectedError(),
        ConnectionResetError(104, "reset"),
        TimeoutError(),
        OSError(121, "We encountered an internal error. Please try again."),  # s3fs: InternalError
        OSError(16, "Service Unavailable"),  # s3fs: ServiceUnavailable / SlowDown
        OSError(5, "An error occurred (502) when calling the HeadObject operation"),
        wrapped(client_error(504, "GatewayTimeout")),
    ]
    permanent = [
        FileNotFoundError("nope"),
        PermissionError("denied"),
        client_error(404, "NoSuchKey"),
        client_error(403, "AccessDenied"),
        client_error(400, "InvalidArgument"),
        OSError(22, "Invalid argument"),
        ValueError("bad"),
        wrapped(client_error(403, "AccessDenied")),
    ]
    assert [e for e in transient if not is_transient(e)] == []
    assert [e for e in permanent if is_transient(e)] == []


def test_retry_option_is_taken_out_of_the_storage_options(server, tmp_path):
    location = DatasetLocation(f"s3://{BUCKET}/options", {**direct(server), RETRIES_OPTION: 2})
    assert location.attempts == 2 and RETRIES_OPTION not in location.fs.storage_options
    assert location.storage_options[RETRIES_OPTION] == 2  # still handed on to Ray workers
    assert DatasetLocation(f"s3://{BUCKET}/options", direct(server)).attempts == DEFAULT_ATTEMPTS
    assert DatasetLocation(str(tmp_path), {RETRIES_OPTION: 9}).attempts == 1  # local: never retried
    for bad in (0, "many"):
        with pytest.raises(ValueError, match=RETRIES_OPTION):
            DatasetLocation(f"s3://{BUCKET}/options", {**direct(server), RETRIES_OPTION: bad})


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(lambda endpoint: {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}, id="endpoint_url+key+secret"),
        pytest.param(lambda endpoint: {"client_kwargs": {"endpoint_url": endpoint, "region_name": "eu-west-1"}}, id="client_kwargs"),
        pytest.param(lambda endpoint: {"endpoint_url": endpoint}, id="endpoint_url+env-credentials"),
    ],
)
def test_storage_option_forms(server, proxy, options):
    location = DatasetLocation(f"s3://{BUCKET}/forms", options(proxy.endpoint))
    location.write_json(location.path("a.json"), {"x": 1})
    assert location.read_json(location.path("a.json")) == {"x": 1}
    assert location.exists(location.path("a.json")) and not location.exists(location.path("b.json"))
    assert proxy.forwarded["PUT"] == 1  # it went through this endpoint


# ---- each operation, with faults that outlast s3fs and botocore -----------------------------


def _put(location: DatasetLocation) -> None:
    location.write_bytes(location.path("obj.bin"), b"\x01" * 200_000)


def _get(location: DatasetLocation) -> None:
    assert location.read_bytes(location.path("seed.bin")) == SEED


def _open(location: DatasetLocation) -> None:
    with location.open_read(location.path("seed.bin")) as f:
        assert f.read() == SEED


def _head(location: DatasetLocation) -> None:
    assert location.exists(location.path("seed.bin"))


def _list(location: DatasetLocation) -> None:
    assert location.glob("*.bin")[-1].endswith("seed.bin")


SEED = bytes(range(256)) * 4000  # 1 MB
# (operation, method, what the request's target contains, fault). With botocore's retries off,
# one 500 (InternalError) answer fails an s3fs call (s3fs does not retry it); lost
# connections, cut-off bodies and 503s ("reduce your request rate") take five in a row (s3fs
# retries them; aiohttp also resends an idempotent request once when a kept-alive
# connection turns out closed). A GET whose connection drops before the answer takes 25:
# s3fs's cat_file nests its retry loops, so that case is left out here (slow, and covered).
CASES = [
    pytest.param(_put, "PUT", "obj.bin", "500", id="PUT-500"),
    pytest.param(_put, "PUT", "obj.bin", "503", id="PUT-503"),
    pytest.param(_put, "PUT", "obj.bin", "drop", id="PUT-dropped"),
    pytest.param(_put, "PUT", "obj.bin", "drop_after", id="PUT-done-but-answer-lost"),
    pytest.param(_get, "GET", "seed.bin", "500", id="GET-500"),
    pytest.param(_get, "GET", "seed.bin", "truncate", id="GET-cut-off"),
    pytest.param(_open, "GET", "seed.bin", "500", id="open_read-500"),
    pytest.param(_head, "HEAD", "seed.bin", "503", id="HEAD-503"),
    pytest.param(_list, "GET", "list-type", "500", id="LIST-500"),
    pytest.param(_list, "GET", "list-type", "truncate", id="LIST-cut-off"),
]


@pytest.mark.parametrize("operation,method,target,kind", CASES)
def test_posedata_retries_what_s3fs_and_botocore_give_up_on(server, proxy, caplog, operation, method, target, kind):
    prefix = f"ops-{method}-{kind}-{operation.__name__}"
    DatasetLocation(f"s3://{BUCKET}/{prefix}", direct(server)).write_bytes(f"{BUCKET}/{prefix}/seed.bin", SEED)
    options = {"endpoint_url": proxy.endpoint, **NO_BOTOCORE_RETRIES}

    # Without posedata's retry, the operation fails: s3fs gives up after `needed` faults.
    proxy.fail_next(100, kind, method, target)
    with pytest.raises(_transient_error_types()) as failed:
        operation(DatasetLocation(f"s3://{BUCKET}/{prefix}", {**options, RETRIES_OPTION: 1}))
    proxy.clear()
    assert is_transient(failed.value), repr(failed.value)
    needed = proxy.injected[(method, kind)]
    assert needed == 1 if kind == "500" or method == "HEAD" and kind == "503" else needed >= 5
    if operation is _put and kind == "drop":
        assert f"{prefix}/obj.bin" not in server.objects(BUCKET, prefix)  # nothing half-written

    # With it, the same faults are outlasted, and it says so.
    proxy.fail_next(needed, kind, method, target)
    with caplog.at_level(logging.WARNING, logger="posedata.layout"):
        operation(DatasetLocation(f"s3://{BUCKET}/{prefix}", options))
    assert proxy.injected[(method, kind)] == 2 * needed
    assert "attempt 2 of 5" in caplog.text
    if operation is _put:
        assert server.objects(BUCKET, prefix)[f"{prefix}/obj.bin"] == 200_000


def test_not_found_is_not_retried(server, proxy, caplog):
    location = DatasetLocation(f"s3://{BUCKET}/missing", {"endpoint_url": proxy.endpoint, **NO_BOTOCORE_RETRIES})
    with caplog.at_level(logging.WARNING, logger="posedata.layout"):
        assert not location.exists(location.path("nothing.json"))
        with pytest.raises(FileNotFoundError):
            location.read_bytes(location.path("nothing.json"))
    assert caplog.text == ""
    assert proxy.requests <= 5  # exists: HEAD + LIST; read: HEAD (size) + LIST + GET at most


def test_exists_does_not_mistake_an_error_for_absence(server, proxy):
    """fsspec's generic exists() answers False on any error; a dataset must not look absent
    (or a finished shard undone) because of a 503."""
    location = DatasetLocation(f"s3://{BUCKET}/absent", {"endpoint_url": proxy.endpoint, **NO_BOTOCORE_RETRIES, RETRIES_OPTION: 1})
    proxy.fail_next(1, "503", "HEAD")
    with pytest.raises(OSError):
        location.exists(location.path("dataset.json"))


def _read_in_child(location: DatasetLocation, path: str, queue) -> None:
    try:
        queue.put(location.read_bytes(path))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        queue.put(f"{e.__class__.__name__}: {e}")


def test_location_works_in_a_forked_process(server, proxy):
    """torch DataLoader workers are forked from a process whose s3fs already runs its event
    loop; fsspec refuses to use that loop in the child ("This class is not fork-safe")."""
    import multiprocessing

    location = DatasetLocation(f"s3://{BUCKET}/fork", {"endpoint_url": proxy.endpoint})
    location.write_bytes(location.path("a.bin"), b"parent")  # the loop is running now
    queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_read_in_child, args=(location, location.path("a.bin"), queue))
    child.start()
    child.join(60)
    got = queue.get(timeout=5)
    assert got == b"parent", got
    assert location.read_bytes(location.path("a.bin")) == b"parent"  # the parent's still works


def test_failed_multipart_upload_leaves_nothing(server, proxy):
    """Above 100 MiB s3fs's pipe_file (what write_bytes calls) uploads in parts; here with
    5 MiB parts. A part that fails for good aborts the upload: no object, no parts left."""
    location = DatasetLocation(f"s3://{BUCKET}/multipart", {"endpoint_url": proxy.endpoint, **NO_BOTOCORE_RETRIES})
    data = os.urandom(11 * 2**20)
    path = location.path("big.tar")
    proxy.fail_next(1, "500", "POST", "uploadId=")  # CompleteMultipartUpload
    with pytest.raises(OSError):
        location.fs.pipe_file(path, data, chunksize=5 * 2**20)
    assert proxy.injected[("POST", "500")] == 1
    assert server.objects(BUCKET, "multipart") == {} and server.multipart_uploads(BUCKET) == []

    proxy.fail_next(100, "drop", "PUT", "partNumber=2")  # one part lost for good ...
    with pytest.raises(_transient_error_types()):
        location.fs.pipe_file(path, data, chunksize=5 * 2**20)
    proxy.clear()
    assert server.objects(BUCKET, "multipart") == {} and server.multipart_uploads(BUCKET) == []

    proxy.fail_next(3, "truncate", "PUT", "partNumber=")  # ... or only for a while
    location.fs.pipe_file(path, data, chunksize=5 * 2**20)
    assert location.read_bytes(path) == data and server.multipart_uploads(BUCKET) == []


# ---- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_build(fixtures_dir, tmp_path_factory, aws_env) -> Path:
    """The same photos built onto local disk: what the bucket must hold, byte for byte."""
    out = tmp_path_factory.mktemp("local") / "ds"
    check(run_posedata("build", "folder", "--root", str(fixtures_dir / "deepfashion"), "--out", str(out), *BUILD_ARGS, "--executor", "local", env=aws_env))
    return out


@pytest.fixture(scope="module")
def s3_build(fixtures_dir, server, faulty, aws_env) -> str:
    """`posedata build ... --out s3://bucket/ds --executor local` through the faulty proxy,
    credentials and endpoint in --storage-options, botocore's retries off."""
    url = f"s3://{BUCKET}/ds"
    options = {"endpoint_url": faulty.endpoint, "key": "testing", "secret": "testing", **NO_BOTOCORE_RETRIES}
    before = sum(faulty.injected.values())
    proc = check(
        run_posedata(
            "build", "folder", "--root", str(fixtures_dir / "deepfashion"), "--out", url, *BUILD_ARGS,
            "--executor", "local", "--storage-options", json.dumps(options), env=aws_env,
        )
    )
    assert sum(faulty.injected.values()) - before >= 10, faulty.injected
    assert "posedata.layout" in proc.stderr and "attempt 2 of 5" in proc.stderr  # posedata's retry did its part
    return url


def stored_files(location: DatasetLocation) -> dict[str, bytes]:
    """{path relative to the root: bytes} of everything under a dataset root."""
    return {p[len(location.root) + 1 :]: location.read_bytes(p) for p in sorted(location.fs.find(location.root))}


def card_without_run_details(data: bytes) -> dict:
    card = json.loads(data)
    card["build"] = {k: v for k, v in card["build"].items() if k not in ("finished", "executor")}
    card.pop("name")  # the folder's name
    return card


def assert_same_dataset(server, url: str, local: Path) -> None:
    """Every object of the bucket dataset equals the local build's file of that name."""
    remote = stored_files(DatasetLocation(url, direct(server)))
    here = stored_files(DatasetLocation(str(local)))
    assert sorted(remote) == sorted(here)  # nothing lost, nothing extra (no temporaries, no parts)
    assert any(name.startswith("features/openpose@") and name.endswith(".tar") for name in remote)
    differing = [name for name in here if remote[name] != here[name] and name not in ("dataset.json", "README.md")]
    assert differing == []  # tars, parquet tables, markers, null embeddings, wids indexes: byte for byte
    assert card_without_run_details(remote["dataset.json"]) == card_without_run_details(here["dataset.json"])
    assert hub_card_without_name(remote) == hub_card_without_name(here)
    assert server.multipart_uploads(BUCKET) == []


def hub_card_without_name(files: dict[str, bytes]) -> bytes:
    """README.md (the HF dataset card) names the dataset after its folder, in its title."""
    name = json.loads(files["dataset.json"])["name"]
    text = files["README.md"].decode().replace(f"pretty_name: {name} (posedata)\n", "pretty_name: <name>\n")
    return text.replace(f"\n# {name}\n", "\n# <name>\n").encode()


def test_build_into_s3_through_faults_writes_what_a_local_build_writes(server, s3_build, local_build):
    assert_same_dataset(server, s3_build, local_build)


def test_read_back_through_faults_with_the_reader(server, faulty, s3_build, local_build):
    options = {"endpoint_url": faulty.endpoint, "key": "testing", "secret": "testing"}
    before = faulty.faults("GET")
    remote = list(Dataset(s3_build, options).samples("train", needs=["openpose", "clip"], pixels=True))
    local = list(Dataset(str(local_build)).samples("train", needs=["openpose", "clip"], pixels=True))
    assert len(remote) == len(local) == 5
    for a, b in zip(remote, local):
        assert a.keys() == b.keys() and a["__key__"] == b["__key__"]
        for k in a:
            if isinstance(a[k], np.ndarray):
                assert np.array_equal(a[k], b[k]), k
            else:
                assert a[k] == b[k], k
    assert faulty.faults("GET") > before


def test_read_back_with_plain_webdataset_and_tarfile(server, s3_build, local_build, monkeypatch):
    """No posedata on the reading side: webdataset over a `pipe:` that cats the s3:// URL with
    fsspec (endpoint and credentials from AWS_* variables), and tarfile over s3fs."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    location = DatasetLocation(s3_build, direct(server))
    tars = location.glob("shards/*.tar") + location.glob("features/*/*.tar")
    assert len(tars) == 3
    for path in tars:
        url = location.url_of(path)
        relative = path[len(location.root) + 1 :]
        cat = "import sys, fsspec; sys.stdout.buffer.write(fsspec.open(sys.argv[1], 'rb').open().read())"
        pipe = f"pipe:{shlex.quote(sys.executable)} -c {shlex.quote(cat)} {shlex.quote(url)}"
        remote = list(wds.WebDataset(pipe, shardshuffle=False, empty_check=False))
        local = list(wds.WebDataset(str(local_build / relative), shardshuffle=False, empty_check=False))

        def strip(samples):
            return [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")} for s in samples]

        assert strip(remote) == strip(local) and len(local) == 5
        with location.fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            remote_members = [(m.name, tar.extractfile(m).read()) for m in tar]
        with tarfile.open(local_build / relative) as tar:
            assert remote_members == [(m.name, tar.extractfile(m).read()) for m in tar]


def test_verify_the_bucket(server, s3_build):
    from posedata.verify import format_report, verify

    report = verify(s3_build, direct(server), progress=False)
    assert report.ok, format_report(report)


def test_train_from_s3_through_faults_with_env_credentials(s3_build, faulty, aws_env, tmp_path):
    """`posedata train` with no --storage-options: endpoint and credentials from AWS_*; with
    DataLoader workers (forked processes reading from the bucket)."""
    env = dict(aws_env, AWS_ENDPOINT_URL=faulty.endpoint)
    before = sum(faulty.injected.values())
    proc = check(
        run_posedata(
            "train", "pcdm-prior", "--shards", s3_build, "--out", str(tmp_path / "run"), "--weights", "tiny",
            "--max-steps", "10", "--batch-size", "2", "--warmup-steps", "0", "--num-workers", "2", env=env,
        )
    )
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert summary["steps"] == 10 and np.isfinite(summary["final_loss"])
    assert (tmp_path / "run" / "checkpoint-10").is_dir()
    assert sum(faulty.injected.values()) > before
    inspect = check(run_posedata("inspect", s3_build, env=dict(aws_env, AWS_ENDPOINT_URL=faulty.endpoint)))
    assert "openpose" in inspect.stdout and "clip" in inspect.stdout


def test_ray_build_into_s3_through_faults(server, faulty, fixtures_dir, local_build, aws_env):
    """The default executor: Ray workers get the storage options (client_kwargs form here;
    credentials from the environment) and write the same bytes. Slow: run once."""
    url = f"s3://{BUCKET}/ds-ray"
    options = {"client_kwargs": {"endpoint_url": faulty.endpoint, "region_name": "us-east-1"}}
    before = sum(faulty.injected.values())
    check(run_posedata("build", "folder", "--root", str(fixtures_dir / "deepfashion"), "--out", url, *BUILD_ARGS, "--storage-options", json.dumps(options), env=aws_env))
    assert sum(faulty.injected.values()) - before >= 10
    assert_same_dataset(server, url, local_build)
