"""s3:// checkpoints: one download per cache directory, byte ranges reassembled exactly, and a
downloader killed mid-way blocks no one (separate OS processes, a real S3 server on loopback).

Every request to S3 goes through `Relay`, which records it, so "downloaded once" is
counted on the wire: the ranged GETs of each object add up to its size exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cogvlm import weights

from .netfault import Relay

ROOT = Path(__file__).resolve().parents[1]
BIG = 5 * 2**20 + 12345  # five 1 MB parts and a short last one

# One downloader: imports, says it is ready, waits for the go file, then resolves the source.
WORKER = r"""
import json, logging, sys, time
from pathlib import Path

from cogvlm import weights

args = json.loads(sys.argv[1])
weights.PART_BYTES = args["part_bytes"]
weights.DOWNLOAD_WORKERS = args["workers"]
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s", stream=sys.stderr)
Path(args["ready"]).touch()
while not Path(args["go"]).exists():
    time.sleep(0.01)
print(weights.resolve_source(args["uri"], cache_dir=args["cache"], storage_options=args["opts"]))
"""


def _ranged(seconds: float):
    """A relay delay for ranged GETs only (a slow link for the downloads, not their HEADs)."""
    return lambda r: seconds if r.method == "GET" and r.range else 0.0


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def source(ckpt_v1, s3_bucket, tmp_path):
    """The tiny release checkpoint plus a 5 MB file, uploaded; yields (uri, {name: sha256}, proxy)."""
    import boto3

    bucket, endpoint = s3_bucket
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    src = tmp_path / "src"
    src.mkdir()
    for f in ckpt_v1.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "big.bin").write_bytes(os.urandom(BIG))
    for f in src.iterdir():
        client.upload_file(str(f), bucket, f"models/tiny/{f.name}")
    proxy = Relay(int(endpoint.rsplit(":", 1)[1]))
    try:
        yield f"s3://{bucket}/models/tiny", {f.name: _sha(f) for f in src.iterdir()}, proxy
    finally:
        proxy.close()


@pytest.fixture()
def start(tmp_path):
    """Starts downloader processes; any still running at the end of the test is killed."""
    procs: list[subprocess.Popen] = []

    def start(name: str, uri: str, cache: Path, proxy: Relay, *,
              part_bytes: int, workers: int) -> tuple[subprocess.Popen, Path, Path]:
        """A downloader process; returns it, its go file and its log file."""
        go, log = tmp_path / f"{name}.go", tmp_path / f"{name}.log"
        args = {"uri": uri, "cache": str(cache), "opts": {"endpoint_url": proxy.url},
                "part_bytes": part_bytes, "workers": workers,
                "ready": str(tmp_path / f"{name}.ready"), "go": str(go)}
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        with open(log, "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(args)], cwd=ROOT,
                                          env=env, stdout=subprocess.PIPE, stderr=err, text=True))
        return procs[-1], go, log

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _assert_same_files(local: Path, shas: dict[str, str]) -> None:
    got = {p.name: _sha(p) for p in local.iterdir() if not p.name.startswith(".")}
    assert got == shas
    assert not list(local.rglob("*.part-*"))


def _assert_fetched_once(proxy: Relay, local: Path) -> None:
    """The ranged GETs of each object, over every process, add up to its size."""
    for f in local.iterdir():
        if not f.name.startswith("."):
            assert proxy.fetched(f"models/tiny/{f.name}") == f.stat().st_size, f.name


def test_processes_sharing_a_cache_download_once(source, start, tmp_path):
    uri, shas, proxy = source
    proxy.delay = _ranged(0.2)  # the download takes over a second, so the others arrive while it runs
    cache = tmp_path / "cache"
    procs = [start(f"p{i}", uri, cache, proxy, part_bytes=2**20, workers=2) for i in range(3)]
    _wait_for(lambda: all((tmp_path / f"p{i}.ready").exists() for i in range(3)), "the processes to import")
    for _, go, _ in procs:
        go.touch()
    dirs = set()
    for proc, _, _ in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        dirs.add(out.strip())
    logs = [log.read_text() for _, _, log in procs]

    local = cache / "s3" / uri.removeprefix("s3://")
    assert dirs == {str(local)}
    _assert_same_files(local, shas)
    _assert_fetched_once(proxy, local)
    assert sum(rng is not None for _, rng in proxy.gets()) == 6 + 4  # big.bin in 6 parts, 4 small files
    assert sum("downloading 5 files" in text for text in logs) == 1, logs
    assert sum("waiting up to 7200 s" in text and "reusing" in text for text in logs) == 2, logs


def test_killed_downloader_releases_the_lock(source, start, tmp_path):
    uri, shas, proxy = source
    proxy.delay = _ranged(0.25)  # 64 KB parts one at a time: the first download would take ~25 s
    cache = tmp_path / "cache"
    local = cache / "s3" / uri.removeprefix("s3://")
    first, go1, _ = start("first", uri, cache, proxy, part_bytes=64 << 10, workers=1)
    second, go2, log2 = start("second", uri, cache, proxy, part_bytes=2**20, workers=4)
    go1.touch()
    part = local / f"big.bin.part-{first.pid}"
    _wait_for(part.exists, "the first process to start big.bin")
    _wait_for(lambda: (tmp_path / "second.ready").exists(), "the second process to import")
    go2.touch()
    _wait_for(lambda: "waiting up to" in log2.read_text(), "the second process to wait on the lock")
    _wait_for(lambda: proxy.fetched("models/tiny/big.bin") > 0, "the first process to fetch part of big.bin")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    proxy.delay = 0.0
    out, _ = second.communicate(timeout=60)

    assert first.returncode == -signal.SIGKILL
    assert second.returncode == 0, log2.read_text()
    assert out.strip() == str(local)
    text = log2.read_text()
    assert f"removing {part}, left by an interrupted download" in text, text
    assert re.search(r"downloading [1-5] files", text) and "reusing" not in text, text
    _assert_same_files(local, shas)


def test_large_files_reassemble_byte_exact(s3_bucket, tmp_path, monkeypatch):
    """Sizes around the part size, an empty file and one in a subfolder, in-process."""
    import boto3

    bucket, endpoint = s3_bucket
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    part = 2**20
    sizes = {"model.safetensors": 5 * part + 7, "exact.bin": part, "over.bin": part + 1,
             "empty.txt": 0, "sub/tokenizer.json": 1000}
    src = {name: os.urandom(n) for name, n in sizes.items()}
    for name, data in src.items():
        client.put_object(Bucket=bucket, Key=f"models/tiny/{name}", Body=data)
    monkeypatch.setattr(weights, "PART_BYTES", part)
    monkeypatch.setattr(weights, "DOWNLOAD_WORKERS", 4)
    proxy = Relay(int(endpoint.rsplit(":", 1)[1]))
    try:
        local = weights.resolve_source(f"s3://{bucket}/models/tiny", cache_dir=tmp_path / "cache",
                                       storage_options={"endpoint_url": proxy.url})
        for name, data in src.items():
            assert (local / name).read_bytes() == data, name
            assert proxy.fetched(f"models/tiny/{name}") == sizes[name], name
        assert not list(local.rglob("*.part-*"))
        ranges = sorted(rng for path, rng in proxy.gets() if path.endswith("model.safetensors"))
        assert ranges == sorted(f"bytes={i * part}-{min((i + 1) * part, sizes['model.safetensors']) - 1}"
                                for i in range(6))
        n = len(proxy.requests)
        assert weights.resolve_source(f"s3://{bucket}/models/tiny", cache_dir=tmp_path / "cache",
                                      storage_options={"endpoint_url": proxy.url}) == local
        assert len(proxy.requests) == n  # the .complete marker: no request at all
    finally:
        proxy.close()


def test_patterns_then_full_download_reuses_files(source, tmp_path):
    uri, shas, proxy = source
    cache = tmp_path / "cache"
    opts = {"endpoint_url": proxy.url}
    local = weights.resolve_source(uri, cache_dir=cache, storage_options=opts, patterns=["*.json"])
    assert sorted(p.name for p in local.iterdir() if not p.name.startswith(".")) == \
        ["config.json", "model.safetensors.index.json"]
    assert not (local / ".complete").exists() and list(local.glob(".complete-*"))
    assert weights.resolve_source(uri, cache_dir=cache, storage_options=opts) == local
    _assert_same_files(local, shas)
    _assert_fetched_once(proxy, local)  # the json files were not fetched again
    assert (local / ".complete").exists()
    with pytest.raises(weights.CheckpointError, match="no files matching"):
        weights.resolve_source(uri.replace("tiny", "none"), cache_dir=cache, storage_options=opts,
                               patterns=["*.json"])
    with pytest.raises(weights.CheckpointError, match="no safetensors files"):
        weights.resolve_source(uri.replace("tiny", "none"), cache_dir=cache, storage_options=opts)


def test_waiting_for_the_lock_times_out(source, tmp_path, monkeypatch):
    from filelock import FileLock

    uri, _, proxy = source
    cache = tmp_path / "cache"
    local = cache / "s3" / uri.removeprefix("s3://")
    local.mkdir(parents=True)
    monkeypatch.setenv(weights.LOCK_TIMEOUT_ENV, "0.3")
    with FileLock(local / weights.LOCK_FILE):  # another process holds it (flock is per open file)
        with pytest.raises(TimeoutError, match=weights.LOCK_TIMEOUT_ENV):
            weights.resolve_source(uri, cache_dir=cache, storage_options={"endpoint_url": proxy.url})
    assert proxy.requests == []
    monkeypatch.setenv(weights.LOCK_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="not a number of seconds"):
        weights.resolve_source(uri, cache_dir=cache, storage_options={"endpoint_url": proxy.url})
