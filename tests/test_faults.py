"""Faults injected for real: the S3 server's network taken away, a full disk, workers killed,
hostile URIs and names, bad configs. Each test failed on the code before the fixes it covers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import ConfigError, InputError, load_config, run
from pipeline.errors import IncompleteRun, RunStopped

from .data import good_image, webdataset_shards, write_tar
from .netfault import Relay
from .test_pipeline import job, read_output_s3, s3_client, upload_dir

ROOT = Path(__file__).resolve().parent.parent


def keys_once(df: pd.DataFrame, expected) -> None:
    """Exactly one row per image (caption only): nothing lost, nothing doubled."""
    assert sorted(df.key) == sorted(expected), (len(df), len(expected))
    assert not df.key.duplicated().any()


# --- network faults against the S3 server (finding 1 and 7) ------------------------------------

@pytest.fixture()
def flaky_s3(s3_bucket):
    bucket, endpoint = s3_bucket
    proxy = Relay(int(endpoint.rsplit(":", 1)[1]))
    try:
        yield bucket, endpoint, proxy
    finally:
        proxy.close()


def test_s3_outage_during_reads_is_retried(ray_cluster, ckpt_v1, tokenizer_v1, flaky_s3, tmp_path):
    bucket, endpoint, proxy = flaky_s3
    expected = webdataset_shards(tmp_path / "in", n_shards=4, per_shard=3)
    upload_dir(s3_client(endpoint), bucket, tmp_path / "in", "shards")
    proxy.outage_on(b"00002.tar", seconds=8)  # S3 unreachable while that shard is read
    cfg = load_config(data=job(ckpt_v1, tokenizer_v1, f"s3://{bucket}/shards", tmp_path / "out",
                               s3={"endpoint_url": proxy.url, "max_attempts": 2},
                               retry={"deadline_s": 60, "backoff_s": 0.5}))
    summary = run(cfg)
    assert proxy.outages, "the outage never happened"
    assert summary["shards_processed"] == 4 and summary["shards_failed"] == []
    df = pd.read_parquet(tmp_path / "out" / "data")
    keys_once(df, expected)
    assert (df.status == "ok").all()


def test_s3_outage_longer_than_retries_leaves_the_shard_for_the_rerun(
        ray_cluster, ckpt_v1, tokenizer_v1, flaky_s3, tmp_path):
    bucket, endpoint, proxy = flaky_s3
    expected = webdataset_shards(tmp_path / "in", n_shards=4, per_shard=3)
    upload_dir(s3_client(endpoint), bucket, tmp_path / "in", "shards")
    proxy.outage_on(b"00002.tar", seconds=12)
    data = job(ckpt_v1, tokenizer_v1, f"s3://{bucket}/shards", tmp_path / "out",
               s3={"endpoint_url": proxy.url, "max_attempts": 1}, retry={"deadline_s": 2, "backoff_s": 0.3})
    with pytest.raises(IncompleteRun, match=r"shards left uncommitted after transient failures \(.*00002.*\): "
                                            r"reading s3://.*EndpointConnectionError.*Rerun") as e:
        run(load_config(data=data))
    failed = e.value.summary["shards_failed"]  # 00002, and any shard read while the store was away
    assert "00002" in failed
    ledger = {p.stem for p in (tmp_path / "out" / "_ledger").glob("*.json")}
    assert not ledger & set(failed) and len(ledger) == 4 - len(failed)  # not committed as error rows
    assert not any((tmp_path / "out" / "data" / f"{sid}.parquet").exists() for sid in failed)
    assert not list((tmp_path / "out" / "_claims").glob("*.json"))  # released for the rerun
    again = run(load_config(data=data))  # the network is back
    assert again["shards"] == failed and again["shards_skipped"] == 4 - len(failed)
    df = pd.read_parquet(tmp_path / "out" / "data")
    keys_once(df, expected)
    assert (df.status == "ok").all()


def test_transient_uri_fetch_failure_is_not_committed_as_a_read_error(
        ray_cluster, ckpt_v1, tokenizer_v1, flaky_s3, tmp_path):
    bucket, endpoint, proxy = flaky_s3
    client = s3_client(endpoint)
    uris = []
    for i in range(6):
        client.put_object(Bucket=bucket, Key=f"imgs/{i}.jpg", Body=good_image(i))
        uris.append(f"s3://{bucket}/imgs/{i}.jpg")
    pq.write_table(pa.table({"u": uris}), tmp_path / "index.parquet")
    client.upload_file(str(tmp_path / "index.parquet"), bucket, "index/part-0.parquet")
    proxy.outage_on(b"imgs/3.jpg", seconds=10)
    data = job(ckpt_v1, tokenizer_v1, f"s3://{bucket}/index", tmp_path / "out",
               input={"format": "parquet", "uri_column": "u", "allowed_uri_prefixes": [f"s3://{bucket}/imgs"]},
               s3={"endpoint_url": proxy.url, "max_attempts": 1}, retry={"deadline_s": 2, "backoff_s": 0.3})
    # the outage starts at imgs/3.jpg; the images fetched with it (concurrently) fail too
    with pytest.raises(IncompleteRun, match=r"\(part-0\): fetching s3://.*imgs/\d\.jpg"):
        run(load_config(data=data))
    assert not (tmp_path / "out" / "data" / "part-0.parquet").exists()
    import time

    while time.time() - proxy.outages[-1][1] < 11:
        time.sleep(0.5)
    again = run(load_config(data=data))
    assert again["shards"] == ["part-0"]
    df = pd.read_parquet(tmp_path / "out" / "data")
    assert (df.status == "ok").all() and len(df) == 6


def test_s3_outage_during_commits(ray_cluster, ckpt_v1, tokenizer_v1, flaky_s3, tmp_path):
    """Past `retry.deadline_s` a commit leaves its shard for the rerun: the CLI ends with one line naming it and exit 3, and the rerun commits the rest
    without committing a first-run shard again; every commit refused: the run stops short (exit 3)."""
    bucket, endpoint, proxy = flaky_s3
    expected = webdataset_shards(tmp_path / "in", n_shards=3, per_shard=2)
    cfg = job(ckpt_v1, tokenizer_v1, tmp_path / "in", f"s3://{bucket}/out", s3={"endpoint_url": proxy.url,
              "max_attempts": 2}, retry={"deadline_s": 60, "backoff_s": 0.5})  # (retries within it: throttled test)
    out2 = f"s3://{bucket}/out2"  # one shard's data file is refused (503) past the deadline
    proxy.answer_503 = lambda r: r.method == "PUT" and f"/{bucket}/out2/data/00001.parquet" in r.path
    cfg2 = dict(cfg, output={"path": out2}, retry={"deadline_s": 3, "backoff_s": 0.5})
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg2))
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    proc = subprocess.run([sys.executable, "-m", "jobs.caption", "--config", str(cfg_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 shards left uncommitted" in errors[0] and "(00001)" in errors[0] \
        and "Rerun the same config" in errors[0], errors
    assert "Traceback" not in proc.stderr
    first = json.loads(proc.stdout[proc.stdout.index("{"):])  # the run went on with the others
    assert first["shards"] == ["00000", "00002"] and first["shards_failed"] == ["00001"], first
    client = s3_client(endpoint)
    markers = {sid: client.get_object(Bucket=bucket, Key=f"out2/_ledger/{sid}.json")["Body"].read()
               for sid in first["shards"]}
    proxy.answer_503 = None
    again = run(load_config(data=cfg2))
    assert again["shards"] == ["00001"], again
    for sid, before in markers.items():  # committed once: the rerun did not rewrite the marker
        assert client.get_object(Bucket=bucket, Key=f"out2/_ledger/{sid}.json")["Body"].read() == before, sid
    keys_once(read_output_s3(endpoint, out2), expected)

    out3 = f"s3://{bucket}/out3"  # every commit refused: the store is down, the run stops short
    proxy.answer_503 = lambda r: r.method == "PUT" and f"/{bucket}/out3/data/" in r.path
    cfg3 = load_config(data=dict(cfg2, output={"path": out3}))
    with pytest.raises(IncompleteRun, match=r"the output store refused 3 commits in a row .*3 shards left "
                                            r"uncommitted \(00000, 00001, 00002\)\. Rerun the same config when"):
        run(cfg3)
    proxy.answer_503 = None
    assert run(cfg3)["shards"] == ["00000", "00001", "00002"]
    keys_once(read_output_s3(endpoint, out3), expected)


def test_throttled_output_commits_every_shard_once(ray_cluster, ckpt_v1, tokenizer_v1, flaky_s3, tmp_path):
    """For a window from the first commit on, every other PUT of a data file or marker is answered
    503 SlowDown and the others are applied with their answers lost, and a marker PUT meets refused
    connections: the run retries within its deadline or leaves shards for a rerun (exit 3); after at
    most one rerun every image is there once, every marker has its whole data file, and no shard
    the first run committed is committed again. (A guard: this held before the relay existed.)"""
    import itertools
    import time

    bucket, endpoint, relay = flaky_s3
    expected = webdataset_shards(tmp_path / "in", n_shards=4, per_shard=2)
    out = f"s3://{bucket}/out"
    window_s, opened, turn = 8.0, [], itertools.count()

    def in_window(r) -> bool:
        if r.method != "PUT" or not any(f"/{bucket}/out/{d}/" in r.path for d in ("data", "_ledger")):
            return False
        opened or opened.append(time.monotonic())
        return time.monotonic() - opened[0] < window_s

    relay.answer_503 = lambda r: in_window(r) and next(turn) % 2 == 0
    relay.drop_answer = in_window  # asked only of the PUTs not answered 503: applied, answer lost
    relay.outage_on(f"/{bucket}/out/_ledger/".encode(), seconds=2)  # refused connections for 2 s
    cfg = load_config(data=job(ckpt_v1, tokenizer_v1, tmp_path / "in", out,
                               s3={"endpoint_url": relay.url, "max_attempts": 2},
                               retry={"deadline_s": 20, "backoff_s": 0.3}))
    try:
        first = run(cfg)
    except IncompleteRun as e:  # shards left for the rerun
        first = e.summary
    assert relay.answered_503 and relay.dropped_answers and relay.outages, \
        (relay.answered_503, relay.dropped_answers, relay.outages)
    relay.answer_503 = relay.drop_answer = None
    client = s3_client(endpoint)
    markers = {sid: json.loads(client.get_object(Bucket=bucket, Key=f"out/_ledger/{sid}.json")["Body"].read())
               for sid in first["shards"]}
    if first["shards_failed"]:
        again = run(cfg)
        assert not set(again["shards"]) & set(first["shards"]) and not again["shards_failed"]
    for sid, before in markers.items():  # committed once: the rerun did not rewrite the marker
        now = json.loads(client.get_object(Bucket=bucket, Key=f"out/_ledger/{sid}.json")["Body"].read())
        assert now == before, sid
    listed = client.list_objects_v2(Bucket=bucket, Prefix="out/_ledger/")["Contents"]
    assert len(listed) == 4
    for obj in listed:  # every marker has its whole data file
        rec = json.loads(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
        body = client.get_object(Bucket=bucket, Key=f"out/{rec['file']}")["Body"].read()
        assert pq.read_table(pa.BufferReader(body)).num_rows == rec["rows"]
    keys_once(read_output_s3(endpoint, out), expected)


@pytest.fixture()
def small_disk(tmp_path):
    """A 3 MB tmpfs (a disk that fills for real); skipped where mounting is not permitted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_full_disk_stops_with_one_line_and_the_rerun_completes_once(ray_cluster, ckpt_v1, tokenizer_v1,
                                                                     small_disk, tmp_path):
    """The output's disk fills mid-run: one `error:` line saying the disk is full (exit 1 or 3),
    every marker has its whole data file and every data file reads; with space freed the rerun
    commits the rest, every image once, and no shard the first run committed again."""
    expected = webdataset_shards(tmp_path / "in", n_shards=8, per_shard=2)
    out = small_disk / "out"
    ballast = small_disk / "ballast"
    st = os.statvfs(small_disk)
    ballast.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 96 * 1024))  # 96 KB left: a few shards' worth
    cfg = job(ckpt_v1, tokenizer_v1, tmp_path / "in", out, model={"batch_size": 2},
              errors={"guard_images": 0}, retry={"deadline_s": 2, "backoff_s": 0.2})
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "jobs.caption", "--config", str(cfg_path)]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (1, 3), proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    errors_ = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors_ == [last] and "the disk is full" in last and "\x1b" not in last, proc.stderr[-3000:]
    assert "Traceback" not in last

    def markers() -> dict[str, dict]:
        return {m.stem: json.loads(m.read_text()) for m in (out / "_ledger").glob("*.json")}

    first = markers()
    assert len(first) < 8, "the disk never filled"
    for rec in first.values():  # every marker has its whole data file
        assert pq.read_table(out / rec["file"]).num_rows == rec["rows"]
    for f in (out / "data").glob("*"):  # and no partial data file lies where readers look
        pq.read_table(f)
    ballast.unlink()
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(markers()[sid] == rec for sid, rec in first.items())  # not committed again
    keys_once(pd.read_parquet(out / "data"), expected)


