"""The Ray Data job end to end: real local Ray, real S3 server on loopback, real Parquet and tars."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import boto3
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline import ConfigError, InputError, JobError, load_config, run
from pipeline.faults import KILL_AFTER_ENV

from .data import bad_images, good_image, webdataset_shards

ROOT = Path(__file__).resolve().parent.parent


def job(ckpt, tok, inp, out, **sections) -> dict:
    cfg = {
        "input": {"path": str(inp)},
        "output": {"path": str(out)},
        "model": {"source": str(ckpt), "tokenizer": str(tok), "dtype": "fp32", "gpus_per_replica": 0,
                  "batch_size": 4, "preprocess_workers": 1},
        "tasks": {"caption": {"max_new_tokens": 6}},
    }
    for k, v in sections.items():
        if k == "tasks":
            cfg["tasks"] = v  # listing tasks enables exactly those
        else:
            cfg.setdefault(k, {}).update(v)
    return cfg


def s3_client(endpoint):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


def upload_dir(client, bucket: str, local: Path, prefix: str) -> None:
    for f in sorted(local.rglob("*")):
        if f.is_file():
            client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local).as_posix()}")


def read_output_s3(endpoint: str, uri: str) -> pd.DataFrame:
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint})
    files = sorted(fs.glob(uri.replace("s3://", "") + "/data/*.parquet"))
    return pd.concat([pq.read_table(fs.open(f, "rb")).to_pandas() for f in files], ignore_index=True)


def test_webdataset_on_s3_with_bad_images_all_tasks(ray_cluster, ckpt_v1, tokenizer_v1, s3_bucket, tmp_path):
    bucket, endpoint = s3_bucket
    expected = webdataset_shards(tmp_path / "in", n_shards=3, per_shard=3, bad=True)
    client = s3_client(endpoint)
    upload_dir(client, bucket, tmp_path / "in", "shards")
    client.put_object(Bucket=bucket, Key="shards/", Body=b"")  # a directory marker, as pyarrow writes
    tasks = {"caption": {"max_new_tokens": 6},
             "vqa": {"questions": ["What color is it?", "How many objects?"], "max_new_tokens": 4},
             "grounding": {"max_new_tokens": 10}}
    cfg = load_config(data=job(ckpt_v1, tokenizer_v1, f"s3://{bucket}/shards", f"s3://{bucket}/out",
                               tasks=tasks, s3={"endpoint_url": endpoint}))
    summary = run(cfg)
    df = read_output_s3(endpoint, f"s3://{bucket}/out")

    # exactly one row per image and prompt (caption, 2 questions, grounding), nothing else
    assert len(df) == 4 * len(expected)
    assert Counter(zip(df.key, df.task)) == Counter(
        {(k, t): n for k in expected for t, n in (("caption", 1), ("vqa", 2), ("grounding", 1))})
    assert not df.duplicated(["key", "task_index"]).any()
    got = df.groupby("key").status.agg(lambda s: set(s))
    for key, status in expected.items():
        assert got[key] == {status}, (key, got[key])
    bad = {k for k, s in expected.items() if s != "ok"}
    assert df[df.key.isin(bad)].error_message.notna().all()
    assert df[df.key.isin(bad)].response.isna().all()
    ok = df[df.status == "ok"]
    assert ok.response.notna().all() and (ok.output_tokens > 0).all()
    assert set(ok.finish_reason) <= {"stop", "length"}
    assert ok.source_uri.str.startswith(f"s3://{bucket}/shards/").all()
    # grounding rows carry structured boxes (possibly empty) and the parse errors, others none
    g = ok[ok.task == "grounding"]
    assert g.boxes.map(lambda b: b is not None).all() and g.box_errors.map(lambda b: b is not None).all()
    assert ok[ok.task != "grounding"].boxes.isna().all()
    # model identity, settings, run fields; heavy columns never reach the output
    assert set(df.model_source) == {str(ckpt_v1)} and df.model_fingerprint.str.len().eq(16).all()
    assert json.loads(ok.generation_settings.iloc[0])["max_new_tokens"] in (4, 6, 10)
    assert set(df.run_id) == {summary["run_id"]}
    assert not {"image", "pixels", "prompt_ids"} & set(df.columns)
    # summary printed/written beside the outputs; deterministic file names per shard
    assert summary["images"] == len(expected) and summary["shards_processed"] == 3
    assert summary["status_counts"]["ok"] == 4 * sum(s == "ok" for s in expected.values())
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    assert {"out/data/00000.parquet", "out/data/00001.parquet", "out/data/00002.parquet"} <= keys
    assert f"out/_runs/{summary['run_id']}/summary.json" in keys
    saved = client.get_object(Bucket=bucket, Key=f"out/_runs/{summary['run_id']}/config.yaml")["Body"].read()
    assert b"testing" not in saved  # no credentials in the saved config


def test_parquet_input_with_bytes_and_with_uris(ray_cluster, ckpt_v1, tokenizer_v1, tmp_path):
    import pyarrow as pa

    inp = tmp_path / "in"
    inp.mkdir()
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    # file 1: image bytes + a per-row questions column (list, string, and none)
    pq.write_table(pa.table({
        "id": ["a", "b", "c"],
        "image": [good_image(1), good_image(2), b"garbage"],
        "qs": [["Is it red?", "Is it big?"], ["Is it small?"], []],
    }), inp / "bytes.parquet")
    cfg = load_config(data=job(ckpt_v1, tokenizer_v1, inp, tmp_path / "out1",
                               input={"format": "parquet", "key_column": "id", "questions_column": "qs"},
                               tasks={"vqa": {"questions": ["What is it?"], "max_new_tokens": 3}}))
    run(cfg)
    df = pd.read_parquet(tmp_path / "out1" / "data")
    assert Counter(df.key) == {"a": 3, "b": 2, "c": 1}
    assert df[df.key == "a"].prompt.tolist() == ["What is it?", "Is it red?", "Is it big?"]
    assert set(df[df.key == "c"].status) == {"decode_error"}

    # file 2: URIs to images (one missing file), no per-row questions
    for i in range(3):
        (imgs / f"{i}.png").write_bytes(good_image(10 + i, fmt="PNG"))
    inp2 = tmp_path / "in2"
    inp2.mkdir()
    uris = [str(imgs / "0.png"), str(imgs / "1.png"), str(imgs / "missing.png"), str(imgs / "2.png")]
    pq.write_table(pa.table({"uri": uris}), inp2 / "uris.parquet")
    cfg = load_config(data=job(ckpt_v1, tokenizer_v1, inp2, tmp_path / "out2",
                               input={"format": "parquet", "uri_column": "uri",
                                      "allowed_uri_prefixes": [str(imgs)]}))
    summary = run(cfg)
    df = pd.read_parquet(tmp_path / "out2" / "data")
    assert df.key.tolist() == [f"uris-{i:06d}" for i in range(4)]
    assert df.status.tolist() == ["ok", "ok", "read_error", "ok"]
    assert df.error_message[2] == f"not found: {imgs / 'missing.png'}"
    assert summary["status_counts"] == {"ok": 3, "read_error": 1}


def test_local_folder_readable_by_pandas_and_duckdb(ray_cluster, ckpt_v2, tmp_path):
    import duckdb

    inp = tmp_path / "folder"
    (inp / "sub").mkdir(parents=True)
    for i in range(5):
        (inp / f"img{i}.jpg").write_bytes(good_image(20 + i))
    (inp / "sub" / "deep.webp").write_bytes(good_image(30, fmt="WEBP"))
    (inp / "notes.txt").write_text("not an image: ignored by the folder reader")
    cfg = load_config(data=job(ckpt_v2, ckpt_v2, inp, tmp_path / "out",
                               input={"format": "folder", "images_per_shard": 4}))
    summary = run(cfg)
    assert summary["shards_processed"] == 2 and summary["images"] == 6
    df = pd.read_parquet(tmp_path / "out" / "data")
    assert sorted(df.key) == sorted([f"img{i}" for i in range(5)] + ["sub/deep"])
    assert (df.status == "ok").all()
    # the pipeline's answer equals the engine's, run directly on the same image and prompt
    from cogvlm import CogVLMProcessor, generate, load_model
    from pipeline.tasks import DEFAULT_CAPTION_PROMPT

    model = load_model(ckpt_v2, dtype="fp32")
    proc = CogVLMProcessor.from_pretrained(ckpt_v2)
    b = proc.collate([proc.build_inputs(DEFAULT_CAPTION_PROMPT, (inp / "img3.jpg").read_bytes())])
    direct = generate(model, **b.as_kwargs(), max_new_tokens=6)
    row = df[df.key == "img3"].iloc[0]
    assert row.response == proc.decode(direct.tokens[0]) and row.output_tokens == direct.num_tokens[0]
    con = duckdb.connect()
    n = con.execute(f"select count(*) from read_parquet('{tmp_path / 'out' / 'data'}/*.parquet')").fetchone()[0]
    assert n == 6
    # a rerun finds everything committed and does no work
    again = run(cfg)
    assert again["shards_skipped"] == 2 and again["shards_processed"] == 0 and again["images"] == 0


def test_replica_engine_shares_decode_steps_across_ray_batches(ray_cluster, ckpt_v1, tokenizer_v1, tmp_path):
    """One image per Ray batch: a replica works on several batches at once, their prompts decode
    in the same steps of its one engine, and every (image, prompt) comes back exactly once."""
    expected = webdataset_shards(tmp_path / "in", n_shards=2, per_shard=6)
    tasks = {"caption": {"max_new_tokens": 12}, "vqa": {"questions": ["What is it?"], "max_new_tokens": 8},
             "grounding": {"max_new_tokens": 10, "temperature": 1.0, "seed": 3}}
    summary = run(load_config(data=job(ckpt_v1, tokenizer_v1, tmp_path / "in", tmp_path / "out", tasks=tasks,
                                       model={"batch_size": 1, "batches_in_flight": 6, "admission_images": 2})))
    df = pd.read_parquet(tmp_path / "out" / "data")
    assert len(df) == 3 * len(expected) and not df.duplicated(["key", "task_index"]).any()
    assert set(df.key) == set(expected) and (df.status == "ok").all()
    e = summary["engine"]
    assert e["shared_steps"] > 0 and e["shared_step_fraction"] > 0, e  # batches really shared steps
    assert e["finished"] == 3 * len(expected) and e["images"] == len(expected), e  # one vision pass each
    assert e["recompiles"] == 0 and e["oom_admission"] == e["oom_decode"] == e["failed_alone"] == 0, e
    assert 0 < e["avg_slot_occupancy"] <= 1 and e["replicas"] == 1


def test_generate_stage_rows_do_not_depend_on_their_batch(ckpt_v1, tokenizer_v1, tmp_path):
    """Called directly (no Ray): each image's rows, sampled ones included, are the same whether
    it comes alone or with others; a sampled row's stream is (seed, key, task), so two images
    with the same pixels but different keys sample differently."""
    from cogvlm.weights import read_config
    from pipeline.listing import Shard
    from pipeline.readers import read_shard
    from pipeline.stages import Generate, Preprocess

    webdataset_shards(tmp_path / "in", n_shards=1, per_shard=4)
    tasks = {"caption": {"max_new_tokens": 8, "temperature": 1.0, "seed": 5},
             "vqa": {"questions": ["What is it?"], "max_new_tokens": 6}}
    cfg = load_config(data=job(ckpt_v1, tokenizer_v1, tmp_path / "in", tmp_path / "o", tasks=tasks))
    mcfg = read_config(ckpt_v1)
    rows = pd.DataFrame(read_shard(Shard("00000", str(tmp_path / "in" / "00000.tar")), cfg.input, cfg.s3))
    pre = Preprocess.__call__(Preprocess(cfg, mcfg), rows)
    pre.loc[1, "pixels"] = pre.loc[0, "pixels"]  # same image, another key
    gen = Generate(cfg, mcfg)
    together = gen.run(pre).sort_values(["key", "task_index"]).reset_index(drop=True)
    alone = pd.concat([gen.run(pre.iloc[[i]]) for i in range(len(pre))]).sort_values(["key", "task_index"])
    assert len(together) == 8 and (together.status == "ok").all()
    assert together.response.tolist() == alone.response.tolist()
    captions = together[together.task == "caption"].set_index("key").response
    assert captions[pre.key[0]] != captions[pre.key[1]]


def test_killed_run_resumes_without_duplicates_or_recomputation(ray_cluster, ckpt_v1, tokenizer_v1, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    expected = webdataset_shards(inp, n_shards=5, per_shard=2)
    cfg_path = tmp_path / "job.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(job(ckpt_v1, tokenizer_v1, inp, out)))
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, **{KILL_AFTER_ENV: "2"})
    proc = subprocess.run([sys.executable, "-m", "jobs.caption", "--config", str(cfg_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILLed after two commits
    first = {p.stem: json.loads(p.read_text()) for p in (out / "_ledger").glob("*.json")}
    assert len(first) == 2
    first_files = {sid: (out / "data" / f"{sid}.parquet").stat().st_mtime_ns for sid in first}

    summary = run(load_config(cfg_path))
    assert summary["shards_skipped"] == 2 and summary["shards_processed"] == 3
    df = pd.read_parquet(out / "data")
    assert sorted(df.key) == sorted(expected) and not df.key.duplicated().any()
    for sid, rec in first.items():  # committed shards were not recomputed
        assert json.loads((out / "_ledger" / f"{sid}.json").read_text())["run_id"] == rec["run_id"]
        assert (out / "data" / f"{sid}.parquet").stat().st_mtime_ns == first_files[sid]
    assert set(df[df.shard_id.isin(first)].run_id) == {rec["run_id"] for rec in first.values()}
    assert not [p for p in (out / "_parts").rglob("*") if p.is_file()]  # the killed run's parts are gone


def test_config_and_setup_errors_fail_fast_and_name_the_problem(ray_cluster, ckpt_v1, tokenizer_v1, tmp_path):
    inp = tmp_path / "in"
    webdataset_shards(inp, n_shards=1, per_shard=1)
    base = job(ckpt_v1, tokenizer_v1, inp, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"unknown config key model\.batchsize"):
        load_config(data=base, overrides=["model.batchsize=3"])
    with pytest.raises(ConfigError, match=r"unknown config key tasks\.caption\.max_tokens"):
        load_config(data=job(ckpt_v1, tokenizer_v1, inp, tmp_path / "o", tasks={"caption": {"max_tokens": 3}}))
    with pytest.raises(ConfigError, match=r"model\.batch_size must be an integer"):
        load_config(data=base, overrides=["model.batch_size=2.5"])
    with pytest.raises(ConfigError, match=r"input\.format"):
        load_config(data=base, overrides=["input.format=zip"])
    with pytest.raises(InputError, match="does not exist"):
        run(load_config(data=base, overrides=[f"input.path={tmp_path / 'nowhere'}"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no \.tar files"):
        run(load_config(data=base, overrides=[f"input.path={tmp_path / 'empty'}"]))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(JobError, match="not writable"):
        run(load_config(data=base, overrides=[f"output.path={tmp_path / 'afile' / 'out'}"]))
    with pytest.raises(JobError, match=r"4 GPUs, but the cluster has 0"):
        run(load_config(data=base, overrides=["model.gpus_per_replica=2", "model.min_replicas=2",
                                              "model.max_replicas=2"]))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((ckpt_v1 / "config.json").read_text())
    with pytest.raises(JobError, match=r"model\.source .*safetensors"):
        run(load_config(data=base, overrides=[f"model.source={broken}"]))
    # the CLI turns these into one line on stderr and exit code 2
    cfg_path = tmp_path / "bad.yaml"
    cfg_path.write_text("input: {path: x}\nmodle: {}\n")
    proc = subprocess.run([sys.executable, "-m", "jobs.caption", "--config", str(cfg_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown config key modle" in proc.stderr


def test_preprocess_stage_called_directly(ckpt_v1, tokenizer_v1, tmp_path):
    """Stages are plain classes: call one on a DataFrame without Ray."""
    from cogvlm.weights import read_config
    from pipeline.stages import Preprocess

    cfg = load_config(data=job(ckpt_v1, tokenizer_v1, tmp_path, tmp_path / "o",
                               input={"max_image_pixels": 64 * 64}))
    stage = Preprocess(cfg, read_config(ckpt_v1))
    rows = [{"shard_id": "s", "source_uri": "u", "shard_total": 3, "image_index": i, "key": k,
             "image": data, "image_uri": None, "questions": None, "read_error": None}
            for i, (k, data) in enumerate([("ok", good_image(1)), ("big", good_image(2, (65, 64))),
                                           ("bad", bad_images()["truncated"][1])])]
    out = Preprocess.__call__(stage, pd.DataFrame(rows))
    assert out.status.tolist() == ["ok", "image_too_large", "decode_error"]
    # a small JPEG travels as its own bytes (smaller than the uint8 (S, S, 3) pixels)
    assert out.pixels_format[0] == "source" and out.pixels[0] == good_image(1) and out.pixels[1] is None


def test_enrich_processes_only_new_shards_and_records_runs(ray_cluster, ckpt_v1, tokenizer_v1, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    first = webdataset_shards(inp, n_shards=2, per_shard=2)
    cfg = load_config(data=job(ckpt_v1, tokenizer_v1, inp, out), overrides=["mode=enrich"])
    s1 = run(cfg)
    assert s1["shards"] == ["00000", "00001"] and s1["images"] == 4
    progress = json.loads((out / "_runs" / s1["run_id"] / "progress.json").read_text())
    assert progress["state"] == "done" and progress["images_done"] == progress["images_total"] == 4
    assert progress["images_total_exact"] and progress["shards_done"] == progress["shards_total"] == 2
    assert sum(progress["rows_by_status"].values()) == s1["rows"]
    # new shards land under the prefix
    from .data import good_image, write_tar

    write_tar(inp / "00002.tar", [("new0", "jpg", good_image(500), None), ("new1", "png", good_image(501, fmt="PNG"), None)])
    s2 = run(cfg)
    assert s2["shards"] == ["00002"] and s2["shards_skipped"] == 2 and s2["images"] == 2
    s3 = run(cfg)
    assert s3["shards_processed"] == 0 and s3["message"] == "nothing new to process"
    df = pd.read_parquet(out / "data")
    assert sorted(df.key) == sorted(list(first) + ["new0", "new1"]) and not df.key.duplicated().any()
    runs = {p.name: json.loads((p / "summary.json").read_text()) for p in (out / "_runs").iterdir()}
    assert {r["run_id"] for r in runs.values()} == {s1["run_id"], s2["run_id"], s3["run_id"]}
    assert all(r["mode"] == "enrich" for r in runs.values())
    assert not list((out / "_claims").glob("*.json"))  # claims are released after commit


def test_overlapping_enrich_runs_split_the_work(ray_cluster, ckpt_v1, tokenizer_v1, tmp_path):
    import yaml

    inp, out = tmp_path / "in", tmp_path / "out"
    expected = webdataset_shards(inp, n_shards=4, per_shard=2)
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(job(ckpt_v1, tokenizer_v1, inp, out)))
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    cmd = [sys.executable, "-m", "jobs.caption", "--config", str(cfg_path), "--mode", "enrich"]
    procs = [subprocess.Popen(cmd + [f"run_id=overlap-{i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    summaries = [json.loads(o[0][o[0].index("{"):]) for o in outs]
    taken = [set(s["shards"]) for s in summaries]
    assert not taken[0] & taken[1] and taken[0] | taken[1] == {f"{i:05d}" for i in range(4)}
    df = pd.read_parquet(out / "data")
    assert sorted(df.key) == sorted(expected) and not df.key.duplicated().any()


def test_claims_respect_live_leases_and_take_over_expired_ones(tmp_path):
    import fsspec

    from pipeline.claims import Claims

    fs = fsspec.filesystem("file")
    a = Claims(fs, str(tmp_path), "run-a", ttl_s=60)
    b = Claims(fs, str(tmp_path), "run-b", ttl_s=60)
    assert a.acquire("s1") and not b.acquire("s1")
    dead = Claims(fs, str(tmp_path), "run-dead", ttl_s=-1)  # its claims are born expired
    assert dead.acquire("s2") and b.acquire("s2")
    assert json.loads((tmp_path / "_claims" / "s2.json").read_text())["run_id"] == "run-b"
    a.release("s1")
    assert b.acquire("s1")
    # a pass of added tasks has claims of its own: the same shard, held in both, apart; within
    # the pass, exclusive as above
    c = Claims(fs, str(tmp_path), "run-c", ttl_s=60, tasks_pass="vqa")
    d = Claims(fs, str(tmp_path), "run-d", ttl_s=60, tasks_pass="vqa")
    assert c.acquire("s1") and not d.acquire("s1")
    assert json.loads((tmp_path / "_passes" / "vqa" / "_claims" / "s1.json").read_text())["run_id"] == "run-c"
    assert json.loads((tmp_path / "_claims" / "s1.json").read_text())["run_id"] == "run-b"


def test_enrich_rejects_folder_input(ckpt_v1, tokenizer_v1, tmp_path):
    with pytest.raises(ConfigError, match="mode enrich needs"):
        load_config(data=job(ckpt_v1, tokenizer_v1, tmp_path, tmp_path / "o", input={"format": "folder"}),
                    overrides=["mode=enrich"])


def test_cli_starts_its_own_ray_on_this_machine(ckpt_v1, tokenizer_v1, tmp_path):
    """`python -m jobs.caption` with no cluster around: it starts a local Ray sized for its stages
    (on a 2-core machine the read tasks once waited forever behind the two actor pools)."""
    import shutil
    import tempfile

    import yaml

    expected = webdataset_shards(tmp_path / "in", n_shards=2, per_shard=2)
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(job(ckpt_v1, tokenizer_v1, tmp_path / "in", tmp_path / "out")))
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # no leftover cluster address; short socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    try:
        proc = subprocess.run([sys.executable, "-m", "jobs.caption", "--config", str(cfg_path)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Started a local Ray instance" in proc.stderr
    assert sorted(pd.read_parquet(tmp_path / "out" / "data").key) == sorted(expected)


def test_claims_on_s3_use_conditional_puts(s3_bucket):
    from pipeline.config import S3Config
    from pipeline.claims import Claims
    from pipeline.storage import filesystem

    bucket, endpoint = s3_bucket
    fs, root = filesystem(f"s3://{bucket}/out", S3Config(endpoint_url=endpoint))
    a, b = Claims(fs, root, "run-a", ttl_s=60), Claims(fs, root, "run-b", ttl_s=60)
    assert a.acquire("00001") and not b.acquire("00001")  # If-None-Match: * refused the second
    a.release("00001")
    assert b.acquire("00001")


def test_rerun_with_another_config_refuses_naming_the_difference(ray_cluster, ckpt_v1, tokenizer_v1, tmp_path):
    """An output records the config that made it (`_output.json`); a rerun with other tasks or
    another dtype refuses in one line naming the difference (exit 2) instead of saying "nothing
    new to process" over the old config's rows; the same config reruns as before."""
    webdataset_shards(tmp_path / "in", n_shards=1, per_shard=2)
    cfg = job(ckpt_v1, tokenizer_v1, tmp_path / "in", tmp_path / "out")
    run(load_config(data=cfg))
    manifest = json.loads((tmp_path / "out" / "_output.json").read_text())
    assert manifest["config"]["tasks.caption.max_new_tokens"] == 6 and manifest["config"]["tasks.vqa"] == "off"
    assert run(load_config(data=cfg))["message"] == "nothing new to process"
    more = dict(cfg, tasks={"caption": {"max_new_tokens": 6}, "vqa": {"questions": ["a?"]}})
    with pytest.raises(JobError, match=r"another config \(tasks\.vqa: 'off' there, 'on' here\)"):
        run(load_config(data=more))
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(json.dumps(cfg))
    cli = subprocess.run([sys.executable, "-m", "jobs.caption", "--config", str(cfg_path), "model.dtype=bf16"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2, cli.stderr[-2000:]
    errors = [ln for ln in cli.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "model.dtype: 'fp32' there, 'bf16' here" in errors[0], cli.stderr[-2000:]


def test_add_tasks_to_an_existing_output_exactly_once(ray_cluster, ckpt_v1, tokenizer_v1, tmp_path):
    """A caption-only output gets VQA added (`--add-tasks`): only the new task runs, with its own
    ledger; the caption files are not rewritten; a driver killed mid-pass is finished by a plain
    rerun of the union config, each (image, task) row exactly once; then nothing is left to do.
    A changed setting of an existing task still refuses, flag or not."""
    import yaml

    inp, out = tmp_path / "in", tmp_path / "out"
    expected = webdataset_shards(inp, n_shards=3, per_shard=2)
    first = job(ckpt_v1, tokenizer_v1, inp, out)
    run(load_config(data=first))
    caption_files = {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet")}
    markers = {p.name: p.read_text() for p in (out / "_ledger").glob("*.json")}
    assert len(caption_files) == 3 and len(markers) == 3

    union = dict(first, tasks={"caption": {"max_new_tokens": 6},
                               "vqa": {"questions": ["What color?", "How many?"], "max_new_tokens": 4}})
    with pytest.raises(JobError, match=r"\(tasks\.vqa: 'off' there, 'on' here\): to add vqa .*--add-tasks"):
        run(load_config(data=union))
    cfg_path = tmp_path / "union.yaml"
    cfg_path.write_text(yaml.safe_dump(union))
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, **{KILL_AFTER_ENV: "1"})
    proc = subprocess.run([sys.executable, "-m", "jobs.caption", "--config", str(cfg_path), "--add-tasks"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]  # killed after the add pass's first commit
    pass_ledger = out / "_passes" / "vqa" / "_ledger"
    vqa_done = len(list(pass_ledger.glob("*.json")))
    assert 1 <= vqa_done < 3
    # the cost plan is the added pass's: its shards left
    planned = subprocess.run([sys.executable, "-m", "jobs.plan", "--config", str(cfg_path), "--json"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert json.loads(planned.stdout)["ledger"]["pending_shards"] == 3 - vqa_done
    manifest = json.loads((out / "_output.json").read_text())
    assert manifest["config"]["tasks.vqa"] == "on" and [p["tasks"] for p in manifest["passes"]] == [["vqa"]]

    summary = run(load_config(data=union))  # a plain rerun of the union config finishes the pass
    assert summary["tasks"] == ["vqa"] and summary["tasks_pass"] == "vqa"
    assert summary["shards_skipped"] >= 1 and summary["shards_processed"] + summary["shards_skipped"] == 3
    df = pd.read_parquet(out / "data")
    assert Counter(zip(df.key, df.task)) == Counter(
        {(k, t): n for k in expected for t, n in (("caption", 1), ("vqa", 2))})
    assert not df.duplicated(["key", "task", "task_index"]).any()
    assert sorted(df[df.task == "vqa"].prompt.unique()) == ["How many?", "What color?"]
    # the caption rows were not recomputed: their files and markers are untouched
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet") if "+" not in p.name} \
        == caption_files
    assert {p.name: p.read_text() for p in (out / "_ledger").glob("*.json")} == markers
    assert len(list(pass_ledger.glob("*.json"))) == 3
    assert not [p for p in (out / "_passes").rglob("_parts/**/*") if p.is_file()]

    assert run(load_config(data=union))["message"] == "nothing new to process"
    with pytest.raises(JobError, match=r"tasks\.vqa\.max_new_tokens: 4 there, 8 here"):
        run(load_config(data=union, overrides=["tasks.vqa.max_new_tokens=8", "output.add_tasks=true"]))
    with pytest.raises(JobError, match=r"model\.dtype: 'fp32' there, 'bf16' here"):
        run(load_config(data=dict(union, tasks=dict(union["tasks"], grounding={})),
                        overrides=["model.dtype=bf16", "output.add_tasks=true"]))

    from jobs.report import build_report
    from jobs.report_data import load_output
    from pipeline.config import S3Config

    report = load_output(str(out), S3Config())
    assert len(report.rows) == len(df) and not report.uncommitted_files
    assert {r.summary["tasks_pass"] for r in report.runs if r.summary and r.summary.get("images")} == {"", "vqa"}
    html = build_report(str(out), S3Config(), sample=0)  # the runs count each image once per pass, and say so
    assert 'data-images="6" data-images-per-pass="12"' in html  # (the killed run left no record)
    assert "with rows from 2 passes of tasks" in html


def test_caption_help_examples_parse():
    """Every `key=value` example in `jobs.caption --help` is a valid override (the VQA example
    was invalid YAML: `[a?, b?]`)."""
    import re
    import shlex

    import jobs.caption

    examples = [tok for span in re.findall(r"`([^`]*=[^`]*)`", jobs.caption.__doc__)
                for tok in shlex.split(span) if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+=.*", tok)]
    assert any(e.startswith("tasks.vqa.questions=") for e in examples), examples
    base = {"model": {"source": "m"}, "input": {"path": "i"}, "output": {"path": "o"}}
    cfg = load_config(data=base, overrides=examples)
    assert cfg.tasks.vqa.questions == ["Is it red?", "How many people?"] and cfg.model.batch_size == 16


def test_progress_moves_as_parts_are_written_and_shares_the_summary_clock(ray_cluster, ckpt_v1, tokenizer_v1,
                                                                         tmp_path, caplog):
    """One shard of 8 images in batches of 1: a progress line counts written images before the
    shard commits; the final progress.json's wall_s is the summary's (one clock, one start)."""
    import logging

    webdataset_shards(tmp_path / "in", n_shards=1, per_shard=8)
    cfg = job(ckpt_v1, tokenizer_v1, tmp_path / "in", tmp_path / "out",
              model={"batch_size": 1, "batches_in_flight": 1}, tasks={"caption": {"max_new_tokens": 24}})
    cfg["progress_interval_s"] = 0.2
    cfg["input"]["read_block_mb"] = 0.001  # one image per block: parts stream back one by one
    with caplog.at_level(logging.INFO, logger="pipeline.progress"):
        summary = run(load_config(data=cfg))
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.progress"]
    assert any(" (0 committed)" in ln and not ln.startswith("progress: 0/") for ln in lines), lines
    prog = json.loads((tmp_path / "out" / "_runs" / summary["run_id"] / "progress.json").read_text())
    assert prog["images_done"] == prog["images_committed"] == 8 and prog["state"] == "done"
    assert -0.1 <= summary["wall_s"] - prog["wall_s"] < 5, (summary["wall_s"], prog["wall_s"])
