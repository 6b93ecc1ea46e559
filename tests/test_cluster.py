"""Running on a real Ray head: `ray job submit` and `jobs.submit` against `ray start --head`."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest
import yaml

from jobs.submit import submission_id

from .conftest import free_port
from .data import webdataset_shards

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@contextlib.contextmanager
def _start_head(tmp: Path, python: Path, env: dict, headers: dict | None = None) -> Iterator[tuple[str, int]]:
    """`_head`, tried twice: a port picked free may be taken by another cluster on this machine
    before Ray binds it (then the head never gets a job agent)."""
    for attempt in (1, 2):
        try:
            head = _head(tmp, python, env, headers, wait_s=90 if attempt == 1 else 120)
            started = head.__enter__()
        except RuntimeError:
            if attempt == 2:
                raise
            continue
        break
    try:
        yield started
    except BaseException:
        if not head.__exit__(*sys.exc_info()):
            raise
    else:
        head.__exit__(None, None, None)


@contextlib.contextmanager
def _head(tmp: Path, python: Path, env: dict, headers: dict | None, wait_s: float) -> Iterator[tuple[str, int]]:
    """`ray start --head --block` with `python` (its bin/ first on PATH, as an activated environment
    has it) on loopback, in its own process group; yields (dashboard address, GCS port) once a
    trivial job runs; always stopped."""
    port, dash = free_port(), free_port()
    env = dict(env, RAY_USAGE_STATS_ENABLED="0", PATH=f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    log = open(tmp / "head.log", "w")
    # its own temp dir: a job's driver joins the cluster named in <temp dir>/ray_current_cluster
    # (Ray's "auto"), which in the shared /tmp/ray is whichever cluster on this machine started last
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Unix socket paths live under it
    proc = subprocess.Popen(
        [str(python), "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--temp-dir={temp_dir}",
         f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4",
         "--num-gpus=0", "--disable-usage-stats",
         # every fixed default port too: other clusters may run on this machine (52365 taken = no job agent)
         *(f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                  "metrics-export-port", "runtime-env-agent-port",
                                                  "ray-client-server-port"))],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + wait_s
        while True:  # ready when a (trivial) job can be submitted: the job agent is up too
            try:
                client = JobSubmissionClient(address, headers=headers)
                probe = client.submit_job(entrypoint="true")
                break
            except Exception as e:  # noqa: BLE001 - not up yet
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"ray head did not come up ({e!r:.500}): "
                                       f"{Path(log.name).read_text()[-2000:]}") from None
                time.sleep(1)
        while str(client.get_job_status(probe)).split(".")[-1] not in ("SUCCEEDED", "FAILED", "STOPPED"):
            time.sleep(0.5)
        yield address, port
    finally:
        try:  # `ray start --block` takes over 30 s to act on SIGTERM; its cluster is thrown away
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=3)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A token-authenticated head started as the README says (RAY_AUTH_MODE=token, a token in
    ~/.ray/auth_token, `ray start --head` from the project's environment; ~ is a temporary HOME). Yields the
    dashboard address, the clients' environment (RAY_AUTH_MODE=token, that HOME) and the GCS
    address."""
    tmp = tmp_path_factory.mktemp("ray")
    home = tmp / "home"
    (home / ".ray").mkdir(parents=True)
    token = secrets.token_hex(32)
    (home / ".ray" / "auth_token").write_text(token)
    base = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    head_env = dict(base, HOME=str(home), RAY_AUTH_MODE="token")
    with _start_head(tmp, BIN / "python", head_env, {"Authorization": f"Bearer {token}"}) as (address, port):
        env = dict(base, HOME=str(home), RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
                   PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        yield address, env, f"127.0.0.1:{port}"


def _python_without_torch(tmp: Path) -> Path:
    """A Python with everything of this environment but torch (as a head started outside the
    project's venv, with Ray but not the project's dependencies): a bare venv whose .pth adds a
    folder of links to this environment's packages, torch's left out."""
    import sysconfig

    venv = tmp / "no-torch"
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    links = tmp / "no-torch-packages"
    links.mkdir()
    here = Path(sysconfig.get_paths()["purelib"])
    for entry in here.iterdir():
        if entry.name.startswith(("torch", "functorch")) or entry.suffix == ".pth":
            continue
        (links / entry.name).symlink_to(entry)
    purelib = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (purelib / "without-torch.pth").write_text(f"import site; site.addsitedir({str(links)!r})\n")
    python = venv / "bin" / "python"
    check = subprocess.run([str(python), "-c", "import ray, pyarrow\ntry:\n import torch\nexcept ImportError:\n pass\n"
                            "else:\n raise SystemExit('torch importable')"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    return python


def _readme_submit_block() -> tuple[dict[str, str], list[str]]:
    """The README's cluster commands: its `export`s and its `python -m jobs.submit` lines."""
    text = (ROOT / "README.md").read_text()
    block = text.split("run verbatim by tests/test_cluster.py -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    exports, submits = {}, []
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("export "):
            k, v = line[len("export "):].split("=", 1)
            exports[k] = v
        elif line.startswith("python -m jobs.submit"):
            submits.append(line)
    return exports, submits


def _run_readme(line: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    argv = shlex.split(line)
    assert argv[0] == "python"
    return subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_readme_submit_on_a_token_cluster(ray_head):
    """The README's commands on a fresh token-authenticated `ray start --head`: without the
    exported RAY_AUTH_MODE, one line saying what to export; with the README's exports, the demo
    (whose checkpoint is git-ignored, so not uploaded) is built and run on the cluster."""
    address, env, _ = ray_head
    exports, submits = _readme_submit_block()
    assert exports.get("RAY_AUTH_MODE") == "token" and "RAY_ADDRESS" in exports
    demo = next(line for line in submits if "--demo" in line)
    no_auth = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    no_auth["RAY_ADDRESS"] = address
    denied = _run_readme(demo, no_auth, timeout=120)
    assert denied.returncode == 2, denied.stdout[-2000:] + denied.stderr[-3000:]
    lines = denied.stderr.strip().splitlines()
    assert len(lines) == 1 and "export RAY_AUTH_MODE=token" in lines[0], denied.stderr[-3000:]

    ok = _run_readme(demo, {**env, **exports, "RAY_ADDRESS": address})
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "SUCCEEDED" in ok.stdout and "random weights" in ok.stdout
    assert all(name in ok.stdout for name in ("balls", "cross", "house", "phone"))


def test_submit_to_a_cluster_without_torch_says_what_to_do(tmp_path):
    """A head started from a Python without torch (Ray alone): the README's submit stops in one
    line naming the missing module and the fixes, and submits no job."""
    python = _python_without_torch(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    with _start_head(tmp_path, python, dict(env, RAY_AUTH_MODE="disabled")) as (address, _):
        exports, submits = _readme_submit_block()
        demo = next(line for line in submits if "--demo" in line)
        run_env = {**env, **exports, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}
        out = _run_readme(demo, run_env, timeout=180)
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr[-3000:]
        assert "cannot import 'torch'" in lines[0] and "start Ray from the project's environment" in lines[0]
        from ray.job_submission import JobSubmissionClient

        jobs = JobSubmissionClient(address).list_jobs()
        assert not [j for j in jobs if (j.submission_id or "").startswith("cogvlm-")]


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


def test_enrich_submits_again_when_a_shard_lands_in_the_same_hour(ray_head, ckpt_v1, tokenizer_v1, tmp_path):
    """`jobs.submit --mode enrich` twice within a minute, a shard landing in between: the second
    submit is a new job that processes the new shard (it once said "already succeeded" for the
    rest of the UTC hour); a third, with nothing pending, submits nothing."""
    address, env, _ = ray_head
    expected = webdataset_shards(tmp_path / "staging", n_shards=2, per_shard=2)
    inp = tmp_path / "in"
    inp.mkdir()
    for f in (tmp_path / "staging").glob("00000*"):
        f.rename(inp / f.name)
    cfg_path = tmp_path / "enrich.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(ckpt_v1, tokenizer_v1, inp, tmp_path / "out")))
    cmd = [sys.executable, "-m", "jobs.submit", "--address", address, "--config", str(cfg_path),
           "--mode", "enrich", "--no-probe"]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "submitted job" in first.stdout, first.stdout[-3000:] + first.stderr[-3000:]
    for f in (tmp_path / "staging").glob("00001*"):  # a new shard lands
        f.rename(inp / f.name)
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "submitted job" in second.stdout and "already succeeded" not in second.stdout
    df = pd.read_parquet(tmp_path / "out" / "data")
    assert sorted(df.key) == sorted(expected) and not df.key.duplicated().any()
    third = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and "nothing pending" in third.stdout and "submitted job" not in third.stdout

    # a task added through the submit entrypoint (--add-tasks): its pass is pending, then done
    union = _config(ckpt_v1, tokenizer_v1, inp, tmp_path / "out")
    union["tasks"] = dict(union["tasks"], vqa={"questions": ["What color?"], "max_new_tokens": 3})
    union_path = tmp_path / "enrich-vqa.yaml"
    union_path.write_text(yaml.safe_dump(union))
    add = [*cmd[:cmd.index("--config") + 1], str(union_path), *cmd[cmd.index("--config") + 2:], "--add-tasks"]
    added = subprocess.run(add, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert added.returncode == 0 and "submitted job" in added.stdout, added.stdout[-3000:] + added.stderr[-3000:]
    df = pd.read_parquet(tmp_path / "out" / "data")
    assert Counter(zip(df.key, df.task)) == Counter({(k, t): 1 for k in expected for t in ("caption", "vqa")})
    last = subprocess.run(add, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert last.returncode == 0 and "nothing pending" in last.stdout and "submitted job" not in last.stdout