# --- names, temp files, caches, conditional writes (findings 2-5) -------------------------------

def test_colliding_and_hidden_shard_names_all_come_back(ray_cluster, ckpt_v1, tokenizer_v1, tmp_path):
    inp = tmp_path / "in"
    names = ["a/b.tar", "a__b.tar", "_under.tar", "...tar", ".tar", "x y.tar", "a~b.tar"]
    expected = []
    for n, name in enumerate(names):
        key = f"k{n}"
        write_tar(inp / name, [(key, "jpg", good_image(n), None)])
        expected.append(key)
    summary = run(load_config(data=job(ckpt_v1, tokenizer_v1, inp, tmp_path / "out")))
    ids = summary["shards"]
    assert len(set(ids)) == len(names) and not any(i.startswith(("_", ".")) for i in ids)
    df = pd.read_parquet(tmp_path / "out" / "data")  # the README's way to read the output
    keys_once(df, expected)
    for sid in ids:  # every marker names the file that holds that shard's rows
        rec = json.loads((tmp_path / "out" / "_ledger" / f"{sid}.json").read_text())
        rows = pq.read_table(tmp_path / "out" / rec["file"]).to_pandas()
        assert set(rows.source_uri) == {rec["source_uri"]}


def test_ledger_and_claims_on_s3_ask_the_store(s3_bucket):
    from pipeline.config import S3Config
    from pipeline.ledger import Ledger
    from pipeline.storage import create_exclusive, filesystem

    bucket, endpoint = s3_bucket
    fs, root = filesystem(f"s3://{bucket}/out", S3Config(endpoint_url=endpoint))
    client = s3_client(endpoint)
    client.put_object(Bucket=bucket, Key="out/_ledger/a.json", Body=b"{}")
    ledger = Ledger(fs, root)
    assert ledger.done() == {"a"}  # lists _ledger/ (s3fs caches the listing)
    client.put_object(Bucket=bucket, Key="out/_ledger/b.json", Body=b"{}")  # another run commits
    assert ledger.is_done("b")
    assert ledger.done() == {"a", "b"}
    # conditional create: "exists" only from the service's 412; other failures are raised
    assert create_exclusive(fs, f"{bucket}/out/_claims/x.json", b"1")
    assert not create_exclusive(fs, f"{bucket}/out/_claims/x.json", b"2")
    with pytest.raises(OSError):
        create_exclusive(fs, f"no-such-bucket-{bucket}/out/_claims/x.json", b"1")


