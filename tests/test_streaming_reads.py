"""A shard is read as a stream of bounded blocks: memory follows `input.read_block_mb`, not the
shard; only the last block carries the shard's total. Faults are real: truncated files, and the
S3 server's network taken away in the middle of a tar."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ConfigError, load_config
from pipeline.config import InputConfig, RetryConfig, S3Config
from pipeline.listing import Shard
from pipeline.readers import iter_shard, read_shard, row_bytes, shard_blocks_fn
from pipeline.rows import ROW_COLUMNS, SHARD_KEY, TOTAL_UNKNOWN

from .conftest import _boto_creds
from .data import webdataset_shards
from .netfault import Relay

KB, MB = 1024, 1024 * 1024


def jpeg_like(i: int, size: int) -> bytes:
    """Incompressible bytes behind a JPEG signature (the reader never decodes)."""
    return b"\xff\xd8\xff\xe0" + np.random.default_rng(i).bytes(size - 4)


def write_big_tar(path: Path, n: int, low: int = 40 * KB, high: int = 60 * KB) -> list[tuple[str, str, int]]:
    """n img2dataset-style samples (jpg + json + txt), written one at a time; returns
    (key, sha1 of the image, image size) per sample."""
    sizes = np.random.default_rng(0).integers(low, high, n)
    expected = []
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            key, image = f"{i:09d}", jpeg_like(i, int(sizes[i]))
            for name, payload in ((f"{key}.jpg", image), (f"{key}.json", json.dumps({"q": [f"q{i}"]}).encode()),
                                  (f"{key}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            expected.append((key, hashlib.sha1(image).hexdigest(), len(image)))
    return expected


def check_contract(blocks: list[list[dict]], budget: int) -> None:
    """Indices 0..n-1 in order, blocks within the budget (or one row alone), and the total only
    on every row of the last block."""
    rows = [r for b in blocks for r in b]
    assert [r["image_index"] for r in rows] == list(range(len(rows)))
    assert all(b for b in blocks)
    for b in blocks:
        assert len(b) == 1 or sum(row_bytes(r) for r in b) <= budget
        assert all(list(r) == list(rows[0]) and set(r) == set(ROW_COLUMNS) for r in b)
    for b in blocks[:-1]:
        assert {r["shard_total"] for r in b} == {TOTAL_UNKNOWN}
    assert {r["shard_total"] for r in blocks[-1]} == {len(rows)}


def test_a_large_tar_streams_in_bounded_memory(tmp_path):
    path = tmp_path / "big.tar"
    expected = write_big_tar(path, 2000)  # about 100 MB
    shard_bytes = sum(size for *_, size in expected)
    budget = 4 * MB
    cfg = InputConfig(path=str(tmp_path), questions_column="q")

    got, totals, sizes, counts = [], [], [], []
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for block in iter_shard(Shard("big", str(path)), cfg, S3Config(), block_bytes=budget):
            totals.append({r["shard_total"] for r in block})
            sizes.append(sum(row_bytes(r) for r in block))
            counts.append(len(block))
            got.extend((r["image_index"], r["key"], hashlib.sha1(r["image"]).hexdigest(), r["questions"],
                        r["read_status"]) for r in block)
            del block  # the consumer keeps nothing: what remains is the reader's own
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert got == [(i, k, h, json.dumps([f"q{i}"]), None) for i, (k, h, _) in enumerate(expected)]
    assert totals[:-1] == [{TOTAL_UNKNOWN}] * (len(totals) - 1) and totals[-1] == {2000}
    assert len(counts) >= shard_bytes // budget and max(sizes) <= budget
    # the block being filled, the next sample, the record of what was read (`got`), tar buffers
    slack = 4 * max(size for *_, size in expected) + 1 * MB
    assert peak < budget + slack, (peak, budget + slack)
    assert peak < shard_bytes / 10


def test_a_tar_truncated_mid_way_keeps_what_was_read(tmp_path):
    path = tmp_path / "t.tar"
    expected = write_big_tar(path, 60, 3 * KB, 5 * KB)
    data = path.read_bytes()
    cut = data.find(b"000000040.jpg") + 512 + 1000  # inside sample 40's image
    path.write_bytes(data[:cut])
    blocks = list(iter_shard(Shard("t", str(path)), InputConfig(path=str(tmp_path)), S3Config(), block_bytes=20 * KB))
    check_contract(blocks, 20 * KB)
    rows = [r for b in blocks for r in b]
    assert [r["key"] for r in rows[:40]] == [k for k, *_ in expected[:40]]
    assert all(r["read_status"] is None for r in rows[:40])
    # sample 40 as far as it came (no image: read_error), then the shard's final error row
    assert rows[40]["key"] == "000000040" and rows[40]["read_status"] == "read_error"
    assert rows[-1]["key"] == SHARD_KEY and rows[-1]["read_status"] == "read_error"
    assert rows[-1]["read_error"].startswith("shard read failed after 41 samples: ReadError")
    assert len(rows) == 42 and rows[-1]["shard_total"] == 42


def test_per_sample_semantics_are_kept_in_blocks(tmp_path):
    """Bad images, json questions, a sample without image, and a key that comes back later."""
    expected = webdataset_shards(tmp_path, n_shards=1, per_shard=6, bad=True, questions=True)
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "a") as tar:  # a late file of sample 0, and a sample with no image
        for name, payload in (("000000000.json", b'{"questions": ["late?"]}'), ("lonely.txt", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    cfg = InputConfig(path=str(tmp_path), questions_column="questions", max_image_bytes=1500)
    blocks = list(iter_shard(Shard("00000", str(path)), cfg, S3Config(), block_bytes=2 * KB))
    check_contract(blocks, 2 * KB)
    rows = [r for b in blocks for r in b]
    assert [r["key"] for r in rows[:-2]] == list(expected)
    by_key = {r["key"]: r for r in rows[:-2]}
    assert by_key["000000000"]["questions"] == "[]" and by_key["000000002"]["questions"] == json.dumps(
        ["Is sample 2 red?"] * 2)
    too_large = [r for r in rows if r["read_status"] == "image_too_large"]
    assert too_large and all("over max_image_bytes (1500)" in r["read_error"] for r in too_large)
    late, lonely = rows[-2], rows[-1]
    assert late["key"] == "000000000" and late["read_status"] == "read_error" and late["image"] is None
    assert "not consecutive" in late["read_error"]
    assert lonely["key"] == "lonely" and lonely["read_error"] == "sample has no image file"
    assert read_shard(Shard("00000", str(path)), cfg, S3Config()) == [
        dict(r, shard_total=len(rows)) for r in rows]


def test_read_shard_is_the_blocks_concatenated(tmp_path):
    webdataset_shards(tmp_path, n_shards=1, per_shard=20, bad=True, questions=True)
    cfg = InputConfig(path=str(tmp_path), questions_column="questions")
    shard = Shard("00000", str(tmp_path / "00000.tar"))
    blocks = list(iter_shard(shard, cfg, S3Config(), block_bytes=5 * KB))
    assert len(blocks) > 3
    check_contract(blocks, 5 * KB)
    rows = read_shard(shard, cfg, S3Config())
    assert rows == [dict(r, shard_total=len(rows)) for b in blocks for r in b]
    assert {r["shard_total"] for r in rows} == {len(rows)}
    assert list(iter_shard(Shard("empty", str(tmp_path / "none")), InputConfig(format="folder"), S3Config())) == []


def test_parquet_is_read_by_record_batches(tmp_path):
    path = tmp_path / "p.parquet"
    images = [jpeg_like(i, 2 * KB + i) for i in range(300)]
    images[7] = None
    pq.write_table(pa.table({"image": images, "question": [f"q{i}" for i in range(300)]}), path, row_group_size=64)
    cfg = InputConfig(path=str(tmp_path), format="parquet", questions_column="question")
    blocks = list(iter_shard(Shard("p", str(path)), cfg, S3Config(), block_bytes=16 * KB))
    check_contract(blocks, 16 * KB)
    assert len(blocks) > 30
    rows = [r for b in blocks for r in b]
    assert [r["key"] for r in rows] == [f"p-{i:06d}" for i in range(300)]
    assert [r["image"] for r in rows] == images and rows[7]["read_error"] == "no image bytes in row"
    assert rows[5]["questions"] == json.dumps(["q5"])
    assert read_shard(Shard("p", str(path)), cfg, S3Config()) == [dict(r, shard_total=300) for r in rows]

    wrong = InputConfig(path=str(tmp_path), format="parquet", image_column="jpg")
    (only,) = read_shard(Shard("p", str(path)), wrong, S3Config())
    assert only["key"] == SHARD_KEY and "no image column 'jpg'" in only["read_error"]
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 truncated")
    (only,) = read_shard(Shard("b", str(tmp_path / "broken.parquet")), cfg, S3Config())
    assert only["read_status"] == "read_error" and only["read_error"].startswith("not a readable Parquet file")


def test_folder_input_is_the_listing_in_blocks(tmp_path):
    files = [str(tmp_path / f"d/{i:03d}.jpg") for i in range(40)]
    blocks = list(iter_shard(Shard("part-00000", str(tmp_path), files), InputConfig(format="folder"),
                             S3Config(), block_bytes=2 * KB))
    check_contract(blocks, 2 * KB)
    assert [r["image_uri"] for b in blocks for r in b] == files
    assert [r["key"] for b in blocks for r in b] == [f"d/{i:03d}" for i in range(40)]


def test_read_block_mb_is_validated(tmp_path):
    base = {"input": {"path": str(tmp_path)}, "output": {"path": str(tmp_path / "o")}, "model": {"source": "m"}}
    assert load_config(data=base).input.read_block_mb == 64
    assert load_config(data=base, overrides=["input.read_block_mb=0.5"]).input.read_block_mb == 0.5
    for bad in ("0", "-1"):
        with pytest.raises(ConfigError, match="input.read_block_mb"):
            load_config(data=base, overrides=[f"input.read_block_mb={bad}"])


# --- a transient failure in the middle of a tar on S3 --------------------------------------------

def _upload(endpoint: str, bucket: str, key: str, path: Path) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, **_boto_creds()).upload_file(str(path), bucket, key)


class _OnRetry(logging.Handler):
    """Records the pipeline's "transient failure" warnings (the reader's own retry, `errors.retry`)
    and ends the proxy's outage at the first: only that retry can bring the rows back."""

    def __init__(self, proxy: Relay) -> None:
        super().__init__(logging.WARNING)
        self.proxy, self.messages = proxy, []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "transient failure" in message:
            self.messages.append(message)
            self.proxy.restore()


