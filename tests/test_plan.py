"""`jobs.plan` / `pipeline.plan`: counts without decoding, the ledger, memory and fit, throughput
from the measured table or a real calibration run. Real files, real Ray, a real S3 server."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cogvlm.config import preset
from cogvlm.tiny import write_shapes_checkpoint
from pipeline import load_config, run
from pipeline.calibration import calibration_config, calibration_result
from pipeline.plan import make_plan as plan_of_prepared
from pipeline.plan import one_line
from pipeline.plan import render as describe
from pipeline.preflight import prepare


def make_plan(cfg, *args, **kwargs):
    """The cost plan of `cfg`, as `jobs.plan` makes it."""
    return plan_of_prepared(prepare(cfg, writable=False), *args, **kwargs)

from .data import good_image, webdataset_shards
from .test_pipeline import job, s3_client, upload_dir

ROOT = Path(__file__).resolve().parent.parent


def config(ckpt, tok, inp, out, **sections):
    return load_config(data=job(ckpt, tok, inp, out, **sections))


def img2dataset_stats(path: Path, successes: int) -> None:
    """A sidecar as img2dataset writes it (abridged): `count` URLs tried, `successes` in the tar."""
    path.write_text(json.dumps({"count": successes + 2, "successes": successes, "failed_to_download": 2,
                                "failed_to_resize": 0, "status_dict": {"success": successes}}))


@pytest.fixture(scope="module")
def v1_shapes(tmp_path_factory) -> Path:
    """The full v1 release shapes with no weights (sparse files): for memory and fit only."""
    return write_shapes_checkpoint(tmp_path_factory.mktemp("shapes") / "v1", preset("v1"))


def test_webdataset_counts_from_tar_headers_sidecars_and_a_sample(ckpt_v1, tokenizer_v1, tmp_path):
    expected = webdataset_shards(tmp_path / "in", n_shards=3, per_shard=4, bad=True)  # shard 0: +8 bad images
    cfg = config(ckpt_v1, tokenizer_v1, tmp_path / "in", tmp_path / "out")

    # tests/data.py's sidecars carry "count" but not img2dataset's "successes": the headers count
    plan = make_plan(cfg)
    assert plan["input"]["images"] == len(expected) == 20
    assert plan["input"]["basis"] == "exact" and plan["input"]["methods"] == {"tar headers": 3}
    assert plan["ledger"]["images_left"] == 20 and plan["ledger"]["committed_shards"] == 0

    for s in (1, 2):
        img2dataset_stats(tmp_path / "in" / f"{s:05d}_stats.json", 4)
    plan = make_plan(cfg)
    assert plan["input"]["images"] == 20 and plan["input"]["basis"] == "exact"
    assert plan["input"]["methods"] == {"img2dataset sidecar": 2, "tar headers": 1}
    # a sidecar is trusted as img2dataset's own count (one GET instead of the tar)
    img2dataset_stats(tmp_path / "in" / "00002_stats.json", 100)
    assert make_plan(cfg)["input"]["images"] == 116

    # more shards than --count-shards: a sample, the rest extrapolated by size, and said so
    for s in (1, 2):
        (tmp_path / "in" / f"{s:05d}_stats.json").unlink()
    plan = make_plan(cfg, count_shards=2)
    assert plan["input"]["basis"] == "estimated" and plan["ledger"]["images_left_basis"] == "estimated"
    assert "estimated from 2 shards" in plan["input"]["how"] and "extrapolated by file size" in plan["input"]["how"]
    assert 15 <= plan["input"]["images"] <= 25
    assert "[estimated: estimated from 2 shards" in describe(plan)


def test_parquet_footers_and_folder_listing(ckpt_v1, tokenizer_v1, tmp_path):
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"image": [good_image(i) for i in range(3)]}), tmp_path / "pq" / "a.parquet")
    pq.write_table(pa.table({"image": [good_image(i) for i in range(4)]}), tmp_path / "pq" / "b.parquet",
                   row_group_size=2)
    plan = make_plan(config(ckpt_v1, tokenizer_v1, tmp_path / "pq", tmp_path / "out1", input={"format": "parquet"}))
    assert plan["input"]["images"] == 7 and plan["input"]["shards"] == 2
    assert plan["input"]["basis"] == "exact" and plan["input"]["methods"] == {"parquet footer": 2}

    (tmp_path / "folder" / "sub").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "folder" / ("sub" if i % 2 else "") / f"{i}.jpg").write_bytes(good_image(i))
    (tmp_path / "folder" / "notes.txt").write_text("not an image")
    plan = make_plan(config(ckpt_v1, tokenizer_v1, tmp_path / "folder", tmp_path / "out2",
                            input={"format": "folder", "images_per_shard": 2}))
    assert plan["input"]["images"] == 5 and plan["input"]["shards"] == 3 and plan["input"]["basis"] == "exact"
    assert plan["input"]["skipped_files"] == 1


def test_webdataset_on_s3(ckpt_v1, tokenizer_v1, s3_bucket, tmp_path):
    bucket, endpoint = s3_bucket
    webdataset_shards(tmp_path / "in", n_shards=2, per_shard=3)
    img2dataset_stats(tmp_path / "in" / "00001_stats.json", 3)
    upload_dir(s3_client(endpoint), bucket, tmp_path / "in", "shards")
    cfg = config(ckpt_v1, tokenizer_v1, f"s3://{bucket}/shards", f"s3://{bucket}/out", s3={"endpoint_url": endpoint})
    plan = make_plan(cfg)
    assert plan["input"]["images"] == 6 and plan["input"]["basis"] == "exact"
    assert plan["input"]["methods"] == {"img2dataset sidecar": 1, "tar headers": 1}
    assert plan["ledger"]["images_left"] == 6


def test_gpu_throughput_not_measured_and_the_fit_check(v1_shapes, tokenizer_v1, tmp_path):
    webdataset_shards(tmp_path / "in", n_shards=2, per_shard=3)
    tasks = {"caption": {"max_new_tokens": 64}, "vqa": {"questions": ["Is it red?"]}, "grounding": {}}
    model = {"source": str(v1_shapes), "tokenizer": str(tokenizer_v1), "dtype": "bf16", "gpus_per_replica": 1,
             "max_replicas": 8}
    cfg = config(v1_shapes, tokenizer_v1, tmp_path / "in", tmp_path / "out", model=model, tasks=tasks)
    plan = make_plan(cfg, gpu_hour_price=2.5)
    assert plan["model"]["shape"] == "v1" and plan["model"]["workload"] == "multi"
    assert plan["throughput"]["basis"] == "not measured" and plan["throughput"]["images_per_s"] is None
    e = plan["estimate"]
    assert e["gpu_hours"] is None and e["wall_s"] is None and e["cost"] is None and e["replicas"] == 8
    assert "--calibrate" in e["why"]
    assert plan["fit"]["status"] == "not checked"  # no gpu_memory_gb and no GPU nodes (or no Ray)
    # prompts: tokenized with the (local) tokenizer; 1 + 1227 vision tokens + the text
    p = plan["prompts"]
    assert p["per_image"] == 3 and p["vision_tokens"] == 1227 and "tokenized" in p["text_tokens_basis"]
    assert all(t["prompt_tokens"] == 1228 + t["text_tokens"] > 1228 for t in p["tasks"])
    assert [t["max_new_tokens"] for t in p["tasks"]] == [64, 32, 128]
    m = plan["memory"]
    assert 35 < m["weights_gb"] < 36 and m["min_slots"] == 4 and m["total_gb"] > m["weights_gb"]
    text = describe(plan)
    assert "speed     unknown [not measured" in text and "GPU-hours, wall time and cost unknown" in text
    assert "throughput not measured" in one_line(plan)

    small = make_plan(load_config(data=job(v1_shapes, tokenizer_v1, tmp_path / "in", tmp_path / "out",
                                           model=dict(model, gpu_memory_gb=1), tasks=tasks)))
    assert small["fit"]["status"] == "does not fit"
    assert "needs about" in small["fit"]["message"] and "model.gpu_memory_gb is 1.0 GB" in small["fit"]["message"]
    assert "fit       does not fit: CogVLM v1 (17.6B parameters) in bf16 needs about" in describe(small)
    big = make_plan(load_config(data=job(v1_shapes, tokenizer_v1, tmp_path / "in", tmp_path / "out",
                                         model=dict(model, gpu_memory_gb=80), tasks=tasks)))
    assert big["fit"]["status"] == "fits" and big["memory"]["kv_slots_that_fit"] > 4


def test_measured_cpu_rate_applies_only_to_its_conditions(tokenizer_v1, tmp_path):
    small = write_shapes_checkpoint(tmp_path / "small", preset("small"))
    webdataset_shards(tmp_path / "in", n_shards=2, per_shard=3)
    cfg = config(small, tokenizer_v1, tmp_path / "in", tmp_path / "out", tasks={"caption": {"max_new_tokens": 16}})
    plan = make_plan(cfg, replicas=2, gpu_hour_price=3.0)
    r, e = plan["throughput"], plan["estimate"]
    assert r["basis"] == "measured" and r["images_per_s"] == 14.18 and "docs/performance.md" in r["source"]
    assert e["gpu_hours"] == 0.0 and e["cost"] == 0.0  # CPU replicas use no GPU
    assert math.isclose(e["wall_s"], round(27.7 + 6 / (14.18 * 2), 1))
    assert math.isclose(e["replica_hours"], 6 / 14.18 / 3600, rel_tol=1e-3)
    other = make_plan(config(small, tokenizer_v1, tmp_path / "in", tmp_path / "out"))  # 6 new tokens
    assert other["throughput"]["basis"] == "not measured" and "not applied" in other["throughput"]["source"]
    assert other["estimate"]["wall_s"] is None


def test_cli_json(v1_shapes, tokenizer_v1, tmp_path):
    webdataset_shards(tmp_path / "in", n_shards=2, per_shard=3)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(v1_shapes, tokenizer_v1, tmp_path / "in", tmp_path / "out",
                                       model={"dtype": "bf16", "gpus_per_replica": 1})))
    proc = subprocess.run([sys.executable, "-m", "jobs.plan", "--config", str(path), "model.gpu_memory_gb=1",
                           "--replicas", "4", "--gpu-hour-price", "3", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert {"input", "ledger", "prompts", "memory", "fit", "throughput", "estimate"} <= set(plan)
    assert plan["input"]["images"] == 6 and plan["ledger"]["images_left"] == 6
    assert plan["estimate"]["replicas"] == 4 and plan["estimate"]["gpu_hour_price"] == 3
    assert plan["estimate"]["gpu_hours"] is None and plan["throughput"]["basis"] == "not measured"
    assert plan["fit"]["status"] == "does not fit"
    bad = subprocess.run([sys.executable, "-m", "jobs.plan", "--config", str(path), "input.format=nope"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: input.format")


def test_ledger_after_a_real_run_and_calibration(ray_cluster, ckpt_v1, tokenizer_v1, tmp_path):
    webdataset_shards(tmp_path / "in", n_shards=2, per_shard=4)
    # 2 images in flight per replica: a 16-image calibration has a steady part after its first commit
    cfg = config(ckpt_v1, tokenizer_v1, tmp_path / "in", tmp_path / "out",
                 model={"batch_size": 2, "batches_in_flight": 1})
    assert make_plan(cfg)["ledger"]["images_left"] == 8
    assert run(cfg)["shards_processed"] == 2
    webdataset_shards(tmp_path / "more", n_shards=3, per_shard=4)
    shutil.copy(tmp_path / "more" / "00002.tar", tmp_path / "in")
    plan = make_plan(cfg)
    led = plan["ledger"]
    assert plan["input"]["images"] == 12 and led["committed_shards"] == 2 and led["committed_share"] == 0.6667
    assert led["committed_images"] == 8 and led["images_left"] == 4 and led["pending_shards"] == 1

    # CPU replicas: the tiny model through pipeline.run, for real, on the input's first 16 images
    webdataset_shards(tmp_path / "big", n_shards=2, per_shard=10)
    big = dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, path=str(tmp_path / "big")))
    with tempfile.TemporaryDirectory() as workdir:
        summary = run(calibration_config(big, 16, workdir))
    assert summary["images"] == 16 and summary["shards_processed"] == 8
    cal = calibration_result(big, summary, 16)
    assert cal["steady"] and cal["images_per_s"] > 0 and cal["startup_s"] > 0, cal
    plan = make_plan(cfg, gpu_hour_price=2.0, calibration=cal)
    assert plan["throughput"]["basis"] == "calibrated"
    e = plan["estimate"]
    assert 0 < e["wall_s"] < 1e6 and e["replica_hours"] > 0 and e["gpu_hours"] == 0.0 and e["cost"] == 0.0
    assert math.isclose(e["wall_s"], cal["startup_s"] + 4 / cal["images_per_s"], abs_tol=0.1)
    assert plan["ledger"]["committed_shards"] == 2  # the calibration wrote elsewhere
    assert "[calibrated throughput, exact counts]" in describe(plan)
    assert "img/s per replica (calibrated)" in one_line(plan)
    # the same run with 32 images in flight per replica: too few after the first commit to tell
    # the start-up apart, so the end-to-end rate (a lower bound) and no separate start-up
    wide = calibration_result(dataclasses.replace(big, model=dataclasses.replace(big.model, batches_in_flight=16)),
                              summary, 16)
    assert not wide["steady"] and wide["startup_s"] == 0 and "lower bound" in wide["source"]
    assert math.isclose(wide["images_per_s"], 16 / summary["wall_s"], rel_tol=1e-3)


def test_cli_calibrate_argument_checks(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.plan", "--config", str(tmp_path / "x.yaml"), "--calibrate", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--calibrate must be >= 1" in proc.stderr