# --- hostile data-borne paths (findings 8, 11) ---------------------------------------------------

def _preprocess(ckpt, tok, inp, **input_cfg):
    from cogvlm.weights import read_config
    from pipeline.stages import Preprocess

    cfg = load_config(data=job(ckpt, tok, inp, inp.parent / "o", input=dict(format="parquet", uri_column="u",
                                                                            **input_cfg)))
    return Preprocess(cfg, read_config(ckpt))


def test_uri_inputs_are_confined_bounded_and_never_hang(ckpt_v1, tokenizer_v1, tmp_path):
    inp = tmp_path / "in"
    (inp / "imgs").mkdir(parents=True)
    (inp / "imgs" / "ok.png").write_bytes(good_image(1, fmt="PNG"))
    (inp / "imgs" / "big.png").write_bytes(good_image(2, (400, 400), fmt="PNG"))
    (inp / "leak").symlink_to("/etc/passwd")
    os.mkfifo(inp / "imgs" / "fifo.png")
    shard = str(inp / "index.parquet")
    stage = _preprocess(ckpt_v1, tokenizer_v1, inp, max_image_bytes=100_000, allowed_uri_prefixes=["/dev/zero"])
    cases = {
        "imgs/ok.png": ("ok", None),  # relative to the shard file's folder
        str(inp / "imgs" / "ok.png"): ("ok", None),
        "../outside.png": ("read_error", "URI refused"),
        "/etc/passwd": ("read_error", "URI refused"),
        "/proc/self/environ": ("read_error", "URI refused"),
        os.path.expanduser("~/.bashrc"): ("read_error", "URI refused"),
        "~/.bashrc": ("read_error", "not found"),  # no tilde expansion: a name inside the input
        str(inp / "leak"): ("read_error", "URI refused"),  # a symlink out of the input
        "s3://some-other-bucket/x.jpg": ("read_error", "URI refused"),
        "http://127.0.0.1:1/x.jpg": ("read_error", "unsupported URI scheme"),
        "/dev/zero": ("read_error", "not a regular file"),  # allowed, but a device
        str(inp / "imgs" / "fifo.png"): ("read_error", "not a regular file"),  # would block forever
        str(inp / "imgs" / "big.png"): ("image_too_large", "max_image_bytes"),
        str(inp / "imgs" / "missing.png"): ("read_error", "not found"),
    }
    rows = [{"shard_id": "s", "source_uri": shard, "shard_total": len(cases), "image_index": i, "key": f"k{i}",
             "image": None, "image_uri": uri, "questions": None, "read_error": None, "read_status": None}
            for i, uri in enumerate(cases)]
    result: list = []
    t = threading.Thread(target=lambda: result.append(stage(pd.DataFrame(rows))), daemon=True)
    t.start()
    t.join(60)
    assert result, "Preprocess hung"
    out = result[0]
    for (uri, (status, words)), (_, r) in zip(cases.items(), out.iterrows()):
        assert r.status == status, (uri, r.status, r.error_message)
        if words:
            assert words in r.error_message, (uri, r.error_message)
            assert "root:" not in r.error_message and os.getcwd() not in r.error_message