def test_network_cut_mid_tar_resumes_without_duplicates(s3_bucket, tmp_path):
    bucket, endpoint = s3_bucket
    expected = write_big_tar(tmp_path / "s.tar", 400, 6 * KB, 10 * KB)  # about 4 MB
    _upload(endpoint, bucket, "in/s.tar", tmp_path / "s.tar")
    proxy = Relay(int(endpoint.rsplit(":", 1)[1]))
    pipeline_log = logging.getLogger("pipeline")
    on_retry, level = _OnRetry(proxy), pipeline_log.level
    try:
        s3 = S3Config(endpoint_url=proxy.url, max_attempts=1)
        shard, cfg, budget = Shard("s", f"s3://{bucket}/in/s.tar"), InputConfig(path=f"s3://{bucket}/in"), 64 * KB
        # a clean read shows the byte ranges the reader asks for (as the proxy saw them): cut the second
        clean = [r for b in iter_shard(shard, cfg, s3, block_bytes=budget) for r in b]
        starts = sorted({first for first, _ in proxy.ranges})
        assert len(starts) >= 3, proxy.ranges
        proxy.cut_on(f"bytes={starts[1]}-".encode())  # down until the reader's own retry restores it

        blocks, outages_seen = [], []
        pipeline_log.addHandler(on_retry)
        pipeline_log.setLevel(logging.WARNING)
        for block in iter_shard(shard, cfg, s3, RetryConfig(deadline_s=60, backoff_s=0.3), block_bytes=budget):
            outages_seen.append(len(proxy.outages))
            blocks.append(block)
    finally:
        pipeline_log.removeHandler(on_retry)
        pipeline_log.setLevel(level)
        proxy.close()
    assert proxy.outages, "the outage never happened"
    assert outages_seen[0] == 0 and outages_seen[-1] == 1  # rows were out before the cut, more after it
    assert on_retry.messages, "the reader's own retry never ran"
    check_contract(blocks, budget)
    rows = [r for b in blocks for r in b]
    assert [(r["key"], hashlib.sha1(r["image"]).hexdigest()) for r in rows] == [(k, h) for k, h, _ in expected]
    assert [dict(r, shard_total=0) for r in rows] == [dict(r, shard_total=0) for r in clean]


