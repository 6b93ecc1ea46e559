"""A worker node lost mid-run, for real: a `ray start --head` with no CPUs for the stages (the
driver, its actors and the reads live there) and a `ray start` worker node with the CPUs, whose
whole process group (raylet and every worker) is SIGKILLed after the run's first commit.

The driver-side actors are pinned to the driver's node (pipeline.actors): the placement test shows
every one of them lands there (and that unpinned they would not), so one kill per scenario shows
what a lost node costs instead of repeating kills until every placement came up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline import load_config
from pipeline.crashes import CrashLedger
from pipeline.errors import NoNodes, is_transient
from pipeline.preflight import NodeWatch
from pipeline.progress import Progress

from .conftest import free_port
from .data import webdataset_shards

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# the head notices a dead node within ~3 s (Ray's default takes ~30 s)
FAST_HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
               "RAY_health_check_timeout_ms": "1000", "RAY_health_check_initial_delay_ms": "1000"}


def test_crash_ledger_does_not_charge_an_image_for_a_lost_node():
    dead: set[str] = set()
    ledger = CrashLedger(dead=lambda: dead)
    assert ledger.begin(["a", "b"], "n1") == (False, 1)
    dead.add("n1")  # the node died with the batch in flight: its retry is a first attempt
    assert ledger.begin(["a", "b"], "n2") == (False, 1)
    assert ledger.begin(["a", "b"], "n2") == (True, 2)  # a worker died on a live node: isolate
    assert ledger.begin_alone("a", "n2") == 0
    dead.add("n2")  # its node died while `a` was alone: not charged
    assert ledger.begin_alone("a", "n3") == 0
    assert ledger.begin_alone("a", "n3") == 1  # a worker died on a live node: charged
    assert ledger.stats()["lost_to_nodes"] == 5  # a, b on n1; a twice in batches and once alone on n2


def test_ray_losses_are_transient():
    import ray.exceptions as rex

    for exc in (rex.ActorDiedError(), rex.NodeDiedError("node gone"), rex.ObjectLostError("00" * 28, "", ""),
                rex.OwnerDiedError("00" * 28, "", ""), rex.WorkerCrashedError()):
        assert is_transient(exc), type(exc)


def test_node_watch_gives_up_after_wait_for_nodes_s(tmp_path):
    cfg = load_config(data={"input": {"path": str(tmp_path)}, "output": {"path": str(tmp_path / "out")},
                            "model": {"source": "x", "gpus_per_replica": 0, "wait_for_nodes_s": 30}})
    now = [0.0]
    nodes = [{"Alive": True, "Resources": {"CPU": 0.0}}, {"Alive": True, "Resources": {"CPU": 4.0}}]
    progress = Progress(None, str(tmp_path), "r", shards=3, clock=lambda: now[0])
    watch = NodeWatch(cfg, progress, nodes=lambda: nodes, clock=lambda: now[0])
    watch.check()
    assert progress.waiting is None
    nodes[1]["Alive"] = False  # the worker node is lost
    for t in (5, 20):
        now[0] = t
        watch.check()
    assert "waiting for resources" in progress.line(progress.snapshot())
    nodes.append({"Alive": True, "Resources": {"CPU": 2.0}})  # a replacement joins
    now[0] = 40
    watch.check()
    assert progress.waiting is None
    nodes.pop()
    now[0] = 50
    watch.check()
    now[0] = 81
    with pytest.raises(NoNodes, match="no node could run the stages"):
        watch.check()


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", OMP_WAIT_POLICY="PASSIVE",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **FAST_HEALTH)
    env.pop("RAY_ADDRESS", None)
    return env


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


class Cluster:
    """A head without CPUs and worker nodes with some, each in its own process group."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.env, self.port = tmp, _env(tmp), free_port()
        self.gcs = f"127.0.0.1:{self.port}"
        self.head = _start(["--head", "--node-ip-address=127.0.0.1", f"--port={self.port}", "--num-cpus=0",
                            "--num-gpus=0", "--include-dashboard=false"], self.env, tmp / "head.log")
        self.workers: list[subprocess.Popen] = []
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.head.poll() is not None:
                    raise RuntimeError((tmp / "head.log").read_text()[-2000:])
                time.sleep(0.3)

    def add_worker(self, cpus: int = 4, wait: bool = True) -> subprocess.Popen:
        """A worker node; with `wait`, once it has joined (`ray start` says so)."""
        n = len(self.workers)
        log = self.tmp / f"worker{n}.log"
        proc = _start([f"--address={self.gcs}", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
                       "--num-gpus=0"], self.env, log)
        self.workers.append(proc)
        deadline = time.time() + 120
        while wait and "Ray runtime started" not in log.read_text():
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(log.read_text()[-2000:])
            time.sleep(0.3)
        return proc

    def close(self) -> None:
        for proc in (*self.workers, self.head):  # every process of each node is in its group
            _kill_group(proc)
        current = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
        if current.exists() and current.read_text().strip().endswith(f":{self.port}"):
            current.unlink()


@pytest.fixture()
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


