"""Inputs as their tools write them (issue 21, items 5 and 6): shards that webdataset's own writer
makes (plain and compressed, keys with dots), compared with webdataset's own reader, every input
file accounted for, and img2dataset's three output formats as img2dataset itself wrote them
(tests/assets/img2dataset, made by make.py there from a URL list with dead links)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ConfigError, load_config, run
from pipeline.config import InputConfig, S3Config
from pipeline.listing import count_images, list_input
from pipeline.readers import read_shard
from pipeline.rows import SHARD_KEY

from .data import good_image
from .test_pipeline import job

I2D = Path(__file__).resolve().parent / "assets" / "img2dataset"
SIDECAR = "img2dataset metadata"


def write_webdataset_shards(root: Path) -> None:
    """Shards written by webdataset itself: ShardWriter (plain, 2 shards), TarWriter gzipped under
    the same stem as a plain one, a .tgz, keys with dots (webdataset's key is the name up to the
    first dot of the basename) and in a directory."""
    import webdataset as wds

    def sample(key: str, i: int) -> dict:
        return {"__key__": key, "jpg": good_image(i), "txt": f"caption {key}", "json": {"n": i}}

    root.mkdir(parents=True)
    with wds.ShardWriter(str(root / "plain-%06d.tar"), maxcount=3, verbose=0) as sink:
        for i in range(5):
            sink.write(sample(f"p{i}", i))
    with wds.TarWriter(str(root / "plain-000000.tar.gz")) as sink:  # same stem as a plain shard
        for i, key in enumerate(["a.b.c", "d.e.f", "sub/g.h"]):
            sink.write(sample(key, 10 + i))
    with wds.TarWriter(str(root / "more.tgz")) as sink:
        for i in range(2):
            sink.write(sample(f"t{i}.x", 20 + i))


def webdataset_keys(path: Path) -> list[str]:
    """The sample keys webdataset's own reader yields for one shard."""
    import webdataset as wds

    return [s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False)]


def test_compressed_shards_are_listed_with_distinct_ids_and_every_other_file_is_accounted_for(tmp_path):
    inp = tmp_path / "in"
    write_webdataset_shards(inp)
    (inp / "old.tar.zst").write_bytes(b"(zstd bytes)")  # a tar kind nobody here reads
    (inp / "fake.tar").write_bytes(b"this is not a tar archive at all" * 40)  # claims .tar, is not
    (inp / "plain-000000_stats.json").write_text("{}")
    (inp / "README.md").write_text("notes")
    plan = list_input(InputConfig(path=str(inp)), S3Config())
    ids = {s.shard_id: Path(s.uri).name for s in plan.shards}
    assert ids == {"plain-000000": "plain-000000.tar", "plain-000001": "plain-000001.tar",
                   "plain-000000.tar.gz": "plain-000000.tar.gz", "more.tgz": "more.tgz",
                   "old.tar.zst": "old.tar.zst", "fake": "fake.tar"}
    assert plan.skipped_files == 2
    assert {why.split(" (")[0]: n for why, n in plan.skipped_reasons.items()} == {
        SIDECAR: {"files": 1, "examples": ["plain-000000_stats.json"]},
        "not a tar shard": {"files": 1, "examples": ["README.md"]}}
    by_id = {s.shard_id: s for s in plan.shards}
    cfg = InputConfig(path=str(inp))
    # a shard of an unknown kind, or not a tar at all: one read_error row naming why, never silence
    (zst,) = read_shard(by_id["old.tar.zst"], cfg, S3Config())
    assert zst["key"] == SHARD_KEY and zst["read_status"] == "read_error" and ".tar.zst" in zst["read_error"]
    (fake,) = read_shard(by_id["fake"], cfg, S3Config())
    assert fake["key"] == SHARD_KEY and "not a tar archive" in fake["read_error"]
    # keys as webdataset's reader has them, images found by their last extension ("b.c.jpg")
    gz = read_shard(by_id["plain-000000.tar.gz"], cfg, S3Config())
    assert [r["key"] for r in gz] == webdataset_keys(inp / "plain-000000.tar.gz") == ["a", "d", "sub/g"]
    assert all(r["image"] and r["read_error"] is None for r in gz)
    # the plan counts compressed shards from their headers too
    counted = count_images(load_config(data={"input": {"path": str(inp)}, "output": {"path": str(tmp_path)},
                                             "model": {"source": "x"}}), plan.shards)
    assert {k: counted["per_shard"].get(k) for k in ("plain-000000.tar.gz", "more.tgz")} == {
        "plain-000000.tar.gz": 3, "more.tgz": 2}