def test_a_network_outage_longer_than_the_deadline_ends_the_shard_transient(s3_bucket, tmp_path):
    bucket, endpoint = s3_bucket
    write_big_tar(tmp_path / "s.tar", 200, 6 * KB, 10 * KB)
    _upload(endpoint, bucket, "in/s.tar", tmp_path / "s.tar")
    proxy = Relay(int(endpoint.rsplit(":", 1)[1]))
    try:
        s3 = S3Config(endpoint_url=proxy.url, max_attempts=1)
        shard, cfg = Shard("s", f"s3://{bucket}/in/s.tar"), InputConfig(path=f"s3://{bucket}/in")
        proxy.cut_on(b"bytes=")  # the first byte range, before any row; never restored
        rows = read_shard(shard, cfg, s3, RetryConfig(deadline_s=1, backoff_s=0.2))
    finally:
        proxy.close()
    (only,) = rows
    assert only["key"] == SHARD_KEY and only["read_status"] == "transient_error"
    assert only["read_error"].startswith(f"reading {shard.uri}: still failing after")


# --- through Ray ------------------------------------------------------------------------------------

def _ray_read(ray_cluster, shards: list[Shard], cfg: InputConfig, out: Path, target: int | None) -> list[dict]:
    """Run `shard_blocks_fn` in Ray read tasks as the job does; each task records the Python heap
    peak of its worker while it reads (tracemalloc sees our rows and Ray's row buffer)."""
    import ray
    from ray.data import TaskPoolStrategy

    fn = shard_blocks_fn(cfg, S3Config(), RetryConfig())

    def read(item: dict) -> object:
        tracemalloc.start()
        tracemalloc.reset_peak()
        try:
            yield from fn(Shard(str(item["shard_id"]), str(item["uri"])))
            (out / f"{item['shard_id']}.peak").write_text(str(tracemalloc.get_traced_memory()[1]))
        finally:
            tracemalloc.stop()

    ds = ray.data.from_items([s.to_dict() for s in shards], override_num_blocks=len(shards))
    if target is not None:
        ds.context.target_max_block_size = target
    ds = ds.flat_map(read, num_cpus=0, compute=TaskPoolStrategy(size=2))
    return ds.select_columns([c for c in ROW_COLUMNS if c != "image"]).take_all()