def _run_killing_the_node(cluster: Cluster, cfg: dict, tmp: Path, replace: bool,
                          timeout: float = 240) -> tuple[int, str, str]:
    """Run jobs.caption on the cluster; SIGKILL the worker node's process group as soon as its
    Generate replica has written its first part (with more batches to go: the replica pauses 2 s
    per batch), and, with `replace`, start a fresh node 2 s later. Returns (exit code, stdout, stderr)."""
    cfg_path = tmp / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    node = cluster.add_worker()
    driver = subprocess.Popen([sys.executable, "-m", "jobs.caption", "--config", str(cfg_path)], cwd=ROOT,
                              env=dict(cluster.env, RAY_ADDRESS=cluster.gcs, COGVLM_FAULT_PAUSE="generate:2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines: list[str] = []
    out_lines: list[str] = []
    killed = threading.Event()
    readers = [threading.Thread(target=lambda: err_lines.extend(driver.stderr), daemon=True),
               threading.Thread(target=lambda: out_lines.extend(driver.stdout), daemon=True)]
    for r in readers:
        r.start()
    try:
        deadline = time.time() + timeout
        while driver.poll() is None and time.time() < deadline:
            if list(Path(cfg["output"]["path"]).glob("_parts/*/*.parquet")):
                _kill_group(node)  # raylet, object store and every worker of that node at once
                killed.set()
                if replace:
                    time.sleep(2)
                    cluster.add_worker(wait=False)
                break
            time.sleep(0.1)
        driver.wait(timeout=max(1, deadline - time.time()))
    finally:
        if driver.poll() is None:
            driver.kill()
    for r in readers:
        r.join(timeout=10)
    out = "".join(out_lines)
    (tmp / "driver.log").write_text("".join(err_lines))
    assert killed.is_set(), "the run ended before its first part: " + "".join(err_lines)[-3000:]
    return driver.returncode, out, "".join(err_lines)


def _config(ckpt, tok, inp, out, **model) -> dict:
    return {"input": {"path": str(inp)}, "output": {"path": str(out)},
            "model": {"source": str(ckpt), "tokenizer": str(tok), "dtype": "fp32", "gpus_per_replica": 0,
                      "batch_size": 16, "preprocess_workers": 1, "batches_in_flight": 1, "max_replicas": 1,
                      **model},
            "tasks": {"caption": {"max_new_tokens": 4}}, "errors": {"guard_images": 0}, "progress_interval_s": 2}


def _committed_once(out: Path, expected: dict) -> pd.DataFrame:
    df = pd.read_parquet(out / "data")
    assert sorted(df.key) == sorted(expected) and not df.key.duplicated().any()
    assert (df.status == "ok").all(), df[df.status != "ok"][["key", "status", "error_message"]].to_string()
    return df


def test_lost_node_costs_only_its_in_flight_work(cluster, ckpt_v1, tokenizer_v1, tmp_path):
    """The worker node dies after the first commit and a fresh one joins 2 s later: the run ends
    with exit 0, every image once and `ok` (nothing charged to an image because its node went away)."""
    expected = webdataset_shards(tmp_path / "in", n_shards=4, per_shard=16)
    cfg = _config(ckpt_v1, tokenizer_v1, tmp_path / "in", tmp_path / "out")
    rc, out, err = _run_killing_the_node(cluster, cfg, tmp_path, replace=True)
    assert rc == 0, err[-4000:]
    _committed_once(tmp_path / "out", expected)
    assert not list((tmp_path / "out").glob("_parts/*/*.parquet"))


def test_no_node_left_ends_with_exit_3_naming_the_shards(cluster, ckpt_v1, tokenizer_v1, tmp_path):
    """The worker node dies and none replaces it: the run waits `model.wait_for_nodes_s`, saying it
    waits for resources, then ends with exit 3 and one last `error:` line naming the shards left;
    what it committed is whole. (The rerun's exactly-once is the lost-node test's.)"""
    webdataset_shards(tmp_path / "in", n_shards=4, per_shard=16)
    cfg = _config(ckpt_v1, tokenizer_v1, tmp_path / "in", tmp_path / "out", wait_for_nodes_s=8)
    rc, out, err = _run_killing_the_node(cluster, cfg, tmp_path, replace=False)
    assert rc == 3, err[-4000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no node" in last and "000" in last, last
    assert "waiting for resources" in err
    summary = json.JSONDecoder().raw_decode(out[out.index('{\n  "run_id"'):])[0]
    left = set(summary["shards_failed"])
    assert left and not left & set(summary["shards"])
    assert left | set(summary["shards"]) == {f"{i:05d}" for i in range(4)}
    for sid in summary["shards"]:
        rec = json.loads((tmp_path / "out" / "_ledger" / f"{sid}.json").read_text())
        assert pd.read_parquet(tmp_path / "out" / rec["file"]).shape[0] == rec["rows"]


PLACEMENT_PROBE = """
import json, sys
import ray
from pipeline.actors import on_driver_node
from pipeline.crashes import CrashLedger

class Probe(CrashLedger):  # the crash ledger, asked where it lives
    def node(self):
        return ray.get_runtime_context().get_node_id()

ray.init()
pinned = [on_driver_node(Probe) for _ in range(16)]
unpinned = [ray.remote(num_cpus=0)(Probe).remote() for _ in range(16)]
print("placement", json.dumps({"driver": ray.get_runtime_context().get_node_id(),
                               "pinned": ray.get([a.node.remote() for a in pinned]),
                               "unpinned": ray.get([a.node.remote() for a in unpinned])}))
"""


def test_driver_side_actors_live_on_the_drivers_node(cluster, tmp_path):
    """Every placement a run's own actors can get: 16 of them started as the run starts its claim
    keeper and crash ledger (`pipeline.actors.on_driver_node`) on a head without CPUs and a
    worker node all land on the driver's node (so losing a worker node never takes one), where
    the same actors started without the pin go to the worker."""
    cluster.add_worker(cpus=2)
    proc = subprocess.run([sys.executable, "-c", PLACEMENT_PROBE], cwd=ROOT, capture_output=True, text=True,
                          env=dict(cluster.env, RAY_ADDRESS=cluster.gcs), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("placement "))[10:])
    assert set(seen["pinned"]) == {seen["driver"]}
    # the probe can tell: unpinned, the same actors leave the driver's node
    assert set(seen["unpinned"]) - {seen["driver"]}, "unpinned actors stayed on the driver's node"