def test_the_job_reads_webdatasets_own_shards_as_webdataset_reads_them(ray_cluster, ckpt_v1, tokenizer_v1,
                                                                        tmp_path):
    inp = tmp_path / "in"
    write_webdataset_shards(inp)
    (inp / "old.tar.zst").write_bytes(b"(zstd bytes)")
    (inp / "notes.txt").write_text("not a shard")
    summary = run(load_config(data=job(ckpt_v1, tokenizer_v1, inp, tmp_path / "out",
                                       input={"carry_columns": ["txt", "n"]})))
    df = pd.read_parquet(tmp_path / "out" / "data")
    expected = {(name, key) for name in ("plain-000000.tar", "plain-000001.tar", "plain-000000.tar.gz",
                                         "more.tgz") for key in webdataset_keys(inp / name)}
    ok = df[df.status == "ok"]
    assert {(Path(u).name, k) for u, k in zip(ok.source_uri, ok.key)} == expected and len(ok) == len(expected) == 10
    # the sidecars came along: the .txt as written (under the writer's dotted key), the .json's "n"
    assert all(t.startswith(f"caption {k}") for t, k in zip(ok.txt, ok.key))
    assert sorted(ok.n) == [0, 1, 2, 3, 4, 10, 11, 12, 20, 21]
    for f in (tmp_path / "out" / "data").iterdir():  # one type in every shard's file, nulls in the zst's
        assert pq.read_schema(f).field("n").type == pa.int64() and pq.read_schema(f).field("txt").type == pa.string()
    bad = df[df.status != "ok"]
    assert list(bad.key) == [SHARD_KEY] and ".tar.zst" in bad.error_message.iloc[0] and bad.txt.isna().all()
    assert summary["shards_processed"] == 5
    assert summary["files_skipped"] == 1 and summary["files_skipped_examples"] == ["notes.txt"]
    ((why, skipped),) = summary["files_skipped_reasons"].items()
    assert why.startswith("not a tar shard") and skipped == {"files": 1, "examples": ["notes.txt"]}


def test_img2dataset_parquet_as_it_is(ray_cluster, ckpt_v1, tokenizer_v1, tmp_path):
    """img2dataset's Parquet: 4 images, 8 HTTP 404s, 1 undecodable download. Default settings find
    its `jpg` column and `key`; its failures are no error-guard matter; they are skipped and
    counted, or written as download_error rows with img2dataset's reason; chosen source columns
    are carried into the output with their types."""
    carry = ["caption", "url", "original_width", "sha256"]
    source = pq.read_table(I2D / "parquet" / "00000.parquet").to_pandas().set_index("key")
    ok_keys = sorted(source.index[source.status == "success"])
    assert len(ok_keys) == 4 and len(source) == 13

    summary = run(load_config(data=job(ckpt_v1, tokenizer_v1, I2D / "parquet", tmp_path / "skip",
                                       input={"format": "parquet", "carry_columns": carry})))
    table = pq.read_table(tmp_path / "skip" / "data" / "00000.parquet")
    assert table.schema.names[-4:] == carry
    assert [table.schema.field(c).type for c in carry] == [pa.string(), pa.string(), pa.int32(), pa.string()]
    df = table.to_pandas()
    assert sorted(df.key) == ok_keys and set(df.status) == {"ok"}
    for c in carry:
        assert list(df[c]) == [source.loc[k, c] for k in df.key], c
    assert summary["failed_downloads_skipped"] == 9 and summary["status_counts"] == {"ok": 4}
    assert summary["files_skipped"] == 1 and next(iter(summary["files_skipped_reasons"])).startswith(SIDECAR)
    # the plan counts the images to do from img2dataset's sidecar: 4, not its 13 rows
    cfg = load_config(data=job(ckpt_v1, tokenizer_v1, I2D / "parquet", tmp_path / "x", input={"format": "parquet"}))
    shards = list_input(cfg.input, cfg.s3).shards
    assert count_images(cfg, shards)["images"] == 4

    run(load_config(data=job(ckpt_v1, tokenizer_v1, I2D / "parquet", tmp_path / "rows",
                             input={"format": "parquet", "failed_downloads": "rows", "carry_columns": ["url"]},
                             errors={"guard_images": 10})))
    df = pd.read_parquet(tmp_path / "rows" / "data").set_index("key")
    assert len(df) == 13 and Counter(df.status) == {"ok": 4, "download_error": 9}
    failed = df[df.status == "download_error"]
    assert set(failed.error_message) == {"failed_to_download: HTTP Error 404: File not found",
                                         "failed_to_resize: Image decoding error"}
    assert (failed.url == source.loc[failed.index, "url"]).all()