def test_ray_read_tasks_hold_a_few_blocks_not_the_shard(ray_cluster, tmp_path):
    shards, expected = [], {}
    for s in range(2):
        path = tmp_path / f"{s}.tar"
        expected[str(s)] = write_big_tar(path, 300)  # about 15 MB each
        shards.append(Shard(str(s), str(path)))
    shard_bytes = min(sum(size for *_, size in e) for e in expected.values())
    budget = 1 * MB
    cfg = InputConfig(path=str(tmp_path), read_block_mb=budget / MB)

    rows = _ray_read(ray_cluster, shards, cfg, tmp_path, target=budget)
    for sid, exp in expected.items():
        mine = sorted((r for r in rows if r["shard_id"] == sid), key=lambda r: r["image_index"])
        assert [r["key"] for r in mine] == [k for k, *_ in exp]
        assert [r["image_index"] for r in mine] == list(range(len(exp)))
        totals = [r["shard_total"] for r in mine]
        assert set(totals) == {TOTAL_UNKNOWN, len(exp)} and totals[-1] == len(exp)
        peak = int((tmp_path / f"{sid}.peak").read_text())
        # the block this reader fills + Ray's row buffer (cut at target_max_block_size) + samples
        assert peak < 2 * budget + 4 * 60 * KB + 1 * MB, peak
        assert peak < shard_bytes / 4

    # with Ray's default block size (128 MiB) the task's row buffer holds the whole shard
    _ray_read(ray_cluster, shards, cfg, tmp_path, target=None)
    assert all(int((tmp_path / f"{s.shard_id}.peak").read_text()) > shard_bytes * 0.9 for s in shards)
