"""Preprocess fetches a batch's URI images concurrently: against a real S3 server (moto) behind a
loopback proxy that adds latency to every request, the same rows come out, several times sooner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pandas as pd
import pytest

from pipeline import load_config

from .conftest import free_port
from .data import good_image
from .netfault import Relay
from .test_pipeline import job

ROOT = Path(__file__).resolve().parent.parent
LATENCY_S = 0.05  # per S3 request (HEAD or GET), added by the proxy
N_GOOD = 24
COMPARED = ["key", "status", "error_message", "width", "height", "pixels", "prompt_ids"]


@pytest.fixture(scope="module")
def store(s3_server):
    """A bucket with `N_GOOD` small JPEGs, one large and one corrupt file under `in/imgs/`, and
    a latency proxy in front of the server; yields (bucket, proxy)."""
    bucket = f"t-fetch-{free_port()}"
    client = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    for i in range(N_GOOD):
        client.put_object(Bucket=bucket, Key=f"in/imgs/{i:03d}.jpg", Body=good_image(i))
    client.put_object(Bucket=bucket, Key="in/imgs/big.jpg", Body=good_image(99, (400, 400)))
    client.put_object(Bucket=bucket, Key="in/imgs/corrupt.jpg", Body=b"not a jpeg")
    client.put_object(Bucket=bucket, Key="elsewhere/x.jpg", Body=good_image(1))
    proxy = Relay(int(s3_server.rsplit(":", 1)[1]))
    proxy.delay = LATENCY_S
    yield bucket, proxy
    proxy.close()


def _job(ckpt, tok, bucket: str, proxy: Relay, tmp: Path) -> dict:
    return job(ckpt, tok, f"s3://{bucket}/in", tmp / "out",
               input={"format": "parquet", "uri_column": "u", "max_image_bytes": 50_000},
               s3={"endpoint_url": proxy.url}, retry={"deadline_s": 5})


@pytest.fixture(scope="module")
def stage(store, ckpt_v1, tokenizer_v1, tmp_path_factory):
    from cogvlm.weights import read_config
    from pipeline.stages import Preprocess

    bucket, proxy = store
    cfg = load_config(data=_job(ckpt_v1, tokenizer_v1, bucket, proxy, tmp_path_factory.mktemp("fetch")))
    return Preprocess(cfg, read_config(ckpt_v1))


def _rows(bucket: str, uris: list[str | bytes | None], errors: dict[int, str] | None = None) -> pd.DataFrame:
    """A batch as the reader makes it from a Parquet shard with a URI column (bytes: an image
    column's row, as from a shard with image bytes)."""
    errors = errors or {}
    return pd.DataFrame([{"key": f"k{i:03d}", "image": uri if isinstance(uri, bytes) else None,
                          "image_uri": None if isinstance(uri, bytes) else uri, "questions": None,
                          "read_error": errors.get(i), "read_status": "read_error" if i in errors else None,
                          "shard_id": "index", "source_uri": f"s3://{bucket}/in/index.parquet",
                          "shard_total": len(uris), "image_index": i} for i, uri in enumerate(uris)],
                        dtype=object)  # None stays None, as in the reader's rows


def _timed(stage, batch: pd.DataFrame, proxy: Relay) -> tuple[pd.DataFrame, float, int, int]:
    """(output, seconds, S3 requests made, most requests in flight at once)."""
    before = len(proxy.requests)
    proxy.most_waiting = 0
    start = time.perf_counter()
    out = stage(batch)
    return out, time.perf_counter() - start, len(proxy.requests) - before, proxy.most_waiting


def _serial_and_concurrent(stage, batch, proxy, monkeypatch):
    import pipeline.stages as stages

    stage(batch.head(2))  # warm: the S3 filesystem, its credentials and connections
    with monkeypatch.context() as m:
        m.setattr(stages, "FETCH_CONCURRENCY", 1)
        serial = _timed(stage, batch, proxy)
    return serial, _timed(stage, batch, proxy)


def test_a_batch_of_uris_is_fetched_concurrently_with_the_same_rows(stage, store, monkeypatch):
    bucket, proxy = store
    batch = _rows(bucket, [f"s3://{bucket}/in/imgs/{i:03d}.jpg" for i in range(N_GOOD)])
    (serial, t_serial, n_serial, w_serial), (fast, t_fast, n_fast, w_fast) = _serial_and_concurrent(
        stage, batch, proxy, monkeypatch)
    # the times are printed, not asserted (this machine is shared); what is asserted is that
    # requests really overlapped: with one fetch at a time no request can wait beside another
    print(f"\n{N_GOOD} images, {LATENCY_S * 1000:.0f} ms per request: serial {t_serial:.2f} s "
          f"({n_serial} requests), concurrent {t_fast:.2f} s ({n_fast} requests), {t_serial / t_fast:.1f}x; "
          f"at most {w_serial} / {w_fast} requests in flight at once")
    assert (serial.status == "ok").all() and serial.pixels.map(len).gt(0).all()
    pd.testing.assert_frame_equal(serial[COMPARED], fast[COMPARED])
    assert n_serial == n_fast >= 2 * N_GOOD  # a HEAD and a GET each, nothing cached
    assert w_serial == 1 and w_fast >= 4, (w_serial, w_fast)


def test_bad_uris_among_good_ones_keep_their_statuses_and_messages(stage, store, monkeypatch):
    bucket, proxy = store
    uris = [f"s3://{bucket}/in/imgs/000.jpg",
            f"s3://{bucket}/elsewhere/x.jpg",  # outside the input and allowed_uri_prefixes
            f"s3://{bucket}/in/imgs/missing.jpg",
            f"s3://{bucket}/in/imgs/big.jpg",  # over max_image_bytes
            "imgs/001.jpg",  # relative to the shard file's folder
            f"s3://{bucket}/in/imgs/corrupt.jpg",
            "http://127.0.0.1:1/x.jpg",
            None,  # the reader already said why
            f"s3://{bucket}/in/imgs/../imgs/002.jpg",
            f"s3://{bucket}/in/imgs/003.jpg",
            good_image(5),  # bytes in the row: nothing to fetch
            b"garbage"]
    batch = _rows(bucket, uris, errors={7: "empty image URI"})
    (serial, *_), (fast, *_) = _serial_and_concurrent(stage, batch, proxy, monkeypatch)
    pd.testing.assert_frame_equal(serial[COMPARED], fast[COMPARED])
    got = list(zip(fast.status, fast.error_message.fillna("")))
    expected = [("ok", ""),
                ("read_error", f"URI refused: s3://{bucket}/elsewhere/x.jpg is outside"),
                ("read_error", f"not found: s3://{bucket}/in/imgs/missing.jpg"),
                ("image_too_large", "image file is over max_image_bytes (50000 bytes)"),
                ("ok", ""),
                ("decode_error", ""),
                ("read_error", "unsupported URI scheme http://"),
                ("read_error", "empty image URI"),
                ("read_error", "URI refused"),
                ("ok", ""),
                ("ok", ""),
                ("decode_error", "")]
    assert len(got) == len(expected)
    for (status, message), (want_status, want_start) in zip(got, expected):
        assert status == want_status and message.startswith(want_start), (status, message)
    assert fast.error_message[5] and fast.error_message[11]


def test_the_fault_hook_fires_before_the_rows_fetch(store, ckpt_v1, tokenizer_v1, tmp_path):
    """Crash isolation runs a retried batch one row at a time: the row named by the fault hook
    kills its process before its image is requested; the row before it was fetched and done."""
    bucket, proxy = store
    cfg = json.dumps(_job(ckpt_v1, tokenizer_v1, bucket, proxy, tmp_path), default=str)
    batch = _rows(bucket, [f"s3://{bucket}/in/imgs/{i:03d}.jpg" for i in (10, 11)])
    batch.to_pickle(tmp_path / "batch.pkl")
    script = f"""
import json, pandas as pd
from pathlib import Path
from cogvlm.weights import read_config
from pipeline import load_config
from pipeline.stages import Preprocess
cfg = load_config(data=json.loads({cfg!r}))
stage = Preprocess(cfg, read_config(Path(cfg.model.source)))
rows = pd.read_pickle({str(tmp_path / "batch.pkl")!r}).to_dict("records")
print("first:", stage._process(rows[:1])[0]["status"], flush=True)
stage._process(rows[1:])
print("survived", flush=True)
"""
    env = dict(os.environ, COGVLM_FAULT_KILL_WORKER_ON="preprocess:k001")
    before = len(proxy.requests)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    seen = b"\n".join(r.line for r in proxy.requests[before:])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "first: ok" in proc.stdout and "survived" not in proc.stdout
    assert b"/in/imgs/010.jpg" in seen and b"/in/imgs/011.jpg" not in seen
