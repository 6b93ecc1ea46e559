"""Workers write the result rows; the driver sees one small record per part (pipeline.sink)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import load_config, run
from pipeline.config import RetryConfig, S3Config
from pipeline.faults import WRITE_FAULT_ENV
from pipeline.rows import RECORD_COLUMNS
from pipeline.sink import PartSink, merge_parts

from .data import webdataset_shards
from .test_pipeline import job

ROOT = Path(__file__).resolve().parent.parent


def rows_of(shard: str, images: range, tasks: int = 2, status: str = "ok") -> list[dict]:
    """Generate-stage output rows (OUTPUT_COLUMNS) for `images` of `shard`."""
    return [{"key": f"{shard}-{i}", "source_uri": f"/in/{shard}.tar", "shard_id": shard, "shard_total": 10,
             "image_index": i, "image_tasks": tasks, "task": "caption", "task_index": j, "prompt": "p",
             "response": f"r{i}.{j}", "boxes_json": None, "status": status, "error_message": None,
             "prompt_tokens": 3, "output_tokens": 2, "finish_reason": "eos", "generation_s": 0.1,
             "width": 8, "height": 8, "generation_settings": "{}", "model_source": "m", "model_fingerprint": "f",
             "passthrough": None} for i in images for j in range(tasks)]


def test_merge_keeps_one_row_per_image_and_task_when_parts_overlap(tmp_path):
    """A re-run batch writes its images again into a new part: the shard's file has each once."""
    sink = PartSink(str(tmp_path / "out"), S3Config(), RetryConfig(deadline_s=5), "run-a", "0")
    recs = sink.write(rows_of("s", range(0, 6)) + rows_of("t", range(0, 1)))
    recs += sink.write(rows_of("s", range(4, 10)))  # images 4 and 5 again
    assert sorted(r["shard_id"] for r in recs) == ["s", "s", "t"] and all(set(r) == set(RECORD_COLUMNS) for r in recs)
    parts = [r["part"] for r in recs if r["shard_id"] == "s"]
    assert all(p.startswith("_parts/s/") for p in parts)
    rec = merge_parts(str(tmp_path / "out"), S3Config(), RetryConfig(deadline_s=5), "s", "/in/s.tar", parts, "run-a")
    assert rec["rows"] == 20 and rec["images"] == 10 and rec["status"] == {"ok": 20} and rec["output_tokens"] == 40
    table = pq.read_table(tmp_path / "out" / rec["file"])
    pairs = list(zip(table.column("image_index").to_pylist(), table.column("task_index").to_pylist()))
    assert pairs == [(i, j) for i in range(10) for j in range(2)]  # once each, sorted
    # readers see only data/: the parts under _parts/ are skipped by dataset discovery
    assert pads.dataset(tmp_path / "out" / "data").to_table().num_rows == 20


def test_transient_rows_are_never_written_as_a_part(tmp_path):
    sink = PartSink(str(tmp_path / "out"), S3Config(), RetryConfig(deadline_s=5), "run-a", "0")
    rows = rows_of("s", range(2))
    rows[1] = dict(rows[1], status="transient_error", error_message="throttled")
    [rec] = sink.write(rows)
    assert rec["part"] is None and rec["transient"] == "throttled"
    assert json.loads(rec["failures"]) == []  # image 0's first row is OK; image 1's too (task 0)


def test_the_driver_receives_part_records_only(ray_cluster, ckpt_v1, tokenizer_v1, tmp_path, monkeypatch):
    """What reaches the driver's loop is one small record per written part, never a result row."""
    from pipeline import commit as commit_module

    seen: list[dict] = []
    add = commit_module.PartTracker.add

    def spy(self, rec):
        seen.append(dict(rec))
        return add(self, rec)

    monkeypatch.setattr(commit_module.PartTracker, "add", spy)
    inp, out = tmp_path / "in", tmp_path / "out"
    expected = webdataset_shards(inp, n_shards=3, per_shard=6)
    tasks = {"caption": {"max_new_tokens": 3}, "vqa": {"questions": ["What is it?"], "max_new_tokens": 2}}
    summary = run(load_config(data=job(ckpt_v1, tokenizer_v1, inp, out, tasks=tasks)))
    assert summary["rows"] == 2 * len(expected) == 36
    assert seen and all(set(r) == set(RECORD_COLUMNS) for r in seen)
    assert len(seen) < summary["rows"] / 2  # records per part (a batch of 4 images), not per row
    assert sum(r["rows"] for r in seen) == summary["rows"]
    df = pd.read_parquet(out / "data")
    assert sorted(df.key.unique()) == sorted(expected) and len(df) == 36
    assert not df.duplicated(["key", "task_index"]).any()
    assert not [p for p in (out / "_parts").rglob("*") if p.is_file()]  # merged, then deleted