def test_img2dataset_webdataset_and_files_outputs(ray_cluster, ckpt_v1, tokenizer_v1, tmp_path):
    """The same downloads as img2dataset's tars (sidecar txt and json carried) and as its files
    output (read as a folder, its .txt/.json/.parquet/_stats.json named as skipped, with why)."""
    source = pq.read_table(I2D / "parquet" / "00000.parquet").to_pandas().set_index("key")
    ok_keys = sorted(source.index[source.status == "success"])
    carry = ["txt", "url", "original_width", "sha256", "absent"]
    summary = run(load_config(data=job(ckpt_v1, tokenizer_v1, I2D / "webdataset", tmp_path / "wds",
                                       input={"carry_columns": carry})))
    table = pq.read_table(tmp_path / "wds" / "data" / "00000.parquet")
    assert [table.schema.field(c).type for c in carry] == [pa.string(), pa.string(), pa.int64(), pa.string(),
                                                           pa.string()]
    df = table.to_pandas()
    assert sorted(df.key) == ok_keys and set(df.status) == {"ok"}
    assert list(df.txt) == [source.loc[k, "caption"] for k in df.key]
    assert list(df.original_width) == [source.loc[k, "original_width"] for k in df.key]
    assert list(df.url) == [source.loc[k, "url"] for k in df.key] and df.absent.isna().all()
    assert summary["files_skipped"] == 2 and [r["files"] for r in summary["files_skipped_reasons"].values()] == [2]

    files = tmp_path / "files"
    shutil.copytree(I2D / "files", files)
    summary = run(load_config(data=job(ckpt_v1, tokenizer_v1, files, tmp_path / "files-out",
                                       input={"format": "folder"})))
    df = pd.read_parquet(tmp_path / "files-out" / "data")
    assert sorted(k.split("/")[-1] for k in df.key) == ok_keys and set(df.status) == {"ok"}
    assert summary["files_skipped"] == 10
    assert [w.startswith(SIDECAR) for w in summary["files_skipped_reasons"]] == [True]


def test_carry_and_download_settings_are_checked(tmp_path):
    base = {"input": {"path": str(tmp_path)}, "output": {"path": str(tmp_path)}, "model": {"source": "x"}}

    def cfg(**inp):
        return load_config(data=dict(base, input=dict(base["input"], **inp)))

    with pytest.raises(ConfigError, match="'width'.*output column"):
        cfg(carry_columns=["url", "width"])
    with pytest.raises(ConfigError, match="carry_columns needs input.format parquet or webdataset"):
        cfg(format="folder", carry_columns=["txt"])
    with pytest.raises(ConfigError, match="failed_downloads must be skip or rows"):
        cfg(failed_downloads="drop")
    assert cfg().input.image_column == "auto" and cfg().input.failed_downloads == "skip"


def test_failed_downloads_never_count_toward_the_error_guard():
    """The issue's numbers: 12 images and 18 dead URLs in the first 30 rows. Dead URLs are not
    images: the guard judges the 12 (and still stops when those fail)."""
    from pipeline.commit import ErrorGuard

    dead = [("download_error", "failed_to_download: HTTP Error 404: File not found")] * 18
    guard = ErrorGuard(30, 0.5)
    guard.add(30, dead)
    assert guard.verdict() is None
    guard = ErrorGuard(30, 0.5)
    guard.add(30, dead + [("decode_error", "cannot identify image file")] * 7)
    assert "7 of the first 12 images failed with decode_error" in guard.verdict()
