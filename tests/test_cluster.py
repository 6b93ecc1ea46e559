"""Running on a real Ray head: `ray job submit` and `jobs.submit` against `ray start --head`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from jobs.submit import submission_id

from .conftest import free_port
from .data import webdataset_shards

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` on loopback in its own process group; always stopped."""
    port, dash = free_port(), free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4", "--num-gpus=0",
         "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 300  # a loaded 2-core machine took over 120 s
        while True:  # ready when a (trivial) job can be submitted: the job agent is up too
            try:
                client = JobSubmissionClient(address)
                probe = client.submit_job(entrypoint="true")
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"ray head did not come up: {Path(log.name).read_text()[-2000:]}")
                time.sleep(1)
        while str(client.get_job_status(probe)).split(".")[-1] not in ("SUCCEEDED", "FAILED", "STOPPED"):
            time.sleep(0.5)
        yield address, env, f"127.0.0.1:{port}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        current = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()  # what `ray stop` would clean up


def _config(ckpt, tok, inp, out) -> dict:
    return {"input": {"path": str(inp)}, "output": {"path": str(out)},
            "model": {"source": str(ckpt), "tokenizer": str(tok), "dtype": "fp32", "gpus_per_replica": 0,
                      "batch_size": 4, "preprocess_workers": 1},
            "tasks": {"caption": {"max_new_tokens": 4}}}


def test_ray_job_submit_cli(ray_head, ckpt_v1, tokenizer_v1, tmp_path):
    address, env, _ = ray_head
    expected = webdataset_shards(tmp_path / "in", n_shards=2, per_shard=2)
    cfg = _config(ckpt_v1, tokenizer_v1, tmp_path / "in", tmp_path / "out")
    runtime_env = {"env_vars": {"COGVLM_JOB_CONFIG": yaml.safe_dump(cfg)},
                   "excludes": [".venv", "build", ".git"]}
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
         "--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", "jobs.caption"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "shard 00001 committed" in proc.stdout or "shard 00001 committed" in proc.stderr
    df = pd.read_parquet(tmp_path / "out" / "data")
    assert sorted(df.key) == sorted(expected) and (df.status == "ok").all()


def test_submit_helper_is_idempotent_and_reports_failure(ray_head, ckpt_v1, tokenizer_v1, tmp_path):
    address, env, _ = ray_head
    expected = webdataset_shards(tmp_path / "in", n_shards=2, per_shard=2)
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(ckpt_v1, tokenizer_v1, tmp_path / "in", tmp_path / "out")))
    cmd = [sys.executable, "-m", "jobs.submit", "--address", address, "--config", str(cfg_path),
           "--env", "SECRET_FOR_TEST", "model.batch_size=2"]
    run_env = dict(env, SECRET_FOR_TEST="do-not-print-me")
    first = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    sid = submission_id(cfg_path.read_text(), ["model.batch_size=2"], "batch")
    assert f"submitted job {sid}" in first.stdout and f"job {sid}: SUCCEEDED" in first.stdout
    assert "do-not-print-me" not in first.stdout + first.stderr
    df = pd.read_parquet(tmp_path / "out" / "data")
    assert sorted(df.key) == sorted(expected)
    # the same submission again: no second job
    again = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already succeeded" in again.stdout

    bad_path = tmp_path / "bad.yaml"
    bad_path.write_text(yaml.safe_dump(_config(tmp_path / "no-model", tokenizer_v1, tmp_path / "in",
                                               tmp_path / "out-bad")))
    bad = subprocess.run([sys.executable, "-m", "jobs.submit", "--address", address, "--config", str(bad_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1, bad.stdout[-3000:]
    assert "FAILED" in bad.stdout and "does not exist" in bad.stdout


def test_batch_runs_on_a_small_cluster_finish_and_split_the_work(ray_head, ckpt_v1, tokenizer_v1, tmp_path):
    """Three batch jobs started together on a 4-CPU cluster whose actor pools can take every CPU
    (two such jobs once deadlocked, each one's reads waiting for a CPU): two on one output, one on
    another. All finish; the two on one output split its shards; every image comes back once."""
    _, env, gcs = ray_head
    procs = []
    expected = {}
    for name, copies in (("shared", 2), ("other", 1)):
        expected[name] = webdataset_shards(tmp_path / f"in-{name}", n_shards=6, per_shard=4)
        cfg = _config(ckpt_v1, tokenizer_v1, tmp_path / f"in-{name}", tmp_path / f"out-{name}")
        cfg["model"]["preprocess_workers"] = 2
        cfg["model"]["batch_size"] = 2
        cfg_path = tmp_path / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        for i in range(copies):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "jobs.caption", "--config", str(cfg_path), f"run_id={name}-{i}"],
                cwd=ROOT, env=dict(env, RAY_ADDRESS=gcs), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-2000:] for o in outs]
    summaries = [json.JSONDecoder().raw_decode(o[0][o[0].index('{\n  "run_id"'):])[0] for o in outs]
    taken = [set(s["shards"]) for s in summaries[:2]]
    assert not taken[0] & taken[1] and taken[0] | taken[1] == {f"{i:05d}" for i in range(6)}
    for name in ("shared", "other"):
        df = pd.read_parquet(tmp_path / f"out-{name}" / "data")
        assert sorted(df.key) == sorted(expected[name]) and not df.key.duplicated().any()