def test_a_worker_killed_after_writing_a_part_duplicates_nothing(ray_cluster, ckpt_v1, tokenizer_v1, tmp_path):
    """The Generate worker dies right after writing a part, before its record leaves: Ray re-runs
    the batch, which writes those images again; the merged shard has every row once, for pandas,
    pyarrow and DuckDB alike."""
    import duckdb
    import yaml

    inp, out = tmp_path / "in", tmp_path / "out"
    expected = webdataset_shards(inp, n_shards=2, per_shard=6)
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(job(ckpt_v1, tokenizer_v1, inp, out)))
    flag = tmp_path / "died-once"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, **{WRITE_FAULT_ENV: f"000010002:{flag}"})
    proc = subprocess.run([sys.executable, "-m", "jobs.caption", "--config", str(cfg_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert flag.exists()  # the worker did die after its write
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["images"] == len(expected) and summary["status_counts"] == {"ok": len(expected)}
    df = pd.read_parquet(out / "data")
    assert sorted(df.key) == sorted(expected)
    assert pq.read_table(out / "data").num_rows == len(expected)
    con = duckdb.connect()
    n, distinct = con.execute(f"select count(*), count(distinct key) from read_parquet('{out}/data/*.parquet')").fetchone()
    assert n == distinct == len(expected)


def test_a_failed_merge_leaves_nothing_where_readers_look(tmp_path):
    """A real write failure (the file-size limit, as a full disk would) while merging a shard."""
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from pipeline.config import RetryConfig, S3Config
        from pipeline.sink import PartSink, merge_parts
        from tests.test_workers_write import rows_of
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        policy = RetryConfig(deadline_s=2)
        sink = PartSink({str(out)!r}, S3Config(), policy, "r", "0")
        small = [r["part"] for r in sink.write(rows_of("small", range(1), tasks=1))]
        big = [dict(r, response="x" * 200000) for r in rows_of("big", range(1), tasks=1)]
        big = [r["part"] for r in sink.write(big)]
        merge_parts({str(out)!r}, S3Config(), policy, "small", "u", small, "r")
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            merge_parts({str(out)!r}, S3Config(), policy, "big", "u", big, "r")
        except OSError as e:
            print("failed:", e.errno)
            sys.exit(0)
        sys.exit("the oversized merge did not fail")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "failed: 27" in proc.stdout, proc.stderr[-2000:]  # EFBIG
    assert sorted(p.name for p in (out / "data").iterdir()) == ["small.parquet"]
    assert not list((out / "_tmp").iterdir())  # the partial file was removed
    assert pd.read_parquet(out / "data").response.tolist() == ["r0.0"]


def test_a_claim_deletes_other_runs_parts_and_keeps_its_own(tmp_path):
    """At its claim a run deletes a killed run's parts of the shard, but not its own (a read
    task that Ray re-runs claims again while the driver already lists the run's earlier parts)."""
    from pipeline.sink import delete_parts

    out = str(tmp_path / "out")
    for run_id in ("run-a", "run-a-2", "run-b"):  # run-a-2's names start with "run-a-" too
        PartSink(out, S3Config(), RetryConfig(deadline_s=5), run_id, "0").write(rows_of("s", range(2)))
    delete_parts(out, S3Config(), "s", keep_run="run-a")
    left = [p.name for p in (tmp_path / "out" / "_parts" / "s").iterdir()]
    assert len(left) == 1 and left[0].startswith("run-a-") and len(left[0]) == len("run-a-") + 32 + len(".parquet")
    delete_parts(out, S3Config(), "s")  # after the commit: all of them
    assert not (tmp_path / "out" / "_parts" / "s").exists()