def test_error_messages_are_deterministic_and_reveal_no_paths(ckpt_v1, tokenizer_v1, tmp_path):
    from pipeline.errors import describe

    stage = _preprocess(ckpt_v1, tokenizer_v1, tmp_path)
    rows = [{"shard_id": "s", "source_uri": "u", "shard_total": 1, "image_index": 0, "key": "k",
             "image": b"not an image", "image_uri": None, "questions": None, "read_error": None,
             "read_status": None}]
    msgs = {stage(pd.DataFrame(rows)).error_message[0] for _ in range(2)}
    assert len(msgs) == 1 and "0x" not in msgs.pop()
    e = FileNotFoundError(2, "No such file", os.path.join(os.getcwd(), "data", "x.jpg"))
    assert os.getcwd() not in describe(e)


# --- inputs: corrupt Parquet, schema, image kinds (findings 10, 14) ------------------------------

def test_corrupt_parquet_shard_is_an_error_row_and_wrong_column_fails_before_ray(
        ray_cluster, ckpt_v1, tokenizer_v1, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"image": [good_image(1), good_image(2)]}), inp / "good.parquet")
    (inp / ".parquet").write_bytes(b"this is not parquet")
    (inp / "broken.parquet").write_bytes(b"PAR1 truncated")
    summary = run(load_config(data=job(ckpt_v1, tokenizer_v1, inp, tmp_path / "out", input={"format": "parquet"})))
    df = pd.read_parquet(tmp_path / "out" / "data")
    assert Counter(df.status) == {"ok": 2, "read_error": 2}
    bad = df[df.status == "read_error"]
    assert set(bad.key) == {"__shard__"} and bad.error_message.str.contains("not a readable Parquet file").all()
    assert summary["shards_processed"] == 3

    cfg_path = tmp_path / "wrong.yaml"
    cfg_path.write_text(yaml.safe_dump(job(ckpt_v1, tokenizer_v1, inp, tmp_path / "out2",
                                           input={"format": "parquet", "image_column": "jpg"})))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(tmp_path / "nothing-here")  # no cluster to join: it must fail before starting one
    proc = subprocess.run([sys.executable, "-m", "jobs.caption", "--config", str(cfg_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "'jpg'" in proc.stderr
    assert "Started a local Ray" not in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(InputError, match="no image column 'jpg'"):
        run(load_config(cfg_path))


def test_folder_images_of_every_kind_get_rows_and_other_files_are_counted(ray_cluster, ckpt_v1, tokenizer_v1,
                                                                          tmp_path):
    from PIL import Image

    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.jpg").write_bytes(good_image(1))
    Image.new("RGB", (32, 32), (200, 10, 10)).save(inp / "icon.ico")
    (inp / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>')
    (inp / "README.md").write_text("not an image")
    (inp / "labels.json").write_text("{}")
    summary = run(load_config(data=job(ckpt_v1, tokenizer_v1, inp, tmp_path / "out", input={"format": "folder"})))
    df = pd.read_parquet(tmp_path / "out" / "data").set_index("key")
    assert df.status.to_dict() == {"a": "ok", "icon": "ok", "logo": "decode_error"}
    assert summary["files_skipped"] == 2 and sorted(summary["files_skipped_examples"]) == ["README.md", "labels.json"]


# --- crashing inputs (finding 9) ------------------------------------------------------------------

def test_an_image_that_kills_its_worker_ends_as_error_rows(ray_cluster, ckpt_v1, tokenizer_v1, tmp_path):
    from pipeline.faults import FAULT_ENV

    expected = webdataset_shards(tmp_path / "in", n_shards=2, per_shard=3)
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(job(ckpt_v1, tokenizer_v1, tmp_path / "in", tmp_path / "out",
                                           errors={"max_crashes_per_image": 1})))
    # one image kills its Preprocess worker, another its Generate worker, every time (SIGKILL)
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, **{FAULT_ENV: "preprocess:000000001,generate:000010002"})
    proc = subprocess.run([sys.executable, "-m", "jobs.caption", "--config", str(cfg_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_parquet(tmp_path / "out" / "data").set_index("key")
    keys_once(df.reset_index(), expected)
    died = df[df.status == "worker_died"]
    assert sorted(died.index) == ["000000001", "000010002"]
    assert "Preprocess worker process died" in died.error_message["000000001"]
    assert "Generate worker process died" in died.error_message["000010002"]
    assert (df.drop(died.index).status == "ok").all()
    summary, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index('{\n  "run_id"'):])
    assert summary["batches_retried_after_worker_death"] >= 2


# --- the error-rate guard -------------------------------------------------------------------------

def test_error_guard_stops_a_run_that_mostly_fails_the_same_way(ray_cluster, ckpt_v1, tokenizer_v1, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    uris = [f"imgs/missing-{i}.jpg" for i in range(12)]  # e.g. a wrong prefix in the dataset
    for n in range(3):
        pq.write_table(pa.table({"u": uris[n * 4:(n + 1) * 4]}), inp / f"{n}.parquet")
    data = job(ckpt_v1, tokenizer_v1, inp, tmp_path / "out", input={"format": "parquet", "uri_column": "u"},
               errors={"guard_images": 10, "guard_share": 0.5})
    with pytest.raises(RunStopped, match=r"stopped before committing anything: 1[02] of the first 1[02] images "
                                         r"failed with read_error \(not found"):
        run(load_config(data=data))
    assert not (tmp_path / "out" / "data").exists() or not list((tmp_path / "out" / "data").iterdir())
    # accepted explicitly: the rows are committed
    summary = run(load_config(data=data, overrides=["errors.guard_share=1.0"]))
    assert summary["status_counts"] == {"read_error": 12}


# --- configs (findings 10, 12, 13) and the tokenizer (finding 15) ---------------------------------

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize("url", [
    f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@models/cogvlm",
    f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket",
    "s3://user@bucket/x",
    "http://user:p@ss/word@minio:9000",
    f"https://key:{SECRET}@store.example:443/b",
])
def test_credentials_in_urls_are_refused_without_repeating_them(tmp_path, url):
    base = job("ckpt", "tok", tmp_path, tmp_path / "o")
    for key in ("input.path", "output.path", "model.source", "s3.endpoint_url"):
        with pytest.raises(ConfigError) as e:
            load_config(data=base, overrides=[f"{key}={url}"])
        assert str(e.value).startswith(key) and "credentials" in str(e.value)
        for part in (SECRET, "EXAMPLE", "p@ss", "word"):
            assert part not in str(e.value)


def test_a_run_ending_error_is_one_line_naming_the_root_cause():
    """Ray wraps what a task raised in a coloured, pages-long RayTaskError: the run's last line
    names what happened (here a full disk under a refused claim), without colour codes."""
    import errno as errno_

    from ray.exceptions import RayTaskError

    from pipeline.claims import ClaimError
    from pipeline.errors import describe, root_cause

    try:
        try:
            raise OSError(errno_.ENOSPC, os.strerror(errno_.ENOSPC), "/out/_claims/00003.json")
        except OSError as full:
            raise ClaimError(f"could not claim shard 00003 under /out: {describe(full)}") from None
    except ClaimError as claim:
        wrapped = RayTaskError("\x1b[36mray::FlatMap(read)()\x1b[39m", "Traceback ...\n" * 200, claim)
        wrapped = wrapped.as_instanceof_cause()
    line = describe(root_cause(wrapped))
    assert line.startswith("ClaimError: could not claim shard 00003") and "the disk is full" in line, line
    assert "\x1b" not in line and "\n" not in line and "Traceback" not in line
    coloured = describe(RuntimeError("\x1b[36mray::FlatMap(read)()\x1b[39m failed"))
    assert coloured == "RuntimeError: ray::FlatMap(read)() failed"
    assert describe(OSError(errno_.ENOSPC, "No space left on device")).startswith("the disk is full")


def test_redaction_handles_slashes_and_at_signs():
    from pipeline.errors import redact

    assert redact(f"output s3://AKIA:{SECRET}@models/cogvlm is not writable") == \
        "output s3://***@models/cogvlm is not writable"
    assert "p@ss" not in redact("http://u:p@ss@host:9000/x") and "host:9000/x" in redact("http://u:p@ss@host:9000/x")


def test_config_values_are_validated_before_any_work(tmp_path):
    base = job("ckpt", "tok", tmp_path, tmp_path / "o")
    for override, match in [("run_id=../../escaped", "run_id"), ("run_id=a/b", "run_id"),
                            ("run_id=.hidden", "run_id"), ("tasks.caption.temperature=-1", "temperature"),
                            ("tasks.caption.top_p=0", "top_p"), ("tasks.caption.top_k=-3", "top_k"),
                            ("tasks.caption.temperature=.nan", "finite"), ("errors.guard_share=2", "guard_share"),
                            ("claim_ttl_s=0", "claim_ttl_s"), ("input.max_image_bytes=0", "max_image_bytes")]:
        with pytest.raises(ConfigError, match=match):
            load_config(data=base, overrides=[override])
    assert load_config(data=base, overrides=["run_id=nightly-2026.11.27_a"]).run_id == "nightly-2026.11.27_a"


def test_malformed_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("input:\n  path: [unclosed\nmodel: {source: x}\n")
    with pytest.raises(ConfigError, match=r"config file .*bad.yaml is not valid YAML: .*line \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"override model.batch_size: the value is not valid YAML"):
        load_config(data=job("c", "t", tmp_path, tmp_path / "o"), overrides=["model.batch_size=[1,"])
    proc = subprocess.run([sys.executable, "-m", "jobs.caption", "--config", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    env = dict(os.environ, COGVLM_JOB_CONFIG="input: {path: [x")
    proc = subprocess.run([sys.executable, "-m", "jobs.caption"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: COGVLM_JOB_CONFIG is not valid YAML")


def test_tokenizer_of_a_release_format_v2_folder_loads_without_asking(ckpt_v2, tmp_path):
    assert "auto_map" in json.loads((ckpt_v2 / "config.json").read_text())  # as the release ships it
    script = textwrap.dedent(f"""
        from cogvlm import CogVLMProcessor
        from pipeline import load_config
        from pipeline.stages import load_tokenizer
        CogVLMProcessor.from_pretrained({str(ckpt_v2)!r})
        cfg = load_config(data={{"input": {{"path": "x"}}, "output": {{"path": "y"}},
                                 "model": {{"source": {str(ckpt_v2)!r}}}}})
        load_tokenizer(cfg)
        print("loaded")
    """)
    # stdin is a pipe that answers 'y': a prompt would read it and print its question
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, input="y\n", capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-2000:]
    assert "custom code" not in proc.stdout + proc.stderr and "[y/N]" not in proc.stdout + proc.stderr


def test_read_failures_keep_their_status_whatever_the_prompts(ckpt_v1, tokenizer_v1, tmp_path):
    """A shard whose read failed transiently must not pass as no_questions (VQA from a column)."""
    from cogvlm.weights import read_config
    from pipeline.stages import Preprocess

    cfg = load_config(data=job(ckpt_v1, tokenizer_v1, tmp_path, tmp_path / "o",
                               input={"questions_column": "q"},
                               tasks={"vqa": {"questions": [], "use_column": True}}))
    stage = Preprocess(cfg, read_config(ckpt_v1))
    rows = [{"shard_id": "s", "source_uri": "u", "shard_total": 2, "image_index": i, "key": "__shard__",
             "image": None, "image_uri": None, "questions": None, "read_error": "store unreachable",
             "read_status": status} for i, status in enumerate(["transient_error", "read_error"])]
    assert stage(pd.DataFrame(rows)).status.tolist() == ["transient_error", "read_error"]


def test_unknown_read_errors_are_not_final_and_known_ones_are():
    import tarfile

    from botocore.exceptions import ClientError, EndpointConnectionError

    from pipeline.errors import is_transient
    from pipeline.readers import _is_corrupt_tar

    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(OSError(5, "wrapped")) is False
    wrapped = OSError(16, "Please reduce your request rate")
    wrapped.__cause__ = ClientError({"Error": {"Code": "SlowDown"}}, "GetObject")
    assert is_transient(wrapped)
    denied = PermissionError("Access Denied")
    denied.__cause__ = ClientError({"Error": {"Code": "AccessDenied"}}, "GetObject")
    assert not is_transient(denied)
    assert is_transient(RuntimeError("CUDA error: out of memory"))
    assert _is_corrupt_tar(tarfile.ReadError("invalid header")) and _is_corrupt_tar(EOFError())
    assert not _is_corrupt_tar(RuntimeError("something else"))


def test_the_input_location_comes_from_the_listing(tmp_path):
    from pipeline.config import InputConfig, S3Config
    from pipeline.listing import list_input

    table = tmp_path / "table.parquet"  # a Spark-style dataset folder with a file-like name
    table.mkdir()
    pq.write_table(pa.table({"image": [b"x"]}), table / "part-0.parquet")
    assert list_input(InputConfig(path=str(table), format="parquet"), S3Config()).root == str(table)
    one = list_input(InputConfig(path=str(table / "part-0.parquet"), format="parquet"), S3Config())
    assert one.root == str(table)


def test_config_errors_never_echo_credentials(tmp_path):
    base = job("ckpt", "tok", tmp_path, tmp_path / "o")
    for override in (f"s3.endpoint_url: https://u:{SECRET}@h", f"input.path=[https://u:{SECRET}@h]",
                     f"model.batch_size=https://u:{SECRET}@h"):
        with pytest.raises(ConfigError) as e:
            load_config(data=base, overrides=[override])
        assert SECRET not in str(e.value) and "EXAMPLE" not in str(e.value)


@pytest.mark.parametrize("store", ["local", "s3"])
def test_exactly_one_run_takes_over_an_expired_claim(store, tmp_path, request):
    """Eight runs race for one expired claim: one gets it; a slow owner cannot overwrite it."""
    import fsspec

    from pipeline.config import S3Config
    from pipeline.claims import Claims
    from pipeline.storage import filesystem

    if store == "s3":
        bucket, endpoint = request.getfixturevalue("s3_bucket")
        fs, root = filesystem(f"s3://{bucket}/out", S3Config(endpoint_url=endpoint))
    else:
        fs, root = fsspec.filesystem("file"), str(tmp_path / "out")
    late = Claims(fs, root, "run-late", ttl_s=-1)  # its claims are born expired
    assert late.acquire("s1")
    racers = [Claims(fs, root, f"run-{i}", ttl_s=60) for i in range(8)]
    barrier = threading.Barrier(len(racers))
    won: list[str] = []

    def race(c: Claims) -> None:
        barrier.wait()
        if c.acquire("s1"):
            won.append(c.run_id)

    threads = [threading.Thread(target=race, args=(c,)) for c in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(won) == 1, won
    late.refresh()  # the expired owner wakes up: it must not take the claim back
    assert "s1" not in late.held
    assert json.loads(fs.cat_file(f"{root}/_claims/s1.json"))["run_id"] == won[0]
    late.release("s1")  # nor delete the new owner's claim
    assert json.loads(fs.cat_file(f"{root}/_claims/s1.json"))["run_id"] == won[0]


# --- issue 20, item 2: a checkpoint that does not load fails in one line, before any work ----------

def _broken_models(ckpt: Path, tok: Path, tmp_path: Path) -> dict[str, tuple[dict, str]]:
    """Each way a checkpoint fails to load, made for real from the tiny one: name -> (model
    section, what the one-line error must say)."""
    import shutil

    def copy(name: str, edit=None) -> Path:
        d = tmp_path / name
        shutil.copytree(ckpt, d)
        if edit:
            cfg = json.loads((d / "config.json").read_text())
            edit(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
        return d

    truncated = copy("truncated")
    shard = sorted(truncated.glob("*.safetensors"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    (tmp_path / "empty-tokenizer").mkdir()

    def llama(cfg: dict) -> None:
        cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
        del cfg["vision_config"]

    from transformers import AutoTokenizer

    bigger = AutoTokenizer.from_pretrained(str(tok))  # another model's: more tokens than the vocabulary
    bigger.add_tokens([f"<extra{i}>" for i in range(8)])
    bigger.save_pretrained(str(tmp_path / "bigger-tokenizer"))

    base = {"source": str(ckpt), "tokenizer": str(tok)}
    return {
        "bigger tokenizer": (dict(base, tokenizer=str(tmp_path / "bigger-tokenizer")),
                             r"model.tokenizer \S*bigger-tokenizer: the tokenizer has 1032 tokens, more than the "
                             r"model's vocabulary \(1024\)"),
        "tokenizer": (dict(base, tokenizer=str(tmp_path / "empty-tokenizer")),
                      r"model.tokenizer \S*empty-tokenizer: no tokenizer loads from it"),
        "truncated": (dict(base, source=str(truncated)), rf"model.source \S*truncated: .*{shard.name} is truncated"),
        "other model": (dict(base, source=str(copy("llama", llama))), r"not a CogVLM model's \(LlamaForCausalLM\)"),
        "wrong shape": (dict(base, source=str(copy("shape", lambda c: c.update(vocab_size=c["vocab_size"] * 2)))),
                        r"shape mismatch for \S+: checkpoint \[1024, \d+\], model \[2048, \d+\]"),
    }


def test_a_checkpoint_that_does_not_load_fails_in_one_line_before_any_work(ckpt_v1, tokenizer_v1, tmp_path):
    """The CLI: exit 2, one line, nothing in the output (on main: a wrong tokenizer ran Ray for 21 s
    and ended with exit 1, 141 lines of ActorDiedError and _runs/ + _tmp/ left in the output; a
    truncated shard gave exit 1 and a SafetensorError not naming the file). The job's run() and
    build_processor (ConfigError; on main the raw SafetensorError) refuse each the same way."""
    import re

    from pipeline import JobError, build_processor

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(good_image(0))
    broken = _broken_models(ckpt_v1, tokenizer_v1, tmp_path)
    for name, (model, match) in broken.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        data = job(ckpt_v1, tokenizer_v1, tmp_path / "in", out, input={"format": "folder"}, model=model)
        if name in ("tokenizer", "truncated"):  # the CLI, as the issue ran it
            (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
            proc = subprocess.run([sys.executable, "-m", "jobs.caption", "--config", str(tmp_path / "job.yaml")],
                                  cwd=ROOT, capture_output=True, text=True, timeout=120)
            lines = [ln for ln in proc.stderr.splitlines() if " INFO " not in ln]
            assert proc.returncode == 2 and len(lines) == 1, (name, proc.returncode, proc.stderr[-3000:])
            assert re.search(match, lines[0]) and lines[0].startswith("error: "), (name, lines[0])
        else:
            with pytest.raises(JobError, match=match):
                run(load_config(data=data))
        assert not out.exists(), (name, sorted(p.name for p in out.rglob("*")))
        with pytest.raises(ConfigError, match=match):
            build_processor(model=dict(model, dtype="fp32", gpus_per_replica=0))


def test_a_run_that_stops_before_work_leaves_nothing_in_the_output(ckpt_v1, tokenizer_v1, tmp_path):
    """The writable probe removes what it made (on main: _tmp/ and _runs/ stayed behind)."""
    from pipeline.preflight import prepare

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(good_image(0))
    out = tmp_path / "out"
    prepared = prepare(load_config(data=job(ckpt_v1, tokenizer_v1, tmp_path / "in", out, input={"format": "folder"})))
    assert prepared.pending and not out.exists()
    (out / "data").mkdir(parents=True)  # an output with results in it keeps them, and gains nothing
    prepare(load_config(data=job(ckpt_v1, tokenizer_v1, tmp_path / "in", out, input={"format": "folder"})))
    assert sorted(p.name for p in out.iterdir()) == ["data"]
